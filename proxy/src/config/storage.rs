//! `[storage]`: offload of large payloads to object storage.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// `[storage]`: external storage of large payloads.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct StorageConfig {
    /// Offload payloads at or above `threshold`. Off: large payloads go to the server as they are.
    pub enabled: bool,
    /// Name of the driver that stores new payloads; every listed driver can resolve.
    pub driver: String,
    /// Serialized size at or above which a payload is offloaded.
    pub threshold: usize,
    /// The configured drivers.
    pub drivers: Vec<DriverConfig>,
    /// Bytes of resolved (verified) stored payloads kept in memory (LRU); 0 disables.
    pub cache_bytes: usize,
    /// Concurrent store/retrieve requests per message.
    pub concurrency: usize,
    /// `[storage.server_limits]`: the server's size limits, as the gateway advertises and
    /// keeps them for namespaces that offload.
    pub server_limits: ServerLimitsConfig,
}

impl Default for StorageConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            driver: "local".to_owned(),
            threshold: 256 * 1024,
            cache_bytes: 64 * 1024 * 1024,
            concurrency: 16,
            server_limits: ServerLimitsConfig::default(),
            drivers: vec![DriverConfig {
                name: "local".to_owned(),
                kind: DriverKind::Filesystem,
                settings: BTreeMap::from([(
                    "root".to_owned(),
                    toml::Value::String("./data/payloads".to_owned()),
                )]),
            }],
        }
    }
}

/// `[storage.server_limits]`: for namespaces where offload applies, the gateway tells SDKs
/// the limits it keeps (so unmodified workers send values past the server's own) and makes
/// every message it forwards fit the server's limits by offloading its largest payloads.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerLimitsConfig {
    /// Rewrite `NamespaceInfo.limits` in `DescribeNamespace`, `ListNamespaces` and
    /// `UpdateNamespace` answers to what the gateway enforces.
    pub advertise: bool,
    /// Offload the largest payloads of a message, whatever their size, until it fits.
    pub fit_messages: bool,
    /// The largest message the server receives (its gRPC receive limit).
    pub max_message_bytes: usize,
    /// How long the server's answer for a namespace is used before it is asked again.
    pub refresh_ms: u64,
    /// Overrides the server's `blob_size_limit_error` (per payload field).
    pub blob_size_bytes: Option<usize>,
    /// Overrides the server's `memo_size_limit_error` (a memo in all).
    pub memo_size_bytes: Option<usize>,
    /// Overrides the server's `workflow_task_completion_size_limit_error`.
    pub workflow_task_completion_bytes: Option<usize>,
}

impl Default for ServerLimitsConfig {
    fn default() -> Self {
        Self {
            advertise: true,
            fit_messages: true,
            max_message_bytes: 4 * 1024 * 1024,
            refresh_ms: 60_000,
            blob_size_bytes: None,
            memo_size_bytes: None,
            workflow_task_completion_bytes: None,
        }
    }
}

/// One `[[storage.drivers]]` entry.
#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct DriverConfig {
    /// Name written into references (`driver_name`).
    pub name: String,
    /// Backend kind.
    pub kind: DriverKind,
    /// Backend-specific settings (bucket, endpoint, root, ...), validated by the backend.
    #[serde(flatten)]
    pub settings: BTreeMap<String, toml::Value>,
}

/// Storage backend kinds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum DriverKind {
    /// Amazon S3 or an S3-compatible server.
    S3,
    /// A local directory.
    Filesystem,
    /// Process memory (tests).
    Memory,
    /// Google Cloud Storage.
    Gcs,
    /// Azure Blob Storage.
    Azure,
}
