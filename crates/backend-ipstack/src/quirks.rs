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
//!   the client's FIN last: it is held here; once the handler has every byte before it,
//!   the handler is told of the end itself (`FlowProgress::client_finished`), and once
//!   ipstack has sent its own FIN (the handler's side ended, every reply byte sent), the
//!   held FIN goes to ipstack, acknowledging what the client acknowledged by then — the
//!   server-first close ipstack handles. The client retransmits its FIN meanwhile (those
//!   copies are dropped); its other segments pass.
//! * **FIN with data**: ipstack drops the payload of a segment that carries FIN: such a
//!   segment goes to it as two, the data now and the bare FIN held as above.
//! * **Retransmission only on arrival**: ipstack checks its retransmission timers only
//!   when a packet for the flow arrives; a quiet flow's last pure ACK is given to it again
//!   after [`REPLAY_FIRST`], then after twice as long each time up to [`REPLAY_LAST`].

use std::time::{Duration, Instant};

use tungate_core::PacketBuf;
use tungate_core::admission::{Pass, QuirkCx, StreamQuirks};
use tungate_core::flow::FlowProgress;
use tungate_core::packet::{self, TcpSummary};

/// First replay of a quiet flow's last ACK: past ipstack's fixed 1 s retransmission timeout.
pub const REPLAY_FIRST: Duration = Duration::from_millis(1100);
/// No replays once the gap between them would exceed this: a flow quiet that long is
/// idle, not stalled, and costs nothing from then on.
pub const REPLAY_LAST: Duration = Duration::from_secs(32);
/// How often a held FIN looks whether the handler has caught up. The bridge moves up to
/// 32 KiB per read, so the wait after the last byte is at most this.
pub const FIN_POLL: Duration = Duration::from_millis(2);

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
}

#[derive(Debug)]
struct HeldFin {
    /// The bare FIN segment.
    packet: PacketBuf,
    /// Client bytes before it.
    at: u64,
    /// The handler was told of the end.
    told: bool,
}

impl Flow {
    /// Where the client's byte stream stands at `seq`, counted from its first byte;
    /// `None` for a sequence number before it (an old duplicate).
    fn offset(&self, seq: u32) -> Option<u64> {
        let offset = seq.wrapping_sub(self.start);
        (offset < 1 << 31).then_some(u64::from(offset))
    }

    /// Whether `seg` would leave more than `limit` bytes unread inside the stack.
    fn exceeds(&self, seg: &TcpSummary, limit: u64) -> bool {
        // Pure ACKs (and window updates) carry no data: never hold them back.
        seg.payload_len() > 0
            && self
                .offset(seg.seq.wrapping_add(seg.payload_len() as u32))
                .is_some_and(|end| end > self.progress.delivered() + limit)
    }

    /// A client segment for this flow goes to the stack at `now`: replays wait again, and
    /// a pure ACK becomes the one to replay.
    fn saw_client(&mut self, now: Instant, packet: &PacketBuf, seg: &TcpSummary) {
        if seg.ack && self.client_ack.is_none_or(|a| packet::seq_lt(a, seg.ack_number)) {
            self.client_ack = Some(seg.ack_number);
        }
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
    /// handler does not have yet.
    fn next_timer(&self, now: Instant) -> Option<Instant> {
        let fin = self.held_fin.as_ref().filter(|h| !h.told).map(|_| now + FIN_POLL);
        fin.into_iter().chain(self.replay.map(|(at, _)| at)).min()
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
        }
    }

    fn client_segment(
        &mut self,
        cx: &mut QuirkCx<'_>,
        flow: &mut Flow,
        packet: &mut PacketBuf,
        seg: &mut TcpSummary,
    ) -> Pass {
        if flow.exceeds(seg, self.unread_limit) {
            return Pass::Withhold;
        }
        let now = cx.now();
        flow.saw_client(now, packet, seg);
        let pass = if seg.fin && !seg.syn { hold_fin(cx, flow, packet, seg) } else { Pass::Forward };
        cx.set_timer(flow.next_timer(now));
        pass
    }

    fn stack_segment(&mut self, cx: &mut QuirkCx<'_>, flow: &mut Flow, _: &[u8], seg: &TcpSummary) {
        if seg.fin && !flow.stack_fin {
            flow.stack_fin = true;
            flow.advance(cx);
        }
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
        PacketBuf::from_slice(packet.packet())
    };
    let told = flow.held_fin.as_ref().is_some_and(|h| h.told);
    flow.held_fin = Some(HeldFin { packet: fin, at, told });
    flow.advance(cx);
    Pass::Withhold
}
