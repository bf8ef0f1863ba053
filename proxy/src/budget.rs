//! Memory budgets: what one message may inflate to, and what the whole process may hold.
//!
//! # Invariants
//!
//! - Every allocation the gateway makes *because of what a peer sent* — collected bodies,
//!   inflated gRPC frames, decompressed zstd payloads, objects fetched for storage references —
//!   is charged before (or, where the size is only known afterwards, as soon as) it is made.
//! - One message's inflations ([`MessageBudget`]) never total more than its limit
//!   (`proxy.max_message_bytes`): a decompression bomb, many gzip frames or a fan-out of storage
//!   references stop at the limit, not at the sum of what they claim.
//! - All charges of all messages in flight ([`ProcessBudget`]) never total more than
//!   `proxy.max_inflight_bytes`; past it a request is answered `RESOURCE_EXHAUSTED` instead of
//!   the process growing (and being OOM-killed in a sidecar with a memory limit).
//! - Charges are released when the budget that took them is dropped (the end of the RPC, also
//!   when it is cancelled), never earlier, so a budget over-counts at worst.
//! - A rewritten response stays charged ([`Reservation`]) until its bytes are gone: handed to
//!   the connection (whose HTTP/2 send buffer is bounded per stream), dropped with the stream,
//!   or freed by the send timeout (`proxy.response_send_timeout_ms`). A client that stops
//!   reading therefore runs the budget out (`RESOURCE_EXHAUSTED` for new RPCs) instead of the
//!   process growing by every response it does not take.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

/// A budget ran out. The message names the config key that sets the limit.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Exhausted {
    /// One message's inflations would pass its limit.
    #[error(
        "message would inflate past {limit} bytes (proxy.max_message_bytes); refused before \
         allocating more"
    )]
    Message {
        /// The per-message limit.
        limit: usize,
    },
    /// All messages in flight together would pass the process budget.
    #[error(
        "gateway in-flight memory budget of {limit} bytes (proxy.max_inflight_bytes) is \
         exhausted; retry later"
    )]
    Process {
        /// The process-wide limit.
        limit: usize,
    },
}

/// Adds `n` to `counter` unless the sum would pass `limit` (or overflow); `None` leaves the
/// counter as it was. Lock-free: parallel codec workers charge one account.
fn add_within(counter: &AtomicUsize, n: usize, limit: usize) -> Option<()> {
    counter
        .fetch_update(Ordering::AcqRel, Ordering::Relaxed, |current| {
            current.checked_add(n).filter(|&next| next <= limit)
        })
        .ok()
        .map(|_| ())
}

/// The default of `proxy.response_send_timeout_ms`.
pub const DEFAULT_RESPONSE_SEND_TIMEOUT: Duration = Duration::from_secs(60);

/// The process-wide in-flight byte budget, shared by every RPC and the codec endpoint.
#[derive(Debug)]
pub struct ProcessBudget {
    limit: usize,
    used: AtomicUsize,
    /// How long a buffered response may hold its [`Reservation`] before its unsent rest is
    /// freed (`proxy.response_send_timeout_ms`).
    response_send_timeout: Duration,
}

impl ProcessBudget {
    /// A budget of `limit` bytes (`0`: unlimited), with the default response send timeout.
    pub fn new(limit: usize) -> Arc<Self> {
        Self::with_response_send_timeout(limit, DEFAULT_RESPONSE_SEND_TIMEOUT)
    }

    /// A budget of `limit` bytes (`0`: unlimited) whose buffered responses are freed when not
    /// sent within `timeout` (`proxy.response_send_timeout_ms`).
    pub fn with_response_send_timeout(limit: usize, timeout: Duration) -> Arc<Self> {
        Arc::new(Self {
            limit: if limit == 0 { usize::MAX } else { limit },
            used: AtomicUsize::new(0),
            response_send_timeout: timeout,
        })
    }

    /// How long a buffered response may wait for its client before its unsent rest is freed.
    pub fn response_send_timeout(&self) -> Duration {
        self.response_send_timeout
    }

    /// Charges `n` bytes that are already allocated (a rewritten response about to be sent),
    /// even past the limit: the memory exists either way, and counting it makes new RPCs
    /// wait for it to be gone. Released as the returned reservation shrinks or drops.
    pub fn reserve_allocated(self: &Arc<Self>, n: usize) -> Reservation {
        self.used.fetch_add(n, Ordering::AcqRel);
        Reservation {
            process: self.clone(),
            bytes: n,
        }
    }

    /// An unlimited budget (tests, tools).
    pub fn unlimited() -> Arc<Self> {
        Self::new(0)
    }

    /// Bytes currently charged.
    pub fn in_use(&self) -> usize {
        self.used.load(Ordering::Relaxed)
    }

    /// The limit in bytes.
    pub fn limit(&self) -> usize {
        self.limit
    }

    fn try_take(&self, n: usize) -> Result<(), Exhausted> {
        add_within(&self.used, n, self.limit).ok_or(Exhausted::Process { limit: self.limit })
    }

    fn give_back(&self, n: usize) {
        self.used.fetch_sub(n, Ordering::AcqRel);
    }
}

/// Bytes charged to the process budget until released: what a buffered response still holds.
#[derive(Debug)]
pub struct Reservation {
    process: Arc<ProcessBudget>,
    bytes: usize,
}

impl Reservation {
    /// Bytes still charged.
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// Returns `n` of the charged bytes (at most what is left) to the process budget.
    pub fn release(&mut self, n: usize) {
        let n = n.min(self.bytes);
        self.bytes -= n;
        self.process.give_back(n);
    }

    /// The process budget this reservation draws on.
    pub fn process(&self) -> &Arc<ProcessBudget> {
        &self.process
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        self.process.give_back(self.bytes);
    }
}

/// The budget of one message (one direction of one RPC, or one codec endpoint request).
///
/// Cheap to clone: clones share the same account, so parallel codec workers of one batch draw
/// from one remaining amount.
#[derive(Debug, Clone)]
pub struct MessageBudget {
    inner: Arc<Account>,
}

#[derive(Debug)]
struct Account {
    process: Arc<ProcessBudget>,
    limit: usize,
    /// Inflations, limited by `limit`.
    used: AtomicUsize,
    /// Bytes held as received (bodies), charged to the process budget only.
    held: AtomicUsize,
}

impl MessageBudget {
    /// A budget of `limit` bytes for one message, drawing on `process`.
    pub fn new(process: Arc<ProcessBudget>, limit: usize) -> Self {
        Self {
            inner: Arc::new(Account {
                process,
                limit,
                used: AtomicUsize::new(0),
                held: AtomicUsize::new(0),
            }),
        }
    }

    /// A budget that never runs out (tests and tools that decode trusted input).
    pub fn unlimited() -> Self {
        Self::new(ProcessBudget::unlimited(), usize::MAX)
    }

    /// Charges `n` bytes, or refuses without charging anything.
    pub fn charge(&self, n: usize) -> Result<(), Exhausted> {
        let a = &self.inner;
        add_within(&a.used, n, a.limit).ok_or(Exhausted::Message { limit: a.limit })?;
        if let Err(e) = a.process.try_take(n) {
            a.used.fetch_sub(n, Ordering::AcqRel);
            return Err(e);
        }
        Ok(())
    }

    /// Charges `n` bytes of a body as received to the process budget only: the wire size of
    /// a message is limited by the framing (`proxy.max_message_bytes`), its inflations by
    /// [`charge`](Self::charge).
    pub fn hold(&self, n: usize) -> Result<(), Exhausted> {
        self.inner.process.try_take(n)?;
        self.inner.held.fetch_add(n, Ordering::AcqRel);
        Ok(())
    }

    /// Inflation bytes charged so far.
    pub fn used(&self) -> usize {
        self.inner.used.load(Ordering::Relaxed)
    }

    /// Bytes that may still be charged to this message (ignoring the process budget).
    pub fn remaining(&self) -> usize {
        self.inner.limit.saturating_sub(self.used())
    }

    /// The message limit.
    pub fn limit(&self) -> usize {
        self.inner.limit
    }

    /// The process budget this message draws on.
    pub fn process(&self) -> &Arc<ProcessBudget> {
        &self.inner.process
    }
}

impl Drop for Account {
    fn drop(&mut self) {
        self.process
            .give_back(*self.used.get_mut() + *self.held.get_mut());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn message_limit_refuses_without_charging() {
        let process = ProcessBudget::new(1000);
        let m = MessageBudget::new(process.clone(), 100);
        m.charge(60).unwrap();
        assert_eq!(m.charge(41), Err(Exhausted::Message { limit: 100 }));
        assert_eq!(m.used(), 60);
        assert_eq!(process.in_use(), 60);
        m.charge(40).unwrap();
        assert_eq!(m.remaining(), 0);
    }

    #[test]
    fn process_limit_spans_messages_and_is_released_on_drop() {
        let process = ProcessBudget::new(100);
        let a = MessageBudget::new(process.clone(), 1000);
        let b = MessageBudget::new(process.clone(), 1000);
        a.charge(70).unwrap();
        assert_eq!(b.charge(31), Err(Exhausted::Process { limit: 100 }));
        assert_eq!(b.used(), 0, "a refused charge leaves no trace");
        let a2 = a.clone();
        drop(a);
        assert_eq!(process.in_use(), 70, "clones share the account");
        drop(a2);
        assert_eq!(process.in_use(), 0);
        b.charge(100).unwrap();
    }

    #[test]
    fn held_bytes_count_for_the_process_only() {
        let process = ProcessBudget::new(100);
        let m = MessageBudget::new(process.clone(), 10);
        m.hold(80).unwrap();
        assert_eq!(m.used(), 0);
        assert_eq!(m.remaining(), 10);
        assert!(matches!(m.hold(21), Err(Exhausted::Process { .. })));
        drop(m);
        assert_eq!(process.in_use(), 0);
    }

    #[test]
    fn a_reservation_counts_past_the_limit_until_released() {
        let process = ProcessBudget::new(100);
        let m = MessageBudget::new(process.clone(), 1000);
        m.charge(80).unwrap();
        let mut held = process.reserve_allocated(60);
        drop(m);
        assert_eq!(process.in_use(), 60);
        assert!(matches!(
            MessageBudget::new(process.clone(), 1000).charge(41),
            Err(Exhausted::Process { .. })
        ));
        held.release(50);
        assert_eq!((held.bytes(), process.in_use()), (10, 10));
        held.release(50);
        assert_eq!((held.bytes(), process.in_use()), (0, 0));
        drop(held);
        assert_eq!(process.in_use(), 0);
    }

    #[test]
    fn overflowing_charges_are_refused() {
        let m = MessageBudget::unlimited();
        m.charge(usize::MAX - 1).unwrap();
        assert!(m.charge(usize::MAX).is_err());
    }
}
