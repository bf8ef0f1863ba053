//! S3 multipart uploads (`PartUploads`) against `s3s-fs`, started and stopped by each test
//! (skipped, saying so, only when it is not installed): an object past the threshold goes up
//! in parts (the store's ETag says how many) and reads back byte for byte with its hash; one
//! below the threshold, and one whose key `s3s-fs` cannot hold a multipart upload for, goes up
//! as one PutObject; an object created by another writer during the upload is left as it is;
//! a failed or cancelled upload is aborted, leaving no object and no upload files in the
//! store's directory.

mod common;

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use aws_sdk_s3::config::{BehaviorVersion, Credentials, Region};
use bytes::Bytes;
use payload_gateway_drivers::s3::{PartUploads, S3Config, S3Driver};
use payload_gateway_drivers::{DriverError, Fetch, StorageDriver, StoreContext, StoreTarget};
use sha2::Digest;

const BUCKET: &str = "payloads";
const MIB: usize = 1 << 20;

/// Parts from 16 MiB on, 8 MiB each, 4 at a time (the sizes the README suggests for S3).
fn parts_on() -> PartUploads {
    PartUploads {
        threshold: 16 << 20,
        part_size: 8 << 20,
        concurrency: 4,
    }
}

async fn driver(port: u16, bucket: &str, parts: PartUploads) -> S3Driver {
    common::credentials_env();
    let mut config = S3Config::new(bucket);
    config.endpoint = Some(format!("http://127.0.0.1:{port}"));
    config.region = Some("us-east-1".to_owned());
    config.force_path_style = true;
    config.max_payload_size = 64 << 20;
    config.operation_timeout = Duration::from_secs(20);
    config.parts = parts;
    S3Driver::new(config).await
}

/// A plain SDK client on the store, to see what it holds without the driver.
fn raw_client(port: u16) -> aws_sdk_s3::Client {
    let config = aws_sdk_s3::Config::builder()
        .behavior_version(BehaviorVersion::latest())
        .region(Region::new("us-east-1"))
        .credentials_provider(Credentials::new("AK", "SK", None, None, "test"))
        .endpoint_url(format!("http://127.0.0.1:{port}"))
        .force_path_style(true)
        .build();
    aws_sdk_s3::Client::from_conf(config)
}

/// `len` bytes that differ from one `seed` to another.
fn payload(len: usize, seed: u32) -> Bytes {
    let mut x = seed.wrapping_mul(2_654_435_761) | 1;
    Bytes::from(
        (0..len)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 17;
                x ^= x << 5;
                x as u8
            })
            .collect::<Vec<u8>>(),
    )
}

/// A task-token request's context: keys `v0/ns/default/d/sha256/{hash}` (86 bytes).
fn short_keys() -> StoreContext {
    StoreContext {
        namespace: Some("default".to_owned()),
        target: None,
    }
}

/// A workflow with a UUID run id: keys of 146 bytes, past what `s3s-fs` can name a multipart
/// upload's metadata file for (see [`s3s_fs_multipart_key_limit`]).
fn long_keys() -> StoreContext {
    StoreContext {
        namespace: Some("default".to_owned()),
        target: Some(StoreTarget::Workflow {
            workflow_type: Some("Pipeline".to_owned()),
            workflow_id: Some("p-1".to_owned()),
            run_id: Some("0196f1a4-7c3e-7d2a-9b8e-5f4c3d2e1a0b".to_owned()),
        }),
    }
}

/// The longest key `s3s-fs` 0.14 takes a multipart upload for in `bucket`: it names the
/// upload's metadata file `.bucket-{b64(bucket)}.object-{b64(key)}.upload-{uuid}.metadata.json`
/// (URL-safe base64 without padding), and a file name has at most 255 bytes.
fn s3s_fs_multipart_key_limit(bucket: &str) -> usize {
    let b64 = |n: usize| (4 * n).div_ceil(3);
    let fixed =
        ".bucket-".len() + ".object-".len() + ".upload-".len() + 36 + ".metadata.json".len();
    (0..1024)
        .take_while(|&n| fixed + b64(bucket.len()) + b64(n) <= 255)
        .last()
        .unwrap()
}

/// What a multipart upload leaves in `s3s-fs`'s root: upload records (`.upload-{id}.json`),
/// parts (`.upload_id-{id}.part-{n}`) and per-upload metadata (`...upload-{id}.metadata.json`).
fn upload_files(root: &Path) -> Vec<String> {
    std::fs::read_dir(root)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with(".upload") || n.contains(".upload-"))
        .collect()
}

fn key_of(claim: &payload_gateway_drivers::ClaimData) -> String {
    claim["key"].clone()
}

/// The object as the store holds it: bytes and ETag, read with a plain client.
async fn stored(raw: &aws_sdk_s3::Client, key: &str) -> (Bytes, String) {
    let out = raw
        .get_object()
        .bucket(BUCKET)
        .key(key)
        .send()
        .await
        .unwrap();
    let etag = out.e_tag.clone().unwrap_or_default();
    (out.body.collect().await.unwrap().into_bytes(), etag)
}

fn hex_sha256(b: &[u8]) -> String {
    sha2::Sha256::digest(b)
        .iter()
        .map(|x| format!("{x:02x}"))
        .collect()
}

#[tokio::test]
async fn s3_uploads_past_the_threshold_in_parts() {
    let Some(server) = common::s3s_fs(common::free_port(), &[BUCKET]) else {
        return;
    };
    let driver = driver(server.port, BUCKET, parts_on()).await;
    let raw = raw_client(server.port);
    // 20 MiB + 3: three parts (8 + 8 + 4 MiB + 3 bytes); 48 MiB: six; 15 MiB: one PutObject.
    for (len, etag_suffix) in [
        (20 * MIB + 3, Some("-3")),
        (48 * MIB, Some("-6")),
        (15 * MIB, None),
    ] {
        let data = payload(len, len as u32);
        let claims = driver
            .store(&short_keys(), vec![data.clone()])
            .await
            .unwrap();
        let key = key_of(&claims[0]);
        assert!(key.starts_with("v0/ns/default/d/sha256/"), "{key}");
        let (back, etag) = stored(&raw, &key).await;
        assert_eq!(back.len(), len);
        assert!(back == data, "the stored bytes differ ({len} bytes)");
        assert_eq!(hex_sha256(&back), claims[0]["hash_value"]);
        let etag = etag.trim_matches('"');
        match etag_suffix {
            Some(suffix) => assert!(etag.ends_with(suffix), "{len} bytes: ETag {etag}"),
            None => assert!(!etag.contains('-'), "{len} bytes: ETag {etag}"),
        }
        // The driver reads it back and verifies the hash; storing it again is success.
        let fetched = driver
            .retrieve(Some("default"), Fetch::undeclared(claims.clone()))
            .await
            .unwrap();
        assert!(fetched[0] == data);
        assert_eq!(
            driver.store(&short_keys(), vec![data]).await.unwrap(),
            claims
        );
    }
    assert_eq!(upload_files(server.root.path()), Vec::<String>::new());
}

#[tokio::test]
async fn s3_parts_off_by_default() {
    let Some(server) = common::s3s_fs(common::free_port(), &[BUCKET]) else {
        return;
    };
    let driver = driver(server.port, BUCKET, PartUploads::default()).await;
    let data = payload(48 * MIB, 7);
    let claims = driver
        .store(&short_keys(), vec![data.clone()])
        .await
        .unwrap();
    let (back, etag) = stored(&raw_client(server.port), &key_of(&claims[0])).await;
    assert!(back == data);
    assert!(!etag.contains('-'), "one PutObject: ETag {etag}");
}

#[tokio::test]
async fn s3_keys_s3s_fs_cannot_name_an_upload_for_go_up_in_one_put() {
    let Some(server) = common::s3s_fs(common::free_port(), &[BUCKET]) else {
        return;
    };
    let driver = driver(server.port, BUCKET, parts_on()).await;
    let raw = raw_client(server.port);
    let data = payload(20 * MIB, 11);
    let claims = driver
        .store(&long_keys(), vec![data.clone()])
        .await
        .unwrap();
    let key = key_of(&claims[0]);
    let limit = s3s_fs_multipart_key_limit(BUCKET);
    assert!(
        key.len() > limit,
        "{} bytes, limit {limit}: {key}",
        key.len()
    );
    // The one CreateMultipartUpload the driver sent left what s3s-fs leaves for a refused
    // one: its upload record (a few bytes, no data; s3s-fs writes it before the metadata
    // file it cannot name, and never removes it). No part, no metadata.
    let left = upload_files(server.root.path());
    assert_eq!(left.len(), 1, "{left:?}");
    assert!(
        left[0].starts_with(".upload-") && left[0].ends_with(".json"),
        "{left:?}"
    );
    // s3s-fs refuses the upload itself (`InternalError`; its log says "File name too long"),
    // though the key is fine for S3.
    let refused = raw
        .create_multipart_upload()
        .bucket(BUCKET)
        .key(&key)
        .send()
        .await
        .unwrap_err();
    assert_eq!(
        refused.as_service_error().and_then(|e| e.meta().code()),
        Some("InternalError"),
        "{refused:?}"
    );
    let (back, etag) = stored(&raw, &key).await;
    assert!(back == data);
    assert!(!etag.contains('-'), "one PutObject: ETag {etag}");
    // A key at the limit still goes up in parts.
    let at_limit = format!("v0/ns/default/d/sha256/{}", "a".repeat(limit - 23));
    assert_eq!(at_limit.len(), limit);
    driver
        .put_absent(Some(BUCKET), &at_limit, data.clone())
        .await
        .unwrap();
    let (back, etag) = stored(&raw, &at_limit).await;
    assert!(back == data);
    assert!(etag.trim_matches('"').ends_with("-3"), "ETag {etag}");
    let left = upload_files(server.root.path());
    assert!(
        left.iter()
            .all(|n| !n.contains(".part-") && !n.contains(".metadata")),
        "{left:?}"
    );
}

/// Polls until `s3s-fs` holds an open upload with a part.
async fn wait_for_upload(root: &Path) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !upload_files(root).iter().any(|n| n.contains(".part-")) {
        assert!(Instant::now() < deadline, "no multipart upload started");
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

#[tokio::test]
async fn s3_an_object_created_during_the_upload_is_left_as_it_is() {
    let Some(server) = common::s3s_fs(common::free_port(), &[BUCKET]) else {
        return;
    };
    // Small parts, one at a time: the upload takes long enough for another writer.
    let slow = PartUploads {
        threshold: 0,
        part_size: 5 << 20,
        concurrency: 1,
    };
    let driver = driver(server.port, BUCKET, slow).await;
    let raw = raw_client(server.port);
    let key = "v0/ns/default/d/sha256/race";
    let mine = payload(48 * MIB, 1);
    let upload = tokio::spawn(async move { driver.put_absent(Some(BUCKET), key, mine).await });
    wait_for_upload(server.root.path()).await;
    raw.put_object()
        .bucket(BUCKET)
        .key(key)
        .body(Bytes::from_static(b"first writer").into())
        .send()
        .await
        .unwrap();
    assert!(
        !upload.is_finished(),
        "the upload ended before the other writer"
    );
    upload.await.unwrap().expect("losing the race is success");
    let (back, _) = stored(&raw, key).await;
    assert_eq!(
        &back[..],
        b"first writer",
        "the completion replaced the object"
    );
    assert_eq!(upload_files(server.root.path()), Vec::<String>::new());
}

/// A relay in front of `s3s-fs` that, while `cut` is set, closes every connection whose
/// client sends more than 1 MiB: UploadPart requests fail mid-body (the SDK's retries
/// too), small requests (CreateMultipartUpload, AbortMultipartUpload) pass.
struct CuttingRelay {
    port: u16,
    cut: Arc<AtomicBool>,
}

impl CuttingRelay {
    fn start(upstream: u16) -> CuttingRelay {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let cut = Arc::new(AtomicBool::new(false));
        let flag = cut.clone();
        std::thread::spawn(move || {
            for client in listener.incoming() {
                let Ok(client) = client else { return };
                let Ok(server) = TcpStream::connect(("127.0.0.1", upstream)) else {
                    continue;
                };
                let flag = flag.clone();
                let (mut c_read, mut s_write) =
                    (client.try_clone().unwrap(), server.try_clone().unwrap());
                let (mut s_read, mut c_write) = (server, client);
                std::thread::spawn(move || {
                    let mut buf = vec![0u8; 64 * 1024];
                    let mut sent = 0usize;
                    loop {
                        let n = match c_read.read(&mut buf) {
                            Ok(0) | Err(_) => break,
                            Ok(n) => n,
                        };
                        // Counted only while cutting: a pooled connection that carried
                        // parts before still takes small requests.
                        if flag.load(Ordering::Relaxed) {
                            sent += n;
                            if sent > MIB {
                                break;
                            }
                        }
                        if s_write.write_all(&buf[..n]).is_err() {
                            break;
                        }
                    }
                    let _ = c_read.shutdown(Shutdown::Both);
                    let _ = s_write.shutdown(Shutdown::Both);
                });
                std::thread::spawn(move || {
                    let _ = std::io::copy(&mut s_read, &mut c_write);
                    let _ = c_write.shutdown(Shutdown::Both);
                });
            }
        });
        CuttingRelay { port, cut }
    }
}

#[tokio::test]
async fn s3_a_failed_part_upload_is_aborted() {
    let Some(server) = common::s3s_fs(common::free_port(), &[BUCKET]) else {
        return;
    };
    let relay = CuttingRelay::start(server.port);
    let driver = driver(relay.port, BUCKET, parts_on()).await;
    let raw = raw_client(server.port);
    // Through the relay while it passes everything: parts work.
    let ok = payload(20 * MIB, 3);
    let claims = driver.store(&short_keys(), vec![ok.clone()]).await.unwrap();
    assert!(stored(&raw, &key_of(&claims[0])).await.0 == ok);

    relay.cut.store(true, Ordering::Relaxed);
    let data = payload(20 * MIB, 4);
    let key = format!("v0/ns/default/d/sha256/{}", hex_sha256(&data));
    let err = driver.store(&short_keys(), vec![data]).await.unwrap_err();
    let DriverError::Unavailable(message) = &err else {
        panic!("{err:?}")
    };
    assert!(message.contains("UploadPart"), "{message}");
    assert!(
        message.contains(&format!("s3://{BUCKET}/{key}")),
        "{message}"
    );
    assert!(
        !message.contains("is left"),
        "the upload was aborted: {message}"
    );
    // No object, not even a partial one, and no upload left behind.
    let head = raw.head_object().bucket(BUCKET).key(&key).send().await;
    assert!(head.is_err(), "an object is there: {head:?}");
    assert!(!server.root.path().join(BUCKET).join(&key).exists());
    assert_eq!(upload_files(server.root.path()), Vec::<String>::new());
}

#[tokio::test]
async fn s3_a_cancelled_upload_is_aborted() {
    let Some(server) = common::s3s_fs(common::free_port(), &[BUCKET]) else {
        return;
    };
    let slow = PartUploads {
        threshold: 0,
        part_size: 5 << 20,
        concurrency: 1,
    };
    let driver = Arc::new(driver(server.port, BUCKET, slow).await);
    let key = "v0/ns/default/d/sha256/cancelled";
    let d = driver.clone();
    let upload =
        tokio::spawn(async move { d.put_absent(Some(BUCKET), key, payload(48 * MIB, 5)).await });
    wait_for_upload(server.root.path()).await;
    upload.abort();
    assert!(upload.await.unwrap_err().is_cancelled());
    let deadline = Instant::now() + Duration::from_secs(10);
    while !upload_files(server.root.path()).is_empty() {
        assert!(
            Instant::now() < deadline,
            "left: {:?}",
            upload_files(server.root.path())
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(!server.root.path().join(BUCKET).join(key).exists());
}

#[tokio::test]
async fn s3_an_upload_cancelled_while_it_is_created_is_aborted() {
    let Some(server) = common::s3s_fs(common::free_port(), &[BUCKET]) else {
        return;
    };
    let driver = driver(server.port, BUCKET, parts_on()).await;
    let root = server.root.path();
    // Cancel as soon as s3s-fs has recorded the upload: its answer (the upload id) may not
    // have reached the driver yet.
    for round in 0..20u32 {
        let key = format!("v0/ns/default/d/sha256/early-{round}");
        let put = driver.put_absent(Some(BUCKET), &key, payload(20 * MIB, round));
        tokio::select! {
            r = put => panic!("the upload ended first: {r:?}"),
            () = async {
                while upload_files(root).is_empty() {
                    tokio::task::yield_now().await;
                }
            } => {}
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        while !upload_files(root).is_empty() {
            assert!(
                Instant::now() < deadline,
                "round {round}, left: {:?}",
                upload_files(root)
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}
