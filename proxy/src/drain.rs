//! Ending long polls at shutdown. A poll can wait 60 s and more for a task; holding shutdown
//! for that long would outlast any orchestrator's grace period, and cutting the connection
//! gives the SDK a transport error. Instead, when shutdown begins, every long poll in flight
//! ends at once with `UNAVAILABLE`, which every Temporal SDK retries (through the next
//! gateway); other RPCs run to completion within the shutdown grace period.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use http::{Request, Response};
use tokio::sync::watch;
use tower::{Layer, Service};

use crate::grpc::{Code, GatewayBody, Status};

/// Adds [`DrainService`] in front of a service.
#[derive(Debug, Clone)]
pub struct DrainLayer {
    shutdown: watch::Receiver<bool>,
}

impl DrainLayer {
    /// Ends long polls when `shutdown` turns `true`.
    pub fn new(shutdown: watch::Receiver<bool>) -> Self {
        Self { shutdown }
    }
}

impl<S> Layer<S> for DrainLayer {
    type Service = DrainService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        DrainService {
            inner,
            shutdown: self.shutdown.clone(),
        }
    }
}

/// See the [module docs](self).
#[derive(Debug, Clone)]
pub struct DrainService<S> {
    inner: S,
    shutdown: watch::Receiver<bool>,
}

impl<S> Service<Request<GatewayBody>> for DrainService<S>
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

    fn call(&mut self, request: Request<GatewayBody>) -> Self::Future {
        let long_poll = is_long_poll(request.uri().path());
        let future = self.inner.call(request);
        if !long_poll {
            return Box::pin(future);
        }
        let mut shutdown = self.shutdown.clone();
        Box::pin(async move {
            tokio::select! {
                response = future => response,
                _ = shutdown.wait_for(|stop| *stop) => Ok(Status::new(
                    Code::Unavailable,
                    "payload gateway is shutting down; retry",
                )
                .into_response()),
            }
        })
    }
}

/// Methods that may wait a long time for the server: task polls, update polls and history
/// reads (which may wait for new events).
fn is_long_poll(path: &str) -> bool {
    let method = path.rsplit('/').next().unwrap_or_default();
    method.starts_with("Poll") || method == "GetWorkflowExecutionHistory"
}

#[cfg(test)]
mod tests {
    use super::*;
    use tower::ServiceExt;

    #[test]
    fn long_polls_are_recognised() {
        let ws = "/temporal.api.workflowservice.v1.WorkflowService/";
        for m in [
            "PollWorkflowTaskQueue",
            "PollActivityTaskQueue",
            "PollNexusTaskQueue",
            "PollWorkflowExecutionUpdate",
            "GetWorkflowExecutionHistory",
        ] {
            assert!(is_long_poll(&format!("{ws}{m}")), "{m}");
        }
        for m in [
            "StartWorkflowExecution",
            "RespondWorkflowTaskCompleted",
            "DescribeNamespace",
        ] {
            assert!(!is_long_poll(&format!("{ws}{m}")), "{m}");
        }
    }

    #[tokio::test]
    async fn a_long_poll_ends_with_unavailable_at_shutdown() {
        let (stop, stopped) = watch::channel(false);
        let never = tower::service_fn(|_: Request<GatewayBody>| async {
            std::future::pending::<()>().await;
            Ok::<_, Infallible>(Response::new(GatewayBody::empty()))
        });
        let service = DrainLayer::new(stopped).layer(never);
        let request = Request::post(
            "http://g/temporal.api.workflowservice.v1.WorkflowService/PollActivityTaskQueue",
        )
        .body(GatewayBody::empty())
        .unwrap();
        let call = tokio::spawn(service.oneshot(request));
        tokio::task::yield_now().await;
        stop.send(true).unwrap();
        let response = call.await.unwrap().unwrap();
        assert_eq!(response.headers()["grpc-status"], "14");
    }
}
