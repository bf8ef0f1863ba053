//! Configuration: a TOML file, `PGW__SECTION__KEY` environment overrides, embedded defaults.
//!
//! Loading is strict: an unknown key, an invalid address or a section that this build does not
//! support is refused with a [`ConfigError`] naming the key, so a typo never silently weakens
//! what the operator asked for.

mod auth;
mod codec_server;
mod encryption;
mod kms;
mod proxy;
mod search_attributes;
mod storage;
#[cfg(test)]
mod tests;
mod upstreams;

pub use auth::{ALL_NAMESPACES, AuthConfig, AuthJwtConfig, AuthTokenConfig, ClientCertConfig};
pub(crate) use codec_server::split_authority;
pub use codec_server::{CodecServerConfig, CodecTokenConfig, HostPattern};
pub use encryption::{CompressionConfig, EncryptionConfig, KeySpec, NamespaceConfig};
pub use kms::KmsServerConfig;
pub use proxy::{
    AdminConfig, LogConfig, LogFormat, ProxyConfig, ServerTlsConfig, UpstreamTlsConfig,
};
pub use search_attributes::SearchAttributesConfig;
pub use storage::{DriverConfig, DriverKind, ServerLimitsConfig, StorageConfig};
pub use upstreams::{UpstreamConfig, bindings as upstream_bindings};

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// Prefix of environment variables that override configuration keys.
///
/// `PGW__PROXY__UPSTREAM=10.0.0.1:7233` sets `proxy.upstream`; each `__` descends one table.
/// Values are parsed as TOML literals when they parse (`true`, `42`, `["a"]`), else taken as
/// strings.
pub const ENV_PREFIX: &str = "PGW__";

/// The whole gateway configuration.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// The gRPC listener SDKs connect to and the upstream Temporal frontend.
    pub proxy: ProxyConfig,
    /// The remote codec HTTP endpoint for the Web UI and CLI.
    pub codec_server: CodecServerConfig,
    /// Metrics and health endpoints.
    pub admin: AdminConfig,
    /// Payload encryption (AES-256-GCM).
    pub encryption: EncryptionConfig,
    /// Payload compression (zstd).
    pub compression: CompressionConfig,
    /// Offload of large payloads to object storage.
    pub storage: StorageConfig,
    /// Per-namespace overrides, keyed by namespace name.
    pub namespaces: BTreeMap<String, NamespaceConfig>,
    /// Logging.
    pub log: LogConfig,
    /// External gRPC key services (`kms = "grpc://<name>"` keys), keyed by name.
    pub kms_servers: BTreeMap<String, KmsServerConfig>,
    /// Temporal frontends beside `proxy.upstream`, keyed by name; namespaces are bound to
    /// them with `[namespaces.<ns>] upstream`.
    pub upstreams: BTreeMap<String, UpstreamConfig>,
    /// Search attributes kept searchable but never readable at the server.
    pub search_attributes: SearchAttributesConfig,
}

/// Why a configuration was refused.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config file {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The TOML is malformed, a key is unknown or a value has the wrong type.
    #[error("{0}")]
    Parse(String),
    /// A key holds a value that is well-typed but unusable.
    #[error("{key}: {problem}")]
    Invalid {
        /// Dotted key, e.g. `encryption.keys[0].file`.
        key: String,
        /// What is wrong with it.
        problem: String,
    },
}

impl ConfigError {
    pub(crate) fn invalid(key: impl Into<String>, problem: impl Into<String>) -> Self {
        Self::Invalid {
            key: key.into(),
            problem: problem.into(),
        }
    }
}

/// Checks one `storage.drivers` entry (its index and settings) beyond what serde checks: the
/// kind-specific settings, which the storage layer knows (`storage::check_driver`).
pub type DriverCheck<'a> = &'a dyn Fn(usize, &DriverConfig) -> Result<(), ConfigError>;

impl Config {
    /// Loads `path` (or the embedded defaults when `None`) and applies environment overrides.
    pub fn load(path: Option<&Path>) -> Result<Self, ConfigError> {
        Self::load_checked(path, &|_, _| Ok(()))
    }

    /// [`Config::load`], with `check_driver` run on every `storage.drivers` entry during
    /// validation (where the entry's kind-specific settings are checked; supplied by the
    /// storage layer, which config does not depend on: `app::load_config`).
    pub fn load_checked(
        path: Option<&Path>,
        check_driver: DriverCheck<'_>,
    ) -> Result<Self, ConfigError> {
        let text = match path {
            Some(path) => std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
                path: path.to_owned(),
                source,
            })?,
            None => String::new(),
        };
        Self::from_toml_checked(&text, std::env::vars(), check_driver)
    }

    /// Parses TOML text, applies `PGW__...` overrides from `env`, and validates the result.
    pub fn from_toml(
        text: &str,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Self, ConfigError> {
        Self::from_toml_checked(text, env, &|_, _| Ok(()))
    }

    /// [`Config::from_toml`], with `check_driver` run on every `storage.drivers` entry during
    /// validation (see [`Config::load_checked`]).
    pub fn from_toml_checked(
        text: &str,
        env: impl IntoIterator<Item = (String, String)>,
        check_driver: DriverCheck<'_>,
    ) -> Result<Self, ConfigError> {
        let mut table: toml::Table = text
            .parse()
            .map_err(|e: toml::de::Error| ConfigError::Parse(describe_toml_error(&e)))?;
        apply_env_overrides(&mut table, env)?;
        let config: Config = toml::Value::Table(table)
            .try_into()
            .map_err(|e: toml::de::Error| ConfigError::Parse(describe_toml_error(&e)))?;
        config.validate(check_driver)?;
        Ok(config)
    }

    /// Checks what serde cannot: cross-references and values that must be usable.
    fn validate(&self, check_driver: DriverCheck<'_>) -> Result<(), ConfigError> {
        validate_host_port("proxy.upstream", &self.proxy.upstream)?;
        self.codec_server.validate()?;
        self.proxy.tls.validate()?;
        self.proxy.upstream_tls.validate()?;
        kms::validate_kms_servers(&self.kms_servers)?;
        search_attributes::validate(self)?;
        if matches!(&self.proxy.api_key_env, Some(v) if v.is_empty()) {
            return Err(ConfigError::invalid(
                "proxy.api_key_env",
                "must name an environment variable",
            ));
        }
        upstreams::validate(self)?;
        if let Some(auth) = &self.proxy.auth {
            auth.validate(self.proxy.tls.client_ca_file.is_some())?;
        } else if let Some(api_key) = upstreams::api_key_keys(self).next()
            && !self.proxy.listen.ip().is_loopback()
            && !self.proxy.allow_unauthenticated
        {
            return Err(ConfigError::invalid(
                "proxy.auth",
                format!(
                    "required: {api_key} is set and proxy.listen ({}) is not a loopback \
                     address, so anyone who reaches the listener would call the upstream with \
                     the API key and get payloads decrypted; configure [proxy.auth] (or set \
                     proxy.allow_unauthenticated = true when a network policy restricts who \
                     reaches the listener)",
                    self.proxy.listen
                ),
            ));
        }
        if self.proxy.max_connection_age_ms > 0 && self.proxy.max_connection_age_grace_ms == 0 {
            return Err(ConfigError::invalid(
                "proxy.max_connection_age_grace_ms",
                "must be greater than 0 with proxy.max_connection_age_ms (RPCs in flight need \
                 time to finish after the GOAWAY)",
            ));
        }
        if self.proxy.max_message_bytes < 4 * 1024 * 1024 {
            return Err(ConfigError::invalid(
                "proxy.max_message_bytes",
                "must be at least 4194304 (Temporal's own gRPC limit)",
            ));
        }
        // A message of at most this size plus inflations of at most this size always fits
        // gRPC's 4-byte length prefix after rewriting.
        if self.proxy.max_message_bytes > 2 * 1024 * 1024 * 1024 - 1 {
            return Err(ConfigError::invalid(
                "proxy.max_message_bytes",
                "must be below 2 GiB (2147483648), so that a rewritten message (the message \
                 plus what it may inflate to) always fits gRPC's 4-byte length prefix",
            ));
        }
        let key_ids: Vec<&str> = self.encryption.keys.iter().map(|k| k.id.as_str()).collect();
        for (i, key) in self.encryption.keys.iter().enumerate() {
            let name = format!("encryption.keys[{i}]");
            if key.id.is_empty() {
                return Err(ConfigError::invalid(
                    format!("{name}.id"),
                    "must not be empty",
                ));
            }
            if key_ids.iter().filter(|id| **id == key.id).count() > 1 {
                return Err(ConfigError::invalid(
                    format!("{name}.id"),
                    format!("duplicate key id {:?}", key.id),
                ));
            }
        }
        self.encryption.validate_envelope()?;
        let check_key_ref = |key: &str, id: &Option<String>| match id {
            Some(id) if !key_ids.contains(&id.as_str()) => Err(ConfigError::invalid(
                key,
                format!("names key {id:?}, which is not in encryption.keys"),
            )),
            _ => Ok(()),
        };
        check_key_ref("encryption.active_key", &self.encryption.active_key)?;
        let check_key_list = |key: &str, ids: &Option<Vec<String>>| {
            for (i, id) in ids.iter().flatten().enumerate() {
                check_key_ref(&format!("{key}[{i}]"), &Some(id.clone()))?;
            }
            Ok::<(), ConfigError>(())
        };
        check_key_list("encryption.decrypt_keys", &self.encryption.decrypt_keys)?;
        if self.encryption.active_key.is_none() && !self.encryption.keys.is_empty() {
            return Err(ConfigError::invalid(
                "encryption.active_key",
                "required when encryption.keys is set",
            ));
        }
        if !(1..=22).contains(&self.compression.level) {
            return Err(ConfigError::invalid("compression.level", "must be 1..=22"));
        }
        let driver_names: Vec<&str> = self
            .storage
            .drivers
            .iter()
            .map(|d| d.name.as_str())
            .collect();
        if self.storage.concurrency == 0 {
            return Err(ConfigError::invalid(
                "storage.concurrency",
                "must be at least 1",
            ));
        }
        let limits = &self.storage.server_limits;
        // A limit smaller than a reference could not be kept by offloading.
        for (key, value) in [
            ("max_message_bytes", Some(limits.max_message_bytes)),
            ("blob_size_bytes", limits.blob_size_bytes),
            ("memo_size_bytes", limits.memo_size_bytes),
            (
                "workflow_task_completion_bytes",
                limits.workflow_task_completion_bytes,
            ),
        ] {
            if value.is_some_and(|v| v < 64 * 1024) {
                return Err(ConfigError::invalid(
                    format!("storage.server_limits.{key}"),
                    "must be at least 65536 (64 KiB)",
                ));
            }
        }
        for (i, d) in self.storage.drivers.iter().enumerate() {
            check_driver(i, d)?;
            if driver_names.iter().filter(|n| **n == d.name).count() > 1 {
                return Err(ConfigError::invalid(
                    format!("storage.drivers[{i}].name"),
                    format!("duplicate driver name {:?}", d.name),
                ));
            }
        }
        let check_driver_ref = |key: &str, name: &str| {
            if driver_names.contains(&name) {
                Ok(())
            } else {
                Err(ConfigError::invalid(
                    key,
                    format!("names driver {name:?}, which is not in storage.drivers"),
                ))
            }
        };
        if self.storage.enabled || self.namespaces.values().any(|n| n.storage == Some(true)) {
            check_driver_ref("storage.driver", &self.storage.driver)?;
        }
        for (ns, over) in &self.namespaces {
            check_key_ref(&format!("namespaces.{ns}.active_key"), &over.active_key)?;
            check_key_list(&format!("namespaces.{ns}.decrypt_keys"), &over.decrypt_keys)?;
            if let Some(driver) = &over.storage_driver {
                check_driver_ref(&format!("namespaces.{ns}.storage_driver"), driver)?;
            }
        }
        Ok(())
    }
}

/// Accepts `host:port` with a non-empty host and a numeric port.
fn validate_host_port(key: &str, value: &str) -> Result<(), ConfigError> {
    let bad = || {
        ConfigError::invalid(
            key,
            format!("invalid address {value:?}, expected host:port"),
        )
    };
    let (host, port) = value.rsplit_once(':').ok_or_else(bad)?;
    if host.is_empty() || host.contains('/') || port.parse::<u16>().is_err() {
        return Err(bad());
    }
    Ok(())
}

/// Renders a TOML error so it names the key: syntax errors show the line; type errors (found
/// while mapping the parsed table onto [`Config`]) end with "in `section.key`", kept on one line.
fn describe_toml_error(e: &toml::de::Error) -> String {
    let text = e.to_string();
    if e.span().is_some() {
        text.trim_end().to_owned()
    } else {
        text.split_whitespace().collect::<Vec<_>>().join(" ")
    }
}

/// Applies `PGW__A__B=value` as `a.b = value`.
fn apply_env_overrides(
    table: &mut toml::Table,
    env: impl IntoIterator<Item = (String, String)>,
) -> Result<(), ConfigError> {
    let mut overrides: Vec<(String, String)> = env
        .into_iter()
        .filter(|(k, _)| k.starts_with(ENV_PREFIX))
        .collect();
    overrides.sort();
    for (name, raw) in overrides {
        let path: Vec<String> = name[ENV_PREFIX.len()..]
            .split("__")
            .map(str::to_ascii_lowercase)
            .collect();
        if path.iter().any(String::is_empty) {
            return Err(ConfigError::invalid(
                name,
                "malformed override variable name",
            ));
        }
        let value = parse_env_value(&raw);
        let (last, parents) = path.split_last().expect("split yields at least one part");
        let mut cursor = &mut *table;
        for part in parents {
            let entry = cursor
                .entry(part.clone())
                .or_insert_with(|| toml::Value::Table(toml::Table::new()));
            cursor = entry
                .as_table_mut()
                .ok_or_else(|| ConfigError::invalid(&name, format!("`{part}` is not a table")))?;
        }
        cursor.insert(last.clone(), value);
    }
    Ok(())
}

/// `true`, `42`, `["a","b"]` parse as TOML; anything else is a string.
fn parse_env_value(raw: &str) -> toml::Value {
    format!("v = {raw}")
        .parse::<toml::Table>()
        .ok()
        .and_then(|mut t| t.remove("v"))
        .unwrap_or_else(|| toml::Value::String(raw.to_owned()))
}
