//! Envelope encryption: data keys (DEKs) made here, one per key-encryption key (KEK) and
//! namespace, wrapped by the KEK in its key service.
//!
//! # Life of a data key
//!
//! - **Made on first use** of a KEK in a namespace: 32 random bytes and a 128-bit id, wrapped
//!   with one call to the key service (the namespace as encryption context). Concurrent first
//!   uses share that one call.
//! - **Encrypts** that namespace's new payloads for at most `encryption.dek_rotation_s` (its
//!   *lifetime*) and at most `max_encryptions` times (a guard well inside the 2^32 messages
//!   NIST SP 800-38D allows per key with random nonces).
//! - **Replaced ahead of time, off the hot path**: a background task wraps the next data key
//!   once three quarters of the lifetime or of the encryption budget are used, so RPCs never
//!   wait for the key service except on the very first use. A data key that was not used since
//!   it was made is not replaced: it expires, and the next use makes a new one.
//! - **Key service unreachable**: the current data key keeps encrypting until it expires;
//!   then encryption fails closed ([`CodecError::KeyUnavailable`], gRPC `UNAVAILABLE`, naming
//!   the key id). A failed call is not repeated for [`RETRY_AFTER`], so an outage does not turn
//!   into a call per RPC.
//! - **Decryption** looks the wrapped data key up in a bounded LRU of unwrapped keys (every
//!   data key made here goes into it too). A miss is one unwrap call, shared by concurrent
//!   lookups of the same wrapped key; while the key service is down, cached keys keep
//!   decrypting and the rest fail closed.
//!
//! # Bounding what callers can make the key service do
//!
//! Payloads given to decode are input from callers, and every wrapped data key the gateway
//! has not seen before is a key-service call. So that a caller cannot turn payloads with made
//! up wrapped keys into key-service load (or a key-service bill):
//!
//! - **Wrapped keys longer than [`MAX_WRAPPED_LEN`]** are refused without a call.
//! - **Failed unwraps are remembered** for [`NEGATIVE_TTL`] (keyed by KEK id, namespace and
//!   the wrapped bytes): the same key sent again is refused from memory.
//! - **Unwrap failures cost a budget** per KEK and namespace: every unwrap call takes one of
//!   [`FAILURE_BURST`] tokens before it goes out and gives it back unless the key service
//!   said the key does not unwrap (or refused); one token comes back every
//!   [`FAILURE_REFILL`]. With none left, unwraps of keys not cached are refused without a call
//!   ([`CodecError::KeyThrottled`]) until a token is back, so at most `FAILURE_BURST` plus one
//!   per `FAILURE_REFILL` calls fail for a namespace, however many payloads, requests and
//!   connections carry made-up keys. Cached keys keep decrypting meanwhile; data keys of the
//!   attacked namespace that are not cached wait for the budget (the price is paid by the
//!   namespace the caller may use, not by others).
//! - **At most [`CALLS_PER_KEK`] calls per KEK run at once** (wraps and unwraps; the rest
//!   wait their turn).
//!
//! The per-message cap of distinct data keys to unwrap is the caller's (`prepare_decode`).
//!
//! Unwrapped keys exist only as AES key schedules inside AWS-LC (`LessSafeKey`) and as
//! [`Dek`] values that are zeroed when dropped; they are never logged (data key ids are not
//! secret and are logged).

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock, RwLock, Weak};
use std::time::{Duration, Instant};

use arc_swap::{ArcSwap, ArcSwapOption};
use aws_lc_rs::rand::{SecureRandom, SystemRandom};
use futures::FutureExt;
use futures::future::{BoxFuture, Shared};
use quick_cache::Equivalent;

use super::CodecError;
use super::keys::KeyEntry;
use crate::kms::{DEK_LEN, Dek, KeyEncryptionKey, KmsError};

/// How long a failed attempt to make a data key is answered from memory before the key
/// service is asked again.
pub(crate) const RETRY_AFTER: Duration = Duration::from_secs(1);

/// Default bound of encryptions per data key: half the random-nonce limit of 2^32.
pub(crate) const DEFAULT_MAX_ENCRYPTIONS: u64 = 1 << 31;

/// Longest wrapped data key sent to a key service (AWS KMS: under 200 bytes for a 32-byte
/// key; PKCS#11 RSA-4096 OAEP: 512 bytes).
pub(crate) const MAX_WRAPPED_LEN: usize = 1024;

/// How long a wrapped key that did not unwrap is refused from memory.
pub(crate) const NEGATIVE_TTL: Duration = Duration::from_secs(10);

/// Failed unwraps remembered at most (an LRU).
const NEGATIVE_CACHE_SIZE: usize = 4096;

/// Unwrap failures a KEK and namespace may have before unwraps of keys not cached wait.
pub(crate) const FAILURE_BURST: u32 = 8;

/// One failure token comes back this often.
pub(crate) const FAILURE_REFILL: Duration = Duration::from_secs(2);

/// Failure budgets kept at most; full ones are forgotten first.
const MAX_BUDGETS: usize = 4096;

/// Key-service calls running at once per KEK.
pub(crate) const CALLS_PER_KEK: usize = 8;

/// First wait before a key service found unavailable is probed again; it doubles per failed
/// probe up to [`PROBE_MAX_BACKOFF`].
pub const PROBE_BACKOFF: Duration = Duration::from_secs(1);

/// Longest wait between probes of an unavailable key service.
pub const PROBE_MAX_BACKOFF: Duration = Duration::from_secs(30);

/// What the gateway last learnt about a KEK's key service, from real calls and probes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeyServiceState {
    /// Not asked yet.
    Unknown,
    /// The last call (or probe) worked.
    Ok,
    /// The last call (or probe) could not reach the service (no key material in the reason).
    Unavailable(String),
    /// The service refused to wrap with the key (permissions, disabled or deleted key).
    Refused(String),
}

/// One KEK's [`KeyServiceState`] and when to probe it next.
#[derive(Debug, Clone)]
struct Health {
    state: KeyServiceState,
    /// When the state last changed.
    since: Instant,
    /// When the service last answered.
    last_ok: Option<Instant>,
    /// The next probe is due then.
    next_probe: Instant,
    backoff: Duration,
}

/// What a reload may change.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct DekSettings {
    /// A data key encrypts for at most this long.
    pub(crate) lifetime: Duration,
    /// A data key encrypts at most this many payloads.
    pub(crate) max_encryptions: u64,
    /// Unwrapped data keys kept for decryption.
    pub(crate) cache_size: usize,
}

/// Why a data key is not available (cloneable: shared by every waiter of one call).
#[derive(Debug, Clone)]
pub(crate) struct DekError {
    key_id: String,
    kind: DekErrorKind,
    reason: String,
}

/// What kind of failure a [`DekError`] is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum DekErrorKind {
    /// The key service was unreachable (retrying later may succeed).
    Unavailable,
    /// The key service refused, or the wrapped key does not unwrap (or is not one).
    Refused,
    /// Not asked: the namespace's unwrap failure budget is spent (see the module docs).
    Throttled,
}

impl DekError {
    fn from_kms(e: &KmsError, key_id: &str) -> Self {
        Self {
            key_id: key_id.to_owned(),
            kind: if e.is_retryable() {
                DekErrorKind::Unavailable
            } else {
                DekErrorKind::Refused
            },
            reason: e.to_string(),
        }
    }
}

impl From<DekError> for CodecError {
    fn from(e: DekError) -> Self {
        match e.kind {
            DekErrorKind::Unavailable => CodecError::KeyUnavailable {
                key_id: e.key_id,
                reason: e.reason,
            },
            DekErrorKind::Refused => CodecError::KeyService {
                key_id: e.key_id,
                reason: e.reason,
            },
            DekErrorKind::Throttled => CodecError::KeyThrottled {
                key_id: e.key_id,
                reason: e.reason,
            },
        }
    }
}

type Pending<T> = Shared<BoxFuture<'static, Result<T, DekError>>>;

/// The data key encrypting one namespace's payloads under one KEK.
struct Current {
    entry: Arc<KeyEntry>,
    kek: Arc<dyn KeyEncryptionKey>,
    created: Instant,
}

/// One (KEK id, namespace): its current data key and the call making the next one.
struct Slot {
    namespace: String,
    current: ArcSwapOption<Current>,
    making: Mutex<Option<Pending<()>>>,
    /// The last failed attempt, answered from memory for [`RETRY_AFTER`].
    failed: Mutex<Option<(Instant, DekError)>>,
    /// Whether the current data key encrypted anything (only used keys are replaced ahead of
    /// time).
    used: AtomicBool,
    /// Whether a failed background replacement was logged (once per outage).
    warned: AtomicBool,
}

/// Key of the decryption cache: the wrapped key and its id exactly as payloads carry them,
/// under their KEK id and namespace. The id and namespace are part of the key because they
/// are part of the associated data the cached entry opens with.
#[derive(Debug, Clone, Hash, PartialEq, Eq)]
struct CacheKey {
    kek_id: String,
    namespace: String,
    dek_id: String,
    wrapped: Box<[u8]>,
}

/// Borrowed [`CacheKey`] for lookups without allocating (same field order, same hash).
#[derive(Hash)]
struct CacheKeyRef<'a> {
    kek_id: &'a str,
    namespace: &'a str,
    dek_id: &'a str,
    wrapped: &'a [u8],
}

impl Equivalent<CacheKey> for CacheKeyRef<'_> {
    fn equivalent(&self, key: &CacheKey) -> bool {
        self.kek_id == key.kek_id
            && self.namespace == key.namespace
            && self.dek_id == key.dek_id
            && *self.wrapped == *key.wrapped
    }
}

type DekCache = quick_cache::sync::Cache<CacheKey, Arc<KeyEntry>>;

/// Wrapped keys that did not unwrap, keyed by KEK id, namespace and wrapped bytes (the data
/// key id is left empty: it does not change what the key service answers).
type NegativeCache = quick_cache::sync::Cache<CacheKey, (Instant, DekError)>;

/// One KEK and namespace's budget of unwrap failures: a token bucket of [`FAILURE_BURST`]
/// tokens, one back every [`FAILURE_REFILL`].
#[derive(Debug, Clone, Copy)]
struct FailureBudget {
    tokens: u32,
    /// When the last token came back (or the bucket was last full).
    refilled: Instant,
}

impl FailureBudget {
    fn full(now: Instant) -> Self {
        Self {
            tokens: FAILURE_BURST,
            refilled: now,
        }
    }

    /// Adds the tokens that came back until `now`.
    fn refill(&mut self, now: Instant) {
        let elapsed = now.saturating_duration_since(self.refilled);
        let back =
            u32::try_from(elapsed.as_nanos() / FAILURE_REFILL.as_nanos()).unwrap_or(u32::MAX);
        if self.tokens.saturating_add(back) >= FAILURE_BURST {
            self.tokens = FAILURE_BURST;
            self.refilled = now;
        } else {
            self.tokens += back;
            self.refilled += FAILURE_REFILL * back;
        }
    }

    /// Takes a token at `now`; `false` when none is left.
    fn take(&mut self, now: Instant) -> bool {
        self.refill(now);
        if self.tokens == 0 {
            return false;
        }
        self.tokens -= 1;
        true
    }

    /// Gives a token back (the call it was taken for did not fail).
    fn give_back(&mut self) {
        self.tokens = (self.tokens + 1).min(FAILURE_BURST);
    }
}

/// Data keys of every KEK and namespace: the current ones for encryption, an LRU of unwrapped
/// ones for decryption. Lives as long as the codec (across reloads).
pub(crate) struct DekManager {
    settings: ArcSwap<DekSettings>,
    /// KEK id → namespace → slot.
    slots: RwLock<HashMap<String, HashMap<String, Arc<Slot>>>>,
    cache: ArcSwap<DekCache>,
    unwrapping: Mutex<HashMap<CacheKey, Pending<Arc<KeyEntry>>>>,
    /// Wrapped keys that recently did not unwrap.
    refused: NegativeCache,
    /// (KEK id, namespace) → its unwrap failure budget.
    budgets: Mutex<HashMap<(String, String), FailureBudget>>,
    /// KEK id → the permits of its concurrent key-service calls.
    permits: Mutex<HashMap<String, Arc<tokio::sync::Semaphore>>>,
    /// KEK id → what its key service last answered.
    health: Mutex<HashMap<String, Health>>,
    refresher: OnceLock<()>,
    rng: SystemRandom,
}

impl std::fmt::Debug for DekManager {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DekManager")
            .field("settings", &**self.settings.load())
            .field("cached", &self.cache.load().len())
            .finish_non_exhaustive()
    }
}

/// Same KEK object (a reload that changes a key id's URI makes a new one).
fn same_kek(a: &Arc<dyn KeyEncryptionKey>, b: &Arc<dyn KeyEncryptionKey>) -> bool {
    std::ptr::addr_eq(Arc::as_ptr(a), Arc::as_ptr(b))
}

impl DekManager {
    pub(crate) fn new(settings: DekSettings) -> Arc<Self> {
        Arc::new(Self {
            cache: ArcSwap::from_pointee(DekCache::new(settings.cache_size)),
            settings: ArcSwap::from_pointee(settings),
            slots: RwLock::default(),
            unwrapping: Mutex::default(),
            refused: NegativeCache::new(NEGATIVE_CACHE_SIZE),
            budgets: Mutex::default(),
            permits: Mutex::default(),
            health: Mutex::default(),
            refresher: OnceLock::new(),
            rng: SystemRandom::new(),
        })
    }

    /// Applies reloaded settings; a new cache size starts a new (empty) cache.
    pub(crate) fn set_settings(&self, settings: DekSettings) {
        if settings.cache_size != self.settings.load().cache_size {
            self.cache
                .store(Arc::new(DekCache::new(settings.cache_size)));
        }
        self.settings.store(Arc::new(settings));
    }

    /// The per-data-key encryption bound.
    pub(crate) fn max_encryptions(&self) -> u64 {
        self.settings.load().max_encryptions
    }

    fn slot(&self, kek_id: &str, namespace: &str) -> Arc<Slot> {
        if let Some(slot) = self
            .slots
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(kek_id)
            .and_then(|m| m.get(namespace))
        {
            return slot.clone();
        }
        let mut slots = self.slots.write().unwrap_or_else(|e| e.into_inner());
        slots
            .entry(kek_id.to_owned())
            .or_default()
            .entry(namespace.to_owned())
            .or_insert_with(|| {
                Arc::new(Slot {
                    namespace: namespace.to_owned(),
                    current: ArcSwapOption::empty(),
                    making: Mutex::default(),
                    failed: Mutex::default(),
                    used: AtomicBool::new(false),
                    warned: AtomicBool::new(false),
                })
            })
            .clone()
    }

    /// The slot's data key if it may still encrypt for `kek`.
    fn usable(&self, slot: &Slot, kek: &Arc<dyn KeyEncryptionKey>) -> Option<Arc<Current>> {
        let current = slot.current.load_full()?;
        let settings = self.settings.load();
        (same_kek(&current.kek, kek)
            && current.created.elapsed() < settings.lifetime
            && current.entry.counter.count() < settings.max_encryptions)
            .then_some(current)
    }

    /// The data key that encrypts `namespace`'s payloads under `kek` now, for the synchronous
    /// encoder; [`ensure`](Self::ensure) must have run first.
    pub(crate) fn current(
        &self,
        kek: &Arc<dyn KeyEncryptionKey>,
        namespace: &str,
    ) -> Result<Arc<KeyEntry>, CodecError> {
        let slot = self
            .slots
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(kek.key_id())
            .and_then(|m| m.get(namespace))
            .cloned();
        let current = slot.as_ref().and_then(|s| self.usable(s, kek));
        match (slot, current) {
            (Some(slot), Some(current)) => {
                if !slot.used.load(Ordering::Relaxed) {
                    slot.used.store(true, Ordering::Relaxed);
                }
                Ok(current.entry.clone())
            }
            _ => Err(CodecError::KeyUnavailable {
                key_id: kek.key_id().to_owned(),
                reason: "no current data key for this namespace (expired, or not made yet)"
                    .to_owned(),
            }),
        }
    }

    /// Makes sure `namespace` has a data key under `kek` that may encrypt now: at once when it
    /// has, else after one (shared) wrap call.
    pub(crate) async fn ensure(
        self: &Arc<Self>,
        kek: &Arc<dyn KeyEncryptionKey>,
        namespace: &str,
    ) -> Result<(), DekError> {
        let slot = self.slot(kek.key_id(), namespace);
        if self.usable(&slot, kek).is_some() {
            return Ok(());
        }
        self.spawn_refresher();
        // Twice at most: a call already under way may be for the KEK the id named before a
        // reload.
        for _ in 0..2 {
            self.make(&slot, kek).await?;
            if self.usable(&slot, kek).is_some() {
                return Ok(());
            }
        }
        Err(DekError {
            key_id: kek.key_id().to_owned(),
            kind: DekErrorKind::Unavailable,
            reason: "no data key could be made".to_owned(),
        })
    }

    /// Makes the slot's next data key, sharing a call already under way and answering a
    /// recent failure from memory.
    fn make(self: &Arc<Self>, slot: &Arc<Slot>, kek: &Arc<dyn KeyEncryptionKey>) -> Pending<()> {
        let mut making = slot.making.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(pending) = &*making {
            return pending.clone();
        }
        if let Some((at, error)) = &*slot.failed.lock().unwrap_or_else(|e| e.into_inner())
            && at.elapsed() < RETRY_AFTER
        {
            let error = error.clone();
            return async move { Err(error) }.boxed().shared();
        }
        let this = self.clone();
        let slot2 = slot.clone();
        let kek = kek.clone();
        let pending = async move {
            let result = this.wrap_new(&slot2, &kek).await;
            *slot2.failed.lock().unwrap_or_else(|e| e.into_inner()) =
                result.as_ref().err().map(|e| (Instant::now(), e.clone()));
            *slot2.making.lock().unwrap_or_else(|e| e.into_inner()) = None;
            result
        }
        .boxed()
        .shared();
        *making = Some(pending.clone());
        pending
    }

    async fn wrap_new(&self, slot: &Slot, kek: &Arc<dyn KeyEncryptionKey>) -> Result<(), DekError> {
        let key_id = kek.key_id();
        let random = |len: usize| {
            let mut bytes = zeroize::Zeroizing::new(vec![0u8; len]);
            self.rng
                .fill(&mut bytes)
                .map(|()| bytes)
                .map_err(|_| DekError {
                    key_id: key_id.to_owned(),
                    kind: DekErrorKind::Refused,
                    reason: "random number generator failed".to_owned(),
                })
        };
        let dek = Dek::from_slice(&random(DEK_LEN)?).expect("DEK_LEN bytes");
        let dek_id: String = random(16)?.iter().map(|b| format!("{b:02x}")).collect();
        let wrapped = {
            let _permit = self.permit(key_id).await;
            self.timed(kek, "wrap", kek.wrap(&dek, &slot.namespace))
                .await?
        };
        let entry = Arc::new(KeyEntry::envelope(
            key_id,
            &dek,
            &wrapped,
            &dek_id,
            &slot.namespace,
        ));
        self.cache.load().insert(
            CacheKey {
                kek_id: key_id.to_owned(),
                namespace: slot.namespace.clone(),
                dek_id: dek_id.clone(),
                wrapped: wrapped.into_boxed_slice(),
            },
            entry.clone(),
        );
        slot.used.store(false, Ordering::Relaxed);
        slot.warned.store(false, Ordering::Relaxed);
        slot.current.store(Some(Arc::new(Current {
            entry,
            kek: kek.clone(),
            created: Instant::now(),
        })));
        tracing::info!(key_id, namespace = %slot.namespace, dek_id, "new data key");
        Ok(())
    }

    /// The unwrapped data key of a payload, when cached (the synchronous decoder's lookup;
    /// [`unwrap`](Self::unwrap) fills the cache).
    pub(crate) fn cached(
        &self,
        kek_id: &str,
        namespace: &str,
        dek_id: &str,
        wrapped: &[u8],
    ) -> Option<Arc<KeyEntry>> {
        self.cache.load().get(&CacheKeyRef {
            kek_id,
            namespace,
            dek_id,
            wrapped,
        })
    }

    /// Puts the data key `wrapped` (of `namespace`, under `kek`) into the decryption cache:
    /// nothing to do on a hit, else one unwrap call shared with concurrent lookups of the
    /// same key, within the limits of the module docs (length, failed keys remembered,
    /// failure budget, concurrent calls).
    pub(crate) async fn unwrap(
        self: &Arc<Self>,
        kek: &Arc<dyn KeyEncryptionKey>,
        namespace: &str,
        wrapped: &[u8],
        dek_id: &str,
    ) -> Result<(), DekError> {
        let hit = self
            .cached(kek.key_id(), namespace, dek_id, wrapped)
            .is_some();
        crate::telemetry::sink().dek_lookup(hit);
        if hit {
            return Ok(());
        }
        if wrapped.len() > MAX_WRAPPED_LEN {
            return Err(DekError {
                key_id: kek.key_id().to_owned(),
                kind: DekErrorKind::Refused,
                reason: format!(
                    "wrapped data key of {} bytes is longer than the {MAX_WRAPPED_LEN} bytes \
                     any key service makes; the key service was not asked",
                    wrapped.len()
                ),
            });
        }
        if let Some(e) = self.recently_refused(kek.key_id(), namespace, wrapped) {
            return Err(e);
        }
        let key = CacheKey {
            kek_id: kek.key_id().to_owned(),
            namespace: namespace.to_owned(),
            dek_id: dek_id.to_owned(),
            wrapped: wrapped.into(),
        };
        let pending = {
            let mut unwrapping = self.unwrapping.lock().unwrap_or_else(|e| e.into_inner());
            unwrapping
                .entry(key.clone())
                .or_insert_with(|| {
                    let this = self.clone();
                    let kek = kek.clone();
                    async move {
                        let result = this.unwrap_call(&kek, &key).await;
                        this.unwrapping
                            .lock()
                            .unwrap_or_else(|e| e.into_inner())
                            .remove(&key);
                        result
                    }
                    .boxed()
                    .shared()
                })
                .clone()
        };
        pending.await.map(drop)
    }

    /// One unwrap call for `key`, once a call permit of its KEK and a failure token of its
    /// namespace are had; fills the decryption cache, or the cache of refused keys.
    async fn unwrap_call(
        &self,
        kek: &Arc<dyn KeyEncryptionKey>,
        key: &CacheKey,
    ) -> Result<Arc<KeyEntry>, DekError> {
        let _permit = self.permit(&key.kek_id).await;
        // A call that ended while this one waited may have answered it.
        if let Some(entry) = self.cache.load().get(key) {
            return Ok(entry);
        }
        if let Some(e) = self.recently_refused(&key.kek_id, &key.namespace, &key.wrapped) {
            return Err(e);
        }
        if !self.take_token(&key.kek_id, &key.namespace) {
            return Err(DekError {
                key_id: key.kek_id.clone(),
                kind: DekErrorKind::Throttled,
                reason: format!(
                    "the key service was not asked: {FAILURE_BURST} wrapped data keys for \
                     namespace {:?} recently did not unwrap (made-up or foreign keys); data \
                     keys not cached for it are unwrapped again as the budget refills (one \
                     every {} s)",
                    key.namespace,
                    FAILURE_REFILL.as_secs()
                ),
            });
        }
        let result = self
            .timed(kek, "unwrap", kek.unwrap(&key.wrapped, &key.namespace))
            .await;
        match &result {
            Err(e) if e.kind == DekErrorKind::Refused => {
                self.refused.insert(
                    CacheKey {
                        dek_id: String::new(),
                        ..key.clone()
                    },
                    (Instant::now(), e.clone()),
                );
            }
            _ => self.give_back_token(&key.kek_id, &key.namespace),
        }
        let dek = result?;
        let entry = Arc::new(KeyEntry::envelope(
            &key.kek_id,
            &dek,
            &key.wrapped,
            &key.dek_id,
            &key.namespace,
        ));
        self.cache.load().insert(key.clone(), entry.clone());
        Ok(entry)
    }

    /// The failure of `wrapped` when it did not unwrap within the last [`NEGATIVE_TTL`].
    fn recently_refused(&self, kek_id: &str, namespace: &str, wrapped: &[u8]) -> Option<DekError> {
        let (at, error) = self.refused.get(&CacheKeyRef {
            kek_id,
            namespace,
            dek_id: "",
            wrapped,
        })?;
        (at.elapsed() < NEGATIVE_TTL).then_some(error)
    }

    /// Takes a failure token of (`kek_id`, `namespace`); `false` when none is left.
    fn take_token(&self, kek_id: &str, namespace: &str) -> bool {
        let now = Instant::now();
        let mut budgets = self.budgets.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(budget) = budgets.get_mut(&(kek_id.to_owned(), namespace.to_owned())) {
            return budget.take(now);
        }
        if budgets.len() >= MAX_BUDGETS {
            budgets.retain(|_, b| {
                b.refill(now);
                b.tokens < FAILURE_BURST
            });
        }
        let mut budget = FailureBudget::full(now);
        let taken = budget.take(now);
        budgets.insert((kek_id.to_owned(), namespace.to_owned()), budget);
        taken
    }

    /// Gives back the token of a call that did not fail for its key.
    fn give_back_token(&self, kek_id: &str, namespace: &str) {
        let mut budgets = self.budgets.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(budget) = budgets.get_mut(&(kek_id.to_owned(), namespace.to_owned())) {
            budget.give_back();
        }
    }

    /// A permit for one call to `kek_id`'s key service (at most [`CALLS_PER_KEK`] at once).
    async fn permit(&self, kek_id: &str) -> Option<tokio::sync::OwnedSemaphorePermit> {
        let semaphore = self
            .permits
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(kek_id.to_owned())
            .or_insert_with(|| Arc::new(tokio::sync::Semaphore::new(CALLS_PER_KEK)))
            .clone();
        // Never closed: `None` cannot happen.
        semaphore.acquire_owned().await.ok()
    }

    /// Runs one key-service call: metrics, and the KEK's [`KeyServiceState`] learnt from the
    /// answer. A wrapped key that does not unwrap says nothing about the service (callers
    /// choose what they send), so only answers that do are recorded.
    async fn timed<T>(
        &self,
        kek: &Arc<dyn KeyEncryptionKey>,
        operation: &'static str,
        call: impl Future<Output = Result<T, KmsError>>,
    ) -> Result<T, DekError> {
        let result = timed(kek, operation, call).await;
        let learnt = match &result {
            Ok(_) => Some(KeyServiceState::Ok),
            Err(e @ KmsError::Unavailable { .. }) => {
                Some(KeyServiceState::Unavailable(e.to_string()))
            }
            Err(e @ (KmsError::Refused { .. } | KmsError::Config { .. }))
                if operation != "unwrap" =>
            {
                Some(KeyServiceState::Refused(e.to_string()))
            }
            Err(_) => None,
        };
        if let Some(state) = learnt {
            self.record(kek, state, operation == "probe");
        }
        result.map_err(|e| DekError::from_kms(&e, kek.key_id()))
    }

    /// Records what `kek`'s service answered; logs a change between reachable and not. Only
    /// failed probes lengthen the backoff: failures of real calls while it is down would
    /// otherwise push the next probe out for as long as traffic keeps failing.
    fn record(&self, kek: &Arc<dyn KeyEncryptionKey>, state: KeyServiceState, probe: bool) {
        let now = Instant::now();
        let mut health = self.health.lock().unwrap_or_else(|e| e.into_inner());
        let entry = health
            .entry(kek.key_id().to_owned())
            .or_insert_with(|| Health {
                state: KeyServiceState::Unknown,
                since: now,
                last_ok: None,
                next_probe: now,
                backoff: PROBE_BACKOFF,
            });
        let key_id = kek.key_id();
        let provider = kek.provider().label();
        match &state {
            KeyServiceState::Ok => {
                if matches!(
                    entry.state,
                    KeyServiceState::Unavailable(_) | KeyServiceState::Refused(_)
                ) {
                    tracing::info!(key_id, provider, down_for = ?now - entry.since, "key service reachable again");
                }
                entry.last_ok = Some(now);
                entry.backoff = PROBE_BACKOFF;
            }
            KeyServiceState::Unavailable(reason) | KeyServiceState::Refused(reason) => {
                if !matches!(
                    entry.state,
                    KeyServiceState::Unavailable(_) | KeyServiceState::Refused(_)
                ) {
                    tracing::warn!(key_id, provider, error = %reason, "key service unavailable: payloads that need this key fail with UNAVAILABLE until it is back; probing it in the background");
                    entry.backoff = PROBE_BACKOFF;
                    entry.next_probe = now + entry.backoff;
                } else if probe {
                    entry.backoff = (entry.backoff * 2).min(PROBE_MAX_BACKOFF);
                    entry.next_probe = now + entry.backoff;
                }
            }
            KeyServiceState::Unknown => {}
        }
        if std::mem::discriminant(&entry.state) != std::mem::discriminant(&state) {
            entry.since = now;
        }
        entry.state = state;
    }

    /// What `key_id`'s service last answered, and for how long it has been so.
    pub(crate) fn key_service_state(&self, key_id: &str) -> (KeyServiceState, Option<Duration>) {
        let health = self.health.lock().unwrap_or_else(|e| e.into_inner());
        match health.get(key_id) {
            Some(h) => (h.state.clone(), Some(h.since.elapsed())),
            None => (KeyServiceState::Unknown, None),
        }
    }

    /// Whether `key_id`'s service is due a probe: never asked; unavailable and its backoff
    /// is over; or reachable but silent for `interval` (`None`: healthy keys are not probed).
    pub(crate) fn probe_due(&self, key_id: &str, interval: Option<Duration>) -> bool {
        let health = self.health.lock().unwrap_or_else(|e| e.into_inner());
        let Some(h) = health.get(key_id) else {
            return true;
        };
        match h.state {
            KeyServiceState::Unknown => true,
            KeyServiceState::Ok => {
                interval.is_some_and(|i| h.last_ok.is_none_or(|at| at.elapsed() >= i))
            }
            KeyServiceState::Unavailable(_) | KeyServiceState::Refused(_) => {
                Instant::now() >= h.next_probe
            }
        }
    }

    /// Asks `kek`'s service whether it answers: wraps a throwaway random data key for
    /// `namespace` (nothing is kept; the result is recorded like any call's).
    pub(crate) async fn probe(&self, kek: &Arc<dyn KeyEncryptionKey>, namespace: &str) {
        let mut bytes = zeroize::Zeroizing::new([0u8; DEK_LEN]);
        if self.rng.fill(&mut bytes[..]).is_err() {
            return;
        }
        let dek = Dek::from_slice(&bytes[..]).expect("DEK_LEN bytes");
        let _permit = self.permit(kek.key_id()).await;
        let _ = self.timed(kek, "probe", kek.wrap(&dek, namespace)).await;
    }

    /// Per KEK id, the age of its oldest data key that may still encrypt (metrics).
    pub(crate) fn ages(&self) -> Vec<(String, f64)> {
        let lifetime = self.settings.load().lifetime;
        let slots = self.slots.read().unwrap_or_else(|e| e.into_inner());
        let mut out: Vec<(String, f64)> = slots
            .iter()
            .filter_map(|(kek_id, by_ns)| {
                by_ns
                    .values()
                    .filter_map(|s| s.current.load_full())
                    .map(|c| c.created.elapsed())
                    .filter(|age| *age < lifetime)
                    .max()
                    .map(|age| (kek_id.clone(), age.as_secs_f64()))
            })
            .collect();
        out.sort_by(|a, b| a.0.cmp(&b.0));
        out
    }

    /// Unwrapped data keys in the decryption cache.
    #[cfg(test)]
    pub(crate) fn cached_len(&self) -> usize {
        self.cache.load().len()
    }

    /// Starts the background replacement task once (needs a tokio runtime; without one, data
    /// keys are only made when they have expired).
    fn spawn_refresher(self: &Arc<Self>) {
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        if self.refresher.set(()).is_err() {
            return;
        }
        let weak: Weak<Self> = Arc::downgrade(self);
        runtime.spawn(async move {
            loop {
                let Some(this) = weak.upgrade() else { return };
                this.refresh_due().await;
                let tick = (this.settings.load().lifetime / 8)
                    .clamp(Duration::from_millis(50), Duration::from_secs(10));
                drop(this);
                tokio::time::sleep(tick).await;
            }
        });
    }

    /// Replaces every used data key past three quarters of its lifetime or encryption budget;
    /// forgets unused ones that expired.
    pub(crate) async fn refresh_due(self: &Arc<Self>) {
        let settings = self.settings.load_full();
        let renew_age = settings.lifetime.mul_f64(0.75);
        let renew_count = settings.max_encryptions - settings.max_encryptions / 4;
        let slots: Vec<Arc<Slot>> = self
            .slots
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .flat_map(|m| m.values().cloned())
            .collect();
        let mut due = Vec::new();
        for slot in slots {
            let Some(current) = slot.current.load_full() else {
                continue;
            };
            let age = current.created.elapsed();
            let worn = current.entry.counter.count() >= renew_count;
            if !(age >= renew_age || worn) {
                continue;
            }
            if slot.used.load(Ordering::Relaxed) {
                let pending = self.make(&slot, &current.kek);
                due.push(async move {
                    if let Err(e) = pending.await
                        && !slot.warned.swap(true, Ordering::Relaxed)
                    {
                        tracing::warn!(
                            key_id = %e.key_id,
                            namespace = %slot.namespace,
                            error = %e.reason,
                            "cannot replace a data key ahead of time; the current one encrypts \
                             until it expires, then encryption fails closed"
                        );
                    }
                });
            } else if age >= settings.lifetime {
                slot.current.store(None);
            }
        }
        futures::future::join_all(due).await;
    }
}

/// Runs one key-service call, recording it in the KMS metrics.
async fn timed<T>(
    kek: &Arc<dyn KeyEncryptionKey>,
    operation: &'static str,
    call: impl Future<Output = Result<T, KmsError>>,
) -> Result<T, KmsError> {
    let start = Instant::now();
    let result = call.await;
    let label = match &result {
        Ok(_) => "ok",
        Err(KmsError::Unavailable { .. }) => "unavailable",
        Err(KmsError::Refused { .. }) => "refused",
        Err(KmsError::Invalid { .. }) => "invalid",
        Err(KmsError::Config { .. }) => "config",
    };
    crate::telemetry::sink().kms_call(
        kek.provider().label(),
        operation,
        label,
        start.elapsed().as_secs_f64(),
    );
    result
}

#[cfg(test)]
mod budget_tests {
    use super::*;

    #[test]
    fn the_failure_budget_refills_one_token_per_period_up_to_the_burst() {
        let start = Instant::now();
        let mut b = FailureBudget::full(start);
        for _ in 0..FAILURE_BURST {
            assert!(b.take(start));
        }
        assert!(!b.take(start), "empty");
        assert!(
            !b.take(start + FAILURE_REFILL / 2),
            "half a period is no token"
        );
        assert!(b.take(start + FAILURE_REFILL), "one period, one token");
        assert!(!b.take(start + FAILURE_REFILL));
        // Long idle: full again, never more than the burst.
        let later = start + FAILURE_REFILL * (FAILURE_BURST * 10);
        b.refill(later);
        assert_eq!(b.tokens, FAILURE_BURST);
        b.give_back();
        assert_eq!(b.tokens, FAILURE_BURST);
        // A token given back (the call did not fail) is there again at once.
        assert!(b.take(later));
        b.give_back();
        assert_eq!(b.tokens, FAILURE_BURST);
    }
}
