//! TLS end to end, in process: gateways built from config with certificates generated here
//! (`rcgen`), a fake upstream (hyper HTTP/2, cleartext or TLS) that records the headers it
//! receives and answers one fixed gRPC message, and HTTP/2 clients over rustls. Everything
//! listens on 127.0.0.1 free ports and is stopped at the end of each test.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Request, Response};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use payload_gateway::app::Gateway;
use payload_gateway::config::Config;
use payload_gateway::grpc::GatewayBody;
use rustls::pki_types::ServerName;
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, ServerConfig};
use tokio::io::AsyncReadExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::{JoinHandle, JoinSet};

mod common;
use common::pki::{Ca, Leaf, certs, key};

const METHOD: &str = "/test.v1.EchoService/Ping";
const ANSWER: &[u8] = b"pong";

fn client_tls(ca: &Ca, identity: Option<&Leaf>) -> Arc<ClientConfig> {
    let builder = ClientConfig::builder_with_provider(payload_gateway::tls::provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(ca.roots());
    let mut config = match identity {
        Some(leaf) => builder
            .with_client_auth_cert(certs(&leaf.cert), key(&leaf.key))
            .unwrap(),
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = vec![b"h2".to_vec()];
    Arc::new(config)
}

fn server_tls(leaf: &Leaf, client_ca: Option<&Ca>) -> Arc<ServerConfig> {
    let provider = payload_gateway::tls::provider();
    let builder = ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .unwrap();
    let builder = match client_ca {
        Some(ca) => builder.with_client_cert_verifier(
            WebPkiClientVerifier::builder_with_provider(Arc::new(ca.roots()), provider)
                .build()
                .unwrap(),
        ),
        None => builder.with_no_client_auth(),
    };
    let mut config = builder
        .with_single_cert(certs(&leaf.cert), key(&leaf.key))
        .unwrap();
    config.alpn_protocols = vec![b"h2".to_vec()];
    Arc::new(config)
}

// ---------------------------------------------------------------------------------------------
// Fake upstream

/// What the fake upstream saw of one request.
#[derive(Debug, Clone)]
struct Seen {
    authority: Option<String>,
    authorization: Option<String>,
}

/// A fake Temporal frontend: HTTP/2 (TLS when given a config), answers every call with
/// `ANSWER` and `grpc-status: 0`. Dropping it stops it and its connections.
struct FakeUpstream {
    addr: SocketAddr,
    seen: Arc<Mutex<Vec<Seen>>>,
    task: JoinHandle<()>,
}

impl Drop for FakeUpstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl FakeUpstream {
    async fn start(tls: Option<Arc<ServerConfig>>) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let recorder = seen.clone();
        let task = tokio::spawn(async move {
            let mut connections = JoinSet::new();
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let recorder = recorder.clone();
                let tls = tls.clone();
                connections.spawn(async move {
                    let service = hyper::service::service_fn(move |request: Request<Incoming>| {
                        let recorder = recorder.clone();
                        async move {
                            recorder.lock().unwrap().push(Seen {
                                authority: request.uri().authority().map(|a| a.to_string()),
                                authorization: request
                                    .headers()
                                    .get("authorization")
                                    .map(|v| v.to_str().unwrap().to_owned()),
                            });
                            let _ = request.into_body().collect().await;
                            let mut trailers = HeaderMap::new();
                            trailers.insert("grpc-status", "0".parse().unwrap());
                            let mut response = Response::new(GatewayBody::buffered(
                                vec![frame(ANSWER)],
                                Some(trailers),
                            ));
                            response
                                .headers_mut()
                                .insert("content-type", "application/grpc".parse().unwrap());
                            Ok::<_, Infallible>(response)
                        }
                    });
                    let http = hyper::server::conn::http2::Builder::new(TokioExecutor::new());
                    match tls {
                        Some(config) => {
                            let acceptor = tokio_rustls::TlsAcceptor::from(config);
                            if let Ok(stream) = acceptor.accept(stream).await {
                                let _ = http.serve_connection(TokioIo::new(stream), service).await;
                            }
                        }
                        None => {
                            let _ = http.serve_connection(TokioIo::new(stream), service).await;
                        }
                    }
                });
            }
        });
        Self { addr, seen, task }
    }

    fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }
}

fn frame(message: &[u8]) -> Bytes {
    let mut out = vec![0u8];
    out.extend_from_slice(&(message.len() as u32).to_be_bytes());
    out.extend_from_slice(message);
    Bytes::from(out)
}

// ---------------------------------------------------------------------------------------------
// Gateway and client

/// A gateway running in process; `stop` shuts it down and waits for it.
struct Running {
    addr: SocketAddr,
    shutdown: watch::Sender<bool>,
    task: JoinHandle<()>,
}

impl Running {
    async fn stop(self) {
        self.shutdown.send(true).unwrap();
        tokio::time::timeout(Duration::from_secs(10), self.task)
            .await
            .expect("gateway stops")
            .unwrap();
    }
}

/// A config for an in-process gateway forwarding to `upstream`, with `extra` TOML appended
/// (`[proxy]` keys go in `proxy_keys`).
fn config_text(upstream: SocketAddr, proxy_keys: &str, extra: &str) -> String {
    format!(
        "[proxy]\nlisten = \"127.0.0.1:0\"\nupstream = \"{upstream}\"\nconnect_timeout_ms = 3000\n\
         shutdown_grace_ms = 1000\n{proxy_keys}\n\
         [encryption]\nenabled = false\n[compression]\nenabled = false\n[storage]\nenabled = false\n\
         [codec_server]\nenabled = false\n[admin]\nenabled = false\n{extra}\n"
    )
}

async fn bind(text: &str) -> Result<Gateway, String> {
    let config = Config::from_toml(text, Vec::new()).map_err(|e| e.to_string())?;
    Gateway::bind(&config).await.map_err(|e| e.to_string())
}

async fn start(text: &str) -> Running {
    let gateway = bind(text).await.expect("gateway starts");
    let addr = gateway.proxy_addr();
    let (shutdown, rx) = watch::channel(false);
    let task = tokio::spawn(gateway.run(rx));
    Running {
        addr,
        shutdown,
        task,
    }
}

fn toml_path(path: &Path) -> String {
    format!("{:?}", path.to_str().unwrap())
}

/// The outcome of one gRPC call: `grpc-status`, `grpc-message` and the response body.
#[derive(Debug)]
struct Outcome {
    status: String,
    message: String,
    body: Bytes,
}

/// One unary gRPC call to `addr` over HTTP/2, TLS when `tls` is given (server name
/// `localhost`). Errors are transport or handshake failures.
async fn call(
    addr: SocketAddr,
    tls: Option<Arc<ClientConfig>>,
    authorization: Option<&str>,
) -> Result<Outcome, String> {
    let tcp = TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
    let mut request = Request::post(format!("http://localhost{METHOD}"))
        .header("content-type", "application/grpc")
        .header("te", "trailers");
    if let Some(value) = authorization {
        request = request.header("authorization", value);
    }
    let request = request.body(Full::new(frame(b"ping"))).unwrap();
    let response = match tls {
        Some(config) => {
            let stream = tokio_rustls::TlsConnector::from(config)
                .connect(ServerName::try_from("localhost").unwrap(), tcp)
                .await
                .map_err(|e| format!("TLS handshake: {e}"))?;
            send(TokioIo::new(stream), request).await?
        }
        None => send(TokioIo::new(tcp), request).await?,
    };
    let (parts, body) = response.into_parts();
    let collected = body.collect().await.map_err(|e| e.to_string())?;
    let trailers = collected.trailers().cloned().unwrap_or_default();
    let get = |name: &str| {
        parts
            .headers
            .get(name)
            .or_else(|| trailers.get(name))
            .map(|v| v.to_str().unwrap().to_owned())
            .unwrap_or_default()
    };
    Ok(Outcome {
        status: get("grpc-status"),
        message: get("grpc-message"),
        body: collected.to_bytes(),
    })
}

async fn send<I>(io: I, request: Request<Full<Bytes>>) -> Result<Response<Incoming>, String>
where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let (mut sender, connection) = hyper::client::conn::http2::handshake(TokioExecutor::new(), io)
        .await
        .map_err(|e| format!("h2 handshake: {e}"))?;
    tokio::spawn(connection);
    tokio::time::timeout(Duration::from_secs(10), sender.send_request(request))
        .await
        .map_err(|_| "request timed out".to_owned())?
        .map_err(|e| format!("request: {e}"))
}

fn assert_ok(outcome: &Outcome) {
    assert_eq!(outcome.status, "0", "{outcome:?}");
    assert_eq!(&outcome.body[..], &frame(ANSWER)[..], "{outcome:?}");
}

// ---------------------------------------------------------------------------------------------
// Tests

#[tokio::test]
async fn tls_toward_clients_reaches_a_plain_upstream() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new(dir.path(), "gw");
    let server = ca.server("gateway");
    let upstream = FakeUpstream::start(None).await;
    let gateway = start(&config_text(
        upstream.addr,
        "",
        &format!(
            "[proxy.tls]\ncert_file = {}\nkey_file = {}\n",
            toml_path(&server.cert),
            toml_path(&server.key)
        ),
    ))
    .await;

    let outcome = call(gateway.addr, Some(client_tls(&ca, None)), None)
        .await
        .unwrap();
    assert_ok(&outcome);
    assert_eq!(upstream.seen().len(), 1);
    // Cleartext HTTP/2 on the TLS port gets nowhere.
    assert!(call(gateway.addr, None, None).await.is_err());
    // A client that does not trust the gateway's CA refuses it.
    let other = Ca::new(dir.path(), "other");
    let err = call(gateway.addr, Some(client_tls(&other, None)), None)
        .await
        .unwrap_err();
    assert!(err.contains("TLS handshake"), "{err}");
    // The accept loop survived all of that.
    assert_ok(
        &call(gateway.addr, Some(client_tls(&ca, None)), None)
            .await
            .unwrap(),
    );
    gateway.stop().await;
}

#[tokio::test]
async fn client_certificates_are_required_and_verified() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new(dir.path(), "gw");
    let clients = Ca::new(dir.path(), "clients");
    let rogue = Ca::new(dir.path(), "rogue");
    let server = ca.server("gateway");
    let good = clients.client("worker");
    let bad = rogue.client("worker");
    let upstream = FakeUpstream::start(None).await;
    let tls_section = |require: &str| {
        format!(
            "[proxy.tls]\ncert_file = {}\nkey_file = {}\nclient_ca_file = {}\n{require}",
            toml_path(&server.cert),
            toml_path(&server.key),
            toml_path(&clients.cert_file()),
        )
    };
    let gateway = start(&config_text(upstream.addr, "", &tls_section(""))).await;

    assert_ok(
        &call(gateway.addr, Some(client_tls(&ca, Some(&good))), None)
            .await
            .unwrap(),
    );
    // TLS 1.3: the client finishes its side before the server rejects it, so the refusal
    // shows up at the handshake or the first HTTP/2 exchange; either way no call goes through.
    let without = call(gateway.addr, Some(client_tls(&ca, None)), None).await;
    assert!(without.is_err(), "{without:?}");
    let foreign = call(gateway.addr, Some(client_tls(&ca, Some(&bad))), None).await;
    assert!(foreign.is_err(), "{foreign:?}");
    assert_eq!(upstream.seen().len(), 1, "refused clients reach nothing");
    assert_ok(
        &call(gateway.addr, Some(client_tls(&ca, Some(&good))), None)
            .await
            .unwrap(),
    );
    gateway.stop().await;

    // require_client_cert = false: no certificate is fine, a foreign one still is not.
    let gateway = start(&config_text(
        upstream.addr,
        "",
        &tls_section("require_client_cert = false\n"),
    ))
    .await;
    assert_ok(
        &call(gateway.addr, Some(client_tls(&ca, None)), None)
            .await
            .unwrap(),
    );
    let foreign = call(gateway.addr, Some(client_tls(&ca, Some(&bad))), None).await;
    assert!(foreign.is_err(), "{foreign:?}");
    gateway.stop().await;
}

#[tokio::test]
async fn slow_handshakes_time_out_without_blocking_others() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new(dir.path(), "gw");
    let server = ca.server("gateway");
    let upstream = FakeUpstream::start(None).await;
    let gateway = start(&config_text(
        upstream.addr,
        "",
        &format!(
            "[proxy.tls]\ncert_file = {}\nkey_file = {}\nhandshake_timeout_ms = 300\n",
            toml_path(&server.cert),
            toml_path(&server.key)
        ),
    ))
    .await;
    // A client that connects and never says anything.
    let mut silent = TcpStream::connect(gateway.addr).await.unwrap();
    // Others are served meanwhile.
    assert_ok(
        &call(gateway.addr, Some(client_tls(&ca, None)), None)
            .await
            .unwrap(),
    );
    // The silent one is dropped once the handshake timeout passes.
    let mut buf = [0u8; 16];
    let read = tokio::time::timeout(Duration::from_secs(5), silent.read(&mut buf))
        .await
        .expect("the gateway closes a connection whose handshake does not finish");
    assert!(matches!(read, Ok(0) | Err(_)), "{read:?}");
    gateway.stop().await;
}

#[tokio::test]
async fn upstream_tls_with_a_custom_ca() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new(dir.path(), "temporal");
    let other = Ca::new(dir.path(), "other");
    let server = ca.server("frontend");
    let upstream = FakeUpstream::start(Some(server_tls(&server, None))).await;
    let upstream_tls = |ca_file: Option<&Path>, server_name: Option<&str>| {
        let mut s = "[proxy.upstream_tls]\nenabled = true\n".to_owned();
        if let Some(ca_file) = ca_file {
            s.push_str(&format!("ca_file = {}\n", toml_path(ca_file)));
        }
        if let Some(name) = server_name {
            s.push_str(&format!("server_name = \"{name}\"\n"));
        }
        s
    };

    // Verified against the IP address of proxy.upstream; :authority is proxy.upstream.
    let gateway = start(&config_text(
        upstream.addr,
        "",
        &upstream_tls(Some(&ca.cert_file()), None),
    ))
    .await;
    assert_ok(&call(gateway.addr, None, None).await.unwrap());
    assert_eq!(
        upstream.seen().last().unwrap().authority.as_deref(),
        Some(upstream.addr.to_string().as_str())
    );
    gateway.stop().await;

    // Server-name override: SNI, verification and :authority.
    let gateway = start(&config_text(
        upstream.addr,
        "",
        &upstream_tls(Some(&ca.cert_file()), Some("localhost")),
    ))
    .await;
    assert_ok(&call(gateway.addr, None, None).await.unwrap());
    assert_eq!(
        upstream.seen().last().unwrap().authority.as_deref(),
        Some("localhost")
    );
    gateway.stop().await;

    // A name the certificate does not hold is refused.
    let gateway = start(&config_text(
        upstream.addr,
        "",
        &upstream_tls(Some(&ca.cert_file()), Some("temporal.example")),
    ))
    .await;
    let outcome = call(gateway.addr, None, None).await.unwrap();
    assert_eq!(outcome.status, "14", "{outcome:?}");
    gateway.stop().await;

    // Without the upstream's CA: UNAVAILABLE naming the upstream.
    let seen_before = upstream.seen().len();
    let gateway = start(&config_text(
        upstream.addr,
        "",
        &upstream_tls(Some(&other.cert_file()), None),
    ))
    .await;
    let outcome = call(gateway.addr, None, None).await.unwrap();
    assert_eq!(outcome.status, "14", "{outcome:?}");
    assert!(
        outcome.message.contains(&upstream.addr.to_string()),
        "{outcome:?}"
    );
    gateway.stop().await;

    // The platform trust store does not hold the test CA either (if the platform has none,
    // the gateway refuses to start, naming proxy.upstream_tls.ca_file).
    match bind(&config_text(upstream.addr, "", &upstream_tls(None, None))).await {
        Ok(gateway) => {
            let addr = gateway.proxy_addr();
            let (shutdown, rx) = watch::channel(false);
            let running = Running {
                addr,
                shutdown,
                task: tokio::spawn(gateway.run(rx)),
            };
            let outcome = call(running.addr, None, None).await.unwrap();
            assert_eq!(outcome.status, "14", "{outcome:?}");
            assert!(
                outcome.message.contains(&upstream.addr.to_string()),
                "{outcome:?}"
            );
            running.stop().await;
        }
        Err(e) => assert!(e.contains("proxy.upstream_tls.ca_file"), "{e}"),
    }
    assert_eq!(upstream.seen().len(), seen_before, "nothing reached it");
}

#[tokio::test]
async fn upstream_mutual_tls() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new(dir.path(), "temporal");
    let clients = Ca::new(dir.path(), "clients");
    let server = ca.server("frontend");
    let identity = clients.client("gateway");
    let upstream = FakeUpstream::start(Some(server_tls(&server, Some(&clients)))).await;

    let gateway = start(&config_text(
        upstream.addr,
        "",
        &format!(
            "[proxy.upstream_tls]\nenabled = true\nca_file = {}\ncert_file = {}\nkey_file = {}\n",
            toml_path(&ca.cert_file()),
            toml_path(&identity.cert),
            toml_path(&identity.key),
        ),
    ))
    .await;
    assert_ok(&call(gateway.addr, None, None).await.unwrap());
    gateway.stop().await;

    // Without the client certificate the upstream refuses the connection.
    let gateway = start(&config_text(
        upstream.addr,
        "",
        &format!(
            "[proxy.upstream_tls]\nenabled = true\nca_file = {}\n",
            toml_path(&ca.cert_file()),
        ),
    ))
    .await;
    let outcome = call(gateway.addr, None, None).await.unwrap();
    assert_eq!(outcome.status, "14", "{outcome:?}");
    assert!(
        outcome.message.contains(&upstream.addr.to_string()),
        "{outcome:?}"
    );
    gateway.stop().await;
    assert_eq!(upstream.seen().len(), 1);
}

#[tokio::test]
async fn api_key_is_added_unless_the_client_sent_authorization() {
    const VAR: &str = "PGW_TLS_TEST_API_KEY";
    // SAFETY: only this test reads or writes this variable.
    unsafe { std::env::set_var(VAR, "sekret-key") };
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new(dir.path(), "temporal");
    let server = ca.server("frontend");
    let upstream = FakeUpstream::start(Some(server_tls(&server, None))).await;
    let gateway = start(&config_text(
        upstream.addr,
        &format!("api_key_env = \"{VAR}\""),
        &format!(
            "[proxy.upstream_tls]\nenabled = true\nca_file = {}\n",
            toml_path(&ca.cert_file())
        ),
    ))
    .await;

    assert_ok(&call(gateway.addr, None, None).await.unwrap());
    assert_ok(
        &call(gateway.addr, None, Some("Bearer client-own"))
            .await
            .unwrap(),
    );
    let seen = upstream.seen();
    assert_eq!(
        seen[0].authorization.as_deref(),
        Some("Bearer sekret-key"),
        "{seen:?}"
    );
    assert_eq!(
        seen[1].authorization.as_deref(),
        Some("Bearer client-own"),
        "{seen:?}"
    );
    gateway.stop().await;

    // The variable must exist.
    let err = bind(&config_text(
        upstream.addr,
        "api_key_env = \"PGW_TLS_TEST_UNSET_VARIABLE\"",
        "",
    ))
    .await
    .err()
    .unwrap();
    assert!(err.contains("proxy.api_key_env"), "{err}");
}

#[tokio::test]
async fn config_errors_name_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new(dir.path(), "gw");
    let server = ca.server("gateway");
    let other = ca.server("other");
    let upstream: SocketAddr = "127.0.0.1:9".parse().unwrap();
    let missing = dir.path().join("missing.pem");
    let tls = |cert: &Path, key: &Path| {
        format!(
            "[proxy.tls]\ncert_file = {}\nkey_file = {}\n",
            toml_path(cert),
            toml_path(key)
        )
    };
    let expect_err = |text: String, key: &'static str| async move {
        let err = bind(&text).await.err().expect("refused");
        assert!(err.contains(key), "{key}: {err}");
        err
    };

    let err = expect_err(
        config_text(upstream, "", &tls(&missing, &server.key)),
        "proxy.tls.cert_file",
    )
    .await;
    assert!(err.contains("missing.pem"), "{err}");
    expect_err(
        config_text(upstream, "", &tls(&server.cert, &missing)),
        "proxy.tls.key_file",
    )
    .await;
    // A key that is not the certificate's.
    expect_err(
        config_text(upstream, "", &tls(&server.cert, &other.key)),
        "proxy.tls.key_file",
    )
    .await;
    // Not PEM.
    expect_err(
        config_text(upstream, "", &tls(&server.key, &server.key)),
        "proxy.tls.cert_file",
    )
    .await;
    expect_err(
        config_text(
            upstream,
            "",
            &format!("[proxy.tls]\nkey_file = {}\n", toml_path(&server.key)),
        ),
        "proxy.tls.cert_file",
    )
    .await;
    expect_err(
        config_text(
            upstream,
            "",
            &format!(
                "{}client_ca_file = {}\n",
                tls(&server.cert, &server.key),
                toml_path(&missing)
            ),
        ),
        "proxy.tls.client_ca_file",
    )
    .await;
    expect_err(
        config_text(
            upstream,
            "",
            &format!(
                "[proxy.upstream_tls]\nenabled = true\nca_file = {}\n",
                toml_path(&missing)
            ),
        ),
        "proxy.upstream_tls.ca_file",
    )
    .await;
    expect_err(
        config_text(
            upstream,
            "",
            &format!(
                "[proxy.upstream_tls]\nenabled = true\ncert_file = {}\n",
                toml_path(&server.cert)
            ),
        ),
        "proxy.upstream_tls.key_file",
    )
    .await;
    expect_err(
        config_text(
            upstream,
            "",
            &format!(
                "[proxy.upstream_tls]\ncert_file = {}\n",
                toml_path(&server.cert)
            ),
        ),
        "proxy.upstream_tls.cert_file",
    )
    .await;
}
