//! The bounded byte FIFO between a stack and a handler.

/// A bounded byte FIFO that lends its contiguous filled and free regions, so a relay
/// can `write(2)` straight from it and `read(2)` straight into it (no bounce buffer).
/// `VecDeque<u8>` has no safe way to expose its spare capacity, hence this small ring.
/// The storage is allocated on first use: idle directions cost nothing.
#[derive(Debug)]
pub(crate) struct Ring {
    buf: Vec<u8>,
    cap: usize,
    head: usize,
    len: usize,
}

impl Ring {
    pub(crate) fn new(cap: usize) -> Self {
        Ring { buf: Vec::new(), cap: cap.max(1), head: 0, len: 0 }
    }

    pub(crate) fn len(&self) -> usize {
        self.len
    }

    pub(crate) fn capacity(&self) -> usize {
        self.cap
    }

    /// The oldest contiguous run of bytes.
    pub(crate) fn filled(&self) -> &[u8] {
        let end = (self.head + self.len).min(self.buf.len());
        &self.buf[self.head.min(end)..end]
    }

    pub(crate) fn consume(&mut self, n: usize) {
        debug_assert!(n <= self.len);
        self.len -= n;
        self.head = if self.len == 0 { 0 } else { (self.head + n) % self.cap };
    }

    /// The first contiguous free region (empty when full).
    pub(crate) fn spare(&mut self) -> &mut [u8] {
        if self.buf.is_empty() {
            self.buf = vec![0; self.cap];
        }
        let tail = (self.head + self.len) % self.cap;
        let end = if tail >= self.head && self.len < self.cap { self.cap } else { self.head };
        if self.len == self.cap {
            return &mut [];
        }
        &mut self.buf[tail..end]
    }

    pub(crate) fn commit(&mut self, n: usize) {
        debug_assert!(self.len + n <= self.cap);
        self.len += n;
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
        let first = (self.cap - self.head).min(n);
        out[..first].copy_from_slice(&self.buf[self.head..self.head + first]);
        out[first..n].copy_from_slice(&self.buf[..n - first]);
        n
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ring_wraps_and_bounds() {
        let mut r = Ring::new(8);
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

    #[test]
    fn ring_matches_a_model_under_random_operations() {
        let mut ring = Ring::new(97);
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
            match next() % 3 {
                0 => {
                    let data: Vec<u8> = (0..next() % 60)
                        .map(|_| {
                            counter = counter.wrapping_add(1);
                            counter
                        })
                        .collect();
                    let n = ring.push(&data);
                    assert_eq!(n, data.len().min(97 - model.len()));
                    model.extend(&data[..n]);
                }
                1 => {
                    let mut out = vec![0u8; (next() % 60) as usize];
                    let n = ring.pop(&mut out);
                    let want: Vec<u8> = model.drain(..n.min(model.len())).collect();
                    assert_eq!(&out[..n], &want[..]);
                    assert_eq!(n, out.len().min(want.len() + model.len()));
                }
                _ => {
                    let mut out = vec![0u8; (next() % 120) as usize];
                    let n = ring.peek(&mut out);
                    assert_eq!(n, out.len().min(model.len()));
                    assert!(out[..n].iter().eq(model.iter().take(n)), "peek shows the oldest bytes");
                }
            }
            assert_eq!(ring.len(), model.len());
        }
    }
}
