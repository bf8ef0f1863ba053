//! `list` and `delete` (what `payload-gateway storage gc` uses) on every backend: the
//! filesystem and memory drivers here, S3 against `s3s-fs`, GCS against fake-gcs-server and
//! Azure against Azurite (each started and stopped by its test; skipped, saying so, only when
//! the emulator is not installed).

mod common;

use std::time::{Duration, SystemTime};

use bytes::Bytes;
use common::ctx;
use payload_gateway_drivers::azure::{AzureConfig, AzureDriver};
use payload_gateway_drivers::filesystem::FilesystemDriver;
use payload_gateway_drivers::gcs::{GcsConfig, GcsDriver};
use payload_gateway_drivers::object::ObjectStoreDriver;
use payload_gateway_drivers::s3::{S3Config, S3Driver};
use payload_gateway_drivers::{DriverError, Fetch, StorageDriver, StoreContext};

fn other_namespace() -> StoreContext {
    StoreContext {
        namespace: Some("other ns".to_owned()),
        ..ctx()
    }
}

/// Stores objects in two namespaces, lists by namespace prefix and in whole, deletes one and
/// checks it is gone from listings and reads; deleting it again is success.
async fn list_and_delete(driver: &dyn StorageDriver) {
    let before = SystemTime::now() - Duration::from_secs(5);
    let bucket = driver.settings().write_bucket();
    let mine = vec![Bytes::from_static(b"first"), Bytes::from(vec![9u8; 70_000])];
    let claims = driver.store(&ctx(), mine.clone()).await.unwrap();
    let theirs = driver
        .store(&other_namespace(), vec![Bytes::from_static(b"theirs")])
        .await
        .unwrap();
    let key_of = |claim: &payload_gateway_drivers::ClaimData| {
        ["key", "object_name", "blob_name"]
            .iter()
            .find_map(|f| claim.get(*f).cloned())
            .unwrap()
    };

    let mut listed = driver.list(bucket, "v0/ns/default/").await.unwrap();
    listed.sort_by_key(|o| o.size);
    assert_eq!(listed.len(), 2, "{listed:?}");
    assert_eq!(listed[0].key, key_of(&claims[0]));
    assert_eq!(listed[1].key, key_of(&claims[1]));
    assert_eq!((listed[0].size, listed[1].size), (5, 70_000));
    for object in &listed {
        assert_eq!(object.bucket.as_deref(), bucket);
        assert!(
            object.last_modified > before
                && object.last_modified < SystemTime::now() + Duration::from_secs(5),
            "last-modified is the write time: {object:?}"
        );
    }
    let all = driver.list(bucket, "v0/").await.unwrap();
    assert_eq!(all.len(), 3, "{all:?}");
    assert!(all.iter().any(|o| o.key == key_of(&theirs[0])));
    assert!(
        driver
            .list(bucket, "v0/ns/nobody/")
            .await
            .unwrap()
            .is_empty()
    );
    driver.probe().await.expect("the store answers");

    driver.delete(bucket, &listed[1].key).await.unwrap();
    let left = driver.list(bucket, "v0/ns/default/").await.unwrap();
    assert_eq!(left.len(), 1, "{left:?}");
    assert_eq!(left[0].key, key_of(&claims[0]));
    let err = driver
        .retrieve(Some("default"), Fetch::undeclared([claims[1].clone()]))
        .await
        .unwrap_err();
    assert!(matches!(err, DriverError::NotFound(_)), "{err}");
    driver
        .delete(bucket, &listed[1].key)
        .await
        .expect("deleting what is gone is success");
    // The rest is untouched and still reads.
    let back = driver
        .retrieve(Some("default"), Fetch::undeclared([claims[0].clone()]))
        .await
        .unwrap();
    assert_eq!(back[0], mine[0]);
    assert_eq!(driver.list(bucket, "v0/").await.unwrap().len(), 2);
}

#[tokio::test]
async fn filesystem_lists_objects_not_staging_files() {
    let dir = tempfile::tempdir().unwrap();
    let driver = FilesystemDriver::new("local", dir.path(), 1 << 20).unwrap();
    // A staging file left by a writer that crashed is no object.
    let staging = dir.path().join("v0/ns/default/x/d/sha256/abc#12");
    std::fs::create_dir_all(staging.parent().unwrap()).unwrap();
    std::fs::write(&staging, b"partial").unwrap();
    list_and_delete(&driver).await;
    assert!(staging.exists());
    // A root that does not hold the prefix lists nothing.
    assert!(driver.list(None, "v0/ns/none/").await.unwrap().is_empty());
}

#[tokio::test]
async fn memory_lists_and_deletes() {
    list_and_delete(&ObjectStoreDriver::memory("mem", 1 << 20)).await;
}

#[tokio::test]
async fn s3_lists_and_deletes_against_s3s_fs() {
    common::credentials_env();
    let Some(server) = common::s3s_fs(common::free_port(), &["payloads"]) else {
        return;
    };
    let mut config = S3Config::new("payloads");
    config.endpoint = Some(format!("http://127.0.0.1:{}", server.port));
    config.region = Some("us-east-1".to_owned());
    config.force_path_style = true;
    config.operation_timeout = Duration::from_secs(10);
    let driver = S3Driver::new(config).await;
    list_and_delete(&driver).await;
    // More than one page (ListObjectsV2 returns at most 1000 keys per page).
    let many: Vec<Bytes> = (0..1100u32)
        .map(|i| Bytes::from(i.to_be_bytes().to_vec()))
        .collect();
    driver.store(&ctx(), many).await.unwrap();
    let listed = driver
        .list(Some("payloads"), "v0/ns/default/")
        .await
        .unwrap();
    assert_eq!(listed.len(), 1101);
    // Server gone: listing is unavailable, not empty.
    drop(server);
    let err = driver.list(Some("payloads"), "v0/").await.unwrap_err();
    assert!(matches!(err, DriverError::Unavailable(_)), "{err}");
    assert!(driver.probe().await.is_err());
}

#[tokio::test]
async fn gcs_lists_and_deletes_against_fake_gcs() {
    let port = common::free_port();
    let host = format!("127.0.0.1:{port}");
    let Some(_server) = common::fake_gcs(port, &host, "payloads") else {
        return;
    };
    let mut config = GcsConfig::new("payloads");
    config.endpoint = Some(format!("http://{host}"));
    config.anonymous = true;
    config.operation_timeout = Duration::from_secs(30);
    list_and_delete(&GcsDriver::new(config).unwrap()).await;
}

#[tokio::test]
async fn azure_lists_and_deletes_against_azurite() {
    common::credentials_env();
    let port = common::free_port();
    let Some(_server) = common::azurite(port, "payloads") else {
        return;
    };
    let mut config = AzureConfig::new(common::AZURITE_ACCOUNT, "payloads");
    config.endpoint = Some(format!(
        "http://127.0.0.1:{port}/{}",
        common::AZURITE_ACCOUNT
    ));
    config.operation_timeout = Duration::from_secs(30);
    list_and_delete(&AzureDriver::new(config).unwrap()).await;
}
