//! Parsing and building the few packets the gateway handles itself, on smoltcp's wire types.
//!
//! [`classify`] is the demultiplexer's first look at a packet from the TUN: it validates
//! the IP header and returns the transport 4-tuple without copying. [`build_udp`] and
//! [`build_tcp_rst`] write into caller-owned buffers.

use std::net::{IpAddr, SocketAddr};

use smoltcp::phy::ChecksumCapabilities;
use smoltcp::wire::{
    IpAddress, IpProtocol, Ipv4Packet, Ipv4Repr, Ipv6Packet, Ipv6Repr, TcpControl, TcpPacket, TcpRepr, TcpSeqNumber,
    UdpPacket, UdpRepr,
};

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

/// Classifies a segment for no known flow. `verify_checksum`: false for a packet whose
/// checksum is still partial (TUN offload: the local kernel's own work).
pub fn stranger(packet: &[u8], seg: &TcpSummary, verify_checksum: bool) -> Stranger {
    if verify_checksum && !tcp_checksum_ok(packet, seg) {
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
