//! A key-encryption key whose service was unreachable when the configuration was loaded: the
//! gateway starts without it and opens it on first use (see "Start degraded" in
//! RELIABILITY.md).
//!
//! Only a PKCS#11 key needs this: AWS KMS and gRPC keys do not reach their service before
//! first use. A token that is absent or does not answer at start (a network HSM not connected
//! yet, a token not plugged in) makes [`pkcs11::Pkcs11Kek::open`](super::pkcs11::Pkcs11Kek::open)
//! fail with [`KmsError::Unavailable`]; [`connect`](super::connect) then returns a
//! [`DeferredKek`] instead of refusing the configuration. Every wrap or unwrap tries to open
//! the key until it opens (at most one attempt per [`REOPEN_AFTER`]; calls in between fail
//! at once with the last failure), and fails with [`KmsError::Unavailable`] naming the key
//! meanwhile. Configuration mistakes (a bad URI, a missing module, a wrong PIN, an unsuitable
//! key) are not deferred: they still stop the load, at start or when the key finally opens.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use super::{Dek, KeyEncryptionKey, KmsError, Provider};

/// Opens the key (blocking: module loading, login).
pub type Opener = Arc<dyn Fn() -> Result<Arc<dyn KeyEncryptionKey>, KmsError> + Send + Sync>;

/// A failed attempt to open the key is answered from memory this long.
pub const REOPEN_AFTER: Duration = Duration::from_secs(1);

/// A key opened on first use.
pub struct DeferredKek {
    key_id: String,
    provider: Provider,
    open: Opener,
    state: tokio::sync::Mutex<State>,
}

#[derive(Default)]
struct State {
    opened: Option<Arc<dyn KeyEncryptionKey>>,
    failed: Option<(Instant, KmsError)>,
}

impl fmt::Debug for DeferredKek {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DeferredKek")
            .field("key_id", &self.key_id)
            .field("provider", &self.provider.label())
            .finish_non_exhaustive()
    }
}

/// A copy of a [`KmsError`] (it is not `Clone`: it carries no source, so copying is exact).
fn copy(e: &KmsError) -> KmsError {
    match e {
        KmsError::Unavailable {
            key_id,
            provider,
            reason,
        } => KmsError::Unavailable {
            key_id: key_id.clone(),
            provider,
            reason: reason.clone(),
        },
        KmsError::Refused {
            key_id,
            provider,
            reason,
        } => KmsError::Refused {
            key_id: key_id.clone(),
            provider,
            reason: reason.clone(),
        },
        KmsError::Invalid {
            key_id,
            provider,
            reason,
        } => KmsError::Invalid {
            key_id: key_id.clone(),
            provider,
            reason: reason.clone(),
        },
        KmsError::Config { key_id, reason } => KmsError::Config {
            key_id: key_id.clone(),
            reason: reason.clone(),
        },
    }
}

impl DeferredKek {
    /// A key that `open` opens later; `first` is why it did not open now.
    pub fn new(key_id: &str, provider: Provider, open: Opener, first: KmsError) -> Self {
        Self {
            key_id: key_id.to_owned(),
            provider,
            open,
            state: tokio::sync::Mutex::new(State {
                opened: None,
                failed: Some((Instant::now(), first)),
            }),
        }
    }

    /// The opened key, opening it now unless an attempt failed within [`REOPEN_AFTER`].
    async fn key(&self) -> Result<Arc<dyn KeyEncryptionKey>, KmsError> {
        let mut state = self.state.lock().await;
        if let Some(key) = &state.opened {
            return Ok(key.clone());
        }
        if let Some((at, e)) = &state.failed
            && at.elapsed() < REOPEN_AFTER
        {
            return Err(copy(e));
        }
        let open = self.open.clone();
        let opened = match tokio::task::spawn_blocking(move || open()).await {
            Ok(result) => result,
            Err(e) => Err(KmsError::Unavailable {
                key_id: self.key_id.clone(),
                provider: self.provider.label(),
                reason: format!("opening the key failed: {e}"),
            }),
        };
        match opened {
            Ok(key) => {
                tracing::info!(key_id = %self.key_id, provider = self.provider.label(), "key service reachable: key opened");
                state.opened = Some(key.clone());
                state.failed = None;
                Ok(key)
            }
            Err(e) => {
                state.failed = Some((Instant::now(), copy(&e)));
                Err(e)
            }
        }
    }
}

#[async_trait::async_trait]
impl KeyEncryptionKey for DeferredKek {
    fn key_id(&self) -> &str {
        &self.key_id
    }

    fn provider(&self) -> Provider {
        self.provider
    }

    async fn wrap(&self, dek: &Dek, namespace: &str) -> Result<Vec<u8>, KmsError> {
        self.key().await?.wrap(dek, namespace).await
    }

    async fn unwrap(&self, wrapped: &[u8], namespace: &str) -> Result<Dek, KmsError> {
        self.key().await?.unwrap(wrapped, namespace).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

    /// A key whose service answers once `up` is set.
    #[derive(Debug)]
    struct Echo;

    #[async_trait::async_trait]
    impl KeyEncryptionKey for Echo {
        fn key_id(&self) -> &str {
            "hsm"
        }
        fn provider(&self) -> Provider {
            Provider::Pkcs11
        }
        async fn wrap(&self, dek: &Dek, _namespace: &str) -> Result<Vec<u8>, KmsError> {
            Ok(dek.expose().to_vec())
        }
        async fn unwrap(&self, wrapped: &[u8], _namespace: &str) -> Result<Dek, KmsError> {
            Dek::from_slice(wrapped).ok_or_else(|| KmsError::Invalid {
                key_id: "hsm".into(),
                provider: "pkcs11",
                reason: "length".into(),
            })
        }
    }

    fn down() -> KmsError {
        KmsError::Unavailable {
            key_id: "hsm".into(),
            provider: "pkcs11",
            reason: "no initialized token matches token=\"t\"".into(),
        }
    }

    #[tokio::test]
    async fn opens_once_the_token_is_back_and_attempts_at_most_once_per_interval() {
        let up = Arc::new(AtomicBool::new(false));
        let attempts = Arc::new(AtomicUsize::new(0));
        let (up2, attempts2) = (up.clone(), attempts.clone());
        let open: Opener = Arc::new(move || {
            attempts2.fetch_add(1, Ordering::SeqCst);
            if up2.load(Ordering::SeqCst) {
                Ok(Arc::new(Echo) as Arc<dyn KeyEncryptionKey>)
            } else {
                Err(down())
            }
        });
        let kek = DeferredKek::new("hsm", Provider::Pkcs11, open, down());
        let dek = Dek::from_slice(&[7u8; 32]).unwrap();
        // Within the interval of the failure at start: answered from memory, no attempt.
        for _ in 0..5 {
            let e = kek.wrap(&dek, "ns").await.unwrap_err();
            assert!(e.is_retryable(), "{e}");
            assert!(e.to_string().contains("\"hsm\""), "names the key: {e}");
        }
        assert_eq!(attempts.load(Ordering::SeqCst), 0);
        tokio::time::sleep(REOPEN_AFTER).await;
        assert!(kek.wrap(&dek, "ns").await.is_err());
        assert!(kek.wrap(&dek, "ns").await.is_err());
        assert_eq!(
            attempts.load(Ordering::SeqCst),
            1,
            "one attempt per interval"
        );
        up.store(true, Ordering::SeqCst);
        assert!(
            kek.wrap(&dek, "ns").await.is_err(),
            "still within the interval"
        );
        tokio::time::sleep(REOPEN_AFTER).await;
        let wrapped = kek.wrap(&dek, "ns").await.expect("opened");
        assert_eq!(
            kek.unwrap(&wrapped, "ns").await.unwrap().expose(),
            &[7u8; 32]
        );
        assert_eq!(attempts.load(Ordering::SeqCst), 2, "opened once, kept");
    }
}
