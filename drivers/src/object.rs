//! Backends on the `object_store` crate: `memory` (tests). Same key layout as the S3 driver;
//! the claim is `key`, `hash_algorithm`, `hash_value` (no bucket). The `filesystem` driver is
//! [`crate::filesystem`].

use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;
use object_store::memory::InMemory;
use object_store::path::Path as ObjectPath;
use object_store::{ObjectStore, PutMode, PutOptions, PutPayload};

use crate::layout::{self, BucketPolicy, KeyField, ValidClaim};
use crate::{ClaimData, DriverError, StorageDriver, StoreContext};

/// A driver over any [`ObjectStore`].
#[derive(Debug)]
pub struct ObjectStoreDriver {
    name: String,
    store: Arc<dyn ObjectStore>,
    max_payload_size: u64,
    concurrency: usize,
}

impl ObjectStoreDriver {
    /// Objects in process memory.
    pub fn memory(name: impl Into<String>, max_payload_size: u64) -> Self {
        Self::new(name, Arc::new(InMemory::new()), max_payload_size)
    }

    fn new(name: impl Into<String>, store: Arc<dyn ObjectStore>, max_payload_size: u64) -> Self {
        Self {
            name: name.into(),
            store,
            max_payload_size,
            concurrency: 8,
        }
    }

    async fn store_one(
        &self,
        context: &StoreContext,
        payload: Bytes,
    ) -> Result<ClaimData, DriverError> {
        layout::check_size(payload.len(), self.max_payload_size)?;
        let hex = layout::sha256_hex(&payload);
        let key = layout::object_key(context, &hex);
        let path = object_path(&key)?;
        let exists = match self.store.head(&path).await {
            Ok(_) => true,
            Err(object_store::Error::NotFound { .. }) => false,
            Err(e) => return Err(unavailable("head", &key, e)),
        };
        if !exists {
            let opts = PutOptions {
                mode: PutMode::Create,
                ..Default::default()
            };
            match self
                .store
                .put_opts(&path, PutPayload::from_bytes(payload), opts)
                .await
            {
                // Another writer stored the same content first.
                Ok(_) | Err(object_store::Error::AlreadyExists { .. }) => {}
                Err(e) => return Err(unavailable("put", &key, e)),
            }
        }
        Ok(layout::make_claim(None, KeyField::Key, &key, &hex))
    }

    async fn retrieve_one(&self, claim: ValidClaim) -> Result<Bytes, DriverError> {
        let path = object_path(&claim.key)?;
        let result = match self.store.get(&path).await {
            Ok(r) => r,
            Err(object_store::Error::NotFound { .. }) => {
                return Err(DriverError::NotFound(claim.key.clone()));
            }
            Err(e) => return Err(unavailable("get", &claim.key, e)),
        };
        layout::check_size(result.meta.size as usize, self.max_payload_size)?;
        let bytes = result
            .bytes()
            .await
            .map_err(|e| unavailable("get", &claim.key, e))?;
        layout::verify(&claim, &bytes)?;
        Ok(bytes)
    }
}

fn object_path(key: &str) -> Result<ObjectPath, DriverError> {
    ObjectPath::parse(key)
        .map_err(|e| DriverError::ClaimRefused(format!("key {key:?} is not a valid path: {e}")))
}

fn unavailable(op: &str, key: &str, e: object_store::Error) -> DriverError {
    DriverError::Unavailable(format!("{op} {key}: {e}"))
}

#[async_trait]
impl StorageDriver for ObjectStoreDriver {
    fn name(&self) -> &str {
        &self.name
    }

    fn validate(&self, namespace: Option<&str>, claim: &ClaimData) -> Result<(), DriverError> {
        layout::validate_claim(claim, KeyField::Key, &BucketPolicy::None, namespace).map(|_| ())
    }

    async fn store(
        &self,
        context: &StoreContext,
        payloads: Vec<Bytes>,
    ) -> Result<Vec<ClaimData>, DriverError> {
        crate::in_order(payloads, self.concurrency, |p| self.store_one(context, p)).await
    }

    async fn retrieve(
        &self,
        namespace: Option<&str>,
        claims: Vec<ClaimData>,
    ) -> Result<Vec<Bytes>, DriverError> {
        let valid =
            layout::validate_claims(&claims, KeyField::Key, &BucketPolicy::None, namespace)?;
        crate::in_order(valid, self.concurrency, |c| self.retrieve_one(c)).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::StoreTarget;

    fn ctx() -> StoreContext {
        StoreContext {
            namespace: Some("default".to_owned()),
            target: Some(StoreTarget::Workflow {
                workflow_type: Some("T".to_owned()),
                workflow_id: Some("w 1".to_owned()),
                run_id: None,
            }),
        }
    }

    async fn round_trip(driver: &ObjectStoreDriver) {
        let payloads = vec![Bytes::from_static(b"one"), Bytes::from(vec![7u8; 100_000])];
        let claims = driver.store(&ctx(), payloads.clone()).await.unwrap();
        assert!(claims[0]["key"].starts_with("v0/ns/default/wt/T/wi/w%201/ri/null/d/sha256/"));
        assert!(!claims[0].contains_key("bucket"));
        // Same content again: same claim.
        let again = driver.store(&ctx(), payloads.clone()).await.unwrap();
        assert_eq!(claims, again);
        let back = driver
            .retrieve(Some("default"), claims.clone())
            .await
            .unwrap();
        assert_eq!(back, payloads);
        let err = driver.retrieve(Some("other"), claims).await.unwrap_err();
        assert!(matches!(err, DriverError::ClaimRefused(_)), "{err}");
    }

    #[tokio::test]
    async fn memory_round_trip() {
        round_trip(&ObjectStoreDriver::memory("mem", 1 << 20)).await;
    }

    #[tokio::test]
    async fn too_large_is_refused() {
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
    }
}
