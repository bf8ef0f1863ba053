//! `gcp.gcsdriver`-compatible storage on Google Cloud Storage, via `object_store`'s GCS backend.
//!
//! Wire-compatible with `temporalio.contrib.gcp.gcsdriver`: same object names (the `v0/ns/...`
//! layout with the GCS segment encoding, [`Encoding::Gcs`](crate::layout::Encoding::Gcs)),
//! same claim (`bucket`, `object_name`, `hash_algorithm`, `hash_value`), metadata lookup then
//! a create-only upload, SHA-256 verified on every download.
//!
//! Lookups and downloads go through `object_store` (XML API). Uploads are the JSON API's media
//! upload with `ifGenerationMatch=0`, exactly what the SDK's gcloud-aio-storage client sends,
//! authenticated with `object_store`'s credential provider: `object_store`'s own XML-API
//! `PUT` is not served by fake-gcs-server, the emulator the SDKs test against, and the JSON
//! upload behaves the same on GCS.
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
use object_store::gcp::{GcpCredentialProvider, GoogleCloudStorageBuilder};

use crate::DriverError;
use crate::layout::{self, Scheme};
use crate::object::{self, Bucketed, ObjectStoreDriver, Upload};

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

/// Stores payloads in Google Cloud Storage: the shared `object_store` driver with the JSON
/// API upload.
pub type GcsDriver = ObjectStoreDriver<JsonUpload>;

impl ObjectStoreDriver<JsonUpload> {
    /// Builds one client per configured bucket. Fails when the credentials cannot be loaded
    /// (a missing or malformed key file); an unreachable service is only seen on first use.
    pub fn new(config: GcsConfig) -> Result<Self, DriverError> {
        let emulator_key = emulator_key(&config)?;
        let timeout = config.operation_timeout;
        // The write bucket's client's credentials, for the uploads.
        let credentials = std::cell::OnceCell::new();
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
                .with_client_options(object::client_options(config.endpoint.as_deref(), timeout))
                .with_retry(object::retry_config(timeout));
            let store = b.build()?;
            credentials.get_or_init(|| Arc::clone(store.credentials()));
            Ok(Arc::new(store))
        };
        let upload = || {
            let http = reqwest::Client::builder()
                .timeout(timeout)
                .connect_timeout(timeout.min(Duration::from_secs(5)))
                .build()
                .map_err(|e| {
                    DriverError::Unavailable(format!("cannot build the HTTP client: {e}"))
                })?;
            Ok(JsonUpload {
                http,
                base_url: config
                    .endpoint
                    .as_deref()
                    .unwrap_or(DEFAULT_BASE_URL)
                    .trim_end_matches('/')
                    .to_owned(),
                credentials: credentials.get().filter(|_| !config.anonymous).cloned(),
            })
        };
        let bucketed = Bucketed {
            name: config.name.clone(),
            url_scheme: "gs",
            scheme: Scheme::GCS,
            write_bucket: &config.bucket,
            read_buckets: &config.read_buckets,
            max_payload_size: config.max_payload_size,
            concurrency: config.concurrency,
            timeout,
        };
        ObjectStoreDriver::bucketed(bucketed, make, upload)
    }
}

const DEFAULT_BASE_URL: &str = "https://storage.googleapis.com";

/// Create-only upload through the JSON API:
/// `POST {base}/upload/storage/v1/b/{bucket}/o?uploadType=media&name={key}&ifGenerationMatch=0`,
/// authenticated with the credentials of the write bucket's `object_store` client.
pub struct JsonUpload {
    http: reqwest::Client,
    base_url: String,
    /// `None`: anonymous.
    credentials: Option<GcpCredentialProvider>,
}

impl std::fmt::Debug for JsonUpload {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JsonUpload")
            .field("base_url", &self.base_url)
            .field("anonymous", &self.credentials.is_none())
            .finish()
    }
}

#[async_trait]
impl Upload for JsonUpload {
    async fn create(
        &self,
        _store: &dyn ObjectStore,
        bucket: &str,
        key: &str,
        url: &str,
        payload: Bytes,
    ) -> Result<(), DriverError> {
        let fail = |what: String| DriverError::Unavailable(format!("upload {url}: {what}"));
        let url = format!("{}/upload/storage/v1/b/{bucket}/o", self.base_url);
        let mut req = self
            .http
            .post(url)
            .query(&[
                ("uploadType", "media"),
                ("name", key),
                ("ifGenerationMatch", "0"),
            ])
            .header(reqwest::header::CONTENT_TYPE, "application/octet-stream")
            .body(payload);
        if let Some(credentials) = &self.credentials {
            let token = credentials
                .get_credential()
                .await
                .map_err(|e| fail(format!("cannot get credentials: {e}")))?;
            // An emulator key (`disable_oauth`) yields an empty token: send none.
            if !token.bearer.is_empty() {
                req = req.bearer_auth(&token.bearer);
            }
        }
        let response = req.send().await.map_err(|e| fail(e.to_string()))?;
        match response.status() {
            s if s.is_success() => Ok(()),
            // Another writer created the same content-addressed object first.
            reqwest::StatusCode::PRECONDITION_FAILED => Ok(()),
            s => {
                let body = response.text().await.unwrap_or_default();
                let excerpt: String = body.chars().take(300).collect();
                Err(fail(format!("HTTP {s}: {excerpt}")))
            }
        }
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
    let text = std::fs::read_to_string(&path)
        .map_err(|e| DriverError::Unavailable(format!("cannot read {}: {e}", path.display())))?;
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
