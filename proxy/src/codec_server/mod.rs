//! The remote codec HTTP endpoint the Temporal Web UI and the `temporal` CLI call to show
//! payloads that the gateway encrypted, compressed or offloaded.
//!
//! # Routes
//!
//! Matched on the last path segment, so the endpoint can be mounted at any depth:
//!
//! - `POST /encode`, `POST /{namespace}/encode`: runs the gateway's payload pipeline outward
//!   (compress, encrypt, offload) with the namespace's policy.
//! - `POST /decode`, `POST /{namespace}/decode`: runs the pipeline inward; payloads that are not
//!   the gateway's come back unchanged. With `?preserveStorageRefs=true`, external storage
//!   references come back as they are (the Web UI then fetches them through `/download`).
//! - `POST /download`, `POST /{namespace}/download`: every payload must be an external storage
//!   reference; answers with the stored payloads, decoded.
//! - `OPTIONS` on any path: the CORS preflight.
//!
//! Body and response are proto3 JSON of `temporal.api.common.v1.Payloads` (see [`json`]); the
//! response holds exactly as many payloads as the request. The namespace is the path segment
//! before the action, else the `X-Namespace` header (both given and different: 400).
//!
//! # Answers
//!
//! 200 with the payloads; 400 bad JSON or namespace; 401 missing or unknown credentials; 403 a
//! credential limited to other namespaces; 404 other paths; 405 other methods; 408 body read too
//! slowly; 413 body or payload count over the limit; 422 a payload that cannot be decoded
//! (the message names the payload index and the reason: key id, tag mismatch, ...); 500 a
//! payload that cannot be encoded; 503/504 storage unavailable or too slow. Errors are plain
//! text. One access log line per request (target `payload_gateway::codec_server::access`):
//! method, path, status, namespace, payload count, duration; never payloads or credentials.

pub mod auth;
pub mod json;

#[cfg(test)]
mod tests;

use std::convert::Infallible;
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderValue};
use http::{Method, Request, Response, StatusCode};
use http_body::Body;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::net::TcpListener;

use crate::config::{CodecServerConfig, ConfigError};
use crate::grpc::Code;
use crate::rewrite::{CallContext, Direction, Pipeline};
use auth::{Auth, AuthError};
use json::Payload;

/// Headers a browser may send (answered in `Access-Control-Allow-Headers`).
const ALLOW_HEADERS: &str = "Content-Type, X-Namespace, Authorization, Authorization-Extras";
/// How long browsers may cache a preflight answer, in seconds.
const PREFLIGHT_MAX_AGE: &str = "600";
/// Time a client gets to send its request headers.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);

/// The metadata key and values marking external storage references (Temporal's forms).
const REF_MESSAGE_TYPE: &str = "temporal.api.sdk.v1.ExternalStorageReference";
const REF_LEGACY_ENCODING: &str = "json/external-storage-reference";
const REF_MARKER_KEY: &str = "__temporal_external_storage_reference";

/// What the endpoint was asked to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// `/encode`.
    Encode,
    /// `/decode`.
    Decode,
    /// `/download`.
    Download,
}

/// A routed request path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    /// The action (last segment).
    pub action: Action,
    /// The segment before the action, when there is one.
    pub namespace: Option<String>,
}

/// Routes a path: the last segment is the action, the one before it the namespace.
pub fn route(path: &str) -> Option<Route> {
    let mut segments = path.split('/').rev().filter(|s| !s.is_empty());
    let action = match segments.next()? {
        "encode" => Action::Encode,
        "decode" => Action::Decode,
        "download" => Action::Download,
        _ => return None,
    };
    let namespace = segments.next().map(percent_decode);
    Some(Route { action, namespace })
}

/// Decodes `%XX` escapes; anything malformed stays as written.
fn percent_decode(segment: &str) -> String {
    let bytes = segment.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' && i + 2 < bytes.len() {
            let hex = std::str::from_utf8(&bytes[i + 1..i + 3])
                .ok()
                .and_then(|h| u8::from_str_radix(h, 16).ok());
            if let Some(b) = hex {
                out.push(b);
                i += 3;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8(out).unwrap_or_else(|_| segment.to_owned())
}

/// Whether `query` holds `preserveStorageRefs=true` (or `=1`).
fn preserve_storage_refs(query: Option<&str>) -> bool {
    query.is_some_and(|q| {
        q.split('&').any(|pair| {
            let (k, v) = pair.split_once('=').unwrap_or((pair, "true"));
            k == "preserveStorageRefs" && (v.eq_ignore_ascii_case("true") || v == "1")
        })
    })
}

/// Whether a payload is an external storage reference, in any of Temporal's forms.
pub fn is_reference(p: &Payload) -> bool {
    p.meta_str("messageType") == Some(REF_MESSAGE_TYPE)
        || p.meta_str("encoding") == Some(REF_LEGACY_ENCODING)
        || p.metadata
            .get(REF_MARKER_KEY)
            .is_some_and(|v| v.as_slice() != b"false")
}

/// The codec endpoint: settings, authentication and the gateway's payload pipeline.
#[derive(Debug, Clone)]
pub struct CodecServer {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    pipeline: Option<Pipeline>,
    auth: Option<Auth>,
    cors_origins: Vec<String>,
    max_body_bytes: usize,
    max_payloads: usize,
    request_timeout: Duration,
    connection_limit: crate::server::ConnectionLimit,
}

/// A finished answer: status and plain-text message or JSON body, plus what the access log
/// line reports.
struct Answer {
    status: StatusCode,
    body: Bytes,
    json: bool,
    payloads: Option<usize>,
    extra: HeaderMap,
}

impl Answer {
    fn error(status: StatusCode, message: impl Into<String>) -> Self {
        let mut message = message.into();
        message.push('\n');
        Self {
            status,
            body: Bytes::from(message),
            json: false,
            payloads: None,
            extra: HeaderMap::new(),
        }
    }

    fn with_payloads(mut self, n: usize) -> Self {
        self.payloads = Some(n);
        self
    }
}

impl CodecServer {
    /// Builds the endpoint over the gateway's `pipeline` (`None`: the gateway neither encodes
    /// nor decodes, so payloads pass unchanged). Reads token variables from the process
    /// environment and the JWKS file.
    pub fn from_config(
        config: &CodecServerConfig,
        pipeline: Option<Pipeline>,
    ) -> Result<Self, ConfigError> {
        Self::with_env(config, pipeline, |var| std::env::var(var).ok())
    }

    /// [`from_config`](Self::from_config) with an explicit environment lookup.
    pub fn with_env(
        config: &CodecServerConfig,
        pipeline: Option<Pipeline>,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<Self, ConfigError> {
        let auth = Auth::from_config(config, env)?;
        if auth.is_none() {
            let warn = !config.listen.ip().is_loopback();
            if warn {
                tracing::warn!(
                    listen = %config.listen,
                    "codec_server has no authentication and listens beyond loopback: anyone \
                     who reaches it can decrypt payloads; set codec_server.bearer_tokens_env \
                     or jwks_file"
                );
            } else {
                tracing::info!("codec_server: no authentication configured (loopback only)");
            }
        }
        Ok(Self {
            inner: Arc::new(Inner {
                pipeline,
                auth,
                cors_origins: config.cors_origins.clone(),
                max_body_bytes: config.max_body_bytes,
                max_payloads: config.max_payloads,
                request_timeout: Duration::from_millis(config.request_timeout_ms),
                connection_limit: crate::server::ConnectionLimit::new(
                    config.max_connections,
                    "codec_server.max_connections",
                ),
            }),
        })
    }

    /// Answers one request (any body type), with CORS headers and an access log line.
    pub async fn handle<B>(&self, request: Request<B>) -> Response<Full<Bytes>>
    where
        B: Body<Data = Bytes>,
        B::Error: std::error::Error + Send + Sync + 'static,
    {
        let started = Instant::now();
        let method = request.method().clone();
        let path = request.uri().path().to_owned();
        let origin = request.headers().get(header::ORIGIN).cloned();
        let allowed_origin = origin.filter(|o| {
            o.to_str()
                .is_ok_and(|o| self.inner.cors_origins.iter().any(|a| a == o))
        });
        let (answer, namespace) = self.answer(request, allowed_origin.is_some()).await;
        let mut response = Response::new(Full::new(answer.body));
        *response.status_mut() = answer.status;
        let headers = response.headers_mut();
        headers.extend(answer.extra);
        if answer.status != StatusCode::NO_CONTENT {
            headers.insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static(if answer.json {
                    "application/json"
                } else {
                    "text/plain; charset=utf-8"
                }),
            );
        }
        headers.insert(header::VARY, HeaderValue::from_static("Origin"));
        if let Some(origin) = allowed_origin {
            headers.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, origin);
            headers.insert(
                header::ACCESS_CONTROL_ALLOW_CREDENTIALS,
                HeaderValue::from_static("true"),
            );
        }
        tracing::info!(
            target: "payload_gateway::codec_server::access",
            method = %method,
            path = %path,
            status = answer.status.as_u16(),
            namespace = namespace.as_deref().unwrap_or("-"),
            payloads = answer.payloads.map_or(-1, |n| n as i64),
            duration_ms = (started.elapsed().as_secs_f64() * 1000.0 * 1000.0).round() / 1000.0,
            "codec request"
        );
        response
    }

    /// The answer and the namespace it concerned.
    async fn answer<B>(&self, request: Request<B>, origin_allowed: bool) -> (Answer, Option<String>)
    where
        B: Body<Data = Bytes>,
        B::Error: std::error::Error + Send + Sync + 'static,
    {
        let deadline = tokio::time::Instant::now() + self.inner.request_timeout;
        if request.method() == Method::OPTIONS {
            let mut answer = Answer::error(StatusCode::NO_CONTENT, "");
            answer.body = Bytes::new();
            if origin_allowed {
                let h = &mut answer.extra;
                h.insert(
                    header::ACCESS_CONTROL_ALLOW_METHODS,
                    HeaderValue::from_static("POST"),
                );
                h.insert(
                    header::ACCESS_CONTROL_ALLOW_HEADERS,
                    HeaderValue::from_static(ALLOW_HEADERS),
                );
                h.insert(
                    header::ACCESS_CONTROL_MAX_AGE,
                    HeaderValue::from_static(PREFLIGHT_MAX_AGE),
                );
            }
            return (answer, None);
        }
        let Some(route) = route(request.uri().path()) else {
            return (
                Answer::error(
                    StatusCode::NOT_FOUND,
                    "not found: POST [/{namespace}]/encode, /decode or /download",
                ),
                None,
            );
        };
        if request.method() != Method::POST {
            let mut answer = Answer::error(StatusCode::METHOD_NOT_ALLOWED, "use POST");
            answer
                .extra
                .insert(header::ALLOW, HeaderValue::from_static("POST, OPTIONS"));
            return (answer, route.namespace);
        }
        let header_ns = match request.headers().get("x-namespace").map(|v| v.to_str()) {
            None => None,
            Some(Ok(v)) if v.trim().is_empty() => None,
            Some(Ok(v)) => Some(v.trim().to_owned()),
            Some(Err(_)) => {
                return (
                    Answer::error(StatusCode::BAD_REQUEST, "X-Namespace is not valid text"),
                    route.namespace,
                );
            }
        };
        let namespace = match (route.namespace.clone(), header_ns) {
            (Some(p), Some(h)) if p != h => {
                return (
                    Answer::error(
                        StatusCode::BAD_REQUEST,
                        format!("namespace {p:?} in the path and {h:?} in X-Namespace disagree"),
                    ),
                    Some(p),
                );
            }
            (p, h) => p.or(h),
        };
        if let Some(auth) = &self.inner.auth {
            let header = request
                .headers()
                .get(header::AUTHORIZATION)
                .map(HeaderValue::as_bytes);
            match auth.authenticate(header) {
                Ok(grant) => {
                    if let Err(why) = grant.allows(namespace.as_deref()) {
                        return (Answer::error(StatusCode::FORBIDDEN, why), namespace);
                    }
                }
                Err(e) => {
                    let mut answer = Answer::error(StatusCode::UNAUTHORIZED, e.to_string());
                    if e == AuthError::Missing || matches!(e, AuthError::Invalid(_)) {
                        answer.extra.insert(
                            header::WWW_AUTHENTICATE,
                            HeaderValue::from_static("Bearer realm=\"payload-gateway codec\""),
                        );
                    }
                    return (answer, namespace);
                }
            }
        }
        let answer = self
            .process(request, &route, namespace.clone(), deadline)
            .await;
        (answer, namespace)
    }

    async fn process<B>(
        &self,
        request: Request<B>,
        route: &Route,
        namespace: Option<String>,
        deadline: tokio::time::Instant,
    ) -> Answer
    where
        B: Body<Data = Bytes>,
        B::Error: std::error::Error + Send + Sync + 'static,
    {
        let max = self.inner.max_body_bytes;
        let too_large = || {
            Answer::error(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!("request body exceeds codec_server.max_body_bytes = {max} bytes"),
            )
        };
        let preserve = preserve_storage_refs(request.uri().query());
        // A declared length over the limit is refused whatever arrives.
        let declared_too_large = request
            .headers()
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok())
            .is_some_and(|n| n > max as u64);
        let limit = if declared_too_large { 0 } else { max };
        let body = match read_body(request.into_body(), limit, deadline).await {
            Ok(_) if declared_too_large => return too_large(),
            Ok(body) => body,
            Err(BodyError::TooLarge) => return too_large(),
            Err(BodyError::Timeout) => {
                return Answer::error(
                    StatusCode::REQUEST_TIMEOUT,
                    "request body not received within codec_server.request_timeout_ms",
                );
            }
            Err(BodyError::Read(e)) => {
                return Answer::error(
                    StatusCode::BAD_REQUEST,
                    format!("cannot read the request body: {e}"),
                );
            }
        };
        let payloads = match json::parse_payloads(&body) {
            Ok(p) => p,
            Err(why) => return Answer::error(StatusCode::BAD_REQUEST, why),
        };
        let count = payloads.len();
        if count > self.inner.max_payloads {
            return Answer::error(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!(
                    "{count} payloads in one request exceed codec_server.max_payloads = {}",
                    self.inner.max_payloads
                ),
            )
            .with_payloads(count);
        }
        let work = self.transform(route.action, namespace, preserve, payloads);
        let answer = match tokio::time::timeout_at(deadline, work).await {
            Ok(Ok(out)) => {
                debug_assert_eq!(out.len(), count);
                Answer {
                    status: StatusCode::OK,
                    body: Bytes::from(json::write_payloads(&out)),
                    json: true,
                    payloads: None,
                    extra: HeaderMap::new(),
                }
            }
            Ok(Err(answer)) => answer,
            Err(_) => Answer::error(
                StatusCode::GATEWAY_TIMEOUT,
                "payloads not processed within codec_server.request_timeout_ms",
            ),
        };
        answer.with_payloads(count)
    }

    /// Runs the pipeline over the payloads that need it; the others are returned as given.
    async fn transform(
        &self,
        action: Action,
        namespace: Option<String>,
        preserve_refs: bool,
        payloads: Vec<Payload>,
    ) -> Result<Vec<Payload>, Answer> {
        if action == Action::Download
            && let Some(i) = payloads.iter().position(|p| !is_reference(p))
        {
            return Err(Answer::error(
                StatusCode::BAD_REQUEST,
                format!(
                    "payload {i}: not an external storage reference (/download accepts references only)"
                ),
            ));
        }
        let Some(pipeline) = &self.inner.pipeline else {
            if action == Action::Download && !payloads.is_empty() {
                return Err(storage_unavailable());
            }
            return Ok(payloads);
        };
        let (direction, method) = match action {
            Action::Encode => (Direction::Encode, "codec-server/encode"),
            Action::Decode => (Direction::Decode, "codec-server/decode"),
            Action::Download => (Direction::Decode, "codec-server/download"),
        };
        // Indexes of the payloads the pipeline sees.
        let selected: Vec<usize> = (0..payloads.len())
            .filter(|&i| !(action == Action::Decode && preserve_refs && is_reference(&payloads[i])))
            .collect();
        let input: Vec<Bytes> = selected.iter().map(|&i| payloads[i].to_bytes()).collect();
        let ctx = CallContext::new(method, namespace);
        let results = pipeline.run(direction, &ctx, input).await.map_err(|e| {
            let index = selected.get(e.index).copied().unwrap_or(e.index);
            let status = match (e.code, direction) {
                (Code::Unavailable, _) => StatusCode::SERVICE_UNAVAILABLE,
                (Code::DeadlineExceeded, _) => StatusCode::GATEWAY_TIMEOUT,
                (_, Direction::Decode) => StatusCode::UNPROCESSABLE_ENTITY,
                (_, Direction::Encode) => StatusCode::INTERNAL_SERVER_ERROR,
            };
            let verb = match direction {
                Direction::Decode => "decode",
                Direction::Encode => "encode",
            };
            Answer::error(
                status,
                format!("cannot {verb} payload {index}: {}", e.reason),
            )
        })?;
        let mut out = payloads;
        for (&i, result) in selected.iter().zip(results) {
            if let Some(bytes) = result {
                out[i] = Payload::from_bytes(&bytes).map_err(|why| {
                    Answer::error(
                        StatusCode::UNPROCESSABLE_ENTITY,
                        format!("payload {i}: {why}"),
                    )
                })?;
            }
            if action == Action::Download && is_reference(&out[i]) {
                return Err(storage_unavailable());
            }
        }
        Ok(out)
    }

    /// Serves on `listener` until `shutdown` resolves, then lets in-flight requests finish
    /// (at most `grace`).
    pub async fn serve(
        self,
        listener: TcpListener,
        shutdown: impl Future<Output = ()>,
        grace: Duration,
    ) {
        let graceful = hyper_util::server::graceful::GracefulShutdown::new();
        tokio::pin!(shutdown);
        while let Some(crate::server::Admitted {
            stream,
            peer,
            permit,
        }) = self
            .inner
            .connection_limit
            .accept(&listener, shutdown.as_mut())
            .await
        {
            let server = self.clone();
            let first = crate::server::FirstRequest::default();
            let marker = first.clone();
            let service = hyper::service::service_fn(move |request| {
                marker.seen();
                let server = server.clone();
                async move { Ok::<_, Infallible>(server.handle(request).await) }
            });
            let mut builder = auto::Builder::new(TokioExecutor::new());
            builder
                .http1()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_READ_TIMEOUT);
            let conn = builder
                .serve_connection(TokioIo::new(stream), service)
                .into_owned();
            let conn = graceful.watch(conn);
            tokio::spawn(async move {
                let _permit = permit;
                // HEADER_READ_TIMEOUT only covers HTTP/1 headers; this also covers a client
                // stalling inside the HTTP/2 preface.
                if let Err(e) = first.deadline(conn, HEADER_READ_TIMEOUT).await {
                    tracing::debug!(%peer, error = %e, "codec_server: connection ended");
                }
            });
        }
        drop(listener);
        if tokio::time::timeout(grace, graceful.shutdown())
            .await
            .is_err()
        {
            tracing::warn!("codec_server: requests still running after the shutdown grace");
        }
    }
}

fn storage_unavailable() -> Answer {
    Answer::error(
        StatusCode::NOT_IMPLEMENTED,
        "cannot resolve external storage reference: external storage is not enabled in this \
         gateway ([storage] enabled = false) or no configured driver resolves it",
    )
}

/// How much of an oversized body is still read (and thrown away) before answering 413, so a
/// client that sends its whole body before reading the answer gets the 413 instead of a
/// connection reset. Beyond this the connection is dropped.
const DRAIN_LIMIT: usize = 64 * 1024 * 1024;

/// Why a request body was not read.
#[derive(Debug)]
enum BodyError {
    /// More than the configured maximum.
    TooLarge,
    /// Not received before the deadline.
    Timeout,
    /// The connection failed.
    Read(String),
}

/// Reads a body of at most `max` bytes before `deadline`. An oversized body is drained (up to
/// [`DRAIN_LIMIT`], within the deadline) before [`BodyError::TooLarge`] is returned.
/// With `max` = 0 the body is only drained.
async fn read_body<B>(
    body: B,
    max: usize,
    deadline: tokio::time::Instant,
) -> Result<Bytes, BodyError>
where
    B: Body<Data = Bytes>,
    B::Error: std::error::Error + Send + Sync + 'static,
{
    let read = async {
        let mut body = std::pin::pin!(body);
        let mut buf = bytes::BytesMut::new();
        let mut seen = 0usize;
        while let Some(frame) = body.frame().await {
            let frame = frame.map_err(|e| BodyError::Read(e.to_string()))?;
            let Ok(data) = frame.into_data() else {
                continue;
            };
            seen = seen.saturating_add(data.len());
            if seen > max.saturating_add(DRAIN_LIMIT) {
                break;
            }
            if seen <= max {
                buf.extend_from_slice(&data);
            }
        }
        if seen > max {
            Err(BodyError::TooLarge)
        } else {
            Ok(buf.freeze())
        }
    };
    match tokio::time::timeout_at(deadline, read).await {
        Ok(result) => result,
        Err(_) => Err(BodyError::Timeout),
    }
}
