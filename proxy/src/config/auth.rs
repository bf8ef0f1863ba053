//! `[proxy.auth]`: who may call the gRPC listener, and for which namespaces.
//!
//! Three kinds of credential, any mix: static bearer tokens from environment variables
//! (`[[proxy.auth.tokens]]`), JWTs validated against a JWKS file or https URL
//! (`[proxy.auth.jwt]`), and identities of verified client certificates
//! (`[[proxy.auth.client_certs]]`, needs `proxy.tls.client_ca_file`). Each grants a list of
//! namespaces; `"*"` grants every namespace and the namespace-less methods (Nexus endpoints,
//! cluster administration, methods the gateway does not know).

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::ConfigError;

/// The namespace entry that grants every namespace.
pub const ALL_NAMESPACES: &str = "*";

/// `[proxy.auth]`: inbound authorization on the gRPC listener.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuthConfig {
    /// `false` (default): the gateway consumes the client's `authorization` header (it is the
    /// gateway credential) and removes it before forwarding; the upstream gets
    /// `proxy.api_key_env`'s key instead, if set. `true`: the client's header is forwarded
    /// as it came (an upstream that validates the same JWTs, or clients that bring their own
    /// Temporal Cloud API key and authenticate to the gateway by client certificate).
    pub forward_client_authorization: bool,
    /// Static bearer tokens, each list limited to some namespaces.
    pub tokens: Vec<AuthTokenConfig>,
    /// JWTs signed by a key of a JWKS.
    pub jwt: Option<AuthJwtConfig>,
    /// Client certificate identities (verified against `proxy.tls.client_ca_file`).
    pub client_certs: Vec<ClientCertConfig>,
}

/// One `[[proxy.auth.tokens]]` entry.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct AuthTokenConfig {
    /// Environment variable holding comma-separated tokens (must exist and hold at least one).
    pub env: String,
    /// Namespaces these tokens may act on; `"*"`: every namespace.
    pub namespaces: Vec<String>,
}

/// `[proxy.auth.jwt]`: bearer JWTs validated against a JWKS.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuthJwtConfig {
    /// A JWKS file (`{"keys": [...]}`); exactly one of `jwks_file` and `jwks_url`.
    pub jwks_file: Option<PathBuf>,
    /// An `https://` URL serving the JWKS (the identity provider's `jwks_uri`).
    pub jwks_url: Option<String>,
    /// PEM CA certificates the JWKS server's certificate is verified against, instead of the
    /// platform's trust store.
    pub jwks_ca_file: Option<PathBuf>,
    /// Seconds between background refreshes of the JWKS.
    pub jwks_refresh_secs: u64,
    /// Least seconds between two fetches: a token with an unknown `kid` triggers a fetch at
    /// most this often.
    pub jwks_min_refresh_secs: u64,
    /// Required `iss`.
    pub issuer: String,
    /// Required `aud` (one of the token's audiences).
    pub audience: String,
    /// Claim listing the namespaces a token may act on: an array of strings, or one string
    /// of names separated by spaces or commas; `"*"` grants every namespace. A token without
    /// it is refused.
    pub namespaces_claim: String,
}

impl Default for AuthJwtConfig {
    fn default() -> Self {
        Self {
            jwks_file: None,
            jwks_url: None,
            jwks_ca_file: None,
            jwks_refresh_secs: 300,
            jwks_min_refresh_secs: 30,
            issuer: String::new(),
            audience: String::new(),
            namespaces_claim: "namespaces".to_owned(),
        }
    }
}

/// One `[[proxy.auth.client_certs]]` entry: a client certificate identity and its namespaces.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ClientCertConfig {
    /// Matches a subject alternative name of the certificate: a DNS name, a URI (e.g. a
    /// SPIFFE ID), an e-mail address or an IP address, compared exactly.
    pub san: Option<String>,
    /// Matches a common name (CN) of the certificate's subject, compared exactly.
    pub common_name: Option<String>,
    /// Namespaces this identity may act on; `"*"`: every namespace.
    pub namespaces: Vec<String>,
}

impl AuthConfig {
    /// Checks what serde cannot; `client_ca`: whether `proxy.tls.client_ca_file` is set.
    pub(super) fn validate(&self, client_ca: bool) -> Result<(), ConfigError> {
        let key = |k: &str| format!("proxy.auth.{k}");
        if self.tokens.is_empty() && self.jwt.is_none() && self.client_certs.is_empty() {
            return Err(ConfigError::invalid(
                "proxy.auth",
                "configures no credential: add [[proxy.auth.tokens]], [proxy.auth.jwt] or \
                 [[proxy.auth.client_certs]]",
            ));
        }
        for (i, t) in self.tokens.iter().enumerate() {
            if t.env.is_empty() {
                return Err(ConfigError::invalid(
                    key(&format!("tokens[{i}].env")),
                    "must name an environment variable",
                ));
            }
            check_namespaces(&key(&format!("tokens[{i}].namespaces")), &t.namespaces)?;
        }
        if let Some(jwt) = &self.jwt {
            jwt.validate()?;
        }
        if !self.client_certs.is_empty() && !client_ca {
            return Err(ConfigError::invalid(
                "proxy.tls.client_ca_file",
                "required with [[proxy.auth.client_certs]] (client certificates are only \
                 trusted when verified against it)",
            ));
        }
        for (i, c) in self.client_certs.iter().enumerate() {
            let name = key(&format!("client_certs[{i}]"));
            match (&c.san, &c.common_name) {
                (Some(v), None) | (None, Some(v)) if !v.is_empty() => {}
                _ => {
                    return Err(ConfigError::invalid(
                        name,
                        "give exactly one non-empty `san` or `common_name`",
                    ));
                }
            }
            check_namespaces(&format!("{name}.namespaces"), &c.namespaces)?;
        }
        Ok(())
    }
}

impl AuthJwtConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        let key = |k: &str| format!("proxy.auth.jwt.{k}");
        match (&self.jwks_file, &self.jwks_url) {
            (Some(_), None) | (None, Some(_)) => {}
            _ => {
                return Err(ConfigError::invalid(
                    key("jwks_url"),
                    "give exactly one of jwks_file and jwks_url",
                ));
            }
        }
        if let Some(url) = &self.jwks_url {
            check_jwks_url(&key("jwks_url"), url)?;
        } else if self.jwks_ca_file.is_some() {
            return Err(ConfigError::invalid(
                key("jwks_ca_file"),
                "has no effect without jwks_url",
            ));
        }
        for (name, value) in [
            ("issuer", &self.issuer),
            ("audience", &self.audience),
            ("namespaces_claim", &self.namespaces_claim),
        ] {
            if value.is_empty() {
                return Err(ConfigError::invalid(key(name), "must not be empty"));
            }
        }
        if self.jwks_min_refresh_secs == 0 {
            return Err(ConfigError::invalid(
                key("jwks_min_refresh_secs"),
                "must be at least 1 (a flood of unknown kids must not become a flood of fetches)",
            ));
        }
        if self.jwks_refresh_secs < self.jwks_min_refresh_secs {
            return Err(ConfigError::invalid(
                key("jwks_refresh_secs"),
                "must be at least jwks_min_refresh_secs",
            ));
        }
        Ok(())
    }
}

/// A JWKS URL must be `https://` with a host: the keys decide who is trusted.
pub(super) fn check_jwks_url(key: &str, url: &str) -> Result<(), ConfigError> {
    let uri: http::Uri = url
        .parse()
        .map_err(|e| ConfigError::invalid(key, format!("{url:?} is not a URL: {e}")))?;
    if uri.scheme_str() != Some("https") || uri.host().is_none_or(str::is_empty) {
        return Err(ConfigError::invalid(
            key,
            format!("{url:?} must be an https:// URL with a host"),
        ));
    }
    Ok(())
}

fn check_namespaces(key: &str, namespaces: &[String]) -> Result<(), ConfigError> {
    if namespaces.is_empty() || namespaces.iter().any(String::is_empty) {
        return Err(ConfigError::invalid(
            key,
            "must list at least one namespace (\"*\": every namespace)",
        ));
    }
    Ok(())
}
