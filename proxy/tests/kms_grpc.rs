//! The gRPC key-encryption key against the reference `KMSService`, `tests/kms_sidecar.py`,
//! started here as a real process (Python, grpcio): wrap/unwrap, the namespace binding, a key
//! the service does not hold, TLS and mTLS with certificates made in the test (a wrong CA and a
//! missing client certificate fail naming the problem), a service that is down and comes back,
//! and a service that never answers.
//!
//! Skipped with a message when the project's Python venv is absent, except under `CI=true`,
//! where its absence fails the tests.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use payload_gateway::config::KmsServerConfig;
use payload_gateway::kms::grpc::GrpcKek;
use payload_gateway::kms::{Dek, KeyEncryptionKey, KmsError, Provider};
use rcgen::ExtendedKeyUsagePurpose;

mod common;
use common::pki::{Ca, LOCAL_NAMES};

const KEY_ID: &str = "payments-kek";

fn python() -> Option<PathBuf> {
    // PGW_PYTHON, else the venv scripts/setup.sh makes in PGW_TOOLS_DIR (~/.cache/payload-gateway).
    let path = std::env::var_os("PGW_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            let tools = std::env::var_os("PGW_TOOLS_DIR")
                .map(PathBuf::from)
                .unwrap_or_else(|| {
                    Path::new(&std::env::var_os("HOME").unwrap_or_default())
                        .join(".cache/payload-gateway")
                });
            tools.join("venv/bin/python")
        });
    if path.is_file() {
        return Some(path);
    }
    assert!(
        std::env::var("CI").as_deref() != Ok("true"),
        "{} is missing under CI=true: scripts/setup.sh creates the venv",
        path.display()
    );
    eprintln!(
        "SKIPPED: no Python venv at {} (run scripts/setup.sh or set PGW_PYTHON)",
        path.display()
    );
    None
}

/// The reference sidecar as a child process; killed and reaped on drop.
struct Sidecar {
    child: Child,
    address: String,
    log: PathBuf,
}

impl Sidecar {
    fn start(python: &Path, dir: &Path, listen: &str, extra: &[&str]) -> Self {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/kms_sidecar.py");
        let log = dir.join(format!("sidecar-{}.log", listen.replace([':', '.'], "_")));
        let mut child = Command::new(python)
            .arg(script)
            .args(["--listen", listen, "--key-file"])
            .arg(dir.join("kek.bin"))
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .expect("start the sidecar");
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut line = String::new();
            let _ = BufReader::new(stdout).read_line(&mut line);
            let _ = tx.send(line);
        });
        let mut sidecar = Self {
            child,
            address: String::new(),
            log,
        };
        let line = rx.recv_timeout(Duration::from_secs(30)).unwrap_or_default();
        let Some(address) = line.trim().strip_prefix("listening on ") else {
            panic!(
                "the sidecar did not start: {:?}\n{}",
                line,
                std::fs::read_to_string(&sidecar.log).unwrap_or_default()
            );
        };
        sidecar.address = address.to_owned();
        sidecar
    }

    /// Lines the sidecar logged for `method` calls.
    fn calls(&self, method: &str) -> usize {
        std::fs::read_to_string(&self.log)
            .unwrap()
            .lines()
            .filter(|l| l.starts_with(&format!("kms-sidecar: {method} ")))
            .count()
    }

    fn stop(mut self) {
        self.kill();
    }

    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Sidecar {
    fn drop(&mut self) {
        self.kill();
    }
}

fn dek(byte: u8) -> Dek {
    Dek::from_slice(&[byte; 32]).unwrap()
}

fn plaintext_server(address: &str) -> KmsServerConfig {
    let mut config = KmsServerConfig::new(address);
    config.tls = false;
    config.timeout_ms = 3_000;
    config
}

#[tokio::test]
async fn wraps_through_the_reference_sidecar_and_binds_the_namespace() {
    let Some(python) = python() else { return };
    let dir = tempfile::tempdir().unwrap();
    let sidecar = Sidecar::start(&python, dir.path(), "127.0.0.1:0", &["--key-id", KEY_ID]);
    let config = plaintext_server(&sidecar.address);
    let kek = GrpcKek::connect(KEY_ID, "sidecar", &config).unwrap();
    assert_eq!(kek.key_id(), KEY_ID);
    assert_eq!(kek.provider(), Provider::Grpc);

    let wrapped = kek.wrap(&dek(9), "payments").await.unwrap();
    assert!(
        !wrapped.windows(32).any(|w| w == [9u8; 32]),
        "the wrapped key holds the data key in the clear"
    );
    assert_eq!(
        kek.unwrap(&wrapped, "payments").await.unwrap().expose(),
        &[9u8; 32]
    );

    // Another namespace: the service's AEAD refuses it (INVALID_ARGUMENT -> Invalid).
    let err = kek.unwrap(&wrapped, "billing").await.unwrap_err();
    assert!(matches!(err, KmsError::Invalid { .. }), "{err}");
    assert!(err.to_string().contains("InvalidArgument"), "{err}");
    let mut tampered = wrapped.clone();
    *tampered.last_mut().unwrap() ^= 1;
    let err = kek.unwrap(&tampered, "payments").await.unwrap_err();
    assert!(matches!(err, KmsError::Invalid { .. }), "{err}");

    // A key id the service does not hold: NOT_FOUND -> Refused, not retryable.
    let other = GrpcKek::connect("other-kek", "sidecar", &config).unwrap();
    let err = other.wrap(&dek(1), "payments").await.unwrap_err();
    assert!(matches!(err, KmsError::Refused { .. }), "{err}");
    assert!(!err.is_retryable());
    assert!(err.to_string().contains("other-kek"), "{err}");

    // The gateway's own binding: the service honours the namespace field, but even a wrapped
    // key it accepted for "billing" is checked against the namespace sealed inside.
    let billing = kek.wrap(&dek(3), "billing").await.unwrap();
    assert_eq!(
        kek.unwrap(&billing, "billing").await.unwrap().expose(),
        &[3u8; 32]
    );

    // Calls are counted at the service; its log never holds key material.
    assert_eq!(
        sidecar.calls("Encrypt"),
        3,
        "Encrypt calls incl. the refused one"
    );
    assert_eq!(sidecar.calls("Decrypt"), 4);
    let log = std::fs::read(&sidecar.log).unwrap();
    assert!(!log.windows(32).any(|w| w == [9u8; 32]));
    sidecar.stop();
}

#[tokio::test]
async fn down_service_is_unavailable_and_recovers() {
    let Some(python) = python() else { return };
    let dir = tempfile::tempdir().unwrap();
    let sidecar = Sidecar::start(&python, dir.path(), "127.0.0.1:0", &[]);
    let address = sidecar.address.clone();
    let kek = GrpcKek::connect(KEY_ID, "sidecar", &plaintext_server(&address)).unwrap();
    let wrapped = kek.wrap(&dek(5), "payments").await.unwrap();
    sidecar.stop();

    let err = kek.unwrap(&wrapped, "payments").await.unwrap_err();
    assert!(err.is_retryable(), "{err}");
    let text = err.to_string();
    assert!(
        text.contains("sidecar") && text.contains(&address),
        "{text}"
    );

    // Back on the same address (same KEK file): the same client reconnects on its own.
    let sidecar = Sidecar::start(&python, dir.path(), &address, &[]);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match kek.unwrap(&wrapped, "payments").await {
            Ok(dek) => {
                assert_eq!(dek.expose(), &[5u8; 32]);
                break;
            }
            Err(e) if e.is_retryable() && Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => panic!("no recovery: {e}"),
        }
    }
    sidecar.stop();
}

#[tokio::test]
async fn service_that_never_answers_times_out() {
    // Accepts connections and reads nothing: neither TLS nor HTTP/2 ever completes.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap().to_string();
    let hold = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((stream, _)) = listener.accept().await {
            held.push(stream);
        }
    });
    let mut config = plaintext_server(&address);
    config.timeout_ms = 300;
    let kek = GrpcKek::connect(KEY_ID, "silent", &config).unwrap();
    let started = Instant::now();
    let err = kek.wrap(&dek(1), "payments").await.unwrap_err();
    assert!(err.is_retryable(), "{err}");
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "{:?}",
        started.elapsed()
    );
    hold.abort();
}

#[tokio::test]
async fn mtls_to_the_service_and_its_failures_are_named() {
    let Some(python) = python() else { return };
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new(dir.path(), "kms");
    let other_ca = Ca::new(dir.path(), "other");
    let server = ca.server("server");
    let client = ca.issue("gateway", LOCAL_NAMES, ExtendedKeyUsagePurpose::ClientAuth);
    let sidecar = Sidecar::start(
        &python,
        dir.path(),
        "127.0.0.1:0",
        &[
            "--tls-cert",
            server.cert.to_str().unwrap(),
            "--tls-key",
            server.key.to_str().unwrap(),
            "--client-ca",
            ca.cert_file().to_str().unwrap(),
        ],
    );
    let port = sidecar.address.rsplit_once(':').unwrap().1.to_owned();
    let mut good = KmsServerConfig::new(format!("localhost:{port}"));
    good.ca_file = Some(ca.cert_file());
    good.cert_file = Some(client.cert);
    good.key_file = Some(client.key);
    good.timeout_ms = 3_000;

    let kek = GrpcKek::connect(KEY_ID, "vault", &good).unwrap();
    let wrapped = kek.wrap(&dek(4), "payments").await.unwrap();
    assert_eq!(
        kek.unwrap(&wrapped, "payments").await.unwrap().expose(),
        &[4u8; 32]
    );
    let err = kek.unwrap(&wrapped, "billing").await.unwrap_err();
    assert!(matches!(err, KmsError::Invalid { .. }), "{err}");

    // The service's certificate is not from the configured CA.
    let mut wrong_ca = good.clone();
    wrong_ca.ca_file = Some(other_ca.cert_file());
    let err = GrpcKek::connect(KEY_ID, "vault", &wrong_ca)
        .unwrap()
        .wrap(&dek(4), "payments")
        .await
        .unwrap_err();
    assert!(err.is_retryable(), "{err}");
    let text = err.to_string();
    assert!(
        text.contains("TLS handshake with localhost failed"),
        "{text}"
    );
    assert!(text.contains("UnknownIssuer"), "{text}");

    // The name in the service's certificate does not match.
    let mut wrong_name = good.clone();
    wrong_name.server_name = Some("kms.example".to_owned());
    let err = GrpcKek::connect(KEY_ID, "vault", &wrong_name)
        .unwrap()
        .wrap(&dek(4), "payments")
        .await
        .unwrap_err();
    assert!(
        err.to_string()
            .contains("not valid for name \"kms.example\""),
        "{err}"
    );

    // No client certificate: the service requires one.
    let mut anonymous = good.clone();
    anonymous.cert_file = None;
    anonymous.key_file = None;
    let err = GrpcKek::connect(KEY_ID, "vault", &anonymous)
        .unwrap()
        .wrap(&dek(4), "payments")
        .await
        .unwrap_err();
    assert!(err.is_retryable(), "{err}");
    let text = err.to_string();
    assert!(
        text.contains("asked for a TLS client certificate and none is configured")
            && text.contains("kms_servers.vault.cert_file"),
        "{text}"
    );
    assert_eq!(
        sidecar.calls("Encrypt"),
        1,
        "only the authenticated client got through"
    );
    sidecar.stop();
}
