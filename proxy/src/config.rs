//! Configuration: a TOML file, `PGW__SECTION__KEY` environment overrides, embedded defaults.
//!
//! Loading is strict: an unknown key, an invalid address or a section that this build does not
//! support is refused with a [`ConfigError`] naming the key, so a typo never silently weakens
//! what the operator asked for.

use std::collections::BTreeMap;
use std::net::SocketAddr;
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
}

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
    /// Threads of the async runtime that serves RPCs; `0`: one per CPU. A sidecar under a
    /// CPU limit of one core serves with lower latency on `1` (no cross-thread wake-ups).
    pub worker_threads: usize,
    /// Most client connections held open at once; at the cap the listener stops accepting
    /// (new clients wait in the kernel's backlog) until one closes. `0`: no cap.
    pub max_connections: usize,
    /// Process-wide budget, in bytes, for what all RPCs in flight hold at once: bodies as
    /// received plus everything inflated from them (gzip frames, zstd payloads, resolved
    /// storage references). Past it an RPC is answered `RESOURCE_EXHAUSTED` instead of the
    /// process growing. `0`: unlimited. Size it below the container's memory limit.
    pub max_inflight_bytes: usize,
    /// Environment variable holding an API key sent upstream as `authorization: Bearer <key>`
    /// on requests that carry no `authorization` header of their own (Temporal Cloud API keys).
    /// When set, the variable must exist and be non-empty (refused at start otherwise).
    pub api_key_env: Option<String>,
    /// `[proxy.tls]`: TLS toward SDKs. Off unless `cert_file` is set.
    pub tls: ServerTlsConfig,
    /// `[proxy.upstream_tls]`: TLS toward the Temporal frontend.
    pub upstream_tls: UpstreamTlsConfig,
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

    fn validate(&self) -> Result<(), ConfigError> {
        let key = |k: &str| format!("proxy.tls.{k}");
        match (&self.cert_file, &self.key_file) {
            (Some(_), None) => {
                return Err(ConfigError::invalid(
                    key("key_file"),
                    "required with proxy.tls.cert_file",
                ));
            }
            (None, Some(_)) => {
                return Err(ConfigError::invalid(
                    key("cert_file"),
                    "required with proxy.tls.key_file",
                ));
            }
            _ => {}
        }
        if self.cert_file.is_none() && self.client_ca_file.is_some() {
            return Err(ConfigError::invalid(
                key("cert_file"),
                "required with proxy.tls.client_ca_file (client certificates need TLS)",
            ));
        }
        if self.require_client_cert == Some(true) && self.client_ca_file.is_none() {
            return Err(ConfigError::invalid(
                key("client_ca_file"),
                "required with proxy.tls.require_client_cert = true",
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
    fn validate(&self) -> Result<(), ConfigError> {
        let key = |k: &str| format!("proxy.upstream_tls.{k}");
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
                    "has no effect unless proxy.upstream_tls.enabled = true",
                ));
            }
            return Ok(());
        }
        match (&self.cert_file, &self.key_file) {
            (Some(_), None) => {
                return Err(ConfigError::invalid(
                    key("key_file"),
                    "required with proxy.upstream_tls.cert_file",
                ));
            }
            (None, Some(_)) => {
                return Err(ConfigError::invalid(
                    key("cert_file"),
                    "required with proxy.upstream_tls.key_file",
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
            api_key_env: None,
            tls: ServerTlsConfig::default(),
            upstream_tls: UpstreamTlsConfig::default(),
        }
    }
}

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
        }
    }
}

impl CodecServerConfig {
    /// Checks what serde cannot (origins, limits, JWT settings); files and environment
    /// variables are read when the server is built.
    fn validate(&self) -> Result<(), ConfigError> {
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
            crate::codec_server::HostPattern::parse(host).map_err(|why| {
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
        if self.jwks_file.is_some() {
            for (key, value) in [
                ("codec_server.jwt_issuer", &self.jwt_issuer),
                ("codec_server.jwt_audience", &self.jwt_audience),
            ] {
                if value.as_deref().is_none_or(str::is_empty) {
                    return Err(ConfigError::invalid(key, "required with jwks_file"));
                }
            }
        } else if self.jwt_issuer.is_some()
            || self.jwt_audience.is_some()
            || self.jwt_namespaces_claim.is_some()
        {
            return Err(ConfigError::invalid(
                "codec_server.jwks_file",
                "required when jwt_issuer, jwt_audience or jwt_namespaces_claim is set",
            ));
        }
        Ok(())
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
}

impl Default for AdminConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            listen: SocketAddr::from(([127, 0, 0, 1], 9464)),
        }
    }
}

/// `[encryption]`: AES-256-GCM in the layout of Temporal's sample encryption codec.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct EncryptionConfig {
    /// Encrypt outgoing payloads. When on, a payload that cannot be encrypted fails its RPC.
    pub enabled: bool,
    /// Id of the key that encrypts new payloads (namespaces may override).
    pub active_key: Option<String>,
    /// Every key that can decrypt; the active key must be among them.
    pub keys: Vec<KeySpec>,
    /// Keys namespaces without their own `decrypt_keys` may decrypt with, besides their active
    /// key. Unset: every key that is no namespace's active key and not listed in a namespace's
    /// own `decrypt_keys` (so a single-tenant keyring keeps decrypting with all its keys, and
    /// one namespace's key never silently decrypts for another). See SECURITY.md.
    pub decrypt_keys: Option<Vec<String>>,
    /// Where the development key lives when `enabled` and no keys are configured.
    pub dev_key_file: PathBuf,
    /// gRPC methods (full paths, `/temporal.api.x.v1.Service/Method`) that the gateway's
    /// descriptors do not know and that may nevertheless be forwarded untouched where
    /// encryption applies. Without an entry such a method is refused (`UNIMPLEMENTED`),
    /// because the gateway cannot see whether it carries payloads. Namespaces may override.
    pub forward_unknown_methods: Vec<String>,
    /// `google.protobuf.Any` type names (`pkg.Message`) unknown to the descriptors that may be
    /// forwarded untouched inside requests where encryption applies; without an entry such a
    /// request is refused (`FAILED_PRECONDITION`). Namespaces may override.
    pub forward_unknown_any_types: Vec<String>,
    /// Seal failures where encryption applies: move every `Failure`'s `message` and
    /// `stack_trace` into an encrypted `encoded_attributes` (the SDKs'
    /// `encode_common_attributes` format). Namespaces may override.
    pub seal_failures: bool,
}

impl Default for EncryptionConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            active_key: None,
            keys: Vec::new(),
            decrypt_keys: None,
            dev_key_file: PathBuf::from("./data/dev.key"),
            forward_unknown_methods: Vec::new(),
            forward_unknown_any_types: Vec::new(),
            seal_failures: true,
        }
    }
}

/// One key: an id and where its 32 bytes come from (raw or base64).
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct KeySpec {
    /// The id written to `encryption-key-id`.
    pub id: String,
    /// A file holding the key.
    pub file: Option<PathBuf>,
    /// An environment variable holding the key.
    pub env: Option<String>,
}

/// `[compression]`: zstd.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct CompressionConfig {
    /// Compress outgoing payloads.
    pub enabled: bool,
    /// zstd level (1 fastest .. 22 smallest).
    pub level: i32,
    /// Payloads smaller than this (serialized bytes) are not compressed.
    pub min_size: usize,
    /// Largest size a payload may inflate to on decompression.
    pub max_decompressed_bytes: usize,
}

impl Default for CompressionConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            level: 3,
            min_size: 256,
            max_decompressed_bytes: 256 * 1024 * 1024,
        }
    }
}

/// `[storage]`: external storage of large payloads.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct StorageConfig {
    /// Offload payloads at or above `threshold`. Off: large payloads go to the server as they are.
    pub enabled: bool,
    /// Name of the driver that stores new payloads; every listed driver can resolve.
    pub driver: String,
    /// Serialized size at or above which a payload is offloaded.
    pub threshold: usize,
    /// The configured drivers.
    pub drivers: Vec<DriverConfig>,
    /// Bytes of resolved (verified) stored payloads kept in memory (LRU); 0 disables.
    pub cache_bytes: usize,
    /// Concurrent store/retrieve requests per message.
    pub concurrency: usize,
}

impl Default for StorageConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            driver: "local".to_owned(),
            threshold: 256 * 1024,
            cache_bytes: 64 * 1024 * 1024,
            concurrency: 16,
            drivers: vec![DriverConfig {
                name: "local".to_owned(),
                kind: DriverKind::Filesystem,
                settings: BTreeMap::from([(
                    "root".to_owned(),
                    toml::Value::String("./data/payloads".to_owned()),
                )]),
            }],
        }
    }
}

/// One `[[storage.drivers]]` entry.
#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct DriverConfig {
    /// Name written into references (`driver_name`).
    pub name: String,
    /// Backend kind.
    pub kind: DriverKind,
    /// Backend-specific settings (bucket, endpoint, root, ...), validated by the backend.
    #[serde(flatten)]
    pub settings: BTreeMap<String, toml::Value>,
}

/// Storage backend kinds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum DriverKind {
    /// Amazon S3 or an S3-compatible server.
    S3,
    /// A local directory.
    Filesystem,
    /// Process memory (tests).
    Memory,
    /// Google Cloud Storage.
    Gcs,
    /// Azure Blob Storage.
    Azure,
}

/// `[namespaces.<name>]`: overrides for one namespace.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct NamespaceConfig {
    /// Encryption on or off for this namespace.
    pub encryption: Option<bool>,
    /// The key that encrypts this namespace's new payloads.
    pub active_key: Option<String>,
    /// Keys this namespace may still decrypt with besides its active key (rotation: its old
    /// keys). Unset: `encryption.decrypt_keys` and its default. Payloads naming any other key
    /// are refused when decoded for this namespace.
    pub decrypt_keys: Option<Vec<String>>,
    /// Failure sealing on or off for this namespace (only where encryption applies).
    pub seal_failures: Option<bool>,
    /// Compression on or off for this namespace.
    pub compression: Option<bool>,
    /// Offload on or off for this namespace.
    pub storage: Option<bool>,
    /// The driver that stores this namespace's payloads.
    pub storage_driver: Option<String>,
    /// The offload threshold for this namespace.
    pub storage_threshold: Option<usize>,
    /// Other namespaces whose offloaded payloads requests in this namespace may resolve. A
    /// reference is otherwise only resolved under the requesting namespace's own key prefix;
    /// Temporal itself moves payloads across namespaces for Nexus operations (the caller's
    /// input reaches the handler's namespace, the result comes back), so the caller's and the
    /// handler's namespaces list each other here.
    pub storage_read_namespaces: Vec<String>,
    /// This namespace's own list instead of `encryption.forward_unknown_methods`.
    pub forward_unknown_methods: Option<Vec<String>>,
    /// This namespace's own list instead of `encryption.forward_unknown_any_types`.
    pub forward_unknown_any_types: Option<Vec<String>>,
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

impl Config {
    /// Loads `path` (or the embedded defaults when `None`) and applies environment overrides.
    pub fn load(path: Option<&Path>) -> Result<Self, ConfigError> {
        let text = match path {
            Some(path) => std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
                path: path.to_owned(),
                source,
            })?,
            None => String::new(),
        };
        Self::from_toml(&text, std::env::vars())
    }

    /// Parses TOML text, applies `PGW__...` overrides from `env`, and validates the result.
    pub fn from_toml(
        text: &str,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Self, ConfigError> {
        let mut table: toml::Table = text
            .parse()
            .map_err(|e: toml::de::Error| ConfigError::Parse(describe_toml_error(&e)))?;
        apply_env_overrides(&mut table, env)?;
        let config: Config = toml::Value::Table(table)
            .try_into()
            .map_err(|e: toml::de::Error| ConfigError::Parse(describe_toml_error(&e)))?;
        config.validate()?;
        Ok(config)
    }

    /// Checks what serde cannot: cross-references and values that must be usable.
    fn validate(&self) -> Result<(), ConfigError> {
        validate_host_port("proxy.upstream", &self.proxy.upstream)?;
        self.codec_server.validate()?;
        self.proxy.tls.validate()?;
        self.proxy.upstream_tls.validate()?;
        if matches!(&self.proxy.api_key_env, Some(v) if v.is_empty()) {
            return Err(ConfigError::invalid(
                "proxy.api_key_env",
                "must name an environment variable",
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
            if key.file.is_some() == key.env.is_some() {
                return Err(ConfigError::invalid(
                    name,
                    "give exactly one of `file` or `env`",
                ));
            }
        }
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
        for (i, d) in self.storage.drivers.iter().enumerate() {
            crate::storage::DriverSpec::parse(i, d)?;
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

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::from_toml(text, Vec::new())
    }

    #[test]
    fn embedded_defaults_are_valid() {
        let c = parse("").unwrap();
        assert_eq!(c.proxy.listen.to_string(), "127.0.0.1:7233");
        assert_eq!(c.proxy.upstream, "127.0.0.1:7234");
        assert!(c.encryption.enabled);
        assert_eq!(c.storage.driver, "local");
        assert!(c.storage.enabled);
    }

    #[test]
    fn storage_driver_settings_are_validated() {
        let err = parse("[[storage.drivers]]\nname = \"g\"\nkind = \"gcs\"\nbucket = \"b\"\n")
            .unwrap_err();
        assert!(err.to_string().contains("not yet supported"), "{err}");
        let err = parse("[[storage.drivers]]\nname = \"s\"\nkind = \"s3\"\n").unwrap_err();
        assert!(err.to_string().contains("bucket"), "{err}");
        let err =
            parse("[[storage.drivers]]\nname = \"s\"\nkind = \"s3\"\nbucket = \"b\"\nbukket = 1\n")
                .unwrap_err();
        assert!(err.to_string().contains("bukket"), "{err}");
        let c = parse(
            "[storage]\ndriver = \"s\"\n[[storage.drivers]]\nname = \"s\"\nkind = \"s3\"\nbucket = \"b\"\nendpoint = \"http://127.0.0.1:1\"\nforce_path_style = true\nmax_payload_size = 10\n",
        )
        .unwrap();
        assert_eq!(c.storage.drivers[0].kind, DriverKind::S3);
    }

    #[test]
    fn unknown_key_is_named() {
        let err = parse("[proxy]\nlisten = \"127.0.0.1:1\"\nupstreem = \"x:1\"\n").unwrap_err();
        assert!(err.to_string().contains("upstreem"), "{err}");
    }

    #[test]
    fn unknown_section_is_named() {
        let err = parse("[proxxy]\nlisten = \"127.0.0.1:1\"\n").unwrap_err();
        assert!(err.to_string().contains("proxxy"), "{err}");
    }

    #[test]
    fn invalid_listen_address_is_refused() {
        let err = parse("[proxy]\nlisten = \"localhost\"\n").unwrap_err();
        assert!(err.to_string().contains("socket address"), "{err}");
        assert!(err.to_string().contains("proxy.listen"), "{err}");
    }

    #[test]
    fn invalid_upstream_is_named() {
        let err = parse("[proxy]\nupstream = \"nohost\"\n").unwrap_err();
        assert!(err.to_string().starts_with("proxy.upstream"), "{err}");
    }

    #[test]
    fn active_key_must_exist() {
        let err =
            parse("[encryption]\nactive_key = \"k9\"\nkeys = [{ id = \"k1\", env = \"X\" }]\n")
                .unwrap_err();
        assert!(
            err.to_string().starts_with("encryption.active_key"),
            "{err}"
        );
    }

    #[test]
    fn env_overrides_apply_typed_values() {
        let c = Config::from_toml(
            "[proxy]\nupstream = \"a:1\"\n",
            vec![
                ("PGW__PROXY__UPSTREAM".to_owned(), "b:2".to_owned()),
                ("PGW__ENCRYPTION__ENABLED".to_owned(), "false".to_owned()),
                ("OTHER".to_owned(), "x".to_owned()),
            ],
        )
        .unwrap();
        assert_eq!(c.proxy.upstream, "b:2");
        assert!(!c.encryption.enabled);
    }

    #[test]
    fn env_override_of_unknown_key_is_refused() {
        let err = Config::from_toml("", vec![("PGW__PROXY__NOPE".to_owned(), "1".to_owned())])
            .unwrap_err();
        assert!(err.to_string().contains("nope"), "{err}");
    }

    #[test]
    fn tls_keys_are_validated_and_named() {
        let err = parse("[proxy.tls]\nkey_file = \"k.pem\"\n").unwrap_err();
        assert!(err.to_string().starts_with("proxy.tls.cert_file"), "{err}");
        let err = parse("[proxy.tls]\ncert_file = \"c.pem\"\n").unwrap_err();
        assert!(err.to_string().starts_with("proxy.tls.key_file"), "{err}");
        let err = parse("[proxy.tls]\nclient_ca_file = \"ca.pem\"\n").unwrap_err();
        assert!(err.to_string().starts_with("proxy.tls.cert_file"), "{err}");
        let err =
            parse("[proxy.tls]\ncert_file = \"c\"\nkey_file = \"k\"\nrequire_client_cert = true\n")
                .unwrap_err();
        assert!(
            err.to_string().starts_with("proxy.tls.client_ca_file"),
            "{err}"
        );
        let err = parse("[proxy.upstream_tls]\nca_file = \"ca.pem\"\n").unwrap_err();
        assert!(
            err.to_string().starts_with("proxy.upstream_tls.ca_file"),
            "{err}"
        );
        let err = parse("[proxy.upstream_tls]\nenabled = true\nkey_file = \"k\"\n").unwrap_err();
        assert!(
            err.to_string().starts_with("proxy.upstream_tls.cert_file"),
            "{err}"
        );
        let err =
            parse("[proxy.upstream_tls]\nenabled = true\nserver_name = \"a b\"\n").unwrap_err();
        assert!(
            err.to_string()
                .starts_with("proxy.upstream_tls.server_name"),
            "{err}"
        );
        let err = parse("[proxy]\napi_key_env = \"\"\n").unwrap_err();
        assert!(err.to_string().starts_with("proxy.api_key_env"), "{err}");
        let err = parse("[proxy.tls]\ncertfile = \"c\"\n").unwrap_err();
        assert!(err.to_string().contains("certfile"), "{err}");
        let c = parse(
            "[proxy.tls]\ncert_file = \"c\"\nkey_file = \"k\"\nclient_ca_file = \"ca\"\n\
             [proxy.upstream_tls]\nenabled = true\nserver_name = \"temporal.example\"\n",
        )
        .unwrap();
        assert!(c.proxy.tls.enabled());
        assert_eq!(c.proxy.tls.handshake_timeout_ms, 10_000);
    }

    #[test]
    fn example_config_parses() {
        let text = include_str!("../../config.example.toml");
        parse(text).unwrap();
    }
}
