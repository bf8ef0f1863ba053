//! The command line and the constants every part of a run shares.

use std::path::PathBuf;

use clap::Parser;

use crate::cfg::Cfg;
use crate::gz::ReqEnc;
use crate::work::Upstream;

/// Command line.
#[derive(Parser, Debug, Clone)]
#[command(about = "Payload Gateway load benchmark (see BENCHMARKS.md, section Load)")]
pub struct Args {
    /// The gateway binary (`cargo build --profile ci -p payload-gateway`, or `--release`);
    /// any build can be measured (the same command before and after a change).
    #[arg(long)]
    pub(crate) gateway_bin: PathBuf,
    /// A name for the gateway binary in the report and the CSV's `gateway` column (for
    /// example `before` / `after`); default: the first 12 hex digits of its SHA-256.
    #[arg(long)]
    pub(crate) gateway_label: Option<String>,
    /// The `temporal` CLI (dev server); omit to run the echo upstream only.
    #[arg(long)]
    pub(crate) temporal_bin: Option<PathBuf>,
    /// nginx binary; omit to skip the nginx comparison.
    #[arg(long)]
    pub(crate) nginx_bin: Option<PathBuf>,
    /// Output directory (CSV, markdown, SVG, logs).
    #[arg(long, default_value = "benches/results")]
    pub(crate) out: PathBuf,
    /// Upstreams to measure against (`temporal` also needs `--temporal-bin`).
    #[arg(long, value_delimiter = ',', value_enum, default_values_t = [Upstream::Echo, Upstream::Temporal])]
    pub(crate) upstreams: Vec<Upstream>,
    /// Payload sizes in bytes.
    #[arg(long, value_delimiter = ',', default_value = "100,1024,65536,1048576")]
    pub(crate) sizes: Vec<usize>,
    /// Configurations to measure. `direct` (and `direct-tls` when a `-tls` one is chosen) is
    /// always added: ratios are taken against it. The `-tls` ones (TLS on both hops) run
    /// against the echo upstream only; the nginx ones need `--nginx-bin`.
    #[arg(long, value_delimiter = ',', value_enum, default_values_t = Cfg::ALL)]
    pub(crate) configs: Vec<Cfg>,
    /// How requests are encoded: `identity` (uncompressed frames) and/or `gzip`
    /// (`grpc-encoding: gzip`, every frame compressed, as the Python SDK sends requests).
    /// Each size runs every encoding against every configuration, in this order.
    #[arg(long, value_delimiter = ',', value_enum, default_values_t = [ReqEnc::Identity])]
    pub(crate) request_encodings: Vec<ReqEnc>,
    /// Concurrent RPC streams (one HTTP/2 connection) in the throughput phase, echo upstream.
    #[arg(long, default_value_t = 8)]
    pub(crate) echo_concurrency: usize,
    /// Concurrent workflow iterations in the throughput phase, Temporal upstream.
    #[arg(long, default_value_t = 4)]
    pub(crate) temporal_concurrency: usize,
    /// Time bound of each sequential (latency) phase, seconds.
    #[arg(long, default_value_t = 1.5)]
    pub(crate) seq_secs: f64,
    /// Time bound of each concurrent (throughput) phase, seconds.
    #[arg(long, default_value_t = 3.0)]
    pub(crate) conc_secs: f64,
    /// Count bound of each phase (operations).
    #[arg(long, default_value_t = 20000)]
    pub(crate) max_ops: u64,
    /// Offload threshold (serialized bytes after the codec) for the offload configuration.
    #[arg(long, default_value_t = 512)]
    pub(crate) offload_threshold: usize,
    /// `storage.cache_bytes` (LRU of resolved objects) of the offload configuration; the
    /// gateway's default is 64 MiB, 0 separates the cache from the memory figures.
    #[arg(long, default_value_t = 64 * 1024 * 1024)]
    pub(crate) offload_cache_bytes: usize,
    /// Start-to-ready samples.
    #[arg(long, default_value_t = 20)]
    pub(crate) ready_samples: usize,
    /// Skip the runtime-thread scaling runs (gw-off and gw-codec, echo upstream, with each
    /// of `--scaling-threads` as `proxy.worker_threads`).
    #[arg(long)]
    pub(crate) no_scaling: bool,
    /// Payload sizes of the scaling runs, bytes.
    #[arg(long, value_delimiter = ',', default_value = "1024,65536")]
    pub(crate) scaling_sizes: Vec<usize>,
    /// `proxy.worker_threads` values of the scaling runs.
    #[arg(long, value_delimiter = ',', default_value = "1,2")]
    pub(crate) scaling_threads: Vec<usize>,
    /// Concurrent RPC streams of the scaling runs (spread over `--scaling-connections`).
    #[arg(long, default_value_t = 16)]
    pub(crate) scaling_concurrency: usize,
    /// HTTP/2 connections of the scaling runs.
    #[arg(long, default_value_t = 2)]
    pub(crate) scaling_connections: usize,
}
