//! One tower layer shape for the gateway's request layers: each is a [`Handler`], an async
//! function of the request and the inner service, and [`HandlerLayer`] makes it a
//! `tower::Layer` (the `poll_ready`/`call` plumbing written once).

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use http::{Request, Response};
use tower::{Layer, Service, ServiceExt};

use super::GatewayBody;

/// The service behind a layer: every layer of the gateway's stack wraps one of these.
pub trait Inner:
    Service<
        Request<GatewayBody>,
        Response = Response<GatewayBody>,
        Error = Infallible,
        Future: Send + 'static,
    > + Send
    + 'static
{
}

impl<S> Inner for S where
    S: Service<
            Request<GatewayBody>,
            Response = Response<GatewayBody>,
            Error = Infallible,
            Future: Send + 'static,
        > + Send
        + 'static
{
}

/// Sends `request` on to `inner` and returns its response.
pub async fn forward<S: Inner>(inner: S, request: Request<GatewayBody>) -> Response<GatewayBody> {
    inner
        .oneshot(request)
        .await
        .unwrap_or_else(|never| match never {})
}

/// A request layer's logic: answers `request`, calling `inner` (at most once) to go on.
pub trait Handler: Clone + Send + Sync + 'static {
    /// Handles one request.
    fn handle<S: Inner>(
        self,
        inner: S,
        request: Request<GatewayBody>,
    ) -> impl Future<Output = Response<GatewayBody>> + Send;
}

/// A [`Handler`] as a tower layer.
#[derive(Debug, Clone)]
pub struct HandlerLayer<H>(pub H);

impl<S, H: Clone> Layer<S> for HandlerLayer<H> {
    type Service = HandlerService<S, H>;

    fn layer(&self, inner: S) -> Self::Service {
        HandlerService {
            inner,
            handler: self.0.clone(),
        }
    }
}

/// The service a [`HandlerLayer`] produces.
#[derive(Debug, Clone)]
pub struct HandlerService<S, H> {
    inner: S,
    handler: H,
}

impl<S, H> Service<Request<GatewayBody>> for HandlerService<S, H>
where
    H: Handler,
    S: Inner + Clone,
{
    type Response = Response<GatewayBody>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Response<GatewayBody>, Infallible>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<GatewayBody>) -> Self::Future {
        // The clone serves this call; the ready one stays for the next (tower's usual swap).
        let clone = self.inner.clone();
        let inner = std::mem::replace(&mut self.inner, clone);
        let handler = self.handler.clone();
        Box::pin(async move { Ok(handler.handle(inner, request).await) })
    }
}
