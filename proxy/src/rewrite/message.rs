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

use bytes::Bytes;
use payload_gateway_proto::{ENCODED_FAILURE_MESSAGE, FailureEdit, MessageType, Scan, scan};

use super::pipeline::{CallContext, Direction, Pipeline};
use crate::grpc::{Code, Status};
use crate::metrics::metrics;
use crate::payload::Payload;

const JSON_PLAIN: &[u8] = b"json/plain";

/// Rewrites `message` of type `ty` in `direction`. Errors are statuses ready for the client:
/// malformed requests are `INVALID_ARGUMENT`, malformed responses `INTERNAL`.
pub async fn rewrite(
    pipeline: &Pipeline,
    direction: Direction,
    ctx: &CallContext,
    ty: MessageType,
    message: Bytes,
) -> Result<Bytes, Status> {
    if !ty.can_hold_payloads() {
        return Ok(message);
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
    // Failures to seal: (failure index, plaintext attributes payload).
    let seals = match direction {
        Direction::Encode if pipeline.codec().seals_failures(ctx.namespace.as_deref()) => {
            failures_to_seal(&scanned, &message)?
        }
        _ => Vec::new(),
    };
    if sites.is_empty() && seals.is_empty() && scanned.failures().is_empty() {
        return Ok(message);
    }
    let payloads: Vec<Bytes> = sites
        .iter()
        .map(|site| message.slice(site.range()))
        .chain(seals.iter().map(|(_, p)| p.clone()))
        .collect();
    if payloads.is_empty() {
        return Ok(message);
    }
    let sizes: Vec<usize> = payloads.iter().map(Bytes::len).collect();
    let mut replacements = pipeline.run(direction, ctx, payloads).await.map_err(|e| {
        let path = match e.index.checked_sub(sites.len()) {
            None => sites
                .get(e.index)
                .map(|site| site.path().to_string())
                .unwrap_or_default(),
            Some(k) => seals
                .get(k)
                .map(|(f, _)| field_path(&scanned, *f, "encoded_attributes"))
                .unwrap_or_default(),
        };
        e.into_status(direction, &path)
    })?;
    record(direction, ctx, sizes.into_iter(), &replacements);
    let sealed = replacements.split_off(sites.len());
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
    }
    scanned
        .splice_with(&message, &replacements, &edits)
        .map_err(|e| {
            Status::new(
                Code::Internal,
                format!("cannot rebuild {} message: {e}", ty.name()),
            )
        })
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
}
