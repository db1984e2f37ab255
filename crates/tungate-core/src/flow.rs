//! TCP flows between a stack and a handler.
//!
//! A stack that sees a new SYN creates a [`TcpRequest`] and gives it to the
//! [`TcpHandler`](crate::TcpHandler). The handler decides: [`TcpRequest::accept`] (the
//! stack then completes the handshake) or [`TcpRequest::reject`] / drop (the stack answers
//! the SYN with RST). A direct upstream dials first and accepts only once the dial
//! succeeded, so a refused destination is a refused connection for the client too.
//!
//! An accepted flow is a [`TcpFlow`]: `AsyncRead + AsyncWrite` with half-close both ways
//! (`shutdown` sends FIN; a read of 0 means the client sent FIN). Bytes cross between the
//! stack and the handler through two bounded rings behind one mutex, shared with the
//! stack's [`FlowLink`]. Whenever the handler side changes something the stack must act on
//! (data written, space freed in a full ring, shutdown, reset, decision), the flow's
//! [`FlowId`] is queued on the stack's [`WakeQueue`], so the stack services exactly the
//! flows that have work and never scans them all.

use std::fmt;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::Notify;

/// A stack's handle for one flow: an index into its flow table, never a reference.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct FlowId(pub usize);

/// Flows (and other sources of work) that need the stack's attention, plus the notifier
/// the stack's driver sleeps on.
#[derive(Debug, Default)]
pub struct WakeQueue {
    queue: Mutex<Vec<FlowId>>,
    notify: Notify,
}

impl WakeQueue {
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    /// Queues `id` and wakes the driver.
    pub fn push(&self, id: FlowId) {
        lock(&self.queue).push(id);
        self.notify.notify_one();
    }

    /// Wakes the driver without a flow (e.g. a UDP reply was queued).
    pub fn wake(&self) {
        self.notify.notify_one();
    }

    /// Moves every queued id into `out` (which the caller reuses, so no allocation).
    pub fn drain_into(&self, out: &mut Vec<FlowId>) {
        out.append(&mut lock(&self.queue));
    }

    /// Waits for a `push` or `wake`; a wake that came before this call is not lost.
    pub async fn notified(&self) {
        self.notify.notified().await
    }
}

/// Locks a mutex, recovering the data if a panicking thread poisoned it: every critical
/// section here leaves the state consistent between statements.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// The default capacity of each direction's ring between stack and handler.
pub const DEFAULT_RING_CAPACITY: usize = 256 * 1024;

/// What the handler decided about a new flow.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    Pending,
    Accepted,
    Rejected,
}

/// A bounded byte FIFO that lends its contiguous filled and free regions, so a relay
/// can `write(2)` straight from it and `read(2)` straight into it (no bounce buffer).
/// `VecDeque<u8>` has no safe way to expose its spare capacity, hence this small ring.
/// The storage is allocated on first use: idle directions cost nothing.
#[derive(Debug)]
struct Ring {
    buf: Vec<u8>,
    cap: usize,
    head: usize,
    len: usize,
}

impl Ring {
    fn new(cap: usize) -> Self {
        Ring { buf: Vec::new(), cap: cap.max(1), head: 0, len: 0 }
    }

    fn len(&self) -> usize {
        self.len
    }

    /// The oldest contiguous run of bytes.
    fn filled(&self) -> &[u8] {
        let end = (self.head + self.len).min(self.buf.len());
        &self.buf[self.head.min(end)..end]
    }

    fn consume(&mut self, n: usize) {
        debug_assert!(n <= self.len);
        self.len -= n;
        self.head = if self.len == 0 { 0 } else { (self.head + n) % self.cap };
    }

    /// The first contiguous free region (empty when full).
    fn spare(&mut self) -> &mut [u8] {
        if self.buf.is_empty() {
            self.buf = vec![0; self.cap];
        }
        let tail = (self.head + self.len) % self.cap;
        let end = if tail >= self.head && self.len < self.cap { self.cap } else { self.head };
        if self.len == self.cap {
            return &mut [];
        }
        &mut self.buf[tail..end]
    }

    fn commit(&mut self, n: usize) {
        debug_assert!(self.len + n <= self.cap);
        self.len += n;
    }

    fn push(&mut self, mut data: &[u8]) -> usize {
        let mut total = 0;
        while !data.is_empty() {
            let spare = self.spare();
            let n = spare.len().min(data.len());
            if n == 0 {
                break;
            }
            spare[..n].copy_from_slice(&data[..n]);
            self.commit(n);
            data = &data[n..];
            total += n;
        }
        total
    }

    fn pop(&mut self, out: &mut [u8]) -> usize {
        let mut total = 0;
        while total < out.len() {
            let filled = self.filled();
            let n = filled.len().min(out.len() - total);
            if n == 0 {
                break;
            }
            out[total..total + n].copy_from_slice(&filled[..n]);
            self.consume(n);
            total += n;
        }
        total
    }
}

#[derive(Debug)]
struct State {
    decision: Decision,
    /// Client → handler bytes.
    rx: Ring,
    /// The client sent FIN and every byte before it is in `rx`.
    rx_eof: bool,
    /// The stack could not move everything into `rx`; wake it when the handler reads.
    rx_blocked: bool,
    /// Handler → client bytes.
    tx: Ring,
    /// The handler shut down its write side (FIN after `tx` drains).
    tx_closed: bool,
    /// The connection was reset (by the client, the handler or the stack).
    reset: bool,
    /// The handler asked for a reset.
    abort_requested: bool,
    /// The stack is done with the flow; no more bytes move.
    closed: bool,
    /// The handler dropped its `TcpFlow`.
    handler_gone: bool,
    /// `id` is already in the wake queue (always true for a [`FlowPort`], which is woken
    /// through `stack_waker` instead).
    queued: bool,
    reader: Option<Waker>,
    writer: Option<Waker>,
    /// The task driving a [`FlowPort`], when it waits for the handler.
    stack_waker: Option<Waker>,
    /// The stack terminates this flow in a kernel socket it can hand over whole
    /// ([`FlowLink::offer_streams`]).
    stream_capable: bool,
    /// The handler asked for that socket ([`TcpRequest::accept_stream`]).
    wants_stream: bool,
    /// The socket, handed over and not yet taken.
    stream: Option<tokio::net::TcpStream>,
}

#[derive(Debug)]
struct Shared {
    id: FlowId,
    wake: Arc<WakeQueue>,
    state: Mutex<State>,
    /// Client bytes delivered to the handler's ring so far (see [`FlowLink::progress`]).
    delivered: std::sync::atomic::AtomicU64,
}

impl Shared {
    fn state(&self) -> MutexGuard<'_, State> {
        lock(&self.state)
    }

    /// Queues the flow for the stack unless it already is. Called with the lock held.
    fn wake_stack(&self, st: &mut State) {
        if let Some(w) = st.stack_waker.take() {
            w.wake();
        }
        if !st.queued {
            st.queued = true;
            self.wake.push(self.id);
        }
    }
}

/// Creates the linked pair for a new flow: the stack keeps the [`FlowLink`], the handler
/// gets the [`TcpRequest`].
pub fn new_flow(
    id: FlowId,
    src: SocketAddr,
    dst: SocketAddr,
    ring_capacity: usize,
    wake: Arc<WakeQueue>,
) -> (FlowLink, TcpRequest) {
    let shared = Arc::new(Shared {
        id,
        wake,
        state: Mutex::new(State {
            decision: Decision::Pending,
            rx: Ring::new(ring_capacity),
            rx_eof: false,
            rx_blocked: false,
            tx: Ring::new(ring_capacity),
            tx_closed: false,
            reset: false,
            abort_requested: false,
            closed: false,
            handler_gone: false,
            queued: false,
            reader: None,
            writer: None,
            stack_waker: None,
            stream_capable: false,
            wants_stream: false,
            stream: None,
        }),
        delivered: std::sync::atomic::AtomicU64::new(0),
    });
    (FlowLink { shared: shared.clone() }, TcpRequest { src, dst, shared: Some(shared) })
}

/// A new TCP connection offered to a handler: the client's address and the destination
/// it asked for. Dropping it without a decision rejects it.
pub struct TcpRequest {
    src: SocketAddr,
    dst: SocketAddr,
    shared: Option<Arc<Shared>>,
}

impl fmt::Debug for TcpRequest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TcpRequest").field("src", &self.src).field("dst", &self.dst).finish()
    }
}

impl TcpRequest {
    /// The client's real source address.
    pub fn src(&self) -> SocketAddr {
        self.src
    }

    /// The original destination the client connected to.
    pub fn dst(&self) -> SocketAddr {
        self.dst
    }

    /// Accepts: the stack completes the handshake and bytes flow through the returned
    /// [`TcpFlow`].
    pub fn accept(mut self) -> TcpFlow {
        let shared = self.decide(Decision::Accepted);
        TcpFlow { src: self.src, dst: self.dst, shared }
    }

    /// Accepts, and takes the connection as the kernel socket that terminates it when the
    /// stack has one (the system stack): the handler then moves bytes between two kernel
    /// sockets with no ring in between. Other stacks give a [`TcpFlow`] as
    /// [`accept`](Self::accept) does. Resolves once the stack has the connection (or
    /// failed to get it: the flow then reads as reset).
    pub async fn accept_stream(mut self) -> Accepted {
        let (src, dst) = (self.src, self.dst);
        let shared = self.shared.take().expect("a request is decided once");
        {
            let mut st = shared.state();
            st.wants_stream = st.stream_capable;
            st.decision = Decision::Accepted;
            shared.wake_stack(&mut st);
        }
        // If this future is dropped while waiting, the stack must not hand the socket to
        // nobody: it then bridges it to the flow, whose handler is gone (reset).
        struct Waiting<'a>(&'a Shared, bool);
        impl Drop for Waiting<'_> {
            fn drop(&mut self) {
                if !self.1 {
                    let mut st = self.0.state();
                    st.wants_stream = false;
                    st.handler_gone = true;
                    if let Some(stream) = st.stream.take() {
                        let _ = socket2::SockRef::from(&stream).set_linger(Some(std::time::Duration::ZERO));
                    }
                }
            }
        }
        let mut waiting = Waiting(&shared, false);
        let stream = std::future::poll_fn(|cx| {
            let mut st = waiting.0.state();
            if let Some(stream) = st.stream.take() {
                return Poll::Ready(Some(stream));
            }
            if !st.wants_stream || st.closed {
                return Poll::Ready(None);
            }
            st.reader = Some(cx.waker().clone());
            Poll::Pending
        })
        .await;
        waiting.1 = true;
        drop(waiting);
        stream.map_or_else(|| Accepted::Flow(TcpFlow { src, dst, shared }), Accepted::Stream)
    }

    /// Refuses: the client's SYN is answered with RST.
    pub fn reject(mut self) {
        self.decide(Decision::Rejected);
    }

    fn decide(&mut self, decision: Decision) -> Arc<Shared> {
        let shared = self.shared.take().expect("a request is decided once: accept/reject take self");
        {
            let mut st = shared.state();
            st.decision = decision;
            shared.wake_stack(&mut st);
        }
        shared
    }
}

impl Drop for TcpRequest {
    fn drop(&mut self) {
        if self.shared.is_some() {
            self.decide(Decision::Rejected);
        }
    }
}

/// What [`TcpRequest::accept_stream`] gives the handler.
#[derive(Debug)]
pub enum Accepted {
    /// The kernel socket facing the client (its peer address is the stack's, not the
    /// client's: use the request's `src`/`dst`).
    Stream(tokio::net::TcpStream),
    Flow(TcpFlow),
}

/// An accepted TCP connection, seen from the handler.
///
/// Reads return the client's bytes and then 0 once the client sent FIN; `shutdown` sends
/// FIN to the client after the written bytes. A reset by the client surfaces as
/// `ConnectionReset`. Dropping the flow closes it gracefully (with RST instead if client
/// bytes are left unread, or arrive later); [`TcpFlow::abort`] resets it.
pub struct TcpFlow {
    src: SocketAddr,
    dst: SocketAddr,
    shared: Arc<Shared>,
}

impl fmt::Debug for TcpFlow {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TcpFlow").field("src", &self.src).field("dst", &self.dst).finish()
    }
}

impl TcpFlow {
    pub fn src(&self) -> SocketAddr {
        self.src
    }

    pub fn dst(&self) -> SocketAddr {
        self.dst
    }

    /// Resets the connection: the client gets RST, pending bytes are discarded.
    pub fn abort(&self) {
        let mut st = self.shared.state();
        st.abort_requested = true;
        self.shared.wake_stack(&mut st);
    }

    /// Zero-copy read: when client bytes are buffered, lends the oldest contiguous run to
    /// `f` (typically a non-blocking `write(2)` to the upstream socket) and consumes what
    /// `f` reports written. `Ok(0)` means the client sent FIN and everything was taken.
    /// An error from `f` (including `WouldBlock`) is returned as is, nothing consumed.
    ///
    /// `f` runs under the flow's lock; keep it to one non-blocking system call.
    pub fn poll_read_with(
        &self,
        cx: &mut Context<'_>,
        f: impl FnOnce(&[u8]) -> io::Result<usize>,
    ) -> Poll<io::Result<usize>> {
        let shared = &self.shared;
        let mut st = shared.state();
        if st.rx.len() > 0 {
            let n = f(st.rx.filled())?;
            st.rx.consume(n);
            if n > 0 && st.rx_blocked {
                st.rx_blocked = false;
                shared.wake_stack(&mut st);
            }
            return Poll::Ready(Ok(n));
        }
        if st.reset {
            return Poll::Ready(Err(reset_error()));
        }
        if st.rx_eof || st.closed {
            return Poll::Ready(Ok(0));
        }
        st.reader = Some(cx.waker().clone());
        Poll::Pending
    }

    /// Zero-copy write: when there is room for bytes to the client, lends the first
    /// contiguous free region to `f` (typically a non-blocking `read(2)` from the upstream
    /// socket) and queues what `f` reports read. `f` returning `Ok(0)` (upstream EOF) is
    /// passed through; so are its errors (including `WouldBlock`).
    ///
    /// `f` runs under the flow's lock; keep it to one non-blocking system call.
    pub fn poll_write_with(
        &self,
        cx: &mut Context<'_>,
        f: impl FnOnce(&mut [u8]) -> io::Result<usize>,
    ) -> Poll<io::Result<usize>> {
        let shared = &self.shared;
        let mut st = shared.state();
        if st.reset {
            return Poll::Ready(Err(reset_error()));
        }
        if st.tx_closed || st.closed {
            return Poll::Ready(Err(io::Error::new(io::ErrorKind::BrokenPipe, "TCP flow closed for writing")));
        }
        let spare = st.tx.spare();
        if spare.is_empty() {
            st.writer = Some(cx.waker().clone());
            return Poll::Pending;
        }
        let n = f(spare)?;
        st.tx.commit(n);
        if n > 0 {
            shared.wake_stack(&mut st);
        }
        Poll::Ready(Ok(n))
    }

    /// Half-closes towards the client: FIN follows the bytes already written. The same
    /// as `AsyncWriteExt::shutdown`, without needing `&mut`.
    pub fn close_write(&self) {
        let shared = &self.shared;
        let mut st = shared.state();
        if !st.tx_closed {
            st.tx_closed = true;
            shared.wake_stack(&mut st);
        }
    }
}

fn reset_error() -> io::Error {
    io::Error::new(io::ErrorKind::ConnectionReset, "TCP flow reset")
}

impl AsyncRead for TcpFlow {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        self.poll_read_with(cx, |data| {
            let n = data.len().min(buf.remaining());
            buf.put_slice(&data[..n]);
            Ok(n)
        })
        .map_ok(|_| ())
    }
}

impl AsyncWrite for TcpFlow {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, data: &[u8]) -> Poll<io::Result<usize>> {
        if data.is_empty() {
            return Poll::Ready(Ok(0));
        }
        self.poll_write_with(cx, |spare| {
            let n = spare.len().min(data.len());
            spare[..n].copy_from_slice(&data[..n]);
            Ok(n)
        })
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.close_write();
        Poll::Ready(Ok(()))
    }
}

impl Drop for TcpFlow {
    fn drop(&mut self) {
        let shared = &self.shared;
        let mut st = shared.state();
        // Closing with unread client bytes resets, as a kernel socket does (RFC 9293
        // §3.6: data would be lost silently otherwise); else FIN after what was written.
        if st.rx.len() > 0 {
            st.abort_requested = true;
        }
        st.handler_gone = true;
        st.tx_closed = true;
        st.reader = None;
        st.writer = None;
        shared.wake_stack(&mut st);
    }
}

/// The stack's side of a flow. All methods are cheap and never block on the handler.
/// Dropping it without [`set_closed`](FlowLink::set_closed) (the stack stopped) resets
/// the flow, so no handler waits forever.
#[derive(Debug)]
pub struct FlowLink {
    shared: Arc<Shared>,
}

impl Drop for FlowLink {
    fn drop(&mut self) {
        let closed = self.shared.state().closed;
        if !closed {
            self.set_closed(true);
        }
    }
}

/// What a stack must do for a flow, read (and cleared where noted) under one lock.
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
        if n < data.len() {
            self.st.rx_blocked = true;
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

    /// Marks the flow as one whose connection the stack can hand over as a kernel socket
    /// ([`FlowPort::hand_over`]). Call before the request reaches the handler.
    pub fn offer_streams(&self) {
        self.shared.state().stream_capable = true;
    }

    /// Turns this link into an async [`FlowPort`], for stacks that hand out connections
    /// as byte streams. From then on the flow wakes the port's task, not the wake queue.
    pub fn into_port(self) -> FlowPort {
        self.shared.state().queued = true;
        FlowPort { link: self }
    }
}

/// How many client bytes a [`FlowPort`] has delivered to the handler's ring. Lets a
/// layer in front of a stack without receive back-pressure (ipstack) cap what the stack
/// holds unread.
#[derive(Debug, Clone)]
pub struct FlowProgress(Arc<Shared>);

impl FlowProgress {
    pub fn delivered(&self) -> u64 {
        self.0.delivered.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// The client reset the connection: the port's reads and writes fail from now on, so
    /// its bridge ends (for stacks that do not wake their streams on RST themselves).
    pub fn client_reset(&self) {
        let mut st = self.0.state();
        st.abort_requested = true;
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

impl FlowPort {
    /// A handle that reports how many client bytes this port has delivered.
    pub fn progress(&self) -> FlowProgress {
        FlowProgress(self.link.shared.clone())
    }

    /// Gives the handler the kernel socket itself, if it asked for it
    /// ([`TcpRequest::accept_stream`]); otherwise returns both for a [`bridge`].
    ///
    /// [`bridge`]: crate::admission::bridge
    #[allow(clippy::result_large_err)]
    pub fn hand_over(self, stream: tokio::net::TcpStream) -> Result<(), (tokio::net::TcpStream, FlowPort)> {
        {
            let mut st = self.link.shared.state();
            if !st.wants_stream || st.closed {
                drop(st);
                return Err((stream, self));
            }
            st.stream = Some(stream);
            if let Some(w) = st.reader.take() {
                w.wake();
            }
        }
        self.link.set_closed(false);
        Ok(())
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
        if st.abort_requested {
            return Poll::Ready(Err(io::Error::new(io::ErrorKind::ConnectionReset, "the handler reset the flow")));
        }
        if st.tx.len() > 0 {
            let n = st.tx.pop(buf.initialize_unfilled());
            buf.advance(n);
            if let Some(w) = st.writer.take() {
                w.wake();
            }
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
        if st.abort_requested {
            return Poll::Ready(Err(io::Error::new(io::ErrorKind::ConnectionReset, "the handler reset the flow")));
        }
        let mut io = FlowIo { st: &mut st, got: 0, gave: 0 };
        let n = io.deliver(data);
        if n == 0 && !data.is_empty() {
            st.stack_waker = Some(cx.waker().clone());
            return Poll::Pending;
        }
        shared.delivered.fetch_add(n as u64, std::sync::atomic::Ordering::Relaxed);
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

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    fn addr(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn ring_wraps_and_bounds() {
        let mut r = Ring::new(8);
        assert_eq!(r.push(b"abcdef"), 6);
        let mut out = [0u8; 4];
        assert_eq!(r.pop(&mut out), 4);
        assert_eq!(&out, b"abcd");
        assert_eq!(r.push(b"ghijklmn"), 6);
        let mut out = [0u8; 16];
        assert_eq!(r.pop(&mut out), 8);
        assert_eq!(&out[..8], b"efghijkl");
    }

    #[test]
    fn ring_matches_a_model_under_random_operations() {
        let mut ring = Ring::new(97);
        let mut model = std::collections::VecDeque::new();
        let mut x = 0x2545_F491_4F6C_DD1Du64;
        let mut next = move || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        let mut counter = 0u8;
        for _ in 0..20_000 {
            if next() % 2 == 0 {
                let data: Vec<u8> = (0..next() % 60)
                    .map(|_| {
                        counter = counter.wrapping_add(1);
                        counter
                    })
                    .collect();
                let n = ring.push(&data);
                assert_eq!(n, data.len().min(97 - model.len()));
                model.extend(&data[..n]);
            } else {
                let mut out = vec![0u8; (next() % 60) as usize];
                let n = ring.pop(&mut out);
                let want: Vec<u8> = model.drain(..n.min(model.len())).collect();
                assert_eq!(&out[..n], &want[..]);
                assert_eq!(n, out.len().min(want.len() + model.len()));
            }
            assert_eq!(ring.len(), model.len());
        }
    }

    #[tokio::test]
    async fn bytes_cross_both_ways_with_half_close() {
        let wake = WakeQueue::new();
        let (link, req) = new_flow(FlowId(7), addr("10.0.0.1:1000"), addr("10.0.0.2:80"), 16, wake.clone());
        let mut q = Vec::new();
        assert_eq!(link.decision(), Decision::Pending);
        let mut flow = req.accept();
        wake.drain_into(&mut q);
        assert_eq!(q, vec![FlowId(7)]);

        // Stack → handler, more than the ring holds: the rest waits and the flow is blocked.
        let sig = link.pump(|io| assert_eq!(io.deliver(b"0123456789abcdefXYZ"), 16));
        assert_eq!(sig.decision, Decision::Accepted);
        let mut buf = [0u8; 32];
        let n = flow.read(&mut buf).await.unwrap();
        assert_eq!(&buf[..n], b"0123456789abcdef");
        // Reading from a blocked ring queues the flow again.
        q.clear();
        wake.drain_into(&mut q);
        assert_eq!(q, vec![FlowId(7)]);

        // Handler → stack, then shutdown: FIN only once the ring is empty.
        flow.write_all(b"reply").await.unwrap();
        flow.shutdown().await.unwrap();
        let mut out = [0u8; 3];
        let sig = link.pump(|io| assert_eq!(io.fill(&mut out), 3));
        assert!(!sig.tx_finished);
        let mut out = [0u8; 8];
        let sig = link.pump(|io| assert_eq!(io.fill(&mut out), 2));
        assert!(sig.tx_finished);

        link.set_rx_eof();
        assert_eq!(flow.read(&mut buf).await.unwrap(), 0);
    }

    #[test]
    fn dropping_a_flow_resets_only_if_client_bytes_are_lost() {
        let wake = WakeQueue::new();
        // Nothing unread: FIN; bytes arriving afterwards: RST.
        let (link, req) = new_flow(FlowId(1), addr("10.0.0.1:1"), addr("10.0.0.2:2"), 16, wake.clone());
        drop(req.accept());
        let sig = link.pump(|_| {});
        assert!(sig.tx_finished && sig.handler_gone && !sig.abort_requested);
        let sig = link.pump(|io| assert_eq!(io.deliver(b"late"), 4));
        assert!(sig.abort_requested, "data for a closed flow is answered with RST");

        // Unread bytes at drop: RST at once.
        let (link, req) = new_flow(FlowId(2), addr("10.0.0.1:1"), addr("10.0.0.2:2"), 16, wake);
        let flow = req.accept();
        link.pump(|io| assert_eq!(io.deliver(b"unread"), 6));
        drop(flow);
        assert!(link.pump(|_| {}).abort_requested);
    }

    #[tokio::test]
    async fn reset_surfaces_as_error_and_drop_rejects() {
        let wake = WakeQueue::new();
        let (link, req) = new_flow(FlowId(1), addr("[::1]:1"), addr("[::2]:2"), 16, wake.clone());
        drop(req);
        assert_eq!(link.decision(), Decision::Rejected);

        let (link, req) = new_flow(FlowId(2), addr("[::1]:1"), addr("[::2]:2"), 16, wake);
        let mut flow = req.accept();
        link.set_closed(true);
        let mut buf = [0u8; 4];
        assert_eq!(flow.read(&mut buf).await.unwrap_err().kind(), io::ErrorKind::ConnectionReset);
        assert_eq!(flow.write(b"x").await.unwrap_err().kind(), io::ErrorKind::ConnectionReset);
    }
}
