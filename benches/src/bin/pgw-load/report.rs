//! The report: `load.csv` (one line per upstream, configuration, size and request
//! encoding), `load-scaling.csv`, and `load.md` with the gateway binary measured, the
//! latency/throughput tables, proxy CPU per RPC against nginx, the codec rate per core, cores
//! per 1,000 RPC/s, offload against the raw file write + read, runtime-thread scaling, memory
//! and start-to-ready.

use std::fmt::Write as _;
use std::io::Write as _;

use anyhow::Result;

use crate::cfg::Cfg;
use crate::cli::Args;
use crate::gz::ReqEnc;
use crate::tables;
use crate::work::{Stats, Upstream};

use crate::model::*;

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

/// Signed [`us`].
fn us_signed(v: f64) -> String {
    if v.abs() >= 10_000.0 {
        format!("{:+.1} ms", v / 1000.0)
    } else {
        format!("{v:+.0} µs")
    }
}
