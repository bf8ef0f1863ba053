//! The tables beyond latency and throughput: proxy CPU per RPC against nginx in the same run,
//! codec rate per core (whole gateway and the codec's own share), offload against the raw
//! file write + read, cores per 1,000 RPC/s with temporal-proxy's published sizing beside it,
//! and runtime-thread scaling.

use std::fmt::Write as _;

use anyhow::Result;

use crate::baseline::RAW_STORE_STEPS;
use crate::cfg::Cfg;
use crate::cli::Args;
use crate::gz::ReqEnc;
use crate::model::{
    Baselines, Row, ScaleRow, cores_per_krps, cpu_us_per_rpc, find, fmt_size, nginx_of, rate,
};
use crate::work::Upstream;

/// Codec rate per core (echo, requests in `enc`): the whole gateway's CPU, and the codec's
/// own share (gw-codec − gw-off CPU per RPC), against the raw calls.
pub fn codec_rate_table(
    md: &mut String,
    args: &Args,
    rows: &[Row],
    baselines: &Baselines,
    enc: ReqEnc,
) -> Result<()> {
    let up = Upstream::Echo;
    let Some(conc) = rows
        .iter()
        .find(|r| r.upstream == up)
        .map(|r| r.concurrency)
    else {
        return Ok(());
    };
    let mut lines = Vec::new();
    for &size in &args.sizes {
        let (Some(on), Some(off), Some(raw)) = (
            find(rows, up, size, Cfg::GwCodec, enc),
            find(rows, up, size, Cfg::GwOff, enc),
            baselines.codec.get(&size),
        ) else {
            continue;
        };
        let raw_rate = size as f64 / raw;
        let on_rate = size as f64 * on.conc.rpcs as f64 / on.conc.proxy_cpu_secs;
        let off_rate = size as f64 * off.conc.rpcs as f64 / off.conc.proxy_cpu_secs;
        let own_secs = (cpu_us_per_rpc(on) - cpu_us_per_rpc(off)) * 1e-6;
        let (own, own_ratio) = if own_secs > 0.0 {
            let r = size as f64 / own_secs;
            (rate(r), format!("{:.0} %", 100.0 * r / raw_rate))
        } else {
            ("n/a (≤ 0 µs)".into(), "—".into())
        };
        lines.push(format!(
            "| {} | {} | {} | {:.0} % | {} | {} | {} |",
            fmt_size(size),
            rate(raw_rate),
            rate(on_rate),
            100.0 * on_rate / raw_rate,
            rate(off_rate),
            own,
            own_ratio
        ));
    }
    if lines.is_empty() {
        return Ok(());
    }
    writeln!(
        md,
        "\nCodec rate per core (echo, c={conc}): payload bytes per gateway CPU-second for one encode (request) + one decode (response), vs the raw zstd (level 3) + AES-256-GCM seal/open + decompress calls on the same payload in this process, single thread. \"codec alone\": payload bytes ÷ (gw-codec − gw-off CPU per RPC), the codec's share without the forwarding both do:\n\n| payload | raw calls | gw-codec | ratio | gw-off (forwarding only) | codec alone (gw-codec − gw-off) | codec alone vs raw |\n| --- | --- | --- | --- | --- | --- | --- |"
    )?;
    for l in lines {
        writeln!(md, "{l}")?;
    }
    Ok(())
}

/// Offload round trip (echo, gw-offload, requests in `enc`) against the raw file write +
/// read of the same bytes; target: gw-offload CPU per RPC ≤ 2 × raw.
pub fn offload_table(
    md: &mut String,
    args: &Args,
    rows: &[Row],
    baselines: &Baselines,
    enc: ReqEnc,
) -> Result<()> {
    if baselines.store.is_empty() {
        return Ok(());
    }
    let up = Upstream::Echo;
    let mut lines = Vec::new();
    for &size in &args.sizes {
        let (Some(off), Some(&(enc_len, raw))) = (
            find(rows, up, size, Cfg::GwOffload, enc),
            baselines.store.get(&size),
        ) else {
            continue;
        };
        let cpu = cpu_us_per_rpc(off);
        let raw_us = raw * 1e6;
        let own = find(rows, up, size, Cfg::GwCodec, enc).map(|c| cpu - cpu_us_per_rpc(c));
        let (objs, obj_size) = match &off.store {
            Some(d) if d.objects > 0 => (
                format!("{:.2}", d.objects as f64 / d.rpcs.max(1) as f64),
                format!("{} B", d.bytes / d.objects),
            ),
            Some(d) => (
                format!("{:.2}", d.objects as f64 / d.rpcs.max(1) as f64),
                "—".into(),
            ),
            None => ("?".into(), "?".into()),
        };
        let offloaded = off.store.as_ref().is_some_and(|d| d.objects > 0);
        lines.push(format!(
            "| {} | {objs} | {obj_size} | {enc_len} B | {cpu:.0} µs | {} | {raw_us:.1} µs | {} | {} | {} |",
            fmt_size(size),
            own.map(|o| format!("{o:.0} µs")).unwrap_or("—".into()),
            if offloaded {
                format!("{:.1}×", cpu / raw_us)
            } else {
                "— (not offloaded)".into()
            },
            match own {
                Some(o) if offloaded => format!("{:.1}×", o / raw_us),
                _ => "—".into(),
            },
            if !offloaded {
                "—"
            } else if cpu <= 2.0 * raw_us {
                "met"
            } else {
                "missed"
            }
        ));
    }
    if lines.is_empty() {
        return Ok(());
    }
    writeln!(
        md,
        "\nOffload round trip (echo, gw-offload, `threshold = {}`, filesystem driver) against the raw file write + read of the same bytes, measured by the tool at the start of the run (single thread, CPU time of the thread, same filesystem as the gateway's store; written bytes: the serialized payload after zstd-3 + AES-256-GCM). Raw write + read = {RAW_STORE_STEPS}. Target: gw-offload proxy CPU per RPC ≤ 2× raw. \"offload's own\" = gw-offload − gw-codec CPU per RPC (same codec, plus the store and resolve):\n\n| payload | objects written per RPC | object size (store) | raw bytes | gw-offload CPU/RPC | offload's own | raw write + read CPU | gw-offload ÷ raw | own ÷ raw | ≤ 2× raw |\n| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
        args.offload_threshold
    )?;
    for l in lines {
        writeln!(md, "{l}")?;
    }
    Ok(())
}

/// Proxy CPU per RPC of every proxy configuration against nginx's in the same run (same
/// upstream, size and request encoding; the `-tls` ones against nginx-tls), per upstream:
/// one line per configuration and request encoding.
pub fn vs_nginx_table(md: &mut String, args: &Args, rows: &[Row], encs: &[ReqEnc]) -> Result<()> {
    for up in [Upstream::Echo, Upstream::Temporal] {
        let mut lines = Vec::new();
        for &enc in encs {
            for cfg in Cfg::ALL.into_iter().filter(|c| c.plain() != Cfg::Direct) {
                let cells: Vec<String> = args
                    .sizes
                    .iter()
                    .map(|&s| match find(rows, up, s, cfg, enc) {
                        Some(r) => match nginx_of(rows, r) {
                            Some(n) if n.cfg != cfg => format!(
                                "{:.0} µs ({:.2}×)",
                                cpu_us_per_rpc(r),
                                cpu_us_per_rpc(r) / cpu_us_per_rpc(n)
                            ),
                            _ => format!("{:.0} µs", cpu_us_per_rpc(r)),
                        },
                        None => "—".into(),
                    })
                    .collect();
                if cells.iter().all(|c| c == "—") {
                    continue;
                }
                lines.push(format!(
                    "| {} | {} | {} |",
                    cfg.label(),
                    enc.label(),
                    cells.join(" | ")
                ));
            }
        }
        if lines.is_empty() {
            continue;
        }
        let sizes: Vec<String> = args.sizes.iter().map(|s| fmt_size(*s)).collect();
        writeln!(
            md,
            "\n#### Proxy CPU per RPC against nginx ({} upstream; concurrent phase; in brackets: ÷ nginx's, same size and request encoding, `-tls` ÷ nginx-tls)\n\n| config | requests | {} |\n| --- | --- |{}",
            up.label(),
            sizes.join(" | "),
            " --- |".repeat(sizes.len())
        )?;
        for l in lines {
            writeln!(md, "{l}")?;
        }
    }
    Ok(())
}

/// Cores per 1,000 RPC/s per upstream, request encoding, configuration and size, with
/// temporal-proxy's published sizing beside it.
pub fn cores_table(md: &mut String, args: &Args, rows: &[Row], encs: &[ReqEnc]) -> Result<()> {
    for (up, &enc) in [Upstream::Echo, Upstream::Temporal]
        .into_iter()
        .flat_map(|u| encs.iter().map(move |e| (u, e)))
    {
        let cfgs: Vec<Cfg> = Cfg::ALL
            .into_iter()
            .filter(|c| c.plain() != Cfg::Direct)
            .filter(|c| {
                rows.iter()
                    .any(|r| r.upstream == up && r.cfg == *c && r.enc == enc)
            })
            .collect();
        if cfgs.is_empty() {
            continue;
        }
        let conc = rows
            .iter()
            .find(|r| r.upstream == up)
            .map(|r| r.concurrency)
            .unwrap_or(0);
        let mut what = match up {
            Upstream::Echo => format!("echo upstream, QueryWorkflow, c={conc} on one connection"),
            Upstream::Temporal => format!(
                "Temporal dev server, RPC mix Start/Signal/Describe/GetHistory, {conc} workflows in flight"
            ),
        };
        if encs != [ReqEnc::Identity] {
            what.push_str(&format!(", requests {}", enc.label()));
        }
        let sizes: Vec<String> = args.sizes.iter().map(|s| fmt_size(*s)).collect();
        writeln!(
            md,
            "\n#### Cores per 1,000 RPC/s ({what})\n\nProxy CPU-seconds per RPC × 1,000 over the concurrent phase (utime + stime of the proxy process; nginx: master + workers); `direct` has no proxy. `-tls`: TLS on both hops.\n\n| config | {} |\n| --- |{}",
            sizes.join(" | "),
            " --- |".repeat(sizes.len())
        )?;
        for cfg in cfgs {
            let cells: Vec<String> = args
                .sizes
                .iter()
                .map(|&s| {
                    find(rows, up, s, cfg, enc)
                        .map(|r| format!("{:.3}", cores_per_krps(&r.conc)))
                        .unwrap_or("—".into())
                })
                .collect();
            writeln!(md, "| {} | {} |", cfg.label(), cells.join(" | "))?;
        }
        if up == Upstream::Echo && enc == encs[0] {
            writeln!(
                md,
                "\nReference, not comparable one to one: `temporalio/temporal-proxy`'s sizing guide gives ~0.29–0.31 cores per 1,000 requests/s with small unencrypted payloads and 0.33–0.36 encrypted, on 4 vCPU Graviton (arm64) with mTLS and Temporal Cloud as the upstream. Here: 2 shared x86 cores that also run the load generator and the upstream, loopback, TLS without client certificates; the nearest rows are gw-off-tls (unencrypted) and gw-codec-tls (encrypted) at 100 B–1 KiB."
            )?;
        }
    }
    Ok(())
}

/// Max throughput and CPU per RPC with 1 and 2 runtime threads.
pub fn scaling_table(md: &mut String, scaling: &[ScaleRow]) -> Result<()> {
    let Some(first) = scaling.first() else {
        return Ok(());
    };
    writeln!(
        md,
        "\n#### Scaling with runtime threads (echo upstream, `proxy.worker_threads`, c={} over {} HTTP/2 connections, concurrent phase only; direct: the load generator's ceiling)\n\n| config | payload | worker_threads | rpc/s | vs 1 thread | proxy CPU/RPC | proxy cores used | cores per 1,000 RPC/s |\n| --- | --- | --- | --- | --- | --- | --- | --- |",
        first.concurrency, first.connections
    )?;
    for s in scaling {
        let st = &s.stats;
        let one = scaling
            .iter()
            .find(|o| o.cfg == s.cfg && o.size == s.size && o.threads == Some(1));
        let is_direct = s.cfg == Cfg::Direct;
        writeln!(
            md,
            "| {} | {} | {} | {:.0} | {} | {} | {} | {} |",
            s.cfg.label(),
            fmt_size(s.size),
            s.threads.map(|t| t.to_string()).unwrap_or("—".into()),
            st.rps(),
            match one {
                Some(o) if !is_direct => format!("{:.2}×", st.rps() / o.stats.rps()),
                _ => "—".into(),
            },
            if is_direct {
                "—".into()
            } else {
                format!("{:.0} µs", 1e6 * st.proxy_cpu_secs / st.rpcs.max(1) as f64)
            },
            if is_direct {
                "—".into()
            } else {
                format!("{:.2}", st.proxy_cpu_secs / st.secs)
            },
            if is_direct {
                "—".into()
            } else {
                format!("{:.3}", cores_per_krps(st))
            },
        )?;
        if st.errors > 0 {
            writeln!(
                md,
                "| ↳ errors: {} ({}) | | | | | | | |",
                st.errors,
                st.first_error.as_deref().unwrap_or("")
            )?;
        }
    }
    Ok(())
}
