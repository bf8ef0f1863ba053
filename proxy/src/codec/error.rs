//! Errors of the payload codec.

/// Why a payload could not be encoded or decoded.
///
/// Messages name what went wrong and, where one is involved, the key id; they never contain
/// payload contents or key material.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CodecError {
    /// The payload names a key id that is not in the keyring.
    #[error("unknown encryption key id {0:?}")]
    UnknownKey(String),
    /// The payload names a key the namespace it is decoded for may not decrypt with (keys
    /// are bound to namespaces: `decrypt_keys`).
    #[error(
        "encryption key {key_id:?} is not bound to {}: it may not decrypt for it \
         (keys a namespace may decrypt with: its active_key and decrypt_keys)",
        scope_name(namespace)
    )]
    KeyNotBound {
        /// The key the payload named.
        key_id: String,
        /// The namespace it was decoded for.
        namespace: Option<String>,
    },
    /// Decoding would exceed the caller's output budget (e.g. `codec_server.max_decoded_bytes`).
    #[error("decoded size exceeds the remaining budget of {budget} bytes")]
    OverBudget {
        /// What was left of the budget for this payload.
        budget: usize,
    },
    /// AES-GCM authentication failed: wrong key, tampered ciphertext or tampered nonce.
    #[error("authentication failed (tag mismatch) for key {key_id:?}")]
    AuthenticationFailed {
        /// The key the payload named.
        key_id: String,
    },
    /// The encrypted data cannot even hold a nonce and a tag.
    #[error(
        "encrypted payload too short for nonce+tag: {len} bytes, need at least 28 (key {key_id:?})"
    )]
    TooShort {
        /// The key the payload named.
        key_id: String,
        /// Length of the encrypted data.
        len: usize,
    },
    /// The zstd frame is corrupt or truncated.
    #[error("corrupt zstd frame: {0}")]
    CorruptFrame(String),
    /// The zstd frame inflates past `compression.max_decompressed_bytes`.
    #[error(
        "decompressed size exceeds limit of {limit} bytes (compression.max_decompressed_bytes)"
    )]
    DecompressedTooLarge {
        /// The configured limit.
        limit: usize,
    },
    /// The payload is not a well-formed `Payload` message, or one of ours lacks what it needs.
    #[error("malformed outer payload: {0}")]
    Malformed(String),
    /// The key reached the NIST SP 800-38D limit for random 96-bit nonces.
    #[error(
        "key {key_id:?} reached its limit of {limit} encryptions with random nonces \
         (NIST SP 800-38D); configure a new active key"
    )]
    NonceLimitReached {
        /// The exhausted key.
        key_id: String,
        /// The limit (2^32 in production).
        limit: u64,
    },
    /// The AEAD implementation refused to seal (should not happen).
    #[error("encryption failed for key {key_id:?}")]
    EncryptFailed {
        /// The key in use.
        key_id: String,
    },
    /// The operating system's random number generator failed.
    #[error("random number generator failed; refusing to encrypt")]
    Random,
    /// zstd refused to compress (should not happen).
    #[error("compression failed: {0}")]
    Compress(String),
    /// Decompressing would pass the message's or the process's memory budget.
    #[error("{0}")]
    Budget(#[from] crate::budget::Exhausted),
    /// An envelope key's data key is not available: its key service could not be reached (or
    /// has not been asked yet). Retrying later may succeed; nothing was encrypted or decrypted.
    #[error("encryption key {key_id:?} is unavailable: {reason}")]
    KeyUnavailable {
        /// The key-encryption key's id.
        key_id: String,
        /// Why (no key material).
        reason: String,
    },
    /// An envelope key's key service refused to wrap or unwrap a data key (permissions, a
    /// disabled key, or a wrapped key that does not unwrap for this namespace).
    #[error("encryption key {key_id:?}: {reason}")]
    KeyService {
        /// The key-encryption key's id.
        key_id: String,
        /// What the key service said (no key material).
        reason: String,
    },
    /// An envelope key's key service was not asked to unwrap a data key: too many wrapped
    /// keys recently did not unwrap for this namespace (see "Bounding what callers can make
    /// the key service do" in `codec/envelope.rs`). Cached data keys keep working; retrying
    /// later may succeed.
    #[error("encryption key {key_id:?}: {reason}")]
    KeyThrottled {
        /// The key-encryption key's id.
        key_id: String,
        /// Why, and when unwrapping resumes.
        reason: String,
    },
    /// One message or request carries more distinct data keys to unwrap than the caller
    /// allows; the key service was not asked for any of them.
    #[error(
        "{found} or more distinct wrapped data keys not yet unwrapped in one request, more \
         than the {max} allowed; the key service was not asked"
    )]
    TooManyDataKeys {
        /// How many were counted (counting stops one past `max`).
        found: usize,
        /// The cap.
        max: usize,
    },
    /// A worker thread of a batch failed (panicked or was cancelled).
    #[error("codec worker failed: {0}")]
    Worker(String),
}

/// How a namespace is named in messages (`None`: a request without one).
fn scope_name(namespace: &Option<String>) -> String {
    match namespace {
        Some(ns) => format!("namespace {ns:?}"),
        None => "requests without a namespace".to_owned(),
    }
}

/// A batch failed: the lowest index of a payload that failed, and why.
#[derive(Debug, thiserror::Error)]
#[error("payload {index}: {error}")]
pub struct BatchError {
    /// Index of the failed payload in the batch.
    pub index: usize,
    /// What went wrong.
    pub error: CodecError,
}
