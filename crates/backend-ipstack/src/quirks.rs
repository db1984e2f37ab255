//! What ipstack gets wrong, worked around in front of it: core's stream admission calls
//! these hooks ([`StreamQuirks`]) for every admitted flow.
//!
//! * **No receive back-pressure** (the unread cap): ipstack ACKs and buffers whatever
//!   arrives in order, read or not. A client segment that would leave more than
//!   `unread_limit` bytes unread inside ipstack is dropped; the client retransmits it once
//!   the handler has caught up — TCP's own recovery used as back-pressure.
//! * **The client's FIN** (the FIN hold): when the client's FIN arrives, ipstack's stream
//!   reports the end at once, before the bytes it still queues for its reader (a client
//!   that uploaded and closed faster than the handler read lost its tail: 64 MiB uploads
//!   through dante, 3 and then 5 of 6), and ipstack sends its own FIN at once, so the
//!   server's reply to a half-closed request never reached the client. So ipstack gets
//!   the client's FIN last: it is held here (its acknowledgment goes on at once as a
//!   pure ACK, or ipstack kept the reply in flight and held back its own FIN); once the handler has every byte before it,
//!   the handler is told of the end itself (`FlowProgress::client_finished`), and once
//!   ipstack has sent its own FIN (the handler's side ended, every reply byte sent), the
//!   held FIN goes to ipstack, acknowledging what the client acknowledged by then — the
//!   server-first close ipstack handles. The client retransmits its FIN meanwhile (those
//!   copies are dropped); its other segments pass. Limit: a client whose half-closed
//!   connection keeps receiving for longer than its kernel retransmits an unacknowledged
//!   FIN (about 15 minutes on Linux) gives up on the connection.
//! * **FIN with data**: ipstack drops the payload of a segment that carries FIN: such a
//!   segment goes to it as two, the data now and the bare FIN held as above.
//! * **Retransmission only on arrival**: ipstack checks its retransmission timers only
//!   when a packet for the flow arrives; a quiet flow's last pure ACK is given to it again
//!   after [`REPLAY_FIRST`], then after twice as long each time up to [`REPLAY_LAST`].
//! * **Reassembly that stalls on overlap** (each byte once, in order): ipstack keeps
//!   segments keyed by their sequence number and hands data on only while the first key
//!   equals the next byte it expects; a kept segment that another one with other
//!   boundaries covers in part (a client re-segments its retransmissions) falls behind
//!   that byte and the flow never moves again. So ipstack gets each client byte once and
//!   in order: the part of a segment it was already given is cut off here, and a segment
//!   that starts past the end of what it was given is kept ([`OUT_OF_ORDER_LIMIT`] per
//!   flow), answered with the duplicate ACK ipstack does not send, and given to it, cut to
//!   its new bytes, once the client's retransmission fills the gap. (Counting what ipstack
//!   was given by its own ACKs instead, which come a moment late, let overlaps through:
//!   with segments kept, the in-memory loss test stalled 4 runs in 4; without keeping
//!   them, a client went back to the gap after each loss and its retransmission timeout
//!   doubled: 2 MiB at 1 % loss took 20 s, and over 60 s on a loaded CI machine.)
//! * **An acknowledgment that went back**: ipstack drops, unanswered, a segment whose
//!   acknowledgment number is older than one it saw (a duplicate, a reordered segment, a
//!   kept one), data and all, while this layer counts the bytes as given. So each client
//!   segment reaches it with the furthest acknowledgment the client sent for data ipstack
//!   sent.
//! * **Silence on a duplicate**: ipstack drops a data segment that starts before the next
//!   byte it expects without acknowledging anything, against RFC 9293 §3.10.7.4. So when
//!   an ACK is lost, the client's retransmission is dropped unanswered, and so is each
//!   one after its timeout doubled: the flow stalls (under 1 % loss both ways, uploads
//!   missed the test's 60 s in CI). So a segment wholly given to ipstack is answered here
//!   with the ACK ipstack should have sent: its last acknowledgment number, window and
//!   next sequence number, as seen in its output.
//!
//! * **A SYN-ACK sent once**: ipstack neither retransmits its SYN-ACK nor answers the
//!   client's repeated SYN, so a lost SYN-ACK left the client's connect waiting until it
//!   timed out (1 namespace fault run in 12). Its SYN-ACK is kept here until the client
//!   acknowledges it, and a repeated SYN is answered with it.
//! * **A FIN sent once**: ipstack retransmits data, never its FIN; a lost FIN left the
//!   client waiting for the end of a stream whose every byte it had (seen by capture in
//!   one of 26 namespace fault runs). Its FIN is kept here and sent again, after
//!   [`FIN_RESEND_FIRST`] and then twice as long each time, until the client acknowledges
//!   it; the flow stays in admission that long after its bridge ended.
//!
//! Limit: without SACK or timestamps, and with these answers a moment behind ipstack
//! (which runs on its own tasks), a Linux client under loss takes the duplicate ACKs for
//! reordering, raises its duplicate threshold and recovers by retransmission timeouts
//! (see the namespace fault test).

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use tungate_core::PacketBuf;
use tungate_core::admission::{Pass, QuirkCx, StreamQuirks};
use tungate_core::flow::FlowProgress;
use tungate_core::packet::{self, TcpControl, TcpSummary};

/// First replay of a quiet flow's last ACK: past ipstack's fixed 1 s retransmission timeout.
pub const REPLAY_FIRST: Duration = Duration::from_millis(1100);
/// No replays once the gap between them would exceed this: a flow quiet that long is
/// idle, not stalled, and costs nothing from then on.
pub const REPLAY_LAST: Duration = Duration::from_secs(32);
/// How soon a held FIN first looks whether the handler has caught up; the gap then doubles
/// up to [`FIN_POLL_LAST`], so a flow whose handler reads slowly costs few wake-ups.
pub const FIN_POLL: Duration = Duration::from_millis(2);
/// The longest gap between two looks at a held FIN.
pub const FIN_POLL_LAST: Duration = Duration::from_millis(64);

/// ipstack's work-arounds; `unread_limit` is the cap described in the module docs.
#[derive(Debug, Clone, Copy)]
pub struct IpstackQuirks {
    pub unread_limit: u64,
}

/// What the work-arounds keep per flow.
#[derive(Debug)]
pub struct Flow {
    /// The client's first data sequence number (ISN + 1).
    start: u32,
    progress: FlowProgress,
    /// The client's last pure ACK, for replays.
    last_ack: Option<PacketBuf>,
    /// When to replay it and the gap to the one after; `None` once replays stopped.
    replay: Option<(Instant, Duration)>,
    /// The client's FIN while it is held (see the module docs).
    held_fin: Option<HeldFin>,
    /// The furthest acknowledgment the client sent.
    client_ack: Option<u32>,
    /// ipstack sent its FIN for this flow.
    stack_fin: bool,
    /// Client bytes given to ipstack without a gap, counted from the first (see the
    /// module docs: it gets data in order only).
    forwarded: u64,
    /// What ipstack last told the client, for answering a duplicate (see the module docs).
    stack: Option<StackSaid>,
    /// Client segments past a gap, by the offset of their first byte, until the gap
    /// fills (see the module docs); and their size.
    out_of_order: BTreeMap<u64, PacketBuf>,
    out_of_order_bytes: usize,
    /// ipstack's FIN until the client acknowledges it, with when to send it again and
    /// the gap to the time after (see the module docs).
    stack_fin_segment: Option<(PacketBuf, u32)>,
    fin_resend: Option<(Instant, Duration)>,
    /// ipstack's SYN-ACK until the client acknowledges it, for answering the client's
    /// repeated SYN (see the module docs).
    syn_ack: Option<PacketBuf>,
}

/// First resend of ipstack's unacknowledged FIN; each later one waits twice as long, and
/// none is sent once the gap would exceed [`REPLAY_LAST`].
pub const FIN_RESEND_FIRST: Duration = Duration::from_secs(1);

/// The most a flow keeps past a gap: ipstack's window (65 535, unscaled) holds no more.
pub const OUT_OF_ORDER_LIMIT: usize = 64 * 1024;

/// The furthest acknowledgment, the next sequence number and the window ipstack sent.
#[derive(Debug, Clone, Copy)]
struct StackSaid {
    ack: u32,
    next: u32,
    window: u16,
}

#[derive(Debug)]
struct HeldFin {
    /// The bare FIN segment.
    packet: PacketBuf,
    /// Client bytes before it.
    at: u64,
    /// The handler was told of the end.
    told: bool,
    /// The gap to the next look while the handler is behind.
    poll: Duration,
}

impl Flow {
    /// Where the client's byte stream stands at `seq`, counted from its first byte (past
    /// 4 GiB too: sequence numbers wrap, so `seq` is placed within 2 GiB of what the
    /// handler has received); `None` for a sequence number before the first byte.
    fn offset(&self, seq: u32) -> Option<u64> {
        stream_offset(self.start, self.progress.delivered(), seq)
    }

    /// Whether `seg` would leave more than `limit` bytes unread inside the stack.
    fn exceeds(&self, seg: &TcpSummary, limit: u64) -> bool {
        // Pure ACKs (and window updates) carry no data: never hold them back.
        seg.payload_len() > 0
            && self
                .offset(seg.seq.wrapping_add(seg.payload_len() as u32))
                .is_some_and(|end| end > self.progress.delivered() + limit)
    }

    /// Whether `seg` carries data that starts past the end of what ipstack was given: it
    /// would reach ipstack out of order (see the module docs).
    fn leaves_a_gap(&self, seg: &TcpSummary) -> bool {
        seg.payload_len() > 0 && self.offset(seg.seq).is_some_and(|start| start > self.forwarded)
    }

    /// `seg`, which does not leave a gap, goes to ipstack: its data extends what ipstack
    /// was given. Only data counts: a pure ACK's or a bare FIN's sequence number is the
    /// client's next byte to send, past any data ipstack has not got yet.
    fn forwarding(&mut self, seg: &TcpSummary) {
        if seg.payload_len() == 0 {
            return;
        }
        if let Some(end) = self.offset(seg.seq.wrapping_add(seg.payload_len() as u32)) {
            self.forwarded = self.forwarded.max(end);
        }
    }

    /// Notes what ipstack's segment `seg` told the client.
    fn stack_said(&mut self, seg: &TcpSummary) {
        if !seg.ack || seg.rst {
            return;
        }
        let next = seg.seq.wrapping_add(seg.segment_len as u32);
        let said = self.stack.get_or_insert(StackSaid { ack: seg.ack_number, next, window: seg.window });
        if !packet::seq_lt(seg.ack_number, said.ack) {
            said.ack = seg.ack_number;
            said.window = seg.window;
        }
        if packet::seq_lt(said.next, next) {
            said.next = next;
        }
    }

    /// Keeps a data segment that starts past the end of what ipstack was given, while
    /// there is room; the client's retransmission of the gap then releases it. (A FIN
    /// is not kept: the client sends it again.)
    fn keep_out_of_order(&mut self, packet: &PacketBuf, seg: &TcpSummary) {
        if seg.fin || seg.syn || seg.payload_len() == 0 {
            return;
        }
        let Some(start) = self.offset(seg.seq) else { return };
        if self.out_of_order_bytes + packet.len() > OUT_OF_ORDER_LIMIT || self.out_of_order.contains_key(&start) {
            return;
        }
        self.out_of_order_bytes += packet.len();
        self.out_of_order.insert(start, PacketBuf::from_slice(packet.packet()));
    }

    /// Gives ipstack the kept segments that now follow what it was given, in order, each
    /// cut to its bytes ipstack does not have; stops (and forgets the rest, which the
    /// client sends again) at one the unread cap withholds.
    fn release_in_order(&mut self, cx: &mut QuirkCx<'_>, unread_limit: u64) {
        while let Some(entry) = self.out_of_order.first_entry() {
            let start = *entry.key();
            if start > self.forwarded {
                return;
            }
            let mut packet = entry.remove();
            self.out_of_order_bytes -= packet.len();
            let Ok(packet::Classified::Tcp(mut seg)) = packet::classify(packet.packet()) else { continue };
            let payload = seg.payload_len();
            let cut = (self.forwarded - start) as usize;
            if cut >= payload {
                continue;
            }
            if cut > 0 {
                let Some(len) = packet::reshape_tcp_segment(packet.packet_mut(), cut..payload, false) else { continue };
                packet.set_len(len);
                seg.seq = seg.seq.wrapping_add(cut as u32);
                seg.segment_len -= cut;
            }
            if self.exceeds(&seg, unread_limit) {
                self.out_of_order.clear();
                self.out_of_order_bytes = 0;
                return;
            }
            self.refresh_ack(&mut packet, &mut seg);
            self.forwarding(&seg);
            cx.forward(packet);
        }
    }

    /// The ACK ipstack last sent, again, for the client of `seg`: what it should send in
    /// answer to a duplicate or to a segment past a gap; `None` before it sent any.
    fn stack_ack(&self, seg: &TcpSummary) -> Option<PacketBuf> {
        let said = self.stack?;
        let ack = packet::SegmentFields {
            window: said.window,
            ..packet::SegmentFields::new(seg.dst, seg.src, TcpControl::None, said.next, Some(said.ack))
        };
        Some(PacketBuf::from_slice(&ack.build()))
    }

    /// A data segment that starts before the end of what ipstack was given (see the
    /// module docs): the part it was given is cut off, and a segment left with no data is
    /// answered with ipstack's ACK and withheld. `None` for any other segment.
    fn duplicate(&self, cx: &mut QuirkCx<'_>, packet: &mut PacketBuf, seg: &mut TcpSummary) -> Option<Pass> {
        let payload = seg.payload_len();
        if payload == 0 || seg.syn || seg.rst {
            return None;
        }
        let start = self.offset(seg.seq)?;
        if start >= self.forwarded {
            return None;
        }
        let given = (self.forwarded - start) as usize;
        if given < payload {
            let len = packet::reshape_tcp_segment(packet.packet_mut(), given..payload, seg.fin)?;
            packet.set_len(len);
            seg.seq = seg.seq.wrapping_add(given as u32);
            seg.segment_len -= given;
            return None;
        }
        tracing::trace!(src = %seg.src, "a duplicate ipstack would not answer: ACKed for it");
        if let Some(ack) = self.stack_ack(seg) {
            cx.answer(ack);
        }
        // A FIN riding on the duplicate is new: it goes on bare (and is held as usual).
        if seg.fin {
            let len = packet::reshape_tcp_segment(packet.packet_mut(), payload..payload, true)?;
            packet.set_len(len);
            seg.seq = seg.seq.wrapping_add(payload as u32);
            seg.segment_len = 1;
            return None;
        }
        Some(Pass::Withhold)
    }

    /// Raises the acknowledgment number of a client segment for ipstack to the furthest
    /// one the client sent: ipstack drops, unacknowledged, a segment whose acknowledgment
    /// is older than one it saw (a duplicate, or a segment kept past a gap), and a byte
    /// counted as given to it must reach it.
    fn refresh_ack(&self, packet: &mut PacketBuf, seg: &mut TcpSummary) {
        if let Some(ack) = self.client_ack {
            if seg.ack
                && packet::seq_lt(seg.ack_number, ack)
                && packet::set_ack_number(packet.packet_mut(), ack).is_some()
            {
                seg.ack_number = ack;
            }
        }
    }

    /// Notes the client's acknowledgment in `seg` when it is its furthest yet and
    /// acknowledges nothing ipstack did not send.
    fn saw_ack(&mut self, seg: &TcpSummary) {
        let sent = self.stack.is_none_or(|said| !packet::seq_lt(said.next, seg.ack_number));
        if seg.ack && !seg.rst && sent && self.client_ack.is_none_or(|a| packet::seq_lt(a, seg.ack_number)) {
            self.client_ack = Some(seg.ack_number);
        }
    }

    /// A client segment for this flow goes to the stack at `now`: replays wait again, and
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

    /// Moves a held FIN on: the handler is told of the end once it has every byte before
    /// it, and ipstack gets it once it sent its own FIN.
    fn advance(&mut self, cx: &mut QuirkCx<'_>) {
        let Some(held) = &mut self.held_fin else { return };
        if !held.told && self.progress.delivered() >= held.at {
            held.told = true;
            self.progress.client_finished();
        }
        if held.told && self.stack_fin {
            if let Some(mut held) = self.held_fin.take() {
                if let Some(ack) = self.client_ack {
                    let _ = packet::set_ack_number(held.packet.packet_mut(), ack);
                }
                cx.forward(held.packet);
            }
        }
    }

    /// The earlier of the next replay and the next look at a held FIN whose bytes the
    /// handler does not have yet (each look waits twice as long as the one before).
    fn next_timer(&mut self, now: Instant) -> Option<Instant> {
        let fin = self.held_fin.as_mut().filter(|h| !h.told).map(|h| {
            let at = now + h.poll;
            h.poll = (h.poll * 2).min(FIN_POLL_LAST);
            at
        });
        fin.into_iter().chain(self.replay.map(|(at, _)| at)).chain(self.fin_resend.map(|(at, _)| at)).min()
    }
}

impl StreamQuirks for IpstackQuirks {
    type Flow = Flow;

    const WATCHES_OUTPUT: bool = true;

    fn admitted(&mut self, _: &mut QuirkCx<'_>, syn: &TcpSummary, progress: FlowProgress) -> Flow {
        Flow {
            start: syn.seq.wrapping_add(1),
            progress,
            last_ack: None,
            replay: None,
            held_fin: None,
            client_ack: None,
            stack_fin: false,
            forwarded: 0,
            stack: None,
            out_of_order: BTreeMap::new(),
            out_of_order_bytes: 0,
            stack_fin_segment: None,
            fin_resend: None,
            syn_ack: None,
        }
    }

    fn client_segment(
        &mut self,
        cx: &mut QuirkCx<'_>,
        flow: &mut Flow,
        packet: &mut PacketBuf,
        seg: &mut TcpSummary,
    ) -> Pass {
        if seg.is_bare_syn() && seg.seq.wrapping_add(1) == flow.start {
            // ipstack has this SYN already and does not answer it again (see the module
            // docs): its SYN-ACK goes again from here.
            if let Some(syn_ack) = &flow.syn_ack {
                cx.answer(PacketBuf::from_slice(syn_ack.packet()));
            }
            return Pass::Withhold;
        }
        if seg.ack && !seg.syn {
            flow.syn_ack = None;
        }
        flow.saw_ack(seg);
        if flow.exceeds(seg, self.unread_limit) {
            return Pass::Withhold;
        }
        if flow.leaves_a_gap(seg) {
            // Kept until the gap fills, and the duplicate ACK ipstack does not send (see
            // the module docs).
            flow.keep_out_of_order(packet, seg);
            if let Some(ack) = flow.stack_ack(seg) {
                cx.answer(ack);
            }
            return Pass::Withhold;
        }
        if let Some(pass) = flow.duplicate(cx, packet, seg) {
            return pass;
        }
        flow.refresh_ack(packet, seg);
        let now = cx.now();
        flow.saw_client(now, packet, seg);
        flow.forwarding(seg);
        if let (Some((_, end)), Some(ack)) = (&flow.stack_fin_segment, flow.client_ack) {
            if !packet::seq_lt(ack, *end) {
                flow.stack_fin_segment = None;
                flow.fin_resend = None;
            }
        }
        let pass = if seg.fin && !seg.syn { hold_fin(cx, flow, packet, seg) } else { Pass::Forward };
        flow.release_in_order(cx, self.unread_limit);
        cx.set_timer(flow.next_timer(now));
        pass
    }

    fn stack_segment(&mut self, cx: &mut QuirkCx<'_>, flow: &mut Flow, packet: &[u8], seg: &TcpSummary) -> Pass {
        if seg.syn && seg.ack && !seg.rst && flow.client_ack.is_none() {
            flow.syn_ack = Some(PacketBuf::from_slice(packet));
        }
        flow.stack_said(seg);
        if seg.fin && !seg.rst {
            // ipstack never sends its FIN again: kept, to be sent again until acknowledged.
            let end = seg.seq.wrapping_add(seg.segment_len as u32);
            flow.stack_fin_segment = Some((PacketBuf::from_slice(packet), end));
            let now = cx.now();
            flow.fin_resend = Some((now + FIN_RESEND_FIRST, FIN_RESEND_FIRST));
            cx.set_timer(flow.next_timer(now));
        }
        if seg.fin && !flow.stack_fin {
            flow.stack_fin = true;
            flow.advance(cx);
        }
        Pass::Forward
    }

    fn outlives_bridge(&self, flow: &Flow) -> bool {
        flow.fin_resend.is_some()
    }

    fn timer(&mut self, cx: &mut QuirkCx<'_>, flow: &mut Flow) {
        let now = cx.now();
        flow.advance(cx);
        if let Some((due, gap)) = flow.replay {
            if due <= now {
                if let Some(ack) = &flow.last_ack {
                    tracing::trace!("client quiet: its last ACK given to ipstack again");
                    cx.forward(PacketBuf::from_slice(ack.packet()));
                }
                let gap = gap * 2;
                flow.replay = (gap <= REPLAY_LAST).then(|| (now + gap, gap));
            }
        }
        if let Some((due, gap)) = flow.fin_resend {
            if due <= now {
                if let Some((fin, _)) = &flow.stack_fin_segment {
                    tracing::trace!("ipstack's FIN unacknowledged: sent again");
                    let mut fin = PacketBuf::from_slice(fin.packet());
                    if let Some(said) = flow.stack {
                        let _ = packet::set_ack_number(fin.packet_mut(), said.ack);
                    }
                    cx.answer(fin);
                }
                let gap = gap * 2;
                flow.fin_resend = (gap <= REPLAY_LAST).then(|| (now + gap, gap));
            }
        }
        cx.set_timer(flow.next_timer(now));
    }
}

/// The client's FIN `seg` (or a retransmission of it): its data, if any, goes to the stack
/// now, without the FIN; the FIN is held (see the module docs).
fn hold_fin(cx: &mut QuirkCx<'_>, flow: &mut Flow, packet: &PacketBuf, seg: &TcpSummary) -> Pass {
    let Some(at) = flow.offset(seg.seq.wrapping_add(seg.payload_len() as u32)) else {
        return Pass::Forward; // an old duplicate: the stack answers it
    };
    let fin = if seg.payload_len() > 0 {
        let Some((data, fin)) = packet::split_fin(packet.packet(), seg) else { return Pass::Forward };
        cx.forward(data);
        fin
    } else {
        // Its acknowledgment goes on now, as a pure ACK: held with the FIN, ipstack kept
        // the reply it acknowledged in flight, and with data in flight it does not send
        // its own FIN, so a client that closed after reading the reply waited 2.1 s for
        // the end (until the replayed ACK and ipstack's retransmission).
        if seg.ack {
            let mut ack = PacketBuf::from_slice(packet.packet());
            if let Some(len) = packet::reshape_tcp_segment(ack.packet_mut(), 0..0, false) {
                ack.set_len(len);
                cx.forward(ack);
            }
        }
        PacketBuf::from_slice(packet.packet())
    };
    let told = flow.held_fin.as_ref().is_some_and(|h| h.told);
    flow.held_fin = Some(HeldFin { packet: fin, at, told, poll: FIN_POLL });
    flow.advance(cx);
    Pass::Withhold
}

/// Where `seq` lies in a byte stream whose first byte has sequence number `start`, placed
/// within 2 GiB of `known` (an offset already reached); `None` before the first byte.
fn stream_offset(start: u32, known: u64, seq: u32) -> Option<u64> {
    let from_known = seq.wrapping_sub(start.wrapping_add(known as u32)) as i32;
    known.checked_add_signed(i64::from(from_known))
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;
    use std::time::{Duration, Instant};

    use tungate_core::admission::{Admission, Verdict};
    use tungate_core::packet::{SegmentFields, TcpControl};
    use tungate_core::{Mtu, PacketBuf};
    use tungate_testkit::engine::{Hold, accept_now, tcp_of as tcp};

    use super::{IpstackQuirks, stream_offset};

    /// Admission with these quirks and a flow from `client` (ISN 100) to `server` that
    /// the handler accepted and ipstack answered (SYN-ACK, ISN 5000); the handler's side
    /// comes back too, to keep.
    fn answered(
        now: Instant,
        client: SocketAddr,
        server: SocketAddr,
    ) -> (Admission<IpstackQuirks>, tungate_core::TcpConn) {
        let hold = Hold::default();
        let quirks = IpstackQuirks { unread_limit: 1 << 20 };
        let mut adm = Admission::with_quirks(hold.dispatch(), Mtu::DEFAULT, 4096, Duration::from_secs(25), quirks);
        let mut syn = PacketBuf::from_vec(SegmentFields::new(client, server, TcpControl::Syn, 100, None).build());
        assert_eq!(adm.handle_packet(now, &mut syn), Verdict::Consumed, "held");
        let conn = accept_now(hold.take());
        adm.service(now, |_| {});
        let _port = adm.take_port(client, server).expect("the stack's stream arrives");
        let syn_ack = SegmentFields::new(server, client, TcpControl::Syn, 5000, Some(101));
        assert!(adm.pass_output(now, &PacketBuf::from_vec(syn_ack.build())));
        (adm, conn)
    }

    /// A repeated SYN (the client's SYN-ACK was lost) is answered with ipstack's kept
    /// SYN-ACK, and does not reach ipstack.
    #[test]
    fn a_repeated_syn_gets_the_syn_ack_again() {
        let (client, server): (SocketAddr, SocketAddr) =
            ("[fd18::1]:4000".parse().unwrap(), "[fd77::2]:9001".parse().unwrap());
        let now = Instant::now();
        let (mut adm, _conn) = answered(now, client, server);
        while adm.poll_transmit().is_some() {}

        let mut syn = PacketBuf::from_vec(SegmentFields::new(client, server, TcpControl::Syn, 100, None).build());
        assert_eq!(adm.handle_packet(now, &mut syn), Verdict::Consumed, "the repeat stays here");
        assert!(adm.poll_forward().is_none(), "ipstack does not get it");
        let answers: Vec<_> = std::iter::from_fn(|| adm.poll_transmit()).map(|p| tcp(p.packet())).collect();
        assert!(
            answers.iter().any(|s| s.syn && s.ack && s.seq == 5000 && s.ack_number == 101 && s.dst == client),
            "the SYN-ACK again: {answers:?}"
        );
    }

    /// A client that read the reply and closed: its FIN is held, but the acknowledgment
    /// it carries goes to ipstack at once as a pure ACK (without it ipstack kept the reply
    /// in flight and so did not send its own FIN: the client waited 2.1 s for the end).
    #[test]
    fn a_held_fin_still_acknowledges_the_reply() {
        let (client, server): (SocketAddr, SocketAddr) =
            ("10.0.0.2:4000".parse().unwrap(), "10.77.0.2:7".parse().unwrap());
        let now = Instant::now();
        let (mut adm, _conn) = answered(now, client, server);
        let mut request = PacketBuf::from_vec(
            SegmentFields::new(client, server, TcpControl::Psh, 101, Some(5001)).payload(b"hi").build(),
        );
        assert_eq!(adm.handle_packet(now, &mut request), Verdict::Forward);
        let reply = SegmentFields::new(server, client, TcpControl::Psh, 5001, Some(103)).payload(b"hi!");
        assert!(adm.pass_output(now, &PacketBuf::from_vec(reply.build())));
        while adm.poll_forward().is_some() {}

        let mut fin = PacketBuf::from_vec(SegmentFields::new(client, server, TcpControl::Fin, 103, Some(5004)).build());
        assert_eq!(adm.handle_packet(now, &mut fin), Verdict::Consumed, "the FIN is held");
        let forwarded: Vec<_> = std::iter::from_fn(|| adm.poll_forward()).map(|p| tcp(p.packet())).collect();
        assert!(
            forwarded.iter().any(|s| !s.fin && s.ack && s.ack_number == 5004 && s.seq == 103 && s.segment_len == 0),
            "the FIN's acknowledgment reaches ipstack: {forwarded:?}"
        );
        assert!(forwarded.iter().all(|s| !s.fin), "the FIN itself stays held: {forwarded:?}");
    }

    #[test]
    fn stream_offsets_survive_the_wrap_and_every_4_gib() {
        let start = u32::MAX - 10;
        assert_eq!(stream_offset(start, 0, start), Some(0));
        assert_eq!(stream_offset(start, 0, 5), Some(16), "across the sequence wrap");
        assert_eq!(stream_offset(start, 0, start.wrapping_sub(1)), None, "before the first byte");
        // 5 GiB in, 1 MiB ahead and 1 MiB behind what the handler has.
        let known = 5u64 << 30;
        let at = |offset: u64| start.wrapping_add(offset as u32);
        assert_eq!(stream_offset(start, known, at(known + (1 << 20))), Some(known + (1 << 20)));
        assert_eq!(stream_offset(start, known, at(known - (1 << 20))), Some(known - (1 << 20)));
        // 3 GiB in: what a 32-bit offset took for an old duplicate.
        let known = 3u64 << 30;
        assert_eq!(stream_offset(start, known, at(known + 100)), Some(known + 100));
    }
}
