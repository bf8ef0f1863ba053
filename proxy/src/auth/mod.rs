//! Who may call the gateway, for which namespaces.
//!
//! - [`jwks`]: JWKS (file or https URL) and JWT validation, shared by the codec endpoint and
//!   the gRPC listener.
//! - [`tokens`]: static bearer tokens.
//! - [`client_cert`]: identities of verified client certificates.
//! - [`namespace_ids`]: namespace ids as the server knows them, for task tokens.
//! - [`layer`]: `[proxy.auth]`, the tower layers around the ingress ([`crate::ingress`]),
//!   in front of everything that reaches the upstream.

pub mod client_cert;
pub mod jwks;
pub mod layer;
pub mod namespace_ids;
pub mod tokens;

use std::collections::BTreeSet;

pub use layer::{AuthLayer, Authorizer};

use crate::config::ALL_NAMESPACES;

/// What an authenticated caller may act on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Grant {
    /// Every namespace, and the methods that name none.
    All,
    /// Only these namespaces.
    Namespaces(BTreeSet<String>),
}

impl Grant {
    /// The grant of a configured namespace list: `"*"` anywhere grants all.
    pub fn from_list<S: AsRef<str>>(names: &[S]) -> Self {
        if names.iter().any(|n| n.as_ref() == ALL_NAMESPACES) {
            Grant::All
        } else {
            Grant::Namespaces(names.iter().map(|n| n.as_ref().to_owned()).collect())
        }
    }

    /// Whether `namespace` is granted.
    pub fn permits(&self, namespace: &str) -> bool {
        match self {
            Grant::All => true,
            Grant::Namespaces(set) => set.contains(namespace),
        }
    }

    /// What both grants allow together.
    pub fn union(self, other: Grant) -> Grant {
        match (self, other) {
            (Grant::All, _) | (_, Grant::All) => Grant::All,
            (Grant::Namespaces(mut a), Grant::Namespaces(b)) => {
                a.extend(b);
                Grant::Namespaces(a)
            }
        }
    }
}

/// Reads the namespaces a JWT grants from `claim`: an array of strings, or one string of
/// names separated by spaces or commas; `"*"` grants all. `Err`: the claim is missing or of
/// another type (the message names the claim).
pub fn grant_from_claim(claims: &serde_json::Value, claim: &str) -> Result<Grant, String> {
    let names: Vec<String> = match claims.get(claim) {
        Some(serde_json::Value::String(s)) => s
            .split([' ', ','])
            .filter(|n| !n.is_empty())
            .map(str::to_owned)
            .collect(),
        Some(serde_json::Value::Array(items)) => items
            .iter()
            .filter_map(|v| v.as_str().map(str::to_owned))
            .collect(),
        _ => return Err(format!("the JWT has no {claim:?} claim listing namespaces")),
    };
    Ok(Grant::from_list(&names))
}

#[cfg(test)]
mod tests;
