//! The report: `load.csv` (one line per upstream, configuration, size and request
//! encoding), `load-scaling.csv`, and `load.md` with the gateway binary measured, the
//! latency/throughput tables, proxy CPU per RPC against nginx, the codec rate per core, cores
//! per 1,000 RPC/s, offload against the raw file write + read, runtime-thread scaling, memory
//! and start-to-ready.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::io::Write as _;
use std::path::PathBuf;

use anyhow::{Context, Result};

use crate::Args;
use crate::gz::ReqEnc;
use crate::tables;
use crate::targets::Cfg;
use crate::work::{Stats, Upstream};

/// One (upstream, configuration, size) of the main run.
pub struct Row {
    /// The upstream.
    pub upstream: Upstream,
    /// The configuration.
    pub cfg: Cfg,
    /// Payload size, bytes.
    pub size: usize,
    /// How the requests were encoded.
    pub enc: ReqEnc,
    /// Echo upstream: (gzip-compressed, all) requests it received over the row (warm-up
    /// included): whether the proxy forwarded the client's compressed frames.
    pub upstream_gzip: Option<(u64, u64)>,
    /// (gzip-compressed, all) responses the client read over the row.
    pub client_gzip: (u64, u64),
    /// The sequential phase (1 in flight).
    pub seq: Stats,
    /// The concurrent phase.
    pub conc: Stats,
    /// Operations in flight in the concurrent phase.
    pub concurrency: usize,
    /// TLS version and suite of the client's connection (`-tls` configurations).
    pub tls_suite: Option<String>,
    /// What the offload configuration wrote to its store over the row's operations.
    pub store: Option<StoreDelta>,
}

/// Objects the filesystem driver wrote during a row (warm-up, sequential and concurrent
/// phases).
pub struct StoreDelta {
    /// New files under the store's root.
    pub objects: u64,
    /// Their bytes.
    pub bytes: u64,
    /// RPCs in the same span.
    pub rpcs: u64,
}

/// One run of the runtime-thread scaling table.
pub struct ScaleRow {
    /// `direct`, `gw-off` or `gw-codec`.
    pub cfg: Cfg,
    /// `proxy.worker_threads` (none for `direct`).
    pub threads: Option<usize>,
    /// Payload size, bytes.
    pub size: usize,
    /// The concurrent phase.
    pub stats: Stats,
    /// Streams in flight.
    pub concurrency: usize,
    /// HTTP/2 connections they are spread over.
    pub connections: usize,
}

/// Memory of one proxy after the largest size ran.
pub struct Resources {
    /// The upstream.
    pub upstream: Upstream,
    /// The configuration.
    pub cfg: Cfg,
    /// VmRSS when idle after start (gateways), kB.
    pub idle_rss_kb: Option<u64>,
    /// VmRSS after the run (process tree), kB.
    pub rss_kb: u64,
    /// VmHWM (process tree), kB.
    pub hwm_kb: u64,
    /// What was in flight at the peak, in words.
    pub in_flight: String,
}

/// The same-run baselines, per payload size.
#[derive(Default)]
pub struct Baselines {
    /// Seconds per raw zstd + AES-GCM encode + decode.
    pub codec: BTreeMap<usize, f64>,
    /// (encoded bytes, CPU seconds) per raw file write + read of the encoded payload.
    pub store: BTreeMap<usize, (usize, f64)>,
}

/// `100 B`, `1 KiB`, `64 KiB`, `1 MiB`.
pub fn fmt_size(s: usize) -> String {
    if s >= 1 << 20 && s.is_multiple_of(1 << 20) {
        format!("{} MiB", s >> 20)
    } else if s >= 1024 && s.is_multiple_of(1024) {
        format!("{} KiB", s >> 10)
    } else {
        format!("{s} B")
    }
}

/// The row `r`'s ratios are taken against (`direct`, or `direct-tls` for the TLS ones, with
/// the same request encoding).
pub fn base<'a>(rows: &'a [Row], r: &Row) -> Option<&'a Row> {
    find(rows, r.upstream, r.size, r.cfg.baseline(), r.enc)
}

/// The row of `up`, `size`, `cfg`, `enc`.
pub fn find(rows: &[Row], up: Upstream, size: usize, cfg: Cfg, enc: ReqEnc) -> Option<&Row> {
    rows.iter()
        .find(|r| r.upstream == up && r.size == size && r.cfg == cfg && r.enc == enc)
}

/// The nginx row `r`'s proxy CPU is compared with: same upstream, size and request
/// encoding, nginx with TLS for the `-tls` configurations.
pub fn nginx_of<'a>(rows: &'a [Row], r: &Row) -> Option<&'a Row> {
    let nginx = if r.cfg.tls() {
        Cfg::NginxTls
    } else {
        Cfg::Nginx
    };
    find(rows, r.upstream, r.size, nginx, r.enc)
}

/// The gateway binary a run measured.
pub struct GatewayInfo {
    /// Its path.
    pub path: PathBuf,
    /// SHA-256 of the file, hex.
    pub sha256: String,
    /// What `--version` printed.
    pub version: String,
    /// `--gateway-label`, or the first 12 hex digits of the SHA-256.
    pub label: String,
}

impl GatewayInfo {
    /// Hashes `--gateway-bin` and asks it for its version.
    pub fn of(args: &Args) -> Result<GatewayInfo> {
        let bytes = std::fs::read(&args.gateway_bin)
            .with_context(|| format!("read {}", args.gateway_bin.display()))?;
        let d = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, &bytes);
        let sha256: String = d.as_ref().iter().map(|b| format!("{b:02x}")).collect();
        let version = std::process::Command::new(&args.gateway_bin)
            .arg("--version")
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
            .unwrap_or_else(|| "?".into());
        Ok(GatewayInfo {
            path: args.gateway_bin.clone(),
            label: args
                .gateway_label
                .clone()
                .unwrap_or_else(|| sha256[..12].to_string()),
            sha256,
            version,
        })
    }

    /// One line for the report.
    pub fn describe(&self) -> String {
        format!(
            "`{}` = {} (`{}`, sha256 {})",
            self.label,
            self.path.display(),
            self.version,
            &self.sha256[..16]
        )
    }
}

/// Proxy CPU per RPC over the concurrent phase, µs.
pub fn cpu_us_per_rpc(r: &Row) -> f64 {
    1e6 * r.conc.proxy_cpu_secs / r.conc.rpcs.max(1) as f64
}

/// Cores per 1,000 RPC/s: proxy CPU-seconds per RPC × 1,000.
pub fn cores_per_krps(st: &Stats) -> f64 {
    1e3 * st.proxy_cpu_secs / st.rpcs.max(1) as f64
}

/// Everything one run measured.
pub struct Outputs<'a> {
    /// The gateway binary measured.
    pub gateway: &'a GatewayInfo,
    /// The main run.
    pub rows: &'a [Row],
    /// The runtime-thread scaling runs.
    pub scaling: &'a [ScaleRow],
    /// Memory per proxy.
    pub resources: &'a [Resources],
    /// Start-to-ready table lines.
    pub ready: &'a [String],
    /// The raw baselines.
    pub baselines: &'a Baselines,
    /// TLS versions and suites the TLS echo upstream negotiated (proxy → upstream hop).
    pub upstream_tls: &'a [String],
}

/// Writes `load.csv`, `load-scaling.csv`, `load.md` and the SVG into `--out`, and prints
/// the markdown.
pub fn write_outputs(args: &Args, out: &Outputs<'_>) -> Result<()> {
    let Outputs {
        gateway,
        rows,
        scaling,
        resources,
        ready,
        baselines,
        upstream_tls,
    } = *out;
    std::fs::write(args.out.join("load.csv"), csv(rows, gateway)?)?;
    std::fs::write(args.out.join("load-scaling.csv"), scaling_csv(scaling)?)?;

    let mut md = String::new();
    let encs: Vec<ReqEnc> = [ReqEnc::Identity, ReqEnc::Gzip]
        .into_iter()
        .filter(|e| rows.iter().any(|r| r.enc == *e))
        .collect();
    writeln!(
        md,
        "\nGateway binary: {}. Request encodings: {}.",
        gateway.describe(),
        encs.iter()
            .map(|e| e.label())
            .collect::<Vec<_>>()
            .join(", ")
    )?;
    // Titles name the encoding when a run has gzip requests.
    let enc_note = |e: ReqEnc| {
        if encs == [ReqEnc::Identity] {
            String::new()
        } else {
            format!("; {}", e.describe())
        }
    };
    for (up, &enc) in [Upstream::Echo, Upstream::Temporal]
        .into_iter()
        .flat_map(|u| encs.iter().map(move |e| (u, e)))
    {
        let plain: Vec<&Row> = rows
            .iter()
            .filter(|r| r.upstream == up && r.enc == enc && !r.cfg.tls())
            .collect();
        if plain.is_empty() {
            continue;
        }
        let title = match up {
            Upstream::Echo => "in-process h2 echo (QueryWorkflow, payload out and back)",
            Upstream::Temporal => {
                "Temporal dev server (Start, Signal, Describe, GetHistory per workflow)"
            }
        };
        latency_table(
            &mut md,
            rows,
            &plain,
            &format!("Upstream: {title}{}", enc_note(enc)),
        )?;
        if up != Upstream::Echo {
            continue;
        }
        let tls: Vec<&Row> = rows
            .iter()
            .filter(|r| r.upstream == up && r.enc == enc && r.cfg.tls())
            .collect();
        if !tls.is_empty() {
            let suites: Vec<String> = Cfg::ALL
                .iter()
                .filter_map(|c| {
                    let r = tls.iter().find(|r| r.cfg == *c)?;
                    Some(format!("{}: {}", c.label(), r.tls_suite.as_deref()?))
                })
                .collect();
            latency_table(
                &mut md,
                rows,
                &tls,
                &format!(
                    "Upstream: in-process h2 echo over TLS — TLS on both hops (client → proxy, proxy → echo; direct-tls: client → echo), ratios against direct-tls; server certificates ECDSA P-256, no client certificates; client hop negotiated {}; the echo upstream negotiated {}{}",
                    suites.join(", "),
                    upstream_tls.join(", "),
                    enc_note(enc)
                ),
            )?;
        }
        // the codec and offload tables read the first encoding's rows
        if enc == encs[0] {
            tables::codec_rate_table(&mut md, args, rows, baselines, enc)?;
            tables::offload_table(&mut md, args, rows, baselines, enc)?;
        }
    }
    tables::vs_nginx_table(&mut md, args, rows, &encs)?;
    tables::cores_table(&mut md, args, rows, &encs)?;
    tables::scaling_table(&mut md, scaling)?;
    if !resources.is_empty() {
        writeln!(
            md,
            "\n#### Memory (proxy process; nginx: master + workers; (e) with `cache_bytes = {}`)\n\n| upstream | config | idle RSS (MiB) | RSS after run (MiB) | peak RSS VmHWM (MiB) | in flight at peak |\n| --- | --- | --- | --- | --- | --- |",
            args.offload_cache_bytes
        )?;
        for r in resources {
            writeln!(
                md,
                "| {} | {} | {} | {:.1} | {:.1} | {} |",
                r.upstream.label(),
                r.cfg.describe(),
                r.idle_rss_kb
                    .map(|k| format!("{:.1}", k as f64 / 1024.0))
                    .unwrap_or("-".into()),
                r.rss_kb as f64 / 1024.0,
                r.hwm_kb as f64 / 1024.0,
                r.in_flight
            )?;
        }
    }
    if !ready.is_empty() {
        writeln!(
            md,
            "\n#### Start to ready (gateway, echo upstream, median of {})\n\n| config | what | median | min–max |\n| --- | --- | --- | --- |",
            args.ready_samples
        )?;
        for l in ready {
            writeln!(md, "{l}")?;
        }
    }
    std::fs::write(args.out.join("load.md"), &md)?;
    std::fs::write(
        args.out.join("load-added-latency.svg"),
        crate::svg::svg(args, rows),
    )?;
    let mut so = std::io::stdout().lock();
    so.write_all(md.as_bytes())?;
    writeln!(
        so,
        "\nwrote {}/load.csv, load-scaling.csv, load.md, load-added-latency.svg",
        args.out.display()
    )?;
    Ok(())
}

/// `load.csv`: the columns of earlier runs, then `cores_per_krps`, then the request
/// encoding, the gateway binary's label, proxy CPU per RPC ÷ nginx's (same size and
/// encoding), and how many requests the echo upstream and responses the client saw
/// gzip-compressed (`gzip/all`).
fn csv(rows: &[Row], gateway: &GatewayInfo) -> Result<String> {
    let mut csv = String::from(
        "upstream,config,size,seq_rpcs,seq_p50_us,seq_p99_us,added_p50_us,concurrency,conc_rpcs,conc_rps,rps_ratio,conc_p50_us,conc_p99_us,p50_ratio,p99_ratio,errors,proxy_cpu_us_per_rpc,methods_seq_p50_us,cores_per_krps,request_encoding,gateway,cpu_vs_nginx,upstream_gzip_requests,client_gzip_responses\n",
    );
    for r in rows {
        let b = base(rows, r).expect("baseline row");
        let methods: Vec<String> = r
            .seq
            .by_method
            .iter()
            .map(|(m, v)| format!("{m}={:.0}", Stats::pct(v, 0.5)))
            .collect();
        let is_proxy = r.cfg.plain() != Cfg::Direct;
        let vs_nginx = match nginx_of(rows, r) {
            Some(n) if is_proxy => format!("{:.3}", cpu_us_per_rpc(r) / cpu_us_per_rpc(n)),
            _ => String::new(),
        };
        writeln!(
            csv,
            "{},{},{},{},{:.0},{:.0},{:.0},{},{},{:.1},{:.3},{:.0},{:.0},{:.3},{:.3},{},{:.1},{},{},{},{},{},{},{}/{}",
            r.upstream.label(),
            r.cfg.label(),
            r.size,
            r.seq.rpcs,
            r.seq.p50(),
            r.seq.p99(),
            r.seq.p50() - b.seq.p50(),
            r.concurrency,
            r.conc.rpcs,
            r.conc.rps(),
            r.conc.rps() / b.conc.rps(),
            r.conc.p50(),
            r.conc.p99(),
            r.conc.p50() / b.conc.p50(),
            r.conc.p99() / b.conc.p99(),
            r.seq.errors + r.conc.errors,
            cpu_us_per_rpc(r),
            methods.join(";"),
            if is_proxy {
                format!("{:.3}", cores_per_krps(&r.conc))
            } else {
                String::new()
            },
            r.enc.label(),
            gateway.label.replace(',', ";"),
            vs_nginx,
            r.upstream_gzip
                .map(|(g, a)| format!("{g}/{a}"))
                .unwrap_or_default(),
            r.client_gzip.0,
            r.client_gzip.1,
        )?;
    }
    Ok(csv)
}

/// `load-scaling.csv`.
fn scaling_csv(scaling: &[ScaleRow]) -> Result<String> {
    let mut csv = String::from(
        "config,worker_threads,size,concurrency,connections,rpcs,secs,rps,proxy_cpu_us_per_rpc,proxy_cores_used,cores_per_krps,errors\n",
    );
    for s in scaling {
        let st = &s.stats;
        // direct has no proxy: its CPU columns stay empty
        let cpu = if s.cfg == Cfg::Direct {
            ",,".to_string()
        } else {
            format!(
                "{:.1},{:.3},{:.3}",
                1e6 * st.proxy_cpu_secs / st.rpcs.max(1) as f64,
                st.proxy_cpu_secs / st.secs,
                cores_per_krps(st)
            )
        };
        writeln!(
            csv,
            "{},{},{},{},{},{},{:.3},{:.1},{cpu},{}",
            s.cfg.label(),
            s.threads.map(|t| t.to_string()).unwrap_or_default(),
            s.size,
            s.concurrency,
            s.connections,
            st.rpcs,
            st.secs,
            st.rps(),
            st.errors
        )?;
    }
    Ok(csv)
}

/// The latency/throughput table of `rs` (ratios against each row's baseline in `rows`).
fn latency_table(md: &mut String, rows: &[Row], rs: &[&Row], title: &str) -> Result<()> {
    let conc = rs[0].concurrency;
    writeln!(
        md,
        "\n#### {title}\n\n| config | payload | seq p50 | seq p99 | added p50 | rpc/s (c={conc}) | vs direct | p50 (c={conc}) | p99 (c={conc}) | p99 vs direct | proxy CPU/RPC |\n| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"
    )?;
    for r in rs {
        let b = base(rows, r).expect("baseline row");
        let is_base = r.cfg == r.cfg.baseline();
        writeln!(
            md,
            "| {} | {} | {} | {} | {} | {:.0} | {:.0} % | {} | {} | {:.2}× | {} |",
            r.cfg.label(),
            fmt_size(r.size),
            us(r.seq.p50()),
            us(r.seq.p99()),
            if is_base {
                "—".into()
            } else {
                us_signed(r.seq.p50() - b.seq.p50())
            },
            r.conc.rps(),
            100.0 * r.conc.rps() / b.conc.rps(),
            us(r.conc.p50()),
            us(r.conc.p99()),
            r.conc.p99() / b.conc.p99(),
            if is_base {
                "—".into()
            } else {
                format!("{:.0} µs", cpu_us_per_rpc(r))
            },
        )?;
        if r.seq.errors + r.conc.errors > 0 {
            writeln!(
                md,
                "| ↳ errors: {} ({}) | | | | | | | | | | |",
                r.seq.errors + r.conc.errors,
                r.seq
                    .first_error
                    .as_deref()
                    .or(r.conc.first_error.as_deref())
                    .unwrap_or("")
            )?;
        }
    }
    Ok(())
}

/// µs below 10 ms, ms above.
pub fn us(v: f64) -> String {
    if v >= 10_000.0 {
        format!("{:.1} ms", v / 1000.0)
    } else {
        format!("{v:.0} µs")
    }
}

/// Signed [`us`].
fn us_signed(v: f64) -> String {
    if v.abs() >= 10_000.0 {
        format!("{:+.1} ms", v / 1000.0)
    } else {
        format!("{v:+.0} µs")
    }
}

/// MiB/s, GiB/s above 1 GiB/s.
pub fn rate(bps: f64) -> String {
    if bps >= 1024.0 * 1024.0 * 1024.0 {
        format!("{:.2} GiB/s", bps / (1024.0 * 1024.0 * 1024.0))
    } else {
        format!("{:.0} MiB/s", bps / (1024.0 * 1024.0))
    }
}
