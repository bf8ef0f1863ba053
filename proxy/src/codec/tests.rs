//! Unit tests of the payload codec.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use aes_gcm::aead::{Aead, KeyInit};
use base64::Engine;
use bytes::Bytes;
use prost::Message;

use super::keys::{DEV_KEY_ID, parse_key};
use super::{CodecError, PayloadCodec, WirePayload, zstd_layer};
use crate::config::{Config, KeySpec, NamespaceConfig};

const K1: [u8; 32] = [0x11; 32];
const K2: [u8; 32] = [0x22; 32];

/// A serialized user payload with an unknown field (15) that must survive verbatim.
fn user_payload(data: &[u8]) -> Vec<u8> {
    let mut out = WirePayload {
        metadata: BTreeMap::from([("encoding".to_owned(), b"json/plain".to_vec())]),
        data: Bytes::copy_from_slice(data),
        ..Default::default()
    }
    .encode_to_vec();
    out.extend_from_slice(&[0x78, 0x2a]); // field 15, varint 42
    out
}

/// JSON-like, compressible text.
fn json_text(len: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(len + 100);
    let mut i = 0u64;
    while out.len() < len {
        out.extend_from_slice(
            format!(
                "{{\"id\":{i},\"name\":\"user-{}\",\"score\":{}.{},\"tags\":[\"a\",\"b\"]}},",
                i * 7919 % 1000,
                i % 97,
                i * 31 % 100
            )
            .as_bytes(),
        );
        i += 1;
    }
    out.truncate(len);
    out
}

fn random_bytes(len: usize) -> Vec<u8> {
    let mut v = vec![0u8; len];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut v).unwrap();
    v
}

struct Fixture {
    dir: tempfile::TempDir,
}

impl Fixture {
    fn new() -> Self {
        Self {
            dir: tempfile::tempdir().unwrap(),
        }
    }

    fn key_file(&self, name: &str, contents: &[u8]) -> PathBuf {
        let path = self.dir.path().join(name);
        std::fs::write(&path, contents).unwrap();
        path
    }

    fn b64_key(&self, name: &str, key: &[u8; 32]) -> PathBuf {
        let text = base64::engine::general_purpose::STANDARD.encode(key) + "\n";
        self.key_file(name, text.as_bytes())
    }

    /// Encryption with k1 (active) and k2, compression at level 3.
    fn config(&self, encrypt: bool, compress: bool) -> Config {
        let mut c = Config::default();
        c.encryption.enabled = encrypt;
        c.encryption.dev_key_file = self.dir.path().join("dev/dev.key");
        c.encryption.keys = vec![
            KeySpec {
                id: "k1".into(),
                file: Some(self.b64_key("k1.key", &K1)),
                env: None,
                kms: None,
            },
            KeySpec {
                id: "k2".into(),
                file: Some(self.key_file("k2.raw", &K2)),
                env: None,
                kms: None,
            },
        ];
        c.encryption.active_key = Some("k1".into());
        c.compression.enabled = compress;
        c
    }

    fn codec(&self, encrypt: bool, compress: bool) -> PayloadCodec {
        PayloadCodec::from_config(&self.config(encrypt, compress)).unwrap()
    }
}

fn outer(bytes: &[u8]) -> WirePayload {
    WirePayload::decode(bytes).unwrap()
}

fn meta(p: &WirePayload) -> BTreeMap<String, String> {
    p.metadata
        .iter()
        .map(|(k, v)| (k.clone(), String::from_utf8(v.clone()).unwrap()))
        .collect()
}

/// Decrypts with RustCrypto `aes-gcm`, independent of the implementation under test.
fn independent_open(key: &[u8; 32], data: &[u8]) -> Vec<u8> {
    let cipher = aes_gcm::Aes256Gcm::new(key.into());
    cipher
        .decrypt(aes_gcm::Nonce::from_slice(&data[..12]), &data[12..])
        .expect("independent AES-GCM decrypt")
}

/// Encrypts as Temporal's Go sample codec does: `gcm.Seal(nonce, nonce, plaintext, nil)`.
fn independent_seal(key: &[u8; 32], key_id: &str, plain: &[u8]) -> Vec<u8> {
    let cipher = aes_gcm::Aes256Gcm::new(key.into());
    let nonce = random_bytes(12);
    let mut data = nonce.clone();
    data.extend(
        cipher
            .encrypt(aes_gcm::Nonce::from_slice(&nonce), plain)
            .unwrap(),
    );
    WirePayload {
        metadata: BTreeMap::from([
            ("encoding".to_owned(), b"binary/encrypted".to_vec()),
            ("encryption-key-id".to_owned(), key_id.as_bytes().to_vec()),
        ]),
        data: data.into(),
        ..Default::default()
    }
    .encode_to_vec()
}

#[test]
fn round_trip_compression_only() {
    let f = Fixture::new();
    let codec = f.codec(false, true);
    let original = user_payload(&json_text(10_000));
    let encoded = codec.encode(None, &original).unwrap().expect("compressed");
    assert!(encoded.len() < original.len() / 2, "{}", encoded.len());
    let o = outer(&encoded);
    assert_eq!(
        meta(&o),
        BTreeMap::from([("encoding".into(), "binary/zstd".into())])
    );
    assert_eq!(zstd::decode_all(&o.data[..]).unwrap(), original);
    assert_eq!(codec.decode(&encoded).unwrap().unwrap(), original);
}

/// From 1 MiB on, payloads are sampled: incompressible ones skip the whole-payload attempt,
/// and anything that shrinks where sampled (here only the middle, or only the end) is
/// compressed whole as before.
#[test]
fn large_payloads_are_sampled_before_compression() {
    let f = Fixture::new();
    let compress_only = f.codec(false, true);
    let both = f.codec(true, true);
    let len = 3 << 20;

    let random = user_payload(&random_bytes(len));
    assert!(!zstd_layer::worth_compressing(&random, 3).unwrap());
    assert_eq!(compress_only.encode(None, &random).unwrap(), None);
    let encoded = both.encode(None, &random).unwrap().unwrap();
    let inner = independent_open(&K1, &outer(&encoded).data);
    assert_eq!(inner, random, "encrypted without a compression layer");
    assert_eq!(both.decode(&encoded).unwrap().unwrap(), random);

    // 100 kB of text around the middle, or at the very end, of random bytes.
    for at in [len / 2 - 50_000, len - 100_000] {
        let mut data = random_bytes(len);
        data[at..at + 100_000].copy_from_slice(&json_text(100_000));
        let mixed = user_payload(&data);
        assert!(zstd_layer::worth_compressing(&mixed, 3).unwrap());
        let encoded = compress_only
            .encode(None, &mixed)
            .unwrap()
            .expect("compressed");
        assert!(encoded.len() < mixed.len());
        assert_eq!(meta_of(&outer(&encoded), "encoding"), "binary/zstd");
        assert_eq!(compress_only.decode(&encoded).unwrap().unwrap(), mixed);
    }
    // Below 1 MiB every payload is tried whole.
    assert!(zstd_layer::worth_compressing(&random_bytes((1 << 20) - 1), 3).unwrap());
}

#[test]
fn round_trip_encryption_only() {
    let f = Fixture::new();
    let codec = f.codec(true, false);
    let original = user_payload(&json_text(10_000));
    let encoded = codec.encode(None, &original).unwrap().unwrap();
    let o = outer(&encoded);
    assert_eq!(o.data.len(), 12 + original.len() + 16);
    assert_eq!(independent_open(&K1, &o.data), original);
    assert_eq!(codec.decode(&encoded).unwrap().unwrap(), original);
}

#[test]
fn round_trip_both_layers() {
    let f = Fixture::new();
    let codec = f.codec(true, true);
    for len in [300, 4096, 100_000, 3 << 20] {
        let original = user_payload(&json_text(len));
        let encoded = codec.encode(None, &original).unwrap().unwrap();
        assert!(encoded.len() < original.len(), "len {len}");
        // Layout: encrypted outer around the zstd payload around the original bytes.
        let o = outer(&encoded);
        let inner = independent_open(&K1, &o.data);
        let i = outer(&inner);
        assert_eq!(
            meta(&i),
            BTreeMap::from([("encoding".into(), "binary/zstd".into())])
        );
        assert_eq!(zstd::decode_all(&i.data[..]).unwrap(), original);
        assert_eq!(
            codec.decode(&encoded).unwrap().unwrap(),
            original,
            "len {len}"
        );
    }
}

#[test]
fn below_min_size_is_not_compressed() {
    let f = Fixture::new();
    let mut config = f.config(false, true);
    config.compression.min_size = 1000;
    let codec = PayloadCodec::from_config(&config).unwrap();
    let small = user_payload(&json_text(900));
    assert!(small.len() < 1000);
    assert!(codec.encode(None, &small).unwrap().is_none());
    let big = user_payload(&json_text(1000));
    assert!(codec.encode(None, &big).unwrap().is_some());
    // With encryption the small payload is encrypted as it is.
    config.encryption.enabled = true;
    let codec = PayloadCodec::from_config(&config).unwrap();
    let encoded = codec.encode(None, &small).unwrap().unwrap();
    assert_eq!(independent_open(&K1, &outer(&encoded).data), small);
}

#[test]
fn incompressible_data_is_not_compressed() {
    let f = Fixture::new();
    let original = user_payload(&random_bytes(50_000));
    assert!(
        f.codec(false, true)
            .encode(None, &original)
            .unwrap()
            .is_none()
    );
    let encoded = f
        .codec(true, true)
        .encode(None, &original)
        .unwrap()
        .unwrap();
    let o = outer(&encoded);
    assert_eq!(o.data.len(), 12 + original.len() + 16);
    assert_eq!(independent_open(&K1, &o.data), original);
}

#[test]
fn encrypted_layout_is_exact() {
    let f = Fixture::new();
    let codec = f.codec(true, false);
    let original = user_payload(b"{\"a\":1}");
    let encoded = codec.encode(None, &original).unwrap().unwrap();
    let o = outer(&encoded);
    assert_eq!(
        meta(&o),
        BTreeMap::from([
            ("encoding".into(), "binary/encrypted".into()),
            ("encryption-key-id".into(), "k1".into()),
        ])
    );
    assert_eq!(o.data.len(), 12 + original.len() + 16);
    // Decrypt with ring directly: nonce = first 12 bytes, tag = last 16, no AAD.
    let key = ring::aead::LessSafeKey::new(
        ring::aead::UnboundKey::new(&ring::aead::AES_256_GCM, &K1).unwrap(),
    );
    let mut ct = o.data[12..].to_vec();
    let nonce = ring::aead::Nonce::try_assume_unique_for_key(&o.data[..12]).unwrap();
    let plain = key
        .open_in_place(nonce, ring::aead::Aad::empty(), &mut ct)
        .unwrap();
    assert_eq!(plain, &original[..]);
    // The hand-built wire form is exactly prost's encoding of the same message.
    assert_eq!(o.encode_to_vec(), &encoded[..]);
    // Nonces differ between encryptions of the same payload.
    let again = outer(&codec.encode(None, &original).unwrap().unwrap());
    assert_ne!(o.data[..12], again.data[..12]);
}

#[test]
fn compressed_layout_is_prost_encoding() {
    let f = Fixture::new();
    for len in [300, 20_000, 300_000] {
        let original = user_payload(&json_text(len));
        let encoded = f
            .codec(false, true)
            .encode(None, &original)
            .unwrap()
            .unwrap();
        assert_eq!(outer(&encoded).encode_to_vec(), &encoded[..], "len {len}");
    }
}

#[test]
fn decodes_payload_sealed_like_go_sample_codec() {
    let f = Fixture::new();
    let codec = f.codec(true, true);
    let original = user_payload(&json_text(5000));
    let sealed = independent_seal(&K2, "k2", &original);
    assert_eq!(codec.decode(&sealed).unwrap().unwrap(), original);
}

/// Produced by Python `cryptography` AESGCM the way Temporal's Python sample codec encrypts
/// (key = bytes(range(32)), id "py-k1"); see the codec section of BENCHMARKS.md.
#[test]
fn decodes_python_sample_codec_vector() {
    const INNER: &str = "0a160a08656e636f64696e67120a6a736f6e2f706c61696e12187b2268656c6c6f223a22776f726c64222c226e223a34327d";
    const OUTER: &str = "0a1a0a11656e6372797074696f6e2d6b65792d6964120570792d6b310a1c0a08656e636f64696e67121062696e6172792f656e63727970746564124eb697cf5aeb3b99f3b140ad007b47c4f37086b4d5f6e2b0b099c2bb8ca2de544726cc3b0fcf57c03e266d33df08094128e11bad84f8a140e08428cb756ca969544a0935d0c77dc36aebef1852c315";
    let hex = |s: &str| -> Vec<u8> {
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
            .collect()
    };
    let f = Fixture::new();
    let key: [u8; 32] = std::array::from_fn(|i| i as u8);
    let mut config = f.config(true, true);
    config.encryption.keys.push(KeySpec {
        id: "py-k1".into(),
        file: Some(f.key_file("py.key", &key)),
        env: None,
        kms: None,
    });
    let codec = PayloadCodec::from_config(&config).unwrap();
    assert_eq!(codec.decode(&hex(OUTER)).unwrap().unwrap(), hex(INNER));
}

#[test]
fn unknown_key_id_is_named() {
    let f = Fixture::new();
    let sealed = independent_seal(&K1, "k9", b"x");
    let err = f.codec(true, true).decode(&sealed).unwrap_err();
    assert!(
        matches!(&err, CodecError::UnknownKey(id) if id == "k9"),
        "{err}"
    );
    assert!(err.to_string().contains("k9"), "{err}");
}

#[test]
fn tampering_fails_authentication() {
    let f = Fixture::new();
    let codec = f.codec(true, false);
    let encoded = codec
        .encode(None, &user_payload(&json_text(1000)))
        .unwrap()
        .unwrap();
    let o = outer(&encoded);
    for at in [0, 12, o.data.len() / 2, o.data.len() - 1] {
        let mut bad = o.clone();
        let mut data = bad.data.to_vec();
        data[at] ^= 1;
        bad.data = data.into();
        let err = codec.decode(&bad.encode_to_vec()).unwrap_err();
        assert!(
            matches!(&err, CodecError::AuthenticationFailed { key_id } if key_id == "k1"),
            "{err}"
        );
        assert_eq!(
            err.to_string(),
            "authentication failed (tag mismatch) for key \"k1\""
        );
    }
    // The right ciphertext under another key's id fails too.
    let mut other = o.clone();
    other
        .metadata
        .insert("encryption-key-id".into(), b"k2".to_vec());
    let err = codec.decode(&other.encode_to_vec()).unwrap_err();
    assert!(
        matches!(&err, CodecError::AuthenticationFailed { key_id } if key_id == "k2"),
        "{err}"
    );
}

#[test]
fn too_short_and_malformed_are_refused() {
    let f = Fixture::new();
    let codec = f.codec(true, true);
    let mut p = outer(&independent_seal(&K1, "k1", b""));
    assert_eq!(p.data.len(), 28);
    assert!(
        codec
            .decode(&p.encode_to_vec())
            .unwrap()
            .unwrap()
            .is_empty()
    );
    p.data = p.data.slice(..27);
    let err = codec.decode(&p.encode_to_vec()).unwrap_err();
    assert!(matches!(err, CodecError::TooShort { len: 27, .. }), "{err}");
    p.metadata.remove("encryption-key-id");
    let err = codec.decode(&p.encode_to_vec()).unwrap_err();
    assert!(matches!(err, CodecError::Malformed(_)), "{err}");
    for garbage in [&[0xff, 0xff][..], &[0x0a, 0x05, 0x01], &[0x12, 0x80]] {
        let err = codec.decode(garbage).unwrap_err();
        assert!(matches!(err, CodecError::Malformed(_)), "{err}");
    }
}

#[test]
fn other_encodings_pass_through() {
    let f = Fixture::new();
    let codec = f.codec(true, true);
    assert!(codec.decode(&user_payload(b"{}")).unwrap().is_none());
    assert!(codec.decode(&[]).unwrap().is_none());
}

fn zstd_payload(frame: Vec<u8>) -> Vec<u8> {
    WirePayload {
        metadata: BTreeMap::from([("encoding".to_owned(), b"binary/zstd".to_vec())]),
        data: frame.into(),
        ..Default::default()
    }
    .encode_to_vec()
}

#[test]
fn corrupt_zstd_frames_are_refused() {
    let f = Fixture::new();
    let codec = f.codec(false, true);
    let frame = zstd::encode_all(&json_text(100_000)[..], 3).unwrap();
    let cases = [
        b"not a zstd frame".to_vec(),
        frame[..frame.len() / 2].to_vec(),
        {
            let mut bad = frame.clone();
            let mid = bad.len() / 2;
            bad[mid] ^= 0xff;
            bad[mid + 1] ^= 0xff;
            bad
        },
        Vec::new(),
    ];
    for (i, case) in cases.into_iter().enumerate() {
        let err = codec.decode(&zstd_payload(case)).unwrap_err();
        assert!(
            matches!(err, CodecError::CorruptFrame(_)),
            "case {i}: {err}"
        );
    }
    // Also inside the encryption layer.
    let enc = f.codec(true, false);
    let sealed = independent_seal(&K1, "k1", &zstd_payload(frame[..frame.len() - 3].to_vec()));
    let err = enc.decode(&sealed).unwrap_err();
    assert!(matches!(err, CodecError::CorruptFrame(_)), "{err}");
}

fn peak_rss_bytes() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = status.lines().find(|l| l.starts_with("VmHWM:")).unwrap();
    line.split_whitespace()
        .nth(1)
        .unwrap()
        .parse::<u64>()
        .unwrap()
        * 1024
}

#[test]
fn decompression_bomb_is_refused_with_bounded_memory() {
    // 1 GiB of zeros, streamed into a frame without a content size (~32 KiB).
    let mut enc = zstd::stream::Encoder::new(Vec::new(), 3).unwrap();
    let zeros = vec![0u8; 1 << 20];
    for _ in 0..1024 {
        std::io::Write::write_all(&mut enc, &zeros).unwrap();
    }
    let frame = enc.finish().unwrap();
    assert!(frame.len() < 1 << 20, "{}", frame.len());
    let f = Fixture::new();
    let mut config = f.config(true, true);
    config.compression.max_decompressed_bytes = 16 << 20;
    let codec = PayloadCodec::from_config(&config).unwrap();
    let err = codec.decode(&zstd_payload(frame.clone())).unwrap_err();
    assert!(
        matches!(err, CodecError::DecompressedTooLarge { limit } if limit == 16 << 20),
        "{err}"
    );
    assert!(err.to_string().contains("16777216"), "{err}");
    let sealed = independent_seal(&K1, "k1", &zstd_payload(frame));
    assert!(matches!(
        codec.decode(&sealed).unwrap_err(),
        CodecError::DecompressedTooLarge { .. }
    ));
    // A frame that declares its size is refused from the header alone.
    let declared = zstd::bulk::compress(&vec![0u8; 64 << 20], 1).unwrap();
    assert!(matches!(
        zstd_layer::decompress_bounded(&declared, 1 << 20, &crate::budget::MessageBudget::unlimited()).unwrap_err(),
        CodecError::DecompressedTooLarge { limit } if limit == 1 << 20
    ));
    // Never anywhere near the 1 GiB the frame inflates to (other tests share the process).
    assert!(
        peak_rss_bytes() < 600 << 20,
        "peak RSS {}",
        peak_rss_bytes()
    );
}

#[test]
fn decompression_limit_is_exact() {
    // 300,000 bytes come in a pooled buffer of a larger size class: the limit still holds to
    // the byte though the buffer has room past it.
    for len in [100_000, 300_000] {
        let data = json_text(len);
        let sized = zstd::bulk::compress(&data, 3).unwrap();
        let mut enc = zstd::stream::Encoder::new(Vec::new(), 3).unwrap();
        std::io::Write::write_all(&mut enc, &data).unwrap();
        let unsized_frame = enc.finish().unwrap();
        for frame in [&sized, &unsized_frame] {
            let out = zstd_layer::decompress_bounded(
                frame,
                len,
                &crate::budget::MessageBudget::unlimited(),
            )
            .unwrap();
            assert_eq!(*out, data);
            assert!(matches!(
                zstd_layer::decompress_bounded(
                    frame,
                    len - 1,
                    &crate::budget::MessageBudget::unlimited()
                )
                .unwrap_err(),
                CodecError::DecompressedTooLarge { limit } if limit == len - 1
            ));
        }
    }
    let data = json_text(100_000);
    let sized = zstd::bulk::compress(&data, 3).unwrap();
    // Two concatenated frames are one valid zstd stream.
    let mut two = sized.clone();
    two.extend_from_slice(&sized);
    assert_eq!(
        zstd_layer::decompress_bounded(&two, 200_000, &crate::budget::MessageBudget::unlimited())
            .unwrap()
            .len(),
        200_000
    );
}

#[test]
fn key_material_formats() {
    assert_eq!(parse_key(&K1).unwrap(), K1);
    let b64 = base64::engine::general_purpose::STANDARD.encode(K1);
    assert_eq!(parse_key(b64.as_bytes()).unwrap(), K1);
    assert_eq!(parse_key(format!("{b64}\n").as_bytes()).unwrap(), K1);
    assert_eq!(parse_key(format!("{b64}\r\n").as_bytes()).unwrap(), K1);
    assert_eq!(
        parse_key(b"hello").unwrap_err(),
        "key must be 32 bytes (raw) or base64 of 32 bytes, got 5 bytes"
    );
    let short = base64::engine::general_purpose::STANDARD.encode([1u8; 16]);
    assert!(
        parse_key(short.as_bytes())
            .unwrap_err()
            .contains("base64 of 16 bytes")
    );
    assert!(
        parse_key(&[b'!'; 44])
            .unwrap_err()
            .contains("not valid base64"),
        "{:?}",
        parse_key(&[b'!'; 44])
    );
}

fn config_error(config: &Config) -> String {
    PayloadCodec::from_config(config).unwrap_err().to_string()
}

#[test]
fn key_errors_name_the_key() {
    let f = Fixture::new();
    let mut c = f.config(true, true);
    c.encryption.keys[0].file = Some(PathBuf::from("keys/k1.key"));
    assert!(
        config_error(&c)
            .starts_with("encryption.keys[0].file: cannot read \"keys/k1.key\": No such file"),
        "{}",
        config_error(&c)
    );
    let mut c = f.config(true, true);
    c.encryption.keys[1] = KeySpec {
        id: "k0".into(),
        file: None,
        env: Some("PGW_TEST_KEY_K0_SURELY_UNSET".into()),
        kms: None,
    };
    assert_eq!(
        config_error(&c),
        "encryption.keys[1].env: PGW_TEST_KEY_K0_SURELY_UNSET is not set"
    );
    let mut c = f.config(true, true);
    c.encryption.keys[0].file = Some(f.key_file("five", b"hello"));
    assert_eq!(
        config_error(&c),
        "encryption.keys[0]: key must be 32 bytes (raw) or base64 of 32 bytes, got 5 bytes"
    );
    let mut c = f.config(true, true);
    c.encryption.keys[1].file = Some(f.key_file("bad64", &[b'*'; 45]));
    let err = config_error(&c);
    assert!(err.starts_with("encryption.keys[1]: key must be"), "{err}");
    assert!(!err.contains("***"), "key material leaked: {err}");
}

#[test]
fn key_from_environment() {
    let f = Fixture::new();
    let var = "PGW_TEST_CODEC_KEY_FROM_ENV";
    // SAFETY: the variable name is unique to this test; nothing else reads or writes it.
    unsafe { std::env::set_var(var, base64::engine::general_purpose::STANDARD.encode(K2)) };
    let mut c = f.config(true, false);
    c.encryption.keys[1].file = None;
    c.encryption.keys[1].env = Some(var.into());
    c.encryption.active_key = Some("k2".into());
    let codec = PayloadCodec::from_config(&c).unwrap();
    let encoded = codec.encode(None, b"payload").unwrap().unwrap();
    assert_eq!(independent_open(&K2, &outer(&encoded).data), b"payload");
}

fn dev_config(path: &Path) -> Config {
    let mut c = Config::default();
    c.encryption.dev_key_file = path.to_owned();
    c
}

#[test]
fn dev_key_is_generated_once_and_reused() {
    use std::os::unix::fs::PermissionsExt;
    let f = Fixture::new();
    let path = f.dir.path().join("nested/data/dev.key");
    let first = PayloadCodec::from_config(&dev_config(&path)).unwrap();
    let meta = std::fs::metadata(&path).unwrap();
    assert_eq!(meta.permissions().mode() & 0o777, 0o600);
    let text = std::fs::read_to_string(&path).unwrap();
    assert_eq!(text.len(), 45, "base64 of 32 bytes and a newline");
    let key = parse_key(text.as_bytes()).unwrap();
    let original = user_payload(&json_text(2000));
    let encoded = first.encode(None, &original).unwrap().unwrap();
    let o = outer(&encoded);
    assert_eq!(meta_of(&o, "encryption-key-id"), DEV_KEY_ID);
    let inner = independent_open(&key, &o.data);
    assert_eq!(meta_of(&outer(&inner), "encoding"), "binary/zstd");
    // A second start reads the same key instead of generating a new one.
    let second = PayloadCodec::from_config(&dev_config(&path)).unwrap();
    assert_eq!(std::fs::read_to_string(&path).unwrap(), text);
    assert_eq!(second.decode(&encoded).unwrap().unwrap(), original);
    assert_eq!(
        std::fs::read_dir(path.parent().unwrap()).unwrap().count(),
        1
    );
    // No dev key when keys are configured or encryption is off everywhere.
    let other = f.dir.path().join("other/dev.key");
    let mut c = f.config(true, true);
    c.encryption.dev_key_file = other.clone();
    PayloadCodec::from_config(&c).unwrap();
    let mut c = dev_config(&other);
    c.encryption.enabled = false;
    PayloadCodec::from_config(&c).unwrap();
    assert!(!other.exists());
    // ... but there is one when only a namespace turns encryption on.
    c.namespaces.insert(
        "secure".into(),
        NamespaceConfig {
            encryption: Some(true),
            ..Default::default()
        },
    );
    let codec = PayloadCodec::from_config(&c).unwrap();
    assert!(other.exists());
    assert!(codec.encode(None, b"x").unwrap().is_none());
    assert!(codec.encode(Some("secure"), b"x").unwrap().is_some());
}

fn meta_of(p: &WirePayload, key: &str) -> String {
    String::from_utf8(p.metadata[key].clone()).unwrap()
}

#[test]
fn reload_switches_active_key_and_old_key_still_decrypts() {
    let f = Fixture::new();
    let config = f.config(true, true);
    let codec = PayloadCodec::from_config(&config).unwrap();
    let original = user_payload(&json_text(3000));
    let old = codec.encode(None, &original).unwrap().unwrap();
    assert_eq!(meta_of(&outer(&old), "encryption-key-id"), "k1");

    let mut next = config.clone();
    next.encryption.active_key = Some("k2".into());
    codec.reload(&next).unwrap();
    let new = codec.encode(None, &original).unwrap().unwrap();
    assert_eq!(meta_of(&outer(&new), "encryption-key-id"), "k2");
    assert_eq!(codec.decode(&old).unwrap().unwrap(), original);
    assert_eq!(codec.decode(&new).unwrap().unwrap(), original);

    // A failed reload keeps the previous keyring.
    let mut broken = next.clone();
    broken.encryption.keys[0].file = Some(f.dir.path().join("missing.key"));
    let err = codec.reload(&broken).unwrap_err();
    assert!(
        err.to_string().starts_with("encryption.keys[0].file"),
        "{err}"
    );
    let still = codec.encode(None, &original).unwrap().unwrap();
    assert_eq!(meta_of(&outer(&still), "encryption-key-id"), "k2");
    assert_eq!(codec.decode(&old).unwrap().unwrap(), original);

    // A reload that drops k1 can no longer read k1's payloads.
    let mut dropped = next;
    dropped.encryption.keys.remove(0);
    codec.reload(&dropped).unwrap();
    assert!(matches!(codec.decode(&old).unwrap_err(), CodecError::UnknownKey(id) if id == "k1"));
}

#[test]
fn per_namespace_overrides() {
    let f = Fixture::new();
    let mut c = f.config(true, true);
    let ns = |encryption, compression, key: Option<&str>| NamespaceConfig {
        encryption,
        compression,
        active_key: key.map(str::to_owned),
        ..Default::default()
    };
    c.namespaces
        .insert("plain".into(), ns(Some(false), Some(false), None));
    c.namespaces
        .insert("zonly".into(), ns(Some(false), None, None));
    c.namespaces
        .insert("nozstd".into(), ns(None, Some(false), None));
    c.namespaces
        .insert("k2ns".into(), ns(None, None, Some("k2")));
    let codec = PayloadCodec::from_config(&c).unwrap();
    let original = user_payload(&json_text(5000));
    let enc = |ns| codec.encode(Some(ns), &original).unwrap();

    assert!(!codec.is_active(Some("plain")));
    assert!(enc("plain").is_none());
    assert!(codec.is_active(None) && codec.is_active(Some("unknown")));

    let z = outer(&enc("zonly").unwrap());
    assert_eq!(
        meta(&z),
        BTreeMap::from([("encoding".into(), "binary/zstd".into())])
    );

    let e = outer(&enc("nozstd").unwrap());
    assert_eq!(meta_of(&e, "encryption-key-id"), "k1");
    assert_eq!(independent_open(&K1, &e.data), original);

    let k2 = outer(&enc("k2ns").unwrap());
    assert_eq!(meta_of(&k2, "encryption-key-id"), "k2");
    let inner = independent_open(&K2, &k2.data);
    assert_eq!(meta_of(&outer(&inner), "encoding"), "binary/zstd");

    let d = outer(&enc("unknown").unwrap());
    assert_eq!(meta_of(&d, "encryption-key-id"), "k1");

    // Top level off, namespace on.
    let mut c = f.config(false, false);
    c.namespaces
        .insert("secure".into(), ns(Some(true), Some(true), Some("k2")));
    let codec = PayloadCodec::from_config(&c).unwrap();
    assert!(!codec.is_active(None));
    assert!(codec.encode(None, &original).unwrap().is_none());
    let s = outer(&codec.encode(Some("secure"), &original).unwrap().unwrap());
    assert_eq!(meta_of(&s, "encryption-key-id"), "k2");
    // Every key decrypts regardless of namespace policy.
    let sealed = independent_seal(&K1, "k1", &original);
    assert_eq!(codec.decode(&sealed).unwrap().unwrap(), original);
}

#[test]
fn nonce_counter_warns_and_refuses_at_the_limit() {
    let f = Fixture::new();
    let c = f.config(true, false);
    let codec = PayloadCodec::with_nonce_limit(&c, 20).unwrap();
    let warned = |codec: &PayloadCodec| {
        let state = codec.inner.state.load();
        state.keys["k1"]
            .counter
            .warned
            .load(std::sync::atomic::Ordering::Relaxed)
    };
    for i in 1..=20u64 {
        codec.encode(None, b"p").unwrap().unwrap();
        let expect = match i {
            0..10 => 0b000,
            10..15 => 0b001,
            15..18 => 0b011,
            _ => 0b111,
        };
        assert_eq!(warned(&codec), expect, "after {i}");
    }
    let err = codec.encode(None, b"p").unwrap_err();
    assert!(
        matches!(&err, CodecError::NonceLimitReached { key_id, limit: 20 } if key_id == "k1"),
        "{err}"
    );
    assert_eq!(
        codec.encryption_counts(),
        vec![("k1".to_owned(), 20), ("k2".to_owned(), 0)]
    );
    // The count survives a reload with the same key material; another key still works.
    codec.reload(&c).unwrap();
    assert!(codec.encode(None, b"p").is_err());
    let mut next = c.clone();
    next.encryption.active_key = Some("k2".into());
    codec.reload(&next).unwrap();
    codec.encode(None, b"p").unwrap().unwrap();
    assert_eq!(
        codec.encryption_counts(),
        vec![("k1".to_owned(), 20), ("k2".to_owned(), 1)]
    );
}

#[test]
fn fails_closed_when_encryption_fails() {
    let f = Fixture::new();
    let c = f.config(true, true);
    let codec = PayloadCodec::with_nonce_limit(&c, 0).unwrap();
    for payload in [
        user_payload(b"tiny"),
        user_payload(&json_text(100_000)),
        user_payload(&random_bytes(10_000)),
    ] {
        let result = codec.encode(None, &payload);
        assert!(
            matches!(result, Err(CodecError::NonceLimitReached { .. })),
            "{result:?}"
        );
    }
    // Encryption on: even payloads that neither shrink nor reach min_size come back encrypted.
    let codec = f.codec(true, true);
    for payload in [
        Vec::new(),
        user_payload(b"x"),
        user_payload(&random_bytes(4096)),
    ] {
        let out = codec
            .encode(None, &payload)
            .unwrap()
            .expect("never unchanged");
        assert_eq!(meta_of(&outer(&out), "encoding"), "binary/encrypted");
    }
}

#[test]
fn debug_output_redacts_keys() {
    let f = Fixture::new();
    let codec = f.codec(true, true);
    let text = format!("{codec:?}");
    assert!(text.contains("k1") && text.contains("k2"), "{text}");
    let state = codec.inner.state.load();
    let key_text = format!("{:?}", state.keys["k1"]);
    assert!(key_text.contains("redacted"), "{key_text}");
    for shown in [&text, &key_text] {
        assert!(!shown.contains("17, 17") && !shown.contains("0x11") && !shown.contains("ERER"));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batches_round_trip_inline_and_parallel() {
    let f = Fixture::new();
    let codec = f.codec(true, true);
    let payloads: Vec<Bytes> = (0..40)
        .map(|i| Bytes::from(user_payload(&json_text(100 + i * 3000))))
        .chain([Bytes::from(user_payload(b""))])
        .collect();
    for threshold in [0, usize::MAX] {
        codec.set_parallel_threshold(threshold);
        let encoded = codec
            .encode_batch(Some("ns"), payloads.clone())
            .await
            .unwrap();
        assert_eq!(encoded.len(), payloads.len());
        let encoded: Vec<Bytes> = encoded.into_iter().map(Option::unwrap).collect();
        let decoded = codec.decode_batch(encoded).await.unwrap();
        let decoded: Vec<Bytes> = decoded.into_iter().map(Option::unwrap).collect();
        assert_eq!(decoded, payloads, "threshold {threshold}");
    }
    assert!(
        codec
            .encode_batch(None, Vec::new())
            .await
            .unwrap()
            .is_empty()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batch_reports_lowest_failing_index() {
    let f = Fixture::new();
    let codec = f.codec(true, true);
    let good = codec
        .encode(None, &user_payload(&json_text(50_000)))
        .unwrap()
        .unwrap();
    let bad = Bytes::from(independent_seal(&K1, "k9", b"x"));
    let plain = Bytes::from(user_payload(b"{}"));
    let mut batch = vec![good.clone(); 10];
    batch[3] = plain.clone();
    batch[7] = bad.clone();
    batch[9] = bad;
    for threshold in [0, usize::MAX] {
        codec.set_parallel_threshold(threshold);
        let err = codec.decode_batch(batch.clone()).await.unwrap_err();
        assert_eq!(err.index, 7, "threshold {threshold}");
        assert!(matches!(&err.error, CodecError::UnknownKey(id) if id == "k9"));
        assert_eq!(
            err.to_string(),
            "payload 7: unknown encryption key id \"k9\""
        );
        let mut ok = batch[..7].to_vec();
        ok.push(plain.clone());
        let out = codec.decode_batch(ok).await.unwrap();
        assert!(out[3].is_none() && out[7].is_none() && out[0].is_some());
    }
}

#[test]
fn decompression_draws_from_the_message_budget() {
    use crate::budget::{Exhausted, MessageBudget, ProcessBudget};
    let zeros = vec![0u8; 4 << 20];
    let declared = zstd::bulk::compress(&zeros, 3).unwrap();
    let mut streamed = Vec::new();
    {
        // Without a content size: the streaming path grows the output step by step.
        let mut encoder = zstd::stream::write::Encoder::new(&mut streamed, 3).unwrap();
        encoder.include_contentsize(false).unwrap();
        std::io::Write::write_all(&mut encoder, &zeros).unwrap();
        encoder.finish().unwrap();
    }
    for frame in [&declared, &streamed] {
        let budget = MessageBudget::new(ProcessBudget::unlimited(), 3 << 20);
        let err = zstd_layer::decompress_bounded(frame, 64 << 20, &budget).unwrap_err();
        assert!(
            matches!(err, CodecError::Budget(Exhausted::Message { .. })),
            "{err}"
        );
        assert!(budget.used() <= 3 << 20);
        let roomy = MessageBudget::new(ProcessBudget::unlimited(), 5 << 20);
        assert_eq!(
            zstd_layer::decompress_bounded(frame, 64 << 20, &roomy)
                .unwrap()
                .len(),
            4 << 20
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancelled_batches_stop_their_blocking_workers() {
    use crate::budget::MessageBudget;
    let f = Fixture::new();
    let codec = PayloadCodec::from_config(&f.config(false, true)).unwrap();
    codec.set_parallel_threshold(0);
    let frame = zstd::bulk::compress(&vec![0u8; 4 << 20], 3).unwrap();
    let payload = Bytes::from(
        WirePayload {
            metadata: [("encoding".to_owned(), b"binary/zstd".to_vec())].into(),
            data: Bytes::from(frame),
            external_payloads: vec![],
        }
        .encode_to_vec(),
    );
    let budget = MessageBudget::unlimited();
    let batch = vec![payload; 256];
    let run = codec.decode_batch_within(batch, budget.clone());
    assert!(
        tokio::time::timeout(std::time::Duration::from_millis(2), run)
            .await
            .is_err(),
        "256 x 4 MiB cannot finish in 2 ms"
    );
    tokio::time::sleep(std::time::Duration::from_millis(1500)).await;
    let done = budget.used() / (4 << 20);
    assert!(
        done < 64,
        "blocking workers went on after the batch was dropped: {done} of 256 payloads decoded"
    );
}

/// A payload handed over whose buffer nothing else holds (a fetched storage object) is
/// decrypted in that buffer: the result lies inside it. A shared one is copied first and left
/// as it was; both decode to the same plaintext, and a tampered one fails closed either way.
#[tokio::test]
async fn a_handed_over_payload_is_decrypted_in_its_own_buffer_and_a_shared_one_is_not_touched() {
    let f = Fixture::new();
    let codec = f.codec(true, true);
    let plain = user_payload(&random_bytes(300_000));
    let encoded = codec.encode(None, &plain).unwrap().unwrap();
    let budget = crate::budget::MessageBudget::unlimited();

    // Unique: decrypted in place.
    let unique = Bytes::from(encoded.to_vec());
    let range = unique.as_ptr() as usize..unique.as_ptr() as usize + unique.len();
    let out = codec
        .decode_owned(unique, None, Some(""), &budget)
        .unwrap()
        .unwrap();
    assert_eq!(&out[..], &plain[..]);
    assert!(
        range.contains(&(out.as_ptr() as usize)),
        "decrypted in the object's own buffer"
    );

    // Shared (a cached object): copied, the shared buffer unchanged.
    let shared = Bytes::from(encoded.to_vec());
    let keep = shared.clone();
    let out = codec
        .decode_owned(shared, None, Some(""), &budget)
        .unwrap()
        .unwrap();
    assert_eq!(&out[..], &plain[..]);
    assert_eq!(keep, encoded, "a shared buffer is never written to");

    // Tampered, unique: authentication fails, nothing is returned.
    let mut bad = encoded.to_vec();
    let last = bad.len() - 1;
    bad[last] ^= 1;
    let err = codec
        .decode_owned(Bytes::from(bad), None, Some(""), &budget)
        .unwrap_err();
    assert!(
        matches!(err, CodecError::AuthenticationFailed { .. }),
        "{err}"
    );

    // Through the batch the gRPC path uses.
    let batch = codec
        .decode_batch_scoped(None, false, vec![Bytes::from(encoded.to_vec())], budget)
        .await
        .unwrap();
    assert_eq!(batch[0].as_deref(), Some(&plain[..]));
}

/// In place, nothing new is allocated and nothing is charged (the fetched object was); a
/// copy is charged as before.
#[test]
fn a_payload_decrypted_in_place_is_not_charged_twice() {
    let f = Fixture::new();
    let codec = f.codec(true, true);
    let plain = user_payload(&random_bytes(200_000));
    let encoded = codec.encode(None, &plain).unwrap().unwrap();
    let budget = crate::budget::MessageBudget::unlimited();
    codec
        .decode_owned(Bytes::from(encoded.to_vec()), None, Some(""), &budget)
        .unwrap();
    assert_eq!(budget.used(), 0, "in place: the object's own bytes");
    let keep = Bytes::from(encoded.to_vec());
    codec
        .decode_owned(keep.clone(), None, Some(""), &budget)
        .unwrap();
    assert_eq!(budget.used(), plain.len(), "a copy is charged");
}
