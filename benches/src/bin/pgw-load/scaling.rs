//! Runtime-thread scaling: the gateway (codecs off and on) with each `--scaling-threads` as
//! `proxy.worker_threads`, under more concurrency than the main run, against the echo
//! upstream.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Result, anyhow};

use crate::cfg::Cfg;
use crate::cli::Args;
use crate::client::Client;
use crate::echo::start_echo;
use crate::gz::ReqEnc;
use crate::model::{ScaleRow, fmt_size};
use crate::procs::{Proc, proc_tree};
use crate::targets::{GatewayOpts, spawn_gateway, wait_tcp};
use crate::work::{Upstream, Work, run_phase};

/// Throughput and CPU per RPC of gw-off and gw-codec with each `--scaling-threads` as
/// `proxy.worker_threads`, echo upstream, `--scaling-concurrency` streams over
/// `--scaling-connections` connections; `direct` at the same load first, as the ceiling of
/// the load generator.
pub async fn scaling_runs(args: &Args, dir: &Path, run_tag: &str) -> Result<Vec<ScaleRow>> {
    let (echo, _) = start_echo(None).await?;
    let mut gws: Vec<(Cfg, Option<usize>, Option<Proc>, SocketAddr)> =
        vec![(Cfg::Direct, None, None, echo)];
    for &threads in &args.scaling_threads {
        for cfg in [Cfg::GwOff, Cfg::GwCodec] {
            let tag = format!("scale-{}-t{threads}", cfg.label());
            let opts = GatewayOpts {
                pki: None,
                worker_threads: Some(threads),
            };
            let (mut p, addr) = spawn_gateway(args, cfg, echo, &dir.join(&tag), &tag, opts)?;
            wait_tcp(addr, &mut p, Duration::from_secs(10)).await?;
            gws.push((cfg, Some(threads), Some(p), addr));
        }
    }
    let mut out = Vec::new();
    let conns = args.scaling_connections.max(1);
    for &size in &args.scaling_sizes {
        let work = Arc::new(Work::new(
            Upstream::Echo,
            size,
            run_tag.to_string(),
            ReqEnc::Identity,
        ));
        for (cfg, threads, p, addr) in &gws {
            let mut clients = Vec::new();
            for _ in 0..conns {
                let c = Client::connect(*addr, None).await?;
                let mut lat = Vec::new();
                for _ in 0..3 {
                    work.op(&c, &mut lat, true).await.map_err(|e| {
                        anyhow!("scaling {} {}: {}", cfg.label(), fmt_size(size), e.0)
                    })?;
                }
                clients.push(c);
            }
            let pids = p.as_ref().map(|p| proc_tree(p.pid())).unwrap_or_default();
            let st = run_phase(
                work.clone(),
                &clients,
                args.scaling_concurrency,
                args.max_ops,
                args.conc_secs,
                &pids,
            )
            .await;
            eprintln!(
                "scaling {:8} threads {:>2} {:>7}: {:>8.0} rpc/s, {:.0} µs CPU/RPC, {:.2} cores | errors {} {}",
                cfg.label(),
                threads.map(|t| t.to_string()).unwrap_or("-".into()),
                fmt_size(size),
                st.rps(),
                1e6 * st.proxy_cpu_secs / st.rpcs.max(1) as f64,
                st.proxy_cpu_secs / st.secs,
                st.errors,
                st.first_error.as_deref().unwrap_or("")
            );
            out.push(ScaleRow {
                cfg: *cfg,
                threads: *threads,
                size,
                stats: st,
                concurrency: args.scaling_concurrency,
                connections: conns,
            });
        }
    }
    Ok(out)
}
