//! `payload-gateway storage gc`: mark and sweep of offloaded objects.
//!
//! Neither the SDKs nor the gateway delete what they offload, and a lifecycle rule on a prefix
//! cannot know which objects a running workflow still needs. The collector:
//!
//! 1. **Lists** the objects of each configured driver's write bucket (the bucket new objects
//!    go to; read-only buckets may belong to other deployments and are never swept): under
//!    `v0/ns/<namespace>/` for each namespace collected, or all of `v0/` with
//!    `--all-namespaces`. Listing comes first, so an object written while the collector runs
//!    is not even considered.
//! 2. **Marks** every reference in the history of every execution visibility lists in the
//!    namespaces read (open ones and closed ones still within retention), read as
//!    `keys audit` reads them: page by page, every payload of every event found by the
//!    gateway's own walker. References the SDKs wrote (`temporal.api.sdk.v1.
//!    ExternalStorageReference`, the legacy form, codec-encoded ones decoded with the
//!    gateway's codec) count as much as the gateway's own; a reference marks the object its
//!    claim names (bucket or container, and key, object name or blob name), whatever the
//!    driver name. Namespaces allowed to read the collected ones' objects
//!    (`storage_read_namespaces`) are read too.
//! 3. **Sweeps** what no reference names and is older than the grace period: by default the
//!    retention of the namespace in the object's key (DescribeNamespace) plus one day, so an
//!    upload whose reference is not in history yet (a workflow task in flight, visibility
//!    lagging behind) survives; objects under no known namespace take the longest grace of
//!    those read. `--grace` sets one period for all.
//!
//! **Fail safe**: a history that cannot be read, a namespace whose retention cannot be read, a
//! listing that fails or a marked reference that cannot be decoded stops the collector before
//! anything is deleted (exit non-zero). An execution deleted while the collector reads it
//! (`NOT_FOUND`) protects nothing any more and is skipped.
//!
//! `--dry-run` (the default) only reports counts and bytes; `--delete` deletes.
//!
//! Known limit: keys are content-addressed per execution. A new run that stores the very
//! bytes an old, deleted run of the same workflow id stored (same key, `ri/null` when the run
//! id was not known yet) finds the object present and does not rewrite it, so it keeps its old
//! modification time; if the collector lists it, reads no reference to it (the new run's
//! reference not in visibility or history yet) and it is past the grace, it is deleted.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use futures::StreamExt;
use payload_gateway_drivers::{ListedObject, StorageDriver, layout};
use payload_gateway_proto::{MessageType, scan};
use serde::Serialize;

use super::messages::WorkflowExecution;
use super::{AuditError, Auditor, HISTORY_CONCURRENCY};
use crate::codec::PayloadCodec;
use crate::config::Config;
use crate::storage::Storage;
use crate::storage::reference::{self, Kind};
use crate::upstream::Router;

/// Added to a namespace's retention to make the default grace period.
pub const DEFAULT_GRACE_MARGIN: Duration = Duration::from_secs(24 * 3600);

/// Why the collector stopped (nothing was deleted unless the error says so).
#[derive(Debug, thiserror::Error)]
pub enum GcError {
    /// Reading the upstream failed: visibility, a history, or a namespace's retention.
    #[error("{0}; nothing was deleted")]
    Read(#[from] AuditError),
    /// No storage driver is configured.
    #[error("no storage driver is configured ([storage] enabled with drivers); nothing to collect")]
    NoStorage,
    /// A store could not be listed.
    #[error("listing {driver}: {reason}; nothing was deleted")]
    List {
        /// The driver.
        driver: String,
        /// Why.
        reason: String,
    },
    /// A reference in history could not be read, so what it protects is unknown.
    #[error("namespace {namespace:?}, workflow {workflow_id:?}: {reason}; nothing was deleted")]
    Reference {
        /// Its namespace.
        namespace: String,
        /// The execution's workflow id.
        workflow_id: String,
        /// Why.
        reason: String,
    },
    /// Deleting failed part way (objects reported deleted before it are gone).
    #[error("deleting from {driver}: {reason} (after {deleted} objects were deleted)")]
    Delete {
        /// The driver.
        driver: String,
        /// Objects deleted before the failure.
        deleted: u64,
        /// Why.
        reason: String,
    },
}

/// What to collect.
#[derive(Debug, Clone, Default)]
pub struct GcOptions {
    /// The namespaces whose objects are collected; empty with `all_namespaces`.
    pub namespaces: Vec<String>,
    /// Every namespace the upstream lists, and every object under `v0/`.
    pub all_namespaces: bool,
    /// Delete (else only report).
    pub delete: bool,
    /// One grace period for every object (default: retention plus [`DEFAULT_GRACE_MARGIN`]).
    pub grace: Option<Duration>,
}

/// Objects and their bytes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Tally {
    /// Objects.
    pub objects: u64,
    /// Their stored size.
    pub bytes: u64,
}

impl Tally {
    fn add(&mut self, o: &ListedObject) {
        self.objects += 1;
        self.bytes += o.size;
    }
}

/// What the collector found in one driver's write bucket.
#[derive(Debug, Clone, Default, Serialize)]
pub struct DriverReport {
    /// The bucket or container listed (`None`: a bucketless backend).
    pub bucket: Option<String>,
    /// Every object listed.
    pub listed: Tally,
    /// Kept: named by a reference in history.
    pub referenced: Tally,
    /// Kept: not referenced, but younger than its grace period.
    pub young: Tally,
    /// Not referenced and past its grace period: deleted with `--delete`, else would be.
    pub unreferenced: Tally,
    /// Objects actually deleted.
    pub deleted: Tally,
}

/// What one namespace's histories held.
#[derive(Debug, Clone, Default, Serialize)]
pub struct NamespaceReport {
    /// Executions read (open, and closed within retention).
    pub executions: u64,
    /// References found in their histories.
    pub references: u64,
    /// The namespace's retention, in seconds.
    pub retention_s: u64,
    /// The grace period its objects got, in seconds.
    pub grace_s: u64,
}

/// The whole run.
#[derive(Debug, Clone, Default, Serialize)]
pub struct GcReport {
    /// Whether objects were deleted (else a dry run).
    pub deleted: bool,
    /// Per namespace read.
    pub namespaces: BTreeMap<String, NamespaceReport>,
    /// Per driver name.
    pub drivers: BTreeMap<String, DriverReport>,
}

impl GcReport {
    /// A plain-text report for people.
    pub fn render(&self) -> String {
        let mut out = String::new();
        out.push_str(if self.deleted {
            "storage gc (--delete)\n"
        } else {
            "storage gc (dry run: nothing deleted; --delete deletes)\n"
        });
        for (ns, n) in &self.namespaces {
            out.push_str(&format!(
                "namespace {ns:?}: {} executions read, {} references; retention {}s, grace {}s\n",
                n.executions, n.references, n.retention_s, n.grace_s
            ));
        }
        let t = |t: &Tally| format!("{} objects, {} bytes", t.objects, t.bytes);
        for (name, d) in &self.drivers {
            out.push_str(&format!(
                "driver {name:?} ({}):\n  listed       {}\n  referenced   {} (kept)\n  young        {} (kept: within grace)\n  {} {}\n",
                d.bucket.as_deref().unwrap_or("no bucket"),
                t(&d.listed),
                t(&d.referenced),
                t(&d.young),
                if self.deleted { "deleted     " } else { "would delete" },
                t(if self.deleted { &d.deleted } else { &d.unreferenced }),
            ));
        }
        out
    }
}

/// An object a reference names: its bucket (when the claim names one) and key.
type Mark = (Option<String>, String);

/// Runs the collector.
pub async fn run(config: &Config, options: &GcOptions) -> Result<GcReport, GcError> {
    let storage = Storage::from_config(config)
        .await
        .map_err(AuditError::from)?
        .ok_or(GcError::NoStorage)?;
    if storage.drivers().is_empty() {
        return Err(GcError::NoStorage);
    }
    let auditor = Auditor {
        router: Router::from_config(config).map_err(AuditError::from)?,
        storage: None,
        event_type: MessageType::by_name("temporal.api.history.v1.HistoryEvent")
            .ok_or_else(|| AuditError::Malformed("HistoryEvent missing from the schema".into()))?,
    };
    let collected: Vec<String> = if options.all_namespaces {
        auditor.list_namespaces().await?
    } else {
        options.namespaces.clone()
    };
    // Namespaces allowed to read a collected namespace's objects reference them too.
    let mut read: BTreeSet<String> = collected.iter().cloned().collect();
    for (name, policy) in crate::policy::resolve(config).configured() {
        if policy
            .storage_read_namespaces
            .iter()
            .any(|ns| collected.contains(ns))
        {
            read.insert(name.clone());
        }
    }
    let mut report = GcReport {
        deleted: options.delete,
        ..Default::default()
    };
    let mut graces: BTreeMap<String, Duration> = BTreeMap::new();
    for ns in &read {
        let retention = auditor.retention(ns).await?;
        let grace = options.grace.unwrap_or(retention + DEFAULT_GRACE_MARGIN);
        graces.insert(ns.clone(), grace);
        report.namespaces.insert(
            ns.clone(),
            NamespaceReport {
                retention_s: retention.as_secs(),
                grace_s: grace.as_secs(),
                ..Default::default()
            },
        );
    }
    let longest = options
        .grace
        .or_else(|| graces.values().max().copied())
        .unwrap_or(DEFAULT_GRACE_MARGIN);

    // 1. List (before marking: what is written meanwhile is not considered).
    let mut drivers: Vec<(&String, &Arc<dyn StorageDriver>)> = storage.drivers().iter().collect();
    drivers.sort_by(|a, b| a.0.cmp(b.0));
    let mut listings = Vec::new();
    for (name, driver) in drivers {
        let bucket = driver.settings().write_bucket().map(str::to_owned);
        let encoding = driver.settings().scheme.encoding;
        let prefixes: Vec<String> = if options.all_namespaces {
            vec!["v0/".to_owned()]
        } else {
            collected
                .iter()
                .filter_map(|ns| encoding.encode(Some(ns)).map(|e| format!("v0/ns/{e}/")))
                .collect()
        };
        let mut objects = Vec::new();
        for prefix in &prefixes {
            objects.extend(driver.list(bucket.as_deref(), prefix).await.map_err(|e| {
                GcError::List {
                    driver: name.clone(),
                    reason: e.to_string(),
                }
            })?);
        }
        listings.push((name.clone(), driver.clone(), bucket, encoding, objects));
    }

    // 2. Mark.
    let mut codec: Option<PayloadCodec> = None;
    let mut marks: HashSet<Mark> = HashSet::new();
    for ns in &read {
        let executions = auditor.list_executions(ns).await?;
        let entry = report.namespaces.entry(ns.clone()).or_default();
        entry.executions = executions.len() as u64;
        let mut histories = futures::stream::iter(executions)
            .map(|execution| auditor.history_payloads(ns, execution))
            .buffer_unordered(HISTORY_CONCURRENCY);
        while let Some(found) = histories.next().await {
            let (execution, payloads) = found?;
            for payload in payloads {
                let Some(r) = reference_in(config, &mut codec, ns, &execution, payload).await?
                else {
                    continue;
                };
                entry.references += 1;
                marks.insert(mark_of(&r.claim));
            }
        }
    }

    // 3. Sweep.
    let now = SystemTime::now();
    for (name, driver, bucket, encoding, objects) in listings {
        let by_prefix: Vec<(String, Duration)> = graces
            .iter()
            .filter_map(|(ns, g)| {
                encoding
                    .encode(Some(ns))
                    .map(|e| (format!("v0/ns/{e}/"), *g))
            })
            .collect();
        let mut d = DriverReport {
            bucket: bucket.clone(),
            ..Default::default()
        };
        let mut garbage = Vec::new();
        for object in &objects {
            d.listed.add(object);
            let named = marks.contains(&(object.bucket.clone(), object.key.clone()))
                || marks.contains(&(None, object.key.clone()));
            if named {
                d.referenced.add(object);
                continue;
            }
            let grace = by_prefix
                .iter()
                .find(|(p, _)| object.key.starts_with(p.as_str()))
                .map_or(longest, |(_, g)| *g);
            let age = now
                .duration_since(object.last_modified)
                .unwrap_or(Duration::ZERO);
            if age < grace {
                d.young.add(object);
            } else {
                d.unreferenced.add(object);
                garbage.push(object.clone());
            }
        }
        if options.delete {
            let concurrency = driver.settings().concurrency.max(1);
            let mut deletions = futures::stream::iter(garbage.iter())
                .map(|o| {
                    let driver = driver.clone();
                    async move { driver.delete(o.bucket.as_deref(), &o.key).await.map(|()| o) }
                })
                .buffer_unordered(concurrency);
            while let Some(done) = deletions.next().await {
                match done {
                    Ok(o) => {
                        tracing::info!(driver = %name, key = %o.key, bytes = o.size, "storage gc: deleted");
                        d.deleted.add(o);
                    }
                    Err(e) => {
                        return Err(GcError::Delete {
                            driver: name,
                            deleted: d.deleted.objects,
                            reason: e.to_string(),
                        });
                    }
                }
            }
        } else {
            for o in &garbage {
                tracing::debug!(driver = %name, key = %o.key, bytes = o.size, "storage gc: would delete");
            }
        }
        report.drivers.insert(name, d);
    }
    Ok(report)
}

/// The object a claim names, whichever driver layout it has.
fn mark_of(claim: &payload_gateway_drivers::ClaimData) -> Mark {
    let bucket = [layout::CLAIM_BUCKET, layout::CLAIM_CONTAINER]
        .iter()
        .find_map(|f| claim.get(*f).cloned());
    let key = [
        layout::CLAIM_KEY,
        layout::CLAIM_OBJECT_NAME,
        layout::CLAIM_BLOB_NAME,
    ]
    .iter()
    .find_map(|f| claim.get(*f).cloned())
    .unwrap_or_default();
    (bucket, key)
}

/// The reference `payload` is, if it is one: a marked (codec-encoded) reference is decoded
/// with the gateway's codec first; one that does not decode stops the collector.
async fn reference_in(
    config: &Config,
    codec: &mut Option<PayloadCodec>,
    ns: &str,
    execution: &WorkflowExecution,
    payload: Bytes,
) -> Result<Option<reference::Reference>, GcError> {
    let failed = |reason: String| GcError::Reference {
        namespace: ns.to_owned(),
        workflow_id: execution.workflow_id.clone(),
        reason,
    };
    let encoded = match reference::classify(&payload) {
        Ok(Kind::Reference(r)) => return Ok(Some(r)),
        Ok(Kind::Plain) => return Ok(None),
        Ok(Kind::Marked(encoded)) => encoded,
        Err(reason) => return Err(failed(format!("unreadable storage reference: {reason}"))),
    };
    if codec.is_none() {
        *codec = Some(PayloadCodec::from_config(config).map_err(|e| {
            failed(format!(
                "a codec-encoded storage reference needs the gateway's codec: {e}"
            ))
        })?);
    }
    let codec = codec.as_ref().expect("set above");
    let batch = [encoded.clone()];
    codec
        .prepare_decode(Some(ns), &batch, true, 1)
        .await
        .map_err(|e| {
            failed(format!(
                "cannot decode a marked storage reference: {}",
                e.error
            ))
        })?;
    let decoded = codec
        .decode_for(Some(ns), &encoded)
        .map_err(|e| failed(format!("cannot decode a marked storage reference: {e}")))?
        .unwrap_or(encoded);
    match reference::classify(&decoded) {
        Ok(Kind::Reference(r)) => Ok(Some(r)),
        _ => Err(failed(
            "a payload marked as a storage reference does not decode to one".to_owned(),
        )),
    }
}

impl Auditor {
    /// The namespace's workflow execution retention (DescribeNamespace).
    async fn retention(&self, ns: &str) -> Result<Duration, AuditError> {
        let described: DescribeNamespaceResponse = self
            .call(
                "DescribeNamespace",
                Some(ns),
                &DescribeNamespaceRequest {
                    namespace: ns.to_owned(),
                },
            )
            .await?;
        let ttl = described
            .config
            .and_then(|c| c.workflow_execution_retention_ttl)
            .ok_or_else(|| {
                AuditError::Malformed(format!(
                    "namespace {ns:?}: DescribeNamespace names no retention"
                ))
            })?;
        Ok(Duration::new(
            u64::try_from(ttl.seconds).unwrap_or(0),
            u32::try_from(ttl.nanos).unwrap_or(0),
        ))
    }

    /// Every payload of one execution's history (empty when it was deleted meanwhile).
    async fn history_payloads(
        &self,
        ns: &str,
        execution: WorkflowExecution,
    ) -> Result<(WorkflowExecution, Vec<Bytes>), AuditError> {
        let events = self.history_events(ns, &execution).await?;
        let mut payloads = Vec::new();
        for event in events {
            let walked = scan(self.event_type, &event).map_err(|e| {
                AuditError::Malformed(format!(
                    "history of {}/{}: {e}",
                    execution.workflow_id, execution.run_id
                ))
            })?;
            payloads.extend(walked.sites().iter().map(|site| event.slice(site.range())));
        }
        Ok((execution, payloads))
    }
}

/// `temporal.api.workflowservice.v1.DescribeNamespaceRequest`.
#[derive(Clone, PartialEq, prost::Message)]
struct DescribeNamespaceRequest {
    #[prost(string, tag = "1")]
    namespace: String,
}

/// The part of `DescribeNamespaceResponse` the collector reads.
#[derive(Clone, PartialEq, prost::Message)]
struct DescribeNamespaceResponse {
    #[prost(message, optional, tag = "2")]
    config: Option<NamespaceConfig>,
}

/// `temporal.api.namespace.v1.NamespaceConfig` (its retention).
#[derive(Clone, PartialEq, prost::Message)]
struct NamespaceConfig {
    #[prost(message, optional, tag = "1")]
    workflow_execution_retention_ttl: Option<ProtoDuration>,
}

/// `google.protobuf.Duration`.
#[derive(Clone, Copy, PartialEq, prost::Message)]
struct ProtoDuration {
    #[prost(int64, tag = "1")]
    seconds: i64,
    #[prost(int32, tag = "2")]
    nanos: i32,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_claim_marks_its_bucket_and_key_whatever_the_layout() {
        let claim = |pairs: &[(&str, &str)]| {
            pairs
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect::<payload_gateway_drivers::ClaimData>()
        };
        assert_eq!(
            mark_of(&claim(&[
                ("bucket", "b"),
                ("key", "v0/x"),
                ("hash_value", "h")
            ])),
            (Some("b".to_owned()), "v0/x".to_owned())
        );
        assert_eq!(
            mark_of(&claim(&[("bucket", "g"), ("object_name", "v0/y")])),
            (Some("g".to_owned()), "v0/y".to_owned())
        );
        assert_eq!(
            mark_of(&claim(&[("container", "c"), ("blob_name", "v0/z")])),
            (Some("c".to_owned()), "v0/z".to_owned())
        );
        assert_eq!(
            mark_of(&claim(&[("key", "v0/f")])),
            (None, "v0/f".to_owned())
        );
    }
}
