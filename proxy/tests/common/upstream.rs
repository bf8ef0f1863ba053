//! An upstream in process for the rewrite layer: it records every request body it receives
//! and answers with one chosen message (and trailers), so a test can see exactly what the
//! gateway forwards and what it makes of an answer.

use std::convert::Infallible;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http::{HeaderMap, Request, Response};
use http_body_util::BodyExt;
use payload_gateway::budget::ProcessBudget;
use payload_gateway::codec::PayloadCodec;
use payload_gateway::config::Config;
use payload_gateway::grpc::GatewayBody;
use payload_gateway::grpc::layer::HandlerLayer;
use payload_gateway::ingress::Ingress;
use payload_gateway::rewrite::{Pipeline, RewriteLayer};
use tower::{Layer, ServiceExt};

/// A 256-bit key, base64.
pub const KEY_B64: &str = "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=";

/// A response message and its trailers (empty: `grpc-status: 0`).
pub type Answer = (Vec<u8>, HeaderMap);

/// What the fake upstream saw and what it answers (an empty message with `grpc-status: 0`
/// until [`RecordingUpstream::answer`] says otherwise).
#[derive(Clone, Default)]
pub struct RecordingUpstream {
    /// Every request body received, in order.
    pub received: Arc<Mutex<Vec<Bytes>>>,
    answer: Arc<Mutex<Option<Answer>>>,
}

impl RecordingUpstream {
    /// Answers every later request with `message` and `trailers` (`grpc-status: 0` if empty).
    pub fn answer(&self, message: Vec<u8>, trailers: HeaderMap) {
        *self.answer.lock().unwrap() = Some((message, trailers));
    }

    /// The request body received `n`-th, unframed (see [`unframe`]).
    pub fn sent(&self, n: usize) -> Vec<u8> {
        unframe(&self.received.lock().unwrap()[n])
    }

    /// The upstream as the service the rewrite layer wraps.
    pub fn service(
        &self,
    ) -> tower::util::BoxCloneService<Request<GatewayBody>, Response<GatewayBody>, Infallible> {
        let this = self.clone();
        tower::service_fn(move |request: Request<GatewayBody>| {
            let this = this.clone();
            async move {
                let body = request.into_body().collect().await.unwrap().to_bytes();
                this.received.lock().unwrap().push(body);
                let (message, trailers) = this.answer.lock().unwrap().clone().unwrap_or_default();
                let mut ok = HeaderMap::new();
                ok.insert("grpc-status", "0".parse().unwrap());
                let trailers = if trailers.is_empty() { ok } else { trailers };
                Ok::<_, Infallible>(Response::new(GatewayBody::buffered(
                    vec![frame(&message)],
                    Some(trailers),
                )))
            }
        })
        .boxed_clone()
    }
}

/// The rewrite layer over `codec`, with a 4 MiB message limit and no process-wide budget.
pub fn layer(codec: Arc<PayloadCodec>) -> RewriteLayer {
    RewriteLayer::new(Pipeline::new(codec), 4 << 20, ProcessBudget::unlimited())
}

/// Sends `body` as a request for `path` (`/package.Service/Method`) with `headers` through
/// `layer` to `upstream`.
pub async fn call(
    layer: &RewriteLayer,
    upstream: &RecordingUpstream,
    path: &str,
    body: Bytes,
    headers: &[(&str, &str)],
) -> Response<GatewayBody> {
    let mut request = Request::post(format!("http://gateway{path}"))
        .body(GatewayBody::buffered(vec![body], None))
        .unwrap();
    for (k, v) in headers {
        request.headers_mut().insert(
            http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
            v.parse().unwrap(),
        );
    }
    // The rewrite acts on what the single ingress decided, as in the gateway's stack.
    HandlerLayer(Ingress::new(4 << 20, ProcessBudget::unlimited()))
        .layer(HandlerLayer(layer.clone()).layer(upstream.service()))
        .oneshot(request)
        .await
        .unwrap()
}

/// `message` as one uncompressed gRPC frame.
pub fn frame(message: &[u8]) -> Bytes {
    let mut out = vec![0u8];
    out.extend_from_slice(&(message.len() as u32).to_be_bytes());
    out.extend_from_slice(message);
    Bytes::from(out)
}

/// The message of a body that must be exactly one uncompressed gRPC frame.
pub fn unframe(body: &[u8]) -> Vec<u8> {
    assert_eq!(body[0], 0, "gateway output must be uncompressed");
    let len = u32::from_be_bytes(body[1..5].try_into().unwrap()) as usize;
    assert_eq!(body.len(), 5 + len, "exactly one message");
    body[5..].to_vec()
}

/// True when `needle` occurs in `haystack`.
pub fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

/// A codec encrypting with [`KEY_B64`] (read from the variable `env_key`, which this sets),
/// compressing from 64 bytes, with the config text `extra` appended.
pub fn codec(env_key: &str, extra: &str) -> Arc<PayloadCodec> {
    // SAFETY: each test sets its own variable before any thread reads it.
    unsafe { std::env::set_var(env_key, KEY_B64) };
    let config = Config::from_toml(
        &format!(
            "[encryption]\nactive_key = \"k1\"\nkeys = [{{ id = \"k1\", env = \"{env_key}\" }}]\n[compression]\nmin_size = 64\n{extra}"
        ),
        Vec::new(),
    )
    .unwrap();
    Arc::new(PayloadCodec::from_config(&config).unwrap())
}
