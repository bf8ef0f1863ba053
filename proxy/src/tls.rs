//! TLS on rustls with the aws-lc-rs provider (the same library the codec uses for AES-GCM):
//! the client-facing acceptors (`[proxy.tls]` for gRPC, `[codec_server.tls]` for the codec
//! endpoint) and the client configuration toward the upstream (`[proxy.upstream_tls]`).
//! Certificates and keys are PEM files, read once at start; a file that is missing or holds
//! nothing usable is refused with a [`ConfigError`] naming its key.

use std::fmt;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use tokio::net::TcpStream;

use crate::config::{ConfigError, ServerTlsConfig, UpstreamTlsConfig};

/// ALPN protocol of gRPC.
const H2: &[u8] = b"h2";
/// ALPN protocol of HTTP/1.1 (browsers and the `temporal` CLI may use either on the codec
/// endpoint).
const HTTP1: &[u8] = b"http/1.1";

/// The crypto provider of every TLS configuration the gateway builds.
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

/// Accepts TLS on client connections, bounded by the handshake timeout.
#[derive(Clone)]
pub struct TlsAcceptor {
    inner: tokio_rustls::TlsAcceptor,
    handshake_timeout: Duration,
}

impl fmt::Debug for TlsAcceptor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TlsAcceptor")
            .field("handshake_timeout", &self.handshake_timeout)
            .finish_non_exhaustive()
    }
}

impl TlsAcceptor {
    /// Builds the acceptor for `[proxy.tls]` (ALPN `h2`), `None` when TLS is off (no
    /// `cert_file`).
    pub fn from_config(config: &ServerTlsConfig) -> Result<Option<Self>, ConfigError> {
        Self::build("proxy.tls", config, &[H2])
    }

    /// Builds the acceptor for `[codec_server.tls]` (ALPN `h2` and `http/1.1`), `None` when
    /// TLS is off (no `cert_file`).
    pub fn for_codec_server(config: &ServerTlsConfig) -> Result<Option<Self>, ConfigError> {
        Self::build("codec_server.tls", config, &[H2, HTTP1])
    }

    /// The acceptor of the `section` settings in `config`, offering `alpn`; errors name
    /// `section`'s keys.
    fn build(
        section: &str,
        config: &ServerTlsConfig,
        alpn: &[&[u8]],
    ) -> Result<Option<Self>, ConfigError> {
        let (Some(cert_file), Some(key_file)) = (&config.cert_file, &config.key_file) else {
            return Ok(None);
        };
        let key_of = |name: &str| format!("{section}.{name}");
        let certs = load_certs(&key_of("cert_file"), cert_file)?;
        let key = load_key(&key_of("key_file"), key_file)?;
        let provider = provider();
        let builder = ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(|e| ConfigError::invalid(section, e.to_string()))?;
        let builder = match &config.client_ca_file {
            Some(ca_file) => {
                let roots = load_roots(&key_of("client_ca_file"), ca_file)?;
                let verifier =
                    WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider);
                let verifier = if config.require_client_cert.unwrap_or(true) {
                    verifier
                } else {
                    verifier.allow_unauthenticated()
                };
                let verifier = verifier
                    .build()
                    .map_err(|e| ConfigError::invalid(key_of("client_ca_file"), e.to_string()))?;
                builder.with_client_cert_verifier(verifier)
            }
            None => builder.with_no_client_auth(),
        };
        let mut server = builder.with_single_cert(certs, key).map_err(|e| {
            ConfigError::invalid(
                key_of("key_file"),
                format!("does not fit {}: {e}", key_of("cert_file")),
            )
        })?;
        server.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        Ok(Some(Self {
            inner: tokio_rustls::TlsAcceptor::from(Arc::new(server)),
            handshake_timeout: Duration::from_millis(config.handshake_timeout_ms),
        }))
    }

    /// Runs the server side of the handshake on `stream`. A failed or too slow handshake is
    /// logged at debug and yields `None` (the connection is closed).
    pub async fn handshake(
        &self,
        stream: TcpStream,
        peer: SocketAddr,
    ) -> Option<tokio_rustls::server::TlsStream<TcpStream>> {
        let accept = self.inner.accept(stream).into_fallible();
        match tokio::time::timeout(self.handshake_timeout, accept).await {
            Ok(Ok(stream)) => Some(stream),
            Ok(Err((e, stream))) => {
                tracing::debug!(%peer, error = %e, "TLS handshake failed");
                linger_close(stream).await;
                None
            }
            Err(_) => {
                tracing::debug!(
                    %peer,
                    timeout_ms = self.handshake_timeout.as_millis() as u64,
                    "TLS handshake timed out"
                );
                None
            }
        }
    }
}

/// How long a connection whose handshake failed is drained before it is closed.
const LINGER: Duration = Duration::from_secs(1);

/// Closes a connection whose handshake failed so the client reads the alert rustls sent
/// (`certificate_required`, `unknown_ca`, ...): in TLS 1.3 the client has often sent its first
/// request by then, and closing with that request unread would reset the connection, which
/// can discard the alert before the client reads it (the client then reports "connection
/// closed" instead of what was wrong). Half-closes, then drains what the client still sends for
/// at most [`LINGER`].
async fn linger_close(mut stream: TcpStream) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let _ = stream.shutdown().await;
    let drain = async {
        let mut buf = [0u8; 4096];
        while matches!(stream.read(&mut buf).await, Ok(n) if n > 0) {}
    };
    let _ = tokio::time::timeout(LINGER, drain).await;
}

/// The upstream's TLS settings, ready for a connector.
#[derive(Clone)]
pub struct UpstreamTls {
    /// Client configuration (ALPN `h2`).
    pub connector: tokio_rustls::TlsConnector,
    /// Name for SNI and certificate verification.
    pub server_name: ServerName<'static>,
}

impl fmt::Debug for UpstreamTls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("UpstreamTls")
            .field("server_name", &self.server_name)
            .finish_non_exhaustive()
    }
}

impl UpstreamTls {
    /// Builds the client side for `[proxy.upstream_tls]`, `None` when disabled. `upstream_host`
    /// is the host of `proxy.upstream`, the server name unless `server_name` overrides it.
    pub fn from_config(
        config: &UpstreamTlsConfig,
        upstream_host: &str,
    ) -> Result<Option<Self>, ConfigError> {
        Self::from_section(
            config,
            "proxy.upstream_tls",
            "proxy.upstream",
            upstream_host,
        )
    }

    /// [`from_config`](Self::from_config) for the TLS settings at config key `section`
    /// (`proxy.upstream_tls`, `upstreams.<name>.tls`) of the upstream whose address is at
    /// `address_key`: errors name those keys.
    pub fn from_section(
        config: &UpstreamTlsConfig,
        section: &str,
        address_key: &str,
        upstream_host: &str,
    ) -> Result<Option<Self>, ConfigError> {
        if !config.enabled {
            return Ok(None);
        }
        let key = |k: &str| format!("{section}.{k}");
        let (name_key, name) = match &config.server_name {
            Some(name) => (key("server_name"), name.as_str()),
            None => (address_key.to_owned(), upstream_host),
        };
        let name = name.trim_start_matches('[').trim_end_matches(']');
        let server_name = ServerName::try_from(name.to_owned()).map_err(|e| {
            ConfigError::invalid(
                name_key,
                format!("{name:?} is not a valid TLS server name: {e}"),
            )
        })?;
        let roots = match &config.ca_file {
            Some(ca_file) => load_roots(&key("ca_file"), ca_file)?,
            None => platform_roots(&key("ca_file"))?,
        };
        let builder = ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| ConfigError::invalid(section, e.to_string()))?
            .with_root_certificates(roots);
        let mut client = match (&config.cert_file, &config.key_file) {
            (Some(cert_file), Some(key_file)) => {
                let certs = load_certs(&key("cert_file"), cert_file)?;
                let key_der = load_key(&key("key_file"), key_file)?;
                builder.with_client_auth_cert(certs, key_der).map_err(|e| {
                    ConfigError::invalid(
                        key("key_file"),
                        format!("does not fit {}: {e}", key("cert_file")),
                    )
                })?
            }
            _ => builder.with_no_client_auth(),
        };
        client.alpn_protocols = vec![H2.to_vec()];
        Ok(Some(Self {
            connector: tokio_rustls::TlsConnector::from(Arc::new(client)),
            server_name,
        }))
    }
}

/// A client configuration for HTTPS fetches (the JWKS of an identity provider): the server is
/// verified against the CA certificates in `ca_file` (config key `ca_key`), else the
/// platform's trust store. ALPN is left to the HTTP client.
pub fn https_client_config(
    ca_key: &str,
    ca_file: Option<&Path>,
) -> Result<ClientConfig, ConfigError> {
    let roots = match ca_file {
        Some(path) => load_roots(ca_key, path)?,
        None => platform_roots(ca_key)?,
    };
    Ok(ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| ConfigError::invalid(ca_key, e.to_string()))?
        .with_root_certificates(roots)
        .with_no_client_auth())
}

/// The platform's trust store (`rustls-native-certs`: the OS store, or `SSL_CERT_FILE` /
/// `SSL_CERT_DIR`); `key` is the setting that would replace it, named in the error.
pub(crate) fn platform_roots(key: &str) -> Result<RootCertStore, ConfigError> {
    let found = rustls_native_certs::load_native_certs();
    for e in &found.errors {
        tracing::warn!(error = %e, "cannot load some platform CA certificates");
    }
    let mut roots = RootCertStore::empty();
    let (added, _ignored) = roots.add_parsable_certificates(found.certs);
    if added == 0 {
        return Err(ConfigError::invalid(
            key,
            "not set and the platform trust store holds no usable CA certificate",
        ));
    }
    Ok(roots)
}

fn read_file(key: &str, path: &Path) -> Result<Vec<u8>, ConfigError> {
    std::fs::read(path)
        .map_err(|e| ConfigError::invalid(key, format!("cannot read {}: {e}", path.display())))
}

/// Every certificate in the PEM file at `path` (at least one).
pub(crate) fn load_certs(
    key: &str,
    path: &Path,
) -> Result<Vec<CertificateDer<'static>>, ConfigError> {
    let pem = read_file(key, path)?;
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| {
            ConfigError::invalid(key, format!("{}: malformed PEM: {e}", path.display()))
        })?;
    if certs.is_empty() {
        return Err(ConfigError::invalid(
            key,
            format!("{}: no PEM certificate found", path.display()),
        ));
    }
    Ok(certs)
}

/// The first private key in the PEM file at `path`.
pub(crate) fn load_key(key: &str, path: &Path) -> Result<PrivateKeyDer<'static>, ConfigError> {
    let pem = read_file(key, path)?;
    PrivateKeyDer::from_pem_slice(&pem).map_err(|e| {
        ConfigError::invalid(
            key,
            format!("{}: no usable PEM private key: {e}", path.display()),
        )
    })
}

/// A trust store holding the CA certificates in the PEM file at `path`.
pub(crate) fn load_roots(key: &str, path: &Path) -> Result<RootCertStore, ConfigError> {
    let mut roots = RootCertStore::empty();
    for cert in load_certs(key, path)? {
        roots.add(cert).map_err(|e| {
            ConfigError::invalid(
                key,
                format!("{}: unusable CA certificate: {e}", path.display()),
            )
        })?;
    }
    Ok(roots)
}
