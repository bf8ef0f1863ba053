//! Certificates made in the test: a CA that issues server and client leaves, written as PEM
//! files into a directory, and the readers rustls wants.

use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use rustls::RootCertStore;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

/// The names a server leaf is valid for.
pub const LOCAL_NAMES: &[&str] = &["localhost", "127.0.0.1"];

/// A test CA that issues leaf certificates, written as PEM files into a directory
/// (`{name}-ca.pem`, `{name}-{leaf}.crt`, `{name}-{leaf}.key`).
pub struct Ca {
    issuer: Issuer<'static, KeyPair>,
    cert_pem: String,
    dir: PathBuf,
    name: String,
}

/// A certificate and its key on disk.
pub struct Leaf {
    /// The certificate (PEM).
    pub cert: PathBuf,
    /// The private key (PEM, PKCS#8).
    pub key: PathBuf,
}

impl Ca {
    /// A new self-signed CA, its certificate written to [`Ca::cert_file`].
    pub fn new(dir: &Path, name: &str) -> Self {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(DnType::CommonName, format!("{name} test CA"));
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let cert = params.self_signed(&key).unwrap();
        let ca = Self {
            issuer: Issuer::new(params, key),
            cert_pem: cert.pem(),
            dir: dir.to_owned(),
            name: name.to_owned(),
        };
        std::fs::write(ca.cert_file(), &ca.cert_pem).unwrap();
        ca
    }

    /// The CA certificate's PEM file.
    pub fn cert_file(&self) -> PathBuf {
        self.dir.join(format!("{}-ca.pem", self.name))
    }

    /// A root store trusting this CA alone.
    pub fn roots(&self) -> RootCertStore {
        let mut roots = RootCertStore::empty();
        roots
            .add(CertificateDer::from_pem_slice(self.cert_pem.as_bytes()).unwrap())
            .unwrap();
        roots
    }

    /// A leaf with common name `leaf`, subject alternative names `sans` and the one extended
    /// key usage `purpose`.
    pub fn issue(&self, leaf: &str, sans: &[&str], purpose: ExtendedKeyUsagePurpose) -> Leaf {
        let key = KeyPair::generate().unwrap();
        let mut params =
            CertificateParams::new(sans.iter().map(|s| s.to_string()).collect::<Vec<_>>()).unwrap();
        params.distinguished_name.push(DnType::CommonName, leaf);
        params.extended_key_usages = vec![purpose];
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        let out = Leaf {
            cert: self.dir.join(format!("{}-{leaf}.crt", self.name)),
            key: self.dir.join(format!("{}-{leaf}.key", self.name)),
        };
        std::fs::write(&out.cert, cert.pem()).unwrap();
        std::fs::write(&out.key, key.serialize_pem()).unwrap();
        out
    }

    /// A server leaf for [`LOCAL_NAMES`].
    pub fn server(&self, leaf: &str) -> Leaf {
        self.issue(leaf, LOCAL_NAMES, ExtendedKeyUsagePurpose::ServerAuth)
    }

    /// A client leaf without names.
    pub fn client(&self, leaf: &str) -> Leaf {
        self.issue(leaf, &[], ExtendedKeyUsagePurpose::ClientAuth)
    }
}

/// The certificates of a PEM file.
pub fn certs(path: &Path) -> Vec<CertificateDer<'static>> {
    CertificateDer::pem_file_iter(path)
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap()
}

/// The private key of a PEM file.
pub fn key(path: &Path) -> PrivateKeyDer<'static> {
    PrivateKeyDer::from_pem_file(path).unwrap()
}
