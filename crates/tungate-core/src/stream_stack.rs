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

use crate::admission::{Admission, FlowKey, Verdict, bridge};
use crate::device::{PacketBuf, PacketDevice};
use crate::engine::RX_BATCH;

/// A TCP stack that terminates connections itself and yields them as streams.
pub trait StreamStack: Send + 'static {
    type Stream: AsyncRead + AsyncWrite + Unpin + Send + 'static;

    /// Ready when the stack can take one more packet.
    fn poll_input_ready(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>>;

    /// Gives the stack one packet; called only after `poll_input_ready` returned ready.
    fn input(&mut self, packet: &PacketBuf) -> io::Result<()>;

    /// The next packet the stack wants on the TUN; `None` when the stack stopped.
    fn poll_output(&mut self, cx: &mut Context<'_>) -> Poll<Option<PacketBuf>>;

    /// Gives back a buffer from [`poll_output`](Self::poll_output) once written.
    fn recycle(&mut self, buf: PacketBuf) {
        drop(buf);
    }

    /// The next accepted connection: (stream, client, original destination).
    fn poll_accept(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<(Self::Stream, SocketAddr, SocketAddr)>>;

    /// Disposes of a stream that finished or was not wanted. Stacks whose `Drop` must not
    /// run on a runtime thread override this.
    fn dispose(stream: Self::Stream) {
        drop(stream);
    }
}

enum StackEvent<T> {
    InputReady,
    Output(PacketBuf),
    Accepted(T, SocketAddr, SocketAddr),
}

/// Runs `stack` behind `admission` on `device` until `shutdown` completes.
pub async fn run_stream_stack<S: StreamStack, D: PacketDevice>(
    mut stack: S,
    mut admission: Admission,
    mut device: D,
    shutdown: impl Future<Output = ()>,
) -> io::Result<()> {
    let wake = admission.wake_queue();
    let capacity = device.max_packet_len();
    let mut batch: Vec<PacketBuf> = (0..RX_BATCH).map(|_| PacketBuf::with_capacity(capacity)).collect();
    let mut to_stack: VecDeque<PacketBuf> = VecDeque::new();
    let mut spare: Vec<PacketBuf> = Vec::new();
    // Bridges end with the driver: dropping the set aborts them, their streams are
    // disposed and their ports report a reset to the handlers.
    let mut bridges: tokio::task::JoinSet<FlowKey> = tokio::task::JoinSet::new();
    let far = || tokio::time::Instant::now() + Duration::from_secs(3600);
    let sleep = tokio::time::sleep_until(far());
    tokio::pin!(shutdown, sleep);
    loop {
        let now = std::time::Instant::now();
        admission.service(now, |syn| to_stack.push_back(syn));
        while let Some(packet) = admission.poll_transmit() {
            device.send(&packet).await?;
            admission.recycle(packet);
        }
        let deadline = admission.poll_timeout().map(tokio::time::Instant::from_std).unwrap_or_else(far);
        if sleep.deadline() != deadline {
            sleep.as_mut().reset(deadline);
        }
        let want_input = !to_stack.is_empty();
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
            stack.poll_accept(cx).map_ok(|(s, src, dst)| StackEvent::Accepted(s, src, dst))
        });
        tokio::select! {
            biased;
            () = &mut shutdown => return Ok(()),
            event = event => match event? {
                StackEvent::Output(packet) => {
                    device.send(&packet).await?;
                    stack.recycle(packet);
                    // Write out whatever else is ready before looking at anything else.
                    while let Poll::Ready(Some(packet)) = poll_now(|cx| stack.poll_output(cx)) {
                        device.send(&packet).await?;
                        stack.recycle(packet);
                    }
                }
                StackEvent::InputReady => {
                    while let Some(packet) = to_stack.pop_front() {
                        stack.input(&packet)?;
                        spare.push(packet);
                        if to_stack.is_empty() || !matches!(poll_now(|cx| stack.poll_input_ready(cx)), Poll::Ready(Ok(()))) {
                            break;
                        }
                    }
                }
                StackEvent::Accepted(stream, src, dst) => match admission.take_port(src, dst) {
                    Some(port) => {
                        bridges.spawn(async move {
                            // Disposed however the task ends (finished or aborted).
                            let mut stream = Disposing::<S>(Some(stream));
                            bridge(&mut stream, port).await;
                            (src, dst)
                        });
                    }
                    None => S::dispose(stream),
                },
            },
            ready = device.readable(), if read_device => {
                ready?;
                let n = device.try_recv_batch(&mut batch)?;
                for packet in &mut batch[..n] {
                    if admission.handle_packet(packet) == Verdict::Forward {
                        // (Held SYNs come back to `spare` sized to the SYN: skip those.)
                        let mut copy = match spare.pop() {
                            Some(buf) if buf.capacity() >= packet.len() => buf,
                            _ => PacketBuf::with_capacity(capacity),
                        };
                        copy.spare_mut()[..packet.len()].copy_from_slice(packet.packet());
                        copy.set_len(packet.len());
                        to_stack.push_back(copy);
                    }
                }
            }
            Some(ended) = bridges.join_next(), if !bridges.is_empty() => {
                if let Ok(key) = ended {
                    admission.finished(key);
                }
            }
            () = wake.notified() => {}
            () = &mut sleep => {}
        }
    }
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
