//! A key-encryption key on a PKCS#11 token (an HSM, or SoftHSM2 for development), named by an
//! RFC 7512 URI (see [`uri`]):
//!
//! ```text
//! pkcs11:token=gateway;object=payments-kek?module-path=/usr/lib/softhsm/libsofthsm2.so&pin-source=file:/run/secrets/hsm-pin
//! ```
//!
//! # What the token does
//! The KEK is an AES-256 secret key object on the token with `CKA_SENSITIVE = true` and
//! `CKA_EXTRACTABLE = false`; [`Pkcs11Kek::open`] refuses any other key, so the key value can
//! never be read out through PKCS#11. Wrapping is `CKM_AES_GCM` *on the token*: the gateway
//! sends the 32-byte DEK, a fresh random 96-bit IV and the associated data, and gets back
//! ciphertext and a 128-bit tag. The associated data is `payload-gateway/dek/v1\0` followed by
//! the namespace, so a wrapped DEK copied into another namespace's payload fails the tag check
//! on the token and surfaces as [`KmsError::Invalid`]. (AES key wrap, `CKM_AES_KEY_WRAP_PAD`,
//! has no associated data; binding the namespace with it would need a key per namespace, so
//! GCM is used. A KEK wraps once per DEK rotation, far below GCM's 2^32 random-IV bound.)
//!
//! SoftHSM2 answers a failed tag check with `CKR_GENERAL_ERROR` rather than
//! `CKR_ENCRYPTED_DATA_INVALID`; on such an answer the backend seals and opens a test value on
//! the same session, and reports [`KmsError::Invalid`] only when that works (a broken token
//! stays [`KmsError::Unavailable`]).
//!
//! Wrapped form: `0x01 || IV (12) || ciphertext (32) || tag (16)`, 61 bytes. The IV stored is
//! the one the token reports back, so tokens that generate the IV themselves work too.
//!
//! # Blocking calls
//! PKCS#11 is a blocking C API. Each wrap or unwrap runs on Tokio's blocking pool with a session
//! taken from a small pool (at most [`MAX_SESSIONS`] calls in flight; more wait), and the whole
//! call, waiting included, is bounded by the URI's `x-timeout-ms` (default 5 s): a hung token
//! surfaces as [`KmsError::Unavailable`]. A session that fails with a device or session error is
//! discarded and a fresh one (logged in again) is opened on the next call, so a token that comes
//! back recovers without a restart.
//!
//! The module is loaded and `C_Initialize`d once per process and library path and never
//! finalized, so reloading the configuration (a new `Pkcs11Kek` for the same token) is safe.

pub mod uri;

use aws_lc_rs::rand::{SecureRandom, SystemRandom};
use cryptoki::context::{CInitializeArgs, CInitializeFlags, Pkcs11};
use cryptoki::error::{Error as CkError, RvError};
use cryptoki::mechanism::Mechanism;
use cryptoki::mechanism::aead::GcmParams;
use cryptoki::object::{Attribute, AttributeType, KeyType, ObjectClass, ObjectHandle};
use cryptoki::session::{Session, UserType};
use cryptoki::slot::Slot;
use cryptoki::types::AuthPin;
use std::collections::HashMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};
use tokio::sync::Semaphore;
use zeroize::Zeroizing;

use super::{DEK_LEN, Dek, KeyEncryptionKey, KmsError, Provider};
pub use uri::{DEFAULT_TIMEOUT, PinSource, Pkcs11Uri};

/// Sessions (and so blocking threads) one key uses at most at once.
pub const MAX_SESSIONS: usize = 4;

/// Version byte of the wrapped form.
const FORMAT_V1: u8 = 1;
const IV_LEN: usize = 12;
const TAG_LEN: usize = 16;
/// GCM tag length in bits, as PKCS#11 wants it.
const TAG_BITS: u64 = 128;
/// Length of a wrapped DEK.
pub const WRAPPED_LEN: usize = 1 + IV_LEN + DEK_LEN + TAG_LEN;
/// Prefix of the GCM associated data; the namespace follows.
const AAD_PREFIX: &[u8] = b"payload-gateway/dek/v1\0";
const PROVIDER: &str = "pkcs11";

/// A KEK held on a PKCS#11 token. Cheap to clone; safe to use concurrently.
#[derive(Clone)]
pub struct Pkcs11Kek {
    shared: Arc<Shared>,
}

struct Shared {
    key_id: String,
    uri: Pkcs11Uri,
    ctx: Pkcs11,
    slot: Slot,
    pin: Option<AuthPin>,
    /// Idle sessions, logged in.
    idle: Mutex<Vec<Session>>,
    /// Bounds token calls in flight (each holds a blocking thread).
    permits: Arc<Semaphore>,
}

impl fmt::Debug for Pkcs11Kek {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = &self.shared;
        f.debug_struct("Pkcs11Kek")
            .field("key_id", &s.key_id)
            .field("module", &s.uri.module_path)
            .field("token", &s.uri.token_description())
            .field("key", &s.uri.object_description())
            .finish_non_exhaustive()
    }
}

/// Why a call on the token failed, before it becomes a [`KmsError`].
enum Failure {
    /// The token returned an error (or the library failed).
    Token(CkError),
    /// Already classified.
    Kms(KmsError),
}

impl From<CkError> for Failure {
    fn from(e: CkError) -> Self {
        Failure::Token(e)
    }
}

/// The URI scheme of PKCS#11 keys (RFC 7512: `pkcs11:`).
pub const SCHEME: &str = "pkcs11";

impl Pkcs11Kek {
    /// Loads the module, finds the token and the key, logs in and checks the key: an AES-256
    /// secret key that is sensitive, not extractable and allowed to encrypt and decrypt.
    ///
    /// Blocks (module loading, login): call it from a blocking context
    /// (`tokio::task::spawn_blocking`) when on an async runtime. Errors: a bad URI, missing
    /// module, a URI matching several tokens or an unsuitable key are [`KmsError::Config`]; a
    /// PIN the token rejects is [`KmsError::Refused`]; no matching token (absent, or the HSM
    /// not reachable) and a token that fails at login are [`KmsError::Unavailable`]. No error
    /// quotes the PIN.
    pub fn open(key_id: &str, uri: &str) -> Result<Self, KmsError> {
        let config = |reason: String| KmsError::Config {
            key_id: key_id.to_owned(),
            reason,
        };
        let uri = Pkcs11Uri::parse(uri).map_err(|e| config(format!("PKCS#11 URI: {e}")))?;
        let ctx = load_module(&uri.module_path).map_err(config)?;
        let slot = find_slot(&ctx, &uri).map_err(|e| match e {
            // No token there (yet): the HSM is not reachable, retrying later may work.
            SlotError::Absent(reason) => KmsError::Unavailable {
                key_id: key_id.to_owned(),
                provider: PROVIDER,
                reason,
            },
            SlotError::Config(reason) => config(reason),
        })?;
        let token = ctx
            .get_token_info(slot)
            .map_err(|e| config(format!("cannot read token info: {}", describe(&e))))?;
        let pin = match &uri.pin_source {
            Some(source) => Some(read_pin(source).map_err(config)?),
            None if token.login_required() => {
                return Err(config(format!(
                    "token {:?} requires a PIN: add pin-source=file:/path or pin-source=env:NAME \
                     to the URI",
                    token.label()
                )));
            }
            None => None,
        };
        let shared = Shared {
            key_id: key_id.to_owned(),
            uri,
            ctx,
            slot,
            pin,
            idle: Mutex::new(Vec::new()),
            permits: Arc::new(Semaphore::new(MAX_SESSIONS)),
        };
        let session = shared
            .open_session()
            .map_err(|f| shared.classify(f, "login"))?;
        shared
            .check_key(&session)
            .map_err(|f| shared.classify(f, "key lookup"))?;
        shared.idle.lock().expect("session pool").push(session);
        Ok(Self {
            shared: Arc::new(shared),
        })
    }

    /// Runs `op` with a session and the key handle on the blocking pool, bounded by the
    /// timeout.
    async fn call<T, F>(&self, what: &'static str, op: F) -> Result<T, KmsError>
    where
        T: Send + 'static,
        F: FnOnce(&Session, ObjectHandle) -> Result<T, Failure> + Send + 'static,
    {
        let shared = self.shared.clone();
        let timeout = shared.uri.timeout;
        let work = async move {
            let permit = shared
                .permits
                .clone()
                .acquire_owned()
                .await
                .expect("the semaphore is never closed");
            tokio::task::spawn_blocking(move || {
                let _permit = permit;
                shared.with_session(what, op)
            })
            .await
        };
        match tokio::time::timeout(timeout, work).await {
            Ok(Ok(result)) => result,
            Ok(Err(e)) => {
                Err(self.unavailable(format!("{what}: the token call did not complete: {e}")))
            }
            // The blocking call goes on and returns its permit when the token answers; at most
            // MAX_SESSIONS calls can hang this way.
            Err(_) => Err(self.unavailable(format!(
                "{what}: no answer from the token within {} ms",
                timeout.as_millis()
            ))),
        }
    }

    fn unavailable(&self, reason: String) -> KmsError {
        KmsError::Unavailable {
            key_id: self.shared.key_id.clone(),
            provider: PROVIDER,
            reason,
        }
    }

    fn invalid(&self, reason: impl Into<String>) -> KmsError {
        KmsError::Invalid {
            key_id: self.shared.key_id.clone(),
            provider: PROVIDER,
            reason: reason.into(),
        }
    }
}

#[async_trait::async_trait]
impl KeyEncryptionKey for Pkcs11Kek {
    fn key_id(&self) -> &str {
        &self.shared.key_id
    }

    fn provider(&self) -> Provider {
        Provider::Pkcs11
    }

    async fn wrap(&self, dek: &Dek, namespace: &str) -> Result<Vec<u8>, KmsError> {
        let mut iv = [0u8; IV_LEN];
        SystemRandom::new()
            .fill(&mut iv)
            .map_err(|_| self.unavailable("the system random generator failed".to_owned()))?;
        let aad = associated_data(namespace);
        let dek = dek.clone();
        self.call("wrap", move |session, key| {
            let mut iv = iv;
            let sealed = {
                let params = GcmParams::new(&mut iv, &aad, TAG_BITS.into())?;
                session.encrypt(&Mechanism::AesGcm(params), key, dek.expose())?
            };
            if sealed.len() != DEK_LEN + TAG_LEN {
                return Err(Failure::Kms(KmsError::Refused {
                    key_id: String::new(),
                    provider: PROVIDER,
                    reason: format!(
                        "the token returned {} bytes for AES-GCM over a 32-byte key, expected {}",
                        sealed.len(),
                        DEK_LEN + TAG_LEN
                    ),
                }));
            }
            let mut out = Vec::with_capacity(WRAPPED_LEN);
            out.push(FORMAT_V1);
            out.extend_from_slice(&iv);
            out.extend_from_slice(&sealed);
            Ok(out)
        })
        .await
    }

    async fn unwrap(&self, wrapped: &[u8], namespace: &str) -> Result<Dek, KmsError> {
        if wrapped.len() != WRAPPED_LEN || wrapped[0] != FORMAT_V1 {
            return Err(self.invalid(format!(
                "not a PKCS#11-wrapped data key (expected {WRAPPED_LEN} bytes starting with \
                 version {FORMAT_V1}, got {} bytes)",
                wrapped.len()
            )));
        }
        let mut iv = [0u8; IV_LEN];
        iv.copy_from_slice(&wrapped[1..1 + IV_LEN]);
        let sealed = wrapped[1 + IV_LEN..].to_vec();
        let aad = associated_data(namespace);
        let plain = self
            .call("unwrap", move |session, key| {
                let mut iv = iv;
                let params = GcmParams::new(&mut iv, &aad, TAG_BITS.into())?;
                match session.decrypt(&Mechanism::AesGcm(params), key, &sealed) {
                    Ok(plain) => Ok(Zeroizing::new(plain)),
                    // Some tokens (SoftHSM2) report a failed tag check as a general error:
                    // when the token still seals and opens a test value, the wrapped key was
                    // the problem.
                    Err(
                        e @ CkError::Pkcs11(RvError::GeneralError | RvError::FunctionFailed, _),
                    ) if self_test(session, key) => Err(Failure::Kms(KmsError::Invalid {
                        key_id: String::new(),
                        provider: PROVIDER,
                        reason: format!(
                            "unwrap: the token rejected the wrapped key ({}; its self-test \
                                 passes): tampered, wrapped for another namespace, or by \
                                 another key",
                            describe(&e)
                        ),
                    })),
                    Err(e) => Err(e.into()),
                }
            })
            .await?;
        Dek::from_slice(&plain).ok_or_else(|| {
            self.invalid(format!(
                "unwrapped to {} bytes, not a {DEK_LEN}-byte data key",
                plain.len()
            ))
        })
    }
}

impl Shared {
    /// Takes an idle session (or opens one), runs `op`, and returns the session to the pool
    /// unless the failure says it is no longer usable.
    fn with_session<T>(
        &self,
        what: &'static str,
        op: impl FnOnce(&Session, ObjectHandle) -> Result<T, Failure>,
    ) -> Result<T, KmsError> {
        let pooled = self.idle.lock().expect("session pool").pop();
        let session = match pooled {
            Some(session) => session,
            None => self.open_session().map_err(|f| self.classify(f, what))?,
        };
        let result = self.find_key(&session).and_then(|key| op(&session, key));
        match result {
            Ok(value) => {
                self.idle.lock().expect("session pool").push(session);
                Ok(value)
            }
            Err(failure) => {
                if matches!(&failure, Failure::Token(e) if session_lost(e)) {
                    tracing::debug!(key_id = %self.key_id, "discarding a failed PKCS#11 session");
                    drop(session);
                } else {
                    self.idle.lock().expect("session pool").push(session);
                }
                Err(self.classify(failure, what))
            }
        }
    }

    /// Opens a read-only session and logs the user in (a no-op when the application already
    /// is).
    fn open_session(&self) -> Result<Session, Failure> {
        let session = self.ctx.open_ro_session(self.slot)?;
        if let Some(pin) = &self.pin {
            match session.login(UserType::User, Some(pin)) {
                Ok(()) | Err(CkError::Pkcs11(RvError::UserAlreadyLoggedIn, _)) => {}
                Err(e) => return Err(e.into()),
            }
        }
        Ok(session)
    }

    /// The template selecting the key by the URI's `object` and `id`.
    fn key_template(&self) -> Vec<Attribute> {
        let mut template = vec![
            Attribute::Class(ObjectClass::SECRET_KEY),
            Attribute::KeyType(KeyType::AES),
            Attribute::Token(true),
        ];
        if let Some(label) = &self.uri.object {
            template.push(Attribute::Label(label.as_bytes().to_vec()));
        }
        if let Some(id) = &self.uri.id {
            template.push(Attribute::Id(id.clone()));
        }
        template
    }

    /// Finds the key for an operation: the one AES key of the URI that is sensitive and not
    /// extractable (so a key replaced by an extractable one is not used).
    fn find_key(&self, session: &Session) -> Result<ObjectHandle, Failure> {
        let mut template = self.key_template();
        template.push(Attribute::Sensitive(true));
        template.push(Attribute::Extractable(false));
        let found = session.find_objects(&template)?;
        match found.as_slice() {
            [key] => Ok(*key),
            [] => Err(Failure::Kms(self.refused(format!(
                "no sensitive, non-extractable AES key {} on the token any more",
                self.uri.object_description()
            )))),
            _ => Err(Failure::Kms(self.refused(format!(
                "{} AES keys match {}; make the URI select one (object and id)",
                found.len(),
                self.uri.object_description()
            )))),
        }
    }

    /// Checks at open that the key exists once and is fit to be a KEK, naming what is wrong.
    fn check_key(&self, session: &Session) -> Result<(), Failure> {
        let found = session.find_objects(&self.key_template())?;
        let key = match found.as_slice() {
            [key] => *key,
            [] => {
                return Err(Failure::Kms(self.config(format!(
                    "no AES secret key {} on token {}",
                    self.uri.object_description(),
                    self.uri.token_description()
                ))));
            }
            _ => {
                return Err(Failure::Kms(self.config(format!(
                    "{} AES keys match {}; make the URI select one (object and id)",
                    found.len(),
                    self.uri.object_description()
                ))));
            }
        };
        let attributes = session.get_attributes(
            key,
            &[
                AttributeType::Sensitive,
                AttributeType::Extractable,
                AttributeType::ValueLen,
                AttributeType::Encrypt,
                AttributeType::Decrypt,
            ],
        )?;
        let mut problems = Vec::new();
        for attribute in &attributes {
            match attribute {
                Attribute::Sensitive(false) => {
                    problems.push("CKA_SENSITIVE is false (its value can be read)")
                }
                Attribute::Extractable(true) => {
                    problems.push("CKA_EXTRACTABLE is true (it can be exported)")
                }
                Attribute::ValueLen(len) if u64::from(*len) != DEK_LEN as u64 => {
                    problems.push("it is not an AES-256 key (CKA_VALUE_LEN is not 32)")
                }
                Attribute::Encrypt(false) => problems.push("CKA_ENCRYPT is false"),
                Attribute::Decrypt(false) => problems.push("CKA_DECRYPT is false"),
                _ => {}
            }
        }
        if attributes.len() < 5 {
            problems.push("the token does not report all of CKA_SENSITIVE, CKA_EXTRACTABLE, CKA_VALUE_LEN, CKA_ENCRYPT, CKA_DECRYPT");
        }
        if problems.is_empty() {
            Ok(())
        } else {
            Err(Failure::Kms(self.config(format!(
                "key {} cannot be a key-encryption key: {}",
                self.uri.object_description(),
                problems.join("; ")
            ))))
        }
    }

    fn config(&self, reason: String) -> KmsError {
        KmsError::Config {
            key_id: self.key_id.clone(),
            reason,
        }
    }

    fn refused(&self, reason: String) -> KmsError {
        KmsError::Refused {
            key_id: self.key_id.clone(),
            provider: PROVIDER,
            reason,
        }
    }

    /// Maps a failure to the error the caller acts on, naming the operation and the token.
    fn classify(&self, failure: Failure, what: &str) -> KmsError {
        let e = match failure {
            Failure::Kms(mut e) => {
                // Errors built inside a blocking call leave the key id to be filled in here.
                match &mut e {
                    KmsError::Unavailable { key_id, .. }
                    | KmsError::Refused { key_id, .. }
                    | KmsError::Invalid { key_id, .. }
                    | KmsError::Config { key_id, .. }
                        if key_id.is_empty() =>
                    {
                        key_id.clone_from(&self.key_id)
                    }
                    _ => {}
                }
                return e;
            }
            Failure::Token(e) => e,
        };
        let token = self.uri.token_description();
        let reason = format!("{what} on {token}: {}", describe(&e));
        let key_id = self.key_id.clone();
        match &e {
            CkError::Pkcs11(rv, _) => match rv {
                RvError::PinIncorrect
                | RvError::PinInvalid
                | RvError::PinLenRange
                | RvError::PinExpired
                | RvError::PinLocked => KmsError::Refused {
                    key_id,
                    provider: PROVIDER,
                    reason: format!("{what} on {token}: the token refused the PIN ({rv:?})"),
                },
                RvError::EncryptedDataInvalid | RvError::EncryptedDataLenRange => {
                    KmsError::Invalid {
                        key_id,
                        provider: PROVIDER,
                        reason: format!(
                            "{what} on {token}: the token rejected the wrapped key ({rv:?}): \
                             tampered, wrapped for another namespace, or by another key"
                        ),
                    }
                }
                _ if session_lost(&e) => KmsError::Unavailable {
                    key_id,
                    provider: PROVIDER,
                    reason,
                },
                _ => KmsError::Refused {
                    key_id,
                    provider: PROVIDER,
                    reason,
                },
            },
            _ => KmsError::Unavailable {
                key_id,
                provider: PROVIDER,
                reason,
            },
        }
    }
}

/// True when the error means the session (or the token) is gone, so the session is discarded
/// and retrying later may work.
fn session_lost(e: &CkError) -> bool {
    matches!(
        e,
        CkError::Pkcs11(
            RvError::SessionHandleInvalid
                | RvError::SessionClosed
                | RvError::DeviceRemoved
                | RvError::DeviceError
                | RvError::DeviceMemory
                | RvError::TokenNotPresent
                | RvError::TokenNotRecognized
                | RvError::UserNotLoggedIn
                | RvError::HostMemory
                | RvError::GeneralError
                | RvError::FunctionFailed
                | RvError::CryptokiNotInitialized,
            _
        )
    )
}

/// `CKR_...` name and function, without the library's long explanation.
fn describe(e: &CkError) -> String {
    match e {
        CkError::Pkcs11(rv, function) => format!("{function:?} returned {rv:?}"),
        other => other.to_string(),
    }
}

/// Seals and opens a fixed value with the key: true when the token works.
fn self_test(session: &Session, key: ObjectHandle) -> bool {
    const AAD: &[u8] = b"payload-gateway/self-test";
    let value = [0x5a_u8; DEK_LEN];
    let mut iv = [0u8; IV_LEN];
    if SystemRandom::new().fill(&mut iv).is_err() {
        return false;
    }
    let mut seal_iv = iv;
    let Ok(sealed) = GcmParams::new(&mut seal_iv, AAD, TAG_BITS.into())
        .and_then(|params| session.encrypt(&Mechanism::AesGcm(params), key, &value))
    else {
        return false;
    };
    let mut open_iv = seal_iv;
    GcmParams::new(&mut open_iv, AAD, TAG_BITS.into())
        .and_then(|params| session.decrypt(&Mechanism::AesGcm(params), key, &sealed))
        .is_ok_and(|opened| opened == value)
}

fn associated_data(namespace: &str) -> Vec<u8> {
    let mut aad = Vec::with_capacity(AAD_PREFIX.len() + namespace.len());
    aad.extend_from_slice(AAD_PREFIX);
    aad.extend_from_slice(namespace.as_bytes());
    aad
}

/// Loads and initializes the module at `path` once per process; later calls share it.
fn load_module(path: &Path) -> Result<Pkcs11, String> {
    static MODULES: OnceLock<Mutex<HashMap<PathBuf, Pkcs11>>> = OnceLock::new();
    let mut modules = MODULES
        .get_or_init(Default::default)
        .lock()
        .expect("module registry");
    if let Some(ctx) = modules.get(path) {
        return Ok(ctx.clone());
    }
    if !path.is_file() {
        return Err(format!(
            "PKCS#11 module {} does not exist (module-path)",
            path.display()
        ));
    }
    let ctx = Pkcs11::new(path).map_err(|e| {
        format!(
            "cannot load PKCS#11 module {}: {}",
            path.display(),
            describe(&e)
        )
    })?;
    match ctx.initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK)) {
        Ok(()) | Err(CkError::Pkcs11(RvError::CryptokiAlreadyInitialized, _)) => {}
        Err(e) => {
            return Err(format!(
                "PKCS#11 module {} failed to initialize: {}",
                path.display(),
                describe(&e)
            ));
        }
    }
    modules.insert(path.to_owned(), ctx.clone());
    Ok(ctx)
}

/// Why no slot was found.
enum SlotError {
    /// No token matches: absent or not answering (retrying later may work).
    Absent(String),
    /// The URI selects more than one token.
    Config(String),
}

/// The one slot whose token matches the URI's token attributes.
fn find_slot(ctx: &Pkcs11, uri: &Pkcs11Uri) -> Result<Slot, SlotError> {
    let slots = ctx
        .get_slots_with_token()
        .map_err(|e| SlotError::Absent(format!("cannot list PKCS#11 slots: {}", describe(&e))))?;
    let mut present = Vec::new();
    let mut matching = Vec::new();
    for slot in slots {
        let Ok(info) = ctx.get_token_info(slot) else {
            continue;
        };
        if !info.token_initialized() {
            continue;
        }
        present.push(format!("{:?}", info.label()));
        let fits = |want: &Option<String>, have: &str| want.as_deref().is_none_or(|w| w == have);
        if fits(&uri.token, info.label())
            && fits(&uri.serial, info.serial_number())
            && fits(&uri.manufacturer, info.manufacturer_id())
            && fits(&uri.model, info.model())
            && uri.slot_id.is_none_or(|id| id == slot.id())
        {
            matching.push(slot);
        }
    }
    match matching.as_slice() {
        [slot] => Ok(*slot),
        [] => Err(SlotError::Absent(format!(
            "no initialized token matches {} (tokens present: {})",
            uri.token_description(),
            if present.is_empty() {
                "none".to_owned()
            } else {
                present.join(", ")
            }
        ))),
        _ => Err(SlotError::Config(format!(
            "{} tokens match {}; add token=, serial= or slot-id= to the URI",
            matching.len(),
            uri.token_description()
        ))),
    }
}

/// Reads the PIN; one trailing newline (`\n` or `\r\n`) of a file is not part of it.
fn read_pin(source: &PinSource) -> Result<AuthPin, String> {
    let pin = match source {
        PinSource::Env(var) => std::env::var(var)
            .map_err(|_| format!("pin-source: environment variable {var} is not set"))?,
        PinSource::File(path) => {
            warn_if_readable_by_others(path);
            let text = Zeroizing::new(std::fs::read_to_string(path).map_err(|e| {
                format!("pin-source: cannot read PIN file {}: {e}", path.display())
            })?);
            let pin = text.strip_suffix('\n').unwrap_or(&text);
            pin.strip_suffix('\r').unwrap_or(pin).to_owned()
        }
    };
    if pin.is_empty() {
        return Err("pin-source: the PIN is empty".to_owned());
    }
    Ok(AuthPin::from(pin))
}

#[cfg(unix)]
fn warn_if_readable_by_others(path: &Path) {
    use std::os::unix::fs::PermissionsExt;
    if let Ok(meta) = std::fs::metadata(path)
        && meta.permissions().mode() & 0o077 != 0
    {
        tracing::warn!(
            path = %path.display(),
            "the PKCS#11 PIN file is readable by group or others; chmod 600 it"
        );
    }
}

#[cfg(not(unix))]
fn warn_if_readable_by_others(_path: &Path) {}
