//! A map that knows which entry was used least recently: the flow tables' index, so that
//! a session limit can evict the least recently active flow in O(1).

use std::hash::Hash;

use lru::LruCache;

/// Entries by key, ordered by last use ([`touch`](Self::touch) and
/// [`insert`](Self::insert) make an entry the most recent). Unbounded: the caller
/// decides what to evict.
///
/// After a burst it gives back what it grew to: the `lru` crate's table never shrinks,
/// so once at most a quarter of the peak is left (and the peak was past 1 024), the map
/// is rebuilt in order at its present size (amortised O(1) per removal). 8 000 flows'
/// worth of index is otherwise a few hundred KiB an idle gateway keeps for good.
pub struct Recency<K: Hash + Eq, V> {
    map: LruCache<K, V>,
    peak: usize,
}

impl<K: Hash + Eq, V> std::fmt::Debug for Recency<K, V> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Recency").field("len", &self.map.len()).field("peak", &self.peak).finish()
    }
}

impl<K: Hash + Eq, V> Default for Recency<K, V> {
    fn default() -> Self {
        Recency { map: LruCache::unbounded(), peak: 0 }
    }
}

impl<K: Hash + Eq, V> Recency<K, V> {
    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// How many entries its table is sized for: the most it held since it last gave back
    /// growth.
    pub fn sized_for(&self) -> usize {
        self.peak
    }

    /// The entry for `key`, made the most recent.
    pub fn touch(&mut self, key: &K) -> Option<&V> {
        self.map.get(key)
    }

    /// The entry for `key`, its place in the order unchanged.
    pub fn peek(&self, key: &K) -> Option<&V> {
        self.map.peek(key)
    }

    /// Inserts (or replaces) the entry for `key` as the most recent.
    pub fn insert(&mut self, key: K, value: V) -> Option<V> {
        let old = self.map.put(key, value);
        self.peak = self.peak.max(self.map.len());
        old
    }

    pub fn remove(&mut self, key: &K) -> Option<V> {
        let value = self.map.pop(key);
        self.give_back_growth();
        value
    }

    /// Removes and returns the least recently used entry.
    pub fn pop_oldest(&mut self) -> Option<(K, V)> {
        let entry = self.map.pop_lru();
        self.give_back_growth();
        entry
    }

    /// Entries from the least to the most recently used.
    pub fn oldest_first(&self) -> impl Iterator<Item = (&K, &V)> {
        self.map.iter().rev()
    }

    /// Removes every entry for which `keep` is false.
    pub fn retain(&mut self, mut keep: impl FnMut(&K, &V) -> bool)
    where
        K: Clone,
    {
        let gone: Vec<K> = self.map.iter().filter(|(k, v)| !keep(k, v)).map(|(k, _)| k.clone()).collect();
        for key in &gone {
            self.map.pop(key);
        }
        self.give_back_growth();
    }

    fn give_back_growth(&mut self) {
        if self.peak > 1024 && self.map.len() * 4 < self.peak {
            let mut rebuilt = LruCache::unbounded();
            while let Some((k, v)) = self.map.pop_lru() {
                rebuilt.put(k, v);
            }
            self.map = rebuilt;
            self.peak = self.map.len();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_least_recently_touched_goes_first_and_a_rebuild_keeps_the_order() {
        let mut r = Recency::default();
        for i in 0..2000u32 {
            r.insert(i, i * 10);
        }
        assert_eq!(r.touch(&0), Some(&0));
        assert_eq!(r.peek(&1), Some(&10), "a peek does not reorder");
        assert_eq!(r.pop_oldest(), Some((1, 10)));
        // Down to a quarter of the peak: rebuilt, in the same order.
        for i in 2..1600u32 {
            assert_eq!(r.remove(&i), Some(i * 10));
        }
        assert!(r.peak < 2000, "rebuilt after the burst (peak {})", r.peak);
        let order: Vec<u32> = r.oldest_first().map(|(k, _)| *k).collect();
        let expected: Vec<u32> = (1600..2000).chain([0]).collect();
        assert_eq!(order, expected);
        r.retain(|k, _| k % 2 == 0);
        assert_eq!(r.len(), 201);
        assert_eq!(r.pop_oldest(), Some((1600, 16000)));
    }
}
