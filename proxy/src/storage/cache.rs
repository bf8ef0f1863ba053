//! A cache of resolved (verified) stored payloads, bounded in bytes: `quick_cache` (S3-FIFO
//! eviction, sharded locks) weighted by payload length.

use bytes::Bytes;
use quick_cache::Weighter;
use quick_cache::sync::Cache;

/// Weighs an entry by the length of its value (at least 1, so empty values still count).
#[derive(Debug, Clone, Copy)]
struct ByLength;

impl Weighter<String, Bytes> for ByLength {
    fn weight(&self, _key: &String, value: &Bytes) -> u64 {
        value.len().max(1) as u64
    }
}

/// Resolved payloads by claim, bounded by the total length of the values.
#[derive(Debug)]
pub struct ByteCache {
    capacity: usize,
    inner: Option<Cache<String, Bytes, ByLength>>,
}

/// Entries a cache of `capacity` bytes is sized for up front (stored payloads are large).
const TYPICAL_ENTRY_BYTES: usize = 64 * 1024;

impl ByteCache {
    /// A cache holding at most `capacity` bytes of values (0: caches nothing).
    pub fn new(capacity: usize) -> Self {
        let inner = (capacity > 0).then(|| {
            let items = (capacity / TYPICAL_ENTRY_BYTES).clamp(16, 1 << 16);
            Cache::with_weighter(items, capacity as u64, ByLength)
        });
        Self { capacity, inner }
    }

    /// The value for `key`.
    pub fn get(&self, key: &str) -> Option<Bytes> {
        self.inner.as_ref()?.get(key)
    }

    /// Inserts `value`, evicting entries to stay within capacity. Values larger than a quarter
    /// of the capacity are not cached, so one object cannot flush the cache.
    pub fn insert(&self, key: String, value: Bytes) {
        if value.len() > self.capacity / 4 {
            return;
        }
        if let Some(cache) = &self.inner {
            cache.insert(key, value);
        }
    }

    /// Bytes currently held.
    pub fn size(&self) -> usize {
        self.inner.as_ref().map_or(0, |c| c.weight() as usize)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stays_within_its_byte_capacity() {
        let c = ByteCache::new(40 * 1024);
        for i in 0..100 {
            c.insert(format!("k{i}"), Bytes::from(vec![0; 1024]));
            assert!(c.size() <= 40 * 1024, "size {} after {i}", c.size());
        }
        assert!(c.size() > 0);
        // Recently inserted entries that fit are found.
        assert!(c.get("k99").is_some());
    }

    #[test]
    fn refuses_values_over_a_quarter_of_the_capacity() {
        let c = ByteCache::new(40);
        c.insert("small".into(), Bytes::from(vec![0; 10]));
        c.insert("big".into(), Bytes::from(vec![0; 11]));
        assert!(c.get("small").is_some());
        assert!(c.get("big").is_none());
        let off = ByteCache::new(0);
        off.insert("x".into(), Bytes::new());
        assert!(off.get("x").is_none());
    }
}
