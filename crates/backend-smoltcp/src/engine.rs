//! The smoltcp packet engine: demultiplexing, flow set-up and teardown, timers.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use smoltcp::iface::{Config, Interface, PollResult, SocketHandle, SocketSet};
use smoltcp::socket::tcp;
use smoltcp::time::{Duration as SmolDuration, Instant as SmolInstant};
use smoltcp::wire::{HardwareAddress, IpAddress, IpListenEndpoint, TcpControl};
use tungate_core::admission::{Close, Decided, FlowTable, Held, Inbound, Seen};
use tungate_core::engine::{Engine, Handled};
use tungate_core::flow::{FlowIo, FlowLink, WakeQueue};
use tungate_core::packet::{self, Classified, SegmentFields, TcpSummary};
use tungate_core::{Dispatch, FlowId, PacketBuf};

use crate::SmoltcpConfig;
use crate::device::{FlowDevice, Output};

/// The smoltcp backend's I/O-free engine. See the crate docs for the packet path.
pub struct SmoltcpEngine {
    config: SmoltcpConfig,
    epoch: Instant,
    /// Every flow: held until its handler decides (admission), then a [`Flow`].
    flows: FlowTable<Flow>,
    /// (deadline, flow) min-heap; an entry is live only if it equals the flow's `armed`.
    timers: BinaryHeap<Reverse<(Instant, FlowId)>>,
    woken: Vec<FlowId>,
    /// Flows that received packets in the current batch.
    pending_egress: Vec<FlowId>,
    out: Output,
    seed: u64,
}

impl std::fmt::Debug for SmoltcpEngine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SmoltcpEngine").field("flows", &self.flows.len()).finish_non_exhaustive()
    }
}

/// An admitted flow: its own interface and socket.
struct Flow {
    link: FlowLink,
    open: Box<OpenFlow>,
    /// The deadline this flow has a live entry for in the timer heap.
    armed: Option<Instant>,
    /// Packets arrived in this batch; `flush` polls the flow.
    egress_pending: bool,
}

struct OpenFlow {
    iface: Interface,
    sockets: SocketSet<'static>,
    handle: SocketHandle,
    /// The handshake completed; from now on "cannot receive" means the client sent FIN.
    established: bool,
    rx_eof: bool,
    fin_queued: bool,
    /// The sequence number just past the last byte the socket's receive buffer can hold:
    /// the client's first byte + the bytes handed to the handler + the buffer's capacity.
    /// Client data past it is cut before smoltcp sees it (see `handle_packet`).
    rx_edge: u32,
}

impl SmoltcpEngine {
    /// An engine started at `now` whose flows' initial sequence numbers and ports derive
    /// from `seed` (smoltcp's `random_seed`): the caller's randomness, so a test can
    /// repeat a run exactly.
    pub fn new(config: SmoltcpConfig, handlers: Dispatch, now: Instant, seed: u64) -> Self {
        let flows = FlowTable::new(&handlers, config.mtu, config.ring_capacity);
        let out = Output::new(config.mtu.get(), config.verify_tcp_checksum, config.segmentation_offload);
        SmoltcpEngine {
            config,
            epoch: now,
            flows,
            timers: BinaryHeap::new(),
            woken: Vec::new(),
            pending_egress: Vec::new(),
            out,
            seed,
        }
    }

    /// Flows currently tracked (pending or open).
    pub fn flow_count(&self) -> usize {
        self.flows.len()
    }

    fn smol_now(&self, now: Instant) -> SmolInstant {
        SmolInstant::from_micros(now.saturating_duration_since(self.epoch).as_micros() as i64)
    }

    fn std_instant(&self, t: SmolInstant) -> Instant {
        self.epoch + Duration::from_micros(t.total_micros().max(0) as u64)
    }

    /// Acts on a flow the handler touched: its decision, or bytes and signals.
    fn service(&mut self, id: FlowId, now: Instant) {
        match self.flows.decide(id) {
            Decided::Admitted => self.poll_flow(id, now, None),
            Decided::Accepted(held) => self.accept(id, held, now),
            Decided::Waiting | Decided::Rejected | Decided::Gone => {}
        }
    }

    fn accept(&mut self, id: FlowId, held: Held, now: Instant) {
        let t = self.smol_now(now);
        let Held { link, syn, summary } = held;
        let (client, dst) = (summary.src, summary.dst);
        let mut config = Config::new(HardwareAddress::Ip);
        self.seed = self.seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        config.random_seed = self.seed;
        let mut device = FlowDevice { rx: None, out: &mut self.out };
        let mut iface = Interface::new(config, &mut device, t);
        iface.set_any_ip(true);
        // Every reply goes to the client; smoltcp wants a route to call it reachable.
        let routed = match client.ip() {
            IpAddr::V4(a) => iface.routes_mut().add_default_ipv4_route(a).is_ok(),
            IpAddr::V6(a) => iface.routes_mut().add_default_ipv6_route(a).is_ok(),
        };
        let mut socket = tcp::Socket::new(
            tcp::SocketBuffer::new(vec![0; self.config.tcp_rx_buffer]),
            tcp::SocketBuffer::new(vec![0; self.config.tcp_tx_buffer]),
        );
        socket.set_nagle_enabled(false);
        // smoltcp aborts a socket that heard nothing for `timeout`, idle or not; keep-alive
        // probes at a quarter of it keep a live but quiet client from being reset, while
        // a vanished one is still dropped after `tcp_timeout`.
        let timeout = SmolDuration::from_micros(self.config.tcp_timeout.as_micros() as u64);
        socket.set_timeout(Some(timeout));
        socket.set_keep_alive(Some(timeout / 4));
        let listening = socket.listen(IpListenEndpoint { addr: Some(IpAddress::from(dst.ip())), port: dst.port() });
        if !routed || listening.is_err() {
            link.set_closed(true);
            self.flows.remove(id, Close::Reset);
            self.flows.reset(&summary);
            return;
        }
        let mut sockets = SocketSet::new(Vec::with_capacity(1));
        let handle = sockets.add(socket);
        let rx_edge = summary.seq.wrapping_add(1).wrapping_add(self.config.tcp_rx_buffer as u32);
        let open = Box::new(OpenFlow {
            iface,
            sockets,
            handle,
            established: false,
            rx_eof: false,
            fin_queued: false,
            rx_edge,
        });
        self.flows.admit(id, Flow { link, open, armed: None, egress_pending: false });
        // A SYN smoltcp would not take leaves the socket listening, which `poll_flow`
        // treats as the end of the flow; the client then hears nothing and retries.
        self.poll_flow(id, now, Some(syn.packet()));
    }

    /// Feeds `packet` to its flow and moves received bytes to the handler, but leaves
    /// transmission to [`Engine::flush`] after the batch: one cumulative ACK (and one
    /// burst of data) per flow per batch instead of one per packet — at MTU 1500 the
    /// ACK writes are half of the gateway's system calls.
    fn ingress(&mut self, id: FlowId, now: Instant, packet: &[u8]) {
        let t = self.smol_now(now);
        let Some(flow) = self.flows.get_mut(id) else { return };
        let open = &mut flow.open;
        let mut device = FlowDevice { rx: Some(packet), out: &mut self.out };
        open.iface.poll_ingress_single(t, &mut device, &mut open.sockets);
        let socket = open.sockets.get_mut::<tcp::Socket>(open.handle);
        let mut taken = 0;
        flow.link.pump(|io| taken = deliver_received(socket, io));
        open.rx_edge = open.rx_edge.wrapping_add(taken as u32);
        if !flow.egress_pending {
            flow.egress_pending = true;
            self.pending_egress.push(id);
        }
    }

    /// Runs one flow's interface (with `rx` if a packet arrived for it), moves bytes
    /// between its socket and the handler, and re-arms its timer.
    fn poll_flow(&mut self, id: FlowId, now: Instant, rx: Option<&[u8]>) {
        let t = self.smol_now(now);
        let Some(flow) = self.flows.get_mut(id) else { return };
        let open = &mut *flow.open;
        // `Interface::poll`, but with `OpenFlow::egress`'s guard on what it sends.
        open.iface.poll_maintenance(t);
        if rx.is_some() {
            open.iface.poll_ingress_single(t, &mut FlowDevice { rx, out: &mut self.out }, &mut open.sockets);
        }
        open.egress(t, &mut self.out);

        let socket = open.sockets.get_mut::<tcp::Socket>(open.handle);
        let state = socket.state();
        if !open.established && !matches!(state, tcp::State::Listen | tcp::State::SynReceived | tcp::State::Closed) {
            open.established = true;
        }
        let mut taken = 0;
        let signals = flow.link.pump(|io| {
            taken = deliver_received(socket, io);
            queue_for_sending(socket, io);
        });
        open.rx_edge = open.rx_edge.wrapping_add(taken as u32);
        if signals.abort_requested {
            socket.abort();
        } else if signals.tx_finished && !open.fin_queued && open.established {
            socket.close();
            open.fin_queued = true;
        }
        // The client's FIN counts only once every byte before it reached the handler:
        // smoltcp then reports `Finished`. After a RST it reports `InvalidState` instead,
        // so a reset never passes for a clean end.
        if open.established && !open.rx_eof && matches!(socket.recv(|_| (0, ())), Err(tcp::RecvError::Finished)) {
            open.rx_eof = true;
            flow.link.set_rx_eof();
        }
        open.egress(t, &mut self.out);

        let socket = open.sockets.get::<tcp::Socket>(open.handle);
        let state = socket.state();
        // A listening socket after accept means the client reset the handshake (smoltcp
        // returns SYN-RECEIVED to LISTEN on RST).
        let done = matches!(state, tcp::State::Closed | tcp::State::Listen)
            || (state == tcp::State::TimeWait && signals.handler_gone);
        // Bytes still in the socket after a graceful close wait for the handler; its reads
        // queue the flow again (the ring is full, so the flow is marked blocked).
        let undelivered = socket.recv_queue() > 0 && !signals.handler_gone;
        if done && !undelivered {
            // A clean end is FIN both ways; anything else closing the socket was a reset.
            let clean = open.rx_eof && open.fin_queued;
            flow.link.set_closed(!clean);
            // Admitted: the handler learns of the end from the link, just above.
            self.flows.remove(id, Close::Clean);
            return;
        }
        if let Some(d) = open.iface.poll_at(t, &open.sockets).map(|d| self.std_instant(d)) {
            self.arm(id, d);
        }
    }

    /// Makes sure flow `id` is polled by `deadline`. An entry is pushed only when the
    /// deadline is earlier than the one armed; a later one is found when the armed entry
    /// fires and the flow re-arms. Superseded entries stay in the heap until they surface,
    /// so the heap is rebuilt from the live deadlines once it holds far more entries than
    /// there are flows: memory stays O(flows) at O(1) amortised cost per push.
    fn arm(&mut self, id: FlowId, deadline: Instant) {
        let Some(flow) = self.flows.get_mut(id) else { return };
        if flow.armed.is_some_and(|armed| armed <= deadline) {
            return;
        }
        flow.armed = Some(deadline);
        self.timers.push(Reverse((deadline, id)));
        if self.timers.len() > 4 * self.flows.len() + 64 {
            self.timers = self.flows.iter().filter_map(|(id, f)| f.armed.map(|d| Reverse((d, id)))).collect();
        }
    }
}

/// The longest packet an empty TCP segment can be: an IPv6 header and a TCP header with
/// all 40 bytes of options.
const EMPTY_SEGMENT_MAX: usize = 40 + 60;

impl OpenFlow {
    /// Emits everything smoltcp has due, not one segment per call (one per call starved
    /// MTU 1500 downloads; bursts capped at 8 or 32 segments measured no better).
    ///
    /// smoltcp 0.14 can emit the same empty segment forever: a zero-window probe timer
    /// still armed when the socket leaves the states that send data is never re-armed,
    /// so every dispatch sends an ACK again and `poll_egress` never reports "nothing to
    /// do" (a client that acknowledged our FIN with a zero window, after a probe: FIN-WAIT-2;
    /// found by fuzzing, `fuzz/regressions/engine_smoltcp/`). The same empty segment twice
    /// in a row is that loop; the repeat is dropped. In FIN-WAIT-2 and TIME-WAIT nothing
    /// is left to send, so the client's window no longer matters: a window update made
    /// from the stuck ACK (as if the client had opened its window) stops the timer. In
    /// any other state the flow is reset rather than left spinning.
    fn egress(&mut self, t: SmolInstant, out: &mut Output) {
        let mut last_empty: Option<TcpSummary> = None;
        let mut unstuck = false;
        loop {
            let before = out.queue.len();
            if self.iface.poll_egress(t, &mut FlowDevice { rx: None, out: &mut *out }, &mut self.sockets)
                == PollResult::None
            {
                return;
            }
            // Only a short packet can be an empty segment: data segments are never parsed.
            let empty = match out.queue.back() {
                Some(p) if out.queue.len() > before && p.len() <= EMPTY_SEGMENT_MAX => {
                    match packet::classify(p.packet()) {
                        Ok(Classified::Tcp(seg)) if seg.segment_len == 0 && !seg.rst => Some(seg),
                        _ => None,
                    }
                }
                _ => None,
            };
            if empty.is_none() || empty != last_empty {
                last_empty = empty;
                continue;
            }
            let Some(stuck) = empty else { continue };
            out.queue.pop_back();
            last_empty = None;
            let socket = self.sockets.get_mut::<tcp::Socket>(self.handle);
            let state = socket.state();
            if unstuck {
                tracing::warn!(?state, src = %stuck.dst, dst = %stuck.src, "smoltcp sends the same ACK without end; flow reset");
                socket.abort();
                // The RST goes out; the socket is then closed and sends nothing more.
                while self.iface.poll_egress(t, &mut FlowDevice { rx: None, out: &mut *out }, &mut self.sockets)
                    != PollResult::None
                {}
                return;
            }
            unstuck = true;
            if matches!(state, tcp::State::FinWait2 | tcp::State::TimeWait) {
                let update =
                    SegmentFields::new(stuck.dst, stuck.src, TcpControl::None, stuck.ack_number, Some(stuck.seq))
                        .build();
                self.iface.poll_ingress_single(
                    t,
                    &mut FlowDevice { rx: Some(&update), out: &mut *out },
                    &mut self.sockets,
                );
            }
        }
    }
}

/// Moves what the socket received into the handler's ring, until either runs dry. A full
/// ring leaves the rest in the socket (its window closes) and marks the flow blocked, so
/// the handler's next read queues the flow again. Returns the bytes moved.
fn deliver_received(socket: &mut tcp::Socket<'_>, io: &mut FlowIo<'_>) -> usize {
    let mut moved = 0;
    while socket.can_recv() {
        match socket.recv(|data| {
            let n = io.deliver(data);
            (n, n)
        }) {
            Ok(n) if n > 0 => moved += n,
            _ => break,
        }
    }
    moved
}

/// Moves what the handler wrote into the socket's send buffer, as far as it has room.
fn queue_for_sending(socket: &mut tcp::Socket<'_>, io: &mut FlowIo<'_>) {
    while socket.can_send() {
        let given = socket.send(|space| {
            let n = io.fill(space);
            (n, n)
        });
        if !matches!(given, Ok(n) if n > 0) {
            break;
        }
    }
}

impl Engine for SmoltcpEngine {
    fn handle_packet(&mut self, now: Instant, packet: &mut PacketBuf) -> Handled {
        match self.flows.inbound(now, packet) {
            // smoltcp 0.14 cuts a segment's data at the window edge of its last ACK but
            // still takes the segment's FIN: a client whose view of the edge is further
            // (the edge moved back by window-scale rounding) lost the bytes past it
            // behind a clean end of stream (the last 8 bytes of a 16 MiB upload, under
            // --max-memory). Data and FIN go in as two segments: a FIN after cut data
            // then lies past what smoltcp has, which it ignores until the client sends
            // the rest again.
            Inbound::Tcp(mut seg, Seen::Admitted(id)) => {
                // smoltcp 0.14 takes data up to the edge of the window it last advertised,
                // but keeps a SYN-ACK's window (never scaled) as if it were scaled: until
                // its next segment, the edge it checks lies up to 2^shift times past its
                // receive buffer. Data beyond the buffer went into its reassembly as
                // received but not into the buffer, and reached the handler later as
                // whatever the buffer held there (found by fuzzing: `fuzz/regressions/
                // engine_smoltcp/`). No client may send past the buffer (no window it
                // was given reaches further), so such data is cut here, as a window would.
                if let Some(flow) = self.flows.get(id) {
                    let cut = packet::trim_payload_at(packet, &mut seg, flow.open.rx_edge);
                    if cut > 0 {
                        tracing::trace!(src = %seg.src, dst = %seg.dst, cut, "client data past the receive buffer cut");
                    }
                }
                match packet::split_fin(packet.packet(), &seg) {
                    Some((data, fin)) => {
                        self.ingress(id, now, data.packet());
                        self.ingress(id, now, fin.packet());
                    }
                    None => self.ingress(id, now, packet.packet()),
                }
            }
            Inbound::Tcp(seg, Seen::Unknown) => self.flows.reset(&seg),
            Inbound::Tcp(_, Seen::Consumed | Seen::UnknownRst) | Inbound::Done => {}
        }
        Handled::Consumed
    }

    fn flush(&mut self, now: Instant) {
        let mut pending = std::mem::take(&mut self.pending_egress);
        for &id in &pending {
            if let Some(flow) = self.flows.get_mut(id) {
                flow.egress_pending = false;
                self.poll_flow(id, now, None);
            }
        }
        pending.clear();
        self.pending_egress = pending;
    }

    fn handle_wakeups(&mut self, now: Instant) {
        let mut woken = std::mem::take(&mut self.woken);
        self.flows.wake_queue().drain_into(&mut woken);
        for &id in &woken {
            self.service(id, now);
        }
        woken.clear();
        self.woken = woken;
    }

    fn handle_timeout(&mut self, now: Instant) {
        while let Some(&Reverse((deadline, id))) = self.timers.peek() {
            if deadline > now {
                break;
            }
            self.timers.pop();
            let Some(flow) = self.flows.get_mut(id) else { continue };
            if flow.armed != Some(deadline) {
                continue;
            }
            flow.armed = None;
            self.poll_flow(id, now, None);
        }
    }

    fn poll_timeout(&mut self) -> Option<Instant> {
        // Drop stale heads so the driver does not wake for nothing.
        while let Some(&Reverse((deadline, id))) = self.timers.peek() {
            match self.flows.get(id) {
                Some(flow) if flow.armed == Some(deadline) => return Some(deadline),
                _ => {
                    self.timers.pop();
                }
            }
        }
        None
    }

    fn poll_transmit(&mut self) -> Option<PacketBuf> {
        // The stack's output first: it is the bulk, and the table's queues are usually
        // empty (looking costs one atomic load then).
        self.out.queue.pop_front().or_else(|| self.flows.poll_transmit())
    }

    fn wake_queue(&self) -> Arc<WakeQueue> {
        self.flows.wake_queue()
    }

    fn flows(&mut self) -> Option<&mut dyn tungate_core::admission::Flows> {
        Some(&mut self.flows)
    }
}

#[cfg(test)]
mod tests {
    //! The engine driven by hand: packets in, packets out, a simulated clock.

    use smoltcp::wire::TcpControl;
    use tungate_core::packet::{self, TcpSummary};
    use tungate_testkit::engine::Hold;

    use super::*;

    const CLIENT: &str = "198.18.0.2:40000";
    const SERVER: &str = "10.77.0.2:80";

    fn segment(control: TcpControl, seq: u32, ack: Option<u32>) -> PacketBuf {
        let (src, dst) = (CLIENT.parse().unwrap(), SERVER.parse().unwrap());
        PacketBuf::from_vec(packet::SegmentFields::new(src, dst, control, seq, ack).build())
    }

    fn engine() -> (SmoltcpEngine, Hold, Instant) {
        let hold = Hold::default();
        let handlers = hold.dispatch();
        let now = Instant::now();
        (SmoltcpEngine::new(SmoltcpConfig::default(), handlers, now, 1), hold, now)
    }

    fn drain(e: &mut SmoltcpEngine) -> Vec<TcpSummary> {
        tungate_testkit::engine::drain_tcp(e)
    }

    #[test]
    fn syn_waits_for_the_handler_and_retransmissions_are_deduplicated() {
        let (mut e, hold, now) = engine();
        e.handle_packet(now, &mut segment(TcpControl::Syn, 1000, None));
        e.handle_packet(now, &mut segment(TcpControl::Syn, 1000, None));
        e.flush(now);
        assert!(drain(&mut e).is_empty(), "nothing is sent before the handler decides");
        let stats = e.flows.stats().snapshot();
        assert_eq!((stats.tcp_requests, stats.tcp_syn_duplicate), (1, 1));

        let request = hold.take();
        assert_eq!(request.src(), CLIENT.parse().unwrap());
        assert_eq!(request.dst(), SERVER.parse().unwrap());
        let _flow = tungate_testkit::engine::accept_now(request);
        e.handle_wakeups(now);
        let out = drain(&mut e);
        assert_eq!(out.len(), 1);
        let syn_ack = out[0];
        assert!(syn_ack.syn && syn_ack.ack, "{syn_ack:?}");
        assert_eq!(
            (syn_ack.src, syn_ack.dst, syn_ack.ack_number),
            (SERVER.parse().unwrap(), CLIENT.parse().unwrap(), 1001)
        );

        // The handshake completes; the flow is tracked until it closes.
        e.handle_packet(now, &mut segment(TcpControl::None, 1001, Some(syn_ack.seq.wrapping_add(1))));
        e.flush(now);
        assert_eq!(e.flow_count(), 1);
    }

    #[test]
    fn a_client_reset_during_the_handshake_ends_the_flow() {
        let (mut e, hold, now) = engine();
        e.handle_packet(now, &mut segment(TcpControl::Syn, 1000, None));
        let mut flow = tungate_testkit::engine::accept_now(hold.take());
        e.handle_wakeups(now);
        assert!(drain(&mut e)[0].syn);
        // The client gave up meanwhile and answers the SYN-ACK with RST.
        e.handle_packet(now, &mut segment(TcpControl::Rst, 1001, None));
        e.flush(now);
        assert_eq!(e.flow_count(), 0, "the flow is gone, not left listening");
        let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
        let read = rt.block_on(tokio::io::AsyncReadExt::read(&mut flow, &mut [0u8; 8]));
        assert_eq!(read.unwrap_err().kind(), std::io::ErrorKind::ConnectionReset);
    }

    #[test]
    fn the_timer_heap_stays_proportional_to_the_flows() {
        let (mut e, hold, now) = engine();
        e.handle_packet(now, &mut segment(TcpControl::Syn, 1, None));
        let _flow = tungate_testkit::engine::accept_now(hold.take());
        e.handle_wakeups(now);
        let id = e.flows.iter().next().unwrap().0;
        // Ever-earlier deadlines each push an entry and supersede the one before.
        let base = e.flows.get(id).unwrap().armed.expect("the SYN-ACK's retransmission timer is armed");
        for i in 1..=10_000u64 {
            e.arm(id, base - Duration::from_micros(i));
        }
        assert!(e.timers.len() <= 4 * e.flow_count() + 64, "heap holds {} entries", e.timers.len());
        assert_eq!(e.poll_timeout(), Some(base - Duration::from_micros(10_000)));
    }

    #[test]
    /// The table's RST reaches the engine's output (the contract itself: admission's tests).
    fn rejected_syn_gets_rst_ack_and_leaves_nothing() {
        let (mut e, hold, now) = engine();
        e.handle_packet(now, &mut segment(TcpControl::Syn, 7, None));
        hold.take().reject();
        e.handle_wakeups(now);
        let out = drain(&mut e);
        assert_eq!(out.len(), 1);
        assert!(out[0].rst && out[0].ack && out[0].ack_number == 8, "{:?}", out[0]);
        assert_eq!(e.flow_count(), 0);
        assert_eq!(e.flows.stats().snapshot().tcp_active, 0);
    }

    #[test]
    fn an_unanswered_syn_ack_times_out_and_resets_the_handler() {
        let (mut e, hold, now) = engine();
        e.handle_packet(now, &mut segment(TcpControl::Syn, 1, None));
        let flow = tungate_testkit::engine::accept_now(hold.take());
        e.handle_wakeups(now);
        drain(&mut e);
        // Advance a simulated clock through smoltcp's retransmissions until it gives up.
        let mut t = now;
        for _ in 0..10_000 {
            let Some(deadline) = e.poll_timeout() else { break };
            t = deadline.max(t + Duration::from_millis(1));
            e.handle_timeout(t);
            drain(&mut e);
        }
        assert_eq!(e.flow_count(), 0, "the flow is gone after the SYN-ACK went unanswered");
        assert!(t - now <= Duration::from_secs(300), "gave up within the configured timeout");
        let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
        let mut flow = flow;
        let read = rt.block_on(tokio::io::AsyncReadExt::read(&mut flow, &mut [0u8; 8]));
        assert_eq!(read.unwrap_err().kind(), std::io::ErrorKind::ConnectionReset);
    }

    /// smoltcp 0.14 checks client data against the SYN-ACK's window (65535, never
    /// scaled) as if it were scaled, so until its next segment it took data up to
    /// 2^shift × 64 KiB ahead into its reassembly though its buffer ends far sooner; the
    /// bytes past the buffer later reached the handler as whatever the buffer held there
    /// (in debug builds: its `len_written == payload_len` assertion). Here a client sends
    /// 1 000 bytes across the buffer's end right after the handshake, fills the hole and
    /// sends the tail again, as a client retransmits unacknowledged data: the handler
    /// must read the stream exactly.
    #[test]
    fn client_data_past_the_receive_buffer_never_reaches_the_handler_unwritten() {
        use tokio::io::AsyncReadExt;
        use tungate_core::api::tcp::now_or_never;
        const CAP: usize = 128 * 1024; // smoltcp's window shift: 2
        let hold = Hold::default();
        let now = Instant::now();
        let config = SmoltcpConfig { tcp_rx_buffer: CAP, ..SmoltcpConfig::default() };
        let mut e = SmoltcpEngine::new(config, hold.dispatch(), now, 1);
        let (src, dst) = (CLIENT.parse().unwrap(), SERVER.parse().unwrap());
        let send = |e: &mut SmoltcpEngine, seq: u32, ack: Option<u32>, control, payload: &[u8], wscale| {
            let mut fields = packet::SegmentFields::new(src, dst, control, seq, ack).payload(payload);
            fields.window_scale = wscale;
            e.handle_packet(now, &mut PacketBuf::from_vec(fields.build()));
            e.flush(now);
        };
        let stream: Vec<u8> = (0..CAP + 900).map(|i| (i % 251) as u8 ^ (i / 251) as u8).collect();
        let mut flow = tungate_testkit::engine::accept_now({
            send(&mut e, 999, None, TcpControl::Syn, &[], Some(7));
            hold.take()
        });
        e.handle_wakeups(now);
        let syn_ack = drain(&mut e)[0];
        assert_eq!(syn_ack.window, 65535, "the SYN-ACK's window is not scaled");
        let ack = Some(syn_ack.seq.wrapping_add(1));
        send(&mut e, 1000, ack, TcpControl::None, &[], None);
        assert!(drain(&mut e).is_empty());

        let mut read = Vec::new();
        let mut take = |e: &mut SmoltcpEngine, read: &mut Vec<u8>| {
            let mut buf = vec![0u8; 64 * 1024];
            while let Some(Ok(n @ 1..)) = now_or_never(flow.read(&mut buf)) {
                read.extend_from_slice(&buf[..n]);
                e.handle_wakeups(now);
            }
            drain(e)
        };
        // Past the buffer's end by 900 bytes, before any other data.
        send(&mut e, 1000 + (CAP - 100) as u32, ack, TcpControl::None, &stream[CAP - 100..], None);
        take(&mut e, &mut read);
        for start in (0..CAP - 100).step_by(1000) {
            let end = (start + 1000).min(CAP - 100);
            send(&mut e, 1000 + start as u32, ack, TcpControl::None, &stream[start..end], None);
            take(&mut e, &mut read);
        }
        let acked = take(&mut e, &mut read).last().map_or(0, |s| s.ack_number.wrapping_sub(1000));
        send(&mut e, 1000 + CAP as u32, ack, TcpControl::None, &stream[CAP..], None);
        take(&mut e, &mut read);
        assert_eq!(read.len(), stream.len(), "bytes read (acknowledged {acked} before the tail)");
        assert!(read == stream, "the handler read other bytes than the client sent");
        // The delayed ACK covers the whole stream.
        e.handle_timeout(now + Duration::from_secs(1));
        let last = drain(&mut e).last().copied().expect("the tail is acknowledged");
        assert_eq!(last.ack_number, 1000 + stream.len() as u32);
    }

    /// A client that stops reading near the end of a download: it acknowledges our data
    /// with a zero window, takes the zero-window probes byte by byte, and acknowledges
    /// the last one and our FIN with a zero window still. smoltcp 0.14 then sits in
    /// FIN-WAIT-2 with its probe timer armed and, when it expires, sent the same ACK
    /// without end (memory grew until the process died). The engine must send a few
    /// packets at most, and the client's half of the connection must still work: its
    /// upload and FIN reach the handler.
    #[test]
    fn a_probe_timer_left_armed_after_our_fin_does_not_spin() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        use tungate_core::api::tcp::now_or_never;
        let (mut e, hold, start) = engine();
        let (src, dst) = (CLIENT.parse().unwrap(), SERVER.parse().unwrap());
        let send = |e: &mut SmoltcpEngine, now, seq: u32, ack: Option<u32>, control, payload: &[u8], window| {
            let mut fields = packet::SegmentFields::new(src, dst, control, seq, ack).payload(payload);
            fields.window = window;
            e.handle_packet(now, &mut PacketBuf::from_vec(fields.build()));
            e.flush(now);
        };
        send(&mut e, start, 999, None, TcpControl::Syn, &[], 65535);
        let mut flow = tungate_testkit::engine::accept_now(hold.take());
        e.handle_wakeups(start);
        let server = drain(&mut e)[0].seq.wrapping_add(1);
        send(&mut e, start, 1000, Some(server), TcpControl::None, &[], 5);
        assert_eq!(now_or_never(flow.write(b"0123456789")).unwrap().unwrap(), 10);
        now_or_never(flow.shutdown()).unwrap().unwrap();
        e.handle_wakeups(start);

        // Every byte and the FIN acknowledged with a zero window as they come.
        let mut now = start;
        let mut acked = 0u32;
        while acked < 11 {
            for seg in drain(&mut e) {
                let end = seg.seq.wrapping_add(seg.segment_len as u32).wrapping_sub(server);
                if seg.segment_len > 0 && end > acked {
                    acked = end;
                    send(&mut e, now, 1000, Some(server.wrapping_add(acked)), TcpControl::None, &[], 0);
                }
            }
            let next = e.poll_timeout().expect("a probe is due");
            assert!(next - start < Duration::from_secs(100), "all 10 bytes and the FIN went out in time");
            now = next.max(now);
            e.handle_timeout(now);
        }
        // The probe timer expires in FIN-WAIT-2.
        for _ in 0..3 {
            now = e.poll_timeout().map_or(now, |d| d.max(now)) + Duration::from_millis(1);
            e.handle_timeout(now);
            let sent = drain(&mut e);
            assert!(sent.len() <= 2, "{} packets sent at once: {:?}", sent.len(), &sent[..3.min(sent.len())]);
            assert!(sent.iter().all(|s| !s.rst), "the flow is not reset: {sent:?}");
        }
        assert_eq!(e.flow_count(), 1);
        // The client's half still works.
        send(&mut e, now, 1000, Some(server.wrapping_add(11)), TcpControl::Fin, b"the client's upload", 0);
        let mut read = Vec::new();
        let mut buf = [0u8; 64];
        while let Some(Ok(n @ 1..)) = now_or_never(flow.read(&mut buf)) {
            read.extend_from_slice(&buf[..n]);
            e.handle_wakeups(now);
        }
        assert_eq!(read, b"the client's upload");
        assert!(matches!(now_or_never(flow.read(&mut buf)), Some(Ok(0))), "the client's FIN is a clean end");
    }

    #[test]
    fn mutated_packets_never_panic() {
        let (mut e, hold, now) = engine();
        // An open flow, so mutations also reach smoltcp, not just the demultiplexer.
        e.handle_packet(now, &mut segment(TcpControl::Syn, 1, None));
        let _flow = tungate_testkit::engine::accept_now(hold.take());
        e.handle_wakeups(now);
        let syn_ack = drain(&mut e)[0];
        let good = segment(TcpControl::None, 2, Some(syn_ack.seq.wrapping_add(1)));
        let stats = e.flows.stats().clone();
        tungate_testkit::engine::mutations_of_an_open_flow(&mut e, &stats, good.packet(), &hold);
    }
}
