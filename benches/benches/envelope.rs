//! Envelope vs static-key codec throughput, in the same run: encode + decode of one payload
//! (`encode_batch` then `decode_batch_in`, the gateway's path) with a static key and with an
//! envelope key whose key-encryption key is the gRPC backend talking to the reference
//! `KMSService`, `tests/kms_sidecar.py`, started here as a real process. Results and how to
//! read them: BENCHMARKS.md, "Envelope encryption".
//!
//! `cargo bench --profile ci -p payload-gateway-benches --bench envelope`
//!
//! Needs the project's Python venv (scripts/setup.sh; `PGW_PYTHON` overrides the interpreter).
//! The sidecar is killed when the bench ends, and by the kernel if the bench dies
//! (`PR_SET_PDEATHSIG`), so nothing is left listening.

use std::collections::BTreeMap;
use std::hint::black_box;
use std::io::{BufRead, BufReader};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use payload_gateway::budget::MessageBudget;
use payload_gateway::codec::{PayloadCodec, WirePayload};
use payload_gateway::config::{Config, KeySpec, KmsServerConfig};
use payload_gateway_benches::json_like;
use prost::Message;
use tokio::runtime::Runtime;

const NAMESPACE: &str = "bench";
const KEK_ID: &str = "bench-kek";
const SIZES: [usize; 4] = [100, 1024, 64 * 1024, 1024 * 1024];

/// The interpreter of the project's venv (as `proxy/tests/kms_grpc.rs` finds it).
fn python() -> PathBuf {
    if let Some(path) = std::env::var_os("PGW_PYTHON") {
        return path.into();
    }
    let tools = std::env::var_os("PGW_TOOLS_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            Path::new(&std::env::var_os("HOME").unwrap_or_default()).join(".cache/payload-gateway")
        });
    let path = tools.join("venv/bin/python");
    assert!(
        path.is_file(),
        "no Python venv at {} (run scripts/setup.sh or set PGW_PYTHON)",
        path.display()
    );
    path
}

/// The reference `KMSService` as a child process on a free loopback port; killed and reaped
/// on drop, and by the kernel when this process dies first.
struct Sidecar {
    child: Child,
    address: String,
    log: PathBuf,
}

impl Sidecar {
    fn start(dir: &Path) -> Self {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/kms_sidecar.py");
        let log = dir.join("sidecar.log");
        let mut command = Command::new(python());
        command
            .arg(script)
            .args(["--listen", "127.0.0.1:0", "--key-file"])
            .arg(dir.join("kek.bin"))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&log).expect("create the sidecar log"));
        // SAFETY: prctl is async-signal-safe; the closure allocates nothing.
        unsafe {
            command.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let mut child = command.spawn().expect("start tests/kms_sidecar.py");
        let mut line = String::new();
        let _ = BufReader::new(child.stdout.take().expect("piped stdout")).read_line(&mut line);
        let mut sidecar = Self {
            child,
            address: String::new(),
            log,
        };
        match line.trim().strip_prefix("listening on ") {
            Some(address) => sidecar.address = address.to_owned(),
            None => panic!(
                "the sidecar did not start: {line:?}\n{}",
                std::fs::read_to_string(&sidecar.log).unwrap_or_default()
            ),
        }
        sidecar
    }

    /// Calls of `method` ("Encrypt" or "Decrypt") the sidecar logged.
    fn calls(&self, method: &str) -> usize {
        let prefix = format!("kms-sidecar: {method} ");
        std::fs::read_to_string(&self.log)
            .unwrap_or_default()
            .lines()
            .filter(|l| l.starts_with(&prefix))
            .count()
    }
}

impl Drop for Sidecar {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A serialized `json/plain` Payload of `len` bytes of JSON-like data.
fn payload(len: usize) -> Bytes {
    WirePayload {
        metadata: BTreeMap::from([("encoding".to_owned(), b"json/plain".to_vec())]),
        data: json_like(len).into(),
        ..Default::default()
    }
    .encode_to_vec()
    .into()
}

/// A codec encrypting with a static key (`sidecar: None`) or with an envelope key on the
/// sidecar's KEK; zstd on or off.
fn codec(dir: &Path, sidecar: Option<&Sidecar>, compress: bool) -> PayloadCodec {
    let mut config = Config::default();
    config.encryption.enabled = true;
    config.compression.enabled = compress;
    config.encryption.dev_key_file = dir.join("dev.key");
    let key = match sidecar {
        None => {
            let file = dir.join("static.key");
            std::fs::write(&file, [0x42; 32]).unwrap();
            KeySpec {
                id: "static".into(),
                file: Some(file),
                env: None,
                kms: None,
            }
        }
        Some(sidecar) => {
            let mut server = KmsServerConfig::new(sidecar.address.clone());
            server.tls = false; // loopback only, which the config accepts
            config.kms_servers.insert("side".into(), server);
            KeySpec {
                id: KEK_ID.into(),
                file: None,
                env: None,
                kms: Some("grpc://side".into()),
            }
        }
    };
    config.encryption.active_key = Some(key.id.clone());
    config.encryption.keys = vec![key];
    PayloadCodec::from_config(&config).expect("codec from config")
}

/// One round as the gateway does it for a message: encode the payload, then decode it again.
fn round(rt: &Runtime, codec: &PayloadCodec, input: &Bytes) -> Bytes {
    rt.block_on(async {
        let encoded = codec
            .encode_batch(Some(NAMESPACE), vec![input.clone()])
            .await
            .expect("encode")
            .pop()
            .flatten()
            .expect("encrypted");
        codec
            .decode_batch_in(Some(NAMESPACE), vec![encoded], MessageBudget::unlimited())
            .await
            .expect("decode")
            .pop()
            .flatten()
            .expect("decoded")
    })
}

fn label(len: usize) -> String {
    match len {
        l if l >= 1024 * 1024 => format!("{}MiB", l / (1024 * 1024)),
        l if l >= 1024 => format!("{}KiB", l / 1024),
        l => format!("{l}B"),
    }
}

fn envelope_vs_static(c: &mut Criterion) {
    let dir = tempfile::tempdir().unwrap();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let sidecar = Sidecar::start(dir.path());
    let _guard = rt.enter();
    let rounds = AtomicU64::new(0);
    for compress in [true, false] {
        let static_codec = codec(dir.path(), None, compress);
        let envelope_codec = codec(dir.path(), Some(&sidecar), compress);
        let group_name = if compress {
            "envelope_vs_static/zstd+aes"
        } else {
            "envelope_vs_static/aes"
        };
        for len in SIZES {
            let input = payload(len);
            // Same bytes back through both codecs before anything is timed.
            for codec in [&static_codec, &envelope_codec] {
                assert_eq!(round(&rt, codec, &input), input, "round trip");
            }
            let mut g = c.benchmark_group(group_name);
            g.sample_size(10)
                .warm_up_time(Duration::from_millis(300))
                .measurement_time(Duration::from_secs(1))
                .throughput(Throughput::Bytes(input.len() as u64));
            g.bench_function(BenchmarkId::new("static", label(len)), |b| {
                b.iter(|| round(&rt, &static_codec, black_box(&input)))
            });
            g.bench_function(BenchmarkId::new("envelope_grpc", label(len)), |b| {
                b.iter(|| {
                    rounds.fetch_add(1, Ordering::Relaxed);
                    round(&rt, &envelope_codec, black_box(&input))
                })
            });
            g.finish();
        }
    }
    // The point of envelope encryption: key-service calls per data key, not per payload.
    eprintln!(
        "envelope: {} encode+decode rounds, sidecar calls: Encrypt {}, Decrypt {}",
        rounds.load(Ordering::Relaxed) + 2 * SIZES.len() as u64,
        sidecar.calls("Encrypt"),
        sidecar.calls("Decrypt"),
    );
}

criterion_group!(benches, envelope_vs_static);
criterion_main!(benches);
