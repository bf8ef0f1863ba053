//! The load client: unary gRPC calls over one hyper HTTP/2 connection (cleartext or TLS),
//! and gRPC framing (uncompressed, or gzip as the SDKs compress requests).

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

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

use crate::consts::TOKEN;
use crate::gz::{Memo, ReqEnc, gunzip, gzip};

const SVC: &str = "/temporal.api.workflowservice.v1.WorkflowService/";

/// One HTTP/2 connection to a target (cleartext or TLS); clones share it.
#[derive(Clone)]
pub struct Client {
    sender: SendRequest<Full<Bytes>>,
    scheme: &'static str,
    authority: String,
    /// TLS version and cipher suite of the connection, when over TLS.
    pub tls_suite: Option<String>,
    /// Responses read, and how many of them came gzip-compressed.
    pub responses: Arc<ResponseCount>,
    /// The last compressed response message and its inflation.
    inflated: Arc<Memo>,
    /// Whether calls carry `authorization: Bearer` [`TOKEN`].
    send_token: bool,
}

/// Responses a client read, and how many came compressed.
#[derive(Default)]
pub struct ResponseCount {
    /// Every successful response.
    pub total: AtomicU64,
    /// Those whose message frame was gzip-compressed.
    pub gzip: AtomicU64,
}

impl ResponseCount {
    /// (gzip, total) so far.
    pub fn get(&self) -> (u64, u64) {
        (
            self.gzip.load(Ordering::Relaxed),
            self.total.load(Ordering::Relaxed),
        )
    }
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
            responses: Arc::default(),
            inflated: Arc::default(),
            send_token: true,
        })
    }

    /// This client without the bearer token (to see that `gw-auth` refuses it).
    pub fn without_token(mut self) -> Client {
        self.send_token = false;
        self
    }

    /// One unary call; `framed` is the gRPC-framed request ([`frame`] or [`frame_as`]): a
    /// compressed frame (flag 1) goes with `grpc-encoding: gzip` and
    /// `grpc-accept-encoding: gzip`. Every call carries `authorization: Bearer` [`TOKEN`]
    /// (what `gw-auth` checks; the other targets forward or ignore it), so every target sees
    /// the same headers, unless [`Client::without_token`]. Returns the response message, inflated when it came compressed.
    pub async fn call(&self, method: &str, framed: Bytes) -> Result<Bytes, CallError> {
        let mut req = Request::post(format!("{}://{}{SVC}{method}", self.scheme, self.authority))
            .header("content-type", "application/grpc")
            .header("te", "trailers");
        if self.send_token {
            req = req.header("authorization", format!("Bearer {TOKEN}"));
        }
        if framed.first() == Some(&1) {
            req = req
                .header("grpc-encoding", "gzip")
                .header("grpc-accept-encoding", "gzip");
        }
        let req = req
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
        let encoding = parts
            .headers
            .get("grpc-encoding")
            .map(|v| v.to_str().unwrap_or("?"));
        let msg = match data.first() {
            Some(1) if encoding == Some("gzip") => {
                self.responses.gzip.fetch_add(1, Ordering::Relaxed);
                let z =
                    compressed_message(data).map_err(|e| CallError(format!("{method}: {e}")))?;
                self.inflated
                    .get_or(&z, |z| Ok(Bytes::from(gunzip(z)?)))
                    .map_err(|e| CallError(format!("{method}: response: {e}")))?
            }
            Some(1) => {
                return Err(CallError(format!(
                    "{method}: compressed response with grpc-encoding {encoding:?}"
                )));
            }
            _ => unframe(data).map_err(|e| CallError(format!("{method}: {e}")))?,
        };
        self.responses.total.fetch_add(1, Ordering::Relaxed);
        Ok(msg)
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

/// The gRPC frame of `msg` in encoding `enc`: [`frame`], or the message gzip-compressed
/// ([`gzip`]) in a frame with the compressed flag set.
pub fn frame_as(msg: &impl Message, enc: ReqEnc) -> Bytes {
    match enc {
        ReqEnc::Identity => frame(msg),
        ReqEnc::Gzip => {
            let z = gzip(&msg.encode_to_vec());
            let mut b = BytesMut::with_capacity(5 + z.len());
            b.put_u8(1);
            b.put_u32(z.len() as u32);
            b.put_slice(&z);
            b.freeze()
        }
    }
}

/// The flag and the payload of one gRPC frame that must fill `data` exactly.
fn split_frame(mut data: Bytes) -> Result<(u8, Bytes)> {
    if data.len() < 5 {
        bail!("short frame ({} bytes)", data.len());
    }
    let flag = data.get_u8();
    let len = data.get_u32() as usize;
    if data.len() != len {
        bail!("frame length {len}, have {}", data.len());
    }
    Ok((flag, data))
}

/// The message of one uncompressed gRPC frame.
pub fn unframe(data: Bytes) -> Result<Bytes> {
    match split_frame(data)? {
        (0, m) => Ok(m),
        (f, _) => bail!("compressed frame (flag {f}) where an uncompressed one was expected"),
    }
}

/// The still compressed message of one gRPC frame with the compressed flag set.
pub fn compressed_message(data: Bytes) -> Result<Bytes> {
    match split_frame(data)? {
        (1, m) => Ok(m),
        (f, _) => bail!("frame flag {f} where a compressed frame was expected"),
    }
}
