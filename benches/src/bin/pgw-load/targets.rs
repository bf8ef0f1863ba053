//! The configurations measured (direct, nginx, the gateway with codecs off / auth only /
//! codecs on / offload, some also with TLS on both hops) and how their processes are
//! configured and started.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use tokio::net::TcpStream;

use crate::cfg::Cfg;
use crate::cli::Args;
use crate::consts::{KEY_B64, NAMESPACE, TOKEN};
use crate::procs::{Proc, free_port};
use crate::tls::Pki;

/// A started configuration: where the client connects, and the proxy process if any.
pub struct Target {
    /// The configuration.
    pub cfg: Cfg,
    /// Its listener.
    pub addr: SocketAddr,
    /// The proxy (none for `direct`).
    pub proc: Option<Proc>,
    /// VmRSS 300 ms after the listener accepted (gateways), kB.
    pub idle_rss_kb: Option<u64>,
    /// The offload root (`gw-offload`): what the filesystem driver wrote.
    pub store_root: Option<std::path::PathBuf>,
}

/// Settings of one gateway beyond its configuration kind.
#[derive(Clone, Copy, Default)]
pub struct GatewayOpts<'a> {
    /// Certificates for `[proxy.tls]` and `[proxy.upstream_tls]` (the `-tls` configurations).
    pub pki: Option<&'a Pki>,
    /// `proxy.worker_threads` (unset: the gateway's default, one per CPU).
    pub worker_threads: Option<usize>,
}

fn gateway_config(
    cfg: Cfg,
    listen: u16,
    upstream: SocketAddr,
    dir: &Path,
    args: &Args,
    opts: GatewayOpts<'_>,
) -> Result<String> {
    let plain = cfg.plain();
    let on = matches!(plain, Cfg::GwCodec | Cfg::GwOffload);
    let offload = plain == Cfg::GwOffload;
    let mut c = String::new();
    writeln!(
        c,
        "[proxy]\nlisten = \"127.0.0.1:{listen}\"\nupstream = \"{upstream}\""
    )?;
    if let Some(n) = opts.worker_threads {
        writeln!(c, "worker_threads = {n}")?;
    }
    writeln!(c)?;
    if plain == Cfg::GwAuth {
        writeln!(
            c,
            "[proxy.auth]\n\n[[proxy.auth.tokens]]\nenv = \"PGW_LOAD_TOKENS\"\nnamespaces = [\"{NAMESPACE}\"]\n"
        )?;
    }
    if plain == Cfg::GwRouted {
        // The second upstream is the same server: the difference to gw-off is the routing
        // (the ingress reading every request, the decision, the second pool), not the upstream.
        writeln!(
            c,
            "[upstreams.second]\naddress = \"{upstream}\"\n\n[namespaces.{NAMESPACE}]\nupstream = \"second\"\n"
        )?;
    }
    if cfg.tls() {
        let Some(pki) = opts.pki else {
            bail!("{}: no certificates", cfg.label());
        };
        writeln!(
            c,
            "[proxy.tls]\ncert_file = \"{}\"\nkey_file = \"{}\"\n\n[proxy.upstream_tls]\nenabled = true\nca_file = \"{}\"\n",
            pki.cert_file.display(),
            pki.key_file.display(),
            pki.ca_file.display()
        )?;
    }
    writeln!(
        c,
        "[codec_server]\nlisten = \"127.0.0.1:{}\"\n\n[admin]\nlisten = \"127.0.0.1:{}\"\n",
        free_port()?,
        free_port()?
    )?;
    if on {
        writeln!(
            c,
            "[encryption]\nenabled = true\nactive_key = \"k1\"\nkeys = [{{ id = \"k1\", env = \"PGW_LOAD_KEY\" }}]\n\n[compression]\nenabled = true\n"
        )?;
    } else {
        writeln!(
            c,
            "[encryption]\nenabled = false\n\n[compression]\nenabled = false\n"
        )?;
    }
    if offload {
        let root = store_root(dir);
        std::fs::create_dir_all(&root)?;
        writeln!(
            c,
            "[storage]\nenabled = true\ndriver = \"local\"\nthreshold = {}\ncache_bytes = {}\n\n[[storage.drivers]]\nname = \"local\"\nkind = \"filesystem\"\nroot = \"{}\"\n",
            args.offload_threshold,
            args.offload_cache_bytes,
            root.display()
        )?;
    } else {
        writeln!(c, "[storage]\nenabled = false\n")?;
    }
    Ok(c)
}

/// Where the offload configuration's filesystem driver writes, under its directory `dir`.
pub fn store_root(dir: &Path) -> std::path::PathBuf {
    dir.join("payloads")
}

/// Writes the configuration of a gateway into `dir` and starts it (not yet accepting).
pub fn spawn_gateway(
    args: &Args,
    cfg: Cfg,
    upstream: SocketAddr,
    dir: &Path,
    tag: &str,
    opts: GatewayOpts<'_>,
) -> Result<(Proc, SocketAddr)> {
    std::fs::create_dir_all(dir)?;
    let port = free_port()?;
    let conf = gateway_config(cfg, port, upstream, dir, args, opts)?;
    let path = dir.join(format!("{tag}.toml"));
    std::fs::write(&path, conf)?;
    let mut cmd = Command::new(&args.gateway_bin);
    cmd.arg("--config")
        .arg(&path)
        .current_dir(dir)
        .env("PGW_LOAD_KEY", KEY_B64)
        .env("PGW_LOAD_TOKENS", TOKEN);
    let p = Proc::spawn(tag, cmd, &dir.join(format!("{tag}.log")))?;
    Ok((p, SocketAddr::from(([127, 0, 0, 1], port))))
}

/// Waits until `addr` accepts TCP connections (or `p` exits, or `timeout` passes).
pub async fn wait_tcp(addr: SocketAddr, p: &mut Proc, timeout: Duration) -> Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        if TcpStream::connect(addr).await.is_ok() {
            return Ok(());
        }
        if !p.alive() {
            bail!("{} exited early", p.name);
        }
        if Instant::now() > deadline {
            bail!("{} did not accept on {addr} in {timeout:?}", p.name);
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Writes an nginx configuration (`grpc_pass` to `upstream`; with `pki`, a TLS listener and
/// `grpcs://` to the upstream, verifying its certificate) and starts nginx in the foreground.
pub fn spawn_nginx(
    nginx: &Path,
    upstream: SocketAddr,
    dir: &Path,
    tag: &str,
    pki: Option<&Pki>,
) -> Result<(Proc, SocketAddr)> {
    let prefix = dir.join(tag);
    std::fs::create_dir_all(prefix.join("logs"))?;
    let port = free_port()?;
    // nginx 1.22 (Debian 12): `listen ... http2`; 1.25.1+ would be `http2 on;`. Its default
    // protocols (both sides) stop at TLS 1.2 before 1.23.4: TLS 1.3 is named explicitly.
    let (listen, server_tls, pass) = match pki {
        None => (
            format!("listen 127.0.0.1:{port} http2;"),
            String::new(),
            "grpc_pass grpc://grpc_up;".to_string(),
        ),
        Some(pki) => (
            format!("listen 127.0.0.1:{port} ssl http2;"),
            format!(
                "ssl_certificate {};\n        ssl_certificate_key {};\n        ssl_protocols TLSv1.2 TLSv1.3;\n        ",
                pki.cert_file.display(),
                pki.key_file.display()
            ),
            format!(
                "grpc_pass grpcs://grpc_up;\n            grpc_ssl_verify on;\n            grpc_ssl_trusted_certificate {};\n            grpc_ssl_name localhost;\n            grpc_ssl_server_name on;\n            grpc_ssl_protocols TLSv1.2 TLSv1.3;",
                pki.ca_file.display()
            ),
        ),
    };
    let conf = format!(
        r#"worker_processes auto;
pid {p}/nginx.pid;
error_log {p}/logs/error.log warn;
events {{ worker_connections 1024; }}
http {{
    access_log off;
    client_body_temp_path {p}/client_body;
    proxy_temp_path {p}/proxy;
    fastcgi_temp_path {p}/fastcgi;
    uwsgi_temp_path {p}/uwsgi;
    scgi_temp_path {p}/scgi;
    client_max_body_size 0;
    keepalive_requests 100000000;
    keepalive_timeout 300s;
    client_body_buffer_size 8m;
    http2_max_concurrent_streams 1000;
    upstream grpc_up {{
        server {upstream};
        keepalive 32;
        keepalive_requests 100000000;
    }}
    server {{
        {listen}
        {server_tls}location / {{
            {pass}
            grpc_read_timeout 300s;
            grpc_send_timeout 300s;
            grpc_buffer_size 1m;
        }}
    }}
}}
"#,
        p = prefix.display()
    );
    let conf_path = prefix.join("nginx.conf");
    std::fs::write(&conf_path, conf)?;
    let mut cmd = Command::new(nginx);
    cmd.arg("-p")
        .arg(&prefix)
        .arg("-c")
        .arg(&conf_path)
        .arg("-g")
        .arg("daemon off;");
    let p = Proc::spawn(tag, cmd, &prefix.join("stdout.log"))?;
    Ok((p, SocketAddr::from(([127, 0, 0, 1], port))))
}

#[cfg(test)]
mod tests {
    use clap::ValueEnum;

    use super::*;

    /// `--configs` takes the names the tables and CSV print, and every TLS configuration
    /// has a plain counterpart whose baseline is `direct`.
    #[test]
    fn labels_parse_back_and_tls_pairs() {
        for c in Cfg::ALL {
            assert_eq!(Cfg::from_str(c.label(), false), Ok(c), "{}", c.label());
            assert!(!c.plain().tls());
            assert_eq!(c.plain().baseline(), Cfg::Direct);
            if c.tls() {
                assert_eq!(c.baseline(), Cfg::DirectTls);
                assert_eq!(format!("{}-tls", c.plain().label()), c.label());
            }
        }
        assert_eq!(Cfg::value_variants().len(), Cfg::ALL.len());
    }
}
