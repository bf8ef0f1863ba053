//! `pgw-load`: RPC-level load against a Temporal dev server (or an in-process h2 echo upstream)
//! directly, through nginx `grpc_pass`, and through the gateway with codecs off, with inbound
//! authorization only, with zstd + AES-256-GCM, and with offload to the filesystem driver —
//! all in one run; against the echo upstream also with TLS on both hops, and the gateway with
//! 1 and 2 runtime threads. Requests go uncompressed, gzip-compressed as the SDKs send them,
//! or both (`--request-encodings`).
//!
//! It starts every peer itself on free loopback ports (the Temporal dev server, nginx, the
//! gateways), measures, stops them, and writes `load.csv`, `load-scaling.csv`, `load.md` and
//! `load-added-latency.svg` into `--out`. `scripts/bench-load.sh` is the documented entry point.
//!
//! Every loop is bounded both in count and in time.
//!
//! Modules: [`gz`] (request encodings, gzip), [`procs`] (child processes, `/proc`), [`client`] (gRPC over HTTP/2, cleartext or
//! TLS), [`echo`] (the echo upstream), [`tls`] (certificates), [`targets`] (configurations and
//! how they start), [`work`] (payloads, workloads, timed phases), [`baseline`] (raw codec and
//! raw file store, same run), [`run`] (the order of measurements), [`scaling`] (runtime
//! threads), [`ready`] (start to ready), [`report`] (CSV and the main markdown tables),
//! [`tables`] (codec rate, offload, cores per 1,000 RPC/s, scaling), [`svg`] (the chart).

mod baseline;
mod client;
mod echo;
mod gz;
mod procs;
mod ready;
mod report;
mod run;
mod scaling;
mod svg;
mod tables;
mod targets;
mod tls;
mod work;

use std::path::PathBuf;

use anyhow::{Result, anyhow};
use clap::Parser;

use crate::gz::ReqEnc;
use crate::targets::Cfg;
use crate::work::Upstream;

/// The bench's AES-256 key (32 bytes, base64), given to the gateways as `PGW_LOAD_KEY`.
const KEY_B64: &str = "MDEyMzQ1Njc4OWFiY2RlZjAxMjM0NTY3ODlhYmNkZWY="; // 32 bytes, bench only
/// The Temporal namespace of every request.
const NAMESPACE: &str = "default";
/// The bearer token every request carries; `gw-auth` grants it [`NAMESPACE`] (given to the
/// gateways as `PGW_LOAD_TOKENS`).
const TOKEN: &str = "pgw-load-bench-token"; // bench only

/// Command line.
#[derive(Parser, Debug, Clone)]
#[command(about = "Payload Gateway load benchmark (see BENCHMARKS.md, section Load)")]
pub struct Args {
    /// The gateway binary (`cargo build --profile ci -p payload-gateway`, or `--release`);
    /// any build can be measured (the same command before and after a change).
    #[arg(long)]
    gateway_bin: PathBuf,
    /// A name for the gateway binary in the report and the CSV's `gateway` column (for
    /// example `before` / `after`); default: the first 12 hex digits of its SHA-256.
    #[arg(long)]
    gateway_label: Option<String>,
    /// The `temporal` CLI (dev server); omit to run the echo upstream only.
    #[arg(long)]
    temporal_bin: Option<PathBuf>,
    /// nginx binary; omit to skip the nginx comparison.
    #[arg(long)]
    nginx_bin: Option<PathBuf>,
    /// Output directory (CSV, markdown, SVG, logs).
    #[arg(long, default_value = "benches/results")]
    out: PathBuf,
    /// Upstreams to measure against (`temporal` also needs `--temporal-bin`).
    #[arg(long, value_delimiter = ',', value_enum, default_values_t = [Upstream::Echo, Upstream::Temporal])]
    upstreams: Vec<Upstream>,
    /// Payload sizes in bytes.
    #[arg(long, value_delimiter = ',', default_value = "100,1024,65536,1048576")]
    sizes: Vec<usize>,
    /// Configurations to measure. `direct` (and `direct-tls` when a `-tls` one is chosen) is
    /// always added: ratios are taken against it. The `-tls` ones (TLS on both hops) run
    /// against the echo upstream only; the nginx ones need `--nginx-bin`.
    #[arg(long, value_delimiter = ',', value_enum, default_values_t = Cfg::ALL)]
    configs: Vec<Cfg>,
    /// How requests are encoded: `identity` (uncompressed frames) and/or `gzip`
    /// (`grpc-encoding: gzip`, every frame compressed, as the Python SDK sends requests).
    /// Each size runs every encoding against every configuration, in this order.
    #[arg(long, value_delimiter = ',', value_enum, default_values_t = [ReqEnc::Identity])]
    request_encodings: Vec<ReqEnc>,
    /// Concurrent RPC streams (one HTTP/2 connection) in the throughput phase, echo upstream.
    #[arg(long, default_value_t = 8)]
    echo_concurrency: usize,
    /// Concurrent workflow iterations in the throughput phase, Temporal upstream.
    #[arg(long, default_value_t = 4)]
    temporal_concurrency: usize,
    /// Time bound of each sequential (latency) phase, seconds.
    #[arg(long, default_value_t = 1.5)]
    seq_secs: f64,
    /// Time bound of each concurrent (throughput) phase, seconds.
    #[arg(long, default_value_t = 3.0)]
    conc_secs: f64,
    /// Count bound of each phase (operations).
    #[arg(long, default_value_t = 20000)]
    max_ops: u64,
    /// Offload threshold (serialized bytes after the codec) for the offload configuration.
    #[arg(long, default_value_t = 512)]
    offload_threshold: usize,
    /// `storage.cache_bytes` (LRU of resolved objects) of the offload configuration; the
    /// gateway's default is 64 MiB, 0 separates the cache from the memory figures.
    #[arg(long, default_value_t = 64 * 1024 * 1024)]
    offload_cache_bytes: usize,
    /// Start-to-ready samples.
    #[arg(long, default_value_t = 20)]
    ready_samples: usize,
    /// Skip the runtime-thread scaling runs (gw-off and gw-codec, echo upstream, with each
    /// of `--scaling-threads` as `proxy.worker_threads`).
    #[arg(long)]
    no_scaling: bool,
    /// Payload sizes of the scaling runs, bytes.
    #[arg(long, value_delimiter = ',', default_value = "1024,65536")]
    scaling_sizes: Vec<usize>,
    /// `proxy.worker_threads` values of the scaling runs.
    #[arg(long, value_delimiter = ',', default_value = "1,2")]
    scaling_threads: Vec<usize>,
    /// Concurrent RPC streams of the scaling runs (spread over `--scaling-connections`).
    #[arg(long, default_value_t = 16)]
    scaling_concurrency: usize,
    /// HTTP/2 connections of the scaling runs.
    #[arg(long, default_value_t = 2)]
    scaling_connections: usize,
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<()> {
    let args = Args::parse();
    std::fs::create_dir_all(&args.out)?;
    let work_dir = tempfile::Builder::new().prefix("pgw-load-").tempdir()?;
    let res = tokio::select! {
        r = run::run(&args, work_dir.path()) => r,
        _ = tokio::signal::ctrl_c() => Err(anyhow!("interrupted")),
    };
    // Processes stop in `run`'s drops; keep the logs when something failed.
    if res.is_err() {
        let kept = work_dir.keep();
        eprintln!("logs kept in {}", kept.display());
    }
    res
}
