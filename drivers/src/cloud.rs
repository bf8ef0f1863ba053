//! What the GCS and Azure drivers share: content-addressed store and verified retrieve over
//! one `object_store` client per bucket (or container), with a claim layout given by a
//! [`Scheme`]. Each backend module only builds its clients.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use object_store::path::Path as ObjectPath;
use object_store::{ClientOptions, ObjectStore, PutMode, PutOptions, PutPayload, RetryConfig};

use crate::layout::{self, BucketPolicy, Scheme, ValidClaim};
use crate::{ClaimData, DriverError, StoreContext};

/// HTTP client settings for a cloud backend: per-request and connect timeouts, plain HTTP
/// only toward an `http://` endpoint (emulators).
pub(crate) fn client_options(endpoint: Option<&str>, timeout: Duration) -> ClientOptions {
    ClientOptions::new()
        .with_timeout(timeout)
        .with_connect_timeout(timeout.min(Duration::from_secs(5)))
        .with_allow_http(endpoint.is_some_and(|e| e.starts_with("http://")))
}

/// Retries of transient errors (5xx, connection failures) within `timeout`.
pub(crate) fn retry_config(timeout: Duration) -> RetryConfig {
    RetryConfig {
        max_retries: 3,
        retry_timeout: timeout,
        ..Default::default()
    }
}

/// How a backend creates an object only when it is absent.
#[async_trait]
pub(crate) trait CreateOnly: Send + Sync + std::fmt::Debug {
    /// Creates `key` in `bucket` holding `payload` unless it exists; losing the race to another
    /// writer of the same (content-addressed) object is success.
    async fn create(&self, bucket: &str, key: &str, payload: Bytes) -> Result<(), DriverError>;
}

/// [`CreateOnly`] through `object_store`'s conditional put ([`PutMode::Create`]: Azure
/// `If-None-Match: *`).
#[derive(Debug)]
pub(crate) struct PutCreate {
    /// `gs`, `az`: the URL scheme in error messages.
    pub url_scheme: &'static str,
    pub stores: HashMap<String, Arc<dyn ObjectStore>>,
}

#[async_trait]
impl CreateOnly for PutCreate {
    async fn create(&self, bucket: &str, key: &str, payload: Bytes) -> Result<(), DriverError> {
        let opts = PutOptions {
            mode: PutMode::Create,
            ..Default::default()
        };
        match self.stores[bucket]
            .put_opts(&object_path(key)?, PutPayload::from_bytes(payload), opts)
            .await
        {
            Ok(_)
            | Err(object_store::Error::AlreadyExists { .. })
            | Err(object_store::Error::Precondition { .. }) => Ok(()),
            Err(e) => Err(DriverError::Unavailable(format!(
                "put {}://{bucket}/{key}: {e}",
                self.url_scheme
            ))),
        }
    }
}

/// A driver over one [`ObjectStore`] per bucket: writes go to `write_bucket`, claims naming
/// any configured bucket are resolved.
#[derive(Debug)]
pub(crate) struct BucketedStore {
    /// `gs`, `az`: the URL scheme in error messages.
    pub url_scheme: &'static str,
    pub scheme: Scheme,
    pub write_bucket: String,
    pub stores: HashMap<String, Arc<dyn ObjectStore>>,
    /// Writes new objects (default: [`PutCreate`] over `stores`).
    pub creator: Arc<dyn CreateOnly>,
    pub policy: BucketPolicy,
    pub max_payload_size: u64,
    pub concurrency: usize,
    /// Bound of one operation including the client's retries.
    pub timeout: Duration,
}

impl BucketedStore {
    /// Builds the store with `make` called once per bucket (write bucket first).
    pub fn new(
        url_scheme: &'static str,
        scheme: Scheme,
        write_bucket: &str,
        read_buckets: &[String],
        mut make: impl FnMut(&str) -> Result<Arc<dyn ObjectStore>, object_store::Error>,
    ) -> Result<Self, DriverError> {
        let mut buckets = vec![write_bucket.to_owned()];
        for b in read_buckets {
            if !buckets.contains(b) {
                buckets.push(b.clone());
            }
        }
        let mut stores = HashMap::new();
        for b in &buckets {
            let store = make(b).map_err(|e| {
                DriverError::Unavailable(format!("cannot configure {url_scheme}://{b}: {e}"))
            })?;
            stores.insert(b.clone(), store);
        }
        Ok(Self {
            url_scheme,
            scheme,
            write_bucket: write_bucket.to_owned(),
            creator: Arc::new(PutCreate {
                url_scheme,
                stores: stores.clone(),
            }),
            stores,
            policy: BucketPolicy::OneOf(buckets),
            max_payload_size: layout::DEFAULT_MAX_PAYLOAD_SIZE,
            concurrency: 16,
            timeout: Duration::from_secs(60),
        })
    }

    fn url(&self, bucket: &str, key: &str) -> String {
        format!("{}://{bucket}/{key}", self.url_scheme)
    }

    fn unavailable(
        &self,
        op: &str,
        bucket: &str,
        key: &str,
        e: object_store::Error,
    ) -> DriverError {
        DriverError::Unavailable(format!("{op} {}: {e}", self.url(bucket, key)))
    }

    async fn bounded<T>(
        &self,
        op: &str,
        bucket: &str,
        key: &str,
        call: impl std::future::Future<Output = Result<T, DriverError>>,
    ) -> Result<T, DriverError> {
        tokio::time::timeout(self.timeout, call)
            .await
            .unwrap_or_else(|_| {
                Err(DriverError::Unavailable(format!(
                    "{op} {}: timed out after {:?}",
                    self.url(bucket, key),
                    self.timeout
                )))
            })
    }

    /// Stores one payload: metadata lookup first, then a create-only upload through
    /// `creator`.
    pub async fn store_one(
        &self,
        context: &StoreContext,
        payload: Bytes,
    ) -> Result<ClaimData, DriverError> {
        layout::check_size(payload.len(), self.max_payload_size)?;
        let hex = layout::sha256_hex(&payload);
        let key = layout::object_key_encoded(context, &hex, self.scheme.encoding);
        let bucket = &self.write_bucket;
        let store = &self.stores[bucket];
        let path = object_path(&key)?;
        self.bounded("store", bucket, &key, async {
            let exists = match store.head(&path).await {
                Ok(_) => true,
                Err(object_store::Error::NotFound { .. }) => false,
                Err(e) => return Err(self.unavailable("head", bucket, &key, e)),
            };
            if !exists {
                self.creator.create(bucket, &key, payload).await?;
            }
            Ok(())
        })
        .await?;
        Ok(layout::make_scheme_claim(
            &self.scheme,
            Some(bucket),
            &key,
            &hex,
        ))
    }

    /// Fetches one validated claim; the size is checked before the body is read and the hash
    /// after.
    pub async fn retrieve_one(&self, claim: ValidClaim) -> Result<Bytes, DriverError> {
        let bucket = claim.bucket.as_deref().unwrap_or(&self.write_bucket);
        let store = self.stores.get(bucket).ok_or_else(|| {
            DriverError::ClaimRefused(format!("{bucket:?} is not configured for this driver"))
        })?;
        let path = object_path(&claim.key)?;
        let bytes = self
            .bounded("get", bucket, &claim.key, async {
                let result = match store.get(&path).await {
                    Ok(r) => r,
                    Err(object_store::Error::NotFound { .. }) => {
                        return Err(DriverError::NotFound(self.url(bucket, &claim.key)));
                    }
                    Err(e) => return Err(self.unavailable("get", bucket, &claim.key, e)),
                };
                layout::check_size(
                    usize::try_from(result.meta.size).unwrap_or(usize::MAX),
                    self.max_payload_size,
                )?;
                result
                    .bytes()
                    .await
                    .map_err(|e| self.unavailable("get", bucket, &claim.key, e))
            })
            .await?;
        layout::check_size(bytes.len(), self.max_payload_size)?;
        layout::verify(&claim, &bytes)?;
        Ok(bytes)
    }

    /// Validates a claim against the scheme, the configured buckets and `namespace`.
    pub fn validate(
        &self,
        namespace: Option<&str>,
        claim: &ClaimData,
    ) -> Result<ValidClaim, DriverError> {
        layout::validate_scheme_claim(claim, &self.scheme, &self.policy, namespace)
    }

    /// Stores a batch in order with bounded concurrency.
    pub async fn store(
        &self,
        context: &StoreContext,
        payloads: Vec<Bytes>,
    ) -> Result<Vec<ClaimData>, DriverError> {
        crate::in_order(payloads, self.concurrency, |p| self.store_one(context, p)).await
    }

    /// Validates every claim, then fetches them in order with bounded concurrency.
    pub async fn retrieve(
        &self,
        namespace: Option<&str>,
        claims: Vec<ClaimData>,
    ) -> Result<Vec<Bytes>, DriverError> {
        let valid = layout::validate_scheme_claims(&claims, &self.scheme, &self.policy, namespace)?;
        crate::in_order(valid, self.concurrency, |c| self.retrieve_one(c)).await
    }
}

pub(crate) fn object_path(key: &str) -> Result<ObjectPath, DriverError> {
    ObjectPath::parse(key)
        .map_err(|e| DriverError::ClaimRefused(format!("key {key:?} is not a valid path: {e}")))
}
