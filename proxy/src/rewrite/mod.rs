//! The payload rewrite layer: a tower layer that walks every message of a known Temporal method
//! and runs the payload [`pipeline`] over it, requests on the way out and responses (including
//! the `grpc-status-details-bin` trailer) on the way back.
//!
//! Methods the descriptors don't know, and methods whose messages cannot hold payloads, stream
//! through untouched. Known methods are unary, so their messages are buffered whole: a message
//! is either fully rewritten or not sent at all.

pub mod capture;
pub mod message;
pub mod pipeline;

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use base64::Engine;
use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Request, Response};
use payload_gateway_proto::{MessageType, method, top_level_string};
use tower::{Layer, Service, ServiceExt};

use crate::grpc::body::{self, TooLarge};
use crate::grpc::frame::{self, Encoding};
use crate::grpc::{Code, GatewayBody, Status};
use capture::Capture;
pub use pipeline::{CallContext, Direction, Pipeline};

/// Trailer (or trailers-only header) carrying a `google.rpc.Status` with details.
const STATUS_DETAILS: &str = "grpc-status-details-bin";

/// Binary metadata is base64; peers differ on padding, so accept both and send none.
const STATUS_DETAILS_BASE64: base64::engine::GeneralPurpose = base64::engine::GeneralPurpose::new(
    &base64::alphabet::STANDARD,
    base64::engine::GeneralPurposeConfig::new()
        .with_encode_padding(false)
        .with_decode_padding_mode(base64::engine::DecodePaddingMode::Indifferent),
);

/// Adds payload rewriting in front of a service.
#[derive(Debug, Clone)]
pub struct RewriteLayer {
    pipeline: Pipeline,
    max_message_bytes: usize,
    capture: Option<Arc<Capture>>,
}

impl RewriteLayer {
    /// Rewrites with `pipeline`, refusing messages over `max_message_bytes`.
    pub fn new(pipeline: Pipeline, max_message_bytes: usize) -> Self {
        Self {
            pipeline,
            max_message_bytes,
            capture: Capture::from_env().map(Arc::new),
        }
    }
}

impl RewriteLayer {
    /// The payload stages this layer runs.
    pub fn pipeline(&self) -> &Pipeline {
        &self.pipeline
    }
}

impl<S> Layer<S> for RewriteLayer {
    type Service = RewriteService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        RewriteService {
            inner,
            layer: self.clone(),
        }
    }
}

/// The service [`RewriteLayer`] produces.
#[derive(Debug, Clone)]
pub struct RewriteService<S> {
    inner: S,
    layer: RewriteLayer,
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

impl<S> Service<Request<GatewayBody>> for RewriteService<S>
where
    S: Service<Request<GatewayBody>, Response = Response<GatewayBody>, Error = Infallible>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
{
    type Response = Response<GatewayBody>;
    type Error = Infallible;
    type Future = BoxFuture<Result<Response<GatewayBody>, Infallible>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<GatewayBody>) -> Self::Future {
        let inner = self.inner.clone();
        let layer = self.layer.clone();
        let known = method(request.uri().path())
            .filter(|m| m.request.can_hold_payloads() || m.response.can_hold_payloads());
        match known {
            None => Box::pin(inner.oneshot(request)),
            Some(m) => Box::pin(async move {
                Ok(layer
                    .round_trip(inner, request, m.request, m.response)
                    .await
                    .unwrap_or_else(Status::into_response))
            }),
        }
    }
}

impl RewriteLayer {
    /// Rewrites the request, forwards it, rewrites the response.
    async fn round_trip<S>(
        &self,
        inner: S,
        request: Request<GatewayBody>,
        request_type: MessageType,
        response_type: MessageType,
    ) -> Result<Response<GatewayBody>, Status>
    where
        S: Service<Request<GatewayBody>, Response = Response<GatewayBody>, Error = Infallible>,
    {
        let (mut parts, body) = request.into_parts();
        let encoding = encoding_of(&parts.headers)
            .map_err(|e| Status::new(Code::Unimplemented, e.to_string()))?;
        let messages = self
            .read_messages(body, encoding, Code::InvalidArgument)
            .await?
            .0;
        let ctx = CallContext::new(
            parts.uri.path(),
            messages
                .first()
                .and_then(|m| top_level_string(request_type, m, "namespace"))
                .map(str::to_owned)
                .or_else(|| header_str(&parts.headers, "temporal-namespace").map(str::to_owned)),
        )
        .with_request(request_type, messages.first());
        let messages = if self.pipeline.applies(Direction::Encode, &ctx) {
            self.rewrite_all(Direction::Encode, &ctx, request_type, messages)
                .await?
        } else {
            messages
        };
        parts.headers.remove(http::header::CONTENT_LENGTH);
        let request =
            Request::from_parts(parts, GatewayBody::buffered(frame::encode(messages), None));

        let response = inner
            .oneshot(request)
            .await
            .unwrap_or_else(|never| match never {});
        self.rewrite_response(&ctx, response_type, response).await
    }

    async fn rewrite_response(
        &self,
        ctx: &CallContext,
        response_type: MessageType,
        response: Response<GatewayBody>,
    ) -> Result<Response<GatewayBody>, Status> {
        let (mut parts, body) = response.into_parts();
        // Trailers-only: the status (and its details) travel in the headers.
        if parts.headers.contains_key("grpc-status") {
            self.rewrite_status_details(ctx, &mut parts.headers).await?;
            return Ok(Response::from_parts(parts, body));
        }
        let encoding =
            encoding_of(&parts.headers).map_err(|e| Status::new(Code::Internal, e.to_string()))?;
        let (messages, trailers) = self.read_messages(body, encoding, Code::Internal).await?;
        let messages = self
            .rewrite_all(Direction::Decode, ctx, response_type, messages)
            .await?;
        let trailers = match trailers {
            Some(mut trailers) => {
                self.rewrite_status_details(ctx, &mut trailers).await?;
                Some(trailers)
            }
            None => None,
        };
        parts.headers.remove(http::header::CONTENT_LENGTH);
        Ok(Response::from_parts(
            parts,
            GatewayBody::buffered(frame::encode(messages), trailers),
        ))
    }

    async fn rewrite_all(
        &self,
        direction: Direction,
        ctx: &CallContext,
        ty: MessageType,
        messages: Vec<Bytes>,
    ) -> Result<Vec<Bytes>, Status> {
        let mut out = Vec::with_capacity(messages.len());
        for m in messages {
            out.push(self.rewrite_one(direction, ctx, ty, m).await?);
        }
        Ok(out)
    }

    async fn rewrite_one(
        &self,
        direction: Direction,
        ctx: &CallContext,
        ty: MessageType,
        message: Bytes,
    ) -> Result<Bytes, Status> {
        if let Some(capture) = &self.capture {
            capture.record(ty, &message);
        }
        message::rewrite(&self.pipeline, direction, ctx, ty, message).await
    }

    /// Reads a whole body and splits it into inflated messages. `code` is the status for a
    /// malformed body: `INVALID_ARGUMENT` from a client, `INTERNAL` from the upstream.
    async fn read_messages(
        &self,
        body: GatewayBody,
        encoding: Encoding,
        code: Code,
    ) -> Result<(Vec<Bytes>, Option<HeaderMap>), Status> {
        // The body limit allows for framing around a maximal message.
        let limit = self.max_message_bytes.saturating_add(frame::PREFIX_LEN);
        let collected = body::collect(body, limit).await.map_err(|e| {
            if e.is::<TooLarge>() {
                Status::new(Code::ResourceExhausted, e.to_string())
            } else {
                Status::new(
                    Code::Unavailable,
                    format!("connection lost while reading the message: {e}"),
                )
            }
        })?;
        let joined = frame::join(collected.chunks, collected.len);
        let messages = frame::split(&joined, encoding, self.max_message_bytes).map_err(|e| {
            let code = match e {
                frame::FrameError::TooLarge { .. } => Code::ResourceExhausted,
                _ => code,
            };
            Status::new(code, e.to_string())
        })?;
        Ok((messages, collected.trailers))
    }

    /// Decodes payloads inside the `google.rpc.Status` of `grpc-status-details-bin`.
    async fn rewrite_status_details(
        &self,
        ctx: &CallContext,
        headers: &mut HeaderMap,
    ) -> Result<(), Status> {
        let Some(value) = headers.get(STATUS_DETAILS) else {
            return Ok(());
        };
        let Some(ty) = MessageType::by_name("google.rpc.Status") else {
            return Ok(());
        };
        let raw = STATUS_DETAILS_BASE64
            .decode(value.as_bytes())
            .map_err(|e| Status::new(Code::Internal, format!("malformed {STATUS_DETAILS}: {e}")))?;
        let rewritten = self
            .rewrite_one(Direction::Decode, ctx, ty, Bytes::from(raw))
            .await?;
        let encoded = STATUS_DETAILS_BASE64.encode(&rewritten);
        headers.insert(
            STATUS_DETAILS,
            HeaderValue::from_str(&encoded)
                .map_err(|e| Status::new(Code::Internal, e.to_string()))?,
        );
        Ok(())
    }
}

fn header_str<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers.get(name).and_then(|v| v.to_str().ok())
}

fn encoding_of(headers: &HeaderMap) -> Result<Encoding, frame::FrameError> {
    Encoding::from_header(header_str(headers, "grpc-encoding"))
}
