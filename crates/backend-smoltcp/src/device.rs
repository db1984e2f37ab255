//! The smoltcp `phy::Device` a flow's interface polls: at most one received packet (the
//! one being demultiplexed) and transmit tokens that write into pooled buffers on the
//! engine's output queue. No allocation once the pool is warm.
//!
//! With segmentation offload (a TUN with offload), smoltcp emits TCP segments of up to
//! 64 KiB; the token marks them as super-packets ([`PacketMeta::gso`], segments of the
//! MSS smoltcp chose) and leaves the TCP checksum partial — the pseudo-header sum in the
//! field, the rest for the kernel — as the virtio-net contract asks. Every TCP segment
//! then carries a partial checksum: smoltcp is told the device computes them.

use std::collections::VecDeque;
use std::num::{NonZeroU16, NonZeroUsize};

use smoltcp::phy::{self, Checksum, DeviceCapabilities, Medium};
use smoltcp::time::Instant;
use smoltcp::wire::{IpAddress, IpProtocol, Ipv4Packet, Ipv6Packet, checksum};
use tungate_core::device::PacketMeta;
use tungate_core::device::offload::{Gso, GsoKind, MAX_SUPER_PACKET, PartialChecksum};
use tungate_core::packet::Layout;
use tungate_core::{PacketBuf, PacketPool};

/// What smoltcp may fill per super-packet (see `capabilities`).
const SUPER_PACKET_BUDGET: usize = MAX_SUPER_PACKET - 1024;

pub(crate) struct FlowDevice<'a> {
    pub(crate) rx: Option<&'a [u8]>,
    pub(crate) out: &'a mut Output,
}

/// Packets waiting for the TUN, and the pools their buffers come from.
#[derive(Debug)]
pub(crate) struct Output {
    pub(crate) queue: VecDeque<PacketBuf>,
    pool: PacketPool,
    /// 64 KiB buffers for super-packets (segmentation offload only).
    big_pool: PacketPool,
    pub(crate) mtu: usize,
    pub(crate) verify_tcp_checksum: bool,
    pub(crate) segmentation_offload: bool,
}

impl Output {
    /// Buffers kept for reuse; beyond this, returned buffers are freed.
    const POOL_LIMIT: usize = 4096;
    /// Super-packet buffers kept: a batch's worth (64 × 64 KiB = 4 MiB at most).
    const BIG_POOL_LIMIT: usize = 64;

    pub(crate) fn new(mtu: usize, verify_tcp_checksum: bool, segmentation_offload: bool) -> Self {
        Output {
            queue: VecDeque::new(),
            pool: PacketPool::new(mtu, Self::POOL_LIMIT),
            big_pool: PacketPool::new(MAX_SUPER_PACKET, Self::BIG_POOL_LIMIT),
            mtu,
            verify_tcp_checksum,
            segmentation_offload,
        }
    }
}

pub(crate) struct Rx<'a>(&'a [u8]);

pub(crate) struct Tx<'a> {
    out: &'a mut Output,
    segment_size: Option<NonZeroU16>,
}

impl phy::RxToken for Rx<'_> {
    fn consume<R, F: FnOnce(&[u8]) -> R>(self, f: F) -> R {
        f(self.0)
    }
}

impl phy::TxToken for Tx<'_> {
    fn consume<R, F: FnOnce(&mut [u8]) -> R>(self, len: usize, f: F) -> R {
        let pool =
            if len > self.out.mtu && self.out.segmentation_offload { &self.out.big_pool } else { &self.out.pool };
        // smoltcp never asks for more than we advertise; a larger request would be a
        // smoltcp bug, and a buffer of its own keeps us correct even then.
        let mut buf = pool.take_fitting(len);
        buf.set_len(len);
        let r = f(buf.packet_mut());
        if self.out.segmentation_offload {
            buf.meta = offload_meta(buf.packet_mut(), self.segment_size);
        }
        self.out.queue.push_back(buf);
        r
    }

    fn set_meta(&mut self, meta: phy::PacketMeta) {
        self.segment_size = meta.segmentation_offload_size;
    }
}

/// For a TCP packet smoltcp built without a checksum: writes the pseudo-header sum into
/// the checksum field and describes the packet for the TUN (partial checksum, and GSO
/// when smoltcp asked for segmentation). Anything else stays a plain packet.
fn offload_meta(p: &mut [u8], segment_size: Option<NonZeroU16>) -> PacketMeta {
    let Some(layout) = Layout::tcp(p) else { return PacketMeta::default() };
    let Some(tcp_header) = layout.tcp_header_len(p) else { return PacketMeta::default() };
    let (src, dst, kind) = if layout.v6 {
        let ip = Ipv6Packet::new_unchecked(&*p);
        (IpAddress::Ipv6(ip.src_addr()), IpAddress::Ipv6(ip.dst_addr()), GsoKind::TcpV6)
    } else {
        let ip = Ipv4Packet::new_unchecked(&*p);
        (IpAddress::Ipv4(ip.src_addr()), IpAddress::Ipv4(ip.dst_addr()), GsoKind::TcpV4)
    };
    let l4 = layout.l4;
    let tcp_len = p.len() - l4;
    let pseudo = checksum::pseudo_header(&src, &dst, IpProtocol::Tcp, tcp_len as u32);
    p[l4 + 16..l4 + 18].copy_from_slice(&pseudo.to_be_bytes());
    let mut meta = PacketMeta::default();
    meta.csum = Some(PartialChecksum { start: l4 as u16, offset: 16 });
    let header_len = l4 + tcp_header;
    if let Some(size) = segment_size {
        if p.len() - header_len > usize::from(size.get()) {
            meta.gso = Some(Gso { kind, size: size.get(), hdr_len: header_len as u16, ecn: false });
        }
    }
    meta
}

impl phy::Device for FlowDevice<'_> {
    type RxToken<'b>
        = Rx<'b>
    where
        Self: 'b;
    type TxToken<'b>
        = Tx<'b>
    where
        Self: 'b;

    fn receive(&mut self, _now: Instant) -> Option<(Self::RxToken<'_>, Self::TxToken<'_>)> {
        let packet = self.rx.take()?;
        Some((Rx(packet), Tx { out: self.out, segment_size: None }))
    }

    fn transmit(&mut self, _now: Instant) -> Option<Self::TxToken<'_>> {
        Some(Tx { out: self.out, segment_size: None })
    }

    fn capabilities(&self) -> DeviceCapabilities {
        let mut caps = DeviceCapabilities::default();
        caps.medium = Medium::Ip;
        caps.max_transmission_unit = self.out.mtu;
        // `packet::classify` has verified the IPv4 header checksum already.
        caps.checksum.ipv4 = Checksum::Tx;
        caps.checksum.tcp = match (self.out.verify_tcp_checksum, self.out.segmentation_offload) {
            (false, false) => Checksum::Tx,
            (true, false) => Checksum::Both,
            // The kernel completes the (partial) checksums of what we send.
            (false, true) => Checksum::None,
            (true, true) => Checksum::Rx,
        };
        if self.out.segmentation_offload {
            // Not the full 64 KiB: a margin for the IP and TCP headers and options
            // smoltcp adds after sizing the payload from this budget.
            // IPv4 only: smoltcp 0.14 silently drops any IPv6 packet above the MTU in
            // `Interface::dispatch_ip` ("IPv6 fragmentation support is unimplemented"),
            // even one marked for segmentation — the conformance suite's IPv6 download
            // stalled on exactly that. IPv6 flows send MSS-sized segments.
            caps.segmentation.tcpv4 = NonZeroUsize::new(SUPER_PACKET_BUDGET);
        }
        caps
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn super_packets_get_a_partial_checksum_and_gso() {
        // A 20-byte IPv4 header + 20-byte TCP header + 3000 bytes, checksum field zero.
        let mut p = vec![0u8; 3040];
        let mut ip = Ipv4Packet::new_unchecked(&mut p[..]);
        ip.set_version(4);
        ip.set_header_len(20);
        ip.set_total_len(3040);
        ip.set_next_header(IpProtocol::Tcp);
        ip.set_src_addr([10, 77, 0, 2].into());
        ip.set_dst_addr([198, 18, 0, 1].into());
        ip.set_hop_limit(64);
        ip.fill_checksum();
        p[20 + 12] = 5 << 4;
        let meta = offload_meta(&mut p, NonZeroU16::new(1460));
        assert_eq!(meta.csum, Some(PartialChecksum { start: 20, offset: 16 }));
        assert_eq!(meta.gso, Some(Gso { kind: GsoKind::TcpV4, size: 1460, hdr_len: 40, ecn: false }));
        // Completing the checksum the way the kernel does gives a valid TCP checksum.
        assert!(tungate_core::device::offload::complete_checksum(&mut p, meta.csum.unwrap()));
        let seg = tungate_core::packet::classify(&p).unwrap();
        let tungate_core::packet::Classified::Tcp(seg) = seg else { panic!() };
        assert!(tungate_core::packet::tcp_checksum_ok(&p, &seg));
        // One MSS or less: a partial checksum but no segmentation.
        let mut small = p[..1500].to_vec();
        let mut ip = Ipv4Packet::new_unchecked(&mut small[..]);
        ip.set_total_len(1500);
        ip.fill_checksum();
        assert_eq!(offload_meta(&mut small, NonZeroU16::new(1460)).gso, None);
    }
}
