//! Upstream answers that are not gRPC: a TLS-terminating front (a load balancer, nginx, an
//! ingress) refuses a request with an HTTP error page, e.g. `400 No required SSL certificate
//! was sent` when the gateway presents no client certificate. Passed through, such a page
//! reaches the SDK as an undecodable gRPC frame ("invalid compression flag"); instead the
//! gateway answers with a status that names the HTTP status and the page's reason.

use std::time::Duration;

use http::{Response, StatusCode, header};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::http::uri::Authority;

use crate::grpc::{Code, Status};

/// At most this much of an error page is read to find its reason.
const MAX_PAGE_BYTES: usize = 4 * 1024;
/// At most this long is spent reading it.
const READ_TIMEOUT: Duration = Duration::from_secs(2);
/// At most this many characters of the reason are quoted.
const MAX_REASON_CHARS: usize = 160;

/// Whether `response` is a gRPC answer: HTTP 200 with an `application/grpc` content type.
pub fn is_grpc<B>(response: &Response<B>) -> bool {
    response.status() == StatusCode::OK
        && response
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|ct| ct.starts_with("application/grpc"))
}

/// `response` unchanged when it is gRPC; otherwise the status to answer instead, naming the
/// upstream, the HTTP status, the content type and the reason the page gives (its `<title>`
/// or first line, printable ASCII only, bounded).
pub async fn check(
    response: Response<Incoming>,
    authority: &Authority,
) -> Result<Response<Incoming>, Status> {
    if is_grpc(&response) {
        return Ok(response);
    }
    let status = response.status();
    let content_type = response
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("no content type")
        .to_owned();
    let page = read_page(response.into_body()).await;
    let reason = reason_of(&page);
    let mut message = format!(
        "upstream {authority} answered HTTP {status} ({content_type}), not gRPC: a proxy or \
         TLS front refused the request"
    );
    if !reason.is_empty() {
        message.push_str(&format!(": {reason:?}"));
    }
    Err(Status::new(code_for(status), message))
}

/// The gRPC code for an HTTP status a client gets instead of gRPC (after gRPC's mapping of
/// HTTP statuses: 429, 502, 503 and 504 are worth a retry; 401 and 403 are refusals).
pub fn code_for(status: StatusCode) -> Code {
    match status.as_u16() {
        401 | 403 => Code::PermissionDenied,
        404 => Code::Unimplemented,
        429 | 502 | 503 | 504 => Code::Unavailable,
        _ => Code::Internal,
    }
}

async fn read_page(body: Incoming) -> Vec<u8> {
    let mut page = Vec::new();
    let read = async {
        let mut body = std::pin::pin!(body);
        while page.len() < MAX_PAGE_BYTES {
            match body.frame().await {
                Some(Ok(frame)) => {
                    if let Ok(data) = frame.into_data() {
                        let room = MAX_PAGE_BYTES - page.len();
                        page.extend_from_slice(&data[..data.len().min(room)]);
                    }
                }
                _ => break,
            }
        }
    };
    let _ = tokio::time::timeout(READ_TIMEOUT, read).await;
    page
}

/// The `<title>` of an HTML page, else its first non-empty line; printable ASCII only.
pub fn reason_of(page: &[u8]) -> String {
    let text = String::from_utf8_lossy(page);
    let lower = text.to_ascii_lowercase();
    let found = match (lower.find("<title>"), lower.find("</title>")) {
        (Some(start), Some(end)) if start + 7 <= end => &text[start + 7..end],
        _ => text
            .lines()
            .map(str::trim)
            .find(|l| !l.is_empty())
            .unwrap_or(""),
    };
    found
        .chars()
        .filter(|c| c.is_ascii_graphic() || *c == ' ')
        .take(MAX_REASON_CHARS)
        .collect::<String>()
        .trim()
        .to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reasons_come_from_the_title_or_the_first_line() {
        let nginx = b"<html>\r\n<head><title>400 No required SSL certificate was sent</title></head>\r\n<body>...";
        assert_eq!(reason_of(nginx), "400 No required SSL certificate was sent");
        assert_eq!(
            reason_of(b"\n\n upstream connect error \x1b[31m\nmore"),
            "upstream connect error [31m"
        );
        assert_eq!(reason_of(b""), "");
        assert_eq!(reason_of(&[b'a'; 1000]).len(), MAX_REASON_CHARS);
    }

    #[test]
    fn only_200_application_grpc_is_grpc() {
        let answer = |status: u16, ct: Option<&str>| {
            let mut b = Response::builder().status(status);
            if let Some(ct) = ct {
                b = b.header(header::CONTENT_TYPE, ct);
            }
            b.body(()).unwrap()
        };
        assert!(is_grpc(&answer(200, Some("application/grpc"))));
        assert!(is_grpc(&answer(200, Some("application/grpc+proto"))));
        assert!(!is_grpc(&answer(200, Some("text/html"))));
        assert!(!is_grpc(&answer(200, None)));
        assert!(!is_grpc(&answer(400, Some("application/grpc"))));
        assert_eq!(code_for(StatusCode::BAD_REQUEST), Code::Internal);
        assert_eq!(code_for(StatusCode::FORBIDDEN), Code::PermissionDenied);
        assert_eq!(code_for(StatusCode::BAD_GATEWAY), Code::Unavailable);
    }
}
