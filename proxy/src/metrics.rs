//! Prometheus metrics, served by the admin listener at `/metrics` (OpenMetrics text).
//!
//! One process-wide registry: every layer records into [`metrics()`]. Labels never carry
//! payload contents; namespaces and key ids are the only user-chosen label values, and both
//! are bounded: methods the descriptors do not know share the label `unknown`, namespaces
//! past the first [`MAX_NAMESPACE_LABELS`] share `other`.

use std::sync::{Arc, LazyLock, RwLock};
use std::time::Duration;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

/// Labels of an RPC outcome.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RpcLabels {
    /// The gRPC method, `Service/Method` without the package.
    pub method: String,
    /// The gRPC status name, e.g. `OK`, `UNAVAILABLE`.
    pub code: &'static str,
}

/// Labels naming a gRPC method.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct MethodLabels {
    /// The gRPC method, `Service/Method` without the package.
    pub method: String,
}

/// Labels of a payload operation.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PayloadLabels {
    /// The request's namespace (`unknown` when none).
    pub namespace: String,
    /// `encoded`, `decoded`, `offloaded` or `resolved`.
    pub operation: &'static str,
}

/// Labels of payload bytes crossing the gateway.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct BytesLabels {
    /// `encode` (SDK → server) or `decode` (server → SDK).
    pub direction: &'static str,
    /// `in` (before the stages) or `out` (after).
    pub side: &'static str,
}

/// Labels of a storage driver operation.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StorageLabels {
    /// The driver name.
    pub driver: String,
    /// `store` or `retrieve`.
    pub operation: &'static str,
}

/// Labels of a cache lookup.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CacheLabels {
    /// `hit` or `miss`.
    pub result: &'static str,
}

/// Labels of a call to a key service (KMS, HSM, gRPC `KMSService`).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KmsCallLabels {
    /// `awskms`, `pkcs11` or `grpc` ([`crate::kms::Provider::label`]).
    pub provider: &'static str,
    /// `wrap` or `unwrap`.
    pub operation: &'static str,
    /// `ok`, `unavailable`, `refused`, `invalid` or `config`.
    pub result: &'static str,
}

/// Labels of key-service call latency.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KmsLatencyLabels {
    /// `awskms`, `pkcs11` or `grpc`.
    pub provider: &'static str,
    /// `wrap` or `unwrap`.
    pub operation: &'static str,
}

/// Labels of a policy decision on something the gateway cannot see inside.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PolicyLabels {
    /// `refused_unknown_method`, `forwarded_unknown_method`, `refused_unknown_any`,
    /// `forwarded_unknown_any`.
    pub action: &'static str,
}

/// Labels of a codec endpoint answer.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CodecLabels {
    /// `encode`, `decode`, `download`, `preflight` (`OPTIONS`) or `other` (unknown paths,
    /// refused hosts): a fixed set, whatever paths clients invent.
    pub route: &'static str,
    /// The HTTP status code, e.g. `200`, `401`, `422` (only the codes the endpoint answers).
    pub status: u16,
}

/// Labels naming a codec endpoint route.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CodecRouteLabels {
    /// As [`CodecLabels::route`].
    pub route: &'static str,
}

/// Labels of an inbound authorization decision (`[proxy.auth]`).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct AuthLabels {
    /// `allowed`, `unauthenticated` or `permission_denied`.
    pub result: &'static str,
    /// The credential that decided: `token`, `jwt`, `client_cert`, or `none`.
    pub credential: &'static str,
}

/// Labels naming a listener.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ListenerLabels {
    /// The listener's config key: `proxy.listen`, `codec_server.listen` or `admin.listen`.
    pub listener: &'static str,
}

/// Labels of a client connection shut down for its age (`proxy.max_connection_age_ms`).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct AgedLabels {
    /// `drained` (its RPCs finished within the grace) or `grace_expired` (closed at the end
    /// of `proxy.max_connection_age_grace_ms` with RPCs still running).
    pub ending: &'static str,
}

/// At most this many distinct namespaces get a label value of their own; the rest share
/// `other`, so a client inventing namespaces cannot grow the registry without bound.
pub const MAX_NAMESPACE_LABELS: usize = 256;

/// The label value of a method: `Service/Method` for methods the descriptors know (a fixed
/// set), `unknown` for every other path, so invented paths cannot grow the registry.
pub fn method_label(path: &str) -> String {
    if payload_gateway_proto::method(path).is_some() || is_well_known_service(path) {
        short_method(path)
    } else {
        "unknown".to_owned()
    }
}

/// gRPC's own services that clients call through the gateway (health checks, reflection).
const WELL_KNOWN_SERVICES: [&str; 4] = [
    "/grpc.health.v1.Health/Check",
    "/grpc.health.v1.Health/Watch",
    "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
    "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
];

fn is_well_known_service(path: &str) -> bool {
    WELL_KNOWN_SERVICES.contains(&path)
}

/// The RPC metrics of one method label, resolved once per method: recording an RPC then
/// hashes no label set and allocates nothing (it did both, twice, per RPC).
#[derive(Debug)]
pub struct MethodMetrics {
    label: String,
    duration: Histogram,
    /// `pgw_rpcs_total` per status code (index: the code, 17 = none), made on first use.
    codes: [std::sync::OnceLock<Counter>; 18],
}

impl MethodMetrics {
    /// The method's label value (see [`method_label`]).
    pub fn label(&self) -> &str {
        &self.label
    }

    /// Counts one RPC that ended with `code` (`None`: no status) after `elapsed`.
    pub fn record(&self, code: Option<u32>, elapsed: Duration) {
        // Codes past 16 are named UNKNOWN (2) by `code_name`; they share its counter.
        let index = match code {
            None => 17,
            Some(c) if c <= 16 => c as usize,
            Some(_) => 2,
        };
        self.codes[index]
            .get_or_init(|| {
                metrics()
                    .rpcs
                    .get_or_create(&RpcLabels {
                        method: self.label.clone(),
                        code: code_name(code),
                    })
                    .clone()
            })
            .inc();
        self.duration.observe(elapsed.as_secs_f64());
    }
}

/// The metrics of the method at `path` (known methods by name, every other path shares
/// `unknown`), cached for the life of the process: the set of keys is the fixed method table.
pub fn method_metrics(path: &str) -> Arc<MethodMetrics> {
    static CACHE: LazyLock<RwLock<std::collections::HashMap<&'static str, Arc<MethodMetrics>>>> =
        LazyLock::new(Default::default);
    let key: &'static str = match payload_gateway_proto::method(path) {
        Some(m) => m.path,
        None => WELL_KNOWN_SERVICES
            .iter()
            .find(|p| **p == path)
            .copied()
            .unwrap_or("unknown"),
    };
    if let Some(found) = CACHE.read().unwrap_or_else(|e| e.into_inner()).get(key) {
        return found.clone();
    }
    let label = method_label(key);
    let duration = metrics()
        .rpc_duration
        .get_or_create(&MethodLabels {
            method: label.clone(),
        })
        .clone();
    let made = Arc::new(MethodMetrics {
        label,
        duration,
        codes: Default::default(),
    });
    CACHE
        .write()
        .unwrap_or_else(|e| e.into_inner())
        .entry(key)
        .or_insert(made)
        .clone()
}

/// `/temporal.api.workflowservice.v1.WorkflowService/StartWorkflowExecution` →
/// `WorkflowService/StartWorkflowExecution`.
pub fn short_method(path: &str) -> String {
    let path = path.trim_start_matches('/');
    match path.split_once('/') {
        Some((service, method)) => {
            let service = service.rsplit('.').next().unwrap_or(service);
            format!("{service}/{method}")
        }
        None => path.to_owned(),
    }
}

/// The label value of a namespace: its name for the first [`MAX_NAMESPACE_LABELS`] seen,
/// `other` after that, `unknown` for none.
pub fn namespace_label(namespace: Option<&str>) -> String {
    static SEEN: LazyLock<RwLock<std::collections::HashSet<String>>> =
        LazyLock::new(Default::default);
    let Some(ns) = namespace else {
        return "unknown".to_owned();
    };
    // Every counted message asks: known names take the shared lock only.
    if SEEN.read().unwrap_or_else(|e| e.into_inner()).contains(ns) {
        return ns.to_owned();
    }
    let mut seen = SEEN.write().unwrap_or_else(|e| e.into_inner());
    if seen.contains(ns) {
        return ns.to_owned();
    }
    if seen.len() < MAX_NAMESPACE_LABELS {
        seen.insert(ns.to_owned());
        return ns.to_owned();
    }
    "other".to_owned()
}

/// Every metric the gateway exports.
pub struct Metrics {
    registry: Registry,
    /// RPCs by method and status.
    pub rpcs: Family<RpcLabels, Counter>,
    /// RPC latency by method, seconds, from request to the end of the response.
    pub rpc_duration: Family<MethodLabels, Histogram>,
    /// Payloads encoded, decoded, offloaded and resolved by namespace.
    pub payloads: Family<PayloadLabels, Counter>,
    /// Payload bytes into and out of the stages, by direction.
    pub payload_bytes: Family<BytesLabels, Counter>,
    /// Storage driver latency, seconds.
    pub storage_duration: Family<StorageLabels, Histogram>,
    /// Storage driver errors.
    pub storage_errors: Family<StorageLabels, Counter>,
    /// Resolved-payload cache lookups.
    pub cache_lookups: Family<CacheLabels, Counter>,
    /// `google.protobuf.Any` values of types the descriptors don't know (passed through).
    pub unknown_any: Counter,
    /// Policy decisions on methods and types the gateway cannot see inside.
    pub policy: Family<PolicyLabels, Counter>,
    /// Codec endpoint requests by route and HTTP status.
    pub codec_requests: Family<CodecLabels, Counter>,
    /// Codec endpoint latency by route, seconds, from request head to answer.
    pub codec_duration: Family<CodecRouteLabels, Histogram>,
    /// Inbound authorization decisions (`[proxy.auth]`).
    pub auth: Family<AuthLabels, Counter>,
    /// Key-service calls by provider, operation and result.
    pub kms_calls: Family<KmsCallLabels, Counter>,
    /// Key-service call latency, seconds.
    pub kms_duration: Family<KmsLatencyLabels, Histogram>,
    /// Lookups of unwrapped data keys for decryption (`hit`: no key-service call).
    pub dek_cache_lookups: Family<CacheLabels, Counter>,
    /// Connections accepted, by listener.
    pub connections: Family<ListenerLabels, Counter>,
    /// Client connections shut down for their age, by how they ended.
    pub closed_by_age: Family<AgedLabels, Counter>,
}

static METRICS: LazyLock<Metrics> = LazyLock::new(Metrics::new);

/// The process-wide metrics.
pub fn metrics() -> &'static Metrics {
    &METRICS
}

fn latency_histogram() -> Histogram {
    // 100 µs .. ~52 s.
    Histogram::new(exponential_buckets(0.0001, 2.0, 20))
}

impl Metrics {
    fn new() -> Self {
        let mut registry = Registry::with_prefix("pgw");
        let rpcs = Family::<RpcLabels, Counter>::default();
        registry.register("rpcs", "gRPC requests by method and status", rpcs.clone());
        let rpc_duration = Family::<MethodLabels, Histogram>::new_with_constructor(
            latency_histogram as fn() -> Histogram,
        );
        registry.register(
            "rpc_duration_seconds",
            "gRPC request latency through the gateway",
            rpc_duration.clone(),
        );
        let payloads = Family::<PayloadLabels, Counter>::default();
        registry.register(
            "payloads",
            "payloads encoded, decoded, offloaded and resolved",
            payloads.clone(),
        );
        let payload_bytes = Family::<BytesLabels, Counter>::default();
        registry.register(
            "payload_bytes",
            "payload bytes before (in) and after (out) the stages",
            payload_bytes.clone(),
        );
        let storage_duration = Family::<StorageLabels, Histogram>::new_with_constructor(
            latency_histogram as fn() -> Histogram,
        );
        registry.register(
            "storage_duration_seconds",
            "object storage latency by driver and operation",
            storage_duration.clone(),
        );
        let storage_errors = Family::<StorageLabels, Counter>::default();
        registry.register(
            "storage_errors",
            "object storage errors by driver and operation",
            storage_errors.clone(),
        );
        let cache_lookups = Family::<CacheLabels, Counter>::default();
        registry.register(
            "cache_lookups",
            "resolved-payload cache lookups",
            cache_lookups.clone(),
        );
        let unknown_any = Counter::default();
        registry.register(
            "unknown_any",
            "google.protobuf.Any values of unknown types passed through untouched",
            unknown_any.clone(),
        );
        let policy = Family::<PolicyLabels, Counter>::default();
        registry.register(
            "policy_decisions",
            "requests refused or forwarded untouched because the gateway cannot see inside them",
            policy.clone(),
        );
        let codec_requests = Family::<CodecLabels, Counter>::default();
        registry.register(
            "codec_requests",
            "codec endpoint requests by route and HTTP status",
            codec_requests.clone(),
        );
        let codec_duration = Family::<CodecRouteLabels, Histogram>::new_with_constructor(
            latency_histogram as fn() -> Histogram,
        );
        registry.register(
            "codec_request_duration_seconds",
            "codec endpoint latency by route",
            codec_duration.clone(),
        );
        let auth = Family::<AuthLabels, Counter>::default();
        registry.register(
            "auth_decisions",
            "gRPC requests allowed or refused by [proxy.auth], by result and credential kind",
            auth.clone(),
        );
        let kms_calls = Family::<KmsCallLabels, Counter>::default();
        registry.register(
            "kms_calls",
            "calls to key services (wrap/unwrap of data keys) by provider, operation and result",
            kms_calls.clone(),
        );
        let kms_duration = Family::<KmsLatencyLabels, Histogram>::new_with_constructor(
            latency_histogram as fn() -> Histogram,
        );
        registry.register(
            "kms_call_duration_seconds",
            "latency of calls to key services by provider and operation",
            kms_duration.clone(),
        );
        let dek_cache_lookups = Family::<CacheLabels, Counter>::default();
        registry.register(
            "dek_cache_lookups",
            "lookups of unwrapped data keys for decryption (a miss is one key-service call)",
            dek_cache_lookups.clone(),
        );
        let connections = Family::<ListenerLabels, Counter>::default();
        registry.register(
            "connections_accepted",
            "connections accepted, by listener",
            connections.clone(),
        );
        let closed_by_age = Family::<AgedLabels, Counter>::default();
        registry.register(
            "connections_closed_by_age",
            "client connections sent a GOAWAY at proxy.max_connection_age_ms, by how they ended (drained, grace_expired)",
            closed_by_age.clone(),
        );
        registry.register_collector(Box::new(EncryptionCounts));
        Self {
            registry,
            rpcs,
            rpc_duration,
            payloads,
            payload_bytes,
            storage_duration,
            storage_errors,
            cache_lookups,
            unknown_any,
            policy,
            codec_requests,
            codec_duration,
            auth,
            kms_calls,
            kms_duration,
            dek_cache_lookups,
            connections,
            closed_by_age,
        }
    }

    /// Counts one connection accepted by `listener`.
    pub fn count_connection(&self, listener: &'static str) {
        self.connections
            .get_or_create(&ListenerLabels { listener })
            .inc();
    }

    /// Counts one connection shut down for its age that ended as `ending`.
    pub fn count_closed_by_age(&self, ending: &'static str) {
        self.closed_by_age
            .get_or_create(&AgedLabels { ending })
            .inc();
    }

    /// Counts one codec endpoint answer of `status` on `route` that took `elapsed`.
    pub fn count_codec_request(&self, route: &'static str, status: u16, elapsed: Duration) {
        self.codec_requests
            .get_or_create(&CodecLabels { route, status })
            .inc();
        self.codec_duration
            .get_or_create(&CodecRouteLabels { route })
            .observe(elapsed.as_secs_f64());
    }

    /// Counts one inbound authorization decision.
    pub fn count_auth(&self, result: &'static str, credential: &'static str) {
        self.auth
            .get_or_create(&AuthLabels { result, credential })
            .inc();
    }

    /// Records one key-service call.
    pub fn record_kms_call(
        &self,
        provider: &'static str,
        operation: &'static str,
        result: &'static str,
        seconds: f64,
    ) {
        self.kms_calls
            .get_or_create(&KmsCallLabels {
                provider,
                operation,
                result,
            })
            .inc();
        self.kms_duration
            .get_or_create(&KmsLatencyLabels {
                provider,
                operation,
            })
            .observe(seconds);
    }

    /// Counts one lookup of an unwrapped data key.
    pub fn count_dek_lookup(&self, hit: bool) {
        let result = if hit { "hit" } else { "miss" };
        self.dek_cache_lookups
            .get_or_create(&CacheLabels { result })
            .inc();
    }

    /// Counts one policy decision.
    pub fn count_policy(&self, action: &'static str) {
        self.policy.get_or_create(&PolicyLabels { action }).inc();
    }

    /// Counts `count` payloads of `operation` in `namespace`.
    pub fn count_payloads(&self, namespace: Option<&str>, operation: &'static str, count: usize) {
        /// The operations of `pgw_payloads_total`, in handle order.
        const OPERATIONS: [&str; 4] = ["encoded", "decoded", "offloaded", "resolved"];
        type Handles = Arc<[std::sync::OnceLock<Counter>; 4]>;
        // Per namespace label, the counters resolved once (at most MAX_NAMESPACE_LABELS + 2
        // entries: the names that have a label of their own, `unknown`, `other`).
        static HANDLES: LazyLock<RwLock<std::collections::HashMap<String, Handles>>> =
            LazyLock::new(Default::default);
        if count == 0 {
            return;
        }
        let Some(op) = OPERATIONS.iter().position(|o| *o == operation) else {
            self.payloads
                .get_or_create(&PayloadLabels {
                    namespace: namespace_label(namespace),
                    operation,
                })
                .inc_by(count as u64);
            return;
        };
        let key = namespace.unwrap_or("\0unknown");
        let found = HANDLES
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(key)
            .cloned();
        let handles = match found {
            Some(handles) => handles,
            None => {
                let label = namespace_label(namespace);
                // A namespace past the label cap shares `other`: not a key of its own, so the
                // map stays bounded by the label set.
                let key = if namespace.is_some_and(|ns| ns == label) {
                    label.clone()
                } else if namespace.is_none() {
                    key.to_owned()
                } else {
                    self.payloads
                        .get_or_create(&PayloadLabels {
                            namespace: label,
                            operation,
                        })
                        .inc_by(count as u64);
                    return;
                };
                let mut map = HANDLES.write().unwrap_or_else(|e| e.into_inner());
                map.entry(key).or_default().clone()
            }
        };
        handles[op]
            .get_or_init(|| {
                self.payloads
                    .get_or_create(&PayloadLabels {
                        namespace: namespace_label(namespace),
                        operation,
                    })
                    .clone()
            })
            .inc_by(count as u64);
    }

    /// Adds to `pgw_payload_bytes_total` of `direction` (`encode` or `decode`) the bytes before
    /// (`bytes_in`) and after (`bytes_out`) the stages, through handles resolved once.
    pub fn count_payload_bytes(&self, direction: &'static str, bytes_in: u64, bytes_out: u64) {
        static HANDLES: [std::sync::OnceLock<[Counter; 2]>; 2] =
            [std::sync::OnceLock::new(), std::sync::OnceLock::new()];
        let index = usize::from(direction == "decode");
        let [counter_in, counter_out] = HANDLES[index].get_or_init(|| {
            ["in", "out"].map(|side| {
                self.payload_bytes
                    .get_or_create(&BytesLabels { direction, side })
                    .clone()
            })
        });
        counter_in.inc_by(bytes_in);
        counter_out.inc_by(bytes_out);
    }

    /// Renders every metric in the OpenMetrics text format.
    pub fn render(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

/// What the codec reports at scrape time (see [`observe_codec`]).
#[derive(Debug, Clone, Default)]
pub struct CodecCounts {
    /// AES-GCM encryptions per key id.
    pub encryptions: Vec<(String, u64)>,
    /// Age in seconds of the oldest data key still encrypting new payloads, per
    /// key-encryption key.
    pub dek_ages: Vec<(String, f64)>,
}

/// Reads the running codec's counts; `None` once the codec is gone.
type CodecReader = Box<dyn Fn() -> Option<CodecCounts> + Send + Sync>;

/// The reader of the codec whose counts are exported (the running gateway's).
static CODEC: RwLock<Option<CodecReader>> = RwLock::new(None);

/// Exports the counts `read` returns at each scrape as `pgw_encryptions_total{key_id}` and
/// `pgw_dek_age_seconds{key_id}`. The application installs it with a reader of its codec
/// (the codec itself does not depend on metrics); a later call replaces the reader.
pub fn observe_codec(read: impl Fn() -> Option<CodecCounts> + Send + Sync + 'static) {
    if let Ok(mut slot) = CODEC.write() {
        *slot = Some(Box::new(read));
    }
}

/// The Prometheus side of [`crate::telemetry`]: what the lower layers report lands in
/// [`metrics()`].
#[derive(Debug, Default)]
pub struct TelemetrySink;

impl crate::telemetry::Sink for TelemetrySink {
    fn dek_lookup(&self, hit: bool) {
        metrics().count_dek_lookup(hit);
    }

    fn kms_call(
        &self,
        provider: &'static str,
        operation: &'static str,
        result: &'static str,
        seconds: f64,
    ) {
        metrics().record_kms_call(provider, operation, result, seconds);
    }
}

/// Routes [`crate::telemetry::sink()`] into [`metrics()`] (idempotent).
pub fn install_telemetry() {
    static SINK: TelemetrySink = TelemetrySink;
    crate::telemetry::install(&SINK);
}

/// Reads the codec's counters at scrape time, so the codec keeps one source of truth (it also
/// enforces the per-key nonce limit with them).
#[derive(Debug)]
struct EncryptionCounts;

impl Collector for EncryptionCounts {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let counts = CODEC
            .read()
            .ok()
            .and_then(|c| c.as_ref().and_then(|read| read()));
        let Some(counts) = counts else {
            return Ok(());
        };
        {
            let mut family = encoder.encode_descriptor(
                "encryptions",
                "AES-GCM encryptions per key id (random nonces: NIST SP 800-38D allows 2^32 per key)",
                None,
                prometheus_client::metrics::MetricType::Counter,
            )?;
            for (key_id, count) in counts.encryptions {
                let labels = [("key_id", key_id)];
                let metric_encoder = family.encode_family(&labels)?;
                ConstCounter::new(count).encode(metric_encoder)?;
            }
        }
        let ages = counts.dek_ages;
        if !ages.is_empty() {
            let mut family = encoder.encode_descriptor(
                "dek_age_seconds",
                "age of the oldest data key still encrypting new payloads, per key-encryption key",
                None,
                prometheus_client::metrics::MetricType::Gauge,
            )?;
            for (key_id, age) in ages {
                let labels = [("key_id", key_id)];
                let metric_encoder = family.encode_family(&labels)?;
                ConstGauge::new(age).encode(metric_encoder)?;
            }
        }
        Ok(())
    }
}

/// The gRPC status name for a numeric `grpc-status` value.
pub fn code_name(code: Option<u32>) -> &'static str {
    const NAMES: [&str; 17] = [
        "OK",
        "CANCELLED",
        "UNKNOWN",
        "INVALID_ARGUMENT",
        "DEADLINE_EXCEEDED",
        "NOT_FOUND",
        "ALREADY_EXISTS",
        "PERMISSION_DENIED",
        "RESOURCE_EXHAUSTED",
        "FAILED_PRECONDITION",
        "ABORTED",
        "OUT_OF_RANGE",
        "UNIMPLEMENTED",
        "INTERNAL",
        "UNAVAILABLE",
        "DATA_LOSS",
        "UNAUTHENTICATED",
    ];
    match code {
        Some(c) => NAMES.get(c as usize).copied().unwrap_or("UNKNOWN"),
        None => "NONE",
    }
}
