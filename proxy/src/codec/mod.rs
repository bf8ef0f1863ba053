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
//!    `compression.min_size` bytes and the result is smaller than the input): a new payload with
//!    `metadata["encoding"] = "binary/zstd"` and `data` = one zstd frame (level
//!    `compression.level`, content size recorded) of the serialized payload.
//! 2. **Encryption** (when on for the namespace): a new payload with
//!    `metadata["encoding"] = "binary/encrypted"`, `metadata["encryption-key-id"] = <key id>`
//!    and `data` = 12-byte random nonce ‖ AES-256-GCM ciphertext ‖ 16-byte tag of the serialized
//!    inner payload, no associated data (Temporal's sample encryption codec for Go, Python and
//!    TypeScript).
//!
//! Decoding undoes the layers in reverse: `binary/encrypted` is decrypted with the key it
//! names (every configured key decrypts), then a `binary/zstd` inner payload is decompressed;
//! a `binary/zstd` payload on its own is decompressed; anything else is "not ours" and stays
//! unchanged. Decompression is bounded by `compression.max_decompressed_bytes`: the output
//! grows only up to the limit (a frame declaring or producing more is refused, without
//! inflating the rest) and the zstd window a frame may ask for is capped at the limit's next
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

mod error;
mod keys;
mod nonce;
mod wire;
mod zstd_layer;

#[cfg(test)]
mod tests;

use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use arc_swap::ArcSwap;
use aws_lc_rs::aead::NONCE_LEN;
use aws_lc_rs::rand::SystemRandom;
use bytes::Bytes;

use crate::config::{Config, ConfigError};
pub use error::{BatchError, CodecError};
pub use keys::generate_key_base64;
use keys::{CounterRegistry, KeyEntry, NONCE_LIMIT, TAG_LEN};
pub use wire::WirePayload;
use wire::{DATA_HEADER_MAX, ENCODING_ENCRYPTED, ENCODING_KEY, ENCODING_ZSTD};

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
}

/// Everything a reload replaces, swapped as one.
struct State {
    keys: HashMap<String, Arc<KeyEntry>>,
    default_policy: Policy,
    namespaces: HashMap<String, Policy>,
    level: i32,
    min_size: usize,
    max_decompressed: usize,
    /// Serialized metadata of the compression layer.
    zstd_header: Vec<u8>,
}

#[derive(Clone)]
struct Policy {
    /// The active key when encryption is on.
    encrypt: Option<Arc<KeyEntry>>,
    compress: bool,
    /// Seal failures (only meaningful with `encrypt`).
    seal_failures: bool,
}

impl fmt::Debug for PayloadCodec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let state = self.inner.state.load();
        let mut ids: Vec<&String> = state.keys.keys().collect();
        ids.sort();
        f.debug_struct("PayloadCodec")
            .field("key_ids", &ids)
            .field(
                "active_key",
                &state.default_policy.encrypt.as_ref().map(|k| &k.id),
            )
            .field("compress", &state.default_policy.compress)
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
        let counters = CounterRegistry::default();
        let rng = SystemRandom::new();
        let state = State::build(config, &counters, &rng)?;
        Ok(Self {
            inner: Arc::new(Inner {
                state: ArcSwap::from_pointee(state),
                counters,
                rng,
                nonces: nonce::NonceSource::new(),
                nonce_limit,
                parallel_threshold: AtomicUsize::new(DEFAULT_PARALLEL_THRESHOLD),
            }),
        })
    }

    /// Re-reads keys and policy from `config` and swaps them in atomically. Work already
    /// running finishes with the old keyring. On error the old keyring stays.
    pub fn reload(&self, config: &Config) -> Result<(), ConfigError> {
        let state = State::build(config, &self.inner.counters, &self.inner.rng)?;
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
        let compress = policy.compress && payload.len() >= state.min_size;
        match &policy.encrypt {
            None if !compress => Ok(None),
            None => {
                let reserve = state.zstd_header.len() + DATA_HEADER_MAX;
                let mut buf = Vec::new();
                match state.compress_layer(&mut buf, reserve, payload)? {
                    Some(start) => Ok(Some(finish(buf, start))),
                    None => Ok(None),
                }
            }
            Some(key) => {
                let enc_reserve = key.header.len() + DATA_HEADER_MAX + NONCE_LEN;
                let mut buf = Vec::new();
                let mut inner_start = None;
                if compress {
                    let reserve = enc_reserve + state.zstd_header.len() + DATA_HEADER_MAX;
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
                let start = self.seal_layer(key, &mut buf, inner_start)?;
                Ok(Some(finish(buf, start)))
            }
        }
    }

    /// Encrypts `buf[inner_start..]` in place behind a nonce and the key's header; returns where
    /// the outer payload starts. `buf[..inner_start]` must have room for header and nonce.
    fn seal_layer(
        &self,
        key: &KeyEntry,
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
        key.seal(&self.inner.nonces, self.inner.nonce_limit, buf, inner_start)?;
        Ok(start)
    }

    /// Decodes one serialized payload. `Ok(None)`: not ours (leave it unchanged).
    pub fn decode(&self, payload: &[u8]) -> Result<Option<Bytes>, CodecError> {
        let state = self.inner.state.load();
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
                let key = state
                    .keys
                    .get(key_id)
                    .ok_or_else(|| CodecError::UnknownKey(key_id.to_owned()))?;
                if outer.data.len() < NONCE_LEN + TAG_LEN {
                    return Err(CodecError::TooShort {
                        key_id: key.id.clone(),
                        len: outer.data.len(),
                    });
                }
                let mut buf = outer.data.to_vec();
                let len = key.open(&mut buf)?;
                let inner = Bytes::from(buf).slice(NONCE_LEN..NONCE_LEN + len);
                // The inner payload is what some encoder was given; if it is not a payload we
                // compressed, it is returned exactly as decrypted.
                match wire::scan(&inner) {
                    Ok(scan) if scan.encoding == Some(ENCODING_ZSTD) => {
                        zstd_layer::decompress_bounded(scan.data, state.max_decompressed)
                            .map(|v| Some(Bytes::from(v)))
                    }
                    _ => Ok(Some(inner)),
                }
            }
            Some(ENCODING_ZSTD) => {
                zstd_layer::decompress_bounded(outer.data, state.max_decompressed)
                    .map(|v| Some(Bytes::from(v)))
            }
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
        let ns = namespace.map(str::to_owned);
        self.run_batch(payloads, move |codec, p| codec.encode(ns.as_deref(), p))
            .await
    }

    /// [`decode`](Self::decode) for every payload of one message, concurrently when large.
    /// Needs a tokio runtime when the batch runs in parallel.
    pub async fn decode_batch(
        &self,
        payloads: Vec<Bytes>,
    ) -> Result<Vec<Option<Bytes>>, BatchError> {
        self.run_batch(payloads, |codec, p| codec.decode(p)).await
    }

    async fn run_batch<F>(
        &self,
        payloads: Vec<Bytes>,
        f: F,
    ) -> Result<Vec<Option<Bytes>>, BatchError>
    where
        F: Fn(&PayloadCodec, &[u8]) -> Result<Option<Bytes>, CodecError> + Send + Sync + 'static,
    {
        let total: usize = payloads.iter().map(Bytes::len).sum();
        let threshold = self.inner.parallel_threshold.load(Ordering::Relaxed);
        if total < threshold || payloads.is_empty() {
            return run_group(self, &f, 0, &payloads);
        }
        let workers = std::thread::available_parallelism()
            .map_or(1, usize::from)
            .min(payloads.len());
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
            tasks.push((
                start,
                tokio::task::spawn_blocking(move || run_group(&codec, &*f, start, &chunk)),
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

fn run_group<F>(
    codec: &PayloadCodec,
    f: &F,
    first: usize,
    payloads: &[Bytes],
) -> Result<Vec<Option<Bytes>>, BatchError>
where
    F: Fn(&PayloadCodec, &[u8]) -> Result<Option<Bytes>, CodecError>,
{
    payloads
        .iter()
        .enumerate()
        .map(|(i, p)| {
            f(codec, p).map_err(|error| BatchError {
                index: first + i,
                error,
            })
        })
        .collect()
}

/// Turns the working buffer into the result starting at `start`, giving back a large unused
/// tail (compression reserves the worst case) so a small result does not pin a big allocation.
fn finish(mut buf: Vec<u8>, start: usize) -> Bytes {
    if buf.capacity() - buf.len() > buf.len() / 8 {
        buf.shrink_to_fit();
    }
    Bytes::from(buf).slice(start..)
}

impl State {
    fn build(
        config: &Config,
        counters: &CounterRegistry,
        rng: &SystemRandom,
    ) -> Result<Self, ConfigError> {
        let keys = keys::load_keys(config, counters, rng)?;
        let key = |name: String, id: Option<&String>| -> Result<Arc<KeyEntry>, ConfigError> {
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
            keys.get(id).cloned().ok_or_else(|| {
                ConfigError::invalid(
                    name,
                    format!("names key {id:?}, which is not in encryption.keys"),
                )
            })
        };
        let top_key = config.encryption.active_key.as_ref();
        let default_policy = Policy {
            encrypt: if config.encryption.enabled {
                Some(key("encryption.active_key".to_owned(), top_key)?)
            } else {
                None
            },
            compress: config.compression.enabled,
            seal_failures: config.encryption.seal_failures,
        };
        let mut namespaces = HashMap::new();
        for (name, ns) in &config.namespaces {
            let encrypt = ns.encryption.unwrap_or(config.encryption.enabled);
            let policy = Policy {
                encrypt: if encrypt {
                    let (which, id) = match &ns.active_key {
                        Some(id) => (format!("namespaces.{name}.active_key"), Some(id)),
                        None => ("encryption.active_key".to_owned(), top_key),
                    };
                    Some(key(which, id)?)
                } else {
                    None
                },
                compress: ns.compression.unwrap_or(config.compression.enabled),
                seal_failures: ns.seal_failures.unwrap_or(config.encryption.seal_failures),
            };
            namespaces.insert(name.clone(), policy);
        }
        if !(1..=22).contains(&config.compression.level) {
            return Err(ConfigError::invalid("compression.level", "must be 1..=22"));
        }
        Ok(Self {
            keys,
            default_policy,
            namespaces,
            level: config.compression.level,
            min_size: config.compression.min_size,
            max_decompressed: config.compression.max_decompressed_bytes,
            zstd_header: wire::metadata_prefix(&[(ENCODING_KEY, ENCODING_ZSTD)]),
        })
    }

    fn policy(&self, namespace: Option<&str>) -> &Policy {
        namespace
            .and_then(|ns| self.namespaces.get(ns))
            .unwrap_or(&self.default_policy)
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
        buf.reserve(reserve + zstd::zstd_safe::compress_bound(payload.len()) + TAG_LEN);
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
