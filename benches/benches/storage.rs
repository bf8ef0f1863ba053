//! External storage: the gateway's S3 driver (offload = SHA-256 + HeadObject + PutObject,
//! resolve = GetObject + SHA-256 verification) against raw PutObject/GetObject with the same
//! client settings, on the same s3s-fs, in the same run. 1, 16 and 64 MiB.
//!
//!   cargo bench -p payload-gateway-benches --bench storage
//!
//! Needs `s3s-fs` (scripts/setup.sh installs it in ~/.cache/payload-gateway/cargo/bin).

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use aws_sdk_s3::primitives::ByteStream;
use bytes::Bytes;
use criterion::{BatchSize, Criterion, Throughput, criterion_group, criterion_main};
use payload_gateway_drivers::s3::{S3Config, S3Driver};
use payload_gateway_drivers::{StorageDriver, StoreContext};

struct Server(Child, #[allow(dead_code)] tempfile::TempDir);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

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
    Some((Server(child, root), port))
}

fn bench(c: &mut Criterion) {
    let Some((_server, port)) = start_s3s() else {
        return;
    };
    // SAFETY: single-threaded at this point.
    unsafe {
        std::env::set_var("AWS_ACCESS_KEY_ID", "AK");
        std::env::set_var("AWS_SECRET_ACCESS_KEY", "SK");
    }
    let rt = tokio::runtime::Runtime::new().unwrap();
    let mut config = S3Config::new("bench");
    config.endpoint = Some(format!("http://127.0.0.1:{port}"));
    config.region = Some("us-east-1".to_owned());
    config.force_path_style = true;
    config.max_payload_size = 128 << 20;
    let driver = rt.block_on(S3Driver::new(config));
    let raw = rt.block_on(async {
        let shared = aws_config_like(port).await;
        aws_sdk_s3::Client::from_conf(shared)
    });
    let ctx = StoreContext {
        namespace: Some("default".to_owned()),
        target: None,
    };
    let mut counter = 0u64;
    for mib in [1usize, 16, 64] {
        let size = mib << 20;
        let base: Vec<u8> = (0..size)
            .map(|i| (i as u32).wrapping_mul(2654435761) as u8)
            .collect();
        let mut g = c.benchmark_group(format!("storage/{mib}MiB"));
        g.throughput(Throughput::Bytes(size as u64));
        g.sample_size(10);
        g.measurement_time(Duration::from_secs(if mib == 64 { 20 } else { 8 }));
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
        let claims = rt
            .block_on(driver.store(&ctx, vec![payload.clone()]))
            .unwrap();
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

criterion_group!(benches, bench);
criterion_main!(benches);
