//! `[proxy]`, `[admin]` and `[log]`: the listener, the upstream, TLS on both sides, probes, logs.

use std::net::SocketAddr;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::ConfigError;

/// `[proxy]`: where SDKs connect and where the Temporal frontend is.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct ProxyConfig {
    /// Address the gRPC listener binds.
    pub listen: SocketAddr,
    /// The Temporal frontend, `host:port` (HTTP/2; TLS per `[proxy.upstream_tls]`).
    pub upstream: String,
    /// Largest gRPC message accepted from clients or the upstream, in bytes, and the budget
    /// of everything one message may inflate to (gzip frames, zstd payloads, resolved storage
    /// references): a decoded response holding offloaded artifacts is as large as they are.
    pub max_message_bytes: usize,
    /// Timeout for establishing a connection to the upstream, in milliseconds.
    pub connect_timeout_ms: u64,
    /// How long in-flight RPCs may run after a shutdown signal, in milliseconds.
    pub shutdown_grace_ms: u64,
    /// A client connection that has sent no complete request within this many milliseconds
    /// of connecting is closed (stalled handshakes, slow-loris). SDKs send their first RPC at
    /// once and reconnect on their own.
    pub first_request_timeout_ms: u64,
    /// Event-loop threads serving client connections; `0`: one per CPU. Each connection lives
    /// on one thread with the upstream connection its RPCs use (no cross-thread wake-ups per
    /// RPC); connections are handed to the threads round robin. Also sizes the runtime of the
    /// admin and codec listeners.
    pub worker_threads: usize,
    /// Most client connections held open at once; at the cap the listener stops accepting
    /// (new clients wait in the kernel's backlog) until one closes. `0`: no cap.
    pub max_connections: usize,
    /// Process-wide budget, in bytes, for what all RPCs in flight hold at once: bodies as
    /// received plus everything inflated from them (gzip frames, zstd payloads, resolved
    /// storage references). Past it an RPC is answered `RESOURCE_EXHAUSTED` instead of the
    /// process growing. `0`: unlimited. Size it below the container's memory limit.
    pub max_inflight_bytes: usize,
    /// How long a rewritten (decoded) response may wait for its client, in milliseconds.
    /// Such a response is buffered in the gateway and stays charged to `max_inflight_bytes`
    /// until its bytes are handed to the connection; a client that stops reading (HTTP/2
    /// window 0) holds that budget. After this long the unsent rest is dropped, its budget
    /// returned, and the stream reset. The whole response must reach the client within it.
    /// `0`: no timeout (a stalled client holds its responses' budget until it disconnects).
    pub response_send_timeout_ms: u64,
    /// Environment variable holding an API key sent upstream as `authorization: Bearer <key>`
    /// on requests that carry no `authorization` header of their own (Temporal Cloud API keys).
    /// When set, the variable must exist and be non-empty (refused at start otherwise).
    pub api_key_env: Option<String>,
    /// `[proxy.auth]`: who may call the listener, for which namespaces. Unset: anyone who
    /// reaches the listener may (refused at start with `api_key_env` set and a listener
    /// beyond loopback, unless `allow_unauthenticated = true`).
    pub auth: Option<super::AuthConfig>,
    /// Start without `[proxy.auth]` although `api_key_env` is set and the listener is not on
    /// loopback: every caller that reaches the listener uses the API key and gets payloads
    /// decrypted (a network policy must restrict who reaches it).
    pub allow_unauthenticated: bool,
    /// `[proxy.tls]`: TLS toward SDKs. Off unless `cert_file` is set.
    pub tls: ServerTlsConfig,
    /// `[proxy.upstream_tls]`: TLS toward the Temporal frontend.
    pub upstream_tls: UpstreamTlsConfig,
    /// A client connection older than this (milliseconds, ±10 % jitter per connection so a
    /// fleet's clients do not reconnect in lockstep) is sent a graceful HTTP/2 GOAWAY: the
    /// SDK opens a new connection (through the load balancer, to any replica) for its next
    /// RPCs while the RPCs in flight finish on the old one. `0`: connections live as long as
    /// the client keeps them (the default).
    pub max_connection_age_ms: u64,
    /// How long RPCs in flight on a connection past its age may still run after the GOAWAY,
    /// milliseconds; then the connection is closed (clients retry what was cut with
    /// `UNAVAILABLE`). Keep it above the longest long poll (Temporal's task polls end after
    /// about 70 s) so none is cut.
    pub max_connection_age_grace_ms: u64,
}

/// `[proxy.tls]`: TLS on the gRPC listener (ALPN `h2`). Enabled when `cert_file` is set.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerTlsConfig {
    /// PEM certificate chain the listener presents (leaf first). Setting it enables TLS.
    pub cert_file: Option<PathBuf>,
    /// PEM private key (PKCS#8, PKCS#1 or SEC1) of `cert_file`; required with it.
    pub key_file: Option<PathBuf>,
    /// PEM CA certificates that client certificates are verified against (mutual TLS).
    pub client_ca_file: Option<PathBuf>,
    /// Refuse clients without a certificate. Default: `true` when `client_ca_file` is set
    /// (`false` accepts clients without one, but a presented certificate must still verify).
    pub require_client_cert: Option<bool>,
    /// Time allowed for a client's TLS handshake, in milliseconds.
    pub handshake_timeout_ms: u64,
}

impl Default for ServerTlsConfig {
    fn default() -> Self {
        Self {
            cert_file: None,
            key_file: None,
            client_ca_file: None,
            require_client_cert: None,
            handshake_timeout_ms: 10_000,
        }
    }
}

impl ServerTlsConfig {
    /// Whether the listener speaks TLS.
    pub fn enabled(&self) -> bool {
        self.cert_file.is_some()
    }

    pub(super) fn validate(&self) -> Result<(), ConfigError> {
        self.validate_section("proxy.tls")
    }

    /// Checks the settings of `section` (`proxy.tls` or `codec_server.tls`, which share this
    /// shape); errors name `section`'s keys.
    pub(super) fn validate_section(&self, section: &str) -> Result<(), ConfigError> {
        let key = |k: &str| format!("{section}.{k}");
        match (&self.cert_file, &self.key_file) {
            (Some(_), None) => {
                return Err(ConfigError::invalid(
                    key("key_file"),
                    format!("required with {section}.cert_file"),
                ));
            }
            (None, Some(_)) => {
                return Err(ConfigError::invalid(
                    key("cert_file"),
                    format!("required with {section}.key_file"),
                ));
            }
            _ => {}
        }
        if self.cert_file.is_none() && self.client_ca_file.is_some() {
            return Err(ConfigError::invalid(
                key("cert_file"),
                format!("required with {section}.client_ca_file (client certificates need TLS)"),
            ));
        }
        if self.require_client_cert == Some(true) && self.client_ca_file.is_none() {
            return Err(ConfigError::invalid(
                key("client_ca_file"),
                format!("required with {section}.require_client_cert = true"),
            ));
        }
        if self.handshake_timeout_ms == 0 {
            return Err(ConfigError::invalid(
                key("handshake_timeout_ms"),
                "must be greater than 0",
            ));
        }
        for (name, path) in [
            ("cert_file", &self.cert_file),
            ("key_file", &self.key_file),
            ("client_ca_file", &self.client_ca_file),
        ] {
            if matches!(path, Some(p) if p.as_os_str().is_empty()) {
                return Err(ConfigError::invalid(key(name), "must not be empty"));
            }
        }
        Ok(())
    }
}

/// `[proxy.upstream_tls]`: TLS toward the Temporal frontend (Temporal Cloud, a TLS-enabled
/// self-hosted frontend).
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct UpstreamTlsConfig {
    /// Connect to the upstream over TLS (ALPN `h2`).
    pub enabled: bool,
    /// PEM CA certificates the upstream's certificate is verified against, instead of the
    /// platform's trust store.
    pub ca_file: Option<PathBuf>,
    /// PEM client certificate chain presented to the upstream (mutual TLS).
    pub cert_file: Option<PathBuf>,
    /// PEM private key of `cert_file`; required with it.
    pub key_file: Option<PathBuf>,
    /// Name sent as SNI, verified against the upstream's certificate and sent as `:authority`,
    /// instead of the host of `proxy.upstream`.
    pub server_name: Option<String>,
}

impl UpstreamTlsConfig {
    pub(super) fn validate(&self) -> Result<(), ConfigError> {
        self.validate_section("proxy.upstream_tls")
    }

    /// Checks the settings of `section` (`proxy.upstream_tls` or `upstreams.<name>.tls`,
    /// which share this shape); errors name `section`'s keys.
    pub(super) fn validate_section(&self, section: &str) -> Result<(), ConfigError> {
        let key = |k: &str| format!("{section}.{k}");
        if !self.enabled {
            let set = [
                ("ca_file", self.ca_file.is_some()),
                ("cert_file", self.cert_file.is_some()),
                ("key_file", self.key_file.is_some()),
                ("server_name", self.server_name.is_some()),
            ];
            if let Some((name, _)) = set.iter().find(|(_, set)| *set) {
                return Err(ConfigError::invalid(
                    key(name),
                    format!("has no effect unless {section}.enabled = true"),
                ));
            }
            return Ok(());
        }
        match (&self.cert_file, &self.key_file) {
            (Some(_), None) => {
                return Err(ConfigError::invalid(
                    key("key_file"),
                    format!("required with {section}.cert_file"),
                ));
            }
            (None, Some(_)) => {
                return Err(ConfigError::invalid(
                    key("cert_file"),
                    format!("required with {section}.key_file"),
                ));
            }
            _ => {}
        }
        for (name, path) in [
            ("ca_file", &self.ca_file),
            ("cert_file", &self.cert_file),
            ("key_file", &self.key_file),
        ] {
            if matches!(path, Some(p) if p.as_os_str().is_empty()) {
                return Err(ConfigError::invalid(key(name), "must not be empty"));
            }
        }
        if let Some(name) = &self.server_name {
            let valid = rustls::pki_types::ServerName::try_from(name.as_str()).is_ok()
                && name.parse::<http::uri::Authority>().is_ok()
                && !name.contains(':');
            if !valid {
                return Err(ConfigError::invalid(
                    key("server_name"),
                    format!("{name:?} is not a DNS name or IPv4 address"),
                ));
            }
        }
        Ok(())
    }
}

impl Default for ProxyConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 7233)),
            upstream: "127.0.0.1:7234".to_owned(),
            max_message_bytes: 256 * 1024 * 1024,
            connect_timeout_ms: 5_000,
            shutdown_grace_ms: 10_000,
            first_request_timeout_ms: 10_000,
            worker_threads: 0,
            max_connections: 10_000,
            max_inflight_bytes: 1024 * 1024 * 1024,
            response_send_timeout_ms: 60_000,
            api_key_env: None,
            auth: None,
            allow_unauthenticated: false,
            tls: ServerTlsConfig::default(),
            upstream_tls: UpstreamTlsConfig::default(),
            max_connection_age_ms: 0,
            max_connection_age_grace_ms: 120_000,
        }
    }
}

/// `[admin]`: Prometheus metrics and health probes.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct AdminConfig {
    /// Whether the admin listener runs.
    pub enabled: bool,
    /// Address the admin HTTP listener binds.
    pub listen: SocketAddr,
    /// Most connections held open at once (as `proxy.max_connections`; probes and a scraper
    /// need a handful). `0`: no cap.
    pub max_connections: usize,
}

impl Default for AdminConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            listen: SocketAddr::from(([127, 0, 0, 1], 9464)),
            max_connections: 64,
        }
    }
}

/// `[log]`: structured logs.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    /// `text` or `json`.
    pub format: LogFormat,
    /// A `tracing` filter directive, e.g. `info` or `payload_gateway=debug`. `RUST_LOG` wins.
    pub level: String,
}

impl Default for LogConfig {
    fn default() -> Self {
        Self {
            format: LogFormat::Text,
            level: "info".to_owned(),
        }
    }
}

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}
