//! The per-namespace policy: what the configuration says about one namespace, resolved in
//! one place. A `[namespaces.<ns>]` setting overrides the top-level one; a namespace without a
//! section, and a request naming none, follow the top level.
//!
//! The codec (encryption, compression, forwarding, failure sealing) and the storage stage
//! (offload driver and threshold, namespaces it may read) both build their per-namespace
//! state from [`NamespacePolicy`] and look it up with [`ByNamespace::get`], so the two can
//! never disagree on which settings apply to a namespace.

use std::collections::HashMap;

use crate::config::Config;

/// What applies to one namespace, by name only (keys and drivers are looked up by the stage
/// that uses them).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NamespacePolicy {
    /// Whether new payloads are encrypted.
    pub encrypt: bool,
    /// The key that encrypts new payloads, and the setting that names it (for errors);
    /// `None`: the top-level `encryption.active_key` is unset.
    pub active_key: (String, Option<String>),
    /// Whether new payloads are compressed.
    pub compress: bool,
    /// Unknown methods forwarded untouched although encryption applies.
    pub forward_methods: Vec<String>,
    /// Unknown `Any` types forwarded untouched although encryption applies.
    pub forward_any: Vec<String>,
    /// Whether failures are sealed (only meaningful with `encrypt`).
    pub seal_failures: bool,
    /// Whether payloads at or above `storage_threshold` are offloaded.
    pub storage: bool,
    /// The driver that stores this namespace's payloads.
    pub storage_driver: String,
    /// The offload threshold, in bytes.
    pub storage_threshold: usize,
    /// Other namespaces whose offloaded payloads this one may resolve.
    pub storage_read_namespaces: Vec<String>,
}

/// A value per configured namespace plus the default for every other one (and for requests
/// that name none).
#[derive(Debug, Clone)]
pub struct ByNamespace<T> {
    default: T,
    namespaces: HashMap<String, T>,
}

impl<T> ByNamespace<T> {
    /// The value for `namespace` (`None`: a request naming none).
    pub fn get(&self, namespace: Option<&str>) -> &T {
        namespace
            .and_then(|ns| self.namespaces.get(ns))
            .unwrap_or(&self.default)
    }

    /// The default (namespaces without a section, requests naming none).
    pub fn default_value(&self) -> &T {
        &self.default
    }

    /// Every configured namespace with its value, in no particular order.
    pub fn configured(&self) -> impl Iterator<Item = (&String, &T)> {
        self.namespaces.iter()
    }

    /// The default and every configured namespace's value.
    pub fn values(&self) -> impl Iterator<Item = &T> {
        std::iter::once(&self.default).chain(self.namespaces.values())
    }

    /// Maps every value with `f` (given the namespace, `None` for the default), stopping at
    /// the first error.
    pub fn try_map<U, E>(
        &self,
        mut f: impl FnMut(Option<&str>, &T) -> Result<U, E>,
    ) -> Result<ByNamespace<U>, E> {
        let default = f(None, &self.default)?;
        let mut namespaces = HashMap::with_capacity(self.namespaces.len());
        for (name, value) in &self.namespaces {
            namespaces.insert(name.clone(), f(Some(name), value)?);
        }
        Ok(ByNamespace {
            default,
            namespaces,
        })
    }

    /// A value for the default only (no namespace configured).
    pub fn only_default(default: T) -> Self {
        Self {
            default,
            namespaces: HashMap::new(),
        }
    }
}

/// Resolves every namespace's policy from `config`: the one place where a namespace's
/// settings are merged with the top-level ones.
pub fn resolve(config: &Config) -> ByNamespace<NamespacePolicy> {
    let enc = &config.encryption;
    let sc = &config.storage;
    let default = NamespacePolicy {
        encrypt: enc.enabled,
        active_key: ("encryption.active_key".to_owned(), enc.active_key.clone()),
        compress: config.compression.enabled,
        forward_methods: enc.forward_unknown_methods.clone(),
        forward_any: enc.forward_unknown_any_types.clone(),
        seal_failures: enc.seal_failures,
        storage: sc.enabled,
        storage_driver: sc.driver.clone(),
        storage_threshold: sc.threshold,
        storage_read_namespaces: Vec::new(),
    };
    let namespaces = config
        .namespaces
        .iter()
        .map(|(name, ns)| {
            let policy = NamespacePolicy {
                encrypt: ns.encryption.unwrap_or(enc.enabled),
                active_key: match &ns.active_key {
                    Some(id) => (format!("namespaces.{name}.active_key"), Some(id.clone())),
                    None => default.active_key.clone(),
                },
                compress: ns.compression.unwrap_or(config.compression.enabled),
                forward_methods: ns
                    .forward_unknown_methods
                    .clone()
                    .unwrap_or_else(|| default.forward_methods.clone()),
                forward_any: ns
                    .forward_unknown_any_types
                    .clone()
                    .unwrap_or_else(|| default.forward_any.clone()),
                seal_failures: ns.seal_failures.unwrap_or(enc.seal_failures),
                storage: ns.storage.unwrap_or(sc.enabled),
                storage_driver: ns
                    .storage_driver
                    .clone()
                    .unwrap_or_else(|| sc.driver.clone()),
                storage_threshold: ns.storage_threshold.unwrap_or(sc.threshold),
                storage_read_namespaces: ns.storage_read_namespaces.clone(),
            };
            (name.clone(), policy)
        })
        .collect();
    ByNamespace {
        default,
        namespaces,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn namespace_settings_override_the_top_level_and_the_rest_follow_it() {
        let config = Config::from_toml(
            "[encryption]\nenabled = true\nactive_key = \"k1\"\nseal_failures = true\n\
             keys = [{ id = \"k1\", env = \"X\" }, { id = \"k2\", env = \"Y\" }]\n\
             [compression]\nenabled = false\n\
             [storage]\nenabled = true\ndriver = \"local\"\nthreshold = 1000\n\
             [[storage.drivers]]\nname = \"local\"\nkind = \"memory\"\n\
             [namespaces.a]\nactive_key = \"k2\"\ncompression = true\nstorage = false\n\
             [namespaces.b]\nencryption = false\nstorage_threshold = 5\n\
             storage_read_namespaces = [\"a\"]\n",
            Vec::new(),
        )
        .unwrap();
        let p = resolve(&config);
        let (d, a, b) = (p.get(None), p.get(Some("a")), p.get(Some("b")));
        assert_eq!(p.get(Some("unlisted")), d);
        assert!(d.encrypt && !d.compress && d.storage && d.seal_failures);
        assert_eq!(d.active_key.1.as_deref(), Some("k1"));
        assert_eq!(
            a.active_key,
            ("namespaces.a.active_key".to_owned(), Some("k2".to_owned()))
        );
        assert!(a.encrypt && a.compress && !a.storage);
        assert!(!b.encrypt && b.storage && !b.compress);
        assert_eq!((b.storage_threshold, d.storage_threshold), (5, 1000));
        assert_eq!(b.storage_read_namespaces, ["a"]);
        assert_eq!(b.storage_driver, "local");
    }
}
