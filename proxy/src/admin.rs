//! The admin HTTP listener: `/metrics` (Prometheus), `/healthz` (the process is alive) and
//! `/readyz` (the upstream accepts connections).

use std::convert::Infallible;
use std::future::Future;
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tokio::net::TcpListener;

/// How long a readiness probe waits for the upstream.
const PROBE_TIMEOUT: Duration = Duration::from_secs(1);

/// What `/readyz` checks.
#[derive(Debug, Clone)]
pub struct Readiness {
    /// The upstream's `host:port`.
    pub upstream: String,
}

impl Readiness {
    /// `Ok` when a TCP connection to the upstream opens within [`PROBE_TIMEOUT`].
    pub async fn check(&self) -> Result<(), String> {
        match tokio::time::timeout(
            PROBE_TIMEOUT,
            tokio::net::TcpStream::connect(&self.upstream),
        )
        .await
        {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(e)) => Err(format!("upstream {} unreachable: {e}", self.upstream)),
            Err(_) => Err(format!(
                "upstream {} did not answer within {PROBE_TIMEOUT:?}",
                self.upstream
            )),
        }
    }
}

/// Serves the admin endpoints on `listener` until `shutdown` resolves.
pub async fn serve(
    listener: TcpListener,
    readiness: Readiness,
    shutdown: impl Future<Output = ()>,
) {
    tokio::pin!(shutdown);
    loop {
        let (stream, _) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(_) => continue,
            },
            () = &mut shutdown => return,
        };
        let readiness = readiness.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |request: Request<Incoming>| {
                let readiness = readiness.clone();
                async move { Ok::<_, Infallible>(route(&request, &readiness).await) }
            });
            let _ = auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

async fn route(request: &Request<Incoming>, readiness: &Readiness) -> Response<Full<Bytes>> {
    if request.method() != Method::GET {
        return text(StatusCode::METHOD_NOT_ALLOWED, "use GET\n".to_owned());
    }
    match request.uri().path() {
        "/healthz" => text(StatusCode::OK, "ok\n".to_owned()),
        "/metrics" => {
            let mut response = text(StatusCode::OK, crate::metrics::metrics().render());
            response.headers_mut().insert(
                http::header::CONTENT_TYPE,
                http::HeaderValue::from_static(
                    "application/openmetrics-text; version=1.0.0; charset=utf-8",
                ),
            );
            response
        }
        "/readyz" => match readiness.check().await {
            Ok(()) => text(StatusCode::OK, "ready\n".to_owned()),
            Err(problem) => text(
                StatusCode::SERVICE_UNAVAILABLE,
                format!("not ready: {problem}\n"),
            ),
        },
        _ => text(StatusCode::NOT_FOUND, "not found\n".to_owned()),
    }
}

fn text(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    response.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}
