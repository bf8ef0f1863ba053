//! `pgw-load`: RPC-level load against a Temporal dev server (or an in-process h2 echo upstream)
//! directly, through nginx `grpc_pass`, and through the gateway with codecs off, with
//! zstd + AES-256-GCM, and with offload to the filesystem driver — all in one run.
//!
//! It starts every peer itself on free loopback ports (the Temporal dev server, nginx, three
//! gateways per upstream), measures, stops them, and writes `load.csv`, `load.md` and
//! `load-added-latency.svg` into `--out`. `scripts/bench-load.sh` is the documented entry point.
//!
//! Every loop is bounded both in count and in time.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::fmt::Write as _;
use std::io::Write as _;
use std::net::SocketAddr;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use bytes::{Buf, BufMut, Bytes, BytesMut};
use clap::Parser;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::client::conn::http2::SendRequest;
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use prost::Message;
use temporalio_protos::protos::temporal::api::{
    common::v1::{Payload, Payloads, WorkflowExecution, WorkflowType},
    history::v1::history_event::Attributes,
    query::v1::WorkflowQuery,
    taskqueue::v1::TaskQueue,
    workflowservice::v1::{
        DescribeNamespaceRequest, DescribeWorkflowExecutionRequest,
        GetWorkflowExecutionHistoryRequest, GetWorkflowExecutionHistoryResponse,
        QueryWorkflowRequest, QueryWorkflowResponse, SignalWorkflowExecutionRequest,
        StartWorkflowExecutionRequest, StartWorkflowExecutionResponse,
    },
};
use tokio::net::{TcpListener, TcpStream};

const SVC: &str = "/temporal.api.workflowservice.v1.WorkflowService/";
const KEY_B64: &str = "MDEyMzQ1Njc4OWFiY2RlZjAxMjM0NTY3ODlhYmNkZWY="; // 32 bytes, bench only
const NAMESPACE: &str = "default";

#[derive(Parser, Debug, Clone)]
#[command(about = "Payload Gateway load benchmark (see BENCHMARKS.md, section Load)")]
struct Args {
    /// The gateway binary (build with `cargo build --release -p payload-gateway`).
    #[arg(long)]
    gateway_bin: PathBuf,
    /// The `temporal` CLI (dev server); omit to run the echo upstream only.
    #[arg(long)]
    temporal_bin: Option<PathBuf>,
    /// nginx binary; omit to skip the nginx comparison.
    #[arg(long)]
    nginx_bin: Option<PathBuf>,
    /// Output directory (CSV, markdown, SVG, logs).
    #[arg(long, default_value = "benches/results")]
    out: PathBuf,
    /// Payload sizes in bytes.
    #[arg(long, value_delimiter = ',', default_value = "100,1024,65536,1048576")]
    sizes: Vec<usize>,
    /// Concurrent RPC streams (one HTTP/2 connection) in the throughput phase, echo upstream.
    #[arg(long, default_value_t = 8)]
    echo_concurrency: usize,
    /// Concurrent workflow iterations in the throughput phase, Temporal upstream.
    #[arg(long, default_value_t = 4)]
    temporal_concurrency: usize,
    /// Time bound of each sequential (latency) phase, seconds.
    #[arg(long, default_value_t = 1.5)]
    seq_secs: f64,
    /// Time bound of each concurrent (throughput) phase, seconds.
    #[arg(long, default_value_t = 3.0)]
    conc_secs: f64,
    /// Count bound of each phase (operations).
    #[arg(long, default_value_t = 20000)]
    max_ops: u64,
    /// Offload threshold (serialized bytes after the codec) for the offload configuration.
    #[arg(long, default_value_t = 512)]
    offload_threshold: usize,
    /// `storage.cache_bytes` (LRU of resolved objects) of the offload configuration; the
    /// gateway's default is 64 MiB, 0 separates the cache from the memory figures.
    #[arg(long, default_value_t = 64 * 1024 * 1024)]
    offload_cache_bytes: usize,
    /// Start-to-ready samples.
    #[arg(long, default_value_t = 20)]
    ready_samples: usize,
}

// ------------------------------------------------------------------ processes

struct Proc {
    name: String,
    child: Child,
}

impl Proc {
    fn spawn(name: &str, mut cmd: Command, log: &Path) -> Result<Proc> {
        let logf = std::fs::File::create(log)?;
        cmd.stdin(Stdio::null())
            .stdout(logf.try_clone()?)
            .stderr(logf)
            .process_group(0);
        // SAFETY: prctl is async-signal-safe; the child dies with us even on SIGKILL.
        unsafe {
            cmd.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                Ok(())
            });
        }
        let child = cmd.spawn().with_context(|| format!("spawn {name}"))?;
        Ok(Proc {
            name: name.to_string(),
            child,
        })
    }
    fn pid(&self) -> u32 {
        self.child.id()
    }
    fn alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let pgid = self.child.id() as i32;
        // SAFETY: signalling our own child's process group.
        unsafe { libc::kill(-pgid, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        eprintln!("{}: did not stop in 5 s, killing", self.name);
        unsafe { libc::kill(-pgid, libc::SIGKILL) };
        let _ = self.child.wait();
    }
}

fn free_port() -> Result<u16> {
    let l = std::net::TcpListener::bind("127.0.0.1:0")?;
    Ok(l.local_addr()?.port())
}

fn proc_status_kb(pid: u32, field: &str) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    s.lines()
        .find(|l| l.starts_with(field))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

/// utime + stime of the process, seconds.
fn proc_cpu_secs(pid: u32) -> f64 {
    let Ok(s) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return 0.0;
    };
    let Some(rest) = s.rsplit_once(')').map(|(_, r)| r) else {
        return 0.0;
    };
    let f: Vec<&str> = rest.split_whitespace().collect();
    // after ")": state=0, ..., utime=11, stime=12
    let ticks: u64 = f.get(11).and_then(|v| v.parse().ok()).unwrap_or(0)
        + f.get(12).and_then(|v| v.parse().ok()).unwrap_or(0);
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    ticks as f64 / hz
}

/// The process and its direct children (nginx workers).
fn proc_tree(pid: u32) -> Vec<u32> {
    let mut pids = vec![pid];
    if let Ok(rd) = std::fs::read_dir("/proc") {
        for e in rd.flatten() {
            let Some(p) = e.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else {
                continue;
            };
            if let Ok(s) = std::fs::read_to_string(format!("/proc/{p}/stat"))
                && let Some((_, rest)) = s.rsplit_once(')')
                && rest.split_whitespace().nth(1) == Some(&pid.to_string())
            {
                pids.push(p);
            }
        }
    }
    pids
}

fn tree_cpu_secs(pids: &[u32]) -> f64 {
    pids.iter().map(|p| proc_cpu_secs(*p)).sum()
}

// ------------------------------------------------------------------ gRPC client

#[derive(Clone)]
struct Client {
    sender: SendRequest<Full<Bytes>>,
    authority: String,
}

#[derive(Debug)]
struct CallError(String);

impl Client {
    async fn connect(addr: SocketAddr) -> Result<Client> {
        let stream = TcpStream::connect(addr).await?;
        stream.set_nodelay(true)?;
        let (sender, conn) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
            .timer(TokioTimer::new())
            .initial_stream_window_size(4 * 1024 * 1024)
            .initial_connection_window_size(16 * 1024 * 1024)
            .max_frame_size(1024 * 1024)
            .max_send_buf_size(4 * 1024 * 1024)
            .handshake(TokioIo::new(stream))
            .await?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        Ok(Client {
            sender,
            authority: addr.to_string(),
        })
    }

    /// One unary call; `framed` is the gRPC-framed request. Returns the response message.
    async fn call(&self, method: &str, framed: Bytes) -> Result<Bytes, CallError> {
        let req = Request::post(format!("http://{}{SVC}{method}", self.authority))
            .header("content-type", "application/grpc")
            .header("te", "trailers")
            .body(Full::new(framed))
            .map_err(|e| CallError(e.to_string()))?;
        let mut sender = self.sender.clone();
        sender
            .ready()
            .await
            .map_err(|e| CallError(format!("not ready: {e}")))?;
        let resp = sender
            .send_request(req)
            .await
            .map_err(|e| CallError(format!("send: {e}")))?;
        let (parts, body) = resp.into_parts();
        if let Some(st) = parts.headers.get("grpc-status")
            && st != "0"
        {
            return Err(CallError(format!(
                "{method}: grpc-status {st:?} {:?}",
                parts.headers.get("grpc-message")
            )));
        }
        let collected = body
            .collect()
            .await
            .map_err(|e| CallError(format!("body: {e}")))?;
        let trailers = collected.trailers().cloned();
        let data = collected.to_bytes();
        if parts.headers.get("grpc-status").is_none() {
            let t = trailers.ok_or_else(|| CallError(format!("{method}: no trailers")))?;
            match t.get("grpc-status") {
                Some(s) if s == "0" => {}
                s => {
                    return Err(CallError(format!(
                        "{method}: grpc-status {s:?} {:?}",
                        t.get("grpc-message")
                    )));
                }
            }
        }
        unframe(data).map_err(|e| CallError(format!("{method}: {e}")))
    }
}

fn frame(msg: &impl Message) -> Bytes {
    let len = msg.encoded_len();
    let mut b = BytesMut::with_capacity(5 + len);
    b.put_u8(0);
    b.put_u32(len as u32);
    msg.encode(&mut b).expect("capacity");
    b.freeze()
}

fn unframe(mut data: Bytes) -> Result<Bytes> {
    if data.len() < 5 {
        bail!("short response ({} bytes)", data.len());
    }
    if data[0] != 0 {
        bail!("compressed response frame");
    }
    let _ = data.get_u8();
    let len = data.get_u32() as usize;
    if data.len() != len {
        bail!("frame length {len}, have {}", data.len());
    }
    Ok(data)
}

// ------------------------------------------------------------------ echo upstream

type EchoBody =
    StreamBody<futures::stream::Iter<std::vec::IntoIter<Result<Frame<Bytes>, Infallible>>>>;

fn grpc_response(msg: Option<Bytes>, status: u32) -> Response<EchoBody> {
    let mut trailers = http::HeaderMap::new();
    trailers.insert("grpc-status", status.into());
    let mut frames = Vec::new();
    if let Some(m) = msg {
        frames.push(Ok(Frame::data(m)));
    }
    frames.push(Ok(Frame::trailers(trailers)));
    Response::builder()
        .header("content-type", "application/grpc")
        .body(StreamBody::new(futures::stream::iter(frames)))
        .expect("response")
}

async fn echo_handle(req: Request<Incoming>) -> Result<Response<EchoBody>, Infallible> {
    let path = req.uri().path().to_string();
    if !path.ends_with("/QueryWorkflow") {
        return Ok(grpc_response(None, 12));
    }
    let Ok(body) = req.into_body().collect().await else {
        return Ok(grpc_response(None, 13));
    };
    let Ok(msg) = unframe(body.to_bytes()) else {
        return Ok(grpc_response(None, 13));
    };
    let Ok(q) = QueryWorkflowRequest::decode(msg) else {
        return Ok(grpc_response(None, 13));
    };
    let resp = QueryWorkflowResponse {
        query_result: q.query.and_then(|q| q.query_args),
        ..Default::default()
    };
    Ok(grpc_response(Some(frame(&resp)), 0))
}

async fn start_echo() -> Result<SocketAddr> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let _ = stream.set_nodelay(true);
            tokio::spawn(async move {
                let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                    .timer(TokioTimer::new())
                    .initial_stream_window_size(4 * 1024 * 1024)
                    .initial_connection_window_size(16 * 1024 * 1024)
                    .max_frame_size(1024 * 1024)
                    .max_send_buf_size(4 * 1024 * 1024)
                    .serve_connection(
                        TokioIo::new(stream),
                        hyper::service::service_fn(echo_handle),
                    )
                    .await;
            });
        }
    });
    Ok(addr)
}

// ------------------------------------------------------------------ payloads

/// JSON-like order records (compress ~4-5x with zstd level 3, like the codec bench data).
fn json_data(size: usize, seed: u64) -> Vec<u8> {
    const WORDS: [&str; 12] = [
        "alpha",
        "delivery",
        "invoice",
        "pending",
        "shipped",
        "customer",
        "warehouse",
        "express",
        "refund",
        "priority",
        "standard",
        "returned",
    ];
    let mut x = seed | 1;
    let mut rnd = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    let mut s = String::with_capacity(size + 200);
    s.push('[');
    while s.len() < size {
        let r = rnd();
        let _ = write!(
            s,
            r#"{{"id":"{:016x}","amount":{}.{:02},"date":"2024-{:02}-{:02}","status":"{}","note":"{} {}"}},"#,
            r,
            r % 10000,
            (r >> 20) % 100,
            (r >> 30) % 12 + 1,
            (r >> 40) % 28 + 1,
            WORDS[(r >> 8) as usize % 12],
            WORDS[(r >> 16) as usize % 12],
            WORDS[(r >> 24) as usize % 12]
        );
    }
    s.truncate(size);
    s.into_bytes()
}

fn payload(size: usize, seed: u64) -> Payload {
    Payload {
        metadata: [("encoding".to_string(), b"json/plain".to_vec())]
            .into_iter()
            .collect(),
        data: json_data(size, seed),
        ..Default::default()
    }
}

// ------------------------------------------------------------------ targets

#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Debug)]
enum Cfg {
    Direct,
    Nginx,
    GwOff,
    GwCodec,
    GwOffload,
}

impl Cfg {
    fn label(self) -> &'static str {
        match self {
            Cfg::Direct => "direct",
            Cfg::Nginx => "nginx",
            Cfg::GwOff => "gw-off",
            Cfg::GwCodec => "gw-codec",
            Cfg::GwOffload => "gw-offload",
        }
    }
    fn describe(self) -> &'static str {
        match self {
            Cfg::Direct => "(a) upstream directly",
            Cfg::Nginx => "(b) nginx grpc_pass",
            Cfg::GwOff => "(c) gateway, codecs off",
            Cfg::GwCodec => "(d) gateway, zstd + AES-256-GCM",
            Cfg::GwOffload => "(e) gateway, zstd + AES-GCM + offload (filesystem)",
        }
    }
    fn color(self) -> &'static str {
        match self {
            Cfg::Direct => "#888888",
            Cfg::Nginx => "#2ca02c",
            Cfg::GwOff => "#1f77b4",
            Cfg::GwCodec => "#ff7f0e",
            Cfg::GwOffload => "#d62728",
        }
    }
}

struct Target {
    cfg: Cfg,
    addr: SocketAddr,
    proc: Option<Proc>,
    idle_rss_kb: Option<u64>,
}

fn gateway_config(
    cfg: Cfg,
    listen: u16,
    upstream: SocketAddr,
    dir: &Path,
    args: &Args,
) -> Result<String> {
    let on = matches!(cfg, Cfg::GwCodec | Cfg::GwOffload);
    let offload = cfg == Cfg::GwOffload;
    let mut c = String::new();
    writeln!(
        c,
        "[proxy]\nlisten = \"127.0.0.1:{listen}\"\nupstream = \"{upstream}\"\n"
    )?;
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
        let root = dir.join("payloads");
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

fn spawn_gateway(
    args: &Args,
    cfg: Cfg,
    upstream: SocketAddr,
    dir: &Path,
    tag: &str,
) -> Result<(Proc, SocketAddr)> {
    std::fs::create_dir_all(dir)?;
    let port = free_port()?;
    let conf = gateway_config(cfg, port, upstream, dir, args)?;
    let path = dir.join(format!("{tag}.toml"));
    std::fs::write(&path, conf)?;
    let mut cmd = Command::new(&args.gateway_bin);
    cmd.arg("--config")
        .arg(&path)
        .current_dir(dir)
        .env("PGW_LOAD_KEY", KEY_B64);
    let p = Proc::spawn(tag, cmd, &dir.join(format!("{tag}.log")))?;
    Ok((p, SocketAddr::from(([127, 0, 0, 1], port))))
}

async fn wait_tcp(addr: SocketAddr, p: &mut Proc, timeout: Duration) -> Result<()> {
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

fn spawn_nginx(
    nginx: &Path,
    upstream: SocketAddr,
    dir: &Path,
    tag: &str,
) -> Result<(Proc, SocketAddr)> {
    let prefix = dir.join(tag);
    std::fs::create_dir_all(prefix.join("logs"))?;
    let port = free_port()?;
    // nginx 1.22 (Debian 12): `listen ... http2`; 1.25.1+ would be `http2 on;`.
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
        listen 127.0.0.1:{port} http2;
        location / {{
            grpc_pass grpc://grpc_up;
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

// ------------------------------------------------------------------ workloads

#[derive(Clone, Copy, PartialEq, Eq)]
enum Upstream {
    Echo,
    Temporal,
}

impl Upstream {
    fn label(self) -> &'static str {
        match self {
            Upstream::Echo => "echo",
            Upstream::Temporal => "temporal",
        }
    }
}

struct Work {
    kind: Upstream,
    size: usize,
    /// Echo: the framed QueryWorkflow request (same bytes every call).
    echo_req: Bytes,
    payload: Payload,
    seq: AtomicU64,
    run_tag: String,
}

impl Work {
    fn new(kind: Upstream, size: usize, run_tag: String) -> Work {
        let payload = payload(size, size as u64 ^ 0x9e37_79b9);
        let echo_req = frame(&QueryWorkflowRequest {
            namespace: NAMESPACE.into(),
            execution: Some(WorkflowExecution {
                workflow_id: "pgw-load-echo".into(),
                run_id: String::new(),
            }),
            query: Some(WorkflowQuery {
                query_type: "state".into(),
                query_args: Some(Payloads {
                    payloads: vec![payload.clone()],
                }),
                header: None,
            }),
            ..Default::default()
        });
        Work {
            kind,
            size,
            echo_req,
            payload,
            seq: AtomicU64::new(0),
            run_tag,
        }
    }

    /// One operation: echo = 1 RPC; temporal = Start, Signal, Describe, GetHistory on a new
    /// workflow. Pushes (method, latency µs). `verify` checks payloads came back intact.
    async fn op(
        &self,
        c: &Client,
        lat: &mut Vec<(&'static str, u32)>,
        verify: bool,
    ) -> Result<(), CallError> {
        match self.kind {
            Upstream::Echo => {
                let t = Instant::now();
                let r = c.call("QueryWorkflow", self.echo_req.clone()).await?;
                lat.push(("QueryWorkflow(echo)", t.elapsed().as_micros() as u32));
                let resp =
                    QueryWorkflowResponse::decode(r).map_err(|e| CallError(e.to_string()))?;
                let got = resp
                    .query_result
                    .and_then(|p| p.payloads.into_iter().next())
                    .ok_or_else(|| CallError("echo: no payload".into()))?;
                if got.data.len() != self.size || (verify && got != self.payload) {
                    return Err(CallError(format!(
                        "echo: payload changed ({} bytes, encoding {:?})",
                        got.data.len(),
                        got.metadata
                            .get("encoding")
                            .map(|v| String::from_utf8_lossy(v))
                    )));
                }
                Ok(())
            }
            Upstream::Temporal => {
                let n = self.seq.fetch_add(1, Ordering::Relaxed);
                let wid = format!("pgw-load-{}-{}-{n}", self.run_tag, self.size);
                let input = Some(Payloads {
                    payloads: vec![self.payload.clone()],
                });
                let t = Instant::now();
                let r = c
                    .call(
                        "StartWorkflowExecution",
                        frame(&StartWorkflowExecutionRequest {
                            namespace: NAMESPACE.into(),
                            workflow_id: wid.clone(),
                            workflow_type: Some(WorkflowType {
                                name: "LoadWorkflow".into(),
                            }),
                            task_queue: Some(TaskQueue {
                                name: "pgw-load".into(),
                                kind: 1,
                                normal_name: String::new(),
                            }),
                            input: input.clone(),
                            identity: "pgw-load".into(),
                            request_id: format!("{wid}-start"),
                            ..Default::default()
                        }),
                    )
                    .await?;
                lat.push(("StartWorkflowExecution", t.elapsed().as_micros() as u32));
                let run_id = StartWorkflowExecutionResponse::decode(r)
                    .map_err(|e| CallError(e.to_string()))?
                    .run_id;
                let exec = Some(WorkflowExecution {
                    workflow_id: wid.clone(),
                    run_id,
                });
                let t = Instant::now();
                c.call(
                    "SignalWorkflowExecution",
                    frame(&SignalWorkflowExecutionRequest {
                        namespace: NAMESPACE.into(),
                        workflow_execution: exec.clone(),
                        signal_name: "bump".into(),
                        input,
                        identity: "pgw-load".into(),
                        request_id: format!("{wid}-signal"),
                        ..Default::default()
                    }),
                )
                .await?;
                lat.push(("SignalWorkflowExecution", t.elapsed().as_micros() as u32));
                let t = Instant::now();
                c.call(
                    "DescribeWorkflowExecution",
                    frame(&DescribeWorkflowExecutionRequest {
                        namespace: NAMESPACE.into(),
                        execution: exec.clone(),
                    }),
                )
                .await?;
                lat.push(("DescribeWorkflowExecution", t.elapsed().as_micros() as u32));
                let t = Instant::now();
                let r = c
                    .call(
                        "GetWorkflowExecutionHistory",
                        frame(&GetWorkflowExecutionHistoryRequest {
                            namespace: NAMESPACE.into(),
                            execution: exec,
                            ..Default::default()
                        }),
                    )
                    .await?;
                lat.push((
                    "GetWorkflowExecutionHistory",
                    t.elapsed().as_micros() as u32,
                ));
                if verify {
                    let h = GetWorkflowExecutionHistoryResponse::decode(r)
                        .map_err(|e| CallError(e.to_string()))?;
                    let mut found = 0;
                    for ev in h.history.map(|h| h.events).unwrap_or_default() {
                        let p = match ev.attributes {
                            Some(Attributes::WorkflowExecutionStartedEventAttributes(a)) => a.input,
                            Some(Attributes::WorkflowExecutionSignaledEventAttributes(a)) => {
                                a.input
                            }
                            _ => continue,
                        };
                        let p = p.and_then(|p| p.payloads.into_iter().next());
                        if p.as_ref() != Some(&self.payload) {
                            return Err(CallError("history: payload changed".into()));
                        }
                        found += 1;
                    }
                    if found != 2 {
                        return Err(CallError(format!("history: {found} payload events")));
                    }
                }
                Ok(())
            }
        }
    }
}

#[derive(Default, Clone)]
struct Stats {
    ops: u64,
    rpcs: u64,
    errors: u64,
    first_error: Option<String>,
    secs: f64,
    all: Vec<u32>,
    by_method: BTreeMap<&'static str, Vec<u32>>,
    proxy_cpu_secs: f64,
}

impl Stats {
    fn pct(v: &[u32], p: f64) -> f64 {
        if v.is_empty() {
            return f64::NAN;
        }
        let i = ((v.len() as f64 - 1.0) * p).round() as usize;
        v[i] as f64
    }
    fn p50(&self) -> f64 {
        Self::pct(&self.all, 0.50)
    }
    fn p99(&self) -> f64 {
        Self::pct(&self.all, 0.99)
    }
    fn rps(&self) -> f64 {
        self.rpcs as f64 / self.secs
    }
}

async fn run_phase(
    work: Arc<Work>,
    client: &Client,
    conc: usize,
    max_ops: u64,
    max_secs: f64,
    cpu_pids: &[u32],
) -> Stats {
    let started = Arc::new(AtomicU64::new(0));
    let cpu0 = tree_cpu_secs(cpu_pids);
    let t0 = Instant::now();
    let deadline = t0 + Duration::from_secs_f64(max_secs);
    let mut tasks = Vec::new();
    for _ in 0..conc {
        let work = work.clone();
        let client = client.clone();
        let started = started.clone();
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::new();
            let (mut ops, mut errors, mut first_error) = (0u64, 0u64, None);
            while Instant::now() < deadline && started.fetch_add(1, Ordering::Relaxed) < max_ops {
                match tokio::time::timeout(
                    Duration::from_secs(30),
                    work.op(&client, &mut lat, false),
                )
                .await
                {
                    Ok(Ok(())) => ops += 1,
                    Ok(Err(e)) => {
                        errors += 1;
                        first_error.get_or_insert(e.0);
                    }
                    Err(_) => {
                        errors += 1;
                        first_error.get_or_insert("timeout 30 s".to_string());
                    }
                }
                if errors > 20 {
                    break;
                }
            }
            (lat, ops, errors, first_error)
        }));
    }
    let mut st = Stats::default();
    for t in tasks {
        let (lat, ops, errors, fe) = t.await.expect("load task");
        st.ops += ops;
        st.errors += errors;
        if st.first_error.is_none() {
            st.first_error = fe;
        }
        for (m, us) in lat {
            st.all.push(us);
            st.by_method.entry(m).or_default().push(us);
        }
    }
    st.secs = t0.elapsed().as_secs_f64();
    st.proxy_cpu_secs = tree_cpu_secs(cpu_pids) - cpu0;
    st.rpcs = st.all.len() as u64;
    st.all.sort_unstable();
    for v in st.by_method.values_mut() {
        v.sort_unstable();
    }
    st
}

// ------------------------------------------------------------------ raw codec baseline

/// Raw zstd (level 3, reused context) + AES-256-GCM seal, then open + decompress, of the
/// serialized payload, single thread: the per-core ceiling for one encode + one decode.
fn raw_codec_secs_per_roundtrip(p: &Payload, budget: Duration) -> Result<f64> {
    use aws_lc_rs::aead::{AES_256_GCM, Aad, LessSafeKey, Nonce, UnboundKey};
    let raw = p.encode_to_vec();
    let key =
        LessSafeKey::new(UnboundKey::new(&AES_256_GCM, &[7u8; 32]).map_err(|_| anyhow!("key"))?);
    let mut comp = zstd::bulk::Compressor::new(3)?;
    let mut decomp = zstd::bulk::Decompressor::new()?;
    let t0 = Instant::now();
    let mut n = 0u64;
    while t0.elapsed() < budget && n < 100_000 {
        let mut buf = comp.compress(&raw)?;
        let nonce = [n as u8; 12];
        let tag = key
            .seal_in_place_separate_tag(Nonce::assume_unique_for_key(nonce), Aad::empty(), &mut buf)
            .map_err(|_| anyhow!("seal"))?;
        buf.extend_from_slice(tag.as_ref());
        let plain = key
            .open_in_place(Nonce::assume_unique_for_key(nonce), Aad::empty(), &mut buf)
            .map_err(|_| anyhow!("open"))?;
        let out = decomp.decompress(plain, raw.len())?;
        assert_eq!(out.len(), raw.len());
        n += 1;
    }
    Ok(t0.elapsed().as_secs_f64() / n as f64)
}

// ------------------------------------------------------------------ orchestration

struct Row {
    upstream: Upstream,
    cfg: Cfg,
    size: usize,
    seq: Stats,
    conc: Stats,
    concurrency: usize,
}

fn fmt_size(s: usize) -> String {
    if s >= 1 << 20 && s.is_multiple_of(1 << 20) {
        format!("{} MiB", s >> 20)
    } else if s >= 1024 && s.is_multiple_of(1024) {
        format!("{} KiB", s >> 10)
    } else {
        format!("{s} B")
    }
}

async fn readiness_rpc(addr: SocketAddr, work: &Work) -> bool {
    let Ok(c) = Client::connect(addr).await else {
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

async fn wait_temporal(addr: SocketAddr, p: &mut Proc) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        if let Ok(c) = Client::connect(addr).await
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

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<()> {
    let args = Args::parse();
    std::fs::create_dir_all(&args.out)?;
    let work_dir = tempfile::Builder::new().prefix("pgw-load-").tempdir()?;
    let res = tokio::select! {
        r = run(&args, work_dir.path()) => r,
        _ = tokio::signal::ctrl_c() => Err(anyhow!("interrupted")),
    };
    // Processes stop in `run`'s drops; keep the logs when something failed.
    if res.is_err() {
        let kept = work_dir.keep();
        eprintln!("logs kept in {}", kept.display());
    }
    res
}

async fn run(args: &Args, dir: &Path) -> Result<()> {
    let run_tag = format!("{}", std::process::id());
    let mut rows: Vec<Row> = Vec::new();
    let mut resources: Vec<String> = Vec::new();
    let mut upstreams = vec![Upstream::Echo];
    if args.temporal_bin.is_some() {
        upstreams.push(Upstream::Temporal);
    }

    // Raw codec baseline, same run.
    let mut raw_rates = BTreeMap::new();
    for &size in &args.sizes {
        let p = payload(size, size as u64 ^ 0x9e37_79b9);
        let per = tokio::task::spawn_blocking(move || {
            raw_codec_secs_per_roundtrip(&p, Duration::from_millis(600))
        })
        .await??;
        raw_rates.insert(size, per);
        eprintln!(
            "raw zstd+AES-GCM encode+decode {}: {:.1} µs",
            fmt_size(size),
            per * 1e6
        );
    }

    for &up in &upstreams {
        // --- upstream
        let mut temporal: Option<Proc> = None;
        let up_addr = match up {
            Upstream::Echo => start_echo().await?,
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
                addr
            }
        };

        // --- targets
        let mut targets: Vec<Target> = vec![Target {
            cfg: Cfg::Direct,
            addr: up_addr,
            proc: None,
            idle_rss_kb: None,
        }];
        if let Some(nginx) = &args.nginx_bin {
            let (mut p, addr) = spawn_nginx(nginx, up_addr, dir, &format!("nginx-{}", up.label()))?;
            wait_tcp(addr, &mut p, Duration::from_secs(10)).await?;
            targets.push(Target {
                cfg: Cfg::Nginx,
                addr,
                proc: Some(p),
                idle_rss_kb: None,
            });
        }
        for cfg in [Cfg::GwOff, Cfg::GwCodec, Cfg::GwOffload] {
            let tag = format!("{}-{}", cfg.label(), up.label());
            let (mut p, addr) = spawn_gateway(args, cfg, up_addr, &dir.join(&tag), &tag)?;
            wait_tcp(addr, &mut p, Duration::from_secs(10)).await?;
            tokio::time::sleep(Duration::from_millis(300)).await;
            let idle = proc_status_kb(p.pid(), "VmRSS:");
            targets.push(Target {
                cfg,
                addr,
                proc: Some(p),
                idle_rss_kb: idle,
            });
        }

        let conc = match up {
            Upstream::Echo => args.echo_concurrency,
            Upstream::Temporal => args.temporal_concurrency,
        };
        for &size in &args.sizes {
            let work = Arc::new(Work::new(up, size, run_tag.clone()));
            for t in &targets {
                let client = Client::connect(t.addr).await?;
                // warm up (and verify payloads round-trip intact)
                let mut lat = Vec::new();
                for _ in 0..3 {
                    work.op(&client, &mut lat, true).await.map_err(|e| {
                        anyhow!(
                            "{} {} {}: {}",
                            up.label(),
                            t.cfg.label(),
                            fmt_size(size),
                            e.0
                        )
                    })?;
                }
                let pids = t
                    .proc
                    .as_ref()
                    .map(|p| proc_tree(p.pid()))
                    .unwrap_or_default();
                let seq =
                    run_phase(work.clone(), &client, 1, args.max_ops, args.seq_secs, &pids).await;
                let cst = run_phase(
                    work.clone(),
                    &client,
                    conc,
                    args.max_ops,
                    args.conc_secs,
                    &pids,
                )
                .await;
                eprintln!(
                    "{:8} {:10} {:>7}: seq p50 {:>8.0} µs p99 {:>8.0} | conc{} {:>8.0} rpc/s p50 {:>8.0} p99 {:>8.0} | errors {} {}",
                    up.label(),
                    t.cfg.label(),
                    fmt_size(size),
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
                    seq,
                    conc: cst,
                    concurrency: conc,
                });
            }
        }
        // --- resources after the largest size ran
        let max_size = args.sizes.iter().copied().max().unwrap_or(0);
        for t in &targets {
            if let Some(p) = &t.proc {
                let pids = proc_tree(p.pid());
                let hwm: u64 = pids
                    .iter()
                    .filter_map(|p| proc_status_kb(*p, "VmHWM:"))
                    .sum();
                let rss: u64 = pids
                    .iter()
                    .filter_map(|p| proc_status_kb(*p, "VmRSS:"))
                    .sum();
                let idle = t
                    .idle_rss_kb
                    .map(|k| format!("{:.1}", k as f64 / 1024.0))
                    .unwrap_or("-".into());
                resources.push(format!(
                    "| {} | {} | {} | {:.1} | {:.1} | {} × {} |",
                    up.label(),
                    t.cfg.describe(),
                    idle,
                    rss as f64 / 1024.0,
                    hwm as f64 / 1024.0,
                    conc,
                    fmt_size(max_size),
                ));
            }
        }
        drop(targets);
        drop(temporal);
    }

    // --- start to ready (echo upstream): codecs off, then codecs on
    let mut ready_lines = Vec::new();
    if args.ready_samples > 0 {
        let echo = start_echo().await?;
        let work = Work::new(Upstream::Echo, 1024, run_tag.clone());
        for cfg in [Cfg::GwOff, Cfg::GwCodec] {
            let (mut accept, mut ready) = (Vec::new(), Vec::new());
            for i in 0..args.ready_samples {
                let d = dir.join(format!("ready-{}-{i}", cfg.label()));
                let t0 = Instant::now();
                let (mut p, addr) = spawn_gateway(args, cfg, echo, &d, "ready")?;
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
    }

    write_outputs(args, &rows, &resources, &ready_lines, &raw_rates)
}

// ------------------------------------------------------------------ outputs

fn write_outputs(
    args: &Args,
    rows: &[Row],
    resources: &[String],
    ready: &[String],
    raw: &BTreeMap<usize, f64>,
) -> Result<()> {
    let base = |r: &Row| {
        rows.iter()
            .find(|b| b.upstream == r.upstream && b.size == r.size && b.cfg == Cfg::Direct)
    };
    // CSV
    let mut csv = String::from(
        "upstream,config,size,seq_rpcs,seq_p50_us,seq_p99_us,added_p50_us,concurrency,conc_rpcs,conc_rps,rps_ratio,conc_p50_us,conc_p99_us,p50_ratio,p99_ratio,errors,proxy_cpu_us_per_rpc,methods_seq_p50_us\n",
    );
    for r in rows {
        let b = base(r).expect("direct row");
        let methods: Vec<String> = r
            .seq
            .by_method
            .iter()
            .map(|(m, v)| format!("{m}={:.0}", Stats::pct(v, 0.5)))
            .collect();
        writeln!(
            csv,
            "{},{},{},{},{:.0},{:.0},{:.0},{},{},{:.1},{:.3},{:.0},{:.0},{:.3},{:.3},{},{:.1},{}",
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
            methods.join(";")
        )?;
    }
    std::fs::write(args.out.join("load.csv"), &csv)?;

    // Markdown
    let mut md = String::new();
    for up in [Upstream::Echo, Upstream::Temporal] {
        let rs: Vec<&Row> = rows.iter().filter(|r| r.upstream == up).collect();
        if rs.is_empty() {
            continue;
        }
        let conc = rs[0].concurrency;
        writeln!(
            md,
            "\n#### Upstream: {}\n\n| config | payload | seq p50 | seq p99 | added p50 | rpc/s (c={conc}) | vs direct | p50 (c={conc}) | p99 (c={conc}) | p99 vs direct | proxy CPU/RPC |\n| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
            match up {
                Upstream::Echo => "in-process h2 echo (QueryWorkflow, payload out and back)",
                Upstream::Temporal =>
                    "Temporal dev server (Start, Signal, Describe, GetHistory per workflow)",
            }
        )?;
        for r in rs {
            let b = base(r).expect("direct");
            let cpu = cpu_us_per_rpc(r);
            writeln!(
                md,
                "| {} | {} | {} | {} | {} | {:.0} | {:.0} % | {} | {} | {:.2}× | {} |",
                r.cfg.label(),
                fmt_size(r.size),
                us(r.seq.p50()),
                us(r.seq.p99()),
                if r.cfg == Cfg::Direct {
                    "—".into()
                } else {
                    us_signed(r.seq.p50() - b.seq.p50())
                },
                r.conc.rps(),
                100.0 * r.conc.rps() / b.conc.rps(),
                us(r.conc.p50()),
                us(r.conc.p99()),
                r.conc.p99() / b.conc.p99(),
                if r.cfg == Cfg::Direct {
                    "—".into()
                } else {
                    format!("{cpu:.0} µs")
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
        // per-core codec rate (echo: one encode + one decode per RPC)
        if up == Upstream::Echo {
            writeln!(
                md,
                "\nCodec rate per core (echo, c={conc}): payload bytes per gateway CPU-second for one encode (request) + one decode (response), vs the raw zstd (level 3) + AES-256-GCM seal/open + decompress calls on the same payload in this process, single thread:\n\n| payload | raw calls | gw-codec | ratio | gw-off (forwarding only) |\n| --- | --- | --- | --- | --- |"
            )?;
            for &size in &args.sizes {
                let find = |c: Cfg| {
                    rows.iter()
                        .find(|r| r.upstream == up && r.size == size && r.cfg == c)
                };
                let (Some(on), Some(off)) = (find(Cfg::GwCodec), find(Cfg::GwOff)) else {
                    continue;
                };
                let raw_rate = size as f64 / raw[&size];
                let on_rate = size as f64 * on.conc.rpcs as f64 / on.conc.proxy_cpu_secs;
                let off_rate = size as f64 * off.conc.rpcs as f64 / off.conc.proxy_cpu_secs;
                writeln!(
                    md,
                    "| {} | {} | {} | {:.0} % | {} |",
                    fmt_size(size),
                    rate(raw_rate),
                    rate(on_rate),
                    100.0 * on_rate / raw_rate,
                    rate(off_rate)
                )?;
            }
        }
    }
    if !resources.is_empty() {
        writeln!(
            md,
            "\n#### Memory (proxy process; nginx: master + workers; (e) with `cache_bytes = {}`)\n\n| upstream | config | idle RSS (MiB) | RSS after run (MiB) | peak RSS VmHWM (MiB) | in flight at peak |\n| --- | --- | --- | --- | --- | --- |",
            args.offload_cache_bytes
        )?;
        for l in resources {
            writeln!(md, "{l}")?;
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
    std::fs::write(args.out.join("load-added-latency.svg"), svg(args, rows))?;
    let mut so = std::io::stdout().lock();
    so.write_all(md.as_bytes())?;
    writeln!(
        so,
        "\nwrote {}/load.csv, load.md, load-added-latency.svg",
        args.out.display()
    )?;
    Ok(())
}

fn cpu_us_per_rpc(r: &Row) -> f64 {
    1e6 * r.conc.proxy_cpu_secs / r.conc.rpcs.max(1) as f64
}

fn us(v: f64) -> String {
    if v >= 10_000.0 {
        format!("{:.1} ms", v / 1000.0)
    } else {
        format!("{v:.0} µs")
    }
}

fn us_signed(v: f64) -> String {
    if v.abs() >= 10_000.0 {
        format!("{:+.1} ms", v / 1000.0)
    } else {
        format!("{v:+.0} µs")
    }
}

fn rate(bps: f64) -> String {
    if bps >= 1024.0 * 1024.0 * 1024.0 {
        format!("{:.2} GiB/s", bps / (1024.0 * 1024.0 * 1024.0))
    } else {
        format!("{:.0} MiB/s", bps / (1024.0 * 1024.0))
    }
}

/// Added sequential p50 latency vs payload size, one panel per upstream, log-log.
fn svg(args: &Args, rows: &[Row]) -> String {
    let (pw, ph, ml, mt, mb) = (420.0, 300.0, 60.0, 40.0, 50.0);
    let ups: Vec<Upstream> = [Upstream::Echo, Upstream::Temporal]
        .into_iter()
        .filter(|u| rows.iter().any(|r| r.upstream == *u))
        .collect();
    let width = ups.len() as f64 * (pw + ml + 20.0) + 10.0;
    let height = ph + mt + mb + 40.0;
    let mut s = String::new();
    let _ = writeln!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif" font-size="11">"#
    );
    let _ = writeln!(s, r#"<rect width="100%" height="100%" fill="white"/>"#);
    let sizes = &args.sizes;
    for (i, up) in ups.iter().enumerate() {
        let x0 = 10.0 + i as f64 * (pw + ml + 20.0) + ml;
        let y0 = mt;
        let added = |r: &Row| {
            let b = rows
                .iter()
                .find(|b| b.upstream == r.upstream && b.size == r.size && b.cfg == Cfg::Direct)
                .expect("direct");
            (r.seq.p50() - b.seq.p50()).max(1.0)
        };
        let vals: Vec<f64> = rows
            .iter()
            .filter(|r| r.upstream == *up && r.cfg != Cfg::Direct)
            .map(added)
            .collect();
        let lo = 0.0f64; // log10(1 µs)
        let hi = vals.iter().fold(2.0f64, |m, v| m.max(v.log10().ceil()));
        let ypos = |v: f64| y0 + ph - (v.log10() - lo) / (hi - lo) * ph;
        let xpos = |k: usize| x0 + (k as f64 + 0.5) * pw / sizes.len() as f64;
        let _ = writeln!(
            s,
            r#"<text x="{}" y="{}" text-anchor="middle" font-size="13">{}</text>"#,
            x0 + pw / 2.0,
            y0 - 15.0,
            match up {
                Upstream::Echo => "Gateway alone (h2 echo upstream)",
                Upstream::Temporal => "Temporal dev server (RPC mix)",
            }
        );
        let _ = writeln!(
            s,
            r##"<rect x="{x0}" y="{y0}" width="{pw}" height="{ph}" fill="none" stroke="#444"/>"##
        );
        let mut d = lo as i32;
        while d as f64 <= hi {
            let v = 10f64.powi(d);
            let y = ypos(v);
            let label = if v >= 1000.0 {
                format!("{} ms", v / 1000.0)
            } else {
                format!("{v} µs")
            };
            let _ = writeln!(
                s,
                r##"<line x1="{x0}" x2="{}" y1="{y}" y2="{y}" stroke="#ddd"/><text x="{}" y="{}" text-anchor="end">{label}</text>"##,
                x0 + pw,
                x0 - 5.0,
                y + 4.0
            );
            d += 1;
        }
        for (k, &size) in sizes.iter().enumerate() {
            let _ = writeln!(
                s,
                r#"<text x="{}" y="{}" text-anchor="middle">{}</text>"#,
                xpos(k),
                y0 + ph + 16.0,
                fmt_size(size)
            );
        }
        let _ = writeln!(
            s,
            r#"<text x="{}" y="{}" text-anchor="middle">payload size</text>"#,
            x0 + pw / 2.0,
            y0 + ph + 34.0
        );
        let _ = writeln!(
            s,
            r#"<text transform="translate({},{}) rotate(-90)" text-anchor="middle">added p50 latency vs direct (sequential, log)</text>"#,
            x0 - 48.0,
            y0 + ph / 2.0
        );
        for (li, cfg) in [Cfg::Nginx, Cfg::GwOff, Cfg::GwCodec, Cfg::GwOffload]
            .into_iter()
            .enumerate()
        {
            let pts: Vec<(f64, f64)> = sizes
                .iter()
                .enumerate()
                .filter_map(|(k, &size)| {
                    rows.iter()
                        .find(|r| r.upstream == *up && r.cfg == cfg && r.size == size)
                        .map(|r| (xpos(k), ypos(added(r))))
                })
                .collect();
            if pts.is_empty() {
                continue;
            }
            let path: Vec<String> = pts.iter().map(|(x, y)| format!("{x:.1},{y:.1}")).collect();
            let _ = writeln!(
                s,
                r#"<polyline points="{}" fill="none" stroke="{}" stroke-width="2"/>"#,
                path.join(" "),
                cfg.color()
            );
            for (x, y) in &pts {
                let _ = writeln!(
                    s,
                    r#"<circle cx="{x:.1}" cy="{y:.1}" r="3" fill="{}"/>"#,
                    cfg.color()
                );
            }
            let ly = y0 + 12.0 + li as f64 * 14.0;
            let _ = writeln!(
                s,
                r#"<line x1="{}" x2="{}" y1="{ly}" y2="{ly}" stroke="{}" stroke-width="2"/><text x="{}" y="{}">{}</text>"#,
                x0 + 8.0,
                x0 + 24.0,
                cfg.color(),
                x0 + 28.0,
                ly + 4.0,
                cfg.label()
            );
        }
    }
    let _ = writeln!(
        s,
        r#"<text x="10" y="{}" font-size="10">values ≤ 1 µs (or negative) are drawn at 1 µs; data: load.csv</text>"#,
        height - 8.0
    );
    s.push_str("</svg>\n");
    s
}
