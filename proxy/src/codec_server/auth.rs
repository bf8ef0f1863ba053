//! Who may call the codec endpoint: static bearer tokens (optionally limited to namespaces)
//! and JWTs validated against a JWKS file or https URL.
//!
//! JWT validation (keys, algorithms, `exp`/`nbf` leeway, `iss`/`aud`) is the gateway's one
//! implementation in [`crate::auth::jwks`]; static tokens are compared in constant time by
//! [`crate::auth::tokens::TokenSet`].

use crate::auth::grant_from_claim;
use crate::auth::jwks::{Jwks, JwksSettings, JwtVerifier};
use crate::auth::tokens::{TokenSet, bearer};
use crate::config::{CodecServerConfig, ConfigError};

pub use crate::auth::Grant;
pub use crate::auth::jwks::JWT_LEEWAY_SECS;

/// Whether `grant` allows a codec request for `namespace`; `Err` says why not.
pub fn allows(grant: &Grant, namespace: Option<&str>) -> Result<(), String> {
    match (grant, namespace) {
        (Grant::All, _) => Ok(()),
        (Grant::Namespaces(_), None) => Err(
            "this credential is limited to some namespaces: name the namespace in the \
             path (/{namespace}/decode) or the X-Namespace header"
                .to_owned(),
        ),
        (grant, Some(ns)) if grant.permits(ns) => Ok(()),
        (_, Some(ns)) => Err(format!(
            "this credential may not be used for namespace {ns:?}"
        )),
    }
}

/// Why a request was not authenticated (answered with 401).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AuthError {
    /// No `Authorization` header.
    Missing,
    /// The credential matched nothing.
    Invalid(String),
}

impl std::fmt::Display for AuthError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            AuthError::Missing => f.write_str(
                "authorization required: send `Authorization: Bearer <token>` \
                 (the temporal CLI: --codec-auth <token>)",
            ),
            AuthError::Invalid(why) => write!(f, "invalid credentials: {why}"),
        }
    }
}

/// The configured authentication; `None` from [`Auth::from_config`] means none.
#[derive(Debug)]
pub struct Auth {
    tokens: TokenSet,
    jwt: Option<(JwtVerifier, Option<String>)>,
}

impl Auth {
    /// Reads tokens from the environment (`env`: a lookup, `std::env::var` in production) and
    /// the JWKS file (a URL is fetched in the background). `Ok(None)`: no authentication
    /// configured.
    pub fn from_config(
        config: &CodecServerConfig,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<Option<Self>, ConfigError> {
        let mut tokens = TokenSet::default();
        if let Some(var) = &config.bearer_tokens_env {
            tokens.add_from_env("codec_server.bearer_tokens_env", var, Grant::All, &env)?;
        }
        for (i, t) in config.tokens.iter().enumerate() {
            tokens.add_from_env(
                &format!("codec_server.tokens[{i}].env"),
                &t.env,
                Grant::from_list(&t.namespaces),
                &env,
            )?;
        }
        let jwt = match JwksSettings::new(
            "codec_server.",
            config.jwks_file.as_deref(),
            config.jwks_url.as_deref(),
            config.jwks_ca_file.as_deref(),
        )? {
            None => None,
            Some(settings) => Some((
                JwtVerifier::new(
                    Jwks::new(settings)?,
                    config.jwt_issuer.clone().unwrap_or_default(),
                    config.jwt_audience.clone().unwrap_or_default(),
                ),
                config.jwt_namespaces_claim.clone(),
            )),
        };
        if tokens.is_empty() && jwt.is_none() {
            return Ok(None);
        }
        Ok(Some(Self { tokens, jwt }))
    }

    /// Checks the `Authorization` header value (`Bearer <t>` or the raw `<t>`).
    pub async fn authenticate(&self, header: Option<&[u8]>) -> Result<Grant, AuthError> {
        let token = bearer(header.ok_or(AuthError::Missing)?)
            .map_err(|why| AuthError::Invalid(why.to_owned()))?
            .ok_or(AuthError::Missing)?;
        if let Some(grant) = self.tokens.find(token) {
            return Ok(grant);
        }
        match &self.jwt {
            Some((verifier, claim)) if JwtVerifier::looks_like_jwt(token) => {
                let claims = verifier
                    .verify(token)
                    .await
                    .map_err(|e| AuthError::Invalid(e.to_string()))?;
                match claim {
                    None => Ok(Grant::All),
                    Some(claim) => grant_from_claim(&claims, claim).map_err(AuthError::Invalid),
                }
            }
            _ => Err(AuthError::Invalid("unknown token".to_owned())),
        }
    }
}
