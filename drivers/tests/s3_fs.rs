//! The S3 driver against a real S3-compatible server: `s3s-fs` (installed by scripts/setup.sh).
//! The test starts and stops the server itself; it is skipped, saying so, only when the binary
//! is absent.

mod common;

use std::time::Duration;

use bytes::Bytes;
use common::ctx;
use payload_gateway_drivers::s3::{S3Config, S3Driver};
use payload_gateway_drivers::{DriverError, Fetch, StorageDriver};

async fn driver(port: u16, max: u64) -> S3Driver {
    common::credentials_env();
    let mut config = S3Config::new("payloads");
    config.endpoint = Some(format!("http://127.0.0.1:{port}"));
    config.region = Some("us-east-1".to_owned());
    config.force_path_style = true;
    config.max_payload_size = max;
    config.operation_timeout = Duration::from_secs(10);
    S3Driver::new(config).await
}

#[tokio::test]
async fn s3_driver_against_s3s_fs() {
    let Some(server) = common::s3s_fs(common::free_port(), &["payloads", "other"]) else {
        return;
    };
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

    let back = d
        .retrieve(Some("default"), Fetch::undeclared(claims.clone()))
        .await
        .unwrap();
    assert_eq!(back, payloads);

    // Too large, with the limit in the message.
    let err = d
        .store(&ctx(), vec![Bytes::from(vec![0u8; (4 << 20) + 1])])
        .await
        .unwrap_err();
    assert!(matches!(err, DriverError::TooLarge { .. }), "{err}");

    // Another namespace, another bucket: refused before any request.
    let err = d
        .retrieve(Some("other"), Fetch::undeclared(claims.clone()))
        .await
        .unwrap_err();
    assert!(matches!(err, DriverError::ClaimRefused(_)), "{err}");
    let mut forged = claims[0].clone();
    forged.insert("bucket".to_owned(), "other".to_owned());
    let err = d
        .retrieve(Some("default"), Fetch::undeclared([forged]))
        .await
        .unwrap_err();
    assert!(matches!(err, DriverError::ClaimRefused(_)), "{err}");

    // A flipped byte at rest is a hash mismatch.
    let mut bytes = std::fs::read(&on_disk).unwrap();
    bytes[1000] ^= 1;
    std::fs::write(&on_disk, bytes).unwrap();
    let err = d
        .retrieve(Some("default"), Fetch::undeclared([claims[1].clone()]))
        .await
        .unwrap_err();
    assert!(matches!(err, DriverError::Integrity(_)), "{err}");
    assert!(err.to_string().contains("hash mismatch"), "{err}");

    // Missing object.
    std::fs::remove_file(&on_disk).unwrap();
    let err = d
        .retrieve(Some("default"), Fetch::undeclared([claims[1].clone()]))
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
