//! The NAT table and the in-place rewrite: the whole of the system stack's packet work.
//! I/O-free — the driver feeds packets in and writes what comes out.
//!
//! A client segment `S:sp → D:dp` is rewritten to `F:np → G:L` (F one of the fake client
//! addresses of the TUN's prefix, np a NAT port, G:L the kernel listener on the TUN's own
//! address) and written back into the TUN, where the kernel's own TCP terminates it. The
//! listener's replies `G:L → F:np` come out of the TUN and are rewritten back to
//! `D:dp → S:sp`. When the kernel accepts `F:np`, [`Nat::take_port`] maps it back to
//! `(S:sp, D:dp)` and the flow's [`FlowPort`] for the bridge.
//!
//! Entries are created only by a bare SYN, and only after the handler accepted (the SYN
//! is held meanwhile by the [`FlowTable`] every backend shares; the NAT address is taken
//! then); any other segment for an unknown flow gets a RST. An entry ends `linger` after both FINs or a RST went through (late ACKs and
//! retransmissions still pass), or after `idle_timeout` without a packet. Its NAT
//! address then rests before reuse, counted from its last segment: only `linger` after a
//! clean passive close of the kernel's socket (its FIN acknowledged the client's), and
//! `time_wait` (65 s) otherwise — the kernel's socket may sit in TIME-WAIT or
//! SYN-RECEIVED, and a new SYN from the same `F:np` must not meet it.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::ops::RangeInclusive;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tungate_core::Dispatch;
use tungate_core::admission::{Close, Decided, FlowTable, Held, Opening, Seen};
use tungate_core::device::PacketBuf;
use tungate_core::device::offload::{self, GsoKind};
use tungate_core::engine::Handled;
use tungate_core::flow::{FlowId, FlowPort, WakeQueue};
use tungate_core::packet::{self, Classified, TcpSummary};
use tungate_core::{Mtu, Stats};

use crate::checksum::Delta;

/// NAT settings. Every default is documented with its reason.
#[derive(Debug, Clone)]
pub struct NatConfig {
    /// The kernel listener `G:L` for IPv4 flows (none: IPv4 TCP gets RST).
    pub listen_v4: Option<SocketAddr>,
    /// The kernel listener for IPv6 flows.
    pub listen_v6: Option<SocketAddr>,
    /// Fake client addresses `F` (in the TUN's prefix, not assigned to anything).
    pub fake_v4: Vec<Ipv4Addr>,
    pub fake_v6: Vec<Ipv6Addr>,
    /// NAT ports per fake address. 64 512 per address: the whole non-privileged range.
    pub ports: RangeInclusive<u16>,
    /// An entry without any packet for this long is dropped. RFC 5382 REQ-5: at least
    /// 2 h 4 min for established connections.
    pub idle_timeout: Duration,
    /// An accepted flow whose connection the kernel never delivered is reset after this.
    pub handshake_timeout: Duration,
    /// How long an entry stays after both FINs or a RST (final ACKs, retransmissions).
    pub linger: Duration,
    /// How long a NAT address rests unless the kernel's socket closed passively: Linux's
    /// TIME-WAIT is 60 s and a SYN-RECEIVED socket lives up to 63 s (5 SYN-ACK
    /// retransmissions); plus a margin.
    pub time_wait: Duration,
    /// Ring capacity of each flow between the bridge and the handler.
    pub ring_capacity: usize,
    pub mtu: Mtu,
}

impl Default for NatConfig {
    fn default() -> Self {
        NatConfig {
            listen_v4: None,
            listen_v6: None,
            fake_v4: Vec::new(),
            fake_v6: Vec::new(),
            ports: 1024..=65535,
            idle_timeout: Duration::from_secs(2 * 3600 + 4 * 60),
            handshake_timeout: Duration::from_secs(30),
            linger: Duration::from_secs(2),
            time_wait: Duration::from_secs(65),
            ring_capacity: tungate_core::flow::DEFAULT_RING_CAPACITY,
            mtu: Mtu::DEFAULT,
        }
    }
}

/// An admitted flow: its SYN went to the kernel.
struct Entry {
    client: SocketAddr,
    dst: SocketAddr,
    nat: SocketAddr,
    /// Waits for the kernel's accepted connection (taken by [`Nat::take_port`]).
    port: Option<FlowPort>,
    /// When the SYN went to the kernel.
    since: Instant,
    last_seen: Instant,
    /// The sequence number just past the client's FIN, once it went through.
    client_fin_end: Option<u32>,
    fin_kernel: bool,
    /// The kernel's FIN acknowledged the client's: its socket closed passively (LAST-ACK,
    /// then gone), so no TIME-WAIT holds the NAT address.
    kernel_closed_passively: bool,
    /// A RST went through, either way.
    reset: bool,
    /// Both FINs or a RST went through at this time.
    closing_since: Option<Instant>,
    /// The sequence number just past the furthest client segment, and the kernel's: where
    /// an eviction's RSTs must sit for either end to take them.
    client_next: u32,
    kernel_next: Option<u32>,
}

impl Entry {
    fn closing(&self) -> bool {
        self.reset || (self.client_fin_end.is_some() && self.fin_kernel)
    }

    /// How long the NAT address must rest after the entry ends, counted from its last
    /// segment: the kernel's socket may be in TIME-WAIT (it closed first, or the FINs
    /// crossed), still in SYN-RECEIVED or the accept queue (a flow that never finished),
    /// or reset — all but a clean passive close keep the full `time_wait`.
    fn rest(&self, config: &NatConfig) -> Duration {
        if !self.reset && self.fin_kernel && self.kernel_closed_passively { config.linger } else { config.time_wait }
    }
}

/// The NAT table. See the module docs.
pub struct Nat {
    config: NatConfig,
    /// Every flow: held until its handler decides (admission), then an [`Entry`].
    entries: FlowTable<Entry>,
    by_nat: HashMap<SocketAddr, FlowId>,
    /// NAT addresses resting until the given time.
    cooling: HashMap<SocketAddr, Instant>,
    cursor_v4: usize,
    cursor_v6: usize,
    woken: Vec<FlowId>,
    splitter: offload::Splitter,
}

impl std::fmt::Debug for Nat {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Nat").field("entries", &self.entries.len()).finish_non_exhaustive()
    }
}

impl Nat {
    pub fn new(config: NatConfig, handlers: Dispatch) -> Self {
        let entries = FlowTable::new(&handlers, config.mtu, config.ring_capacity).offering_sockets();
        Nat {
            config,
            entries,
            by_nat: HashMap::new(),
            cooling: HashMap::new(),
            cursor_v4: 0,
            cursor_v6: 0,
            woken: Vec::new(),
            splitter: offload::Splitter::default(),
        }
    }

    /// The flows, for a drain at shutdown.
    pub fn flows(&mut self) -> &mut dyn tungate_core::admission::Flows {
        &mut self.entries
    }

    /// Notified when a handler decided or a UDP reply is queued.
    pub fn wake_queue(&self) -> Arc<WakeQueue> {
        self.entries.wake_queue()
    }

    /// NAT entries (pending, open or lingering).
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    fn stats(&self) -> &Stats {
        self.entries.stats()
    }

    fn is_listener(&self, addr: SocketAddr) -> bool {
        Some(addr) == self.config.listen_v4 || Some(addr) == self.config.listen_v6
    }

    /// An address a client flow must not target: the listener's or a fake one (a flow
    /// to those would loop through the TUN).
    fn is_ours(&self, ip: IpAddr) -> bool {
        self.config.listen_v4.is_some_and(|l| l.ip() == ip)
            || self.config.listen_v6.is_some_and(|l| l.ip() == ip)
            || match ip {
                IpAddr::V4(a) => self.config.fake_v4.contains(&a),
                IpAddr::V6(a) => self.config.fake_v6.contains(&a),
            }
    }

    /// Looks at one packet from the TUN; may rewrite it in place. [`Handled::Transmit`]:
    /// rewritten, write it back to the TUN (with its offload metadata).
    pub fn handle_packet(&mut self, now: Instant, packet: &mut PacketBuf) -> Handled {
        if packet::Layout::of(packet.packet()).is_some_and(|l| l.protocol == packet::UDP) {
            self.handle_udp(now, packet);
            return Handled::Consumed;
        }
        let seg = match packet::classify(packet.packet()) {
            Ok(Classified::Tcp(seg)) => seg,
            Ok(Classified::Udp { .. }) | Ok(Classified::Unsupported) => {
                Stats::inc(&self.stats().unsupported);
                return Handled::Consumed;
            }
            Err(_) => {
                Stats::inc(&self.stats().malformed);
                return Handled::Consumed;
            }
        };
        if self.is_listener(seg.src) {
            return self.kernel_segment(now, packet, &seg);
        }
        let key = (seg.src, seg.dst);
        if seg.is_bare_syn() {
            if let Some(id) = self.entries.id(&key) {
                if self.entries.get(id).is_some_and(|e| e.closing_since.is_some()) {
                    // The client reuses its port for a new connection: start afresh.
                    self.remove(now, id, Close::Clean);
                }
            }
        }
        // A flow to the listener or a fake address would loop through the TUN.
        let opening = if self.is_ours(seg.dst.ip()) { Opening::Refused } else { Opening::Allowed };
        let id = match self.entries.segment(packet, &seg, opening) {
            Seen::Admitted(id) => id,
            Seen::Unknown => {
                self.entries.reset(&seg);
                return Handled::Consumed;
            }
            Seen::Consumed | Seen::UnknownRst => return Handled::Consumed,
        };
        let Some(e) = self.entries.get_mut(id) else { return Handled::Consumed };
        e.last_seen = now;
        e.client_next = furthest(e.client_next, seg.seq.wrapping_add(seg.segment_len as u32));
        if seg.fin && e.client_fin_end.is_none() {
            e.client_fin_end = Some(seg.seq.wrapping_add(seg.segment_len as u32));
        }
        e.reset |= seg.rst;
        if e.closing() && e.closing_since.is_none() {
            e.closing_since = Some(now);
        }
        let nat = e.nat;
        match self.listener_for(nat) {
            Some(listen) if rewrite(packet, nat, listen) => Handled::Transmit,
            _ => {
                Stats::inc(&self.stats().malformed);
                Handled::Consumed
            }
        }
    }

    fn listener_for(&self, nat: SocketAddr) -> Option<SocketAddr> {
        if nat.is_ipv4() { self.config.listen_v4 } else { self.config.listen_v6 }
    }

    /// A segment from the kernel listener to a NAT address.
    fn kernel_segment(&mut self, now: Instant, packet: &mut PacketBuf, seg: &TcpSummary) -> Handled {
        let Some(e) = self.by_nat.get(&seg.dst).and_then(|&id| self.entries.get_mut(id)) else {
            // A late segment of an entry already gone (the kernel's socket retransmitting
            // into a connection the client has reset): nobody to deliver it to.
            Stats::inc(&self.stats().tcp_unknown_flow);
            return Handled::Consumed;
        };
        e.last_seen = now;
        let next = seg.seq.wrapping_add(seg.segment_len as u32);
        e.kernel_next = Some(e.kernel_next.map_or(next, |k| furthest(k, next)));
        if seg.fin && !e.fin_kernel {
            e.fin_kernel = true;
            // Passive close: the kernel's FIN acknowledges the client's.
            e.kernel_closed_passively =
                e.client_fin_end.is_some_and(|end| seg.ack && (seg.ack_number.wrapping_sub(end) as i32) >= 0);
        }
        e.reset |= seg.rst;
        if e.closing() && e.closing_since.is_none() {
            e.closing_since = Some(now);
        }
        if rewrite(packet, e.dst, e.client) {
            Handled::Transmit
        } else {
            Stats::inc(&self.stats().malformed);
            Handled::Consumed
        }
    }

    /// A free NAT address: not in use, not cooling down. Walks the whole space in order
    /// (fake address by fake address), so an address is reused as late as possible.
    fn allocate(&mut self, now: Instant, v6: bool) -> Option<SocketAddr> {
        let ports = self.config.ports.clone();
        let per_fake = usize::from(ports.end() - ports.start()) + 1;
        let fakes = if v6 { self.config.fake_v6.len() } else { self.config.fake_v4.len() };
        let space = per_fake * fakes;
        for _ in 0..space {
            let cursor = if v6 { &mut self.cursor_v6 } else { &mut self.cursor_v4 };
            let c = *cursor % space;
            *cursor = (c + 1) % space;
            let port = ports.start() + (c % per_fake) as u16;
            let ip = if v6 {
                IpAddr::V6(self.config.fake_v6[c / per_fake])
            } else {
                IpAddr::V4(self.config.fake_v4[c / per_fake])
            };
            let candidate = SocketAddr::new(ip, port);
            if self.by_nat.contains_key(&candidate) {
                continue;
            }
            match self.cooling.get(&candidate) {
                Some(&until) if until > now => continue,
                Some(_) => {
                    self.cooling.remove(&candidate);
                }
                None => {}
            }
            return Some(candidate);
        }
        None
    }

    /// Acts on handler decisions: an accepted flow gets a NAT address and its SYN is
    /// rewritten and queued for the TUN (a rejected one was answered with RST by the
    /// table). With no NAT address free, the accepted flow is refused after all.
    pub fn service(&mut self, now: Instant) {
        let mut woken = std::mem::take(&mut self.woken);
        self.entries.wake_queue().drain_into(&mut woken);
        for &id in &woken {
            match self.entries.decide(id) {
                Decided::Accepted(held) => self.admit(now, id, held),
                Decided::Admitted if self.entries.is_evicted(id) => self.evict(now, id),
                _ => {}
            }
        }
        woken.clear();
        self.woken = woken;
    }

    /// Resets an evicted flow at both ends (the handler may hold the kernel socket
    /// itself, which only a RST from the TUN side reaches): a RST to the kernel's socket
    /// at the client's next sequence number, and one to the client at the kernel's, then
    /// the entry goes (its NAT address rests as after any reset).
    fn evict(&mut self, now: Instant, id: FlowId) {
        let Some(e) = self.entries.get_mut(id) else { return };
        e.reset = true;
        let (client, dst, nat, client_next, kernel_next) = (e.client, e.dst, e.nat, e.client_next, e.kernel_next);
        // A RST answers a segment that acknowledges what the RST's sender is at.
        let answering = |src, dst, ack_number| TcpSummary {
            src,
            dst,
            syn: false,
            ack: true,
            rst: false,
            fin: false,
            seq: 0,
            ack_number,
            segment_len: 0,
            window: 0,
        };
        if let Some(listen) = self.listener_for(nat) {
            self.entries.reset(&answering(listen, nat, client_next));
        }
        // Before the kernel's SYN-ACK the client has nothing to reset; its next segment
        // finds no flow and gets a RST then.
        if let Some(kernel_next) = kernel_next {
            self.entries.reset(&answering(client, dst, kernel_next));
        }
        self.remove(now, id, Close::Reset);
    }

    fn admit(&mut self, now: Instant, id: FlowId, held: Held) {
        let Held { link, mut syn, summary } = held;
        let (client, dst) = (summary.src, summary.dst);
        let listen = self.listener_for(dst);
        let Some(nat) = listen.and_then(|_| self.allocate(now, dst.is_ipv6())) else {
            tracing::debug!(src = %client, %dst, "no NAT address free (or no listener for this family)");
            Stats::inc(&self.stats().tcp_rejected);
            self.entries.reset(&summary);
            self.entries.remove(id, Close::Reset);
            link.set_closed(true);
            return;
        };
        if listen.is_some_and(|l| rewrite(&mut syn, nat, l)) {
            self.entries.push(syn);
        }
        let entry = Entry {
            client,
            dst,
            nat,
            port: Some(link.into_port()),
            since: now,
            last_seen: now,
            client_fin_end: None,
            fin_kernel: false,
            kernel_closed_passively: false,
            reset: false,
            closing_since: None,
            client_next: summary.seq.wrapping_add(1),
            kernel_next: None,
        };
        self.entries.admit(id, entry);
        self.by_nat.insert(nat, id);
        tracing::debug!(src = %client, %dst, %nat, "tcp flow admitted");
    }

    /// The kernel accepted a connection from `peer` (a NAT address): the flow's real
    /// client, original destination and port, if it is a flow that waits for one.
    pub fn take_port(&mut self, peer: SocketAddr) -> Option<(SocketAddr, SocketAddr, FlowPort)> {
        let &id = self.by_nat.get(&normalize(peer))?;
        let e = self.entries.get_mut(id)?;
        e.port.take().map(|p| (e.client, e.dst, p))
    }

    /// Expires entries and cooled-down NAT addresses. Cheap enough to call every second
    /// (one pass over the table).
    pub fn sweep(&mut self, now: Instant) {
        let c = &self.config;
        let expired: Vec<(FlowId, Close)> = self
            .entries
            .iter()
            .filter_map(|(i, e)| {
                let stale_handshake = e.port.is_some() && now >= e.since + c.handshake_timeout;
                let done = e.closing_since.is_some_and(|t| now >= t + c.linger);
                let idle = now >= e.last_seen + c.idle_timeout;
                // Only both FINs and no RST make a clean end for the handler.
                let close = if e.reset || !done { Close::Reset } else { Close::Clean };
                (stale_handshake || done || idle).then_some((i, close))
            })
            .collect();
        for (i, close) in expired {
            self.remove(now, i, close);
        }
        self.cooling.retain(|_, until| *until > now);
    }

    /// Whether [`sweep`](Self::sweep) has anything to watch.
    pub fn needs_sweep(&self) -> bool {
        !self.entries.is_empty() || !self.cooling.is_empty()
    }

    fn remove(&mut self, now: Instant, id: FlowId, close: Close) {
        let Some(e) = self.entries.remove(id, close) else { return };
        self.by_nat.remove(&e.nat);
        // Counted from the last segment: that is when the kernel's timers restarted.
        let until = e.last_seen + e.rest(&self.config);
        if until > now {
            self.cooling.insert(e.nat, until);
        }
        if let Some(port) = e.port {
            port.finish(close == Close::Reset);
        }
    }

    fn handle_udp(&mut self, now: Instant, packet: &mut PacketBuf) {
        if packet.meta.gso.is_some_and(|g| g.kind == GsoKind::Udp) {
            // A USO super-packet (an application using UDP_SEGMENT): one datagram each.
            let meta = packet.meta;
            let mut splitter = std::mem::take(&mut self.splitter);
            match splitter.split(packet.packet_mut(), &meta, self.config.mtu.get()) {
                Ok(n) => (0..n).for_each(|i| self.deliver_udp(now, splitter.segment(i))),
                Err(_) => Stats::inc(&self.stats().malformed),
            }
            self.splitter = splitter;
            return;
        }
        if let Some(csum) = packet.meta.csum {
            if !offload::complete_checksum(packet.packet_mut(), csum) {
                Stats::inc(&self.stats().malformed);
                return;
            }
        }
        self.deliver_udp(now, packet.packet());
    }

    fn deliver_udp(&mut self, now: Instant, datagram: &[u8]) {
        match packet::classify(datagram) {
            Ok(Classified::Udp { src, dst, payload }) => {
                self.entries.udp().datagram(now, src, dst, payload);
            }
            Ok(_) => Stats::inc(&self.stats().unsupported),
            Err(_) => Stats::inc(&self.stats().malformed),
        }
    }

    /// The next packet this table wants written to the TUN (released SYNs, RSTs, UDP).
    pub fn poll_transmit(&mut self) -> Option<PacketBuf> {
        self.entries.poll_transmit()
    }
}

/// An IPv4-mapped IPv6 peer (a dual-stack listener) as the IPv4 address it is.
/// The later of two sequence numbers (modulo 2^32).
fn furthest(a: u32, b: u32) -> u32 {
    if packet::seq_lt(a, b) { b } else { a }
}

fn normalize(addr: SocketAddr) -> SocketAddr {
    match addr {
        SocketAddr::V6(v6) => match v6.ip().to_ipv4_mapped() {
            Some(v4) => SocketAddr::new(IpAddr::V4(v4), v6.port()),
            None => addr,
        },
        v4 => v4,
    }
}

/// Rewrites a TCP packet's addresses and ports in place to `src → dst`, updating the IPv4
/// header checksum and the TCP checksum incrementally — a final checksum for a plain
/// packet, the pseudo-header sum for one with a partial checksum (offload), where the
/// ports are left to the final sum. `false` (nothing changed) if the packet is not TCP
/// of that family or is too short.
pub fn rewrite(packet: &mut PacketBuf, src: SocketAddr, dst: SocketAddr) -> bool {
    let partial = packet.meta.csum.is_some();
    let p = packet.packet_mut();
    let Some(layout) = packet::Layout::tcp(p) else { return false };
    if layout.v6 != src.is_ipv6() || layout.v6 != dst.is_ipv6() {
        return false;
    }
    let (l4, (addr_at, addr_len)) = (layout.l4, layout.addresses());
    let mut new_addrs = [0u8; 32];
    match (src.ip(), dst.ip()) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            new_addrs[..4].copy_from_slice(&s.octets());
            new_addrs[4..8].copy_from_slice(&d.octets());
        }
        (IpAddr::V6(s), IpAddr::V6(d)) => {
            new_addrs[..16].copy_from_slice(&s.octets());
            new_addrs[16..].copy_from_slice(&d.octets());
        }
        _ => return false,
    }
    let new_addrs = &new_addrs[..2 * addr_len];
    let mut new_ports = [0u8; 4];
    new_ports[..2].copy_from_slice(&src.port().to_be_bytes());
    new_ports[2..].copy_from_slice(&dst.port().to_be_bytes());

    let mut addrs = Delta::default();
    addrs.replace(&p[addr_at..addr_at + 2 * addr_len], new_addrs);
    let mut all = addrs;
    all.replace(&p[l4..l4 + 4], &new_ports);

    if addr_len == 4 {
        let ip_check = u16::from_be_bytes([p[10], p[11]]);
        p[10..12].copy_from_slice(&addrs.update_final(ip_check).to_be_bytes());
    }
    let tcp_check = u16::from_be_bytes([p[l4 + 16], p[l4 + 17]]);
    let tcp_check = if partial { addrs.update_partial(tcp_check) } else { all.update_final(tcp_check) };
    p[l4 + 16..l4 + 18].copy_from_slice(&tcp_check.to_be_bytes());
    p[addr_at..addr_at + 2 * addr_len].copy_from_slice(new_addrs);
    p[l4..l4 + 4].copy_from_slice(&new_ports);
    true
}

#[cfg(test)]
mod tests {
    use smoltcp::wire::{IpAddress, IpProtocol, Ipv4Packet, Ipv6Packet, TcpControl, checksum};
    use tungate_core::device::offload::PartialChecksum;
    use tungate_testkit::engine::Hold;

    use super::*;

    fn sa(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    /// A TCP segment `src → dst` with `payload`, final checksums; sequence number 1000,
    /// acknowledging 5000 when `ack`.
    fn segment(src: SocketAddr, dst: SocketAddr, control: TcpControl, ack: bool, payload: &[u8]) -> PacketBuf {
        segment_seq(src, dst, control, 1000, ack.then_some(5000), payload)
    }

    fn segment_seq(
        src: SocketAddr,
        dst: SocketAddr,
        control: TcpControl,
        seq: i32,
        ack: Option<i32>,
        payload: &[u8],
    ) -> PacketBuf {
        let fields = packet::SegmentFields {
            window: 1024,
            mss: None,
            ..packet::SegmentFields::new(src, dst, control, seq as u32, ack.map(|a| a as u32)).payload(payload)
        };
        PacketBuf::from_vec(fields.build())
    }

    /// Addresses, ports and both checksums of a TCP packet, verified by full recompute.
    fn check(p: &PacketBuf) -> (SocketAddr, SocketAddr) {
        let Ok(Classified::Tcp(seg)) = packet::classify(p.packet()) else { panic!("not TCP") };
        assert!(packet::tcp_checksum_ok(p.packet(), &seg), "TCP checksum wrong after rewrite");
        (seg.src, seg.dst)
    }

    /// Turns a plain packet into one with a partial checksum, as an offloading kernel
    /// hands it over: the field holds the uncomplemented pseudo-header sum.
    fn make_partial(p: &mut PacketBuf) {
        let bytes = p.packet_mut();
        let (l4, src, dst) = if bytes[0] >> 4 == 4 {
            let ip = Ipv4Packet::new_unchecked(&bytes[..]);
            (20, IpAddress::Ipv4(ip.src_addr()), IpAddress::Ipv4(ip.dst_addr()))
        } else {
            let ip = Ipv6Packet::new_unchecked(&bytes[..]);
            (40, IpAddress::Ipv6(ip.src_addr()), IpAddress::Ipv6(ip.dst_addr()))
        };
        let len = (bytes.len() - l4) as u32;
        let pseudo = checksum::pseudo_header(&src, &dst, IpProtocol::Tcp, len);
        bytes[l4 + 16..l4 + 18].copy_from_slice(&pseudo.to_be_bytes());
        p.meta.csum = Some(PartialChecksum { start: l4 as u16, offset: 16 });
    }

    #[test]
    fn rewrite_keeps_checksums_right_for_plain_and_partial_packets() {
        let payload: Vec<u8> = (0..3000u32).map(|i| (i * 13 % 256) as u8).collect();
        let cases = [
            (sa("198.18.0.1:40000"), sa("10.77.0.2:5201"), sa("198.18.0.2:1024"), sa("198.18.0.1:33000")),
            (sa("[fd18::1]:40000"), sa("[fd77::2]:443"), sa("[fd18::5]:65535"), sa("[fd18::1]:33000")),
        ];
        for (client, dst, nat, listen) in cases {
            for len in [0, 1, 17, 1460, 3000] {
                for partial in [false, true] {
                    let mut p = segment(client, dst, TcpControl::Psh, true, &payload[..len]);
                    if partial {
                        make_partial(&mut p);
                    }
                    assert!(rewrite(&mut p, nat, listen));
                    if partial {
                        // What the kernel (or the device) does last: fold in the bytes.
                        let csum = p.meta.csum.unwrap();
                        assert!(offload::complete_checksum(p.packet_mut(), csum));
                    }
                    assert_eq!(check(&p), (nat, listen), "{client} len {len} partial {partial}");
                    // And back again.
                    let mut back = segment(listen, nat, TcpControl::None, true, &payload[..len]);
                    assert!(rewrite(&mut back, dst, client));
                    assert_eq!(check(&back), (dst, client));
                }
            }
        }
        let mut v4 = segment(cases[0].0, cases[0].1, TcpControl::Syn, false, &[]);
        assert!(!rewrite(&mut v4, cases[1].2, cases[1].3), "no family change");
        let mut short = PacketBuf::from_slice(&v4.packet()[..30]);
        assert!(!rewrite(&mut short, cases[0].2, cases[0].3), "truncated TCP header");
    }

    const LISTEN: &str = "198.18.0.1:33000";

    fn table(ports: RangeInclusive<u16>, fakes: &[&str]) -> (Nat, Hold) {
        let hold = Hold::default();
        let config = NatConfig {
            listen_v4: Some(sa(LISTEN)),
            fake_v4: fakes.iter().map(|f| f.parse().unwrap()).collect(),
            ports,
            ..NatConfig::default()
        };
        (Nat::new(config, hold.dispatch()), hold)
    }

    /// Opens a flow from `client` and accepts it; returns its NAT address, or `None` if
    /// no NAT address was free (the client then got a RST).
    fn open(nat: &mut Nat, hold: &Hold, now: Instant, client: SocketAddr) -> Option<SocketAddr> {
        let dst = sa("10.77.0.2:80");
        let mut syn = segment(client, dst, TcpControl::Syn, false, &[]);
        assert_eq!(nat.handle_packet(now, &mut syn), Handled::Consumed, "the SYN is held");
        let request = hold.take();
        assert_eq!((request.src(), request.dst()), (client, dst));
        tungate_testkit::engine::accept_waiting_for_socket(request);
        nat.service(now);
        let released = nat.poll_transmit().expect("the SYN goes to the kernel after the accept, or a RST");
        let Ok(Classified::Tcp(seg)) = packet::classify(released.packet()) else { panic!("not TCP") };
        if seg.rst {
            // No NAT address free: refused after all.
            assert_eq!(seg.dst, client);
            return None;
        }
        let (from, to) = check(&released);
        assert_eq!(to, sa(LISTEN));
        Some(from)
    }

    fn segment_through(nat: &mut Nat, now: Instant, mut p: PacketBuf) -> (SocketAddr, SocketAddr) {
        assert_eq!(nat.handle_packet(now, &mut p), Handled::Transmit);
        check(&p)
    }

    #[test]
    fn a_flow_is_translated_both_ways_and_leaves_nothing_behind() {
        let t0 = Instant::now();
        let (mut nat, hold) = table(1024..=65535, &["198.18.0.2"]);
        let client = sa("198.18.0.1:40000");
        let dst = sa("10.77.0.2:80");
        let f = open(&mut nat, &hold, t0, client).unwrap();
        assert_eq!(f.ip(), "198.18.0.2".parse::<IpAddr>().unwrap());
        // SYN-ACK from the kernel listener to the NAT address goes back as dst → client.
        let synack = segment(sa(LISTEN), f, TcpControl::Syn, true, &[]);
        assert_eq!(segment_through(&mut nat, t0, synack), (dst, client));
        let (c, d, _port) = nat.take_port(f).expect("the accepted connection maps back");
        assert_eq!((c, d), (client, dst));
        assert!(nat.take_port(f).is_none(), "handed out once");
        // Data, then FIN from the client and FIN from the kernel.
        let data = segment(client, dst, TcpControl::Psh, true, b"hello");
        assert_eq!(segment_through(&mut nat, t0, data), (f, sa(LISTEN)));
        let fin = segment(client, dst, TcpControl::Fin, true, &[]);
        assert_eq!(segment_through(&mut nat, t0, fin), (f, sa(LISTEN)));
        // The kernel's FIN acknowledges the client's (seq 1000 + FIN = 1001).
        let fin = segment_seq(sa(LISTEN), f, TcpControl::Fin, 5000, Some(1001), &[]);
        assert_eq!(segment_through(&mut nat, t0, fin), (dst, client));
        // The last ACK still passes during the linger; then the entry is gone.
        let t1 = t0 + Duration::from_millis(500);
        let ack = segment(client, dst, TcpControl::None, true, &[]);
        assert_eq!(segment_through(&mut nat, t1, ack), (f, sa(LISTEN)));
        nat.sweep(t1);
        assert_eq!(nat.len(), 1);
        nat.sweep(t0 + Duration::from_secs(3));
        assert_eq!(nat.len(), 0);
        assert_eq!(nat.stats().snapshot().tcp_active, 0);
        // Later segments for it: RST to the client, and kernel ones are dropped.
        let stray = segment(client, dst, TcpControl::None, true, &[]);
        let mut stray2 = stray.clone();
        assert_eq!(nat.handle_packet(t1, &mut stray2), Handled::Consumed);
        let rst = nat.poll_transmit().expect("RST for an unknown flow");
        let Ok(Classified::Tcp(seg)) = packet::classify(rst.packet()) else { panic!() };
        assert!(seg.rst && (seg.src, seg.dst) == (dst, client));
        let mut late = segment(sa(LISTEN), f, TcpControl::None, true, &[]);
        assert_eq!(nat.handle_packet(t1, &mut late), Handled::Consumed);
        assert!(nat.poll_transmit().is_none(), "nothing is sent for the kernel's late segments");
    }

    #[test]
    fn a_refused_flow_gets_rst_and_no_entry() {
        let t0 = Instant::now();
        let (mut nat, hold) = table(1024..=65535, &["198.18.0.2"]);
        let client = sa("198.18.0.1:40001");
        let mut syn = segment(client, sa("10.77.0.2:9"), TcpControl::Syn, false, &[]);
        nat.handle_packet(t0, &mut syn);
        // A retransmitted SYN while the handler decides is dropped.
        nat.handle_packet(t0, &mut syn.clone());
        assert_eq!(nat.stats().snapshot().tcp_syn_duplicate, 1);
        hold.take().reject();
        nat.service(t0);
        let rst = nat.poll_transmit().expect("RST");
        let Ok(Classified::Tcp(seg)) = packet::classify(rst.packet()) else { panic!() };
        assert!(seg.rst && seg.ack && seg.dst == client);
        assert!(nat.is_empty());
        // A flow to the listener's own address or a fake one would loop: refused.
        let mut to_fake = segment(client, sa("198.18.0.2:80"), TcpControl::Syn, false, &[]);
        nat.handle_packet(t0, &mut to_fake);
        assert!(hold.is_empty() && nat.is_empty());
    }

    #[test]
    fn nat_addresses_rest_after_the_kernels_time_wait_and_spread_over_fakes() {
        let t0 = Instant::now();
        // Two ports on each of two fake addresses: four NAT addresses in all.
        let (mut nat, hold) = table(2000..=2001, &["198.18.0.2", "198.18.0.3"]);
        let dst = sa("10.77.0.2:80");
        let mut used = Vec::new();
        for i in 0..4u16 {
            let client = SocketAddr::new("198.18.0.1".parse().unwrap(), 50000 + i);
            let f = open(&mut nat, &hold, t0, client).expect("a free NAT address");
            used.push(f);
            // The kernel's socket closes first (the server ended): TIME-WAIT on its side.
            let fin = segment(sa(LISTEN), f, TcpControl::Fin, true, &[]);
            segment_through(&mut nat, t0, fin);
            let fin = segment(client, dst, TcpControl::Fin, true, &[]);
            segment_through(&mut nat, t0, fin);
        }
        used.sort();
        assert_eq!(used, [sa("198.18.0.2:2000"), sa("198.18.0.2:2001"), sa("198.18.0.3:2000"), sa("198.18.0.3:2001")]);
        nat.sweep(t0 + Duration::from_secs(3));
        assert!(nat.is_empty(), "entries end after the linger");
        // All four rest for the kernel's TIME-WAIT: a fifth flow is refused, not mapped
        // onto an address whose kernel socket may still be in TIME-WAIT.
        let later = t0 + Duration::from_secs(30);
        assert_eq!(open(&mut nat, &hold, later, sa("198.18.0.1:50010")), None);
        assert_eq!(nat.stats().snapshot().tcp_rejected, 1);
        let after = t0 + Duration::from_secs(66);
        nat.sweep(after);
        assert!(open(&mut nat, &hold, after, sa("198.18.0.1:50011")).is_some(), "free again after TIME-WAIT");
    }

    #[test]
    fn client_first_closes_rest_only_for_the_linger() {
        let t0 = Instant::now();
        let (mut nat, hold) = table(3000..=3000, &["198.18.0.2"]);
        let client = sa("198.18.0.1:50000");
        let dst = sa("10.77.0.2:80");
        let f = open(&mut nat, &hold, t0, client).unwrap();
        segment_through(&mut nat, t0, segment(client, dst, TcpControl::Fin, true, &[]));
        segment_through(&mut nat, t0, segment_seq(sa(LISTEN), f, TcpControl::Fin, 5000, Some(1001), &[]));
        nat.sweep(t0 + Duration::from_secs(3));
        // The kernel's side closed passively (no TIME-WAIT there): reusable after the linger.
        let t1 = t0 + Duration::from_secs(5);
        assert_eq!(open(&mut nat, &hold, t1, sa("198.18.0.1:50001")), Some(f));
    }

    #[test]
    fn crossed_fins_and_resets_keep_the_address_resting() {
        let t0 = Instant::now();
        let (mut nat, hold) = table(3000..=3000, &["198.18.0.2"]);
        let dst = sa("10.77.0.2:80");
        // FINs cross: the kernel's FIN does not acknowledge the client's, so its socket
        // goes through CLOSING into TIME-WAIT.
        let f = open(&mut nat, &hold, t0, sa("198.18.0.1:50000")).unwrap();
        segment_through(&mut nat, t0, segment(sa("198.18.0.1:50000"), dst, TcpControl::Fin, true, &[]));
        segment_through(&mut nat, t0, segment_seq(sa(LISTEN), f, TcpControl::Fin, 5000, Some(1000), &[]));
        nat.sweep(t0 + Duration::from_secs(3));
        assert!(nat.is_empty());
        assert_eq!(open(&mut nat, &hold, t0 + Duration::from_secs(10), sa("198.18.0.1:50001")), None);
        let t1 = t0 + Duration::from_secs(66);
        nat.sweep(t1);
        // A reset flow: its address rests too.
        open(&mut nat, &hold, t1, sa("198.18.0.1:50002")).unwrap();
        segment_through(&mut nat, t1, segment(sa("198.18.0.1:50002"), dst, TcpControl::Rst, true, &[]));
        nat.sweep(t1 + Duration::from_secs(3));
        assert!(nat.is_empty());
        assert_eq!(open(&mut nat, &hold, t1 + Duration::from_secs(10), sa("198.18.0.1:50003")), None);
    }

    #[test]
    fn kernel_segments_for_a_held_syn_are_dropped() {
        let t0 = Instant::now();
        let (mut nat, hold) = table(4000..=4000, &["198.18.0.2"]);
        let mut syn = segment(sa("198.18.0.1:50000"), sa("10.77.0.2:80"), TcpControl::Syn, false, &[]);
        nat.handle_packet(t0, &mut syn);
        assert_eq!(hold.len(), 1, "pending");
        let mut stale = segment(sa(LISTEN), sa("198.18.0.2:4000"), TcpControl::Fin, true, &[]);
        assert_eq!(nat.handle_packet(t0, &mut stale), Handled::Consumed);
        assert_eq!(nat.stats().snapshot().tcp_unknown_flow, 1);
    }

    #[test]
    fn malformed_and_mutated_packets_never_panic() {
        use rand::{Rng, SeedableRng};
        let t0 = Instant::now();
        let (mut nat, hold) = table(1024..=65535, &["198.18.0.2"]);
        let f = open(&mut nat, &hold, t0, sa("198.18.0.1:40000")).unwrap();
        let seeds = [
            segment(sa("198.18.0.1:40000"), sa("10.77.0.2:80"), TcpControl::Psh, true, b"data"),
            segment(sa(LISTEN), f, TcpControl::None, true, b"reply"),
            segment(sa("[fd18::1]:1"), sa("[fd77::2]:2"), TcpControl::Syn, false, &[]),
        ];
        let mut rng = rand::rngs::StdRng::seed_from_u64(5);
        for i in 0..30_000 {
            let mut p = seeds[i % seeds.len()].clone();
            let bytes = p.packet_mut();
            for _ in 0..rng.gen_range(1..4) {
                let at = rng.gen_range(0..bytes.len());
                bytes[at] = rng.r#gen();
            }
            let cut = rng.gen_range(0..=p.len());
            let mut p = PacketBuf::from_slice(&p.packet()[..cut]);
            if rng.gen_bool(0.3) {
                p.meta.csum = Some(PartialChecksum { start: rng.r#gen(), offset: rng.r#gen() });
            }
            // The NAT rewrites in place: the check looks at the packet as it came in.
            let original = p.packet().to_vec();
            let before = nat.stats().snapshot();
            nat.handle_packet(t0, &mut p);
            tungate_testkit::mutation::assert_counted_once(&before, &nat.stats().snapshot(), &original);
            while nat.poll_transmit().is_some() {}
        }
        assert!(nat.stats().snapshot().malformed > 0, "some mutations were malformed");
    }
}
