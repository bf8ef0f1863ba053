//! The payload stages, applied to all payloads of one message as a batch: on the way out
//! (`encode`) compression and encryption, on the way back (`decode`) their reverse.

use std::sync::Arc;

use bytes::Bytes;

use crate::codec::PayloadCodec;
use crate::grpc::{Code, Status};

/// Which way a message travels.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// From an SDK to the server: payloads are encoded.
    Encode,
    /// From the server to an SDK: payloads are decoded.
    Decode,
}

/// What the stages know about the RPC a message belongs to.
#[derive(Debug, Clone)]
pub struct CallContext {
    /// The gRPC method path.
    pub method: String,
    /// The request's namespace (from the message, else the `temporal-namespace` header).
    pub namespace: Option<String>,
}

/// A stage failed for the payload at `index` of the batch.
#[derive(Debug)]
pub struct StageError {
    /// Index of the payload in the batch.
    pub index: usize,
    /// Status code for the RPC.
    pub code: Code,
    /// What went wrong (never payload contents).
    pub reason: String,
}

/// The configured payload stages.
#[derive(Debug, Clone)]
pub struct Pipeline {
    codec: Arc<PayloadCodec>,
}

impl Pipeline {
    /// A pipeline running `codec`.
    pub fn new(codec: Arc<PayloadCodec>) -> Self {
        Self { codec }
    }

    /// The codec, for key reloads and metrics.
    pub fn codec(&self) -> &Arc<PayloadCodec> {
        &self.codec
    }

    /// Whether a message in `direction` for `ctx` needs walking at all.
    pub fn applies(&self, direction: Direction, ctx: &CallContext) -> bool {
        match direction {
            // Payloads written earlier (or by an SDK codec) must decode whatever the policy now.
            Direction::Decode => true,
            Direction::Encode => self.codec.is_active(ctx.namespace.as_deref()),
        }
    }

    /// Runs the stages over one message's payloads; `None` keeps a payload as it was.
    pub async fn run(
        &self,
        direction: Direction,
        ctx: &CallContext,
        payloads: Vec<Bytes>,
    ) -> Result<Vec<Option<Bytes>>, StageError> {
        let result = match direction {
            Direction::Encode => {
                self.codec
                    .encode_batch(ctx.namespace.as_deref(), payloads)
                    .await
            }
            Direction::Decode => self.codec.decode_batch(payloads).await,
        };
        result.map_err(|e| StageError {
            index: e.index,
            code: Code::Internal,
            reason: e.error.to_string(),
        })
    }
}

impl StageError {
    /// The RPC status for this failure, naming the payload's field path.
    pub fn into_status(self, direction: Direction, path: &str) -> Status {
        let message = match direction {
            Direction::Encode => format!(
                "cannot encode payload at {path}: {}; nothing was forwarded",
                self.reason
            ),
            Direction::Decode => format!("cannot decode payload at {path}: {}", self.reason),
        };
        Status::new(self.code, message)
    }
}
