//! The server's size limits per namespace, and the limits the gateway tells SDKs instead.
//!
//! sdk-core SDKs (Python, TypeScript, .NET, Ruby) read `NamespaceInfo.limits` from
//! `DescribeNamespace` when a worker starts (`validate`) and refuse, inside the worker,
//! payloads and memos past `blob_size_limit_error` / `memo_size_limit_error` (`TMPRL1103`)
//! before a request leaves the process: the gateway never sees them. For a namespace that
//! offloads, the gateway keeps larger limits itself (a payload past the threshold becomes a
//! reference; [`crate::rewrite::fit`] offloads more until a message fits), so it
//! **advertises** what it keeps ([`Promise`]): the driver's `max_payload_size` (less the
//! codec's worst-case growth) per payload field and memo, and its own `proxy.max_message_bytes`
//! for a workflow task completion. Namespaces without offload keep the server's figures:
//! nothing is promised that is not kept.
//!
//! The server's own figures ([`Stated`]) are what the fit pass must keep. They are learned from
//! every namespace answer passing through (before it is rewritten) and asked for with
//! `DescribeNamespace` over the gateway's upstream connection when a namespace has none
//! younger than `storage.server_limits.refresh_ms`; config overrides them. The server's gRPC
//! receive limit is not in any answer: `storage.server_limits.max_message_bytes` (4 MiB, gRPC's
//! default) stands for it.

use std::time::{Duration, Instant};

use bytes::Bytes;
use payload_gateway_proto::{RawField, StringFieldError, top_level_fields};

use crate::config::ServerLimitsConfig;
use crate::upstream::Router;
use crate::upstream::client;

/// `DescribeNamespaceResponse.namespace_info`, `UpdateNamespaceResponse.namespace_info` and
/// `ListNamespacesResponse.namespaces`: all field 1.
const NAMESPACE_INFO_FIELD: u32 = 1;
/// `NamespaceInfo.name` and `NamespaceInfo.limits`.
const NAME_FIELD: u32 = 1;
const LIMITS_FIELD: u32 = 8;
/// `NamespaceInfo.Limits` fields.
const BLOB_FIELD: u32 = 1;
const MEMO_FIELD: u32 = 2;
const COMPLETION_FIELD: u32 = 3;
/// Namespaces remembered at most.
const CAPACITY: usize = 10_000;
/// A server that could not be asked is asked again after this long.
const RETRY_AFTER: Duration = Duration::from_secs(5);

/// The server's `limit.blobSize.error` default, used until the server states its own.
pub const SERVER_DEFAULT_BLOB_BYTES: usize = 2 * 1024 * 1024;
/// The server's `limit.memoSize.error` default, used until the server states its own.
pub const SERVER_DEFAULT_MEMO_BYTES: usize = 2 * 1024 * 1024;
/// Kept free below an advertised limit: what compression (zstd's worst case is 1/256 more),
/// encryption (nonce, tag, metadata) and framing may add to a payload the SDK measured.
const CODEC_GROWTH_MARGIN: u64 = 64 * 1024;

/// The limits a server states in one `NamespaceInfo.limits` (absent or 0: not stated).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Stated {
    /// `blob_size_limit_error`: one payload field.
    pub blob: Option<u64>,
    /// `memo_size_limit_error`: a memo in all.
    pub memo: Option<u64>,
    /// `workflow_task_completion_size_limit_error`: one workflow task completion.
    pub completion: Option<u64>,
}

/// What a message forwarded for one namespace must keep.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// The whole message (the server's gRPC receive limit).
    pub message: usize,
    /// The payloads of one field together (one `Payloads`, or the payloads of one message).
    pub blob: usize,
    /// A memo's payloads together.
    pub memo: usize,
    /// A `RespondWorkflowTaskCompleted` request, when the server states a limit.
    pub completion: Option<usize>,
}

/// The limits the gateway advertises for a namespace that offloads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Promise {
    /// Advertised `blob_size_limit_error`.
    pub blob: u64,
    /// Advertised `memo_size_limit_error`.
    pub memo: u64,
    /// Advertised `workflow_task_completion_size_limit_error`.
    pub completion: u64,
}

impl Promise {
    /// What a namespace whose driver stores payloads of up to `max_offload_size` bytes, behind
    /// a gateway accepting messages of up to `max_message_bytes`, can keep.
    pub fn new(max_offload_size: u64, max_message_bytes: usize) -> Self {
        let message = (max_message_bytes as u64).saturating_sub(CODEC_GROWTH_MARGIN);
        let payload = max_offload_size
            .saturating_sub(max_offload_size / 256)
            .saturating_sub(CODEC_GROWTH_MARGIN)
            .min(message);
        Self {
            blob: payload,
            memo: payload,
            completion: message,
        }
    }
}

/// Which namespace answer a response is: they all hold `NamespaceInfo`s in field 1.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NamespaceAnswer {
    /// `DescribeNamespaceResponse` (`namespace_info`).
    Describe,
    /// `UpdateNamespaceResponse` (`namespace_info`).
    Update,
    /// `ListNamespacesResponse` (`namespaces`: each a `DescribeNamespaceResponse`).
    List,
}

impl NamespaceAnswer {
    /// The answer a WorkflowService method returns, if it is one.
    pub fn of_method(path: &str) -> Option<Self> {
        let name = path.strip_prefix("/temporal.api.workflowservice.v1.WorkflowService/")?;
        match name {
            "DescribeNamespace" => Some(Self::Describe),
            "UpdateNamespace" => Some(Self::Update),
            "ListNamespaces" => Some(Self::List),
            _ => None,
        }
    }
}

/// Why a namespace answer could not be read or rewritten.
#[derive(Debug, thiserror::Error)]
#[error("malformed namespace answer: {0}")]
pub struct AnswerError(#[from] StringFieldError);

/// Every `NamespaceInfo` in `message` (an `answer`) as (name, stated limits), merged as a
/// protobuf parser merges repeated occurrences of a singular field.
pub fn stated_in(
    answer: NamespaceAnswer,
    message: &[u8],
) -> Result<Vec<(String, Stated)>, AnswerError> {
    let mut out = Vec::new();
    for holder in holders(answer, message)? {
        let (name, stated) = read_info(&len_values(holder, NAMESPACE_INFO_FIELD)?)?;
        if !name.is_empty() {
            out.push((name, stated));
        }
    }
    Ok(out)
}

/// The name and stated limits of one `NamespaceInfo` given as the `parts` a parser merges:
/// the last name wins, limits merge field by field.
fn read_info(parts: &[&[u8]]) -> Result<(String, Stated), AnswerError> {
    let mut name = String::new();
    let mut stated = Stated::default();
    for info in parts {
        for field in top_level_fields(info)? {
            match (field.number, &field.value) {
                (NAME_FIELD, Some(v)) => {
                    name = String::from_utf8_lossy(&info[v.clone()]).into_owned()
                }
                (LIMITS_FIELD, Some(v)) => merge_limits(&mut stated, &info[v.clone()])?,
                _ => {}
            }
        }
    }
    Ok((name, stated))
}

fn merge_limits(stated: &mut Stated, limits: &[u8]) -> Result<(), AnswerError> {
    for field in top_level_fields(limits)? {
        let Some(v) = field.varint else { continue };
        // int64 on the wire: a negative value is a huge varint; neither states a limit.
        let v = (v > 0 && v <= i64::MAX as u64).then_some(v);
        match field.number {
            BLOB_FIELD => stated.blob = v,
            MEMO_FIELD => stated.memo = v,
            COMPLETION_FIELD => stated.completion = v,
            _ => {}
        }
    }
    Ok(())
}

/// Rewrites the limits of every `NamespaceInfo` in `message` (an `answer`) whose name
/// `promise` has a [`Promise`] for; `None` when nothing changes. Every other byte is kept; the
/// info's own `limits` fields are replaced by one holding the promise.
pub fn advertise(
    answer: NamespaceAnswer,
    message: &[u8],
    promise: impl Fn(&str) -> Option<Promise>,
) -> Result<Option<Vec<u8>>, AnswerError> {
    match answer {
        NamespaceAnswer::Describe | NamespaceAnswer::Update => {
            advertise_in_holder(message, &promise)
        }
        NamespaceAnswer::List => {
            let fields = top_level_fields(message)?;
            let mut edits = Vec::new();
            for field in &fields {
                if let (NAMESPACE_INFO_FIELD, Some(v)) = (field.number, &field.value)
                    && let Some(edited) = advertise_in_holder(&message[v.clone()], &promise)?
                {
                    edits.push((field.whole.clone(), edited));
                }
            }
            Ok((!edits.is_empty()).then(|| rebuild(message, &fields, edits)))
        }
    }
}

/// A `DescribeNamespaceResponse` or `UpdateNamespaceResponse`.
fn advertise_in_holder(
    holder: &[u8],
    promise: &impl Fn(&str) -> Option<Promise>,
) -> Result<Option<Vec<u8>>, AnswerError> {
    let fields = top_level_fields(holder)?;
    let infos: Vec<&RawField> = fields
        .iter()
        .filter(|f| f.number == NAMESPACE_INFO_FIELD && f.value.is_some())
        .collect();
    let Some(last) = infos.last() else {
        return Ok(None);
    };
    // The name a parser sees: the last one across the merged parts.
    let parts: Vec<&[u8]> = infos
        .iter()
        .map(|info| &holder[info.value.clone().unwrap_or_default()])
        .collect();
    let (name, _) = read_info(&parts)?;
    let Some(promise) = Some(name)
        .filter(|n| !n.is_empty())
        .and_then(|n| promise(&n))
    else {
        return Ok(None);
    };
    let last_whole = last.whole.clone();
    let mut edits = Vec::new();
    for info in &infos {
        let bytes = &holder[info.value.clone().unwrap_or_default()];
        let mut edited = without_field(bytes, LIMITS_FIELD)?;
        if info.whole == last_whole {
            put_len_field(&mut edited, LIMITS_FIELD, &limits_message(&promise));
        }
        edits.push((info.whole.clone(), edited));
    }
    Ok(Some(rebuild(holder, &fields, edits)))
}

/// `NamespaceInfo.Limits` holding `promise`.
fn limits_message(promise: &Promise) -> Vec<u8> {
    let mut out = Vec::with_capacity(32);
    for (number, value) in [
        (BLOB_FIELD, promise.blob),
        (MEMO_FIELD, promise.memo),
        (COMPLETION_FIELD, promise.completion),
    ] {
        prost::encoding::encode_key(number, prost::encoding::WireType::Varint, &mut out);
        prost::encoding::encode_varint(value, &mut out);
    }
    out
}

/// `message` without any occurrence of field `number`.
fn without_field(message: &[u8], number: u32) -> Result<Vec<u8>, AnswerError> {
    let mut out = Vec::with_capacity(message.len() + 32);
    for f in top_level_fields(message)? {
        if f.number != number {
            out.extend_from_slice(&message[f.whole]);
        }
    }
    Ok(out)
}

fn put_len_field(out: &mut Vec<u8>, number: u32, value: &[u8]) {
    prost::encoding::encode_key(number, prost::encoding::WireType::LengthDelimited, out);
    prost::encoding::encode_varint(value.len() as u64, out);
    out.extend_from_slice(value);
}

/// `message` with the fields whose whole ranges `edits` name replaced by length-delimited
/// fields of the same number holding the new values; every other field kept as it was.
fn rebuild(
    message: &[u8],
    fields: &[RawField],
    edits: Vec<(std::ops::Range<usize>, Vec<u8>)>,
) -> Vec<u8> {
    let mut out = Vec::with_capacity(message.len() + 64);
    let mut edits = edits.into_iter().peekable();
    for f in fields {
        match edits.peek() {
            Some((whole, _)) if *whole == f.whole => {
                let (_, value) = edits.next().unwrap_or_default();
                put_len_field(&mut out, f.number, &value);
            }
            _ => out.extend_from_slice(&message[f.whole.clone()]),
        }
    }
    out
}

/// The messages holding `namespace_info` in an answer: the answer itself, or each entry of a
/// list.
fn holders(answer: NamespaceAnswer, message: &[u8]) -> Result<Vec<&[u8]>, AnswerError> {
    Ok(match answer {
        NamespaceAnswer::Describe | NamespaceAnswer::Update => vec![message],
        NamespaceAnswer::List => len_values(message, NAMESPACE_INFO_FIELD)?,
    })
}

fn len_values(message: &[u8], number: u32) -> Result<Vec<&[u8]>, AnswerError> {
    Ok(payload_gateway_proto::len_fields_by_number(
        message, number,
    )?)
}

#[derive(Debug, Clone, Copy)]
struct Entry {
    /// `None`: the server could not be asked (defaults apply until it can).
    stated: Option<Stated>,
    at: Instant,
}

/// The server's limits per namespace: learned, asked for, cached.
#[derive(Debug)]
pub struct ServerLimits {
    router: Router,
    config: ServerLimitsConfig,
    cache: quick_cache::sync::Cache<String, Entry>,
}

impl ServerLimits {
    /// Limits of namespaces served through `router` (each asked at its own upstream), within
    /// `config`.
    pub fn new(router: Router, config: ServerLimitsConfig) -> Self {
        Self {
            router,
            config,
            cache: quick_cache::sync::Cache::new(CAPACITY),
        }
    }

    /// `[storage.server_limits]`.
    pub fn config(&self) -> &ServerLimitsConfig {
        &self.config
    }

    /// Remembers the limits the server stated in a namespace `answer` passing through.
    pub fn learn(&self, answer: NamespaceAnswer, message: &[u8]) {
        match stated_in(answer, message) {
            Ok(found) => {
                for (name, stated) in found {
                    self.cache.insert(
                        name,
                        Entry {
                            stated: Some(stated),
                            at: Instant::now(),
                        },
                    );
                }
            }
            Err(e) => tracing::debug!(error = %e, "namespace answer not learned from"),
        }
    }

    /// What a message forwarded for `namespace` must keep: the server's figures (asked for
    /// when none is fresh), config overrides, defaults where the server states none or cannot
    /// be asked.
    pub async fn of(&self, namespace: &str) -> Limits {
        let refresh = Duration::from_millis(self.config.refresh_ms);
        let fresh = |e: &Entry| {
            let ttl = if e.stated.is_some() {
                refresh
            } else {
                RETRY_AFTER
            };
            e.at.elapsed() < ttl
        };
        let entry = match self.cache.get(namespace) {
            Some(e) if fresh(&e) => e,
            _ => {
                // One lookup per namespace at a time; the others wait for its answer.
                match self.cache.get_value_or_guard_async(namespace).await {
                    Ok(e) if fresh(&e) => e,
                    Ok(_) => {
                        self.cache.remove(namespace);
                        let e = self.ask(namespace).await;
                        self.cache.insert(namespace.to_owned(), e);
                        e
                    }
                    Err(guard) => {
                        let e = self.ask(namespace).await;
                        let _ = guard.insert(e);
                        e
                    }
                }
            }
        };
        self.effective(entry.stated.unwrap_or_default())
    }

    async fn ask(&self, namespace: &str) -> Entry {
        let upstream = self.router.for_namespace(namespace);
        let stated = match client::describe_namespace(upstream, namespace).await {
            Ok(answer) => stated_in(NamespaceAnswer::Describe, &answer)
                .map_err(|e| e.to_string())
                .and_then(|found| {
                    found
                        .into_iter()
                        .find(|(name, _)| name == namespace)
                        .map(|(_, s)| s)
                        .ok_or_else(|| "the answer names another namespace".to_owned())
                }),
            Err(e) => Err(e.to_string()),
        };
        match stated {
            Ok(stated) => Entry {
                stated: Some(stated),
                at: Instant::now(),
            },
            Err(reason) => {
                tracing::warn!(namespace, %reason, "cannot read the server's limits for the namespace: the defaults apply");
                Entry {
                    stated: None,
                    at: Instant::now(),
                }
            }
        }
    }

    fn effective(&self, stated: Stated) -> Limits {
        let c = &self.config;
        let or = |over: Option<usize>, stated: Option<u64>, default: usize| {
            over.or(stated.map(|s| usize::try_from(s).unwrap_or(usize::MAX)))
                .unwrap_or(default)
        };
        Limits {
            message: c.max_message_bytes,
            blob: or(c.blob_size_bytes, stated.blob, SERVER_DEFAULT_BLOB_BYTES),
            memo: or(c.memo_size_bytes, stated.memo, SERVER_DEFAULT_MEMO_BYTES),
            completion: c.workflow_task_completion_bytes.or(stated
                .completion
                .map(|s| usize::try_from(s).unwrap_or(usize::MAX))),
        }
    }
}

/// A message rewritten by [`advertise`], as bytes.
pub fn advertised_bytes(
    answer: NamespaceAnswer,
    message: &Bytes,
    promise: impl Fn(&str) -> Option<Promise>,
) -> Result<Bytes, AnswerError> {
    Ok(advertise(answer, message, promise)?
        .map(Bytes::from)
        .unwrap_or_else(|| message.clone()))
}

#[cfg(test)]
mod tests;
