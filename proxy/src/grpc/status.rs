//! gRPC status codes and trailers-only responses the gateway produces itself.

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Response};

use super::body::GatewayBody;

/// The gRPC status codes the gateway emits (values as in the gRPC spec).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Code {
    /// Not an error.
    Ok = 0,
    /// The client cancelled.
    Cancelled = 1,
    /// The request is malformed.
    InvalidArgument = 3,
    /// The deadline passed.
    DeadlineExceeded = 4,
    /// The caller may not do this.
    PermissionDenied = 7,
    /// A size or count limit was hit.
    ResourceExhausted = 8,
    /// The system is not in a state for this operation.
    FailedPrecondition = 9,
    /// The operation is not supported.
    Unimplemented = 12,
    /// An invariant is broken.
    Internal = 13,
    /// Transient: retry.
    Unavailable = 14,
    /// Data was lost or corrupted.
    DataLoss = 15,
    /// The caller presented no valid credential.
    Unauthenticated = 16,
}

/// A gRPC status: a code and a human-readable message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Status {
    /// The status code.
    pub code: Code,
    /// The message, sent as `grpc-message`.
    pub message: String,
}

impl Status {
    /// A status with `code` and `message`.
    pub fn new(code: Code, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
        }
    }

    /// Writes `grpc-status` and `grpc-message` into `headers`.
    pub fn write_to(&self, headers: &mut HeaderMap) {
        headers.insert("grpc-status", HeaderValue::from(self.code as u8 as u16));
        let encoded = percent_encode_message(&self.message);
        if let Ok(value) = HeaderValue::from_maybe_shared(Bytes::from(encoded)) {
            headers.insert("grpc-message", value);
        }
    }

    /// A trailers-only response carrying this status (HTTP 200, `application/grpc`, no body).
    pub fn into_response(self) -> Response<GatewayBody> {
        let mut response = Response::new(GatewayBody::empty());
        let headers = response.headers_mut();
        headers.insert(
            http::header::CONTENT_TYPE,
            HeaderValue::from_static("application/grpc"),
        );
        self.write_to(headers);
        response
    }
}

impl std::fmt::Display for Status {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:?}: {}", self.code, self.message)
    }
}

/// Percent-encodes a `grpc-message` value as the gRPC HTTP/2 spec requires: every byte outside
/// printable ASCII, and `%` itself, becomes `%XX`.
fn percent_encode_message(message: &str) -> String {
    let mut out = String::with_capacity(message.len());
    for &b in message.as_bytes() {
        if (0x20..=0x7e).contains(&b) && b != b'%' {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn message_is_percent_encoded() {
        assert_eq!(
            percent_encode_message("a 100% ✓\n"),
            "a 100%25 %E2%9C%93%0A"
        );
    }

    #[test]
    fn trailers_only_response_has_status_headers() {
        let response = Status::new(Code::Unavailable, "upstream down").into_response();
        assert_eq!(response.headers()["grpc-status"], "14");
        assert_eq!(response.headers()["grpc-message"], "upstream down");
        assert_eq!(response.headers()["content-type"], "application/grpc");
    }
}
