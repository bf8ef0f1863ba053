//! The admin HTTP listener: `/metrics` (Prometheus), `/healthz` (the process is alive) and
//! `/readyz` (the upstream accepts connections). Served on the gateway's one
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

use crate::config::{AdminConfig, ProxyConfig};
use crate::listener::{Client, ConnectionLimit, ListenerSettings, Protocol};

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

/// What `/readyz` checks.
#[derive(Debug, Clone)]
pub struct Readiness {
    /// The upstream's `host:port`.
    pub upstream: String,
}

impl Readiness {
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
        "/readyz" => match readiness.check().await {
            Ok(()) => text(StatusCode::OK, "ready\n".to_owned()),
            Err(problem) => text(
                StatusCode::SERVICE_UNAVAILABLE,
                format!("not ready: {problem}\n"),
            ),
        },
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
