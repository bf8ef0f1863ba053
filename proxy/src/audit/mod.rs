//! `payload-gateway keys audit`: what each key id still protects at the upstream.
//!
//! Before a key is retired an operator must know that nothing the server still holds needs
//! it. The audit connects to the upstream the way the gateway does (`[proxy]` address, TLS,
//! API key), lists every execution visibility knows in each namespace (open and closed,
//! within retention), reads each history page by page, walks every payload in every event
//! with the same walker the gateway uses, and attributes each payload to the key id in its
//! `encryption-key-id` metadata. A storage reference is followed to its object through the
//! configured drivers (namespace-scoped, like the gateway's own resolution), and the stored
//! payload is attributed instead, so an offloaded payload counts under the key that
//! encrypted the object.
//!
//! The audit needs no key material: key ids are metadata. It reads, never writes.

pub mod gc;
mod messages;

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use futures::StreamExt;
use payload_gateway_proto::{MessageType, scan};
use prost::Message;
use serde::Serialize;

use crate::budget::MessageBudget;
use crate::codec::wire::{ENCODING_ENCRYPTED, ENCODING_KEY, KEY_ID_KEY};
use crate::config::Config;
use crate::payload::Payload;
use crate::storage::Storage;
use crate::storage::reference::{self, Kind};
use crate::upstream::Router;
use crate::upstream::client::{CallError, unary};
use messages::*;

/// Row name of payloads that carry no encryption.
pub const UNENCRYPTED: &str = "(not encrypted)";
/// Row name of references whose object could not be read.
pub const UNRESOLVED: &str = "(reference not resolved)";

const WORKFLOW_SERVICE: &str = "/temporal.api.workflowservice.v1.WorkflowService";
/// Largest response the audit accepts from the upstream.
const RESPONSE_LIMIT: usize = 128 * 1024 * 1024;
/// Histories read at the same time.
const HISTORY_CONCURRENCY: usize = 8;

/// Why the audit could not complete.
#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    /// The configuration cannot be used to reach the upstream or the stores.
    #[error("configuration: {0}")]
    Config(#[from] crate::config::ConfigError),
    /// A call to the upstream failed.
    #[error("upstream: {0}")]
    Call(#[from] CallError),
    /// The upstream sent something the audit cannot read.
    #[error("{0}")]
    Malformed(String),
}

/// gRPC `NOT_FOUND`.
const NOT_FOUND: u16 = 5;

/// What one key id protects in one namespace.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct KeyUsage {
    /// Payloads in history (a payload offloaded to storage counts once, under the key of
    /// its object).
    pub payloads: u64,
    /// Executions with at least one such payload.
    pub executions: u64,
    /// Distinct stored objects encrypted with this key.
    pub objects: u64,
    /// Time of the newest history event holding such a payload (RFC 3339).
    pub newest_event: Option<String>,
    #[serde(skip)]
    newest: Option<Timestamp>,
}

/// The audit of one namespace.
#[derive(Debug, Clone, Default, Serialize)]
pub struct NamespaceAudit {
    /// Executions read.
    pub executions: u64,
    /// Usage by key id ([`UNENCRYPTED`] and [`UNRESOLVED`] are rows too).
    pub keys: BTreeMap<String, KeyUsage>,
}

/// The whole report, by namespace.
#[derive(Debug, Clone, Default, Serialize)]
pub struct AuditReport {
    /// Per namespace.
    pub namespaces: BTreeMap<String, NamespaceAudit>,
}

impl AuditReport {
    /// Totals per key id over every namespace.
    pub fn totals(&self) -> BTreeMap<String, KeyUsage> {
        let mut totals: BTreeMap<String, KeyUsage> = BTreeMap::new();
        for ns in self.namespaces.values() {
            for (key, usage) in &ns.keys {
                let total = totals.entry(key.clone()).or_default();
                total.payloads += usage.payloads;
                total.executions += usage.executions;
                total.objects += usage.objects;
                total.note_event(usage.newest);
            }
        }
        totals
    }

    /// A plain-text table for people.
    pub fn render(&self) -> String {
        let mut out = String::new();
        for (ns, audit) in &self.namespaces {
            out.push_str(&format!(
                "namespace {ns:?}: {} executions read\n",
                audit.executions
            ));
            render_rows(&mut out, &audit.keys);
        }
        out.push_str("all namespaces:\n");
        render_rows(&mut out, &self.totals());
        out
    }
}

fn render_rows(out: &mut String, keys: &BTreeMap<String, KeyUsage>) {
    if keys.is_empty() {
        out.push_str("  (no payloads)\n");
    }
    for (key, u) in keys {
        out.push_str(&format!(
            "  {key:<32} payloads {:>8}  executions {:>6}  objects {:>6}  newest {}\n",
            u.payloads,
            u.executions,
            u.objects,
            u.newest_event.as_deref().unwrap_or("-")
        ));
    }
}

impl KeyUsage {
    fn note_event(&mut self, time: Option<Timestamp>) {
        if time > self.newest {
            self.newest = time;
            self.newest_event = time.map(format_time);
        }
    }
}

fn format_time(t: Timestamp) -> String {
    let since_epoch = Duration::new(t.seconds.max(0) as u64, t.nanos.max(0) as u32);
    humantime::format_rfc3339_seconds(SystemTime::UNIX_EPOCH + since_epoch).to_string()
}

/// Runs the audit over `namespaces` (every namespace the upstream lists when empty).
pub async fn run(config: &Config, namespaces: &[String]) -> Result<AuditReport, AuditError> {
    let router = Router::from_config(config)?;
    let storage = Storage::from_config(config).await?;
    let auditor = Auditor {
        router,
        storage,
        event_type: MessageType::by_name("temporal.api.history.v1.HistoryEvent")
            .ok_or_else(|| AuditError::Malformed("HistoryEvent missing from the schema".into()))?,
    };
    let namespaces = if namespaces.is_empty() {
        auditor.list_namespaces().await?
    } else {
        namespaces.to_vec()
    };
    let mut report = AuditReport::default();
    for ns in namespaces {
        let audit = auditor.audit_namespace(&ns).await?;
        report.namespaces.insert(ns, audit);
    }
    Ok(report)
}

struct Auditor {
    /// Each namespace is read at the upstream that serves it; `ListNamespaces` at the default
    /// (and the namespaces bound elsewhere are added to its list).
    router: Router,
    storage: Option<Storage>,
    event_type: MessageType,
}

/// What protects one payload found in history.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
enum Protection {
    /// Encrypted with this key id, inline.
    Inline(String),
    /// Offloaded; the stored object is encrypted with this key id (or [`UNENCRYPTED`]).
    Stored { key: String, object: String },
    /// A reference the configured drivers could not read.
    Unresolved,
}

impl Auditor {
    async fn call<Req: Message, Resp: Message + Default>(
        &self,
        method: &str,
        namespace: Option<&str>,
        request: &Req,
    ) -> Result<Resp, AuditError> {
        let path = format!("{WORKFLOW_SERVICE}/{method}");
        let upstream = namespace.map_or(self.router.default_upstream(), |ns| {
            self.router.for_namespace(ns)
        });
        let bytes = unary(
            upstream,
            &path,
            namespace,
            request.encode_to_vec(),
            RESPONSE_LIMIT,
        )
        .await?;
        Resp::decode(bytes).map_err(|e| AuditError::Malformed(format!("{method} response: {e}")))
    }

    async fn list_namespaces(&self) -> Result<Vec<String>, AuditError> {
        let mut names = Vec::new();
        let mut token = Vec::new();
        loop {
            let page: ListNamespacesResponse = self
                .call(
                    "ListNamespaces",
                    None,
                    &ListNamespacesRequest {
                        page_size: 100,
                        next_page_token: token,
                    },
                )
                .await?;
            names.extend(
                page.namespaces
                    .into_iter()
                    .filter_map(|n| n.namespace_info.map(|i| i.name))
                    .filter(|n| n != "temporal-system"),
            );
            if page.next_page_token.is_empty() {
                for bound in self.router.bound_namespaces() {
                    if !names.contains(&bound) {
                        names.push(bound);
                    }
                }
                return Ok(names);
            }
            token = page.next_page_token;
        }
    }

    async fn list_executions(&self, ns: &str) -> Result<Vec<WorkflowExecution>, AuditError> {
        let mut executions = BTreeSet::new();
        let mut token = Vec::new();
        loop {
            let page: ListWorkflowExecutionsResponse = self
                .call(
                    "ListWorkflowExecutions",
                    Some(ns),
                    &ListWorkflowExecutionsRequest {
                        namespace: ns.to_owned(),
                        page_size: 1000,
                        next_page_token: token,
                        query: String::new(),
                    },
                )
                .await?;
            executions.extend(page.executions.into_iter().filter_map(|e| e.execution));
            if page.next_page_token.is_empty() {
                return Ok(executions.into_iter().collect());
            }
            token = page.next_page_token;
        }
    }

    async fn audit_namespace(&self, ns: &str) -> Result<NamespaceAudit, AuditError> {
        let executions = self.list_executions(ns).await?;
        let mut audit = NamespaceAudit {
            executions: executions.len() as u64,
            ..Default::default()
        };
        let mut objects: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
        let mut results = futures::stream::iter(executions)
            .map(|execution| self.audit_execution(ns, execution))
            .buffer_unordered(HISTORY_CONCURRENCY);
        while let Some(found) = results.next().await {
            let found = found?;
            let mut keys_here = BTreeSet::new();
            for (protection, time) in found {
                let key = match protection {
                    Protection::Inline(key) => key,
                    Protection::Stored { key, object } => {
                        objects.entry(key.clone()).or_default().insert(object);
                        key
                    }
                    Protection::Unresolved => UNRESOLVED.to_owned(),
                };
                let usage = audit.keys.entry(key.clone()).or_default();
                usage.payloads += 1;
                usage.note_event(time);
                keys_here.insert(key);
            }
            for key in keys_here {
                audit.keys.entry(key).or_default().executions += 1;
            }
        }
        for (key, set) in objects {
            audit.keys.entry(key).or_default().objects = set.len() as u64;
        }
        Ok(audit)
    }

    /// Every payload of one execution's history, with the time of its event.
    async fn audit_execution(
        &self,
        ns: &str,
        execution: WorkflowExecution,
    ) -> Result<Vec<(Protection, Option<Timestamp>)>, AuditError> {
        let mut found = Vec::new();
        for event in self.history_events(ns, &execution).await? {
            let time = HistoryEventHead::decode(event.clone())
                .ok()
                .and_then(|h| h.event_time);
            let walked = scan(self.event_type, &event).map_err(|e| {
                AuditError::Malformed(format!(
                    "history of {}/{}: {e}",
                    execution.workflow_id, execution.run_id
                ))
            })?;
            for site in walked.sites() {
                let payload = event.slice(site.range());
                found.push((self.protection(ns, payload).await, time));
            }
        }
        Ok(found)
    }

    /// Every event of one execution's history, page by page, left serialized; none when the
    /// execution was deleted meanwhile (`NOT_FOUND`).
    async fn history_events(
        &self,
        ns: &str,
        execution: &WorkflowExecution,
    ) -> Result<Vec<Bytes>, AuditError> {
        let mut events = Vec::new();
        let mut token = Vec::new();
        loop {
            let page: GetWorkflowExecutionHistoryResponse = match self
                .call(
                    "GetWorkflowExecutionHistory",
                    Some(ns),
                    &GetWorkflowExecutionHistoryRequest {
                        namespace: ns.to_owned(),
                        execution: Some(execution.clone()),
                        maximum_page_size: 1000,
                        next_page_token: token,
                        skip_archival: true,
                    },
                )
                .await
            {
                Ok(page) => page,
                // Listed but gone by the time its history is read (retention or a delete ran
                // meanwhile; visibility lags behind): it protects nothing any more.
                Err(AuditError::Call(CallError::Status {
                    code: NOT_FOUND, ..
                })) => {
                    tracing::debug!(workflow_id = %execution.workflow_id, run_id = %execution.run_id, "execution deleted while reading its history: skipped");
                    return Ok(Vec::new());
                }
                Err(e) => return Err(e),
            };
            events.extend(page.history.map(|h| h.events).unwrap_or_default());
            if page.next_page_token.is_empty() {
                return Ok(events);
            }
            token = page.next_page_token;
        }
    }

    async fn protection(&self, ns: &str, payload: Bytes) -> Protection {
        match reference::classify(&payload) {
            Ok(Kind::Reference(r)) => {
                let object = format!("{}:{}", r.driver_name, claim_label(&r));
                let Some(storage) = &self.storage else {
                    return Protection::Unresolved;
                };
                // The object is read to learn its key id; memory is bounded by the
                // declared size check inside `resolve` and by one object at a time.
                let budget = MessageBudget::unlimited();
                match storage.resolve(Some(ns), vec![(0, r)], &budget).await {
                    Ok(mut resolved) => match resolved.pop().and_then(|(_, b)| b) {
                        Some(stored) => Protection::Stored {
                            key: key_of(&stored),
                            object,
                        },
                        None => Protection::Unresolved,
                    },
                    Err(e) => {
                        tracing::warn!(namespace = ns, object, error = %e.reason, "audit: stored object not readable");
                        Protection::Unresolved
                    }
                }
            }
            // A marked (codec-encoded) reference is itself encrypted: attribute it inline.
            _ => Protection::Inline(key_of(&payload)),
        }
    }
}

/// The key id of a serialized payload: its `encryption-key-id` when it is encrypted.
fn key_of(payload: &[u8]) -> String {
    let Ok(p) = Payload::from_bytes(payload) else {
        return UNENCRYPTED.to_owned();
    };
    if p.metadata.get(ENCODING_KEY).map(Vec::as_slice) != Some(ENCODING_ENCRYPTED) {
        return UNENCRYPTED.to_owned();
    }
    p.meta_str(KEY_ID_KEY)
        .unwrap_or("(encrypted, no key id)")
        .to_owned()
}

/// A stable label of a reference's claim (claim data is an ordered map) to count objects once.
fn claim_label(r: &reference::Reference) -> String {
    r.claim
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(",")
}
