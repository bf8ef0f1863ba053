//! The keyring: AES-256-GCM keys by id, loaded from files or environment variables, the
//! development key, and per-key nonce counters.

use std::collections::{BTreeSet, HashMap};
use std::fmt;
use std::io::Write;
use std::path::Path;
use std::sync::atomic::{AtomicU8, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use aws_lc_rs::aead::{AES_256_GCM, Aad, LessSafeKey, NONCE_LEN, Nonce, UnboundKey};
use aws_lc_rs::rand::{SecureRandom, SystemRandom};
use base64::Engine;

use super::CodecError;
use super::nonce::NonceSource;
use super::wire::{self, ENCODING_ENCRYPTED, ENCODING_KEY, KEY_ID_KEY};
use crate::config::{Config, ConfigError, NamespaceConfig};

/// Id of the development key.
pub(crate) const DEV_KEY_ID: &str = "dev";
/// AES-GCM tag length.
pub(crate) const TAG_LEN: usize = 16;
/// Encryptions allowed per key with random 96-bit nonces (NIST SP 800-38D §8.3).
pub(crate) const NONCE_LIMIT: u64 = 1 << 32;

/// How many messages a key has encrypted, shared across reloads of the same key material.
#[derive(Debug, Default)]
pub(crate) struct NonceCounter {
    count: AtomicU64,
    /// Bit i set: the i-th threshold of [`THRESHOLDS`] has been warned about.
    pub(crate) warned: AtomicU8,
}

/// Warning thresholds, in percent of the limit.
const THRESHOLDS: [u64; 3] = [50, 75, 90];

impl NonceCounter {
    /// Reserves one encryption, or refuses when the limit is reached.
    fn reserve(&self, key_id: &str, limit: u64) -> Result<(), CodecError> {
        let prev = self
            .count
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |c| {
                (c < limit).then_some(c + 1)
            })
            .map_err(|_| CodecError::NonceLimitReached {
                key_id: key_id.to_owned(),
                limit,
            })?;
        let now = prev + 1;
        for (i, pct) in THRESHOLDS.iter().enumerate() {
            let at = (u128::from(limit) * u128::from(*pct) / 100) as u64;
            if prev < at && now >= at {
                let bit = 1u8 << i;
                if self.warned.fetch_or(bit, Ordering::Relaxed) & bit == 0 {
                    tracing::warn!(
                        key_id,
                        encryptions = now,
                        limit,
                        "encryption key {key_id:?} has encrypted {pct}% of the {limit} messages \
                         NIST SP 800-38D allows with random nonces; configure a new \
                         encryption.active_key soon (encryption stops at the limit)"
                    );
                }
            }
        }
        Ok(())
    }

    pub(crate) fn count(&self) -> u64 {
        self.count.load(Ordering::Relaxed)
    }
}

/// One AES-256-GCM key: a static key, or an envelope data key (then `id` is its KEK's id).
pub(crate) struct KeyEntry {
    pub(crate) id: String,
    aead: LessSafeKey,
    pub(crate) counter: Arc<NonceCounter>,
    /// Serialized metadata of payloads this key encrypts (encoding + key id, and for a data
    /// key its wrapped form and id).
    pub(crate) header: Vec<u8>,
    /// AES-GCM associated data: empty for static keys (the SDK sample codecs' layout); for a
    /// data key the binding of [`envelope_aad`].
    aad: Box<[u8]>,
    /// The root protected search attribute tokens derive from (static keys only; see
    /// `crate::search_attributes`): HMAC-SHA-256 of [`SEARCH_ROOT_LABEL`] under the key.
    pub(crate) search_root: Option<aws_lc_rs::hmac::Key>,
}

/// What a key's search attribute root is derived from: never the key itself, so a token key
/// is never an AES-GCM payload key.
const SEARCH_ROOT_LABEL: &[u8] = b"payload-gateway/search-attributes/v1";

impl fmt::Debug for KeyEntry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KeyEntry")
            .field("id", &self.id)
            .field("material", &"<redacted>")
            .field("encryptions", &self.counter.count())
            .finish()
    }
}

impl KeyEntry {
    fn new(id: &str, material: &[u8; 32], counter: Arc<NonceCounter>) -> Self {
        let aead = LessSafeKey::new(
            UnboundKey::new(&AES_256_GCM, material).expect("32 bytes is an AES-256 key"),
        );
        Self {
            id: id.to_owned(),
            aead,
            counter,
            header: wire::metadata_prefix(&[
                (ENCODING_KEY, ENCODING_ENCRYPTED),
                (KEY_ID_KEY, id.as_bytes()),
            ]),
            aad: Box::default(),
            search_root: Some(search_root(material)),
        }
    }

    /// An envelope data key of `kek_id` for `namespace`: payloads carry `wrapped` and
    /// `dek_id` in their metadata and are sealed with [`envelope_aad`] as associated data.
    pub(crate) fn envelope(
        kek_id: &str,
        dek: &crate::kms::Dek,
        wrapped: &[u8],
        dek_id: &str,
        namespace: &str,
    ) -> Self {
        let aead = LessSafeKey::new(
            UnboundKey::new(&AES_256_GCM, dek.expose()).expect("32 bytes is an AES-256 key"),
        );
        Self {
            id: kek_id.to_owned(),
            aead,
            counter: Arc::default(),
            header: wire::metadata_prefix(&[
                (ENCODING_KEY, ENCODING_ENCRYPTED),
                (KEY_ID_KEY, kek_id.as_bytes()),
                (wire::DEK_KEY, wrapped),
                (wire::DEK_ID_KEY, dek_id.as_bytes()),
            ]),
            aad: envelope_aad(kek_id, dek_id, namespace).into_boxed_slice(),
            search_root: None,
        }
    }

    /// Encrypts `buf[start..]` in place, writes a fresh random nonce into
    /// `buf[start - 12..start]` and appends the tag.
    pub(crate) fn seal(
        &self,
        nonces: &NonceSource,
        limit: u64,
        buf: &mut Vec<u8>,
        start: usize,
    ) -> Result<(), CodecError> {
        self.counter.reserve(&self.id, limit)?;
        let nonce = nonces.nonce()?;
        buf[start - NONCE_LEN..start].copy_from_slice(&nonce);
        let tag = self
            .aead
            .seal_in_place_separate_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(&self.aad[..]),
                &mut buf[start..],
            )
            .map_err(|_| CodecError::EncryptFailed {
                key_id: self.id.clone(),
            })?;
        buf.extend_from_slice(tag.as_ref());
        Ok(())
    }

    /// Decrypts `nonce ‖ ciphertext ‖ tag` in place; returns the plaintext length (the
    /// plaintext is at `buf[12..12 + len]`).
    pub(crate) fn open(&self, buf: &mut [u8]) -> Result<usize, CodecError> {
        if buf.len() < NONCE_LEN + TAG_LEN {
            return Err(CodecError::TooShort {
                key_id: self.id.clone(),
                len: buf.len(),
            });
        }
        let (nonce, rest) = buf.split_at_mut(NONCE_LEN);
        let nonce = Nonce::try_assume_unique_for_key(nonce).expect("12 bytes");
        self.aead
            .open_in_place(nonce, Aad::from(&self.aad[..]), rest)
            .map(|plain| plain.len())
            .map_err(|_| CodecError::AuthenticationFailed {
                key_id: self.id.clone(),
            })
    }
}

/// The search attribute root of a static key's `material`.
fn search_root(material: &[u8; 32]) -> aws_lc_rs::hmac::Key {
    use aws_lc_rs::hmac;
    let tag = hmac::sign(
        &hmac::Key::new(hmac::HMAC_SHA256, material),
        SEARCH_ROOT_LABEL,
    );
    hmac::Key::new(hmac::HMAC_SHA256, tag.as_ref())
}

/// Associated data of an envelope-encrypted payload: a version label, then the KEK id, the
/// data key id and the namespace, each length-prefixed (u32, big endian). A payload moved to
/// another namespace, or relabelled with another key or data key id, fails authentication
/// even when its data key is cached.
pub(crate) fn envelope_aad(kek_id: &str, dek_id: &str, namespace: &str) -> Vec<u8> {
    const LABEL: &[u8] = b"payload-gateway/envelope/v1";
    let mut aad =
        Vec::with_capacity(LABEL.len() + 12 + kek_id.len() + dek_id.len() + namespace.len());
    aad.extend_from_slice(LABEL);
    for part in [kek_id, dek_id, namespace] {
        let len = u32::try_from(part.len()).unwrap_or(u32::MAX);
        aad.extend_from_slice(&len.to_be_bytes());
        aad.extend_from_slice(part.as_bytes());
    }
    aad
}

/// Which keys each namespace may decrypt with: keys are bound to the namespaces that use them.
///
/// The rule (SECURITY.md, "Keys bound to namespaces"):
/// - a namespace's *own key* is its `active_key`, else `encryption.active_key`, else the
///   development key; it may always decrypt with it;
/// - besides, it may decrypt with `[namespaces.<ns>] decrypt_keys` when set, else with
///   `[encryption] decrypt_keys` when set, else with the *shared* keys: every key of the
///   keyring that is no namespace's own key (`encryption.active_key` included, the own key of
///   every namespace without its own `active_key`) and is not listed in any namespace's
///   `decrypt_keys`.
///
/// So a single-tenant keyring (one `active_key`, older keys kept for rotation) decrypts with
/// every key as before, while a namespace with its own key never silently decrypts with
/// another namespace's key: that takes an explicit `decrypt_keys` entry. Requests without a
/// namespace, and namespaces without a `[namespaces.<ns>]` section, get the top-level set.
#[derive(Debug, Clone, Default)]
pub(crate) struct DecryptSets {
    /// The top level: namespaces without a section, and requests without a namespace.
    default: BTreeSet<String>,
    /// Namespaces with a `[namespaces.<ns>]` section.
    namespaces: HashMap<String, BTreeSet<String>>,
}

impl DecryptSets {
    /// Applies the rule to `config` over the loaded `keys` (ids not in the keyring are dropped;
    /// configuration validation already refuses them).
    pub(crate) fn build(config: &Config, keys: &BTreeSet<String>) -> Self {
        let top_key = config
            .encryption
            .active_key
            .clone()
            .or_else(|| keys.contains(DEV_KEY_ID).then(|| DEV_KEY_ID.to_owned()));
        let own_key = |ns: &NamespaceConfig| ns.active_key.clone().or_else(|| top_key.clone());
        let mut owned: BTreeSet<String> = top_key.iter().cloned().collect();
        for ns in config.namespaces.values() {
            owned.extend(own_key(ns));
            owned.extend(ns.decrypt_keys.iter().flatten().cloned());
        }
        let default_extra: BTreeSet<String> = match &config.encryption.decrypt_keys {
            Some(ids) => ids.iter().cloned().collect(),
            None => keys
                .iter()
                .filter(|id| !owned.contains(*id))
                .cloned()
                .collect(),
        };
        let set = |own: Option<String>, extra: &BTreeSet<String>| {
            let mut set = extra.clone();
            set.extend(own);
            set.retain(|id| keys.contains(id));
            set
        };
        Self {
            default: set(top_key.clone(), &default_extra),
            namespaces: config
                .namespaces
                .iter()
                .map(|(name, ns)| {
                    let extra = match &ns.decrypt_keys {
                        Some(ids) => ids.iter().cloned().collect(),
                        None => default_extra.clone(),
                    };
                    (name.clone(), set(own_key(ns), &extra))
                })
                .collect(),
        }
    }

    /// The key ids `namespace` may decrypt with (`None`: a request without a namespace).
    pub(crate) fn get(&self, namespace: Option<&str>) -> &BTreeSet<String> {
        namespace
            .and_then(|ns| self.namespaces.get(ns))
            .unwrap_or(&self.default)
    }
}

/// Counters survive reloads as long as a key id keeps the same key material.
pub(crate) type CounterRegistry = Mutex<HashMap<(String, [u8; 32]), Arc<NonceCounter>>>;

fn counter_for(registry: &CounterRegistry, id: &str, material: &[u8; 32]) -> Arc<NonceCounter> {
    let fingerprint = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, material);
    let mut fp = [0u8; 32];
    fp.copy_from_slice(fingerprint.as_ref());
    let mut map = registry.lock().unwrap_or_else(|e| e.into_inner());
    map.entry((id.to_owned(), fp)).or_default().clone()
}

/// Whether any namespace (or the top level) encrypts.
pub(crate) fn encryption_used(config: &Config) -> bool {
    config.encryption.enabled
        || config
            .namespaces
            .values()
            .any(|ns| ns.encryption == Some(true))
}

/// Loads every configured key (or the development key) into a map by id.
pub(crate) fn load_keys(
    config: &Config,
    registry: &CounterRegistry,
    rng: &SystemRandom,
) -> Result<HashMap<String, Arc<KeyEntry>>, ConfigError> {
    let mut keys = HashMap::new();
    for (i, spec) in config.encryption.keys.iter().enumerate() {
        if spec.kms.is_some() {
            // A key-encryption key in a key service (`kms::connect`), not key material.
            continue;
        }
        let raw = if let Some(file) = &spec.file {
            warn_if_readable_by_others(file, &spec.id);
            std::fs::read(file).map_err(|e| {
                ConfigError::invalid(
                    format!("encryption.keys[{i}].file"),
                    format!("cannot read {:?}: {e}", file.display().to_string()),
                )
            })?
        } else if let Some(var) = &spec.env {
            use std::os::unix::ffi::OsStringExt;
            std::env::var_os(var)
                .ok_or_else(|| {
                    ConfigError::invalid(
                        format!("encryption.keys[{i}].env"),
                        format!("{var} is not set"),
                    )
                })?
                .into_vec()
        } else {
            return Err(ConfigError::invalid(
                format!("encryption.keys[{i}]"),
                "give exactly one of `file`, `env` or `kms`",
            ));
        };
        let material = parse_key(&raw)
            .map_err(|problem| ConfigError::invalid(format!("encryption.keys[{i}]"), problem))?;
        let counter = counter_for(registry, &spec.id, &material);
        keys.insert(
            spec.id.clone(),
            Arc::new(KeyEntry::new(&spec.id, &material, counter)),
        );
    }
    if config.encryption.keys.is_empty() && encryption_used(config) {
        let material = load_or_create_dev_key(&config.encryption.dev_key_file, rng)?;
        let counter = counter_for(registry, DEV_KEY_ID, &material);
        keys.insert(
            DEV_KEY_ID.to_owned(),
            Arc::new(KeyEntry::new(DEV_KEY_ID, &material, counter)),
        );
    }
    Ok(keys)
}

/// Exactly 32 raw bytes, or standard base64 of 32 bytes (trailing whitespace ignored).
pub(crate) fn parse_key(raw: &[u8]) -> Result<[u8; 32], String> {
    if let Ok(key) = <[u8; 32]>::try_from(raw) {
        return Ok(key);
    }
    let expected = "key must be 32 bytes (raw) or base64 of 32 bytes";
    let text = raw.trim_ascii_end();
    match base64::engine::general_purpose::STANDARD.decode(text) {
        Ok(decoded) => <[u8; 32]>::try_from(decoded.as_slice()).map_err(|_| {
            format!(
                "{expected}, got {} bytes (base64 of {} bytes)",
                raw.len(),
                decoded.len()
            )
        }),
        Err(_) if raw.len() < 32 => Err(format!("{expected}, got {} bytes", raw.len())),
        Err(_) => Err(format!(
            "{expected}, got {} bytes (not valid base64)",
            raw.len()
        )),
    }
}

/// A new random 256-bit key from the system CSPRNG.
fn random_key(rng: &SystemRandom) -> Result<[u8; 32], aws_lc_rs::error::Unspecified> {
    let mut key = [0u8; 32];
    rng.fill(&mut key)?;
    Ok(key)
}

/// A new random 256-bit key, base64 (standard alphabet), as key files and env vars accept it.
pub fn generate_key_base64() -> Result<String, aws_lc_rs::error::Unspecified> {
    random_key(&SystemRandom::new())
        .map(|key| base64::engine::general_purpose::STANDARD.encode(key))
}

/// Reads the development key, or generates it (once, atomically) when the file is missing.
/// Key files readable by group or others are accepted (Kubernetes mounts secrets 0644 by
/// default, inside a pod-private volume) but never silently: a warning names the file and mode.
fn warn_if_readable_by_others(file: &Path, id: &str) {
    use std::os::unix::fs::PermissionsExt;
    if let Ok(meta) = std::fs::metadata(file) {
        let mode = meta.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            tracing::warn!(
                key_id = id,
                file = %file.display(),
                mode = format!("{mode:o}"),
                "key file is readable or writable by group or others: chmod 600 it (or keep it in a \
                 volume only the gateway can read)"
            );
        }
    }
}

fn load_or_create_dev_key(path: &Path, rng: &SystemRandom) -> Result<[u8; 32], ConfigError> {
    const KEY: &str = "encryption.dev_key_file";
    let shown = path.display().to_string();
    match std::fs::read(path) {
        Ok(raw) => {
            let key = parse_key(&raw)
                .map_err(|p| ConfigError::invalid(KEY, format!("{shown:?}: {p}")))?;
            tracing::warn!(
                path = %shown,
                "encryption uses the DEVELOPMENT key from {shown:?}: not for production; \
                 configure [[encryption.keys]] and encryption.active_key"
            );
            return Ok(key);
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => {
            return Err(ConfigError::invalid(
                KEY,
                format!("cannot read {shown:?}: {e}"),
            ));
        }
    }
    let key =
        random_key(rng).map_err(|_| ConfigError::invalid(KEY, "random number generator failed"))?;
    let io = |what: &str, e: std::io::Error| ConfigError::invalid(KEY, format!("{what}: {e}"));
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent).map_err(|e| {
            io(
                &format!("cannot create directory {:?}", parent.display().to_string()),
                e,
            )
        })?;
    }
    // Write a private temporary file, then hard-link it into place: the link fails if another
    // process created the key meanwhile, so the key is never overwritten or read half-written.
    let suffix = u64::from_le_bytes(
        random_key(rng).map_err(|_| ConfigError::invalid(KEY, "random number generator failed"))?
            [..8]
            .try_into()
            .expect("8 bytes"),
    );
    let tmp = path.with_extension(format!("tmp.{}.{suffix:016x}", std::process::id()));
    let write = || -> std::io::Result<()> {
        use std::os::unix::fs::OpenOptionsExt;
        // O_EXCL: never reuse (or follow a symlink planted at) an existing path; O_NOFOLLOW
        // as well, for file systems where that matters.
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .custom_flags(libc::O_NOFOLLOW)
            .mode(0o600)
            .open(&tmp)?;
        let mut text = base64::engine::general_purpose::STANDARD.encode(key);
        text.push('\n');
        f.write_all(text.as_bytes())?;
        f.sync_all()
    };
    let linked = write().and_then(|()| std::fs::hard_link(&tmp, path));
    let _ = std::fs::remove_file(&tmp);
    match linked {
        Ok(()) => {
            tracing::warn!(
                path = %shown,
                "\n\
                 ************************************************************************\n\
                 * GENERATED A DEVELOPMENT ENCRYPTION KEY -- FOR DEVELOPMENT ONLY       *\n\
                 ************************************************************************\n\
                 * encryption is on and no [[encryption.keys]] are configured, so a     *\n\
                 * random key (id \"dev\") was written to:                                *\n\
                 *   {shown}\n\
                 * Anyone with this file can read every payload; losing it makes them   *\n\
                 * unreadable. For production, configure real keys, e.g.:               *\n\
                 *   [encryption]                                                       *\n\
                 *   active_key = \"k1\"                                                  *\n\
                 *   keys = [{{ id = \"k1\", file = \"/etc/pgw/k1.key\" }}]                   *\n\
                 *   # key file: 32 raw bytes or base64 (openssl rand -base64 32)       *\n\
                 * and keep {{ id = \"dev\", ... }} among the keys while old payloads      *\n\
                 * encrypted with it must stay readable.                                *\n\
                 ************************************************************************"
            );
            Ok(key)
        }
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            let raw = std::fs::read(path).map_err(|e| io(&format!("cannot read {shown:?}"), e))?;
            parse_key(&raw).map_err(|p| ConfigError::invalid(KEY, format!("{shown:?}: {p}")))
        }
        Err(e) => Err(io(&format!("cannot write {shown:?}"), e)),
    }
}
