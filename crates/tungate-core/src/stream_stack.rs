//! Stacks that take packets and hand out accepted TCP connections as streams (ipstack,
//! netstack-smoltcp), with [`Admission`] in front of them, as an [`Engine`] for the one
//! driver ([`StreamEngine`]):
//!
//! ```text
//! TUN ─▶ Admission::handle_packet ─ Forward ─▶ input queue ─▶ StreamStack (its own tasks)
//!          │ UDP, held SYNs, RSTs                               │ packets out   │ accepted
//!          ▼                                                    ▼               ▼
//!        UdpHandler / TcpHandler    TUN ◀── poll_transmit ◀── pass_output   Admission::take_port
//!                                                                           → bridge(stream, port)
//! ```
//!
//! Input to the stack waits when the stack is full (bounded), and the device is not read
//! while more than a batch waits; output from the stack is written to the TUN with
//! back-pressure, never dropped.

use std::collections::VecDeque;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncWrite};
use tokio::task::JoinSet;

use crate::admission::{Admission, FlowKey, StreamQuirks, Verdict};
use crate::device::{PacketBuf, PacketPool};
use crate::engine::{Engine, Handled, RX_BATCH};
use crate::flow::{FlowPort, WakeQueue};
use crate::stats::Stats;

/// Buffers for copies of TUN packets kept for reuse: two batches' worth. (An unbounded
/// spare list once grew by a buffer or more per connection for good, because packets
/// admission makes enter without taking one: ipstack stayed +25/+43/+65 MiB above idle
/// after three bursts of 5 000, results/scale-bursts-*.md.)
const COPIES_KEPT: usize = 2 * RX_BATCH;

/// The fewest connections held at once after which an idle stack is offered
/// [`StreamStack::release_idle`]: below it, what a rebuild gives back is not worth it
/// (netstack-smoltcp's socket set keeps about 0.5 KiB per connection it ever held at
/// once: 4.2 MiB after 8 000, glibc's `malloc_stats` 10 s after they closed).
pub const IDLE_RELEASE_PEAK: usize = 1024;

/// How long a stack must have held no flow before [`StreamStack::release_idle`].
pub const IDLE_RELEASE_AFTER: Duration = Duration::from_secs(2);

/// A TCP stack that terminates connections itself and yields them as streams.
pub trait StreamStack: Send + 'static {
    type Stream: AsyncRead + AsyncWrite + Unpin + Send + 'static;

    /// Ready when the stack can take one more packet.
    fn poll_input_ready(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>>;

    /// Gives the stack one packet; called only after `poll_input_ready` returned ready.
    /// A stack may hold the packet back until [`poll_flush`](Self::poll_flush) (a
    /// `futures::Sink` does): the driver flushes after every run of inputs. The buffer
    /// goes back to its pool when the stack drops it.
    fn input(&mut self, packet: PacketBuf) -> io::Result<()>;

    /// Ready when every packet given to [`input`](Self::input) has reached the stack.
    /// Until then the driver keeps polling it with a real waker: a packet held back here
    /// would otherwise wait for the next packet to push it through (a held-back window
    /// update or last ACK stalls a transfer for good).
    fn poll_flush(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let _ = cx;
        Poll::Ready(Ok(()))
    }

    /// The next packet the stack wants on the TUN; `None` when the stack stopped.
    fn poll_output(&mut self, cx: &mut Context<'_>) -> Poll<Option<PacketBuf>>;

    /// The next accepted connection: (stream, client, original destination).
    fn poll_accept(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<(Self::Stream, SocketAddr, SocketAddr)>>;

    /// Called once the stack is idle after holding at least [`IDLE_RELEASE_PEAK`]
    /// connections at once: no flow has been left for [`IDLE_RELEASE_AFTER`]. Admission
    /// forgets a flow when its bridge ends and answers its later segments itself, so
    /// nothing the stack still holds can be reached, and the delay lets the last
    /// connections' final segments out. A stack whose crate keeps its tables at their
    /// largest size rebuilds itself here to give that memory back; returns whether it did.
    fn release_idle(&mut self) -> io::Result<bool> {
        Ok(false)
    }

    /// Disposes of a stream that finished or was not wanted. Stacks whose `Drop` must not
    /// run on a runtime thread override this.
    fn dispose(stream: Self::Stream) {
        drop(stream);
    }
}

/// A [`StreamStack`] behind [`Admission`], as an [`Engine`] for the one driver
/// ([`run_engine`](crate::engine::run_engine)). TUN packets pass admission and are copied
/// to the stack; the stack's output, its accepted streams and the bridges' ends are
/// polled input ([`Engine::poll_io`]).
pub struct StreamEngine<S: StreamStack, Q: StreamQuirks> {
    stack: S,
    admission: Admission<Q>,
    /// Packets for the stack, in order: admitted TUN packets, released SYNs, what the
    /// quirks made.
    to_stack: VecDeque<PacketBuf>,
    /// Buffers for copies of TUN packets, back once the stack is done with them: a batch
    /// or two of the device's largest packets.
    copies: PacketPool,
    /// Packets given to the stack that it may still hold back (see [`StreamStack::poll_flush`]).
    unflushed: bool,
    /// The stack's output that admission let pass, for the device.
    out: VecDeque<PacketBuf>,
    /// Bridges end with the engine: dropping the set aborts them, their streams are
    /// disposed and their ports report a reset to the handlers.
    bridges: JoinSet<FlowKey>,
    /// The most connections held at once since the stack was last idle, and since when
    /// no flow is left (see [`StreamStack::release_idle`]).
    peak: usize,
    idle_since: Option<Instant>,
    /// A failure found outside `poll_io` (a rebuild), reported by the next `poll_io`.
    failed: Option<io::Error>,
}

impl<S: StreamStack, Q: StreamQuirks> std::fmt::Debug for StreamEngine<S, Q> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StreamEngine")
            .field("flows", &self.admission.flow_count())
            .field("to_stack", &self.to_stack.len())
            .field("out", &self.out.len())
            .field("bridges", &self.bridges.len())
            .finish_non_exhaustive()
    }
}

impl<S: StreamStack, Q: StreamQuirks> StreamEngine<S, Q> {
    /// `stack` behind `admission`, on a device whose packets are at most `max_packet_len`
    /// bytes ([`PacketDevice::max_packet_len`](crate::device::PacketDevice::max_packet_len)).
    pub fn new(stack: S, admission: Admission<Q>, max_packet_len: usize) -> Self {
        StreamEngine {
            stack,
            admission,
            to_stack: VecDeque::new(),
            copies: PacketPool::new(max_packet_len, COPIES_KEPT),
            unflushed: false,
            out: VecDeque::new(),
            bridges: JoinSet::new(),
            peak: 0,
            idle_since: None,
            failed: None,
        }
    }

    /// Gives the stack what waits for it while it takes more, then pushes the run
    /// through ([`StreamStack::poll_flush`]); if the stack is full, `poll_io` polls the
    /// flush with a real waker until it is done.
    fn feed(&mut self) -> io::Result<()> {
        while let Some(packet) = self.to_stack.pop_front() {
            self.stack.input(packet)?;
            if self.to_stack.is_empty()
                || !matches!(poll_now(|cx| self.stack.poll_input_ready(cx)), Poll::Ready(Ok(())))
            {
                break;
            }
        }
        self.unflushed = match poll_now(|cx| self.stack.poll_flush(cx)) {
            Poll::Ready(r) => {
                r?;
                false
            }
            Poll::Pending => true,
        };
        Ok(())
    }

    /// A connection the stack accepted: bridged to its flow's port, or disposed of if
    /// admission has none for it (a second stream for a retransmitted SYN).
    fn accepted(&mut self, stream: S::Stream, src: SocketAddr, dst: SocketAddr) {
        let Some(port) = self.admission.take_port(src, dst) else {
            S::dispose(stream);
            return;
        };
        let aborts = self.admission.aborts();
        self.peak = self.peak.max(self.bridges.len() + 1);
        self.bridges.spawn(async move {
            // Disposed however the task ends (finished or aborted).
            let mut stream = Disposing::<S>(Some(stream));
            if bridge(&mut stream, port).await == BridgeEnd::Aborted {
                // Before the stream is dropped: what the stack sends on drop must not
                // reach the client.
                aborts.push((src, dst));
            }
            (src, dst)
        });
    }
}

impl<S: StreamStack, Q: StreamQuirks> Engine for StreamEngine<S, Q> {
    fn handle_packet(&mut self, now: Instant, packet: &mut PacketBuf) -> Handled {
        if self.admission.handle_packet(now, packet) == Verdict::Forward {
            let mut copy = self.copies.take();
            copy.spare_mut()[..packet.len()].copy_from_slice(packet.packet());
            copy.set_len(packet.len());
            self.to_stack.push_back(copy);
        }
        while let Some(made) = self.admission.poll_forward() {
            self.to_stack.push_back(made);
        }
        Handled::Consumed
    }

    fn handle_wakeups(&mut self, now: Instant) {
        let to_stack = &mut self.to_stack;
        self.admission.service(now, |syn| to_stack.push_back(syn));
    }

    /// Offers an idle stack [`StreamStack::release_idle`] once it has been idle long enough.
    fn handle_timeout(&mut self, now: Instant) {
        let idle = self.peak >= IDLE_RELEASE_PEAK
            && self.bridges.is_empty()
            && self.admission.flow_count() == 0
            && self.to_stack.is_empty()
            && !self.unflushed;
        self.idle_since = match self.idle_since {
            _ if !idle => None,
            None => Some(now),
            Some(since) if now >= since + IDLE_RELEASE_AFTER => {
                match self.stack.release_idle() {
                    Ok(true) => {
                        Stats::inc(&self.admission.stats().stack_idle_rebuilds);
                        tracing::debug!("the stack held {} connections at once and went idle: rebuilt", self.peak);
                    }
                    Ok(false) => {}
                    Err(e) => self.failed = Some(e),
                }
                self.peak = 0;
                None
            }
            since => since,
        };
    }

    fn poll_timeout(&mut self) -> Option<Instant> {
        let idle = self.idle_since.map(|since| since + IDLE_RELEASE_AFTER);
        self.admission.poll_timeout().into_iter().chain(idle).min()
    }

    /// The stack's output that already passed admission first (an abort's RST must not
    /// overtake a segment of that flow let through before it), then this layer's
    /// packets (RSTs, UDP replies).
    fn poll_transmit(&mut self) -> Option<PacketBuf> {
        self.out.pop_front().or_else(|| self.admission.poll_transmit())
    }

    fn wake_queue(&self) -> Arc<WakeQueue> {
        self.admission.wake_queue()
    }

    fn flows(&mut self) -> Option<&mut dyn crate::admission::Flows> {
        Some(self.admission.flows())
    }

    /// Stop reading the TUN while the stack is behind: the kernel queues, then drops.
    fn wants_packets(&self) -> bool {
        self.to_stack.len() < RX_BATCH
    }

    fn poll_io(&mut self, cx: &mut Context<'_>, now: Instant) -> Poll<io::Result<()>> {
        if let Some(e) = self.failed.take() {
            return Poll::Ready(Err(e));
        }
        let mut progress = false;
        // The stack's output first, a batch at a time (the driver writes it out between).
        while self.out.len() < RX_BATCH {
            match self.stack.poll_output(cx) {
                Poll::Ready(Some(packet)) => {
                    if self.admission.pass_output(now, &packet) {
                        self.out.push_back(packet);
                    }
                    progress = true;
                }
                Poll::Ready(None) => return Poll::Ready(Err(io::Error::other("the stack stopped"))),
                Poll::Pending => break,
            }
        }
        if !self.to_stack.is_empty() {
            if let Poll::Ready(r) = self.stack.poll_input_ready(cx) {
                r?;
                self.feed()?;
                progress = true;
            }
        } else if self.unflushed {
            if let Poll::Ready(r) = self.stack.poll_flush(cx) {
                r?;
                self.unflushed = false;
                progress = true;
            }
        }
        for _ in 0..RX_BATCH {
            match self.stack.poll_accept(cx) {
                Poll::Ready(accepted) => {
                    let (stream, src, dst) = accepted?;
                    self.accepted(stream, src, dst);
                    progress = true;
                }
                Poll::Pending => break,
            }
        }
        while let Poll::Ready(Some(ended)) = self.bridges.poll_join_next(cx) {
            if let Ok(key) = ended {
                self.admission.finished(now, key);
            }
            progress = true;
        }
        if progress { Poll::Ready(Ok(())) } else { Poll::Pending }
    }
}

/// How a [`bridge`] ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BridgeEnd {
    /// Both directions ended with FIN.
    Clean,
    /// The handler aborted: the client must get a RST ([`Aborts::push`](crate::admission::Aborts::push)).
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
/// Also used by the system stack and the redirect baseline for a kernel socket whose
/// handler did not take it whole.
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

/// Owns a stack's stream and hands it to [`StreamStack::dispose`] when dropped.
struct Disposing<S: StreamStack>(Option<S::Stream>);

impl<S: StreamStack> Drop for Disposing<S> {
    fn drop(&mut self) {
        if let Some(stream) = self.0.take() {
            S::dispose(stream);
        }
    }
}

impl<S: StreamStack> AsyncRead for Disposing<S> {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.0.as_mut() {
            Some(s) => std::pin::Pin::new(s).poll_read(cx, buf),
            None => Poll::Ready(Ok(())),
        }
    }
}

impl<S: StreamStack> AsyncWrite for Disposing<S> {
    fn poll_write(mut self: std::pin::Pin<&mut Self>, cx: &mut Context<'_>, data: &[u8]) -> Poll<io::Result<usize>> {
        match self.0.as_mut() {
            Some(s) => std::pin::Pin::new(s).poll_write(cx, data),
            None => Poll::Ready(Err(io::ErrorKind::BrokenPipe.into())),
        }
    }

    fn poll_flush(mut self: std::pin::Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.0.as_mut() {
            Some(s) => std::pin::Pin::new(s).poll_flush(cx),
            None => Poll::Ready(Ok(())),
        }
    }

    fn poll_shutdown(mut self: std::pin::Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.0.as_mut() {
            Some(s) => std::pin::Pin::new(s).poll_shutdown(cx),
            None => Poll::Ready(Ok(())),
        }
    }
}

/// Polls once without registering for a wake-up (the loop polls again with a real waker
/// before it sleeps).
fn poll_now<T>(f: impl FnOnce(&mut Context<'_>) -> Poll<T>) -> Poll<T> {
    f(&mut Context::from_waker(Waker::noop()))
}

#[cfg(test)]
mod tests {
    use std::net::{Ipv4Addr, SocketAddr};
    use std::sync::{Arc, Mutex};

    use smoltcp::wire::TcpControl;

    use super::*;
    use crate::config::Mtu;
    use crate::device::{PacketDevice, mem};
    use crate::{Dispatch, TcpHandler, TcpRequest, UdpHandler, UdpSession};

    /// A stack that, like a `futures::Sink`, keeps the last packet it was given in a
    /// one-slot buffer until the next `poll_input_ready` or `poll_flush`. Its first
    /// `busy` flushes find the stack full: each returns `Pending` and wakes the driver
    /// from another task a little later.
    #[derive(Default)]
    struct SinkLike {
        slot: Option<Vec<u8>>,
        delivered: Arc<Mutex<Vec<Vec<u8>>>>,
        busy: u8,
    }

    impl SinkLike {
        fn deliver(&mut self) {
            if let Some(p) = self.slot.take() {
                self.delivered.lock().expect("lock").push(p);
            }
        }
    }

    impl StreamStack for SinkLike {
        type Stream = tokio::io::DuplexStream;

        fn poll_input_ready(&mut self, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            self.deliver();
            Poll::Ready(Ok(()))
        }

        fn input(&mut self, packet: PacketBuf) -> io::Result<()> {
            assert!(self.slot.is_none(), "input without poll_input_ready in between");
            self.slot = Some(packet.packet().to_vec());
            Ok(())
        }

        fn poll_flush(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            if self.busy > 0 {
                self.busy -= 1;
                let waker = cx.waker().clone();
                tokio::spawn(async move {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    waker.wake();
                });
                return Poll::Pending;
            }
            self.deliver();
            Poll::Ready(Ok(()))
        }

        fn poll_output(&mut self, _: &mut Context<'_>) -> Poll<Option<PacketBuf>> {
            Poll::Pending
        }

        fn poll_accept(&mut self, _: &mut Context<'_>) -> Poll<io::Result<(Self::Stream, SocketAddr, SocketAddr)>> {
            Poll::Pending
        }
    }

    struct AcceptAll;

    impl TcpHandler for AcceptAll {
        fn handle_tcp(&self, request: TcpRequest) {
            drop(crate::api::tcp::now_or_never(request.accept()));
        }
    }

    impl UdpHandler for AcceptAll {
        fn handle_udp(&self, _: UdpSession) {}
    }

    fn syn(src: SocketAddr, dst: SocketAddr) -> Vec<u8> {
        crate::packet::SegmentFields::new(src, dst, TcpControl::Syn, 1000, None).build()
    }

    /// One accepted SYN and nothing after it: the stack must get it without a second
    /// packet to push it through. (netstack-smoltcp's Sink held such a last packet — a
    /// SYN, a request, a window update — until the client retransmitted or, for a
    /// window update, for good.)
    #[tokio::test]
    async fn the_last_packet_of_a_run_reaches_a_buffering_stack() {
        last_packet_reaches(SinkLike::default()).await;
    }

    /// The same when the stack is full at the first flushes (the engine's own try right
    /// after the input, then the driver's poll with a real waker): the driver must poll
    /// the flush again when woken, not forget it.
    #[tokio::test]
    async fn a_pending_flush_is_polled_again_when_woken() {
        last_packet_reaches(SinkLike { busy: 2, ..SinkLike::default() }).await;
    }

    async fn last_packet_reaches(stack: SinkLike) {
        let (device, peer) = mem::pair(Mtu::DEFAULT, 16);
        let handlers = Dispatch::new(Arc::new(AcceptAll), Arc::new(AcceptAll));
        let admission = Admission::new(handlers, Mtu::DEFAULT, 4096, Duration::from_secs(25));
        let delivered = stack.delivered.clone();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let engine = StreamEngine::new(stack, admission, device.max_packet_len());
        let shutdown = async move {
            let _ = stopped.await;
        };
        let driver = tokio::spawn(crate::engine::run_engine(engine, device, shutdown, None, std::time::Duration::ZERO));
        let client = SocketAddr::from((Ipv4Addr::new(198, 18, 0, 2), 40000));
        let dst = SocketAddr::from((Ipv4Addr::new(10, 77, 0, 2), 80));
        let packet = syn(client, dst);
        peer.tx.send(packet.clone()).await.expect("send");
        tokio::time::timeout(Duration::from_secs(10), async {
            while delivered.lock().expect("lock").is_empty() {
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        })
        .await
        .expect("the accepted SYN reached the stack without a second packet");
        assert_eq!(*delivered.lock().expect("lock"), vec![packet], "the stack got exactly the client's SYN");
        let _ = stop.send(());
        driver.await.expect("driver task").expect("driver ends cleanly");
    }
}
