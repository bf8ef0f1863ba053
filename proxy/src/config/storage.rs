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
}

impl Default for StorageConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            driver: "local".to_owned(),
            threshold: 256 * 1024,
            cache_bytes: 64 * 1024 * 1024,
            concurrency: 16,
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
