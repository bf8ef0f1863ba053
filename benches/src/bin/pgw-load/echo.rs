//! The echo upstream (isolates the proxy): an in-process h2 server answering
//! `QueryWorkflow` with `QueryWorkflowResponse.query_result` = the request's `query_args`,
//! so each RPC carries the payload out and back. Cleartext, or TLS (rustls) for the `-tls`
//! configurations.
//!
//! Compression as a Go gRPC server (the Temporal server) does it: a request frame with the
//! compressed flag and `grpc-encoding: gzip` is inflated (every member), and the response is
//! then gzip-compressed too (grpc-go answers in the encoding the request came in) when the
//! request's `grpc-accept-encoding` names gzip. What arrived is counted ([`SEEN`]), so a row
//! can say whether a proxy forwarded the client's compressed bytes or re-framed them. The
//! echo remembers its last gzip request and response ([`Memo`]): the same compressed bytes
//! again are answered without inflating and compressing again, so the shared cores spend
//! little on the upstream's side of compression (the proxy's side is what is measured).

use std::collections::BTreeSet;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, LazyLock, Mutex};

use anyhow::Result;
use bytes::Bytes;
use http_body_util::{BodyExt, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use prost::Message;
use rustls::ServerConfig;
use temporalio_protos::protos::temporal::api::workflowservice::v1::{
    QueryWorkflowRequest, QueryWorkflowResponse,
};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;

use crate::client::{compressed_message, frame, unframe};
use crate::gz::{Memo, gunzip, gzip};

/// Requests the echo upstreams received: all, and those that arrived gzip-compressed.
#[derive(Default)]
pub struct Seen {
    /// Every `QueryWorkflow` request.
    pub requests: AtomicU64,
    /// Those whose frame was compressed (`grpc-encoding: gzip`, flag 1).
    pub gzip: AtomicU64,
}

impl Seen {
    /// (gzip, all) so far.
    pub fn get(&self) -> (u64, u64) {
        (
            self.gzip.load(Ordering::Relaxed),
            self.requests.load(Ordering::Relaxed),
        )
    }
}

/// What every echo upstream of this process received (one row is measured at a time).
pub static SEEN: Seen = Seen {
    requests: AtomicU64::new(0),
    gzip: AtomicU64::new(0),
};

/// The last gzip request body and the compressed response frame it was answered with.
static GZIP_ANSWER: LazyLock<Memo> = LazyLock::new(Memo::default);

type EchoBody =
    StreamBody<futures::stream::Iter<std::vec::IntoIter<Result<Frame<Bytes>, Infallible>>>>;

fn grpc_response(msg: Option<Bytes>, status: u32) -> Response<EchoBody> {
    grpc_response_as(msg, status, false)
}

/// A response with `msg` (a frame, compressed when `gzip`) and `grpc-status` `status`.
fn grpc_response_as(msg: Option<Bytes>, status: u32, gzip: bool) -> Response<EchoBody> {
    let mut trailers = http::HeaderMap::new();
    trailers.insert("grpc-status", status.into());
    let mut frames = Vec::new();
    if let Some(m) = msg {
        frames.push(Ok(Frame::data(m)));
    }
    frames.push(Ok(Frame::trailers(trailers)));
    let mut resp = Response::builder().header("content-type", "application/grpc");
    if gzip {
        resp = resp.header("grpc-encoding", "gzip");
    }
    resp.body(StreamBody::new(futures::stream::iter(frames)))
        .expect("response")
}

/// The echo's answer (a response frame) to one uncompressed request message.
fn answer(msg: Bytes) -> Option<Bytes> {
    let q = QueryWorkflowRequest::decode(msg).ok()?;
    let resp = QueryWorkflowResponse {
        query_result: q.query.and_then(|q| q.query_args),
        ..Default::default()
    };
    Some(frame(&resp))
}

/// `framed` (a frame with flag 0) with its message gzip-compressed and the flag set.
fn compress_frame(framed: &[u8]) -> Bytes {
    let z = gzip(&framed[5..]);
    let mut b = Vec::with_capacity(5 + z.len());
    b.push(1);
    b.extend_from_slice(&(z.len() as u32).to_be_bytes());
    b.extend_from_slice(&z);
    Bytes::from(b)
}

async fn echo_handle(req: Request<Incoming>) -> Result<Response<EchoBody>, Infallible> {
    let path = req.uri().path().to_string();
    if !path.ends_with("/QueryWorkflow") {
        return Ok(grpc_response(None, 12));
    }
    let header = |name: &str| {
        req.headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    };
    let encoding = header("grpc-encoding");
    let accepts_gzip =
        header("grpc-accept-encoding").is_some_and(|v| v.split(',').any(|e| e.trim() == "gzip"));
    let Ok(body) = req.into_body().collect().await else {
        return Ok(grpc_response(None, 13));
    };
    let body = body.to_bytes();
    SEEN.requests.fetch_add(1, Ordering::Relaxed);
    if body.first() != Some(&1) {
        let Some(out) = unframe(body).ok().and_then(answer) else {
            return Ok(grpc_response(None, 13));
        };
        return Ok(grpc_response(Some(out), 0));
    }
    // A compressed frame: gzip only (a Go server: UNIMPLEMENTED for other encodings).
    if encoding.as_deref() != Some("gzip") {
        return Ok(grpc_response(None, 12));
    }
    SEEN.gzip.fetch_add(1, Ordering::Relaxed);
    let answered = GZIP_ANSWER.get_or(&body, |b| {
        let msg = Bytes::from(gunzip(&compressed_message(Bytes::copy_from_slice(b))?)?);
        answer(msg).ok_or_else(|| anyhow::anyhow!("not a QueryWorkflowRequest"))
    });
    let Ok(out) = answered else {
        return Ok(grpc_response(None, 13));
    };
    if accepts_gzip {
        // the compressed answer is remembered beside its request (one entry)
        let z = RESPONSE_GZ.get_or(&out, |f| Ok(compress_frame(f)));
        return Ok(match z {
            Ok(z) => grpc_response_as(Some(z), 0, true),
            Err(_) => grpc_response(None, 13),
        });
    }
    Ok(grpc_response(Some(out), 0))
}

/// The last uncompressed answer frame and its gzip-compressed frame.
static RESPONSE_GZ: LazyLock<Memo> = LazyLock::new(Memo::default);

/// TLS versions and cipher suites the TLS echo upstream negotiated, as `"TLSv1_3 <suite>"`.
pub type Negotiated = Arc<Mutex<BTreeSet<String>>>;

/// Starts the echo upstream on a free loopback port (TLS with `tls`, recording what each
/// connection negotiated); it runs on this process's runtime until the process ends.
pub async fn start_echo(tls: Option<Arc<ServerConfig>>) -> Result<(SocketAddr, Negotiated)> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let negotiated = Negotiated::default();
    let seen = negotiated.clone();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let _ = stream.set_nodelay(true);
            let tls = tls.clone();
            let seen = seen.clone();
            tokio::spawn(async move {
                match tls {
                    None => serve(stream).await,
                    Some(config) => {
                        if let Ok(stream) = TlsAcceptor::from(config).accept(stream).await {
                            let (_, conn) = stream.get_ref();
                            if let (Some(v), Some(s)) =
                                (conn.protocol_version(), conn.negotiated_cipher_suite())
                            {
                                seen.lock()
                                    .expect("negotiated")
                                    .insert(format!("{v:?} {:?}", s.suite()));
                            }
                            serve(stream).await;
                        }
                    }
                }
            });
        }
    });
    Ok((addr, negotiated))
}

/// Serves one connection with the server's HTTP/2 settings (large windows and frames).
async fn serve<T>(io: T)
where
    T: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
        .timer(TokioTimer::new())
        .initial_stream_window_size(4 * 1024 * 1024)
        .initial_connection_window_size(16 * 1024 * 1024)
        .max_frame_size(1024 * 1024)
        .max_send_buf_size(4 * 1024 * 1024)
        .serve_connection(TokioIo::new(io), hyper::service::service_fn(echo_handle))
        .await;
}
