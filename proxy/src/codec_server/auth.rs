//! Who may call the codec endpoint: static bearer tokens (optionally limited to namespaces)
//! and JWTs validated against a JWKS file.
//!
//! JWTs must carry `exp`, `iss` and `aud`; `exp` and (when present) `nbf` are checked with
//! [`JWT_LEEWAY_SECS`] of leeway; an `nbf` that is not a NumericDate refuses the token.
//!
//! Static tokens are compared in constant time: both sides are hashed with SHA-256 and the
//! digests compared with a fold over all bytes, and every configured token is checked, so
//! neither the position nor the length of a near miss shows in the timing.

use std::collections::BTreeSet;

use jsonwebtoken::jwk::{AlgorithmParameters, JwkSet};
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use sha2::{Digest, Sha256};

use crate::config::{CodecServerConfig, ConfigError};

/// What an authenticated caller may do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Grant {
    /// Every namespace.
    All,
    /// Only these namespaces.
    Namespaces(BTreeSet<String>),
}

impl Grant {
    /// Whether a request for `namespace` is allowed; `Err` says why not.
    pub fn allows(&self, namespace: Option<&str>) -> Result<(), String> {
        match (self, namespace) {
            (Grant::All, _) => Ok(()),
            (Grant::Namespaces(_), None) => Err(
                "this credential is limited to some namespaces: name the namespace in the \
                 path (/{namespace}/decode) or the X-Namespace header"
                    .to_owned(),
            ),
            (Grant::Namespaces(set), Some(ns)) if set.contains(ns) => Ok(()),
            (Grant::Namespaces(_), Some(ns)) => Err(format!(
                "this credential may not be used for namespace {ns:?}"
            )),
        }
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

/// Clock skew tolerated on a JWT's `exp` and `nbf`, in seconds: a token is accepted from
/// `nbf - 60` to `exp + 60`.
pub const JWT_LEEWAY_SECS: u64 = 60;

struct StaticToken {
    digest: [u8; 32],
    grant: Grant,
}

struct Jwt {
    keys: Vec<JwtKey>,
    issuer: String,
    audience: String,
    namespaces_claim: Option<String>,
}

struct JwtKey {
    kid: Option<String>,
    algorithms: Vec<Algorithm>,
    key: DecodingKey,
}

/// The configured authentication; `None` from [`Auth::from_config`] means none.
pub struct Auth {
    tokens: Vec<StaticToken>,
    jwt: Option<Jwt>,
}

impl std::fmt::Debug for Auth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Auth")
            .field("tokens", &self.tokens.len())
            .field("jwt_keys", &self.jwt.as_ref().map(|j| j.keys.len()))
            .finish()
    }
}

fn sha256(bytes: &[u8]) -> [u8; 32] {
    Sha256::digest(bytes).into()
}

fn constant_time_eq(a: &[u8; 32], b: &[u8; 32]) -> bool {
    let diff = a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y));
    std::hint::black_box(diff) == 0
}

/// Splits a comma-separated token list; empty entries are skipped.
fn split_tokens(value: &str) -> impl Iterator<Item = &str> {
    value.split(',').map(str::trim).filter(|t| !t.is_empty())
}

impl Auth {
    /// Reads tokens from the environment (`env`: a lookup, `std::env::var` in production) and
    /// the JWKS file. `Ok(None)`: no authentication configured.
    pub fn from_config(
        config: &CodecServerConfig,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<Option<Self>, ConfigError> {
        let mut tokens = Vec::new();
        let mut read_env = |key: String, var: &str, grant: Grant| {
            let value = env(var).unwrap_or_default();
            let before = tokens.len();
            for t in split_tokens(&value) {
                tokens.push(StaticToken {
                    digest: sha256(t.as_bytes()),
                    grant: grant.clone(),
                });
            }
            if tokens.len() == before {
                return Err(ConfigError::invalid(
                    key,
                    format!("environment variable {var} is unset or holds no token"),
                ));
            }
            Ok(())
        };
        if let Some(var) = &config.bearer_tokens_env {
            read_env("codec_server.bearer_tokens_env".to_owned(), var, Grant::All)?;
        }
        for (i, t) in config.tokens.iter().enumerate() {
            read_env(
                format!("codec_server.tokens[{i}].env"),
                &t.env,
                Grant::Namespaces(t.namespaces.iter().cloned().collect()),
            )?;
        }
        let jwt = match &config.jwks_file {
            None => None,
            Some(path) => {
                let key = "codec_server.jwks_file";
                let text = std::fs::read_to_string(path).map_err(|e| {
                    ConfigError::invalid(key, format!("cannot read {}: {e}", path.display()))
                })?;
                Some(Jwt {
                    keys: parse_jwks(&text).map_err(|e| {
                        ConfigError::invalid(key, format!("{}: {e}", path.display()))
                    })?,
                    issuer: config.jwt_issuer.clone().unwrap_or_default(),
                    audience: config.jwt_audience.clone().unwrap_or_default(),
                    namespaces_claim: config.jwt_namespaces_claim.clone(),
                })
            }
        };
        if tokens.is_empty() && jwt.is_none() {
            return Ok(None);
        }
        Ok(Some(Self { tokens, jwt }))
    }

    /// Checks the `Authorization` header value (`Bearer <t>` or the raw `<t>`).
    pub fn authenticate(&self, header: Option<&[u8]>) -> Result<Grant, AuthError> {
        let raw = header.ok_or(AuthError::Missing)?;
        let raw = std::str::from_utf8(raw)
            .map_err(|_| AuthError::Invalid("Authorization header is not UTF-8".to_owned()))?
            .trim();
        let token = match raw.split_once(' ') {
            Some((scheme, rest)) if scheme.eq_ignore_ascii_case("bearer") => rest.trim(),
            _ => raw,
        };
        if token.is_empty() {
            return Err(AuthError::Missing);
        }
        let digest = sha256(token.as_bytes());
        let mut found: Option<&Grant> = None;
        for t in &self.tokens {
            // No early exit: every configured token is compared.
            if constant_time_eq(&t.digest, &digest) && found.is_none() {
                found = Some(&t.grant);
            }
        }
        if let Some(grant) = found {
            return Ok(grant.clone());
        }
        match &self.jwt {
            Some(jwt) if token.split('.').count() == 3 => jwt.validate(token),
            _ => Err(AuthError::Invalid("unknown token".to_owned())),
        }
    }
}

/// Loads the verification keys of a JWKS document. Symmetric (`oct`) keys are refused.
fn parse_jwks(text: &str) -> Result<Vec<JwtKey>, String> {
    let set: JwkSet = serde_json::from_str(text).map_err(|e| format!("not a JWKS: {e}"))?;
    let mut keys = Vec::new();
    for (i, jwk) in set.keys.iter().enumerate() {
        let algorithms = match &jwk.algorithm {
            AlgorithmParameters::RSA(_) => vec![
                Algorithm::RS256,
                Algorithm::RS384,
                Algorithm::RS512,
                Algorithm::PS256,
                Algorithm::PS384,
                Algorithm::PS512,
            ],
            AlgorithmParameters::EllipticCurve(_) => vec![Algorithm::ES256, Algorithm::ES384],
            AlgorithmParameters::OctetKeyPair(_) => vec![Algorithm::EdDSA],
            AlgorithmParameters::OctetKey(_) => {
                return Err(format!(
                    "key {i}: symmetric (oct) keys are not accepted; publish public keys only"
                ));
            }
        };
        // A key that names its algorithm is only used with that one.
        let algorithms = match jwk.common.key_algorithm {
            Some(alg) => {
                let named = format!("{alg:?}");
                algorithms
                    .into_iter()
                    .filter(|a| format!("{a:?}") == named)
                    .collect()
            }
            None => algorithms,
        };
        let key = DecodingKey::from_jwk(jwk).map_err(|e| format!("key {i}: {e}"))?;
        keys.push(JwtKey {
            kid: jwk.common.key_id.clone(),
            algorithms,
            key,
        });
    }
    if keys.is_empty() {
        return Err("the JWKS holds no keys".to_owned());
    }
    Ok(keys)
}

impl Jwt {
    fn validate(&self, token: &str) -> Result<Grant, AuthError> {
        let invalid = |why: String| AuthError::Invalid(why);
        let header =
            jsonwebtoken::decode_header(token).map_err(|e| invalid(format!("bad JWT: {e}")))?;
        let candidates: Vec<&JwtKey> = match &header.kid {
            Some(kid) => self
                .keys
                .iter()
                .filter(|k| k.kid.as_deref() == Some(kid.as_str()))
                .collect(),
            None => self.keys.iter().collect(),
        };
        let candidates: Vec<&JwtKey> = candidates
            .into_iter()
            .filter(|k| k.algorithms.contains(&header.alg))
            .collect();
        if candidates.is_empty() {
            return Err(invalid(format!(
                "no key in the JWKS for kid {:?} and algorithm {:?}",
                header.kid, header.alg
            )));
        }
        let mut validation = Validation::new(header.alg);
        validation.set_issuer(&[&self.issuer]);
        validation.set_audience(&[&self.audience]);
        validation.set_required_spec_claims(&["exp", "iss", "aud"]);
        // `exp` and, when present, `nbf` are checked with the same bounded clock-skew leeway.
        validation.leeway = JWT_LEEWAY_SECS;
        validation.validate_exp = true;
        validation.validate_nbf = true;
        let mut last = String::new();
        for k in candidates {
            match jsonwebtoken::decode::<serde_json::Value>(token, &k.key, &validation) {
                Ok(data) => {
                    // jsonwebtoken skips an `nbf` it cannot read as a number: refuse it instead.
                    if let Some(nbf) = data.claims.get("nbf")
                        && !nbf.as_f64().is_some_and(|n| n.is_finite() && n >= 0.0)
                    {
                        return Err(invalid(
                            "JWT rejected: nbf is not a NumericDate (seconds since the epoch)"
                                .to_owned(),
                        ));
                    }
                    return self.grant(&data.claims);
                }
                Err(e) => last = format!("JWT rejected: {e}"),
            }
        }
        Err(invalid(last))
    }

    fn grant(&self, claims: &serde_json::Value) -> Result<Grant, AuthError> {
        let Some(claim) = &self.namespaces_claim else {
            return Ok(Grant::All);
        };
        let names: Vec<String> = match claims.get(claim) {
            Some(serde_json::Value::String(s)) => s
                .split([' ', ','])
                .filter(|n| !n.is_empty())
                .map(str::to_owned)
                .collect(),
            Some(serde_json::Value::Array(items)) => items
                .iter()
                .filter_map(|v| v.as_str().map(str::to_owned))
                .collect(),
            _ => {
                return Err(AuthError::Invalid(format!(
                    "JWT has no {claim:?} claim listing namespaces"
                )));
            }
        };
        if names.iter().any(|n| n == "*") {
            return Ok(Grant::All);
        }
        Ok(Grant::Namespaces(names.into_iter().collect()))
    }
}
