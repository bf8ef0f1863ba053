//! Rewriting one protobuf message: find its payloads, run the pipeline over them as a batch,
//! splice the results back. Every byte that is not a rewritten payload is kept as it came.

use bytes::Bytes;
use payload_gateway_proto::{MessageType, scan};

use super::pipeline::{CallContext, Direction, Pipeline};
use crate::grpc::{Code, Status};
use crate::metrics::{BytesLabels, metrics};

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
    tracing::debug!(method = %ctx.method, ?direction, message = ty.name(), sites = sites.len(), "walked message");
    if scanned.unknown_any() > 0 {
        metrics().unknown_any.inc_by(scanned.unknown_any() as u64);
    }
    if sites.is_empty() {
        return Ok(message);
    }
    let payloads = sites
        .iter()
        .map(|site| message.slice(site.range()))
        .collect();
    let replacements = pipeline.run(direction, ctx, payloads).await.map_err(|e| {
        let path = sites
            .get(e.index)
            .map(|site| site.path().to_string())
            .unwrap_or_default();
        e.into_status(direction, &path)
    })?;
    record(
        direction,
        ctx,
        sites.iter().map(|s| s.range().len()),
        &replacements,
    );
    scanned.splice(&message, &replacements).map_err(|e| {
        Status::new(
            Code::Internal,
            format!("cannot rebuild {} message: {e}", ty.name()),
        )
    })
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
    for (side, bytes) in [("in", bytes_in), ("out", bytes_out)] {
        m.payload_bytes
            .get_or_create(&BytesLabels {
                direction: name,
                side,
            })
            .inc_by(bytes);
    }
}
