//! An object larger than its reference declares is refused before its body is read, on every
//! backend: S3 (`s3s-fs`), GCS (fake-gcs-server), Azure (Azurite) behind a relay that counts
//! the bytes the store sends, and the filesystem driver with a large sparse file and the
//! bytes this process reads from files (`/proc/self/io`, `rchar`).
//!
//! The attack: a reference declaring a small size whose claim names a large object (a
//! hash-valid one, stored through the driver). Each case also fetches the same object with
//! its true size declared, which must pass and read the whole body: the counters see reads.

mod common;

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use common::{Relay, ctx};
use payload_gateway_drivers::azure::{AzureConfig, AzureDriver};
use payload_gateway_drivers::filesystem::FilesystemDriver;
use payload_gateway_drivers::gcs::{GcsConfig, GcsDriver};
use payload_gateway_drivers::s3::{S3Config, S3Driver};
use payload_gateway_drivers::{ClaimData, DriverError, Fetch, StorageDriver};

/// The object the forged reference points at.
const OBJECT: usize = 16 << 20;
/// The size the forged reference declares.
const DECLARED: u64 = 1000;
/// What may cross the relay while an oversized object is refused: response headers and the
/// few paced chunks in flight before the client closes the connection.
const REFUSED_BUDGET: u64 = 4 << 20;

/// The file-read tests must not overlap (they measure this process's reads).
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn object() -> Bytes {
    let mut v = vec![0u8; OBJECT];
    for (i, b) in v.iter_mut().enumerate() {
        *b = (i as u32).wrapping_mul(2_654_435_761).to_le_bytes()[3];
    }
    Bytes::from(v)
}

fn fetch(claim: &ClaimData, declared: u64) -> Vec<Fetch> {
    vec![Fetch {
        claim: claim.clone(),
        declared_size: Some(declared),
    }]
}

/// Stores the object through `driver` (via `relay`), then: declared small, refused with
/// `LargerThanDeclared` while almost nothing crosses the relay; declared right, read whole.
async fn refused_before_the_body(driver: &dyn StorageDriver, relay: &Relay) {
    let payload = object();
    let claims = driver.store(&ctx(), vec![payload.clone()]).await.unwrap();

    relay.reset();
    let err = driver
        .retrieve(Some("default"), fetch(&claims[0], DECLARED))
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            DriverError::LargerThanDeclared {
                size,
                declared: DECLARED
            } if size == OBJECT as u64
        ),
        "{err}"
    );
    let refused = relay.received();
    assert!(
        refused < REFUSED_BUDGET,
        "{}: {refused} bytes of a {OBJECT}-byte object crossed the relay although it was \
         refused from its metadata",
        driver.name()
    );

    relay.reset();
    let back = driver
        .retrieve(Some("default"), fetch(&claims[0], OBJECT as u64))
        .await
        .unwrap();
    assert_eq!(back, vec![payload]);
    let read = relay.received();
    assert!(
        read >= OBJECT as u64,
        "{}: only {read} bytes crossed the relay for a whole object",
        driver.name()
    );
    eprintln!(
        "{}: refused after {refused} bytes from the store, read whole: {read}",
        driver.name()
    );
}

#[tokio::test]
async fn s3_object_larger_than_declared_is_not_read() {
    let _serial = SERIAL.lock().await;
    common::credentials_env();
    let port = common::free_port();
    let relay = Relay::start(port).await;
    let Some(_server) = common::s3s_fs(port, &["payloads"]) else {
        return;
    };
    let mut config = S3Config::new("payloads");
    config.endpoint = Some(format!("http://127.0.0.1:{}", relay.port));
    config.region = Some("us-east-1".to_owned());
    config.force_path_style = true;
    config.operation_timeout = Duration::from_secs(30);
    let driver = S3Driver::new(config).await;
    refused_before_the_body(&driver, &relay).await;
}

#[tokio::test]
async fn gcs_object_larger_than_declared_is_not_read() {
    let _serial = SERIAL.lock().await;
    let port = common::free_port();
    let relay = Relay::start(port).await;
    let host = format!("127.0.0.1:{}", relay.port);
    let Some(_server) = common::fake_gcs(port, &host, "payloads") else {
        return;
    };
    let mut config = GcsConfig::new("payloads");
    config.endpoint = Some(format!("http://{host}"));
    config.anonymous = true;
    config.operation_timeout = Duration::from_secs(30);
    let driver = GcsDriver::new(config).unwrap();
    refused_before_the_body(&driver, &relay).await;
}

#[tokio::test]
async fn azure_object_larger_than_declared_is_not_read() {
    let _serial = SERIAL.lock().await;
    common::credentials_env();
    let port = common::free_port();
    let relay = Relay::start(port).await;
    let Some(_server) = common::azurite(port, "payloads") else {
        return;
    };
    let mut config = AzureConfig::new(common::AZURITE_ACCOUNT, "payloads");
    config.endpoint = Some(format!(
        "http://127.0.0.1:{}/{}",
        relay.port,
        common::AZURITE_ACCOUNT
    ));
    config.operation_timeout = Duration::from_secs(30);
    let driver = AzureDriver::new(config).unwrap();
    refused_before_the_body(&driver, &relay).await;
}

/// Bytes this process has read through `read(2)` and friends (files, pipes; not sockets).
fn rchar() -> u64 {
    let io = std::fs::read_to_string("/proc/self/io").unwrap();
    io.lines()
        .find_map(|l| l.strip_prefix("rchar: "))
        .unwrap()
        .parse()
        .unwrap()
}

/// A stored payload replaced on disk by a 1 GiB sparse file (the driver allows 2 GiB): with
/// the original size declared it is refused from its length, with nothing read; declared
/// as large as it is, it is read (and then fails its hash).
#[tokio::test]
async fn filesystem_object_larger_than_declared_is_not_read() {
    let _serial = SERIAL.lock().await;
    const SPARSE: u64 = 1 << 30;
    let dir = tempfile::tempdir().unwrap();
    let driver = Arc::new(FilesystemDriver::new("local", dir.path(), 2 << 30).unwrap());
    let claims = driver
        .store(&ctx(), vec![Bytes::from(vec![5u8; DECLARED as usize])])
        .await
        .unwrap();
    let file = dir.path().join(&claims[0]["key"]);
    std::fs::remove_file(&file).unwrap();
    std::fs::File::create(&file)
        .unwrap()
        .set_len(SPARSE)
        .unwrap();

    let before = rchar();
    let err = driver
        .retrieve(Some("default"), fetch(&claims[0], DECLARED))
        .await
        .unwrap_err();
    let refused = rchar() - before;
    assert!(
        matches!(
            err,
            DriverError::LargerThanDeclared {
                size: SPARSE,
                declared: DECLARED
            }
        ),
        "{err}"
    );
    assert!(
        refused < 1 << 20,
        "{refused} bytes read for an object refused from its length"
    );

    // The positive control on a smaller sparse file: the counter sees file reads.
    std::fs::File::options()
        .write(true)
        .open(&file)
        .unwrap()
        .set_len(OBJECT as u64)
        .unwrap();
    let before = rchar();
    let err = driver
        .retrieve(Some("default"), fetch(&claims[0], OBJECT as u64))
        .await
        .unwrap_err();
    let read = rchar() - before;
    assert!(matches!(err, DriverError::Integrity(_)), "{err}");
    assert!(read >= OBJECT as u64, "only {read} bytes read");
}
