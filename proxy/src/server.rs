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
    /// Event-loop threads that serve client connections (`proxy.worker_threads`, resolved):
    /// each connection lives on one of them with everything its RPCs do, including their
    /// own upstream connection. `0`: connections are tasks of the calling runtime.
    pub connection_threads: usize,
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

/// A connection on its way to the thread that serves it: a std socket, so it is registered
/// with that thread's I/O driver (a tokio socket stays bound to the runtime that accepted it,
/// and every wake-up would cross threads again).
struct Accepted {
    stream: std::net::TcpStream,
    peer: SocketAddr,
    permit: OwnedSemaphorePermit,
    watcher: hyper_util::server::graceful::Watcher,
}

impl Accepted {
    fn new(admitted: Admitted, watcher: hyper_util::server::graceful::Watcher) -> Option<Self> {
        let Admitted {
            stream,
            peer,
            permit,
        } = admitted;
        match stream.into_std() {
            Ok(stream) => Some(Self {
                stream,
                peer,
                permit,
                watcher,
            }),
            Err(e) => {
                tracing::debug!(%peer, error = %e, "cannot hand an accepted connection over");
                None
            }
        }
    }
}

/// What serving a connection needs besides the connection: the same for every connection of
/// a thread.
#[derive(Clone)]
struct ConnectionServer<S> {
    service: S,
    http: hyper::server::conn::http2::Builder<TokioExecutor>,
    tls: Option<TlsAcceptor>,
    first_request_timeout: Duration,
}

impl ConnectionServer<()> {
    /// The same settings, serving with `service`.
    fn with_service<S>(&self, service: S) -> ConnectionServer<S> {
        ConnectionServer {
            service,
            http: self.http.clone(),
            tls: self.tls.clone(),
            first_request_timeout: self.first_request_timeout,
        }
    }
}

impl<S> ConnectionServer<S>
where
    S: Service<Request<GatewayBody>, Response = Response<GatewayBody>, Error = Infallible>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
{
    /// Serves one accepted connection to its end (TLS handshake first, when configured).
    async fn serve(self, accepted: Accepted) {
        let Accepted {
            stream,
            peer,
            permit,
            watcher,
        } = accepted;
        let _permit = permit;
        let stream = match TcpStream::from_std(stream) {
            Ok(stream) => stream,
            Err(e) => {
                tracing::debug!(%peer, error = %e, "cannot serve an accepted connection");
                return;
            }
        };
        let _ = stream.set_nodelay(true);
        let first = FirstRequest::default();
        let marker = first.clone();
        let service = self.service;
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
        let timeout = self.first_request_timeout;
        let result = match self.tls {
            Some(tls) => {
                let Some(stream) = tls.handshake(stream, peer).await else {
                    return;
                };
                let identity = stream
                    .get_ref()
                    .1
                    .peer_certificates()
                    .and_then(|chain| chain.first())
                    .and_then(|leaf| ClientIdentity::from_der(leaf.as_ref()));
                let connection = watcher.watch(
                    self.http
                        .serve_connection(TokioIo::new(stream), make_service(identity)),
                );
                first.deadline(connection, timeout).await
            }
            None => {
                let connection = watcher.watch(
                    self.http
                        .serve_connection(TokioIo::new(stream), make_service(None)),
                );
                first.deadline(connection, timeout).await
            }
        };
        if let Err(e) = result {
            tracing::debug!(%peer, error = %e, "client connection ended with an error");
        }
    }
}

/// Hands accepted connections to event-loop threads, round robin.
///
/// Why threads of their own: on one multi-threaded runtime a connection's stream tasks, the
/// upstream connection task and the I/O driver land on different workers, and every RPC
/// then pays for cross-thread wake-ups (futex, eventfd, an extra epoll round) — about half
/// the RPCs did. On a thread of its own, a connection and the upstream connection its RPCs
/// use (each thread has its own pool) never leave that thread, as in nginx's workers; more
/// client connections spread over the threads. Work that would stall the thread (codec
/// batches above the parallel threshold) still goes to the blocking pool.
struct ConnectionThreads {
    senders: Vec<tokio::sync::mpsc::UnboundedSender<Accepted>>,
    next: usize,
}

impl ConnectionThreads {
    /// Starts `count` threads, each serving with its own service from `make_service`.
    fn start<F, S>(count: usize, make_service: &F, template: &ConnectionServer<()>) -> Self
    where
        F: Fn() -> S,
        S: Service<Request<GatewayBody>, Response = Response<GatewayBody>, Error = Infallible>
            + Clone
            + Send
            + 'static,
        S::Future: Send + 'static,
    {
        let mut senders = Vec::with_capacity(count);
        for index in 0..count {
            let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<Accepted>();
            let server = template.with_service(make_service());
            let runtime = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(runtime) => runtime,
                Err(e) => {
                    tracing::warn!(error = %e, "cannot build a connection thread's runtime: serving on the main runtime");
                    break;
                }
            };
            let spawned = std::thread::Builder::new()
                .name(format!("pgw-conn-{index}"))
                .spawn(move || {
                    runtime.block_on(async move {
                        let mut connections = tokio::task::JoinSet::new();
                        loop {
                            tokio::select! {
                                Some(_) = connections.join_next(), if !connections.is_empty() => {}
                                next = rx.recv() => match next {
                                    Some(accepted) => {
                                        connections.spawn(server.clone().serve(accepted));
                                    }
                                    None => break,
                                },
                            }
                        }
                        // The listener is closed: finish what is in flight (bounded by the
                        // shutdown grace period, after which the process exits).
                        while connections.join_next().await.is_some() {}
                    });
                });
            match spawned {
                Ok(_) => senders.push(tx),
                Err(e) => {
                    tracing::warn!(error = %e, "cannot start a connection thread: serving on the main runtime");
                    break;
                }
            }
        }
        Self { senders, next: 0 }
    }

    /// Hands `accepted` to the next thread; gives it back when no thread takes it.
    fn dispatch(&mut self, mut accepted: Accepted) -> Option<Accepted> {
        for _ in 0..self.senders.len() {
            let index = self.next % self.senders.len();
            self.next = self.next.wrapping_add(1);
            match self.senders[index].send(accepted) {
                Ok(()) => return None,
                Err(returned) => accepted = returned.0,
            }
        }
        Some(accepted)
    }
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
    let template = ConnectionServer {
        service: (),
        http,
        tls: settings.tls.clone(),
        first_request_timeout: settings.first_request_timeout,
    };
    let mut threads =
        ConnectionThreads::start(settings.connection_threads, &make_service, &template);
    // Built on the first connection no thread takes (normally never: no pool of its own).
    let mut local = None;
    tokio::pin!(shutdown);
    while let Some(admitted) = settings
        .connection_limit
        .accept(&listener, shutdown.as_mut())
        .await
    {
        let Some(accepted) = Accepted::new(admitted, graceful.watcher()) else {
            continue;
        };
        if let Some(accepted) = threads.dispatch(accepted) {
            // No connection thread (none configured, or none could start): a task here.
            let local = local.get_or_insert_with(|| template.with_service(make_service()));
            tokio::spawn(local.clone().serve(accepted));
        }
    }
    drop(listener);
    // Closing the channels lets each thread end once its connections are done.
    drop(threads);
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
