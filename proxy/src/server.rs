//! The client-facing gRPC listener: HTTP/2 connections (cleartext, or TLS with `[proxy.tls]`)
//! served by hyper on the gateway's one [`listener`](crate::listener), each request handed to
//! the gateway's tower service.

use std::convert::Infallible;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use http::{Request, Response};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpListener;
use tower::{Service, ServiceExt};

use crate::auth::client_cert::ClientIdentity;
use crate::grpc::GatewayBody;
use crate::listener::{Client, ConnectionAge, ListenerSettings, Protocol};
use crate::tls::TlsAcceptor;

pub use crate::listener::ConnectionLimit;

/// The most a client stream's HTTP/2 send buffer holds (hyper's `max_send_buf_size`): what
/// hyper hands h2 for one stream beyond what the client has room for. It bounds what a
/// streamed (not rewritten) response and the pieces of a rewritten one hold per stream
/// outside the memory budget; 1 MiB keeps a fast client's pipe full.
pub const MAX_SEND_BUF_SIZE: usize = 1024 * 1024;

/// HTTP/2 settings toward clients.
#[derive(Debug, Clone)]
pub struct ServerSettings {
    /// How long in-flight requests may run after shutdown begins.
    pub shutdown_grace: Duration,
    /// TLS toward clients (`[proxy.tls]`); `None`: cleartext HTTP/2.
    pub tls: Option<TlsAcceptor>,
    /// A connection that has sent no complete request by then is closed.
    pub first_request_timeout: Duration,
    /// Caps the connections open at once.
    pub connection_limit: ConnectionLimit,
    /// Event-loop threads that serve client connections (`proxy.worker_threads`, resolved):
    /// each connection lives on one of them with everything its RPCs do, including their
    /// own upstream connection. `0`: connections are tasks of the calling runtime.
    pub connection_threads: usize,
    /// `proxy.max_connection_age_ms` and its grace; `None`: off.
    pub max_connection_age: Option<ConnectionAge>,
}

/// gRPC over HTTP/2 with one service stack per connection thread.
#[derive(Clone)]
struct Grpc<S> {
    service: S,
    http: hyper::server::conn::http2::Builder<TokioExecutor>,
}

impl<S> Protocol for Grpc<S>
where
    S: Service<Request<GatewayBody>, Response = Response<GatewayBody>, Error = Infallible>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
{
    async fn serve<I>(self, io: TokioIo<I>, client: Client)
    where
        I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let marker = client.first.clone();
        // Every request of the connection carries the identity of its verified client
        // certificate, if any (for `[proxy.auth]`).
        let identity: Option<Arc<ClientIdentity>> = client.identity.clone();
        let service = self.service;
        let service = hyper::service::service_fn(move |request: Request<Incoming>| {
            marker.seen();
            let mut request = request.map(GatewayBody::new);
            if let Some(identity) = &identity {
                request.extensions_mut().insert(identity.clone());
            }
            service.clone().oneshot(request)
        });
        client.run(self.http.serve_connection(io, service)).await;
    }
}

/// The HTTP/2 settings of the gRPC listener.
fn http2() -> hyper::server::conn::http2::Builder<TokioExecutor> {
    let mut http = hyper::server::conn::http2::Builder::new(TokioExecutor::new());
    http.timer(TokioTimer::new())
        .initial_stream_window_size(4 * 1024 * 1024)
        .initial_connection_window_size(16 * 1024 * 1024)
        .max_frame_size(1024 * 1024)
        // Bounds what h2 buffers per stream for a client that does not read: see
        // MAX_SEND_BUF_SIZE. (hyper's own default is 400 KiB.)
        .max_send_buf_size(MAX_SEND_BUF_SIZE)
        // hyper's default, stated: with MAX_SEND_BUF_SIZE it bounds what one connection
        // holds outside the memory budget (200 x (1 MiB + 2 pieces)).
        .max_concurrent_streams(200)
        .max_header_list_size(1024 * 1024)
        .keep_alive_interval(Some(Duration::from_secs(60)))
        .keep_alive_timeout(Duration::from_secs(20));
    http
}

/// Serves gRPC on `listener` until `shutdown` resolves, then lets in-flight requests finish for
/// up to `settings.shutdown_grace`. `make_service` builds the service stack of each connection
/// thread (and of the calling runtime), so each has its own upstream pool.
pub async fn serve<F, S>(
    listener: TcpListener,
    make_service: F,
    settings: ServerSettings,
    shutdown: impl Future<Output = ()>,
) where
    F: Fn() -> S,
    S: Service<Request<GatewayBody>, Response = Response<GatewayBody>, Error = Infallible>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
{
    let http = http2();
    let age = settings.max_connection_age;
    let make_protocol = move || Grpc {
        service: make_service(),
        http: http.clone(),
    };
    let settings = ListenerSettings {
        name: "proxy.listen",
        tls: settings.tls,
        first_request_timeout: settings.first_request_timeout,
        connection_limit: settings.connection_limit,
        shutdown_grace: settings.shutdown_grace,
        connection_threads: settings.connection_threads,
    };
    crate::listener::serve_with_age(listener, make_protocol, settings, age, shutdown).await;
}
