//! The client's side of an accepted TCP connection, as the handler sees it.

use std::fmt;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use socket2::SockRef;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

use super::state::{Decision, Shared, State, reset_error};
use crate::relay::{self, RelayStats};

/// An accepted TCP connection with the client, the same type on every backend.
///
/// * `AsyncRead` yields the client's bytes, then 0 once the client sent FIN; a reset by
///   the client is `ConnectionReset`.
/// * `AsyncWrite` sends to the client; `shutdown` half-closes (FIN after what was
///   written) and reading goes on.
/// * [`peek`](Self::peek) looks at the client's first bytes without consuming them.
/// * [`abort`](Self::abort) resets the connection (RST to the client).
/// * [`relay`](Self::relay) carries the connection to an upstream socket by the fastest
///   path the backend allows.
///
/// Dropping it closes gracefully, or resets if client bytes were left unread (as a
/// kernel socket does: RFC 9293 §3.6, data would otherwise be lost silently).
pub struct TcpConn {
    src: SocketAddr,
    dst: SocketAddr,
    io: Io,
}

/// How the bytes reach the client: through the rings a user-space stack drains, or a
/// kernel socket the system stack terminated the connection in.
enum Io {
    Ring(RingConn),
    Socket(TcpStream),
}

impl fmt::Debug for TcpConn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let kind = match self.io {
            Io::Ring(_) => "ring",
            Io::Socket(_) => "socket",
        };
        f.debug_struct("TcpConn").field("src", &self.src).field("dst", &self.dst).field("io", &kind).finish()
    }
}

impl TcpConn {
    /// Records the decision and waits for the stack's socket where it hands one over.
    pub(crate) async fn accept(src: SocketAddr, dst: SocketAddr, shared: Arc<Shared>) -> TcpConn {
        let socket_capable = {
            let mut st = shared.state();
            st.wants_socket = st.socket_capable;
            st.decision = Decision::Accepted;
            shared.wake_stack(&mut st);
            st.socket_capable
        };
        if !socket_capable {
            return TcpConn { src, dst, io: Io::Ring(RingConn { shared }) };
        }
        // If this future is dropped while waiting (a cancelled accept or peek), nobody
        // takes the connection: it is reset. A socket already handed over is closed with
        // RST; one not yet handed over is bridged to the ring, whose reads then fail, so the
        // bridge ends at once rather than at the idle timeout.
        struct Waiting<'a>(&'a Shared, bool);
        impl Drop for Waiting<'_> {
            fn drop(&mut self) {
                if !self.1 {
                    let mut st = self.0.state();
                    st.wants_socket = false;
                    st.handler_gone = true;
                    st.tx_closed = true;
                    st.abort_requested = true;
                    if let Some(stream) = st.socket.take() {
                        let _ = SockRef::from(&stream).set_linger(Some(Duration::ZERO));
                    }
                    self.0.wake_stack(&mut st);
                }
            }
        }
        let mut waiting = Waiting(&shared, false);
        let stream = std::future::poll_fn(|cx| {
            let mut st = waiting.0.state();
            if let Some(stream) = st.socket.take() {
                return Poll::Ready(Some(stream));
            }
            if !st.wants_socket || st.closed {
                return Poll::Ready(None);
            }
            st.reader = Some(cx.waker().clone());
            Poll::Pending
        })
        .await;
        waiting.1 = true;
        drop(waiting);
        let io = match stream {
            Some(stream) => Io::Socket(stream),
            None => Io::Ring(RingConn { shared }),
        };
        TcpConn { src, dst, io }
    }

    /// The client's real source address.
    pub fn src(&self) -> SocketAddr {
        self.src
    }

    /// The original destination the client connected to.
    pub fn dst(&self) -> SocketAddr {
        self.dst
    }

    /// Waits until `buf` is full, the client sent FIN, or `wait` passed, then copies the
    /// client's first bytes into `buf` and returns how many, consuming nothing: later
    /// reads (and [`relay`](Self::relay)) still see every byte.
    pub async fn peek(&mut self, buf: &mut [u8], wait: Duration) -> io::Result<usize> {
        let min = buf.len();
        self.peek_at_least(buf, min, wait).await
    }

    /// Like [`peek`](Self::peek), but done as soon as `min` bytes are there: copies
    /// everything the client sent so far (up to `buf.len()`). A parser that learns how
    /// much it needs as it goes (a TLS record's length) asks for exactly that, and one
    /// that cannot tell (an HTTP head) asks for one byte more than it has.
    pub async fn peek_at_least(&mut self, buf: &mut [u8], min: usize, wait: Duration) -> io::Result<usize> {
        let min = min.min(buf.len());
        match &self.io {
            Io::Ring(ring) => {
                match tokio::time::timeout(wait, std::future::poll_fn(|cx| ring.poll_peek(cx, buf, min))).await {
                    Ok(r) => r,
                    Err(_) => std::future::poll_fn(|cx| ring.poll_peek(cx, buf, 0)).await,
                }
            }
            Io::Socket(stream) => match tokio::time::timeout(wait, peek_socket(stream, buf, min)).await {
                Ok(r) => r,
                Err(_) => peek_socket(stream, buf, 0).await,
            },
        }
    }

    /// Resets the connection: the client gets RST, pending bytes are discarded.
    pub fn abort(self) {
        match &self.io {
            Io::Ring(ring) => ring.abort(),
            Io::Socket(stream) => {
                let _ = SockRef::from(stream).set_linger(Some(Duration::ZERO));
            }
        }
    }

    /// Carries the connection to `upstream` both ways, with half-close, until both sides
    /// finished or nothing moved for the idle timeout (the half-close timeout once one
    /// side finished; a [`Duration`] is the idle timeout for both); picks the fastest copy the backend allows
    /// (ring ⇄ socket with no bounce buffer, or `splice(2)` between two kernel sockets).
    ///
    /// A reset or timeout on either side resets both, rather than ending with a FIN that
    /// would pass for a complete response.
    pub async fn relay(self, upstream: TcpStream, timeouts: impl Into<relay::Timeouts>) -> io::Result<RelayStats> {
        let timeouts = timeouts.into();
        let result = match &self.io {
            Io::Ring(ring) => relay::ring_to_socket(ring, &upstream, timeouts).await,
            Io::Socket(client) => relay::splice_sockets(client, &upstream, timeouts).await,
        };
        if result.is_err() {
            // Linger 0: dropping the socket sends RST, so the destination does not take a
            // truncated stream for a complete one either.
            let _ = SockRef::from(&upstream).set_linger(Some(Duration::ZERO));
            self.abort();
        }
        result
    }
}

impl AsyncRead for TcpConn {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        match &mut self.get_mut().io {
            Io::Ring(ring) => ring.poll_read(cx, buf),
            Io::Socket(s) => Pin::new(s).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for TcpConn {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, data: &[u8]) -> Poll<io::Result<usize>> {
        match &mut self.get_mut().io {
            Io::Ring(ring) => ring.poll_write(cx, data),
            Io::Socket(s) => Pin::new(s).poll_write(cx, data),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match &mut self.get_mut().io {
            Io::Ring(_) => Poll::Ready(Ok(())),
            Io::Socket(s) => Pin::new(s).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match &mut self.get_mut().io {
            Io::Ring(ring) => {
                ring.close_write();
                Poll::Ready(Ok(()))
            }
            Io::Socket(s) => Pin::new(s).poll_shutdown(cx),
        }
    }
}

/// Peeks a kernel socket: with `wait`, until `buf` is full or the client sent FIN.
/// Peeks once `min` bytes are there (or at EOF); `min == 0` peeks what is there now.
async fn peek_socket(stream: &TcpStream, buf: &mut [u8], min: usize) -> io::Result<usize> {
    use std::os::fd::AsFd;
    use tokio::io::Interest;
    if min == 0 {
        return crate::os::peek(stream.as_fd(), buf).or_else(would_block_is_zero);
    }
    loop {
        stream.readable().await?;
        // Peeked inside `try_io`: it clears the readiness only on EAGAIN, and only as it
        // stood before the call, so bytes that arrive meanwhile still wake this loop and
        // the reads that follow (clearing it after a separate peek could swallow their
        // edge, and a relay would then wait for bytes already there).
        match stream.try_io(Interest::READABLE, || crate::os::peek(stream.as_fd(), buf)) {
            Ok(n) if n == 0 || n >= min => return Ok(n),
            // Some bytes, not enough. The socket stays readable while they wait (no new
            // edge comes for bytes already there), so look again shortly; the caller's
            // wait bounds this.
            Ok(_) => tokio::time::sleep(std::time::Duration::from_millis(2)).await,
            // Nothing yet: the readiness was stale and is now cleared.
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(e),
        }
    }
}

fn would_block_is_zero(e: io::Error) -> io::Result<usize> {
    if e.kind() == io::ErrorKind::WouldBlock { Ok(0) } else { Err(e) }
}

/// Why nothing more may be written to the client, if so.
fn write_error(st: &State) -> Option<io::Error> {
    if st.reset {
        Some(reset_error())
    } else if st.tx_closed || st.closed {
        Some(io::Error::new(io::ErrorKind::BrokenPipe, "TCP flow closed for writing"))
    } else {
        None
    }
}

/// The handler's side of a flow whose bytes cross two rings shared with the stack.
pub(crate) struct RingConn {
    shared: Arc<Shared>,
}

impl RingConn {
    fn abort(&self) {
        let mut st = self.shared.state();
        st.abort_requested = true;
        self.shared.wake_stack(&mut st);
    }

    /// Ready once `buf` can be filled, the client sent FIN, or the flow ended (with
    /// `wait == false`: at once); copies the buffered bytes without consuming them.
    /// Ready once `min` bytes are buffered (or at EOF); `min == 0` is ready at once.
    fn poll_peek(&self, cx: &mut Context<'_>, buf: &mut [u8], min: usize) -> Poll<io::Result<usize>> {
        let mut st = self.shared.state();
        let want = min.min(st.rx.capacity());
        if st.rx.len() >= want || st.rx_eof || st.closed {
            if st.rx.len() == 0 && st.reset {
                return Poll::Ready(Err(reset_error()));
            }
            return Poll::Ready(Ok(st.rx.peek(buf)));
        }
        st.reader = Some(cx.waker().clone());
        Poll::Pending
    }

    /// Zero-copy read: when client bytes are buffered, lends the oldest contiguous run to
    /// `f` (typically a non-blocking `write(2)` to the upstream socket) and consumes what
    /// `f` reports written. `Ok(0)` means the client sent FIN and everything was taken.
    /// An error from `f` (including `WouldBlock`) is returned as is, nothing consumed.
    ///
    /// `f` runs under the flow's lock; keep it to one non-blocking system call.
    pub(crate) fn poll_read_with(
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
    pub(crate) fn poll_write_with(
        &self,
        cx: &mut Context<'_>,
        f: impl FnOnce(&mut [u8]) -> io::Result<usize>,
    ) -> Poll<io::Result<usize>> {
        let shared = &self.shared;
        let mut st = shared.state();
        if let Some(e) = write_error(&st) {
            return Poll::Ready(Err(e));
        }
        let spare = st.tx.spare();
        if spare.is_empty() {
            st.writer = Some(cx.waker().clone());
            return Poll::Pending;
        }
        let result = f(spare);
        st.tx.commit(*result.as_ref().unwrap_or(&0));
        let n = result?;
        if n > 0 {
            shared.wake_stack(&mut st);
        }
        Poll::Ready(Ok(n))
    }

    /// Frees both rings' storage where nothing is buffered (the relay calls this once a
    /// flow has been quiet for a while; the rings allocate again on the next byte).
    pub(crate) fn release_idle_buffers(&self) {
        let mut st = self.shared.state();
        st.rx.release_if_empty();
        st.tx.release_if_empty();
    }

    /// Half-closes towards the client: FIN follows the bytes already written.
    pub(crate) fn close_write(&self) {
        let shared = &self.shared;
        let mut st = shared.state();
        if !st.tx_closed {
            st.tx_closed = true;
            shared.wake_stack(&mut st);
        }
    }

    fn poll_read(&self, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        self.poll_read_with(cx, |data| {
            let n = data.len().min(buf.remaining());
            buf.put_slice(&data[..n]);
            Ok(n)
        })
        .map_ok(|_| ())
    }

    fn poll_write(&self, cx: &mut Context<'_>, data: &[u8]) -> Poll<io::Result<usize>> {
        if data.is_empty() {
            return Poll::Ready(Ok(0));
        }
        // Not through `poll_write_with`: that lends one contiguous region, while a copy
        // can take all that fits at once (the ring grows to what the writer has).
        let shared = &self.shared;
        let mut st = shared.state();
        if let Some(e) = write_error(&st) {
            return Poll::Ready(Err(e));
        }
        let n = st.tx.push(data);
        if n == 0 {
            st.writer = Some(cx.waker().clone());
            return Poll::Pending;
        }
        shared.wake_stack(&mut st);
        Poll::Ready(Ok(n))
    }
}

impl Drop for RingConn {
    fn drop(&mut self) {
        let shared = &self.shared;
        let mut st = shared.state();
        // Closing with unread client bytes resets, as a kernel socket does; else FIN
        // after what was written.
        if st.rx.len() > 0 {
            st.abort_requested = true;
        }
        st.handler_gone = true;
        st.tx_closed = true;
        st.reader = None;
        st.writer = None;
        st.release_if_handler_gone();
        shared.wake_stack(&mut st);
    }
}
