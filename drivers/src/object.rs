//! Drivers on the `object_store` crate: one [`ObjectStore`] client per bucket (or container),
//! content-addressed writes (metadata lookup, then a create-only upload) and bounded reads.
//! `memory` (tests) is built here; [`crate::gcs`] and [`crate::azure`] only build their
//! clients and pick an [`Upload`]. The `filesystem` driver is [`crate::filesystem`].

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use futures::StreamExt;
use object_store::memory::InMemory;
use object_store::path::Path as ObjectPath;
use object_store::{ClientOptions, ObjectStore, PutMode, PutOptions, PutPayload, RetryConfig};

use crate::layout::{BoundedBody, BucketPolicy, ReadLimit, Scheme, ValidClaim};
use crate::{DriverError, DriverSettings, ListedObject, StorageDriver, Verified};

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
pub trait Upload: Send + Sync + std::fmt::Debug {
    /// Creates `key` in `bucket` (through `store`, or the backend's own API) holding
    /// `payload` unless it exists; losing the race to another writer of the same
    /// (content-addressed) object is success. `url` names the object in errors.
    async fn create(
        &self,
        store: &dyn ObjectStore,
        bucket: &str,
        key: &str,
        url: &str,
        payload: Bytes,
    ) -> Result<(), DriverError>;
}

/// [`Upload`] through `object_store`'s conditional put ([`PutMode::Create`]; Azure:
/// `If-None-Match: *`).
#[derive(Debug, Default, Clone, Copy)]
pub struct PutCreate;

#[async_trait]
impl Upload for PutCreate {
    async fn create(
        &self,
        store: &dyn ObjectStore,
        _bucket: &str,
        key: &str,
        url: &str,
        payload: Bytes,
    ) -> Result<(), DriverError> {
        let opts = PutOptions {
            mode: PutMode::Create,
            ..Default::default()
        };
        match store
            .put_opts(&object_path(key)?, PutPayload::from_bytes(payload), opts)
            .await
        {
            Ok(_)
            | Err(object_store::Error::AlreadyExists { .. })
            | Err(object_store::Error::Precondition { .. }) => Ok(()),
            Err(e) => Err(DriverError::Unavailable(format!("put {url}: {e}"))),
        }
    }
}

/// A driver over one [`ObjectStore`] per bucket: writes go to the first bucket, claims naming
/// any configured bucket are resolved. Bucketless (`memory`): one store under the name `""`.
#[derive(Debug)]
pub struct ObjectStoreDriver<U = PutCreate> {
    settings: DriverSettings,
    /// `gs`, `az`, `memory`: the URL scheme in error messages.
    url_scheme: &'static str,
    stores: HashMap<String, Arc<dyn ObjectStore>>,
    upload: U,
    /// Bound of one operation including the client's retries.
    timeout: Duration,
}

impl ObjectStoreDriver<PutCreate> {
    /// Objects in process memory.
    pub fn memory(name: impl Into<String>, max_payload_size: u64) -> Self {
        let store: Arc<dyn ObjectStore> = Arc::new(InMemory::new());
        Self {
            settings: DriverSettings {
                name: name.into(),
                scheme: Scheme::S3,
                buckets: BucketPolicy::None,
                max_payload_size,
                concurrency: 8,
            },
            url_scheme: "memory",
            stores: HashMap::from([(String::new(), store)]),
            upload: PutCreate,
            timeout: Duration::from_secs(60),
        }
    }
}

/// What a bucketed backend is built from.
pub(crate) struct Bucketed<'a> {
    pub name: String,
    /// `gs`, `az`: the URL scheme in error messages.
    pub url_scheme: &'static str,
    pub scheme: Scheme,
    pub write_bucket: &'a str,
    pub read_buckets: &'a [String],
    pub max_payload_size: u64,
    pub concurrency: usize,
    pub timeout: Duration,
}

impl<U: Upload> ObjectStoreDriver<U> {
    /// Builds the driver with `make` called once per bucket (write bucket first, each bucket
    /// once) and `upload` for new objects, built from the write bucket's client.
    pub(crate) fn bucketed(
        b: Bucketed<'_>,
        mut make: impl FnMut(&str) -> Result<Arc<dyn ObjectStore>, object_store::Error>,
        upload: impl FnOnce() -> Result<U, DriverError>,
    ) -> Result<Self, DriverError> {
        let mut buckets = vec![b.write_bucket.to_owned()];
        for r in b.read_buckets {
            if !buckets.contains(r) {
                buckets.push(r.clone());
            }
        }
        let mut stores = HashMap::new();
        for bucket in &buckets {
            let store = make(bucket).map_err(|e| {
                DriverError::Unavailable(format!(
                    "cannot configure {}://{bucket}: {e}",
                    b.url_scheme
                ))
            })?;
            stores.insert(bucket.clone(), store);
        }
        Ok(Self {
            settings: DriverSettings {
                name: b.name,
                scheme: b.scheme,
                buckets: BucketPolicy::OneOf(buckets),
                max_payload_size: b.max_payload_size,
                concurrency: b.concurrency,
            },
            url_scheme: b.url_scheme,
            stores,
            upload: upload()?,
            timeout: b.timeout,
        })
    }

    fn url(&self, bucket: &str, key: &str) -> String {
        format!("{}://{bucket}/{key}", self.url_scheme)
    }

    fn client(&self, bucket: &str) -> Result<&Arc<dyn ObjectStore>, DriverError> {
        self.stores.get(bucket).ok_or_else(|| {
            DriverError::ClaimRefused(format!("{bucket:?} is not configured for this driver"))
        })
    }

    /// Runs `call` within the driver's timeout.
    async fn bounded<T>(
        &self,
        op: &str,
        url: &str,
        call: impl std::future::Future<Output = Result<T, DriverError>>,
    ) -> Result<T, DriverError> {
        tokio::time::timeout(self.timeout, call)
            .await
            .unwrap_or_else(|_| {
                Err(DriverError::Unavailable(format!(
                    "{op} {url}: timed out after {:?}",
                    self.timeout
                )))
            })
    }
}

#[async_trait]
impl<U: Upload> StorageDriver for ObjectStoreDriver<U> {
    fn settings(&self) -> &DriverSettings {
        &self.settings
    }

    async fn put_absent(
        &self,
        bucket: Option<&str>,
        key: &str,
        payload: Bytes,
    ) -> Result<(), DriverError> {
        let bucket = bucket.unwrap_or_default();
        let store = self.client(bucket)?;
        let path = object_path(key)?;
        let url = self.url(bucket, key);
        self.bounded("store", &url, async {
            match store.head(&path).await {
                Ok(_) => return Ok(()),
                Err(object_store::Error::NotFound { .. }) => {}
                Err(e) => return Err(unavailable("head", &url, e)),
            }
            self.upload
                .create(store.as_ref(), bucket, key, &url, payload)
                .await
        })
        .await
    }

    async fn get(&self, claim: &ValidClaim, limit: ReadLimit) -> Result<Verified, DriverError> {
        let bucket = claim.bucket.as_deref().unwrap_or_default();
        let store = self.client(bucket)?;
        let path = object_path(&claim.key)?;
        let url = self.url(bucket, &claim.key);
        self.bounded("get", &url, async {
            let result = match store.get(&path).await {
                Ok(r) => r,
                Err(object_store::Error::NotFound { .. }) => {
                    return Err(DriverError::NotFound(url.clone()));
                }
                Err(e) => return Err(unavailable("get", &url, e)),
            };
            // The size from the response headers: nothing of the body is read yet, and
            // dropping `result` closes the connection.
            limit.check(result.meta.size)?;
            let mut body = BoundedBody::new(claim, limit, result.meta.size);
            let mut chunks = result.into_stream();
            while let Some(chunk) = chunks.next().await {
                body.push(chunk.map_err(|e| unavailable("get", &url, e))?)?;
            }
            body.finish()
        })
        .await
    }

    async fn list(
        &self,
        bucket: Option<&str>,
        prefix: &str,
    ) -> Result<Vec<ListedObject>, DriverError> {
        let bucket = bucket.unwrap_or_default();
        let store = self.client(bucket)?;
        let url = self.url(bucket, prefix);
        // `object_store` lists by whole path segments: list the directory the prefix lies
        // in, keep the keys that start with it.
        let dir = match prefix.rsplit_once('/') {
            Some((dir, _)) if !dir.is_empty() => Some(object_path(dir)?),
            _ => None,
        };
        self.bounded("list", &url, async {
            let mut out = Vec::new();
            let mut listing = store.list(dir.as_ref());
            while let Some(meta) = listing.next().await {
                let meta = meta.map_err(|e| unavailable("list", &url, e))?;
                let key = meta.location.as_ref();
                if !key.starts_with(prefix) {
                    continue;
                }
                let millis = u64::try_from(meta.last_modified.timestamp_millis()).unwrap_or(0);
                out.push(ListedObject {
                    bucket: match self.settings.buckets {
                        BucketPolicy::None => None,
                        BucketPolicy::OneOf(_) => Some(bucket.to_owned()),
                    },
                    key: key.to_owned(),
                    size: meta.size,
                    last_modified: std::time::UNIX_EPOCH + Duration::from_millis(millis),
                });
            }
            Ok(out)
        })
        .await
    }

    async fn delete(&self, bucket: Option<&str>, key: &str) -> Result<(), DriverError> {
        let bucket = bucket.unwrap_or_default();
        let store = self.client(bucket)?;
        let path = object_path(key)?;
        let url = self.url(bucket, key);
        self.bounded("delete", &url, async {
            match store.delete(&path).await {
                Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
                Err(e) => Err(unavailable("delete", &url, e)),
            }
        })
        .await
    }
}

fn unavailable(op: &str, url: &str, e: object_store::Error) -> DriverError {
    DriverError::Unavailable(format!("{op} {url}: {e}"))
}

pub(crate) fn object_path(key: &str) -> Result<ObjectPath, DriverError> {
    ObjectPath::parse(key)
        .map_err(|e| DriverError::ClaimRefused(format!("key {key:?} is not a valid path: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Fetch, test_context as ctx};

    #[tokio::test]
    async fn memory_round_trip() {
        let driver = ObjectStoreDriver::memory("mem", 1 << 20);
        let payloads = vec![Bytes::from_static(b"one"), Bytes::from(vec![7u8; 100_000])];
        let claims = driver.store(&ctx(), payloads.clone()).await.unwrap();
        assert!(claims[0]["key"].starts_with("v0/ns/default/wt/T/wi/w%201/ri/null/d/sha256/"));
        assert!(!claims[0].contains_key("bucket"));
        // Same content again: same claim.
        let again = driver.store(&ctx(), payloads.clone()).await.unwrap();
        assert_eq!(claims, again);
        let back = driver
            .retrieve(Some("default"), Fetch::undeclared(claims.clone()))
            .await
            .unwrap();
        assert_eq!(back, payloads);
        let err = driver
            .retrieve(Some("other"), Fetch::undeclared(claims))
            .await
            .unwrap_err();
        assert!(matches!(err, DriverError::ClaimRefused(_)), "{err}");
    }

    #[tokio::test]
    async fn too_large_and_larger_than_declared_are_refused() {
        let driver = ObjectStoreDriver::memory("mem", 10);
        let err = driver
            .store(&ctx(), vec![Bytes::from(vec![0u8; 11])])
            .await
            .unwrap_err();
        assert!(
            matches!(
                err,
                DriverError::TooLarge {
                    size: 11,
                    limit: 10
                }
            ),
            "{err}"
        );
        let claims = driver
            .store(&ctx(), vec![Bytes::from(vec![0u8; 10])])
            .await
            .unwrap();
        let fetch = |declared| Fetch {
            claim: claims[0].clone(),
            declared_size: Some(declared),
        };
        let err = driver
            .retrieve(Some("default"), vec![fetch(9)])
            .await
            .unwrap_err();
        assert!(
            matches!(
                err,
                DriverError::LargerThanDeclared {
                    size: 10,
                    declared: 9
                }
            ),
            "{err}"
        );
        let back = driver.retrieve(Some("default"), vec![fetch(10)]).await;
        assert_eq!(back.unwrap()[0].len(), 10);
    }
}

#[cfg(test)]
mod hash_on_arrival {
    use super::*;
    use crate::test_context as ctx;
    use object_store::local::LocalFileSystem;

    fn limit() -> ReadLimit {
        ReadLimit {
            max: 8 << 20,
            declared: None,
        }
    }

    fn is_hash_error(err: &DriverError) -> bool {
        matches!(err, DriverError::Integrity(_)) && err.to_string().contains("hash mismatch")
    }

    /// The in-memory store (the body arrives in one chunk) and `object_store`'s
    /// `LocalFileSystem` (in many chunks): an object replaced in the store behind the
    /// driver, byte for byte the same length, is refused by `get` with the hash error.
    #[tokio::test]
    async fn get_refuses_an_object_changed_in_the_store() {
        let payload = Bytes::from(
            (0..(3usize << 20))
                .map(|i| (i % 251) as u8)
                .collect::<Vec<u8>>(),
        );
        let mut tampered = payload.to_vec();
        tampered[2_000_000] ^= 0x40;
        let tampered = Bytes::from(tampered);

        let memory = ObjectStoreDriver::memory("mem", 8 << 20);
        let dir = tempfile::tempdir().unwrap();
        let local = ObjectStoreDriver::bucketed(
            Bucketed {
                name: "local".to_owned(),
                url_scheme: "file",
                scheme: Scheme::S3,
                write_bucket: "b",
                read_buckets: &[],
                max_payload_size: 8 << 20,
                concurrency: 2,
                timeout: Duration::from_secs(20),
            },
            |_| Ok(Arc::new(LocalFileSystem::new_with_prefix(dir.path())?)),
            || Ok(PutCreate),
        )
        .unwrap();
        for driver in [&memory, &local] {
            let claims = driver.store(&ctx(), vec![payload.clone()]).await.unwrap();
            let valid = driver
                .settings()
                .validate(Some("default"), &claims[0])
                .unwrap();
            assert_eq!(
                driver.get(&valid, limit()).await.unwrap().into_bytes(),
                payload
            );
            let store = driver
                .client(valid.bucket.as_deref().unwrap_or_default())
                .unwrap();
            let path = object_path(&valid.key).unwrap();
            store
                .put(&path, PutPayload::from_bytes(tampered.clone()))
                .await
                .unwrap();
            let err = driver.get(&valid, limit()).await.unwrap_err();
            assert!(is_hash_error(&err), "{}: {err}", driver.settings().name);
            let err = driver
                .retrieve(Some("default"), crate::Fetch::undeclared(claims))
                .await
                .unwrap_err();
            assert!(is_hash_error(&err), "{}: {err}", driver.settings().name);
        }
    }
}
