//! Admission in front of stream stacks: for stacks that terminate TCP themselves and hand
//! out accepted connections as byte streams (ipstack, netstack-smoltcp).
//!
//! Such stacks answer a SYN at once, so they cannot let the handler refuse a connection,
//! and their UDP paths are weaker than tungate's own. [`Admission`] sits between the TUN
//! and the stack and gives every backend the same contract:
//!
//! * A bare SYN for a new 4-tuple is **held**: the handler gets a [`TcpRequest`]; on accept
//!   the SYN is released to the stack, on reject the client gets RST from here. The
//!   stack's accepted stream is then matched by 4-tuple to the flow's [`FlowPort`], and
//!   [`bridge`] carries the bytes.
//! * Other segments go to the stack only for 4-tuples it was given; anything else gets
//!   RST from here (counted as `tcp_unknown_flow`).
//! * UDP never reaches the stack: it goes to the [`UdpHandler`] as sessions whose
//!   replies can come from any address, as in every backend.
//!
//! The held-SYN part is the [`FlowTable`] every backend shares; this layer adds what
//! streams need (matching a stream to its flow, caps, work-arounds, resets on abort).
//! I/O-free: the backend's task feeds packets in and writes what comes out.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncWrite};

use super::table::{Decided, FlowKey, FlowTable, Inbound, Seen};
use crate::Dispatch;
#[cfg(doc)]
use crate::UdpHandler;
use crate::config::Mtu;
use crate::device::PacketBuf;
use crate::flow::{FlowPort, FlowProgress, WakeQueue};
use crate::packet::{self, Classified, TcpSummary, seq_lt};

/// What to do with a packet [`Admission::handle_packet`] looked at.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Give it to the stack.
    Forward,
    /// Handled here (UDP, held SYN, RST queued) or dropped (malformed, unsupported).
    Consumed,
}

/// An admitted flow.
enum Entry {
    /// The SYN went to the stack; its stream has not arrived yet.
    Released { port: FlowPort, deadline: Instant, cap: Cap },
    /// The stream was handed to a bridge.
    Bridged { cap: Cap },
}

/// Work-arounds for a stack's known defects, each off by default.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct Workarounds {
    /// Give the stack a client segment that carries data and FIN as two: the data (FIN
    /// cleared), then a bare FIN. For a stack that drops the payload of a FIN segment
    /// (ipstack: the client's last bytes were lost whenever its FIN rode on them).
    pub split_fin: bool,
    /// Give the stack a flow's last pure ACK again when the client has sent nothing for
    /// [`REPLAY_FIRST`], then after twice as long each time, up to [`REPLAY_LAST`]. For a
    /// stack that checks its retransmission timers only when a packet for the flow
    /// arrives (ipstack): a segment the client never got (trimmed at its window edge)
    /// would otherwise never be resent, and a download stalled for good.
    pub replay_ack: bool,
    /// Trim client data at the furthest right edge of the window the stack advertised, less
    /// one unit of its window scale; data past it is cut off (FIN with it), as a
    /// receiver may do (RFC 9293 §3.10.7.4), and the client sends it again. For smoltcp
    /// 0.12 (netstack-smoltcp), which accepts data past its own advertised edge and then
    /// panics computing its window ("attempt to subtract sequence numbers with
    /// underflow", fixed in smoltcp 0.13).
    ///
    /// Why the margin makes the trim safe against edges the stack advertises later: the
    /// stack accepts data up to `T` (its read point plus its buffer's capacity, which
    /// only grows), and each window it advertises is `T − ack` rounded down to a multiple
    /// of `2^shift`, so each edge lies in `(T − 2^shift, T]`. An edge advertised after
    /// one seen here is more than `seen − 2^shift`: data within `seen − (2^shift − 1)`
    /// is within every edge the stack holds itself to from then on.
    pub window_edge: bool,
    /// Drop a client's SYN repeated after its first went to the stack (the stack
    /// retransmits its SYN-ACK itself). For netstack-smoltcp, which makes a new socket
    /// listening on the destination for every SYN: one made for a repeated SYN accepts
    /// the next SYN to that destination from any client until it is closed.
    pub drop_repeated_syn: bool,
}

/// First replay of a quiet flow's last ACK: past ipstack's fixed 1 s retransmission timeout.
pub const REPLAY_FIRST: Duration = Duration::from_millis(1100);
/// No replays once the gap between them would exceed this: a flow quiet that long is
/// idle, not stalled, and costs nothing from then on.
pub const REPLAY_LAST: Duration = Duration::from_secs(32);

/// What a flow's client has had forwarded to the stack, against what reached the handler.
#[derive(Debug, Clone)]
struct Cap {
    /// The client's first data sequence number (ISN + 1).
    start: u32,
    progress: FlowProgress,
    /// With [`Workarounds::replay_ack`]: the client's last pure ACK.
    last_ack: Option<PacketBuf>,
    /// When to replay it and the gap to the one after; `None` once replays stopped.
    replay: Option<(Instant, Duration)>,
    /// The flow has an entry in the replay heap.
    replay_queued: bool,
    /// The client's latest segment that carried an ACK: its ACK number is where a RST
    /// from here must start (see [`Admission::pass_output`]).
    last: Option<TcpSummary>,
    /// With [`Workarounds::window_edge`]: the furthest right edge of the receive window
    /// the stack advertised to the client, and the stack's window shift (from its SYN-ACK).
    edge: Option<u32>,
    shift: u8,
}

impl Cap {
    /// A client segment for this flow went to the stack at `now`: replays wait again, and
    /// a pure ACK becomes the one to replay.
    fn saw_client(&mut self, now: Instant, packet: &PacketBuf, seg: &TcpSummary) {
        if seg.ack && !seg.syn && !seg.fin && seg.segment_len == 0 {
            match &mut self.last_ack {
                Some(buf) if buf.capacity() >= packet.len() => {
                    buf.spare_mut()[..packet.len()].copy_from_slice(packet.packet());
                    buf.set_len(packet.len());
                }
                slot => *slot = Some(PacketBuf::from_slice(packet.packet())),
            }
        }
        self.replay = Some((now + REPLAY_FIRST, REPLAY_FIRST));
    }

    /// The stack sent the client `seg` (see [`Workarounds::window_edge`]): its ACK and
    /// window may move the right edge.
    fn saw_stack(&mut self, packet: &[u8], seg: &TcpSummary) {
        if !seg.ack || seg.rst {
            return;
        }
        // A SYN-ACK's window is never scaled; its option gives the shift for the rest.
        let window = if seg.syn {
            self.shift = packet::syn_window_scale(packet).unwrap_or(0);
            u32::from(seg.window)
        } else {
            u32::from(seg.window) << self.shift
        };
        let edge = seg.ack_number.wrapping_add(window);
        if self.edge.is_none_or(|e| seq_lt(e, edge)) {
            self.edge = Some(edge);
        }
    }

    /// Where client data must end: the furthest edge advertised, less `2^shift − 1`
    /// (see [`Workarounds::window_edge`] for why that margin suffices).
    fn edge_limit(&self) -> Option<u32> {
        let margin = (1u32 << self.shift) - 1;
        self.edge.map(|e| e.wrapping_sub(margin))
    }

    /// Whether `seg` would leave more than `limit` bytes unread inside the stack.
    fn exceeds(&self, seg: &TcpSummary, limit: u64) -> bool {
        // Pure ACKs (and window updates) carry no data: never hold them back.
        if seg.segment_len == 0 {
            return false;
        }
        let end = seg.seq.wrapping_add(seg.segment_len as u32).wrapping_sub(self.start);
        // Offsets past 2^31 are segments from before `start` (old duplicates): harmless.
        end < 1 << 31 && u64::from(end) > self.progress.delivered() + limit
    }
}

/// The admission layer. See the module docs.
pub struct Admission {
    table: FlowTable<Entry>,
    unread_limit: Option<u64>,
    workarounds: Workarounds,
    /// Flows with a replay pending, by due time (at most one entry per flow).
    replays: BinaryHeap<Reverse<(Instant, FlowKey)>>,
    /// Packets produced here for the stack (split FIN segments), taken by
    /// [`poll_forward`](Self::poll_forward).
    to_stack: VecDeque<PacketBuf>,
    handshake_timeout: Duration,
    woken: Vec<crate::FlowId>,
    released: VecDeque<(Instant, FlowKey)>,
    /// Bridges whose handler aborted, reported before the stack's stream is dropped.
    aborts: Arc<Aborts>,
    /// Flows aborted by their handler, until when the stack's output for them is replaced
    /// by RST.
    aborted: HashMap<FlowKey, Instant>,
}

/// How long after a handler's abort the stack's own segments for the flow (a FIN sent
/// when its stream was dropped, retransmissions) are replaced by RST.
const ABORT_LINGER: Duration = Duration::from_secs(10);

/// Flows whose handler aborted, as the bridges report them. Shared between the bridge
/// tasks and the admission layer; see [`Admission::pass_output`].
#[derive(Debug, Default)]
pub struct Aborts {
    keys: std::sync::Mutex<Vec<FlowKey>>,
    any: std::sync::atomic::AtomicBool,
}

impl Aborts {
    /// Reports that `key`'s handler aborted. Call before the stack's stream is dropped, so
    /// that nothing the stack sends on drop reaches the client.
    pub fn push(&self, key: FlowKey) {
        self.keys.lock().unwrap_or_else(|p| p.into_inner()).push(key);
        self.any.store(true, std::sync::atomic::Ordering::Release);
    }
}

impl std::fmt::Debug for Admission {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Admission").field("flows", &self.table.len()).finish_non_exhaustive()
    }
}

impl Admission {
    /// `handshake_timeout`: how long a released SYN may wait for the stack's stream.
    pub fn new(handlers: Dispatch, mtu: Mtu, ring_capacity: usize, handshake_timeout: Duration) -> Self {
        Self::with_unread_limit(handlers, mtu, ring_capacity, handshake_timeout, None)
    }

    /// Like [`new`](Self::new), for a stack that keeps accepting (and ACKing) data its
    /// application has not read (ipstack): a client segment that would leave more than
    /// `limit` bytes unread inside the stack is dropped here instead of forwarded. The
    /// client retransmits it once the handler has caught up — TCP's own recovery, used as
    /// back-pressure, so the stack's memory per flow stays below `limit` plus a segment.
    pub fn with_unread_limit(
        handlers: Dispatch,
        mtu: Mtu,
        ring_capacity: usize,
        handshake_timeout: Duration,
        limit: Option<u64>,
    ) -> Self {
        Admission {
            table: FlowTable::new(&handlers, mtu, ring_capacity),
            unread_limit: limit,
            workarounds: Workarounds::default(),
            replays: BinaryHeap::new(),
            to_stack: VecDeque::new(),
            handshake_timeout,
            woken: Vec::new(),
            released: VecDeque::new(),
            aborts: Arc::default(),
            aborted: HashMap::new(),
        }
    }

    /// Turns on work-arounds for the stack's known defects.
    pub fn with_workarounds(mut self, workarounds: Workarounds) -> Self {
        self.workarounds = workarounds;
        self
    }

    /// A packet this layer made for the stack (see [`Workarounds::split_fin`]): the driver
    /// takes them after each [`handle_packet`](Self::handle_packet), in order, as if the
    /// packet it looked at had been forwarded.
    pub fn poll_forward(&mut self) -> Option<PacketBuf> {
        self.to_stack.pop_front()
    }

    /// Notified when a handler decided, a UDP reply is queued, or a flow needs attention.
    pub fn wake_queue(&self) -> Arc<WakeQueue> {
        self.table.wake_queue()
    }

    /// The gateway's counters.
    pub fn stats(&self) -> &Arc<crate::stats::Stats> {
        self.table.stats()
    }

    /// Flows known here (pending, released or bridged).
    pub fn flow_count(&self) -> usize {
        self.table.len()
    }

    /// Looks at one packet from the TUN, read at `now`. A packet to forward may have
    /// been rewritten ([`Workarounds::window_edge`]).
    pub fn handle_packet(&mut self, now: Instant, packet: &mut PacketBuf) -> Verdict {
        let (mut seg, id) = match self.table.inbound(packet) {
            Inbound::Tcp(seg, Seen::Admitted(id)) => (seg, id),
            Inbound::Tcp(seg, Seen::Stranger { rst: false }) => {
                self.table.reset(&seg);
                return Verdict::Consumed;
            }
            Inbound::Tcp(_, Seen::Consumed | Seen::Stranger { rst: true }) | Inbound::Done => return Verdict::Consumed,
        };
        let key = (seg.src, seg.dst);
        let Some(Entry::Released { cap, .. } | Entry::Bridged { cap }) = self.table.get_mut(id) else {
            return Verdict::Consumed;
        };
        if seg.ack {
            cap.last = Some(seg);
        }
        if self.workarounds.drop_repeated_syn && seg.is_bare_syn() && seg.seq.wrapping_add(1) == cap.start {
            crate::stats::Stats::inc(&self.table.stats().tcp_syn_duplicate);
            return Verdict::Consumed;
        }
        if seg.rst {
            // Some stacks never wake a stream on RST; end the bridge from here.
            cap.progress.client_reset();
            return Verdict::Forward;
        }
        if matches!(self.unread_limit, Some(limit) if cap.exceeds(&seg, limit)) {
            return Verdict::Consumed;
        }
        if self.workarounds.window_edge {
            if let Some(limit) = cap.edge_limit() {
                trim_at(packet, &mut seg, limit);
            }
        }
        if self.workarounds.replay_ack {
            cap.saw_client(now, packet, &seg);
            if !cap.replay_queued {
                if let Some((at, _)) = cap.replay {
                    cap.replay_queued = true;
                    self.replays.push(Reverse((at, key)));
                }
            }
        }
        if self.workarounds.split_fin {
            if let Some((data, fin)) = split_fin(packet.packet(), &seg) {
                self.to_stack.push_back(data);
                self.to_stack.push_back(fin);
                return Verdict::Consumed;
            }
        }
        Verdict::Forward
    }

    /// Acts on handler decisions: an accepted flow's SYN is passed to `forward` (for the
    /// stack), a rejected one is answered with RST. Also gives up on released SYNs whose
    /// stream never came (the handler sees a reset).
    pub fn service(&mut self, now: Instant, mut forward: impl FnMut(PacketBuf)) {
        let mut woken = std::mem::take(&mut self.woken);
        self.table.wake_queue().drain_into(&mut woken);
        for &id in &woken {
            let Decided::Accepted(held) = self.table.decide(id) else { continue };
            let Some(key) = self.table.key(id) else { continue };
            let deadline = now + self.handshake_timeout;
            let port = held.link.into_port();
            let cap = Cap {
                start: held.summary.seq.wrapping_add(1),
                progress: port.progress(),
                last_ack: None,
                replay: None,
                replay_queued: false,
                last: None,
                edge: None,
                shift: 0,
            };
            self.table.admit(id, Entry::Released { port, deadline, cap });
            // A new connection on a 4-tuple whose last one was aborted: its segments pass.
            if self.aborted.remove(&key).is_some() {
                super::give_back_growth(&mut self.aborted);
            }
            self.released.push_back((deadline, key));
            forward(held.syn);
        }
        woken.clear();
        self.woken = woken;
        while let Some(&(deadline, key)) = self.released.front() {
            if deadline > now {
                break;
            }
            self.released.pop_front();
            let Some(id) = self.table.id(&key) else { continue };
            if matches!(self.table.get(id), Some(Entry::Released { deadline: d, .. }) if *d == deadline) {
                tracing::debug!(src = %key.0, dst = %key.1, "the stack never delivered the connection");
                self.remove(id, true);
            }
        }
        while let Some(&Reverse((at, key))) = self.replays.peek() {
            if at > now {
                break;
            }
            self.replays.pop();
            let Some(Entry::Released { cap, .. } | Entry::Bridged { cap }) =
                self.table.id(&key).and_then(|id| self.table.get_mut(id))
            else {
                continue;
            };
            cap.replay_queued = false;
            let Some((due, gap)) = cap.replay else { continue };
            if due <= now {
                if let Some(ack) = &cap.last_ack {
                    tracing::trace!(src = %key.0, dst = %key.1, "client quiet: its last ACK given to the stack again");
                    forward(PacketBuf::from_slice(ack.packet()));
                }
                let gap = gap * 2;
                cap.replay = (gap <= REPLAY_LAST).then(|| (now + gap, gap));
            }
            // Re-queued for the next due time (later if the client was heard since).
            if let Some((due, _)) = cap.replay {
                cap.replay_queued = true;
                self.replays.push(Reverse((due, key)));
            }
        }
    }

    /// The earliest time [`service`](Self::service) has a timeout to act on.
    pub fn poll_timeout(&mut self) -> Option<Instant> {
        let mut handshake = None;
        while let Some(&(deadline, key)) = self.released.front() {
            let entry = self.table.id(&key).and_then(|id| self.table.get(id));
            if matches!(entry, Some(Entry::Released { deadline: d, .. }) if *d == deadline) {
                handshake = Some(deadline);
                break;
            }
            self.released.pop_front();
        }
        // A replay entry may be early (the client was heard since): `service` re-queues it.
        let replay = self.replays.peek().map(|Reverse((at, _))| *at);
        handshake.into_iter().chain(replay).min()
    }

    /// The stack accepted a connection from `client` to `dst`: returns the flow's port if
    /// it was admitted and not yet bridged. A stream without a port (a stack that made a
    /// second stream for a retransmitted SYN) should be dropped.
    pub fn take_port(&mut self, client: SocketAddr, dst: SocketAddr) -> Option<FlowPort> {
        let id = self.table.id(&(client, dst))?;
        let entry = self.table.get_mut(id)?;
        let Entry::Released { cap, .. } = entry else { return None };
        let bridged = Entry::Bridged { cap: cap.clone() };
        match std::mem::replace(entry, bridged) {
            Entry::Released { port, .. } => Some(port),
            Entry::Bridged { .. } => None,
        }
    }

    /// Where bridges report a handler's abort.
    pub fn aborts(&self) -> Arc<Aborts> {
        self.aborts.clone()
    }

    /// Takes the aborts the bridges reported: each client gets a RST now (at its own last
    /// ACK, the stack's send point unless data was in flight; a client that had more
    /// answers with a challenge ACK, which gets a RST from here at its ACK), and the
    /// stack's later segments for the flow are replaced (see [`pass_output`](Self::pass_output)).
    fn take_aborts(&mut self, now: Instant) {
        // A load first: this runs for every packet the stack writes, and a swap would
        // write the shared flag each time.
        if !self.aborts.any.load(std::sync::atomic::Ordering::Relaxed)
            || !self.aborts.any.swap(false, std::sync::atomic::Ordering::Acquire)
        {
            return;
        }
        let keys = std::mem::take(&mut *self.aborts.keys.lock().unwrap_or_else(|p| p.into_inner()));
        for key in keys {
            if let Some(id) = self.table.id(&key) {
                if let Some(Entry::Bridged { cap: Cap { last: Some(last), .. } }) = self.table.get(id) {
                    let last = *last;
                    self.table.reset(&last);
                }
                self.remove(id, true);
            }
            self.aborted.insert(key, now + ABORT_LINGER);
        }
    }

    /// Looks at a packet the stack wrote for the TUN: `false` if it must not go out. A
    /// stream stack has no way to reset a connection (dropping its stream sends FIN, or
    /// nothing): for a flow whose handler aborted, each segment the stack sends is
    /// replaced by a RST at the segment's own sequence number, so the client sees the
    /// reset every other backend gives. Costs nothing while no aborted flow lingers.
    pub fn pass_output(&mut self, now: Instant, packet: &PacketBuf) -> bool {
        self.take_aborts(now);
        if self.workarounds.window_edge {
            if let Ok(Classified::Tcp(seg)) = packet::classify(packet.packet()) {
                let cap = self.table.id(&(seg.dst, seg.src)).and_then(|id| self.table.get_mut(id));
                if let Some(Entry::Released { cap, .. } | Entry::Bridged { cap }) = cap {
                    cap.saw_stack(packet.packet(), &seg);
                }
            }
        }
        if self.aborted.is_empty() {
            return true;
        }
        self.aborted.retain(|_, until| *until > now);
        let Ok(Classified::Tcp(seg)) = packet::classify(packet.packet()) else { return true };
        if seg.rst || !self.aborted.contains_key(&(seg.dst, seg.src)) {
            return true;
        }
        // The RST that answers a client segment acknowledging everything up to `seg.seq`.
        let answered = TcpSummary {
            src: seg.dst,
            dst: seg.src,
            syn: false,
            ack: true,
            rst: false,
            fin: false,
            seq: seg.ack_number,
            ack_number: seg.seq,
            segment_len: 0,
            window: 0,
        };
        self.table.reset(&answered);
        false
    }

    /// A bridge ended: forget the flow (later segments for it get RST from here).
    pub fn finished(&mut self, now: Instant, key: FlowKey) {
        self.take_aborts(now);
        let Some(id) = self.table.id(&key) else { return };
        if matches!(self.table.get(id), Some(Entry::Bridged { .. })) {
            self.remove(id, false);
        }
    }

    fn remove(&mut self, id: crate::FlowId, reset: bool) {
        if let Some(Entry::Released { port, .. }) = self.table.remove(id, reset) {
            port.finish(reset);
        }
    }

    /// The next packet this layer wants written to the TUN (RSTs, UDP replies).
    pub fn poll_transmit(&mut self) -> Option<PacketBuf> {
        self.table.poll_transmit()
    }

    /// Gives back the buffer last returned by [`poll_transmit`](Self::poll_transmit).
    pub fn recycle(&mut self, buf: PacketBuf) {
        self.table.recycle(buf);
    }
}

/// Cuts the client segment `seg` in `packet` so that its data ends at `limit` at the
/// latest (a segment wholly past it keeps its ACK and nothing else); FIN goes with any
/// cut. A segment that fits is left alone.
fn trim_at(packet: &mut PacketBuf, seg: &mut TcpSummary, limit: u32) {
    let payload = seg.payload_len();
    if seg.syn || seg.rst || payload == 0 {
        return;
    }
    let end = seg.seq.wrapping_add(payload as u32);
    if !seq_lt(limit, end) {
        return;
    }
    // Bytes before the limit; none if the segment starts at or past it.
    let keep = if seq_lt(seg.seq, limit) { limit.wrapping_sub(seg.seq) as usize } else { 0 };
    if let Some(len) = packet::reshape_tcp_segment(packet.packet_mut(), 0..keep, false) {
        packet.set_len(len);
        seg.fin = false;
        seg.segment_len = keep;
        tracing::trace!(src = %seg.src, dst = %seg.dst, cut = payload - keep, "client data past the stack's window edge trimmed");
    }
}

/// Splits a client segment that carries data and FIN into the data (FIN cleared) and a
/// bare FIN after it, both with valid checksums; `None` for any other segment.
fn split_fin(packet: &[u8], seg: &TcpSummary) -> Option<(PacketBuf, PacketBuf)> {
    if !seg.fin || seg.syn || seg.rst || seg.segment_len <= 1 {
        return None;
    }
    let payload = seg.payload_len();
    let part = |keep: std::ops::Range<usize>, fin: bool| {
        let mut buf = PacketBuf::from_slice(packet);
        let len = packet::reshape_tcp_segment(buf.packet_mut(), keep, fin)?;
        buf.set_len(len);
        Some(buf)
    };
    Some((part(0..payload, false)?, part(payload..payload, true)?))
}

/// How a [`bridge`] ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BridgeEnd {
    /// Both directions ended with FIN.
    Clean,
    /// The handler aborted: the client must get a RST ([`Aborts::push`]).
    Aborted,
    /// The client reset, or either side failed.
    Reset,
}

/// Bytes moved per read in each direction of a [`bridge`].
pub const BRIDGE_BUFFER: usize = 32 * 1024;

/// Carries bytes both ways between a stack's accepted `stream` and the handler's `port`,
/// half-close included, until both directions have ended; then tells the handler how it
/// ended. A reset on either side ends both (the stream is dropped; for a handler's abort
/// the caller reports [`BridgeEnd::Aborted`] first, so that the client gets a RST).
pub async fn bridge<S: AsyncRead + AsyncWrite + Unpin>(mut stream: S, mut port: FlowPort) -> BridgeEnd {
    let result = tokio::io::copy_bidirectional_with_sizes(&mut stream, &mut port, BRIDGE_BUFFER, BRIDGE_BUFFER).await;
    let end = match result {
        Ok(_) => BridgeEnd::Clean,
        Err(e) => {
            tracing::debug!("bridge ended: {e}");
            if port.handler_aborted() { BridgeEnd::Aborted } else { BridgeEnd::Reset }
        }
    };
    port.finish(end != BridgeEnd::Clean);
    end
}

#[cfg(test)]
mod tests {
    use smoltcp::wire::TcpControl;

    use super::*;
    use crate::Dispatch;
    use crate::packet::Classified;

    fn fin_with_data(src: SocketAddr, dst: SocketAddr, payload: &[u8]) -> Vec<u8> {
        packet::SegmentFields::new(src, dst, TcpControl::Fin, u32::MAX - 2, Some(77)).payload(payload).build()
    }

    fn tcp(packet: &[u8]) -> TcpSummary {
        match packet::classify(packet) {
            Ok(Classified::Tcp(seg)) => {
                assert!(packet::tcp_checksum_ok(packet, &seg), "checksum of {seg:?}");
                seg
            }
            other => panic!("not TCP: {other:?}"),
        }
    }

    #[test]
    fn a_fin_carrying_data_splits_into_data_then_a_bare_fin() {
        for (src, dst) in [("198.18.0.2:4000", "10.77.0.2:80"), ("[fd18::2]:4000", "[fd77::2]:80")] {
            let (src, dst): (SocketAddr, SocketAddr) = (src.parse().unwrap(), dst.parse().unwrap());
            let original = fin_with_data(src, dst, b"last bytes");
            let seg = tcp(&original);
            let (data, fin) = split_fin(&original, &seg).expect("split");
            let (d, f) = (tcp(data.packet()), tcp(fin.packet()));
            assert_eq!((d.src, d.dst, f.src, f.dst), (src, dst, src, dst));
            assert!(!d.fin && d.ack && d.segment_len == 10 && d.seq == seg.seq, "data part: {d:?}");
            assert!(f.fin && f.ack && f.segment_len == 1, "FIN part: {f:?}");
            assert_eq!(f.seq, seg.seq.wrapping_add(10), "the FIN follows the data (across the wrap)");
            assert_eq!((d.ack_number, f.ack_number), (77, 77));
            // The data part carries the same bytes.
            assert_eq!(&data.packet()[data.len() - 10..], b"last bytes");
            // Anything else is left alone.
            let bare = fin_with_data(src, dst, b"");
            assert!(split_fin(&bare, &tcp(&bare)).is_none(), "a bare FIN is not split");
        }
    }

    /// Accepts every request at once and keeps the connections.
    #[derive(Default)]
    struct AcceptAll(std::sync::Mutex<Vec<crate::TcpConn>>);

    impl crate::TcpHandler for AcceptAll {
        fn handle_tcp(&self, request: crate::TcpRequest) {
            let conn = crate::api::tcp::now_or_never(request.accept()).expect("a ring flow");
            self.0.lock().expect("lock").push(conn);
        }
    }

    impl crate::UdpHandler for AcceptAll {
        fn handle_udp(&self, _: crate::UdpSession) {}
    }

    #[test]
    fn after_an_abort_the_stacks_segments_become_rsts_but_a_new_connection_passes() {
        let handler = Arc::new(AcceptAll::default());
        let mut adm =
            Admission::new(Dispatch::new(handler.clone(), handler), Mtu::DEFAULT, 4096, Duration::from_secs(25));
        let (client, server): (SocketAddr, SocketAddr) =
            ("198.18.0.2:4000".parse().unwrap(), "10.77.0.2:80".parse().unwrap());
        let now = Instant::now();
        let open = |adm: &mut Admission| {
            let mut syn =
                PacketBuf::from_vec(packet::SegmentFields::new(client, server, TcpControl::Syn, 100, None).build());
            assert_eq!(adm.handle_packet(now, &mut syn), Verdict::Consumed, "held");
            let mut released = Vec::new();
            adm.service(now, |p| released.push(p));
            assert_eq!(released.len(), 1, "the SYN goes to the stack once accepted");
        };
        let from_stack = |control, seq| {
            PacketBuf::from_vec(packet::SegmentFields::new(server, client, control, seq, Some(101)).build())
        };
        open(&mut adm);
        let _port = adm.take_port(client, server).expect("the stack's stream finds its port");
        adm.aborts().push((client, server));
        adm.finished(now, (client, server));
        assert_eq!(adm.flow_count(), 0);
        // The FIN the stack sends when its stream is dropped becomes a RST at its sequence.
        assert!(!adm.pass_output(now, &from_stack(TcpControl::Fin, 5000)), "the FIN is held back");
        let rst = tcp(adm.poll_transmit().expect("a RST instead").packet());
        assert!(rst.rst && rst.seq == 5000 && rst.dst == client, "{rst:?}");
        // The client reconnects from the same port: the new flow's SYN-ACK passes.
        open(&mut adm);
        assert!(adm.pass_output(now, &from_stack(TcpControl::Syn, 9000)), "a new connection is not reset");
    }

    /// The stack said: ACK `ack`, window `window` (scaled by the shift of its SYN-ACK).
    fn stack_ack(server: SocketAddr, client: SocketAddr, ack: u32, window: u16) -> PacketBuf {
        let mut seg = packet::SegmentFields::new(server, client, TcpControl::None, 5001, Some(ack));
        seg.window = window;
        PacketBuf::from_vec(seg.build())
    }

    #[test]
    fn client_data_past_the_stacks_window_edge_less_one_scale_unit_is_trimmed() {
        let handler = Arc::new(AcceptAll::default());
        let workarounds = Workarounds { window_edge: true, ..Workarounds::default() };
        let mut adm =
            Admission::new(Dispatch::new(handler.clone(), handler), Mtu::DEFAULT, 4096, Duration::from_secs(25))
                .with_workarounds(workarounds);
        let (client, server): (SocketAddr, SocketAddr) =
            ("[fd18::2]:4000".parse().unwrap(), "[fd77::2]:80".parse().unwrap());
        let now = Instant::now();
        let mut syn =
            PacketBuf::from_vec(packet::SegmentFields::new(client, server, TcpControl::Syn, 100, None).build());
        assert_eq!(adm.handle_packet(now, &mut syn), Verdict::Consumed, "held");
        adm.service(now, |_| {});
        let data: Vec<u8> = (0..3000u32).map(|i| i as u8).collect();
        let client_segment = |seq: u32, len: usize, control| {
            let mut seg = packet::SegmentFields::new(client, server, control, seq, Some(5001));
            seg.payload = &data[..len];
            PacketBuf::from_vec(seg.build())
        };
        // Before the stack has said anything, nothing is trimmed.
        let mut early = client_segment(101, 3000, TcpControl::None);
        assert_eq!(adm.handle_packet(now, &mut early), Verdict::Forward);
        assert_eq!(tcp(early.packet()).payload_len(), 3000);
        // SYN-ACK with shift 4 and its own window unscaled (edge 101 + 1000), then an ACK
        // of 1000 bytes with window 100 << 4: edge 1101 + 1600 = 2701, limit 2701 − 15.
        let mut syn_ack = packet::SegmentFields::new(server, client, TcpControl::Syn, 5000, Some(101));
        syn_ack.window_scale = Some(4);
        syn_ack.window = 1000;
        assert!(adm.pass_output(now, &PacketBuf::from_vec(syn_ack.build())));
        assert!(adm.pass_output(now, &stack_ack(server, client, 1101, 100)));
        // An edge further back (rounding moved it) does not pull the limit in.
        assert!(adm.pass_output(now, &stack_ack(server, client, 1117, 98)));

        let mut past = client_segment(1101, 2000, TcpControl::Fin);
        assert_eq!(adm.handle_packet(now, &mut past), Verdict::Forward);
        let cut = tcp(past.packet());
        assert_eq!((cut.seq, cut.payload_len(), cut.fin), (1101, 2686 - 1101, false), "cut at the limit, FIN dropped");
        assert_eq!(&past.packet()[past.len() - 1585..], &data[..1585], "the bytes kept are the first ones");

        let mut beyond = client_segment(2686, 10, TcpControl::Psh);
        assert_eq!(adm.handle_packet(now, &mut beyond), Verdict::Forward);
        let ack_only = tcp(beyond.packet());
        assert_eq!((ack_only.segment_len, ack_only.ack, ack_only.ack_number), (0, true, 5001), "only its ACK is left");

        let mut within = client_segment(2000, 686, TcpControl::Fin);
        let before = within.packet().to_vec();
        assert_eq!(adm.handle_packet(now, &mut within), Verdict::Forward);
        assert_eq!(within.packet(), &before[..], "a segment (and FIN) that fits is left alone");
    }
}
