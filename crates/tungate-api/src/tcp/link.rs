//! The stack's side of a flow: [`FlowLink`] for packet engines that move bytes under one
//! lock, [`FlowPort`] for stacks that hand out connections as streams.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use super::request::TcpRequest;
use super::state::{Decision, Shared, State};
use crate::ring::RingBudget;
use crate::stats::Stats;
use crate::wake::{FlowId, WakeQueue};

/// The default capacity of each direction's ring between stack and handler.
pub const DEFAULT_RING_CAPACITY: usize = 256 * 1024;

/// Creates the linked pair for a new flow, its rings sized and accounted by `rings`: the
/// stack keeps the [`FlowLink`], the handler gets the [`TcpRequest`].
pub fn new_flow(
    id: FlowId,
    src: SocketAddr,
    dst: SocketAddr,
    rings: &RingBudget,
    wake: Arc<WakeQueue>,
) -> (FlowLink, TcpRequest) {
    let shared = Shared::new(id, rings, wake);
    (FlowLink { shared: shared.clone() }, TcpRequest::new(src, dst, shared))
}

/// The stack's side of a flow. All methods are cheap and never block on the handler.
/// Dropping it without [`set_closed`](FlowLink::set_closed) (the stack stopped) resets
/// the flow, so no handler waits forever.
#[derive(Debug)]
pub struct FlowLink {
    shared: Arc<Shared>,
}

#[cfg(test)]
impl FlowLink {
    /// Bytes of storage the rx and tx rings hold now.
    pub(crate) fn ring_storage(&self) -> (usize, usize) {
        let st = self.shared.state();
        (st.rx.storage(), st.tx.storage())
    }
}

impl Drop for FlowLink {
    fn drop(&mut self) {
        let closed = self.shared.state().closed;
        if !closed {
            self.set_closed(true);
        }
    }
}

/// What a stack must do for a flow, read under one lock.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FlowSignals {
    pub decision: Decision,
    /// The handler asked for RST.
    pub abort_requested: bool,
    /// The handler will write no more and every written byte has been taken (send FIN).
    pub tx_finished: bool,
    /// The handler is gone: discard client bytes instead of buffering them.
    pub handler_gone: bool,
}

/// The byte-moving view of a flow that [`FlowLink::pump`] lends to the stack.
#[derive(Debug)]
pub struct FlowIo<'a> {
    st: &'a mut State,
    got: usize,
    gave: usize,
}

impl FlowIo<'_> {
    /// Offers client bytes to the handler; returns how many were taken (all of them when
    /// the handler is gone and they are discarded).
    pub fn deliver(&mut self, data: &[u8]) -> usize {
        if self.st.handler_gone {
            // Like a closed kernel socket: data for nobody is answered with RST.
            if !data.is_empty() {
                self.st.abort_requested = true;
            }
            return data.len();
        }
        let n = self.st.rx.push(data);
        self.got += n;
        if n < data.len() && !self.st.rx_blocked {
            self.st.rx_blocked = true;
            Stats::inc(&self.st.rx.stats().tcp_window_stalls);
        }
        n
    }

    /// Fills `out` with handler bytes for the client; returns how many.
    pub fn fill(&mut self, out: &mut [u8]) -> usize {
        let n = self.st.tx.pop(out);
        self.gave += n;
        n
    }

    /// Lends `f` the handler's bytes for the client, oldest first, one contiguous run at a
    /// time, until `f` takes less than it was offered; returns how many were taken. For
    /// stacks that copy into their own send queue (lwIP), this saves a copy over
    /// [`fill`](Self::fill).
    pub fn fill_with(&mut self, mut f: impl FnMut(&[u8]) -> usize) -> usize {
        let mut total = 0;
        loop {
            let run = self.st.tx.filled();
            if run.is_empty() {
                break;
            }
            let offered = run.len();
            let n = f(run).min(offered);
            self.st.tx.consume(n);
            total += n;
            if n < offered {
                break;
            }
        }
        self.gave += total;
        total
    }
}

impl FlowLink {
    /// Lends `f` a [`FlowIo`] to move bytes both ways under one lock, then wakes the
    /// handler as needed and returns the flow's signals. Clears the "queued" mark: a later
    /// change by the handler queues the flow again. Before a flow is accepted (or after it
    /// closed) `f` is not called.
    pub fn pump(&self, f: impl FnOnce(&mut FlowIo<'_>)) -> FlowSignals {
        let mut guard = self.shared.state();
        let st = &mut *guard;
        st.queued = false;
        if st.decision == Decision::Accepted && !st.closed {
            let mut io = FlowIo { st: &mut *st, got: 0, gave: 0 };
            f(&mut io);
            let (got, gave) = (io.got, io.gave);
            st.release_if_handler_gone();
            if got > 0 {
                if let Some(w) = st.reader.take() {
                    w.wake();
                }
            }
            if gave > 0 {
                if let Some(w) = st.writer.take() {
                    w.wake();
                }
            }
        }
        FlowSignals {
            decision: st.decision,
            abort_requested: st.abort_requested,
            tx_finished: st.tx_closed && st.tx.len() == 0,
            handler_gone: st.handler_gone,
        }
    }

    /// The client sent FIN and all its bytes were delivered: the handler's reads end.
    pub fn set_rx_eof(&self) {
        let mut st = self.shared.state();
        if !st.rx_eof {
            st.rx_eof = true;
            if let Some(w) = st.reader.take() {
                w.wake();
            }
        }
    }

    /// The stack is done with this flow; `reset` tells whether it ended abnormally.
    pub fn set_closed(&self, reset: bool) {
        let mut st = self.shared.state();
        st.closed = true;
        st.reset |= reset;
        if let Some(w) = st.reader.take() {
            w.wake();
        }
        if let Some(w) = st.writer.take() {
            w.wake();
        }
    }

    pub fn decision(&self) -> Decision {
        self.shared.state().decision
    }

    /// Clears the "queued" mark for a flow serviced without [`pump`](Self::pump).
    pub fn clear_queued(&self) {
        self.shared.state().queued = false;
    }

    /// Marks the flow as one whose connection the stack terminates in a kernel socket it
    /// can hand over whole ([`FlowPort::hand_over`]): the handler's accepted connection is
    /// then that socket. Call before the request reaches the handler.
    pub fn offer_socket(&self) {
        self.shared.state().socket_capable = true;
    }

    /// A handle the flow table keeps to evict the flow later, whoever holds the link.
    pub fn handle(&self) -> FlowHandle {
        FlowHandle { shared: self.shared.clone() }
    }

    /// Turns this link into an async [`FlowPort`], for stacks that hand out connections
    /// as byte streams. From then on the flow wakes the port's task, not the wake queue.
    pub fn into_port(self) -> FlowPort {
        self.shared.state().queued = true;
        FlowPort { link: self }
    }
}

/// The flow table's handle on a flow ([`FlowLink::handle`]).
#[derive(Debug, Clone)]
pub struct FlowHandle {
    shared: Arc<Shared>,
}

impl FlowHandle {
    /// Evicts the flow (a session limit made room for a new one): the handler's reads
    /// and writes fail with `ConnectionReset` from now on (its relay then resets the
    /// upstream), and the stack is asked, as for a handler's abort, to send the client a
    /// RST; the flow is queued on the wake queue, and its port's task woken, for that.
    pub fn evict(&self) {
        let mut st = self.shared.state();
        st.evicted = true;
        st.abort_requested = true;
        st.reset = true;
        if let Some(w) = st.reader.take() {
            w.wake();
        }
        if let Some(w) = st.writer.take() {
            w.wake();
        }
        if let Some(w) = st.stack_waker.take() {
            w.wake();
        }
        // Queued whatever the mark says: a flow served as a port (or handed over as a
        // kernel socket) is otherwise never queued again, and its stack must still hear.
        st.queued = true;
        self.shared.wake.push(self.shared.id);
    }

    /// Whether [`evict`](Self::evict) was called (for a stack whose handler holds the
    /// kernel socket itself, which must then reset both ends of its own accord).
    pub fn evicted(&self) -> bool {
        self.shared.state().evicted
    }
}

/// How many client bytes a [`FlowPort`] has delivered to the handler's ring. Lets a
/// layer in front of a stack without receive back-pressure (ipstack) cap what the stack
/// holds unread.
#[derive(Debug, Clone)]
pub struct FlowProgress(Arc<Shared>);

impl FlowProgress {
    pub fn delivered(&self) -> u64 {
        self.0.delivered.load(Ordering::Relaxed)
    }

    /// The client's FIN, seen in front of a stack that must not have it yet, after every
    /// byte before it was delivered: the handler's reads end once it has read them all.
    pub fn client_finished(&self) {
        let mut st = self.0.state();
        if !st.rx_eof {
            st.rx_eof = true;
            if let Some(w) = st.reader.take() {
                w.wake();
            }
        }
    }

    /// The client reset the connection: the port's reads and writes fail from now on, so
    /// its bridge ends (for stacks that do not wake their streams on RST themselves).
    pub fn client_reset(&self) {
        let mut st = self.0.state();
        st.client_reset = true;
        if let Some(w) = st.stack_waker.take() {
            w.wake();
        }
    }
}

/// The stack's side of an accepted flow as `AsyncRead + AsyncWrite`, for stacks that
/// deliver connections as streams (ipstack, netstack-smoltcp) rather than packets.
///
/// * Reading yields the handler's bytes for the client; `Ok(0)` once the handler shut
///   down its write side (send FIN); `ConnectionReset` when the handler aborted.
/// * Writing delivers the client's bytes to the handler, waiting while its ring is full
///   (back-pressure reaches the stack's window); `shutdown` is the client's FIN.
/// * [`finish`](Self::finish) reports how the connection ended; dropping the port without
///   it reports a reset.
#[derive(Debug)]
pub struct FlowPort {
    link: FlowLink,
}

fn port_reset(st: &State) -> Option<io::Error> {
    if st.abort_requested {
        return Some(io::Error::new(io::ErrorKind::ConnectionReset, "the handler reset the flow"));
    }
    if st.client_reset {
        return Some(io::Error::new(io::ErrorKind::ConnectionReset, "the client reset the flow"));
    }
    None
}

impl FlowPort {
    /// A handle that reports how many client bytes this port has delivered.
    pub fn progress(&self) -> FlowProgress {
        FlowProgress(self.link.shared.clone())
    }

    /// Gives the handler the kernel socket itself, if the flow was offered as one
    /// ([`FlowLink::offer_socket`]) and the handler still waits for it; otherwise returns
    /// both, for the caller to bridge.
    #[allow(clippy::result_large_err)]
    pub fn hand_over(self, stream: tokio::net::TcpStream) -> Result<(), (tokio::net::TcpStream, FlowPort)> {
        {
            let mut st = self.link.shared.state();
            if !st.wants_socket || st.closed {
                drop(st);
                return Err((stream, self));
            }
            st.socket = Some(stream);
            if let Some(w) = st.reader.take() {
                w.wake();
            }
        }
        self.link.set_closed(false);
        Ok(())
    }

    /// The handler asked for a reset (the client must get RST).
    pub fn handler_aborted(&self) -> bool {
        self.link.shared.state().abort_requested
    }

    /// Ends the flow for the handler: a clean close, or a reset.
    pub fn finish(self, reset: bool) {
        self.link.set_closed(reset);
    }
}

impl AsyncRead for FlowPort {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let shared = &self.link.shared;
        let mut st = shared.state();
        if let Some(e) = port_reset(&st) {
            return Poll::Ready(Err(e));
        }
        if st.tx.len() > 0 {
            let n = st.tx.pop(buf.initialize_unfilled());
            buf.advance(n);
            if let Some(w) = st.writer.take() {
                w.wake();
            }
            st.release_if_handler_gone();
            return Poll::Ready(Ok(()));
        }
        if st.tx_closed || st.closed {
            return Poll::Ready(Ok(()));
        }
        st.stack_waker = Some(cx.waker().clone());
        Poll::Pending
    }
}

impl AsyncWrite for FlowPort {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, data: &[u8]) -> Poll<io::Result<usize>> {
        let shared = &self.link.shared;
        let mut st = shared.state();
        if let Some(e) = port_reset(&st) {
            return Poll::Ready(Err(e));
        }
        let mut io = FlowIo { st: &mut st, got: 0, gave: 0 };
        let n = io.deliver(data);
        if n == 0 && !data.is_empty() {
            st.stack_waker = Some(cx.waker().clone());
            return Poll::Pending;
        }
        shared.delivered.fetch_add(n as u64, Ordering::Relaxed);
        if let Some(w) = st.reader.take() {
            w.wake();
        }
        Poll::Ready(Ok(n))
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.link.set_rx_eof();
        Poll::Ready(Ok(()))
    }
}
