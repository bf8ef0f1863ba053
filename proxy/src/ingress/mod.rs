//! The single ingress: every gRPC request is read once, inflated once, and its method and
//! namespace are decided once, before any layer acts on it.
//!
//! # Invariants
//!
//! - **What is checked is what is forwarded.** For every `temporal.*` method the body that goes
//!   upstream is [`frame::encode`] of exactly the messages this layer inspected: uncompressed
//!   (flag 0), with `grpc-encoding` removed. The client's own bytes, compressed or not, never
//!   go upstream, so the server parses the bytes the gateway decided on and nothing else
//!   (no second gzip member, no trailing bytes, no other framing it could read differently).
//! - **Decided once, read everywhere.** The method, the namespace (the request's top-level
//!   `namespace` field, last occurrence wins, occurrences with another wire type skipped, as
//!   Go's protobuf reads it) and the authorization [`Target`] are computed here and handed to
//!   the layers behind as one [`Inspected`] in the request's extensions. Auth, the namespace
//!   policy and the payload rewrite read that value; none of them reads the body again.
//! - **Refused when unreadable.** A `:path` without its leading `/` or with a query, a
//!   `grpc-encoding` the gateway cannot inflate, a malformed or empty compressed frame, bytes
//!   after the last frame, a unary call with other than one message, a request whose top level
//!   is not protobuf or whose namespace is not UTF-8: the RPC fails with a status naming the
//!   problem. Nothing the gateway could not read is forwarded.
//! - **Bounded.** The body is read against `proxy.max_message_bytes` and the process budget
//!   ([`crate::budget`]); inflation is charged as it is produced. The budget travels with the
//!   [`Inspected`] value, so the bytes stay charged until the RPC ends.
//! - **Read as it arrives.** The body's frames are read chunk by chunk ([`reader`]): a
//!   compressed message is inflated from each chunk as it arrives and the chunk freed, so a
//!   large compressed request costs its inflated size (plus one chunk), not the compressed
//!   bytes beside their inflation, and a refusal (a bomb past the limit, a corrupt stream, a
//!   second frame of a unary call) comes as soon as the offending bytes do, before the rest of
//!   the body is read.
//!
//! Methods of other services (gRPC health checks, reflection) carry no namespace and no
//! payloads: their bodies stream through untouched; authorization treats them by path alone.

pub mod reader;
pub mod target;

use std::sync::Arc;

use bytes::Bytes;
use http::{HeaderMap, Request, Response};
use http_body_util::BodyExt;
use payload_gateway_proto::{Method, StringFieldError, method, top_level_string_strict};

use crate::budget::{MessageBudget, ProcessBudget};
use crate::grpc::body::TooLarge;
use crate::grpc::frame::{self, Encoding, FrameError};
use crate::grpc::layer::{Handler, Inner, forward};
use crate::grpc::{Code, GatewayBody, Status};
use reader::FrameReader;
pub use target::{OPEN_METHODS, Target};

/// The prefix of every Temporal service path: these requests are read whole and re-framed.
const TEMPORAL_PREFIX: &str = "/temporal.";

/// What the ingress decided about one request, read by every layer behind it.
#[derive(Debug, Clone)]
pub struct Inspected {
    /// The method, when the descriptors know the path.
    pub method: Option<Method>,
    /// The request messages, inflated, exactly as forwarded upstream; `None` for a method of
    /// another service, whose body streams through untouched.
    pub messages: Option<Vec<Bytes>>,
    /// The request's own `namespace` field, when its type has one (empty when unset): the
    /// namespace whose policy applies. `None`: the request type names no namespace.
    pub namespace: Option<String>,
    /// What the request acts on, for authorization.
    pub target: Target,
    /// Other namespaces the request names inside it that the server may act on: those of
    /// cross-namespace workflow commands (child workflows, external signals and cancels).
    /// An error when the commands cannot be read: authorization refuses the request then;
    /// without authorization nothing depends on them (the server refuses what it cannot
    /// parse).
    pub nested_namespaces: Result<Vec<String>, StringFieldError>,
    /// The namespace id inside the request's `task_token`: the server acts on the task
    /// token's namespace, not on the request's `namespace` field (`None`: no task token). An
    /// error when the token is not readable, with the same consequence as above.
    pub task_namespace_id: Result<Option<String>, StringFieldError>,
    /// The budget the request's bytes are charged to; charges end when the last clone drops.
    pub budget: MessageBudget,
}

impl Inspected {
    /// The inspected value of `request`: every request behind the ingress has one.
    pub fn of<B>(request: &Request<B>) -> Option<&Inspected> {
        request.extensions().get::<Inspected>()
    }
}

/// Why the ingress refused a request.
#[derive(Debug, thiserror::Error)]
pub enum IngressError {
    /// The `:path` is not one a gRPC server dispatches unambiguously.
    #[error("malformed :path {path:?}: {why}")]
    Path {
        /// The path as received.
        path: String,
        /// What is wrong with it.
        why: &'static str,
    },
    /// The body could not be read whole within the limits.
    #[error("{0}")]
    Body(String, Code),
    /// The body is not a sequence of gRPC frames the gateway can read.
    #[error("{0}")]
    Frame(#[from] FrameError),
    /// A unary call whose body holds no message.
    #[error("unary call {0} carries no request message")]
    NoMessage(&'static str),
    /// The request message is not readable protobuf, or its namespace is not UTF-8.
    #[error("request of {method} refused: {source}")]
    Message {
        /// The method's short name.
        method: &'static str,
        /// What the parser found.
        source: StringFieldError,
    },
}

impl IngressError {
    /// The gRPC status this refusal is answered with.
    pub fn status(&self) -> Status {
        let code = match self {
            Self::Path { .. } | Self::NoMessage(_) | Self::Message { .. } => Code::InvalidArgument,
            Self::Body(_, code) => *code,
            Self::Frame(FrameError::UnsupportedEncoding(_)) => Code::Unimplemented,
            Self::Frame(FrameError::TooLarge { .. } | FrameError::Budget(_)) => {
                Code::ResourceExhausted
            }
            Self::Frame(_) => Code::InvalidArgument,
        };
        Status::new(code, self.to_string())
    }
}

/// The ingress: a [`Handler`] (stack it with [`crate::grpc::layer::HandlerLayer`]); holds the
/// limits it reads bodies within.
#[derive(Debug, Clone)]
pub struct Ingress {
    max_message_bytes: usize,
    process_budget: Arc<ProcessBudget>,
}

impl Ingress {
    /// Reads request bodies of at most `max_message_bytes` per message (on the wire and
    /// inflated), charging what it holds to `process_budget`.
    pub fn new(max_message_bytes: usize, process_budget: Arc<ProcessBudget>) -> Self {
        Self {
            max_message_bytes,
            process_budget,
        }
    }

    /// A fresh budget for one message.
    pub fn message_budget(&self) -> MessageBudget {
        MessageBudget::new(self.process_budget.clone(), self.max_message_bytes)
    }

    /// Reads, decides and re-frames one request. The returned request carries an
    /// [`Inspected`] in its extensions and, for Temporal methods, a body made of exactly the
    /// inspected messages.
    pub async fn admit(
        &self,
        request: Request<GatewayBody>,
    ) -> Result<Request<GatewayBody>, IngressError> {
        let (mut parts, body) = request.into_parts();
        let path = parts.uri.path();
        check_path(path, parts.uri.query())?;
        let budget = self.message_budget();
        if !path.starts_with(TEMPORAL_PREFIX) {
            let inspected = Inspected {
                method: None,
                messages: None,
                namespace: None,
                target: target::of_path(path),
                nested_namespaces: Ok(Vec::new()),
                task_namespace_id: Ok(None),
                budget,
            };
            parts.extensions.insert(inspected);
            return Ok(Request::from_parts(parts, body));
        }
        let encoding = Encoding::from_header(header_str(&parts.headers, "grpc-encoding"))?;
        let limit = self.max_message_bytes.saturating_add(frame::PREFIX_LEN);
        let mut reader = FrameReader::new(
            encoding,
            self.max_message_bytes,
            is_unary(path),
            budget.clone(),
        );
        let mut body = body;
        let mut received = 0usize;
        // Trailers are skipped: only what was inspected goes upstream.
        while let Some(frame) = body.frame().await {
            let frame = frame.map_err(|e| {
                IngressError::Body(
                    format!("connection lost while reading the message: {e}"),
                    Code::Unavailable,
                )
            })?;
            let Ok(data) = frame.into_data() else {
                continue;
            };
            received = received.saturating_add(data.len());
            if received > limit {
                return Err(IngressError::Body(
                    TooLarge { limit }.to_string(),
                    Code::ResourceExhausted,
                ));
            }
            reader.push(data)?;
        }
        drop(body);
        let inspected = decide_messages(parts.uri.path(), reader.finish()?, budget)?;
        let messages = inspected.messages.clone().unwrap_or_default();
        parts.headers.remove("grpc-encoding");
        parts.headers.remove(http::header::CONTENT_LENGTH);
        parts.extensions.insert(inspected);
        // Request trailers are not forwarded: only what was inspected goes upstream.
        let body = GatewayBody::buffered(frame::encode(messages)?, None);
        Ok(Request::from_parts(parts, body))
    }
}

/// Decides method, messages, namespace and target of a Temporal request whose whole body is
/// `body` (framed, possibly compressed per `encoding`), read as [`Ingress::admit`] reads a
/// body that arrives in one chunk. Pure: what it returns is what is forwarded.
pub fn decide(
    path: &str,
    body: &Bytes,
    encoding: Encoding,
    max_message_bytes: usize,
    budget: MessageBudget,
) -> Result<Inspected, IngressError> {
    let mut reader = FrameReader::new(encoding, max_message_bytes, is_unary(path), budget.clone());
    if !body.is_empty() {
        reader.push(body.clone())?;
    }
    decide_messages(path, reader.finish()?, budget)
}

/// Whether a call to `path` sends one message at most. A method the descriptors do not know
/// may stream: it is read whole all the same (the gateway forwards nothing it did not read),
/// but more than one message is allowed.
fn is_unary(path: &str) -> bool {
    method(path).is_none_or(|m| !m.client_streaming)
}

/// Decides method, namespace and target of a Temporal request to `path` from its messages,
/// read and inflated.
fn decide_messages(
    path: &str,
    messages: Vec<Bytes>,
    budget: MessageBudget,
) -> Result<Inspected, IngressError> {
    let m = method(path);
    let Some(m) = m else {
        return Ok(Inspected {
            method: None,
            messages: Some(messages),
            namespace: None,
            target: target::of_path(path),
            nested_namespaces: Ok(Vec::new()),
            task_namespace_id: Ok(None),
            budget,
        });
    };
    if !m.client_streaming && messages.len() != 1 {
        return Err(IngressError::NoMessage(short(m)));
    }
    let first = messages.first().map(Bytes::as_ref).unwrap_or_default();
    let namespace = if m.request.has_string_field("namespace") {
        let field = top_level_string_strict(m.request, first, "namespace").map_err(|source| {
            IngressError::Message {
                method: short(m),
                source,
            }
        })?;
        Some(field.unwrap_or_default().to_owned())
    } else {
        None
    };
    let refused = |source| IngressError::Message {
        method: short(m),
        source,
    };
    let target = target::of_message(m, first, namespace.as_deref()).map_err(refused)?;
    let nested_namespaces = target::nested_namespaces(m, first);
    let task_namespace_id = target::task_namespace_id(m, first);
    Ok(Inspected {
        method: Some(m),
        messages: Some(messages),
        namespace,
        target,
        nested_namespaces,
        task_namespace_id,
        budget,
    })
}

/// The method's name after the service, for messages.
fn short(m: Method) -> &'static str {
    m.path.rsplit('/').next().unwrap_or(m.path)
}

/// A gRPC server splits `:path` at its last `/` and some (grpc-go) strip a leading `/` only
/// when present: a path the gateway would not look up exactly as the server dispatches it
/// is refused.
fn check_path(path: &str, query: Option<&str>) -> Result<(), IngressError> {
    let refuse = |why| {
        Err(IngressError::Path {
            path: path.to_owned(),
            why,
        })
    };
    if !path.starts_with('/') {
        return refuse("a gRPC path must start with '/'");
    }
    if let Some(query) = query {
        return Err(IngressError::Path {
            path: format!("{path}?{query}"),
            why: "a gRPC path carries no query",
        });
    }
    Ok(())
}

fn header_str<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers.get(name).and_then(|v| v.to_str().ok())
}

impl Handler for Ingress {
    async fn handle<S: Inner>(
        self,
        inner: S,
        request: Request<GatewayBody>,
    ) -> Response<GatewayBody> {
        match self.admit(request).await {
            Ok(request) => forward(inner, request).await,
            Err(refusal) => {
                tracing::warn!(reason = %refusal, "request refused by the ingress");
                refusal.status().into_response()
            }
        }
    }
}

#[cfg(test)]
mod tests;
