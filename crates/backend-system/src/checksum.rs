//! Incremental Internet checksum updates (RFC 1624), for rewriting addresses and ports in
//! place without summing the payload again — which matters on 64 KiB super-packets.
//!
//! A [`Delta`] collects the 16-bit words that change (old → new). It then updates either
//!
//! * a **final** checksum field `HC` (a plain packet): `HC' = ~(~HC + ~m + m')`
//!   (RFC 1624 eqn. 3, which never produces the +0/-0 ambiguity of eqn. 2), or
//! * a **partial** field (`NEEDS_CSUM` offload): it holds the uncomplemented
//!   pseudo-header sum `P`, so `P' = P + ~m + m'`. Only words of the pseudo-header
//!   (addresses) may go into such a delta: the ports are summed later, from the header.

/// The accumulated change of some 16-bit words of a checksummed region.
#[derive(Debug, Clone, Copy, Default)]
pub struct Delta(u32);

impl Delta {
    /// Records that the bytes `old` became `new` (equal even lengths, word-aligned in the
    /// checksummed region).
    pub fn replace(&mut self, old: &[u8], new: &[u8]) {
        debug_assert_eq!(old.len(), new.len());
        for (o, n) in old.chunks_exact(2).zip(new.chunks_exact(2)) {
            let (o, n) = (u16::from_be_bytes([o[0], o[1]]), u16::from_be_bytes([n[0], n[1]]));
            self.0 += u32::from(!o) + u32::from(n);
        }
        // Fold now and then so many words never overflow.
        self.0 = (self.0 & 0xffff) + (self.0 >> 16);
    }

    /// The final checksum `check` after the recorded change.
    pub fn update_final(self, check: u16) -> u16 {
        !fold(u32::from(!check) + self.0)
    }

    /// The partial (pseudo-header) sum `partial` after the recorded change.
    pub fn update_partial(self, partial: u16) -> u16 {
        fold(u32::from(partial) + self.0)
    }
}

fn fold(mut sum: u32) -> u16 {
    while sum >> 16 != 0 {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    sum as u16
}

#[cfg(test)]
mod tests {
    use super::*;
    use smoltcp::wire::checksum;

    #[test]
    fn matches_a_full_recompute_for_random_rewrites() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(1624);
        for _ in 0..10_000 {
            let len = rng.gen_range(4..64) & !1;
            let mut data: Vec<u8> = (0..len).map(|_| rng.r#gen()).collect();
            let check = !checksum::data(&data);
            let at = rng.gen_range(0..len / 2) * 2;
            let new: [u8; 2] = rng.r#gen();
            let mut delta = Delta::default();
            delta.replace(&data[at..at + 2], &new);
            data[at..at + 2].copy_from_slice(&new);
            let want = !checksum::data(&data);
            let got = delta.update_final(check);
            // 0x0000 and 0xffff are the same number in ones' complement.
            assert!(
                got == want || (got == 0xffff && want == 0) || (got == 0 && want == 0xffff),
                "{got:#x} != {want:#x}"
            );
        }
    }

    #[test]
    fn partial_sums_move_with_the_words() {
        let old = [10u8, 0, 0, 1, 192, 168, 1, 1];
        let new = [198u8, 18, 0, 2, 198, 18, 0, 1];
        let mut delta = Delta::default();
        delta.replace(&old, &new);
        assert_eq!(delta.update_partial(checksum::data(&old)), checksum::data(&new));
    }
}
