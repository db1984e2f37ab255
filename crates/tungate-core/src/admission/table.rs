//! The held-SYN flow table: see the [module docs](super).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::num::NonZeroUsize;
use std::sync::Arc;
use std::time::Instant;

use slab::Slab;

use crate::api::RingBudget;
use crate::api::recency::Recency;
use crate::config::Mtu;
use crate::device::PacketBuf;
use crate::flow::{self, Decision, FlowHandle, FlowId, FlowLink, UdpSessions, WakeQueue};
use crate::outbound::Outbound;
use crate::packet::{self, Classified, Stranger, TcpSummary};
use crate::stats::Stats;
use crate::{Dispatch, TcpHandler};

/// A flow's 4-tuple as the client sees it: (client, original destination).
pub type FlowKey = (SocketAddr, SocketAddr);

/// A flow waiting for its handler, as [`FlowTable::decide`] hands it over once accepted:
/// the link the stack keeps for the flow, and the client's SYN to give the stack.
#[derive(Debug)]
pub struct Held {
    pub link: FlowLink,
    pub syn: PacketBuf,
    pub summary: TcpSummary,
}

#[derive(Debug)]
enum Stage<T> {
    Held(Held),
    /// Accepted; the backend is giving the SYN to its stack ([`FlowTable::admit`] next).
    Admitting,
    Admitted(T),
}

#[derive(Debug)]
struct Slot<T> {
    key: FlowKey,
    stage: Stage<T>,
    /// Reaches the flow whoever holds its link (to evict it).
    handle: FlowHandle,
    /// Evicted, waiting for the backend to reset and remove it.
    evicting: bool,
}

/// How the table saw a client TCP segment ([`FlowTable::segment`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Seen {
    /// It belongs to an admitted flow: the backend's stack takes it.
    Admitted(FlowId),
    /// Handled here: a SYN now held (the handler has the request), a retransmitted SYN
    /// (dropped, counted), a client RST withdrawing a held request, a malformed stranger.
    Consumed,
    /// For no flow, not a SYN and not a RST (counted as `tcp_unknown_flow`): answer it with
    /// [`FlowTable::reset`], or give it to a stack that may still hold the connection.
    Unknown,
    /// A RST for no flow: nothing answers it (a stack that may still hold the connection
    /// may take it).
    UnknownRst,
}

/// Whether a SYN for no flow may open one ([`FlowTable::segment`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Opening {
    Allowed,
    /// A destination the backend must not serve (the system stack's own addresses: the
    /// flow would loop through the TUN): the SYN is counted as malformed.
    Refused,
}

/// How a flow ends for its handler ([`FlowTable::remove`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Close {
    /// Both directions ended, or the handler is not told anything it does not know.
    Clean,
    /// Given up, refused or aborted: the handler sees a reset.
    Reset,
}

/// What [`FlowTable::decide`] found for a woken flow.
#[derive(Debug)]
pub enum Decided {
    /// Held, the handler has not decided yet.
    Waiting,
    /// Accepted just now: give `syn` to the stack, then [`FlowTable::admit`] the flow (or
    /// [`FlowTable::remove`] it, with a RST, if the stack cannot take it).
    Accepted(Held),
    /// Rejected just now: answered with RST, counted, removed.
    Rejected,
    /// Admitted earlier: the backend services it.
    Admitted,
    /// No such flow (anymore).
    Gone,
}

/// What [`FlowTable::inbound`] made of a packet from the TUN.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Inbound {
    /// A TCP segment, as [`FlowTable::segment`] saw it.
    Tcp(TcpSummary, Seen),
    /// Handled here: UDP (to its session), malformed or unsupported (counted).
    Done,
}

/// Call after removing from a per-flow map: once at most a quarter of a map that a burst
/// grew past 1 024 entries is in use, rehashes it into what it needs (so the next shrink
/// waits for another fall to a quarter: amortised O(1) per removal). Returns whether it
/// shrank. A map keeps its largest capacity otherwise, and 8 000 flows' worth of
/// 4-tuples is a MiB or more that an idle gateway never gives back.
pub fn give_back_growth<K: Eq + std::hash::Hash, V, S: std::hash::BuildHasher>(map: &mut HashMap<K, V, S>) -> bool {
    if map.capacity() > 1024 && map.len() * 4 < map.capacity() {
        map.shrink_to_fit();
        return true;
    }
    false
}

/// Flows by 4-tuple, each held until its handler decides and then admitted to the
/// backend's stack with the backend's own state `T`. Owns what the layer writes to the
/// TUN itself (RSTs, released SYNs a backend queues, UDP replies) and the UDP sessions.
pub struct FlowTable<T> {
    slots: Slab<Slot<T>>,
    /// The least recently active flow first (a client segment makes its flow the most
    /// recent), for the session limit.
    by_key: Recency<FlowKey, FlowId>,
    /// At most this many flows at once (`--max-sessions`); `evicting` are on their way out.
    max_flows: Option<NonZeroUsize>,
    evicting: usize,
    /// Shutting down: no new flow opens ([`drain`](Self::drain)).
    draining: bool,
    handler: Arc<dyn TcpHandler>,
    stats: Arc<Stats>,
    rings: RingBudget,
    wake: Arc<WakeQueue>,
    offer_socket: bool,
    outbound: Outbound,
    udp: UdpSessions,
}

impl<T> std::fmt::Debug for FlowTable<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FlowTable").field("flows", &self.slots.len()).finish_non_exhaustive()
    }
}

/// What the driver needs of an engine's flows when it shuts down ([`Engine::flows`]).
///
/// [`Engine::flows`]: crate::engine::Engine::flows
pub trait Flows {
    /// See [`FlowTable::drain`].
    fn drain(&mut self);
    /// TCP flows known (held, admitted, or closing in the stack).
    fn open(&self) -> usize;
    /// See [`FlowTable::evict_all`].
    fn evict_all(&mut self);
}

impl<T> Flows for FlowTable<T> {
    fn drain(&mut self) {
        FlowTable::drain(self);
    }
    fn open(&self) -> usize {
        self.len()
    }
    fn evict_all(&mut self) {
        FlowTable::evict_all(self);
    }
}

impl<T> FlowTable<T> {
    /// `ring_capacity`: each direction's ring between the stack and the handler.
    pub fn new(handlers: &Dispatch, mtu: Mtu, ring_capacity: usize) -> Self {
        let wake = WakeQueue::new();
        let outbound = Outbound::new(mtu, wake.clone(), handlers.stats.clone());
        let udp = UdpSessions::new(handlers.udp.clone(), outbound.udp_sender(), handlers.stats.clone())
            .with_max_sessions(handlers.max_sessions);
        FlowTable {
            slots: Slab::new(),
            by_key: Recency::default(),
            max_flows: handlers.max_sessions,
            evicting: 0,
            draining: false,
            handler: handlers.tcp.clone(),
            stats: handlers.stats.clone(),
            rings: handlers.ring_budget(ring_capacity),
            wake,
            offer_socket: false,
            outbound,
            udp,
        }
    }

    /// For a stack that terminates each flow in a kernel socket it can hand over whole
    /// (the system stack): handlers then get that socket.
    pub fn offering_sockets(mut self) -> Self {
        self.offer_socket = true;
        self
    }

    /// Notified when a handler decided or touched a flow, or a UDP reply is queued.
    pub fn wake_queue(&self) -> Arc<WakeQueue> {
        self.wake.clone()
    }

    pub fn stats(&self) -> &Arc<Stats> {
        &self.stats
    }

    /// Flows known (held or admitted).
    pub fn len(&self) -> usize {
        self.slots.len()
    }

    pub fn is_empty(&self) -> bool {
        self.slots.is_empty()
    }

    /// The UDP sessions, for a backend that classifies its UDP itself.
    pub fn udp(&mut self) -> &mut UdpSessions {
        &mut self.udp
    }

    /// Looks at one packet from the TUN: drops what is malformed or
    /// unsupported, hands UDP to its session and TCP to [`segment`](Self::segment) (with
    /// its checksum verified).
    pub fn inbound(&mut self, now: Instant, packet: &PacketBuf) -> Inbound {
        match packet::classify(packet.packet()) {
            Err(_) => Stats::inc(&self.stats.malformed),
            Ok(Classified::Unsupported) => Stats::inc(&self.stats.unsupported),
            Ok(Classified::Udp { src, dst, payload }) => self.udp.datagram(now, src, dst, payload),
            Ok(Classified::Tcp(seg)) => return Inbound::Tcp(seg, self.segment(packet, &seg, Opening::Allowed)),
        }
        Inbound::Done
    }

    /// Looks at a TCP segment from a client. A SYN for no flow opens a held flow and
    /// hands its request to the handler, if `opening` allows it. The checksum of a segment
    /// for no flow is verified unless it is still partial ([`packet::stranger`]).
    pub fn segment(&mut self, packet: &PacketBuf, seg: &TcpSummary, opening: Opening) -> Seen {
        let key = (seg.src, seg.dst);
        if let Some(&id) = self.by_key.touch(&key) {
            return match self.slots[id.0].stage {
                Stage::Held(_) => {
                    if seg.is_bare_syn() {
                        Stats::inc(&self.stats.tcp_syn_duplicate);
                    } else if seg.rst {
                        // The client gave up before the handler decided.
                        self.remove(id, Close::Reset);
                    }
                    Seen::Consumed
                }
                Stage::Admitting | Stage::Admitted(_) => Seen::Admitted(id),
            };
        }
        match packet::stranger(packet, seg) {
            Stranger::Open if opening == Opening::Allowed => {
                self.open(packet, seg);
                Seen::Consumed
            }
            Stranger::Reset => {
                Stats::inc(&self.stats.tcp_unknown_flow);
                Seen::Unknown
            }
            Stranger::Ignore => Seen::UnknownRst,
            Stranger::Open | Stranger::Malformed => {
                Stats::inc(&self.stats.malformed);
                Seen::Consumed
            }
        }
    }

    fn open(&mut self, packet: &PacketBuf, seg: &TcpSummary) {
        if self.draining {
            // Shutting down: refused, as a closed port would be.
            Stats::inc(&self.stats.tcp_rejected);
            self.outbound.send_rst(seg);
            return;
        }
        if let Some(max) = self.max_flows {
            if self.slots.len() - self.evicting >= max.get() {
                self.evict_oldest();
            }
        }
        let entry = self.slots.vacant_entry();
        let id = FlowId(entry.key());
        let (link, request) = flow::new_flow(id, seg.src, seg.dst, &self.rings, self.wake.clone());
        if self.offer_socket {
            link.offer_socket();
        }
        let mut syn = PacketBuf::from_slice(packet.packet());
        syn.meta = packet.meta;
        let key = (seg.src, seg.dst);
        let handle = link.handle();
        entry.insert(Slot { key, stage: Stage::Held(Held { link, syn, summary: *seg }), handle, evicting: false });
        self.by_key.insert(key, id);
        Stats::inc(&self.stats.tcp_requests);
        Stats::inc(&self.stats.tcp_active);
        tracing::debug!(src = %seg.src, dst = %seg.dst, "tcp request");
        self.handler.handle_tcp(request);
    }

    /// Makes room for a new flow under the session limit: the least recently active flow
    /// not already on its way out is evicted.
    fn evict_oldest(&mut self) {
        let slots = &self.slots;
        let Some(id) = self.by_key.oldest_first().map(|(_, &id)| id).find(|id| !slots[id.0].evicting) else {
            return;
        };
        Stats::inc(&self.stats.tcp_evicted);
        let slot = &self.slots[id.0];
        tracing::debug!(src = %slot.key.0, dst = %slot.key.1, "tcp flow evicted (--max-sessions)");
        self.evict(id);
    }

    /// Shutting down: from now on a new connection's SYN is answered with RST (counted in
    /// `tcp_rejected`); the flows there are go on.
    pub fn drain(&mut self) {
        self.draining = true;
    }

    /// Resets every flow not already on its way out, both ways (see
    /// `evict`): the end of a drain that ran out of time. A flow cut
    /// mid-stream must end in a reset, never a FIN, which would tell its client the data
    /// was complete.
    pub fn evict_all(&mut self) {
        let ids: Vec<FlowId> = self.slots.iter().filter(|(_, slot)| !slot.evicting).map(|(i, _)| FlowId(i)).collect();
        for id in ids {
            Stats::inc(&self.stats.tcp_drain_resets);
            self.evict(id);
        }
    }

    /// Resets flow `id`: one still held gets its RST here and goes; an admitted one is
    /// evicted through its handle (the handler sees a reset, and the backend, woken for
    /// it as for a handler's abort, resets the client and removes it).
    fn evict(&mut self, id: FlowId) {
        let Some(slot) = self.slots.get_mut(id.0) else { return };
        if let Stage::Held(held) = &slot.stage {
            let summary = held.summary;
            self.outbound.send_rst(&summary);
            self.remove(id, Close::Reset);
        } else {
            slot.evicting = true;
            self.evicting += 1;
            slot.handle.evict();
        }
    }

    /// Whether the flow was evicted under the session limit: for a backend
    /// whose handler holds the kernel socket, which must reset both ends itself.
    pub fn is_evicted(&self, id: FlowId) -> bool {
        self.slots.get(id.0).is_some_and(|s| s.evicting)
    }

    /// Acts on a woken flow's decision (see [`Decided`]).
    pub fn decide(&mut self, id: FlowId) -> Decided {
        let Some(slot) = self.slots.get_mut(id.0) else { return Decided::Gone };
        let Stage::Held(held) = &slot.stage else { return Decided::Admitted };
        held.link.clear_queued();
        match held.link.decision() {
            Decision::Pending => Decided::Waiting,
            Decision::Accepted => match std::mem::replace(&mut slot.stage, Stage::Admitting) {
                Stage::Held(held) => Decided::Accepted(held),
                _ => unreachable!("matched Held above"),
            },
            Decision::Rejected => {
                let summary = held.summary;
                Stats::inc(&self.stats.tcp_rejected);
                self.outbound.send_rst(&summary);
                self.remove(id, Close::Reset);
                Decided::Rejected
            }
        }
    }

    /// Records an accepted flow's state once its SYN went to the stack.
    pub fn admit(&mut self, id: FlowId, state: T) {
        if let Some(slot) = self.slots.get_mut(id.0) {
            slot.stage = Stage::Admitted(state);
        }
    }

    /// An admitted flow's state.
    pub fn get(&self, id: FlowId) -> Option<&T> {
        match &self.slots.get(id.0)?.stage {
            Stage::Admitted(t) => Some(t),
            _ => None,
        }
    }

    pub fn get_mut(&mut self, id: FlowId) -> Option<&mut T> {
        match &mut self.slots.get_mut(id.0)?.stage {
            Stage::Admitted(t) => Some(t),
            _ => None,
        }
    }

    /// Whether `id` is a flow still waiting for its handler.
    pub fn is_held(&self, id: FlowId) -> bool {
        self.slots.get(id.0).is_some_and(|s| matches!(s.stage, Stage::Held(_)))
    }

    pub fn key(&self, id: FlowId) -> Option<FlowKey> {
        Some(self.slots.get(id.0)?.key)
    }

    pub fn id(&self, key: &FlowKey) -> Option<FlowId> {
        self.by_key.peek(key).copied()
    }

    /// Every admitted flow.
    pub fn iter(&self) -> impl Iterator<Item = (FlowId, &T)> {
        self.slots.iter().filter_map(|(i, s)| match &s.stage {
            Stage::Admitted(t) => Some((FlowId(i), t)),
            _ => None,
        })
    }

    /// Forgets a flow and returns its state if it was admitted. A held flow's handler
    /// sees the end, as `close` says.
    pub fn remove(&mut self, id: FlowId, close: Close) -> Option<T> {
        if !self.slots.contains(id.0) {
            return None;
        }
        let slot = self.slots.remove(id.0);
        self.by_key.remove(&slot.key);
        if slot.evicting {
            self.evicting -= 1;
        }
        Stats::dec(&self.stats.tcp_active);
        // After a burst, give back what the table grew to (the index does so itself). The
        // slab can only drop a vacant tail (flow ids must not move), which a burst's last
        // flows may still hold: it is shrunk once at most a quarter is in use, and when it
        // empties.
        if self.slots.capacity() > 1024 && self.slots.len() * 4 < self.slots.capacity() {
            self.slots.shrink_to_fit();
        }
        if self.slots.is_empty() && self.slots.capacity() > 1024 {
            self.slots.shrink_to_fit();
        }
        match slot.stage {
            Stage::Held(held) => {
                held.link.set_closed(close == Close::Reset);
                None
            }
            Stage::Admitting => None,
            Stage::Admitted(t) => Some(t),
        }
    }

    /// Answers a client segment with RST (RFC 9293 §3.10.7.1).
    pub fn reset(&mut self, seg: &TcpSummary) {
        self.outbound.send_rst(seg);
    }

    /// Queues a packet the backend made for the TUN (e.g. a released SYN, rewritten).
    pub fn push(&mut self, packet: PacketBuf) {
        self.outbound.push(packet);
    }

    /// The next packet this layer wants written to the TUN: queued ones, then UDP replies.
    pub fn poll_transmit(&mut self) -> Option<PacketBuf> {
        self.outbound.poll_transmit()
    }
}

#[cfg(test)]
mod tests {
    //! The held-SYN contract, once for every backend (the engines' tests check only that
    //! they wire it up).

    use std::sync::Mutex;

    use smoltcp::wire::TcpControl;

    use super::*;
    use crate::packet::SegmentFields;
    use crate::{TcpRequest, UdpHandler, UdpSession};

    /// Keeps every request undecided.
    #[derive(Default)]
    struct Undecided(Mutex<Vec<TcpRequest>>);

    impl TcpHandler for Undecided {
        fn handle_tcp(&self, request: TcpRequest) {
            self.0.lock().expect("lock").push(request);
        }
    }

    impl UdpHandler for Undecided {
        fn handle_udp(&self, _: UdpSession) {}
    }

    const CLIENT: &str = "198.18.0.2:40000";

    fn table() -> (FlowTable<&'static str>, Arc<Undecided>) {
        let requests = Arc::new(Undecided::default());
        let dispatch = crate::Dispatch::new(requests.clone(), requests.clone());
        (FlowTable::new(&dispatch, Mtu::DEFAULT, 1024), requests)
    }

    fn segment(control: TcpControl, seq: u32, ack: Option<u32>) -> (PacketBuf, TcpSummary) {
        let (src, dst) = (CLIENT.parse().expect("addr"), "10.77.0.2:80".parse().expect("addr"));
        let packet = PacketBuf::from_vec(SegmentFields::new(src, dst, control, seq, ack).build());
        let Ok(Classified::Tcp(seg)) = packet::classify(packet.packet()) else { panic!("a TCP segment") };
        (packet, seg)
    }

    fn sent(t: &mut FlowTable<&'static str>) -> Vec<TcpSummary> {
        std::iter::from_fn(|| t.poll_transmit())
            .filter_map(|p| match packet::classify(p.packet()) {
                Ok(Classified::Tcp(seg)) => Some(seg),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn the_table_gives_back_what_a_burst_grew() {
        let (mut t, _requests) = table();
        let dst = "10.77.0.2:80".parse().expect("addr");
        let ids: Vec<FlowId> = (0..4000u16)
            .map(|port| {
                let src = std::net::SocketAddr::new("10.0.0.1".parse().expect("addr"), 10_000 + port);
                let syn = PacketBuf::from_vec(SegmentFields::new(src, dst, TcpControl::Syn, 1, None).build());
                t.inbound(Instant::now(), &syn);
                t.id(&(src, dst)).expect("held")
            })
            .collect();
        let grown = (t.by_key.sized_for(), t.slots.capacity());
        assert!(grown.0 >= 4000 && grown.1 >= 4000, "{grown:?}");
        for id in ids {
            t.remove(id, Close::Reset);
        }
        assert!(
            t.by_key.sized_for() <= 1024 && t.slots.capacity() <= 1024,
            "kept {:?} of {grown:?}",
            (t.by_key.sized_for(), t.slots.capacity())
        );
    }

    #[test]
    fn a_syn_is_held_until_accepted_and_retransmissions_are_dropped() {
        let (mut t, requests) = table();
        let (syn, seg) = segment(TcpControl::Syn, 1000, None);
        assert_eq!(t.inbound(Instant::now(), &syn), Inbound::Tcp(seg, Seen::Consumed));
        assert_eq!(t.inbound(Instant::now(), &syn), Inbound::Tcp(seg, Seen::Consumed), "a retransmission");
        let request = requests.0.lock().expect("lock").pop().expect("one request");
        assert_eq!(requests.0.lock().expect("lock").len(), 0, "one request for two SYNs");
        let id = t.id(&(seg.src, seg.dst)).expect("held");
        assert!(matches!(t.decide(id), Decided::Waiting));
        drop(crate::api::tcp::now_or_never(request.accept()));
        let Decided::Accepted(held) = t.decide(id) else { panic!("accepted") };
        assert_eq!(held.syn.packet(), syn.packet(), "the SYN as the client sent it");
        t.admit(id, "state");
        assert_eq!(t.get(id), Some(&"state"));
        let (ack, ack_seg) = segment(TcpControl::None, 1001, Some(5000));
        assert_eq!(t.inbound(Instant::now(), &ack), Inbound::Tcp(ack_seg, Seen::Admitted(id)));
        assert!(sent(&mut t).is_empty(), "nothing answered from here");
        let stats = t.stats().snapshot();
        assert_eq!((stats.tcp_requests, stats.tcp_syn_duplicate, stats.tcp_active), (1, 1, 1));
        assert_eq!(t.remove(id, Close::Clean), Some("state"));
        assert_eq!(t.stats().snapshot().tcp_active, 0);
    }

    #[test]
    fn a_rejected_or_dropped_request_is_answered_with_rst_and_forgotten() {
        for drop_it in [false, true] {
            let (mut t, requests) = table();
            let (syn, seg) = segment(TcpControl::Syn, 7, None);
            t.inbound(Instant::now(), &syn);
            let request = requests.0.lock().expect("lock").pop().expect("a request");
            if drop_it {
                drop(request)
            } else {
                request.reject()
            }
            let id = t.id(&(seg.src, seg.dst)).expect("held");
            assert!(matches!(t.decide(id), Decided::Rejected));
            let rst = sent(&mut t);
            assert_eq!(rst.len(), 1);
            assert!(rst[0].rst && rst[0].ack && rst[0].ack_number == 8 && rst[0].dst == seg.src, "{rst:?}");
            assert!(t.is_empty() && t.id(&(seg.src, seg.dst)).is_none());
            let stats = t.stats().snapshot();
            assert_eq!((stats.tcp_rejected, stats.tcp_active), (1, 0));
        }
    }

    #[test]
    fn a_client_rst_withdraws_a_held_request() {
        let (mut t, requests) = table();
        let (syn, seg) = segment(TcpControl::Syn, 7, None);
        t.inbound(Instant::now(), &syn);
        let (rst, _) = segment(TcpControl::Rst, 8, None);
        t.inbound(Instant::now(), &rst);
        assert!(t.is_empty() && t.id(&(seg.src, seg.dst)).is_none());
        assert_eq!(t.stats().snapshot().tcp_active, 0);
        // The handler's request now reads as reset.
        let request = requests.0.lock().expect("lock").pop().expect("a request");
        let mut conn = crate::api::tcp::now_or_never(request.accept()).expect("a ring");
        let read = crate::api::tcp::now_or_never(tokio::io::AsyncReadExt::read(&mut conn, &mut [0u8; 4]));
        assert_eq!(read.expect("ready").expect_err("reset").kind(), std::io::ErrorKind::ConnectionReset);
    }

    #[test]
    fn strangers_are_counted_and_left_to_the_backend_and_bad_checksums_are_malformed() {
        let (mut t, _requests) = table();
        let (data, seg) = segment(TcpControl::Psh, 7, Some(9));
        assert_eq!(t.inbound(Instant::now(), &data), Inbound::Tcp(seg, Seen::Unknown));
        let (rst, rst_seg) = segment(TcpControl::Rst, 7, None);
        assert_eq!(t.inbound(Instant::now(), &rst), Inbound::Tcp(rst_seg, Seen::UnknownRst));
        t.reset(&seg);
        let out = sent(&mut t);
        assert!(out.len() == 1 && out[0].rst && out[0].seq == 9, "RST at the segment's ACK: {out:?}");
        let (mut syn, syn_seg) = segment(TcpControl::Syn, 1, None);
        let last = syn.len() - 1;
        syn.packet_mut()[last] ^= 0xff;
        assert_eq!(t.segment(&syn, &syn_seg, Opening::Allowed), Seen::Consumed, "a SYN with a bad checksum");
        let stats = t.stats().snapshot();
        assert_eq!((stats.tcp_unknown_flow, stats.malformed, stats.tcp_requests), (1, 1, 0));
        // A flow the backend may not open (a destination of its own) is malformed too.
        let (syn, syn_seg) = segment(TcpControl::Syn, 1, None);
        assert_eq!(t.segment(&syn, &syn_seg, Opening::Refused), Seen::Consumed);
        assert_eq!((t.stats().snapshot().malformed, t.len()), (2, 0));
    }
}
