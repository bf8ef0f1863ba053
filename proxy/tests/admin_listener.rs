//! The admin listener on the gateway's one listener (issue 22, item 5): its connection cap,
//! first-request deadline and graceful drain at shutdown. Before, `admin::serve` accepted
//! without a limit, never closed an idle connection and dropped everything at shutdown.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use payload_gateway::admin::{self, AdminSettings, Readiness};
use payload_gateway::listener::ConnectionLimit;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// A running admin listener and the switch that shuts it down.
struct Running {
    addr: SocketAddr,
    stop: watch::Sender<bool>,
    task: JoinHandle<()>,
}

async fn start(max_connections: usize, first_request: Duration, upstream: String) -> Running {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, stopped) = watch::channel(false);
    let settings = AdminSettings {
        connection_limit: ConnectionLimit::new(max_connections, "admin.max_connections"),
        first_request_timeout: first_request,
        shutdown_grace: Duration::from_secs(5),
    };
    let task = tokio::spawn(admin::serve(
        listener,
        Readiness::new(upstream),
        settings,
        async move {
            let mut stopped = stopped;
            let _ = stopped.wait_for(|s| *s).await;
        },
    ));
    Running { addr, stop, task }
}

/// Sends one HTTP/1.1 request for `path` on `stream` (keep-alive).
async fn send(stream: &mut TcpStream, path: &str) {
    stream
        .write_all(format!("GET {path} HTTP/1.1\r\nhost: admin\r\n\r\n").as_bytes())
        .await
        .unwrap();
}

/// Reads one response (headers and its `content-length` body) within `within`; `None` if
/// nothing complete arrived by then.
async fn response(stream: &mut TcpStream, within: Duration) -> Option<String> {
    let mut got = Vec::new();
    let deadline = tokio::time::Instant::now() + within;
    loop {
        let text = String::from_utf8_lossy(&got).into_owned();
        if let Some(end) = text.find("\r\n\r\n") {
            let length = text[..end]
                .lines()
                .find_map(|l| {
                    l.to_ascii_lowercase()
                        .strip_prefix("content-length: ")
                        .map(|v| v.trim().parse::<usize>().unwrap())
                })
                .unwrap_or(0);
            if got.len() >= end + 4 + length {
                return Some(text);
            }
        }
        let mut buf = [0u8; 4096];
        match tokio::time::timeout_at(deadline, stream.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) | Err(_) => return None,
            Ok(Ok(n)) => got.extend_from_slice(&buf[..n]),
        }
    }
}

/// Whether the peer closes `stream` within `within` (EOF or reset).
async fn closed_within(stream: &mut TcpStream, within: Duration) -> bool {
    let mut buf = [0u8; 1024];
    loop {
        match tokio::time::timeout(within, stream.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return true,
            Ok(Ok(_)) => continue,
            Err(_) => return false,
        }
    }
}

#[tokio::test]
async fn at_the_cap_the_admin_listener_stops_accepting_until_a_connection_closes() {
    let admin = start(2, Duration::from_secs(30), "127.0.0.1:1".into()).await;
    let mut idle_a = TcpStream::connect(admin.addr).await.unwrap();
    let _idle_b = TcpStream::connect(admin.addr).await.unwrap();
    // Both are accepted (they hold the two places) once the listener has run.
    tokio::time::sleep(Duration::from_millis(200)).await;

    let mut third = TcpStream::connect(admin.addr).await.unwrap();
    send(&mut third, "/healthz").await;
    assert_eq!(
        response(&mut third, Duration::from_millis(700)).await,
        None,
        "a third connection was served past admin.max_connections = 2"
    );

    // A place frees up: the waiting connection is accepted and answered.
    idle_a.shutdown().await.unwrap();
    drop(idle_a);
    let answer = response(&mut third, Duration::from_secs(5))
        .await
        .expect("the waiting connection is served once one closes");
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(answer.ends_with("ok\n"), "{answer}");

    admin.stop.send(true).unwrap();
    tokio::time::timeout(Duration::from_secs(10), admin.task)
        .await
        .expect("serve returns after shutdown")
        .unwrap();
}

#[tokio::test]
async fn a_connection_that_sends_nothing_is_closed_and_frees_its_place() {
    let admin = start(1, Duration::from_millis(300), "127.0.0.1:1".into()).await;
    let started = Instant::now();
    let mut silent = TcpStream::connect(admin.addr).await.unwrap();
    assert!(
        closed_within(&mut silent, Duration::from_secs(5)).await,
        "a silent connection was held past the first-request deadline"
    );
    assert!(started.elapsed() >= Duration::from_millis(250));
    // Its place is free again.
    let mut next = TcpStream::connect(admin.addr).await.unwrap();
    send(&mut next, "/healthz").await;
    let answer = response(&mut next, Duration::from_secs(5))
        .await
        .expect("served");
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    admin.stop.send(true).unwrap();
    admin.task.await.unwrap();
}

/// A TCP address whose connections neither complete nor fail soon: a listener with a full
/// accept queue that never accepts (Linux drops further SYNs). `None` when this kernel
/// completes them anyway.
async fn blackhole() -> Option<(tokio::net::TcpListener, Vec<TcpStream>)> {
    let socket = TcpSocket::new_v4().unwrap();
    socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let listener = socket.listen(0).unwrap();
    let addr = listener.local_addr().unwrap();
    let mut filled = Vec::new();
    for _ in 0..16 {
        match tokio::time::timeout(Duration::from_millis(300), TcpStream::connect(addr)).await {
            Ok(Ok(stream)) => filled.push(stream),
            Ok(Err(_)) => return None,
            Err(_) => return Some((listener, filled)),
        }
    }
    None
}

#[tokio::test]
async fn shutdown_drains_the_admin_listener() {
    let (hole, _filled) = blackhole()
        .await
        .expect("a listener with a full backlog stalls connects");
    let upstream = hole.local_addr().unwrap().to_string();
    let admin = start(8, Duration::from_secs(30), upstream).await;

    // An idle keep-alive connection, after one request.
    let mut idle = TcpStream::connect(admin.addr).await.unwrap();
    send(&mut idle, "/healthz").await;
    assert!(response(&mut idle, Duration::from_secs(5)).await.is_some());
    // A request in flight: /readyz waits up to its 1 s probe timeout on the stalled upstream.
    let mut busy = TcpStream::connect(admin.addr).await.unwrap();
    send(&mut busy, "/readyz").await;
    tokio::time::sleep(Duration::from_millis(200)).await;

    let stopping = Instant::now();
    admin.stop.send(true).unwrap();
    // The idle connection is closed at once; the listening socket is closed.
    assert!(
        closed_within(&mut idle, Duration::from_millis(500)).await,
        "an idle connection stayed open after shutdown"
    );
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(
        TcpStream::connect(admin.addr).await.is_err(),
        "the admin port still accepts after shutdown"
    );
    assert!(
        !admin.task.is_finished(),
        "serve returned with a request in flight"
    );
    // The request in flight finishes (not cut off), then serve returns.
    let answer = response(&mut busy, Duration::from_secs(5))
        .await
        .expect("the request in flight was answered");
    assert!(answer.starts_with("HTTP/1.1 503"), "{answer}");
    assert!(answer.contains("did not answer"), "{answer}");
    tokio::time::timeout(Duration::from_secs(3), admin.task)
        .await
        .expect("serve returns once the request in flight is done")
        .unwrap();
    assert!(stopping.elapsed() < Duration::from_secs(4));
}
