//! The admin HTTP listener: `/metrics` (Prometheus), `/healthz` (the process is alive) and
//! `/readyz` (also `/ready`: the upstream accepts connections; every dependency listed with its
//! state, see [`Readiness`]). Served on the gateway's one
//! [`listener`](crate::listener): its own connection cap (`admin.max_connections`), accept
//! backoff, a first-request deadline and graceful drain at shutdown. Cleartext (bind it to a
//! private address).

use std::convert::Infallible;
use std::future::Future;
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpListener;

use std::sync::Arc;

use crate::codec::{KeyServiceState, PayloadCodec};
use crate::config::{AdminConfig, ProxyConfig};
use crate::listener::{Client, ConnectionLimit, ListenerSettings, Protocol};
use crate::storage::Storage;

/// How long a readiness probe waits for the upstream.
const PROBE_TIMEOUT: Duration = Duration::from_secs(1);

/// Time a client gets to send a complete request (HTTP/1 headers included) after connecting.
pub const FIRST_REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// How the admin listener accepts and drains.
#[derive(Debug, Clone)]
pub struct AdminSettings {
    /// Caps the connections open at once (`admin.max_connections`).
    pub connection_limit: ConnectionLimit,
    /// A connection that has sent no complete request by then is closed.
    pub first_request_timeout: Duration,
    /// How long requests in flight may run after shutdown begins (`proxy.shutdown_grace_ms`).
    pub shutdown_grace: Duration,
}

impl AdminSettings {
    /// The settings `[admin]` and `[proxy]` configure.
    pub fn from_config(admin: &AdminConfig, proxy: &ProxyConfig) -> Self {
        Self {
            connection_limit: ConnectionLimit::new(admin.max_connections, "admin.max_connections"),
            first_request_timeout: FIRST_REQUEST_TIMEOUT,
            shutdown_grace: Duration::from_millis(proxy.shutdown_grace_ms),
        }
    }
}

/// What `/readyz` (and `/ready`) checks and reports.
///
/// The body lists every dependency on a line of its own, `<kind> <name>: <state>`:
/// `upstream <host:port>: ok`, `kms <key id> (<provider>): unavailable (<reason>) for 12s`
/// (what its service last answered, from real calls and the background prober; see
/// [`PayloadCodec::watch_key_services`]), `storage <driver>: ok`.
///
/// Only the upstream decides the status: `503` when it does not accept connections, else
/// `200`, with `ready (degraded: ...)` as the first line when a key service or a store is
/// down. Key services and stores are shared by every replica of a fleet, so taking a replica
/// out of a load balancer for them helps no one, and a key of one namespace must not take
/// the others down (RELIABILITY.md, "Start degraded").
#[derive(Debug, Clone)]
pub struct Readiness {
    /// The upstream's `host:port`.
    pub upstream: String,
    codec: Option<PayloadCodec>,
    storage: Option<Arc<Storage>>,
}

impl Readiness {
    /// Readiness of the upstream at `upstream` (`host:port`) alone.
    pub fn new(upstream: String) -> Self {
        Self {
            upstream,
            codec: None,
            storage: None,
        }
    }

    /// Reports the key services of `codec`'s key-encryption keys too.
    pub fn with_codec(mut self, codec: Option<PayloadCodec>) -> Self {
        self.codec = codec;
        self
    }

    /// Reports (and probes) `storage`'s drivers too.
    pub fn with_storage(mut self, storage: Option<Arc<Storage>>) -> Self {
        self.storage = storage;
        self
    }

    /// The status and body of `/readyz`: every dependency with its state.
    pub async fn report(&self) -> (StatusCode, String) {
        let upstream = self.check();
        let stores = async {
            match &self.storage {
                Some(storage) => storage.check_drivers(PROBE_TIMEOUT).await,
                None => Vec::new(),
            }
        };
        let (upstream, stores) = tokio::join!(upstream, stores);
        let mut lines = Vec::new();
        let mut down = Vec::new();
        lines.push(match &upstream {
            Ok(()) => format!("upstream {}: ok", self.upstream),
            Err(problem) => format!("upstream {}: unavailable ({problem})", self.upstream),
        });
        for key in self.codec.iter().flat_map(PayloadCodec::key_services) {
            let name = format!("kms {} ({})", key.key_id, key.provider);
            let since = key
                .since
                .map(|d| format!(" for {}s", d.as_secs()))
                .unwrap_or_default();
            lines.push(match &key.state {
                KeyServiceState::Ok => format!("{name}: ok"),
                KeyServiceState::Unknown => format!("{name}: unknown (not asked yet)"),
                KeyServiceState::Unavailable(reason) => {
                    down.push(name.clone());
                    format!("{name}: unavailable ({reason}){since}")
                }
                KeyServiceState::Refused(reason) => {
                    down.push(name.clone());
                    format!("{name}: refused ({reason}){since}")
                }
            });
        }
        for (driver, state) in stores {
            let name = format!("storage {driver}");
            lines.push(match state {
                Ok(()) => format!("{name}: ok"),
                Err(reason) => {
                    down.push(name.clone());
                    format!("{name}: unavailable ({reason})")
                }
            });
        }
        let (status, head) = match upstream {
            Err(problem) => (
                StatusCode::SERVICE_UNAVAILABLE,
                format!("not ready: {problem}"),
            ),
            Ok(()) if down.is_empty() => (StatusCode::OK, "ready".to_owned()),
            Ok(()) => (
                StatusCode::OK,
                format!("ready (degraded: {} unavailable)", down.join(", ")),
            ),
        };
        let mut body = head;
        body.push('\n');
        for line in lines {
            body.push_str(&line);
            body.push('\n');
        }
        (status, body)
    }

    /// `Ok` when a TCP connection to the upstream opens within [`PROBE_TIMEOUT`].
    pub async fn check(&self) -> Result<(), String> {
        match tokio::time::timeout(
            PROBE_TIMEOUT,
            tokio::net::TcpStream::connect(&self.upstream),
        )
        .await
        {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(e)) => Err(format!("upstream {} unreachable: {e}", self.upstream)),
            Err(_) => Err(format!(
                "upstream {} did not answer within {PROBE_TIMEOUT:?}",
                self.upstream
            )),
        }
    }
}

/// Serves the admin endpoints on `listener` until `shutdown` resolves, then drains: the
/// listening socket closes, idle connections close, requests in flight finish for up to
/// `settings.shutdown_grace`.
pub async fn serve(
    listener: TcpListener,
    readiness: Readiness,
    settings: AdminSettings,
    shutdown: impl Future<Output = ()>,
) {
    let settings = ListenerSettings {
        name: "admin",
        tls: None,
        first_request_timeout: settings.first_request_timeout,
        connection_limit: settings.connection_limit,
        shutdown_grace: settings.shutdown_grace,
        connection_threads: 0,
    };
    crate::listener::serve(
        listener,
        move || Admin(readiness.clone()),
        settings,
        shutdown,
    )
    .await;
}

/// The admin endpoints over HTTP/1.1 or HTTP/2.
#[derive(Clone)]
struct Admin(Readiness);

impl Protocol for Admin {
    async fn serve<I>(self, io: TokioIo<I>, client: Client)
    where
        I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let marker = client.first.clone();
        let readiness = self.0;
        let service = hyper::service::service_fn(move |request: Request<Incoming>| {
            marker.seen();
            let readiness = readiness.clone();
            async move { Ok::<_, Infallible>(route(&request, &readiness).await) }
        });
        let mut builder = auto::Builder::new(TokioExecutor::new());
        builder
            .http1()
            .timer(TokioTimer::new())
            .header_read_timeout(FIRST_REQUEST_TIMEOUT);
        client
            .run(builder.serve_connection(io, service).into_owned())
            .await;
    }
}

async fn route(request: &Request<Incoming>, readiness: &Readiness) -> Response<Full<Bytes>> {
    if request.method() != Method::GET {
        return text(StatusCode::METHOD_NOT_ALLOWED, "use GET\n".to_owned());
    }
    match request.uri().path() {
        "/healthz" => text(StatusCode::OK, "ok\n".to_owned()),
        "/metrics" => {
            let mut response = text(StatusCode::OK, crate::metrics::metrics().render());
            response.headers_mut().insert(
                http::header::CONTENT_TYPE,
                http::HeaderValue::from_static(
                    "application/openmetrics-text; version=1.0.0; charset=utf-8",
                ),
            );
            response
        }
        "/readyz" | "/ready" => {
            let (status, body) = readiness.report().await;
            text(status, body)
        }
        _ => text(StatusCode::NOT_FOUND, "not found\n".to_owned()),
    }
}

fn text(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    response.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}
