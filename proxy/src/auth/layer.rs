//! `[proxy.auth]`: the tower layer that decides who may call the gRPC listener, for which
//! namespace, before anything reaches the payload pipeline or the upstream.
//!
//! 1. **Authenticate.** The `authorization` header (when tokens or JWTs are configured) must
//!    be a configured static token or a valid JWT; a verified client certificate is matched
//!    against `[[proxy.auth.client_certs]]`. A presented bearer credential that is invalid is
//!    refused even when a certificate would match (no silent fallback). The grants of every
//!    valid credential add up. Nothing valid: `UNAUTHENTICATED`.
//! 2. **Find the namespace** the server will act on: the single ingress
//!    ([`crate::ingress`]) reads the body, only after authentication (an anonymous caller
//!    cannot make the gateway buffer anything), and decides it from the bytes it forwards.
//! 3. **Authorize.** The namespace must be granted; a `temporal-namespace` header that
//!    disagrees with the body, a namespace-less or unknown method without a `"*"` grant, and
//!    an empty namespace are refused: `PERMISSION_DENIED`, naming what is missing.
//! 4. **Forward**, with the client's `authorization` removed unless
//!    `forward_client_authorization = true` (then the upstream's API key from
//!    `proxy.api_key_env` is attached instead, by the upstream connection).
//!
//! Refused requests never reach the upstream, so the upstream credential is never attached
//! to them. Denials never contain the presented token.

use std::sync::Arc;
use std::time::Duration;

use http::header::AUTHORIZATION;
use http::{HeaderMap, Request, Response};

use super::client_cert::{CertMappings, ClientIdentity};
use super::jwks::{Jwks, JwksSettings, JwksSource, JwtVerifier};
use super::namespace_ids::NamespaceIds;
use super::tokens::{TokenSet, bearer};
use super::{Grant, grant_from_claim};
use crate::config::{AuthConfig, ConfigError};
use crate::grpc::layer::{Handler, Inner, forward};
use crate::grpc::{Code, GatewayBody, Status};
use crate::ingress::{Inspected, Target};
use crate::metrics::{method_label, metrics};
use payload_gateway_proto::StringFieldError;

/// The header naming the namespace for routing (Temporal Cloud); must agree with the body.
const NAMESPACE_HEADER: &str = "temporal-namespace";

/// A refused request: the status and the metric labels.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Denial {
    /// `UNAUTHENTICATED` or `PERMISSION_DENIED`, with a message naming what is missing.
    pub status: Status,
    /// The credential kind that was presented (`none` when none).
    pub credential: &'static str,
}

impl Denial {
    fn unauthenticated(credential: &'static str, message: impl Into<String>) -> Self {
        Self {
            status: Status::new(Code::Unauthenticated, message),
            credential,
        }
    }

    fn denied(credential: &'static str, message: impl Into<String>) -> Self {
        Self {
            status: Status::new(Code::PermissionDenied, message),
            credential,
        }
    }

    fn result(&self) -> &'static str {
        if self.status.code == Code::Unauthenticated {
            "unauthenticated"
        } else {
            "permission_denied"
        }
    }
}

/// An authenticated caller: what it may act on and how it proved who it is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    /// The namespaces granted.
    pub grant: Grant,
    /// `token`, `jwt` or `client_cert` (the first valid credential).
    pub credential: &'static str,
}

/// The configured credentials of `[proxy.auth]`.
#[derive(Debug)]
pub struct Authorizer {
    tokens: TokenSet,
    jwt: Option<(JwtVerifier, String)>,
    certs: CertMappings,
    forward_client_authorization: bool,
}

impl Authorizer {
    /// Reads token variables through `env` (`std::env::var` in production) and loads the
    /// JWKS (a file now; a URL in the background, see [`Jwks::new`]).
    pub fn from_config(
        config: &AuthConfig,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<Self, ConfigError> {
        let mut tokens = TokenSet::default();
        for (i, t) in config.tokens.iter().enumerate() {
            tokens.add_from_env(
                &format!("proxy.auth.tokens[{i}].env"),
                &t.env,
                Grant::from_list(&t.namespaces),
                &env,
            )?;
        }
        let jwt = match &config.jwt {
            None => None,
            Some(j) => {
                let mut settings = JwksSettings::new(
                    "proxy.auth.jwt.",
                    j.jwks_file.as_deref(),
                    j.jwks_url.as_deref(),
                    j.jwks_ca_file.as_deref(),
                )?
                .ok_or_else(|| {
                    ConfigError::invalid("proxy.auth.jwt.jwks_url", "give jwks_file or jwks_url")
                })?;
                settings.refresh = Duration::from_secs(j.jwks_refresh_secs);
                settings.min_refresh = Duration::from_secs(j.jwks_min_refresh_secs);
                let jwks = Jwks::new(settings)?;
                Some((
                    JwtVerifier::new(jwks, &j.issuer, &j.audience),
                    j.namespaces_claim.clone(),
                ))
            }
        };
        Ok(Self {
            tokens,
            jwt,
            certs: CertMappings::from_config(&config.client_certs),
            forward_client_authorization: config.forward_client_authorization,
        })
    }

    /// The JWKS of `[proxy.auth.jwt]`, if configured.
    pub fn jwks(&self) -> Option<&Arc<Jwks>> {
        self.jwt.as_ref().map(|(v, _)| v.jwks())
    }

    /// Whether bearer credentials (tokens or JWTs) are configured: only then is the
    /// `authorization` header the gateway's to check.
    fn takes_bearer(&self) -> bool {
        !self.tokens.is_empty() || self.jwt.is_some()
    }

    /// What a caller without a valid credential is told to bring.
    fn accepted(&self) -> String {
        let mut kinds = Vec::new();
        if !self.tokens.is_empty() {
            kinds.push("a bearer token of proxy.auth.tokens");
        }
        if self.jwt.is_some() {
            kinds.push("a JWT accepted by proxy.auth.jwt");
        }
        if !self.certs.is_empty() {
            kinds.push("a client certificate mapped in proxy.auth.client_certs");
        }
        kinds.join(" or ")
    }

    /// Authenticates a request from its headers and the connection's verified client
    /// certificate.
    pub async fn authenticate(
        &self,
        headers: &HeaderMap,
        identity: Option<&ClientIdentity>,
    ) -> Result<Caller, Denial> {
        let mut caller: Option<Caller> = None;
        if self.takes_bearer() {
            let mut values = headers.get_all(AUTHORIZATION).iter();
            let first = values.next();
            if values.next().is_some() {
                return Err(Denial::unauthenticated(
                    "none",
                    "more than one authorization header",
                ));
            }
            let token = match first.map(|v| bearer(v.as_bytes())) {
                Some(Err(why)) => return Err(Denial::unauthenticated("none", why)),
                Some(Ok(token)) => token,
                None => None,
            };
            if let Some(token) = token {
                caller = Some(self.bearer_caller(token).await?);
            }
        }
        if let Some(identity) = identity
            && let Some(grant) = self.certs.grant(identity)
        {
            caller = Some(match caller {
                Some(c) => Caller {
                    grant: c.grant.union(grant),
                    credential: c.credential,
                },
                None => Caller {
                    grant,
                    credential: "client_cert",
                },
            });
        }
        caller.ok_or_else(|| {
            let unmapped = match identity {
                Some(id) if !self.certs.is_empty() => format!(
                    "; the client certificate ({}) is not mapped in proxy.auth.client_certs",
                    id.describe()
                ),
                _ => String::new(),
            };
            Denial::unauthenticated(
                "none",
                format!(
                    "authentication required: present {}{unmapped}",
                    self.accepted()
                ),
            )
        })
    }

    async fn bearer_caller(&self, token: &str) -> Result<Caller, Denial> {
        if let Some(grant) = self.tokens.find(token) {
            return Ok(Caller {
                grant,
                credential: "token",
            });
        }
        match &self.jwt {
            Some((verifier, claim)) if JwtVerifier::looks_like_jwt(token) => {
                let claims = verifier
                    .verify(token)
                    .await
                    .map_err(|e| Denial::unauthenticated("jwt", format!("invalid JWT: {e}")))?;
                let grant = grant_from_claim(&claims, claim)
                    .map_err(|why| Denial::unauthenticated("jwt", format!("invalid JWT: {why}")))?;
                Ok(Caller {
                    grant,
                    credential: "jwt",
                })
            }
            _ => Err(Denial::unauthenticated(
                "token",
                format!(
                    "invalid credentials: the bearer token is not one the gateway accepts \
                     (present {})",
                    self.accepted()
                ),
            )),
        }
    }

    /// Whether `caller` may act on `target`; `header`: the `temporal-namespace` header.
    pub fn authorize(
        &self,
        caller: &Caller,
        target: &Target,
        header: Option<&str>,
    ) -> Result<(), Denial> {
        let denied = |message: String| Denial::denied(caller.credential, message);
        match target {
            Target::Open => Ok(()),
            Target::Global(why) => match caller.grant {
                Grant::All => Ok(()),
                Grant::Namespaces(_) => Err(denied(format!(
                    "{why}; only an identity granted every namespace (\"*\") may call it"
                ))),
            },
            Target::Namespace(ns) => {
                if let Some(h) = header
                    && h != ns
                {
                    return Err(denied(format!(
                        "the temporal-namespace header names {h:?} but the request acts on \
                         namespace {ns:?}"
                    )));
                }
                if ns.is_empty() && caller.grant != Grant::All {
                    return Err(denied(
                        "the request names no namespace; only an identity granted every \
                         namespace (\"*\") may send it"
                            .to_owned(),
                    ));
                }
                if !caller.grant.permits(ns) {
                    return Err(denied(format!(
                        "this credential is not granted namespace {ns:?}"
                    )));
                }
                Ok(())
            }
        }
    }
}

/// `[proxy.auth]` as two tower layers around the ingress: [`AuthLayer::authenticate`] before
/// it (headers only: an anonymous caller cannot make the gateway read a body) and
/// [`AuthLayer::authorize`] after it (against the namespace the ingress decided).
#[derive(Debug, Clone)]
pub struct AuthLayer {
    authorizer: Arc<Authorizer>,
    namespace_ids: Arc<NamespaceIds>,
}

impl AuthLayer {
    /// Checks requests with `authorizer`; task tokens against the namespace ids that
    /// `namespace_ids` reads from the server.
    pub fn new(authorizer: Arc<Authorizer>, namespace_ids: Arc<NamespaceIds>) -> Self {
        if let Some(jwks) = authorizer.jwks()
            && let JwksSource::Url(url) = jwks.source()
        {
            tracing::info!(jwks = %url, "proxy.auth: JWTs verified against a JWKS URL");
        }
        Self {
            authorizer,
            namespace_ids,
        }
    }

    /// The layer in front of the ingress: authenticates from headers and the client
    /// certificate, and hands the [`Caller`] to [`Self::authorize`].
    pub fn authenticate(&self) -> AuthStep {
        AuthStep {
            layer: self.clone(),
            step: Step::Authenticate,
        }
    }

    /// The layer behind the ingress: authorizes the caller for the request's [`Inspected`]
    /// target, then strips the client's `authorization` (unless configured to forward it).
    pub fn authorize(&self) -> AuthStep {
        AuthStep {
            layer: self.clone(),
            step: Step::Authorize,
        }
    }
}

/// One of the two steps of [`AuthLayer`], a [`Handler`] (stack it with
/// [`crate::grpc::layer::HandlerLayer`]).
#[derive(Debug, Clone)]
pub struct AuthStep {
    layer: AuthLayer,
    step: Step,
}

#[derive(Debug, Clone, Copy)]
enum Step {
    Authenticate,
    Authorize,
}

impl Handler for AuthStep {
    async fn handle<S: Inner>(
        self,
        inner: S,
        request: Request<GatewayBody>,
    ) -> Response<GatewayBody> {
        let request = match self.step {
            Step::Authenticate => self.authenticate(request).await,
            Step::Authorize => self.authorize(request).await,
        };
        match request {
            Ok(request) => forward(inner, request).await,
            Err((denial, path)) => refuse(&path, denial),
        }
    }
}

/// Answers a refused request (and counts and logs it, never with the credential).
fn refuse(path: &str, denial: Denial) -> Response<GatewayBody> {
    metrics().count_auth(denial.result(), denial.credential);
    tracing::warn!(
        method = %method_label(path),
        credential = denial.credential,
        code = ?denial.status.code,
        reason = %denial.status.message,
        "request refused by proxy.auth"
    );
    denial.status.into_response()
}

impl AuthStep {
    /// What the server acts on beyond the request's own namespace: namespaces named by its
    /// commands, and the namespace of its task token. A caller granted every namespace may
    /// act on all of them.
    async fn authorize_inside(&self, caller: &Caller, inspected: &Inspected) -> Result<(), Denial> {
        if caller.grant == Grant::All {
            return Ok(());
        }
        let denied = |message: String| Denial::denied(caller.credential, message);
        let unreadable = |e: &StringFieldError| Denial {
            status: Status::new(
                Code::InvalidArgument,
                format!("cannot authorize what the request acts on: {e}"),
            ),
            credential: caller.credential,
        };
        let nested = inspected.nested_namespaces.as_ref().map_err(unreadable)?;
        if let Some(ns) = nested.iter().find(|ns| !caller.grant.permits(ns)) {
            return Err(denied(format!(
                "a command of this request acts on namespace {ns:?}, which this credential is \
                 not granted"
            )));
        }
        let task_namespace_id = inspected.task_namespace_id.as_ref().map_err(unreadable)?;
        if let (Some(id), Target::Namespace(ns)) = (task_namespace_id, &inspected.target) {
            match self.layer.namespace_ids.is_id_of(ns, id).await {
                Ok(true) => {}
                Ok(false) => {
                    return Err(denied(format!(
                        "the task token belongs to another namespace than {ns:?}, the one the \
                         request names and this credential is granted"
                    )));
                }
                Err(e) => {
                    return Err(Denial {
                        status: Status::new(Code::Unavailable, e.to_string()),
                        credential: caller.credential,
                    });
                }
            }
        }
        Ok(())
    }

    async fn authenticate(
        &self,
        mut request: Request<GatewayBody>,
    ) -> Result<Request<GatewayBody>, (Denial, String)> {
        let identity = request.extensions().get::<Arc<ClientIdentity>>().cloned();
        let caller = self
            .layer
            .authorizer
            .authenticate(request.headers(), identity.as_deref())
            .await
            .map_err(|d| (d, request.uri().path().to_owned()))?;
        request.extensions_mut().insert(caller);
        Ok(request)
    }

    async fn authorize(
        &self,
        mut request: Request<GatewayBody>,
    ) -> Result<Request<GatewayBody>, (Denial, String)> {
        let path = request.uri().path().to_owned();
        // Both are put there by the layers in front; a stack without them fails closed.
        let (Some(caller), Some(inspected)) = (
            request.extensions().get::<Caller>(),
            Inspected::of(&request),
        ) else {
            let denial = Denial {
                status: Status::new(
                    Code::Internal,
                    "gateway misconfigured: authorization ran without authentication and ingress",
                ),
                credential: "none",
            };
            return Err((denial, path));
        };
        let headers = request.headers();
        let header = match headers.get_all(NAMESPACE_HEADER).iter().count() {
            0 => None,
            1 => Some(
                headers
                    .get(NAMESPACE_HEADER)
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or("(not UTF-8)"),
            ),
            _ => Some("(several headers)"),
        };
        let authorizer = &self.layer.authorizer;
        authorizer
            .authorize(caller, &inspected.target, header)
            .map_err(|d| (d, path.clone()))?;
        self.authorize_inside(caller, inspected)
            .await
            .map_err(|d| (d, path.clone()))?;
        metrics().count_auth("allowed", caller.credential);
        if !authorizer.forward_client_authorization {
            request.headers_mut().remove(AUTHORIZATION);
        }
        Ok(request)
    }
}
