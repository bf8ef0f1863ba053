//! Data keys of envelope encryption, at the unit level: a key-encryption key of the test's own
//! (AES-GCM in memory, the namespace as associated data, counting its calls, switchable off)
//! stands in for the key service. The end-to-end tests (`tests/test_envelope.py`) use a real
//! KMS-compatible server.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use aws_lc_rs::aead::{AES_256_GCM, Aad, LessSafeKey, NONCE_LEN, Nonce, UnboundKey};
use aws_lc_rs::rand::{SecureRandom, SystemRandom};
use bytes::Bytes;
use prost::Message;

use super::{BatchError, CodecError, Connector, DekTuning, PayloadCodec, WirePayload};
use crate::budget::MessageBudget;
use crate::config::{Config, KeySpec};
use crate::kms::{Dek, KeyEncryptionKey, KmsError, Provider};

/// An in-memory KEK: AES-256-GCM under a random key, the namespace as associated data.
#[derive(Debug)]
struct TestKek {
    id: String,
    key: [u8; 32],
    wraps: AtomicUsize,
    unwraps: AtomicUsize,
    down: AtomicBool,
    delay: Duration,
    /// Calls under way, and the most ever under way at once.
    in_flight: AtomicUsize,
    max_in_flight: AtomicUsize,
}

impl TestKek {
    fn new(id: &str, delay: Duration) -> Arc<Self> {
        let mut key = [0u8; 32];
        SystemRandom::new().fill(&mut key).unwrap();
        Arc::new(Self {
            id: id.to_owned(),
            key,
            wraps: AtomicUsize::new(0),
            unwraps: AtomicUsize::new(0),
            down: AtomicBool::new(false),
            delay,
            in_flight: AtomicUsize::new(0),
            max_in_flight: AtomicUsize::new(0),
        })
    }

    fn aead(&self) -> LessSafeKey {
        LessSafeKey::new(UnboundKey::new(&AES_256_GCM, &self.key).unwrap())
    }

    async fn call(&self) -> Result<(), KmsError> {
        let now = self.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
        self.max_in_flight.fetch_max(now, Ordering::SeqCst);
        tokio::time::sleep(self.delay).await;
        self.in_flight.fetch_sub(1, Ordering::SeqCst);
        if self.down.load(Ordering::SeqCst) {
            return Err(KmsError::Unavailable {
                key_id: self.id.clone(),
                provider: "test",
                reason: "switched off".to_owned(),
            });
        }
        Ok(())
    }
}

#[async_trait::async_trait]
impl KeyEncryptionKey for TestKek {
    fn key_id(&self) -> &str {
        &self.id
    }

    fn provider(&self) -> Provider {
        Provider::Grpc
    }

    async fn wrap(&self, dek: &Dek, namespace: &str) -> Result<Vec<u8>, KmsError> {
        self.wraps.fetch_add(1, Ordering::SeqCst);
        self.call().await?;
        let mut nonce = [0u8; NONCE_LEN];
        SystemRandom::new().fill(&mut nonce).unwrap();
        let mut out = dek.expose().to_vec();
        self.aead()
            .seal_in_place_append_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(namespace.as_bytes()),
                &mut out,
            )
            .unwrap();
        out.splice(0..0, nonce);
        Ok(out)
    }

    async fn unwrap(&self, wrapped: &[u8], namespace: &str) -> Result<Dek, KmsError> {
        self.unwraps.fetch_add(1, Ordering::SeqCst);
        self.call().await?;
        let invalid = || KmsError::Invalid {
            key_id: self.id.clone(),
            provider: "test",
            reason: "does not unwrap".to_owned(),
        };
        if wrapped.len() < NONCE_LEN {
            return Err(invalid());
        }
        let (nonce, rest) = wrapped.split_at(NONCE_LEN);
        let mut buf = rest.to_vec();
        let plain = self
            .aead()
            .open_in_place(
                Nonce::try_assume_unique_for_key(nonce).unwrap(),
                Aad::from(namespace.as_bytes()),
                &mut buf,
            )
            .map_err(|_| invalid())?;
        Dek::from_slice(plain).ok_or_else(invalid)
    }
}

/// A codec whose keys are the test KEKs `ids` (the first one active), plus the static key
/// `static` when `with_static`.
fn envelope_codec(keks: &[Arc<TestKek>], tuning: DekTuning, cache_size: usize) -> PayloadCodec {
    let mut config = Config::default();
    config.compression.enabled = false;
    config.encryption.active_key = Some(keks[0].id.clone());
    config.encryption.dek_cache_size = cache_size;
    config.encryption.keys = keks
        .iter()
        .map(|k| KeySpec {
            id: k.id.clone(),
            file: None,
            env: None,
            kms: Some(format!("test://{}", k.id)),
        })
        .collect();
    PayloadCodec::with_parts(&config, super::keys::NONCE_LIMIT, connector(keks), tuning).unwrap()
}

fn connector(keks: &[Arc<TestKek>]) -> Connector {
    let by_id: HashMap<String, Arc<TestKek>> =
        keks.iter().map(|k| (k.id.clone(), k.clone())).collect();
    Arc::new(move |id, _uri, _settings| Ok(by_id[id].clone() as Arc<dyn KeyEncryptionKey>))
}

fn tuning(lifetime_ms: u64, max_encryptions: u64) -> DekTuning {
    DekTuning {
        lifetime: Some(Duration::from_millis(lifetime_ms)),
        max_encryptions,
    }
}

fn plain(n: usize) -> Bytes {
    WirePayload {
        metadata: [("encoding".to_owned(), b"json/plain".to_vec())].into(),
        data: Bytes::from(format!("\"PLAINTEXT-MARKER-{n}\"")),
        external_payloads: Vec::new(),
    }
    .encode_to_vec()
    .into()
}

/// Encodes one payload for `ns` as the pipeline does: prepare, then encode.
async fn encode(codec: &PayloadCodec, ns: &str, n: usize) -> Result<Bytes, CodecError> {
    codec.prepare_encode(Some(ns)).await?;
    Ok(codec.encode(Some(ns), &plain(n))?.expect("encrypted"))
}

async fn decode(codec: &PayloadCodec, ns: &str, payload: &Bytes) -> Result<Bytes, CodecError> {
    codec
        .prepare_decode(Some(ns), std::slice::from_ref(payload), false, 16)
        .await
        .map_err(|e| e.error)?;
    Ok(codec
        .decode_in(Some(ns), payload, &MessageBudget::unlimited())?
        .expect("ours"))
}

fn meta(payload: &Bytes, key: &str) -> Vec<u8> {
    WirePayload::decode(payload.clone()).unwrap().metadata[key].clone()
}

fn dek_id(payload: &Bytes) -> String {
    String::from_utf8(meta(payload, "encryption-dek-id")).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn payload_layout_names_the_kek_and_carries_the_wrapped_dek() {
    let kek = TestKek::new("payments-kek", Duration::ZERO);
    let codec = envelope_codec(std::slice::from_ref(&kek), tuning(60_000, 1 << 31), 100);
    let encoded = encode(&codec, "payments", 1).await.unwrap();
    let p = WirePayload::decode(encoded.clone()).unwrap();
    assert_eq!(p.metadata["encoding"], b"binary/encrypted");
    assert_eq!(p.metadata["encryption-key-id"], b"payments-kek");
    assert_eq!(p.metadata["encryption-dek-id"].len(), 32);
    assert!(p.metadata["encryption-dek"].len() > 32);
    assert!(!encoded.windows(16).any(|w| w == b"PLAINTEXT-MARKER"));
    // data = nonce ‖ ciphertext ‖ tag of the inner payload.
    assert_eq!(p.data.len(), 12 + plain(1).len() + 16);
    assert_eq!(
        decode(&codec, "payments", &encoded).await.unwrap(),
        plain(1)
    );
    // Our own data keys are cached when made: no unwrap call.
    assert_eq!(kek.unwraps.load(Ordering::SeqCst), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_first_use_makes_one_wrap_call() {
    let kek = TestKek::new("k", Duration::from_millis(100));
    let codec = envelope_codec(std::slice::from_ref(&kek), tuning(60_000, 1 << 31), 100);
    let tasks: Vec<_> = (0..32)
        .map(|n| {
            let codec = codec.clone();
            tokio::spawn(async move { encode(&codec, "ns", n).await.unwrap() })
        })
        .collect();
    let mut ids = HashSet::new();
    for t in tasks {
        ids.insert(dek_id(&t.await.unwrap()));
    }
    assert_eq!(kek.wraps.load(Ordering::SeqCst), 1);
    assert_eq!(ids.len(), 1);
    // Another namespace gets a data key of its own.
    let other = encode(&codec, "other", 0).await.unwrap();
    assert!(!ids.contains(&dek_id(&other)));
    assert_eq!(kek.wraps.load(Ordering::SeqCst), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_cache_misses_make_one_unwrap_call() {
    let kek = TestKek::new("k", Duration::from_millis(100));
    let writer = envelope_codec(std::slice::from_ref(&kek), tuning(60_000, 1 << 31), 100);
    let payloads: Vec<Bytes> = futures::future::join_all((0..8).map(|n| encode(&writer, "ns", n)))
        .await
        .into_iter()
        .map(Result::unwrap)
        .collect();
    // A second gateway (empty cache) decodes them: many concurrent batches, one unwrap.
    let reader = envelope_codec(std::slice::from_ref(&kek), tuning(60_000, 1 << 31), 100);
    let tasks: Vec<_> = (0..16)
        .map(|i| {
            let reader = reader.clone();
            let p = payloads[i % payloads.len()].clone();
            tokio::spawn(async move { decode(&reader, "ns", &p).await.unwrap() })
        })
        .collect();
    for (i, t) in tasks.into_iter().enumerate() {
        assert_eq!(t.await.unwrap(), plain(i % 8));
    }
    assert_eq!(kek.unwraps.load(Ordering::SeqCst), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn data_keys_rotate_by_time_in_the_background() {
    let kek = TestKek::new("k", Duration::ZERO);
    let codec = envelope_codec(std::slice::from_ref(&kek), tuning(400, 1 << 31), 100);
    let mut payloads = Vec::new();
    let start = std::time::Instant::now();
    let mut n = 0;
    while start.elapsed() < Duration::from_millis(1500) {
        // The sync encoder alone after the first prepare: rotation must not need the hot path.
        if payloads.is_empty() {
            codec.prepare_encode(Some("ns")).await.unwrap();
        }
        match codec.encode(Some("ns"), &plain(n)) {
            Ok(Some(p)) => payloads.push((n, p)),
            other => panic!("encode failed at {:?}: {other:?}", start.elapsed()),
        }
        n += 1;
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let ids: HashSet<String> = payloads.iter().map(|(_, p)| dek_id(p)).collect();
    assert!(
        ids.len() >= 3,
        "only {} data keys in 1.5 s of 400 ms keys",
        ids.len()
    );
    // One wrap per rotation, never per payload.
    let wraps = kek.wraps.load(Ordering::SeqCst);
    assert!(
        wraps <= ids.len() + 1,
        "{wraps} wraps for {} keys",
        ids.len()
    );
    assert!(payloads.len() > 50);
    for (n, p) in &payloads {
        assert_eq!(&decode(&codec, "ns", p).await.unwrap(), &plain(*n));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn data_keys_rotate_by_use_count() {
    let kek = TestKek::new("k", Duration::ZERO);
    let codec = envelope_codec(std::slice::from_ref(&kek), tuning(60_000, 8), 100);
    let mut per_key: HashMap<String, usize> = HashMap::new();
    let mut payloads = Vec::new();
    for n in 0..40 {
        let p = encode(&codec, "ns", n).await.unwrap();
        *per_key.entry(dek_id(&p)).or_default() += 1;
        payloads.push(p);
    }
    assert!(per_key.len() >= 5, "{per_key:?}");
    assert!(per_key.values().all(|&uses| uses <= 8), "{per_key:?}");
    for (n, p) in payloads.iter().enumerate() {
        assert_eq!(decode(&codec, "ns", p).await.unwrap(), plain(n));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unwrapped_key_cache_is_bounded() {
    let kek = TestKek::new("k", Duration::ZERO);
    let codec = envelope_codec(std::slice::from_ref(&kek), tuning(60_000, 1 << 31), 4);
    let mut payloads = Vec::new();
    for n in 0..40 {
        payloads.push(encode(&codec, &format!("ns{n}"), n).await.unwrap());
    }
    let cached = codec.inner.deks.cached_len();
    assert!(cached <= 8, "{cached} keys cached with a bound of 4");
    // Evicted keys are unwrapped again (one call each), and everything decodes.
    for (n, p) in payloads.iter().enumerate() {
        assert_eq!(
            decode(&codec, &format!("ns{n}"), p).await.unwrap(),
            plain(n)
        );
    }
    assert!(kek.unwraps.load(Ordering::SeqCst) >= 30);
    assert!(codec.inner.deks.cached_len() <= 8);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn key_service_down_encrypts_until_expiry_then_fails_closed_and_recovers() {
    let kek = TestKek::new("payments-kek", Duration::ZERO);
    let codec = envelope_codec(std::slice::from_ref(&kek), tuning(600, 1 << 31), 100);
    let before = encode(&codec, "ns", 0).await.unwrap();
    kek.down.store(true, Ordering::SeqCst);
    // Until the data key expires, encryption goes on (the background replacement fails).
    let start = std::time::Instant::now();
    let mut n = 1;
    let failure = loop {
        match encode(&codec, "ns", n).await {
            Ok(p) => assert_eq!(dek_id(&p), dek_id(&before)),
            Err(e) => break e,
        }
        n += 1;
        assert!(start.elapsed() < Duration::from_secs(3), "never expired");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(
        start.elapsed() >= Duration::from_millis(300),
        "{:?}",
        start.elapsed()
    );
    assert!(
        matches!(&failure, CodecError::KeyUnavailable { key_id, .. } if key_id == "payments-kek"),
        "{failure}"
    );
    // The synchronous encoder refuses too: never plaintext.
    assert!(matches!(
        codec.encode(Some("ns"), &plain(0)),
        Err(CodecError::KeyUnavailable { .. })
    ));
    // Cached data keys still decrypt; an uncached one fails closed, naming the key.
    assert_eq!(decode(&codec, "ns", &before).await.unwrap(), plain(0));
    let cold = envelope_codec(std::slice::from_ref(&kek), tuning(600, 1 << 31), 100);
    let err = decode(&cold, "ns", &before).await.unwrap_err();
    assert!(
        matches!(&err, CodecError::KeyUnavailable { key_id, .. } if key_id == "payments-kek"),
        "{err}"
    );
    // Failed attempts are answered from memory for a while: no call per RPC.
    let wraps = kek.wraps.load(Ordering::SeqCst);
    for _ in 0..20 {
        assert!(encode(&codec, "ns", 0).await.is_err());
    }
    assert!(kek.wraps.load(Ordering::SeqCst) <= wraps + 1);
    kek.down.store(false, Ordering::SeqCst);
    tokio::time::sleep(super::envelope::RETRY_AFTER).await;
    let after = encode(&codec, "ns", 1).await.unwrap();
    assert_ne!(dek_id(&after), dek_id(&before));
    assert_eq!(decode(&cold, "ns", &before).await.unwrap(), plain(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn payloads_are_bound_to_their_namespace_and_labels() {
    let kek = TestKek::new("k", Duration::ZERO);
    let codec = envelope_codec(std::slice::from_ref(&kek), tuning(60_000, 1 << 31), 100);
    let encoded = encode(&codec, "tenant-a", 1).await.unwrap();
    // Replayed into another namespace: the wrapped key does not unwrap there.
    let err = decode(&codec, "tenant-b", &encoded).await.unwrap_err();
    assert!(matches!(err, CodecError::KeyService { .. }), "{err}");
    // A relabelled data key id fails authentication although the key is cached.
    let mut p = WirePayload::decode(encoded.clone()).unwrap();
    p.metadata.insert(
        "encryption-dek-id".to_owned(),
        b"00000000000000000000000000000000".to_vec(),
    );
    let relabelled = Bytes::from(p.encode_to_vec());
    let err = decode(&codec, "tenant-a", &relabelled).await.unwrap_err();
    assert!(
        matches!(err, CodecError::AuthenticationFailed { .. }),
        "{err}"
    );
    // Without the wrapped key it is malformed, not plaintext.
    let mut p = WirePayload::decode(encoded).unwrap();
    p.metadata.remove("encryption-dek");
    let err = decode(&codec, "tenant-a", &Bytes::from(p.encode_to_vec()))
        .await
        .unwrap_err();
    assert!(matches!(err, CodecError::Malformed(_)), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_switches_the_active_kek_and_keeps_the_old_one_decrypting() {
    let old = TestKek::new("old", Duration::ZERO);
    let new = TestKek::new("new", Duration::ZERO);
    let keks = [old.clone(), new.clone()];
    let codec = envelope_codec(&keks, tuning(60_000, 1 << 31), 100);
    let before = encode(&codec, "ns", 0).await.unwrap();
    assert_eq!(meta(&before, "encryption-key-id"), b"old");
    let mut config = Config::default();
    config.compression.enabled = false;
    config.encryption.active_key = Some("new".to_owned());
    config.encryption.keys = keks
        .iter()
        .map(|k| KeySpec {
            id: k.id.clone(),
            file: None,
            env: None,
            kms: Some(format!("test://{}", k.id)),
        })
        .collect();
    codec.reload(&config).unwrap();
    let after = encode(&codec, "ns", 1).await.unwrap();
    assert_eq!(meta(&after, "encryption-key-id"), b"new");
    assert_eq!(decode(&codec, "ns", &before).await.unwrap(), plain(0));
    assert_eq!(decode(&codec, "ns", &after).await.unwrap(), plain(1));
    // A bad reload (unknown active key) keeps the current keys.
    config.encryption.active_key = Some("missing".to_owned());
    assert!(codec.reload(&config).is_err());
    assert_eq!(
        meta(&encode(&codec, "ns", 2).await.unwrap(), "encryption-key-id"),
        b"new"
    );
}

#[test]
fn static_keys_need_no_preparation() {
    // No runtime at all: the static path never touches the data-key machinery.
    let mut config = Config::default();
    config.compression.enabled = false;
    let dir = tempfile::tempdir().unwrap();
    config.encryption.dev_key_file = dir.path().join("dev.key");
    let codec = PayloadCodec::from_config(&config).unwrap();
    let encoded = codec.encode(Some("ns"), &plain(0)).unwrap().unwrap();
    assert!(
        !WirePayload::decode(encoded.clone())
            .unwrap()
            .metadata
            .contains_key("encryption-dek")
    );
    assert_eq!(codec.decode(&encoded).unwrap().unwrap(), plain(0));
    let runtime = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    runtime.block_on(async {
        codec.prepare_encode(Some("ns")).await.unwrap();
        codec
            .prepare_decode(Some("ns"), std::slice::from_ref(&encoded), false, 16)
            .await
            .unwrap();
    });
}

// ------------------------------------------------------------------ key-service amplification

/// `payload` with a random wrapped data key of `len` bytes (and a random data key id): what a
/// caller makes up to make the gateway call its key service.
fn forged(payload: &Bytes, len: usize) -> Bytes {
    let mut p = WirePayload::decode(payload.clone()).unwrap();
    let mut wrapped = vec![0u8; len];
    SystemRandom::new().fill(&mut wrapped).unwrap();
    let mut id = [0u8; 16];
    SystemRandom::new().fill(&mut id).unwrap();
    p.metadata
        .insert("encryption-dek".to_owned(), wrapped.clone());
    p.metadata.insert(
        "encryption-dek-id".to_owned(),
        id.iter()
            .map(|b| format!("{b:02x}"))
            .collect::<String>()
            .into_bytes(),
    );
    p.encode_to_vec().into()
}

async fn prepare_one(codec: &PayloadCodec, ns: &str, payload: &Bytes) -> Result<(), CodecError> {
    codec
        .prepare_decode(Some(ns), std::slice::from_ref(payload), true, 16)
        .await
        .map_err(|e| e.error)
}

/// Made-up wrapped keys, one request each: after the failure budget is spent the key service
/// is not asked any more, for that namespace only; cached data keys keep decrypting.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn made_up_wrapped_keys_spend_a_failure_budget_then_are_not_sent() {
    use super::envelope::FAILURE_BURST;
    let kek = TestKek::new("k", Duration::ZERO);
    let codec = envelope_codec(std::slice::from_ref(&kek), tuning(60_000, 1 << 31), 100);
    let legit = encode(&codec, "ns", 1).await.unwrap();
    let mut refused = 0;
    let mut throttled = 0;
    for _ in 0..200 {
        match prepare_one(&codec, "ns", &forged(&legit, 60)).await {
            Err(CodecError::KeyService { .. }) => refused += 1,
            Err(CodecError::KeyThrottled { reason, .. }) => {
                assert!(reason.contains("not asked"), "{reason}");
                throttled += 1;
            }
            other => panic!("{other:?}"),
        }
    }
    let calls = kek.unwraps.load(Ordering::SeqCst);
    assert_eq!(
        calls, FAILURE_BURST as usize,
        "{refused} refused, {throttled} throttled"
    );
    assert_eq!((refused, throttled), (calls, 200 - calls));
    // The namespace's own (cached) data key still decrypts.
    assert_eq!(decode(&codec, "ns", &legit).await.unwrap(), plain(1));
    // Another namespace has a budget of its own.
    assert!(matches!(
        prepare_one(&codec, "other", &forged(&legit, 60)).await,
        Err(CodecError::KeyService { .. })
    ));
    assert_eq!(kek.unwraps.load(Ordering::SeqCst), calls + 1);
}

/// The same made-up key again and again (also at once) is one call: the failure is
/// remembered; and a key too long for any key service is never sent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_unwrap_is_remembered_and_overlong_keys_are_not_sent() {
    use super::envelope::MAX_WRAPPED_LEN;
    let kek = TestKek::new("k", Duration::from_millis(20));
    let codec = envelope_codec(std::slice::from_ref(&kek), tuning(60_000, 1 << 31), 100);
    let legit = encode(&codec, "ns", 1).await.unwrap();
    let bad = forged(&legit, 60);
    let tasks: Vec<_> = (0..20)
        .map(|_| {
            let (codec, bad) = (codec.clone(), bad.clone());
            tokio::spawn(async move { prepare_one(&codec, "ns", &bad).await })
        })
        .collect();
    for t in tasks {
        assert!(matches!(
            t.await.unwrap(),
            Err(CodecError::KeyService { .. })
        ));
    }
    for _ in 0..20 {
        assert!(matches!(
            prepare_one(&codec, "ns", &bad).await,
            Err(CodecError::KeyService { .. })
        ));
    }
    assert_eq!(kek.unwraps.load(Ordering::SeqCst), 1);
    // The same wrapped key for another namespace is another question for the key service.
    assert!(prepare_one(&codec, "other", &bad).await.is_err());
    assert_eq!(kek.unwraps.load(Ordering::SeqCst), 2);
    match prepare_one(&codec, "ns", &forged(&legit, MAX_WRAPPED_LEN + 1)).await {
        Err(CodecError::KeyService { reason, .. }) => {
            assert!(reason.contains("longer than"), "{reason}")
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(kek.unwraps.load(Ordering::SeqCst), 2);
}

/// More distinct data keys to unwrap than the caller allows: refused before any call;
/// data keys already cached do not count.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn too_many_distinct_data_keys_in_one_request_are_refused_before_any_call() {
    let kek = TestKek::new("k", Duration::ZERO);
    let codec = envelope_codec(std::slice::from_ref(&kek), tuning(60_000, 1 << 31), 100);
    let legit = encode(&codec, "ns", 1).await.unwrap();
    let mut batch: Vec<Bytes> = (0..5).map(|_| forged(&legit, 60)).collect();
    match codec.prepare_decode(Some("ns"), &batch, true, 4).await {
        Err(e) => {
            assert_eq!(e.index, 4);
            assert!(
                matches!(e.error, CodecError::TooManyDataKeys { max: 4, .. }),
                "{}",
                e.error
            );
        }
        Ok(()) => panic!("five data keys passed a cap of four"),
    }
    assert_eq!(kek.unwraps.load(Ordering::SeqCst), 0);
    // Cached keys (and repeats of one key) are not counted.
    batch.truncate(3);
    batch.extend([legit.clone(), legit.clone(), batch[0].clone()]);
    assert!(matches!(
        codec.prepare_decode(Some("ns"), &batch, true, 3).await,
        Err(BatchError {
            error: CodecError::KeyService { .. },
            ..
        })
    ));
}

/// At most `CALLS_PER_KEK` key-service calls of one KEK run at once; the rest wait.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_unwraps_of_one_kek_are_bounded() {
    use super::envelope::CALLS_PER_KEK;
    let kek = TestKek::new("k", Duration::from_millis(30));
    let writer = envelope_codec(std::slice::from_ref(&kek), tuning(60_000, 1 << 31), 100);
    // Forty namespaces: forty data keys a fresh reader must unwrap.
    let mut payloads = Vec::new();
    for n in 0..40 {
        payloads.push((
            format!("ns{n}"),
            encode(&writer, &format!("ns{n}"), n).await.unwrap(),
        ));
    }
    let reader = envelope_codec(std::slice::from_ref(&kek), tuning(60_000, 1 << 31), 100);
    let tasks: Vec<_> = payloads
        .into_iter()
        .map(|(ns, p)| {
            let reader = reader.clone();
            tokio::spawn(async move { decode(&reader, &ns, &p).await.unwrap() })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
    assert_eq!(kek.unwraps.load(Ordering::SeqCst), 40);
    let most = kek.max_in_flight.load(Ordering::SeqCst);
    assert!(most <= CALLS_PER_KEK, "{most} calls at once");
    assert!(most > 1, "calls ran one at a time");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn key_services_are_probed_with_backoff_while_down_and_reported_when_back() {
    use super::{KeyServiceState, PROBE_BACKOFF};
    let kek = TestKek::new("payments-kek", Duration::ZERO);
    kek.down.store(true, Ordering::SeqCst);
    let codec = envelope_codec(std::slice::from_ref(&kek), tuning(600_000, 1 << 31), 100);
    let state = |codec: &PayloadCodec| codec.key_services()[0].state.clone();
    assert_eq!(
        state(&codec),
        KeyServiceState::Unknown,
        "not asked before the prober runs"
    );
    codec.watch_key_services(None);
    codec.watch_key_services(None); // once only
    let start = std::time::Instant::now();
    while !matches!(state(&codec), KeyServiceState::Unavailable(_)) {
        assert!(start.elapsed() < Duration::from_secs(2), "probed at start");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let status = &codec.key_services()[0];
    assert_eq!(
        (status.key_id.as_str(), status.provider),
        ("payments-kek", "grpc")
    );
    // Down for 3.5 s: probes at 0, +1 s, +2 s after that (backoff doubling): 3, never one
    // per prober tick (every 250 ms).
    tokio::time::sleep(PROBE_BACKOFF * 3 + Duration::from_millis(500)).await;
    let probes = kek.wraps.load(Ordering::SeqCst);
    assert!((2..=4).contains(&probes), "{probes} probes in 3.5 s");
    // RPCs meanwhile fail closed, naming the key.
    let err = encode(&codec, "ns", 0).await.unwrap_err();
    assert!(
        matches!(&err, CodecError::KeyUnavailable { key_id, .. } if key_id == "payments-kek"),
        "{err}"
    );
    // Back: the next probe (within the current backoff, at most 4 s here) sees it, no call
    // needed from traffic.
    kek.down.store(false, Ordering::SeqCst);
    let back = std::time::Instant::now();
    while state(&codec) != KeyServiceState::Ok {
        assert!(
            back.elapsed() < Duration::from_secs(6),
            "recovered by the prober"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    encode(&codec, "ns", 1).await.expect("encrypts again");
    // Healthy and no interval: no more probes.
    let wraps = kek.wraps.load(Ordering::SeqCst);
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(kek.wraps.load(Ordering::SeqCst), wraps);
}
