//! Which upstream serves a request: the one place that decides it, for forwarded traffic
//! ([`RouteLayer`], then the [`Router`] as the stack's innermost service) and for the
//! gateway's own calls ([`Router::for_namespace`]: namespace ids for `[proxy.auth]`, ...).
//!
//! A namespace bound with `[namespaces.<ns>] upstream = "<name>"` goes to `[upstreams.<name>]`;
//! every other namespace, and every method that names no namespace (`GetSystemInfo`,
//! `ListNamespaces`, health checks, operator cluster and Nexus endpoint methods), goes to the
//! default `[proxy] upstream`. The namespace is the one the ingress decided
//! ([`Inspected::namespace`]), never a client-chosen header.
//!
//! Fail closed: with any binding configured, a request whose upstream the gateway cannot
//! decide — a `temporal.*` method the descriptors do not know, a request that names its
//! namespace only by id — is refused with a status naming why, so a request meant for a
//! namespace bound elsewhere never reaches the default by accident.

use std::collections::HashMap;
use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use http::{Request, Response};

use super::Upstream;
use crate::config::{Config, ConfigError};
use crate::grpc::layer::{Handler, Inner, forward};
use crate::grpc::{Code, GatewayBody, Status};
use crate::ingress::{Inspected, Target};

/// The prefix of every Temporal service path.
const TEMPORAL_PREFIX: &str = "/temporal.";

/// Which upstream a request goes to: decided once by [`RouteLayer`] (or
/// [`Router::route`]) and carried in the request's extensions to the [`Router`] service.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route {
    /// `[proxy] upstream`.
    Default,
    /// The named upstream at this index of the router's table.
    Named(usize),
}

/// Why no upstream may serve a request.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RouteError {
    /// Routing is configured, but the request carries no decision of the ingress.
    #[error(
        "gateway misconfigured: routing by namespace ran without the ingress's decision; refused rather than sent to the default upstream"
    )]
    NotInspected,
    /// A `temporal.*` method the descriptors do not know: its namespace cannot be read.
    #[error(
        "method {0} is unknown to the gateway, which cannot tell which namespace, and so which upstream, it belongs to; refused because namespaces are bound to upstreams ([namespaces.<ns>] upstream)"
    )]
    UnknownMethod(String),
    /// The request names its namespace only by id, which says nothing about its upstream.
    #[error(
        "{0}; the gateway cannot tell which upstream serves a namespace named by id, so the request is refused because namespaces are bound to upstreams ([namespaces.<ns>] upstream)"
    )]
    ById(String),
    /// A workflow task completion of one namespace whose commands name a namespace served
    /// by another upstream (there, the name would be another cluster's namespace).
    #[error(
        "a command of this {namespace:?} workflow task names namespace {nested:?}, which is served by upstream {nested_upstream:?}, not by {upstream:?}; cross-namespace commands cannot cross upstreams"
    )]
    CrossUpstream {
        /// The request's namespace.
        namespace: String,
        /// Its upstream's name.
        upstream: String,
        /// The namespace a command names.
        nested: String,
        /// That namespace's upstream's name.
        nested_upstream: String,
    },
    /// The commands of a workflow task completion could not be read.
    #[error(
        "the commands of this workflow task cannot be read ({0}), so the namespaces they name cannot be checked against their upstreams"
    )]
    Commands(String),
}

impl RouteError {
    /// The gRPC status the refusal is answered with.
    pub fn status(&self) -> Status {
        let code = match self {
            Self::NotInspected => Code::Internal,
            Self::UnknownMethod(_) => Code::Unimplemented,
            Self::ById(_) | Self::CrossUpstream { .. } => Code::FailedPrecondition,
            Self::Commands(_) => Code::InvalidArgument,
        };
        Status::new(code, self.to_string())
    }
}

/// Namespace → named upstream, shared by every copy of a [`Router`].
#[derive(Debug, Default)]
struct Bindings {
    /// The names of the named upstreams, by index.
    names: Vec<String>,
    /// Bound namespaces and the index of their upstream.
    by_namespace: HashMap<String, usize>,
}

/// The upstreams and which namespace goes to which. Cheap to clone; as a tower service it
/// forwards each request to the upstream its [`Route`] names.
#[derive(Debug, Clone)]
pub struct Router {
    default: Upstream,
    /// `[upstreams.<name>]`, in the order of [`Bindings::names`].
    named: Vec<Upstream>,
    bindings: Arc<Bindings>,
}

impl Router {
    /// One upstream for everything (no bindings).
    pub fn single(default: Upstream) -> Self {
        Self {
            default,
            named: Vec::new(),
            bindings: Arc::default(),
        }
    }

    /// The default `[proxy] upstream`, every `[upstreams.<name>]` and the bindings of
    /// `[namespaces.<ns>] upstream`. No connection is opened until the first request.
    /// An upstream no namespace is bound to is built (its settings checked) but logged as
    /// unused.
    pub fn from_config(config: &Config) -> Result<Self, ConfigError> {
        let default = Upstream::new(&config.proxy)?;
        let mut names = Vec::with_capacity(config.upstreams.len());
        let mut named = Vec::with_capacity(config.upstreams.len());
        for (name, upstream) in &config.upstreams {
            named.push(Upstream::named(
                name,
                upstream,
                config.proxy.connect_timeout_ms,
            )?);
            names.push(name.clone());
        }
        let mut by_namespace = HashMap::new();
        for (namespace, name) in crate::config::upstream_bindings(config) {
            let index = names.iter().position(|n| n == name).ok_or_else(|| {
                ConfigError::invalid(
                    format!("namespaces.{namespace}.upstream"),
                    format!("names upstream {name:?}, which is not in [upstreams]"),
                )
            })?;
            by_namespace.insert(namespace.to_owned(), index);
        }
        for (index, name) in names.iter().enumerate() {
            if !by_namespace.values().any(|i| *i == index) {
                tracing::warn!(
                    upstream = %name,
                    "[upstreams.{name}] is configured but no [namespaces.<ns>] upstream names it: unused"
                );
            }
        }
        Ok(Self {
            default,
            named,
            bindings: Arc::new(Bindings {
                names,
                by_namespace,
            }),
        })
    }

    /// Whether any namespace is bound to a named upstream: requests must then be routed by
    /// the ingress's decision ([`RouteLayer`] in front of the router).
    pub fn is_routing(&self) -> bool {
        !self.bindings.by_namespace.is_empty()
    }

    /// The same upstreams, each with a pool of its own (one per connection thread, see
    /// [`Upstream::with_own_pool`]).
    pub fn with_own_pools(&self) -> Self {
        Self {
            default: self.default.with_own_pool(),
            named: self.named.iter().map(Upstream::with_own_pool).collect(),
            bindings: self.bindings.clone(),
        }
    }

    /// The namespaces bound to a named upstream, sorted (the default's `ListNamespaces` does
    /// not list them).
    pub fn bound_namespaces(&self) -> Vec<String> {
        let mut names: Vec<String> = self.bindings.by_namespace.keys().cloned().collect();
        names.sort();
        names
    }

    /// The default upstream (`[proxy] upstream`).
    pub fn default_upstream(&self) -> &Upstream {
        &self.default
    }

    /// The route of `namespace`: its bound upstream, else the default.
    pub fn route_of_namespace(&self, namespace: &str) -> Route {
        match self.bindings.by_namespace.get(namespace) {
            Some(index) => Route::Named(*index),
            None => Route::Default,
        }
    }

    /// The upstream that serves `namespace`: for the gateway's own calls about it.
    pub fn for_namespace(&self, namespace: &str) -> &Upstream {
        self.upstream(self.route_of_namespace(namespace))
    }

    /// The upstream `route` names (the default for an index out of range, which no route
    /// of this router's tables holds).
    pub fn upstream(&self, route: Route) -> &Upstream {
        match route {
            Route::Named(index) => self.named.get(index).unwrap_or(&self.default),
            Route::Default => &self.default,
        }
    }

    /// The upstream's name for logs: `default` or the `[upstreams.<name>]` name.
    pub fn name(&self, route: Route) -> &str {
        match route {
            Route::Named(index) => self
                .bindings
                .names
                .get(index)
                .map_or("default", String::as_str),
            Route::Default => "default",
        }
    }

    /// Every upstream: name and `host:port`, the default first.
    pub fn describe(&self) -> Vec<(String, String)> {
        std::iter::once(("default".to_owned(), self.default.authority().to_string()))
            .chain(
                self.bindings
                    .names
                    .iter()
                    .zip(&self.named)
                    .map(|(name, u)| (name.clone(), u.authority().to_string())),
            )
            .collect()
    }

    /// Decides the upstream of a request at `path` from what the ingress decided about it
    /// (`inspected`). Without bindings everything goes to the default.
    pub fn route(&self, inspected: Option<&Inspected>, path: &str) -> Result<Route, RouteError> {
        if !self.is_routing() {
            return Ok(Route::Default);
        }
        let Some(inspected) = inspected else {
            return Err(RouteError::NotInspected);
        };
        match &inspected.target {
            Target::Namespace(namespace) => {
                let route = self.route_of_namespace(namespace);
                let nested = inspected
                    .nested_namespaces
                    .as_ref()
                    .map_err(|e| RouteError::Commands(e.to_string()))?;
                for other in nested {
                    let other_route = self.route_of_namespace(other);
                    if other_route != route {
                        return Err(RouteError::CrossUpstream {
                            namespace: namespace.clone(),
                            upstream: self.name(route).to_owned(),
                            nested: other.clone(),
                            nested_upstream: self.name(other_route).to_owned(),
                        });
                    }
                }
                Ok(route)
            }
            Target::Open => Ok(Route::Default),
            Target::Global(reason) => {
                if inspected.method.is_none() {
                    // Methods of other services (health checks, reflection) carry no
                    // namespace; an unknown Temporal method might.
                    return if path.starts_with(TEMPORAL_PREFIX) {
                        Err(RouteError::UnknownMethod(path.to_owned()))
                    } else {
                        Ok(Route::Default)
                    };
                }
                match &inspected.namespace {
                    // The type has a `namespace` field, yet the target is global: the request
                    // names its namespace by id.
                    Some(_) => Err(RouteError::ById(reason.clone())),
                    // The type names no namespace: cluster-wide methods.
                    None => Ok(Route::Default),
                }
            }
        }
    }
}

impl tower::Service<Request<GatewayBody>> for Router {
    type Response = Response<GatewayBody>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Infallible>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: Request<GatewayBody>) -> Self::Future {
        let route = match request.extensions().get::<Route>() {
            Some(route) => *route,
            None if self.is_routing() => {
                let status = RouteError::NotInspected.status();
                return Box::pin(async move { Ok(status.into_response()) });
            }
            None => Route::Default,
        };
        let upstream = self.upstream(route).clone();
        Box::pin(async move { Ok(upstream.forward(request).await) })
    }
}

/// Decides each request's [`Route`] from the ingress's decision and puts it in the
/// request's extensions (a [`Handler`]: stack it with [`crate::grpc::layer::HandlerLayer`]
/// behind the ingress and authorization, in front of the payload rewrite); refuses what it
/// cannot route.
#[derive(Debug, Clone)]
pub struct RouteLayer {
    /// Shared: the layer is cloned for every request and only reads the bindings.
    router: Arc<Router>,
}

impl RouteLayer {
    /// Routes with `router`'s bindings.
    pub fn new(router: &Router) -> Self {
        Self {
            router: Arc::new(router.clone()),
        }
    }
}

impl Handler for RouteLayer {
    async fn handle<S: Inner>(
        self,
        inner: S,
        mut request: Request<GatewayBody>,
    ) -> Response<GatewayBody> {
        match self
            .router
            .route(Inspected::of(&request), request.uri().path())
        {
            Ok(route) => {
                request.extensions_mut().insert(route);
                forward(inner, request).await
            }
            Err(refusal) => {
                tracing::warn!(method = %request.uri().path(), reason = %refusal, "request refused: no upstream can be decided");
                refusal.status().into_response()
            }
        }
    }
}

#[cfg(test)]
mod tests;
