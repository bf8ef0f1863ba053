//! Start to ready: spawn → first TCP accept and spawn → first successful RPC, per gateway
//! configuration, against the echo upstream.

use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use tokio::net::TcpStream;

use crate::cfg::Cfg;
use crate::cli::Args;
use crate::client::Client;
use crate::echo::start_echo;
use crate::gz::ReqEnc;
use crate::targets::{GatewayOpts, spawn_gateway};
use crate::work::{Upstream, Work};

/// Start to ready (echo upstream): codecs off, then codecs on; markdown table lines.
pub async fn start_to_ready(args: &Args, dir: &Path, run_tag: &str) -> Result<Vec<String>> {
    let mut ready_lines = Vec::new();
    if args.ready_samples == 0 {
        return Ok(ready_lines);
    }
    let (echo, _) = start_echo(None).await?;
    let work = Work::new(Upstream::Echo, 1024, run_tag.to_string(), ReqEnc::Identity);
    for cfg in [Cfg::GwOff, Cfg::GwCodec] {
        let (mut accept, mut ready) = (Vec::new(), Vec::new());
        for i in 0..args.ready_samples {
            let d = dir.join(format!("ready-{}-{i}", cfg.label()));
            let t0 = Instant::now();
            let (mut p, addr) =
                spawn_gateway(args, cfg, echo, &d, "ready", GatewayOpts::default())?;
            let deadline = t0 + Duration::from_secs(10);
            let mut accepted = None;
            loop {
                if accepted.is_none() && TcpStream::connect(addr).await.is_ok() {
                    accepted = Some(t0.elapsed());
                }
                if accepted.is_some() && readiness_rpc(addr, &work).await {
                    break;
                }
                if Instant::now() > deadline || !p.alive() {
                    bail!("gateway not ready in 10 s (sample {i})");
                }
                tokio::time::sleep(Duration::from_micros(200)).await;
            }
            ready.push(t0.elapsed().as_secs_f64() * 1e3);
            accept.push(accepted.expect("accepted").as_secs_f64() * 1e3);
            drop(p);
            let _ = std::fs::remove_dir_all(&d);
        }
        let med = |v: &mut Vec<f64>| {
            v.sort_by(|a, b| a.total_cmp(b));
            v[v.len() / 2]
        };
        let (ma, mr) = (med(&mut accept), med(&mut ready));
        ready_lines.push(format!(
            "| {} | spawn → TCP accept | {ma:.1} ms | {:.1}–{:.1} ms |",
            cfg.label(),
            accept[0],
            accept[accept.len() - 1]
        ));
        ready_lines.push(format!(
            "| {} | spawn → first successful RPC (QueryWorkflow, 1 KiB) | {mr:.1} ms | {:.1}–{:.1} ms |",
            cfg.label(),
            ready[0],
            ready[ready.len() - 1]
        ));
        eprintln!(
            "start to ready ({}): accept {ma:.1} ms, first RPC {mr:.1} ms (median of {})",
            cfg.label(),
            args.ready_samples
        );
    }
    Ok(ready_lines)
}

/// One verified operation through `addr` within 2 s.
async fn readiness_rpc(addr: SocketAddr, work: &Work) -> bool {
    let Ok(c) = Client::connect(addr, None).await else {
        return false;
    };
    let mut lat = Vec::new();
    match tokio::time::timeout(Duration::from_secs(2), work.op(&c, &mut lat, true)).await {
        Ok(Ok(())) => {
            if std::env::var_os("PGW_LOAD_DEBUG").is_some() {
                eprintln!("first RPC took {:?} µs", lat);
            }
            true
        }
        Ok(Err(e)) => {
            if std::env::var_os("PGW_LOAD_DEBUG").is_some() {
                eprintln!("not ready yet: {}", e.0);
            }
            false
        }
        Err(_) => false,
    }
}
