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
//!
//! # One decode, two callers
//!
//! The gRPC path ([`Pipeline::run`]) and the codec endpoint (`codec_server`) run the same
//! decode ([`Pipeline::decode_scoped`]): references resolved and verified, data keys
//! unwrapped, payloads decrypted and decompressed. What differs between them is passed in as a
//! [`DecodeScope`]: which keys may decrypt, how many data keys a message may make the key
//! service unwrap, whether blocking work stops on a cancel flag, and which payloads decode on
//! the calling task. The budget is the [`CallContext`]'s.
//!
//! # Errors
//!
//! A failure is a [`StageError`]: the payload's index and its cause ([`StageCause`]: codec,
//! key service, budget, storage, reference, cancelled). No status code is chosen here: the
//! gRPC edge (`rewrite::message`) maps causes to gRPC statuses, the codec endpoint to HTTP
//! statuses.

use std::borrow::Cow;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use bytes::Bytes;
use payload_gateway_drivers::{StoreContext, StoreTarget};
use payload_gateway_proto::{MessageType, top_level_string};

use super::fit::{self, FitPlan};
use crate::budget::{Exhausted, MessageBudget};
use crate::codec::{CodecError, MAX_DATA_KEYS_PER_MESSAGE, PayloadCodec};
use crate::storage::{Kind, Storage, StorageError, StorageFailure, reference};

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
    /// Why.
    pub cause: StageCause,
}

/// Why a payload stage failed, by cause. Never holds payload contents or key material.
#[derive(Debug, thiserror::Error)]
pub enum StageCause {
    /// The codec cannot encode or decode the payload (format, keys, integrity, its limits).
    #[error("{0}")]
    Codec(CodecError),
    /// A key service could not give a data key (unreachable, refused, not asked), or the
    /// message carries more data keys than may be unwrapped for it.
    #[error("{0}")]
    Kms(CodecError),
    /// Decoding would pass the message's (or the caller's) budget or the process's memory
    /// budget.
    #[error("{0}")]
    Budget(Exhausted),
    /// External storage failed.
    #[error("{reason}")]
    Storage {
        /// What kind of failure.
        kind: StorageFailure,
        /// Description.
        reason: String,
    },
    /// A payload that claims to be a storage reference is not a valid one.
    #[error("{0}")]
    Reference(String),
    /// The caller went away (its cancel flag is set); nothing more was done.
    #[error("the request was cancelled")]
    Cancelled,
}

impl StageCause {
    /// The cause of a codec error.
    pub fn of_codec(error: CodecError) -> Self {
        match error {
            CodecError::Budget(e) => StageCause::Budget(e),
            CodecError::OverBudget { budget } => {
                StageCause::Budget(Exhausted::Message { limit: budget })
            }
            e @ (CodecError::KeyUnavailable { .. }
            | CodecError::KeyService { .. }
            | CodecError::KeyThrottled { .. }
            | CodecError::TooManyDataKeys { .. }) => StageCause::Kms(e),
            e => StageCause::Codec(e),
        }
    }
}

/// Which keys a decode may decrypt with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyScope {
    /// Any key of the keyring (the gRPC path: payloads come from the server). Envelope keys
    /// still open only for the request's namespace.
    Keyring,
    /// Only the keys bound to the namespace (its `active_key` and `decrypt_keys`): the codec
    /// endpoint, whose callers send payloads of their choosing.
    Namespace,
}

/// Where a decode's codec work runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Inline {
    /// The batch on the calling task when it totals less than the codec's parallel
    /// threshold, else in byte-balanced groups on the blocking pool (the gRPC path: one
    /// message, all or nothing).
    Batch,
    /// One payload after the other: payloads of at most `input` bytes on the calling task as
    /// long as they decode to at most `output` bytes (a payload inflating further is decoded
    /// again on the blocking pool), the rest on the blocking pool; the task yields every
    /// [`YIELD_EVERY_PAYLOADS`] payloads or [`YIELD_EVERY_BYTES`] decoded (the codec endpoint:
    /// small requests of a few payloads each, where a thread hop costs more than the work).
    PerPayload {
        /// Largest input decoded on the calling task.
        input: usize,
        /// Largest output decoded on the calling task.
        output: usize,
    },
}

/// Payload-by-payload decoding yields after this many payloads...
pub const YIELD_EVERY_PAYLOADS: usize = 64;

/// ... or this many decoded bytes, whichever comes first.
pub const YIELD_EVERY_BYTES: usize = 1024 * 1024;

/// What differs between the callers of [`Pipeline::decode_scoped`].
#[derive(Debug, Clone)]
pub struct DecodeScope {
    /// Which keys may decrypt.
    pub keys: KeyScope,
    /// Most distinct data keys the message may make the key service unwrap
    /// ([`CodecError::TooManyDataKeys`] beyond, before any call).
    pub max_data_keys: usize,
    /// Set when the caller is gone: work not started yet is skipped.
    pub cancel: Arc<AtomicBool>,
    /// Where the codec work runs.
    pub inline: Inline,
    /// Counts payloads the codec decoded (observability; tests watch cancelled work stop).
    pub progress: Option<Arc<AtomicU64>>,
}

impl DecodeScope {
    /// The gRPC path's scope: any key of the keyring, [`MAX_DATA_KEYS_PER_MESSAGE`], batch
    /// decoding (cancelled when the RPC's future is dropped).
    pub fn grpc() -> Self {
        Self {
            keys: KeyScope::Keyring,
            max_data_keys: MAX_DATA_KEYS_PER_MESSAGE,
            cancel: Arc::default(),
            inline: Inline::Batch,
            progress: None,
        }
    }

    fn cancelled(&self) -> bool {
        self.cancel.load(Ordering::Relaxed)
    }
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
            Direction::Encode => self.encode_to_fit(ctx, payloads, None).await,
            Direction::Decode => {
                self.decode_scoped(ctx, &DecodeScope::grpc(), payloads)
                    .await
            }
        }
    }

    /// Encodes one message's payloads as [`run`](Self::run) does and, where the namespace
    /// offloads, offloads what `fit` says the server's limits need on top of the threshold
    /// ([`super::fit`]). `None` keeps a payload as it was.
    pub async fn encode_to_fit(
        &self,
        ctx: &CallContext,
        payloads: Vec<Bytes>,
        fit: Option<&FitPlan>,
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
        let Some((storage, threshold)) = self
            .storage
            .as_ref()
            .and_then(|s| s.threshold(ns).map(|t| (s, t)))
        else {
            return Ok(out);
        };
        let current: Vec<Bytes> = payloads
            .iter()
            .zip(&out)
            .map(|(p, e)| e.clone().unwrap_or_else(|| p.clone()))
            .collect();
        let mut eligible = vec![false; payloads.len()];
        for &i in &todo {
            eligible[i] = true;
        }
        let sizes: Vec<usize> = current.iter().map(Bytes::len).collect();
        let chosen = fit::choose(&sizes, &eligible, threshold, fit);
        let beyond_threshold = chosen.iter().filter(|&&i| sizes[i] < threshold).count();
        if beyond_threshold > 0 {
            crate::metrics::metrics().count_payloads(ns, "offloaded_to_fit", beyond_threshold);
        }
        let stored = storage
            .offload_chosen(&ctx.store_context(), &current, &chosen)
            .await
            .map_err(|e| storage_error(&[], e))?;
        for (i, r) in stored.into_iter().enumerate() {
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

    /// Decodes one message's payloads within `scope` (see the module docs): resolves storage
    /// references (codec-encoded, marked ones decoded first), unwraps the data keys the
    /// payloads carry, then decrypts and decompresses. `None` keeps a payload as it was.
    pub async fn decode_scoped(
        &self,
        ctx: &CallContext,
        scope: &DecodeScope,
        payloads: Vec<Bytes>,
    ) -> Result<Vec<Option<Bytes>>, StageError> {
        let ns = ctx.namespace.as_deref();
        // 1. Resolve references.
        let mut resolved: Vec<Option<Bytes>> = vec![None; payloads.len()];
        if let Some(storage) = &self.storage {
            let mut refs = Vec::new();
            for (i, p) in payloads.iter().enumerate() {
                let kind = reference::classify(p).map_err(|reason| StageError {
                    index: i,
                    cause: StageCause::Reference(reason),
                })?;
                let kind = match kind {
                    Kind::Marked(encoded) => {
                        let encoded = [encoded];
                        self.prepare(ns, scope, &encoded, i).await?;
                        let [encoded] = encoded;
                        let decoded = self
                            .decode_payloads(ctx, scope, vec![encoded.clone()])
                            .await
                            .map_err(|e| StageError { index: i, ..e })?
                            .pop()
                            .flatten()
                            .unwrap_or(encoded);
                        match reference::classify(&decoded) {
                            Ok(Kind::Reference(r)) => Kind::Reference(r),
                            _ => {
                                return Err(StageError {
                                    index: i,
                                    cause: StageCause::Reference(
                                        "a payload marked as a storage reference does not \
                                         decode to one"
                                            .to_owned(),
                                    ),
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
                if scope.cancelled() {
                    return Err(StageError {
                        index: refs[0].0,
                        cause: StageCause::Cancelled,
                    });
                }
                let found = storage
                    .resolve(ns, refs, &ctx.budget)
                    .await
                    .map_err(|e| storage_error(&[], e))?;
                for (i, b) in found {
                    resolved[i] = b;
                }
            }
        }
        // 2. Unwrap data keys, then decrypt and decompress.
        // A fetched object the codec decodes is handed over (not shared), so it can be
        // decrypted in its own buffer; one it leaves alone stays in `resolved`.
        let current: Vec<Bytes> = payloads
            .iter()
            .zip(resolved.iter_mut())
            .map(|(p, r)| match r {
                Some(b) if PayloadCodec::is_encoded(b) => r.take().unwrap_or_default(),
                Some(b) => b.clone(),
                None => p.clone(),
            })
            .collect();
        self.prepare(ns, scope, &current, 0).await?;
        let decoded = self.decode_payloads(ctx, scope, current).await?;
        Ok(decoded
            .into_iter()
            .zip(resolved)
            .map(|(d, r)| d.or(r))
            .collect())
    }

    /// Unwraps the data keys `payloads` carry (`first`: the index of `payloads[0]` in the
    /// message).
    async fn prepare(
        &self,
        namespace: Option<&str>,
        scope: &DecodeScope,
        payloads: &[Bytes],
        first: usize,
    ) -> Result<(), StageError> {
        self.codec
            .prepare_decode(
                namespace,
                payloads,
                scope.keys == KeyScope::Namespace,
                scope.max_data_keys,
            )
            .await
            .map_err(|e| codec_error(first + e.index, e.error))
    }

    /// The codec step of [`decode_scoped`](Self::decode_scoped), where `scope.inline` says.
    async fn decode_payloads(
        &self,
        ctx: &CallContext,
        scope: &DecodeScope,
        payloads: Vec<Bytes>,
    ) -> Result<Vec<Option<Bytes>>, StageError> {
        let ns = ctx.namespace.as_deref();
        let bound = scope.keys == KeyScope::Namespace;
        let (input_max, output_max) = match scope.inline {
            Inline::Batch => {
                let n = payloads.len() as u64;
                let out = self
                    .codec
                    .decode_batch_scoped(ns, bound, payloads, ctx.budget.clone())
                    .await
                    .map_err(|e| codec_error(e.index, e.error))?;
                if let Some(progress) = &scope.progress {
                    progress.fetch_add(n, Ordering::Relaxed);
                }
                return Ok(out);
            }
            Inline::PerPayload { input, output } => (input, output),
        };
        let mut out = Vec::with_capacity(payloads.len());
        let mut decoded_bytes = 0usize;
        let mut next_yield = YIELD_EVERY_BYTES;
        for (i, payload) in payloads.into_iter().enumerate() {
            if scope.cancelled() {
                return Err(StageError {
                    index: i,
                    cause: StageCause::Cancelled,
                });
            }
            // Payloads that are neither encrypted nor compressed need no work (and no thread).
            if !PayloadCodec::is_encoded(&payload) {
                out.push(None);
                continue;
            }
            let remaining = ctx.budget.remaining();
            let mut result = None;
            if payload.len() <= input_max {
                let cap = remaining.min(output_max);
                match self.codec.decode_scoped_within(ns, bound, &payload, cap) {
                    Err(CodecError::OverBudget { .. }) if cap < remaining => {}
                    done => result = Some(done),
                }
            }
            let result = match result {
                Some(done) => done,
                None => {
                    let codec = self.codec.clone();
                    let namespace = ctx.namespace.clone();
                    let cancel = scope.cancel.clone();
                    tokio::task::spawn_blocking(move || {
                        // Queued behind other work and cancelled meanwhile: do nothing.
                        (!cancel.load(Ordering::Relaxed)).then(|| {
                            codec.decode_scoped_within(
                                namespace.as_deref(),
                                bound,
                                &payload,
                                remaining,
                            )
                        })
                    })
                    .await
                    .map_err(|e| StageError {
                        index: i,
                        cause: StageCause::Codec(CodecError::Worker(e.to_string())),
                    })?
                    .ok_or(StageError {
                        index: i,
                        cause: StageCause::Cancelled,
                    })?
                }
            };
            let decoded = result.map_err(|e| codec_error(i, e))?;
            if let Some(progress) = &scope.progress {
                progress.fetch_add(1, Ordering::Relaxed);
            }
            if let Some(d) = &decoded {
                ctx.budget.charge(d.len()).map_err(|e| StageError {
                    index: i,
                    cause: StageCause::Budget(e),
                })?;
                decoded_bytes = decoded_bytes.saturating_add(d.len());
            }
            out.push(decoded);
            // Small payloads are decoded on this task: give the worker back now and then, so
            // the caller's deadline can fire and other requests are served meanwhile.
            if (i + 1) % YIELD_EVERY_PAYLOADS == 0 || decoded_bytes >= next_yield {
                next_yield = decoded_bytes.saturating_add(YIELD_EVERY_BYTES);
                tokio::task::yield_now().await;
            }
        }
        Ok(out)
    }
}

fn codec_error(index: usize, error: CodecError) -> StageError {
    StageError {
        index,
        cause: StageCause::of_codec(error),
    }
}

/// `todo`: the message indexes of the batch the storage call saw (empty: the same).
fn storage_error(todo: &[usize], e: StorageError) -> StageError {
    StageError {
        index: todo.get(e.index).copied().unwrap_or(e.index),
        cause: StageCause::Storage {
            kind: e.kind,
            reason: e.reason,
        },
    }
}
