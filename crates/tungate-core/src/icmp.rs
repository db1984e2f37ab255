//! ICMP echo (ping), answered once for every backend by the driver, before any stack
//! sees the packet (`--icmp`):
//!
//! * [`IcmpMode::Drop`]: echo requests go to the engine like any packet it does not
//!   handle (counted as `unsupported`, dropped);
//! * [`IcmpMode::Reply`]: the gateway answers every echo request itself, from the address
//!   the client pinged;
//! * [`IcmpMode::Direct`]: the gateway pings the destination itself (an unprivileged ICMP
//!   datagram socket where `net.ipv4.ping_group_range` allows it, a raw socket otherwise;
//!   with `--mark`, so the ping does not come back into the TUN) and answers the client
//!   with what came back: the real reply (so the round-trip time is the real one), or
//!   "destination unreachable" when the route or the destination failed.
//!
//! The wire side ([`echo_request`], [`echo_reply`], [`unreachable()`]) is I/O-free; the
//! sockets live in [`Icmp`]'s session tasks, one per (client, destination, identifier), each
//! ending after a minute without a request.

use std::collections::{HashMap, VecDeque};
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use smoltcp::phy::ChecksumCapabilities;
use smoltcp::wire::{
    Icmpv4DstUnreachable, Icmpv4Packet, Icmpv4Repr, Icmpv6DstUnreachable, Icmpv6Packet, Icmpv6Repr, IpProtocol,
    Ipv4Packet, Ipv4Repr, Ipv6Packet, Ipv6Repr,
};
use socket2::{Domain, Protocol, Socket, Type};
use tokio::sync::mpsc;

use crate::PacketBuf;
use crate::flow::WakeQueue;
use crate::stats::Stats;

/// What the gateway does with echo requests (`--icmp`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum IcmpMode {
    /// Dropped (and counted as unsupported).
    #[default]
    Drop,
    /// Answered by the gateway itself.
    Reply,
    /// Sent on to the destination by the gateway; its answer goes back to the client.
    /// `mark`: the `SO_MARK` of the gateway's ping sockets.
    Direct { mark: Option<u32> },
}

impl std::str::FromStr for IcmpMode {
    type Err = String;

    /// `drop`, `reply` or `direct` (the mark is set separately).
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "drop" => Ok(IcmpMode::Drop),
            "reply" => Ok(IcmpMode::Reply),
            "direct" => Ok(IcmpMode::Direct { mark: None }),
            _ => Err(format!("{s:?} is not an ICMP mode (direct, reply or drop)")),
        }
    }
}

/// An echo request from a client, as the TUN delivered it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EchoRequest {
    pub src: IpAddr,
    pub dst: IpAddr,
    pub ident: u16,
    pub seq: u16,
    pub data: Vec<u8>,
}

/// The echo request in `packet` (IPv4 or IPv6, checksums verified), or `None` for
/// anything else. Cheap for other packets: one look at the protocol byte.
pub fn echo_request(packet: &[u8]) -> Option<EchoRequest> {
    let caps = ChecksumCapabilities::default();
    match packet.first()? >> 4 {
        4 => {
            if packet.get(9) != Some(&1) {
                return None;
            }
            let ip = Ipv4Packet::new_checked(packet).ok()?;
            let ip = Ipv4Repr::parse(&ip, &caps).ok()?;
            let header = usize::from(packet[0] & 0x0f) * 4;
            let icmp = Icmpv4Packet::new_checked(packet.get(header..header + ip.payload_len)?).ok()?;
            match Icmpv4Repr::parse(&icmp, &caps).ok()? {
                Icmpv4Repr::EchoRequest { ident, seq_no, data } => Some(EchoRequest {
                    src: ip.src_addr.into(),
                    dst: ip.dst_addr.into(),
                    ident,
                    seq: seq_no,
                    data: data.to_vec(),
                }),
                _ => None,
            }
        }
        6 => {
            if packet.get(6) != Some(&58) {
                return None;
            }
            let ip = Ipv6Packet::new_checked(packet).ok()?;
            let (src, dst) = (ip.src_addr(), ip.dst_addr());
            let icmp = Icmpv6Packet::new_checked(packet.get(40..40 + usize::from(ip.payload_len()))?).ok()?;
            match Icmpv6Repr::parse(&src, &dst, &icmp, &caps).ok()? {
                Icmpv6Repr::EchoRequest { ident, seq_no, data } => {
                    Some(EchoRequest { src: src.into(), dst: dst.into(), ident, seq: seq_no, data: data.to_vec() })
                }
                _ => None,
            }
        }
        _ => None,
    }
}

const HOP_LIMIT: u8 = 64;

/// The echo reply to `request` carrying `data`, from the address pinged.
pub fn echo_reply(request: &EchoRequest, data: &[u8]) -> Option<Vec<u8>> {
    match (request.dst, request.src) {
        (IpAddr::V4(src_addr), IpAddr::V4(dst_addr)) => {
            let icmp = Icmpv4Repr::EchoReply { ident: request.ident, seq_no: request.seq, data };
            Some(emit_v4(src_addr, dst_addr, &icmp))
        }
        (IpAddr::V6(src_addr), IpAddr::V6(dst_addr)) => {
            let icmp = Icmpv6Repr::EchoReply { ident: request.ident, seq_no: request.seq, data };
            Some(emit_v6(src_addr, dst_addr, &icmp))
        }
        _ => None,
    }
}

/// `icmp` in an IPv4 packet from `src_addr` to `dst_addr`, checksums filled.
fn emit_v4(src_addr: std::net::Ipv4Addr, dst_addr: std::net::Ipv4Addr, icmp: &Icmpv4Repr<'_>) -> Vec<u8> {
    let caps = ChecksumCapabilities::default();
    let ip = Ipv4Repr {
        src_addr,
        dst_addr,
        next_header: IpProtocol::Icmp,
        payload_len: icmp.buffer_len(),
        hop_limit: HOP_LIMIT,
    };
    let mut out = vec![0; ip.buffer_len() + icmp.buffer_len()];
    ip.emit(&mut Ipv4Packet::new_unchecked(&mut out[..]), &caps);
    icmp.emit(&mut Icmpv4Packet::new_unchecked(&mut out[ip.buffer_len()..]), &caps);
    out
}

/// `icmp` in an IPv6 packet from `src_addr` to `dst_addr`, checksum filled.
fn emit_v6(src_addr: std::net::Ipv6Addr, dst_addr: std::net::Ipv6Addr, icmp: &Icmpv6Repr<'_>) -> Vec<u8> {
    let caps = ChecksumCapabilities::default();
    let ip = Ipv6Repr {
        src_addr,
        dst_addr,
        next_header: IpProtocol::Icmpv6,
        payload_len: icmp.buffer_len(),
        hop_limit: HOP_LIMIT,
    };
    let mut out = vec![0; ip.buffer_len() + icmp.buffer_len()];
    ip.emit(&mut Ipv6Packet::new_unchecked(&mut out[..]));
    icmp.emit(&src_addr, &dst_addr, &mut Icmpv6Packet::new_unchecked(&mut out[ip.buffer_len()..]), &caps);
    out
}

/// Why a destination could not be reached.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unreachable {
    /// No route to the destination's network.
    Net,
    /// The destination did not answer on its link (neighbour discovery failed).
    Host,
    /// Refused by policy (the gateway cannot ping: no socket permission).
    Prohibited,
    /// Nothing listens on the destination's UDP port (the upstream's socket was refused).
    Port,
}

impl Unreachable {
    /// The kind of failure an error from a ping socket means, if any.
    pub fn of(e: &io::Error) -> Option<Unreachable> {
        match e.raw_os_error()? {
            libc::ENETUNREACH | libc::ENETDOWN => Some(Unreachable::Net),
            libc::EHOSTUNREACH | libc::EHOSTDOWN => Some(Unreachable::Host),
            libc::EACCES | libc::EPERM => Some(Unreachable::Prohibited),
            _ => None,
        }
    }
}

/// "Destination unreachable" for `request` (the packet the client sent, as much of it
/// as fits in a minimal MTU), from `request`'s destination.
pub fn unreachable(request_packet: &[u8], why: Unreachable) -> Option<Vec<u8>> {
    let request = echo_request(request_packet)?;
    unreachable_from(request_packet, request.dst, request.src, why)
}

/// "Port unreachable" from `from` to the client `to`, carrying the header of a datagram
/// `to` sent `from` (what the client's kernel matches to its socket, which then reports
/// ECONNREFUSED).
pub fn udp_port_unreachable(from: SocketAddr, to: SocketAddr) -> Option<Vec<u8>> {
    let mut sent = [0u8; 48];
    let len = crate::packet::build_udp(to, from, &[], &mut sent).ok()?;
    unreachable_from(&sent[..len], from.ip(), to.ip(), Unreachable::Port)
}

/// "Destination unreachable" about `request_packet`, from `from` to `to`.
fn unreachable_from(request_packet: &[u8], from: IpAddr, to: IpAddr, why: Unreachable) -> Option<Vec<u8>> {
    let caps = ChecksumCapabilities::default();
    match (from, to) {
        (IpAddr::V4(src_addr), IpAddr::V4(dst_addr)) => {
            let inner = Ipv4Repr::parse(&Ipv4Packet::new_checked(request_packet).ok()?, &caps).ok()?;
            let header = usize::from(request_packet[0] & 0x0f) * 4;
            // RFC 792: the header and the first 8 bytes; RFC 1812 allows up to 576 in all.
            let rest = &request_packet[header..request_packet.len().min(576 - 20 - 8 - header)];
            let reason = match why {
                Unreachable::Net => Icmpv4DstUnreachable::NetUnreachable,
                Unreachable::Host => Icmpv4DstUnreachable::HostUnreachable,
                Unreachable::Prohibited => Icmpv4DstUnreachable::HostProhibited,
                Unreachable::Port => Icmpv4DstUnreachable::PortUnreachable,
            };
            let icmp = Icmpv4Repr::DstUnreachable { reason, header: inner, data: rest };
            Some(emit_v4(src_addr, dst_addr, &icmp))
        }
        (IpAddr::V6(src_addr), IpAddr::V6(dst_addr)) => {
            let inner_packet = Ipv6Packet::new_checked(request_packet).ok()?;
            let inner = Ipv6Repr::parse(&inner_packet).ok()?;
            // RFC 4443: as much of the packet as fits in the minimum MTU (1 280).
            let rest = &request_packet[40..request_packet.len().min(1280 - 40 - 8 - 40)];
            let reason = match why {
                Unreachable::Net => Icmpv6DstUnreachable::NoRoute,
                Unreachable::Host => Icmpv6DstUnreachable::AddrUnreachable,
                Unreachable::Prohibited => Icmpv6DstUnreachable::AdminProhibit,
                Unreachable::Port => Icmpv6DstUnreachable::PortUnreachable,
            };
            let icmp = Icmpv6Repr::DstUnreachable { reason, header: inner, data: rest };
            Some(emit_v6(src_addr, dst_addr, &icmp))
        }
        _ => None,
    }
}

/// The driver's ICMP stage: takes echo requests out of the TUN's packets (unless
/// dropping) and queues what goes back to clients.
pub struct Icmp {
    mode: IcmpMode,
    stats: Arc<Stats>,
    out: Arc<Mutex<VecDeque<Vec<u8>>>>,
    wake: Arc<WakeQueue>,
    pinger: HashMap<(IpAddr, IpAddr, u16), mpsc::Sender<Vec<u8>>>,
}

impl std::fmt::Debug for Icmp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Icmp").field("mode", &self.mode).field("pings", &self.pinger.len()).finish()
    }
}

/// Requests a ping session has queued and not yet sent: more are dropped (as a router
/// drops under load; ping counts them lost).
const SESSION_QUEUE: usize = 64;

/// A ping session without a request for this long ends (its socket is closed).
const SESSION_IDLE: Duration = Duration::from_secs(60);

impl Icmp {
    /// `wake` is the engine's wake queue: the driver loops when a reply is queued.
    pub fn new(mode: IcmpMode, stats: Arc<Stats>, wake: Arc<WakeQueue>) -> Self {
        Icmp { mode, stats, out: Arc::default(), wake, pinger: HashMap::new() }
    }

    /// Takes `packet` if it is an echo request this stage answers; `false` leaves it to
    /// the engine.
    pub fn intercept(&mut self, packet: &PacketBuf) -> bool {
        if self.mode == IcmpMode::Drop {
            return false;
        }
        let Some(request) = echo_request(packet.packet()) else { return false };
        Stats::inc(&self.stats.icmp_echo_requests);
        match self.mode {
            IcmpMode::Drop => return false,
            IcmpMode::Reply => {
                if let Some(reply) = echo_reply(&request, &request.data) {
                    push(&self.out, &self.wake, &self.stats.icmp_echo_replies, reply);
                }
            }
            IcmpMode::Direct { mark } => {
                let key = (request.src, request.dst, request.ident);
                let sent = self.pinger.get(&key).map(|tx| tx.try_send(packet.packet().to_vec()));
                match sent {
                    Some(Ok(())) => {}
                    Some(Err(mpsc::error::TrySendError::Full(_))) => Stats::inc(&self.stats.icmp_dropped),
                    // No session yet, or it ended: a new one.
                    None | Some(Err(mpsc::error::TrySendError::Closed(_))) => {
                        if self.pinger.len() >= 1024 {
                            self.pinger.retain(|_, tx| !tx.is_closed());
                        }
                        let (tx, rx) = mpsc::channel(SESSION_QUEUE);
                        let _ = tx.try_send(packet.packet().to_vec());
                        let session = Session { request, mark, out: self.out.clone(), wake: self.wake.clone() };
                        tokio::spawn(session.run(rx, self.stats.clone()));
                        self.pinger.insert(key, tx);
                    }
                }
            }
        }
        true
    }

    /// The next packet for a client.
    pub fn poll_transmit(&mut self) -> Option<PacketBuf> {
        let mut out = self.out.lock().unwrap_or_else(|p| p.into_inner());
        out.pop_front().map(PacketBuf::from_vec)
    }
}

fn push(out: &Mutex<VecDeque<Vec<u8>>>, wake: &WakeQueue, counter: &std::sync::atomic::AtomicU64, packet: Vec<u8>) {
    out.lock().unwrap_or_else(|p| p.into_inner()).push_back(packet);
    Stats::inc(counter);
    wake.wake();
}

/// One client's pings to one destination (one identifier): a socket of the gateway's
/// own, connected to the destination, so the kernel reports a failed route or neighbour
/// on it.
struct Session {
    /// The first request: who pinged whom.
    request: EchoRequest,
    mark: Option<u32>,
    out: Arc<Mutex<VecDeque<Vec<u8>>>>,
    wake: Arc<WakeQueue>,
}

/// An ICMP socket: a datagram ("ping") socket, whose replies come without the IP header
/// and whose identifier the kernel sets, or a raw one. Driven through tokio's
/// `UdpSocket`, which is plain `send(2)`/`recv(2)` on a registered descriptor and so
/// serves any datagram-shaped socket (tokio's `AsyncFd` would take `unsafe` to register
/// one); only `send` and `recv` on the connected socket are used.
struct PingSocket {
    socket: tokio::net::UdpSocket,
    raw: bool,
    v6: bool,
}

impl PingSocket {
    fn open(dst: IpAddr, mark: Option<u32>) -> io::Result<PingSocket> {
        let (domain, protocol) = match dst {
            IpAddr::V4(_) => (Domain::IPV4, Protocol::ICMPV4),
            IpAddr::V6(_) => (Domain::IPV6, Protocol::ICMPV6),
        };
        let (socket, raw) = match Socket::new(domain, Type::DGRAM, Some(protocol)) {
            Ok(s) => (s, false),
            // Not in net.ipv4.ping_group_range: a raw socket needs CAP_NET_RAW.
            Err(_) => (Socket::new(domain, Type::RAW, Some(protocol))?, true),
        };
        if let Some(mark) = mark {
            socket.set_mark(mark)?;
        }
        socket.set_nonblocking(true)?;
        socket.connect(&SocketAddr::new(dst, 0).into())?;
        let socket = tokio::net::UdpSocket::from_std(std::net::UdpSocket::from(socket))?;
        Ok(PingSocket { socket, raw, v6: dst.is_ipv6() })
    }

    async fn send(&self, ident: u16, seq: u16, data: &[u8]) -> io::Result<()> {
        // Type, code, checksum, identifier, sequence number, data. The kernel computes the
        // checksum of a ping socket's and of an ICMPv6 raw socket's messages; an ICMPv4 raw
        // socket's is ours.
        let kind = if self.v6 { 128 } else { 8 };
        let mut message = vec![kind, 0, 0, 0];
        message.extend(ident.to_be_bytes());
        message.extend(seq.to_be_bytes());
        message.extend_from_slice(data);
        if self.raw && !self.v6 {
            let sum = !smoltcp::wire::checksum::data(&message);
            message[2..4].copy_from_slice(&sum.to_be_bytes());
        }
        self.socket.send(&message).await.map(drop)
    }

    /// The next echo reply's (identifier, sequence number, data), skipping other ICMP a
    /// raw socket sees.
    async fn recv(&self) -> io::Result<(u16, u16, Vec<u8>)> {
        let mut bytes = vec![0u8; 65536];
        loop {
            let n = self.socket.recv(&mut bytes).await?;
            let bytes = &bytes[..n];
            // An IPv4 raw socket delivers the IP header too.
            let icmp = if self.raw && !self.v6 {
                let header = usize::from(bytes.first().copied().unwrap_or(0) & 0x0f) * 4;
                bytes.get(header..).unwrap_or(&[])
            } else {
                bytes
            };
            let reply_kind = if self.v6 { 129 } else { 0 };
            if icmp.len() < 8 || icmp[0] != reply_kind || icmp[1] != 0 {
                continue;
            }
            let ident = u16::from_be_bytes([icmp[4], icmp[5]]);
            let seq = u16::from_be_bytes([icmp[6], icmp[7]]);
            return Ok((ident, seq, icmp[8..].to_vec()));
        }
    }
}

impl Session {
    async fn run(self, mut requests: mpsc::Receiver<Vec<u8>>, stats: Arc<Stats>) {
        let socket = match PingSocket::open(self.request.dst, self.mark) {
            Ok(s) => Some(s),
            Err(e) => {
                tracing::debug!(dst = %self.request.dst, "cannot open a ping socket: {e}");
                None
            }
        };
        // Requests sent and not yet answered, by sequence number (the latest 64).
        let mut pending: VecDeque<(u16, Vec<u8>)> = VecDeque::new();
        loop {
            let reply = async {
                match &socket {
                    Some(s) => s.recv().await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                request = tokio::time::timeout(SESSION_IDLE, requests.recv()) => {
                    let Ok(Some(packet)) = request else { return };
                    let Some(echo) = echo_request(&packet) else { continue };
                    let sent = match &socket {
                        Some(s) => s.send(echo.ident, echo.seq, &echo.data).await,
                        None => Err(io::Error::from_raw_os_error(libc::EACCES)),
                    };
                    match sent {
                        Ok(()) => {
                            if pending.len() == SESSION_QUEUE {
                                pending.pop_front();
                            }
                            pending.push_back((echo.seq, packet));
                        }
                        Err(e) => self.fail(&packet, &e, &stats),
                    }
                }
                reply = reply => match reply {
                    Ok((_ident, seq, data)) => {
                        // A ping socket's identifier is the kernel's: match by sequence.
                        let Some(at) = pending.iter().position(|(s, _)| *s == seq) else { continue };
                        let (_, packet) = pending.remove(at).expect("found above");
                        if let Some(echo) = echo_request(&packet) {
                            if let Some(out) = echo_reply(&echo, &data) {
                                push(&self.out, &self.wake, &stats.icmp_echo_replies, out);
                            }
                        }
                    }
                    // The route or the neighbour failed: every request in flight is told.
                    Err(e) => {
                        for (_, packet) in pending.drain(..) {
                            self.fail(&packet, &e, &stats);
                        }
                        if Unreachable::of(&e).is_none() {
                            tracing::debug!(dst = %self.request.dst, "ping socket: {e}");
                            tokio::time::sleep(Duration::from_millis(100)).await;
                        }
                    }
                },
            }
        }
    }

    /// Tells the client its request could not be delivered, if the error says why.
    fn fail(&self, packet: &[u8], e: &io::Error, stats: &Stats) {
        let Some(why) = Unreachable::of(e) else {
            Stats::inc(&stats.icmp_dropped);
            return;
        };
        if let Some(out) = unreachable(packet, why) {
            push(&self.out, &self.wake, &stats.icmp_unreachable, out);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use smoltcp::wire::Icmpv6Message;

    /// An echo request as `ping` sends it, built with smoltcp.
    fn ping(src: IpAddr, dst: IpAddr, ident: u16, seq: u16, data: &[u8]) -> Vec<u8> {
        let request = EchoRequest { src: dst, dst: src, ident, seq, data: data.to_vec() };
        // `echo_reply` builds from the request's destination to its source, so a request
        // from `src` is the "reply" to one from `dst`; rewrite its type to a request.
        let mut packet = echo_reply(&request, data).expect("same family");
        match (src, dst) {
            (IpAddr::V4(_), IpAddr::V4(_)) => {
                let mut icmp = Icmpv4Packet::new_unchecked(&mut packet[20..]);
                icmp.set_msg_type(smoltcp::wire::Icmpv4Message::EchoRequest);
                icmp.fill_checksum();
            }
            (IpAddr::V6(s), IpAddr::V6(d)) => {
                let mut icmp = Icmpv6Packet::new_unchecked(&mut packet[40..]);
                icmp.set_msg_type(smoltcp::wire::Icmpv6Message::EchoRequest);
                icmp.fill_checksum(&s, &d);
            }
            _ => unreachable!(),
        }
        packet
    }

    #[test]
    fn an_echo_request_is_answered_from_the_address_pinged() {
        for (src, dst) in [("198.18.0.1", "10.77.0.2"), ("fd18::1", "fd77::2")] {
            let (src, dst): (IpAddr, IpAddr) = (src.parse().unwrap(), dst.parse().unwrap());
            let packet = ping(src, dst, 0x1234, 7, b"abcdefgh");
            let request = echo_request(&packet).expect("an echo request");
            assert_eq!((request.src, request.dst, request.ident, request.seq), (src, dst, 0x1234, 7));
            assert_eq!(request.data, b"abcdefgh");
            let reply = echo_reply(&request, &request.data).expect("reply");
            // The reply parses, with a right checksum, from dst to src.
            let caps = ChecksumCapabilities::default();
            match (src, dst) {
                (IpAddr::V4(s), IpAddr::V4(d)) => {
                    let ip = Ipv4Repr::parse(&Ipv4Packet::new_checked(&reply[..]).unwrap(), &caps).unwrap();
                    assert_eq!((ip.src_addr, ip.dst_addr), (d, s));
                    let icmp = Icmpv4Repr::parse(&Icmpv4Packet::new_checked(&reply[20..]).unwrap(), &caps).unwrap();
                    assert_eq!(icmp, Icmpv4Repr::EchoReply { ident: 0x1234, seq_no: 7, data: b"abcdefgh" });
                }
                (IpAddr::V6(s), IpAddr::V6(d)) => {
                    let icmp = Icmpv6Packet::new_checked(&reply[40..]).unwrap();
                    let icmp = Icmpv6Repr::parse(&d, &s, &icmp, &caps).unwrap();
                    assert_eq!(icmp, Icmpv6Repr::EchoReply { ident: 0x1234, seq_no: 7, data: b"abcdefgh" });
                }
                _ => unreachable!(),
            }
            // A damaged checksum is not an echo request.
            let mut bad = packet.clone();
            let last = bad.len() - 1;
            bad[last] ^= 1;
            assert_eq!(echo_request(&bad), None);
        }
    }

    #[test]
    fn unreachable_carries_the_request_it_answers() {
        let caps = ChecksumCapabilities::default();
        let (src, dst): (IpAddr, IpAddr) = ("198.18.0.1".parse().unwrap(), "10.78.0.99".parse().unwrap());
        let packet = ping(src, dst, 9, 1, &[0x5a; 56]);
        let out = unreachable(&packet, Unreachable::Host).expect("built");
        let icmp = Icmpv4Repr::parse(&Icmpv4Packet::new_checked(&out[20..]).unwrap(), &caps).unwrap();
        let Icmpv4Repr::DstUnreachable { reason, header, data } = icmp else { panic!("{icmp:?}") };
        assert_eq!(reason, Icmpv4DstUnreachable::HostUnreachable);
        assert_eq!((IpAddr::from(header.src_addr), IpAddr::from(header.dst_addr)), (src, dst));
        assert_eq!(data, &packet[20..], "the whole request fits");
        let (src6, dst6): (IpAddr, IpAddr) = ("fd18::1".parse().unwrap(), "fd78::99".parse().unwrap());
        let packet = ping(src6, dst6, 9, 1, &[0x5a; 56]);
        let out = unreachable(&packet, Unreachable::Net).expect("built");
        let (IpAddr::V6(s), IpAddr::V6(d)) = (src6, dst6) else { unreachable!() };
        let icmp = Icmpv6Repr::parse(&d, &s, &Icmpv6Packet::new_checked(&out[40..]).unwrap(), &caps).unwrap();
        assert!(matches!(icmp, Icmpv6Repr::DstUnreachable { reason: Icmpv6DstUnreachable::NoRoute, .. }), "{icmp:?}");
        assert_eq!(Unreachable::of(&io::Error::from_raw_os_error(libc::EHOSTUNREACH)), Some(Unreachable::Host));
        // A refused UDP destination: the client's datagram header (client -> server) inside.
        let (server, client): (SocketAddr, SocketAddr) =
            ("10.77.0.2:9".parse().unwrap(), "198.18.0.2:4000".parse().unwrap());
        let out = udp_port_unreachable(server, client).expect("built");
        let ip = Ipv4Packet::new_checked(&out[..]).unwrap();
        assert_eq!((ip.src_addr(), ip.dst_addr()), ("10.77.0.2".parse().unwrap(), "198.18.0.2".parse().unwrap()));
        let icmp = Icmpv4Packet::new_checked(ip.payload()).unwrap();
        assert!(icmp.verify_checksum());
        let Icmpv4Repr::DstUnreachable { reason, header, data } =
            Icmpv4Repr::parse(&icmp, &ChecksumCapabilities::default()).unwrap()
        else {
            panic!("not destination unreachable")
        };
        assert_eq!(reason, Icmpv4DstUnreachable::PortUnreachable);
        assert_eq!(
            (header.src_addr.to_string(), header.dst_addr.to_string()),
            ("198.18.0.2".into(), "10.77.0.2".into())
        );
        assert_eq!(&data[..4], &[0x0f, 0xa0, 0, 9], "the client's ports, as it sent them");
        let v6 = udp_port_unreachable("[fd77::2]:9".parse().unwrap(), "[fd18::2]:4000".parse().unwrap()).expect("v6");
        let icmp = Icmpv6Packet::new_checked(&v6[40..]).unwrap();
        assert_eq!((icmp.msg_type(), icmp.msg_code()), (Icmpv6Message::DstUnreachable, 4));
        assert_eq!(Unreachable::of(&io::Error::from_raw_os_error(libc::ETIMEDOUT)), None);
    }
}
