//! Object storage drivers for Payload Gateway.
//!
//! A payload too large for Temporal's history is written to object storage and replaced by an
//! `ExternalStorageReference` naming the driver and its *claim*: the string map a driver needs to
//! find the object again (`bucket`, `key`, `hash_algorithm`, `hash_value` for `aws.s3driver`).
//! The claim layout is Temporal's, so the SDKs' own drivers read what the gateway writes and the
//! other way round.
//!
//! Each backend lives in a module of its own and implements [`StorageDriver`]:
//! [`s3`] (`aws.s3driver`-compatible, on `aws-sdk-s3`), [`gcs`] (`gcp.gcsdriver`-compatible,
//! on `object_store`), [`azure`] (the gateway's `azure.blobdriver`, on `object_store`),
//! [`filesystem`] (files under a directory, `object_store`'s on-disk layout) and [`object`]
//! (`memory`, on `object_store`). Key layout, hashing and claim
//! validation are shared in [`layout`]; the GCS and Azure drivers share their store/retrieve
//! logic in a private module.
#![warn(missing_docs)]

pub mod azure;
mod cloud;
pub mod filesystem;
pub mod gcs;
pub mod layout;
pub mod object;
pub mod s3;

use std::collections::BTreeMap;

use async_trait::async_trait;
use bytes::Bytes;

/// Claim data: what a driver needs to retrieve a stored payload (bucket, key, hash, ...).
pub type ClaimData = BTreeMap<String, String>;

/// Where a payload comes from, used to build readable, namespace-scoped object keys.
///
/// Every field is optional: the gateway fills in what the request carries.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StoreContext {
    /// The Temporal namespace of the request.
    pub namespace: Option<String>,
    /// The workflow or activity the payload belongs to, when known.
    pub target: Option<StoreTarget>,
}

/// The execution a stored payload belongs to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreTarget {
    /// A workflow execution.
    Workflow {
        /// Workflow type name.
        workflow_type: Option<String>,
        /// Workflow id.
        workflow_id: Option<String>,
        /// Run id.
        run_id: Option<String>,
    },
    /// An activity execution.
    Activity {
        /// Activity type name.
        activity_type: Option<String>,
        /// Activity id.
        activity_id: Option<String>,
        /// Run id.
        run_id: Option<String>,
    },
}

/// Why a driver could not store or retrieve a payload.
#[derive(Debug, thiserror::Error)]
pub enum DriverError {
    /// The backend could not be reached or answered with a transient error; retrying may help.
    #[error("storage unavailable: {0}")]
    Unavailable(String),
    /// The payload is larger than the driver's configured maximum.
    #[error("payload of {size} bytes exceeds the storage limit of {limit} bytes")]
    TooLarge {
        /// Size of the payload that was refused.
        size: u64,
        /// The configured limit.
        limit: u64,
    },
    /// The claim is malformed, names a bucket the driver does not serve, or escapes the
    /// namespace's prefix.
    #[error("claim refused: {0}")]
    ClaimRefused(String),
    /// The object named by the claim does not exist.
    #[error("stored payload not found: {0}")]
    NotFound(String),
    /// The stored bytes do not match the hash recorded in the claim.
    #[error("stored payload failed verification: {0}")]
    Integrity(String),
}

/// An object storage backend for payloads.
///
/// Drivers are content-addressed: storing the same bytes twice yields the same claim and
/// writes once.
#[async_trait]
pub trait StorageDriver: Send + Sync + std::fmt::Debug {
    /// The name written into references (`driver_name`), e.g. `aws.s3driver`.
    fn name(&self) -> &str;

    /// Checks a claim without fetching anything: hash algorithm and value present and
    /// supported, bucket served by this driver, key relative, without dot segments and within
    /// `namespace`'s prefix. [`retrieve`](Self::retrieve) runs the same checks; callers that
    /// cache resolved payloads run this before every cache lookup.
    fn validate(&self, namespace: Option<&str>, claim: &ClaimData) -> Result<(), DriverError>;

    /// Stores each payload (serialized `temporal.api.common.v1.Payload` bytes) and returns one
    /// claim per payload, in order.
    async fn store(
        &self,
        context: &StoreContext,
        payloads: Vec<Bytes>,
    ) -> Result<Vec<ClaimData>, DriverError>;

    /// Retrieves and verifies the payloads named by `claims`, in order. `namespace` is the
    /// namespace of the request: a claim outside it is refused.
    async fn retrieve(
        &self,
        namespace: Option<&str>,
        claims: Vec<ClaimData>,
    ) -> Result<Vec<Bytes>, DriverError>;
}

/// Runs `op` over `items`, at most `concurrency` at a time, returning the results in order;
/// the first error wins. Every driver's batch calls go through here.
pub(crate) async fn in_order<T, R, Fut>(
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
