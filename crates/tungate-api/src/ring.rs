//! The bounded byte FIFO between a stack and a handler, and the budget all of a
//! gateway's rings share.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use crate::stats::Stats;

/// How large the rings of a gateway's flows may grow: each up to `capacity`, all of them
/// together up to a memory limit (`--max-memory`). Past the limit rings stop growing,
/// and flows are still accepted: every flow may take one 4 KiB page per
/// direction it uses (counted too, so the total can pass the limit by those pages), and
/// carries its bytes a page at a time until others give memory back. The bytes held are
/// the [`Stats::ring_bytes`] gauge, shared by every table of one gateway.
#[derive(Clone)]
pub struct RingBudget(Arc<BudgetInner>);

struct BudgetInner {
    capacity: usize,
    limit: u64,
    stats: Arc<Stats>,
}

impl std::fmt::Debug for RingBudget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RingBudget")
            .field("capacity", &self.0.capacity)
            .field("limit", &self.0.limit)
            .field("used", &self.used())
            .finish()
    }
}

impl RingBudget {
    /// Rings of `capacity` bytes each, together at most `limit` bytes (`None`: no limit),
    /// accounted in `stats`.
    pub fn new(capacity: usize, limit: Option<u64>, stats: Arc<Stats>) -> Self {
        RingBudget(Arc::new(BudgetInner { capacity: capacity.max(1), limit: limit.unwrap_or(u64::MAX), stats }))
    }

    /// Rings of `capacity` bytes each and no shared limit.
    pub fn unlimited(capacity: usize) -> Self {
        Self::new(capacity, None, Arc::default())
    }

    /// The most one ring holds.
    pub fn capacity(&self) -> usize {
        self.0.capacity
    }

    /// Bytes all rings of this budget hold now.
    pub fn used(&self) -> u64 {
        self.0.stats.ring_bytes.load(Ordering::Relaxed)
    }

    /// Takes `n` more bytes if they fit under the limit.
    fn try_take(&self, n: usize) -> bool {
        let (limit, n) = (self.0.limit, n as u64);
        let taken = self
            .0
            .stats
            .ring_bytes
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |used| used.checked_add(n).filter(|&t| t <= limit))
            .is_ok();
        if !taken {
            Stats::inc(&self.0.stats.ring_growth_refused);
        }
        taken
    }

    /// Takes `n` bytes whatever the limit (a flow's first page).
    fn take(&self, n: usize) {
        self.0.stats.ring_bytes.fetch_add(n as u64, Ordering::Relaxed);
    }

    fn give_back(&self, n: usize) {
        self.0.stats.ring_bytes.fetch_sub(n as u64, Ordering::Relaxed);
    }
}

/// A bounded byte FIFO that lends its contiguous filled and free regions, so a relay
/// can `write(2)` straight from it and `read(2)` straight into it (no bounce buffer).
/// `VecDeque<u8>` has no safe way to expose its spare capacity, hence this small ring.
///
/// Its storage follows use, not its capacity: none until the first byte, then
/// [`MIN_STORAGE`], doubled (up to the capacity) whenever a writer fills all the space it
/// was lent, so a flow that carries a few bytes at a time never holds more than a page
/// while a bulk flow reaches the full capacity within a few reads. Small storage is
/// freed as soon as the ring empties; large storage when its owner says the flow went
/// quiet ([`Ring::release_if_empty`]). Growth beyond the first page needs room in the
/// gateway's [`RingBudget`]; every byte of storage is accounted there.
#[derive(Debug)]
pub(crate) struct Ring {
    buf: Vec<u8>,
    cap: usize,
    budget: RingBudget,
    head: usize,
    len: usize,
    /// Bytes the last [`Ring::spare`] lent.
    lent: usize,
    /// The writer committed all it was lent (it had more than fit): the next `spare`
    /// grows the storage.
    grow: bool,
}

/// The storage a ring starts with, and the size up to which it is freed whenever it
/// empties: a page, which a few-bytes exchange never outgrows.
pub(crate) const MIN_STORAGE: usize = 4096;

impl Ring {
    /// The counters its budget reports to.
    pub(crate) fn stats(&self) -> &Stats {
        &self.budget.0.stats
    }
}

impl Ring {
    pub(crate) fn new(budget: RingBudget) -> Self {
        Ring { buf: Vec::new(), cap: budget.capacity(), budget, head: 0, len: 0, lent: 0, grow: false }
    }

    /// Replaces the storage (the caller moved or dropped its bytes), keeping the budget's
    /// account of it.
    fn set_storage(&mut self, next: Vec<u8>) {
        // One update of the shared gauge, not two: this runs whenever a ring takes or
        // frees its page, i.e. per message on an interactive flow.
        match next.len().cmp(&self.buf.len()) {
            std::cmp::Ordering::Greater => self.budget.take(next.len() - self.buf.len()),
            std::cmp::Ordering::Less => self.budget.give_back(self.buf.len() - next.len()),
            std::cmp::Ordering::Equal => {}
        }
        self.buf = next;
    }

    pub(crate) fn len(&self) -> usize {
        self.len
    }

    /// The most the ring holds (its storage may be smaller until it is needed).
    pub(crate) fn capacity(&self) -> usize {
        self.cap
    }

    /// Bytes of storage allocated now.
    #[cfg(test)]
    pub(crate) fn storage(&self) -> usize {
        self.buf.len()
    }

    /// The oldest contiguous run of bytes.
    pub(crate) fn filled(&self) -> &[u8] {
        let end = (self.head + self.len).min(self.buf.len());
        &self.buf[self.head.min(end)..end]
    }

    pub(crate) fn consume(&mut self, n: usize) {
        debug_assert!(n <= self.len);
        self.len -= n;
        if self.len == 0 {
            self.head = 0;
            if self.buf.len() <= MIN_STORAGE {
                self.set_storage(Vec::new());
            }
        } else {
            self.head = (self.head + n) % self.buf.len();
        }
    }

    /// Frees the storage if nothing is buffered; returns the bytes freed.
    pub(crate) fn release_if_empty(&mut self) -> usize {
        if self.len > 0 {
            return 0;
        }
        self.grow = false;
        let freed = self.buf.len();
        self.set_storage(Vec::new());
        freed
    }

    /// Moves the contents into storage of `size` bytes, oldest byte first. The caller
    /// took the growth from the budget.
    fn grow_storage(&mut self, size: usize) {
        let mut next = vec![0; size];
        let n = self.peek(&mut next);
        debug_assert_eq!(n, self.len);
        self.buf = next;
        self.head = 0;
    }

    /// The first contiguous free region (empty when full).
    pub(crate) fn spare(&mut self) -> &mut [u8] {
        if self.len == self.cap {
            return &mut [];
        }
        let storage = self.buf.len();
        if storage == 0 {
            self.set_storage(vec![0; MIN_STORAGE.min(self.cap)]);
        } else if storage < self.cap && (self.grow || self.len == storage) {
            let next = (storage * 2).min(self.cap);
            // Over budget the ring keeps its size: the writer gets what space it has
            // (nothing while full, and the flow waits like any full ring's).
            if self.budget.try_take(next - storage) {
                self.grow_storage(next);
            }
        }
        self.grow = false;
        let storage = self.buf.len();
        let tail = (self.head + self.len) % storage;
        let end = if tail >= self.head && self.len < storage { storage } else { self.head };
        self.lent = end - tail;
        &mut self.buf[tail..end]
    }

    /// Keeps `n` bytes of the region [`Ring::spare`] lent. Call it after every `spare`,
    /// with 0 when the writer wrote nothing (or failed): an empty ring then frees the
    /// page `spare` allocated.
    pub(crate) fn commit(&mut self, n: usize) {
        debug_assert!(self.len + n <= self.buf.len());
        self.len += n;
        // All the space lent was used: the writer had more. Grow before the next write.
        self.grow = n > 0 && n == self.lent;
        self.lent = 0;
        if self.len == 0 && self.buf.len() <= MIN_STORAGE {
            self.set_storage(Vec::new());
        }
    }

    pub(crate) fn push(&mut self, mut data: &[u8]) -> usize {
        let mut total = 0;
        while !data.is_empty() {
            let spare = self.spare();
            let n = spare.len().min(data.len());
            if n == 0 {
                break;
            }
            spare[..n].copy_from_slice(&data[..n]);
            self.commit(n);
            data = &data[n..];
            total += n;
        }
        total
    }

    pub(crate) fn pop(&mut self, out: &mut [u8]) -> usize {
        let n = self.peek(out);
        self.consume(n);
        n
    }

    /// Copies the oldest bytes into `out` without consuming them; returns how many.
    pub(crate) fn peek(&self, out: &mut [u8]) -> usize {
        let n = out.len().min(self.len);
        let first = (self.buf.len() - self.head).min(n);
        out[..first].copy_from_slice(&self.buf[self.head..self.head + first]);
        out[first..n].copy_from_slice(&self.buf[..n - first]);
        n
    }
}

impl Drop for Ring {
    fn drop(&mut self) {
        self.budget.give_back(self.buf.len());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    impl Ring {
        fn with_capacity(cap: usize) -> Self {
            Ring::new(RingBudget::unlimited(cap))
        }
    }

    #[test]
    fn ring_wraps_and_bounds() {
        let mut r = Ring::with_capacity(8);
        assert_eq!(r.push(b"abcdef"), 6);
        let mut out = [0u8; 4];
        assert_eq!(r.pop(&mut out), 4);
        assert_eq!(&out, b"abcd");
        assert_eq!(r.push(b"ghijklmn"), 6);
        let mut peeked = [0u8; 16];
        assert_eq!(r.peek(&mut peeked), 8);
        assert_eq!(&peeked[..8], b"efghijkl", "peek crosses the wrap");
        let mut out = [0u8; 16];
        assert_eq!(r.pop(&mut out), 8);
        assert_eq!(&out[..8], b"efghijkl");
    }

    /// Random pushes, pops, peeks and releases against a `VecDeque`; chunks up to `chunk`
    /// bytes (chunks above `MIN_STORAGE` make the storage grow while bytes wrap). The
    /// budget accounts exactly the storage held, which never passes `limit` (but for
    /// the first page).
    fn matches_a_model(cap: usize, chunk: u64, limit: Option<u64>) {
        let budget = RingBudget::new(cap, limit, Arc::default());
        let mut ring = Ring::new(budget.clone());
        // What the ring can grow to: doublings of a page while they fit the budget.
        let mut room = MIN_STORAGE.min(cap);
        while room < cap && (room * 2).min(cap) as u64 <= limit.unwrap_or(u64::MAX) {
            room = (room * 2).min(cap);
        }
        let mut model = std::collections::VecDeque::new();
        let mut x = 0x2545_F491_4F6C_DD1Du64;
        let mut next = move || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        let mut counter = 0u8;
        for _ in 0..20_000 {
            match next() % 7 {
                0 | 1 => {
                    let data: Vec<u8> = (0..next() % chunk)
                        .map(|_| {
                            counter = counter.wrapping_add(1);
                            counter
                        })
                        .collect();
                    let n = ring.push(&data);
                    assert_eq!(n, data.len().min(room - model.len()));
                    model.extend(&data[..n]);
                }
                2 | 3 => {
                    let mut out = vec![0u8; (next() % chunk) as usize];
                    let n = ring.pop(&mut out);
                    let want: Vec<u8> = model.drain(..n.min(model.len())).collect();
                    assert_eq!(&out[..n], &want[..]);
                    assert_eq!(n, out.len().min(want.len() + model.len()));
                }
                4 | 5 => {
                    let mut out = vec![0u8; (next() % (2 * chunk)) as usize];
                    let n = ring.peek(&mut out);
                    assert_eq!(n, out.len().min(model.len()));
                    assert!(out[..n].iter().eq(model.iter().take(n)), "peek shows the oldest bytes");
                }
                _ => {
                    let freed = ring.release_if_empty();
                    assert!(model.is_empty() || freed == 0, "released storage that held bytes");
                }
            }
            assert_eq!(ring.len(), model.len());
            assert!(ring.storage() <= cap);
            assert_eq!(budget.used(), ring.storage() as u64, "the budget accounts the storage exactly");
            assert!(ring.storage() as u64 <= limit.unwrap_or(u64::MAX).max(MIN_STORAGE as u64));
        }
        drop(ring);
        assert_eq!(budget.used(), 0, "a dropped ring gives its storage back");
    }

    #[test]
    fn ring_matches_a_model_under_random_operations() {
        matches_a_model(97, 60, None);
    }

    #[test]
    fn growing_ring_matches_a_model_under_random_operations() {
        matches_a_model(100_000, 9_000, None);
    }

    #[test]
    fn a_ring_under_a_spent_budget_matches_a_model() {
        matches_a_model(100_000, 9_000, Some(20_000));
    }

    #[test]
    fn rings_grow_within_their_shared_budget() {
        let budget = RingBudget::new(256 * 1024, Some(64 * 1024), Arc::default());
        let (mut a, mut b) = (Ring::new(budget.clone()), Ring::new(budget.clone()));
        let data = vec![7u8; 200_000];
        assert_eq!(a.push(&data), 64 * 1024, "a ring grows only while the budget has room");
        assert_eq!(budget.used(), 64 * 1024);
        assert_eq!(b.push(b"hello"), 5, "a ring gets its first page past the budget");
        assert_eq!(budget.used(), 64 * 1024 + MIN_STORAGE as u64);
        assert_eq!(b.push(&data), MIN_STORAGE - 5, "and grows no further");
        let mut out = vec![0u8; 64 * 1024];
        assert_eq!(a.pop(&mut out), 64 * 1024);
        assert_eq!(a.release_if_empty(), 64 * 1024);
        assert_eq!(budget.used(), MIN_STORAGE as u64, "released storage goes back to the budget");
        assert_eq!(b.push(&data), 64 * 1024 - MIN_STORAGE, "which the other ring can now grow into");
    }

    #[test]
    fn storage_follows_use() {
        let mut r = Ring::with_capacity(256 * 1024);
        assert_eq!(r.storage(), 0, "nothing allocated before the first byte");
        assert_eq!(r.push(b"hello"), 5);
        assert_eq!(r.storage(), MIN_STORAGE);
        let mut out = [0u8; 5];
        assert_eq!(r.pop(&mut out), 5);
        assert_eq!(r.storage(), 0, "a page is freed as soon as the ring empties");

        // A writer with more than fits grows the storage to what it has in flight.
        let data: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
        assert_eq!(r.push(&data), data.len());
        assert_eq!(r.storage(), 256 * 1024, "doubled up to the capacity");
        let mut out = vec![0u8; data.len()];
        assert_eq!(r.pop(&mut out), data.len());
        assert_eq!(out, data);
        assert_eq!(r.storage(), 256 * 1024, "large storage stays while the flow is busy");
        assert_eq!(r.release_if_empty(), 256 * 1024);
        assert_eq!(r.storage(), 0);

        // Bytes that never outgrow the space lent never grow it.
        for _ in 0..100 {
            let spare = r.spare();
            spare[..100].fill(7);
            r.commit(100);
            let mut out = [0u8; 100];
            assert_eq!(r.pop(&mut out), 100);
        }
        assert_eq!(r.storage(), 0);
        assert_eq!(r.push(&[1; 3000]), 3000);
        assert_eq!(r.storage(), MIN_STORAGE, "partly used space does not grow");
        assert_eq!(r.release_if_empty(), 0, "never frees bytes still buffered");
    }
}
