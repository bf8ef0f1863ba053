//! Storage on Azure Blob Storage, via `object_store`'s Azure backend: the gateway's own
//! `azure.blobdriver` format until a Temporal SDK ships an Azure driver.
//!
//! It mirrors `gcp.gcsdriver`: claim `container`, `blob_name`, `hash_algorithm` (`sha256`),
//! `hash_value`; blob names in the same `v0/ns/...` layout, segments encoded like
//! `aws.s3driver` ([`Encoding::Strict`](crate::layout::Encoding::Strict): ASCII only, so no
//! tool's handling of Unicode or backslashes in blob names matters); properties lookup then a
//! create-only upload (`If-None-Match: *`); SHA-256 verified on every download.
//!
//! Credentials come from the standard Azure chain as `object_store` reads it from the
//! environment: account key (`AZURE_STORAGE_ACCOUNT_KEY`), SAS (`AZURE_STORAGE_SAS_TOKEN`),
//! bearer token, service principal (`AZURE_CLIENT_ID`, `AZURE_CLIENT_SECRET`,
//! `AZURE_TENANT_ID`), workload identity (`AZURE_CLIENT_ID`, `AZURE_TENANT_ID`,
//! `AZURE_FEDERATED_TOKEN_FILE`), then the managed identity endpoint. `endpoint` replaces
//! `https://{account}.blob.core.windows.net` (Azurite: `http://127.0.0.1:10000/devstoreaccount1`).

use std::sync::Arc;
use std::time::Duration;

use object_store::ObjectStore;
use object_store::azure::MicrosoftAzureBuilder;

use crate::DriverError;
use crate::layout::{self, Scheme};
use crate::object::{self, Bucketed, ObjectStoreDriver, PutCreate};

/// The driver name and type of the gateway's Azure driver.
pub const AZURE_DRIVER_TYPE: &str = "azure.blobdriver";

/// Settings of an Azure Blob Storage driver.
#[derive(Debug, Clone)]
pub struct AzureConfig {
    /// Name written into references; `azure.blobdriver` by default.
    pub name: String,
    /// Storage account name.
    pub account: String,
    /// Container new payloads are written to (must exist).
    pub container: String,
    /// Further containers whose claims are resolved (the write container always is).
    pub read_containers: Vec<String>,
    /// Account URL of an emulator or private endpoint.
    pub endpoint: Option<String>,
    /// Send no credentials (public containers).
    pub anonymous: bool,
    /// Largest serialized payload stored or fetched, in bytes.
    pub max_payload_size: u64,
    /// Concurrent requests per batch.
    pub concurrency: usize,
    /// Timeout of one operation including retries.
    pub operation_timeout: Duration,
}

impl AzureConfig {
    /// Defaults for `account` and `container`: driver name `azure.blobdriver`, 50 MiB limit.
    pub fn new(account: impl Into<String>, container: impl Into<String>) -> Self {
        Self {
            name: AZURE_DRIVER_TYPE.to_owned(),
            account: account.into(),
            container: container.into(),
            read_containers: Vec::new(),
            endpoint: None,
            anonymous: false,
            max_payload_size: layout::DEFAULT_MAX_PAYLOAD_SIZE,
            concurrency: 16,
            operation_timeout: Duration::from_secs(60),
        }
    }
}

/// Stores payloads in Azure Blob Storage: the shared `object_store` driver with conditional
/// puts (`If-None-Match: *`).
pub type AzureDriver = ObjectStoreDriver<PutCreate>;

impl ObjectStoreDriver<PutCreate> {
    /// Builds one client per configured container from the environment's credentials.
    pub fn new(config: AzureConfig) -> Result<Self, DriverError> {
        let timeout = config.operation_timeout;
        let make = |container: &str| -> Result<Arc<dyn ObjectStore>, object_store::Error> {
            let mut b = MicrosoftAzureBuilder::from_env()
                .with_account(&config.account)
                .with_container_name(container)
                .with_skip_signature(config.anonymous)
                .with_client_options(object::client_options(config.endpoint.as_deref(), timeout))
                .with_retry(object::retry_config(timeout));
            if let Some(endpoint) = &config.endpoint {
                b = b
                    .with_endpoint(endpoint.trim_end_matches('/').to_owned())
                    .with_allow_http(endpoint.starts_with("http://"));
            }
            Ok(Arc::new(b.build()?))
        };
        let bucketed = Bucketed {
            name: config.name.clone(),
            url_scheme: "az",
            scheme: Scheme::AZURE,
            write_bucket: &config.container,
            read_buckets: &config.read_containers,
            max_payload_size: config.max_payload_size,
            concurrency: config.concurrency,
            timeout,
        };
        ObjectStoreDriver::bucketed(bucketed, make, || Ok(PutCreate))
    }
}
