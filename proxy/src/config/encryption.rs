//! `[encryption]`, `[compression]` and `[namespaces.<ns>]`: what the codec does to payloads.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// `[encryption]`: AES-256-GCM in the layout of Temporal's sample encryption codec.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct EncryptionConfig {
    /// Encrypt outgoing payloads. When on, a payload that cannot be encrypted fails its RPC.
    pub enabled: bool,
    /// Id of the key that encrypts new payloads (namespaces may override).
    pub active_key: Option<String>,
    /// Every key that can decrypt; the active key must be among them.
    pub keys: Vec<KeySpec>,
    /// Keys namespaces without their own `decrypt_keys` may decrypt with, besides their active
    /// key. Unset: every key that is no namespace's active key and not listed in a namespace's
    /// own `decrypt_keys` (so a single-tenant keyring keeps decrypting with all its keys, and
    /// one namespace's key never silently decrypts for another). See SECURITY.md.
    pub decrypt_keys: Option<Vec<String>>,
    /// Where the development key lives when `enabled` and no keys are configured.
    pub dev_key_file: PathBuf,
    /// gRPC methods (full paths, `/temporal.api.x.v1.Service/Method`) that the gateway's
    /// descriptors do not know and that may nevertheless be forwarded untouched where
    /// encryption applies. Without an entry such a method is refused (`UNIMPLEMENTED`),
    /// because the gateway cannot see whether it carries payloads. Namespaces may override.
    pub forward_unknown_methods: Vec<String>,
    /// `google.protobuf.Any` type names (`pkg.Message`) unknown to the descriptors that may be
    /// forwarded untouched inside requests where encryption applies; without an entry such a
    /// request is refused (`FAILED_PRECONDITION`). Namespaces may override.
    pub forward_unknown_any_types: Vec<String>,
    /// Seal failures where encryption applies: move every `Failure`'s `message` and
    /// `stack_trace` into an encrypted `encoded_attributes` (the SDKs'
    /// `encode_common_attributes` format). Namespaces may override.
    pub seal_failures: bool,
    /// Envelope keys (`kms = ...`): a data key encrypts new payloads of a namespace for at most
    /// this many seconds; a new one is made (one KMS call) ahead of that, off the hot path.
    pub dek_rotation_s: u64,
    /// Envelope keys: how many unwrapped data keys are kept for decryption (an LRU; a miss
    /// is one KMS call).
    pub dek_cache_size: usize,
    /// Envelope keys: upper bound of one call to a key service, retries included; past it
    /// the call counts as unavailable.
    pub kms_timeout_ms: u64,
    /// Envelope keys: a key service no call used for this many seconds is probed once (a
    /// wrap of a throwaway data key) so readiness stays true; `0`: only unreachable ones are
    /// probed (with backoff, until they answer). See "Start degraded" in RELIABILITY.md.
    pub kms_probe_interval_s: u64,
}

impl Default for EncryptionConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            active_key: None,
            keys: Vec::new(),
            decrypt_keys: None,
            dev_key_file: PathBuf::from("./data/dev.key"),
            forward_unknown_methods: Vec::new(),
            forward_unknown_any_types: Vec::new(),
            seal_failures: true,
            dek_rotation_s: 3600,
            dek_cache_size: 1000,
            kms_timeout_ms: 5000,
            kms_probe_interval_s: 300,
        }
    }
}

impl EncryptionConfig {
    /// Checks the envelope settings.
    pub(crate) fn validate_envelope(&self) -> Result<(), super::ConfigError> {
        use super::ConfigError;
        if self.dek_rotation_s == 0 {
            return Err(ConfigError::invalid(
                "encryption.dek_rotation_s",
                "must be at least 1",
            ));
        }
        if self.dek_cache_size == 0 {
            return Err(ConfigError::invalid(
                "encryption.dek_cache_size",
                "must be at least 1",
            ));
        }
        if self.kms_timeout_ms == 0 {
            return Err(ConfigError::invalid(
                "encryption.kms_timeout_ms",
                "must be at least 1",
            ));
        }
        for (i, key) in self.keys.iter().enumerate() {
            let sources = [key.file.is_some(), key.env.is_some(), key.kms.is_some()];
            if sources.iter().filter(|s| **s).count() != 1 {
                return Err(ConfigError::invalid(
                    format!("encryption.keys[{i}]"),
                    "give exactly one of `file`, `env` or `kms`",
                ));
            }
        }
        Ok(())
    }
}

/// One key: an id and where it comes from: 32 bytes (raw or base64) in a file or an
/// environment variable, or a key-encryption key in a key service (`kms`, envelope
/// encryption).
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct KeySpec {
    /// The id written to `encryption-key-id`.
    pub id: String,
    /// A file holding the key.
    pub file: Option<PathBuf>,
    /// An environment variable holding the key.
    pub env: Option<String>,
    /// A key-encryption key in a key service, by URI (`awskms:///arn:aws:kms:...`): payloads
    /// are encrypted with data keys it wraps (envelope encryption).
    pub kms: Option<String>,
}

/// `[compression]`: zstd.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct CompressionConfig {
    /// Compress outgoing payloads.
    pub enabled: bool,
    /// zstd level (1 fastest .. 22 smallest).
    pub level: i32,
    /// Payloads smaller than this (serialized bytes) are not compressed.
    pub min_size: usize,
    /// Largest size a payload may inflate to on decompression.
    pub max_decompressed_bytes: usize,
}

impl Default for CompressionConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            level: 3,
            min_size: 256,
            max_decompressed_bytes: 256 * 1024 * 1024,
        }
    }
}

/// `[namespaces.<name>]`: overrides for one namespace.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct NamespaceConfig {
    /// Encryption on or off for this namespace.
    pub encryption: Option<bool>,
    /// The key that encrypts this namespace's new payloads.
    pub active_key: Option<String>,
    /// Keys this namespace may still decrypt with besides its active key (rotation: its old
    /// keys). Unset: `encryption.decrypt_keys` and its default. Payloads naming any other key
    /// are refused when decoded for this namespace.
    pub decrypt_keys: Option<Vec<String>>,
    /// Failure sealing on or off for this namespace (only where encryption applies).
    pub seal_failures: Option<bool>,
    /// Compression on or off for this namespace.
    pub compression: Option<bool>,
    /// Offload on or off for this namespace.
    pub storage: Option<bool>,
    /// The driver that stores this namespace's payloads.
    pub storage_driver: Option<String>,
    /// The offload threshold for this namespace.
    pub storage_threshold: Option<usize>,
    /// Other namespaces whose offloaded payloads requests in this namespace may resolve. A
    /// reference is otherwise only resolved under the requesting namespace's own key prefix;
    /// Temporal itself moves payloads across namespaces for Nexus operations (the caller's
    /// input reaches the handler's namespace, the result comes back), so the caller's and the
    /// handler's namespaces list each other here.
    pub storage_read_namespaces: Vec<String>,
    /// This namespace's own list instead of `encryption.forward_unknown_methods`.
    pub forward_unknown_methods: Option<Vec<String>>,
    /// This namespace's own list instead of `encryption.forward_unknown_any_types`.
    pub forward_unknown_any_types: Option<Vec<String>>,
    /// The `[upstreams.<name>]` that serves this namespace; unset: `proxy.upstream`. Every
    /// request naming this namespace goes there, and only there.
    pub upstream: Option<String>,
    /// This namespace's own protected search attributes instead of `[search_attributes]`.
    pub search_attributes: Option<super::SearchAttributesConfig>,
}
