//! The payload stages, applied to all payloads of one message as a batch: on the way out
//! (`encode`) compression and encryption, then offload to external storage of what is still at
//! or above the threshold; on the way back (`decode`) references are resolved (in parallel,
//! verified), then decrypted and decompressed.
//!
//! Payloads that already are external storage references (an SDK with its own external
//! storage) pass the encode stages untouched, as the SDKs themselves leave references
//! unencoded — but only when they are *exactly* a reference of a configured driver with a
//! claim that driver accepts for the namespace ([`reference::strict_reference`],
//! [`Storage::accepts_reference`]). Anything that merely looks like one (metadata alone,
//! extra JSON or protobuf fields, an unknown driver, a forged claim) is encoded like every
//! other payload: metadata never decides on its own what may leave unencrypted.

use std::borrow::Cow;
use std::sync::Arc;

use bytes::Bytes;
use payload_gateway_drivers::{StoreContext, StoreTarget};
use payload_gateway_proto::{MessageType, top_level_string};

use crate::budget::MessageBudget;
use crate::codec::PayloadCodec;
use crate::grpc::{Code, Status};
use crate::storage::{Kind, Storage, StorageError, reference};

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
    /// The gRPC method path (or the codec endpoint's route).
    pub method: Cow<'static, str>,
    /// The request's namespace (from the message, else the `temporal-namespace` header).
    pub namespace: Option<String>,
    /// The request message, read for its identity fields only when a payload is offloaded
    /// (most RPCs never need them: parsing them up front was a fixed cost per RPC).
    request: Option<(MessageType, Bytes)>,
    /// What the message's inflations may still allocate (see [`crate::budget`]).
    pub budget: MessageBudget,
}

impl CallContext {
    /// A context for `method` in `namespace`, without request identity.
    pub fn new(method: impl Into<Cow<'static, str>>, namespace: Option<String>) -> Self {
        Self {
            method: method.into(),
            namespace,
            request: None,
            budget: MessageBudget::unlimited(),
        }
    }

    /// Charges this context's inflations to `budget`.
    pub fn with_budget(mut self, budget: MessageBudget) -> Self {
        self.budget = budget;
        self
    }

    /// Keeps the request `message` of type `ty`: its top-level `workflow_id`, `run_id` and
    /// `activity_id` name the objects the storage stage writes.
    pub fn with_request(mut self, ty: MessageType, message: Option<&Bytes>) -> Self {
        self.request = message.map(|m| (ty, m.clone()));
        self
    }

    /// The request's top-level string field `name`, when present and not empty.
    fn request_field(&self, name: &str) -> Option<String> {
        let (ty, message) = self.request.as_ref()?;
        top_level_string(*ty, message, name)
            .filter(|s| !s.is_empty())
            .map(str::to_owned)
    }

    /// What the storage drivers put into object keys.
    pub fn store_context(&self) -> StoreContext {
        let (workflow_id, run_id, activity_id) = (
            self.request_field("workflow_id"),
            self.request_field("run_id"),
            self.request_field("activity_id"),
        );
        let target = if activity_id.is_some() {
            Some(StoreTarget::Activity {
                activity_type: None,
                activity_id,
                run_id,
            })
        } else if workflow_id.is_some() || run_id.is_some() {
            Some(StoreTarget::Workflow {
                workflow_type: None,
                workflow_id,
                run_id,
            })
        } else {
            None
        };
        StoreContext {
            namespace: self.namespace.clone(),
            target,
        }
    }
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
    storage: Option<Arc<Storage>>,
}

impl Pipeline {
    /// A pipeline running `codec`.
    pub fn new(codec: Arc<PayloadCodec>) -> Self {
        Self {
            codec,
            storage: None,
        }
    }

    /// Adds the external storage stage.
    pub fn with_storage(mut self, storage: Option<Arc<Storage>>) -> Self {
        self.storage = storage;
        self
    }

    /// The storage stage, when configured.
    pub fn storage(&self) -> Option<&Arc<Storage>> {
        self.storage.as_ref()
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
            Direction::Encode => {
                let ns = ctx.namespace.as_deref();
                self.codec.is_active(ns) || self.storage.as_ref().is_some_and(|s| s.is_active(ns))
            }
        }
    }

    /// Runs the stages over one message's payloads; `None` keeps a payload as it was.
    pub async fn run(
        &self,
        direction: Direction,
        ctx: &CallContext,
        payloads: Vec<Bytes>,
    ) -> Result<Vec<Option<Bytes>>, StageError> {
        match direction {
            Direction::Encode => self.encode(ctx, payloads).await,
            Direction::Decode => self.decode(ctx, payloads).await,
        }
    }

    async fn encode(
        &self,
        ctx: &CallContext,
        payloads: Vec<Bytes>,
    ) -> Result<Vec<Option<Bytes>>, StageError> {
        let ns = ctx.namespace.as_deref();
        // Exact references of configured drivers stay as they are; everything else goes
        // through the codec.
        let todo: Vec<usize> = (0..payloads.len())
            .filter(|&i| !self.is_forwardable_reference(ns, &payloads[i]))
            .collect();
        let mut out: Vec<Option<Bytes>> = vec![None; payloads.len()];
        let batch: Vec<Bytes> = todo.iter().map(|&i| payloads[i].clone()).collect();
        let encoded = self
            .codec
            .encode_batch(ns, batch)
            .await
            .map_err(|e| codec_error(todo[e.index], e.error))?;
        for (&i, e) in todo.iter().zip(encoded) {
            out[i] = e;
        }
        let Some(storage) = self.storage.as_ref().filter(|s| s.is_active(ns)) else {
            return Ok(out);
        };
        let current: Vec<Bytes> = todo
            .iter()
            .map(|&i| out[i].clone().unwrap_or_else(|| payloads[i].clone()))
            .collect();
        let stored = storage
            .offload(&ctx.store_context(), &current)
            .await
            .map_err(|e| storage_error(&todo, e))?;
        for (&i, r) in todo.iter().zip(stored) {
            if r.is_some() {
                out[i] = r;
            }
        }
        Ok(out)
    }

    /// Whether `payload` is a storage reference that may leave untouched (see the module docs).
    fn is_forwardable_reference(&self, namespace: Option<&str>, payload: &[u8]) -> bool {
        let Some(storage) = &self.storage else {
            return false;
        };
        match reference::strict_reference(payload) {
            Some(r) => {
                let ok = storage.accepts_reference(namespace, &r);
                if !ok {
                    tracing::debug!(driver = %r.driver_name, "reference-shaped payload of an unconfigured driver or with a refused claim: encoded like any payload");
                }
                ok
            }
            None => false,
        }
    }

    async fn decode(
        &self,
        ctx: &CallContext,
        payloads: Vec<Bytes>,
    ) -> Result<Vec<Option<Bytes>>, StageError> {
        // 1. Resolve references (codec-encoded, marked ones are decoded first).
        let mut resolved: Vec<Option<Bytes>> = vec![None; payloads.len()];
        if let Some(storage) = &self.storage {
            let mut refs = Vec::new();
            for (i, p) in payloads.iter().enumerate() {
                let kind = reference::classify(p).map_err(|reason| StageError {
                    index: i,
                    code: Code::InvalidArgument,
                    reason,
                })?;
                let kind = match kind {
                    Kind::Marked(encoded) => {
                        let ns = ctx.namespace.as_deref();
                        self.codec
                            .prepare_decode(ns, std::slice::from_ref(&encoded), false)
                            .await
                            .map_err(|e| codec_error(i, e.error))?;
                        let decoded = self
                            .codec
                            .decode_in(ns, &encoded, &ctx.budget)
                            .map_err(|e| codec_error(i, e))?
                            .unwrap_or(encoded);
                        match reference::classify(&decoded) {
                            Ok(Kind::Reference(r)) => Kind::Reference(r),
                            _ => {
                                return Err(StageError {
                                    index: i,
                                    code: Code::InvalidArgument,
                                    reason: "a payload marked as a storage reference does not \
                                             decode to one"
                                        .to_owned(),
                                });
                            }
                        }
                    }
                    other => other,
                };
                if let Kind::Reference(r) = kind {
                    refs.push((i, r));
                }
            }
            if !refs.is_empty() {
                let found = storage
                    .resolve(ctx.namespace.as_deref(), refs, &ctx.budget)
                    .await
                    .map_err(|e| StageError {
                        index: e.index,
                        code: e.code,
                        reason: e.reason,
                    })?;
                for (i, b) in found {
                    resolved[i] = b;
                }
            }
        }
        // 2. Decrypt and decompress.
        let current: Vec<Bytes> = payloads
            .iter()
            .zip(&resolved)
            .map(|(p, r)| r.clone().unwrap_or_else(|| p.clone()))
            .collect();
        let decoded = self
            .codec
            .decode_batch_in(ctx.namespace.as_deref(), current, ctx.budget.clone())
            .await
            .map_err(|e| codec_error(e.index, e.error))?;
        Ok(decoded
            .into_iter()
            .zip(resolved)
            .map(|(d, r)| d.or(r))
            .collect())
    }
}

fn codec_error(index: usize, error: crate::codec::CodecError) -> StageError {
    let code = match error {
        crate::codec::CodecError::Budget(_) => Code::ResourceExhausted,
        // The key service is unreachable: retryable, and nothing was forwarded in plaintext.
        crate::codec::CodecError::KeyUnavailable { .. } => Code::Unavailable,
        _ => Code::Internal,
    };
    StageError {
        index,
        code,
        reason: error.to_string(),
    }
}

fn storage_error(todo: &[usize], e: StorageError) -> StageError {
    StageError {
        index: todo.get(e.index).copied().unwrap_or(e.index),
        code: e.code,
        reason: e.reason,
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
