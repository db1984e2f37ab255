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

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

use smoltcp::wire::TcpControl;
use tungate_core::PacketBuf;
use tungate_core::admission::{FlowKey, Pass, QuirkCx, StreamQuirks, give_back_growth};
use tungate_core::flow::FlowProgress;
use tungate_core::packet::{self, SegmentFields, TcpSummary, seq_lt};
use tungate_core::stats::Stats;

/// How long an ended connection's sequence numbers are kept: past smoltcp's 10 s TIME-WAIT.
pub const REMEMBER: Duration = Duration::from_secs(11);

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
}

impl Flow {
    /// Where client data must end: the furthest edge advertised, less `2^shift − 1`.
    fn edge_limit(&self) -> Option<u32> {
        let margin = (1u32 << self.shift) - 1;
        self.edge.map(|e| e.wrapping_sub(margin))
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
        Flow { start, edge: None, shift: 0, client_next: start, stack_next: None }
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
        Pass::Forward
    }

    /// The stack's ACK and window may move the right edge.
    fn stack_segment(&mut self, _: &mut QuirkCx<'_>, flow: &mut Flow, packet: &[u8], seg: &TcpSummary) {
        if !seg.ack || seg.rst {
            return;
        }
        let end = seg.seq.wrapping_add(seg.segment_len as u32);
        if flow.stack_next.is_none_or(|next| seq_lt(next, end)) {
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

    #[test]
    fn client_data_past_the_stacks_window_edge_less_one_scale_unit_is_trimmed() {
        let hold = Hold::default();
        let mut adm = Admission::with_quirks(
            hold.dispatch(),
            Mtu::DEFAULT,
            4096,
            Duration::from_secs(25),
            NetstackQuirks::default(),
        );
        let (client, server): (SocketAddr, SocketAddr) =
            ("[fd18::2]:4000".parse().unwrap(), "[fd77::2]:80".parse().unwrap());
        let now = Instant::now();
        let mut syn = PacketBuf::from_vec(SegmentFields::new(client, server, TcpControl::Syn, 100, None).build());
        assert_eq!(adm.handle_packet(now, &mut syn), Verdict::Consumed, "held");
        let _conn = accept_now(hold.take());
        let mut released = Vec::new();
        adm.service(now, |p| released.push(p));
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
}
