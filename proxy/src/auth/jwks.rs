//! JSON Web Key Sets and JWT validation: the one place where the gateway checks a JWT, for the
//! codec endpoint and for `[proxy.auth]`.
//!
//! # The key set
//!
//! A [`Jwks`] reads its keys from a file or fetches them from an `https://` URL (the
//! identity provider's `jwks_uri`, verified against a configured CA file or the platform's
//! trust store). The set is cached and refreshed in the background every `refresh`; a token
//! whose `kid` is not in the set triggers a fetch at once, at most every `min_refresh`, so
//! rotated keys are picked up without a restart and a flood of invented `kid`s cannot become
//! a flood of fetches. A fetch that fails, or yields nothing usable, keeps the last good set.
//! A file is read at start (an unreadable file refuses start); a URL is fetched in the
//! background from start on, and tokens are refused until the first fetch succeeds.
//!
//! Keys: RSA (RS256/384/512, PS256/384/512), EC P-256 (ES256) and P-384 (ES384), Ed25519
//! (EdDSA). A key that names its `alg` is used with that algorithm only. Keys marked
//! `"use": "enc"` and keys the library cannot use (P-521, unknown types) are skipped with a
//! warning; a symmetric (`oct`) key refuses the whole set (a JWKS is public; a secret in it is
//! a misconfiguration, and accepting it would let anyone who read it sign tokens).
//!
//! # Tokens
//!
//! - `alg: none` and every HMAC algorithm (`HS256`, ... — including the classic forgery of an
//!   HS256 token "signed" with the public key) are refused before any key is looked at.
//! - A token names its key by `kid`; a token without `kid` is tried only when the set holds
//!   exactly one key.
//! - `exp`, `iss` and `aud` are required; `iss` and `aud` must match the configured values;
//!   `exp` and (when present) `nbf` are checked with [`JWT_LEEWAY_SECS`] of leeway; an `nbf`
//!   that is not a NumericDate refuses the token.
//!
//! Errors name what is wrong with a token, never the token or key material.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use arc_swap::ArcSwapOption;
use base64::Engine;
use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Limited};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, Jwk, PublicKeyUse};
use jsonwebtoken::{Algorithm, DecodingKey, Validation};

use crate::config::ConfigError;

/// Clock skew tolerated on a JWT's `exp` and `nbf`, in seconds: a token is accepted from
/// `nbf - 60` to `exp + 60`.
pub const JWT_LEEWAY_SECS: u64 = 60;

/// Largest JWKS document accepted from a URL, in bytes.
pub const MAX_JWKS_BYTES: usize = 1024 * 1024;

/// Time allowed for one fetch of a JWKS URL (connect, TLS, answer).
pub const FETCH_TIMEOUT: Duration = Duration::from_secs(10);

/// Where the keys come from.
#[derive(Debug, Clone)]
pub enum JwksSource {
    /// A JWKS file.
    File(PathBuf),
    /// An `https://` URL.
    Url(http::Uri),
}

impl std::fmt::Display for JwksSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            JwksSource::File(path) => write!(f, "{}", path.display()),
            JwksSource::Url(url) => write!(f, "{url}"),
        }
    }
}

/// How a [`Jwks`] is loaded and kept fresh.
#[derive(Debug, Clone)]
pub struct JwksSettings {
    /// The config key of the source, for errors (`proxy.auth.jwt.jwks_url`, ...).
    pub key: String,
    /// The file or URL.
    pub source: JwksSource,
    /// The config key and value of the CA file for a URL (`None`: platform trust store).
    pub ca_file: Option<(String, PathBuf)>,
    /// Interval of background refreshes.
    pub refresh: Duration,
    /// Least time between two fetches.
    pub min_refresh: Duration,
}

impl JwksSettings {
    /// Settings for `file` or `url` (exactly one is `Some`), with the codec endpoint's default
    /// intervals (5 minutes, at most every 30 seconds).
    pub fn new(
        key_prefix: &str,
        file: Option<&Path>,
        url: Option<&str>,
        ca_file: Option<&Path>,
    ) -> Result<Option<Self>, ConfigError> {
        let (key, source) = match (file, url) {
            (Some(path), None) => (
                format!("{key_prefix}jwks_file"),
                JwksSource::File(path.to_owned()),
            ),
            (None, Some(url)) => {
                let key = format!("{key_prefix}jwks_url");
                let uri = url
                    .parse()
                    .map_err(|e| ConfigError::invalid(&key, format!("{url:?}: {e}")))?;
                (key, JwksSource::Url(uri))
            }
            (None, None) => return Ok(None),
            (Some(_), Some(_)) => {
                return Err(ConfigError::invalid(
                    format!("{key_prefix}jwks_url"),
                    "give only one of jwks_file and jwks_url",
                ));
            }
        };
        Ok(Some(Self {
            key,
            source,
            ca_file: ca_file.map(|p| (format!("{key_prefix}jwks_ca_file"), p.to_owned())),
            refresh: Duration::from_secs(300),
            min_refresh: Duration::from_secs(30),
        }))
    }
}

/// Why a JWKS could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum JwksError {
    /// The file could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The URL could not be fetched (connection, TLS, timeout, size).
    #[error("fetching {url} failed: {reason}")]
    Fetch {
        /// The URL.
        url: String,
        /// What went wrong.
        reason: String,
    },
    /// The document is not a usable key set.
    #[error("{source_name}: not a usable JWKS: {reason}")]
    Parse {
        /// The file or URL.
        source_name: String,
        /// What is wrong with it.
        reason: String,
    },
}

/// Why a JWT was refused. The message names the problem, never the token.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum JwtError {
    /// Not three base64url segments with a JSON header.
    #[error("malformed JWT: {0}")]
    Malformed(String),
    /// `alg: none` or an HMAC algorithm.
    #[error(
        "JWT algorithm {0:?} is refused: only RSA, EC and Ed25519 signatures (RS*, PS*, ES256, \
         ES384, EdDSA) are accepted"
    )]
    RefusedAlgorithm(String),
    /// The key set has not been loaded yet.
    #[error("the JWKS from {source_name} is not loaded yet{}", last_error.as_ref().map(|e| format!(" ({e})")).unwrap_or_default())]
    NotLoaded {
        /// The file or URL.
        source_name: String,
        /// The last fetch error, if any.
        last_error: Option<String>,
    },
    /// No key with the token's `kid` (after a refresh) or for its algorithm.
    #[error("no key in the JWKS for kid {kid:?} and algorithm {alg}")]
    NoKey {
        /// The token's `kid`.
        kid: Option<String>,
        /// The token's algorithm.
        alg: String,
    },
    /// The token has no `kid` and the set holds several keys.
    #[error(
        "the JWT names no kid and the JWKS holds {0} keys: tokens without kid are accepted only \
         when the set has exactly one key"
    )]
    NoKid(usize),
    /// Signature, `exp`, `nbf`, `iss` or `aud` check failed.
    #[error("JWT rejected: {0}")]
    Rejected(String),
}

/// One verification key.
struct JwtKey {
    kid: Option<String>,
    algorithms: Vec<Algorithm>,
    key: DecodingKey,
}

/// A loaded key set.
struct KeySet {
    keys: Vec<Arc<JwtKey>>,
}

type HttpsClient = Client<hyper_rustls::HttpsConnector<HttpConnector>, Empty<Bytes>>;

/// A cached, refreshed JSON Web Key Set (see the module documentation).
pub struct Jwks {
    source: JwksSource,
    client: Option<HttpsClient>,
    current: ArcSwapOption<KeySet>,
    /// When the last fetch started; held during a fetch, so concurrent callers wait for it.
    last_fetch: tokio::sync::Mutex<Option<Instant>>,
    last_error: Mutex<Option<String>>,
    refresh: Duration,
    min_refresh: Duration,
}

impl std::fmt::Debug for Jwks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Jwks")
            .field("source", &self.source)
            .field("keys", &self.current.load().as_ref().map(|s| s.keys.len()))
            .finish_non_exhaustive()
    }
}

impl Jwks {
    /// Builds the key set. A file is read now (an unreadable or unusable file is a
    /// [`ConfigError`]); a URL is fetched by the background refresh, which starts here when
    /// called inside a tokio runtime (otherwise the first token triggers the fetch).
    pub fn new(settings: JwksSettings) -> Result<Arc<Self>, ConfigError> {
        let client = match &settings.source {
            JwksSource::File(_) => None,
            JwksSource::Url(_) => {
                let (ca_key, ca_file) = match &settings.ca_file {
                    Some((key, path)) => (key.as_str(), Some(path.as_path())),
                    None => (settings.key.as_str(), None),
                };
                let tls = crate::tls::https_client_config(ca_key, ca_file)?;
                let connector = hyper_rustls::HttpsConnectorBuilder::new()
                    .with_tls_config(tls)
                    .https_only()
                    .enable_http1()
                    .enable_http2()
                    .build();
                Some(Client::builder(TokioExecutor::new()).build(connector))
            }
        };
        let (current, last_fetch) = match &settings.source {
            JwksSource::File(path) => {
                let set = read_file(path)
                    .map_err(|e| ConfigError::invalid(&settings.key, e.to_string()))?;
                (Some(Arc::new(set)), Some(Instant::now()))
            }
            JwksSource::Url(_) => (None, None),
        };
        let jwks = Arc::new(Self {
            source: settings.source,
            client,
            current: ArcSwapOption::new(current),
            last_fetch: tokio::sync::Mutex::new(last_fetch),
            last_error: Mutex::new(None),
            refresh: settings.refresh,
            min_refresh: settings.min_refresh,
        });
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(refresh_loop(Arc::downgrade(&jwks)));
        }
        Ok(jwks)
    }

    /// The file or URL, for messages.
    pub fn source(&self) -> &JwksSource {
        &self.source
    }

    /// How many keys the current set holds (`None`: not loaded yet).
    pub fn key_count(&self) -> Option<usize> {
        self.current.load().as_ref().map(|s| s.keys.len())
    }

    /// Fetches the set now unless the last fetch began less than `min_refresh` ago; a
    /// failure keeps the last good set. Returns whether a new set was loaded.
    pub async fn refresh(&self) -> bool {
        let mut last = self.last_fetch.lock().await;
        if last.is_some_and(|t| t.elapsed() < self.min_refresh) {
            return false;
        }
        *last = Some(Instant::now());
        let loaded = match &self.source {
            JwksSource::File(path) => {
                let path = path.clone();
                tokio::task::spawn_blocking(move || read_file(&path))
                    .await
                    .unwrap_or_else(|e| {
                        Err(JwksError::Fetch {
                            url: self.source.to_string(),
                            reason: e.to_string(),
                        })
                    })
            }
            JwksSource::Url(url) => self.fetch(url).await,
        };
        match loaded {
            Ok(set) => {
                let kids = |s: &KeySet| s.keys.iter().map(|k| k.kid.clone()).collect::<Vec<_>>();
                let changed = self
                    .current
                    .load()
                    .as_deref()
                    .is_none_or(|old| kids(old) != kids(&set));
                if changed {
                    tracing::info!(source = %self.source, keys = set.keys.len(), "JWKS loaded");
                } else {
                    tracing::debug!(source = %self.source, "JWKS refreshed, key ids unchanged");
                }
                self.current.store(Some(Arc::new(set)));
                *self.last_error.lock().unwrap_or_else(|e| e.into_inner()) = None;
                true
            }
            Err(e) => {
                let kept = self.key_count();
                tracing::warn!(
                    source = %self.source,
                    error = %e,
                    kept_keys = kept.unwrap_or(0),
                    "JWKS refresh failed; keeping the last good set"
                );
                *self.last_error.lock().unwrap_or_else(|e| e.into_inner()) = Some(e.to_string());
                false
            }
        }
    }

    async fn fetch(&self, url: &http::Uri) -> Result<KeySet, JwksError> {
        let fail = |reason: String| JwksError::Fetch {
            url: url.to_string(),
            reason,
        };
        let client = self
            .client
            .as_ref()
            .ok_or_else(|| fail("no HTTPS client".to_owned()))?;
        let request = http::Request::get(url.clone())
            .header(http::header::ACCEPT, "application/json")
            .body(Empty::new())
            .map_err(|e| fail(e.to_string()))?;
        let body = tokio::time::timeout(FETCH_TIMEOUT, async {
            let response = client
                .request(request)
                .await
                .map_err(|e| fail(describe_error(&e)))?;
            if response.status() != http::StatusCode::OK {
                return Err(fail(format!("answered HTTP {}", response.status())));
            }
            Limited::new(response.into_body(), MAX_JWKS_BYTES)
                .collect()
                .await
                .map(|b| b.to_bytes())
                .map_err(|e| fail(format!("reading the answer: {e}")))
        })
        .await
        .map_err(|_| fail(format!("timed out after {} s", FETCH_TIMEOUT.as_secs())))??;
        parse_jwks(&body).map_err(|reason| JwksError::Parse {
            source_name: url.to_string(),
            reason,
        })
    }

    /// The keys to try for a token with `kid` and `alg`, fetching the set again (rate-limited)
    /// when it is not loaded or does not hold `kid`.
    async fn candidates(
        &self,
        kid: Option<&str>,
        alg: Algorithm,
    ) -> Result<Vec<Arc<JwtKey>>, JwtError> {
        let mut set = self.current.load_full();
        let has_kid =
            |set: &KeySet| kid.is_none_or(|k| set.keys.iter().any(|x| x.kid.as_deref() == Some(k)));
        if set.as_deref().is_none_or(|s| !has_kid(s)) {
            self.refresh().await;
            set = self.current.load_full();
        }
        let Some(set) = set else {
            return Err(JwtError::NotLoaded {
                source_name: self.source.to_string(),
                last_error: self
                    .last_error
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .clone(),
            });
        };
        let keys: Vec<Arc<JwtKey>> = match kid {
            Some(kid) => set
                .keys
                .iter()
                .filter(|k| k.kid.as_deref() == Some(kid))
                .cloned()
                .collect(),
            None if set.keys.len() == 1 => set.keys.clone(),
            None => return Err(JwtError::NoKid(set.keys.len())),
        };
        let keys: Vec<_> = keys
            .into_iter()
            .filter(|k| k.algorithms.contains(&alg))
            .collect();
        if keys.is_empty() {
            return Err(JwtError::NoKey {
                kid: kid.map(str::to_owned),
                alg: format!("{alg:?}"),
            });
        }
        Ok(keys)
    }
}

/// Refreshes `jwks` until it is dropped: at once (a URL's first fetch), then every `refresh`
/// (every `min_refresh` while no set has been loaded).
async fn refresh_loop(jwks: Weak<Jwks>) {
    loop {
        let Some(j) = jwks.upgrade() else { return };
        j.refresh().await;
        let delay = if j.key_count().is_some() {
            j.refresh
        } else {
            j.min_refresh
        };
        drop(j);
        tokio::time::sleep(delay).await;
    }
}

fn describe_error(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        out.push_str(": ");
        out.push_str(&s.to_string());
        source = s.source();
    }
    out
}

fn read_file(path: &Path) -> Result<KeySet, JwksError> {
    let text = std::fs::read(path).map_err(|source| JwksError::Read {
        path: path.to_owned(),
        source,
    })?;
    parse_jwks(&text).map_err(|reason| JwksError::Parse {
        source_name: path.display().to_string(),
        reason,
    })
}

/// Loads the verification keys of a JWKS document (see the module documentation for which
/// keys are used).
fn parse_jwks(text: &[u8]) -> Result<KeySet, String> {
    #[derive(serde::Deserialize)]
    struct Document {
        keys: Vec<serde_json::Value>,
    }
    let doc: Document = serde_json::from_slice(text).map_err(|e| format!("not a JWKS: {e}"))?;
    let mut keys = Vec::new();
    for (i, value) in doc.keys.into_iter().enumerate() {
        if value.get("kty").and_then(|v| v.as_str()) == Some("oct") {
            return Err(format!(
                "key {i}: symmetric (oct) keys are not accepted; publish public keys only"
            ));
        }
        let jwk: Jwk = match serde_json::from_value(value) {
            Ok(jwk) => jwk,
            Err(e) => {
                tracing::warn!(key = i, error = %e, "JWKS: skipping a key of an unsupported form");
                continue;
            }
        };
        if jwk.common.public_key_use == Some(PublicKeyUse::Encryption) {
            continue;
        }
        let algorithms = match &jwk.algorithm {
            AlgorithmParameters::RSA(_) => vec![
                Algorithm::RS256,
                Algorithm::RS384,
                Algorithm::RS512,
                Algorithm::PS256,
                Algorithm::PS384,
                Algorithm::PS512,
            ],
            AlgorithmParameters::EllipticCurve(ec) => match ec.curve {
                EllipticCurve::P256 => vec![Algorithm::ES256],
                EllipticCurve::P384 => vec![Algorithm::ES384],
                _ => {
                    tracing::warn!(key = i, curve = ?ec.curve, "JWKS: skipping an EC key on an unsupported curve");
                    continue;
                }
            },
            AlgorithmParameters::OctetKeyPair(okp) if okp.curve == EllipticCurve::Ed25519 => {
                vec![Algorithm::EdDSA]
            }
            AlgorithmParameters::OctetKeyPair(okp) => {
                tracing::warn!(key = i, curve = ?okp.curve, "JWKS: skipping an OKP key on an unsupported curve");
                continue;
            }
            AlgorithmParameters::OctetKey(_) => {
                return Err(format!(
                    "key {i}: symmetric (oct) keys are not accepted; publish public keys only"
                ));
            }
        };
        // A key that names its algorithm is only used with that one.
        let algorithms: Vec<Algorithm> = match jwk.common.key_algorithm {
            Some(alg) => {
                let named = format!("{alg:?}");
                algorithms
                    .into_iter()
                    .filter(|a| format!("{a:?}") == named)
                    .collect()
            }
            None => algorithms,
        };
        if algorithms.is_empty() {
            tracing::warn!(
                key = i,
                "JWKS: skipping a key whose alg does not fit its type"
            );
            continue;
        }
        let key = match DecodingKey::from_jwk(&jwk) {
            Ok(key) => key,
            Err(e) => {
                tracing::warn!(key = i, error = %e, "JWKS: skipping an unusable key");
                continue;
            }
        };
        keys.push(Arc::new(JwtKey {
            kid: jwk.common.key_id.clone(),
            algorithms,
            key,
        }));
    }
    if keys.is_empty() {
        return Err("the JWKS holds no usable signing key".to_owned());
    }
    Ok(KeySet { keys })
}

/// Validates JWTs against a [`Jwks`] with a required issuer and audience.
#[derive(Debug, Clone)]
pub struct JwtVerifier {
    jwks: Arc<Jwks>,
    issuer: String,
    audience: String,
}

impl JwtVerifier {
    /// A verifier for tokens from `issuer` for `audience`, signed by a key of `jwks`.
    pub fn new(jwks: Arc<Jwks>, issuer: impl Into<String>, audience: impl Into<String>) -> Self {
        Self {
            jwks,
            issuer: issuer.into(),
            audience: audience.into(),
        }
    }

    /// The key set.
    pub fn jwks(&self) -> &Arc<Jwks> {
        &self.jwks
    }

    /// Whether `token` looks like a JWT (three dot-separated segments), so that a static
    /// token is not reported as a malformed JWT.
    pub fn looks_like_jwt(token: &str) -> bool {
        token.split('.').count() == 3
    }

    /// Verifies `token` and returns its claims.
    pub async fn verify(&self, token: &str) -> Result<serde_json::Value, JwtError> {
        let alg = header_alg(token)?;
        if alg.eq_ignore_ascii_case("none") || alg.to_ascii_uppercase().starts_with("HS") {
            return Err(JwtError::RefusedAlgorithm(alg));
        }
        let header =
            jsonwebtoken::decode_header(token).map_err(|e| JwtError::Malformed(e.to_string()))?;
        let candidates = self
            .jwks
            .candidates(header.kid.as_deref(), header.alg)
            .await?;
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
                        return Err(JwtError::Rejected(
                            "nbf is not a NumericDate (seconds since the epoch)".to_owned(),
                        ));
                    }
                    return Ok(data.claims);
                }
                Err(e) => last = e.to_string(),
            }
        }
        Err(JwtError::Rejected(last))
    }
}

/// The `alg` of a token's header, read without trusting anything else in it.
fn header_alg(token: &str) -> Result<String, JwtError> {
    let segment = token
        .split('.')
        .next()
        .ok_or_else(|| JwtError::Malformed("no header".to_owned()))?;
    let raw = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(segment.trim_end_matches('='))
        .map_err(|_| JwtError::Malformed("the header is not base64url".to_owned()))?;
    let header: serde_json::Value = serde_json::from_slice(&raw)
        .map_err(|_| JwtError::Malformed("the header is not JSON".to_owned()))?;
    header
        .get("alg")
        .and_then(|a| a.as_str())
        .map(str::to_owned)
        .ok_or_else(|| JwtError::Malformed("the header has no alg".to_owned()))
}
