//! TLS for the `-tls` configurations: a CA and one server certificate (`localhost` and
//! `127.0.0.1`) generated at start with `rcgen`, written as PEM files for the gateway and
//! nginx, and the rustls configurations of the load client and of the echo upstream — on the
//! aws-lc-rs provider, like the gateway. No client certificates (TLS, not mutual TLS).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Result, anyhow};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use rustls::{ClientConfig, RootCertStore, ServerConfig};

/// The generated certificates on disk and the rustls configurations built from them.
pub struct Pki {
    /// PEM of the CA certificate (what the gateway's `[proxy.upstream_tls] ca_file` and
    /// nginx's `grpc_ssl_trusted_certificate` trust).
    pub ca_file: PathBuf,
    /// PEM of the server certificate (SANs `localhost`, `127.0.0.1`), presented by the echo
    /// upstream, the gateway's listener and nginx's listener.
    pub cert_file: PathBuf,
    /// PEM (PKCS#8) of the server certificate's key.
    pub key_file: PathBuf,
    /// The load client's configuration: trusts the CA, ALPN `h2`.
    pub client: Arc<ClientConfig>,
    /// The echo upstream's configuration: the server certificate, ALPN `h2`.
    pub server: Arc<ServerConfig>,
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

impl Pki {
    /// Generates a CA (ECDSA P-256) and a server certificate it signs, and writes the PEM
    /// files into `dir`.
    pub fn generate(dir: &Path) -> Result<Pki> {
        std::fs::create_dir_all(dir)?;
        let ca_key = KeyPair::generate()?;
        let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(DnType::CommonName, "pgw-load test CA");
        ca_params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let ca_cert = ca_params.self_signed(&ca_key)?;
        let issuer = Issuer::new(ca_params, ca_key);

        let key = KeyPair::generate()?;
        let mut params = CertificateParams::new(vec!["localhost".into(), "127.0.0.1".into()])?;
        params
            .distinguished_name
            .push(DnType::CommonName, "pgw-load server");
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let cert = params.signed_by(&key, &issuer)?;

        let ca_file = dir.join("ca.pem");
        let cert_file = dir.join("server.crt");
        let key_file = dir.join("server.key");
        std::fs::write(&ca_file, ca_cert.pem())?;
        std::fs::write(&cert_file, cert.pem())?;
        std::fs::write(&key_file, key.serialize_pem())?;

        let mut roots = RootCertStore::empty();
        roots.add(ca_cert.der().clone())?;
        let mut client = ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()?
            .with_root_certificates(roots)
            .with_no_client_auth();
        client.alpn_protocols = vec![b"h2".to_vec()];

        let chain: Vec<CertificateDer<'static>> = vec![cert.der().clone()];
        let key_der = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
        let mut server = ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()?
            .with_no_client_auth()
            .with_single_cert(chain, key_der)
            .map_err(|e| anyhow!("server certificate: {e}"))?;
        server.alpn_protocols = vec![b"h2".to_vec()];

        Ok(Pki {
            ca_file,
            cert_file,
            key_file,
            client: Arc::new(client),
            server: Arc::new(server),
        })
    }
}
