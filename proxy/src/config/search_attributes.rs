//! `[search_attributes]` and `[namespaces.<ns>.search_attributes]`: search attributes the
//! gateway keeps searchable but never readable at the server (`crate::search_attributes`).

use serde::{Deserialize, Serialize};

use super::{Config, ConfigError};

/// Protected search attributes: their values reach the server only as keyed tokens.
#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct SearchAttributesConfig {
    /// Names of `Keyword` or `KeywordList` search attributes to protect (case-sensitive, as
    /// registered at the server). At the top level: every namespace without its own list; in
    /// `[namespaces.<ns>.search_attributes]`: that namespace's list instead (`[]`: none).
    pub protect: Vec<String>,
}

impl Config {
    /// The search attributes protected in `namespace` (`None`: requests naming no namespace,
    /// which follow the top level).
    pub fn protected_search_attributes(&self, namespace: Option<&str>) -> &[String] {
        namespace
            .and_then(|ns| self.namespaces.get(ns))
            .and_then(|ns| ns.search_attributes.as_ref())
            .unwrap_or(&self.search_attributes)
            .protect
            .as_slice()
    }

    /// Whether any namespace (or the top level) protects a search attribute.
    pub fn protects_search_attributes(&self) -> bool {
        !self.search_attributes.protect.is_empty()
            || self
                .namespaces
                .values()
                .filter_map(|ns| ns.search_attributes.as_ref())
                .any(|sa| !sa.protect.is_empty())
    }
}

/// Names must be usable in a visibility query: letters, digits and `_`, not starting with a
/// digit, no duplicates.
pub(crate) fn validate(config: &Config) -> Result<(), ConfigError> {
    let lists = std::iter::once((
        "search_attributes.protect".to_owned(),
        &config.search_attributes,
    ))
    .chain(config.namespaces.iter().filter_map(|(name, ns)| {
        ns.search_attributes
            .as_ref()
            .map(|sa| (format!("namespaces.{name}.search_attributes.protect"), sa))
    }));
    for (key, list) in lists {
        for (i, name) in list.protect.iter().enumerate() {
            let valid = name
                .chars()
                .next()
                .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
                && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
            if !valid {
                return Err(ConfigError::invalid(
                    format!("{key}[{i}]"),
                    format!(
                        "{name:?} is not a search attribute name (letters, digits and `_`, \
                         not starting with a digit)"
                    ),
                ));
            }
            if list.protect[..i].contains(name) {
                return Err(ConfigError::invalid(
                    format!("{key}[{i}]"),
                    format!("{name:?} is listed twice"),
                ));
            }
        }
    }
    Ok(())
}
