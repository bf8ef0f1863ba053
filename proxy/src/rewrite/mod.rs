//! The payload rewrite layer: a tower layer that walks every message of a known Temporal method
//! and runs the payload [`pipeline`] over it, requests on the way out and responses (including
//! the `grpc-status-details-bin` trailer) on the way back.
//!
//! The request side works on the messages the ingress ([`crate::ingress`]) read, inflated and
//! decided on; nothing here reads a request body. Methods of other services, and methods whose
//! messages cannot hold payloads, go upstream as the ingress re-framed them. Known methods are
//! unary, so their messages are whole: a message is either fully rewritten or not sent at all.

pub mod capture;
pub mod fit;
pub mod message;
pub mod pipeline;

use std::sync::Arc;

use base64::Engine;
use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Request, Response};
use payload_gateway_proto::{MessageType, Method};

use crate::budget::{Exhausted, MessageBudget, ProcessBudget};
use crate::grpc::body::{self, TooLarge};
use crate::grpc::frame::{self, Encoding};
use crate::grpc::layer::{Handler, Inner, forward};
use crate::grpc::{Code, GatewayBody, Status};
use crate::ingress::Inspected;
use crate::metrics::metrics;
use crate::search_attributes::SearchAttributeGuard;
use crate::server_limits::{self, Limits, NamespaceAnswer, Promise, ServerLimits};
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

/// Payload rewriting in front of a service: a [`Handler`] (stack it with
/// [`crate::grpc::layer::HandlerLayer`]).
#[derive(Debug, Clone)]
pub struct RewriteLayer {
    pipeline: Pipeline,
    max_message_bytes: usize,
    process_budget: Arc<ProcessBudget>,
    capture: Option<Arc<Capture>>,
    /// The server's limits, for namespaces that offload (see [`crate::server_limits`]).
    server_limits: Option<Arc<ServerLimits>>,
    /// Protected search attributes (`crate::search_attributes`), when configured.
    search: Option<Arc<SearchAttributeGuard>>,
}

impl RewriteLayer {
    /// Rewrites with `pipeline`, refusing messages over `max_message_bytes` (on the wire and
    /// inflated) and holding what RPCs in flight allocate against `process_budget`.
    pub fn new(
        pipeline: Pipeline,
        max_message_bytes: usize,
        process_budget: Arc<ProcessBudget>,
    ) -> Self {
        Self {
            pipeline,
            max_message_bytes,
            process_budget,
            capture: Capture::from_env().map(Arc::new),
            server_limits: None,
            search: None,
        }
    }

    /// Keeps the server's `limits` for namespaces that offload: advertised to SDKs in
    /// namespace answers and made to fit by every message forwarded.
    pub fn with_server_limits(mut self, limits: Arc<ServerLimits>) -> Self {
        self.server_limits = Some(limits);
        self
    }

    /// Also protects the search attributes `guard` names (writes, queries, reads).
    pub fn with_search_attributes(mut self, guard: Option<Arc<SearchAttributeGuard>>) -> Self {
        self.search = guard;
        self
    }

    /// A fresh budget for one message.
    fn message_budget(&self) -> MessageBudget {
        MessageBudget::new(self.process_budget.clone(), self.max_message_bytes)
    }
}

impl RewriteLayer {
    /// The payload stages this layer runs.
    pub fn pipeline(&self) -> &Pipeline {
        &self.pipeline
    }
}

impl Handler for RewriteLayer {
    async fn handle<S: Inner>(
        self,
        inner: S,
        mut request: Request<GatewayBody>,
    ) -> Response<GatewayBody> {
        // The ingress in front decided method, messages and namespace; without it the layer
        // cannot know what it would forward, so it refuses.
        // Taken out of the request: the rewrite owns the decision (and its budget) from here.
        let Some(mut inspected) = request.extensions_mut().remove::<Inspected>() else {
            return Status::new(
                Code::Internal,
                "gateway misconfigured: the payload rewrite ran without the ingress",
            )
            .into_response();
        };
        let (Some(m), Some(messages)) = (inspected.method, inspected.messages.take()) else {
            if let Some(refusal) = self.refuse_unknown_method(&request) {
                return refusal.into_response();
            }
            return forward(inner, request).await;
        };
        if let (Some(answer), Some(limits)) = (
            NamespaceAnswer::of_method(m.path),
            self.server_limits.clone(),
        ) {
            return self
                .namespace_round_trip(inner, request, answer, &limits)
                .await
                .unwrap_or_else(Status::into_response);
        }
        let search = self.search.as_ref().is_some_and(|s| s.applies(&m));
        if !(m.request.can_hold_payloads() || m.response.can_hold_payloads() || search) {
            return forward(inner, request).await;
        }
        self.round_trip(inner, request, m, messages, inspected)
            .await
            .unwrap_or_else(Status::into_response)
    }
}

impl RewriteLayer {
    /// A method of a Temporal service that the descriptors do not know may carry payloads
    /// the walker cannot see: where encryption applies it is refused unless the namespace's
    /// policy lists it (`forward_unknown_methods`). Methods of other services (health checks,
    /// reflection) and namespaces without encryption pass. The namespace is the
    /// `temporal-namespace` header, else the default policy.
    fn refuse_unknown_method(&self, request: &Request<GatewayBody>) -> Option<Status> {
        let path = request.uri().path();
        if !path.starts_with("/temporal.") {
            return None;
        }
        let namespace = header_str(request.headers(), "temporal-namespace");
        let codec = self.pipeline.codec();
        if codec.forwards_unknown_method(namespace, path) {
            if codec.encrypts(namespace) {
                tracing::warn!(method = %path, namespace = namespace.unwrap_or("-"), "unknown method forwarded untouched by policy (forward_unknown_methods)");
                metrics().count_policy("forwarded_unknown_method");
            }
            return None;
        }
        tracing::warn!(method = %path, namespace = namespace.unwrap_or("-"), "unknown method refused: encryption applies and the gateway cannot see its payloads");
        metrics().count_policy("refused_unknown_method");
        Some(Status::new(
            Code::Unimplemented,
            format!(
                "method {path} is unknown to the gateway, which cannot see whether it carries \
                 payloads; refused because encryption applies (list it in \
                 encryption.forward_unknown_methods or namespaces.<ns>.forward_unknown_methods \
                 to forward it untouched)"
            ),
        ))
    }

    /// Rewrites the request's inspected `messages`, forwards them, rewrites the response.
    async fn round_trip<S: Inner>(
        &self,
        inner: S,
        request: Request<GatewayBody>,
        m: Method,
        messages: Vec<Bytes>,
        inspected: Inspected,
    ) -> Result<Response<GatewayBody>, Status> {
        let (request_type, response_type) = (m.request, m.response);
        // The body the ingress re-framed is these same messages: it is replaced, not read.
        let (parts, _same_messages) = request.into_parts();
        // The namespace the server will act on, as the ingress decided it. A request type
        // without one (OperatorService Nexus endpoints, ...) follows the default policy: a
        // client-chosen header never picks the policy.
        let ctx = CallContext::new(m.path, inspected.namespace)
            .with_request(request_type, messages.first())
            .with_budget(inspected.budget);
        let messages = match &self.search {
            Some(search) => search.on_request(&m, ctx.namespace.as_deref(), messages)?,
            None => messages,
        };
        let messages = if self.pipeline.applies(Direction::Encode, &ctx) {
            let limits = self.limits_to_fit(ctx.namespace.as_deref()).await;
            self.rewrite_all(Direction::Encode, &ctx, request_type, messages, limits)
                .await?
        } else {
            messages.into_iter().map(|m| vec![m]).collect()
        };
        let request =
            Request::from_parts(parts, GatewayBody::buffered(encode_frames(messages)?, None));

        let response = forward(inner, request).await;
        // The response gets a budget of its own; the request's is released with `ctx`.
        let ctx = ctx.with_budget(self.message_budget());
        self.rewrite_response(&ctx, response_type, response, !m.server_streaming)
            .await
    }

    async fn rewrite_response(
        &self,
        ctx: &CallContext,
        response_type: MessageType,
        response: Response<GatewayBody>,
        unary: bool,
    ) -> Result<Response<GatewayBody>, Status> {
        let (mut parts, body) = response.into_parts();
        // Trailers-only: the status (and its details) travel in the headers.
        if parts.headers.contains_key("grpc-status") {
            self.rewrite_status_details(ctx, &mut parts.headers).await?;
            return Ok(Response::from_parts(parts, body));
        }
        let encoding =
            encoding_of(&parts.headers).map_err(|e| Status::new(Code::Internal, e.to_string()))?;
        let (messages, trailers) = self
            .read_messages(body, encoding, Code::Internal, unary, &ctx.budget)
            .await?;
        let messages = self
            .rewrite_all(Direction::Decode, ctx, response_type, messages, None)
            .await?;
        let messages = match &self.search {
            // Tokens are opened in whole messages: the pieces are joined first.
            Some(search) => {
                let whole = messages
                    .into_iter()
                    .map(|pieces| {
                        let len = pieces.iter().map(Bytes::len).sum();
                        frame::join(pieces, len)
                    })
                    .collect();
                search
                    .on_response(response_type, ctx.namespace.as_deref(), whole)?
                    .into_iter()
                    .map(|m| vec![m])
                    .collect()
            }
            None => messages,
        };
        let trailers = match trailers {
            Some(mut trailers) => {
                self.rewrite_status_details(ctx, &mut trailers).await?;
                Some(trailers)
            }
            None => None,
        };
        // Taken before the response's message budget (input and inflations) is released
        // with `ctx`.
        framed_response(parts, messages, trailers, &ctx.budget)
    }

    async fn rewrite_all(
        &self,
        direction: Direction,
        ctx: &CallContext,
        ty: MessageType,
        messages: Vec<Bytes>,
        limits: Option<Limits>,
    ) -> Result<Vec<Vec<Bytes>>, Status> {
        let mut out = Vec::with_capacity(messages.len());
        for m in messages {
            if let Some(capture) = &self.capture {
                capture.record(ty, &m);
            }
            out.push(
                message::rewrite_pieces(&self.pipeline, direction, ctx, ty, m, limits.as_ref())
                    .await?,
            );
        }
        Ok(out)
    }

    async fn rewrite_one(
        &self,
        direction: Direction,
        ctx: &CallContext,
        ty: MessageType,
        message: Bytes,
        limits: Option<&Limits>,
    ) -> Result<Bytes, Status> {
        if let Some(capture) = &self.capture {
            capture.record(ty, &message);
        }
        message::rewrite(&self.pipeline, direction, ctx, ty, message, limits).await
    }

    /// The server's limits a request for `namespace` must be made to fit: `None` where the
    /// namespace does not offload (nothing could be done) or fitting is off.
    async fn limits_to_fit(&self, namespace: Option<&str>) -> Option<Limits> {
        let limits = self.server_limits.as_ref()?;
        if !limits.config().fit_messages {
            return None;
        }
        let storage = self.pipeline.storage()?;
        storage.threshold(namespace)?;
        Some(limits.of(namespace?).await)
    }

    /// What the gateway promises SDKs for `namespace`: `None` where it does not offload
    /// (the server's figures stand) or advertising is off.
    fn promise(&self, limits: &ServerLimits, namespace: &str) -> Option<Promise> {
        if !limits.config().advertise {
            return None;
        }
        let max = self.pipeline.storage()?.max_offload_size(Some(namespace))?;
        Some(Promise::new(max, self.max_message_bytes))
    }

    /// A namespace answer (`DescribeNamespace`, ...): forwarded as it is, the server's limits
    /// learned from the answer, and the answer's limits replaced by what the gateway keeps for
    /// namespaces that offload.
    async fn namespace_round_trip<S: Inner>(
        &self,
        inner: S,
        request: Request<GatewayBody>,
        answer: NamespaceAnswer,
        limits: &ServerLimits,
    ) -> Result<Response<GatewayBody>, Status> {
        let response = forward(inner, request).await;
        let (parts, body) = response.into_parts();
        if parts.headers.contains_key("grpc-status") {
            return Ok(Response::from_parts(parts, body));
        }
        let encoding =
            encoding_of(&parts.headers).map_err(|e| Status::new(Code::Internal, e.to_string()))?;
        let budget = self.message_budget();
        let (messages, trailers) = self
            .read_messages(body, encoding, Code::Internal, true, &budget)
            .await?;
        let mut out = Vec::with_capacity(messages.len());
        for message in messages {
            limits.learn(answer, &message);
            let edited =
                server_limits::advertised_bytes(answer, &message, |ns| self.promise(limits, ns))
                    .map_err(|e| Status::new(Code::Internal, e.to_string()))?;
            out.push(vec![edited]);
        }
        framed_response(parts, out, trailers, &budget)
    }

    /// Reads a whole body and splits it into inflated messages. `code` is the status for a
    /// malformed body: `INVALID_ARGUMENT` from a client, `INTERNAL` from the upstream.
    async fn read_messages(
        &self,
        body: GatewayBody,
        encoding: Encoding,
        code: Code,
        unary: bool,
        budget: &MessageBudget,
    ) -> Result<(Vec<Bytes>, Option<HeaderMap>), Status> {
        // The body limit allows for framing around a maximal message.
        let limit = self.max_message_bytes.saturating_add(frame::PREFIX_LEN);
        let collected = body::collect(body, limit, budget).await.map_err(|e| {
            if e.is::<TooLarge>() || e.is::<Exhausted>() {
                Status::new(Code::ResourceExhausted, e.to_string())
            } else {
                Status::new(
                    Code::Unavailable,
                    format!("connection lost while reading the message: {e}"),
                )
            }
        })?;
        let joined = frame::join(collected.chunks, collected.len);
        let messages = frame::split(&joined, encoding, self.max_message_bytes, unary, budget)
            .map_err(|e| {
                let code = match e {
                    frame::FrameError::TooLarge { .. } | frame::FrameError::Budget(_) => {
                        Code::ResourceExhausted
                    }
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
            .rewrite_one(Direction::Decode, ctx, ty, Bytes::from(raw), None)
            .await?;
        message::restore_grpc_message(headers, &rewritten);
        let encoded = STATUS_DETAILS_BASE64.encode(&rewritten);
        headers.insert(
            STATUS_DETAILS,
            HeaderValue::from_str(&encoded)
                .map_err(|e| Status::new(Code::Internal, e.to_string()))?,
        );
        Ok(())
    }
}

/// A rewritten response: `messages` framed after `parts`, then `trailers`. The framed bytes
/// stay charged to the process budget behind `budget` until they are handed to the
/// connection, dropped with the stream, or freed by the send timeout: a client that stops
/// reading holds budget, not unaccounted memory.
fn framed_response(
    mut parts: http::response::Parts,
    messages: Vec<Vec<Bytes>>,
    trailers: Option<HeaderMap>,
    budget: &MessageBudget,
) -> Result<Response<GatewayBody>, Status> {
    parts.headers.remove(http::header::CONTENT_LENGTH);
    let frames = encode_frames(messages)?;
    let held = budget
        .process()
        .reserve_allocated(frames.iter().map(Bytes::len).sum());
    Ok(Response::from_parts(
        parts,
        GatewayBody::sending(frames, trailers, held),
    ))
}

/// Frames rewritten messages; a message that no longer fits a length prefix is an error,
/// never a wrapped length.
fn encode_frames(messages: Vec<Vec<Bytes>>) -> Result<Vec<Bytes>, Status> {
    frame::encode_pieces(messages).map_err(|e| Status::new(Code::ResourceExhausted, e.to_string()))
}

fn header_str<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers.get(name).and_then(|v| v.to_str().ok())
}

fn encoding_of(headers: &HeaderMap) -> Result<Encoding, frame::FrameError> {
    Encoding::from_header(header_str(headers, "grpc-encoding"))
}
