//! An LRU cache of resolved (verified) stored payloads, bounded in bytes.

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;

use bytes::Bytes;

/// LRU keyed by string, bounded by the total length of its values.
#[derive(Debug)]
pub struct ByteLru {
    capacity: usize,
    inner: Mutex<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    entries: HashMap<String, (Bytes, u64)>,
    order: BTreeMap<u64, String>,
    tick: u64,
    size: usize,
}

impl ByteLru {
    /// A cache holding at most `capacity` bytes of values (0: caches nothing).
    pub fn new(capacity: usize) -> Self {
        Self {
            capacity,
            inner: Mutex::new(Inner::default()),
        }
    }

    /// The value for `key`, marking it most recently used.
    pub fn get(&self, key: &str) -> Option<Bytes> {
        let mut inner = self.inner.lock().expect("cache lock");
        inner.tick += 1;
        let tick = inner.tick;
        let (value, old) = {
            let entry = inner.entries.get_mut(key)?;
            let old = std::mem::replace(&mut entry.1, tick);
            (entry.0.clone(), old)
        };
        inner.order.remove(&old);
        inner.order.insert(tick, key.to_owned());
        Some(value)
    }

    /// Inserts `value`, evicting least recently used entries to stay within capacity. Values
    /// larger than a quarter of the capacity are not cached.
    pub fn insert(&self, key: String, value: Bytes) {
        if value.len() > self.capacity / 4 {
            return;
        }
        let mut inner = self.inner.lock().expect("cache lock");
        inner.tick += 1;
        let tick = inner.tick;
        if let Some((old, old_tick)) = inner.entries.remove(&key) {
            inner.order.remove(&old_tick);
            inner.size -= old.len();
        }
        inner.size += value.len();
        inner.entries.insert(key.clone(), (value, tick));
        inner.order.insert(tick, key);
        while inner.size > self.capacity {
            let Some((_, victim)) = inner.order.pop_first() else {
                break;
            };
            if let Some((v, _)) = inner.entries.remove(&victim) {
                inner.size -= v.len();
            }
        }
    }

    /// Bytes currently held.
    pub fn size(&self) -> usize {
        self.inner.lock().expect("cache lock").size
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn evicts_least_recently_used_by_bytes() {
        let c = ByteLru::new(40);
        c.insert("a".into(), Bytes::from(vec![0; 10]));
        c.insert("b".into(), Bytes::from(vec![0; 10]));
        c.insert("c".into(), Bytes::from(vec![0; 10]));
        assert!(c.get("a").is_some());
        c.insert("d".into(), Bytes::from(vec![0; 10]));
        c.insert("e".into(), Bytes::from(vec![0; 10]));
        assert!(c.get("b").is_none());
        assert!(c.get("a").is_some());
        assert!(c.size() <= 40);
        c.insert("big".into(), Bytes::from(vec![0; 11]));
        assert!(c.get("big").is_none());
    }
}
