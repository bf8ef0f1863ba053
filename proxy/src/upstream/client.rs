//! A unary gRPC call over the [`Upstream`] pool, for the gateway's own requests to the
//! Temporal frontend (the `keys audit` command): same connection settings, TLS and API key as
//! forwarded traffic.

use bytes::Bytes;
use http::{HeaderValue, Method, Request};

use super::Upstream;
use crate::budget::MessageBudget;
use crate::grpc::body::{GatewayBody, collect};
use crate::grpc::frame::{self, Encoding};

/// How long one of the gateway's own calls may take.
const CALL_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

/// Why a call to the upstream failed.
#[derive(Debug, thiserror::Error)]
pub enum CallError {
    /// The upstream answered with a non-OK gRPC status.
    #[error("{path}: grpc-status {code}: {message}")]
    Status {
        /// The method called.
        path: String,
        /// The numeric gRPC status code.
        code: u16,
        /// The status message.
        message: String,
    },
    /// The response was not a well-formed unary gRPC response.
    #[error("{path}: malformed response: {reason}")]
    Malformed {
        /// The method called.
        path: String,
        /// What was wrong.
        reason: String,
    },
}

/// Calls the unary method `path` with the serialized request `message` for `namespace`
/// (sent as the `temporal-namespace` header) and returns the serialized response, at most
/// `limit` bytes.
pub async fn unary(
    upstream: &Upstream,
    path: &str,
    namespace: Option<&str>,
    message: Vec<u8>,
    limit: usize,
) -> Result<Bytes, CallError> {
    let malformed = |reason: String| CallError::Malformed {
        path: path.to_owned(),
        reason,
    };
    let chunks = frame::encode(vec![Bytes::from(message)]).map_err(|e| malformed(e.to_string()))?;
    let mut request = Request::builder()
        .method(Method::POST)
        .uri(path)
        .header(http::header::CONTENT_TYPE, "application/grpc")
        .header(http::header::TE, "trailers")
        // Upstreams (and fronts such as grpcio proxies) treat a call without a deadline
        // differently; the gateway's own calls always carry one, and keep it locally too.
        .header("grpc-timeout", format!("{}S", CALL_TIMEOUT.as_secs()))
        .body(GatewayBody::buffered(chunks, None))
        .map_err(|e| malformed(e.to_string()))?;
    if let Some(ns) = namespace.and_then(|ns| HeaderValue::from_str(ns).ok()) {
        request.headers_mut().insert("temporal-namespace", ns);
    }
    let response = tokio::time::timeout(CALL_TIMEOUT, upstream.forward(request))
        .await
        .map_err(|_| CallError::Status {
            path: path.to_owned(),
            code: 4,
            message: format!("no answer within {} s", CALL_TIMEOUT.as_secs()),
        })?;
    let (parts, body) = response.into_parts();
    let budget = MessageBudget::unlimited();
    let collected = collect(body, limit, &budget)
        .await
        .map_err(|e| malformed(format!("reading the body: {e}")))?;
    // Trailers-only responses carry the status in the headers.
    let status_source = collected.trailers.as_ref().unwrap_or(&parts.headers);
    let code = status_source
        .get("grpc-status")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u16>().ok())
        .ok_or_else(|| malformed(format!("no grpc-status (HTTP {})", parts.status)))?;
    if code != 0 {
        let message = status_source
            .get("grpc-message")
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default();
        return Err(CallError::Status {
            path: path.to_owned(),
            code,
            message: percent_decode(message),
        });
    }
    let encoding = Encoding::from_header(
        parts
            .headers
            .get("grpc-encoding")
            .and_then(|v| v.to_str().ok()),
    )
    .map_err(|e| malformed(e.to_string()))?;
    let body = frame::join(collected.chunks, collected.len);
    let mut messages = frame::split(&body, encoding, limit, true, &budget)
        .map_err(|e| malformed(e.to_string()))?;
    messages
        .pop()
        .ok_or_else(|| malformed("no response message".to_owned()))
}

/// `WorkflowService/DescribeNamespace`.
pub const DESCRIBE_NAMESPACE: &str =
    "/temporal.api.workflowservice.v1.WorkflowService/DescribeNamespace";
/// Larger answers are not a `DescribeNamespaceResponse` the gateway wants.
const MAX_DESCRIBE_BYTES: usize = 1 << 20;

/// `DescribeNamespace` of `namespace` through `upstream` (the gateway's own call: namespace
/// ids for authorization, the server's limits); returns the serialized response.
pub async fn describe_namespace(upstream: &Upstream, namespace: &str) -> Result<Bytes, CallError> {
    // `DescribeNamespaceRequest { namespace }`: field 1.
    let mut request = Vec::with_capacity(namespace.len() + 8);
    prost::encoding::string::encode(1, &namespace.to_owned(), &mut request);
    unary(
        upstream,
        DESCRIBE_NAMESPACE,
        Some(namespace),
        request,
        MAX_DESCRIBE_BYTES,
    )
    .await
}

/// Decodes a `grpc-message` value (percent-encoded UTF-8).
fn percent_decode(message: &str) -> String {
    percent_encoding::percent_decode_str(message)
        .decode_utf8_lossy()
        .into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_message_is_percent_decoded() {
        assert_eq!(percent_decode("a 100%25 %E2%9C%93"), "a 100% ✓");
        assert_eq!(percent_decode("bad %G1 end %"), "bad %G1 end %");
    }
}
