//! The S3 driver against a real S3-compatible server: `s3s-fs` (installed by scripts/setup.sh).
//! The test starts and stops the server itself; it is skipped, saying so, only when the binary
//! is absent.

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use bytes::Bytes;
use payload_gateway_drivers::s3::{S3Config, S3Driver};
use payload_gateway_drivers::{DriverError, StorageDriver, StoreContext, StoreTarget};

fn s3s_fs_bin() -> Option<PathBuf> {
    let tools = std::env::var_os("PGW_TOOLS_DIR")
        .map(PathBuf::from)
        .or_else(|| {
            std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/payload-gateway"))
        })?;
    let bin = tools.join("cargo/bin/s3s-fs");
    bin.exists().then_some(bin)
}

struct Server {
    child: Child,
    port: u16,
    root: tempfile::TempDir,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start(bin: &PathBuf) -> Server {
    let root = tempfile::tempdir().unwrap();
    std::fs::create_dir(root.path().join("payloads")).unwrap();
    std::fs::create_dir(root.path().join("other")).unwrap();
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let child = Command::new(bin)
        .args(["--host", "127.0.0.1", "--port", &port.to_string()])
        .args(["--access-key", "AK", "--secret-key", "SK"])
        .arg(root.path())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "s3s-fs did not listen on {port}");
        std::thread::sleep(Duration::from_millis(50));
    }
    Server { child, port, root }
}

async fn driver(port: u16, max: u64) -> S3Driver {
    // SAFETY: set before any client reads them; every test in this binary uses the same values.
    unsafe {
        std::env::set_var("AWS_ACCESS_KEY_ID", "AK");
        std::env::set_var("AWS_SECRET_ACCESS_KEY", "SK");
    }
    let mut config = S3Config::new("payloads");
    config.endpoint = Some(format!("http://127.0.0.1:{port}"));
    config.region = Some("us-east-1".to_owned());
    config.force_path_style = true;
    config.max_payload_size = max;
    config.operation_timeout = Duration::from_secs(10);
    S3Driver::new(config).await
}

fn ctx() -> StoreContext {
    StoreContext {
        namespace: Some("default".to_owned()),
        target: Some(StoreTarget::Workflow {
            workflow_type: Some("Wf".to_owned()),
            workflow_id: Some("id/1".to_owned()),
            run_id: Some("r1".to_owned()),
        }),
    }
}

#[tokio::test]
async fn s3_driver_against_s3s_fs() {
    let Some(bin) = s3s_fs_bin() else {
        eprintln!("SKIPPED: s3s-fs binary not found (run scripts/setup.sh)");
        return;
    };
    let server = start(&bin);
    let d = driver(server.port, 4 << 20).await;

    let payloads = vec![
        Bytes::from_static(b"small payload"),
        Bytes::from(vec![42u8; 3 << 20]),
    ];
    let claims = d.store(&ctx(), payloads.clone()).await.unwrap();
    assert_eq!(claims[0]["bucket"], "payloads");
    assert_eq!(claims[0]["hash_algorithm"], "sha256");
    let key = &claims[1]["key"];
    assert!(
        key.starts_with("v0/ns/default/wt/Wf/wi/id%2F1/ri/r1/d/sha256/"),
        "{key}"
    );
    let on_disk = server.root.path().join("payloads").join(key);
    assert_eq!(std::fs::read(&on_disk).unwrap(), payloads[1]);
    let mtime = std::fs::metadata(&on_disk).unwrap().modified().unwrap();

    // Content-addressed: storing again does not rewrite.
    std::thread::sleep(Duration::from_millis(20));
    assert_eq!(d.store(&ctx(), payloads.clone()).await.unwrap(), claims);
    assert_eq!(
        std::fs::metadata(&on_disk).unwrap().modified().unwrap(),
        mtime
    );

    let back = d.retrieve(Some("default"), claims.clone()).await.unwrap();
    assert_eq!(back, payloads);

    // Too large, with the limit in the message.
    let err = d
        .store(&ctx(), vec![Bytes::from(vec![0u8; (4 << 20) + 1])])
        .await
        .unwrap_err();
    assert!(matches!(err, DriverError::TooLarge { .. }), "{err}");

    // Another namespace, another bucket: refused before any request.
    let err = d.retrieve(Some("other"), claims.clone()).await.unwrap_err();
    assert!(matches!(err, DriverError::ClaimRefused(_)), "{err}");
    let mut forged = claims[0].clone();
    forged.insert("bucket".to_owned(), "other".to_owned());
    let err = d.retrieve(Some("default"), vec![forged]).await.unwrap_err();
    assert!(matches!(err, DriverError::ClaimRefused(_)), "{err}");

    // A flipped byte at rest is a hash mismatch.
    let mut bytes = std::fs::read(&on_disk).unwrap();
    bytes[1000] ^= 1;
    std::fs::write(&on_disk, bytes).unwrap();
    let err = d
        .retrieve(Some("default"), vec![claims[1].clone()])
        .await
        .unwrap_err();
    assert!(matches!(err, DriverError::Integrity(_)), "{err}");
    assert!(err.to_string().contains("hash mismatch"), "{err}");

    // Missing object.
    std::fs::remove_file(&on_disk).unwrap();
    let err = d
        .retrieve(Some("default"), vec![claims[1].clone()])
        .await
        .unwrap_err();
    assert!(matches!(err, DriverError::NotFound(_)), "{err}");

    // Server gone: unavailable.
    let port = server.port;
    drop(server);
    let err = d
        .store(&ctx(), vec![Bytes::from_static(b"x")])
        .await
        .unwrap_err();
    assert!(matches!(err, DriverError::Unavailable(_)), "{err}");
    let _ = port;
}
