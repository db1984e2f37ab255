//! The driver for stacks that take packets and hand out accepted TCP connections as
//! streams (ipstack, netstack-smoltcp), with [`Admission`] in front of them.
//!
//! One task owns the device, the admission layer and the stack's packet ends:
//!
//! ```text
//! TUN ─▶ Admission::handle_packet ─ Forward ─▶ input queue ─▶ StreamStack (its own tasks)
//!          │ UDP, held SYNs, RSTs                               │ packets out   │ accepted
//!          ▼                                                    ▼               ▼
//!        UdpHandler / TcpHandler          TUN ◀── device.send ◀─┘   Admission::take_port
//!                                                                     → bridge(stream, port)
//! ```
//!
//! Input to the stack waits when the stack is full (bounded), and the device is not read
//! while more than a batch waits; output from the stack is written to the TUN with
//! back-pressure, never dropped.

use std::collections::VecDeque;
use std::future::{Future, poll_fn};
use std::io;
use std::net::SocketAddr;
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite};

use crate::admission::{Admission, FlowKey, StreamQuirks, Verdict};
use crate::device::{PacketBuf, PacketDevice};
use crate::engine::RX_BATCH;
use crate::flow::FlowPort;
use crate::stats::Stats;

/// Copies of TUN packets kept for reuse once the stack took them: two batches' worth.
const SPARE_MAX: usize = 2 * RX_BATCH;

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
    /// `futures::Sink` does): the driver flushes after every run of inputs.
    fn input(&mut self, packet: &PacketBuf) -> io::Result<()>;

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

    /// Gives back a buffer from [`poll_output`](Self::poll_output) once written.
    fn recycle(&mut self, buf: PacketBuf) {
        drop(buf);
    }

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

enum StackEvent<T> {
    InputReady,
    Flushed,
    Output(PacketBuf),
    Accepted(T, SocketAddr, SocketAddr),
}

/// Runs `stack` behind `admission` on `device` until `shutdown` completes.
pub async fn run_stream_stack<S: StreamStack, Q: StreamQuirks, D: PacketDevice>(
    mut stack: S,
    mut admission: Admission<Q>,
    mut device: D,
    shutdown: impl Future<Output = ()>,
) -> io::Result<()> {
    let wake = admission.wake_queue();
    let capacity = device.max_packet_len();
    let mut batch: Vec<PacketBuf> = (0..RX_BATCH).map(|_| PacketBuf::with_capacity(capacity)).collect();
    let mut to_stack: VecDeque<PacketBuf> = VecDeque::new();
    let mut spare: Vec<PacketBuf> = Vec::new();
    // Packets given to the stack that it may still hold back (see `StreamStack::poll_flush`).
    let mut unflushed = false;
    // Bridges end with the driver: dropping the set aborts them, their streams are
    // disposed and their ports report a reset to the handlers.
    let mut bridges: tokio::task::JoinSet<FlowKey> = tokio::task::JoinSet::new();
    let far = || tokio::time::Instant::now() + Duration::from_secs(3600);
    let sleep = tokio::time::sleep_until(far());
    // The most connections held at once since the stack was last idle, and since when
    // no flow is left (see `StreamStack::release_idle`).
    let mut peak = 0;
    let mut idle_since: Option<std::time::Instant> = None;
    tokio::pin!(shutdown, sleep);
    loop {
        let now = std::time::Instant::now();
        admission.service(now, |syn| to_stack.push_back(syn));
        while let Some(packet) = admission.poll_transmit() {
            device.send(&packet).await?;
            admission.recycle(packet);
        }
        let idle = peak >= IDLE_RELEASE_PEAK
            && bridges.is_empty()
            && admission.flow_count() == 0
            && to_stack.is_empty()
            && !unflushed;
        idle_since = match idle_since {
            _ if !idle => None,
            None => Some(now),
            Some(since) if now >= since + IDLE_RELEASE_AFTER => {
                if stack.release_idle()? {
                    Stats::inc(&admission.stats().stack_idle_rebuilds);
                    tracing::debug!("the stack held {peak} connections at once and went idle: rebuilt");
                }
                peak = 0;
                None
            }
            since => since,
        };
        let mut deadline = admission.poll_timeout().map(tokio::time::Instant::from_std).unwrap_or_else(far);
        if let Some(since) = idle_since {
            deadline = deadline.min(tokio::time::Instant::from_std(since + IDLE_RELEASE_AFTER));
        }
        if sleep.deadline() != deadline {
            sleep.as_mut().reset(deadline);
        }
        let want_input = !to_stack.is_empty();
        let want_flush = unflushed && !want_input;
        // Stop reading the TUN while the stack is behind: the kernel queues, then drops.
        let read_device = to_stack.len() < RX_BATCH;
        let event = poll_fn(|cx| {
            if let Poll::Ready(packet) = stack.poll_output(cx) {
                return Poll::Ready(packet.map(StackEvent::Output).ok_or_else(stopped));
            }
            if want_input {
                if let Poll::Ready(r) = stack.poll_input_ready(cx) {
                    return Poll::Ready(r.map(|()| StackEvent::InputReady));
                }
            }
            if want_flush {
                if let Poll::Ready(r) = stack.poll_flush(cx) {
                    return Poll::Ready(r.map(|()| StackEvent::Flushed));
                }
            }
            stack.poll_accept(cx).map_ok(|(s, src, dst)| StackEvent::Accepted(s, src, dst))
        });
        tokio::select! {
            biased;
            () = &mut shutdown => return Ok(()),
            event = event => match event? {
                StackEvent::Output(packet) => {
                    let now = std::time::Instant::now();
                    if admission.pass_output(now, &packet) {
                        device.send(&packet).await?;
                    }
                    stack.recycle(packet);
                    // Write out whatever else is ready before looking at anything else.
                    while let Poll::Ready(Some(packet)) = poll_now(|cx| stack.poll_output(cx)) {
                        if admission.pass_output(now, &packet) {
                            device.send(&packet).await?;
                        }
                        stack.recycle(packet);
                    }
                }
                StackEvent::InputReady => {
                    while let Some(packet) = to_stack.pop_front() {
                        stack.input(&packet)?;
                        // Kept for the next copy from the TUN, at most a batch or two of
                        // full-size buffers. Packets the admission layer made (held SYNs,
                        // split FINs, replayed ACKs) enter without taking a spare, so an
                        // unbounded list grew by a buffer or more per connection for good
                        // (ipstack stayed +25/+43/+65 MiB above idle after three bursts of
                        // 5 000: results/scale-bursts-*.md).
                        if spare.len() < SPARE_MAX && packet.capacity() >= capacity {
                            spare.push(packet);
                        }
                        if to_stack.is_empty() || !matches!(poll_now(|cx| stack.poll_input_ready(cx)), Poll::Ready(Ok(()))) {
                            break;
                        }
                    }
                    // Push the run through now; if the stack is full, the loop polls
                    // `poll_flush` with a real waker until it is done.
                    unflushed = match poll_now(|cx| stack.poll_flush(cx)) {
                        Poll::Ready(r) => {
                            r?;
                            false
                        }
                        Poll::Pending => true,
                    };
                }
                StackEvent::Flushed => unflushed = false,
                StackEvent::Accepted(stream, src, dst) => match admission.take_port(src, dst) {
                    Some(port) => {
                        let aborts = admission.aborts();
                        peak = peak.max(bridges.len() + 1);
                        bridges.spawn(async move {
                            // Disposed however the task ends (finished or aborted).
                            let mut stream = Disposing::<S>(Some(stream));
                            if bridge(&mut stream, port).await == BridgeEnd::Aborted {
                                // Before the stream is dropped: what the stack sends on
                                // drop must not reach the client.
                                aborts.push((src, dst));
                            }
                            (src, dst)
                        });
                    }
                    None => S::dispose(stream),
                },
            },
            ready = device.readable(), if read_device => {
                ready?;
                let n = device.try_recv_batch(&mut batch)?;
                let now = std::time::Instant::now();
                for packet in &mut batch[..n] {
                    if admission.handle_packet(now, packet) == Verdict::Forward {
                        let mut copy = spare.pop().unwrap_or_else(|| PacketBuf::with_capacity(capacity));
                        copy.spare_mut()[..packet.len()].copy_from_slice(packet.packet());
                        copy.set_len(packet.len());
                        to_stack.push_back(copy);
                    }
                    while let Some(made) = admission.poll_forward() {
                        to_stack.push_back(made);
                    }
                }
            }
            Some(ended) = bridges.join_next(), if !bridges.is_empty() => {
                if let Ok(key) = ended {
                    admission.finished(std::time::Instant::now(), key);
                }
            }
            () = wake.notified() => {}
            () = &mut sleep => {}
        }
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

fn stopped() -> io::Error {
    io::Error::other("the stack stopped")
}

#[cfg(test)]
mod tests {
    use std::net::{Ipv4Addr, SocketAddr};
    use std::sync::{Arc, Mutex};

    use smoltcp::wire::TcpControl;

    use super::*;
    use crate::config::Mtu;
    use crate::device::mem;
    use crate::{Dispatch, TcpHandler, TcpRequest, UdpHandler, UdpSession};

    /// A stack that, like a `futures::Sink`, keeps the last packet it was given in a
    /// one-slot buffer until the next `poll_input_ready` or `poll_flush`. With `busy`,
    /// its first flush finds the stack full: it returns `Pending` and wakes the driver
    /// from another task a little later.
    #[derive(Default)]
    struct SinkLike {
        slot: Option<Vec<u8>>,
        delivered: Arc<Mutex<Vec<Vec<u8>>>>,
        busy: bool,
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

        fn input(&mut self, packet: &PacketBuf) -> io::Result<()> {
            assert!(self.slot.is_none(), "input without poll_input_ready in between");
            self.slot = Some(packet.packet().to_vec());
            Ok(())
        }

        fn poll_flush(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            if std::mem::take(&mut self.busy) {
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

    /// The same when the stack is full at the first flush: the driver must poll the
    /// flush again when woken, not forget it.
    #[tokio::test]
    async fn a_pending_flush_is_polled_again_when_woken() {
        last_packet_reaches(SinkLike { busy: true, ..SinkLike::default() }).await;
    }

    async fn last_packet_reaches(stack: SinkLike) {
        let (device, peer) = mem::pair(Mtu::DEFAULT, 16);
        let handlers = Dispatch::new(Arc::new(AcceptAll), Arc::new(AcceptAll));
        let admission = Admission::new(handlers, Mtu::DEFAULT, 4096, Duration::from_secs(25));
        let delivered = stack.delivered.clone();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let driver = tokio::spawn(run_stream_stack(stack, admission, device, async move {
            let _ = stopped.await;
        }));
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
