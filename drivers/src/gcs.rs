//! `gcp.gcsdriver`-compatible storage on Google Cloud Storage, via `object_store`'s GCS backend.
//!
//! Wire-compatible with `temporalio.contrib.gcp.gcsdriver`: same object names (the `v0/ns/...`
//! layout with the GCS segment encoding, [`Encoding::Gcs`](crate::layout::Encoding::Gcs)),
//! same claim (`bucket`, `object_name`, `hash_algorithm`, `hash_value`), metadata lookup then
//! a create-only upload (`ifGenerationMatch=0`), SHA-256 verified on every download.
//!
//! Credentials come from the standard Google chain as `object_store` reads it:
//! `GOOGLE_SERVICE_ACCOUNT` / `GOOGLE_SERVICE_ACCOUNT_KEY`, `GOOGLE_APPLICATION_CREDENTIALS`
//! (service account or authorized user), `~/.config/gcloud/application_default_credentials.json`,
//! and the metadata server (workload identity on GKE, the VM's service account).
//!
//! `object_store` 0.12 takes a custom base URL only from a service account key's
//! `gcs_base_url` field. With `endpoint` set, the driver therefore either builds an
//! anonymous emulator key (`{"gcs_base_url": endpoint, "disable_oauth": true}`, used with
//! `anonymous = true`: fake-gcs-server and other emulators), or adds `gcs_base_url` to the
//! service account key file named by `service_account_path` or
//! `GOOGLE_APPLICATION_CREDENTIALS` (private endpoints with real credentials).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use object_store::ObjectStore;
use object_store::gcp::GoogleCloudStorageBuilder;

use crate::cloud::{self, BucketedStore};
use crate::layout::{self, Scheme};
use crate::{ClaimData, DriverError, StorageDriver, StoreContext};

/// The driver name and type of Temporal's GCS driver.
pub const GCS_DRIVER_TYPE: &str = "gcp.gcsdriver";

/// Settings of a GCS driver.
#[derive(Debug, Clone)]
pub struct GcsConfig {
    /// Name written into references; `gcp.gcsdriver` for SDK interop.
    pub name: String,
    /// Bucket new payloads are written to (must exist).
    pub bucket: String,
    /// Further buckets whose claims are resolved (the write bucket always is).
    pub read_buckets: Vec<String>,
    /// Base URL of an emulator or private endpoint (default `https://storage.googleapis.com`).
    pub endpoint: Option<String>,
    /// Send no credentials (emulators, public buckets).
    pub anonymous: bool,
    /// Service account key file; else the standard chain.
    pub service_account_path: Option<PathBuf>,
    /// Largest serialized payload stored or fetched, in bytes.
    pub max_payload_size: u64,
    /// Concurrent requests per batch.
    pub concurrency: usize,
    /// Timeout of one operation including retries.
    pub operation_timeout: Duration,
}

impl GcsConfig {
    /// Defaults for `bucket`: driver name `gcp.gcsdriver`, 50 MiB limit, standard credentials.
    pub fn new(bucket: impl Into<String>) -> Self {
        Self {
            name: GCS_DRIVER_TYPE.to_owned(),
            bucket: bucket.into(),
            read_buckets: Vec::new(),
            endpoint: None,
            anonymous: false,
            service_account_path: None,
            max_payload_size: layout::DEFAULT_MAX_PAYLOAD_SIZE,
            concurrency: 16,
            operation_timeout: Duration::from_secs(60),
        }
    }
}

/// Stores payloads in Google Cloud Storage.
#[derive(Debug)]
pub struct GcsDriver {
    name: String,
    inner: BucketedStore,
}

impl GcsDriver {
    /// Builds one client per configured bucket. Fails when the credentials cannot be loaded
    /// (a missing or malformed key file); an unreachable service is only seen on first use.
    pub fn new(config: GcsConfig) -> Result<Self, DriverError> {
        let emulator_key = emulator_key(&config)?;
        let timeout = config.operation_timeout;
        let make = |bucket: &str| -> Result<Arc<dyn ObjectStore>, object_store::Error> {
            let mut b = match &emulator_key {
                // The key carries the credentials: the environment's must not add a second.
                Some(key) => GoogleCloudStorageBuilder::new().with_service_account_key(key),
                None => {
                    let b = GoogleCloudStorageBuilder::from_env();
                    match &config.service_account_path {
                        Some(p) => b.with_service_account_path(p.to_string_lossy()),
                        None => b,
                    }
                }
            };
            b = b
                .with_bucket_name(bucket)
                .with_skip_signature(config.anonymous)
                .with_client_options(cloud::client_options(config.endpoint.as_deref(), timeout))
                .with_retry(cloud::retry_config(timeout));
            Ok(Arc::new(b.build()?))
        };
        let mut inner = BucketedStore::new(
            "gs",
            Scheme::GCS,
            &config.bucket,
            &config.read_buckets,
            make,
        )?;
        inner.max_payload_size = config.max_payload_size;
        inner.concurrency = config.concurrency;
        inner.timeout = timeout;
        Ok(Self {
            name: config.name,
            inner,
        })
    }
}

/// The service account key that points `object_store` at `endpoint`, or `None` without one.
fn emulator_key(config: &GcsConfig) -> Result<Option<String>, DriverError> {
    let Some(endpoint) = &config.endpoint else {
        return Ok(None);
    };
    let endpoint = endpoint.trim_end_matches('/');
    if config.anonymous {
        let key = serde_json::json!({
            "gcs_base_url": endpoint,
            "disable_oauth": true,
            "client_email": "",
            "private_key": "",
            "private_key_id": "",
        });
        return Ok(Some(key.to_string()));
    }
    let path = config
        .service_account_path
        .clone()
        .or_else(|| std::env::var_os("GOOGLE_APPLICATION_CREDENTIALS").map(PathBuf::from))
        .ok_or_else(|| {
            DriverError::Unavailable(
                "a GCS endpoint with credentials needs a service account key file \
                 (service_account_path or GOOGLE_APPLICATION_CREDENTIALS), or anonymous = true"
                    .to_owned(),
            )
        })?;
    let text = std::fs::read_to_string(&path).map_err(|e| {
        DriverError::Unavailable(format!("cannot read {}: {e}", path.display()))
    })?;
    // Only the parse outcome is reported: the file holds a private key.
    let mut key: serde_json::Value = serde_json::from_str(&text).map_err(|_| {
        DriverError::Unavailable(format!("{} is not a JSON key file", path.display()))
    })?;
    match key.get("type").and_then(|t| t.as_str()) {
        None | Some("service_account") => {}
        Some(other) => {
            return Err(DriverError::Unavailable(format!(
                "{} holds {other:?} credentials; a GCS endpoint needs a service account key",
                path.display()
            )));
        }
    }
    let Some(fields) = key.as_object_mut() else {
        return Err(DriverError::Unavailable(format!(
            "{} is not a JSON object",
            path.display()
        )));
    };
    fields.insert("gcs_base_url".to_owned(), endpoint.into());
    Ok(Some(key.to_string()))
}

#[async_trait]
impl StorageDriver for GcsDriver {
    fn name(&self) -> &str {
        &self.name
    }

    fn validate(&self, namespace: Option<&str>, claim: &ClaimData) -> Result<(), DriverError> {
        self.inner.validate(namespace, claim).map(|_| ())
    }

    async fn store(
        &self,
        context: &StoreContext,
        payloads: Vec<Bytes>,
    ) -> Result<Vec<ClaimData>, DriverError> {
        self.inner.store(context, payloads).await
    }

    async fn retrieve(
        &self,
        namespace: Option<&str>,
        claims: Vec<ClaimData>,
    ) -> Result<Vec<Bytes>, DriverError> {
        self.inner.retrieve(namespace, claims).await
    }
}
