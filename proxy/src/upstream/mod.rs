//! The connection to the Temporal frontend: pooled HTTP/2, reconnecting on its own, never one
//! connection per request. Failures become gRPC statuses that name the upstream, so a client
//! sees `UNAVAILABLE: upstream 127.0.0.1:7234 unreachable: ...` and retries.
//!
//! With `[proxy.upstream_tls]` connections are TLS (custom CA or the platform's roots, optional
//! client certificate, optional server-name override, which is then also the `:authority`);
//! with `proxy.api_key_env` requests without an `authorization` header get the API key.
//! Each `[upstreams.<name>]` is an [`Upstream`] of its own with the same settings under its
//! own keys; [`Router`] decides which one serves a request or a namespace.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use http::header::AUTHORIZATION;
use http::uri::{Authority, Scheme};
use http::{HeaderMap, HeaderValue, Request, Response, Uri};
use http_body::{Body, Frame};
use hyper::body::Incoming;
use hyper_rustls::MaybeHttpsStream;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::net::TcpStream;
use tower::ServiceExt;

pub mod client;
pub mod router;

pub use router::{Route, RouteError, RouteLayer, Router};

use crate::config::{ConfigError, ProxyConfig, UpstreamConfig, UpstreamTlsConfig};
use crate::errors::error_chain;
use crate::grpc::{BoxError, Code, GatewayBody, Status};
use crate::tls::UpstreamTls;

/// Headers that belong to one hop and must not be forwarded.
const HOP_BY_HOP: [&str; 6] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "transfer-encoding",
    "upgrade",
    "host",
];

/// A cheap-to-clone handle on the upstream connection pool.
#[derive(Clone, Debug)]
pub struct Upstream {
    client: Client<UpstreamConnector, GatewayBody>,
    /// How the pool dials, for [`with_own_pool`](Self::with_own_pool).
    connector: UpstreamConnector,
    scheme: Scheme,
    /// `proxy.upstream`: where connections go, and the name in messages and logs.
    authority: Authority,
    /// The `:authority` of forwarded requests: `proxy.upstream_tls.server_name` when set.
    request_authority: Authority,
    /// `authorization: Bearer <key>` from `proxy.api_key_env` (marked sensitive).
    api_key: Option<HeaderValue>,
}

/// Where one upstream is and how to reach it, with the config keys errors name.
struct UpstreamSpec<'a> {
    /// `host:port`.
    address: &'a str,
    /// The config key of `address` (`proxy.upstream`, `upstreams.<name>.address`).
    address_key: &'a str,
    tls: &'a UpstreamTlsConfig,
    /// The config key of `tls` (`proxy.upstream_tls`, `upstreams.<name>.tls`).
    tls_section: &'a str,
    api_key_env: Option<&'a str>,
    /// The config key of `api_key_env`.
    api_key_key: &'a str,
    connect_timeout_ms: u64,
}

impl Upstream {
    /// Builds the pool for `config.upstream`. No connection is opened until the first request.
    pub fn new(config: &ProxyConfig) -> Result<Self, ConfigError> {
        Self::build(&UpstreamSpec {
            address: &config.upstream,
            address_key: "proxy.upstream",
            tls: &config.upstream_tls,
            tls_section: "proxy.upstream_tls",
            api_key_env: config.api_key_env.as_deref(),
            api_key_key: "proxy.api_key_env",
            connect_timeout_ms: config.connect_timeout_ms,
        })
    }

    /// Builds the pool for `[upstreams.<name>]` (`upstream`); `default_connect_timeout_ms`
    /// (`proxy.connect_timeout_ms`) applies when it sets no `connect_timeout_ms` of its own.
    pub fn named(
        name: &str,
        upstream: &UpstreamConfig,
        default_connect_timeout_ms: u64,
    ) -> Result<Self, ConfigError> {
        let key = |k: &str| format!("upstreams.{name}.{k}");
        Self::build(&UpstreamSpec {
            address: &upstream.address,
            address_key: &key("address"),
            tls: &upstream.tls,
            tls_section: &key("tls"),
            api_key_env: upstream.api_key_env.as_deref(),
            api_key_key: &key("api_key_env"),
            connect_timeout_ms: upstream
                .connect_timeout_ms
                .unwrap_or(default_connect_timeout_ms),
        })
    }

    fn build(spec: &UpstreamSpec<'_>) -> Result<Self, ConfigError> {
        let authority: Authority = spec.address.parse().map_err(|e| {
            ConfigError::invalid(spec.address_key, format!("invalid authority: {e}"))
        })?;
        let tls = UpstreamTls::from_section(
            spec.tls,
            spec.tls_section,
            spec.address_key,
            authority.host(),
        )?;
        let (scheme, request_authority) = match &spec.tls.server_name {
            Some(name) if tls.is_some() => (
                Scheme::HTTPS,
                name.parse::<Authority>().map_err(|e| {
                    ConfigError::invalid(format!("{}.server_name", spec.tls_section), e.to_string())
                })?,
            ),
            _ if tls.is_some() => (Scheme::HTTPS, authority.clone()),
            _ => (Scheme::HTTP, authority.clone()),
        };
        let api_key = match spec.api_key_env {
            Some(var) => Some(api_key_header(spec.api_key_key, var)?),
            None => None,
        };
        if api_key.is_some() && tls.is_none() {
            tracing::warn!(
                upstream = %authority,
                "{} is set but {} is off: the API key travels in cleartext",
                spec.api_key_key,
                spec.tls_section
            );
        }
        let dial: Uri = format!("http://{authority}").parse().map_err(|e| {
            ConfigError::invalid(spec.address_key, format!("invalid authority: {e}"))
        })?;
        let timeout = Duration::from_millis(spec.connect_timeout_ms);
        let mut http = HttpConnector::new();
        http.set_nodelay(true);
        http.set_connect_timeout(Some(timeout));
        let connector = UpstreamConnector {
            http,
            dial,
            tls,
            timeout,
        };
        Ok(Self {
            client: pooled_client(connector.clone()),
            connector,
            scheme,
            authority,
            request_authority,
            api_key,
        })
    }

    /// The same upstream with a pool of its own: each connection thread uses one, so an
    /// RPC and the upstream connection it travels on stay on the same thread.
    pub fn with_own_pool(&self) -> Self {
        Self {
            client: pooled_client(self.connector.clone()),
            ..self.clone()
        }
    }

    /// The upstream's `host:port`, for messages and logs.
    pub fn authority(&self) -> &Authority {
        &self.authority
    }

    /// Sends `request` upstream and returns its response; transport failures become
    /// `UNAVAILABLE` responses naming the upstream.
    pub async fn forward(&self, request: Request<GatewayBody>) -> Response<GatewayBody> {
        let (mut parts, body) = request.into_parts();
        let path_and_query = parts.uri.path_and_query().cloned();
        let mut uri = Uri::builder()
            .scheme(self.scheme.clone())
            .authority(self.request_authority.clone());
        if let Some(pq) = path_and_query {
            uri = uri.path_and_query(pq);
        }
        parts.uri = match uri.build() {
            Ok(uri) => uri,
            Err(e) => {
                return Status::new(Code::InvalidArgument, format!("bad request path: {e}"))
                    .into_response();
            }
        };
        strip_hop_by_hop(&mut parts.headers);
        let deadline = parts
            .headers
            .get("grpc-timeout")
            .and_then(|v| v.to_str().ok())
            .and_then(parse_grpc_timeout)
            .map(|t| std::time::Instant::now() + t);
        if let Some(key) = &self.api_key {
            // The client's own credentials win.
            if !parts.headers.contains_key(AUTHORIZATION) {
                parts.headers.insert(AUTHORIZATION, key.clone());
            }
        }
        match self.client.request(Request::from_parts(parts, body)).await {
            Ok(response) => match crate::non_grpc::check(response, &self.authority).await {
                Ok(response) => response
                    .map(|body| GatewayBody::new(UpstreamBody::new(body, self.authority.clone()))),
                Err(status) => {
                    tracing::warn!(upstream = %self.authority, error = %status.message, "upstream answered without gRPC");
                    status.into_response()
                }
            },
            Err(e) if deadline.is_some_and(|d| std::time::Instant::now() >= d) => {
                // The server resets the stream when the call's deadline passes (a query
                // nobody answers): the client's deadline, not the upstream, ended it.
                tracing::debug!(upstream = %self.authority, error = %error_chain(&e), "upstream stream ended at the call's deadline");
                Status::new(
                    Code::DeadlineExceeded,
                    format!(
                        "deadline exceeded: the upstream ended the call at its grpc-timeout ({})",
                        error_chain(&e)
                    ),
                )
                .into_response()
            }
            Err(e) => {
                tracing::warn!(upstream = %self.authority, error = %error_chain(&e), "upstream request failed");
                Status::new(
                    Code::Unavailable,
                    format!(
                        "upstream {} unreachable: {}",
                        self.authority,
                        error_chain(&e)
                    ),
                )
                .into_response()
            }
        }
    }
}

impl tower::Service<Request<GatewayBody>> for Upstream {
    type Response = Response<GatewayBody>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Infallible>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: Request<GatewayBody>) -> Self::Future {
        let upstream = self.clone();
        Box::pin(async move { Ok(upstream.forward(request).await) })
    }
}

/// An HTTP/2 connection pool dialing through `connector`.
fn pooled_client(connector: UpstreamConnector) -> Client<UpstreamConnector, GatewayBody> {
    Client::builder(TokioExecutor::new())
        .http2_only(true)
        .timer(TokioTimer::new())
        // Detect a dead upstream connection while long polls are idle on it. Temporal's
        // frontend permits pings every 10 s without streams; stay well above that.
        .http2_keep_alive_interval(Duration::from_secs(30))
        .http2_keep_alive_timeout(Duration::from_secs(10))
        .http2_keep_alive_while_idle(true)
        .http2_initial_stream_window_size(4 * 1024 * 1024)
        .http2_initial_connection_window_size(16 * 1024 * 1024)
        .http2_max_frame_size(1024 * 1024)
        .pool_idle_timeout(Duration::from_secs(300))
        .build(connector)
}

/// Parses a `grpc-timeout` header value: at most 8 digits and a unit (`H`, `M`, `S`, `m`,
/// `u`, `n`), as the gRPC HTTP/2 protocol defines it.
fn parse_grpc_timeout(value: &str) -> Option<std::time::Duration> {
    use std::time::Duration;
    if !value.is_ascii() {
        return None;
    }
    let (digits, unit) = value.split_at(value.len().checked_sub(1)?);
    if digits.is_empty() || digits.len() > 8 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let n: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n * 3600),
        "M" => Duration::from_secs(n * 60),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

/// `Bearer <key>` from the environment variable `var` (named by config key `config_key`),
/// marked sensitive (never logged).
fn api_key_header(config_key: &str, var: &str) -> Result<HeaderValue, ConfigError> {
    let key = std::env::var(var).map_err(|e| {
        ConfigError::invalid(config_key, format!("environment variable {var}: {e}"))
    })?;
    let key = key.trim();
    if key.is_empty() {
        return Err(ConfigError::invalid(
            config_key,
            format!("environment variable {var} is empty"),
        ));
    }
    let mut value = HeaderValue::try_from(format!("Bearer {key}")).map_err(|_| {
        ConfigError::invalid(
            config_key,
            format!("environment variable {var} holds characters not allowed in a header"),
        )
    })?;
    value.set_sensitive(true);
    Ok(value)
}

/// Opens connections to the upstream: always to `proxy.upstream` (whatever the request URI's
/// authority, which may be the TLS server name), TLS when configured, the whole of it bounded
/// by `proxy.connect_timeout_ms`.
#[derive(Clone, Debug)]
pub struct UpstreamConnector {
    http: HttpConnector,
    dial: Uri,
    tls: Option<UpstreamTls>,
    timeout: Duration,
}

impl tower::Service<Uri> for UpstreamConnector {
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
        let timeout = self.timeout;
        Box::pin(async move {
            let connect = async move {
                let tcp = http.oneshot(dial).await?;
                let Some(tls) = tls else {
                    return Ok::<_, BoxError>(MaybeHttpsStream::Http(tcp));
                };
                let stream = tls
                    .connector
                    .connect(tls.server_name.clone(), TokioIo::new(tcp))
                    .await
                    .map_err(|e| {
                        format!(
                            "TLS handshake with {} failed: {e}",
                            tls.server_name.to_str()
                        )
                    })?;
                Ok(MaybeHttpsStream::Https(TokioIo::new(stream)))
            };
            match tokio::time::timeout(timeout, connect).await {
                Ok(result) => result,
                Err(_) => Err(format!("connect timed out after {} ms", timeout.as_millis()).into()),
            }
        })
    }
}

fn strip_hop_by_hop(headers: &mut HeaderMap) {
    for name in HOP_BY_HOP {
        headers.remove(name);
    }
}

/// An upstream response body whose transport failure ends the stream with an `UNAVAILABLE`
/// status in trailers instead of a reset, so clients see a status they retry.
struct UpstreamBody {
    inner: Incoming,
    authority: Authority,
    done: bool,
}

impl UpstreamBody {
    fn new(inner: Incoming, authority: Authority) -> Self {
        Self {
            inner,
            authority,
            done: false,
        }
    }
}

impl Body for UpstreamBody {
    type Data = bytes::Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        if self.done {
            return Poll::Ready(None);
        }
        match Pin::new(&mut self.inner).poll_frame(cx) {
            Poll::Ready(Some(Err(e))) => {
                self.done = true;
                let status = Status::new(
                    Code::Unavailable,
                    format!(
                        "upstream {} connection lost: {}",
                        self.authority,
                        error_chain(&e)
                    ),
                );
                let mut trailers = HeaderMap::new();
                status.write_to(&mut trailers);
                Poll::Ready(Some(Ok(Frame::trailers(trailers))))
            }
            Poll::Ready(Some(Ok(frame))) => Poll::Ready(Some(Ok(frame))),
            Poll::Ready(None) => {
                self.done = true;
                Poll::Ready(None)
            }
            Poll::Pending => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.done || self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod timeout_tests {
    #[test]
    fn grpc_timeouts_parse() {
        use std::time::Duration;
        assert_eq!(
            super::parse_grpc_timeout("2999m"),
            Some(Duration::from_millis(2999))
        );
        assert_eq!(
            super::parse_grpc_timeout("1H"),
            Some(Duration::from_secs(3600))
        );
        assert_eq!(
            super::parse_grpc_timeout("10S"),
            Some(Duration::from_secs(10))
        );
        assert_eq!(super::parse_grpc_timeout("123456789S"), None);
        assert_eq!(super::parse_grpc_timeout("S"), None);
        assert_eq!(super::parse_grpc_timeout("5x"), None);
        assert_eq!(super::parse_grpc_timeout(""), None);
    }
}
