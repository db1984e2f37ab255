//! A fault stage for tests: drops, duplicates, reorders, truncates or corrupts packets
//! between the device and the stack, deterministically from a seed.
//!
//! The local TUN path never loses a packet, but a stack must survive loss (a full queue
//! is loss), and a suite must be able to fail (a corrupted byte has to show up as a wrong
//! digest). The in-memory suite puts it in front of its engines; a variant binary puts it
//! around its TUN when `TUNGATE_TEST_FAULTS` is set (test use only: see the binaries'
//! `--help`), so real clients' transfers cross real loss and reordering.
//!
//! Reordering holds a packet back and lets it follow the next read's packets (or, when
//! writing, the next packet written); a duplicate follows the same way.

use std::collections::VecDeque;
use std::future::Future;
use std::io;
use std::str::FromStr;
use std::sync::Arc;

use smoltcp::wire::{IpAddress, IpProtocol, Ipv4Packet, Ipv6Packet, TcpPacket};

use super::{PacketBuf, PacketDevice};
use crate::config::Mtu;
use crate::packet;
use crate::stats::Stats;

/// What to do to packets, each in packets per thousand, decided per packet from `seed`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Faults {
    pub drop_per_mille: u32,
    pub duplicate_per_mille: u32,
    pub reorder_per_mille: u32,
    /// Cut the packet short (at least its first 20 bytes stay): the stack must count it
    /// as malformed, the kernel drops it.
    pub truncate_per_mille: u32,
    /// Flip one payload byte of the Nth packet read that carries TCP data (and fix its
    /// checksum, so the stack takes it as valid).
    pub corrupt_nth_data_segment: Option<u64>,
    /// Packets written are faulted too, not only packets read.
    pub both_ways: bool,
    /// TCP SYN, FIN and RST are never dropped (a peer stack that recovers badly from a
    /// lost control segment would be what is tested).
    pub spare_control: bool,
    pub seed: u64,
}

impl FromStr for Faults {
    type Err = String;

    /// `loss=10,dup=10,reorder=10,truncate=1,seed=7,both` (rates per mille; `both` faults
    /// packets written as well as read).
    fn from_str(spec: &str) -> Result<Self, String> {
        let mut faults = Faults::default();
        for item in spec.split(',').map(str::trim).filter(|s| !s.is_empty()) {
            if item == "both" {
                faults.both_ways = true;
                continue;
            }
            let (key, value) = item.split_once('=').ok_or_else(|| format!("{item:?}: expected KEY=VALUE or `both`"))?;
            let number = |max: u64| -> Result<u64, String> {
                value.parse::<u64>().ok().filter(|v| *v <= max).ok_or_else(|| format!("{item:?}: expected 0..={max}"))
            };
            match key {
                "loss" => faults.drop_per_mille = number(1000)? as u32,
                "dup" => faults.duplicate_per_mille = number(1000)? as u32,
                "reorder" => faults.reorder_per_mille = number(1000)? as u32,
                "truncate" => faults.truncate_per_mille = number(1000)? as u32,
                "seed" => faults.seed = number(u64::MAX)?,
                _ => return Err(format!("{key:?}: unknown fault (loss, dup, reorder, truncate, seed, both)")),
            }
        }
        Ok(faults)
    }
}

/// Faults injected so far, for a test to check that its run was faulted at all.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Injected {
    pub dropped: u64,
    pub duplicated: u64,
    pub reordered: u64,
    pub truncated: u64,
    pub corrupted: u64,
}

/// Wraps a device and applies [`Faults`] to what it reads (and, with `both_ways`, writes).
#[derive(Debug)]
pub struct Faulty<D> {
    inner: D,
    faults: Faults,
    rng: u64,
    /// Packets read that follow the next read's (reordered, duplicates).
    held_rx: VecDeque<PacketBuf>,
    /// A packet to write after the next one.
    held_tx: Option<PacketBuf>,
    data_segments: u64,
    /// Any fault is configured (otherwise every call goes straight through).
    active: bool,
    pub injected: Injected,
    /// Where injected faults are counted too (`test_faults_injected`).
    stats: Option<Arc<Stats>>,
}

/// What becomes of one packet.
enum Fate {
    Pass,
    Drop,
    Hold,
    Duplicate,
    Truncate(usize),
}

impl<D> Faulty<D> {
    pub fn new(inner: D, faults: Faults) -> Self {
        Faulty {
            inner,
            rng: faults.seed | 1,
            faults,
            held_rx: VecDeque::new(),
            held_tx: None,
            data_segments: 0,
            active: faults != Faults::default(),
            injected: Injected::default(),
            stats: None,
        }
    }

    /// Counts every injected fault in `stats` (`test_faults_injected`) as well.
    pub fn counting(mut self, stats: Arc<Stats>) -> Self {
        self.stats = Some(stats);
        self
    }

    fn injected_one(&self) {
        if let Some(stats) = &self.stats {
            Stats::inc(&stats.test_faults_injected);
        }
    }

    fn next(&mut self) -> u64 {
        self.rng ^= self.rng << 13;
        self.rng ^= self.rng >> 7;
        self.rng ^= self.rng << 17;
        self.rng
    }

    fn roll(&mut self, per_mille: u32) -> bool {
        per_mille > 0 && (self.next() % 1000) < u64::from(per_mille)
    }

    fn fate(&mut self, packet: &PacketBuf) -> Fate {
        let (f, p) = (self.faults, packet.packet());
        if !(f.spare_control && is_tcp_control(p)) && self.roll(f.drop_per_mille) {
            self.injected.dropped += 1;
            self.injected_one();
            return Fate::Drop;
        }
        // Not a super-packet: the kernel takes a cut one for a broken offload path.
        if p.len() > 20 && packet.meta.gso.is_none() && self.roll(f.truncate_per_mille) {
            self.injected.truncated += 1;
            self.injected_one();
            return Fate::Truncate(20 + (self.next() % (p.len() as u64 - 20)) as usize);
        }
        if self.roll(f.reorder_per_mille) {
            self.injected.reordered += 1;
            self.injected_one();
            return Fate::Hold;
        }
        if self.roll(f.duplicate_per_mille) {
            self.injected.duplicated += 1;
            self.injected_one();
            return Fate::Duplicate;
        }
        Fate::Pass
    }

    /// Corrupts the configured data segment among packets read.
    fn corrupt(&mut self, p: &mut [u8]) {
        if self.faults.corrupt_nth_data_segment.is_some() && carries_tcp_data(p) {
            self.data_segments += 1;
            if self.faults.corrupt_nth_data_segment == Some(self.data_segments) && corrupt_tcp_payload(p) {
                self.injected.corrupted += 1;
            }
        }
    }
}

/// Copies `from` (data and metadata) into `to`, which must be large enough.
fn copy_into(to: &mut PacketBuf, from: &PacketBuf) {
    to.spare_mut()[..from.len()].copy_from_slice(from.packet());
    to.set_len(from.len());
    to.meta = from.meta;
}

impl<D: PacketDevice> PacketDevice for Faulty<D> {
    fn readable(&mut self) -> impl Future<Output = io::Result<()>> + Send {
        let held = !self.held_rx.is_empty();
        let inner = self.inner.readable();
        async move { if held { Ok(()) } else { inner.await } }
    }

    fn try_recv(&mut self, buf: &mut PacketBuf) -> io::Result<bool> {
        Ok(self.try_recv_batch(std::slice::from_mut(buf))? == 1)
    }

    fn try_recv_batch(&mut self, bufs: &mut [PacketBuf]) -> io::Result<usize> {
        if !self.active {
            return self.inner.try_recv_batch(bufs);
        }
        // Room for this read's packets, the held ones after them (one fresh at least).
        let fresh = bufs.len().saturating_sub(self.held_rx.len()).max(1).min(bufs.len());
        let n = self.inner.try_recv_batch(&mut bufs[..fresh])?;
        let mut kept = 0;
        let mut held = Vec::new();
        for i in 0..n {
            let keep = match self.fate(&bufs[i]) {
                Fate::Pass => true,
                Fate::Drop => false,
                Fate::Hold => {
                    held.push(bufs[i].clone());
                    false
                }
                Fate::Duplicate => {
                    held.push(bufs[i].clone());
                    true
                }
                Fate::Truncate(len) => {
                    bufs[i].set_len(len);
                    true
                }
            };
            if keep {
                self.corrupt(bufs[i].packet_mut());
                bufs.swap(kept, i);
                kept += 1;
            }
        }
        while kept < bufs.len() {
            let Some(p) = self.held_rx.pop_front() else { break };
            if p.len() <= bufs[kept].capacity() {
                copy_into(&mut bufs[kept], &p);
                kept += 1;
            }
        }
        self.held_rx.extend(held);
        Ok(kept)
    }

    async fn send(&mut self, packet: &PacketBuf) -> io::Result<()> {
        let before = self.held_tx.take();
        if !self.active || !self.faults.both_ways {
            self.inner.send(packet).await?;
        } else {
            match self.fate(packet) {
                Fate::Pass => self.inner.send(packet).await?,
                Fate::Drop => {}
                Fate::Hold => self.held_tx = Some(packet.clone()),
                Fate::Duplicate => {
                    self.inner.send(packet).await?;
                    self.inner.send(packet).await?;
                }
                Fate::Truncate(len) => {
                    let mut short = packet.clone();
                    short.set_len(len);
                    self.inner.send(&short).await?;
                }
            }
        }
        if let Some(before) = before {
            self.inner.send(&before).await?;
        }
        Ok(())
    }

    fn mtu(&self) -> Mtu {
        self.inner.mtu()
    }

    fn max_packet_len(&self) -> usize {
        self.inner.max_packet_len()
    }

    fn segmentation_offload(&self) -> bool {
        self.inner.segmentation_offload()
    }
}

/// Flips a byte of the TCP payload and recomputes the checksum; false if `p` has no TCP
/// payload.
fn corrupt_tcp_payload(p: &mut [u8]) -> bool {
    let (src, dst, offset): (IpAddress, IpAddress, usize) = match p.first().map(|b| b >> 4) {
        Some(4) => match Ipv4Packet::new_checked(&*p) {
            Ok(ip) if ip.next_header() == IpProtocol::Tcp => {
                (ip.src_addr().into(), ip.dst_addr().into(), ip.header_len() as usize)
            }
            _ => return false,
        },
        Some(6) => match Ipv6Packet::new_checked(&*p) {
            Ok(ip) if ip.next_header() == IpProtocol::Tcp => (ip.src_addr().into(), ip.dst_addr().into(), 40),
            _ => return false,
        },
        _ => return false,
    };
    let Ok(mut tcp) = TcpPacket::new_checked(&mut p[offset..]) else { return false };
    if tcp.payload_mut().is_empty() {
        return false;
    }
    tcp.payload_mut()[0] ^= 0x20;
    tcp.fill_checksum(&src, &dst);
    true
}

/// Whether `p` is a TCP segment with SYN, FIN or RST set.
fn is_tcp_control(p: &[u8]) -> bool {
    packet::tcp_segment(p).is_some_and(|t| t.syn() || t.fin() || t.rst())
}

fn carries_tcp_data(p: &[u8]) -> bool {
    packet::tcp_segment(p).is_some_and(|t| !t.payload().is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::device::mem;

    #[test]
    fn specs_parse_and_bad_ones_say_why() {
        let f: Faults = "loss=10, reorder=20,dup=5,truncate=1,seed=7,both".parse().expect("valid");
        assert_eq!(
            f,
            Faults {
                drop_per_mille: 10,
                duplicate_per_mille: 5,
                reorder_per_mille: 20,
                truncate_per_mille: 1,
                both_ways: true,
                seed: 7,
                ..Faults::default()
            }
        );
        assert!("loss=1001".parse::<Faults>().unwrap_err().contains("0..=1000"));
        assert!("jitter=3".parse::<Faults>().unwrap_err().contains("unknown fault"));
        assert!("loss".parse::<Faults>().unwrap_err().contains("KEY=VALUE"));
    }

    /// Every packet read arrives, or was dropped, exactly as counted: reordered ones after
    /// their successors, duplicates twice, truncated ones shorter; nothing else changes.
    #[tokio::test]
    async fn reads_are_faulted_as_counted_and_nothing_else_is_lost() {
        let (device, peer) = mem::pair(Mtu::DEFAULT, 4096);
        let faults = Faults {
            drop_per_mille: 50,
            duplicate_per_mille: 50,
            reorder_per_mille: 50,
            truncate_per_mille: 50,
            seed: 3,
            ..Faults::default()
        };
        let mut device = Faulty::new(device, faults);
        let sent: Vec<Vec<u8>> =
            (0..2000u32).map(|i| [&[0x45u8; 16][..], &i.to_be_bytes(), &[7u8; 60]].concat()).collect();
        for p in &sent {
            peer.tx.send(p.clone()).await.expect("send");
        }
        let mut got: Vec<Vec<u8>> = Vec::new();
        let mut bufs: Vec<PacketBuf> = (0..64).map(|_| PacketBuf::with_capacity(1500)).collect();
        loop {
            let n = device.try_recv_batch(&mut bufs).expect("read");
            got.extend(bufs[..n].iter().map(|b| b.packet().to_vec()));
            if n == 0 && device.held_rx.is_empty() {
                break;
            }
        }
        let i = device.injected;
        assert!(i.dropped > 0 && i.duplicated > 0 && i.reordered > 0 && i.truncated > 0, "{i:?}");
        let whole = got.iter().filter(|p| p.len() == 80).count() as u64;
        let short = got.iter().filter(|p| p.len() < 80).count() as u64;
        assert_eq!(short, i.truncated);
        assert_eq!(whole + short, 2000 - i.dropped + i.duplicated);
        let out_of_order =
            got.windows(2).filter(|w| w[0].len() == 80 && w[1].len() == 80 && w[0][16..20] > w[1][16..20]).count();
        assert!(out_of_order > 0, "reordered packets follow later ones");
        assert!(got.iter().all(|p| sent.iter().any(|s| s.starts_with(p))), "only cuts, no other change");
    }
}
