//! The body type that flows through the gateway, a fully buffered body for rewritten
//! messages, and the body of a rewritten response on its way to a client
//! ([`GatewayBody::sending`]).

use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Buf, Bytes};
use http::HeaderMap;
use http_body::{Body, Frame, SizeHint};
use http_body_util::BodyExt;
use http_body_util::combinators::BoxBody;

/// Errors carried by gateway bodies.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// A request or response body: streamed from a peer, or buffered after a rewrite.
#[derive(Debug)]
pub struct GatewayBody(BoxBody<Bytes, BoxError>);

impl GatewayBody {
    /// A body with no data and no trailers.
    pub fn empty() -> Self {
        Self::new(http_body_util::Empty::new().map_err(|never| match never {}))
    }

    /// Wraps any body.
    pub fn new<B>(body: B) -> Self
    where
        B: Body<Data = Bytes> + Send + Sync + 'static,
        B::Error: Into<BoxError>,
    {
        Self(body.map_err(Into::into).boxed())
    }

    /// A body that yields `chunks` (empty ones skipped) then `trailers`.
    pub fn buffered(chunks: Vec<Bytes>, trailers: Option<HeaderMap>) -> Self {
        Self::new(BufferedBody {
            chunks: chunks.into_iter().filter(|c| !c.is_empty()).collect(),
            trailers,
        })
    }
}

impl GatewayBody {
    /// A rewritten response on its way to a client: `chunks` then `trailers`, charged to the
    /// process budget through `held` until the bytes are gone.
    ///
    /// The bytes are handed to the connection in pieces of at most [`SEND_PIECE`] bytes
    /// (larger chunks are copied out piece by piece), so what hyper and the HTTP/2 send buffer
    /// hold of a stream is bounded by the piece size and `max_send_buf_size`, and never pins
    /// a whole message. `held` shrinks as whole chunks are handed over and drops with the
    /// body. A client that does not take the response (HTTP/2 window 0) leaves hyper waiting
    /// for send capacity without polling the body again, so a timer inside `poll_frame`
    /// would never fire: a watchdog task empties the shared slot after
    /// `held.process().response_send_timeout()` instead, freeing the unsent rest and its
    /// charge; should hyper poll again, the body ends with an error and the stream is reset.
    pub fn sending(
        chunks: Vec<Bytes>,
        trailers: Option<HeaderMap>,
        held: crate::budget::Reservation,
    ) -> Self {
        let timeout = held.process().response_send_timeout();
        let slot = Arc::new(Mutex::new(Slot {
            chunks: chunks.into_iter().filter(|c| !c.is_empty()).collect(),
            front_sent: 0,
            trailers,
            held: Some(held),
            expired: false,
        }));
        let (done, finished) = tokio::sync::oneshot::channel::<()>();
        match tokio::runtime::Handle::try_current() {
            // `0`: no send timeout; the response holds its budget until sent or dropped.
            _ if timeout.is_zero() => drop(finished),
            Ok(runtime) => {
                let watched = slot.clone();
                runtime.spawn(async move {
                    tokio::select! {
                        _ = finished => {}
                        () = tokio::time::sleep(timeout) => expire(&watched, timeout),
                    }
                });
            }
            // Outside a runtime (tools): nothing can wait on the client anyway.
            Err(_) => drop(finished),
        }
        Self::new(SendingBody {
            slot,
            done: Some(done),
        })
    }
}

/// The largest piece [`GatewayBody::sending`] hands to the connection at once. Chunks up to
/// this size (the gRPC framing copies messages up to 16 KiB into chunks of their own) are
/// handed over as they are; larger ones are copied out piece by piece so that a piece held
/// by the connection never keeps a whole message alive.
pub const SEND_PIECE: usize = 64 * 1024;

/// What a [`SendingBody`] has not handed over yet, shared with its watchdog.
struct Slot {
    chunks: VecDeque<Bytes>,
    /// Bytes of the front chunk already copied out (its allocation lives until it is done).
    front_sent: usize,
    trailers: Option<HeaderMap>,
    held: Option<crate::budget::Reservation>,
    /// The send timeout freed the rest.
    expired: bool,
}

impl Slot {
    /// Frees everything left (and its charge).
    fn clear(&mut self) {
        self.chunks.clear();
        self.trailers = None;
        self.held = None;
    }
}

/// The send timeout ran out: the unsent rest of the response is freed.
fn expire(slot: &Mutex<Slot>, timeout: Duration) {
    let mut slot = lock(slot);
    let unsent: usize = slot.chunks.iter().map(Bytes::len).sum();
    if unsent == 0 && slot.trailers.is_none() {
        return;
    }
    slot.clear();
    slot.expired = true;
    tracing::warn!(
        unsent_bytes = unsent,
        timeout_ms = timeout.as_millis() as u64,
        "a client did not take its response within proxy.response_send_timeout_ms: the unsent \
         rest is dropped and its memory budget returned"
    );
}

fn lock(slot: &Mutex<Slot>) -> MutexGuard<'_, Slot> {
    // A panic while holding the lock cannot leave the slot inconsistent in a way that
    // matters: at worst bytes are freed early.
    slot.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// The response was not sent within `proxy.response_send_timeout_ms`.
#[derive(Debug, thiserror::Error)]
#[error("response not sent within proxy.response_send_timeout_ms; the rest was dropped")]
pub struct SendTimedOut;

/// See [`GatewayBody::sending`].
struct SendingBody {
    slot: Arc<Mutex<Slot>>,
    /// Dropped when the body is done (or dropped), which ends the watchdog.
    done: Option<tokio::sync::oneshot::Sender<()>>,
}

impl Drop for SendingBody {
    /// The stream is gone (reset, connection closed): what was not sent is freed now, not
    /// when the watchdog next runs.
    fn drop(&mut self) {
        lock(&self.slot).clear();
    }
}

impl Body for SendingBody {
    type Data = Bytes;
    type Error = SendTimedOut;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = &mut *self;
        let mut slot = lock(&this.slot);
        if slot.expired {
            return Poll::Ready(Some(Err(SendTimedOut)));
        }
        let slot = &mut *slot;
        if let Some(front) = slot.chunks.front_mut() {
            let piece = if slot.front_sent == 0 && front.len() <= SEND_PIECE {
                let chunk = slot.chunks.pop_front().unwrap_or_default();
                if let Some(held) = &mut slot.held {
                    held.release(chunk.len());
                }
                chunk
            } else {
                let n = front.len().min(SEND_PIECE);
                let piece = Bytes::copy_from_slice(&front[..n]);
                front.advance(n);
                slot.front_sent += n;
                if front.is_empty() {
                    // The chunk's allocation is freed here; its charge goes with it.
                    slot.chunks.pop_front();
                    let sent = std::mem::take(&mut slot.front_sent);
                    if let Some(held) = &mut slot.held {
                        held.release(sent);
                    }
                }
                piece
            };
            if slot.chunks.is_empty() && slot.trailers.is_none() {
                slot.clear();
                this.done = None;
            }
            return Poll::Ready(Some(Ok(Frame::data(piece))));
        }
        let trailers = slot.trailers.take();
        slot.clear();
        this.done = None;
        Poll::Ready(trailers.map(|t| Ok(Frame::trailers(t))))
    }

    fn is_end_stream(&self) -> bool {
        let slot = lock(&self.slot);
        !slot.expired && slot.chunks.is_empty() && slot.trailers.is_none()
    }

    fn size_hint(&self) -> SizeHint {
        let slot = lock(&self.slot);
        let len: usize = slot.chunks.iter().map(Bytes::len).sum();
        SizeHint::with_exact(len as u64)
    }
}

impl Body for GatewayBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        Pin::new(&mut self.0).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.0.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.0.size_hint()
    }
}

/// Data chunks followed by optional trailers, all in memory.
struct BufferedBody {
    chunks: VecDeque<Bytes>,
    trailers: Option<HeaderMap>,
}

impl Body for BufferedBody {
    type Data = Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        if let Some(chunk) = self.chunks.pop_front() {
            return Poll::Ready(Some(Ok(Frame::data(chunk))));
        }
        Poll::Ready(self.trailers.take().map(|t| Ok(Frame::trailers(t))))
    }

    fn is_end_stream(&self) -> bool {
        self.chunks.is_empty() && self.trailers.is_none()
    }

    fn size_hint(&self) -> SizeHint {
        let len: usize = self.chunks.iter().map(Bytes::len).sum();
        SizeHint::with_exact(len as u64)
    }
}

/// A body read to its end: the data, in order, and the trailers if any.
#[derive(Debug, Default)]
pub struct Collected {
    /// The data: one buffer ([`collect`]), none when the body had no data.
    pub chunks: Vec<Bytes>,
    /// Total data length.
    pub len: usize,
    /// Trailers, when the peer sent them.
    pub trailers: Option<HeaderMap>,
}

/// The body grew past the limit while being collected.
#[derive(Debug, thiserror::Error)]
#[error("message larger than the limit of {limit} bytes")]
pub struct TooLarge {
    /// The limit that was exceeded.
    pub limit: usize,
}

/// Reads `body` to its end, refusing more than `limit` data bytes and holding every chunk
/// against the process memory budget (through `budget`) as it arrives.
///
/// The data ends up in one buffer: a body that arrives in one chunk is kept as it is; else
/// the buffer is sized once, when the second chunk arrives, from the gRPC prefix of the first
/// message (its announced length, within `limit`), and every chunk is copied into it and
/// freed as it arrives, so the chunks and the joined body are never held side by side. (A
/// body of several messages grows the buffer past the first.) `chunks` holds that one buffer.
pub async fn collect<B>(
    mut body: B,
    limit: usize,
    budget: &crate::budget::MessageBudget,
) -> Result<Collected, BoxError>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    let mut collected = Collected::default();
    let mut first: Option<Bytes> = None;
    let mut joined = crate::buffers::PooledBuf::default();
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(Into::into)?;
        match frame.into_data() {
            Ok(data) => {
                if data.is_empty() {
                    continue;
                }
                collected.len += data.len();
                if collected.len > limit {
                    return Err(Box::new(TooLarge { limit }));
                }
                budget.hold(data.len())?;
                if first.is_none() && joined.is_empty() {
                    first = Some(data);
                    continue;
                }
                if let Some(head) = first.take() {
                    let size = announced(&head, &data)
                        .map_or(collected.len, |n| {
                            n.saturating_add(crate::grpc::frame::PREFIX_LEN)
                        })
                        .max(collected.len)
                        .min(limit);
                    joined = crate::buffers::PooledBuf::with_capacity(size);
                    joined.extend_from_slice(&head);
                }
                joined.extend_from_slice(&data);
            }
            Err(frame) => {
                if let Ok(trailers) = frame.into_trailers() {
                    collected.trailers = Some(trailers);
                }
            }
        }
    }
    match first {
        Some(one) => collected.chunks.push(one),
        None if !joined.is_empty() => collected.chunks.push(joined.freeze()),
        None => {}
    }
    Ok(collected)
}

/// The message length in the gRPC prefix at the start of `head` ‖ `next`, when both hold it.
fn announced(head: &[u8], next: &[u8]) -> Option<usize> {
    let mut prefix = head
        .iter()
        .chain(next)
        .take(crate::grpc::frame::PREFIX_LEN)
        .skip(1)
        .copied();
    let bytes = [
        prefix.next()?,
        prefix.next()?,
        prefix.next()?,
        prefix.next()?,
    ];
    Some(u32::from_be_bytes(bytes) as usize)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::budget::ProcessBudget;

    fn trailers() -> HeaderMap {
        let mut t = HeaderMap::new();
        t.insert("grpc-status", http::HeaderValue::from_static("0"));
        t
    }

    /// A body in several chunks is collected into one buffer (sized from the gRPC prefix),
    /// byte for byte; one chunk is kept as it is; the limit and the budget still hold.
    #[tokio::test]
    async fn a_body_is_collected_into_one_buffer_within_its_limits() {
        let message: Vec<u8> = (0..300_000u32).map(|i| (i % 253) as u8).collect();
        let mut framed = vec![0u8];
        framed.extend_from_slice(&(message.len() as u32).to_be_bytes());
        framed.extend_from_slice(&message);
        let framed = Bytes::from(framed);
        // Split inside the prefix, then twice more.
        let chunks = vec![
            framed.slice(..3),
            framed.slice(3..100_000),
            framed.slice(100_000..200_000),
            framed.slice(200_000..),
        ];
        let process = ProcessBudget::new(0);
        let budget = crate::budget::MessageBudget::new(process.clone(), usize::MAX);
        let body = GatewayBody::buffered(chunks, Some(trailers()));
        let collected = collect(body, framed.len(), &budget).await.unwrap();
        assert_eq!(collected.chunks.len(), 1);
        assert_eq!(collected.chunks[0], framed);
        assert_eq!(collected.len, framed.len());
        assert!(collected.trailers.is_some());
        assert_eq!(process.in_use(), framed.len(), "held as received");

        let one = GatewayBody::buffered(vec![framed.clone()], None);
        let collected = collect(one, framed.len(), &budget).await.unwrap();
        assert_eq!(
            collected.chunks[0].as_ptr(),
            framed.as_ptr(),
            "one chunk: not copied"
        );

        let over = GatewayBody::buffered(vec![framed.slice(..10), framed.slice(10..)], None);
        let err = collect(over, framed.len() - 1, &budget).await.unwrap_err();
        assert!(err.is::<TooLarge>());
    }

    #[tokio::test]
    async fn a_sent_response_comes_out_in_pieces_and_returns_its_budget_as_it_goes() {
        let process = ProcessBudget::new(0);
        let big = Bytes::from((0..200_000u32).map(|i| i as u8).collect::<Vec<_>>());
        let chunks = vec![Bytes::from_static(b"\0\0\x03\x0d\x40"), big.clone()];
        let total = 5 + big.len();
        let held = process.reserve_allocated(total);
        let mut body = GatewayBody::sending(chunks, Some(trailers()), held);
        assert_eq!(process.in_use(), total);
        let mut out = Vec::new();
        let mut got_trailers = false;
        while let Some(frame) = body.frame().await {
            let frame = frame.unwrap();
            match frame.into_data() {
                Ok(piece) => {
                    assert!(piece.len() <= SEND_PIECE);
                    out.extend_from_slice(&piece);
                    // What is still charged is never less than what is left unsent.
                    assert!(process.in_use() >= (total - out.len()).saturating_sub(SEND_PIECE));
                }
                Err(frame) => {
                    assert!(frame.into_trailers().is_ok());
                    got_trailers = true;
                }
            }
        }
        assert!(got_trailers);
        assert_eq!(out.len(), total);
        assert_eq!(&out[5..], &big[..]);
        assert_eq!(
            process.in_use(),
            0,
            "all returned once everything is handed over"
        );
    }

    #[tokio::test]
    async fn dropping_an_unsent_response_returns_its_budget() {
        let process = ProcessBudget::new(0);
        let held = process.reserve_allocated(300_000);
        let mut body = GatewayBody::sending(vec![Bytes::from(vec![1u8; 300_000])], None, held);
        let first = body.frame().await.unwrap().unwrap();
        assert_eq!(first.into_data().unwrap().len(), SEND_PIECE);
        assert_eq!(
            process.in_use(),
            300_000,
            "the chunk lives until it is done"
        );
        drop(body);
        assert_eq!(process.in_use(), 0);
    }

    #[tokio::test]
    async fn the_send_timeout_frees_a_response_nobody_polls() {
        let process = ProcessBudget::with_response_send_timeout(0, Duration::from_millis(300));
        let held = process.reserve_allocated(1_000_000);
        let mut body = GatewayBody::sending(
            vec![Bytes::from(vec![1u8; 1_000_000])],
            Some(trailers()),
            held,
        );
        // Nobody polls the body (a client with window 0): the watchdog frees it.
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(process.in_use(), 1_000_000);
        tokio::time::sleep(Duration::from_millis(400)).await;
        assert_eq!(process.in_use(), 0, "freed by the watchdog");
        // Should hyper poll again, the stream ends with an error (and is reset).
        let next = body.frame().await.unwrap();
        assert!(next.unwrap_err().is::<SendTimedOut>());
    }

    #[tokio::test]
    async fn a_response_sent_in_time_is_left_alone_by_the_watchdog() {
        let process = ProcessBudget::with_response_send_timeout(0, Duration::from_millis(100));
        let held = process.reserve_allocated(10);
        let mut body = GatewayBody::sending(vec![Bytes::from(vec![1u8; 10])], None, held);
        assert_eq!(
            body.frame()
                .await
                .unwrap()
                .unwrap()
                .into_data()
                .unwrap()
                .len(),
            10
        );
        assert!(body.frame().await.is_none());
        assert_eq!(process.in_use(), 0);
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(
            body.frame().await.is_none(),
            "no error after a complete send"
        );
    }
}
