//! The load client: unary gRPC calls over one hyper HTTP/2 connection (cleartext or TLS),
//! and gRPC framing.

use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::{Result, anyhow, bail};
use bytes::{Buf, BufMut, Bytes, BytesMut};
use http_body_util::{BodyExt, Full};
use hyper::Request;
use hyper::client::conn::http2::SendRequest;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use prost::Message;
use rustls::ClientConfig;
use rustls::pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;

const SVC: &str = "/temporal.api.workflowservice.v1.WorkflowService/";

/// One HTTP/2 connection to a target (cleartext or TLS); clones share it.
#[derive(Clone)]
pub struct Client {
    sender: SendRequest<Full<Bytes>>,
    scheme: &'static str,
    authority: String,
    /// TLS version and cipher suite of the connection, when over TLS.
    pub tls_suite: Option<String>,
}

/// A failed call: what went wrong, in words.
#[derive(Debug)]
pub struct CallError(pub String);

/// The client's HTTP/2 settings (large windows and frames, as an SDK sets them).
async fn handshake<T>(io: T) -> Result<SendRequest<Full<Bytes>>>
where
    T: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (sender, conn) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
        .timer(TokioTimer::new())
        .initial_stream_window_size(4 * 1024 * 1024)
        .initial_connection_window_size(16 * 1024 * 1024)
        .max_frame_size(1024 * 1024)
        .max_send_buf_size(4 * 1024 * 1024)
        .handshake(TokioIo::new(io))
        .await?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok(sender)
}

impl Client {
    /// Opens one HTTP/2 connection to `addr`, over TLS when `tls` is given (server name
    /// `127.0.0.1`, verified against the configuration's roots).
    pub async fn connect(addr: SocketAddr, tls: Option<&Arc<ClientConfig>>) -> Result<Client> {
        let stream = TcpStream::connect(addr).await?;
        stream.set_nodelay(true)?;
        let (sender, tls_suite) = match tls {
            None => (handshake(stream).await?, None),
            Some(config) => {
                let name = ServerName::IpAddress(addr.ip().into());
                let stream = tokio_rustls::TlsConnector::from(config.clone())
                    .connect(name, stream)
                    .await?;
                let (_, conn) = stream.get_ref();
                let suite = format!(
                    "{:?} {:?}",
                    conn.protocol_version()
                        .ok_or_else(|| anyhow!("no TLS version"))?,
                    conn.negotiated_cipher_suite()
                        .ok_or_else(|| anyhow!("no cipher suite"))?
                        .suite()
                );
                (handshake(stream).await?, Some(suite))
            }
        };
        Ok(Client {
            sender,
            scheme: if tls.is_some() { "https" } else { "http" },
            authority: addr.to_string(),
            tls_suite,
        })
    }

    /// One unary call; `framed` is the gRPC-framed request. Returns the response message.
    pub async fn call(&self, method: &str, framed: Bytes) -> Result<Bytes, CallError> {
        let req = Request::post(format!("{}://{}{SVC}{method}", self.scheme, self.authority))
            .header("content-type", "application/grpc")
            .header("te", "trailers")
            .body(Full::new(framed))
            .map_err(|e| CallError(e.to_string()))?;
        let mut sender = self.sender.clone();
        sender
            .ready()
            .await
            .map_err(|e| CallError(format!("not ready: {e}")))?;
        let resp = sender
            .send_request(req)
            .await
            .map_err(|e| CallError(format!("send: {e}")))?;
        let (parts, body) = resp.into_parts();
        if let Some(st) = parts.headers.get("grpc-status")
            && st != "0"
        {
            return Err(CallError(format!(
                "{method}: grpc-status {st:?} {:?}",
                parts.headers.get("grpc-message")
            )));
        }
        let collected = body
            .collect()
            .await
            .map_err(|e| CallError(format!("body: {e}")))?;
        let trailers = collected.trailers().cloned();
        let data = collected.to_bytes();
        if parts.headers.get("grpc-status").is_none() {
            let t = trailers.ok_or_else(|| CallError(format!("{method}: no trailers")))?;
            match t.get("grpc-status") {
                Some(s) if s == "0" => {}
                s => {
                    return Err(CallError(format!(
                        "{method}: grpc-status {s:?} {:?}",
                        t.get("grpc-message")
                    )));
                }
            }
        }
        unframe(data).map_err(|e| CallError(format!("{method}: {e}")))
    }
}

/// The gRPC frame (uncompressed) of `msg`.
pub fn frame(msg: &impl Message) -> Bytes {
    let len = msg.encoded_len();
    let mut b = BytesMut::with_capacity(5 + len);
    b.put_u8(0);
    b.put_u32(len as u32);
    msg.encode(&mut b).expect("capacity");
    b.freeze()
}

/// The message of one uncompressed gRPC frame.
pub fn unframe(mut data: Bytes) -> Result<Bytes> {
    if data.len() < 5 {
        bail!("short response ({} bytes)", data.len());
    }
    if data[0] != 0 {
        bail!("compressed response frame");
    }
    let _ = data.get_u8();
    let len = data.get_u32() as usize;
    if data.len() != len {
        bail!("frame length {len}, have {}", data.len());
    }
    Ok(data)
}
