//! What netstack-smoltcp (and its smoltcp 0.12) gets wrong, worked around in front of it:
//! core's stream admission calls these hooks ([`StreamQuirks`]) for every admitted flow.
//!
//! * **Data past the window edge** (smoltcp 0.12 accepts it, then panics computing its
//!   window: "attempt to subtract sequence numbers with underflow", fixed in smoltcp
//!   0.13): client data is trimmed at the furthest right edge of the window the stack
//!   advertised, less one unit of its window scale; data past it is cut off (FIN with
//!   it), as a receiver may do (RFC 9293 §3.10.7.4), and the client sends it again.
//!
//!   Why the margin makes the trim safe against edges the stack advertises later: the
//!   stack accepts data up to `T` (its read point plus its buffer's capacity, which only
//!   grows), and each window it advertises is `T − ack` rounded down to a multiple of
//!   `2^shift`, so each edge lies in `(T − 2^shift, T]`. An edge advertised after one
//!   seen here is more than `seen − 2^shift`: data within `seen − (2^shift − 1)` is
//!   within every edge the stack holds itself to from then on.
//! * **A repeated SYN takes another client's connection**: the crate makes a new socket
//!   listening on the destination for every SYN; one made for a repeated SYN accepts the
//!   next SYN to that destination from any client until it is closed. A SYN repeated
//!   after the first went to the crate is dropped (smoltcp retransmits its SYN-ACK itself).
//! * **A reused 4-tuple meets the old connection**: smoltcp keeps a connection it closed
//!   first in TIME-WAIT for 10 s and answers a new SYN on the same 4-tuple with an ACK, so
//!   a client whose kernel reused the port (after about 3 000 short connections the
//!   server closed first) waited 11 s. When a flow is admitted on a 4-tuple whose last
//!   connection ended less than [`REMEMBER`] ago, the crate gets a RST for the old
//!   connection first (at the sequence number the old socket expects, with ACK so that no
//!   listening socket takes it), which closes it.
//! * **No retransmission once the client closed**: smoltcp 0.12 sets its retransmission
//!   timer to idle on every ACK in CLOSE-WAIT and on an ACK in LAST-ACK or CLOSING that
//!   does not cover its FIN (fixed in later smoltcp, which netstack-smoltcp 0.2 does not
//!   take). So after the client's FIN, a reply segment or FIN that was lost, followed by
//!   any ACK, was never sent again; 28 s later smoltcp's keep-alive, one byte at the
//!   FIN's sequence number, reached the client as data, then came a RST (seen by capture
//!   in the namespace fault test). Two work-arounds:
//!   - a watchdog: once the client's FIN went to the crate, while the client has not
//!     acknowledged everything the stack sent and neither side moved for [`KICK_FIRST`]
//!     (then twice as long each time, up to [`KICK_LAST`]), the crate gets a window
//!     change and three duplicates of the client's last ACK: its fast retransmission,
//!     the one path that still works there, sends everything unacknowledged again;
//!   - a stack segment with data past its own FIN (that keep-alive) is dropped.

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use smoltcp::wire::TcpControl;
use tungate_core::PacketBuf;
use tungate_core::admission::{FlowKey, Pass, QuirkCx, StreamQuirks, give_back_growth};
use tungate_core::flow::FlowProgress;
use tungate_core::packet::{self, SegmentFields, TcpSummary, seq_lt};
use tungate_core::stats::Stats;

/// How long an ended connection's sequence numbers are kept: past smoltcp's 10 s TIME-WAIT.
pub const REMEMBER: Duration = Duration::from_secs(11);

/// How long a flow whose client closed may sit with data or FIN unacknowledged and no
/// progress before the crate is made to retransmit: past smoltcp's 1 s minimum
/// retransmission timeout, so a timer still running fires first.
pub const KICK_FIRST: Duration = Duration::from_millis(1500);
/// No kicks once the gap between them would exceed this (kicks at 1.5, 4.5, 10.5 and
/// 22.5 s without progress; at 46.5 s the flow is reset both ways): a client silent that
/// long is gone.
pub const KICK_LAST: Duration = Duration::from_secs(24);

/// netstack-smoltcp's work-arounds (see the module docs).
#[derive(Debug, Default)]
pub struct NetstackQuirks {
    /// Ended connections the crate may still hold: the client's and the stack's next
    /// sequence numbers, and when the entry is forgotten.
    ended: HashMap<FlowKey, (u32, u32, Instant)>,
    /// The same times, oldest first (an entry renewed since is forgotten at its later time).
    expiry: VecDeque<(Instant, FlowKey)>,
}

impl NetstackQuirks {
    fn forget_expired(&mut self, now: Instant) {
        while let Some(&(at, key)) = self.expiry.front() {
            if at > now {
                break;
            }
            self.expiry.pop_front();
            if self.ended.get(&key).is_some_and(|e| e.2 == at) {
                self.ended.remove(&key);
            }
        }
        give_back_growth(&mut self.ended);
    }
}

/// What the work-arounds keep per flow.
#[derive(Debug)]
pub struct Flow {
    /// The client's first data sequence number (ISN + 1).
    start: u32,
    /// The furthest right edge of the receive window the stack advertised to the client,
    /// and the stack's window shift (from its SYN-ACK).
    edge: Option<u32>,
    shift: u8,
    /// The sequence numbers that follow the last segment of the client and of the stack.
    client_next: u32,
    stack_next: Option<u32>,
    /// The client's and the stack's addresses, for the segments built here.
    client: SocketAddr,
    server: SocketAddr,
    /// The furthest acknowledgment the client sent, and the window field of its last
    /// segment.
    client_ack: Option<u32>,
    client_window: u16,
    /// The client's FIN went to the crate.
    client_fin: bool,
    /// The sequence number of the stack's FIN, once it sent one.
    stack_fin: Option<u32>,
    /// The retransmission watchdog (see the module docs): when to kick the crate, and the
    /// gap to the kick after.
    kick: Option<(Instant, Duration)>,
}

impl Flow {
    /// Where client data must end: the furthest edge advertised, less `2^shift − 1`.
    fn edge_limit(&self) -> Option<u32> {
        let margin = (1u32 << self.shift) - 1;
        self.edge.map(|e| e.wrapping_sub(margin))
    }

    /// Whether the stack sent something the client has not acknowledged.
    fn unacknowledged(&self) -> bool {
        match (self.stack_next, self.client_ack) {
            (Some(next), Some(ack)) => seq_lt(ack, next),
            (next, _) => next.is_some(),
        }
    }

    /// Arms the watchdog from the client's FIN until the client acknowledged the stack's
    /// FIN (from now if `moved`), so that the flow outlives its bridge while the crate may
    /// still need a kick; disarms it otherwise.
    fn watch(&mut self, now: Instant, moved: bool) {
        let fin_acknowledged = self.stack_fin.is_some() && !self.unacknowledged();
        self.kick = match self.kick {
            _ if !self.client_fin || fin_acknowledged => None,
            Some(kick) if !moved => Some(kick),
            _ => Some((now + KICK_FIRST, KICK_FIRST)),
        };
    }

    /// The client never acknowledged the stack's last bytes or FIN through every kick: it
    /// gets a RST (its stream did not end cleanly), and so does the crate, whose socket
    /// would otherwise send keep-alives, at the FIN's sequence number, to a client that
    /// takes them for data.
    fn give_up(&mut self, cx: &mut QuirkCx<'_>) {
        tracing::debug!(client = %self.client, server = %self.server, "the client never acknowledged the end: reset both ways");
        if let (Some(ack), Some(next)) = (self.client_ack, self.stack_next) {
            let to_client = SegmentFields::new(self.server, self.client, TcpControl::Rst, ack, None).build();
            cx.answer(PacketBuf::from_vec(to_client));
            let to_stack = SegmentFields::new(self.client, self.server, TcpControl::Rst, self.client_next, Some(next));
            cx.forward(PacketBuf::from_vec(to_stack.build()));
        }
        self.client_fin = false;
        self.kick = None;
    }

    /// The crate's fast retransmission, triggered: the client's last ACK with another
    /// window (which resets smoltcp's count of duplicates), then three duplicates of it.
    fn kick(&self, cx: &mut QuirkCx<'_>) {
        if !self.unacknowledged() {
            return;
        }
        let Some(ack) = self.client_ack else { return };
        let mut seg = SegmentFields::new(self.client, self.server, TcpControl::None, self.client_next, Some(ack));
        seg.window = if self.client_window > 1 { self.client_window - 1 } else { self.client_window + 1 };
        let packet = seg.build();
        for _ in 0..4 {
            cx.forward(PacketBuf::from_slice(&packet));
        }
    }
}

impl StreamQuirks for NetstackQuirks {
    type Flow = Flow;

    const WATCHES_OUTPUT: bool = true;

    /// Its streams' `shutdown` completes before the connection closes (see
    /// `NetstackStream`): the crate sends what is left and its FIN, then keeps TIME-WAIT.
    const LINGER: Duration = REMEMBER;

    fn admitted(&mut self, cx: &mut QuirkCx<'_>, syn: &TcpSummary, _: FlowProgress) -> Flow {
        self.forget_expired(cx.now());
        if let Some((client_next, stack_next, _)) = self.ended.remove(&(syn.src, syn.dst)) {
            let rst = SegmentFields::new(syn.src, syn.dst, TcpControl::Rst, client_next, Some(stack_next)).build();
            tracing::trace!(src = %syn.src, dst = %syn.dst, "a new connection on a recently used 4-tuple: the old one reset first");
            cx.forward(PacketBuf::from_vec(rst));
        }
        let start = syn.seq.wrapping_add(1);
        Flow {
            start,
            edge: None,
            shift: 0,
            client_next: start,
            stack_next: None,
            client: syn.src,
            server: syn.dst,
            client_ack: None,
            client_window: syn.window,
            client_fin: false,
            stack_fin: None,
            kick: None,
        }
    }

    fn outlives_bridge(&self, flow: &Flow) -> bool {
        flow.kick.is_some()
    }

    fn ended(&mut self, now: Instant, key: FlowKey, flow: Flow) {
        if let Some(stack_next) = flow.stack_next {
            self.ended.insert(key, (flow.client_next, stack_next, now + REMEMBER));
            self.expiry.push_back((now + REMEMBER, key));
        }
        self.forget_expired(now);
    }

    fn client_segment(
        &mut self,
        cx: &mut QuirkCx<'_>,
        flow: &mut Flow,
        packet: &mut PacketBuf,
        seg: &mut TcpSummary,
    ) -> Pass {
        if seg.is_bare_syn() && seg.seq.wrapping_add(1) == flow.start {
            Stats::inc(&cx.stats().tcp_syn_duplicate);
            return Pass::Withhold;
        }
        let end = seg.seq.wrapping_add(seg.segment_len as u32);
        if seq_lt(flow.client_next, end) {
            flow.client_next = end;
        }
        if let Some(limit) = flow.edge_limit() {
            let cut = packet::trim_payload_at(packet, seg, limit);
            if cut > 0 {
                tracing::trace!(src = %seg.src, dst = %seg.dst, cut, "client data past the stack's window edge trimmed");
            }
        }
        let mut moved = false;
        if seg.ack && !seg.rst {
            moved = flow.client_ack.is_none_or(|a| seq_lt(a, seg.ack_number));
            if moved {
                flow.client_ack = Some(seg.ack_number);
            }
            flow.client_window = seg.window;
        }
        flow.client_fin |= seg.fin && !seg.rst;
        if seg.rst {
            flow.client_fin = false;
        }
        flow.watch(cx.now(), moved);
        cx.set_timer(flow.kick.map(|(at, _)| at));
        Pass::Forward
    }

    /// The stack's ACK and window may move the right edge; data past its FIN is dropped.
    fn stack_segment(&mut self, cx: &mut QuirkCx<'_>, flow: &mut Flow, packet: &[u8], seg: &TcpSummary) -> Pass {
        if seg.rst {
            flow.client_fin = false;
            flow.watch(cx.now(), true);
        }
        if !seg.ack || seg.rst {
            return Pass::Forward;
        }
        let data_end = seg.seq.wrapping_add(seg.payload_len() as u32);
        if seg.payload_len() > 0 && flow.stack_fin.is_some_and(|fin| seq_lt(fin, data_end)) {
            tracing::trace!(src = %seg.src, dst = %seg.dst, "a keep-alive byte past the stack's FIN dropped");
            return Pass::Withhold;
        }
        if seg.fin {
            flow.stack_fin = Some(data_end);
        }
        let end = seg.seq.wrapping_add(seg.segment_len as u32);
        // New sequence space is progress; a retransmission (the kick's, too) is not.
        let sent_new = flow.stack_next.is_none_or(|next| seq_lt(next, end));
        if sent_new {
            flow.stack_next = Some(end);
        }
        // A SYN-ACK's window is never scaled; its option gives the shift for the rest.
        let window = if seg.syn {
            flow.shift = packet::syn_window_scale(packet).unwrap_or(0);
            u32::from(seg.window)
        } else {
            u32::from(seg.window) << flow.shift
        };
        let edge = seg.ack_number.wrapping_add(window);
        if flow.edge.is_none_or(|e| seq_lt(e, edge)) {
            flow.edge = Some(edge);
        }
        flow.watch(cx.now(), sent_new);
        cx.set_timer(flow.kick.map(|(at, _)| at));
        Pass::Forward
    }

    fn timer(&mut self, cx: &mut QuirkCx<'_>, flow: &mut Flow) {
        let now = cx.now();
        if let Some((_, gap)) = flow.kick.filter(|&(due, _)| due <= now) {
            let gap = gap * 2;
            if gap <= KICK_LAST {
                tracing::debug!(client = %flow.client, server = %flow.server, "unacknowledged after the client's FIN and no progress: the crate retransmits");
                flow.kick(cx);
                flow.kick = Some((now + gap, gap));
            } else {
                flow.give_up(cx);
            }
        }
        cx.set_timer(flow.kick.map(|(at, _)| at));
    }
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;
    use std::time::{Duration, Instant};

    use smoltcp::wire::TcpControl;
    use tungate_core::Mtu;
    use tungate_core::admission::{Admission, Verdict};
    use tungate_core::packet::SegmentFields;
    use tungate_testkit::engine::{Hold, accept_now, tcp_of as tcp};

    use super::*;

    /// The stack said: ACK `ack`, window `window` (scaled by the shift of its SYN-ACK).
    fn stack_ack(server: SocketAddr, client: SocketAddr, ack: u32, window: u16) -> PacketBuf {
        let mut seg = SegmentFields::new(server, client, TcpControl::None, 5001, Some(ack));
        seg.window = window;
        PacketBuf::from_vec(seg.build())
    }

    /// Admission with these quirks, and a flow from `client` (ISN 100) to `server` whose
    /// SYN the handler accepted: returns the SYN on its way to the stack, and the
    /// handler's side, to keep.
    fn admitted(
        now: Instant,
        client: SocketAddr,
        server: SocketAddr,
    ) -> (Admission<NetstackQuirks>, Vec<PacketBuf>, tungate_core::TcpConn) {
        let hold = Hold::default();
        let mut adm = Admission::with_quirks(
            hold.dispatch(),
            Mtu::DEFAULT,
            4096,
            Duration::from_secs(25),
            NetstackQuirks::default(),
        );
        let mut syn = PacketBuf::from_vec(SegmentFields::new(client, server, TcpControl::Syn, 100, None).build());
        assert_eq!(adm.handle_packet(now, &mut syn), Verdict::Consumed, "held");
        let conn = accept_now(hold.take());
        let mut released = Vec::new();
        adm.service(now, |p| released.push(p));
        (adm, released, conn)
    }

    #[test]
    fn client_data_past_the_stacks_window_edge_less_one_scale_unit_is_trimmed() {
        let (client, server): (SocketAddr, SocketAddr) =
            ("[fd18::2]:4000".parse().unwrap(), "[fd77::2]:80".parse().unwrap());
        let now = Instant::now();
        let (mut adm, released, _conn) = admitted(now, client, server);
        assert_eq!(released.len(), 1, "the SYN goes to the stack once accepted");
        // The same SYN again: the stack already has it.
        let mut again = PacketBuf::from_vec(SegmentFields::new(client, server, TcpControl::Syn, 100, None).build());
        assert_eq!(adm.handle_packet(now, &mut again), Verdict::Consumed, "a repeated SYN is dropped");
        let data: Vec<u8> = (0..3000u32).map(|i| i as u8).collect();
        let client_segment = |seq: u32, len: usize, control| {
            let mut seg = SegmentFields::new(client, server, control, seq, Some(5001));
            seg.payload = &data[..len];
            PacketBuf::from_vec(seg.build())
        };
        // Before the stack has said anything, nothing is trimmed.
        let mut early = client_segment(101, 3000, TcpControl::None);
        assert_eq!(adm.handle_packet(now, &mut early), Verdict::Forward);
        assert_eq!(tcp(early.packet()).payload_len(), 3000);
        // SYN-ACK with shift 4 and its own window unscaled (edge 101 + 1000), then an ACK
        // of 1000 bytes with window 100 << 4: edge 1101 + 1600 = 2701, limit 2701 − 15.
        let mut syn_ack = SegmentFields::new(server, client, TcpControl::Syn, 5000, Some(101));
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

    /// After the client's FIN: a keep-alive byte at the stack's FIN is dropped; a stack
    /// that never gets its reply acknowledged is kicked (four ACKs of the client's, the
    /// first with another window) at 1.5, 4.5, 10.5 and 22.5 s, and at 46.5 s the flow is
    /// reset both ways, at the sequence numbers each side expects.
    #[test]
    fn after_the_clients_fin_a_silent_client_gets_kicks_then_a_reset_and_no_keep_alive() {
        let (client, server): (SocketAddr, SocketAddr) =
            ("10.0.0.2:4000".parse().unwrap(), "10.77.0.2:80".parse().unwrap());
        let t0 = Instant::now();
        let (mut adm, _, _conn) = admitted(t0, client, server);
        let syn_ack = SegmentFields::new(server, client, TcpControl::Syn, 5000, Some(101));
        assert!(adm.pass_output(t0, &PacketBuf::from_vec(syn_ack.build())));
        let _port = adm.take_port(client, server).expect("the stack's stream arrives");
        let mut fin = SegmentFields::new(client, server, TcpControl::Fin, 101, Some(5001));
        fin.payload = b"bye";
        let mut fin = PacketBuf::from_vec(fin.build());
        assert_eq!(adm.handle_packet(t0, &mut fin), Verdict::Forward);
        let mut reply = SegmentFields::new(server, client, TcpControl::Fin, 5001, Some(105));
        reply.payload = b"bye";
        assert!(adm.pass_output(t0, &PacketBuf::from_vec(reply.build())));
        let mut keep_alive = SegmentFields::new(server, client, TcpControl::None, 5004, Some(105));
        keep_alive.payload = b"\0";
        assert!(!adm.pass_output(t0, &PacketBuf::from_vec(keep_alive.build())), "the byte past the FIN is dropped");
        let mut retransmission = SegmentFields::new(server, client, TcpControl::Fin, 5001, Some(105));
        retransmission.payload = b"bye";
        assert!(adm.pass_output(t0, &PacketBuf::from_vec(retransmission.build())), "data before the FIN passes");

        let mut kicks = Vec::new();
        for tenth in 1..=500u64 {
            let now = t0 + Duration::from_millis(100 * tenth);
            let mut to_stack = Vec::new();
            adm.service(now, |p| to_stack.push(p));
            if to_stack.is_empty() {
                continue;
            }
            let segs: Vec<_> = to_stack.iter().map(|p| tcp(p.packet())).collect();
            if segs[0].rst {
                assert_eq!((segs[0].seq, segs[0].ack_number), (105, 5005), "the crate's RST at its own numbers");
                let to_client: Vec<_> = std::iter::from_fn(|| adm.poll_transmit()).map(|p| tcp(p.packet())).collect();
                assert!(
                    to_client.iter().any(|s| s.rst && s.seq == 5001 && s.dst == client),
                    "the client's RST at its ACK: {to_client:?}"
                );
                assert_eq!(kicks, [15, 45, 105, 225], "kicks, in tenths of a second");
                assert_eq!(tenth, 465, "reset after the last gap");
                return;
            }
            assert_eq!(segs.len(), 4, "a window change and three duplicates");
            assert!(segs.iter().all(|s| (s.seq, s.ack_number, s.segment_len) == (105, 5001, 0)));
            assert_ne!(segs[0].window, 65535, "the first changes the window");
            assert!(segs.iter().all(|s| s.window == segs[0].window), "the other three are duplicates");
            kicks.push(tenth);
        }
        panic!("no reset in 50 s; kicks at {kicks:?}");
    }
}
