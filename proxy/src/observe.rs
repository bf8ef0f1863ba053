//! The outermost layer: a request id and a `tracing` span per RPC, and the RPC metrics (count
//! by method and status, latency until the response body ends).

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use http::{HeaderMap, HeaderValue, Request, Response};
use http_body::{Body, Frame};
use tower::{Layer, Service};
use tracing::Instrument;

use crate::grpc::{BoxError, GatewayBody};
use crate::metrics::{MethodMetrics, code_name};

/// Header carrying the request id, taken from the client when present, else generated.
pub const REQUEST_ID: &str = "x-request-id";

/// Adds [`ObserveService`] in front of a service.
#[derive(Debug, Clone, Default)]
pub struct ObserveLayer;

impl<S> Layer<S> for ObserveLayer {
    type Service = ObserveService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        ObserveService { inner }
    }
}

/// Traces and measures every RPC.
#[derive(Debug, Clone)]
pub struct ObserveService<S> {
    inner: S,
}

impl<S> Service<Request<GatewayBody>> for ObserveService<S>
where
    S: Service<Request<GatewayBody>, Response = Response<GatewayBody>, Error = Infallible>,
    S::Future: Send + 'static,
{
    type Response = Response<GatewayBody>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Response<GatewayBody>, Infallible>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: Request<GatewayBody>) -> Self::Future {
        let started = Instant::now();
        let method = crate::metrics::method_metrics(request.uri().path());
        let request_id = match request
            .headers()
            .get(REQUEST_ID)
            .and_then(|v| v.to_str().ok())
        {
            Some(id) => id.to_owned(),
            None => {
                let id = new_request_id();
                if let Ok(value) = HeaderValue::from_str(&id) {
                    request.headers_mut().insert(REQUEST_ID, value);
                }
                id
            }
        };
        let span = tracing::info_span!("rpc", method = method.label(), %request_id);
        let future = self.inner.call(request);
        Box::pin(
            async move {
                // Recorded as CANCELLED if the client goes away before the RPC ends.
                let record = Record {
                    method,
                    started,
                    span: tracing::Span::current(),
                    recorded: false,
                };
                let Ok(response) = future.await;
                let (parts, body) = response.into_parts();
                let body = if let Some(code) = status_of(&parts.headers) {
                    // Trailers-only: the RPC is over.
                    record.finish(Some(code));
                    body
                } else {
                    GatewayBody::new(ObservedBody {
                        inner: body,
                        record: Some(record),
                    })
                };
                Ok(Response::from_parts(parts, body))
            }
            .instrument(span),
        )
    }
}

/// What is recorded when an RPC ends; dropped unrecorded, the RPC counts as `CANCELLED`.
struct Record {
    method: Arc<MethodMetrics>,
    started: Instant,
    span: tracing::Span,
    recorded: bool,
}

impl Drop for Record {
    fn drop(&mut self) {
        if !self.recorded {
            self.record(Some(1));
        }
    }
}

impl Record {
    fn finish(mut self, code: Option<u32>) {
        self.record(code);
    }

    fn record(&mut self, code: Option<u32>) {
        self.recorded = true;
        let elapsed = self.started.elapsed();
        self.method.record(code, elapsed);
        let code = code_name(code);
        self.span.in_scope(|| {
            tracing::debug!(
                code,
                elapsed_us = elapsed.as_micros() as u64,
                "rpc finished"
            );
        });
    }
}

/// A response body that records the RPC when its trailers (or its end) arrive.
struct ObservedBody {
    inner: GatewayBody,
    record: Option<Record>,
}

impl Body for ObservedBody {
    type Data = bytes::Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(trailers) = frame.trailers_ref()
                    && let Some(record) = self.record.take()
                {
                    record.finish(status_of(trailers));
                }
            }
            Poll::Ready(None) | Poll::Ready(Some(Err(_))) => {
                if let Some(record) = self.record.take() {
                    record.finish(None);
                }
            }
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

fn status_of(headers: &HeaderMap) -> Option<u32> {
    headers
        .get("grpc-status")?
        .to_str()
        .ok()?
        .trim()
        .parse()
        .ok()
}

/// A request id unique within this process and unlikely to repeat across restarts.
fn new_request_id() -> String {
    static SEQ: AtomicU64 = AtomicU64::new(0);
    static BOOT: std::sync::LazyLock<u64> = std::sync::LazyLock::new(|| {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_micros() as u64)
            .unwrap_or_default()
            ^ u64::from(std::process::id()) << 40
    });
    format!("{:x}-{:x}", *BOOT, SEQ.fetch_add(1, Ordering::Relaxed))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn method_names_are_shortened() {
        assert_eq!(
            crate::metrics::short_method(
                "/temporal.api.workflowservice.v1.WorkflowService/StartWorkflowExecution"
            ),
            "WorkflowService/StartWorkflowExecution"
        );
        assert_eq!(crate::metrics::short_method("/made.up.Svc/M"), "Svc/M");
        assert_eq!(crate::metrics::short_method("/odd"), "odd");
    }

    #[test]
    fn request_ids_differ() {
        assert_ne!(new_request_id(), new_request_id());
    }
}
