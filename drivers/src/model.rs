//! The data every module of the crate shares: claims, where a payload comes from, and why a
//! driver failed (re-exported at the crate root). Imports nothing of the crate, so the root
//! and [`crate::layout`] both depend on it without depending on each other.

use std::collections::BTreeMap;

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
    /// The object is larger than the size its reference declares: refused from the store's
    /// metadata, before its body is read (a tampered object, or a forged reference).
    #[error(
        "stored object of {size} bytes is larger than the {declared} bytes its reference declares"
    )]
    LargerThanDeclared {
        /// The object's size as the store reports it (or as many bytes as were read when
        /// the store reported less).
        size: u64,
        /// The size the reference declares.
        declared: u64,
    },
}
