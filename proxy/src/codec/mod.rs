//! The payload codec: zstd compression and AES-256-GCM encryption of Temporal `Payload`s in
//! the wire format of Temporal's own codecs, so the official SDKs' sample codecs read what the
//! gateway writes and the other way round.
//!
//! # Format
//!
//! Encoding takes the serialized `temporal.api.common.v1.Payload` exactly as given (it is never
//! re-encoded, so unknown fields survive) and wraps it in up to two layers, innermost first:
//!
//! 1. **Compression** (when on for the namespace, the payload is at least
//!    `compression.min_size` bytes, the result is smaller than the input and, from 1 MiB on,
//!    one of three 16 KiB samples shrinks: see `zstd_layer::worth_compressing`): a new payload with
//!    `metadata["encoding"] = "binary/zstd"` and `data` = one zstd frame (level
//!    `compression.level`, content size recorded) of the serialized payload.
//! 2. **Encryption** (when on for the namespace): a new payload with
//!    `metadata["encoding"] = "binary/encrypted"`, `metadata["encryption-key-id"] = <key id>`
//!    and `data` = 12-byte random nonce ‖ AES-256-GCM ciphertext ‖ 16-byte tag of the serialized
//!    inner payload, no associated data (Temporal's sample encryption codec for Go, Python and
//!    TypeScript).
//!
//! Decoding undoes the layers in reverse: `binary/encrypted` is decrypted with the key it
//! names ([`PayloadCodec::decode`]: any key of the keyring; [`PayloadCodec::decode_for`]: only
//! a key bound to the namespace, see `DecryptSets` in `keys.rs`), then a `binary/zstd` inner
//! payload is decompressed; a `binary/zstd` payload on its own is decompressed; anything else
//! is "not ours" and stays unchanged. Decompression is bounded by
//! `compression.max_decompressed_bytes` (or a smaller budget given to
//! [`PayloadCodec::decode_for_within`]): the output grows only up to the limit (a frame
//! declaring or producing more is refused, without inflating the rest) and the zstd window a frame may ask for is capped at the limit's next
//! power of two (at least 8 MiB, at most 128 MiB), so a decompression bomb costs at most the
//! limit plus that window in memory.
//!
//! # Fail closed
//!
//! When encryption is on for a namespace, every failure (no usable key, nonce limit, random
//! number generator, compression) is an error: a payload is never passed on in plaintext.
//!
//! # Keys and nonces
//!
//! Keys are 32 bytes, from a file or an environment variable, raw or standard base64 (see
//! `[encryption]` in the configuration). Without configured keys, a development key (id
//! `dev`) is read from or generated at `encryption.dev_key_file`, with a loud warning.
//! [`PayloadCodec::reload`] swaps the whole keyring and policy atomically: in-flight work
//! finishes with the keyring it started with; a failed reload keeps the old one.
//!
//! Nonces are 96 random bits from AWS-LC's generator (seeded from the operating system), or the
//! kernel's `getrandom` while that is still seeding after start (`nonce.rs`).
//! NIST SP 800-38D §8.3 limits random-nonce AES-GCM to 2^32 messages per key (collision
//! probability ≤ 2^-32). The codec counts encryptions per key (across reloads, as long as the
//! id keeps the same key material), warns once at 50 %, 75 % and 90 % of 2^32, and refuses to
//! encrypt with that key at the limit: configure a new `active_key` before then. The counts
//! are exposed by [`PayloadCodec::encryption_counts`] for metrics. Counts live in memory: a
//! restart starts them at zero again, so keys should be rotated on a schedule well inside the
//! limit as well.
//!
//! # AES-GCM implementation
//!
//! `aws-lc-rs`, chosen by measurement against `ring` and RustCrypto `aes-gcm` on the target
//! machine (see the "Codec" section of `BENCHMARKS.md`,
//! `cargo bench -p payload-gateway-benches --bench codec`). The tests check the wire layout
//! with `ring` and `aes-gcm` as independent implementations.
//!
//! # Batches
//!
//! [`PayloadCodec::encode_batch`] and [`PayloadCodec::decode_batch`] run the payloads of one
//! message inline on the calling task when they total less than
//! [`DEFAULT_PARALLEL_THRESHOLD`] bytes (a thread hop costs more than the work), and otherwise
//! split them into byte-balanced groups, one per core, on tokio's blocking pool, so large
//! payloads never stall the async workers. The threshold was measured by the `codec` bench.

mod envelope;
mod error;
mod keys;
mod nonce;
pub(crate) mod wire;
mod zstd_layer;

#[cfg(test)]
mod envelope_tests;
#[cfg(test)]
mod tests;

use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use arc_swap::ArcSwap;
use aws_lc_rs::aead::NONCE_LEN;
use aws_lc_rs::rand::SystemRandom;
use bytes::{Bytes, BytesMut};

use crate::budget::MessageBudget;
use crate::buffers::{self, PooledBuf};
use crate::config::{Config, ConfigError};
use crate::kms::KeyEncryptionKey;
use crate::policy::ByNamespace;
use envelope::{DekManager, DekSettings};
pub use envelope::{KeyServiceState, PROBE_BACKOFF, PROBE_MAX_BACKOFF};
pub use error::{BatchError, CodecError};
pub use keys::generate_key_base64;
use keys::{CounterRegistry, KeyEntry, NONCE_LIMIT, TAG_LEN};
pub use wire::WirePayload;
use wire::{DATA_HEADER_MAX, ENCODING_ENCRYPTED, ENCODING_KEY, ENCODING_ZSTD};

/// Distinct data keys one gRPC message may make the key service unwrap (a history page
/// holds payloads of a few data keys; see "Bounding what callers can make the key service
/// do" in `codec/envelope.rs`).
pub const MAX_DATA_KEYS_PER_MESSAGE: usize = 256;

/// Batches totalling fewer bytes than this run inline; larger ones run in parallel.
pub const DEFAULT_PARALLEL_THRESHOLD: usize = 256 * 1024;

/// Compresses and encrypts outgoing payloads, decrypts and decompresses incoming ones.
///
/// Cheap to clone: all clones share one keyring (and see each other's reloads).
#[derive(Clone)]
pub struct PayloadCodec {
    inner: Arc<Inner>,
}

struct Inner {
    state: ArcSwap<State>,
    counters: CounterRegistry,
    /// Key generation (the development key).
    rng: SystemRandom,
    nonces: nonce::NonceSource,
    nonce_limit: u64,
    parallel_threshold: AtomicUsize,
    /// Data keys of envelope keys (kept across reloads).
    deks: Arc<DekManager>,
    /// Builds key-encryption keys from their URIs ([`crate::kms::connect`]).
    connector: Connector,
    /// Data-key limits that are not configuration (tests shorten them).
    tuning: DekTuning,
    /// Whether the key-service prober runs ([`PayloadCodec::watch_key_services`]).
    watching: std::sync::OnceLock<()>,
}

/// A key-encryption key's service as readiness reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyServiceStatus {
    /// The configured key id (never key material).
    pub key_id: String,
    /// `awskms`, `pkcs11` or `grpc`.
    pub provider: &'static str,
    /// What its service last answered.
    pub state: KeyServiceState,
    /// How long it has been in that state (`None`: never asked).
    pub since: Option<Duration>,
}

/// Builds a key-encryption key from `(key id, URI, settings)`.
pub(crate) type Connector = Arc<
    dyn Fn(
            &str,
            &str,
            &crate::kms::ConnectSettings,
        ) -> Result<Arc<dyn KeyEncryptionKey>, crate::kms::KmsError>
        + Send
        + Sync,
>;

/// Data-key limits besides the configured ones.
#[derive(Debug, Clone, Copy)]
pub(crate) struct DekTuning {
    /// Overrides `encryption.dek_rotation_s` (tests: below a second).
    pub(crate) lifetime: Option<Duration>,
    /// Encryptions per data key.
    pub(crate) max_encryptions: u64,
}

impl Default for DekTuning {
    fn default() -> Self {
        Self {
            lifetime: None,
            max_encryptions: envelope::DEFAULT_MAX_ENCRYPTIONS,
        }
    }
}

/// Everything a reload replaces, swapped as one.
struct State {
    keys: HashMap<String, Arc<KeyEntry>>,
    /// Key-encryption keys (envelope encryption) by id.
    keks: HashMap<String, Kek>,
    /// Per namespace (resolved by [`crate::policy`]).
    policies: ByNamespace<Policy>,
    level: i32,
    min_size: usize,
    max_decompressed: usize,
    /// Serialized metadata of the compression layer.
    zstd_header: Vec<u8>,
    /// Which keys each namespace may decrypt with.
    decrypt: keys::DecryptSets,
}

/// A configured key-encryption key.
struct Kek {
    /// The `kms` URI, call timeout and `[kms_servers]` entry (gRPC keys) it was built from (a
    /// reload that keeps all three keeps it).
    uri: String,
    timeout: Duration,
    server: Option<crate::config::KmsServerConfig>,
    kek: Arc<dyn KeyEncryptionKey>,
}

/// The key that encrypts a namespace's new payloads.
#[derive(Clone)]
enum ActiveKey {
    /// A static key.
    Static(Arc<KeyEntry>),
    /// An envelope key: payloads are encrypted with its current data key for the namespace.
    Envelope(Arc<dyn KeyEncryptionKey>),
}

impl ActiveKey {
    fn id(&self) -> &str {
        match self {
            ActiveKey::Static(k) => &k.id,
            ActiveKey::Envelope(k) => k.key_id(),
        }
    }
}

#[derive(Clone)]
struct Policy {
    /// The active key when encryption is on.
    encrypt: Option<ActiveKey>,
    compress: bool,
    /// Unknown methods that may pass untouched where encryption applies.
    forward_methods: Arc<[String]>,
    /// Unknown `Any` types that may pass untouched where encryption applies.
    forward_any: Arc<[String]>,
    /// Seal failures (only meaningful with `encrypt`).
    seal_failures: bool,
}

/// The search attribute roots of one namespace ([`PayloadCodec::search_attribute_roots`]).
/// Key material: never logged (`Debug` shows the key ids only).
#[derive(Clone)]
pub struct SearchRoots {
    /// The active key's id and root: new tokens are made with it (`None`: the namespace's
    /// active key is an envelope key, or encryption is off for it).
    pub active: Option<(String, aws_lc_rs::hmac::Key)>,
    /// Every static key the namespace may decrypt with (the active one included), by id.
    pub usable: Vec<(String, aws_lc_rs::hmac::Key)>,
}

impl fmt::Debug for SearchRoots {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SearchRoots")
            .field("active", &self.active.as_ref().map(|(id, _)| id))
            .field(
                "usable",
                &self.usable.iter().map(|(id, _)| id).collect::<Vec<_>>(),
            )
            .finish()
    }
}

/// What the codec does for one namespace (or, with `namespace: None`, for every namespace
/// without a section of its own and for requests that name none).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct EffectivePolicy {
    /// The namespace, or `None` for the default.
    pub namespace: Option<String>,
    /// The key that encrypts new payloads; `None`: this namespace is exempt from encryption.
    pub encrypt_key: Option<String>,
    /// Whether new payloads are compressed.
    pub compress: bool,
    /// Unknown methods forwarded untouched although encryption applies.
    pub forward_unknown_methods: Vec<String>,
    /// Unknown `Any` types forwarded untouched although encryption applies.
    pub forward_unknown_any_types: Vec<String>,
    /// Whether failure messages and stack traces are sealed.
    pub seal_failures: bool,
}

impl fmt::Debug for PayloadCodec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let state = self.inner.state.load();
        let mut ids: Vec<&String> = state.keys.keys().chain(state.keks.keys()).collect();
        ids.sort();
        f.debug_struct("PayloadCodec")
            .field("key_ids", &ids)
            .field(
                "active_key",
                &state
                    .policies
                    .default_value()
                    .encrypt
                    .as_ref()
                    .map(ActiveKey::id),
            )
            .field("compress", &state.policies.default_value().compress)
            .finish_non_exhaustive()
    }
}

impl PayloadCodec {
    /// Builds the codec: loads every key (or the development key) and resolves the policy of
    /// each configured namespace.
    pub fn from_config(config: &Config) -> Result<Self, ConfigError> {
        Self::with_nonce_limit(config, NONCE_LIMIT)
    }

    pub(crate) fn with_nonce_limit(config: &Config, nonce_limit: u64) -> Result<Self, ConfigError> {
        Self::with_parts(
            config,
            nonce_limit,
            Arc::new(crate::kms::connect),
            DekTuning::default(),
        )
    }

    /// The codec with its key-encryption keys built by `connector` and data-key `tuning`.
    pub(crate) fn with_parts(
        config: &Config,
        nonce_limit: u64,
        connector: Connector,
        tuning: DekTuning,
    ) -> Result<Self, ConfigError> {
        let counters = CounterRegistry::default();
        let rng = SystemRandom::new();
        let state = State::build(config, &counters, &rng, None, &connector)?;
        Ok(Self {
            inner: Arc::new(Inner {
                state: ArcSwap::from_pointee(state),
                counters,
                rng,
                nonces: nonce::NonceSource::new(),
                nonce_limit,
                parallel_threshold: AtomicUsize::new(DEFAULT_PARALLEL_THRESHOLD),
                deks: DekManager::new(dek_settings(config, &tuning)),
                connector,
                tuning,
                watching: std::sync::OnceLock::new(),
            }),
        })
    }

    /// The state of every key-encryption key's service, by key id (readiness).
    pub fn key_services(&self) -> Vec<KeyServiceStatus> {
        let state = self.inner.state.load();
        let mut out: Vec<KeyServiceStatus> = state
            .keks
            .iter()
            .map(|(id, k)| {
                let (state, since) = self.inner.deks.key_service_state(id);
                KeyServiceStatus {
                    key_id: id.clone(),
                    provider: k.kek.provider().label(),
                    state,
                    since,
                }
            })
            .collect();
        out.sort_by(|a, b| a.key_id.cmp(&b.key_id));
        out
    }

    /// Starts the key-service prober (once; needs a tokio runtime). It asks every
    /// key-encryption key's service once at start, then each one found unavailable again
    /// after a backoff ([`PROBE_BACKOFF`] doubling to [`PROBE_MAX_BACKOFF`]) until it answers,
    /// and, with `interval`, a reachable one that no call used for that long. A probe wraps a
    /// throwaway data key for a namespace the key encrypts (so key policies that require the
    /// namespace context allow it). Recovery needs no probe: a failed data key is asked for
    /// again on demand after `RETRY_AFTER`; probes keep readiness true when no traffic does.
    pub fn watch_key_services(&self, interval: Option<Duration>) {
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        if self.inner.watching.set(()).is_err() {
            return;
        }
        let weak = Arc::downgrade(&self.inner);
        runtime.spawn(async move {
            loop {
                let Some(inner) = weak.upgrade() else { return };
                let due: Vec<(Arc<dyn KeyEncryptionKey>, String)> = {
                    let state = inner.state.load();
                    state
                        .keks
                        .values()
                        .filter(|k| inner.deks.probe_due(k.kek.key_id(), interval))
                        .map(|k| (k.kek.clone(), state.probe_namespace(k.kek.key_id())))
                        .collect()
                };
                let deks = inner.deks.clone();
                drop(inner);
                futures::future::join_all(
                    due.iter()
                        .map(|(kek, namespace)| deks.probe(kek, namespace)),
                )
                .await;
                drop(deks);
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
        });
    }

    /// Re-reads keys and policy from `config` and swaps them in atomically. Work already
    /// running finishes with the old keyring. On error the old keyring stays.
    pub fn reload(&self, config: &Config) -> Result<(), ConfigError> {
        let previous = self.inner.state.load_full();
        let state = State::build(
            config,
            &self.inner.counters,
            &self.inner.rng,
            Some(&previous),
            &self.inner.connector,
        )?;
        self.inner
            .deks
            .set_settings(dek_settings(config, &self.inner.tuning));
        self.inner.state.store(Arc::new(state));
        let mut ids: Vec<&String> = config.encryption.keys.iter().map(|k| &k.id).collect();
        ids.sort();
        tracing::info!(keys = ?ids, "codec keyring reloaded");
        Ok(())
    }

    /// Whether encryption or compression applies to `namespace` (`None`: the top level).
    pub fn is_active(&self, namespace: Option<&str>) -> bool {
        let state = self.inner.state.load();
        let policy = state.policy(namespace);
        policy.encrypt.is_some() || policy.compress
    }

    /// Whether encryption or compression applies to any namespace at all: the gateway then
    /// needs its rewrite layer, whatever the top-level switches say.
    pub fn is_active_anywhere(&self) -> bool {
        let state = self.inner.state.load();
        state
            .policies
            .values()
            .any(|p| p.encrypt.is_some() || p.compress)
    }

    /// Whether new payloads of `namespace` are encrypted (`None`: requests that name no
    /// namespace, which follow the top-level `[encryption]` setting).
    pub fn encrypts(&self, namespace: Option<&str>) -> bool {
        self.inner.state.load().policy(namespace).encrypt.is_some()
    }

    /// Whether the unknown method `path` may be forwarded untouched for `namespace`: always
    /// where encryption does not apply, else only when listed in `forward_unknown_methods`.
    pub fn forwards_unknown_method(&self, namespace: Option<&str>, path: &str) -> bool {
        let state = self.inner.state.load();
        let policy = state.policy(namespace);
        policy.encrypt.is_none() || policy.forward_methods.iter().any(|m| m == path)
    }

    /// Whether an `Any` of the unknown type `type_name` may pass untouched in a request of
    /// `namespace`: always where encryption does not apply, else only when listed in
    /// `forward_unknown_any_types`.
    pub fn forwards_unknown_any(&self, namespace: Option<&str>, type_name: &str) -> bool {
        let state = self.inner.state.load();
        let policy = state.policy(namespace);
        policy.encrypt.is_none() || policy.forward_any.iter().any(|t| t == type_name)
    }

    /// The effective policy of every configured namespace and of the rest (`None`), for
    /// `check-config` and the start-up log.
    pub fn effective_policies(&self) -> Vec<EffectivePolicy> {
        let state = self.inner.state.load();
        let describe = |namespace: Option<&String>, p: &Policy| EffectivePolicy {
            namespace: namespace.cloned(),
            encrypt_key: p.encrypt.as_ref().map(|k| k.id().to_owned()),
            compress: p.compress,
            forward_unknown_methods: p.forward_methods.to_vec(),
            forward_unknown_any_types: p.forward_any.to_vec(),
            seal_failures: p.encrypt.is_some() && p.seal_failures,
        };
        let mut out = vec![describe(None, state.policies.default_value())];
        let mut named: Vec<(&String, &Policy)> = state.policies.configured().collect();
        named.sort_by(|a, b| a.0.cmp(b.0));
        out.extend(named.into_iter().map(|(n, p)| describe(Some(n), p)));
        out
    }

    /// Whether failures of `namespace` are sealed on the way out: encryption applies to it
    /// and `seal_failures` is on (`[namespaces.<ns>]` overriding `[encryption]`).
    pub fn seals_failures(&self, namespace: Option<&str>) -> bool {
        let state = self.inner.state.load();
        let policy = state.policy(namespace);
        policy.encrypt.is_some() && policy.seal_failures
    }

    /// Sets the total batch size (bytes) from which batches run in parallel; `0` always,
    /// `usize::MAX` never. Defaults to [`DEFAULT_PARALLEL_THRESHOLD`].
    pub fn set_parallel_threshold(&self, bytes: usize) {
        self.inner
            .parallel_threshold
            .store(bytes, Ordering::Relaxed);
    }

    /// Encodes one serialized payload for `namespace`. `Ok(None)`: leave it unchanged (nothing
    /// applies, or compression only and it would not shrink). With encryption on, never
    /// `Ok(None)`.
    pub fn encode(
        &self,
        namespace: Option<&str>,
        payload: &[u8],
    ) -> Result<Option<Bytes>, CodecError> {
        let state = self.inner.state.load();
        let policy = state.policy(namespace);
        let compress = policy.compress
            && payload.len() >= state.min_size
            && zstd_layer::worth_compressing(payload, state.level)?;
        match &policy.encrypt {
            None if !compress => Ok(None),
            None => {
                let reserve = state.zstd_header.len() + DATA_HEADER_MAX;
                let mut buf = PooledBuf::with_capacity(compress_room(reserve, payload.len()));
                match state.compress_layer(&mut buf, reserve, payload)? {
                    Some(start) => Ok(Some(finish(buf, start))),
                    None => Ok(None),
                }
            }
            Some(active) => {
                let (key, limit) = match active {
                    ActiveKey::Static(key) => (key.clone(), self.inner.nonce_limit),
                    ActiveKey::Envelope(kek) => (
                        self.inner.deks.current(kek, namespace.unwrap_or(""))?,
                        self.inner.deks.max_encryptions(),
                    ),
                };
                let enc_reserve = key.header.len() + DATA_HEADER_MAX + NONCE_LEN;
                let reserve = enc_reserve + state.zstd_header.len() + DATA_HEADER_MAX;
                let mut buf = PooledBuf::with_capacity(if compress {
                    compress_room(reserve, payload.len())
                } else {
                    enc_reserve + payload.len() + TAG_LEN
                });
                let mut inner_start = None;
                if compress {
                    inner_start = state.compress_layer(&mut buf, reserve, payload)?;
                }
                let inner_start = match inner_start {
                    Some(start) => start,
                    None => {
                        buf.clear();
                        buf.reserve_exact(enc_reserve + payload.len() + TAG_LEN);
                        buf.resize(enc_reserve, 0);
                        buf.extend_from_slice(payload);
                        enc_reserve
                    }
                };
                let start = self.seal_layer(&key, limit, &mut buf, inner_start)?;
                Ok(Some(finish(buf, start)))
            }
        }
    }

    /// Encrypts `buf[inner_start..]` in place behind a nonce and the key's header; returns where
    /// the outer payload starts. `buf[..inner_start]` must have room for header and nonce.
    fn seal_layer(
        &self,
        key: &KeyEntry,
        limit: u64,
        buf: &mut Vec<u8>,
        inner_start: usize,
    ) -> Result<usize, CodecError> {
        let inner_len = buf.len() - inner_start;
        buf.reserve_exact(TAG_LEN);
        let (dh, dh_len) = wire::data_header(NONCE_LEN + inner_len + TAG_LEN);
        let nonce_start = inner_start - NONCE_LEN;
        let start = nonce_start - dh_len - key.header.len();
        buf[start..start + key.header.len()].copy_from_slice(&key.header);
        buf[nonce_start - dh_len..nonce_start].copy_from_slice(&dh[..dh_len]);
        key.seal(&self.inner.nonces, limit, buf, inner_start)?;
        Ok(start)
    }

    /// Decodes one serialized payload of trusted size with any key of the keyring.
    /// `Ok(None)`: not ours (leave it unchanged). Input from peers goes through
    /// [`decode_within`](Self::decode_within); see [`decode_for`](Self::decode_for) for the
    /// namespace-bound form.
    pub fn decode(&self, payload: &[u8]) -> Result<Option<Bytes>, CodecError> {
        self.decode_with(payload, None, None, &MessageBudget::unlimited())
    }

    /// Decodes one serialized payload, charging what decoding produces (decompressed or, when
    /// not compressed, decrypted bytes) to `budget`. `Ok(None)`: not ours (leave it unchanged).
    pub fn decode_within(
        &self,
        payload: &[u8],
        budget: &MessageBudget,
    ) -> Result<Option<Bytes>, CodecError> {
        self.decode_with(payload, None, None, budget)
    }

    /// [`decode_within`](Self::decode_within) for a payload that reached `namespace`:
    /// envelope-encrypted payloads are opened with the data key wrapped for that namespace
    /// (which [`prepare_decode`](Self::prepare_decode) must have unwrapped); static keys are
    /// not restricted to the namespace's decrypt keys (the gRPC path, as `decode_within`).
    pub fn decode_in(
        &self,
        namespace: Option<&str>,
        payload: &[u8],
        budget: &MessageBudget,
    ) -> Result<Option<Bytes>, CodecError> {
        self.decode_with(payload, None, Some(namespace.unwrap_or("")), budget)
    }

    /// [`decode`](Self::decode) for `namespace`: a `binary/encrypted` payload naming a key the
    /// namespace may not decrypt with (its active key and `decrypt_keys`, see
    /// [`decrypt_key_ids`](Self::decrypt_key_ids)) is refused with
    /// [`CodecError::KeyNotBound`] before anything is decrypted.
    pub fn decode_for(
        &self,
        namespace: Option<&str>,
        payload: &[u8],
    ) -> Result<Option<Bytes>, CodecError> {
        self.decode_with(
            payload,
            Some(namespace),
            Some(namespace.unwrap_or("")),
            &MessageBudget::unlimited(),
        )
    }

    /// [`decode_for`](Self::decode_for) producing at most `budget` bytes: a compressed payload
    /// may only inflate to the smaller of `budget` and `compression.max_decompressed_bytes`;
    /// more is [`CodecError::OverBudget`], found without inflating past it.
    pub fn decode_for_within(
        &self,
        namespace: Option<&str>,
        payload: &[u8],
        budget: usize,
    ) -> Result<Option<Bytes>, CodecError> {
        let account = MessageBudget::new(crate::budget::ProcessBudget::unlimited(), budget);
        self.decode_with(
            payload,
            Some(namespace),
            Some(namespace.unwrap_or("")),
            &account,
        )
        .map_err(|e| match e {
            CodecError::Budget(crate::budget::Exhausted::Message { .. }) => {
                CodecError::OverBudget { budget }
            }
            e => e,
        })
    }

    /// [`decode_for_within`](Self::decode_for_within) when `bound`, else the same without the
    /// namespace's decrypt keys enforced ([`decode_in`](Self::decode_in)'s scope): the
    /// pipeline's per-payload decode.
    pub fn decode_scoped_within(
        &self,
        namespace: Option<&str>,
        bound: bool,
        payload: &[u8],
        budget: usize,
    ) -> Result<Option<Bytes>, CodecError> {
        if bound {
            return self.decode_for_within(namespace, payload, budget);
        }
        let account = MessageBudget::new(crate::budget::ProcessBudget::unlimited(), budget);
        self.decode_with(payload, None, Some(namespace.unwrap_or("")), &account)
            .map_err(|e| match e {
                CodecError::Budget(crate::budget::Exhausted::Message { .. }) => {
                    CodecError::OverBudget { budget }
                }
                e => e,
            })
    }

    /// Whether `payload` is one the codec decodes (`binary/encrypted` or `binary/zstd`);
    /// anything else, malformed input included, is left as it is.
    pub fn is_encoded(payload: &[u8]) -> bool {
        matches!(
            wire::scan(payload).map(|s| s.encoding),
            Ok(Some(ENCODING_ENCRYPTED | ENCODING_ZSTD))
        )
    }

    /// The roots protected search attributes of `namespace` derive their token keys from
    /// (`crate::search_attributes`): the namespace's active key when it is a static key, and
    /// every static key it may decrypt with (rotation: old tokens stay findable and readable).
    /// Envelope (`kms`) keys have no local material and give no root.
    pub fn search_attribute_roots(&self, namespace: Option<&str>) -> SearchRoots {
        let state = self.inner.state.load();
        let root = |key: &KeyEntry| key.search_root.clone().map(|root| (key.id.clone(), root));
        let active = match &state.policy(namespace).encrypt {
            Some(ActiveKey::Static(key)) => root(key),
            _ => None,
        };
        let mut usable: Vec<(String, aws_lc_rs::hmac::Key)> = state
            .decrypt
            .get(namespace)
            .iter()
            .filter_map(|id| state.keys.get(id))
            .filter_map(|key| root(key))
            .collect();
        if let Some((id, key)) = &active
            && !usable.iter().any(|(u, _)| u == id)
        {
            usable.push((id.clone(), key.clone()));
        }
        SearchRoots { active, usable }
    }

    /// The key ids `namespace` may decrypt with (`None`: requests without a namespace), sorted.
    pub fn decrypt_key_ids(&self, namespace: Option<&str>) -> Vec<String> {
        let state = self.inner.state.load();
        state.decrypt.get(namespace).iter().cloned().collect()
    }

    /// `scope`: `Some(namespace)` enforces the namespace's decrypt keys; `None` allows all.
    /// `envelope_ns`: the namespace envelope-encrypted payloads are opened for (`None`: they
    /// are refused, the caller named no namespace).
    fn decode_with(
        &self,
        payload: &[u8],
        scope: Option<Option<&str>>,
        envelope_ns: Option<&str>,
        budget: &MessageBudget,
    ) -> Result<Option<Bytes>, CodecError> {
        self.decode_source(Source::Borrowed(payload), scope, envelope_ns, budget)
    }

    /// [`decode_with`](Self::decode_with) of a payload the caller hands over: when nothing
    /// else holds its buffer (a fetched storage object), the ciphertext is decrypted in place
    /// in that buffer instead of being copied first. A shared buffer is never written to.
    ///
    /// Budget: a buffer handed over whole and unshared must already be charged by its
    /// producer (storage charges every fetched object, see `Storage::resolve`); its in-place
    /// plaintext is not charged again. Decompression and copies are charged as always.
    fn decode_owned(
        &self,
        payload: Bytes,
        scope: Option<Option<&str>>,
        envelope_ns: Option<&str>,
        budget: &MessageBudget,
    ) -> Result<Option<Bytes>, CodecError> {
        self.decode_source(Source::Owned(payload), scope, envelope_ns, budget)
    }

    fn decode_source(
        &self,
        source: Source<'_>,
        scope: Option<Option<&str>>,
        envelope_ns: Option<&str>,
        budget: &MessageBudget,
    ) -> Result<Option<Bytes>, CodecError> {
        let state = self.inner.state.load();
        let inflate = |frame: &[u8]| {
            zstd_layer::decompress_bounded(frame, state.max_decompressed, budget)
                .map(|v| Some(v.freeze()))
        };
        let payload: &[u8] = match &source {
            Source::Borrowed(p) => p,
            Source::Owned(p) => p,
        };
        let outer = wire::scan(payload).map_err(CodecError::Malformed)?;
        match outer.encoding {
            Some(ENCODING_ENCRYPTED) => {
                let key_id = outer.key_id.ok_or_else(|| {
                    CodecError::Malformed(
                        "binary/encrypted payload has no encryption-key-id".to_owned(),
                    )
                })?;
                let key_id = std::str::from_utf8(key_id).map_err(|_| {
                    CodecError::Malformed("encryption-key-id is not UTF-8".to_owned())
                })?;
                let static_key = state.keys.get(key_id);
                if static_key.is_none() && !state.keks.contains_key(key_id) {
                    return Err(CodecError::UnknownKey(key_id.to_owned()));
                }
                if let Some(namespace) = scope
                    && !state.decrypt.get(namespace).contains(key_id)
                {
                    return Err(CodecError::KeyNotBound {
                        key_id: key_id.to_owned(),
                        namespace: namespace.map(str::to_owned),
                    });
                }
                let envelope_key;
                let key: &KeyEntry = match static_key {
                    Some(key) => key,
                    None => {
                        envelope_key = self.envelope_key(key_id, &outer, envelope_ns)?;
                        &envelope_key
                    }
                };
                if outer.data.len() < NONCE_LEN + TAG_LEN {
                    return Err(CodecError::TooShort {
                        key_id: key.id.clone(),
                        len: outer.data.len(),
                    });
                }
                // Where nonce ‖ ciphertext ‖ tag sits in the payload (`data` borrows from it).
                let at = outer.data.as_ptr() as usize - payload.as_ptr() as usize;
                let sealed = at..at + outer.data.len();
                // One mutable buffer: the handed-over payload's own when nobody shares it,
                // else a copy of the sealed bytes alone.
                let (mut buf, sealed, in_place) = match source {
                    Source::Owned(p) => match p.try_into_mut() {
                        Ok(own) => (own, sealed, true),
                        Err(shared) => (
                            BytesMut::from(&shared[sealed.clone()]),
                            0..sealed.len(),
                            false,
                        ),
                    },
                    Source::Borrowed(p) => {
                        (BytesMut::from(&p[sealed.clone()]), 0..sealed.len(), false)
                    }
                };
                let len = key.open(&mut buf[sealed.clone()])?;
                let plain = sealed.start + NONCE_LEN;
                let inner = buf.freeze().slice(plain..plain + len);
                // The inner payload is what some encoder was given; if it is not a payload we
                // compressed, it is returned exactly as decrypted.
                match wire::scan(&inner) {
                    Ok(scan) if scan.encoding == Some(ENCODING_ZSTD) => inflate(scan.data),
                    _ => {
                        // Decrypted in place, the plaintext is the handed-over buffer, charged
                        // by whoever produced it (storage charges a fetched object): nothing
                        // new was allocated, so nothing more is charged. A copy is charged.
                        if !in_place {
                            budget.charge(inner.len())?;
                        }
                        Ok(Some(inner))
                    }
                }
            }
            Some(ENCODING_ZSTD) => inflate(outer.data),
            _ => Ok(None),
        }
    }

    /// [`encode`](Self::encode) for every payload of one message, concurrently when large.
    /// Needs a tokio runtime when the batch runs in parallel.
    pub async fn encode_batch(
        &self,
        namespace: Option<&str>,
        payloads: Vec<Bytes>,
    ) -> Result<Vec<Option<Bytes>>, BatchError> {
        self.prepare_encode(namespace)
            .await
            .map_err(|error| BatchError { index: 0, error })?;
        let ns = namespace.map(str::to_owned);
        self.run_batch(payloads, move |codec, p| codec.encode(ns.as_deref(), &p))
            .await
    }

    /// Makes sure the envelope key that encrypts `namespace`'s payloads (if it has one) has a
    /// data key for it that may encrypt now, asking its key service once when it has none:
    /// the async step before [`encode`](Self::encode). Does nothing for static keys.
    pub async fn prepare_encode(&self, namespace: Option<&str>) -> Result<(), CodecError> {
        let kek = {
            let state = self.inner.state.load();
            match &state.policy(namespace).encrypt {
                Some(ActiveKey::Envelope(kek)) => kek.clone(),
                _ => return Ok(()),
            }
        };
        self.inner
            .deks
            .ensure(&kek, namespace.unwrap_or(""))
            .await
            .map_err(CodecError::from)
    }

    /// Unwraps the data keys that envelope-encrypted `payloads` of `namespace` carry and
    /// that are not cached yet (one key-service call per distinct data key, shared with
    /// concurrent callers): the async step before [`decode_in`](Self::decode_in) and
    /// [`decode_for`](Self::decode_for). With `bound`, only keys `namespace` may decrypt
    /// with are unwrapped (the others are refused by `decode_for` anyway). More than
    /// `max_keys` distinct data keys to unwrap is [`CodecError::TooManyDataKeys`] before any
    /// call. Payloads that are not envelope-encrypted are skipped; does nothing when no
    /// envelope key is configured.
    pub async fn prepare_decode(
        &self,
        namespace: Option<&str>,
        payloads: &[Bytes],
        bound: bool,
        max_keys: usize,
    ) -> Result<(), BatchError> {
        let state = self.inner.state.load_full();
        if state.keks.is_empty() {
            return Ok(());
        }
        let ns = namespace.unwrap_or("");
        let mut seen = std::collections::HashSet::new();
        let mut todo = Vec::new();
        for (index, payload) in payloads.iter().enumerate() {
            let Ok(scan) = wire::scan(payload) else {
                continue;
            };
            let (Some(ENCODING_ENCRYPTED), Some(key_id), Some(wrapped)) =
                (scan.encoding, scan.key_id, scan.dek)
            else {
                continue;
            };
            let Some(kek) = std::str::from_utf8(key_id)
                .ok()
                .and_then(|id| state.keks.get(id))
            else {
                continue;
            };
            let key_id = kek.kek.key_id();
            if bound && !state.decrypt.get(namespace).contains(key_id) {
                continue;
            }
            let dek_id = scan
                .dek_id
                .and_then(|d| std::str::from_utf8(d).ok())
                .unwrap_or("");
            if !seen.insert((key_id, dek_id, wrapped)) {
                continue;
            }
            if self
                .inner
                .deks
                .cached(key_id, ns, dek_id, wrapped)
                .is_some()
            {
                continue;
            }
            if todo.len() == max_keys {
                return Err(BatchError {
                    index,
                    error: CodecError::TooManyDataKeys {
                        found: max_keys + 1,
                        max: max_keys,
                    },
                });
            }
            todo.push((index, kek.kek.clone(), wrapped.to_vec(), dek_id.to_owned()));
        }
        let calls = todo.into_iter().map(|(index, kek, wrapped, dek_id)| {
            let deks = self.inner.deks.clone();
            async move {
                deks.unwrap(&kek, ns, &wrapped, &dek_id)
                    .await
                    .map_err(|e| BatchError {
                        index,
                        error: e.into(),
                    })
            }
        });
        futures::future::try_join_all(calls).await.map(drop)
    }

    /// The cached data key of the envelope-encrypted payload `outer` (of `key_id`), opened
    /// for `namespace`.
    fn envelope_key(
        &self,
        key_id: &str,
        outer: &wire::Scan<'_>,
        namespace: Option<&str>,
    ) -> Result<Arc<KeyEntry>, CodecError> {
        let wrapped = outer.dek.ok_or_else(|| {
            CodecError::Malformed(format!(
                "payload of envelope key {key_id:?} carries no wrapped data key ({})",
                wire::DEK_KEY
            ))
        })?;
        let namespace = namespace.ok_or_else(|| CodecError::KeyService {
            key_id: key_id.to_owned(),
            reason: "envelope-encrypted payloads open only for the namespace they were \
                     encrypted for, and none was given"
                .to_owned(),
        })?;
        let dek_id = outer
            .dek_id
            .and_then(|d| std::str::from_utf8(d).ok())
            .unwrap_or("");
        self.inner
            .deks
            .cached(key_id, namespace, dek_id, wrapped)
            .ok_or_else(|| CodecError::KeyUnavailable {
                key_id: key_id.to_owned(),
                reason: "the payload's data key is not unwrapped".to_owned(),
            })
    }

    /// Per envelope key id, the age in seconds of its oldest data key still encrypting.
    pub fn dek_ages(&self) -> Vec<(String, f64)> {
        self.inner.deks.ages()
    }

    /// [`decode`](Self::decode) for every payload of one message, concurrently when large.
    /// Needs a tokio runtime when the batch runs in parallel.
    pub async fn decode_batch(
        &self,
        payloads: Vec<Bytes>,
    ) -> Result<Vec<Option<Bytes>>, BatchError> {
        self.decode_batch_within(payloads, MessageBudget::unlimited())
            .await
    }

    /// [`decode_within`](Self::decode_within) for every payload of one message, all drawing
    /// on one `budget`; concurrently when large.
    pub async fn decode_batch_within(
        &self,
        payloads: Vec<Bytes>,
        budget: MessageBudget,
    ) -> Result<Vec<Option<Bytes>>, BatchError> {
        self.run_batch(payloads, move |codec, p| codec.decode_within(&p, &budget))
            .await
    }

    /// [`decode_in`](Self::decode_in) for every payload of one message that reached
    /// `namespace`, after [`prepare_decode`](Self::prepare_decode); concurrently when large.
    pub async fn decode_batch_in(
        &self,
        namespace: Option<&str>,
        payloads: Vec<Bytes>,
        budget: MessageBudget,
    ) -> Result<Vec<Option<Bytes>>, BatchError> {
        self.prepare_decode(namespace, &payloads, false, MAX_DATA_KEYS_PER_MESSAGE)
            .await?;
        let ns = namespace.map(str::to_owned);
        self.run_batch(payloads, move |codec, p| {
            codec.decode_in(ns.as_deref(), &p, &budget)
        })
        .await
    }

    /// The payloads of one message that reached `namespace`, after
    /// [`prepare_decode`](Self::prepare_decode): with `bound`, only the namespace's decrypt
    /// keys ([`decode_for`](Self::decode_for)), else any key of the keyring
    /// ([`decode_in`](Self::decode_in)); all drawing on one `budget`, concurrently when large.
    ///
    /// The payloads are handed over: one whose buffer nothing else shares is decrypted in
    /// that buffer and its plaintext is not charged again (its producer charged it: storage
    /// charges every object it fetches); shared buffers are copied and charged.
    pub async fn decode_batch_scoped(
        &self,
        namespace: Option<&str>,
        bound: bool,
        payloads: Vec<Bytes>,
        budget: MessageBudget,
    ) -> Result<Vec<Option<Bytes>>, BatchError> {
        let ns = namespace.map(str::to_owned);
        self.run_batch(payloads, move |codec, p| {
            let ns = ns.as_deref();
            // Handed over: a fetched object nothing else holds is decrypted in place.
            let scope = if bound { Some(ns) } else { None };
            codec.decode_owned(p, scope, Some(ns.unwrap_or("")), &budget)
        })
        .await
    }

    async fn run_batch<F>(
        &self,
        payloads: Vec<Bytes>,
        f: F,
    ) -> Result<Vec<Option<Bytes>>, BatchError>
    where
        F: Fn(&PayloadCodec, Bytes) -> Result<Option<Bytes>, CodecError> + Send + Sync + 'static,
    {
        let total: usize = payloads.iter().map(Bytes::len).sum();
        let threshold = self.inner.parallel_threshold.load(Ordering::Relaxed);
        if total < threshold || payloads.is_empty() {
            return run_group(self, &f, 0, payloads, &AtomicBool::new(false));
        }
        // Dropping this future (the RPC was cancelled or timed out) tells the blocking workers
        // to stop before their next payload instead of finishing work nobody waits for.
        let cancel = CancelOnDrop(Arc::new(AtomicBool::new(false)));
        let workers = cpus().min(payloads.len());
        let f = Arc::new(f);
        let mut tasks = Vec::with_capacity(workers);
        let mut rest = payloads;
        let mut first = 0;
        let mut remaining_bytes = total;
        for group in 0..workers {
            let groups_left = workers - group;
            let take = if groups_left == 1 {
                rest.len()
            } else {
                // Contiguous, byte-balanced: fill up to this group's share of what is left,
                // leaving at least one payload per remaining group.
                let share = remaining_bytes.div_ceil(groups_left);
                let mut n = 0;
                let mut bytes = 0;
                while n < rest.len() - (groups_left - 1)
                    && (n == 0 || bytes + rest[n].len() <= share)
                {
                    bytes += rest[n].len();
                    n += 1;
                }
                n
            };
            let tail = rest.split_off(take);
            let chunk = std::mem::replace(&mut rest, tail);
            remaining_bytes -= chunk.iter().map(Bytes::len).sum::<usize>();
            let codec = self.clone();
            let f = f.clone();
            let start = first;
            first += chunk.len();
            let cancelled = cancel.0.clone();
            tasks.push((
                start,
                tokio::task::spawn_blocking(move || {
                    run_group(&codec, &*f, start, chunk, &cancelled)
                }),
            ));
        }
        let mut out = Vec::with_capacity(first);
        let mut failure: Option<BatchError> = None;
        for (start, task) in tasks {
            let result = task.await.unwrap_or_else(|e| {
                Err(BatchError {
                    index: start,
                    error: CodecError::Worker(e.to_string()),
                })
            });
            match result {
                Ok(done) if failure.is_none() => out.extend(done),
                Ok(_) => {}
                Err(e) => {
                    if failure.as_ref().is_none_or(|f| e.index < f.index) {
                        failure = Some(e);
                    }
                }
            }
        }
        match failure {
            Some(e) => Err(e),
            None => Ok(out),
        }
    }

    /// `(key id, encryptions)` for every key in the keyring, sorted by id.
    pub fn encryption_counts(&self) -> Vec<(String, u64)> {
        let state = self.inner.state.load();
        let mut counts: Vec<(String, u64)> = state
            .keys
            .values()
            .map(|k| (k.id.clone(), k.counter.count()))
            .collect();
        counts.sort();
        counts
    }
}

/// Sets the flag when dropped: the batch's caller is gone.
struct CancelOnDrop(Arc<AtomicBool>);

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

fn run_group<F>(
    codec: &PayloadCodec,
    f: &F,
    first: usize,
    payloads: Vec<Bytes>,
    cancelled: &AtomicBool,
) -> Result<Vec<Option<Bytes>>, BatchError>
where
    F: Fn(&PayloadCodec, Bytes) -> Result<Option<Bytes>, CodecError>,
{
    payloads
        .into_iter()
        .enumerate()
        .map(|(i, p)| {
            if cancelled.load(Ordering::Relaxed) {
                return Err(BatchError {
                    index: first + i,
                    error: CodecError::Worker("the request was cancelled".to_owned()),
                });
            }
            f(codec, p).map_err(|error| BatchError {
                index: first + i,
                error,
            })
        })
        .collect()
}

/// The number of CPUs, read once: `available_parallelism` reads the cgroup's files on every
/// call, which cost about 1 % of the gateway's CPU when asked per message.
fn cpus() -> usize {
    static CPUS: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *CPUS.get_or_init(|| std::thread::available_parallelism().map_or(1, usize::from))
}

/// A payload to decode: borrowed (copied before decrypting) or handed over (decrypted in its
/// own buffer when that buffer is not shared).
enum Source<'a> {
    Borrowed(&'a [u8]),
    Owned(Bytes),
}

/// Room for compressing `len` bytes behind `reserve` bytes of headers, and sealing the result.
fn compress_room(reserve: usize, len: usize) -> usize {
    reserve + zstd::zstd_safe::compress_bound(len) + TAG_LEN
}

/// Turns the working buffer into the result starting at `start`. Compression reserves the
/// worst case, so a much smaller result does not keep the working buffer: a pooled one goes
/// back to the pool after the result is copied out (a copy of the compressed bytes only),
/// another one gives back its unused tail.
fn finish(mut buf: PooledBuf, start: usize) -> Bytes {
    if buf.capacity() - buf.len() > buf.len() / 8 {
        if buf.capacity() >= buffers::POOLED_MIN {
            let mut out = PooledBuf::with_capacity(buf.len() - start);
            out.extend_from_slice(&buf[start..]);
            return out.freeze();
        }
        buf.shrink_to_fit();
    }
    buf.freeze().slice(start..)
}

impl State {
    fn build(
        config: &Config,
        counters: &CounterRegistry,
        rng: &SystemRandom,
        previous: Option<&State>,
        connector: &Connector,
    ) -> Result<Self, ConfigError> {
        let keys = keys::load_keys(config, counters, rng)?;
        let keks = load_keks(config, previous, connector)?;
        let key = |name: String, id: Option<&String>| -> Result<ActiveKey, ConfigError> {
            if let Some(kek) = id.and_then(|id| keks.get(id)) {
                return Ok(ActiveKey::Envelope(kek.kek.clone()));
            }
            let id = match id {
                Some(id) => id.as_str(),
                None if keys.contains_key(keys::DEV_KEY_ID) => keys::DEV_KEY_ID,
                None => {
                    return Err(ConfigError::invalid(
                        name,
                        "encryption is on but no key is active",
                    ));
                }
            };
            keys.get(id).cloned().map(ActiveKey::Static).ok_or_else(|| {
                ConfigError::invalid(
                    name,
                    format!("names key {id:?}, which is not in encryption.keys"),
                )
            })
        };
        let policies = crate::policy::resolve(config).try_map(|_, p| {
            Ok::<_, ConfigError>(Policy {
                encrypt: if p.encrypt {
                    Some(key(p.active_key.0.clone(), p.active_key.1.as_ref())?)
                } else {
                    None
                },
                compress: p.compress,
                forward_methods: p.forward_methods.clone().into(),
                forward_any: p.forward_any.clone().into(),
                seal_failures: p.seal_failures,
            })
        })?;
        if !(1..=22).contains(&config.compression.level) {
            return Err(ConfigError::invalid("compression.level", "must be 1..=22"));
        }
        let ids: std::collections::BTreeSet<String> =
            keys.keys().chain(keks.keys()).cloned().collect();
        let decrypt = keys::DecryptSets::build(config, &ids);
        Ok(Self {
            decrypt,
            keys,
            keks,
            policies,
            level: config.compression.level,
            min_size: config.compression.min_size,
            max_decompressed: config.compression.max_decompressed_bytes,
            zstd_header: wire::metadata_prefix(&[(ENCODING_KEY, ENCODING_ZSTD)]),
        })
    }

    fn policy(&self, namespace: Option<&str>) -> &Policy {
        self.policies.get(namespace)
    }

    /// A namespace whose new payloads `kek_id` encrypts (the default policy's is `""`), to
    /// probe its service with; `""` when none does (a key kept to decrypt only).
    fn probe_namespace(&self, kek_id: &str) -> String {
        let encrypts =
            |p: &Policy| matches!(&p.encrypt, Some(ActiveKey::Envelope(k)) if k.key_id() == kek_id);
        let mut named: Vec<&String> = self
            .policies
            .configured()
            .filter(|(_, p)| encrypts(p))
            .map(|(n, _)| n)
            .collect();
        named.sort();
        match named.first() {
            Some(name) if !encrypts(self.policies.default_value()) => (*name).clone(),
            _ => String::new(),
        }
    }

    /// Writes the compression layer of `payload` into `buf` after `reserve` bytes of room;
    /// returns where it starts, or `None` (and `buf` holds garbage) when it would not shrink.
    fn compress_layer(
        &self,
        buf: &mut Vec<u8>,
        reserve: usize,
        payload: &[u8],
    ) -> Result<Option<usize>, CodecError> {
        buf.clear();
        buf.reserve(compress_room(reserve, payload.len()));
        buf.resize(reserve, 0);
        zstd_layer::compress_into(buf, payload, self.level)?;
        let frame_len = buf.len() - reserve;
        let (dh, dh_len) = wire::data_header(frame_len);
        let header_len = self.zstd_header.len() + dh_len;
        if header_len + frame_len >= payload.len() {
            return Ok(None);
        }
        let start = reserve - header_len;
        buf[start..start + self.zstd_header.len()].copy_from_slice(&self.zstd_header);
        buf[reserve - dh_len..reserve].copy_from_slice(&dh[..dh_len]);
        Ok(Some(start))
    }
}

/// The data-key settings of `config`.
fn dek_settings(config: &Config, tuning: &DekTuning) -> DekSettings {
    DekSettings {
        lifetime: tuning
            .lifetime
            .unwrap_or(Duration::from_secs(config.encryption.dek_rotation_s)),
        max_encryptions: tuning.max_encryptions,
        cache_size: config.encryption.dek_cache_size,
    }
}

/// Builds every configured key-encryption key (`kms = ...`), keeping the ones of `previous`
/// whose URI and timeout did not change (their clients and connections).
fn load_keks(
    config: &Config,
    previous: Option<&State>,
    connector: &Connector,
) -> Result<HashMap<String, Kek>, ConfigError> {
    let timeout = Duration::from_millis(config.encryption.kms_timeout_ms);
    let settings = crate::kms::ConnectSettings {
        timeout,
        kms_servers: config.kms_servers.clone(),
    };
    let mut keks = HashMap::new();
    for (i, spec) in config.encryption.keys.iter().enumerate() {
        let Some(uri) = &spec.kms else {
            continue;
        };
        let server = crate::kms::grpc::server_of_uri(&spec.id, uri)
            .ok()
            .and_then(|name| config.kms_servers.get(name).cloned());
        let kept = previous
            .and_then(|p| p.keks.get(&spec.id))
            .filter(|k| &k.uri == uri && k.timeout == timeout && k.server == server)
            .map(|k| k.kek.clone());
        let kek = match kept {
            Some(kek) => kek,
            None => connector(&spec.id, uri, &settings).map_err(|e| {
                ConfigError::invalid(format!("encryption.keys[{i}].kms"), e.to_string())
            })?,
        };
        keks.insert(
            spec.id.clone(),
            Kek {
                uri: uri.clone(),
                timeout,
                server,
                kek,
            },
        );
    }
    Ok(keks)
}
