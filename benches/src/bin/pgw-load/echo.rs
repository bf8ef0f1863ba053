//! The echo upstream (isolates the proxy): an in-process h2 server answering
//! `QueryWorkflow` with `QueryWorkflowResponse.query_result` = the request's `query_args`,
//! so each RPC carries the payload out and back. Cleartext, or TLS (rustls) for the `-tls`
//! configurations.

use std::collections::BTreeSet;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

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

use crate::client::{frame, unframe};

type EchoBody =
    StreamBody<futures::stream::Iter<std::vec::IntoIter<Result<Frame<Bytes>, Infallible>>>>;

fn grpc_response(msg: Option<Bytes>, status: u32) -> Response<EchoBody> {
    let mut trailers = http::HeaderMap::new();
    trailers.insert("grpc-status", status.into());
    let mut frames = Vec::new();
    if let Some(m) = msg {
        frames.push(Ok(Frame::data(m)));
    }
    frames.push(Ok(Frame::trailers(trailers)));
    Response::builder()
        .header("content-type", "application/grpc")
        .body(StreamBody::new(futures::stream::iter(frames)))
        .expect("response")
}

async fn echo_handle(req: Request<Incoming>) -> Result<Response<EchoBody>, Infallible> {
    let path = req.uri().path().to_string();
    if !path.ends_with("/QueryWorkflow") {
        return Ok(grpc_response(None, 12));
    }
    let Ok(body) = req.into_body().collect().await else {
        return Ok(grpc_response(None, 13));
    };
    let Ok(msg) = unframe(body.to_bytes()) else {
        return Ok(grpc_response(None, 13));
    };
    let Ok(q) = QueryWorkflowRequest::decode(msg) else {
        return Ok(grpc_response(None, 13));
    };
    let resp = QueryWorkflowResponse {
        query_result: q.query.and_then(|q| q.query_args),
        ..Default::default()
    };
    Ok(grpc_response(Some(frame(&resp)), 0))
}

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
