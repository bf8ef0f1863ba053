//! Payloads, workloads (echo: one `QueryWorkflow`; Temporal: Start, Signal, Describe,
//! GetHistory on a new workflow), each with uncompressed or gzip-compressed requests, and the
//! timed phases that run them.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use prost::Message;
use temporalio_protos::protos::temporal::api::{
    common::v1::{Payload, Payloads, WorkflowExecution, WorkflowType},
    history::v1::history_event::Attributes,
    query::v1::WorkflowQuery,
    taskqueue::v1::TaskQueue,
    workflowservice::v1::{
        DescribeWorkflowExecutionRequest, GetWorkflowExecutionHistoryRequest,
        GetWorkflowExecutionHistoryResponse, QueryWorkflowRequest, QueryWorkflowResponse,
        SignalWorkflowExecutionRequest, StartWorkflowExecutionRequest,
        StartWorkflowExecutionResponse,
    },
};

use crate::client::{CallError, Client, frame_as};
use crate::consts::NAMESPACE;
use crate::gz::ReqEnc;
use crate::procs::tree_cpu_secs;

/// JSON-like order records (compress ~4-5x with zstd level 3, like the codec bench data).
pub fn json_data(size: usize, seed: u64) -> Vec<u8> {
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

/// The benchmark payload of `size` bytes: `json/plain` metadata, [`json_data`].
pub fn payload(size: usize, seed: u64) -> Payload {
    Payload {
        metadata: [("encoding".to_string(), b"json/plain".to_vec())]
            .into_iter()
            .collect(),
        data: json_data(size, seed),
        ..Default::default()
    }
}

/// What the targets forward to.
#[derive(Clone, Copy, PartialEq, Eq, Debug, clap::ValueEnum)]
pub enum Upstream {
    /// The in-process h2 echo server.
    Echo,
    /// A Temporal dev server.
    Temporal,
}

impl Upstream {
    /// Name in tables and CSV.
    pub fn label(self) -> &'static str {
        match self {
            Upstream::Echo => "echo",
            Upstream::Temporal => "temporal",
        }
    }
}

/// One workload: an upstream's operation with a payload of one size.
pub struct Work {
    kind: Upstream,
    /// Payload size, bytes.
    pub size: usize,
    /// How requests are framed.
    pub enc: ReqEnc,
    /// Echo: the framed QueryWorkflow request, compressed once here for gzip (same bytes
    /// every call, outside the timed loop).
    echo_req: Bytes,
    /// The payload every operation carries.
    pub payload: Payload,
    seq: AtomicU64,
    run_tag: String,
}

impl Work {
    /// The workload of `kind` at `size` with requests in `enc`; `run_tag` keeps workflow ids
    /// unique per run. Temporal requests differ per call (workflow ids), so with gzip each is
    /// compressed when it is sent, as an SDK does (the load generator's CPU, not the proxy's).
    pub fn new(kind: Upstream, size: usize, run_tag: String, enc: ReqEnc) -> Work {
        let payload = payload(size, size as u64 ^ 0x9e37_79b9);
        let echo_req = frame_as(
            &QueryWorkflowRequest {
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
            },
            enc,
        );
        Work {
            kind,
            size,
            enc,
            echo_req,
            payload,
            seq: AtomicU64::new(0),
            run_tag,
        }
    }

    /// One operation: echo = 1 RPC; temporal = Start, Signal, Describe, GetHistory on a new
    /// workflow. Pushes (method, latency µs). `verify` checks payloads came back intact.
    pub async fn op(
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
                let wid = format!(
                    "pgw-load-{}-{}-{}-{n}",
                    self.run_tag,
                    self.size,
                    self.enc.label()
                );
                let enc = self.enc;
                let input = Some(Payloads {
                    payloads: vec![self.payload.clone()],
                });
                // Requests are framed (and compressed) before the clock starts.
                let req = frame_as(
                    &StartWorkflowExecutionRequest {
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
                    },
                    enc,
                );
                let t = Instant::now();
                let r = c.call("StartWorkflowExecution", req).await?;
                lat.push(("StartWorkflowExecution", t.elapsed().as_micros() as u32));
                let run_id = StartWorkflowExecutionResponse::decode(r)
                    .map_err(|e| CallError(e.to_string()))?
                    .run_id;
                let exec = Some(WorkflowExecution {
                    workflow_id: wid.clone(),
                    run_id,
                });
                let req = frame_as(
                    &SignalWorkflowExecutionRequest {
                        namespace: NAMESPACE.into(),
                        workflow_execution: exec.clone(),
                        signal_name: "bump".into(),
                        input,
                        identity: "pgw-load".into(),
                        request_id: format!("{wid}-signal"),
                        ..Default::default()
                    },
                    enc,
                );
                let t = Instant::now();
                c.call("SignalWorkflowExecution", req).await?;
                lat.push(("SignalWorkflowExecution", t.elapsed().as_micros() as u32));
                let req = frame_as(
                    &DescribeWorkflowExecutionRequest {
                        namespace: NAMESPACE.into(),
                        execution: exec.clone(),
                    },
                    enc,
                );
                let t = Instant::now();
                c.call("DescribeWorkflowExecution", req).await?;
                lat.push(("DescribeWorkflowExecution", t.elapsed().as_micros() as u32));
                let req = frame_as(
                    &GetWorkflowExecutionHistoryRequest {
                        namespace: NAMESPACE.into(),
                        execution: exec,
                        ..Default::default()
                    },
                    enc,
                );
                let t = Instant::now();
                let r = c.call("GetWorkflowExecutionHistory", req).await?;
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

/// What one phase measured.
#[derive(Default, Clone)]
pub struct Stats {
    /// Operations completed.
    pub ops: u64,
    /// RPCs completed (latencies recorded).
    pub rpcs: u64,
    /// Failed operations.
    pub errors: u64,
    /// The first failure, in words.
    pub first_error: Option<String>,
    /// Wall time of the phase, seconds.
    pub secs: f64,
    /// Every RPC latency, µs, sorted.
    pub all: Vec<u32>,
    /// RPC latencies per method, µs, sorted.
    pub by_method: BTreeMap<&'static str, Vec<u32>>,
    /// utime + stime of the proxy (its process tree) over the phase, seconds.
    pub proxy_cpu_secs: f64,
}

impl Stats {
    /// The `p` quantile of sorted `v` (NaN when empty).
    pub fn pct(v: &[u32], p: f64) -> f64 {
        if v.is_empty() {
            return f64::NAN;
        }
        let i = ((v.len() as f64 - 1.0) * p).round() as usize;
        v[i] as f64
    }
    /// Median RPC latency, µs.
    pub fn p50(&self) -> f64 {
        Self::pct(&self.all, 0.50)
    }
    /// 99th percentile RPC latency, µs.
    pub fn p99(&self) -> f64 {
        Self::pct(&self.all, 0.99)
    }
    /// RPCs per second.
    pub fn rps(&self) -> f64 {
        self.rpcs as f64 / self.secs
    }
}

/// Runs `work` from `conc` tasks (spread round-robin over `clients`) until `max_ops`
/// operations started or `max_secs` passed; CPU is that of `cpu_pids` over the phase.
pub async fn run_phase(
    work: Arc<Work>,
    clients: &[Client],
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
    for i in 0..conc {
        let work = work.clone();
        let client = clients[i % clients.len()].clone();
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
