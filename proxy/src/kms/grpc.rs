//! A key-encryption key held by an external gRPC key service (`grpc://<server>`), speaking
//! `payload_gateway.kms.v1.KMSService` (`proxy/proto/payload_gateway/kms/v1/kms.proto`):
//! a Vault or on-prem KMS adapter, an HSM front end, or the reference sidecar
//! `tests/kms_sidecar.py`. The server is configured in `[kms_servers.<server>]`
//! ([`KmsServerConfig`]): address, TLS or mTLS (rustls, aws-lc-rs), timeouts.
//!
//! # Namespace binding, twice
//! The namespace goes to the service in both calls, and the contract requires the service to
//! bind it (associated data, encryption context). The gateway does not rely on that alone: the
//! plaintext it asks the service to wrap is `0x01 || DEK (32) || namespace`, and after Decrypt
//! it checks that the namespace inside is the one asked for. With any service whose ciphertext
//! is authenticated, a wrapped DEK moved to another namespace's payload therefore fails with
//! [`KmsError::Invalid`], even if the service ignored the namespace field.
//!
//! # Failures
//! Transport failures (refused connection, TLS handshake, timeout) and transient statuses are
//! [`KmsError::Unavailable`] with the whole error chain, so a wrong CA or a missing client
//! certificate is named; `INVALID_ARGUMENT` is [`KmsError::Invalid`]; refusals
//! (`PERMISSION_DENIED`, `NOT_FOUND`, ...) are [`KmsError::Refused`]. Every call is bounded by
//! `timeout_ms`. The channel connects lazily and reconnects on its own.

use std::collections::BTreeMap;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use http::Uri;
use hyper_rustls::MaybeHttpsStream;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioIo;
use rustls::client::ResolvesClientCert;
use rustls::pki_types::ServerName;
use rustls::sign::CertifiedKey;
use rustls::{ClientConfig, SignatureScheme};
use tokio::net::TcpStream;
use tonic::Code;
use tonic::transport::{Channel, Endpoint};
use tower::ServiceExt;
use zeroize::Zeroizing;

use super::{DEK_LEN, Dek, KeyEncryptionKey, KmsError, Provider};
use crate::config::{ConfigError, KmsServerConfig};
use crate::errors::error_chain;
use crate::grpc::BoxError;

/// Messages and client generated from `kms.proto`.
#[allow(missing_docs, clippy::all, clippy::pedantic)]
pub mod proto {
    tonic::include_proto!("payload_gateway.kms.v1");
}

use proto::kms_service_client::KmsServiceClient;
use proto::{DecryptRequest, EncryptRequest};

/// URI scheme of keys held by a configured key service: `grpc://<server>`.
pub const SCHEME: &str = "grpc://";
/// Version byte of the plaintext the gateway hands to the service.
const INNER_V1: u8 = 1;
/// Largest ciphertext accepted from a service (a wrapped 32-byte key plus headers).
const MAX_CIPHERTEXT: usize = 4096;
const PROVIDER: &str = "grpc";

/// A KEK held by an external `KMSService`. Cheap to clone; safe to use concurrently.
#[derive(Clone)]
pub struct GrpcKek {
    key_id: String,
    /// `<name> (<address>)` of `[kms_servers.<name>]`, for messages.
    server: Arc<str>,
    client: KmsServiceClient<Channel>,
    timeout: Duration,
    /// Without a client certificate configured: set once the service asked for one, so a
    /// refused connection can say why (under TLS 1.3 the refusal only shows as a closed
    /// connection).
    client_cert_requested: Option<Arc<AtomicBool>>,
    /// `kms_servers.<name>`, for hints naming settings.
    config_key: Arc<str>,
}

impl fmt::Debug for GrpcKek {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GrpcKek")
            .field("key_id", &self.key_id)
            .field("server", &self.server)
            .finish_non_exhaustive()
    }
}

/// The server name in a `grpc://<server>` key URI.
pub fn server_of_uri<'u>(key_id: &str, uri: &'u str) -> Result<&'u str, KmsError> {
    let name = uri
        .strip_prefix(SCHEME)
        .map(|rest| rest.trim_end_matches('/'))
        .filter(|name| !name.is_empty() && !name.contains('/'))
        .ok_or_else(|| KmsError::Config {
            key_id: key_id.to_owned(),
            reason: format!(
                "{uri:?} is not a gRPC key URI (expected grpc://<name of a [kms_servers] table>)"
            ),
        })?;
    Ok(name)
}

impl GrpcKek {
    /// Resolves `grpc://<server>` against the configured `[kms_servers]` and connects.
    pub fn from_uri(
        key_id: &str,
        uri: &str,
        servers: &BTreeMap<String, KmsServerConfig>,
    ) -> Result<Self, KmsError> {
        let server = server_of_uri(key_id, uri)?;
        let config = servers.get(server).ok_or_else(|| KmsError::Config {
            key_id: key_id.to_owned(),
            reason: format!("{uri:?} names [kms_servers.{server}], which is not configured"),
        })?;
        Self::connect(key_id, server, config)
    }

    /// Builds the client for the key `key_id` on the server `[kms_servers.<server>]`. Reads the
    /// TLS files now (a missing or malformed file is [`KmsError::Config`]); the connection
    /// itself is opened on first use. Must be called within a Tokio runtime.
    pub fn connect(key_id: &str, server: &str, config: &KmsServerConfig) -> Result<Self, KmsError> {
        let config_error = |e: ConfigError| KmsError::Config {
            key_id: key_id.to_owned(),
            reason: e.to_string(),
        };
        config.validate(server).map_err(config_error)?;
        let client_cert_requested =
            (config.tls && config.cert_file.is_none()).then(|| Arc::new(AtomicBool::new(false)));
        let tls = if config.tls {
            Some(tls_config(server, config, client_cert_requested.clone()).map_err(config_error)?)
        } else {
            None
        };
        let scheme = if tls.is_some() { "https" } else { "http" };
        let authority = match &config.server_name {
            Some(name) if tls.is_some() => name.clone(),
            _ => config.address.clone(),
        };
        let endpoint = Endpoint::from_shared(format!("{scheme}://{authority}"))
            .map_err(|e| KmsError::Config {
                key_id: key_id.to_owned(),
                reason: format!("kms_servers.{server}: invalid address: {e}"),
            })?
            .timeout(Duration::from_millis(config.timeout_ms))
            .connect_timeout(Duration::from_millis(config.connect_timeout_ms))
            .tcp_nodelay(true);
        let dial: Uri =
            format!("http://{}", config.address)
                .parse()
                .map_err(|e| KmsError::Config {
                    key_id: key_id.to_owned(),
                    reason: format!("kms_servers.{server}.address: {e}"),
                })?;
        let mut http = HttpConnector::new();
        http.set_nodelay(true);
        http.set_connect_timeout(Some(Duration::from_millis(config.connect_timeout_ms)));
        let connector = KmsConnector { http, dial, tls };
        let channel = endpoint.connect_with_connector_lazy(connector);
        Ok(Self {
            key_id: key_id.to_owned(),
            server: format!("{server} ({})", config.address).into(),
            client: KmsServiceClient::new(channel),
            timeout: Duration::from_millis(config.timeout_ms),
            client_cert_requested,
            config_key: format!("kms_servers.{server}").into(),
        })
    }

    /// Runs one call bounded by the timeout, mapping failures.
    async fn call<T>(
        &self,
        what: &str,
        call: impl Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    ) -> Result<T, KmsError> {
        match tokio::time::timeout(self.timeout, call).await {
            Ok(Ok(response)) => Ok(response.into_inner()),
            Ok(Err(status)) => Err(self.status_error(what, &status)),
            Err(_) => Err(self.error(
                Class::Unavailable,
                format!("{what}: no answer within {} ms", self.timeout.as_millis()),
            )),
        }
    }

    fn status_error(&self, what: &str, status: &tonic::Status) -> KmsError {
        let class = match status.code() {
            Code::InvalidArgument => Class::Invalid,
            Code::PermissionDenied
            | Code::Unauthenticated
            | Code::NotFound
            | Code::FailedPrecondition
            | Code::Unimplemented
            | Code::OutOfRange
            | Code::AlreadyExists => Class::Refused,
            // Includes CANCELLED, which is also what the channel reports for a call past
            // `timeout_ms`.
            _ => Class::Unavailable,
        };
        let detail = if status.message().is_empty() {
            "(no message)".to_owned()
        } else {
            status.message().to_owned()
        };
        let mut reason = format!("{what}: {:?}: {detail}", status.code());
        // Transport failures carry their cause (TLS alert, certificate error) as the source.
        let mut source = std::error::Error::source(status);
        while let Some(e) = source {
            let text = e.to_string();
            if !reason.contains(&text) {
                reason.push_str(": ");
                reason.push_str(&text);
            }
            source = e.source();
        }
        if self
            .client_cert_requested
            .as_ref()
            .is_some_and(|flag| flag.load(Ordering::Relaxed))
        {
            reason.push_str(&format!(
                " (the service asked for a TLS client certificate and none is configured: \
                 set {0}.cert_file and {0}.key_file)",
                self.config_key
            ));
        }
        self.error(class, reason)
    }

    fn error(&self, class: Class, reason: String) -> KmsError {
        let key_id = self.key_id.clone();
        let reason = format!("server {}: {reason}", self.server);
        match class {
            Class::Unavailable => KmsError::Unavailable {
                key_id,
                provider: PROVIDER,
                reason,
            },
            Class::Refused => KmsError::Refused {
                key_id,
                provider: PROVIDER,
                reason,
            },
            Class::Invalid => KmsError::Invalid {
                key_id,
                provider: PROVIDER,
                reason,
            },
        }
    }
}

enum Class {
    Unavailable,
    Refused,
    Invalid,
}

#[async_trait::async_trait]
impl KeyEncryptionKey for GrpcKek {
    fn key_id(&self) -> &str {
        &self.key_id
    }

    fn provider(&self) -> Provider {
        Provider::Grpc
    }

    async fn wrap(&self, dek: &Dek, namespace: &str) -> Result<Vec<u8>, KmsError> {
        // The only copy of the key outside `Dek`: moved into the request, which the encoder
        // consumes.
        let mut plaintext = Vec::with_capacity(1 + DEK_LEN + namespace.len());
        plaintext.push(INNER_V1);
        plaintext.extend_from_slice(dek.expose());
        plaintext.extend_from_slice(namespace.as_bytes());
        let request = EncryptRequest {
            namespace: namespace.to_owned(),
            plaintext,
            key_id: self.key_id.clone(),
        };
        let mut client = self.client.clone();
        let response = self.call("Encrypt", client.encrypt(request)).await?;
        let ciphertext = response.ciphertext;
        if ciphertext.is_empty() || ciphertext.len() > MAX_CIPHERTEXT {
            return Err(self.error(
                Class::Refused,
                format!(
                    "Encrypt returned {} bytes of ciphertext (expected 1..={MAX_CIPHERTEXT})",
                    ciphertext.len()
                ),
            ));
        }
        Ok(ciphertext)
    }

    async fn unwrap(&self, wrapped: &[u8], namespace: &str) -> Result<Dek, KmsError> {
        if wrapped.is_empty() || wrapped.len() > MAX_CIPHERTEXT {
            return Err(self.error(
                Class::Invalid,
                format!(
                    "wrapped key of {} bytes is not one this service returns",
                    wrapped.len()
                ),
            ));
        }
        let request = DecryptRequest {
            ciphertext: wrapped.to_vec(),
            namespace: namespace.to_owned(),
            key_id: self.key_id.clone(),
        };
        let mut client = self.client.clone();
        let response = self.call("Decrypt", client.decrypt(request)).await?;
        let plaintext = Zeroizing::new(response.plaintext);
        let bound_to = plaintext.get(1 + DEK_LEN..);
        if plaintext.first() != Some(&INNER_V1) || bound_to != Some(namespace.as_bytes()) {
            return Err(self.error(
                Class::Invalid,
                "Decrypt returned a key that was not wrapped for this namespace by the gateway"
                    .to_owned(),
            ));
        }
        Ok(Dek::from_slice(&plaintext[1..1 + DEK_LEN]).expect("length checked above"))
    }
}

/// The rustls client configuration for a server: its CA (or the platform's roots), an
/// optional client certificate, ALPN `h2`, and the name to verify.
fn tls_config(
    server: &str,
    config: &KmsServerConfig,
    client_cert_requested: Option<Arc<AtomicBool>>,
) -> Result<(Arc<ClientConfig>, ServerName<'static>), ConfigError> {
    let key = |field: &str| format!("kms_servers.{server}.{field}");
    let name = config
        .server_name
        .clone()
        .unwrap_or_else(|| config.host().to_owned());
    let server_name = ServerName::try_from(name.clone()).map_err(|e| {
        ConfigError::invalid(
            key("server_name"),
            format!("{name:?} is not a valid TLS server name: {e}"),
        )
    })?;
    let roots = match &config.ca_file {
        Some(ca_file) => crate::tls::load_roots(&key("ca_file"), ca_file)?,
        None => crate::tls::platform_roots(&key("ca_file"))?,
    };
    let builder = ClientConfig::builder_with_provider(crate::tls::provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| ConfigError::invalid(key("tls"), e.to_string()))?
        .with_root_certificates(roots);
    let mut client = match (&config.cert_file, &config.key_file) {
        (Some(cert_file), Some(key_file)) => {
            let certs = crate::tls::load_certs(&key("cert_file"), cert_file)?;
            let private = crate::tls::load_key(&key("key_file"), key_file)?;
            builder.with_client_auth_cert(certs, private).map_err(|e| {
                ConfigError::invalid(
                    key("key_file"),
                    format!("does not fit kms_servers.{server}.cert_file: {e}"),
                )
            })?
        }
        _ => builder.with_client_cert_resolver(Arc::new(NoClientCert {
            requested: client_cert_requested.unwrap_or_default(),
        })),
    };
    client.alpn_protocols = vec![b"h2".to_vec()];
    Ok((Arc::new(client), server_name))
}

/// Presents no client certificate, and remembers that the service asked for one.
#[derive(Debug)]
struct NoClientCert {
    requested: Arc<AtomicBool>,
}

impl ResolvesClientCert for NoClientCert {
    fn resolve(
        &self,
        _root_hint_subjects: &[&[u8]],
        _sigschemes: &[SignatureScheme],
    ) -> Option<Arc<CertifiedKey>> {
        self.requested.store(true, Ordering::Relaxed);
        None
    }

    fn has_certs(&self) -> bool {
        false
    }
}

/// Opens connections to the configured address (whatever the request URI's authority, which
/// may be the TLS server name), TLS when configured.
#[derive(Clone)]
struct KmsConnector {
    http: HttpConnector,
    dial: Uri,
    tls: Option<(Arc<ClientConfig>, ServerName<'static>)>,
}

impl tower::Service<Uri> for KmsConnector {
    type Response = MaybeHttpsStream<TokioIo<TcpStream>>;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, BoxError>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _uri: Uri) -> Self::Future {
        let http = self.http.clone();
        let dial = self.dial.clone();
        let tls = self.tls.clone();
        Box::pin(async move {
            let tcp = http.oneshot(dial.clone()).await.map_err(|e| {
                format!(
                    "cannot connect to {}: {}",
                    dial.authority().map_or("?", |a| a.as_str()),
                    error_chain(&e)
                )
            })?;
            let Some((config, name)) = tls else {
                return Ok(MaybeHttpsStream::Http(tcp));
            };
            let stream = tokio_rustls::TlsConnector::from(config)
                .connect(name.clone(), TokioIo::new(tcp))
                .await
                .map_err(|e| format!("TLS handshake with {} failed: {e}", name.to_str()))?;
            Ok(MaybeHttpsStream::Https(TokioIo::new(stream)))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn server_names_in_uris() {
        assert_eq!(server_of_uri("k", "grpc://vault").unwrap(), "vault");
        assert_eq!(server_of_uri("k", "grpc://vault/").unwrap(), "vault");
        for bad in ["grpc://", "grpc://a/b", "vault", "awskms:///arn"] {
            let err = server_of_uri("k", bad).unwrap_err();
            assert!(matches!(err, KmsError::Config { .. }), "{bad}: {err}");
        }
    }

    #[tokio::test]
    async fn unknown_server_is_a_config_error() {
        let err = GrpcKek::from_uri("k", "grpc://nope", &BTreeMap::new()).unwrap_err();
        assert!(err.to_string().contains("[kms_servers.nope]"), "{err}");
    }

    #[tokio::test]
    async fn missing_tls_file_is_named() {
        let mut config = KmsServerConfig::new("kms.example:443");
        config.ca_file = Some("/nonexistent/ca.pem".into());
        let err = GrpcKek::connect("k", "vault", &config).unwrap_err();
        assert!(matches!(err, KmsError::Config { .. }), "{err}");
        assert!(
            err.to_string().contains("kms_servers.vault.ca_file"),
            "{err}"
        );
    }
}
