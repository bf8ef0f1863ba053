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
//! # Guards, in the order they apply
//!
//! 1. **Host.** The request's host (HTTP/1 `Host`, HTTP/2 `:authority`; every one present)
//!    must match `codec_server.allowed_hosts` (default `localhost`, `127.0.0.1`, `[::1]`, any
//!    port) or the listen address: otherwise 421, so a web page that rebinds its own DNS name
//!    to the loopback address cannot call the endpoint. No host at all: 400.
//! 2. **Content type.** `POST` needs `Content-Type: application/json` (parameters such as
//!    `charset` allowed): otherwise 415, so a page cannot send a "simple" `text/plain` request
//!    that needs no CORS preflight. The Web UI and the `temporal` CLI send `application/json`.
//! 3. **Credentials** (when configured): 401/403 as below.
//! 4. **Body and parse limits.** The body may hold at most `max_body_bytes`; payloads are
//!    counted while the JSON is parsed and parsing stops at payload `max_payloads` + 1 (413),
//!    as it does past 64 metadata entries and external payload details per allowed payload in
//!    total (413).
//! 5. **Keys bound to namespaces.** `/decode` and `/download` for a namespace decrypt only with
//!    the keys bound to it (its active key and `decrypt_keys`, see SECURITY.md): a payload
//!    naming another key is refused with 422 naming the key and the namespace; nothing of it
//!    is decrypted.
//! 6. **Key-service calls.** A request may carry at most [`MAX_DATA_KEYS_PER_REQUEST`]
//!    distinct wrapped data keys that are not cached (413 before any call); wrapped keys that
//!    recently did not unwrap are refused from memory (422), and once a namespace's budget of
//!    failed unwraps is spent, keys not cached are not sent to the key service (429): see
//!    "Bounding what callers can make the key service do" in `codec/envelope.rs`.
//! 7. **Decoded-size budget.** Payloads are decoded one after the other; a compressed payload
//!    may inflate only to what is left of `max_decoded_bytes` (default 128 MiB) for the
//!    request, and the request is refused with 413 as soon as the total would pass it, so at
//!    most the budget is ever inflated.
//! 8. **Time.** The whole request must finish within `request_timeout_ms` (408 while reading
//!    the body, 504 after). When it times out or the client goes away, decoding stops between
//!    payloads: blocking work still queued is skipped, so at most the payload being decoded
//!    finishes.
//!
//! Decoding is the gateway's one payload decode (`rewrite/pipeline.rs`,
//! `Pipeline::decode_scoped`, the same as the gRPC path's) with this endpoint's scope: keys
//! bound to the namespace, `max_decoded_bytes` as the budget, the request's cancel flag, and
//! payload-by-payload decoding with the inline limits below. Its failures, typed by cause,
//! become HTTP statuses here.
//!
//! Payloads of at most 64 KiB that decode to at most 256 KiB are decoded on the request's own
//! task (the `temporal` CLI sends one request per event's payloads, and a hop to the blocking
//! pool cost more than decoding such a payload: BENCHMARKS.md, "CLI workflow show"); larger
//! ones, and a small one that inflates further (decoded again there), on the blocking pool.
//! The task yields every 64 payloads or 1 MiB decoded.
//!
//! # Answers
//!
//! 200 with the payloads. Everything about the request or its payloads is a 4xx, so the
//! Web UI (which retries 5xx answers three times before it shows a payload undecoded) gives
//! up at once: 400 bad JSON, namespace or host header, or a non-reference sent to `/download`;
//! 401 missing or unknown credentials; 403 a credential limited to other namespaces; 404 other
//! paths; 405 other methods; 408 body read too slowly; 413 body, payload count, metadata count
//! or decoded size over a limit (also a payload inflating past
//! `compression.max_decompressed_bytes`, and too many data keys to unwrap); 415 not
//! `application/json`; 421 a host not in `allowed_hosts`; 422 a payload that cannot be
//! decoded (the message names the payload index and the reason: unknown key, key not bound to
//! the namespace, tag mismatch, corrupt frame, a wrapped data key that does not unwrap or is
//! too long, stored object missing or refused, storage reference with storage off); 429 the
//! key service not asked (the namespace's failed-unwrap budget is spent). 5xx only for what a
//! retry may cure or what is the gateway's own failure: 500 an internal failure (a payload
//! that cannot be encoded, a failed decoding task); 503 storage unavailable or memory short;
//! 504 storage too slow or the request timed out. README.md has the table. Errors are plain
//! text and never hold payload contents. One access log line per request (target
//! `payload_gateway::codec_server::access`): method, path, status, namespace, payload count,
//! duration; never payloads or credentials. Metrics: `pgw_codec_requests_total{route,status}`
//! and `pgw_codec_request_duration_seconds{route}`, `route` one of `encode`, `decode`,
//! `download`, `preflight`, `other`.
//!
//! # TLS
//!
//! With `[codec_server.tls]` the endpoint speaks HTTPS only (ALPN `h2` and `http/1.1`) on the
//! same rustls stack as the gRPC listener, optionally requiring client certificates. The Web
//! UI sends its access token ("pass access token") only to an `https://` endpoint.

pub mod auth;
pub mod json;

#[cfg(test)]
mod tests;

use std::convert::Infallible;
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderValue};
use http::{Method, Request, Response, StatusCode};
use http_body::Body;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::net::TcpListener;

use crate::budget::{Exhausted, MessageBudget, ProcessBudget};
use crate::codec::CodecError;
use crate::config::{CodecServerConfig, ConfigError, HostPattern, split_authority};
use crate::rewrite::pipeline::{DecodeScope, Inline, KeyScope, StageCause, StageError};
use crate::rewrite::{CallContext, Direction, Pipeline};
use crate::storage::StorageFailure;
use crate::tls::TlsAcceptor;
use auth::{Auth, AuthError};
use json::{ParseError, Payload};

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
    let namespace = segments.next().map(|segment| {
        // Malformed escapes stay as written; escapes that do not decode to UTF-8 keep the
        // segment as sent.
        percent_encoding::percent_decode_str(segment)
            .decode_utf8()
            .map_or_else(|_| segment.to_owned(), |s| s.into_owned())
    });
    Some(Route { action, namespace })
}

impl Action {
    /// The metrics label of the action.
    fn label(self) -> &'static str {
        match self {
            Self::Encode => "encode",
            Self::Decode => "decode",
            Self::Download => "download",
        }
    }
}

/// The metrics label of a request: its action, `preflight` for `OPTIONS`, `other` otherwise.
fn route_label(method: &Method, path: &str) -> &'static str {
    if method == Method::OPTIONS {
        return "preflight";
    }
    route(path).map_or("other", |r| r.action.label())
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
    max_decoded_bytes: usize,
    request_timeout: Duration,
    connection_limit: crate::server::ConnectionLimit,
    /// `allowed_hosts` plus the listen address.
    allowed_hosts: Vec<HostPattern>,
    /// Payloads decoded so far (tests watch it to see that cancelled work stops).
    decoded: Arc<AtomicU64>,
    /// HTTPS (`[codec_server.tls]`); `None`: cleartext HTTP.
    tls: Option<TlsAcceptor>,
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
        let tls = TlsAcceptor::for_codec_server(&config.tls)?;
        if auth.is_some() && tls.is_none() && !config.listen.ip().is_loopback() {
            tracing::warn!(
                listen = %config.listen,
                "codec_server checks tokens but listens beyond loopback without TLS: tokens \
                 and decoded payloads cross the network in cleartext, and the Web UI sends \
                 its access token only to https endpoints; set codec_server.tls.cert_file"
            );
        }
        if auth.is_none() {
            let warn = !config.listen.ip().is_loopback();
            if warn {
                tracing::warn!(
                    listen = %config.listen,
                    "codec_server has no authentication and listens beyond loopback: anyone \
                     who reaches it can decrypt payloads; set codec_server.bearer_tokens_env, \
                     jwks_file or jwks_url"
                );
            } else {
                tracing::info!("codec_server: no authentication configured (loopback only)");
            }
        }
        let mut allowed_hosts = config
            .allowed_hosts
            .iter()
            .enumerate()
            .map(|(i, h)| {
                HostPattern::parse(h).map_err(|why| {
                    ConfigError::invalid(format!("codec_server.allowed_hosts[{i}]"), why)
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        allowed_hosts.push(HostPattern::listen(config.listen));
        if !config.listen.ip().is_loopback() && !allowed_hosts.iter().any(|h| h.host.is_none()) {
            tracing::info!(
                listen = %config.listen,
                allowed_hosts = ?config.allowed_hosts,
                "codec_server answers only requests addressed to these hosts (421 otherwise); \
                 add the names clients use to codec_server.allowed_hosts"
            );
        }
        Ok(Self {
            inner: Arc::new(Inner {
                pipeline,
                auth,
                cors_origins: config.cors_origins.clone(),
                max_body_bytes: config.max_body_bytes,
                max_payloads: config.max_payloads,
                max_decoded_bytes: config.max_decoded_bytes,
                allowed_hosts,
                decoded: Arc::default(),
                tls,
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
        let route = route_label(&method, &path);
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
        crate::metrics::metrics().count_codec_request(
            route,
            answer.status.as_u16(),
            started.elapsed(),
        );
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
        if let Some(answer) = self.host_refusal(&request) {
            return (answer, None);
        }
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
        if let Some(answer) = content_type_refusal(request.headers()) {
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
            match auth.authenticate(header).await {
                Ok(grant) => {
                    if let Err(why) = auth::allows(&grant, namespace.as_deref()) {
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
        let declared = request
            .headers()
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        let declared_too_large = declared.is_some_and(|n| n > max as u64);
        let limit = if declared_too_large { 0 } else { max };
        // A declared length (within the limit) is reserved at once: no doubling series.
        let reserve = declared.map_or(0, |n| n as usize).min(limit);
        let body = match read_body(request.into_body(), limit, reserve, deadline).await {
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
        let max_payloads = self.inner.max_payloads;
        let payloads = match json::parse_payloads_limited(&body, max_payloads) {
            Ok(p) => p,
            Err(ParseError::Json(why)) => return Answer::error(StatusCode::BAD_REQUEST, why),
            Err(ParseError::TooManyPayloads { .. }) => {
                return Answer::error(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    format!(
                        "more than codec_server.max_payloads = {max_payloads} payloads in one \
                         request (refused at payload {max_payloads})"
                    ),
                );
            }
            Err(e @ ParseError::TooManyFields { .. }) => {
                return Answer::error(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    format!(
                        "{e} in one request ({} per payload of codec_server.max_payloads)",
                        json::FIELDS_PER_PAYLOAD
                    ),
                );
            }
        };
        drop(body);
        let count = payloads.len();
        // Set when this future is dropped (timeout, client gone): blocking work still queued
        // or between payloads sees it and stops.
        let cancel = CancelOnDrop::default();
        let work = self.transform(route.action, namespace, preserve, payloads, &cancel);
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
        cancel: &CancelOnDrop,
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
        let method = match action {
            Action::Encode => return self.encode(pipeline, namespace, payloads).await,
            Action::Decode => "codec-server/decode",
            Action::Download => "codec-server/download",
        };
        let budget = self.inner.max_decoded_bytes;
        let ctx = CallContext::new(method, namespace)
            .with_budget(MessageBudget::new(ProcessBudget::unlimited(), budget));
        // The gateway's one decode, scoped for callers that send payloads of their choosing.
        let scope = DecodeScope {
            keys: KeyScope::Namespace,
            max_data_keys: MAX_DATA_KEYS_PER_REQUEST,
            cancel: cancel.0.clone(),
            inline: Inline::PerPayload {
                input: INLINE_INPUT_MAX,
                output: INLINE_OUTPUT_MAX,
            },
            progress: Some(self.inner.decoded.clone()),
        };
        let mut out = payloads;
        // With `preserveStorageRefs`, references stay as they are: only the rest is decoded.
        let todo: Vec<usize> = (0..out.len())
            .filter(|&i| !(action == Action::Decode && preserve_refs && is_reference(&out[i])))
            .collect();
        let input: Vec<Bytes> = todo.iter().map(|&i| out[i].to_bytes()).collect();
        let decoded = pipeline
            .decode_scoped(&ctx, &scope, input)
            .await
            .map_err(|e| {
                let index = todo.get(e.index).copied().unwrap_or(e.index);
                decode_answer(index, e, budget)
            })?;
        for (&i, decoded) in todo.iter().zip(decoded) {
            if let Some(bytes) = decoded {
                // Zero-copy: the payload's data stays a slice of the decoded buffer.
                out[i] = <Payload as prost::Message>::decode(bytes).map_err(|e| {
                    Answer::error(
                        StatusCode::UNPROCESSABLE_ENTITY,
                        format!("payload {i}: not a Payload message: {e}"),
                    )
                })?;
            }
        }
        let mut used = 0usize;
        for (i, p) in out.iter().enumerate() {
            used = used.saturating_add(p.data.len());
            if used > budget {
                return Err(over_budget(i, budget));
            }
            if action == Action::Download && is_reference(p) {
                return Err(storage_unavailable());
            }
        }
        Ok(out)
    }

    /// `/encode`: the pipeline outward, in groups of at most [`ENCODE_GROUP_BYTES`] so a
    /// cancelled request stops between groups.
    async fn encode(
        &self,
        pipeline: &Pipeline,
        namespace: Option<String>,
        payloads: Vec<Payload>,
    ) -> Result<Vec<Payload>, Answer> {
        let ctx = CallContext::new("codec-server/encode", namespace);
        let mut out = payloads;
        let mut start = 0;
        while start < out.len() {
            let mut end = start;
            let mut bytes = 0usize;
            let mut group = Vec::new();
            while end < out.len() && (group.is_empty() || bytes < ENCODE_GROUP_BYTES) {
                let b = out[end].to_bytes();
                bytes += b.len();
                group.push(b);
                end += 1;
            }
            let results = pipeline
                .run(Direction::Encode, &ctx, group)
                .await
                .map_err(|e| {
                    Answer::error(
                        encode_status(&e.cause),
                        format!("cannot encode payload {}: {}", start + e.index, e.cause),
                    )
                })?;
            for (i, result) in (start..end).zip(results) {
                if let Some(bytes) = result {
                    out[i] = <Payload as prost::Message>::decode(bytes).map_err(|e| {
                        Answer::error(
                            StatusCode::INTERNAL_SERVER_ERROR,
                            format!("payload {i}: not a Payload message: {e}"),
                        )
                    })?;
                }
            }
            start = end;
        }
        Ok(out)
    }

    /// The refusal of a request not addressed to an allowed host (`Host`, HTTP/2 `:authority`).
    fn host_refusal<B>(&self, request: &Request<B>) -> Option<Answer> {
        let authority = request.uri().authority().map(|a| a.as_str().to_owned());
        let host = match request.headers().get(header::HOST).map(|v| v.to_str()) {
            None => None,
            Some(Ok(h)) => Some(h.to_owned()),
            Some(Err(_)) => {
                return Some(Answer::error(
                    StatusCode::BAD_REQUEST,
                    "Host is not valid text",
                ));
            }
        };
        if authority.is_none() && host.is_none() {
            return Some(Answer::error(
                StatusCode::BAD_REQUEST,
                "the request names no host (Host header or :authority)",
            ));
        }
        for value in authority.iter().chain(host.iter()) {
            let allowed = split_authority(value).is_some_and(|(h, port)| {
                self.inner.allowed_hosts.iter().any(|p| p.matches(&h, port))
            });
            if !allowed {
                return Some(Answer::error(
                    StatusCode::MISDIRECTED_REQUEST,
                    format!(
                        "host {value:?} is not in codec_server.allowed_hosts (a guard against \
                         DNS rebinding): add the name clients use to reach this endpoint"
                    ),
                ));
            }
        }
        None
    }

    /// Serves on `listener` until `shutdown` resolves, then lets in-flight requests finish
    /// (at most `grace`): the gateway's one [`listener`](crate::listener), with the
    /// endpoint's connection cap (`codec_server.max_connections`), TLS
    /// (`[codec_server.tls]`) and a first-request deadline of [`HEADER_READ_TIMEOUT`].
    pub async fn serve(
        self,
        listener: TcpListener,
        shutdown: impl Future<Output = ()>,
        grace: Duration,
    ) {
        let settings = crate::listener::ListenerSettings {
            name: "codec_server",
            tls: self.inner.tls.clone(),
            first_request_timeout: HEADER_READ_TIMEOUT,
            connection_limit: self.inner.connection_limit.clone(),
            shutdown_grace: grace,
            connection_threads: 0,
        };
        crate::listener::serve(listener, move || self.clone(), settings, shutdown).await;
    }
}

impl crate::listener::Protocol for CodecServer {
    /// HTTP/1.1 or HTTP/2 (with TLS: as ALPN chose), HTTP/1 headers within
    /// [`HEADER_READ_TIMEOUT`].
    async fn serve<I>(self, io: TokioIo<I>, client: crate::listener::Client)
    where
        I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    {
        let marker = client.first.clone();
        let service = hyper::service::service_fn(move |request| {
            marker.seen();
            let server = self.clone();
            async move { Ok::<_, Infallible>(server.handle(request).await) }
        });
        let mut builder = auto::Builder::new(TokioExecutor::new());
        builder
            .http1()
            .timer(TokioTimer::new())
            .header_read_timeout(HEADER_READ_TIMEOUT);
        client
            .run(builder.serve_connection(io, service).into_owned())
            .await;
    }
}

/// A storage reference this gateway cannot resolve: 422, as retrying cannot change it (the
/// Web UI retries 5xx answers before showing the payload undecoded).
fn storage_unavailable() -> Answer {
    Answer::error(
        StatusCode::UNPROCESSABLE_ENTITY,
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
    reserve: usize,
    deadline: tokio::time::Instant,
) -> Result<Bytes, BodyError>
where
    B: Body<Data = Bytes>,
    B::Error: std::error::Error + Send + Sync + 'static,
{
    let read = async {
        let mut body = std::pin::pin!(body);
        let mut buf = bytes::BytesMut::with_capacity(reserve);
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

/// Payloads up to this size are decoded on the request's own task (see
/// [`CodecServer::decode_bytes`]); the codec's own inline limit for a batch is larger
/// ([`crate::codec::DEFAULT_PARALLEL_THRESHOLD`]).
const INLINE_INPUT_MAX: usize = 64 * 1024;

/// What a payload decoded on the request's own task may inflate to; more is decoded again on
/// the blocking pool.
const INLINE_OUTPUT_MAX: usize = 256 * 1024;

/// Distinct data keys one `/decode` or `/download` request may make the key service unwrap
/// (the CLI sends one request per event's payloads; the Web UI a page of them): more is 413
/// before any key-service call (see "Bounding what callers can make the key service do" in
/// `codec/envelope.rs`).
pub const MAX_DATA_KEYS_PER_REQUEST: usize = 32;

/// Bytes of payloads per `/encode` pipeline run (a cancelled request stops between runs).
const ENCODE_GROUP_BYTES: usize = 4 * 1024 * 1024;

/// Sets its flag when dropped: the request's future is gone (timed out or the client left).
#[derive(Debug, Default)]
struct CancelOnDrop(Arc<AtomicBool>);

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

fn over_budget(index: usize, budget: usize) -> Answer {
    Answer::error(
        StatusCode::PAYLOAD_TOO_LARGE,
        format!(
            "decoded payloads exceed codec_server.max_decoded_bytes = {budget} bytes \
             (refused at payload {index})"
        ),
    )
}

/// The answer for a payload the codec could not decode: 4xx for everything about the payload
/// (the Web UI retries 5xx answers three times before showing the payload undecoded, and
/// retrying cannot change these), 5xx only for failures of the gateway itself.
fn codec_answer(index: usize, e: &CodecError) -> Answer {
    let status = codec_status(e);
    let message = match e {
        CodecError::OverBudget { .. } => format!(
            "cannot decode payload {index}: decoded payloads exceed \
             codec_server.max_decoded_bytes ({e})"
        ),
        _ => format!("cannot decode payload {index}: {e}"),
    };
    Answer::error(status, message)
}

/// The HTTP status of a codec error met while decoding. Exhaustive on purpose: a new kind of
/// error must be given its status here.
fn codec_status(e: &CodecError) -> StatusCode {
    match e {
        // Over a size limit of this endpoint or of the codec.
        CodecError::OverBudget { .. }
        | CodecError::DecompressedTooLarge { .. }
        | CodecError::TooManyDataKeys { .. } => StatusCode::PAYLOAD_TOO_LARGE,
        // The payload cannot be decoded here, now or on a retry.
        CodecError::UnknownKey(_)
        | CodecError::KeyNotBound { .. }
        | CodecError::AuthenticationFailed { .. }
        | CodecError::TooShort { .. }
        | CodecError::CorruptFrame(_)
        | CodecError::Malformed(_) => StatusCode::UNPROCESSABLE_ENTITY,
        // A key service refused, or a wrapped data key does not unwrap: a retry cannot help.
        CodecError::KeyService { .. } => StatusCode::UNPROCESSABLE_ENTITY,
        // The key service was not asked: too many made-up keys for this namespace lately.
        CodecError::KeyThrottled { .. } => StatusCode::TOO_MANY_REQUESTS,
        // Short of memory, or the key service unreachable, for now: a retry may succeed.
        CodecError::Budget(_) | CodecError::KeyUnavailable { .. } => {
            StatusCode::SERVICE_UNAVAILABLE
        }
        // Encoding-side failures and failures of the gateway itself.
        CodecError::NonceLimitReached { .. }
        | CodecError::EncryptFailed { .. }
        | CodecError::Random
        | CodecError::Compress(_)
        | CodecError::Worker(_) => StatusCode::INTERNAL_SERVER_ERROR,
    }
}

/// The HTTP status of a failed decode, by cause: unavailable storage or key service and
/// short memory are worth retrying (503); what the payload or the request asks for that
/// cannot be done is not (4xx); everything else is the gateway's own failure (500).
fn stage_status(cause: &StageCause) -> StatusCode {
    match cause {
        StageCause::Codec(e) | StageCause::Kms(e) => codec_status(e),
        StageCause::Budget(Exhausted::Message { .. }) => StatusCode::PAYLOAD_TOO_LARGE,
        StageCause::Budget(Exhausted::Process { .. }) => StatusCode::SERVICE_UNAVAILABLE,
        StageCause::Storage { kind, .. } => match kind {
            StorageFailure::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
            StorageFailure::TooLarge | StorageFailure::Refused | StorageFailure::Lost => {
                StatusCode::UNPROCESSABLE_ENTITY
            }
            StorageFailure::Budget => StatusCode::PAYLOAD_TOO_LARGE,
            StorageFailure::Internal => StatusCode::INTERNAL_SERVER_ERROR,
        },
        StageCause::Reference(_) => StatusCode::UNPROCESSABLE_ENTITY,
        StageCause::Cancelled => StatusCode::GATEWAY_TIMEOUT,
    }
}

/// The HTTP status of a failed encode: the payloads were the caller's own, so what fails is
/// the gateway's (500), its key service or store (503) or a size limit (413).
fn encode_status(cause: &StageCause) -> StatusCode {
    match cause {
        StageCause::Kms(CodecError::KeyUnavailable { .. } | CodecError::KeyThrottled { .. }) => {
            StatusCode::SERVICE_UNAVAILABLE
        }
        StageCause::Storage { .. } | StageCause::Budget(_) | StageCause::Cancelled => {
            stage_status(cause)
        }
        _ => StatusCode::INTERNAL_SERVER_ERROR,
    }
}

/// The answer for a failed decode of payload `index` (`budget`: `max_decoded_bytes`).
fn decode_answer(index: usize, e: StageError, budget: usize) -> Answer {
    match &e.cause {
        StageCause::Codec(c) | StageCause::Kms(c) => codec_answer(index, c),
        StageCause::Budget(Exhausted::Message { .. }) => over_budget(index, budget),
        StageCause::Cancelled => Answer::error(StatusCode::GATEWAY_TIMEOUT, "request cancelled"),
        cause => Answer::error(
            stage_status(cause),
            format!("cannot decode payload {index}: {cause}"),
        ),
    }
}

/// `POST` bodies must be declared `application/json` (parameters such as `charset` allowed):
/// a browser sends other types (`text/plain`) from any web page without a CORS preflight.
fn content_type_refusal(headers: &HeaderMap) -> Option<Answer> {
    let value = headers.get(header::CONTENT_TYPE).map(|v| v.to_str());
    let essence = match value {
        Some(Ok(v)) => v
            .split(';')
            .next()
            .unwrap_or("")
            .trim()
            .to_ascii_lowercase(),
        Some(Err(_)) => String::new(),
        None => {
            return Some(Answer::error(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "Content-Type: application/json required",
            ));
        }
    };
    if essence == "application/json" {
        None
    } else {
        Some(Answer::error(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            format!("Content-Type: application/json required, got {essence:?}"),
        ))
    }
}
