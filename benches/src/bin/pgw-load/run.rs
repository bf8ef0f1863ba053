//! The order of measurements: baselines, then per upstream, per size, per request encoding
//! every configuration (sequential phase, then concurrent phase), resources, the
//! runtime-thread scaling runs and start-to-ready; then the report.

use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Result, anyhow, bail};
use temporalio_protos::protos::temporal::api::workflowservice::v1::DescribeNamespaceRequest;

use crate::baseline::{
    encoded_like_gateway, raw_codec_secs_per_roundtrip, raw_store_cpu_per_roundtrip,
};
use crate::cfg::Cfg;
use crate::cli::Args;
use crate::client::{Client, frame};
use crate::consts::NAMESPACE;
use crate::echo::{SEEN, start_echo};
use crate::gz::ReqEnc;
use crate::model::{Baselines, GatewayInfo, Resources, Row, StoreDelta, fmt_size};
use crate::procs::{Proc, free_port, proc_status_kb, proc_tree};
use crate::report;
use crate::targets::{GatewayOpts, Target, spawn_gateway, spawn_nginx, store_root, wait_tcp};
use crate::tls::Pki;
use crate::work::{Upstream, Work, payload, run_phase};

/// The configurations to measure, in measuring order, with their baselines added.
fn chosen_configs(args: &Args) -> Vec<Cfg> {
    let mut want: Vec<Cfg> = args.configs.clone();
    want.push(Cfg::Direct);
    if want.iter().any(|c| c.tls()) {
        want.push(Cfg::DirectTls);
    }
    Cfg::ALL
        .into_iter()
        .filter(|c| want.contains(c))
        .filter(|c| args.nginx_bin.is_some() || !matches!(c.plain(), Cfg::Nginx))
        .collect()
}

/// Files and bytes under `root` (the offload store), recursively.
fn dir_usage(root: &Path) -> (u64, u64) {
    let (mut files, mut bytes) = (0, 0);
    let mut stack = vec![root.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(rd) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in rd.flatten() {
            match e.metadata() {
                Ok(m) if m.is_dir() => stack.push(e.path()),
                Ok(m) => {
                    files += 1;
                    bytes += m.len();
                }
                Err(_) => {}
            }
        }
    }
    (files, bytes)
}

/// Runs everything and writes the outputs.
pub async fn run(args: &Args, dir: &Path) -> Result<()> {
    let run_tag = format!("{}", std::process::id());
    let gateway = GatewayInfo::of(args)?;
    eprintln!("gateway: {}", gateway.describe());
    let configs = chosen_configs(args);
    let pki = if configs.iter().any(|c| c.tls()) {
        Some(Pki::generate(&dir.join("pki"))?)
    } else {
        None
    };
    let mut rows: Vec<Row> = Vec::new();
    // what the TLS echo upstream negotiated with the proxies (and direct-tls)
    let mut upstream_tls = None;
    let mut resources: Vec<Resources> = Vec::new();
    let upstreams: Vec<Upstream> = [Upstream::Echo, Upstream::Temporal]
        .into_iter()
        .filter(|u| args.upstreams.contains(u))
        .filter(|u| *u == Upstream::Echo || args.temporal_bin.is_some())
        .collect();
    if upstreams.is_empty() {
        bail!("no upstream to measure: --upstreams temporal needs --temporal-bin");
    }

    // Raw baselines, same run.
    let mut base = Baselines::default();
    for &size in &args.sizes {
        let p = payload(size, size as u64 ^ 0x9e37_79b9);
        let per = tokio::task::spawn_blocking(move || {
            raw_codec_secs_per_roundtrip(&p, Duration::from_millis(600))
        })
        .await??;
        base.codec.insert(size, per);
        eprintln!(
            "raw zstd+AES-GCM encode+decode {}: {:.1} µs",
            fmt_size(size),
            per * 1e6
        );
    }
    if configs.contains(&Cfg::GwOffload) {
        for &size in &args.sizes {
            let bytes = encoded_like_gateway(&payload(size, size as u64 ^ 0x9e37_79b9))?;
            let len = bytes.len();
            let sdir = dir.join(format!("raw-store-{size}"));
            let per = tokio::task::spawn_blocking(move || {
                raw_store_cpu_per_roundtrip(&bytes, &sdir, Duration::from_millis(400))
            })
            .await??;
            let _ = std::fs::remove_dir_all(dir.join(format!("raw-store-{size}")));
            base.store.insert(size, (len, per));
            eprintln!(
                "raw file write+read {} ({len} B encoded): {:.1} µs CPU",
                fmt_size(size),
                per * 1e6
            );
        }
    }

    for &up in &upstreams {
        // --- upstream
        let mut temporal: Option<Proc> = None;
        let cfgs: Vec<Cfg> = configs
            .iter()
            .copied()
            .filter(|c| up == Upstream::Echo || !c.tls())
            .collect();
        let (up_addr, up_tls_addr) = match up {
            Upstream::Echo => {
                let tls = match &pki {
                    Some(pki) if cfgs.iter().any(|c| c.tls()) => {
                        let (addr, seen) = start_echo(Some(pki.server.clone())).await?;
                        upstream_tls = Some(seen);
                        Some(addr)
                    }
                    _ => None,
                };
                (start_echo(None).await?.0, tls)
            }
            Upstream::Temporal => {
                let tdir = dir.join("temporal");
                std::fs::create_dir_all(&tdir)?;
                let port = free_port()?;
                let mut cmd = Command::new(args.temporal_bin.as_ref().expect("temporal"));
                cmd.args(["server", "start-dev", "--ip", "127.0.0.1", "--headless"])
                    .args(["--port", &port.to_string()])
                    .args(["--http-port", &free_port()?.to_string()])
                    .args(["--metrics-port", &free_port()?.to_string()])
                    .args(["--log-level", "error"])
                    .arg("--db-filename")
                    .arg(tdir.join("t.db"))
                    .env("TEMPORAL_CLI_SHOW_STACKS", "0");
                let mut p = Proc::spawn("temporal", cmd, &tdir.join("server.log"))?;
                let addr = SocketAddr::from(([127, 0, 0, 1], port));
                eprintln!("starting temporal dev server on {addr}");
                wait_temporal(addr, &mut p).await?;
                temporal = Some(p);
                (addr, None)
            }
        };

        // --- targets
        let mut targets: Vec<Target> = Vec::new();
        for &cfg in &cfgs {
            let upstream = if cfg.tls() {
                up_tls_addr.ok_or_else(|| anyhow!("no TLS upstream"))?
            } else {
                up_addr
            };
            let tls_pki = if cfg.tls() { pki.as_ref() } else { None };
            let tag = format!("{}-{}", cfg.label(), up.label());
            let target = match cfg.plain() {
                Cfg::Direct => Target {
                    cfg,
                    addr: upstream,
                    proc: None,
                    idle_rss_kb: None,
                    store_root: None,
                },
                Cfg::Nginx => {
                    let nginx = args.nginx_bin.as_ref().expect("nginx");
                    let (mut p, addr) = spawn_nginx(nginx, upstream, dir, &tag, tls_pki)?;
                    wait_tcp(addr, &mut p, Duration::from_secs(10)).await?;
                    Target {
                        cfg,
                        addr,
                        proc: Some(p),
                        idle_rss_kb: None,
                        store_root: None,
                    }
                }
                _ => {
                    let gdir = dir.join(&tag);
                    let opts = GatewayOpts {
                        pki: tls_pki,
                        worker_threads: None,
                    };
                    let (mut p, addr) = spawn_gateway(args, cfg, upstream, &gdir, &tag, opts)?;
                    wait_tcp(addr, &mut p, Duration::from_secs(10)).await?;
                    tokio::time::sleep(Duration::from_millis(300)).await;
                    let idle = proc_status_kb(p.pid(), "VmRSS:");
                    Target {
                        cfg,
                        addr,
                        proc: Some(p),
                        idle_rss_kb: idle,
                        store_root: (cfg == Cfg::GwOffload).then(|| store_root(&gdir)),
                    }
                }
            };
            targets.push(target);
        }

        let conc = match up {
            Upstream::Echo => args.echo_concurrency,
            Upstream::Temporal => args.temporal_concurrency,
        };
        let mut encs: Vec<ReqEnc> = Vec::new();
        for e in &args.request_encodings {
            if !encs.contains(e) {
                encs.push(*e);
            }
        }
        for (&size, enc) in args
            .sizes
            .iter()
            .flat_map(|s| encs.iter().map(move |e| (s, *e)))
        {
            let work = Arc::new(Work::new(up, size, run_tag.clone(), enc));
            for t in &targets {
                let tls = if t.cfg.tls() {
                    pki.as_ref().map(|p| &p.client)
                } else {
                    None
                };
                let client = Client::connect(t.addr, tls).await?;
                let before = t.store_root.as_deref().map(dir_usage);
                let seen0 = SEEN.get();
                // warm up (and verify payloads round-trip intact)
                let mut lat = Vec::new();
                for _ in 0..3 {
                    work.op(&client, &mut lat, true).await.map_err(|e| {
                        anyhow!(
                            "{} {} {} {}: {}",
                            up.label(),
                            t.cfg.label(),
                            fmt_size(size),
                            enc.label(),
                            e.0
                        )
                    })?;
                }
                if t.cfg.plain() == Cfg::GwAuth {
                    refuses_without_token(&work, t.addr, tls)
                        .await
                        .map_err(|e| {
                            anyhow!("{} {} {}: {e}", up.label(), t.cfg.label(), enc.label())
                        })?;
                }
                let pids = t
                    .proc
                    .as_ref()
                    .map(|p| proc_tree(p.pid()))
                    .unwrap_or_default();
                let clients = std::slice::from_ref(&client);
                let seq =
                    run_phase(work.clone(), clients, 1, args.max_ops, args.seq_secs, &pids).await;
                let cst = run_phase(
                    work.clone(),
                    clients,
                    conc,
                    args.max_ops,
                    args.conc_secs,
                    &pids,
                )
                .await;
                let store = match (before, t.store_root.as_deref()) {
                    (Some((f0, b0)), Some(root)) => {
                        let (f1, b1) = dir_usage(root);
                        Some(StoreDelta {
                            objects: f1.saturating_sub(f0),
                            bytes: b1.saturating_sub(b0),
                            rpcs: lat.len() as u64 + seq.rpcs + cst.rpcs,
                        })
                    }
                    _ => None,
                };
                let seen1 = SEEN.get();
                let upstream_gzip =
                    (up == Upstream::Echo).then(|| (seen1.0 - seen0.0, seen1.1 - seen0.1));
                eprintln!(
                    "{:8} {:12} {:>7} {:8}: seq p50 {:>8.0} µs p99 {:>8.0} | conc{} {:>8.0} rpc/s p50 {:>8.0} p99 {:>8.0} | errors {} {}",
                    up.label(),
                    t.cfg.label(),
                    fmt_size(size),
                    enc.label(),
                    seq.p50(),
                    seq.p99(),
                    conc,
                    cst.rps(),
                    cst.p50(),
                    cst.p99(),
                    seq.errors + cst.errors,
                    seq.first_error
                        .as_deref()
                        .or(cst.first_error.as_deref())
                        .unwrap_or("")
                );
                rows.push(Row {
                    upstream: up,
                    cfg: t.cfg,
                    size,
                    enc,
                    upstream_gzip,
                    client_gzip: client.responses.get(),
                    seq,
                    conc: cst,
                    concurrency: conc,
                    tls_suite: client.tls_suite.clone(),
                    store,
                });
            }
        }
        // --- resources after the largest size ran
        let max_size = args.sizes.iter().copied().max().unwrap_or(0);
        for t in &targets {
            if let Some(p) = &t.proc {
                let pids = proc_tree(p.pid());
                let sum = |field: &str| -> u64 {
                    pids.iter().filter_map(|p| proc_status_kb(*p, field)).sum()
                };
                resources.push(Resources {
                    upstream: up,
                    cfg: t.cfg,
                    idle_rss_kb: t.idle_rss_kb,
                    rss_kb: sum("VmRSS:"),
                    hwm_kb: sum("VmHWM:"),
                    in_flight: format!("{conc} × {}", fmt_size(max_size)),
                });
            }
        }
        drop(targets);
        drop(temporal);
    }

    let scaling = if args.no_scaling {
        Vec::new()
    } else {
        crate::scaling::scaling_runs(args, dir, &run_tag).await?
    };
    let ready_lines = crate::ready::start_to_ready(args, dir, &run_tag).await?;
    let upstream_tls: Vec<String> = upstream_tls
        .map(|s| s.lock().expect("negotiated").iter().cloned().collect())
        .unwrap_or_default();
    let outputs = report::Outputs {
        gateway: &gateway,
        rows: &rows,
        scaling: &scaling,
        resources: &resources,
        ready: &ready_lines,
        baselines: &base,
        upstream_tls: &upstream_tls,
    };
    report::write_outputs(args, &outputs)
}

/// Checks that the gateway at `addr` (`gw-auth`) refuses an operation without the bearer
/// token with `UNAUTHENTICATED`: what is measured does check every request.
async fn refuses_without_token(
    work: &Work,
    addr: SocketAddr,
    tls: Option<&Arc<rustls::ClientConfig>>,
) -> Result<()> {
    let anon = Client::connect(addr, tls).await?.without_token();
    let mut lat = Vec::new();
    match work.op(&anon, &mut lat, false).await {
        Err(e) if e.0.contains("grpc-status \"16\"") => Ok(()),
        Err(e) => bail!(
            "without a token: expected UNAUTHENTICATED (16), got {}",
            e.0
        ),
        Ok(()) => bail!("without a token the operation passed: [proxy.auth] is not in force"),
    }
}

/// Waits until the dev server answers `DescribeNamespace` (120 s at most).
async fn wait_temporal(addr: SocketAddr, p: &mut Proc) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        if let Ok(c) = Client::connect(addr, None).await
            && c.call(
                "DescribeNamespace",
                frame(&DescribeNamespaceRequest {
                    namespace: NAMESPACE.into(),
                    ..Default::default()
                }),
            )
            .await
            .is_ok()
        {
            return Ok(());
        }
        if !p.alive() {
            bail!("temporal dev server exited early");
        }
        if Instant::now() > deadline {
            bail!("temporal dev server not ready in 120 s");
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}
