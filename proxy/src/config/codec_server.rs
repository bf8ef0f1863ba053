//! `[codec_server]`: the remote codec HTTP endpoint.

use std::net::SocketAddr;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::{ConfigError, ServerTlsConfig};

/// `[codec_server]`: the remote codec endpoint the Temporal Web UI and `temporal` CLI call
/// (`POST /encode`, `/decode`, `/download`, also under `/{namespace}/...`).
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct CodecServerConfig {
    /// Whether the endpoint runs.
    pub enabled: bool,
    /// Address the HTTP listener binds.
    pub listen: SocketAddr,
    /// Browser origins allowed to call the endpoint (CORS allowlist), exactly as the browser
    /// sends them: `scheme://host[:port]`, no path, no trailing slash. Other origins get no
    /// `Access-Control-Allow-*` headers.
    pub cors_origins: Vec<String>,
    /// Environment variable holding comma-separated bearer tokens accepted for every namespace.
    /// When set, the variable must exist and hold at least one token (refused at start
    /// otherwise). Clients send `Authorization: Bearer <token>` or the raw `<token>` (what the
    /// `temporal` CLI's `--codec-auth` sends).
    pub bearer_tokens_env: Option<String>,
    /// Tokens limited to some namespaces: `[[codec_server.tokens]] env = "VAR", namespaces =
    /// ["a", "b"]`; the variable holds comma-separated tokens that may only be used for those
    /// namespaces (a request must name its namespace in the path or `X-Namespace`).
    pub tokens: Vec<CodecTokenConfig>,
    /// A JWKS file (`{"keys": [...]}`): bearer JWTs signed by one of its keys (RSA, EC or
    /// Ed25519; matched by `kid`) with the configured issuer and audience are accepted.
    pub jwks_file: Option<PathBuf>,
    /// An `https://` URL serving the JWKS (instead of `jwks_file`), fetched in the background
    /// every 5 minutes and on a token with an unknown `kid` (at most every 30 seconds); the
    /// last good set is kept while the URL fails.
    pub jwks_url: Option<String>,
    /// PEM CA certificates the `jwks_url` server is verified against, instead of the
    /// platform's trust store.
    pub jwks_ca_file: Option<PathBuf>,
    /// Required `iss` of accepted JWTs (required with `jwks_file`).
    pub jwt_issuer: Option<String>,
    /// Required `aud` of accepted JWTs (required with `jwks_file`).
    pub jwt_audience: Option<String>,
    /// Optional claim limiting a JWT to namespaces: a string (names separated by spaces or
    /// commas) or an array of strings; `*` allows all. When set, a JWT without it is refused.
    /// Unset: accepted JWTs may be used for every namespace.
    pub jwt_namespaces_claim: Option<String>,
    /// Largest request body accepted, in bytes (larger: 413).
    pub max_body_bytes: usize,
    /// Most payloads accepted in one request (more: 413).
    pub max_payloads: usize,
    /// Time allowed for reading a request and answering it, in milliseconds (reading too
    /// slowly: 408; encoding/decoding too slowly: 504).
    pub request_timeout_ms: u64,
    /// Most connections held open at once (as `proxy.max_connections`). `0`: no cap.
    pub max_connections: usize,
    /// Host names (and addresses) requests may be addressed to: the HTTP/1 `Host` header or
    /// the HTTP/2 `:authority` must match one (other hosts: 421), which stops DNS rebinding
    /// from turning a web page into a caller. `name` matches any port, `name:port` only that
    /// port; IPv6 addresses in brackets (`[::1]`); `*` allows any host. The `listen` address
    /// is always allowed as well.
    pub allowed_hosts: Vec<String>,
    /// Most bytes the payloads of one request may decode to, in total (more: 413). Payloads
    /// are decoded one after the other and a compressed payload may only inflate to what is
    /// left of this budget.
    pub max_decoded_bytes: usize,
    /// `[codec_server.tls]`: HTTPS on the endpoint (ALPN `h2` and `http/1.1`), off unless
    /// `cert_file` is set. Same keys as `[proxy.tls]`: `cert_file`, `key_file`,
    /// `client_ca_file`, `require_client_cert`, `handshake_timeout_ms`. The Web UI passes
    /// its access token ("pass access token") only to an `https://` endpoint.
    pub tls: ServerTlsConfig,
}

/// One `[[codec_server.tokens]]` entry: tokens valid only for some namespaces.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct CodecTokenConfig {
    /// Environment variable holding the comma-separated tokens.
    pub env: String,
    /// The namespaces these tokens may encode and decode for (at least one).
    pub namespaces: Vec<String>,
}

impl Default for CodecServerConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            listen: SocketAddr::from(([127, 0, 0, 1], 8081)),
            cors_origins: vec![
                "http://localhost:8233".to_owned(),
                "http://127.0.0.1:8233".to_owned(),
            ],
            bearer_tokens_env: None,
            tokens: Vec::new(),
            jwks_file: None,
            jwks_url: None,
            jwks_ca_file: None,
            jwt_issuer: None,
            jwt_audience: None,
            jwt_namespaces_claim: None,
            max_body_bytes: 32 * 1024 * 1024,
            max_payloads: 1_000,
            request_timeout_ms: 30_000,
            max_connections: 1_024,
            allowed_hosts: vec![
                "localhost".to_owned(),
                "127.0.0.1".to_owned(),
                "[::1]".to_owned(),
            ],
            max_decoded_bytes: 128 * 1024 * 1024,
            tls: ServerTlsConfig::default(),
        }
    }
}

impl CodecServerConfig {
    /// Checks what serde cannot (origins, limits, JWT settings); files and environment
    /// variables are read when the server is built.
    pub(super) fn validate(&self) -> Result<(), ConfigError> {
        self.tls.validate_section("codec_server.tls")?;
        for (i, origin) in self.cors_origins.iter().enumerate() {
            let key = format!("codec_server.cors_origins[{i}]");
            let Some((scheme, rest)) = origin.split_once("://") else {
                return Err(ConfigError::invalid(
                    key,
                    format!("{origin:?} is not an origin (scheme://host[:port])"),
                ));
            };
            if !matches!(scheme, "http" | "https") || rest.is_empty() || rest.contains('/') {
                return Err(ConfigError::invalid(
                    key,
                    format!(
                        "{origin:?} is not an origin: expected http(s)://host[:port] \
                         without path or trailing slash (wildcards are not supported)"
                    ),
                ));
            }
        }
        if self.max_body_bytes == 0 {
            return Err(ConfigError::invalid(
                "codec_server.max_body_bytes",
                "must be greater than 0",
            ));
        }
        if self.max_payloads == 0 {
            return Err(ConfigError::invalid(
                "codec_server.max_payloads",
                "must be greater than 0",
            ));
        }
        if self.request_timeout_ms == 0 {
            return Err(ConfigError::invalid(
                "codec_server.request_timeout_ms",
                "must be greater than 0",
            ));
        }
        if self.max_decoded_bytes == 0 {
            return Err(ConfigError::invalid(
                "codec_server.max_decoded_bytes",
                "must be greater than 0",
            ));
        }
        for (i, host) in self.allowed_hosts.iter().enumerate() {
            HostPattern::parse(host).map_err(|why| {
                ConfigError::invalid(format!("codec_server.allowed_hosts[{i}]"), why)
            })?;
        }
        if matches!(&self.bearer_tokens_env, Some(v) if v.is_empty()) {
            return Err(ConfigError::invalid(
                "codec_server.bearer_tokens_env",
                "must name an environment variable",
            ));
        }
        for (i, t) in self.tokens.iter().enumerate() {
            if t.env.is_empty() {
                return Err(ConfigError::invalid(
                    format!("codec_server.tokens[{i}].env"),
                    "must name an environment variable",
                ));
            }
            if t.namespaces.is_empty() || t.namespaces.iter().any(String::is_empty) {
                return Err(ConfigError::invalid(
                    format!("codec_server.tokens[{i}].namespaces"),
                    "must list at least one namespace (unrestricted tokens go in bearer_tokens_env)",
                ));
            }
        }
        if self.jwks_file.is_some() && self.jwks_url.is_some() {
            return Err(ConfigError::invalid(
                "codec_server.jwks_url",
                "give only one of jwks_file and jwks_url",
            ));
        }
        if let Some(url) = &self.jwks_url {
            super::auth::check_jwks_url("codec_server.jwks_url", url)?;
        } else if self.jwks_ca_file.is_some() {
            return Err(ConfigError::invalid(
                "codec_server.jwks_ca_file",
                "has no effect without jwks_url",
            ));
        }
        if self.jwks_file.is_some() || self.jwks_url.is_some() {
            for (key, value) in [
                ("codec_server.jwt_issuer", &self.jwt_issuer),
                ("codec_server.jwt_audience", &self.jwt_audience),
            ] {
                if value.as_deref().is_none_or(str::is_empty) {
                    return Err(ConfigError::invalid(
                        key,
                        "required with jwks_file or jwks_url",
                    ));
                }
            }
        } else if self.jwt_issuer.is_some()
            || self.jwt_audience.is_some()
            || self.jwt_namespaces_claim.is_some()
        {
            return Err(ConfigError::invalid(
                "codec_server.jwks_file",
                "required (or jwks_url) when jwt_issuer, jwt_audience or jwt_namespaces_claim \
                 is set",
            ));
        }
        Ok(())
    }
}

/// One `codec_server.allowed_hosts` entry: a host (any port) or `host:port`; `*` is any.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostPattern {
    /// Lower-case host (IPv6 in brackets); `None`: any host.
    pub(crate) host: Option<String>,
    /// `None`: any port.
    pub(crate) port: Option<u16>,
}

impl HostPattern {
    /// Parses `*`, `name`, `name:port`, `1.2.3.4[:port]` or `[v6][:port]`.
    pub fn parse(text: &str) -> Result<Self, String> {
        if text.trim() == "*" {
            return Ok(Self {
                host: None,
                port: None,
            });
        }
        let (host, port) = split_authority(text).ok_or_else(|| {
            format!("{text:?} is not a host name or address with an optional :port")
        })?;
        Ok(Self {
            host: Some(host),
            port,
        })
    }

    /// The listen address, as clients connecting to it by address name it.
    pub(crate) fn listen(addr: SocketAddr) -> Self {
        let host = match addr {
            SocketAddr::V4(a) => a.ip().to_string(),
            SocketAddr::V6(a) => format!("[{}]", a.ip()),
        };
        Self {
            host: Some(host),
            port: Some(addr.port()),
        }
    }

    /// Whether `host` (normalized as [`split_authority`] does) and `port` match.
    pub(crate) fn matches(&self, host: &str, port: Option<u16>) -> bool {
        self.host.as_deref().is_none_or(|h| h == host) && (self.port.is_none() || self.port == port)
    }
}

/// Splits `host[:port]` (IPv6 in brackets) into a normalized host (lower case, no trailing
/// dot, IPv6 in canonical form) and the port. `None`: not a valid authority (userinfo, empty
/// host, bad port or characters).
pub(crate) fn split_authority(value: &str) -> Option<(String, Option<u16>)> {
    let value = value.trim();
    let (host, port) = if let Some(rest) = value.strip_prefix('[') {
        let (v6, after) = rest.split_once(']')?;
        let ip: std::net::Ipv6Addr = v6.parse().ok()?;
        let port = match after {
            "" => None,
            p => Some(p.strip_prefix(':')?.parse::<u16>().ok()?),
        };
        (format!("[{ip}]"), port)
    } else {
        let (host, port) = match value.rsplit_once(':') {
            Some((h, p)) => (h, Some(p.parse::<u16>().ok()?)),
            None => (value, None),
        };
        let host = host.strip_suffix('.').unwrap_or(host).to_ascii_lowercase();
        let valid = !host.is_empty()
            && host
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.' || b == b'_');
        if !valid {
            return None;
        }
        (host, port)
    };
    Some((host, port))
}
