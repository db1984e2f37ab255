//! Parsing and building the few packets the gateway handles itself, on smoltcp's wire types.
//!
//! [`classify`] is the demultiplexer's first look at a packet from the TUN: it validates
//! the IP header and returns the transport 4-tuple without copying. [`Layout`] is the
//! one header-offset parse for the paths that rewrite or peek at packets without
//! validating them (the NAT, offload metadata, a flags peek): no other code reads an IP
//! header length by hand. [`build_udp`] and [`build_tcp_rst`] write into caller-owned
//! buffers.

use std::net::{IpAddr, SocketAddr};

use smoltcp::phy::ChecksumCapabilities;
/// The control flag of a [`SegmentFields`] (smoltcp's).
pub use smoltcp::wire::TcpControl;
use smoltcp::wire::{
    IpAddress, IpProtocol, Ipv4Packet, Ipv4Repr, Ipv6Packet, Ipv6Repr, TcpOption, TcpPacket, TcpRepr, TcpSeqNumber,
    UdpPacket, UdpRepr,
};

/// IP protocol numbers.
pub const TCP: u8 = 6;
pub const UDP: u8 = 17;

/// Where the headers of an IPv4 or IPv6 packet (no IPv6 extension headers) lie, checked
/// against the buffer; nothing else is parsed or verified ([`classify`] validates).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Layout {
    pub v6: bool,
    /// The transport protocol (IPv6: the first next-header).
    pub protocol: u8,
    /// Where the transport header starts.
    pub l4: usize,
}

impl Layout {
    /// The layout of an IPv4 packet with a whole header, or of an IPv6 packet.
    pub fn of(packet: &[u8]) -> Option<Layout> {
        match packet.first()? >> 4 {
            4 => {
                let l4 = usize::from(packet[0] & 0x0f) * 4;
                (l4 >= 20 && packet.len() >= l4).then(|| Layout { v6: false, protocol: packet[9], l4 })
            }
            6 => (packet.len() >= 40).then(|| Layout { v6: true, protocol: packet[6], l4: 40 }),
            _ => None,
        }
    }

    /// The layout of a TCP packet with room for a 20-byte TCP header.
    pub fn tcp(packet: &[u8]) -> Option<Layout> {
        Self::of(packet).filter(|l| l.protocol == TCP && packet.len() >= l.l4 + 20)
    }

    /// Where the addresses are: the source's offset and one address's length (the
    /// destination follows the source).
    pub fn addresses(&self) -> (usize, usize) {
        if self.v6 { (8, 16) } else { (12, 4) }
    }

    /// The TCP header's length (its data offset), checked against the packet.
    pub fn tcp_header_len(&self, packet: &[u8]) -> Option<usize> {
        let len = usize::from(*packet.get(self.l4 + 12)? >> 4) * 4;
        (len >= 20 && self.l4 + len <= packet.len()).then_some(len)
    }

    /// The TCP flags byte.
    pub fn tcp_flags(&self, packet: &[u8]) -> Option<u8> {
        packet.get(self.l4 + 13).copied()
    }
}

/// Why a packet was not accepted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ParseError {
    #[error("not an IPv4 or IPv6 packet")]
    Version,
    #[error("truncated or inconsistent IP header")]
    IpHeader,
    #[error("bad IPv4 header checksum")]
    IpChecksum,
    #[error("truncated or inconsistent TCP/UDP header")]
    Transport,
    #[error("bad UDP checksum")]
    UdpChecksum,
}

/// Why a packet could not be built.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum BuildError {
    #[error("source and destination are of different IP families")]
    FamilyMismatch,
    #[error("packet of {0} bytes does not fit the buffer or MTU")]
    TooLarge(usize),
}

/// The fields of a TCP segment the demultiplexer needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TcpSummary {
    pub src: SocketAddr,
    pub dst: SocketAddr,
    pub syn: bool,
    pub ack: bool,
    pub rst: bool,
    pub fin: bool,
    pub seq: u32,
    pub ack_number: u32,
    /// Sequence space the segment occupies (payload + SYN + FIN).
    pub segment_len: usize,
    /// The window field as sent (unscaled; scaled by the sender's shift except on a SYN).
    pub window: u16,
}

impl TcpSummary {
    /// Both ends are unicast addresses with non-zero ports: the only segments that may
    /// open a flow (a SYN from or to broadcast, multicast or an unspecified address is
    /// counted as malformed).
    pub fn has_unicast_endpoints(&self) -> bool {
        fn unicast(ip: IpAddr) -> bool {
            match ip {
                IpAddr::V4(a) => !(a.is_broadcast() || a.is_multicast() || a.is_unspecified()),
                IpAddr::V6(a) => !(a.is_multicast() || a.is_unspecified()),
            }
        }
        unicast(self.src.ip()) && unicast(self.dst.ip()) && self.src.port() != 0 && self.dst.port() != 0
    }

    /// A connection-opening SYN (no ACK, no RST).
    pub fn is_bare_syn(&self) -> bool {
        self.syn && !self.ack && !self.rst
    }

    /// Payload bytes (the sequence space without SYN and FIN).
    pub fn payload_len(&self) -> usize {
        self.segment_len - usize::from(self.syn) - usize::from(self.fin)
    }
}

/// What a packet from the TUN is.
#[derive(Debug, PartialEq, Eq)]
pub enum Classified<'a> {
    Tcp(TcpSummary),
    Udp {
        src: SocketAddr,
        dst: SocketAddr,
        payload: &'a [u8],
    },
    /// Well-formed but not handled: ICMP, fragments, IPv6 extension headers, other protocols.
    Unsupported,
}

/// Validates the IP header of `packet` and identifies its transport flow.
///
/// TCP checksums are not verified here (the stack verifies every segment it processes;
/// [`tcp_checksum_ok`] is for segments the stack never sees). UDP checksums are.
pub fn classify(packet: &[u8]) -> Result<Classified<'_>, ParseError> {
    let (src, dst, protocol, l4) = match packet.first().map(|b| b >> 4) {
        Some(4) => {
            let ip = Ipv4Packet::new_checked(packet).map_err(|_| ParseError::IpHeader)?;
            if !ip.verify_checksum() {
                return Err(ParseError::IpChecksum);
            }
            if ip.more_frags() || ip.frag_offset() != 0 {
                return Ok(Classified::Unsupported);
            }
            let header = ip.header_len() as usize;
            let total = ip.total_len() as usize;
            (IpAddr::V4(ip.src_addr()), IpAddr::V4(ip.dst_addr()), ip.next_header(), &packet[header..total])
        }
        Some(6) => {
            let ip = Ipv6Packet::new_checked(packet).map_err(|_| ParseError::IpHeader)?;
            let start = ip.header_len();
            let end = start + ip.payload_len() as usize;
            (IpAddr::V6(ip.src_addr()), IpAddr::V6(ip.dst_addr()), ip.next_header(), &packet[start..end])
        }
        _ => return Err(ParseError::Version),
    };
    match protocol {
        IpProtocol::Tcp => {
            let tcp = TcpPacket::new_checked(l4).map_err(|_| ParseError::Transport)?;
            Ok(Classified::Tcp(TcpSummary {
                src: SocketAddr::new(src, tcp.src_port()),
                dst: SocketAddr::new(dst, tcp.dst_port()),
                syn: tcp.syn(),
                ack: tcp.ack(),
                rst: tcp.rst(),
                fin: tcp.fin(),
                seq: tcp.seq_number().0 as u32,
                ack_number: tcp.ack_number().0 as u32,
                segment_len: tcp.segment_len(),
                window: tcp.window_len(),
            }))
        }
        IpProtocol::Udp => {
            let udp = UdpPacket::new_checked(l4).map_err(|_| ParseError::Transport)?;
            // IPv6 forbids the "no checksum" zero (RFC 8200 §8.1); smoltcp accepts it for both.
            if (src.is_ipv6() && udp.checksum() == 0) || !udp.verify_checksum(&src.into(), &dst.into()) {
                return Err(ParseError::UdpChecksum);
            }
            let len = udp.len() as usize;
            Ok(Classified::Udp {
                src: SocketAddr::new(src, udp.src_port()),
                dst: SocketAddr::new(dst, udp.dst_port()),
                payload: &l4[8..len],
            })
        }
        _ => Ok(Classified::Unsupported),
    }
}

/// Whether the TCP checksum of the (already classified) `packet` is right.
pub fn tcp_checksum_ok(packet: &[u8], summary: &TcpSummary) -> bool {
    let l4 = match summary.src.ip() {
        IpAddr::V4(_) => Ipv4Packet::new_unchecked(packet).payload(),
        IpAddr::V6(_) => Ipv6Packet::new_unchecked(packet).payload(),
    };
    TcpPacket::new_unchecked(l4).verify_checksum(&summary.src.ip().into(), &summary.dst.ip().into())
}

/// Whether the options of the TCP segment in `packet` are well formed: each option but
/// end-of-list and no-op has a length byte inside the header, of at least 2, that keeps
/// the option inside the header. `true` for a packet that is not TCP.
///
/// lwIP's option parser reads an option's length byte without checking that it is inside
/// the header: a SYN whose last option byte is a kind read one byte past its buffer
/// (AddressSanitizer, `make fuzz`'s engine_lwip). Such segments are dropped before lwIP.
/// (A hand-written walk: smoltcp's `TcpPacket::options` gives the raw bytes, and its
/// option parser accepts what lwIP's does not need to see.)
pub fn tcp_options_well_formed(packet: &[u8]) -> bool {
    let Some(tcp) = tcp_segment(packet) else { return true };
    walk_options(tcp.options(), |_, _| {})
}

/// Calls `each(kind, range)` for every option in `options` but end-of-list and no-op;
/// returns whether they are well formed (see [`tcp_options_well_formed`]).
fn walk_options(options: &[u8], mut each: impl FnMut(u8, std::ops::Range<usize>)) -> bool {
    let mut i = 0;
    while i < options.len() {
        match options[i] {
            0 => return true, // end of list: the rest is padding
            1 => i += 1,      // no-op
            kind => match options.get(i + 1) {
                Some(&len) if len >= 2 && i + usize::from(len) <= options.len() => {
                    each(kind, i..i + usize::from(len));
                    i += usize::from(len);
                }
                _ => return false,
            },
        }
    }
    true
}

/// Replaces the MSS option of a TCP segment that is not a SYN with no-ops (the checksum
/// follows); returns whether it had one. RFC 9293 §3.7.1: MSS is sent in SYNs only.
/// lwIP 2.1 takes it from any segment, and one smaller than data it has queued aborted it
/// (`mss_local is too small`: `make fuzz`'s engine_lwip), so it is blanked before lwIP.
pub fn blank_late_mss_option(packet: &mut [u8]) -> bool {
    let Some((range, (src, dst))) = tcp_range(packet) else { return false };
    let Ok(tcp) = TcpPacket::new_checked(&packet[range.clone()]) else { return false };
    if tcp.syn() {
        return false;
    }
    let options = range.start + 20..range.start + usize::from(tcp.header_len());
    let mut mss = Vec::new();
    walk_options(&packet[options.clone()], |kind, at| {
        if kind == 2 {
            mss.push(at);
        }
    });
    for at in &mss {
        packet[options.start + at.start..options.start + at.end].fill(1);
    }
    if mss.is_empty() {
        return false;
    }
    TcpPacket::new_unchecked(&mut packet[range]).fill_checksum(&src, &dst);
    true
}

/// The window-scale option of the SYN or SYN-ACK in `packet` (RFC 7323: the shift its
/// sender applies to every later window it advertises), clamped to 14; `None` if the
/// segment is not a SYN or does not carry the option.
pub fn syn_window_scale(packet: &[u8]) -> Option<u8> {
    let tcp = tcp_segment(packet)?;
    if !tcp.syn() {
        return None;
    }
    let mut options = tcp.options();
    while !options.is_empty() {
        let (rest, option) = TcpOption::parse(options).ok()?;
        match option {
            TcpOption::WindowScale(shift) => return Some(shift.min(14)),
            TcpOption::EndOfList => return None,
            _ => {}
        }
        options = rest;
    }
    None
}

/// Rewrites the TCP segment in `packet` in place so that it carries only the payload
/// bytes at offsets `keep` of its payload, and FIN iff `fin` (SYN and RST are never
/// touched): the sequence number moves to the first byte kept, the IP length and both
/// checksums follow. Returns the packet's new length; `None` if `packet` is not an IP
/// packet holding a TCP segment or `keep` is not within its payload.
///
/// The one mechanism behind the admission layer's segment surgery (a FIN split off its
/// data, data trimmed at a window edge).
pub fn reshape_tcp_segment(packet: &mut [u8], keep: std::ops::Range<usize>, fin: bool) -> Option<usize> {
    let (l4, (src, dst)) = tcp_range(packet)?;
    let header = usize::from(TcpPacket::new_checked(&packet[l4.clone()]).ok()?.header_len());
    let payload = l4.len().checked_sub(header)?;
    if keep.start > keep.end || keep.end > payload {
        return None;
    }
    let data = l4.start + header;
    packet.copy_within(data + keep.start..data + keep.end, data);
    let end = data + keep.len();
    match src {
        IpAddress::Ipv4(_) => {
            let mut ip = Ipv4Packet::new_unchecked(&mut packet[..end]);
            ip.set_total_len(u16::try_from(end).ok()?);
            ip.fill_checksum();
        }
        IpAddress::Ipv6(_) => {
            Ipv6Packet::new_unchecked(&mut packet[..end]).set_payload_len(u16::try_from(end - l4.start).ok()?);
        }
    }
    let mut tcp = TcpPacket::new_unchecked(&mut packet[l4.start..end]);
    tcp.set_seq_number(tcp.seq_number() + keep.start);
    tcp.set_fin(fin);
    if keep.is_empty() {
        tcp.set_psh(false);
    }
    tcp.fill_checksum(&src, &dst);
    Some(end)
}

/// Splits a segment that carries data and FIN into the data (FIN cleared) and a bare FIN
/// after it, both with valid checksums; `None` for any other segment.
pub fn split_fin(packet: &[u8], seg: &TcpSummary) -> Option<(crate::PacketBuf, crate::PacketBuf)> {
    if !seg.fin || seg.syn || seg.rst || seg.segment_len <= 1 {
        return None;
    }
    let payload = seg.payload_len();
    let part = |keep: std::ops::Range<usize>, fin: bool| {
        let mut buf = crate::PacketBuf::from_slice(packet);
        let len = reshape_tcp_segment(buf.packet_mut(), keep, fin)?;
        buf.set_len(len);
        Some(buf)
    };
    Some((part(0..payload, false)?, part(payload..payload, true)?))
}

/// Cuts the segment `seg` in `packet` so that its data ends at sequence number `limit`
/// at the latest (a segment wholly past it keeps its ACK and nothing else); FIN goes with
/// any cut, and `seg` is updated to match. A segment that fits is left alone. Returns the
/// payload bytes cut off.
pub fn trim_payload_at(packet: &mut crate::PacketBuf, seg: &mut TcpSummary, limit: u32) -> usize {
    let payload = seg.payload_len();
    if seg.syn || seg.rst || payload == 0 {
        return 0;
    }
    let end = seg.seq.wrapping_add(payload as u32);
    if !seq_lt(limit, end) {
        return 0;
    }
    // Bytes before the limit; none if the segment starts at or past it.
    let keep = if seq_lt(seg.seq, limit) { limit.wrapping_sub(seg.seq) as usize } else { 0 };
    match reshape_tcp_segment(packet.packet_mut(), 0..keep, false) {
        Some(len) => {
            packet.set_len(len);
            seg.fin = false;
            seg.segment_len = keep;
            payload - keep
        }
        None => 0,
    }
}

/// Sets the acknowledgment number of the TCP segment in `packet` (the checksum follows);
/// `None` if `packet` is not an IP packet holding a TCP segment.
pub fn set_ack_number(packet: &mut [u8], ack: u32) -> Option<()> {
    let (l4, (src, dst)) = tcp_range(packet)?;
    let mut tcp = TcpPacket::new_checked(&mut packet[l4]).ok()?;
    tcp.set_ack_number(TcpSeqNumber(ack as i32));
    tcp.fill_checksum(&src, &dst);
    Some(())
}

/// The TCP segment inside the IPv4 or IPv6 (no extension headers) packet `packet`, if
/// it is one (checksums not verified).
pub fn tcp_segment(packet: &[u8]) -> Option<TcpPacket<&[u8]>> {
    let (range, _) = tcp_range(packet)?;
    TcpPacket::new_checked(&packet[range]).ok()
}

/// `a` comes before `b` in sequence space (RFC 9293 §3.4: compared modulo 2^32).
pub fn seq_lt(a: u32, b: u32) -> bool {
    (a.wrapping_sub(b) as i32) < 0
}

/// Where the TCP segment of an IPv4 or IPv6 (no extension headers) packet lies, and
/// the packet's addresses.
fn tcp_range(packet: &[u8]) -> Option<(std::ops::Range<usize>, (IpAddress, IpAddress))> {
    match packet.first().map(|b| b >> 4) {
        Some(4) => {
            let ip = Ipv4Packet::new_checked(packet).ok().filter(|ip| ip.next_header() == IpProtocol::Tcp)?;
            let range = usize::from(ip.header_len())..usize::from(ip.total_len());
            Some((range, (ip.src_addr().into(), ip.dst_addr().into())))
        }
        Some(6) => {
            let ip = Ipv6Packet::new_checked(packet).ok().filter(|ip| ip.next_header() == IpProtocol::Tcp)?;
            let range = ip.header_len()..ip.header_len() + usize::from(ip.payload_len());
            Some((range, (ip.src_addr().into(), ip.dst_addr().into())))
        }
        _ => None,
    }
}

/// What to do with a TCP segment that matches no flow (RFC 9293 §3.10.7.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stranger {
    /// A bare SYN between unicast endpoints: it may open a flow.
    Open,
    /// Answer with RST (count it as `tcp_unknown_flow`).
    Reset,
    /// A RST: drop it silently.
    Ignore,
    /// A bad checksum, or a SYN from or to a non-unicast address: count as malformed.
    Malformed,
}

/// Classifies a segment for no known flow. A packet whose checksum is still partial (TUN
/// offload, [`PacketMeta::csum`](crate::device::PacketMeta::csum)) is the local kernel's
/// own work: its checksum is not verified.
pub fn stranger(packet: &crate::PacketBuf, seg: &TcpSummary) -> Stranger {
    if packet.meta.csum.is_none() && !tcp_checksum_ok(packet.packet(), seg) {
        Stranger::Malformed
    } else if !seg.is_bare_syn() {
        if seg.rst { Stranger::Ignore } else { Stranger::Reset }
    } else if !seg.has_unicast_endpoints() {
        Stranger::Malformed
    } else {
        Stranger::Open
    }
}

const HOP_LIMIT: u8 = 64;

/// Writes the IP header for a `payload_len`-byte transport payload at the start of `out`
/// and returns the header length.
fn emit_ip(
    src: IpAddr,
    dst: IpAddr,
    protocol: IpProtocol,
    payload_len: usize,
    out: &mut [u8],
) -> Result<usize, BuildError> {
    match (src, dst) {
        (IpAddr::V4(src_addr), IpAddr::V4(dst_addr)) => {
            let repr = Ipv4Repr { src_addr, dst_addr, next_header: protocol, payload_len, hop_limit: HOP_LIMIT };
            let total = repr.buffer_len() + payload_len;
            if total > out.len() || total > u16::MAX as usize {
                return Err(BuildError::TooLarge(total));
            }
            repr.emit(&mut Ipv4Packet::new_unchecked(&mut out[..total]), &ChecksumCapabilities::default());
            Ok(repr.buffer_len())
        }
        (IpAddr::V6(src_addr), IpAddr::V6(dst_addr)) => {
            let repr = Ipv6Repr { src_addr, dst_addr, next_header: protocol, payload_len, hop_limit: HOP_LIMIT };
            let total = repr.buffer_len() + payload_len;
            if total > out.len() || payload_len > u16::MAX as usize {
                return Err(BuildError::TooLarge(total));
            }
            repr.emit(&mut Ipv6Packet::new_unchecked(&mut out[..total]));
            Ok(repr.buffer_len())
        }
        _ => Err(BuildError::FamilyMismatch),
    }
}

/// Builds an IP/UDP datagram `from → to` carrying `payload` into `out`; returns its length.
pub fn build_udp(from: SocketAddr, to: SocketAddr, payload: &[u8], out: &mut [u8]) -> Result<usize, BuildError> {
    let udp_len = 8 + payload.len();
    let header = emit_ip(from.ip(), to.ip(), IpProtocol::Udp, udp_len, out)?;
    let repr = UdpRepr { src_port: from.port(), dst_port: to.port() };
    let (src, dst): (IpAddress, IpAddress) = (from.ip().into(), to.ip().into());
    repr.emit(
        &mut UdpPacket::new_unchecked(&mut out[header..header + udp_len]),
        &src,
        &dst,
        payload.len(),
        |buf| buf.copy_from_slice(payload),
        &ChecksumCapabilities::default(),
    );
    Ok(header + udp_len)
}

/// Builds the RST that answers `segment` (RFC 9293 §3.10.7.1, "If the state is CLOSED"):
/// with ACK set, `<SEQ=SEG.ACK><CTL=RST>`; otherwise `<SEQ=0><ACK=SEG.SEQ+SEG.LEN><CTL=RST,ACK>`.
/// Returns `None` when `segment` is itself a RST (never answered).
pub fn build_tcp_rst(segment: &TcpSummary, out: &mut [u8]) -> Option<usize> {
    if segment.rst {
        return None;
    }
    let (seq_number, ack_number) = if segment.ack {
        (TcpSeqNumber(segment.ack_number as i32), None)
    } else {
        (TcpSeqNumber(0), Some(TcpSeqNumber(segment.seq.wrapping_add(segment.segment_len as u32) as i32)))
    };
    let repr = TcpRepr {
        src_port: segment.dst.port(),
        dst_port: segment.src.port(),
        control: TcpControl::Rst,
        seq_number,
        ack_number,
        window_len: 0,
        window_scale: None,
        max_seg_size: None,
        sack_permitted: false,
        sack_ranges: [None; 3],
        timestamp: None,
        payload: &[],
    };
    let header = emit_ip(segment.dst.ip(), segment.src.ip(), IpProtocol::Tcp, repr.buffer_len(), out).ok()?;
    let (src, dst): (IpAddress, IpAddress) = (segment.dst.ip().into(), segment.src.ip().into());
    repr.emit(
        &mut TcpPacket::new_unchecked(&mut out[header..header + repr.buffer_len()]),
        &src,
        &dst,
        &ChecksumCapabilities::default(),
    );
    Some(header + repr.buffer_len())
}

/// A TCP segment to build, field by field: for tests, tools and fuzzers (the stacks
/// build their own segments). [`new`](Self::new) fills the rest as a client's segment
/// would (65 535 window, MSS 1460 on a SYN, no options otherwise, no payload).
#[derive(Debug, Clone)]
pub struct SegmentFields<'a> {
    pub src: SocketAddr,
    pub dst: SocketAddr,
    pub control: TcpControl,
    pub seq: u32,
    pub ack: Option<u32>,
    pub window: u16,
    pub window_scale: Option<u8>,
    pub mss: Option<u16>,
    pub payload: &'a [u8],
}

impl<'a> SegmentFields<'a> {
    pub fn new(src: SocketAddr, dst: SocketAddr, control: TcpControl, seq: u32, ack: Option<u32>) -> Self {
        SegmentFields {
            src,
            dst,
            control,
            seq,
            ack,
            window: 65535,
            window_scale: None,
            mss: (control == TcpControl::Syn).then_some(1460),
            payload: &[],
        }
    }

    pub fn payload(mut self, payload: &'a [u8]) -> Self {
        self.payload = payload;
        self
    }

    /// The segment in an IP packet of `src`'s family, with valid checksums.
    ///
    /// # Panics
    /// If `src` and `dst` are of different families or the segment exceeds 64 KiB.
    pub fn build(&self) -> Vec<u8> {
        let repr = TcpRepr {
            src_port: self.src.port(),
            dst_port: self.dst.port(),
            control: self.control,
            seq_number: TcpSeqNumber(self.seq as i32),
            ack_number: self.ack.map(|a| TcpSeqNumber(a as i32)),
            window_len: self.window,
            window_scale: self.window_scale,
            max_seg_size: self.mss,
            sack_permitted: false,
            sack_ranges: [None; 3],
            timestamp: None,
            payload: self.payload,
        };
        let mut out = vec![0u8; 60 + repr.buffer_len()];
        let header = emit_ip(self.src.ip(), self.dst.ip(), IpProtocol::Tcp, repr.buffer_len(), &mut out)
            .expect("one address family, at most 64 KiB");
        let (s, d): (IpAddress, IpAddress) = (self.src.ip().into(), self.dst.ip().into());
        repr.emit(
            &mut TcpPacket::new_unchecked(&mut out[header..header + repr.buffer_len()]),
            &s,
            &d,
            &ChecksumCapabilities::default(),
        );
        out.truncate(header + repr.buffer_len());
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tcp_options_that_run_past_the_header_are_malformed() {
        let syn = |options: &[u8]| {
            let mut p = SegmentFields::new(
                "198.18.0.2:40000".parse().unwrap(),
                "10.77.0.2:80".parse().unwrap(),
                TcpControl::Syn,
                1,
                None,
            );
            p.mss = None;
            let packet = p.build();
            // Grow the header by `options` (a multiple of 4): data offset and IP length.
            assert_eq!(options.len() % 4, 0);
            let mut grown = packet[..40].to_vec();
            grown.extend_from_slice(options);
            let total = grown.len() as u16;
            grown[2..4].copy_from_slice(&total.to_be_bytes());
            grown[32] = ((20 + options.len() as u8) / 4) << 4;
            grown
        };
        assert!(tcp_options_well_formed(&syn(&[2, 4, 5, 180])), "MSS");
        assert!(tcp_options_well_formed(&syn(&[1, 1, 1, 0])), "no-ops, end of list");
        assert!(tcp_options_well_formed(&syn(&[1, 3, 3, 7])), "no-op, window scale");
        assert!(
            !tcp_options_well_formed(&syn(&[1, 1, 1, 2])),
            "a kind as the last byte: its length is past the header"
        );
        assert!(!tcp_options_well_formed(&syn(&[2, 8, 5, 180])), "a length past the header");
        assert!(!tcp_options_well_formed(&syn(&[2, 1, 5, 180])), "a length under 2");
        assert!(tcp_options_well_formed(b"not a packet"));
    }

    fn sa(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn udp_roundtrip_v4_and_v6() {
        for (from, to) in [(sa("10.77.0.2:53"), sa("198.18.0.2:4000")), (sa("[fd77::2]:53"), sa("[fd18::2]:4000"))] {
            let mut buf = [0u8; 1500];
            let n = build_udp(from, to, b"hello", &mut buf).unwrap();
            match classify(&buf[..n]).unwrap() {
                Classified::Udp { src, dst, payload } => {
                    assert_eq!((src, dst, payload), (from, to, &b"hello"[..]));
                }
                other => panic!("{other:?}"),
            }
            // A flipped payload bit fails the checksum.
            buf[n - 1] ^= 1;
            assert_eq!(classify(&buf[..n]), Err(ParseError::UdpChecksum));
        }
    }

    #[test]
    fn udp_build_errors() {
        let mut buf = [0u8; 100];
        assert_eq!(build_udp(sa("1.2.3.4:1"), sa("[::1]:1"), b"", &mut buf), Err(BuildError::FamilyMismatch));
        assert_eq!(build_udp(sa("1.2.3.4:1"), sa("1.2.3.5:1"), &[0; 80], &mut buf), Err(BuildError::TooLarge(108)));
    }

    #[test]
    fn rst_answers_syn_with_ack_of_seq_plus_one() {
        let syn = TcpSummary {
            src: sa("198.18.0.2:40000"),
            dst: sa("10.77.0.2:80"),
            syn: true,
            ack: false,
            rst: false,
            fin: false,
            seq: u32::MAX,
            ack_number: 0,
            segment_len: 1,
            window: 0,
        };
        let mut buf = [0u8; 100];
        let n = build_tcp_rst(&syn, &mut buf).unwrap();
        let Classified::Tcp(rst) = classify(&buf[..n]).unwrap() else { panic!() };
        assert!(rst.rst && rst.ack && !rst.syn);
        assert_eq!((rst.src, rst.dst, rst.ack_number, rst.seq), (syn.dst, syn.src, 0, 0));
        assert!(tcp_checksum_ok(&buf[..n], &rst));
        assert_eq!(build_tcp_rst(&rst, &mut buf), None);
    }

    #[test]
    fn reshaping_keeps_a_part_of_the_payload_and_fixes_lengths_and_checksums() {
        for (src, dst) in [(sa("198.18.0.2:4000"), sa("10.77.0.2:80")), (sa("[fd18::2]:4000"), sa("[fd77::2]:80"))] {
            let mut seg = SegmentFields::new(src, dst, TcpControl::Fin, u32::MAX - 3, Some(9));
            seg.payload = b"0123456789";
            let original = seg.build();
            let check = |p: &[u8], seq: u32, payload: &[u8], fin: bool| {
                let Ok(Classified::Tcp(t)) = classify(p) else { panic!("not TCP") };
                assert!(tcp_checksum_ok(p, &t), "checksum");
                assert_eq!((t.src, t.dst, t.seq, t.ack_number, t.fin), (src, dst, seq, 9, fin));
                assert_eq!(t.payload_len(), payload.len());
                assert_eq!(&p[p.len() - payload.len()..], payload);
            };
            let mut p = original.clone();
            let n = reshape_tcp_segment(&mut p, 0..4, false).expect("prefix");
            check(&p[..n], u32::MAX - 3, b"0123", false);
            let mut p = original.clone();
            let n = reshape_tcp_segment(&mut p, 4..10, true).expect("suffix");
            check(&p[..n], 0, b"456789", true);
            let mut p = original.clone();
            let n = reshape_tcp_segment(&mut p, 10..10, true).expect("bare FIN");
            check(&p[..n], 6, b"", true);
            assert_eq!(reshape_tcp_segment(&mut original.clone(), 5..11, false), None, "past the payload");
            assert_eq!(reshape_tcp_segment(&mut original[..20].to_vec(), 0..0, false), None, "truncated");
        }
    }

    fn tcp_of(packet: &[u8]) -> TcpSummary {
        match classify(packet) {
            Ok(Classified::Tcp(seg)) => {
                assert!(tcp_checksum_ok(packet, &seg), "checksum of {seg:?}");
                seg
            }
            other => panic!("not TCP: {other:?}"),
        }
    }

    #[test]
    fn a_fin_carrying_data_splits_into_data_then_a_bare_fin() {
        for (src, dst) in [("198.18.0.2:4000", "10.77.0.2:80"), ("[fd18::2]:4000", "[fd77::2]:80")] {
            let (src, dst) = (sa(src), sa(dst));
            let with_data = |payload: &[u8]| {
                SegmentFields::new(src, dst, TcpControl::Fin, u32::MAX - 2, Some(77)).payload(payload).build()
            };
            let original = with_data(b"last bytes");
            let seg = tcp_of(&original);
            let (data, fin) = split_fin(&original, &seg).expect("split");
            let (d, f) = (tcp_of(data.packet()), tcp_of(fin.packet()));
            assert_eq!((d.src, d.dst, f.src, f.dst), (src, dst, src, dst));
            assert!(!d.fin && d.ack && d.segment_len == 10 && d.seq == seg.seq, "data part: {d:?}");
            assert!(f.fin && f.ack && f.segment_len == 1, "FIN part: {f:?}");
            assert_eq!(f.seq, seg.seq.wrapping_add(10), "the FIN follows the data (across the wrap)");
            assert_eq!((d.ack_number, f.ack_number), (77, 77));
            assert_eq!(&data.packet()[data.len() - 10..], b"last bytes", "the data part carries the same bytes");
            let bare = with_data(b"");
            assert!(split_fin(&bare, &tcp_of(&bare)).is_none(), "a bare FIN is not split");
        }
    }

    #[test]
    fn trimming_at_a_sequence_number_keeps_what_lies_before_it() {
        let (src, dst) = (sa("[fd18::2]:4000"), sa("[fd77::2]:80"));
        let data: Vec<u8> = (0..100u8).collect();
        let segment = |seq: u32, len: usize| {
            let mut fields = SegmentFields::new(src, dst, TcpControl::Fin, seq, Some(9));
            fields.payload = &data[..len];
            crate::PacketBuf::from_vec(fields.build())
        };
        // Across the wrap: 100 bytes from 2^32 - 40, limit 20 bytes past zero.
        let mut p = segment(u32::MAX - 39, 100);
        let mut seg = tcp_of(p.packet());
        assert_eq!(trim_payload_at(&mut p, &mut seg, 20), 40);
        let cut = tcp_of(p.packet());
        assert_eq!((cut.seq, cut.payload_len(), cut.fin), (u32::MAX - 39, 60, false), "cut, FIN dropped");
        assert_eq!(seg, cut, "the summary follows the packet");
        assert_eq!(&p.packet()[p.len() - 60..], &data[..60]);
        // Wholly past the limit: only the ACK is left.
        let mut p = segment(50, 10);
        let mut seg = tcp_of(p.packet());
        assert_eq!(trim_payload_at(&mut p, &mut seg, 40), 10);
        assert_eq!((tcp_of(p.packet()).segment_len, tcp_of(p.packet()).ack_number), (0, 9));
        // Within it: untouched, FIN and all.
        let mut p = segment(50, 10);
        let before = p.packet().to_vec();
        let mut seg = tcp_of(p.packet());
        assert_eq!(trim_payload_at(&mut p, &mut seg, 60), 0);
        assert_eq!(p.packet(), &before[..]);
    }

    #[test]
    fn an_mss_option_after_the_syn_is_blanked() {
        let (src, dst) = ("198.18.0.2:40000".parse().unwrap(), "10.77.0.2:80".parse().unwrap());
        let fields = |control| SegmentFields {
            mss: Some(2),
            window_scale: Some(3),
            ..SegmentFields::new(src, dst, control, 5, Some(9)).payload(b"data")
        };
        let syn = fields(TcpControl::Syn).build();
        let mut p = syn.clone();
        assert!(!blank_late_mss_option(&mut p), "a SYN keeps its MSS");
        assert_eq!(p, syn);
        let mut p = fields(TcpControl::None).build();
        let before = TcpRepr::parse(
            &TcpPacket::new_checked(&p[20..]).unwrap(),
            &src.ip().into(),
            &dst.ip().into(),
            &smoltcp::phy::ChecksumCapabilities::default(),
        )
        .unwrap();
        assert_eq!(before.max_seg_size, Some(2));
        assert!(blank_late_mss_option(&mut p));
        let tcp = TcpPacket::new_checked(&p[20..]).unwrap();
        assert!(tcp.verify_checksum(&src.ip().into(), &dst.ip().into()), "the checksum follows");
        let after =
            TcpRepr::parse(&tcp, &src.ip().into(), &dst.ip().into(), &smoltcp::phy::ChecksumCapabilities::default())
                .unwrap();
        assert_eq!(
            (after.max_seg_size, after.window_scale, after.payload),
            (None, Some(3), &b"data"[..]),
            "only the MSS went"
        );
        assert!(!blank_late_mss_option(&mut p), "nothing left to blank");
    }

    #[test]
    fn the_window_scale_of_a_syn_is_read() {
        let (c, s) = (sa("198.18.0.2:4000"), sa("10.77.0.2:80"));
        let mut syn = SegmentFields::new(c, s, TcpControl::Syn, 1, None);
        assert_eq!(syn_window_scale(&syn.build()), None, "no option");
        syn.window_scale = Some(7);
        assert_eq!(syn_window_scale(&syn.build()), Some(7));
        let mut syn_ack = SegmentFields::new(s, c, TcpControl::Syn, 1, Some(2));
        syn_ack.window_scale = Some(4);
        assert_eq!(syn_window_scale(&syn_ack.build()), Some(4));
        let ack = SegmentFields::new(c, s, TcpControl::None, 2, Some(2)).build();
        assert_eq!(syn_window_scale(&ack), None, "not a SYN");
        assert_eq!(syn_window_scale(&[0x45, 0, 0]), None, "garbage");
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        let mut x: u32 = 12345;
        for len in 0..200 {
            let mut p: Vec<u8> = (0..len)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 17;
                    x ^= x << 5;
                    x as u8
                })
                .collect();
            if let Some(b) = p.first_mut() {
                *b = (*b & 0x0f) | if len % 2 == 0 { 0x40 } else { 0x60 };
            }
            // Whatever it accepts must hold up to smoltcp's own checked parse.
            match classify(&p) {
                Err(_) => {}
                Ok(_) if p[0] >> 4 == 4 => {
                    let ip = Ipv4Packet::new_checked(&p[..]).expect("accepted v4 header parses");
                    assert!(ip.verify_checksum(), "accepted v4 header has a valid checksum: {p:02x?}");
                }
                Ok(_) => {
                    Ipv6Packet::new_checked(&p[..]).expect("accepted v6 header parses");
                }
            }
        }
    }

    /// Every single-byte change to a valid UDP datagram (v4 and v6) is either rejected
    /// or still yields a datagram whose addresses and payload a checked parse agrees on:
    /// the classifier never accepts what the checksums reject.
    #[test]
    fn single_byte_mutations_are_caught_or_harmless() {
        for (from, to) in [(sa("10.77.0.2:53"), sa("198.18.0.2:4000")), (sa("[fd77::2]:53"), sa("[fd18::2]:4000"))] {
            let mut good = [0u8; 200];
            let n = build_udp(from, to, b"payload bytes", &mut good).unwrap();
            let (mut rejected, mut accepted) = (0, 0);
            for at in 0..n {
                for bit in 0..8 {
                    let mut p = good[..n].to_vec();
                    p[at] ^= 1 << bit;
                    match classify(&p) {
                        Err(_) | Ok(Classified::Unsupported) => rejected += 1,
                        Ok(Classified::Udp { src, dst, payload }) => {
                            accepted += 1;
                            // Only fields no checksum covers may change unnoticed (IPv6 flow
                            // label and traffic class, hop limit / TTL changes caught by v4's sum).
                            assert_eq!((src, dst, payload), (from, to, &b"payload bytes"[..]), "byte {at} bit {bit}");
                        }
                        Ok(other) => panic!("byte {at} bit {bit}: a UDP datagram became {other:?}"),
                    }
                }
            }
            assert!(rejected > accepted, "most flips are caught ({rejected} rejected, {accepted} accepted)");
        }
    }
}
