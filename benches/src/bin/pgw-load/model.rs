//! What one run measured and the small helpers the report, its tables and its chart share
//! (kept apart from the report so that none of them imports another that imports it back).

use std::collections::BTreeMap;
use std::path::PathBuf;

use anyhow::{Context, Result};

use crate::cfg::Cfg;
use crate::cli::Args;
use crate::gz::ReqEnc;
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

/// µs below 10 ms, ms above.
pub fn us(v: f64) -> String {
    if v >= 10_000.0 {
        format!("{:.1} ms", v / 1000.0)
    } else {
        format!("{v:.0} µs")
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
