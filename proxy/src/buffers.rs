//! Large byte buffers that are reused instead of mapped fresh for every message.
//!
//! The gateway fixes glibc's mmap threshold at 128 KiB ([`crate::alloc`]) so that large
//! buffers never leave holes in the heap arenas and the resident set follows the load down.
//! The price of that setting is paid on every large buffer: it is a mapping of its own, and
//! the kernel faults and zeroes it in page by page on first touch, then unmaps it when freed.
//! A 1 MiB message crossing the codec needed three such buffers (the collected request, the
//! codec's output, the decompressed payload), and the page faults and unmapping took about a
//! tenth of the gateway's CPU (BENCHMARKS.md, "Issue 24", "Codec rate").
//!
//! A [`PooledBuf`] of at least [`POOLED_MIN`] bytes comes from a small process-wide pool and
//! goes back to it when dropped, or, once frozen into [`Bytes`], when the last `Bytes` sharing
//! it drops; its pages stay faulted in. The pool is bounded so that the memory bounds hold:
//!
//! - only buffers of [`POOLED_MIN`] to [`POOLED_MAX`] bytes are kept (larger ones are rare
//!   and would pin their size; they are freed as before);
//! - at most [`RETAIN_PER_CLASS`] buffers per size class and [`RETAIN_MAX`] bytes in all;
//!   a buffer given back beyond that is freed;
//! - [`release_all`] frees every kept buffer; the allocator's trim thread calls it when the
//!   process has been quiet, so the resident set still comes back near the live data.
//!
//! Invariants (security):
//! - A buffer is handed out empty (`len() == 0`). Its spare capacity may hold bytes of an
//!   earlier message (plaintext payloads included), exactly as freed heap memory does; safe
//!   code cannot read spare capacity, and no code in the gateway calls `set_len` on these
//!   buffers, so nothing of an earlier message can reach a later one.
//! - The pool is process memory only: nothing is written anywhere, nothing is logged.
//!
//! Kept buffers are not charged to any [`MessageBudget`](crate::budget::MessageBudget): they
//! hold no message, and [`RETAIN_MAX`] bounds them.

use std::ops::{Deref, DerefMut};
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};

use bytes::Bytes;

/// Buffers smaller than this come from the allocator as usual (glibc serves them from its
/// arenas, without a mapping of their own, so reusing them gains nothing).
pub const POOLED_MIN: usize = 128 * 1024;

/// Buffers larger than this are never kept.
pub const POOLED_MAX: usize = 8 * 1024 * 1024;

/// At most this many bytes of capacity are kept in the pool in all.
pub const RETAIN_MAX: usize = 32 * 1024 * 1024;

/// At most this many buffers are kept per size class.
pub const RETAIN_PER_CLASS: usize = 8;

/// Size classes: four per power of two from [`POOLED_MIN`] up to [`POOLED_MAX`], so a
/// buffer is at most a quarter larger than asked for.
const STEPS: usize = 4;
const MIN_LOG: u32 = POOLED_MIN.trailing_zeros();
const MAX_LOG: u32 = POOLED_MAX.trailing_zeros();
const CLASSES: usize = (MAX_LOG - MIN_LOG) as usize * STEPS + 1;

struct Pool {
    classes: [Mutex<Vec<Vec<u8>>>; CLASSES],
    retained: AtomicUsize,
}

static POOL: Pool = Pool {
    classes: [const { Mutex::new(Vec::new()) }; CLASSES],
    retained: AtomicUsize::new(0),
};

/// The size of class `class`.
fn class_size(class: usize) -> usize {
    let log = MIN_LOG as usize + class / STEPS;
    let step = class % STEPS;
    (1usize << log) + step * ((1usize << log) / STEPS)
}

/// The smallest class whose size is at least `len` (`len` within the pooled range).
fn class_at_least(len: usize) -> usize {
    let log = (usize::BITS - (len - 1).leading_zeros() - 1).max(MIN_LOG);
    let base = 1usize << log;
    let quarter = base / STEPS;
    let class = (log - MIN_LOG) as usize * STEPS + (len - base).div_ceil(quarter);
    debug_assert!(class_size(class) >= len);
    class
}

/// The largest class whose size is at most `capacity` (`capacity` ≥ [`POOLED_MIN`]).
fn class_at_most(capacity: usize) -> usize {
    let capacity = capacity.min(POOLED_MAX);
    let log = usize::BITS - capacity.leading_zeros() - 1;
    let base = 1usize << log;
    let class = (log - MIN_LOG) as usize * STEPS + (capacity - base) / (base / STEPS);
    debug_assert!(class_size(class) <= capacity);
    class
}

/// A growable byte buffer (it derefs to `Vec<u8>`) whose allocation goes back to the pool when
/// it is dropped, or when the last [`Bytes`] made of it by [`freeze`](Self::freeze) drops.
#[derive(Default)]
pub struct PooledBuf(Vec<u8>);

/// Sizes only: the bytes may be a payload, which is never logged.
impl std::fmt::Debug for PooledBuf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PooledBuf")
            .field("len", &self.0.len())
            .field("capacity", &self.0.capacity())
            .finish()
    }
}

impl PooledBuf {
    /// An empty buffer with room for at least `capacity` bytes: a kept one when the pool has
    /// one of that size, else a new allocation (rounded up to its size class when pooled).
    pub fn with_capacity(capacity: usize) -> Self {
        if !(POOLED_MIN..=POOLED_MAX).contains(&capacity) {
            return Self(Vec::with_capacity(capacity));
        }
        let class = class_at_least(capacity);
        let kept = lock(class).pop();
        match kept {
            Some(buf) => {
                POOL.retained.fetch_sub(buf.capacity(), Ordering::Relaxed);
                debug_assert!(buf.is_empty() && buf.capacity() >= capacity);
                Self(buf)
            }
            None => Self(Vec::with_capacity(class_size(class))),
        }
    }

    /// The buffer as shared bytes; the allocation goes back to the pool when the last clone
    /// (or slice) of them drops.
    pub fn freeze(mut self) -> Bytes {
        if self.0.capacity() < POOLED_MIN {
            // Not poolable: plain `Bytes`; the emptied `self` gives nothing back.
            return Bytes::from(std::mem::take(&mut self.0));
        }
        Bytes::from_owner(self)
    }
}

impl Deref for PooledBuf {
    type Target = Vec<u8>;
    fn deref(&self) -> &Vec<u8> {
        &self.0
    }
}

impl DerefMut for PooledBuf {
    fn deref_mut(&mut self) -> &mut Vec<u8> {
        &mut self.0
    }
}

impl AsRef<[u8]> for PooledBuf {
    fn as_ref(&self) -> &[u8] {
        &self.0
    }
}

impl Drop for PooledBuf {
    fn drop(&mut self) {
        give_back(std::mem::take(&mut self.0));
    }
}

fn lock(class: usize) -> std::sync::MutexGuard<'static, Vec<Vec<u8>>> {
    // A panic while holding the lock leaves a valid list of empty buffers: keep using it.
    POOL.classes[class]
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn give_back(mut buf: Vec<u8>) {
    let capacity = buf.capacity();
    if !(POOLED_MIN..=POOLED_MAX + POOLED_MAX / STEPS).contains(&capacity) {
        return;
    }
    if POOL.retained.fetch_add(capacity, Ordering::Relaxed) + capacity > RETAIN_MAX {
        POOL.retained.fetch_sub(capacity, Ordering::Relaxed);
        return;
    }
    buf.clear();
    let mut kept = lock(class_at_most(capacity));
    if kept.len() < RETAIN_PER_CLASS {
        kept.push(buf);
    } else {
        drop(kept);
        POOL.retained.fetch_sub(capacity, Ordering::Relaxed);
    }
}

/// Frees every kept buffer (the trim thread calls this when the process is quiet).
pub fn release_all() {
    for class in 0..CLASSES {
        let freed: Vec<Vec<u8>> = std::mem::take(&mut *lock(class));
        let bytes: usize = freed.iter().map(Vec::capacity).sum();
        POOL.retained.fetch_sub(bytes, Ordering::Relaxed);
    }
}

/// Bytes of capacity kept in the pool now.
pub fn retained() -> usize {
    POOL.retained.load(Ordering::Relaxed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classes_cover_the_range_in_quarter_steps() {
        assert_eq!(class_size(0), POOLED_MIN);
        assert_eq!(class_size(CLASSES - 1), POOLED_MAX);
        for len in [
            POOLED_MIN,
            POOLED_MIN + 1,
            200_000,
            1 << 20,
            (1 << 20) + 5,
            3_000_000,
            POOLED_MAX - 1,
            POOLED_MAX,
        ] {
            let c = class_at_least(len);
            assert!(class_size(c) >= len, "{len}");
            assert!(
                class_size(c) <= len + len / 4 + 1,
                "{len}: {}",
                class_size(c)
            );
            assert_eq!(class_at_most(class_size(c)), c);
        }
        for cap in [POOLED_MIN, 150_000, (1 << 20) + 300_000, POOLED_MAX * 2] {
            assert!(class_size(class_at_most(cap)) <= cap.min(POOLED_MAX));
        }
    }

    /// One test touches the process-wide pool, so counts are not disturbed by others.
    #[test]
    fn buffers_are_reused_empty_and_bounded() {
        release_all();
        assert_eq!(retained(), 0);

        // Small and huge buffers never enter the pool.
        drop(PooledBuf::with_capacity(1000));
        drop(PooledBuf::with_capacity(POOLED_MAX * 2));
        assert_eq!(retained(), 0);

        // A frozen buffer comes back when its last slice drops, and is handed out again empty.
        let mut buf = PooledBuf::with_capacity(1 << 20);
        buf.extend_from_slice(&[0xAB; 1 << 20]);
        let ptr = buf.as_ptr();
        let bytes = buf.freeze();
        let tail = bytes.slice(100..200);
        drop(bytes);
        assert_eq!(retained(), 0, "a slice still holds it");
        drop(tail);
        assert!(retained() >= 1 << 20);
        let again = PooledBuf::with_capacity(1 << 20);
        assert_eq!(again.as_ptr(), ptr);
        assert!(again.is_empty());
        drop(again);

        // A buffer that grew past its class goes back into the class its capacity covers.
        let mut grown = PooledBuf::with_capacity(POOLED_MIN);
        grown.reserve(600_000);
        let cap = grown.capacity();
        drop(grown);
        let reused = PooledBuf::with_capacity(class_size(class_at_most(cap)));
        assert!(reused.capacity() >= cap.min(POOLED_MAX));
        drop(reused);

        // The total bound holds however many buffers come back.
        let many: Vec<PooledBuf> = (0..64)
            .map(|_| PooledBuf::with_capacity(POOLED_MAX))
            .collect();
        drop(many);
        assert!(retained() <= RETAIN_MAX, "{}", retained());

        release_all();
        assert_eq!(retained(), 0);
    }
}
