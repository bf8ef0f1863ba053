//! Identities of a verified client certificate: its subject alternative names and subject
//! common names, read once per connection and attached to every request of the connection.
//!
//! Only certificates that rustls verified against `proxy.tls.client_ca_file` ever get here
//! (the listener refuses the handshake otherwise), so the names are as trustworthy as the CA.

use std::net::IpAddr;
use std::sync::Arc;

use x509_parser::extensions::GeneralName;
use x509_parser::prelude::{FromDer, X509Certificate};

use super::Grant;
use crate::config::ClientCertConfig;

/// The names of a client's verified leaf certificate (a request extension).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ClientIdentity {
    /// Subject alternative names: DNS names, URIs, e-mail addresses, IP addresses.
    pub sans: Vec<String>,
    /// Common names (CN) of the subject.
    pub common_names: Vec<String>,
}

impl ClientIdentity {
    /// Reads the names of a DER certificate; `None` when it cannot be parsed.
    pub fn from_der(der: &[u8]) -> Option<Arc<Self>> {
        let (_, cert) = X509Certificate::from_der(der).ok()?;
        let mut sans = Vec::new();
        if let Ok(Some(ext)) = cert.subject_alternative_name() {
            for name in &ext.value.general_names {
                match name {
                    GeneralName::DNSName(n) | GeneralName::URI(n) | GeneralName::RFC822Name(n) => {
                        sans.push((*n).to_owned())
                    }
                    GeneralName::IPAddress(bytes) => {
                        let ip = match bytes.len() {
                            4 => <[u8; 4]>::try_from(*bytes).ok().map(IpAddr::from),
                            16 => <[u8; 16]>::try_from(*bytes).ok().map(IpAddr::from),
                            _ => None,
                        };
                        if let Some(ip) = ip {
                            sans.push(ip.to_string());
                        }
                    }
                    _ => {}
                }
            }
        }
        let common_names = cert
            .subject()
            .iter_common_name()
            .filter_map(|cn| cn.as_str().ok().map(str::to_owned))
            .collect();
        Some(Arc::new(Self { sans, common_names }))
    }

    /// A short description for messages and logs (the first SAN, else the first CN).
    pub fn describe(&self) -> String {
        match (self.sans.first(), self.common_names.first()) {
            (Some(san), _) => format!("SAN {san:?}"),
            (None, Some(cn)) => format!("CN {cn:?}"),
            (None, None) => "a certificate without SAN or CN".to_owned(),
        }
    }
}

/// `[[proxy.auth.client_certs]]`: identities mapped to grants.
#[derive(Debug, Default)]
pub struct CertMappings {
    entries: Vec<(Match, Grant)>,
}

#[derive(Debug)]
enum Match {
    San(String),
    CommonName(String),
}

impl CertMappings {
    /// The mappings of the configuration.
    pub fn from_config(entries: &[ClientCertConfig]) -> Self {
        Self {
            entries: entries
                .iter()
                .filter_map(|c| {
                    let m = match (&c.san, &c.common_name) {
                        (Some(san), _) => Match::San(san.clone()),
                        (None, Some(cn)) => Match::CommonName(cn.clone()),
                        (None, None) => return None,
                    };
                    Some((m, Grant::from_list(&c.namespaces)))
                })
                .collect(),
        }
    }

    /// Whether no identity is mapped.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The union of the grants of every mapping `identity` matches; `None`: none matches.
    pub fn grant(&self, identity: &ClientIdentity) -> Option<Grant> {
        let mut grant: Option<Grant> = None;
        for (m, g) in &self.entries {
            let hit = match m {
                Match::San(san) => identity.sans.iter().any(|s| s == san),
                Match::CommonName(cn) => identity.common_names.iter().any(|c| c == cn),
            };
            if hit {
                grant = Some(match grant {
                    Some(acc) => acc.union(g.clone()),
                    None => g.clone(),
                });
            }
        }
        grant
    }
}
