//! The client-facing gRPC listener: HTTP/2 connections (cleartext, or TLS with `[proxy.tls]`)
//! served by hyper, each request handed to the gateway's tower service. Accepting is separate
//! from serving a connection so the TLS handshake runs in between.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use http::{Request, Response};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tower::{Service, ServiceExt};

use crate::auth::client_cert::ClientIdentity;
use crate::grpc::GatewayBody;
use crate::tls::TlsAcceptor;

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
}

/// Caps how many connections a listener holds open at once. At the cap the listener stops
/// accepting, so new clients wait in the kernel's backlog (and time out there) instead of
/// taking descriptors, tasks and buffers without bound.
#[derive(Debug, Clone)]
pub struct ConnectionLimit {
    permits: Arc<Semaphore>,
    max: usize,
    /// The config key, for the log line at the cap.
    key: &'static str,
}

/// A connection accepted under a [`ConnectionLimit`]: it holds its place until `permit` drops.
pub(crate) struct Admitted {
    pub(crate) stream: TcpStream,
    pub(crate) peer: SocketAddr,
    pub(crate) permit: OwnedSemaphorePermit,
}

impl ConnectionLimit {
    /// At most `max` connections (`0`: no cap); `key` names the setting in logs.
    pub fn new(max: usize, key: &'static str) -> Self {
        let max = if max == 0 {
            Semaphore::MAX_PERMITS
        } else {
            max
        };
        Self {
            permits: Arc::new(Semaphore::new(max)),
            max,
            key,
        }
    }

    /// Waits for room under the cap, then for the next connection on `listener`; `None` once
    /// `shutdown` resolves. Accept errors (out of file descriptors and the like) back off for
    /// 50 ms instead of spinning.
    pub(crate) async fn accept<F>(
        &self,
        listener: &TcpListener,
        mut shutdown: Pin<&mut F>,
    ) -> Option<Admitted>
    where
        F: Future<Output = ()>,
    {
        loop {
            let permit = tokio::select! {
                permit = self.admit() => permit,
                () = shutdown.as_mut() => return None,
            };
            tokio::select! {
                accepted = listener.accept() => match accepted {
                    Ok((stream, peer)) => return Some(Admitted { stream, peer, permit }),
                    Err(e) => {
                        tracing::warn!(listener = self.key, error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                },
                () = shutdown.as_mut() => return None,
            }
        }
    }

    /// Waits for room for one more connection; the connection holds the permit until it ends.
    async fn admit(&self) -> OwnedSemaphorePermit {
        if let Ok(permit) = self.permits.clone().try_acquire_owned() {
            return permit;
        }
        tracing::warn!(
            max = self.max,
            setting = self.key,
            "connection limit reached: not accepting until a connection closes"
        );
        self.permits
            .clone()
            .acquire_owned()
            .await
            .expect("the semaphore is never closed")
    }
}

/// Marks that a connection has delivered a request.
#[derive(Debug, Clone, Default)]
pub(crate) struct FirstRequest(Arc<AtomicBool>);

impl FirstRequest {
    /// Called for every request the connection delivers.
    pub(crate) fn seen(&self) {
        self.0.store(true, Ordering::Relaxed);
    }

    /// Runs `connection`, but drops it (closing the socket) when no complete request has
    /// arrived within `timeout`: a client that stalls inside the HTTP/2 preface, its SETTINGS
    /// or a HEADERS block would otherwise hold a descriptor and a task forever (slow loris).
    /// Connections that delivered a request are left to HTTP/2 keep-alive.
    pub(crate) async fn deadline<F, E>(self, connection: F, timeout: Duration) -> Result<(), E>
    where
        F: Future<Output = Result<(), E>>,
    {
        tokio::pin!(connection);
        tokio::select! {
            result = &mut connection => return result,
            () = tokio::time::sleep(timeout) => {}
        }
        if self.0.load(Ordering::Relaxed) {
            connection.await
        } else {
            tracing::debug!(
                timeout_ms = timeout.as_millis() as u64,
                "closing a connection that sent no request in time"
            );
            Ok(())
        }
    }
}

/// Serves gRPC on `listener` until `shutdown` resolves, then lets in-flight requests finish for
/// up to `settings.shutdown_grace`.
pub async fn serve<S>(
    listener: TcpListener,
    service: S,
    settings: ServerSettings,
    shutdown: impl Future<Output = ()>,
) where
    S: Service<Request<GatewayBody>, Response = Response<GatewayBody>, Error = Infallible>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
{
    let graceful = GracefulShutdown::new();
    let mut http = hyper::server::conn::http2::Builder::new(TokioExecutor::new());
    http.timer(TokioTimer::new())
        .initial_stream_window_size(4 * 1024 * 1024)
        .initial_connection_window_size(16 * 1024 * 1024)
        .max_frame_size(1024 * 1024)
        .max_send_buf_size(4 * 1024 * 1024)
        .max_header_list_size(1024 * 1024)
        .keep_alive_interval(Some(Duration::from_secs(60)))
        .keep_alive_timeout(Duration::from_secs(20));
    tokio::pin!(shutdown);
    while let Some(Admitted {
        stream,
        peer,
        permit,
    }) = settings
        .connection_limit
        .accept(&listener, shutdown.as_mut())
        .await
    {
        let _ = stream.set_nodelay(true);
        let service = service.clone();
        let first = FirstRequest::default();
        let marker = first.clone();
        // Every request of the connection carries the identity of its verified client
        // certificate, if any (for `[proxy.auth]`).
        let make_service = move |identity: Option<Arc<ClientIdentity>>| {
            hyper::service::service_fn(move |request: Request<Incoming>| {
                marker.seen();
                let mut request = request.map(GatewayBody::new);
                if let Some(identity) = &identity {
                    request.extensions_mut().insert(identity.clone());
                }
                service.clone().oneshot(request)
            })
        };
        let timeout = settings.first_request_timeout;
        if let Some(tls) = settings.tls.clone() {
            // The handshake runs in the connection's task so a slow client never holds up the
            // accept loop; the watcher keeps shutdown waiting for it (bounded by its timeout).
            let watcher = graceful.watcher();
            let http = http.clone();
            tokio::spawn(async move {
                let _permit = permit;
                let Some(stream) = tls.handshake(stream, peer).await else {
                    return;
                };
                let identity = stream
                    .get_ref()
                    .1
                    .peer_certificates()
                    .and_then(|chain| chain.first())
                    .and_then(|leaf| ClientIdentity::from_der(leaf.as_ref()));
                let hyper_service = make_service(identity);
                let connection =
                    watcher.watch(http.serve_connection(TokioIo::new(stream), hyper_service));
                if let Err(e) = first.deadline(connection, timeout).await {
                    tracing::debug!(%peer, error = %e, "client connection ended with an error");
                }
            });
            continue;
        }
        let connection =
            graceful.watch(http.serve_connection(TokioIo::new(stream), make_service(None)));
        tokio::spawn(async move {
            let _permit = permit;
            if let Err(e) = first.deadline(connection, timeout).await {
                tracing::debug!(%peer, error = %e, "client connection ended with an error");
            }
        });
    }
    drop(listener);
    tracing::info!("listener closed; waiting for in-flight requests");
    if tokio::time::timeout(settings.shutdown_grace, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!(
            grace_ms = settings.shutdown_grace.as_millis() as u64,
            "in-flight requests still running after the shutdown grace period"
        );
    }
}
