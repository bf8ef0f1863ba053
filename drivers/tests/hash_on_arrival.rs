//! A driver's `get` verifies the object's SHA-256 as the body arrives: an object changed in
//! the store behind the driver's back (a byte flipped, or cut short, in the file on disk of
//! the filesystem driver and of `s3s-fs`) is refused by `get` itself with the hash error,
//! not handed out for a later check; `retrieve` refuses it the same way. An intact object
//! comes back whole from both.

mod common;

use std::path::Path;
use std::time::Duration;

use bytes::Bytes;
use common::ctx;
use payload_gateway_drivers::filesystem::FilesystemDriver;
use payload_gateway_drivers::layout::ReadLimit;
use payload_gateway_drivers::s3::{S3Config, S3Driver};
use payload_gateway_drivers::{ClaimData, DriverError, Fetch, StorageDriver};

/// Large enough to arrive in many chunks over HTTP and in several reads from a file.
const OBJECT: usize = 3 << 20;

fn object() -> Bytes {
    Bytes::from(
        (0..OBJECT)
            .map(|i| (i as u32).wrapping_mul(2_654_435_761).to_le_bytes()[3])
            .collect::<Vec<u8>>(),
    )
}

fn limit() -> ReadLimit {
    ReadLimit {
        max: 8 << 20,
        declared: None,
    }
}

fn is_hash_error(err: &DriverError) -> bool {
    matches!(err, DriverError::Integrity(_)) && err.to_string().contains("sha256 hash mismatch")
}

/// Stores the object, checks `get` and `retrieve` hand it back, then changes the file at
/// `on_disk(key)` (one byte flipped near the end, then cut short by one byte) and checks both
/// refuse it with the hash error.
async fn tampered_objects_are_refused_by_get(
    driver: &dyn StorageDriver,
    on_disk: impl Fn(&str) -> std::path::PathBuf,
) {
    let payload = object();
    let claims: Vec<ClaimData> = driver.store(&ctx(), vec![payload.clone()]).await.unwrap();
    let valid = driver
        .settings()
        .validate(Some("default"), &claims[0])
        .unwrap();
    let got = driver.get(&valid, limit()).await.unwrap();
    assert_eq!(got.len(), OBJECT);
    let back = driver
        .retrieve(Some("default"), Fetch::undeclared(claims.clone()))
        .await
        .unwrap();
    assert_eq!(back, vec![payload.clone()]);

    let file = on_disk(&valid.key);
    let flip = |path: &Path| {
        let mut bytes = std::fs::read(path).unwrap();
        let at = bytes.len() - 10;
        bytes[at] ^= 0x01;
        std::fs::write(path, bytes).unwrap();
    };
    flip(&file);
    let err = driver.get(&valid, limit()).await.unwrap_err();
    assert!(is_hash_error(&err), "get of a flipped byte: {err}");
    let err = driver
        .retrieve(Some("default"), Fetch::undeclared(claims.clone()))
        .await
        .unwrap_err();
    assert!(is_hash_error(&err), "retrieve of a flipped byte: {err}");

    std::fs::write(&file, &payload[..OBJECT - 1]).unwrap();
    let err = driver.get(&valid, limit()).await.unwrap_err();
    assert!(is_hash_error(&err), "get of a truncated object: {err}");

    // Put back: served again.
    std::fs::write(&file, &payload).unwrap();
    assert_eq!(
        driver.get(&valid, limit()).await.unwrap().into_bytes(),
        payload
    );
}

#[tokio::test]
async fn filesystem_get_refuses_a_tampered_file() {
    let dir = tempfile::tempdir().unwrap();
    let driver = FilesystemDriver::new("local", dir.path(), 8 << 20).unwrap();
    tampered_objects_are_refused_by_get(&driver, |key| dir.path().join(key)).await;
}

#[tokio::test]
async fn s3_get_refuses_an_object_tampered_in_s3s_fs() {
    let Some(server) = common::s3s_fs(common::free_port(), &["payloads"]) else {
        return;
    };
    common::credentials_env();
    let mut config = S3Config::new("payloads");
    config.endpoint = Some(format!("http://127.0.0.1:{}", server.port));
    config.region = Some("us-east-1".to_owned());
    config.force_path_style = true;
    config.max_payload_size = 8 << 20;
    config.operation_timeout = Duration::from_secs(20);
    let driver = S3Driver::new(config).await;
    let root = server.root.path().join("payloads");
    tampered_objects_are_refused_by_get(&driver, |key| root.join(key)).await;
}
