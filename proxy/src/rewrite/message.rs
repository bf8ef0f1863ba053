//! Rewriting one protobuf message: find its payloads (and failures), run the pipeline over
//! them as a batch, splice the results back. Every byte that is not a rewritten payload or an
//! edited failure field is kept as it came.
//!
//! # Sealed failures
//!
//! `Failure.message` and `stack_trace` are plain strings the codec never sees. On the way out,
//! where [`PayloadCodec::seals_failures`](crate::codec::PayloadCodec::seals_failures) says so,
//! every failure with a non-empty `message` or `stack_trace` and no `encoded_attributes` is
//! sealed exactly as the SDKs' `encode_common_attributes` does: its `encoded_attributes`
//! becomes a `json/plain` payload of `{"message":…,"stack_trace":…}` (compact, keys sorted,
//! ASCII-only escaping: byte for byte what Python's `json.dumps(sort_keys=True,
//! separators=(",", ":"))` writes), which then runs through the stages in the same batch as the
//! message's other payloads (so the server only sees ciphertext), and `message` becomes
//! `Encoded failure`, `stack_trace` empty. A failure that already has `encoded_attributes` is
//! left alone when its message is empty or `Encoded failure` and its stack trace empty; with
//! any other message or stack trace the request is refused (`INVALID_ARGUMENT`), as the
//! gateway cannot seal it without losing one of them.
//!
//! On the way back, a failure whose `encoded_attributes` decodes to a `json/plain` JSON object
//! gets its string `message` and `stack_trace` back and loses the attributes: what every SDK
//! does itself, so SDKs and tools that do not look at `encoded_attributes` see the original.
//!
//! Some messages repeat a failure's message in a plain string beside it (the SDKs copy it):
//! `RespondQueryTaskCompletedRequest.error_message` and `WorkflowQueryResult.error_message`
//! (legacy queries answered in `RespondWorkflowTaskCompletedRequest.query_results`). When the
//! failure beside such a text is sealed (by the gateway or already by the SDK), the text becomes
//! `Encoded failure` too. A text with no failure on the wire (the Python SDK sends a failed
//! query's text alone) becomes `Encoded failure` and gets a sealed failure beside it holding the
//! text; a text beside a failure that has nothing to seal is refused (`INVALID_ARGUMENT`). The server hands that text back as the gRPC message of a failed
//! `QueryWorkflow` (`google.rpc.Status.message`, with the failure in a `QueryFailedFailure`
//! detail): on the way back a placeholder text gets the message its sibling failure got back,
//! and [`restore_grpc_message`] does the same for the `grpc-message` header.

use bytes::Bytes;
use payload_gateway_proto::{
    ENCODED_FAILURE_MESSAGE, FailureEdit, MessageType, Scan, TextEdit, scan, top_level_string,
};

use super::fit::FitPlan;
use super::pipeline::{CallContext, Direction, Pipeline};
use crate::grpc::{Code, Status};
use crate::metrics::metrics;
use crate::payload::Payload;
use crate::server_limits::Limits;

const JSON_PLAIN: &[u8] = b"json/plain";

/// Rewrites `message` of type `ty` in `direction`. Errors are statuses ready for the client:
/// malformed requests are `INVALID_ARGUMENT`, malformed responses `INTERNAL`. On the way out,
/// `limits` (the server's, for a namespace that offloads) make the stages offload what the
/// message needs to fit them ([`super::fit`]).
pub async fn rewrite(
    pipeline: &Pipeline,
    direction: Direction,
    ctx: &CallContext,
    ty: MessageType,
    message: Bytes,
    limits: Option<&Limits>,
) -> Result<Bytes, Status> {
    let pieces = rewrite_pieces(pipeline, direction, ctx, ty, message, limits).await?;
    let len = pieces.iter().map(Bytes::len).sum();
    Ok(crate::grpc::frame::join(pieces, len))
}

/// [`rewrite`] returning the message as pieces whose concatenation is the rewritten message
/// ([`payload_gateway_proto::Scan::splice_edits_chunks`]): a large payload is a piece of its
/// own, not copied into a new message buffer. Frame it with
/// [`encode_pieces`](crate::grpc::frame::encode_pieces).
pub async fn rewrite_pieces(
    pipeline: &Pipeline,
    direction: Direction,
    ctx: &CallContext,
    ty: MessageType,
    message: Bytes,
    limits: Option<&Limits>,
) -> Result<Vec<Bytes>, Status> {
    if !ty.can_hold_payloads() {
        return Ok(vec![message]);
    }
    let scanned = scan(ty, &message).map_err(|e| {
        let code = match direction {
            Direction::Encode => Code::InvalidArgument,
            Direction::Decode => Code::Internal,
        };
        Status::new(code, format!("malformed {} message: {e}", ty.name()))
    })?;
    let sites = scanned.sites();
    tracing::debug!(method = %ctx.method, ?direction, message = ty.name(), sites = sites.len(), failures = scanned.failures().len(), "walked message");
    if scanned.unknown_any() > 0 {
        metrics().unknown_any.inc_by(scanned.unknown_any() as u64);
        if direction == Direction::Encode {
            refuse_unknown_any(pipeline, ctx, &scanned)?;
        }
    }
    // Failures to seal: (failure index, plaintext attributes payload), and what becomes of the
    // failure texts beside them.
    let (seals, plans) = match direction {
        Direction::Encode if pipeline.codec().seals_failures(ctx.namespace.as_deref()) => {
            let seals = failures_to_seal(&scanned, &message)?;
            let plans = texts_to_seal(&scanned, &message, &seals)?;
            (seals, plans)
        }
        _ => (
            Vec::new(),
            vec![TextPlan::Keep; scanned.failure_texts().len()],
        ),
    };
    // Texts with no failure to carry them get one: (text index, plaintext attributes payload).
    let added: Vec<(usize, Bytes)> = plans
        .iter()
        .enumerate()
        .filter_map(|(i, plan)| match plan {
            TextPlan::AddFailure(attributes) => Some((i, attributes.clone())),
            _ => None,
        })
        .collect();
    if sites.is_empty() && seals.is_empty() && added.is_empty() && scanned.failures().is_empty() {
        return Ok(vec![message]);
    }
    let payloads: Vec<Bytes> = sites
        .iter()
        .map(|site| message.slice(site.range()))
        .chain(seals.iter().map(|(_, p)| p.clone()))
        .chain(added.iter().map(|(_, p)| p.clone()))
        .collect();
    if payloads.is_empty() {
        return Ok(vec![message]);
    }
    let sizes: Vec<usize> = payloads.iter().map(Bytes::len).collect();
    let outcome = match (direction, limits) {
        (Direction::Encode, Some(limits)) => {
            let plan = FitPlan::new(ty, &message, &scanned, seals.len() + added.len(), limits);
            pipeline.encode_to_fit(ctx, payloads, Some(&plan)).await
        }
        _ => pipeline.run(direction, ctx, payloads).await,
    };
    let mut replacements = outcome.map_err(|e| {
        let path = match e.index.checked_sub(sites.len()) {
            None => sites
                .get(e.index)
                .map(|site| site.path().to_string())
                .unwrap_or_default(),
            Some(k) if k < seals.len() => field_path(&scanned, seals[k].0, "encoded_attributes"),
            Some(k) => added
                .get(k - seals.len())
                .map(|(t, _)| scanned.failure_texts()[*t].path())
                .unwrap_or_default(),
        };
        e.into_status(direction, &path)
    })?;
    record(direction, ctx, sizes.into_iter(), &replacements);
    let mut sealed = replacements.split_off(sites.len());
    let added_encoded = sealed.split_off(seals.len());
    let mut texts: Vec<Option<TextEdit>> = plans
        .iter()
        .map(|plan| match plan {
            TextPlan::Keep => None,
            TextPlan::Mask => Some(ENCODED_FAILURE_MESSAGE.into()),
            TextPlan::AddFailure(_) => None, // filled in below
        })
        .collect();
    for ((index, plain), encoded) in added.into_iter().zip(added_encoded) {
        let Some(attributes) = encoded.filter(|e| *e != plain) else {
            return Err(Status::new(
                Code::Internal,
                format!(
                    "cannot seal {}: its attributes were not encoded; nothing was forwarded",
                    scanned.failure_texts()[index].path()
                ),
            ));
        };
        texts[index] = Some(TextEdit {
            text: ENCODED_FAILURE_MESSAGE.to_owned(),
            failure: Some(sealed_failure(&attributes)),
        });
    }
    let mut edits: Vec<Option<FailureEdit>> = vec![None; scanned.failures().len()];
    for ((index, plain), encoded) in seals.into_iter().zip(sealed) {
        // With encryption on the codec never leaves a payload unchanged; refuse rather than
        // forward the plaintext attributes if it ever did.
        let Some(attributes) = encoded.filter(|e| *e != plain) else {
            return Err(Status::new(
                Code::Internal,
                format!(
                    "cannot seal the failure at {}: its attributes were not encoded; nothing was forwarded",
                    scanned.failures()[index].path()
                ),
            ));
        };
        edits[index] = Some(FailureEdit::Seal { attributes });
    }
    if direction == Direction::Decode {
        restore_failures(&scanned, &message, &replacements, &mut edits);
        restore_texts(&scanned, &message, &edits, &mut texts);
    }
    scanned
        .splice_edits_chunks(&message, &replacements, &edits, &texts)
        .map_err(|e| {
            Status::new(
                Code::Internal,
                format!("cannot rebuild {} message: {e}", ty.name()),
            )
        })
}

/// What becomes of one failure text on the way out.
#[derive(Clone, Debug)]
enum TextPlan {
    /// Forwarded as it is (empty, the placeholder already, or sealing is off).
    Keep,
    /// Replaced with the placeholder: a failure beside it carries the text sealed.
    Mask,
    /// Replaced with the placeholder, and a sealed failure holding this plaintext
    /// `encoded_attributes` payload (encoded with the message's other payloads) is added beside
    /// it: the text had no failure on the wire (the Python SDK answers failed queries with
    /// `error_message` only).
    AddFailure(Bytes),
}

/// Encode direction, failures being sealed: a [failure text](payload_gateway_proto::FailureText)
/// (a query's `error_message`, ...) beside a sealed failure gets the sealed failure's
/// placeholder message; one with no failure on the wire gets a sealed failure of its own
/// holding the text. A non-empty text beside a failure that has nothing to seal, or whose
/// failure cannot be added beside it, is refused: it would reach the server in plaintext.
fn texts_to_seal(
    scanned: &Scan,
    message: &Bytes,
    seals: &[(usize, Bytes)],
) -> Result<Vec<TextPlan>, Status> {
    scanned
        .failure_texts()
        .iter()
        .map(|text| {
            let value = &message[text.value()];
            if value.is_empty() || value == ENCODED_FAILURE_MESSAGE.as_bytes() {
                return Ok(TextPlan::Keep);
            }
            let carried = text.failures().iter().any(|&i| {
                seals.iter().any(|(s, _)| *s == i) || scanned.failures()[i].has_encoded_attributes()
            });
            if carried {
                return Ok(TextPlan::Mask);
            }
            if text.failures().is_empty()
                && text.can_add_failure()
                && let Ok(value) = std::str::from_utf8(value)
            {
                return Ok(TextPlan::AddFailure(attributes_payload(value, "")));
            }
            Err(Status::new(
                Code::InvalidArgument,
                format!(
                    "{} is plaintext failure text beside a failure that cannot carry it sealed \
                     (no message to seal, or the text is not UTF-8); nothing was forwarded",
                    text.path()
                ),
            ))
        })
        .collect()
}

/// A serialized `Failure` sealed the way the SDKs seal one: `encoded_attributes` (field 20) and
/// `message = "Encoded failure"` (field 1).
fn sealed_failure(attributes: &Bytes) -> Bytes {
    fn put_varint(out: &mut Vec<u8>, mut v: u64) {
        while v >= 0x80 {
            out.push((v as u8) | 0x80);
            v >>= 7;
        }
        out.push(v as u8);
    }
    fn put_field(out: &mut Vec<u8>, field: u64, value: &[u8]) {
        put_varint(out, (field << 3) | 2);
        put_varint(out, value.len() as u64);
        out.extend_from_slice(value);
    }
    let mut out = Vec::with_capacity(attributes.len() + 32);
    put_field(&mut out, 20, attributes);
    put_field(&mut out, 1, ENCODED_FAILURE_MESSAGE.as_bytes());
    Bytes::from(out)
}

/// Decode direction: a [failure text](payload_gateway_proto::FailureText) that is the sealed placeholder gets the
/// message restored into its sibling failure, the way the failure gets it back.
fn restore_texts(
    scanned: &Scan,
    message: &Bytes,
    edits: &[Option<FailureEdit>],
    texts: &mut [Option<TextEdit>],
) {
    for (text, new) in scanned.failure_texts().iter().zip(texts.iter_mut()) {
        if &message[text.value()] != ENCODED_FAILURE_MESSAGE.as_bytes() {
            continue;
        }
        *new = text.failures().iter().find_map(|&i| match &edits[i] {
            Some(FailureEdit::Restore {
                message: Some(m), ..
            }) => Some(m.as_str().into()),
            _ => None,
        });
    }
}

/// After the `google.rpc.Status` of `grpc-status-details-bin` was decoded into `status`: when
/// `grpc-message` is the sealed placeholder and the status message was restored (a failed
/// query comes back with the worker's `error_message` as its gRPC message), `grpc-message`
/// gets the restored text too, so clients that read only the gRPC message (the Python SDK's
/// `WorkflowQueryFailedError`) see the original.
pub fn restore_grpc_message(headers: &mut http::HeaderMap, status: &[u8]) {
    const GRPC_MESSAGE: &str = "grpc-message";
    /// What `grpc-message` leaves unescaped: printable ASCII except `%`.
    const ESCAPED: &percent_encoding::AsciiSet = &percent_encoding::CONTROLS.add(b'%');
    let Some(current) = headers.get(GRPC_MESSAGE) else {
        return;
    };
    let current = percent_encoding::percent_decode(current.as_bytes()).decode_utf8_lossy();
    if current != ENCODED_FAILURE_MESSAGE {
        return;
    }
    let Some(ty) = MessageType::by_name("google.rpc.Status") else {
        return;
    };
    let Some(restored) = top_level_string(ty, status, "message") else {
        return;
    };
    if restored == ENCODED_FAILURE_MESSAGE {
        return;
    }
    let encoded = percent_encoding::utf8_percent_encode(restored, ESCAPED).to_string();
    if let Ok(value) = http::HeaderValue::from_str(&encoded) {
        headers.insert(GRPC_MESSAGE, value);
    }
}

/// `<failure path>.<field>`, or just the field for a failure at the top level.
fn field_path(scanned: &Scan, failure: usize, field: &str) -> String {
    let path = scanned.failures()[failure].path().to_string();
    if path.is_empty() {
        field.to_owned()
    } else {
        format!("{path}.{field}")
    }
}

/// The failures to seal and the plaintext `encoded_attributes` payload of each; refuses a
/// failure the gateway cannot seal without losing data.
fn failures_to_seal(scanned: &Scan, message: &Bytes) -> Result<Vec<(usize, Bytes)>, Status> {
    let mut out = Vec::new();
    for (i, failure) in scanned.failures().iter().enumerate() {
        let text = |r: Option<std::ops::Range<usize>>| r.map_or(&b""[..], |r| &message[r]);
        let msg = text(failure.message());
        let stack = text(failure.stack_trace());
        if failure.has_encoded_attributes() {
            if (msg.is_empty() || msg == ENCODED_FAILURE_MESSAGE.as_bytes()) && stack.is_empty() {
                continue;
            }
            let field = if stack.is_empty() {
                "message"
            } else {
                "stack_trace"
            };
            return Err(Status::new(
                Code::InvalidArgument,
                format!(
                    "{} is plaintext but the failure already has encoded_attributes: the \
                     gateway cannot seal it without losing one of them (seal the failure in \
                     the SDK, or send message \"{ENCODED_FAILURE_MESSAGE}\" and no \
                     stack_trace); nothing was forwarded",
                    field_path(scanned, i, field),
                ),
            ));
        }
        if msg.is_empty() && stack.is_empty() {
            continue;
        }
        let (Ok(msg), Ok(stack)) = (std::str::from_utf8(msg), std::str::from_utf8(stack)) else {
            return Err(Status::new(
                Code::InvalidArgument,
                format!(
                    "the failure at {} has a message or stack_trace that is not valid UTF-8",
                    failure.path()
                ),
            ));
        };
        out.push((i, attributes_payload(msg, stack)));
    }
    Ok(out)
}

/// The `encoded_attributes` payload the SDKs write: `json/plain` of
/// `{"message":…,"stack_trace":…}`.
pub fn attributes_payload(message: &str, stack_trace: &str) -> Bytes {
    let mut data = Vec::with_capacity(message.len() + stack_trace.len() + 32);
    data.extend_from_slice(b"{\"message\":");
    python_json_string(&mut data, message);
    data.extend_from_slice(b",\"stack_trace\":");
    python_json_string(&mut data, stack_trace);
    data.push(b'}');
    Payload {
        metadata: [("encoding".to_owned(), JSON_PLAIN.to_vec())].into(),
        data: Bytes::from(data),
        external_payloads: Vec::new(),
    }
    .to_bytes()
}

/// A JSON string as Python's `json.dumps` writes it by default (`ensure_ascii=True`): `"` and
/// `\` escaped, `\b \f \n \r \t` short, every other character outside printable ASCII
/// (`' '..='~'`) as `\uXXXX` in lowercase hex, characters above U+FFFF as surrogate pairs.
pub fn python_json_string(out: &mut Vec<u8>, s: &str) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let unit = |out: &mut Vec<u8>, u: u16| {
        out.extend_from_slice(b"\\u");
        for shift in [12, 8, 4, 0] {
            out.push(HEX[usize::from((u >> shift) & 0xf)]);
        }
    };
    out.push(b'"');
    for c in s.chars() {
        match c {
            '"' => out.extend_from_slice(b"\\\""),
            '\\' => out.extend_from_slice(b"\\\\"),
            '\n' => out.extend_from_slice(b"\\n"),
            '\r' => out.extend_from_slice(b"\\r"),
            '\t' => out.extend_from_slice(b"\\t"),
            '\u{8}' => out.extend_from_slice(b"\\b"),
            '\u{c}' => out.extend_from_slice(b"\\f"),
            ' '..='~' => out.push(c as u8),
            _ => {
                let mut units = [0u16; 2];
                for u in c.encode_utf16(&mut units) {
                    unit(out, *u);
                }
            }
        }
    }
    out.push(b'"');
}

/// Decode direction: a failure whose `encoded_attributes` (as decoded by the stages) is a
/// `json/plain` JSON object gets its string `message` / `stack_trace` back, as the SDKs do.
fn restore_failures(
    scanned: &Scan,
    message: &Bytes,
    replacements: &[Option<Bytes>],
    edits: &mut [Option<FailureEdit>],
) {
    for (failure, edit) in scanned.failures().iter().zip(edits.iter_mut()) {
        let Some(site) = failure.encoded_attributes_site() else {
            continue;
        };
        let decoded = match &replacements[site] {
            Some(r) => r.clone(),
            None => message.slice(scanned.sites()[site].range()),
        };
        let Ok(payload) = Payload::from_bytes(&decoded) else {
            continue;
        };
        if payload.metadata.get("encoding").map(Vec::as_slice) != Some(JSON_PLAIN) {
            continue;
        }
        let Ok(serde_json::Value::Object(attrs)) =
            serde_json::from_slice::<serde_json::Value>(&payload.data)
        else {
            continue;
        };
        let get = |key| attrs.get(key).and_then(|v| v.as_str()).map(str::to_owned);
        let (message, stack_trace) = (get("message"), get("stack_trace"));
        if message.is_some() || stack_trace.is_some() {
            *edit = Some(FailureEdit::Restore {
                message,
                stack_trace,
            });
        }
    }
}

/// An `Any` of a type the descriptors do not know may hold payloads the walker cannot see:
/// where encryption applies it is refused unless the namespace's policy lists the type
/// (`forward_unknown_any_types`); listed types pass, logged and counted.
fn refuse_unknown_any(
    pipeline: &Pipeline,
    ctx: &CallContext,
    scanned: &Scan,
) -> Result<(), Status> {
    let ns = ctx.namespace.as_deref();
    let codec = pipeline.codec();
    for unknown in scanned.unknown_anys() {
        if codec.forwards_unknown_any(ns, &unknown.type_name) {
            if codec.encrypts(ns) {
                tracing::warn!(method = %ctx.method, type_name = %unknown.type_name, path = %unknown.path, "Any of an unknown type forwarded untouched by policy (forward_unknown_any_types)");
                metrics().count_policy("forwarded_unknown_any");
            }
            continue;
        }
        tracing::warn!(method = %ctx.method, type_name = %unknown.type_name, path = %unknown.path, "Any of an unknown type refused: encryption applies and the gateway cannot see inside");
        metrics().count_policy("refused_unknown_any");
        return Err(Status::new(
            Code::FailedPrecondition,
            format!(
                "{} holds a google.protobuf.Any of type {:?}, unknown to the gateway, which \
                 cannot see whether it carries payloads; refused because encryption applies \
                 (list the type in encryption.forward_unknown_any_types or \
                 namespaces.<ns>.forward_unknown_any_types to forward it untouched)",
                unknown.path, unknown.type_name
            ),
        ));
    }
    Ok(())
}

/// Counts the payloads the stages changed and the bytes before and after.
fn record(
    direction: Direction,
    ctx: &CallContext,
    sizes: impl Iterator<Item = usize>,
    replacements: &[Option<Bytes>],
) {
    let (name, operation) = match direction {
        Direction::Encode => ("encode", "encoded"),
        Direction::Decode => ("decode", "decoded"),
    };
    let (mut bytes_in, mut bytes_out, mut changed) = (0u64, 0u64, 0usize);
    for (size, replacement) in sizes.zip(replacements) {
        bytes_in += size as u64;
        bytes_out += replacement.as_ref().map_or(size, Bytes::len) as u64;
        changed += usize::from(replacement.is_some());
    }
    let m = metrics();
    m.count_payloads(ctx.namespace.as_deref(), operation, changed);
    m.count_payload_bytes(name, bytes_in, bytes_out);
}

/// The gRPC edge of the payload stages: a [`StageError`](super::pipeline::StageError)'s cause
/// becomes a gRPC status here (and an HTTP status at the codec endpoint); the stages below
/// speak neither.
impl super::pipeline::StageError {
    /// The RPC status for this failure, naming the payload's field path.
    pub fn into_status(self, direction: Direction, path: &str) -> Status {
        let code = grpc_code(&self.cause);
        let message = match direction {
            Direction::Encode => format!(
                "cannot encode payload at {path}: {}; nothing was forwarded",
                self.cause
            ),
            Direction::Decode => format!("cannot decode payload at {path}: {}", self.cause),
        };
        Status::new(code, message)
    }
}

/// The gRPC code of a stage failure, by cause.
fn grpc_code(cause: &super::pipeline::StageCause) -> Code {
    use super::pipeline::StageCause;
    use crate::codec::CodecError;
    use crate::storage::StorageFailure;
    match cause {
        StageCause::Budget(_) => Code::ResourceExhausted,
        // The key service is unreachable or not asked for now: retryable, and nothing was
        // forwarded in plaintext.
        StageCause::Kms(CodecError::KeyUnavailable { .. } | CodecError::KeyThrottled { .. }) => {
            Code::Unavailable
        }
        StageCause::Kms(CodecError::TooManyDataKeys { .. }) => Code::ResourceExhausted,
        StageCause::Kms(_) | StageCause::Codec(_) => Code::Internal,
        StageCause::Storage { kind, .. } => match kind {
            StorageFailure::Unavailable => Code::Unavailable,
            StorageFailure::TooLarge => Code::InvalidArgument,
            StorageFailure::Refused => Code::PermissionDenied,
            StorageFailure::Lost => Code::DataLoss,
            StorageFailure::Budget => Code::ResourceExhausted,
            StorageFailure::Internal => Code::Internal,
        },
        StageCause::Reference(_) => Code::InvalidArgument,
        StageCause::Cancelled => Code::Cancelled,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn json(s: &str) -> String {
        let mut out = Vec::new();
        python_json_string(&mut out, s);
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn escapes_like_python_json_dumps() {
        // Expected values from Python 3: json.dumps(s) (ensure_ascii=True by default).
        assert_eq!(json("boom"), r#""boom""#);
        assert_eq!(json("a\"b\\c/d"), r#""a\"b\\c/d""#);
        assert_eq!(json("\n\r\t\u{8}\u{c}"), r#""\n\r\t\b\f""#);
        assert_eq!(json("\u{0}\u{1f}\u{7f}"), r#""\u0000\u001f\u007f""#);
        assert_eq!(json("é€"), r#""\u00e9\u20ac""#);
        assert_eq!(json("😀"), r#""\ud83d\ude00""#);
        assert_eq!(json("\u{2028}"), r#""\u2028""#);
    }

    #[test]
    fn attributes_payload_matches_the_sdk() {
        let p = Payload::from_bytes(&attributes_payload("boom é", "at x\n  at y")).unwrap();
        assert_eq!(p.meta_str("encoding"), Some("json/plain"));
        assert_eq!(
            &p.data[..],
            br#"{"message":"boom \u00e9","stack_trace":"at x\n  at y"}"#
        );
    }

    // ---------------------------------------------------------------- failure texts

    use std::sync::Arc;

    use prost::Message;
    use temporalio_protos::protos::temporal::api::errordetails::v1::QueryFailedFailure;
    use temporalio_protos::protos::temporal::api::failure::v1::Failure;
    use temporalio_protos::protos::temporal::api::query::v1::WorkflowQueryResult;
    use temporalio_protos::protos::temporal::api::workflowservice::v1::{
        RespondQueryTaskCompletedRequest, RespondWorkflowTaskCompletedRequest,
    };

    use crate::codec::PayloadCodec;
    use crate::config::{Config, KeySpec};

    /// `google.rpc.Status` and `google.protobuf.Any` as the server sends them in
    /// `grpc-status-details-bin`.
    #[derive(Clone, PartialEq, prost::Message)]
    struct RpcAny {
        #[prost(string, tag = "1")]
        type_url: String,
        #[prost(bytes = "vec", tag = "2")]
        value: Vec<u8>,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    struct RpcStatus {
        #[prost(int32, tag = "1")]
        code: i32,
        #[prost(string, tag = "2")]
        message: String,
        #[prost(message, repeated, tag = "3")]
        details: Vec<RpcAny>,
    }

    const QUERY_COMPLETED: &str =
        "temporal.api.workflowservice.v1.RespondQueryTaskCompletedRequest";
    const SECRET: &str = "query handler failed: card 4111 MARKER";

    fn pipeline(seal: bool) -> (tempfile::TempDir, Pipeline) {
        let dir = tempfile::tempdir().unwrap();
        let key = dir.path().join("k1.key");
        std::fs::write(&key, [0x42u8; 32]).unwrap();
        let mut config = Config::default();
        config.encryption.keys = vec![KeySpec {
            id: "k1".to_owned(),
            file: Some(key),
            env: None,
            kms: None,
        }];
        config.encryption.active_key = Some("k1".to_owned());
        config.encryption.seal_failures = seal;
        let codec = PayloadCodec::from_config(&config).unwrap();
        (dir, Pipeline::new(Arc::new(codec)))
    }

    fn ctx() -> CallContext {
        CallContext::new("test", Some("ns".to_owned()))
    }

    fn ty(name: &str) -> MessageType {
        MessageType::by_name(name).unwrap()
    }

    fn failure(message: &str) -> Failure {
        Failure {
            message: message.to_owned(),
            stack_trace: "at handler()".to_owned(),
            source: "PythonSDK".to_owned(),
            ..Default::default()
        }
    }

    fn query_failed(error_message: &str, failure: Option<Failure>) -> Bytes {
        Bytes::from(
            RespondQueryTaskCompletedRequest {
                task_token: b"tok".to_vec(),
                completed_type: 2,
                error_message: error_message.to_owned(),
                namespace: "ns".to_owned(),
                failure,
                ..Default::default()
            }
            .encode_to_vec(),
        )
    }

    fn contains(haystack: &[u8], needle: &str) -> bool {
        haystack
            .windows(needle.len())
            .any(|w| w == needle.as_bytes())
    }

    async fn run(
        p: &Pipeline,
        direction: Direction,
        name: &str,
        m: Bytes,
    ) -> Result<Bytes, Status> {
        rewrite(p, direction, &ctx(), ty(name), m, None).await
    }

    #[tokio::test]
    async fn a_query_error_message_is_sealed_with_its_failure_and_restored() {
        let (_dir, p) = pipeline(true);
        let sent = run(
            &p,
            Direction::Encode,
            QUERY_COMPLETED,
            query_failed(SECRET, Some(failure(SECRET))),
        )
        .await
        .unwrap();
        assert!(!contains(&sent, "MARKER"), "plaintext went out");
        let got = RespondQueryTaskCompletedRequest::decode(&sent[..]).unwrap();
        assert_eq!(got.error_message, ENCODED_FAILURE_MESSAGE);
        let f = got.failure.unwrap();
        assert_eq!(f.message, ENCODED_FAILURE_MESSAGE);
        assert_eq!(
            f.encoded_attributes.unwrap().metadata["encoding"],
            b"binary/encrypted"
        );
        // The same message on the way back (as if the server echoed it) gets the text back.
        let back = run(&p, Direction::Decode, QUERY_COMPLETED, sent)
            .await
            .unwrap();
        let got = RespondQueryTaskCompletedRequest::decode(&back[..]).unwrap();
        assert_eq!(got.error_message, SECRET);
        assert_eq!(got.failure.unwrap().message, SECRET);
    }

    #[tokio::test]
    async fn a_text_beside_a_failure_the_sdk_sealed_is_sealed_too() {
        let (_dir, p) = pipeline(true);
        // What an SDK that seals its own failures and copies the original error text sends.
        let mut sdk_sealed = failure(ENCODED_FAILURE_MESSAGE);
        sdk_sealed.stack_trace.clear();
        sdk_sealed.encoded_attributes = Some(
            temporalio_protos::protos::temporal::api::common::v1::Payload::decode(
                attributes_payload(SECRET, ""),
            )
            .unwrap(),
        );
        let sent = run(
            &p,
            Direction::Encode,
            QUERY_COMPLETED,
            query_failed(SECRET, Some(sdk_sealed)),
        )
        .await
        .unwrap();
        assert!(!contains(&sent, "MARKER"), "plaintext went out");
        let got = RespondQueryTaskCompletedRequest::decode(&sent[..]).unwrap();
        assert_eq!(got.error_message, ENCODED_FAILURE_MESSAGE);
    }

    #[tokio::test]
    async fn a_text_with_no_failure_gets_a_sealed_one_that_brings_it_back() {
        let (_dir, p) = pipeline(true);
        // What the Python SDK sends for a failed query: error_message alone.
        let sent = run(
            &p,
            Direction::Encode,
            QUERY_COMPLETED,
            query_failed(SECRET, None),
        )
        .await
        .unwrap();
        assert!(!contains(&sent, "MARKER"), "plaintext went out");
        let got = RespondQueryTaskCompletedRequest::decode(&sent[..]).unwrap();
        assert_eq!(got.error_message, ENCODED_FAILURE_MESSAGE);
        let f = got.failure.unwrap();
        assert_eq!(f.message, ENCODED_FAILURE_MESSAGE);
        assert_eq!(
            f.encoded_attributes.unwrap().metadata["encoding"],
            b"binary/encrypted"
        );
        let back = run(&p, Direction::Decode, QUERY_COMPLETED, sent)
            .await
            .unwrap();
        let got = RespondQueryTaskCompletedRequest::decode(&back[..]).unwrap();
        assert_eq!(got.error_message, SECRET);
        assert_eq!(got.failure.unwrap().message, SECRET);
    }

    #[tokio::test]
    async fn a_text_beside_a_failure_with_nothing_to_seal_is_refused() {
        let (_dir, p) = pipeline(true);
        // A failure whose message field is on the wire but empty: nothing to seal the text into.
        let mut m = query_failed(SECRET, None).to_vec();
        m.extend_from_slice(&[7 << 3 | 2, 2, 1 << 3 | 2, 0]);
        let err = run(&p, Direction::Encode, QUERY_COMPLETED, Bytes::from(m))
            .await
            .unwrap_err();
        assert_eq!(err.code, Code::InvalidArgument);
        assert!(err.message.contains("error_message"), "{}", err.message);
        assert!(
            !err.message.contains("MARKER"),
            "the refusal must not echo the text"
        );
        // An empty text or the placeholder alone is fine.
        for text in ["", ENCODED_FAILURE_MESSAGE] {
            run(
                &p,
                Direction::Encode,
                QUERY_COMPLETED,
                query_failed(text, None),
            )
            .await
            .unwrap();
        }
    }

    #[tokio::test]
    async fn without_sealing_the_text_is_forwarded_as_is() {
        let (_dir, p) = pipeline(false);
        let m = query_failed(SECRET, Some(failure(SECRET)));
        let sent = run(&p, Direction::Encode, QUERY_COMPLETED, m)
            .await
            .unwrap();
        let got = RespondQueryTaskCompletedRequest::decode(&sent[..]).unwrap();
        assert_eq!(got.error_message, SECRET);
        assert_eq!(got.failure.unwrap().message, SECRET);
        let lonely = query_failed(SECRET, None);
        assert_eq!(
            run(&p, Direction::Encode, QUERY_COMPLETED, lonely.clone())
                .await
                .unwrap(),
            lonely
        );
    }

    #[tokio::test]
    async fn legacy_query_results_are_sealed_per_entry() {
        let (_dir, p) = pipeline(true);
        let result = |m: &str| WorkflowQueryResult {
            result_type: 2,
            error_message: m.to_owned(),
            failure: Some(failure(m)),
            ..Default::default()
        };
        let name = "temporal.api.workflowservice.v1.RespondWorkflowTaskCompletedRequest";
        let m = Bytes::from(
            RespondWorkflowTaskCompletedRequest {
                task_token: b"tok".to_vec(),
                namespace: "ns".to_owned(),
                query_results: [
                    ("a".to_owned(), result("MARKER one")),
                    // As the Python SDK sends it: the text alone.
                    (
                        "b".to_owned(),
                        WorkflowQueryResult {
                            failure: None,
                            ..result("MARKER two")
                        },
                    ),
                ]
                .into(),
                ..Default::default()
            }
            .encode_to_vec(),
        );
        let sent = run(&p, Direction::Encode, name, m).await.unwrap();
        assert!(!contains(&sent, "MARKER"), "plaintext went out");
        let back = run(&p, Direction::Decode, name, sent).await.unwrap();
        let got = RespondWorkflowTaskCompletedRequest::decode(&back[..]).unwrap();
        assert_eq!(got.query_results["a"].error_message, "MARKER one");
        assert_eq!(got.query_results["b"].error_message, "MARKER two");
        assert_eq!(
            got.query_results["b"].failure.as_ref().unwrap().message,
            "MARKER two"
        );
    }

    #[tokio::test]
    async fn a_failed_query_status_gets_its_message_and_grpc_message_back() {
        let (_dir, p) = pipeline(true);
        // The worker's answer, sealed on the way out...
        let sent = run(
            &p,
            Direction::Encode,
            QUERY_COMPLETED,
            query_failed(SECRET, Some(failure(SECRET))),
        )
        .await
        .unwrap();
        let sealed = RespondQueryTaskCompletedRequest::decode(&sent[..]).unwrap();
        // ...comes back from the server as QueryWorkflow's status.
        let status = RpcStatus {
            code: 3,
            message: sealed.error_message.clone(),
            details: vec![RpcAny {
                type_url: "type.googleapis.com/temporal.api.errordetails.v1.QueryFailedFailure"
                    .to_owned(),
                value: QueryFailedFailure {
                    failure: sealed.failure,
                }
                .encode_to_vec(),
            }],
        };
        let back = run(
            &p,
            Direction::Decode,
            "google.rpc.Status",
            Bytes::from(status.encode_to_vec()),
        )
        .await
        .unwrap();
        let got = RpcStatus::decode(&back[..]).unwrap();
        assert_eq!(got.message, SECRET);
        let detail = QueryFailedFailure::decode(&got.details[0].value[..]).unwrap();
        assert_eq!(detail.failure.unwrap().message, SECRET);

        let mut headers = http::HeaderMap::new();
        headers.insert(
            "grpc-message",
            http::HeaderValue::from_static("Encoded failure"),
        );
        restore_grpc_message(&mut headers, &back);
        assert_eq!(
            headers["grpc-message"],
            "query handler failed: card 4111 MARKER"
        );
        // Non-ASCII text and `%` are percent-encoded.
        let status = RpcStatus {
            code: 3,
            message: "100% é".to_owned(),
            details: vec![],
        };
        headers.insert(
            "grpc-message",
            http::HeaderValue::from_static("Encoded%20failure"),
        );
        restore_grpc_message(&mut headers, &status.encode_to_vec());
        assert_eq!(headers["grpc-message"], "100%25 %C3%A9");
        // Any other gRPC message is the server's own: left alone.
        headers.insert(
            "grpc-message",
            http::HeaderValue::from_static("workflow not found"),
        );
        restore_grpc_message(&mut headers, &back);
        assert_eq!(headers["grpc-message"], "workflow not found");
    }
}
