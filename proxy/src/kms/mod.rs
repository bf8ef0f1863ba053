//! Key-encryption keys (KEKs) held outside the gateway: a cloud KMS, a PKCS#11 HSM, or an
//! external gRPC `KMSService`.
//!
//! The gateway encrypts payloads with short-lived data keys (DEKs) it generates itself; a KEK
//! only ever wraps and unwraps those 32-byte DEKs, once per rotation or per cache miss, never per
//! payload.
//!
//! # Invariants every backend keeps
//! - **KEK material never enters this process.** A backend asks its service or token to wrap or
//!   unwrap; it never exports, derives or caches the KEK itself.
//! - **A wrapped DEK is bound to its namespace.** The namespace is passed to the service as
//!   encryption context / associated data, so a wrapped DEK copied into another namespace's
//!   payload does not unwrap there.
//! - **Unwrapped DEKs are zeroed on drop** ([`Dek`]) and never logged; errors name the key id
//!   and the provider, never key bytes.
//! - **Failures are typed** ([`KmsError`]) so the caller can fail closed with a status that
//!   names the problem: an unreachable service is retryable (`UNAVAILABLE`), a refusal is not.

pub mod aws;
pub mod deferred;
pub mod grpc;
pub mod pkcs11;

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use zeroize::Zeroizing;

use crate::config::KmsServerConfig;

/// Length of a data key: AES-256.
pub const DEK_LEN: usize = 32;

/// An unwrapped data key. Zeroed when dropped; `Debug` never prints it.
#[derive(Clone)]
pub struct Dek(Zeroizing<[u8; DEK_LEN]>);

impl Dek {
    /// Wraps raw key bytes; refuses anything that is not exactly [`DEK_LEN`] bytes.
    pub fn from_slice(bytes: &[u8]) -> Option<Self> {
        let array: [u8; DEK_LEN] = bytes.try_into().ok()?;
        Some(Self(Zeroizing::new(array)))
    }

    /// The key bytes, for the AEAD only.
    pub fn expose(&self) -> &[u8; DEK_LEN] {
        &self.0
    }
}

impl fmt::Debug for Dek {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Dek(<redacted>)")
    }
}

/// Which kind of service holds a KEK; the `provider` label of the KMS metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Provider {
    /// AWS KMS (`awskms:///arn:...`).
    AwsKms,
    /// A PKCS#11 token, such as an HSM (`pkcs11:...`, RFC 7512).
    Pkcs11,
    /// An external gRPC `KMSService` (`grpc://...`).
    Grpc,
}

impl Provider {
    /// Metric label value.
    pub fn label(self) -> &'static str {
        match self {
            Provider::AwsKms => "awskms",
            Provider::Pkcs11 => "pkcs11",
            Provider::Grpc => "grpc",
        }
    }
}

/// Why a KEK operation failed.
#[derive(Debug, thiserror::Error)]
pub enum KmsError {
    /// The service could not be reached or did not answer in time; retrying may succeed.
    #[error("key {key_id:?} ({provider}): key service unavailable: {reason}")]
    Unavailable {
        /// Configured key id.
        key_id: String,
        /// Provider label.
        provider: &'static str,
        /// What failed (no key material).
        reason: String,
    },
    /// The service refused the operation (permissions, disabled or deleted key).
    #[error("key {key_id:?} ({provider}): key service refused the operation: {reason}")]
    Refused {
        /// Configured key id.
        key_id: String,
        /// Provider label.
        provider: &'static str,
        /// What the service said (no key material).
        reason: String,
    },
    /// The wrapped key does not unwrap under this KEK and namespace (tampered, copied from
    /// another namespace, or wrapped by another key).
    #[error("key {key_id:?} ({provider}): wrapped data key does not unwrap: {reason}")]
    Invalid {
        /// Configured key id.
        key_id: String,
        /// Provider label.
        provider: &'static str,
        /// What failed (no key material).
        reason: String,
    },
    /// The key's configuration cannot be used (bad URI, missing module, unknown server).
    #[error("key {key_id:?}: {reason}")]
    Config {
        /// Configured key id.
        key_id: String,
        /// What is wrong with it.
        reason: String,
    },
}

impl KmsError {
    /// True when retrying later may succeed (the service was unreachable).
    pub fn is_retryable(&self) -> bool {
        matches!(self, KmsError::Unavailable { .. })
    }
}

/// A key-encryption key in a KMS, HSM or external service.
///
/// Implementations are cheap to share (`Arc<dyn KeyEncryptionKey>`), safe to call
/// concurrently, and bound every call with a timeout so a hung service surfaces as
/// [`KmsError::Unavailable`] instead of a hung RPC.
#[async_trait::async_trait]
pub trait KeyEncryptionKey: Send + Sync + fmt::Debug {
    /// The configured key id (written into payloads; never key material).
    fn key_id(&self) -> &str;

    /// Which kind of service holds this key.
    fn provider(&self) -> Provider;

    /// Wraps `dek` for `namespace`. The result is opaque and only [`unwrap`] with the same
    /// namespace on the same KEK recovers the DEK.
    ///
    /// [`unwrap`]: KeyEncryptionKey::unwrap
    async fn wrap(&self, dek: &Dek, namespace: &str) -> Result<Vec<u8>, KmsError>;

    /// Recovers a DEK wrapped by [`wrap`](KeyEncryptionKey::wrap) for `namespace`.
    async fn unwrap(&self, wrapped: &[u8], namespace: &str) -> Result<Dek, KmsError>;
}

/// What every backend needs besides its URI.
#[derive(Debug, Clone)]
pub struct ConnectSettings {
    /// Upper bound of one wrap or unwrap, retries included (`encryption.kms_timeout_ms`).
    pub timeout: Duration,
    /// The gRPC key services `grpc://<name>` URIs refer to (`[kms_servers.<name>]`).
    pub kms_servers: BTreeMap<String, KmsServerConfig>,
}

/// Builds the KEK named `key_id` from its `kms` URI, by scheme:
///
/// | scheme | backend |
/// | --- | --- |
/// | `awskms:///arn:aws:kms:...` | [`aws::AwsKmsKey`] |
/// | `pkcs11:token=...;object=...?module-path=...&pin-source=...` (RFC 7512) | [`pkcs11::Pkcs11Kek`] |
/// | `grpc://<name>` (a `[kms_servers.<name>]` table) | [`grpc::GrpcKek`] |
///
/// Connecting is synchronous. AWS and gRPC clients do not reach the service until first use,
/// so a configuration load or `SIGHUP` reload never waits for the network. A PKCS#11 key is
/// opened here (module load, login, key checks: local calls to the token), so a wrong PIN or
/// an unsuitable key stops the load; a token that is absent or does not answer does not: the
/// key is then a [`deferred::DeferredKek`] that opens on first use (start degraded). A malformed URI or an unknown scheme is refused here.
/// gRPC keys must be built within a Tokio runtime.
pub fn connect(
    key_id: &str,
    uri: &str,
    settings: &ConnectSettings,
) -> Result<Arc<dyn KeyEncryptionKey>, KmsError> {
    let scheme = uri.split_once(':').map_or("", |(scheme, _)| scheme);
    match scheme {
        aws::SCHEME => Ok(Arc::new(aws::AwsKmsKey::new(
            key_id,
            uri,
            settings.timeout,
        )?)),
        pkcs11::SCHEME => match pkcs11::Pkcs11Kek::open(key_id, uri) {
            Ok(kek) => Ok(Arc::new(kek)),
            // The token is absent or does not answer: start without it, open it on use.
            Err(e) if e.is_retryable() => {
                tracing::warn!(key_id, error = %e, "key service unreachable at load: starting without it; payloads that need this key fail with UNAVAILABLE until it opens");
                let (id, uri) = (key_id.to_owned(), uri.to_owned());
                let open: deferred::Opener = Arc::new(move || {
                    pkcs11::Pkcs11Kek::open(&id, &uri)
                        .map(|k| Arc::new(k) as Arc<dyn KeyEncryptionKey>)
                });
                Ok(Arc::new(deferred::DeferredKek::new(
                    key_id,
                    Provider::Pkcs11,
                    open,
                    e,
                )))
            }
            Err(e) => Err(e),
        },
        _ if uri.starts_with(grpc::SCHEME) => Ok(Arc::new(grpc::GrpcKek::from_uri(
            key_id,
            uri,
            &settings.kms_servers,
        )?)),
        _ => Err(KmsError::Config {
            key_id: key_id.to_owned(),
            reason: format!(
                "unsupported key URI scheme {scheme:?} (supported: {}:///arn:aws:kms:..., \
                 pkcs11:... (RFC 7512), {}<name of a [kms_servers] table>)",
                aws::SCHEME,
                grpc::SCHEME
            ),
        }),
    }
}
