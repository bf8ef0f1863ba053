//! The one listener behind every port the gateway serves: the gRPC port ([`crate::server`]),
//! the codec endpoint ([`crate::codec_server`]) and the admin endpoint ([`crate::admin`]).
//!
//! What every port gets from it, whatever it speaks:
//!
//! - a **connection cap** ([`ConnectionLimit`]): at the cap the listener stops accepting, so
//!   new clients wait in the kernel's backlog instead of taking descriptors and tasks;
//! - **accept-error backoff**: an accept error (out of descriptors, ...) waits 50 ms instead of
//!   spinning;
//! - **TLS** where configured, the handshake in the connection's own task (bounded by its
//!   handshake timeout) so a slow client never holds up the accept loop;
//! - a **first-request deadline** ([`FirstRequest`]): a connection that has delivered no
//!   complete request in time is closed (slow loris in the HTTP/2 preface, SETTINGS or a
//!   header block; HTTP/1 headers);
//! - **graceful drain**: at shutdown the listening socket closes, idle connections close,
//!   requests in flight finish for up to the shutdown grace period, then [`serve`] returns;
//! - optionally a **maximum connection age** ([`ConnectionAge`], `proxy.max_connection_age_ms`
//!   for the gRPC port): a connection past its age (jittered) is shut down gracefully (HTTP/2
//!   GOAWAY) so its client reconnects, through a load balancer, to any replica; requests in
//!   flight finish within the age's grace, then the connection is closed;
//! - optionally **connection threads** (`proxy.worker_threads` for the gRPC port): each
//!   connection is served on one of several single-threaded runtimes, round robin.
//!
//! What a port speaks is its [`Protocol`]: it builds the hyper connection for an accepted
//! stream and hands it to [`Client::run`].

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use hyper_util::rt::TokioIo;
use hyper_util::server::graceful::GracefulConnection;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, watch};
use tokio::time::Instant;

use crate::metrics::metrics;

use crate::auth::client_cert::ClientIdentity;
use crate::tls::TlsAcceptor;

/// How long an accept error waits before the next accept.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(50);

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
struct Admitted {
    stream: TcpStream,
    peer: SocketAddr,
    permit: OwnedSemaphorePermit,
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

    /// Connections open now under this limit.
    pub fn open(&self) -> usize {
        self.max - self.permits.available_permits()
    }

    /// Waits for room under the cap, then for the next connection on `listener`; `None` once
    /// `shutdown` resolves. Accept errors (out of file descriptors and the like) back off for
    /// [`ACCEPT_BACKOFF`] instead of spinning.
    async fn accept<F>(&self, listener: &TcpListener, mut shutdown: Pin<&mut F>) -> Option<Admitted>
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
                        tokio::select! {
                            () = tokio::time::sleep(ACCEPT_BACKOFF) => {}
                            () = shutdown.as_mut() => return None,
                        }
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

/// Starts the graceful shutdown of every connection of a listener and waits for them to end
/// (what hyper-util's `GracefulShutdown` does, with the signal also readable per connection,
/// so a connection can be shut down gracefully for its age as well).
struct Drain {
    tx: watch::Sender<()>,
}

/// One connection's view of its listener's [`Drain`]; the drain waits until every one has
/// been dropped.
struct Watcher {
    rx: watch::Receiver<()>,
}

impl Drain {
    fn new() -> Self {
        Self {
            tx: watch::channel(()).0,
        }
    }

    fn watcher(&self) -> Watcher {
        Watcher {
            rx: self.tx.subscribe(),
        }
    }

    /// Signals every connection to shut down gracefully and waits until all have ended.
    async fn shutdown(self) {
        let _ = self.tx.send(());
        self.tx.closed().await;
    }
}

/// `proxy.max_connection_age_ms` and its grace: when a connection is shut down gracefully
/// for its age, and how long its requests may still run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnectionAge {
    /// The age (before jitter) after which a connection gets a graceful shutdown (GOAWAY).
    pub max_age: Duration,
    /// How long requests in flight may still run after it; then the connection is closed.
    pub grace: Duration,
}

impl ConnectionAge {
    /// From the settings in milliseconds; `None` when `max_age_ms` is 0 (off).
    pub fn from_millis(max_age_ms: u64, grace_ms: u64) -> Option<Self> {
        (max_age_ms > 0).then(|| Self {
            max_age: Duration::from_millis(max_age_ms),
            grace: Duration::from_millis(grace_ms),
        })
    }

    /// The age of one connection: `max_age` ±10 %, uniformly, so the connections a fleet of
    /// clients opened together do not all reconnect in the same instant.
    pub fn jittered(&self) -> Duration {
        let mut bytes = [0u8; 4];
        let random = ring::rand::SystemRandom::new();
        // Without randomness (never on a working system) the age is not jittered.
        let unit = match ring::rand::SecureRandom::fill(&random, &mut bytes) {
            Ok(()) => f64::from(u32::from_le_bytes(bytes)) / f64::from(u32::MAX),
            Err(_) => 0.5,
        };
        jitter(self.max_age, unit)
    }
}

/// `age` scaled by a factor in `[0.9, 1.1]` picked by `unit` in `[0, 1]`.
fn jitter(age: Duration, unit: f64) -> Duration {
    age.mul_f64(0.9 + 0.2 * unit.clamp(0.0, 1.0))
}

/// Marks that a connection has delivered a request.
#[derive(Debug, Clone, Default)]
pub struct FirstRequest(Arc<AtomicBool>);

impl FirstRequest {
    /// Called for every request the connection delivers.
    pub fn seen(&self) {
        self.0.store(true, Ordering::Relaxed);
    }

    /// Runs `connection`, but drops it (closing the socket) when no complete request has
    /// arrived within `timeout`: a client that stalls inside the HTTP/2 preface, its SETTINGS
    /// or a HEADERS block would otherwise hold a descriptor and a task forever (slow loris).
    /// Connections that delivered a request are left to their protocol's keep-alive.
    pub async fn deadline<F, E>(self, connection: F, timeout: Duration) -> Result<(), E>
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

/// Settings of one listener.
#[derive(Debug, Clone)]
pub struct ListenerSettings {
    /// Names the listener in logs (its config section).
    pub name: &'static str,
    /// TLS toward clients; `None`: cleartext.
    pub tls: Option<TlsAcceptor>,
    /// A connection that has sent no complete request by then (after its TLS handshake) is
    /// closed.
    pub first_request_timeout: Duration,
    /// Caps the connections open at once.
    pub connection_limit: ConnectionLimit,
    /// How long requests in flight may run after shutdown begins.
    pub shutdown_grace: Duration,
    /// Event-loop threads serving connections, each with its own single-threaded runtime
    /// and its own [`Protocol`] value; `0`: connections are tasks of the calling runtime.
    pub connection_threads: usize,
}

/// An accepted (and, with TLS, handshaken) connection as its [`Protocol`] sees it.
pub struct Client {
    /// The peer's address.
    pub peer: SocketAddr,
    /// The identity of the peer's verified TLS client certificate, if any.
    pub identity: Option<Arc<ClientIdentity>>,
    /// Mark it ([`FirstRequest::seen`]) for every request the connection delivers.
    pub first: FirstRequest,
    first_request_timeout: Duration,
    watcher: Watcher,
    age: Option<ConnectionAge>,
    listener: &'static str,
}

impl Client {
    /// Serves `connection` to its end: under the listener's graceful shutdown, its maximum
    /// connection age and the first-request deadline.
    pub async fn run<C>(self, connection: C)
    where
        C: GracefulConnection,
        C::Error: std::fmt::Display,
    {
        let connection = drive(connection, self.watcher, self.age, self.peer);
        if let Err(e) = self
            .first
            .deadline(connection, self.first_request_timeout)
            .await
        {
            tracing::debug!(peer = %self.peer, listener = self.listener, error = %e, "connection ended with an error");
        }
    }
}

/// Sleeps until `at`, forever when `None`.
async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// Runs `connection` to its end. When the listener drains, or when the connection reaches
/// its `age`, it is shut down gracefully (HTTP/2: GOAWAY, requests in flight finish, no new
/// ones); past the age's grace it is dropped (closed) with whatever still runs.
async fn drive<C>(
    connection: C,
    mut watcher: Watcher,
    age: Option<ConnectionAge>,
    peer: SocketAddr,
) -> Result<(), C::Error>
where
    C: GracefulConnection,
{
    tokio::pin!(connection);
    let aged_at = age.map(|age| Instant::now() + age.jittered());
    let mut shutting_down = false;
    let mut grace_ends: Option<Instant> = None;
    loop {
        tokio::select! {
            result = connection.as_mut() => {
                if grace_ends.is_some() {
                    metrics().count_closed_by_age("drained");
                }
                return result;
            }
            // The listener drains (or is gone): hold the watcher until the connection ends.
            _ = watcher.rx.changed(), if !shutting_down => {
                shutting_down = true;
                connection.as_mut().graceful_shutdown();
            }
            () = sleep_until(aged_at), if !shutting_down => {
                shutting_down = true;
                tracing::debug!(%peer, "connection reached proxy.max_connection_age_ms: GOAWAY");
                connection.as_mut().graceful_shutdown();
                grace_ends = age.map(|age| Instant::now() + age.grace);
            }
            () = sleep_until(grace_ends) => {
                tracing::debug!(%peer, "connection still busy at the end of proxy.max_connection_age_grace_ms: closed");
                metrics().count_closed_by_age("grace_expired");
                return Ok(());
            }
        }
    }
}

/// What a listener speaks on the connections it accepts.
pub trait Protocol: Clone + Send + 'static {
    /// Serves one connection: builds the hyper connection over `io`, marks
    /// [`Client::first`] for every request, and hands the connection to [`Client::run`].
    fn serve<I>(self, io: TokioIo<I>, client: Client) -> impl Future<Output = ()> + Send
    where
        I: AsyncRead + AsyncWrite + Unpin + Send + 'static;
}

/// A connection on its way to the thread that serves it: a std socket, so it is registered
/// with that thread's I/O driver (a tokio socket stays bound to the runtime that accepted it,
/// and every wake-up would cross threads again).
struct Handover {
    stream: std::net::TcpStream,
    peer: SocketAddr,
    permit: OwnedSemaphorePermit,
    watcher: Watcher,
}

/// What serving a connection needs besides the connection: the same for every connection of
/// a thread.
#[derive(Clone)]
struct ConnectionServer<P> {
    protocol: P,
    tls: Option<TlsAcceptor>,
    first_request_timeout: Duration,
    age: Option<ConnectionAge>,
    name: &'static str,
}

impl<P: Protocol> ConnectionServer<P> {
    /// Serves one accepted connection to its end (TLS handshake first, when configured).
    async fn serve(
        self,
        stream: TcpStream,
        peer: SocketAddr,
        permit: OwnedSemaphorePermit,
        watcher: Watcher,
    ) {
        let _permit = permit;
        let _ = stream.set_nodelay(true);
        let mut client = Client {
            peer,
            identity: None,
            first: FirstRequest::default(),
            first_request_timeout: self.first_request_timeout,
            watcher,
            age: self.age,
            listener: self.name,
        };
        match self.tls {
            Some(tls) => {
                let Some(stream) = tls.handshake(stream, peer).await else {
                    return;
                };
                client.identity = stream
                    .get_ref()
                    .1
                    .peer_certificates()
                    .and_then(|chain| chain.first())
                    .and_then(|leaf| ClientIdentity::from_der(leaf.as_ref()));
                self.protocol.serve(TokioIo::new(stream), client).await;
            }
            None => self.protocol.serve(TokioIo::new(stream), client).await,
        }
    }

    /// [`serve`](Self::serve) for a connection handed over from the accepting runtime.
    async fn serve_handover(self, handover: Handover) {
        let Handover {
            stream,
            peer,
            permit,
            watcher,
        } = handover;
        match TcpStream::from_std(stream) {
            Ok(stream) => self.serve(stream, peer, permit, watcher).await,
            Err(e) => {
                tracing::debug!(%peer, listener = self.name, error = %e, "cannot serve an accepted connection");
            }
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
    senders: Vec<tokio::sync::mpsc::UnboundedSender<Handover>>,
    next: usize,
}

impl ConnectionThreads {
    /// Starts `count` threads, each serving with its own protocol value from `make_protocol`.
    fn start<F, P>(count: usize, make_protocol: &F, template: &ConnectionServer<()>) -> Self
    where
        F: Fn() -> P,
        P: Protocol,
    {
        let mut senders = Vec::with_capacity(count);
        for index in 0..count {
            let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<Handover>();
            let server = template.with_protocol(make_protocol());
            let runtime = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(runtime) => runtime,
                Err(e) => {
                    tracing::warn!(listener = template.name, error = %e, "cannot build a connection thread's runtime: serving on the main runtime");
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
                                    Some(handover) => {
                                        connections.spawn(server.clone().serve_handover(handover));
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
                    tracing::warn!(listener = template.name, error = %e, "cannot start a connection thread: serving on the main runtime");
                    break;
                }
            }
        }
        Self { senders, next: 0 }
    }

    /// Hands `handover` to the next thread; gives it back when no thread takes it.
    fn dispatch(&mut self, mut handover: Handover) -> Option<Handover> {
        for _ in 0..self.senders.len() {
            let index = self.next % self.senders.len();
            self.next = self.next.wrapping_add(1);
            match self.senders[index].send(handover) {
                Ok(()) => return None,
                Err(returned) => handover = returned.0,
            }
        }
        Some(handover)
    }
}

impl ConnectionServer<()> {
    /// The same settings, speaking `protocol`.
    fn with_protocol<P>(&self, protocol: P) -> ConnectionServer<P> {
        ConnectionServer {
            protocol,
            tls: self.tls.clone(),
            first_request_timeout: self.first_request_timeout,
            age: self.age,
            name: self.name,
        }
    }
}

/// Serves `listener` until `shutdown` resolves, then drains: the listening socket closes,
/// idle connections close, requests in flight finish for up to `settings.shutdown_grace`.
/// `make_protocol` builds what each connection thread (and the calling runtime, if a
/// connection is served there) speaks.
pub async fn serve<F, P>(
    listener: TcpListener,
    make_protocol: F,
    settings: ListenerSettings,
    shutdown: impl Future<Output = ()>,
) where
    F: Fn() -> P,
    P: Protocol,
{
    serve_with_age(listener, make_protocol, settings, None, shutdown).await;
}

/// [`serve`], with every connection shut down gracefully once it reaches `age` (`None`:
/// connections live as long as their clients keep them).
pub async fn serve_with_age<F, P>(
    listener: TcpListener,
    make_protocol: F,
    settings: ListenerSettings,
    age: Option<ConnectionAge>,
    shutdown: impl Future<Output = ()>,
) where
    F: Fn() -> P,
    P: Protocol,
{
    let graceful = Drain::new();
    let template = ConnectionServer {
        protocol: (),
        tls: settings.tls.clone(),
        first_request_timeout: settings.first_request_timeout,
        age,
        name: settings.name,
    };
    let mut threads =
        ConnectionThreads::start(settings.connection_threads, &make_protocol, &template);
    // Built on the first connection no thread takes (with threads: normally never).
    let mut local = None;
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
        metrics().count_connection(settings.name);
        let watcher = graceful.watcher();
        let (stream, permit, watcher) = if threads.senders.is_empty() {
            (stream, permit, watcher)
        } else {
            let stream = match stream.into_std() {
                Ok(stream) => stream,
                Err(e) => {
                    tracing::debug!(%peer, listener = settings.name, error = %e, "cannot hand an accepted connection over");
                    continue;
                }
            };
            let handover = Handover {
                stream,
                peer,
                permit,
                watcher,
            };
            let Some(Handover {
                stream,
                permit,
                watcher,
                ..
            }) = threads.dispatch(handover)
            else {
                continue;
            };
            match TcpStream::from_std(stream) {
                Ok(stream) => (stream, permit, watcher),
                Err(e) => {
                    tracing::debug!(%peer, listener = settings.name, error = %e, "cannot serve an accepted connection");
                    continue;
                }
            }
        };
        // No connection thread (none configured, or none could start): a task here.
        let local = local.get_or_insert_with(|| template.with_protocol(make_protocol()));
        tokio::spawn(local.clone().serve(stream, peer, permit, watcher));
    }
    drop(listener);
    // Closing the channels lets each thread end once its connections are done.
    drop(threads);
    tracing::info!(
        listener = settings.name,
        "listener closed; waiting for in-flight requests"
    );
    if tokio::time::timeout(settings.shutdown_grace, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!(
            listener = settings.name,
            grace_ms = settings.shutdown_grace.as_millis() as u64,
            "requests still running after the shutdown grace period"
        );
    }
}

#[cfg(test)]
mod age_tests {
    use super::*;

    #[test]
    fn the_age_is_jittered_within_ten_percent() {
        let age = ConnectionAge::from_millis(10_000, 1_000).unwrap();
        assert_eq!(jitter(age.max_age, 0.0), Duration::from_millis(9_000));
        assert_eq!(jitter(age.max_age, 1.0), Duration::from_millis(11_000));
        assert_eq!(jitter(age.max_age, 0.5), Duration::from_millis(10_000));
        let ages: Vec<Duration> = (0..200).map(|_| age.jittered()).collect();
        assert!(
            ages.iter()
                .all(|a| *a >= Duration::from_millis(9_000) && *a <= Duration::from_millis(11_000))
        );
        // Spread, not one value for everyone.
        let low = ages
            .iter()
            .filter(|a| **a < Duration::from_millis(9_900))
            .count();
        let high = ages
            .iter()
            .filter(|a| **a > Duration::from_millis(10_100))
            .count();
        assert!(low > 20 && high > 20, "{low} below, {high} above");
        assert_eq!(ConnectionAge::from_millis(0, 1_000), None);
    }
}
