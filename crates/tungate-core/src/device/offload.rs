//! TUN offload: the virtio-net header a Linux TUN opened with `IFF_VNET_HDR` puts in
//! front of every packet, as [`PacketMeta`] fields.
//!
//! With offload on (`TUNSETOFFLOAD` with checksum and TSO, plus USO where the kernel has
//! it), the kernel hands the TUN **super-packets**: one IP header, one TCP (or UDP)
//! header and up to 64 KiB of payload, which it would otherwise have cut into MTU-sized
//! segments. A write may be a super-packet too; the kernel segments it. Either way the
//! transport checksum may be left *partial* ([`PartialChecksum`]): the checksum field
//! holds the (uncomplemented) pseudo-header sum, and whoever emits the final segments
//! folds in the sum of the bytes from `start` on.
//!
//! A backend chooses how it takes offloaded input ([`RxMode`]): the kernel NAT stack
//! rewrites super-packets whole; a user-space stack gets them split into segments with
//! final checksums.

use std::fmt;
use std::str::FromStr;

use super::PacketMeta;

/// The `--offload` setting.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Offload {
    /// Probe at start-up: on if the kernel accepts it, otherwise off (logged).
    #[default]
    Auto,
    /// Required: failing to enable it is an error.
    On,
    Off,
}

impl FromStr for Offload {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "auto" => Ok(Offload::Auto),
            "on" => Ok(Offload::On),
            "off" => Ok(Offload::Off),
            _ => Err(format!("{s:?} is not an offload mode (expected auto, on or off)")),
        }
    }
}

impl fmt::Display for Offload {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Offload::Auto => "auto",
            Offload::On => "on",
            Offload::Off => "off",
        })
    }
}

/// How a backend takes offloaded input.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RxMode {
    /// Super-packets are delivered whole with their [`PacketMeta`]; receive buffers must
    /// hold 64 KiB ([`MAX_SUPER_PACKET`]).
    Whole,
    /// The device splits super-packets into MTU-sized segments and completes partial
    /// checksums: the backend sees plain packets (fewer reads, same packets).
    Split,
}

/// The largest packet an offload-enabled TUN reads or writes: an IPv6 header and the
/// largest payload length (IPv4's total length stays below it).
pub const MAX_SUPER_PACKET: usize = 40 + 65535;

/// Segmentation offload of one super-packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Gso {
    pub kind: GsoKind,
    /// Payload bytes per segment (the MSS for TCP).
    pub size: u16,
    /// Length of the IP and transport headers (a hint; the kernel recomputes it).
    pub hdr_len: u16,
    /// The TCP segments carry ECN (CWR is to be set on the first only).
    pub ecn: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GsoKind {
    TcpV4,
    TcpV6,
    /// UDP segmentation (USO), IPv4 or IPv6.
    Udp,
}

/// A transport checksum still to be completed: sum the bytes from `start` (the
/// transport header) to the end, with the checksum field at `start + offset` holding the
/// pseudo-header sum, and store the complement there.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PartialChecksum {
    pub start: u16,
    pub offset: u16,
}

// Kernel ABI constants from <linux/virtio_net.h> (tun-rs exports only some of them).
pub(crate) const F_NEEDS_CSUM: u8 = 1;
pub(crate) const GSO_NONE: u8 = 0;
pub(crate) const GSO_TCPV4: u8 = 1;
pub(crate) const GSO_TCPV6: u8 = 4;
pub(crate) const GSO_UDP_L4: u8 = 5;
pub(crate) const GSO_ECN: u8 = 0x80;

/// The virtio-net header's fields, in host order.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct VnetHeader {
    pub flags: u8,
    pub gso_type: u8,
    pub hdr_len: u16,
    pub gso_size: u16,
    pub csum_start: u16,
    pub csum_offset: u16,
}

/// Length of the header in front of each packet (`struct virtio_net_hdr`).
pub const VNET_HDR_LEN: usize = 10;

impl VnetHeader {
    /// Parses the 10-byte header. Multi-byte fields are in native order: a TUN uses
    /// the legacy virtio layout unless `TUNSETVNETLE`/`BE` changed it, and tungate does not.
    pub fn decode(bytes: &[u8; VNET_HDR_LEN]) -> Self {
        let u16_at = |i: usize| u16::from_ne_bytes([bytes[i], bytes[i + 1]]);
        VnetHeader {
            flags: bytes[0],
            gso_type: bytes[1],
            hdr_len: u16_at(2),
            gso_size: u16_at(4),
            csum_start: u16_at(6),
            csum_offset: u16_at(8),
        }
    }

    pub fn encode(&self) -> [u8; VNET_HDR_LEN] {
        let mut b = [0; VNET_HDR_LEN];
        b[0] = self.flags;
        b[1] = self.gso_type;
        b[2..4].copy_from_slice(&self.hdr_len.to_ne_bytes());
        b[4..6].copy_from_slice(&self.gso_size.to_ne_bytes());
        b[6..8].copy_from_slice(&self.csum_start.to_ne_bytes());
        b[8..10].copy_from_slice(&self.csum_offset.to_ne_bytes());
        b
    }

    /// The metadata this header describes; `None` for a GSO type tungate does not know
    /// (the packet is then dropped as malformed rather than misread).
    pub fn to_meta(&self) -> Option<PacketMeta> {
        let csum = (self.flags & F_NEEDS_CSUM != 0)
            .then_some(PartialChecksum { start: self.csum_start, offset: self.csum_offset });
        let kind = match self.gso_type & !GSO_ECN {
            GSO_NONE => return Some(PacketMeta { gso: None, csum, continued: false }),
            GSO_TCPV4 => GsoKind::TcpV4,
            GSO_TCPV6 => GsoKind::TcpV6,
            GSO_UDP_L4 => GsoKind::Udp,
            _ => return None,
        };
        if self.gso_size == 0 {
            return None;
        }
        let gso = Gso { kind, size: self.gso_size, hdr_len: self.hdr_len, ecn: self.gso_type & GSO_ECN != 0 };
        Some(PacketMeta { gso: Some(gso), csum, continued: false })
    }

    pub fn from_meta(meta: &PacketMeta) -> Self {
        let mut h = VnetHeader::default();
        if let Some(c) = meta.csum {
            h.flags = F_NEEDS_CSUM;
            h.csum_start = c.start;
            h.csum_offset = c.offset;
        }
        if let Some(g) = meta.gso {
            h.gso_type = match g.kind {
                GsoKind::TcpV4 => GSO_TCPV4,
                GsoKind::TcpV6 => GSO_TCPV6,
                GsoKind::Udp => GSO_UDP_L4,
            } | if g.ecn { GSO_ECN } else { 0 };
            h.gso_size = g.size;
            h.hdr_len = g.hdr_len;
        }
        h
    }
}

/// Completes a partial transport checksum in place (the packet becomes a plain one).
/// Returns `false`, changing nothing, if the checksum field lies outside the packet.
pub fn complete_checksum(packet: &mut [u8], csum: PartialChecksum) -> bool {
    let (start, at) = (usize::from(csum.start), usize::from(csum.start) + usize::from(csum.offset));
    if at + 2 > packet.len() {
        return false;
    }
    // The field holds the pseudo-header sum: summing over it folds it in.
    let sum = smoltcp::wire::checksum::data(&packet[start..]);
    let mut check = !sum;
    // UDP sends a computed zero as all ones (zero means "no checksum", and is invalid
    // for IPv6; RFC 768, RFC 8200 §8.1).
    if check == 0 && csum.offset == 6 {
        check = 0xffff;
    }
    packet[at..at + 2].copy_from_slice(&check.to_be_bytes());
    true
}

/// Reusable segment buffers for [`Splitter::split`].
#[cfg(target_os = "linux")]
#[derive(Debug, Default)]
pub struct Splitter {
    segs: Vec<Box<[u8]>>,
    sizes: Vec<usize>,
}

#[cfg(target_os = "linux")]
impl Splitter {
    /// Splits the super-packet `packet` (its bytes are changed) described by `meta` into
    /// plain segments with final checksums, in buffers of `segment_capacity` bytes, and
    /// returns how many ([`segment`](Self::segment) gives each). As many buffers as the
    /// packet needs are kept for the next call (a peer may announce an MSS as small as
    /// 48 bytes: up to 1 366 segments). Fails on a header it cannot split.
    pub fn split(&mut self, packet: &mut [u8], meta: &PacketMeta, segment_capacity: usize) -> std::io::Result<usize> {
        use std::io::{Error, ErrorKind};
        let invalid = |what: &'static str| Error::new(ErrorKind::InvalidInput, what);
        let gso = meta.gso.ok_or_else(|| invalid("not a super-packet"))?;
        let csum = meta.csum.ok_or_else(|| invalid("a super-packet without a partial checksum"))?;
        let start = usize::from(csum.start);
        // The kernel's hdr_len may include payload; the split needs the real header length.
        let transport = match gso.kind {
            GsoKind::Udp => 8,
            _ => usize::from(packet.get(start + 12).ok_or_else(|| invalid("truncated TCP header"))? >> 4) * 4,
        };
        let hdr = tun_rs::VirtioNetHdr {
            flags: F_NEEDS_CSUM,
            gso_type: VnetHeader::from_meta(meta).gso_type,
            hdr_len: u16::try_from(start + transport).map_err(|_| invalid("header too long"))?,
            gso_size: gso.size,
            csum_start: csum.start,
            csum_offset: csum.offset,
        };
        let is_v6 = packet.first().is_some_and(|b| b >> 4 == 6);
        let count = packet.len().saturating_sub(start + transport).div_ceil(usize::from(gso.size)).max(1);
        if self.segs.first().is_some_and(|s| s.len() != segment_capacity) {
            self.segs.clear();
        }
        while self.segs.len() < count {
            self.segs.push(vec![0; segment_capacity].into_boxed_slice());
        }
        self.sizes.resize(self.segs.len(), 0);
        // tun-rs's splitter (wireguard-go's algorithm) fixes every segment's lengths, IPv4
        // ID, sequence number, flags and checksums.
        let n = tun_rs::gso_split(packet, hdr, &mut self.segs[..count], &mut self.sizes[..count], 0, is_v6)?;
        // It returns no segment for some malformed packets (found by fuzzing): the reader
        // would then have delivered the previous split's segments again.
        if n == 0 {
            return Err(invalid("the super-packet splits into no segment"));
        }
        Ok(n)
    }

    /// Segment `i` of the last [`split`](Self::split).
    pub fn segment(&self, i: usize) -> &[u8] {
        &self.segs[i][..self.sizes[i]]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_round_trips_through_meta() {
        let h = VnetHeader {
            flags: F_NEEDS_CSUM,
            gso_type: GSO_TCPV4 | GSO_ECN,
            hdr_len: 52,
            gso_size: 1448,
            csum_start: 20,
            csum_offset: 16,
        };
        let meta = h.to_meta().unwrap();
        assert_eq!(meta.gso, Some(Gso { kind: GsoKind::TcpV4, size: 1448, hdr_len: 52, ecn: true }));
        assert_eq!(meta.csum, Some(PartialChecksum { start: 20, offset: 16 }));
        assert_eq!(VnetHeader::from_meta(&meta), h);
        assert_eq!(VnetHeader::decode(&h.encode()), h);
        assert_eq!(VnetHeader::default().to_meta(), Some(PacketMeta::default()));
        assert_eq!(VnetHeader { gso_type: 3, gso_size: 1400, ..h }.to_meta(), None, "UFO is not supported");
        assert_eq!(VnetHeader { gso_size: 0, ..h }.to_meta(), None, "GSO without a size");
        assert_eq!("on".parse(), Ok(Offload::On));
        assert!("yes".parse::<Offload>().is_err());
    }
}
