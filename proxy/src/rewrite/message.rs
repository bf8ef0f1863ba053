//! Rewriting one protobuf message: find its payloads, run the pipeline over them as a batch,
//! splice the results back. Every byte that is not a rewritten payload is kept as it came.

use bytes::Bytes;
use payload_gateway_proto::{MessageType, scan};

use super::pipeline::{CallContext, Direction, Pipeline};
use crate::grpc::{Code, Status};

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
    scanned.splice(&message, &replacements).map_err(|e| {
        Status::new(
            Code::Internal,
            format!("cannot rebuild {} message: {e}", ty.name()),
        )
    })
}
