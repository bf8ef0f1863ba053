//! Tokens: what the server holds instead of a protected value.
//!
//! A token is `pgw1:<key id>:<base64url(nonce ‖ ciphertext ‖ tag)>`, a deterministic
//! authenticated encryption of the value (SIV construction):
//!
//! - per namespace and key, two keys are derived from the key's search attribute root
//!   (`codec::SearchRoots`): `k_ns = HMAC-SHA-256(root, "namespace" ‖ 0 ‖ namespace)`, then
//!   `k_mac = HMAC-SHA-256(k_ns, "mac")` and `k_enc = HMAC-SHA-256(k_ns, "enc")`;
//! - the value is padded to a multiple of 16 bytes (`0x80`, then zeros), so only its length
//!   class shows;
//! - `nonce` = the first 12 bytes of `HMAC-SHA-256(k_mac, len(name) ‖ name ‖ padded value)`: the
//!   keyed token of the value, equal exactly when attribute, namespace, key and value are;
//! - `ciphertext ‖ tag` = AES-256-GCM under `k_enc` with that nonce and the attribute name as
//!   associated data, so the gateway restores the original from the token itself, wherever the
//!   server returns it (visibility, history, describe), and a token moved to another attribute
//!   or namespace does not open.
//!
//! The same value always gives the same token under one key: that is what lets the server
//! match `=`, `!=` and `IN`, and it is exactly what the server learns (SECURITY.md).

use aws_lc_rs::aead::{AES_256_GCM, Aad, LessSafeKey, NONCE_LEN, Nonce, UnboundKey};
use aws_lc_rs::hmac;
use base64::Engine;
use zeroize::Zeroize;

/// Prefix of every token (format version 1).
pub const PREFIX: &str = "pgw1:";

/// Padding block: values are padded to a multiple of this many bytes.
const BLOCK: usize = 16;

/// Largest value (bytes) that is tokenized; longer ones are refused.
pub const MAX_VALUE_BYTES: usize = 2048;

const TAG_LEN: usize = 16;

const B64: base64::engine::GeneralPurpose = base64::engine::general_purpose::URL_SAFE_NO_PAD;

/// Why a token could not be made or opened.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    /// The value is longer than [`MAX_VALUE_BYTES`].
    #[error(
        "value of {len} bytes is longer than the {MAX_VALUE_BYTES} bytes a protected search attribute may hold"
    )]
    TooLong {
        /// The value's length.
        len: usize,
    },
    /// The token is not base64url or too short.
    #[error("malformed token")]
    Malformed,
    /// The token did not authenticate under its key (altered, or another namespace's or
    /// attribute's token).
    #[error("token does not authenticate under key {key_id:?}")]
    Authentication {
        /// The key id the token names.
        key_id: String,
    },
}

/// The token keys of one namespace under one keyring key.
pub struct NamespaceKey {
    id: String,
    mac: hmac::Key,
    enc: LessSafeKey,
}

impl std::fmt::Debug for NamespaceKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NamespaceKey")
            .field("id", &self.id)
            .finish_non_exhaustive()
    }
}

impl NamespaceKey {
    /// Derives the keys of `namespace` from the search attribute `root` of key `id`.
    pub fn derive(id: &str, root: &hmac::Key, namespace: &str) -> Self {
        let mut label = Vec::with_capacity(10 + namespace.len());
        label.extend_from_slice(b"namespace\0");
        label.extend_from_slice(namespace.as_bytes());
        let mut k_ns = [0u8; 32];
        k_ns.copy_from_slice(hmac::sign(root, &label).as_ref());
        let ns_key = hmac::Key::new(hmac::HMAC_SHA256, &k_ns);
        k_ns.zeroize();
        let mut mac = [0u8; 32];
        mac.copy_from_slice(hmac::sign(&ns_key, b"mac").as_ref());
        let mut enc = [0u8; 32];
        enc.copy_from_slice(hmac::sign(&ns_key, b"enc").as_ref());
        let key = Self {
            id: id.to_owned(),
            mac: hmac::Key::new(hmac::HMAC_SHA256, &mac),
            enc: LessSafeKey::new(
                UnboundKey::new(&AES_256_GCM, &enc).expect("32 bytes is an AES-256 key"),
            ),
        };
        mac.zeroize();
        enc.zeroize();
        key
    }

    /// The key id tokens of this key carry.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The token of `value` for `attribute`.
    pub fn token(&self, attribute: &str, value: &str) -> Result<String, TokenError> {
        if value.len() > MAX_VALUE_BYTES {
            return Err(TokenError::TooLong { len: value.len() });
        }
        let mut buf = pad(value.as_bytes());
        let mut input = associated(attribute);
        input.extend_from_slice(&buf);
        let mut nonce = [0u8; NONCE_LEN];
        nonce.copy_from_slice(&hmac::sign(&self.mac, &input).as_ref()[..NONCE_LEN]);
        input.zeroize();
        let tag = self
            .enc
            .seal_in_place_separate_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(associated(attribute)),
                &mut buf,
            )
            .map_err(|_| TokenError::Malformed)?;
        let mut blob = Vec::with_capacity(NONCE_LEN + buf.len() + TAG_LEN);
        blob.extend_from_slice(&nonce);
        blob.extend_from_slice(&buf);
        blob.extend_from_slice(tag.as_ref());
        let mut out =
            String::with_capacity(PREFIX.len() + self.id.len() + 1 + blob.len() * 4 / 3 + 4);
        out.push_str(PREFIX);
        out.push_str(&self.id);
        out.push(':');
        B64.encode_string(&blob, &mut out);
        Ok(out)
    }

    /// The value inside `blob` (the token's part after the key id) for `attribute`.
    pub fn open(&self, attribute: &str, blob: &str) -> Result<String, TokenError> {
        let mut raw = B64.decode(blob).map_err(|_| TokenError::Malformed)?;
        if raw.len() < NONCE_LEN + BLOCK + TAG_LEN {
            return Err(TokenError::Malformed);
        }
        let (nonce, rest) = raw.split_at_mut(NONCE_LEN);
        let nonce = Nonce::try_assume_unique_for_key(nonce).map_err(|_| TokenError::Malformed)?;
        let auth = || TokenError::Authentication {
            key_id: self.id.clone(),
        };
        let plain = self
            .enc
            .open_in_place(nonce, Aad::from(associated(attribute)), rest)
            .map_err(|_| auth())?;
        let value = unpad(plain).ok_or_else(auth)?;
        String::from_utf8(value.to_vec()).map_err(|_| auth())
    }
}

/// Splits a token into `(key id, blob)`; `None`: not a token.
pub fn parse(token: &str) -> Option<(&str, &str)> {
    token.strip_prefix(PREFIX)?.rsplit_once(':')
}

/// `len(attribute)` (u32, big endian) ‖ attribute: associated data and MAC prefix.
fn associated(attribute: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(4 + attribute.len());
    out.extend_from_slice(&(attribute.len() as u32).to_be_bytes());
    out.extend_from_slice(attribute.as_bytes());
    out
}

/// ISO/IEC 7816-4 padding to a multiple of [`BLOCK`] (at least one byte added).
fn pad(value: &[u8]) -> Vec<u8> {
    let len = (value.len() / BLOCK + 1) * BLOCK;
    let mut out = Vec::with_capacity(len + TAG_LEN);
    out.extend_from_slice(value);
    out.push(0x80);
    out.resize(len, 0);
    out
}

fn unpad(padded: &[u8]) -> Option<&[u8]> {
    let end = padded.iter().rposition(|&b| b != 0)?;
    (padded[end] == 0x80).then(|| &padded[..end])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(id: &str, ns: &str) -> NamespaceKey {
        let root = hmac::Key::new(hmac::HMAC_SHA256, &[7u8; 32]);
        NamespaceKey::derive(id, &root, ns)
    }

    #[test]
    fn tokens_are_deterministic_and_open_to_the_value() {
        let k = key("k1", "default");
        let a = k.token("CustomerEmail", "alice@example.com").unwrap();
        assert_eq!(a, k.token("CustomerEmail", "alice@example.com").unwrap());
        assert!(a.starts_with("pgw1:k1:"));
        assert!(!a.contains("alice"));
        let (id, blob) = parse(&a).unwrap();
        assert_eq!(id, "k1");
        assert_eq!(k.open("CustomerEmail", blob).unwrap(), "alice@example.com");
        for v in ["", "x", "0123456789abcdef", "ünïcode\u{0}with nul"] {
            let t = k.token("A", v).unwrap();
            assert_eq!(k.open("A", parse(&t).unwrap().1).unwrap(), v);
        }
    }

    #[test]
    fn tokens_differ_by_value_attribute_namespace_and_key() {
        let base = key("k1", "ns").token("A", "v").unwrap();
        assert_ne!(base, key("k1", "ns").token("A", "w").unwrap());
        assert_ne!(base, key("k1", "ns").token("B", "v").unwrap());
        assert_ne!(base, key("k1", "other").token("A", "v").unwrap());
        let root2 = hmac::Key::new(hmac::HMAC_SHA256, &[8u8; 32]);
        assert_ne!(
            base,
            NamespaceKey::derive("k1", &root2, "ns")
                .token("A", "v")
                .unwrap()
        );
    }

    #[test]
    fn a_token_opens_only_for_its_attribute_and_namespace() {
        let t = key("k1", "ns").token("A", "v").unwrap();
        let blob = parse(&t).unwrap().1;
        assert!(matches!(
            key("k1", "ns").open("B", blob),
            Err(TokenError::Authentication { .. })
        ));
        assert!(matches!(
            key("k1", "other").open("A", blob),
            Err(TokenError::Authentication { .. })
        ));
        assert_eq!(key("k1", "ns").open("A", "!!"), Err(TokenError::Malformed));
    }

    #[test]
    fn length_shows_only_in_blocks_of_16() {
        let k = key("k", "ns");
        let len = |v: &str| k.token("A", v).unwrap().len();
        assert_eq!(len("a"), len("abcdefghijklmno"));
        assert!(len("abcdefghijklmnop") > len("a"));
        assert!(matches!(
            k.token("A", &"x".repeat(MAX_VALUE_BYTES + 1)),
            Err(TokenError::TooLong { .. })
        ));
    }
}
