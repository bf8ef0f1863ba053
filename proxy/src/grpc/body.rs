//! The body type that flows through the gateway, and a fully buffered body for rewritten
//! messages.

use std::collections::VecDeque;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
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
    /// The data chunks as they arrived.
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
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(Into::into)?;
        match frame.into_data() {
            Ok(data) => {
                collected.len += data.len();
                if collected.len > limit {
                    return Err(Box::new(TooLarge { limit }));
                }
                budget.hold(data.len())?;
                collected.chunks.push(data);
            }
            Err(frame) => {
                if let Ok(trailers) = frame.into_trailers() {
                    collected.trailers = Some(trailers);
                }
            }
        }
    }
    Ok(collected)
}
