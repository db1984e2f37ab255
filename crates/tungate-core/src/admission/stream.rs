//! Admission in front of stream stacks: for stacks that terminate TCP themselves and hand
//! out accepted connections as byte streams (ipstack, netstack-smoltcp).
//!
//! Such stacks answer a SYN at once, so they cannot let the handler refuse a connection,
//! and their UDP paths are weaker than tungate's own. [`Admission`] sits between the TUN
//! and the stack and gives every backend the same contract:
//!
//! * A bare SYN for a new 4-tuple is **held**: the handler gets a [`TcpRequest`]; on accept
//!   the SYN is released to the stack, on reject the client gets RST from here. The
//!   stack's accepted stream is then matched by 4-tuple to the flow's [`FlowPort`] and
//!   bridged to it (`stream_stack::bridge`).
//! * Other segments go to the stack only for 4-tuples it was given; anything else gets
//!   RST from here (counted as `tcp_unknown_flow`).
//! * UDP never reaches the stack: it goes to the [`UdpHandler`] as sessions whose
//!   replies can come from any address, as in every backend.
//! * A handler's abort becomes a RST for the client, and what the stack still sends for
//!   the flow is replaced by RST: stream stacks cannot reset a connection themselves.
//!
//! What one stack's crate gets wrong is not here: each backend crate implements
//! [`StreamQuirks`], the hook this layer calls on every client segment, on the stack's
//! output and on a per-flow timer, and keeps its work-arounds (and their state) there.
//! I/O-free: the driver feeds packets in and writes what comes out.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::table::{Close, Decided, FlowKey, FlowTable, Inbound, Seen};
use crate::Dispatch;
use crate::config::Mtu;
use crate::device::PacketBuf;
use crate::flow::{FlowPort, FlowProgress, WakeQueue};
use crate::packet::{self, Classified, TcpSummary};
use crate::stats::Stats;
#[cfg(doc)]
use crate::{TcpRequest, UdpHandler};

/// What to do with a packet [`Admission::handle_packet`] looked at.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Give it to the stack.
    Forward,
    /// Handled here (UDP, held SYN, RST queued) or dropped (malformed, unsupported).
    Consumed,
}

/// What a stack's [`StreamQuirks`] make of a client segment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pass {
    /// The segment (as the quirks may have rewritten it) goes to the stack.
    Forward,
    /// The segment does not go to the stack; what the quirks queued with
    /// [`QuirkCx::forward`] goes instead.
    Withhold,
}

/// A stream stack's known defects, worked around in front of it. Each backend crate
/// implements this for its own stack, with the state its work-arounds need per flow;
/// [`Admission`] calls it for every admitted flow and keeps only the mechanism.
pub trait StreamQuirks: Send + 'static {
    /// What the work-arounds keep per flow.
    type Flow: Send + 'static;

    /// Whether [`stack_segment`](Self::stack_segment) is wanted: it costs a parse of
    /// every packet the stack writes.
    const WATCHES_OUTPUT: bool = false;

    /// How long the stack may still hold a connection after its bridge ended (its
    /// stream's `shutdown` completes before the connection is closed), counted again
    /// from each segment the stack sends for it: meanwhile the client's segments for it
    /// go to the stack rather than being answered with RST.
    const LINGER: Duration = Duration::ZERO;

    /// A flow was accepted: `syn` is the client's SYN, going to the stack after whatever
    /// this queues with [`QuirkCx::forward`], and `progress` counts the client bytes the
    /// handler has received since.
    fn admitted(&mut self, cx: &mut QuirkCx<'_>, syn: &TcpSummary, progress: FlowProgress) -> Self::Flow;

    /// The flow left admission at `now` (its bridge ended, or it was given up or
    /// aborted); the stack may still hold its connection for a while (TIME-WAIT).
    fn ended(&mut self, now: Instant, key: FlowKey, flow: Self::Flow) {
        let _ = (now, key, flow);
    }

    /// Whether the flow still has work here after its bridge ended (a segment of the
    /// stack's to send again until the client acknowledges it): admission keeps it,
    /// segments and timer included, until this turns false.
    fn outlives_bridge(&self, flow: &Self::Flow) -> bool {
        let _ = flow;
        false
    }

    /// A client segment of an admitted flow, on its way to the stack; `packet` and `seg`
    /// may be rewritten together.
    fn client_segment(
        &mut self,
        cx: &mut QuirkCx<'_>,
        flow: &mut Self::Flow,
        packet: &mut PacketBuf,
        seg: &mut TcpSummary,
    ) -> Pass {
        let _ = (cx, flow, packet, seg);
        Pass::Forward
    }

    /// A segment the stack wrote for the flow's client (only with
    /// [`WATCHES_OUTPUT`](Self::WATCHES_OUTPUT)): [`Pass::Withhold`] drops it.
    fn stack_segment(&mut self, cx: &mut QuirkCx<'_>, flow: &mut Self::Flow, packet: &[u8], seg: &TcpSummary) -> Pass {
        let _ = (cx, flow, packet, seg);
        Pass::Forward
    }

    /// The time set with [`QuirkCx::set_timer`] for this flow has come.
    fn timer(&mut self, cx: &mut QuirkCx<'_>, flow: &mut Self::Flow) {
        let _ = (cx, flow);
    }
}

/// A stack whose crate needs no work-arounds.
#[derive(Debug, Clone, Copy, Default)]
pub struct NoQuirks;

impl StreamQuirks for NoQuirks {
    type Flow = ();

    fn admitted(&mut self, _: &mut QuirkCx<'_>, _: &TcpSummary, _: FlowProgress) {}
}

/// What [`StreamQuirks`] may do while handling one flow: give the stack packets of their
/// own, set the flow's timer, count.
pub struct QuirkCx<'a> {
    now: Instant,
    to_stack: &'a mut VecDeque<PacketBuf>,
    to_client: &'a mut VecDeque<PacketBuf>,
    timer: &'a mut Option<Instant>,
    stats: &'a Stats,
}

impl std::fmt::Debug for QuirkCx<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("QuirkCx").field("now", &self.now).field("timer", &self.timer).finish_non_exhaustive()
    }
}

impl QuirkCx<'_> {
    /// The time the packet was read, or the timer fired.
    pub fn now(&self) -> Instant {
        self.now
    }

    /// Gives the stack `packet`, after whatever was queued before it.
    pub fn forward(&mut self, packet: PacketBuf) {
        self.to_stack.push_back(packet);
    }

    /// Writes `packet` to the TUN, for the client: a segment the stack should have sent
    /// and did not (see backend-ipstack's ACK of a duplicate).
    pub fn answer(&mut self, packet: PacketBuf) {
        self.to_client.push_back(packet);
    }

    /// Calls [`StreamQuirks::timer`] for this flow at `at` (replacing the time set
    /// before), or never with `None`.
    pub fn set_timer(&mut self, at: Option<Instant>) {
        *self.timer = at;
    }

    /// The gateway's counters.
    pub fn stats(&self) -> &Stats {
        self.stats
    }
}

/// An admitted flow: the port until the stack's stream takes it, and what this layer and
/// the quirks keep.
struct Entry<F> {
    /// The SYN went to the stack and its stream has not arrived yet: the flow's port, and
    /// when to give up on the stream.
    waiting: Option<(FlowPort, Instant)>,
    progress: FlowProgress,
    /// The client's latest segment that carried an ACK: its ACK number is where a RST
    /// from here must start (see [`Admission::pass_output`]).
    last: Option<TcpSummary>,
    /// When the quirks want their timer, and the time of this flow's entry in the timer
    /// heap, if it has one.
    timer: Option<Instant>,
    queued: Option<Instant>,
    quirks: F,
    /// The bridge ended while the quirks still had work ([`StreamQuirks::outlives_bridge`]).
    bridge_ended: bool,
}

/// The admission layer. See the module docs.
pub struct Admission<Q: StreamQuirks = NoQuirks> {
    table: FlowTable<Entry<Q::Flow>>,
    quirks: Q,
    stats: Arc<Stats>,
    /// Flows with a timer, by due time (at most one live entry per flow).
    timers: BinaryHeap<Reverse<(Instant, FlowKey)>>,
    /// Packets made here for the stack, taken by [`poll_forward`](Self::poll_forward).
    to_stack: VecDeque<PacketBuf>,
    /// Packets the quirks made for the client ([`QuirkCx::answer`]), sent first by
    /// [`poll_transmit`](Self::poll_transmit).
    to_client: VecDeque<PacketBuf>,
    handshake_timeout: Duration,
    woken: Vec<crate::FlowId>,
    released: VecDeque<(Instant, FlowKey)>,
    /// Bridges whose handler aborted, reported before the stack's stream is dropped.
    aborts: Arc<Aborts>,
    /// Flows aborted by their handler, until when the stack's output for them is replaced
    /// by RST.
    aborted: HashMap<FlowKey, Instant>,
    /// Flows whose bridge ended that the stack may still hold ([`StreamQuirks::LINGER`]),
    /// until when; and the same times in order.
    lingering: HashMap<FlowKey, Instant>,
    linger_expiry: VecDeque<(Instant, FlowKey)>,
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

impl<Q: StreamQuirks> std::fmt::Debug for Admission<Q> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Admission").field("flows", &self.table.len()).finish_non_exhaustive()
    }
}

impl Admission<NoQuirks> {
    /// Admission for a stack that needs no work-arounds. `handshake_timeout`: how long a
    /// released SYN may wait for the stack's stream.
    pub fn new(handlers: Dispatch, mtu: Mtu, ring_capacity: usize, handshake_timeout: Duration) -> Self {
        Self::with_quirks(handlers, mtu, ring_capacity, handshake_timeout, NoQuirks)
    }
}

impl<Q: StreamQuirks> Admission<Q> {
    /// Admission in front of a stack whose defects `quirks` work around.
    pub fn with_quirks(
        handlers: Dispatch,
        mtu: Mtu,
        ring_capacity: usize,
        handshake_timeout: Duration,
        quirks: Q,
    ) -> Self {
        let table = FlowTable::new(&handlers, mtu, ring_capacity);
        Admission {
            stats: table.stats().clone(),
            table,
            quirks,
            timers: BinaryHeap::new(),
            to_stack: VecDeque::new(),
            to_client: VecDeque::new(),
            handshake_timeout,
            woken: Vec::new(),
            released: VecDeque::new(),
            aborts: Arc::default(),
            aborted: HashMap::new(),
            lingering: HashMap::new(),
            linger_expiry: VecDeque::new(),
        }
    }

    /// A packet this layer made for the stack (see [`QuirkCx::forward`]): the driver
    /// takes them after each [`handle_packet`](Self::handle_packet), in order, as if the
    /// packet it looked at had been forwarded.
    pub fn poll_forward(&mut self) -> Option<PacketBuf> {
        self.to_stack.pop_front()
    }

    /// The flows, for a drain at shutdown.
    pub fn flows(&mut self) -> &mut dyn super::Flows {
        &mut self.table
    }

    /// Notified when a handler decided, a UDP reply is queued, or a flow needs attention.
    pub fn wake_queue(&self) -> Arc<WakeQueue> {
        self.table.wake_queue()
    }

    /// The gateway's counters.
    pub fn stats(&self) -> &Arc<Stats> {
        &self.stats
    }

    /// Flows known here: pending, released, bridged, or ended but lingering in the stack
    /// ([`StreamQuirks::LINGER`]).
    pub fn flow_count(&self) -> usize {
        self.table.len() + self.lingering.len()
    }

    /// Looks at one packet from the TUN, read at `now`. A packet to forward may have
    /// been rewritten by the stack's quirks.
    pub fn handle_packet(&mut self, now: Instant, packet: &mut PacketBuf) -> Verdict {
        let (mut seg, id) = match self.table.inbound(now, packet) {
            Inbound::Tcp(seg, Seen::Admitted(id)) => (seg, id),
            Inbound::Tcp(seg, seen @ (Seen::Unknown | Seen::UnknownRst)) if self.lingers(now, (seg.src, seg.dst)) => {
                // The stack still holds the connection: it answers.
                if seen == Seen::Unknown {
                    Stats::dec(&self.stats.tcp_unknown_flow);
                }
                return Verdict::Forward;
            }
            Inbound::Tcp(seg, Seen::Unknown) => {
                self.table.reset(&seg);
                return Verdict::Consumed;
            }
            Inbound::Tcp(_, Seen::Consumed | Seen::UnknownRst) | Inbound::Done => return Verdict::Consumed,
        };
        let Some(entry) = self.table.get_mut(id) else {
            return Verdict::Consumed;
        };
        if seg.ack {
            entry.last = Some(seg);
        }
        if seg.rst {
            // Some stacks never wake a stream on RST; end the bridge from here.
            entry.progress.client_reset();
            return Verdict::Forward;
        }
        let mut cx = QuirkCx {
            now,
            to_stack: &mut self.to_stack,
            to_client: &mut self.to_client,
            timer: &mut entry.timer,
            stats: &self.stats,
        };
        let pass = self.quirks.client_segment(&mut cx, &mut entry.quirks, packet, &mut seg);
        arm(&mut self.timers, (seg.src, seg.dst), entry);
        self.end_if_done(now, (seg.src, seg.dst));
        match pass {
            Pass::Forward => Verdict::Forward,
            Pass::Withhold => Verdict::Consumed,
        }
    }

    /// Acts on handler decisions: an accepted flow's SYN is passed to `forward` (for the
    /// stack), a rejected one is answered with RST. Gives up on released SYNs whose
    /// stream never came (the handler sees a reset), and runs the quirks' timers (what
    /// they make for the stack goes to `forward` too).
    pub fn service(&mut self, now: Instant, mut forward: impl FnMut(PacketBuf)) {
        self.forget_lingering(now);
        let mut woken = std::mem::take(&mut self.woken);
        self.table.wake_queue().drain_into(&mut woken);
        for &id in &woken {
            let Decided::Accepted(held) = self.table.decide(id) else { continue };
            let Some(key) = self.table.key(id) else { continue };
            let deadline = now + self.handshake_timeout;
            let port = held.link.into_port();
            let progress = port.progress();
            let mut timer = None;
            let mut cx = QuirkCx {
                now,
                to_stack: &mut self.to_stack,
                to_client: &mut self.to_client,
                timer: &mut timer,
                stats: &self.stats,
            };
            let quirks = self.quirks.admitted(&mut cx, &held.summary, progress.clone());
            self.to_stack.push_back(held.syn);
            let entry = Entry {
                waiting: Some((port, deadline)),
                progress,
                last: None,
                timer,
                queued: None,
                quirks,
                bridge_ended: false,
            };
            self.table.admit(id, entry);
            if let Some(entry) = self.table.get_mut(id) {
                arm(&mut self.timers, key, entry);
            }
            // A new connection on the 4-tuple takes it over.
            self.lingering.remove(&key);
            // A new connection on a 4-tuple whose last one was aborted: its segments pass.
            if self.aborted.remove(&key).is_some() {
                super::give_back_growth(&mut self.aborted);
            }
            self.released.push_back((deadline, key));
        }
        woken.clear();
        self.woken = woken;
        while let Some(&(deadline, key)) = self.released.front() {
            if deadline > now {
                break;
            }
            self.released.pop_front();
            let Some(id) = self.table.id(&key) else { continue };
            if matches!(self.table.get(id), Some(Entry { waiting: Some((_, d)), .. }) if *d == deadline) {
                tracing::debug!(src = %key.0, dst = %key.1, "the stack never delivered the connection");
                self.remove(now, id, Close::Reset);
            }
        }
        while let Some(&Reverse((at, key))) = self.timers.peek() {
            if at > now {
                break;
            }
            self.timers.pop();
            let Some(entry) = self.table.id(&key).and_then(|id| self.table.get_mut(id)) else { continue };
            if entry.queued != Some(at) {
                continue; // superseded by an earlier entry
            }
            entry.queued = None;
            if entry.timer.is_some_and(|due| due <= now) {
                entry.timer = None;
                let mut cx = QuirkCx {
                    now,
                    to_stack: &mut self.to_stack,
                    to_client: &mut self.to_client,
                    timer: &mut entry.timer,
                    stats: &self.stats,
                };
                self.quirks.timer(&mut cx, &mut entry.quirks);
            }
            // Re-queued for the time set now (later if the flow was heard from since).
            arm(&mut self.timers, key, entry);
            self.end_if_done(now, key);
        }
        while let Some(packet) = self.to_stack.pop_front() {
            forward(packet);
        }
    }

    /// The earliest time [`service`](Self::service) has a timeout to act on.
    pub fn poll_timeout(&mut self) -> Option<Instant> {
        let mut handshake = None;
        while let Some(&(deadline, key)) = self.released.front() {
            let entry = self.table.id(&key).and_then(|id| self.table.get(id));
            if matches!(entry, Some(Entry { waiting: Some((_, d)), .. }) if *d == deadline) {
                handshake = Some(deadline);
                break;
            }
            self.released.pop_front();
        }
        // A timer entry may be early (the flow's timer moved since): `service` re-queues it.
        let timer = self.timers.peek().map(|Reverse((at, _))| *at);
        // A linger's end lets an idle stack be seen as idle (see `flow_count`).
        let linger = self.linger_expiry.front().map(|(at, _)| *at);
        handshake.into_iter().chain(timer).chain(linger).min()
    }

    /// The stack accepted a connection from `client` to `dst`: returns the flow's port if
    /// it was admitted and not yet bridged. A stream without a port (a stack that made a
    /// second stream for a retransmitted SYN) should be dropped.
    pub fn take_port(&mut self, client: SocketAddr, dst: SocketAddr) -> Option<FlowPort> {
        let id = self.table.id(&(client, dst))?;
        self.table.get_mut(id)?.waiting.take().map(|(port, _)| port)
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
                if let Some(Entry { waiting: None, last: Some(last), .. }) = self.table.get(id) {
                    let last = *last;
                    self.table.reset(&last);
                }
                self.remove(now, id, Close::Reset);
            }
            self.aborted.insert(key, now + ABORT_LINGER);
        }
    }

    /// Looks at a packet the stack wrote for the TUN: `false` if it must not go out. A
    /// stream stack has no way to reset a connection (dropping its stream sends FIN, or
    /// nothing): for a flow whose handler aborted, each segment the stack sends is
    /// replaced by a RST at the segment's own sequence number, so the client sees the
    /// reset every other backend gives. Costs nothing while no aborted flow lingers
    /// (and the quirks do not watch the output).
    pub fn pass_output(&mut self, now: Instant, packet: &PacketBuf) -> bool {
        self.take_aborts(now);
        if Q::WATCHES_OUTPUT || !Q::LINGER.is_zero() {
            if let Ok(Classified::Tcp(seg)) = packet::classify(packet.packet()) {
                let key = (seg.dst, seg.src);
                if let Some(entry) = self.table.id(&key).and_then(|id| self.table.get_mut(id)) {
                    if Q::WATCHES_OUTPUT {
                        let mut cx = QuirkCx {
                            now,
                            to_stack: &mut self.to_stack,
                            to_client: &mut self.to_client,
                            timer: &mut entry.timer,
                            stats: &self.stats,
                        };
                        let pass = self.quirks.stack_segment(&mut cx, &mut entry.quirks, packet.packet(), &seg);
                        arm(&mut self.timers, key, entry);
                        self.end_if_done(now, key);
                        if pass == Pass::Withhold {
                            return false;
                        }
                    }
                } else if let Some(until) = self.lingering.get_mut(&key) {
                    // The stack still sends for the ended connection: it lingers on (renewed
                    // at most twice per LINGER, so the expiry queue stays short).
                    if *until < now + Q::LINGER / 2 {
                        *until = now + Q::LINGER;
                        self.linger_expiry.push_back((*until, key));
                    }
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

    /// A bridge ended: forget the flow. Its later segments get RST from here, or, for a
    /// stack that may still hold the connection ([`StreamQuirks::LINGER`]), go to the
    /// stack for that long.
    pub fn finished(&mut self, now: Instant, key: FlowKey) {
        self.take_aborts(now);
        let Some(id) = self.table.id(&key) else { return };
        if let Some(entry @ Entry { waiting: None, .. }) = self.table.get_mut(id) {
            if self.quirks.outlives_bridge(&entry.quirks) {
                entry.bridge_ended = true;
                return;
            }
            self.remove(now, id, Close::Clean);
            if !Q::LINGER.is_zero() && !self.aborted.contains_key(&key) {
                let until = now + Q::LINGER;
                self.lingering.insert(key, until);
                self.linger_expiry.push_back((until, key));
            }
        }
    }

    /// Forgets a flow kept past its bridge's end once the quirks are done with it.
    fn end_if_done(&mut self, now: Instant, key: FlowKey) {
        let Some(id) = self.table.id(&key) else { return };
        if self.table.get(id).is_some_and(|e| e.bridge_ended && !self.quirks.outlives_bridge(&e.quirks)) {
            self.finished(now, key);
        }
    }

    /// Whether the stack may still hold `key`'s ended connection.
    fn lingers(&mut self, now: Instant, key: FlowKey) -> bool {
        self.forget_lingering(now);
        self.lingering.get(&key).is_some_and(|&until| until > now)
    }

    /// Forgets the ended connections whose linger has passed.
    fn forget_lingering(&mut self, now: Instant) {
        while let Some(&(until, old)) = self.linger_expiry.front() {
            if until > now {
                break;
            }
            self.linger_expiry.pop_front();
            if self.lingering.get(&old) == Some(&until) {
                self.lingering.remove(&old);
            }
        }
        super::give_back_growth(&mut self.lingering);
    }

    fn remove(&mut self, now: Instant, id: crate::FlowId, close: Close) {
        let key = self.table.key(id);
        let Some(entry) = self.table.remove(id, close) else { return };
        if let Some((port, _)) = entry.waiting {
            port.finish(close == Close::Reset);
        }
        if let Some(key) = key {
            self.quirks.ended(now, key, entry.quirks);
        }
    }

    /// The next packet this layer wants written to the TUN (RSTs, UDP replies).
    pub fn poll_transmit(&mut self) -> Option<PacketBuf> {
        self.to_client.pop_front().or_else(|| self.table.poll_transmit())
    }
}

/// Queues the flow's timer in `timers` unless an entry at or before it is queued already.
fn arm<F>(timers: &mut BinaryHeap<Reverse<(Instant, FlowKey)>>, key: FlowKey, entry: &mut Entry<F>) {
    if let Some(at) = entry.timer {
        if entry.queued.is_none_or(|queued| at < queued) {
            entry.queued = Some(at);
            timers.push(Reverse((at, key)));
        }
    }
}

#[cfg(test)]
mod tests {
    use smoltcp::wire::TcpControl;

    use super::*;
    use crate::Dispatch;
    use crate::packet::Classified;

    fn tcp(packet: &[u8]) -> TcpSummary {
        match packet::classify(packet) {
            Ok(Classified::Tcp(seg)) => {
                assert!(packet::tcp_checksum_ok(packet, &seg), "checksum of {seg:?}");
                seg
            }
            other => panic!("not TCP: {other:?}"),
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
}
