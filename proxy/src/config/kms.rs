//! `[kms_servers.<name>]`: external gRPC key services (`KMSService`) that hold key-encryption
//! keys. A key names one with `kms = "grpc://<name>"`.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::{ConfigError, validate_host_port};

/// One `[kms_servers.<name>]` table.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct KmsServerConfig {
    /// `host:port` of the service.
    pub address: String,
    /// TLS to the service (default on). Off is accepted only for a loopback address (a
    /// sidecar in the same host or pod), since wrap and unwrap carry data keys in the clear.
    #[serde(default = "default_true")]
    pub tls: bool,
    /// CA certificates (PEM) that verify the service; the platform's trust store when unset.
    pub ca_file: Option<PathBuf>,
    /// Client certificate chain (PEM) for mTLS; needs `key_file`.
    pub cert_file: Option<PathBuf>,
    /// Private key (PEM) of `cert_file`.
    pub key_file: Option<PathBuf>,
    /// Name verified in the service's certificate and sent as SNI; the host of `address`
    /// when unset.
    pub server_name: Option<String>,
    /// Bound on one Encrypt or Decrypt call, connecting included (milliseconds).
    #[serde(default = "default_timeout_ms")]
    pub timeout_ms: u64,
    /// Bound on opening a connection (TCP and TLS handshake, milliseconds).
    #[serde(default = "default_connect_timeout_ms")]
    pub connect_timeout_ms: u64,
}

fn default_true() -> bool {
    true
}

fn default_timeout_ms() -> u64 {
    5_000
}

fn default_connect_timeout_ms() -> u64 {
    2_000
}

impl KmsServerConfig {
    /// A server at `address` with the defaults (TLS on, platform roots, 5 s calls).
    pub fn new(address: impl Into<String>) -> Self {
        Self {
            address: address.into(),
            tls: true,
            ca_file: None,
            cert_file: None,
            key_file: None,
            server_name: None,
            timeout_ms: default_timeout_ms(),
            connect_timeout_ms: default_connect_timeout_ms(),
        }
    }

    /// The host part of `address`, brackets of an IPv6 literal removed.
    pub fn host(&self) -> &str {
        let host = self
            .address
            .rsplit_once(':')
            .map_or(self.address.as_str(), |(host, _)| host);
        host.trim_start_matches('[').trim_end_matches(']')
    }

    /// Checks one server; `name` is its table name.
    pub fn validate(&self, name: &str) -> Result<(), ConfigError> {
        let key = |field: &str| format!("kms_servers.{name}.{field}");
        if name.is_empty()
            || !name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        {
            return Err(ConfigError::invalid(
                format!("kms_servers.{name}"),
                "server names use letters, digits, '-' and '_' (they appear in grpc://<name>)",
            ));
        }
        validate_host_port(&key("address"), &self.address)?;
        if self.cert_file.is_some() != self.key_file.is_some() {
            return Err(ConfigError::invalid(
                key("cert_file"),
                "cert_file and key_file go together (the client certificate for mTLS)",
            ));
        }
        if !self.tls {
            if let Some(field) = [
                ("ca_file", self.ca_file.is_some()),
                ("cert_file", self.cert_file.is_some()),
                ("server_name", self.server_name.is_some()),
            ]
            .iter()
            .find_map(|(field, set)| set.then_some(*field))
            {
                return Err(ConfigError::invalid(
                    key(field),
                    "is a TLS setting but tls = false",
                ));
            }
            if !is_loopback(self.host()) {
                return Err(ConfigError::invalid(
                    key("tls"),
                    format!(
                        "tls = false is only allowed for a loopback address (data keys travel \
                         in the clear), not {:?}",
                        self.host()
                    ),
                ));
            }
        }
        for (field, ms) in [
            ("timeout_ms", self.timeout_ms),
            ("connect_timeout_ms", self.connect_timeout_ms),
        ] {
            if !(1..=600_000).contains(&ms) {
                return Err(ConfigError::invalid(key(field), "must be 1..=600000"));
            }
        }
        Ok(())
    }
}

/// Checks every `[kms_servers.<name>]` table.
pub fn validate_kms_servers(
    servers: &BTreeMap<String, KmsServerConfig>,
) -> Result<(), ConfigError> {
    servers
        .iter()
        .try_for_each(|(name, server)| server.validate(name))
}

fn is_loopback(host: &str) -> bool {
    host.eq_ignore_ascii_case("localhost")
        || host.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

#[cfg(test)]
mod tests {
    use super::super::Config;

    fn parse(text: &str) -> Result<Config, String> {
        Config::from_toml(text, Vec::new()).map_err(|e| e.to_string())
    }

    #[test]
    fn parses_a_server_with_defaults() {
        let c = parse("[kms_servers.vault]\naddress = \"kms.internal:8443\"\n").unwrap();
        let s = &c.kms_servers["vault"];
        assert!(s.tls);
        assert_eq!(s.timeout_ms, 5000);
        assert_eq!(s.connect_timeout_ms, 2000);
        assert_eq!(s.host(), "kms.internal");
    }

    #[test]
    fn refuses_unusable_servers_naming_the_key() {
        for (text, needle) in [
            ("[kms_servers.a]\n", "address"),
            (
                "[kms_servers.a]\naddress = \"nohost\"\n",
                "kms_servers.a.address",
            ),
            (
                "[kms_servers.a]\naddress = \"h:1\"\nadress = \"x\"\n",
                "adress",
            ),
            (
                "[kms_servers.a]\naddress = \"h:1\"\ncert_file = \"c.pem\"\n",
                "kms_servers.a.cert_file",
            ),
            (
                "[kms_servers.a]\naddress = \"10.0.0.1:1\"\ntls = false\n",
                "only allowed for a loopback",
            ),
            (
                "[kms_servers.a]\naddress = \"127.0.0.1:1\"\ntls = false\nca_file = \"c\"\n",
                "kms_servers.a.ca_file",
            ),
            (
                "[kms_servers.a]\naddress = \"h:1\"\ntimeout_ms = 0\n",
                "kms_servers.a.timeout_ms",
            ),
            ("[kms_servers.\"a b\"]\naddress = \"h:1\"\n", "server names"),
        ] {
            let err = parse(text).unwrap_err();
            assert!(err.contains(needle), "{text}: {err}");
        }
    }

    #[test]
    fn plaintext_is_allowed_on_loopback_only() {
        for address in ["127.0.0.1:7300", "[::1]:7300", "localhost:7300"] {
            parse(&format!(
                "[kms_servers.side]\naddress = \"{address}\"\ntls = false\n"
            ))
            .unwrap();
        }
    }
}
