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
mod cfg;
mod cli;
mod client;
mod consts;
mod echo;
mod gz;
mod model;
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

use anyhow::{Result, anyhow};
use clap::Parser;

use crate::cli::Args;

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
