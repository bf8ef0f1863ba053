//! Random 96-bit AES-GCM nonces.
//!
//! AWS-LC's generator is fast once seeded, but it seeds itself (CPU-jitter entropy) on first
//! use, which took 35–90 ms here: long enough to hold up the first encrypting RPC after start.
//! [`NonceSource::new`] seeds it on a thread of its own; until that is done, nonces come
//! straight from the kernel (`getrandom` through `ring`), which is ready at once and costs one
//! system call per nonce. Both are the operating system's CSPRNG or seeded from it, so the
//! random-nonce bound (NIST SP 800-38D §8.3, see the module docs) holds across the switch.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use aws_lc_rs::aead::NONCE_LEN;
use aws_lc_rs::rand::{SecureRandom, SystemRandom};

use super::CodecError;

/// Where nonces come from: AWS-LC's generator once it is seeded, the kernel until then.
#[derive(Debug)]
pub(crate) struct NonceSource {
    seeded_rng: SystemRandom,
    kernel: ring::rand::SystemRandom,
    seeded: Arc<AtomicBool>,
}

impl NonceSource {
    /// Starts seeding AWS-LC's generator in the background.
    pub(crate) fn new() -> Self {
        let seeded = Arc::new(AtomicBool::new(false));
        let done = seeded.clone();
        let spawned = std::thread::Builder::new()
            .name("pgw-rng-seed".into())
            .spawn(move || {
                if SystemRandom::new().fill(&mut [0u8; NONCE_LEN]).is_ok() {
                    done.store(true, Ordering::Release);
                }
            });
        if spawned.is_err() {
            tracing::warn!("cannot start the RNG seeding thread: nonces come from getrandom");
        }
        Self {
            seeded_rng: SystemRandom::new(),
            kernel: ring::rand::SystemRandom::new(),
            seeded,
        }
    }

    /// A fresh random nonce.
    pub(crate) fn nonce(&self) -> Result<[u8; NONCE_LEN], CodecError> {
        let mut nonce = [0u8; NONCE_LEN];
        let filled = if self.seeded.load(Ordering::Acquire) {
            self.seeded_rng.fill(&mut nonce).is_ok()
        } else {
            ring::rand::SecureRandom::fill(&self.kernel, &mut nonce).is_ok()
        };
        if filled {
            Ok(nonce)
        } else {
            Err(CodecError::Random)
        }
    }

    /// Whether nonces come from AWS-LC's (seeded) generator yet.
    #[cfg(test)]
    pub(crate) fn is_seeded(&self) -> bool {
        self.seeded.load(Ordering::Acquire)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;
    use std::time::{Duration, Instant};

    #[test]
    fn nonces_are_distinct_before_and_after_seeding() {
        let source = NonceSource::new();
        let mut seen = HashSet::new();
        for _ in 0..1000 {
            assert!(seen.insert(source.nonce().unwrap()));
        }
        let deadline = Instant::now() + Duration::from_secs(30);
        while !source.is_seeded() {
            assert!(
                Instant::now() < deadline,
                "AWS-LC's generator never finished seeding"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
        for _ in 0..1000 {
            assert!(seen.insert(source.nonce().unwrap()));
        }
    }
}
