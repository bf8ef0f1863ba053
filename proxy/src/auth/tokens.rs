//! Static bearer tokens read from environment variables, each with a [`Grant`].
//!
//! Tokens are kept as SHA-256 digests and compared in constant time: the presented token is
//! hashed and compared with every configured digest by a fold over all bytes, without an
//! early exit, so neither the position nor the length of a near miss shows in the timing.

use sha2::{Digest, Sha256};

use super::Grant;
use crate::config::ConfigError;

struct Entry {
    digest: [u8; 32],
    grant: Grant,
}

/// Configured static tokens.
#[derive(Default)]
pub struct TokenSet {
    entries: Vec<Entry>,
}

impl std::fmt::Debug for TokenSet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenSet")
            .field("tokens", &self.entries.len())
            .finish()
    }
}

fn sha256(bytes: &[u8]) -> [u8; 32] {
    Sha256::digest(bytes).into()
}

fn constant_time_eq(a: &[u8; 32], b: &[u8; 32]) -> bool {
    let diff = a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y));
    std::hint::black_box(diff) == 0
}

impl TokenSet {
    /// Adds the comma-separated tokens held by environment variable `var` (looked up with
    /// `env`) with `grant`; `key` names the setting in the error when the variable is unset or
    /// holds no token.
    pub fn add_from_env(
        &mut self,
        key: &str,
        var: &str,
        grant: Grant,
        env: &impl Fn(&str) -> Option<String>,
    ) -> Result<(), ConfigError> {
        let value = env(var).unwrap_or_default();
        let before = self.entries.len();
        for token in value.split(',').map(str::trim).filter(|t| !t.is_empty()) {
            self.entries.push(Entry {
                digest: sha256(token.as_bytes()),
                grant: grant.clone(),
            });
        }
        if self.entries.len() == before {
            return Err(ConfigError::invalid(
                key,
                format!("environment variable {var} is unset or holds no token"),
            ));
        }
        Ok(())
    }

    /// Whether no token is configured.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The grant of `token`, comparing it with every configured token.
    pub fn find(&self, token: &str) -> Option<Grant> {
        let digest = sha256(token.as_bytes());
        let mut found: Option<&Grant> = None;
        for e in &self.entries {
            // No early exit: every configured token is compared.
            if constant_time_eq(&e.digest, &digest) && found.is_none() {
                found = Some(&e.grant);
            }
        }
        found.cloned()
    }
}

/// The token of an `authorization` header value: `Bearer <t>` or the raw `<t>`; `None` when
/// empty. `Err` when the value is not UTF-8.
pub fn bearer(value: &[u8]) -> Result<Option<&str>, &'static str> {
    let raw = std::str::from_utf8(value)
        .map_err(|_| "the authorization header is not UTF-8")?
        .trim();
    let token = match raw.split_once(' ') {
        Some((scheme, rest)) if scheme.eq_ignore_ascii_case("bearer") => rest.trim(),
        _ => raw,
    };
    Ok((!token.is_empty()).then_some(token))
}
