//! Object storage drivers for Payload Gateway.
//!
//! A payload too large for Temporal's history is written to object storage and replaced by an
//! `ExternalStorageReference` naming the driver and its *claim*: the string map a driver needs to
//! find the object again (`bucket`, `key`, `hash_algorithm`, `hash_value` for `aws.s3driver`).
//! The claim layout is Temporal's, so the SDKs' own drivers read what the gateway writes and the
//! other way round.
//!
//! One trait, one module per backend: [`StorageDriver`] has two per-object operations each
//! backend implements ([`put_absent`](StorageDriver::put_absent) and
//! [`get`](StorageDriver::get)), two for garbage collection ([`list`](StorageDriver::list)
//! and [`delete`](StorageDriver::delete)) and default methods that do the rest the same way for all of
//! them: size limits, content hashing, key layout, claim validation, batches with bounded
//! concurrency and hash verification. Backends: [`s3`] (`aws.s3driver`-compatible, on
//! `aws-sdk-s3`), [`filesystem`] (files under a directory, `object_store`'s on-disk layout)
//! and [`object`] (any `object_store` backend: `memory`, and through it [`gcs`]
//! (`gcp.gcsdriver`-compatible) and [`azure`] (the gateway's `azure.blobdriver`)). Key
//! layout, hashing and claim validation live in [`layout`].
//!
//! An object is never read whole before its size is known: [`get`](StorageDriver::get)
//! refuses, from the store's metadata (`Content-Length`, a file's length), an object larger
//! than the size its reference declares ([`Fetch::declared_size`]) or than the driver's
//! `max_payload_size`, before any of its body is read, and stops reading at that bound. Its
//! SHA-256 is taken as the body arrives, chunk by chunk ([`layout::BoundedBody`]): a driver's
//! `get` hands out only [`Verified`] bytes, and nothing reads an object a second time to
//! verify it.
#![warn(missing_docs)]

pub mod azure;
pub mod filesystem;
pub mod gcs;
pub mod layout;
mod model;
pub mod object;
pub mod s3;

use async_trait::async_trait;
use bytes::Bytes;

pub use crate::layout::Verified;
use crate::layout::{BucketPolicy, ReadLimit, Scheme, ValidClaim};
pub use crate::model::{ClaimData, DriverError, StoreContext, StoreTarget};

/// What every driver is configured with: the name it writes into references, its claim
/// layout, the buckets it serves and its limits. The default methods of [`StorageDriver`]
/// work from these.
#[derive(Debug, Clone)]
pub struct DriverSettings {
    /// The name written into references (`driver_name`), e.g. `aws.s3driver`.
    pub name: String,
    /// Claim fields and key encoding.
    pub scheme: Scheme,
    /// The buckets claims may name; with [`BucketPolicy::OneOf`] the first one is where new
    /// objects are written.
    pub buckets: BucketPolicy,
    /// Largest serialized payload stored or fetched, in bytes.
    pub max_payload_size: u64,
    /// Concurrent per-object operations of one batch.
    pub concurrency: usize,
}

impl DriverSettings {
    /// The bucket new objects are written to (`None` for bucketless backends).
    pub fn write_bucket(&self) -> Option<&str> {
        match &self.buckets {
            BucketPolicy::None => None,
            BucketPolicy::OneOf(buckets) => buckets.first().map(String::as_str),
        }
    }

    /// Validates `claim` for a request in `namespace` (see [`layout::validate_scheme_claim`]).
    pub fn validate(
        &self,
        namespace: Option<&str>,
        claim: &ClaimData,
    ) -> Result<ValidClaim, DriverError> {
        layout::validate_scheme_claim(claim, &self.scheme, &self.buckets, namespace)
    }
}

/// One object to retrieve: its claim and the size its reference declares.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fetch {
    /// The claim naming the object.
    pub claim: ClaimData,
    /// The stored size the reference declares (`external_payloads[0].size_bytes`). An object
    /// larger than this is refused before its body is read
    /// ([`DriverError::LargerThanDeclared`]). `None`: only the driver's `max_payload_size`
    /// bounds it.
    pub declared_size: Option<u64>,
}

impl Fetch {
    /// Fetches of `claims` with no declared size.
    pub fn undeclared(claims: impl IntoIterator<Item = ClaimData>) -> Vec<Fetch> {
        claims.into_iter().map(Fetch::from).collect()
    }
}

impl From<ClaimData> for Fetch {
    fn from(claim: ClaimData) -> Self {
        Fetch {
            claim,
            declared_size: None,
        }
    }
}

/// One stored object, as [`StorageDriver::list`] finds it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListedObject {
    /// Its bucket (`None` for bucketless backends).
    pub bucket: Option<String>,
    /// Its key (the claim's key, as [`layout`] lays it out).
    pub key: String,
    /// Stored size in bytes.
    pub size: u64,
    /// When it was last written.
    pub last_modified: std::time::SystemTime,
}

/// An object storage backend for payloads.
///
/// Drivers are content-addressed: storing the same bytes twice yields the same claim and
/// writes once. A backend implements [`settings`](Self::settings) and the two per-object
/// operations; the batch operations are default methods shared by every backend.
#[async_trait]
pub trait StorageDriver: Send + Sync + std::fmt::Debug {
    /// Name, claim layout, buckets and limits.
    fn settings(&self) -> &DriverSettings;

    /// Per object: creates `key` (in `bucket`, for bucketed backends) holding `payload`
    /// unless an object is there already. The key is content-addressed, so an existing
    /// object, or losing the race to another writer, is success.
    async fn put_absent(
        &self,
        bucket: Option<&str>,
        key: &str,
        payload: Bytes,
    ) -> Result<(), DriverError>;

    /// Per object: reads the object `claim` names and verifies it. An object whose size in
    /// the store's metadata (`Content-Length`, a file's length) fails `limit` is refused
    /// before any of its body is read; the body is read into a [`layout::BoundedBody`], up to
    /// the limit and no further, which hashes each chunk as it arrives: an object whose
    /// SHA-256 is not the claim's is [`DriverError::Integrity`].
    async fn get(&self, claim: &ValidClaim, limit: ReadLimit) -> Result<Verified, DriverError>;

    /// Every object of `bucket` (`None` for bucketless backends) whose key starts with
    /// `prefix`, all pages, in no particular order. Garbage collection
    /// (`payload-gateway storage gc`) and readiness probes use it; payload traffic never does.
    async fn list(
        &self,
        bucket: Option<&str>,
        prefix: &str,
    ) -> Result<Vec<ListedObject>, DriverError>;

    /// Deletes the object `key` of `bucket`; an object already gone is success. Only garbage
    /// collection deletes.
    async fn delete(&self, bucket: Option<&str>, key: &str) -> Result<(), DriverError>;

    /// Checks the store answers: lists a prefix nothing is stored under, in the bucket new
    /// objects are written to (readiness).
    async fn probe(&self) -> Result<(), DriverError> {
        self.list(self.settings().write_bucket(), "v0/readiness-probe/")
            .await
            .map(drop)
    }

    /// The name written into references (`driver_name`), e.g. `aws.s3driver`.
    fn name(&self) -> &str {
        &self.settings().name
    }

    /// Checks a claim without fetching anything: hash algorithm and value present and
    /// supported, bucket served by this driver, key relative, without dot segments and within
    /// `namespace`'s prefix. [`retrieve`](Self::retrieve) runs the same checks; callers that
    /// cache resolved payloads run this before every cache lookup.
    fn validate(&self, namespace: Option<&str>, claim: &ClaimData) -> Result<(), DriverError> {
        self.settings().validate(namespace, claim).map(|_| ())
    }

    /// Stores each payload (serialized `temporal.api.common.v1.Payload` bytes) and returns one
    /// claim per payload, in order: size checked, SHA-256 taken, key laid out for `context`,
    /// object written unless present.
    async fn store(
        &self,
        context: &StoreContext,
        payloads: Vec<Bytes>,
    ) -> Result<Vec<ClaimData>, DriverError> {
        let s = self.settings();
        in_order(payloads, s.concurrency, |payload| async move {
            layout::check_size(payload.len(), s.max_payload_size)?;
            let hex = layout::sha256_hex(&payload);
            let key = layout::object_key_encoded(context, &hex, s.scheme.encoding);
            let bucket = s.write_bucket();
            self.put_absent(bucket, &key, payload).await?;
            Ok(layout::make_scheme_claim(&s.scheme, bucket, &key, &hex))
        })
        .await
    }

    /// Retrieves and verifies the payloads named by `fetches`, in order. `namespace` is the
    /// namespace of the request: a claim outside it is refused. Every claim is validated
    /// before anything is fetched; each object is bounded by its declared size and the
    /// driver's `max_payload_size` before its body is read, and its SHA-256 verified as it
    /// arrives ([`get`](Self::get)).
    async fn retrieve(
        &self,
        namespace: Option<&str>,
        fetches: Vec<Fetch>,
    ) -> Result<Vec<Bytes>, DriverError> {
        let s = self.settings();
        let valid = fetches
            .iter()
            .map(|f| {
                let limit = ReadLimit {
                    max: s.max_payload_size,
                    declared: f.declared_size,
                };
                Ok((s.validate(namespace, &f.claim)?, limit))
            })
            .collect::<Result<Vec<_>, DriverError>>()?;
        in_order(valid, s.concurrency, |(claim, limit)| async move {
            let bytes = self.get(&claim, limit).await?.into_bytes();
            limit.check(bytes.len() as u64)?;
            Ok(bytes)
        })
        .await
    }
}

/// The store context of the unit tests: a workflow in namespace `default`.
#[cfg(test)]
pub(crate) fn test_context() -> StoreContext {
    StoreContext {
        namespace: Some("default".to_owned()),
        target: Some(StoreTarget::Workflow {
            workflow_type: Some("T".to_owned()),
            workflow_id: Some("w 1".to_owned()),
            run_id: None,
        }),
    }
}

/// Runs `op` over `items`, at most `concurrency` at a time, returning the results in order;
/// the first error wins. Every driver's batch calls go through here.
async fn in_order<T, R, Fut>(
    items: Vec<T>,
    concurrency: usize,
    op: impl FnMut(T) -> Fut,
) -> Result<Vec<R>, DriverError>
where
    Fut: std::future::Future<Output = Result<R, DriverError>>,
{
    use futures::{StreamExt, TryStreamExt};
    futures::stream::iter(items.into_iter().map(op))
        .buffered(concurrency.max(1))
        .try_collect()
        .await
}
