//! Protected search attributes: searchable through the gateway, never readable at the server
//! (issue 26; SECURITY.md, "Protected search attributes").
//!
//! For every attribute named in `[search_attributes] protect` (or the namespace's own
//! `[namespaces.<ns>.search_attributes] protect`):
//!
//! - **writes**: every `temporal.api.common.v1.SearchAttributes` of a request (start,
//!   signal-with-start, multi-operation, schedules, upsert / child / continue-as-new commands,
//!   ... wherever the generated table `payload_gateway_proto::scan_search_attributes` finds
//!   one) has the protected values replaced by tokens ([`token`]): a deterministic
//!   authenticated encryption keyed per namespace from the keyring, the key id inside;
//! - **queries**: the visibility query of every WorkflowService request that has one (`query`,
//!   `visibility_query`: list, count, scan, archived, schedules, batch operations) is parsed
//!   ([`query`]); literals compared with a protected attribute by `=`, `!=`, `IN` become the
//!   tokens of every key the namespace may still decrypt with, every other use is refused
//!   (`INVALID_ARGUMENT`), and so is a query that does not parse;
//! - **reads**: every `SearchAttributes` of a response (describe, list, history events,
//!   workflow tasks) has its tokens opened back into the values.
//!
//! At start, the types of the protected attributes are read from the server
//! (`OperatorService/ListSearchAttributes`): anything but `Keyword` and `KeywordList` is
//! refused, naming the attribute and its type.

pub mod query;
pub mod token;

use std::collections::HashMap;
use std::ops::Range;
use std::sync::Arc;

use bytes::Bytes;
use payload_gateway_proto::{
    MessageType, Method, replace_top_level_string, scan_search_attributes, top_level_string_strict,
};

use crate::codec::PayloadCodec;
use crate::config::{Config, ConfigError};
use crate::grpc::{Code, Status};
use crate::payload::Payload;
use query::QueryError;
use token::{NamespaceKey, TokenError};

/// The request fields that hold a visibility query.
const QUERY_FIELDS: [&str; 2] = ["query", "visibility_query"];

/// Only WorkflowService requests carry visibility queries.
const WORKFLOW_SERVICE: &str = "/temporal.api.workflowservice.v1.WorkflowService/";

/// Why a protected search attribute could not be handled; becomes a gRPC status at the edge.
#[derive(Debug, thiserror::Error)]
pub enum SearchAttributeError {
    /// A request's value for a protected attribute is not a string or list of strings.
    #[error("search attribute {attribute} is protected by the gateway: {problem}")]
    Value {
        /// The attribute.
        attribute: String,
        /// What is wrong with the value.
        problem: String,
    },
    /// The visibility query was refused.
    #[error(transparent)]
    Query(#[from] QueryError),
    /// The namespace has no static key to make or find tokens with.
    #[error(
        "search attribute {attribute} is protected by the gateway, but namespace {namespace:?} \
         has no static encryption key to protect it with"
    )]
    NoKey {
        /// The attribute.
        attribute: String,
        /// The namespace.
        namespace: String,
    },
    /// A token names a key the namespace may not (or no longer) decrypt with.
    #[error(
        "search attribute {attribute}: its token names key {key_id:?}, which namespace {namespace:?} may not decrypt with"
    )]
    UnknownKey {
        /// The attribute.
        attribute: String,
        /// The key id in the token.
        key_id: String,
        /// The namespace.
        namespace: String,
    },
    /// A token did not open.
    #[error("search attribute {attribute}: {source}")]
    Token {
        /// The attribute.
        attribute: String,
        /// Why.
        source: TokenError,
    },
    /// A message could not be read.
    #[error("cannot read the message's search attributes: {0}")]
    Malformed(String),
}

impl SearchAttributeError {
    /// The gRPC status for this error in a request (`response`: false) or a response.
    pub fn status(&self, response: bool) -> Status {
        let code = match self {
            Self::Value { .. } | Self::Query(_) => Code::InvalidArgument,
            Self::Token {
                source: TokenError::TooLong { .. },
                ..
            } => Code::InvalidArgument,
            Self::NoKey { .. } | Self::UnknownKey { .. } => Code::FailedPrecondition,
            Self::Token { .. } => Code::DataLoss,
            Self::Malformed(_) if response => Code::Internal,
            Self::Malformed(_) => Code::InvalidArgument,
        };
        Status::new(code, self.to_string())
    }
}

/// The protected attributes per namespace and the codec whose keyring their tokens derive from.
#[derive(Debug)]
pub struct SearchAttributeGuard {
    codec: Arc<PayloadCodec>,
    default: Arc<[String]>,
    namespaces: HashMap<String, Arc<[String]>>,
}

impl SearchAttributeGuard {
    /// The guard for `config`, or `None` when no namespace protects a search attribute.
    pub fn from_config(config: &Config, codec: Arc<PayloadCodec>) -> Option<Self> {
        if !config.protects_search_attributes() {
            return None;
        }
        Some(Self {
            codec,
            default: config.search_attributes.protect.clone().into(),
            namespaces: config
                .namespaces
                .iter()
                .filter_map(|(name, ns)| {
                    ns.search_attributes
                        .as_ref()
                        .map(|sa| (name.clone(), sa.protect.clone().into()))
                })
                .collect(),
        })
    }

    /// The attributes protected in `namespace`.
    pub fn protected(&self, namespace: Option<&str>) -> &[String] {
        namespace
            .and_then(|ns| self.namespaces.get(ns))
            .unwrap_or(&self.default)
    }

    /// Whether requests or responses of `m` may carry search attributes or a query.
    pub fn applies(&self, m: &Method) -> bool {
        m.request.can_hold_search_attributes()
            || m.response.can_hold_search_attributes()
            || query_field(m).is_some()
    }

    /// Protects the search attributes and rewrites the visibility query of a request's
    /// `messages` for `namespace`.
    pub fn on_request(
        &self,
        m: &Method,
        namespace: Option<&str>,
        messages: Vec<Bytes>,
    ) -> Result<Vec<Bytes>, Status> {
        let protected = self.protected(namespace);
        if protected.is_empty() || !self.applies(m) {
            return Ok(messages);
        }
        let mut keys = Keys::new(&self.codec, namespace);
        messages
            .into_iter()
            .map(|message| {
                let message = match query_field(m) {
                    Some(field) => rewrite_query(m.request, field, message, protected, &mut keys)?,
                    None => message,
                };
                rewrite_message(m.request, message, protected, |attribute, payload| {
                    let key = keys.active(attribute)?;
                    protect_payload(attribute, payload, key)
                })
            })
            .collect::<Result<_, _>>()
            .map_err(|e| e.status(false))
    }

    /// Restores the protected search attributes of a response's `messages` of type `ty`.
    pub fn on_response(
        &self,
        ty: MessageType,
        namespace: Option<&str>,
        messages: Vec<Bytes>,
    ) -> Result<Vec<Bytes>, Status> {
        let protected = self.protected(namespace);
        if protected.is_empty() || !ty.can_hold_search_attributes() {
            return Ok(messages);
        }
        let mut keys = Keys::new(&self.codec, namespace);
        messages
            .into_iter()
            .map(|message| {
                rewrite_message(ty, message, protected, |attribute, payload| {
                    restore_payload(attribute, payload, &mut keys)
                })
            })
            .collect::<Result<_, _>>()
            .map_err(|e| e.status(true))
    }
}

/// The query field of `m`'s request, if it is a WorkflowService request with one.
fn query_field(m: &Method) -> Option<&'static str> {
    if !m.path.starts_with(WORKFLOW_SERVICE) {
        return None;
    }
    QUERY_FIELDS
        .into_iter()
        .find(|f| m.request.has_string_field(f))
}

/// The token keys of one namespace, derived on first use within one message batch.
struct Keys<'a> {
    codec: &'a PayloadCodec,
    namespace: Option<&'a str>,
    derived: Option<(Vec<NamespaceKey>, Option<usize>)>,
}

impl<'a> Keys<'a> {
    fn new(codec: &'a PayloadCodec, namespace: Option<&'a str>) -> Self {
        Self {
            codec,
            namespace,
            derived: None,
        }
    }

    fn get(&mut self) -> &(Vec<NamespaceKey>, Option<usize>) {
        let (codec, namespace) = (self.codec, self.namespace);
        self.derived.get_or_insert_with(|| {
            let roots = codec.search_attribute_roots(namespace);
            let ns = namespace.unwrap_or_default();
            let keys: Vec<NamespaceKey> = roots
                .usable
                .iter()
                .map(|(id, root)| NamespaceKey::derive(id, root, ns))
                .collect();
            let active = roots
                .active
                .as_ref()
                .and_then(|(id, _)| keys.iter().position(|k| k.id() == id));
            (keys, active)
        })
    }

    fn no_key(&self, attribute: &str) -> SearchAttributeError {
        SearchAttributeError::NoKey {
            attribute: attribute.to_owned(),
            namespace: self.namespace.unwrap_or_default().to_owned(),
        }
    }

    /// The key new tokens are made with.
    fn active(&mut self, attribute: &str) -> Result<&NamespaceKey, SearchAttributeError> {
        let error = self.no_key(attribute);
        match self.get() {
            (keys, Some(i)) => Ok(&keys[*i]),
            _ => Err(error),
        }
    }

    /// The tokens of `value` under every key in use (the active one first).
    fn tokens(
        &mut self,
        attribute: &str,
        value: &str,
    ) -> Result<Vec<String>, SearchAttributeError> {
        let error = self.no_key(attribute);
        let (keys, active) = self.get();
        let mut order: Vec<&NamespaceKey> = active.iter().map(|&i| &keys[i]).collect();
        order.extend(
            keys.iter()
                .enumerate()
                .filter(|(i, _)| Some(*i) != *active)
                .map(|(_, k)| k),
        );
        if order.is_empty() {
            return Err(error);
        }
        order
            .into_iter()
            .map(|k| {
                k.token(attribute, value)
                    .map_err(|source| SearchAttributeError::Token {
                        attribute: attribute.to_owned(),
                        source,
                    })
            })
            .collect()
    }

    /// Opens `token` of `attribute`.
    fn open(
        &mut self,
        attribute: &str,
        key_id: &str,
        blob: &str,
    ) -> Result<String, SearchAttributeError> {
        let namespace = self.namespace.unwrap_or_default().to_owned();
        let (keys, _) = self.get();
        let key = keys.iter().find(|k| k.id() == key_id).ok_or_else(|| {
            SearchAttributeError::UnknownKey {
                attribute: attribute.to_owned(),
                key_id: key_id.to_owned(),
                namespace,
            }
        })?;
        key.open(attribute, blob)
            .map_err(|source| SearchAttributeError::Token {
                attribute: attribute.to_owned(),
                source,
            })
    }
}

/// Rewrites the visibility query in field `field` of `message`.
fn rewrite_query(
    ty: MessageType,
    field: &str,
    message: Bytes,
    protected: &[String],
    keys: &mut Keys<'_>,
) -> Result<Bytes, SearchAttributeError> {
    let malformed =
        |e: payload_gateway_proto::StringFieldError| SearchAttributeError::Malformed(e.to_string());
    let Some(query) = top_level_string_strict(ty, &message, field).map_err(malformed)? else {
        return Ok(message);
    };
    let rewritten = query::rewrite(
        query,
        |name| protected.iter().any(|p| p == name),
        |attribute, value| keys.tokens(attribute, value),
    )?;
    match rewritten {
        None => Ok(message),
        Some(q) => Ok(replace_top_level_string(ty, &message, field, &q)
            .map_err(malformed)?
            .unwrap_or(message)),
    }
}

/// Rewrites the protected entries of every `SearchAttributes` in `message` with `edit`
/// (`Ok(None)`: keep that entry's payload).
fn rewrite_message(
    ty: MessageType,
    message: Bytes,
    protected: &[String],
    mut edit: impl FnMut(&str, &[u8]) -> Result<Option<Vec<u8>>, SearchAttributeError>,
) -> Result<Bytes, SearchAttributeError> {
    if !ty.can_hold_search_attributes() {
        return Ok(message);
    }
    let scan = scan_search_attributes(ty, &message)
        .map_err(|e| SearchAttributeError::Malformed(e.to_string()))?;
    if scan.sites().is_empty() {
        return Ok(message);
    }
    let mut replacements = Vec::with_capacity(scan.sites().len());
    for site in scan.sites() {
        replacements
            .push(edit_entries(&message[site.range()], protected, &mut edit)?.map(Bytes::from));
    }
    scan.splice(&message, &replacements)
        .map_err(|e| SearchAttributeError::Malformed(e.to_string()))
}

/// A serialized `SearchAttributes` with the payloads of protected entries replaced by `edit`;
/// every other byte is kept. `Ok(None)`: nothing changed.
fn edit_entries(
    sa: &[u8],
    protected: &[String],
    edit: &mut impl FnMut(&str, &[u8]) -> Result<Option<Vec<u8>>, SearchAttributeError>,
) -> Result<Option<Vec<u8>>, SearchAttributeError> {
    let mut out = Vec::with_capacity(sa.len() + 64);
    let mut changed = false;
    for field in wire::fields(sa)? {
        let raw = &sa[field.raw.clone()];
        if !(field.number == 1 && field.wire_type == wire::LEN) {
            out.extend_from_slice(raw);
            continue;
        }
        let entry = &sa[field.value.clone()];
        let (mut key, mut value): (Option<Range<usize>>, Option<Range<usize>>) = (None, None);
        for f in wire::fields(entry)? {
            match (f.number, f.wire_type) {
                (1, wire::LEN) => key = Some(f.value),
                (2, wire::LEN) => value = Some(f.value),
                _ => {}
            }
        }
        let name = key
            .map(|k| std::str::from_utf8(&entry[k]))
            .transpose()
            .map_err(|_| {
                SearchAttributeError::Malformed("a search attribute name is not UTF-8".into())
            })?
            .unwrap_or_default();
        let replaced = if protected.iter().any(|p| p == name) {
            edit(name, value.map_or(&[][..], |v| &entry[v]))?
        } else {
            None
        };
        match replaced {
            Some(payload) => {
                let mut e = Vec::with_capacity(name.len() + payload.len() + 12);
                wire::put_len(&mut e, 1, name.as_bytes());
                wire::put_len(&mut e, 2, &payload);
                wire::put_len(&mut out, 1, &e);
                changed = true;
            }
            None => out.extend_from_slice(raw),
        }
    }
    Ok(changed.then_some(out))
}

const ENCODING: &str = "encoding";
const JSON_PLAIN: &str = "json/plain";

/// The payload of a written value with its strings replaced by tokens. `Ok(None)`: a removal
/// (`null`, no data, `binary/null`), left as it is.
fn protect_payload(
    attribute: &str,
    payload: &[u8],
    key: &NamespaceKey,
) -> Result<Option<Vec<u8>>, SearchAttributeError> {
    let value_error = |problem: String| SearchAttributeError::Value {
        attribute: attribute.to_owned(),
        problem,
    };
    let mut p = Payload::from_bytes(payload).map_err(value_error)?;
    match p.meta_str(ENCODING) {
        Some(JSON_PLAIN) => {}
        Some("binary/null") => return Ok(None),
        None if p.data.is_empty() => return Ok(None),
        other => {
            return Err(value_error(format!(
                "its value must be a json/plain payload, not {:?}",
                other.unwrap_or("(no encoding)")
            )));
        }
    }
    if p.data.is_empty() {
        return Ok(None);
    }
    let value: serde_json::Value = serde_json::from_slice(&p.data)
        .map_err(|e| value_error(format!("its value is not JSON: {e}")))?;
    let token = |s: &str| {
        key.token(attribute, s)
            .map(serde_json::Value::String)
            .map_err(|source| SearchAttributeError::Token {
                attribute: attribute.to_owned(),
                source,
            })
    };
    let new = match value {
        serde_json::Value::Null => return Ok(None),
        serde_json::Value::String(s) => token(&s)?,
        serde_json::Value::Array(items) => serde_json::Value::Array(
            items
                .iter()
                .map(|item| match item {
                    serde_json::Value::String(s) => token(s),
                    _ => Err(value_error(
                        "a KeywordList value must hold only strings".to_owned(),
                    )),
                })
                .collect::<Result<_, _>>()?,
        ),
        _ => {
            return Err(value_error(
                "only Keyword (a string) and KeywordList (a list of strings) values can be protected"
                    .to_owned(),
            ));
        }
    };
    p.data = Bytes::from(serde_json::to_vec(&new).expect("JSON of strings serializes"));
    Ok(Some(p.to_bytes().to_vec()))
}

/// The payload of a value read back from the server with its tokens opened. Values that are
/// not tokens (written around the gateway) are left as they are.
fn restore_payload(
    attribute: &str,
    payload: &[u8],
    keys: &mut Keys<'_>,
) -> Result<Option<Vec<u8>>, SearchAttributeError> {
    let Ok(mut p) = Payload::from_bytes(payload) else {
        return Ok(None);
    };
    if p.meta_str(ENCODING) != Some(JSON_PLAIN) {
        return Ok(None);
    }
    let Ok(value) = serde_json::from_slice::<serde_json::Value>(&p.data) else {
        return Ok(None);
    };
    let mut changed = false;
    let mut open = |v: serde_json::Value| -> Result<serde_json::Value, SearchAttributeError> {
        match &v {
            serde_json::Value::String(s) => match token::parse(s) {
                Some((key_id, blob)) => {
                    changed = true;
                    keys.open(attribute, key_id, blob)
                        .map(serde_json::Value::String)
                }
                None => Ok(v),
            },
            _ => Ok(v),
        }
    };
    let new = match value {
        serde_json::Value::Array(items) => {
            serde_json::Value::Array(items.into_iter().map(&mut open).collect::<Result<_, _>>()?)
        }
        v => open(v)?,
    };
    if !changed {
        return Ok(None);
    }
    p.data = Bytes::from(serde_json::to_vec(&new).expect("JSON of strings serializes"));
    Ok(Some(p.to_bytes().to_vec()))
}

/// `IndexedValueType` names, by number (`temporal.api.enums.v1`).
fn indexed_value_type(n: u64) -> &'static str {
    match n {
        1 => "Text",
        2 => "Keyword",
        3 => "Int",
        4 => "Double",
        5 => "Bool",
        6 => "Datetime",
        7 => "KeywordList",
        _ => "Unspecified",
    }
}

/// How long the start-up check may hold the start when the server is slow to answer.
const START_CHECK_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// Checks, at start, that every protected attribute is a `Keyword` or `KeywordList` in every
/// namespace that protects it (types read from the server), and that each such namespace has a
/// static key to make tokens with. A server that cannot be asked (or does not answer within
/// 10 s) is logged and skipped (the check then happens on the next start); a wrong type is a
/// [`ConfigError`].
pub async fn check_at_start(
    config: &Config,
    codec: &PayloadCodec,
    router: &crate::upstream::Router,
) -> Result<(), ConfigError> {
    match tokio::time::timeout(START_CHECK_TIMEOUT, check_types(config, codec, router)).await {
        Ok(result) => result,
        Err(_) => {
            tracing::warn!(
                "search attributes: the server did not answer within {} s; the types of protected attributes are not checked",
                START_CHECK_TIMEOUT.as_secs()
            );
            Ok(())
        }
    }
}

/// Namespaces are listed at the default upstream; each namespace's types are read at the
/// upstream that serves it.
async fn check_types(
    config: &Config,
    codec: &PayloadCodec,
    router: &crate::upstream::Router,
) -> Result<(), ConfigError> {
    let guard_keys = |namespace: Option<&str>, key: String| {
        let roots = codec.search_attribute_roots(namespace);
        if roots.active.is_none() {
            return Err(ConfigError::invalid(
                key,
                format!(
                    "namespace {} protects search attributes but has no static encryption key \
                     (encryption off, or its active key is a kms key): tokens need a key from \
                     a file or an environment variable",
                    namespace.unwrap_or("(default)")
                ),
            ));
        }
        Ok(())
    };
    if !config.search_attributes.protect.is_empty() {
        guard_keys(None, "search_attributes.protect".to_owned())?;
    }
    let mut namespaces: Vec<(String, String)> = Vec::new();
    for (name, ns) in &config.namespaces {
        let key = match &ns.search_attributes {
            Some(sa) if !sa.protect.is_empty() => {
                format!("namespaces.{name}.search_attributes.protect")
            }
            Some(_) => continue,
            None if config.search_attributes.protect.is_empty() => continue,
            None => "search_attributes.protect".to_owned(),
        };
        guard_keys(Some(name), key.clone())?;
        namespaces.push((name.clone(), key));
    }
    if !config.search_attributes.protect.is_empty() {
        match list_namespaces(router.default_upstream()).await {
            Ok(names) => {
                for name in names {
                    if !config.namespaces.contains_key(&name) {
                        guard_keys(Some(&name), "search_attributes.protect".to_owned())?;
                        namespaces.push((name, "search_attributes.protect".to_owned()));
                    }
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "search attributes: cannot list the server's namespaces; the types of protected attributes are not checked");
                return Ok(());
            }
        }
    }
    for (namespace, key) in namespaces {
        let types = match list_search_attributes(router.for_namespace(&namespace), &namespace).await
        {
            Ok(types) => types,
            Err(CheckError::Unanswered(e)) => {
                tracing::warn!(namespace, error = %e, "search attributes: the server does not answer; the types of protected attributes are not checked");
                return Ok(());
            }
            Err(CheckError::Refused(e)) => {
                tracing::warn!(namespace, error = %e, "search attributes: cannot read the namespace's search attribute types; not checked");
                continue;
            }
        };
        for attribute in config.protected_search_attributes(Some(&namespace)) {
            match types.get(attribute.as_str()) {
                Some(2 | 7) => {}
                Some(&other) => {
                    return Err(ConfigError::invalid(
                        key,
                        format!(
                            "search attribute {attribute} of namespace {namespace} is of type {}: \
                             only Keyword and KeywordList attributes can be protected",
                            indexed_value_type(other)
                        ),
                    ));
                }
                None => tracing::warn!(
                    namespace,
                    attribute = %attribute,
                    "search attributes: protected attribute is not registered in this namespace"
                ),
            }
        }
    }
    Ok(())
}

const LIMIT: usize = 16 * 1024 * 1024;

/// Every namespace the server knows (first page of up to 1000).
async fn list_namespaces(
    upstream: &crate::upstream::Upstream,
) -> Result<Vec<String>, crate::upstream::client::CallError> {
    let mut request = Vec::new();
    wire::put_varint(&mut request, 1 << 3); // page_size
    wire::put_varint(&mut request, 1000);
    let response = crate::upstream::client::unary(
        upstream,
        "/temporal.api.workflowservice.v1.WorkflowService/ListNamespaces",
        None,
        request,
        LIMIT,
    )
    .await?;
    let mut names = Vec::new();
    // ListNamespacesResponse.namespaces (1) → DescribeNamespaceResponse.namespace_info (1) →
    // NamespaceInfo.name (1).
    for described in payload_gateway_proto::len_fields_by_number(&response, 1).unwrap_or_default() {
        for info in payload_gateway_proto::len_fields_by_number(described, 1).unwrap_or_default() {
            if let Ok(Some(name)) = payload_gateway_proto::string_field_by_number(info, 1) {
                names.push(name.to_owned());
            }
        }
    }
    Ok(names)
}

/// Why the types of one namespace could not be read.
enum CheckError {
    /// The server did not answer (unreachable, timed out): the rest is not asked either.
    Unanswered(String),
    /// The server answered with an error (an unknown namespace) or something unreadable.
    Refused(String),
}

/// The custom search attributes of `namespace` with their `IndexedValueType` numbers.
async fn list_search_attributes(
    upstream: &crate::upstream::Upstream,
    namespace: &str,
) -> Result<HashMap<String, u64>, CheckError> {
    use crate::upstream::client::CallError;
    let mut request = Vec::new();
    wire::put_len(&mut request, 1, namespace.as_bytes());
    let response = crate::upstream::client::unary(
        upstream,
        "/temporal.api.operatorservice.v1.OperatorService/ListSearchAttributes",
        Some(namespace),
        request,
        LIMIT,
    )
    .await
    .map_err(|e| match &e {
        // UNAVAILABLE, DEADLINE_EXCEEDED (the gateway's own timeout included).
        CallError::Status { code: 14 | 4, .. } => CheckError::Unanswered(e.to_string()),
        _ => CheckError::Refused(e.to_string()),
    })?;
    let mut types = HashMap::new();
    let malformed = |e: SearchAttributeError| CheckError::Refused(e.to_string());
    for field in wire::fields(&response).map_err(malformed)? {
        // custom_attributes (1) and system_attributes (2): map<string, IndexedValueType>.
        if !matches!(field.number, 1 | 2) || field.wire_type != wire::LEN {
            continue;
        }
        let entry = &response[field.value];
        let (mut name, mut ty) = (None, 0u64);
        for f in wire::fields(entry).map_err(malformed)? {
            match (f.number, f.wire_type) {
                (1, wire::LEN) => name = std::str::from_utf8(&entry[f.value]).ok(),
                (2, wire::VARINT) => ty = wire::varint_at(entry, f.value.start),
                _ => {}
            }
        }
        if let Some(name) = name {
            types.insert(name.to_owned(), ty);
        }
    }
    Ok(types)
}

/// The few protobuf wire helpers this module needs (top-level fields of small messages).
mod wire {
    use std::ops::Range;

    use super::SearchAttributeError;

    pub(super) const VARINT: u8 = 0;
    pub(super) const LEN: u8 = 2;

    /// One top-level field.
    pub(super) struct Field {
        pub(super) number: u32,
        pub(super) wire_type: u8,
        /// Tag through the end of the value.
        pub(super) raw: Range<usize>,
        /// The value (a length-delimited field's contents; a varint's bytes).
        pub(super) value: Range<usize>,
    }

    fn malformed(what: &str) -> SearchAttributeError {
        SearchAttributeError::Malformed(what.to_owned())
    }

    fn varint(buf: &[u8], pos: &mut usize) -> Result<u64, SearchAttributeError> {
        let mut value = 0u64;
        for shift in (0..70).step_by(7) {
            let Some(&b) = buf.get(*pos) else {
                return Err(malformed("truncated varint"));
            };
            *pos += 1;
            if shift == 63 && b > 1 {
                return Err(malformed("varint overflows 64 bits"));
            }
            value |= u64::from(b & 0x7f) << shift;
            if b & 0x80 == 0 {
                return Ok(value);
            }
        }
        Err(malformed("varint longer than 10 bytes"))
    }

    /// The varint starting at `pos` (already validated by [`fields`]).
    pub(super) fn varint_at(buf: &[u8], mut pos: usize) -> u64 {
        varint(buf, &mut pos).unwrap_or_default()
    }

    /// The top-level fields of `buf` (groups are refused: no Temporal message uses them).
    pub(super) fn fields(buf: &[u8]) -> Result<Vec<Field>, SearchAttributeError> {
        let mut out = Vec::new();
        let mut pos = 0;
        while pos < buf.len() {
            let start = pos;
            let tag = varint(buf, &mut pos)?;
            let (number, wire_type) = ((tag >> 3) as u32, (tag & 7) as u8);
            if number == 0 {
                return Err(malformed("field number 0"));
            }
            let value_start = pos;
            let value = match wire_type {
                VARINT => {
                    varint(buf, &mut pos)?;
                    value_start..pos
                }
                1 | 5 => {
                    let n = if wire_type == 1 { 8 } else { 4 };
                    if buf.len() - pos < n {
                        return Err(malformed("truncated fixed-width value"));
                    }
                    pos += n;
                    value_start..pos
                }
                LEN => {
                    let len = varint(buf, &mut pos)?;
                    if len > (buf.len() - pos) as u64 {
                        return Err(malformed("length past the end of the message"));
                    }
                    let s = pos;
                    pos += len as usize;
                    s..pos
                }
                _ => return Err(malformed("unsupported wire type")),
            };
            out.push(Field {
                number,
                wire_type,
                raw: start..pos,
                value,
            });
        }
        Ok(out)
    }

    pub(super) fn put_varint(out: &mut Vec<u8>, mut v: u64) {
        while v >= 0x80 {
            out.push((v as u8) | 0x80);
            v >>= 7;
        }
        out.push(v as u8);
    }

    pub(super) fn put_len(out: &mut Vec<u8>, field: u32, value: &[u8]) {
        put_varint(out, (u64::from(field) << 3) | u64::from(LEN));
        put_varint(out, value.len() as u64);
        out.extend_from_slice(value);
    }
}

#[cfg(test)]
mod tests;
