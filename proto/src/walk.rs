//! The scanner: finds every payload site in a serialized message, guided by the schema table.

use std::fmt;
use std::ops::Range;

use crate::error::WalkError;
use crate::schema::{self, FieldKind, MessageType};
use crate::wire::{self, Fault, FaultKind, LEN};

/// Maximum nesting of messages (and groups) the walker follows before giving up with
/// [`WalkError::TooDeep`]. Counted in message levels, including messages inside `Any`
/// values and system envelopes. Real Temporal traffic nests about 10 levels
/// (plus one per `Failure.cause` link); protobuf implementations commonly stop at 100.
pub const MAX_DEPTH: usize = 100;

/// Metadata key that marks a payload as a system envelope (see the crate docs).
pub const SYSTEM_PAYLOAD_KEY: &str = "__temporal_system_payload";
/// The Nexus endpoint whose operation inputs are system envelopes.
pub const SYSTEM_NEXUS_ENDPOINT: &str = "__temporal_system";
const BINARY_PROTOBUF: &[u8] = b"binary/protobuf";
/// Full name of the Failure message whose `message` and `stack_trace` can be sealed.
pub const FAILURE_TYPE_NAME: &str = "temporal.api.failure.v1.Failure";
/// `Failure.message`.
pub(crate) const FAILURE_MESSAGE: u32 = 1;
/// `Failure.stack_trace`.
pub(crate) const FAILURE_STACK_TRACE: u32 = 3;
/// `Failure.encoded_attributes`.
pub(crate) const FAILURE_ENCODED_ATTRIBUTES: u32 = 20;
/// How many distinct unknown `Any` (type, path) pairs a scan records (all are counted).
pub const MAX_UNKNOWN_ANYS: usize = 64;

/// One step from a message to a failure: a field number, and the `Any` type it holds when the
/// field is an `Any`.
type TextStep = (u32, Option<&'static str>);

/// Plain string fields that repeat the text of a `Failure` beside them (the SDKs copy the
/// failure's message there): `(message type, string field number, its name, the path from that
/// message to the failure as (field number, `Any` type) steps)`. See [`FailureText`].
const FAILURE_TEXT_FIELDS: &[(&str, u32, &str, &[TextStep])] = &[
    (
        "temporal.api.workflowservice.v1.RespondQueryTaskCompletedRequest",
        4,
        "error_message",
        &[(7, None)],
    ),
    (
        "temporal.api.query.v1.WorkflowQueryResult",
        3,
        "error_message",
        &[(4, None)],
    ),
    // A failed query comes back as a gRPC status whose message is the worker's
    // `error_message`, with a `QueryFailedFailure` detail holding the failure.
    (
        "google.rpc.Status",
        2,
        "message",
        &[
            (3, Some("temporal.api.errordetails.v1.QueryFailedFailure")),
            (1, None),
        ],
    ),
];

/// One resolved entry of [`FAILURE_TEXT_FIELDS`].
#[derive(Debug)]
struct TextSpec {
    ty: MessageType,
    field: u32,
    name: &'static str,
    /// Path segments from the containing message to the sibling failure.
    failure_suffix: Box<[u32]>,
    /// The failure's field number when it is a direct field of the message.
    failure_field: Option<u32>,
}

fn text_specs() -> &'static [TextSpec] {
    static SPECS: std::sync::LazyLock<Vec<TextSpec>> = std::sync::LazyLock::new(|| {
        FAILURE_TEXT_FIELDS
            .iter()
            .filter_map(|(name, field, field_name, steps)| {
                let ty = MessageType::by_name(name)?;
                let mut at = ty;
                let mut suffix = Vec::new();
                for (number, through) in steps.iter() {
                    let (index, info) = at.field(*number)?;
                    suffix.push(index);
                    at = match through {
                        Some(any_type) => {
                            let t = MessageType::by_name(any_type)?;
                            suffix.push(TYPE_SEGMENT | u32::from(t.0));
                            t
                        }
                        None => MessageType(info.target),
                    };
                }
                Some(TextSpec {
                    ty,
                    field: *field,
                    name: field_name,
                    failure_suffix: suffix.into(),
                    failure_field: match steps {
                        [(number, None)] => Some(*number),
                        _ => None,
                    },
                })
            })
            .collect()
    });
    &SPECS
}

pub(crate) const NO_PARENT: u32 = u32::MAX;
/// Path segment flag: the segment is a message type (an `Any` value or an envelope),
/// not a field index.
const TYPE_SEGMENT: u32 = 1 << 31;

/// A length-delimited field on the way to at least one payload site.
#[derive(Clone, Debug)]
pub(crate) struct Node {
    /// Byte range of the length prefix (varint).
    pub(crate) prefix: (usize, usize),
    /// Original value length.
    pub(crate) len: usize,
    /// Enclosing node, or `NO_PARENT`.
    pub(crate) parent: u32,
}

impl Node {
    pub(crate) fn parent(&self) -> Option<usize> {
        (self.parent != NO_PARENT).then_some(self.parent as usize)
    }
}

/// One serialized `temporal.api.common.v1.Payload` found by [`scan`].
#[derive(Clone, Debug)]
pub struct PayloadSite {
    range: Range<usize>,
    path: Box<[u32]>,
    pub(crate) node: u32,
}

impl PayloadSite {
    /// A site with no path (the search attribute walk's sites).
    pub(crate) fn new(range: Range<usize>, node: u32) -> Self {
        Self {
            range,
            path: Box::new([]),
            node,
        }
    }

    /// Byte range of the serialized Payload message (the value of its length-delimited
    /// field) in the scanned buffer.
    pub fn range(&self) -> Range<usize> {
        self.range.clone()
    }

    /// The field path from the scanned message to this payload, rendered on `Display` as
    /// dotted proto field names, e.g.
    /// `history.events.workflow_execution_started_event_attributes.input.payloads`.
    /// Map values render as the map field (`header.fields`); the payload-bearing type inside
    /// an `Any` or a system envelope renders in brackets:
    /// `messages.body[temporal.api.update.v1.Request].input.args.payloads`.
    pub fn path(&self) -> SitePath<'_> {
        SitePath(&self.path)
    }
}

/// A field path, rendered lazily by its `Display` impl (see [`PayloadSite::path`]).
#[derive(Clone, Copy, Debug)]
pub struct SitePath<'a>(&'a [u32]);

impl fmt::Display for SitePath<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut first = true;
        for &seg in self.0 {
            if seg & TYPE_SEGMENT != 0 {
                write!(f, "[{}]", MessageType((seg & !TYPE_SEGMENT) as u16).name())?;
                continue;
            }
            let name = schema::field_name(seg);
            if name.is_empty() {
                continue;
            }
            if !first {
                f.write_str(".")?;
            }
            f.write_str(name)?;
            first = false;
        }
        Ok(())
    }
}

/// A `google.protobuf.Any` whose `type_url` names a type not in the descriptor set (or an
/// `Any` with a value and no `type_url`): the walker cannot see inside, so it may hide
/// payloads. See [`Scan::unknown_anys`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UnknownAny {
    /// The type name: the `type_url` after its last `/` (lossily decoded as UTF-8; empty
    /// when the `Any` has no `type_url`).
    pub type_name: String,
    /// The field path of the `Any`, rendered like [`SitePath`]'s `Display`, e.g.
    /// `messages.body`.
    pub path: String,
}

/// One `temporal.api.failure.v1.Failure` found by [`scan`] that has a `message`, a
/// `stack_trace` or an `encoded_attributes` field on the wire (any depth: cause chains,
/// history events, update outcomes, `Any` values, system envelopes).
///
/// Only the Failure's own top-level fields are described here; its `cause` is a failure
/// site of its own. Change it with [`Scan::splice_with`] and a [`FailureEdit`].
#[derive(Clone, Debug)]
pub struct FailureSite {
    pub(crate) node: u32,
    path: Box<[u32]>,
    /// Whole fields (tag to end of value) of every `message`, `stack_trace` and
    /// `encoded_attributes` occurrence, with the field number, in byte order.
    pub(crate) fields: Vec<(u32, Range<usize>)>,
    message: Option<Range<usize>>,
    stack_trace: Option<Range<usize>>,
    attributes_site: Option<usize>,
}

impl FailureSite {
    /// Byte range of the value of the last `message` field (the one a decoder keeps), in
    /// the scanned buffer; `None` when absent.
    pub fn message(&self) -> Option<Range<usize>> {
        self.message.clone()
    }

    /// Byte range of the value of the last `stack_trace` field; `None` when absent.
    pub fn stack_trace(&self) -> Option<Range<usize>> {
        self.stack_trace.clone()
    }

    /// Whether the failure has an `encoded_attributes` field on the wire.
    pub fn has_encoded_attributes(&self) -> bool {
        self.fields
            .iter()
            .any(|(f, _)| *f == FAILURE_ENCODED_ATTRIBUTES)
    }

    /// Index in [`Scan::sites`] of the payload of the `encoded_attributes` field, when the
    /// failure has exactly one such field and it is an ordinary payload site (not a system
    /// envelope); `None` otherwise.
    pub fn encoded_attributes_site(&self) -> Option<usize> {
        self.attributes_site
    }

    /// The field path from the scanned message to this Failure (rendered like
    /// [`PayloadSite::path`]), e.g. `failure.cause` or
    /// `history.events.workflow_execution_failed_event_attributes.failure`.
    pub fn path(&self) -> SitePath<'_> {
        SitePath(&self.path)
    }
}

/// A plain string field beside a `Failure` that repeats the failure's text, found by [`scan`]
/// when present on the wire: `RespondQueryTaskCompletedRequest.error_message` and
/// `WorkflowQueryResult.error_message` (beside their `failure`), and `google.rpc.Status.message`
/// of a failed query (beside the `failure` of its `QueryFailedFailure` detail). The SDKs write
/// the failure's message there, so it must be sealed and restored with the failure. Change it
/// with [`Scan::splice_edits`].
#[derive(Clone, Debug)]
pub struct FailureText {
    pub(crate) node: u32,
    path: Box<[u32]>,
    name: &'static str,
    pub(crate) field: u32,
    /// The sibling failure's field number when it is a direct field of the same message.
    pub(crate) failure_field: Option<u32>,
    /// Whole fields (tag to end of value) of every occurrence, in byte order.
    pub(crate) fields: Vec<Range<usize>>,
    value: Range<usize>,
    failures: Vec<usize>,
}

impl FailureText {
    /// Byte range of the value of the last occurrence (the one a decoder keeps).
    pub fn value(&self) -> Range<usize> {
        self.value.clone()
    }

    /// Indices in [`Scan::failures`] of the sibling failures (every occurrence of the failure
    /// field that was recorded; empty when the message has no such failure on the wire).
    pub fn failures(&self) -> &[usize] {
        &self.failures
    }

    /// Whether [`TextEdit::failure`] can add a sibling failure (the failure is a direct field of
    /// the same message).
    pub fn can_add_failure(&self) -> bool {
        self.failure_field.is_some()
    }

    /// The field path, rendered like [`PayloadSite::path`] and ending in the field's name,
    /// e.g. `error_message` or `query_results.error_message`.
    pub fn path(&self) -> String {
        let base = SitePath(&self.path).to_string();
        if base.is_empty() {
            self.name.to_owned()
        } else {
            format!("{base}.{}", self.name)
        }
    }
}

/// What [`Scan::splice_edits`] does to one [`FailureText`]: every occurrence of the field is
/// removed, and in place of the first go the field with `text` (left out when empty) and, with
/// `failure`, the sibling failure field holding that serialized `Failure` (for a text that has
/// no failure beside it on the wire; only where [`FailureText::can_add_failure`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TextEdit {
    /// The new text.
    pub text: String,
    /// A serialized `temporal.api.failure.v1.Failure` to add beside the text.
    pub failure: Option<bytes::Bytes>,
}

impl From<String> for TextEdit {
    fn from(text: String) -> Self {
        TextEdit {
            text,
            failure: None,
        }
    }
}

impl From<&str> for TextEdit {
    fn from(text: &str) -> Self {
        text.to_owned().into()
    }
}

/// What [`Scan::splice_with`] does to one [`FailureSite`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum FailureEdit {
    /// Seals the failure the way the SDKs' `encode_common_attributes` does: every
    /// `message` and `stack_trace` field is removed, and in place of the first of them go
    /// an `encoded_attributes` field holding `attributes` (a serialized `Payload`, normally
    /// the encoded JSON of the original message and stack trace) and `message = "Encoded
    /// failure"` ([`ENCODED_FAILURE_MESSAGE`]). The failure must have a `message` or
    /// `stack_trace` field and no `encoded_attributes`.
    Seal {
        /// The serialized `Payload` to store as `encoded_attributes`.
        attributes: bytes::Bytes,
    },
    /// Undoes a seal: every `encoded_attributes` field is removed; when `message` is
    /// `Some`, every `message` field is replaced by that value (absent when empty), and the
    /// same for `stack_trace`; `None` keeps that field as it is. The failure must have an
    /// `encoded_attributes` field.
    Restore {
        /// The message to restore, if the attributes held one.
        message: Option<String>,
        /// The stack trace to restore, if the attributes held one.
        stack_trace: Option<String>,
    },
}

/// The `message` a sealed failure carries (what the SDKs write with
/// `encode_common_attributes`).
pub const ENCODED_FAILURE_MESSAGE: &str = "Encoded failure";

/// The result of [`scan`]: every payload site of one message, ready for [`Scan::splice`].
#[derive(Clone, Debug)]
pub struct Scan {
    pub(crate) sites: Vec<PayloadSite>,
    pub(crate) nodes: Vec<Node>,
    pub(crate) failures: Vec<FailureSite>,
    pub(crate) texts: Vec<FailureText>,
    pub(crate) input_len: usize,
    unknown_any: usize,
    unknown_anys: Vec<UnknownAny>,
    opaque_system: usize,
}

impl Scan {
    /// A scan of `sites` under `nodes` only (no failures, texts or unknown `Any`s).
    pub(crate) fn from_sites(sites: Vec<PayloadSite>, nodes: Vec<Node>, input_len: usize) -> Self {
        Self {
            sites,
            nodes,
            failures: Vec::new(),
            texts: Vec::new(),
            input_len,
            unknown_any: 0,
            unknown_anys: Vec::new(),
            opaque_system: 0,
        }
    }

    /// The payload sites, in byte order.
    pub fn sites(&self) -> &[PayloadSite] {
        &self.sites
    }

    /// The failures that have a `message`, `stack_trace` or `encoded_attributes` field, in
    /// pre-order (a failure before its cause).
    pub fn failures(&self) -> &[FailureSite] {
        &self.failures
    }

    /// The plain string fields that repeat a failure's text (see [`FailureText`]), in the
    /// order their messages end (a nested message before the one holding it).
    pub fn failure_texts(&self) -> &[FailureText] {
        &self.texts
    }

    /// How many `google.protobuf.Any` values the walker could not look into: a `type_url`
    /// naming a type not in the descriptor set, or a value without a `type_url`. Their
    /// bytes are not sites; [`Scan::unknown_anys`] says which types and where.
    pub fn unknown_any(&self) -> usize {
        self.unknown_any
    }

    /// The unknown `Any` values counted by [`Scan::unknown_any`], as distinct
    /// `(type_name, path)` pairs in the order first seen, at most [`MAX_UNKNOWN_ANYS`]
    /// of them (a hostile message cannot make the list grow with its size). Empty exactly
    /// when `unknown_any() == 0`.
    pub fn unknown_anys(&self) -> &[UnknownAny] {
        &self.unknown_anys
    }

    /// How many system envelopes (see the crate docs) could not be opened (not
    /// `binary/protobuf`, missing or unknown `messageType`, no `data`). Each is reported
    /// as an ordinary payload site (so it is encoded whole); this count is for metrics.
    pub fn opaque_system_payloads(&self) -> usize {
        self.opaque_system
    }

    /// An identity of the message `levels` levels above the payload of site `site` (1: the
    /// message whose field holds the payload, such as its `Payloads`; 2: the one above that,
    /// such as a `Memo` above its map entry), or `None` above the scanned message. Sites with
    /// equal identities at a level are in the same message: what a caller needs to add up
    /// the payloads a server-side size limit counts together.
    pub fn container(&self, site: usize, levels: usize) -> Option<u32> {
        let mut node = self.sites.get(site)?.node;
        for _ in 0..levels {
            node = self.nodes.get(node as usize)?.parent;
            if node == NO_PARENT {
                return None;
            }
        }
        Some(node)
    }
}

/// Finds every payload site in `buf`, a serialized message of type `ty`.
///
/// Follows singular, repeated, oneof and map-value message fields that can lead to a
/// payload (each occurrence of a repeated or duplicated field), `Any` values of known
/// payload-bearing types and system envelopes; every other field is skipped by its wire
/// type without looking inside. Payloads under `SearchAttributes.indexed_fields` are never
/// reported. Never panics; malformed input gives a [`WalkError`].
pub fn scan(ty: MessageType, buf: &[u8]) -> Result<Scan, WalkError> {
    // Looked up once: every message of every RPC is scanned.
    static FAILURE_TYPE: std::sync::LazyLock<Option<MessageType>> =
        std::sync::LazyLock::new(|| MessageType::by_name(FAILURE_TYPE_NAME));
    let mut w = Walker {
        buf,
        sites: Vec::new(),
        nodes: Vec::new(),
        path: Vec::with_capacity(16),
        failures: Vec::new(),
        texts: Vec::new(),
        failure_ty: *FAILURE_TYPE,
        unknown_any: 0,
        unknown_anys: Vec::new(),
        opaque_system: 0,
    };
    if ty == MessageType::PAYLOAD {
        // The whole buffer is one payload: a single site with no length prefix to fix.
        w.sites.push(PayloadSite {
            range: 0..buf.len(),
            path: Box::new([]),
            node: NO_PARENT,
        });
    } else if let Err(fault) = w.message(ty, 0, buf.len(), NO_PARENT, 0) {
        return Err(w.error(fault));
    }
    Ok(Scan {
        sites: w.sites,
        nodes: w.nodes,
        failures: w.failures,
        texts: w.texts,
        input_len: buf.len(),
        unknown_any: w.unknown_any,
        unknown_anys: w.unknown_anys,
        opaque_system: w.opaque_system,
    })
}

/// The walker error for a wire-level `fault` found in the message at field path `path`.
pub(crate) fn fault_error(fault: Fault, path: String) -> WalkError {
    let offset = fault.offset;
    match fault.kind {
        FaultKind::Truncated => WalkError::Truncated { offset, path },
        FaultKind::BadVarint => WalkError::BadVarint { offset, path },
        FaultKind::InvalidTag { wire_type, field } => WalkError::InvalidWireType {
            wire_type,
            field,
            offset,
            path,
        },
        FaultKind::UnexpectedWireType { wire_type, field } => WalkError::UnexpectedWireType {
            wire_type,
            field,
            offset,
            path,
        },
        FaultKind::LengthOutOfBounds { len } => WalkError::LengthOutOfBounds { len, offset, path },
        FaultKind::TooDeep => WalkError::TooDeep {
            limit: MAX_DEPTH,
            offset,
            path,
        },
    }
}

struct Walker<'a> {
    buf: &'a [u8],
    sites: Vec<PayloadSite>,
    nodes: Vec<Node>,
    path: Vec<u32>,
    failures: Vec<FailureSite>,
    texts: Vec<FailureText>,
    failure_ty: Option<MessageType>,
    unknown_any: usize,
    unknown_anys: Vec<UnknownAny>,
    opaque_system: usize,
}

impl Walker<'_> {
    fn error(&self, fault: Fault) -> WalkError {
        fault_error(fault, SitePath(&self.path).to_string())
    }

    /// Reads the length prefix of a length-delimited field whose tag ends at `*pos` and
    /// pushes a node for it.
    #[inline]
    fn enter(
        &mut self,
        pos: &mut usize,
        end: usize,
        parent: u32,
    ) -> Result<(u32, usize, usize), Fault> {
        let p0 = *pos;
        let len_at = *pos;
        let (vstart, vend) = wire::read_len(self.buf, pos, end)?;
        let id = self.nodes.len() as u32;
        self.nodes.push(Node {
            prefix: (p0, vstart),
            len: vend - vstart,
            parent,
        });
        debug_assert!(len_at <= vstart);
        Ok((id, vstart, vend))
    }

    /// Drops the node `id` (and anything after it) if no site, no failure and no failure
    /// text was found below it.
    #[inline]
    fn leave(&mut self, id: u32, before: (usize, usize, usize)) {
        if self.sites.len() == before.0
            && self.failures.len() == before.1
            && self.texts.len() == before.2
        {
            self.nodes.truncate(id as usize);
        }
    }

    #[inline]
    fn counts(&self) -> (usize, usize, usize) {
        (self.sites.len(), self.failures.len(), self.texts.len())
    }

    fn message(
        &mut self,
        ty: MessageType,
        start: usize,
        end: usize,
        parent: u32,
        depth: usize,
    ) -> Result<(), Fault> {
        if depth >= MAX_DEPTH {
            return Err(Fault::new(FaultKind::TooDeep, start));
        }
        let system_input = match ty.system_nexus() {
            Some((endpoint, input)) => {
                let ep = last_len_field(self.buf, start, end, endpoint, MAX_DEPTH - depth)?;
                (ep.map(|(a, b)| &self.buf[a..b]) == Some(SYSTEM_NEXUS_ENDPOINT.as_bytes()))
                    .then_some(input)
            }
            None => None,
        };
        let buf = self.buf;
        let text_spec = text_specs().iter().find(|t| t.ty == ty);
        let failures_before = self.failures.len();
        // Whole field and value ranges of the failure text field, if this type has one.
        let mut texts: Vec<(Range<usize>, Range<usize>)> = Vec::new();
        // A Failure: reserve its site now (pre-order), fill it in below.
        let failure = (Some(ty) == self.failure_ty).then(|| {
            self.failures.push(FailureSite {
                node: parent,
                path: self.path.as_slice().into(),
                fields: Vec::new(),
                message: None,
                stack_trace: None,
                attributes_site: None,
            });
            self.failures.len() - 1
        });
        let mut pos = start;
        while pos < end {
            let tag_at = pos;
            let (field, wt) = wire::read_tag(buf, &mut pos, end)?;
            if let Some(fi) = failure
                && wt == LEN
                && (field == FAILURE_MESSAGE || field == FAILURE_STACK_TRACE)
            {
                let value = wire::read_len(buf, &mut pos, end)?;
                let site = &mut self.failures[fi];
                site.fields.push((field, tag_at..value.1));
                let last = Some(value.0..value.1);
                if field == FAILURE_MESSAGE {
                    site.message = last;
                } else {
                    site.stack_trace = last;
                }
                continue;
            }
            if let Some(spec) = text_spec
                && wt == LEN
                && field == spec.field
            {
                let value = wire::read_len(buf, &mut pos, end)?;
                texts.push((tag_at..value.1, value.0..value.1));
                continue;
            }
            let Some((findex, info)) = ty.field(field) else {
                wire::skip_value(buf, &mut pos, end, field, wt, tag_at, MAX_DEPTH - depth)?;
                continue;
            };
            if wt != LEN {
                if wt > wire::I32 || wt == wire::EGROUP {
                    return Err(Fault::new(
                        FaultKind::InvalidTag {
                            wire_type: wt,
                            field,
                        },
                        tag_at,
                    ));
                }
                return Err(Fault::new(
                    FaultKind::UnexpectedWireType {
                        wire_type: wt,
                        field,
                    },
                    tag_at,
                ));
            }
            let (id, vstart, vend) = self.enter(&mut pos, end, parent)?;
            let before = self.counts();
            self.path.push(findex);
            let target = MessageType(info.target);
            let r = match info.kind {
                FieldKind::Payload => {
                    self.payload(vstart, vend, id, depth + 1, system_input == Some(field))
                }
                FieldKind::Message => self.message(target, vstart, vend, id, depth + 1),
                FieldKind::Any => self.any(vstart, vend, id, depth + 1),
            };
            r?;
            self.path.pop();
            if let Some(fi) = failure
                && field == FAILURE_ENCODED_ATTRIBUTES
            {
                let one_site = self.sites.len() == before.0 + 1;
                let site = &mut self.failures[fi];
                // Only a single, ordinary payload counts as "the" attributes site.
                let first = !site.has_encoded_attributes();
                site.fields.push((field, tag_at..vend));
                site.attributes_site = (first && one_site).then_some(before.0);
            }
            self.leave(id, before);
        }
        // A failure with none of the fields stays unrecorded (unless a cause below it was
        // recorded after it: then it is an empty, harmless entry).
        if let Some(fi) = failure
            && fi + 1 == self.failures.len()
            && self.failures[fi].fields.is_empty()
        {
            self.failures.pop();
        }
        if let (Some(spec), Some((_, last))) = (text_spec, texts.last()) {
            let depth = self.path.len();
            let failures = (failures_before..self.failures.len())
                .filter(|&i| {
                    let p = &self.failures[i].path;
                    p.len() == depth + spec.failure_suffix.len()
                        && p[..depth] == self.path[..]
                        && p[depth..] == spec.failure_suffix[..]
                })
                .collect();
            self.texts.push(FailureText {
                node: parent,
                path: self.path.as_slice().into(),
                name: spec.name,
                field: spec.field,
                failure_field: spec.failure_field,
                value: last.clone(),
                fields: texts.into_iter().map(|(whole, _)| whole).collect(),
                failures,
            });
        }
        Ok(())
    }

    fn any(&mut self, start: usize, end: usize, node: u32, depth: usize) -> Result<(), Fault> {
        if depth >= MAX_DEPTH {
            return Err(Fault::new(FaultKind::TooDeep, start));
        }
        let buf = self.buf;
        let mut pos = start;
        let mut type_url: Option<(usize, usize)> = None;
        let mut value: Option<usize> = None; // offset of the value's length prefix
        while pos < end {
            let tag_at = pos;
            let (field, wt) = wire::read_tag(buf, &mut pos, end)?;
            match (field, wt) {
                (1, LEN) => type_url = Some(wire::read_len(buf, &mut pos, end)?),
                (2, LEN) => {
                    value = Some(pos);
                    wire::read_len(buf, &mut pos, end)?;
                }
                _ => wire::skip_value(buf, &mut pos, end, field, wt, tag_at, MAX_DEPTH - depth)?,
            }
        }
        let Some((a, b)) = type_url else {
            if value.is_some() {
                self.record_unknown_any(b"");
            }
            return Ok(());
        };
        let url = &buf[a..b];
        let name = match url.iter().rposition(|&c| c == b'/') {
            Some(i) => &url[i + 1..],
            None => url,
        };
        let Some(ty) = std::str::from_utf8(name)
            .ok()
            .and_then(MessageType::by_name)
        else {
            self.record_unknown_any(name);
            return Ok(());
        };
        if !ty.can_hold_payloads() {
            return Ok(());
        }
        if let Some(mut p) = value {
            self.typed_value(ty, &mut p, end, node, depth)?;
        }
        Ok(())
    }

    /// Counts an `Any` the walker cannot look into and records its (type, path) pair.
    fn record_unknown_any(&mut self, name: &[u8]) {
        self.unknown_any += 1;
        if self.unknown_anys.len() >= MAX_UNKNOWN_ANYS {
            return;
        }
        let type_name = String::from_utf8_lossy(name);
        let path = SitePath(&self.path).to_string();
        if !self
            .unknown_anys
            .iter()
            .any(|u| u.type_name == type_name && u.path == path)
        {
            self.unknown_anys.push(UnknownAny {
                type_name: type_name.into_owned(),
                path,
            });
        }
    }

    /// Walks a length-delimited value (prefix at `*pos`) as a message of type `ty`: the
    /// value of an `Any` or the data of a system envelope.
    fn typed_value(
        &mut self,
        ty: MessageType,
        pos: &mut usize,
        end: usize,
        parent: u32,
        depth: usize,
    ) -> Result<(), Fault> {
        let (id, vstart, vend) = self.enter(pos, end, parent)?;
        let before = self.counts();
        self.path.push(TYPE_SEGMENT | u32::from(ty.0));
        if ty == MessageType::PAYLOAD {
            self.payload(vstart, vend, id, depth + 1, false)?;
        } else {
            self.message(ty, vstart, vend, id, depth + 1)?;
        }
        self.path.pop();
        self.leave(id, before);
        Ok(())
    }

    /// A Payload value at `start..end` whose field is node `node`. Either a site, or a
    /// system envelope whose inner payloads are the sites.
    fn payload(
        &mut self,
        start: usize,
        end: usize,
        node: u32,
        depth: usize,
        system_input: bool,
    ) -> Result<(), Fault> {
        let info = PayloadInfo::read(self.buf, start, end);
        let envelope =
            system_input || (info.marked && (info.message_type.is_some() || info.binary_protobuf));
        if !envelope {
            self.sites.push(PayloadSite {
                range: start..end,
                path: self.path.as_slice().into(),
                node,
            });
            return Ok(());
        }
        let ty = info
            .message_type
            .and_then(|(a, b)| std::str::from_utf8(&self.buf[a..b]).ok())
            .and_then(MessageType::by_name);
        match (info.binary_protobuf, ty, info.data) {
            (true, Some(ty), Some(mut data)) if ty.can_hold_payloads() => {
                if depth >= MAX_DEPTH {
                    return Err(Fault::new(FaultKind::TooDeep, start));
                }
                self.typed_value(ty, &mut data, end, node, depth)
            }
            (true, Some(_), Some(_)) => Ok(()), // nothing inside can be a payload
            _ => {
                // Cannot be opened: encoded whole like any payload (the server cannot read
                // it then, but nothing leaks).
                self.opaque_system += 1;
                self.sites.push(PayloadSite {
                    range: start..end,
                    path: self.path.as_slice().into(),
                    node,
                });
                Ok(())
            }
        }
    }
}

/// What the walker needs to know about a Payload to spot system envelopes.
#[derive(Default)]
struct PayloadInfo {
    /// `metadata["__temporal_system_payload"] == "true"`.
    marked: bool,
    /// `metadata["encoding"] == "binary/protobuf"`.
    binary_protobuf: bool,
    /// Byte range of `metadata["messageType"]`, if present and non-empty.
    message_type: Option<(usize, usize)>,
    /// Offset of the length prefix of the last `data` field.
    data: Option<usize>,
}

impl PayloadInfo {
    /// Reads the metadata map and the data field. A Payload that does not parse is treated
    /// as an ordinary (opaque) payload: its bytes are the codec's business.
    fn read(buf: &[u8], start: usize, end: usize) -> PayloadInfo {
        Self::try_read(buf, start, end).unwrap_or_default()
    }

    fn try_read(buf: &[u8], start: usize, end: usize) -> Result<PayloadInfo, Fault> {
        let mut info = PayloadInfo::default();
        let mut pos = start;
        while pos < end {
            let tag_at = pos;
            let (field, wt) = wire::read_tag(buf, &mut pos, end)?;
            match (field, wt) {
                (1, LEN) => {
                    let (a, b) = wire::read_len(buf, &mut pos, end)?;
                    let key = last_len_field(buf, a, b, 1, 2)?
                        .map(|(x, y)| &buf[x..y])
                        .unwrap_or(b"");
                    let value = last_len_field(buf, a, b, 2, 2)?;
                    let vbytes = value.map(|(x, y)| &buf[x..y]).unwrap_or(b"");
                    match key {
                        b"__temporal_system_payload" => info.marked = vbytes == b"true",
                        b"encoding" => info.binary_protobuf = vbytes == BINARY_PROTOBUF,
                        b"messageType" => info.message_type = value.filter(|(x, y)| x < y),
                        _ => {}
                    }
                }
                (2, LEN) => {
                    info.data = Some(pos);
                    wire::read_len(buf, &mut pos, end)?;
                }
                _ => wire::skip_value(buf, &mut pos, end, field, wt, tag_at, 8)?,
            }
        }
        Ok(info)
    }
}

/// The value range of the last length-delimited occurrence of `field` among the top-level
/// fields of `buf[start..end]`.
pub(crate) fn last_len_field(
    buf: &[u8],
    start: usize,
    end: usize,
    field: u32,
    depth_left: usize,
) -> Result<Option<(usize, usize)>, Fault> {
    let mut pos = start;
    let mut found = None;
    while pos < end {
        let tag_at = pos;
        let (f, wt) = wire::read_tag(buf, &mut pos, end)?;
        if f == field && wt == LEN {
            found = Some(wire::read_len(buf, &mut pos, end)?);
        } else {
            wire::skip_value(buf, &mut pos, end, f, wt, tag_at, depth_left)?;
        }
    }
    Ok(found)
}

/// Reads the top-level string field `field_name` of a serialized message of type `ty`,
/// e.g. the request's `namespace` or `workflow_id`.
///
/// Only top-level fields are looked at (nothing nested); if the field occurs several times
/// the last occurrence wins, as protobuf specifies. Returns `None` if the type has no such
/// singular string field, the field is absent, the buffer is malformed, or the value is not
/// UTF-8.
pub fn top_level_string<'a>(ty: MessageType, buf: &'a [u8], field_name: &str) -> Option<&'a str> {
    let number = ty.string_field(field_name)?;
    let (a, b) = last_len_field(buf, 0, buf.len(), number, MAX_DEPTH).ok()??;
    std::str::from_utf8(&buf[a..b]).ok()
}

/// Why [`top_level_string_strict`] could not read a string field.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StringFieldError {
    /// The message is not well-formed protobuf at its top level.
    #[error("the message is not valid protobuf: {0}")]
    Malformed(WalkError),
    /// The field's last occurrence is not UTF-8 (a proto3 `string` must be; the server
    /// refuses it).
    #[error("field `{0}` is not valid UTF-8")]
    NotUtf8(String),
}

/// Reads the top-level string field `field_name` of `buf` as a protobuf parser does: the last
/// length-delimited occurrence wins and occurrences of that field number with another wire
/// type are skipped as unknown fields (Go's `proto.Unmarshal`, which the Temporal server
/// runs, does both). Unlike [`top_level_string`], a malformed top level or a value that is not
/// UTF-8 is an error, so a caller can refuse what it cannot read instead of guessing.
///
/// `Ok(None)`: the type has no such field, or the field is absent.
pub fn top_level_string_strict<'a>(
    ty: MessageType,
    buf: &'a [u8],
    field_name: &str,
) -> Result<Option<&'a str>, StringFieldError> {
    let Some(number) = ty.string_field(field_name) else {
        return Ok(None);
    };
    match last_len_field(buf, 0, buf.len(), number, MAX_DEPTH) {
        Err(fault) => Err(StringFieldError::Malformed(fault_error(
            fault,
            String::new(),
        ))),
        Ok(None) => Ok(None),
        Ok(Some((a, b))) => std::str::from_utf8(&buf[a..b])
            .map(Some)
            .map_err(|_| StringFieldError::NotUtf8(field_name.to_owned())),
    }
}

/// The bytes of the top-level singular bytes field `field_name` of `buf` (last occurrence
/// wins, other wire types skipped, as [`top_level_string_strict`]), e.g. a `task_token`.
pub fn top_level_bytes<'a>(
    ty: MessageType,
    buf: &'a [u8],
    field_name: &str,
) -> Result<Option<&'a [u8]>, StringFieldError> {
    let Some(number) = ty.string_field(field_name) else {
        return Ok(None);
    };
    last_len_field(buf, 0, buf.len(), number, MAX_DEPTH)
        .map(|range| range.map(|(a, b)| &buf[a..b]))
        .map_err(|fault| StringFieldError::Malformed(fault_error(fault, String::new())))
}

/// The string field number `number` of a message of a type outside the descriptor set (the
/// server's own task tokens), read as [`top_level_string_strict`] reads a known field.
pub fn string_field_by_number(buf: &[u8], number: u32) -> Result<Option<&str>, StringFieldError> {
    match last_len_field(buf, 0, buf.len(), number, MAX_DEPTH) {
        Err(fault) => Err(StringFieldError::Malformed(fault_error(
            fault,
            String::new(),
        ))),
        Ok(None) => Ok(None),
        Ok(Some((a, b))) => std::str::from_utf8(&buf[a..b])
            .map(Some)
            .map_err(|_| StringFieldError::NotUtf8(format!("field {number}"))),
    }
}

/// Every length-delimited occurrence of field `number` at the top level of `buf`, in wire
/// order (repeated elements, or the parts a parser merges into one singular message field).
pub fn len_fields_by_number(buf: &[u8], number: u32) -> Result<Vec<&[u8]>, StringFieldError> {
    let mut pos = 0;
    let mut found = Vec::new();
    let malformed = |fault| StringFieldError::Malformed(fault_error(fault, String::new()));
    while pos < buf.len() {
        let tag_at = pos;
        let (f, wt) = wire::read_tag(buf, &mut pos, buf.len()).map_err(malformed)?;
        if f == number && wt == LEN {
            let (a, b) = wire::read_len(buf, &mut pos, buf.len()).map_err(malformed)?;
            found.push(&buf[a..b]);
        } else {
            wire::skip_value(buf, &mut pos, buf.len(), f, wt, tag_at, MAX_DEPTH)
                .map_err(malformed)?;
        }
    }
    Ok(found)
}

/// One top-level field of a message as it is on the wire (see [`top_level_fields`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RawField {
    /// The field number.
    pub number: u32,
    /// The wire type (0 varint, 1 fixed64, 2 length-delimited, 5 fixed32).
    pub wire_type: u8,
    /// The whole field: tag, length prefix (if any) and value.
    pub whole: Range<usize>,
    /// The value of a length-delimited field, without its length prefix.
    pub value: Option<Range<usize>>,
    /// The value of a varint field.
    pub varint: Option<u64>,
}

/// Every top-level field of `buf` in wire order, for a caller that rebuilds a message it
/// edits (keeping every field it does not change byte for byte). Malformed input is an error.
pub fn top_level_fields(buf: &[u8]) -> Result<Vec<RawField>, StringFieldError> {
    let mut pos = 0;
    let mut fields = Vec::new();
    let malformed = |fault| StringFieldError::Malformed(fault_error(fault, String::new()));
    while pos < buf.len() {
        let tag_at = pos;
        let (number, wire_type) = wire::read_tag(buf, &mut pos, buf.len()).map_err(malformed)?;
        let (mut value, mut varint) = (None, None);
        match wire_type {
            LEN => {
                let (a, b) = wire::read_len(buf, &mut pos, buf.len()).map_err(malformed)?;
                value = Some(a..b);
            }
            wire::VARINT => {
                varint = Some(wire::read_varint(buf, &mut pos, buf.len()).map_err(malformed)?);
            }
            _ => wire::skip_value(
                buf,
                &mut pos,
                buf.len(),
                number,
                wire_type,
                tag_at,
                MAX_DEPTH,
            )
            .map_err(malformed)?,
        }
        fields.push(RawField {
            number,
            wire_type,
            whole: tag_at..pos,
            value,
            varint,
        });
    }
    Ok(fields)
}
