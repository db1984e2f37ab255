//! A fault-injecting device wrapper: drops, duplicates or corrupts packets on their way
//! from the peer to the gateway, deterministically from a seed. The local TUN path never
//! loses packets, but a stack must survive it (a full queue is loss), and the suite must
//! be able to fail: a corrupted byte has to show up as a wrong digest.

use std::io;

use smoltcp::wire::{IpAddress, IpProtocol, Ipv4Packet, Ipv6Packet, TcpPacket};
use tungate_core::{Mtu, PacketBuf, PacketDevice, packet};

/// What to do to packets from the peer, in packets per thousand.
#[derive(Debug, Clone, Copy, Default)]
pub struct Faults {
    pub drop_per_mille: u32,
    pub duplicate_per_mille: u32,
    /// Flip one payload byte of the Nth TCP segment that carries data (and fix its
    /// checksum, so the stack accepts it as valid).
    pub corrupt_nth_data_segment: Option<u64>,
    pub seed: u64,
}

/// Wraps a device and applies [`Faults`] to what it receives.
#[derive(Debug)]
pub struct FaultDevice<D> {
    inner: D,
    faults: Faults,
    rng: u64,
    duplicate: Option<PacketBuf>,
    data_segments: u64,
    /// Packets dropped, duplicated and corrupted so far.
    pub injected: (u64, u64, u64),
}

impl<D> FaultDevice<D> {
    pub fn new(inner: D, faults: Faults) -> Self {
        FaultDevice { inner, rng: faults.seed | 1, faults, duplicate: None, data_segments: 0, injected: (0, 0, 0) }
    }

    fn roll(&mut self, per_mille: u32) -> bool {
        self.rng ^= self.rng << 13;
        self.rng ^= self.rng >> 7;
        self.rng ^= self.rng << 17;
        (self.rng % 1000) < per_mille as u64
    }
}

/// Flips a byte of the TCP payload and recomputes the checksum; false if `p` has no
/// TCP payload.
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

impl<D: PacketDevice> PacketDevice for FaultDevice<D> {
    async fn readable(&mut self) -> io::Result<()> {
        if self.duplicate.is_some() {
            return Ok(());
        }
        self.inner.readable().await
    }

    fn try_recv(&mut self, buf: &mut PacketBuf) -> io::Result<bool> {
        if let Some(dup) = self.duplicate.take() {
            buf.spare_mut()[..dup.len()].copy_from_slice(dup.packet());
            buf.set_len(dup.len());
            return Ok(true);
        }
        loop {
            if !self.inner.try_recv(buf)? {
                return Ok(false);
            }
            // Control segments are spared: the suite checks how a stack recovers data, and
            // a lost SYN or FIN only adds a fixed retransmission wait.
            if !is_tcp_control(buf.packet()) && self.roll(self.faults.drop_per_mille) {
                self.injected.0 += 1;
                continue;
            }
            if carries_tcp_data(buf.packet()) {
                self.data_segments += 1;
                if self.faults.corrupt_nth_data_segment == Some(self.data_segments)
                    && corrupt_tcp_payload(buf.packet_mut())
                {
                    self.injected.2 += 1;
                }
            }
            if self.roll(self.faults.duplicate_per_mille) {
                self.injected.1 += 1;
                self.duplicate = Some(PacketBuf::from_slice(buf.packet()));
            }
            return Ok(true);
        }
    }

    async fn send(&mut self, packet: &PacketBuf) -> io::Result<()> {
        self.inner.send(packet).await
    }

    fn mtu(&self) -> Mtu {
        self.inner.mtu()
    }
}
