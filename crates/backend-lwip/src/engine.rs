//! The lwIP packet engine: admission, flow life cycle, timers. Safe code only; lwIP is
//! reached through [`crate::ffi::Stack`].

use std::collections::{HashMap, VecDeque};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use slab::Slab;
use tungate_core::engine::Engine;
use tungate_core::flow::{self, Decision, FlowLink, WakeQueue};
use tungate_core::handler::UdpOutbox;
use tungate_core::packet::{self, Classified, TcpSummary};
use tungate_core::{FlowId, Handlers, PacketBuf, Stats, UdpSender};

use crate::LwipConfig;
use crate::ffi::{Event, PcbId, Stack, StackError};

/// lwIP's TCP timer period (TCP_TMR_INTERVAL).
const TICK: Duration = Duration::from_millis(250);

/// A flow's 4-tuple as the client sees it: (client, original destination).
type FlowKey = (SocketAddr, SocketAddr);

/// The lwIP backend's I/O-free engine. See the crate docs for the packet path.
pub struct LwipEngine {
    config: LwipConfig,
    handlers: Handlers,
    stack: Stack,
    flows: Slab<Flow>,
    by_key: HashMap<FlowKey, FlowId>,
    /// Handshakes fed to lwIP, oldest first, with the time they give up (a client that
    /// resets or vanishes during the handshake is freed by lwIP without a callback).
    handshakes: VecDeque<(Instant, FlowId, FlowKey)>,
    next_tick: Option<Instant>,
    now: Instant,
    wake: Arc<WakeQueue>,
    woken: Vec<FlowId>,
    events: Vec<Event>,
    /// Flows with news from lwIP or the handler, serviced at the end of the current step.
    dirty: Vec<FlowId>,
    udp_out: Arc<UdpOutbox>,
    udp_sender: UdpSender,
    /// RSTs the engine builds itself (refusals, before lwIP knows the flow).
    local: VecDeque<PacketBuf>,
    local_free: Vec<PacketBuf>,
    last_from: Source,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Source {
    Local,
    Udp,
    Stack,
}

impl std::fmt::Debug for LwipEngine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LwipEngine").field("flows", &self.flows.len()).finish_non_exhaustive()
    }
}

struct Flow {
    key: FlowKey,
    link: FlowLink,
    stage: Stage,
    dirty: bool,
    /// Packets arrived for it in this batch: flush its delayed ACK at the batch end.
    touched: bool,
}

enum Stage {
    /// Waiting for the handler; the client's SYN is held and fed to lwIP on accept.
    Pending {
        syn: PacketBuf,
        summary: TcpSummary,
    },
    /// SYN fed to lwIP; waiting for the handshake to complete.
    Handshaking,
    Open(Open),
}

struct Open {
    pcb: PcbId,
    rx_eof: bool,
    fin_sent: bool,
    /// lwIP owns the PCB for the rest of its close.
    detached: bool,
}

impl LwipEngine {
    /// Starts lwIP. Fails if this process already runs an lwIP engine.
    pub fn new(config: LwipConfig, handlers: Handlers, now: Instant) -> Result<Self, StackError> {
        let stack = Stack::new(config.mtu.get().min(usize::from(u16::MAX)) as u16)?;
        let wake = WakeQueue::new();
        let udp_out = UdpOutbox::new(config.mtu, wake.clone(), handlers.stats.clone());
        let udp_sender = udp_out.sender();
        Ok(LwipEngine {
            config,
            handlers,
            stack,
            flows: Slab::new(),
            by_key: HashMap::new(),
            handshakes: VecDeque::new(),
            next_tick: None,
            now,
            wake,
            woken: Vec::new(),
            events: Vec::new(),
            dirty: Vec::new(),
            udp_out,
            udp_sender,
            local: VecDeque::new(),
            local_free: Vec::new(),
            last_from: Source::Stack,
        })
    }

    /// Flows currently tracked (pending, handshaking or open).
    pub fn flow_count(&self) -> usize {
        self.flows.len()
    }

    fn stats(&self) -> &Stats {
        &self.handlers.stats
    }

    fn handle_tcp(&mut self, packet: &PacketBuf, seg: TcpSummary) {
        if let Some(&id) = self.by_key.get(&(seg.src, seg.dst)) {
            match self.flows[id.0].stage {
                Stage::Pending { .. } => {
                    if seg.is_bare_syn() {
                        Stats::inc(&self.stats().tcp_syn_duplicate);
                    }
                }
                Stage::Handshaking => {
                    self.input(packet.packet());
                    // lwIP frees a half-open PCB on RST without telling anyone.
                    if seg.rst {
                        self.finish(id, true);
                    }
                }
                Stage::Open(_) => {
                    self.input(packet.packet());
                    let flow = &mut self.flows[id.0];
                    if !flow.touched {
                        flow.touched = true;
                        mark_dirty(&mut self.dirty, flow, id);
                    }
                }
            }
            return;
        }
        if !packet::tcp_checksum_ok(packet.packet(), &seg) {
            Stats::inc(&self.stats().malformed);
            return;
        }
        if seg.is_bare_syn() {
            if !is_unicast(seg.src.ip()) || !is_unicast(seg.dst.ip()) || seg.dst.port() == 0 || seg.src.port() == 0 {
                Stats::inc(&self.stats().malformed);
                return;
            }
            self.open_request(packet, seg);
            return;
        }
        // Not ours — but lwIP may still hold the connection after the engine handed it
        // over (LAST-ACK, TIME-WAIT), so lwIP decides; for a connection it does not know
        // either, its listener answers with RST.
        if !seg.rst {
            Stats::inc(&self.stats().tcp_unknown_flow);
        }
        self.input(packet.packet());
    }

    fn open_request(&mut self, packet: &PacketBuf, seg: TcpSummary) {
        let entry = self.flows.vacant_entry();
        let id = FlowId(entry.key());
        let (link, request) = flow::new_flow(id, seg.src, seg.dst, self.config.ring_capacity, self.wake.clone());
        entry.insert(Flow {
            key: (seg.src, seg.dst),
            link,
            stage: Stage::Pending { syn: PacketBuf::from_slice(packet.packet()), summary: seg },
            dirty: false,
            touched: false,
        });
        self.by_key.insert((seg.src, seg.dst), id);
        Stats::inc(&self.stats().tcp_requests);
        Stats::inc(&self.stats().tcp_active);
        tracing::debug!(src = %seg.src, dst = %seg.dst, "tcp request");
        self.handlers.tcp.handle_tcp(request);
    }

    /// Feeds a packet to lwIP and collects what it reported.
    fn input(&mut self, packet: &[u8]) {
        if !self.stack.input(packet) {
            tracing::debug!(len = packet.len(), "lwIP refused a packet");
        }
        self.collect_events();
    }

    fn collect_events(&mut self) {
        self.stack.drain_events(&mut self.events);
        let mut events = std::mem::take(&mut self.events);
        for event in events.drain(..) {
            match event {
                Event::Accepted { pcb, client, dst } => self.on_accepted(pcb, client, dst),
                Event::Readable(pcb) | Event::Writable(pcb) | Event::Closed(pcb) => {
                    let Some(owner) = self.stack.owner(pcb) else { continue };
                    if let Some(flow) = self.flows.get_mut(owner) {
                        if matches!(&flow.stage, Stage::Open(open) if open.pcb == pcb) {
                            mark_dirty(&mut self.dirty, flow, FlowId(owner));
                        }
                    }
                }
            }
        }
        self.events = events;
    }

    fn on_accepted(&mut self, pcb: PcbId, client: SocketAddr, dst: SocketAddr) {
        let Some(&id) = self.by_key.get(&(client, dst)) else {
            // A handshake the engine gave up on; lwIP's PCB is reset.
            self.stack.release(pcb);
            return;
        };
        let flow = &mut self.flows[id.0];
        if !matches!(flow.stage, Stage::Handshaking) {
            self.stack.release(pcb);
            return;
        }
        self.stack.set_owner(pcb, id.0);
        flow.stage = Stage::Open(Open { pcb, rx_eof: false, fin_sent: false, detached: false });
        mark_dirty(&mut self.dirty, flow, id);
    }

    /// Services every flow marked dirty during this step.
    fn service_dirty(&mut self) {
        // Servicing can mark more flows (lwIP callbacks during writes); loop until quiet.
        while !self.dirty.is_empty() {
            let dirty = std::mem::take(&mut self.dirty);
            for id in dirty {
                if let Some(flow) = self.flows.get_mut(id.0) {
                    flow.dirty = false;
                    self.service(id);
                }
            }
        }
    }

    /// Acts on a flow: the handler's decision, bytes both ways, FIN, reset, end.
    fn service(&mut self, id: FlowId) {
        let Some(flow) = self.flows.get_mut(id.0) else { return };
        let open = match &mut flow.stage {
            Stage::Handshaking => {
                flow.link.clear_queued();
                return;
            }
            Stage::Pending { .. } => {
                flow.link.clear_queued();
                match flow.link.decision() {
                    Decision::Pending => {}
                    Decision::Accepted => {
                        let Stage::Pending { syn, .. } = std::mem::replace(&mut flow.stage, Stage::Handshaking) else {
                            return;
                        };
                        let key = flow.key;
                        self.handshakes.push_back((self.now + self.config.handshake_timeout, id, key));
                        self.input(syn.packet());
                    }
                    Decision::Rejected => {
                        if let Stage::Pending { summary, .. } = flow.stage {
                            Stats::inc(&self.stats().tcp_rejected);
                            self.send_rst(&summary);
                        }
                        self.finish(id, true);
                    }
                }
                return;
            }
            Stage::Open(open) => open,
        };
        let pcb = open.pcb;
        let stack = &mut self.stack;
        let fin_sent = open.fin_sent;
        let signals = flow.link.pump(|io| {
            stack.read(pcb, |run| io.deliver(run));
            if !fin_sent {
                io.fill_with(|run| stack.write(pcb, run));
            }
        });
        if signals.abort_requested {
            self.stack.abort(pcb);
            self.collect_events();
            self.finish(id, true);
            return;
        }
        if !open.detached && !self.stack.is_attached(pcb) {
            // lwIP freed it: the client reset the connection or it timed out.
            self.finish(id, true);
            return;
        }
        if !open.rx_eof && self.stack.rx_finished(pcb) {
            open.rx_eof = true;
            flow.link.set_rx_eof();
        }
        if signals.tx_finished && !open.fin_sent && !open.detached {
            open.fin_sent = self.stack.shutdown_write(pcb);
        }
        self.stack.output(pcb);
        if flow.touched {
            flow.touched = false;
            self.stack.flush_ack(pcb);
        }
        // Both FINs seen: lwIP finishes the close on its own (LAST-ACK or TIME-WAIT).
        if open.fin_sent && !open.detached && self.stack.fin_received(pcb) {
            open.detached = true;
            self.stack.detach(pcb);
        }
        let done = open.detached && open.rx_eof;
        self.collect_events();
        if done {
            self.finish(id, false);
        }
    }

    /// Ends a flow: tells the handler (`reset` or clean) and forgets it.
    fn finish(&mut self, id: FlowId, reset: bool) {
        if !self.flows.contains(id.0) {
            return;
        }
        let flow = self.flows.remove(id.0);
        self.by_key.remove(&flow.key);
        flow.link.set_closed(reset);
        if let Stage::Open(open) = flow.stage {
            self.stack.release(open.pcb);
            self.collect_events();
        }
        Stats::dec(&self.handlers.stats.tcp_active);
    }

    fn send_rst(&mut self, seg: &TcpSummary) {
        let mut buf = self.local_free.pop().unwrap_or_else(|| PacketBuf::with_capacity(self.config.mtu.get()));
        match packet::build_tcp_rst(seg, buf.spare_mut()) {
            Some(len) => {
                buf.set_len(len);
                self.local.push_back(buf);
            }
            None => self.local_free.push(buf),
        }
    }

    fn expire_handshakes(&mut self, now: Instant) {
        while let Some(&(deadline, id, key)) = self.handshakes.front() {
            if deadline > now {
                break;
            }
            self.handshakes.pop_front();
            let stalled = self.flows.get(id.0).is_some_and(|f| f.key == key && matches!(f.stage, Stage::Handshaking));
            if stalled {
                self.finish(id, true);
            }
        }
        // Entries for flows that completed stay until they surface; keep the queue small
        // when many handshakes complete well before their deadline.
        if self.handshakes.len() > 2 * self.flows.len() + 64 {
            let flows = &self.flows;
            self.handshakes.retain(|&(_, id, key)| {
                flows.get(id.0).is_some_and(|f| f.key == key && matches!(f.stage, Stage::Handshaking))
            });
        }
    }
}

fn mark_dirty(dirty: &mut Vec<FlowId>, flow: &mut Flow, id: FlowId) {
    if !flow.dirty {
        flow.dirty = true;
        dirty.push(id);
    }
}

fn is_unicast(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(a) => !(a.is_broadcast() || a.is_multicast() || a.is_unspecified()),
        IpAddr::V6(a) => !(a.is_multicast() || a.is_unspecified()),
    }
}

impl Engine for LwipEngine {
    fn handle_packet(&mut self, now: Instant, packet: &mut PacketBuf) {
        self.now = now;
        let stats = &self.handlers.stats;
        Stats::inc(&stats.rx_packets);
        match packet::classify(packet.packet()) {
            Err(_) => Stats::inc(&stats.malformed),
            Ok(Classified::Unsupported) => Stats::inc(&stats.unsupported),
            Ok(Classified::Udp { src, dst, payload }) => {
                Stats::inc(&stats.udp_rx);
                self.handlers.udp.handle_udp(src, dst, payload, &self.udp_sender);
            }
            Ok(Classified::Tcp(seg)) => self.handle_tcp(packet, seg),
        }
    }

    /// Delivers what the batch brought and sends one ACK (plus data) per flow.
    fn flush(&mut self, now: Instant) {
        self.now = now;
        self.service_dirty();
    }

    fn handle_wakeups(&mut self, now: Instant) {
        self.now = now;
        let mut woken = std::mem::take(&mut self.woken);
        self.wake.drain_into(&mut woken);
        for &id in &woken {
            if let Some(flow) = self.flows.get_mut(id.0) {
                mark_dirty(&mut self.dirty, flow, id);
            }
        }
        woken.clear();
        self.woken = woken;
        self.service_dirty();
    }

    fn handle_timeout(&mut self, now: Instant) {
        self.now = now;
        if self.next_tick.is_some_and(|t| t <= now) {
            self.stack.tick();
            self.next_tick = None;
            self.collect_events();
        }
        self.expire_handshakes(now);
        self.service_dirty();
    }

    fn poll_timeout(&mut self) -> Option<Instant> {
        // lwIP's timer runs only while it holds connections: an idle gateway sleeps.
        if self.stack.has_pcbs() {
            if self.next_tick.is_none() {
                self.next_tick = Some(self.now + TICK);
            }
        } else {
            self.next_tick = None;
        }
        let handshake = self.handshakes.front().map(|&(d, _, _)| d);
        match (self.next_tick, handshake) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    fn poll_transmit(&mut self) -> Option<PacketBuf> {
        if let Some(buf) = self.local.pop_front() {
            self.last_from = Source::Local;
            return Some(buf);
        }
        if let Some(buf) = self.udp_out.pop() {
            self.last_from = Source::Udp;
            return Some(buf);
        }
        let buf = self.stack.pop_output()?;
        self.last_from = Source::Stack;
        Some(buf)
    }

    fn recycle(&mut self, buf: PacketBuf) {
        match self.last_from {
            Source::Local => self.local_free.push(buf),
            Source::Udp => self.udp_out.recycle(buf),
            Source::Stack => self.stack.recycle(buf),
        }
    }

    fn wake_queue(&self) -> Arc<WakeQueue> {
        self.wake.clone()
    }
}
