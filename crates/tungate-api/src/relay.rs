//! Copying bytes both ways with half-close and an idle timeout.
//!
//! Handlers normally call [`TcpConn::relay`](crate::TcpConn::relay), which picks one of the
//! two fast paths here: `ring_to_socket` between a flow's rings and a kernel `TcpStream`
//! (each direction is one non-blocking system call straight into or out of the ring, no
//! bounce buffer), or `splice_sockets` between two kernel sockets (`splice(2)`, no copy
//! through user memory). [`relay`] is the general form for any two streams (a TLS stream,
//! a proxy's framed stream).

use std::future::{Future, poll_fn};
use std::io;
use std::net::Shutdown;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use crate::tcp::RingConn;
use socket2::SockRef;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;

/// Buffer per direction for [`relay`]: large enough that one read drains a full ring or
/// socket buffer at MTU 9000 rates, small enough that 20 000 relays fit in memory.
const BUF: usize = 64 * 1024;

/// Bytes copied each way by a finished relay.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RelayStats {
    /// Bytes copied a → b and b → a.
    pub a_to_b: u64,
    pub b_to_a: u64,
}

/// When a relay gives up on a quiet connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timeouts {
    /// Nothing moved either way for this long.
    pub idle: Duration,
    /// One direction has ended (its FIN passed) and nothing moved for this long.
    pub half_close: Duration,
}

impl From<Duration> for Timeouts {
    /// `idle` for both: a half-closed connection gets as long as an open one.
    fn from(idle: Duration) -> Self {
        Timeouts { idle, half_close: idle }
    }
}

/// How long nothing must move before a relay gives its flow's idle buffers back.
pub(crate) const QUIET: Duration = Duration::from_secs(2);

/// When anything last moved, shared by both directions of one relay.
#[derive(Debug, Clone)]
struct Activity {
    start: Instant,
    last_us: Arc<AtomicU64>,
    /// A direction has ended.
    half_closed: Arc<AtomicBool>,
}

impl Activity {
    fn new() -> Self {
        Activity { start: Instant::now(), last_us: Arc::default(), half_closed: Arc::default() }
    }

    fn touch(&self) {
        self.last_us.store(self.start.elapsed().as_micros() as u64, Ordering::Relaxed);
    }

    /// A direction passed its EOF on: from now the half-close timeout applies (the FIN
    /// counts as activity, so the watch recomputes its deadline).
    fn one_way_done(&self) {
        self.half_closed.store(true, Ordering::Relaxed);
        self.touch();
    }

    fn limit(&self, timeouts: Timeouts) -> Duration {
        match self.half_closed.load(Ordering::Relaxed) {
            true => timeouts.idle.min(timeouts.half_close),
            false => timeouts.idle,
        }
    }

    fn idle_deadline(&self, idle: Duration) -> Instant {
        self.start + Duration::from_micros(self.last_us.load(Ordering::Relaxed)) + idle
    }

    fn last(&self) -> u64 {
        self.last_us.load(Ordering::Relaxed)
    }

    /// Runs both directions until they finish, or fails once nothing moved for the idle
    /// timeout (the half-close timeout once a direction ended). Each time nothing has
    /// moved for [`QUIET`], calls `quiet` once (to give buffers back).
    async fn watch(
        &self,
        both: impl Future<Output = io::Result<(u64, u64)>>,
        timeouts: Timeouts,
        mut quiet: impl FnMut(),
    ) -> io::Result<RelayStats> {
        tokio::pin!(both);
        // The activity mark `quiet` was last called for.
        let mut quieted = None;
        loop {
            let last = self.last();
            let idle_at = self.idle_deadline(self.limit(timeouts));
            let wake_at = if quieted == Some(last) {
                idle_at
            } else {
                idle_at.min(self.start + Duration::from_micros(last) + QUIET)
            };
            tokio::select! {
                r = &mut both => {
                    let (a_to_b, b_to_a) = r?;
                    return Ok(RelayStats { a_to_b, b_to_a });
                }
                () = tokio::time::sleep_until(wake_at) => {
                    let now = Instant::now();
                    if now >= self.idle_deadline(self.limit(timeouts)) {
                        let what = match self.half_closed.load(Ordering::Relaxed) {
                            true => "relay half-close timeout",
                            false => "relay idle timeout",
                        };
                        return Err(io::Error::new(io::ErrorKind::TimedOut, what));
                    }
                    let last = self.last();
                    if quieted != Some(last) && now >= self.start + Duration::from_micros(last) + QUIET {
                        quiet();
                        quieted = Some(last);
                    }
                }
            }
        }
    }
}

/// Copies `a → b` and `b → a` until both directions have seen EOF (each EOF is passed on
/// as a write shutdown, so half-closes cross intact), an error occurs, or nothing moved
/// for the idle timeout (the half-close timeout once one direction ended); a
/// [`Duration`] is the idle timeout for both.
pub async fn relay<A, B>(a: A, b: B, timeouts: impl Into<Timeouts>) -> io::Result<RelayStats>
where
    A: AsyncRead + AsyncWrite + Unpin,
    B: AsyncRead + AsyncWrite + Unpin,
{
    let activity = Activity::new();
    let (mut ar, mut aw) = tokio::io::split(a);
    let (mut br, mut bw) = tokio::io::split(b);
    let one = pump(&mut ar, &mut bw, &activity);
    let two = pump(&mut br, &mut aw, &activity);
    activity.watch(async { tokio::try_join!(one, two) }, timeouts.into(), || ()).await
}

async fn pump<R, W>(r: &mut R, w: &mut W, activity: &Activity) -> io::Result<u64>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut buf = vec![0u8; BUF];
    let mut total = 0u64;
    loop {
        let n = r.read(&mut buf).await?;
        if n == 0 {
            w.shutdown().await?;
            activity.one_way_done();
            return Ok(total);
        }
        w.write_all(&buf[..n]).await?;
        total += n as u64;
        activity.touch();
    }
}

/// [`relay`] between a flow's rings (a) and an upstream kernel socket (b), without a
/// bounce buffer: one copy fewer per byte each way.
pub(crate) async fn ring_to_socket(
    flow: &RingConn,
    upstream: &TcpStream,
    timeouts: Timeouts,
) -> io::Result<RelayStats> {
    let activity = Activity::new();
    let up = async {
        let mut total = 0u64;
        loop {
            match poll_fn(|cx| flow.poll_read_with(cx, |data| upstream.try_write(data))).await {
                Ok(0) => {
                    SockRef::from(upstream).shutdown(Shutdown::Write)?;
                    activity.one_way_done();
                    return Ok(total);
                }
                Ok(n) => {
                    total += n as u64;
                    activity.touch();
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => upstream.writable().await?,
                Err(e) => return Err(e),
            }
        }
    };
    let down = async {
        let mut total = 0u64;
        loop {
            match poll_fn(|cx| flow.poll_write_with(cx, |space| upstream.try_read(space))).await {
                Ok(0) => {
                    flow.close_write();
                    activity.one_way_done();
                    return Ok(total);
                }
                Ok(n) => {
                    total += n as u64;
                    activity.touch();
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => upstream.readable().await?,
                Err(e) => return Err(e),
            }
        }
    };
    activity.watch(async { tokio::try_join!(up, down) }, timeouts, || flow.release_idle_buffers()).await
}

/// Bytes one splice moves at most: the pipe's size. 256 KiB (four times the default):
/// large enough that one splice moves a 64 KiB super-packet's worth several times over,
/// small enough that the pool's pipes stay within an unprivileged user's pipe budget
/// (`pipe-user-pages-soft`, 64 MiB = [`PIPES_MAX`] pipes at full size).
const SPLICE_CHUNK: usize = 256 * 1024;

/// Pipes in use at once, process-wide. A direction with bytes in flight beyond this copies
/// through a [`COPY_CHUNK`] buffer of its own instead (slower, never stalled).
const PIPES_MAX: usize = 256;

/// Drained pipes kept for the next direction that has bytes (the rest are closed): enough
/// that bulk flows reuse pipes instead of creating one per burst, few enough that a gateway
/// after a burst holds at most 32 fds more than before it.
const PIPES_KEPT: usize = 16;

/// The buffer of the copy fallback, allocated while its bytes are in flight.
const COPY_CHUNK: usize = 16 * 1024;

/// The splice pipes of every relay in the process. A direction takes a pipe only while it
/// has bytes in flight and gives it back once the pipe is drained and the source has
/// nothing more, so an idle relayed connection costs its two sockets and nothing else
/// (a pipe per direction held for a relay's whole life cost 4 fds per connection and
/// capped the system stack at ~3 300 connections under a 20 000-fd limit).
static PIPES: PipePool = PipePool::new(PIPES_MAX);

struct PipePool {
    kept: std::sync::Mutex<Vec<crate::os::Pipe>>,
    /// Pipes that exist (kept or leased).
    live: AtomicUsize,
    max: usize,
}

impl PipePool {
    const fn new(max: usize) -> Self {
        PipePool { kept: std::sync::Mutex::new(Vec::new()), live: AtomicUsize::new(0), max }
    }

    /// A drained pipe, or `None` when `max` are in use (or none can be created).
    fn take(&'static self) -> Option<Lease> {
        if let Some(pipe) = crate::wake::lock(&self.kept).pop() {
            return Some(Lease { pipe: Some(pipe), pool: self, clean: true });
        }
        if self.live.fetch_add(1, Ordering::Relaxed) >= self.max {
            self.live.fetch_sub(1, Ordering::Relaxed);
            return None;
        }
        match crate::os::Pipe::new(SPLICE_CHUNK) {
            Ok(pipe) => Some(Lease { pipe: Some(pipe), pool: self, clean: true }),
            Err(e) => {
                self.live.fetch_sub(1, Ordering::Relaxed);
                tracing::debug!(error = %e, "no splice pipe; copying instead");
                None
            }
        }
    }

    /// Pipes on loan now.
    #[cfg(test)]
    fn leased(&self) -> usize {
        self.live.load(Ordering::Relaxed) - crate::wake::lock(&self.kept).len()
    }
}

/// A pipe on loan from [`PIPES`]; returned on drop if it holds no bytes, closed otherwise
/// (a relay that failed mid-way leaves bytes nobody may read).
struct Lease {
    pipe: Option<crate::os::Pipe>,
    pool: &'static PipePool,
    clean: bool,
}

impl Drop for Lease {
    fn drop(&mut self) {
        let Some(pipe) = self.pipe.take() else { return };
        if self.clean {
            let mut kept = crate::wake::lock(&self.pool.kept);
            if kept.len() < PIPES_KEPT {
                kept.push(pipe);
                return;
            }
        }
        drop(pipe);
        self.pool.live.fetch_sub(1, Ordering::Relaxed);
    }
}

/// [`relay`] between two kernel sockets (a flow the system stack handed over as its
/// socket, and the upstream) with `splice(2)`: the bytes move as page references through
/// a pipe leased per burst and never enter user memory.
pub(crate) async fn splice_sockets(a: &TcpStream, b: &TcpStream, timeouts: Timeouts) -> io::Result<RelayStats> {
    splice_sockets_with(&PIPES, a, b, timeouts).await
}

async fn splice_sockets_with(
    pool: &'static PipePool,
    a: &TcpStream,
    b: &TcpStream,
    timeouts: Timeouts,
) -> io::Result<RelayStats> {
    let activity = Activity::new();
    let one = splice_one_way(pool, a, b, &activity);
    let two = splice_one_way(pool, b, a, &activity);
    activity.watch(async { tokio::try_join!(one, two) }, timeouts, || ()).await
}

async fn splice_one_way(
    pool: &'static PipePool,
    from: &TcpStream,
    to: &TcpStream,
    activity: &Activity,
) -> io::Result<u64> {
    let mut total = 0u64;
    loop {
        // Hold nothing while the source is quiet.
        from.readable().await?;
        let (moved, eof) = match pool.take() {
            Some(mut lease) => splice_burst(from, to, &mut lease, activity).await?,
            None => copy_burst(from, to, activity).await?,
        };
        total += moved;
        if eof {
            SockRef::from(to).shutdown(Shutdown::Write)?;
            activity.one_way_done();
            return Ok(total);
        }
    }
}

/// Splices from `from` to `to` until `from` has nothing more for now or reached EOF;
/// returns the bytes moved and whether it was EOF. The pipe is drained either way.
async fn splice_burst(
    from: &TcpStream,
    to: &TcpStream,
    lease: &mut Lease,
    activity: &Activity,
) -> io::Result<(u64, bool)> {
    use std::os::fd::AsFd;
    use tokio::io::Interest;
    let pipe = lease.pipe.as_ref().expect("a lease holds its pipe until dropped");
    let mut moved = 0u64;
    loop {
        let n = match from.try_io(Interest::READABLE, || pipe.fill_from(from.as_fd(), SPLICE_CHUNK)) {
            Ok(0) => return Ok((moved, true)),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok((moved, false)),
            Err(e) => return Err(e),
        };
        lease.clean = false;
        activity.touch();
        let mut left = n;
        while left > 0 {
            match to.try_io(Interest::WRITABLE, || pipe.drain_to(to.as_fd(), left)) {
                Ok(m) => {
                    left -= m;
                    // A slow reader drains slowly: that is activity too.
                    activity.touch();
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => to.writable().await?,
                Err(e) => return Err(e),
            }
        }
        lease.clean = true;
        moved += n as u64;
    }
}

/// [`splice_burst`] through a buffer, for when every pipe is in use.
async fn copy_burst(from: &TcpStream, to: &TcpStream, activity: &Activity) -> io::Result<(u64, bool)> {
    let mut buf = vec![0u8; COPY_CHUNK];
    let mut moved = 0u64;
    loop {
        let n = match from.try_read(&mut buf) {
            Ok(0) => return Ok((moved, true)),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok((moved, false)),
            Err(e) => return Err(e),
        };
        activity.touch();
        let mut sent = 0;
        while sent < n {
            match to.try_write(&buf[sent..n]) {
                Ok(m) => {
                    sent += m;
                    activity.touch();
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => to.writable().await?,
                Err(e) => return Err(e),
            }
        }
        moved += n as u64;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Once one direction has ended, the other gets the half-close timeout, not the idle
    /// one; traffic on it keeps it going.
    #[tokio::test(start_paused = true)]
    async fn a_half_closed_relay_ends_after_the_half_close_timeout() {
        let (mut a_user, a) = tokio::io::duplex(1024);
        let (mut b_user, b) = tokio::io::duplex(1024);
        let timeouts = Timeouts { idle: Duration::from_secs(600), half_close: Duration::from_secs(5) };
        let started = Instant::now();
        let relay = tokio::spawn(relay(a, b, timeouts));
        a_user.shutdown().await.unwrap();
        let mut buf = [0u8; 8];
        assert_eq!(b_user.read(&mut buf).await.unwrap(), 0, "the FIN crossed");
        // Replies keep the half-open direction alive past 5 s...
        for _ in 0..3 {
            tokio::time::sleep(Duration::from_secs(3)).await;
            b_user.write_all(b"tick").await.unwrap();
            assert_eq!(a_user.read(&mut buf).await.unwrap(), 4);
        }
        // ...and 5 s of silence ends it.
        let err = relay.await.unwrap().unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
        assert!(err.to_string().contains("half-close"), "{err}");
        let took = started.elapsed();
        assert!(took >= Duration::from_secs(14) && took < Duration::from_secs(16), "ended after {took:?}");
    }

    #[tokio::test]
    async fn half_close_crosses_and_bytes_count() {
        let (a, mut a_peer) = tokio::io::duplex(1024);
        let (b, mut b_peer) = tokio::io::duplex(1024);
        let task = tokio::spawn(relay(a, b, Duration::from_secs(5)));
        a_peer.write_all(b"request").await.unwrap();
        a_peer.shutdown().await.unwrap();
        let mut got = Vec::new();
        b_peer.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, b"request");
        // b still writes after a's half-close.
        b_peer.write_all(b"response!").await.unwrap();
        b_peer.shutdown().await.unwrap();
        let mut got = Vec::new();
        a_peer.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, b"response!");
        let stats = task.await.unwrap().unwrap();
        assert_eq!(stats, RelayStats { a_to_b: 7, b_to_a: 9 });
    }

    /// client ⇄ (a | splice relay from `pool` | b) ⇄ server, over loopback.
    async fn spliced(
        pool: &'static PipePool,
        idle: Duration,
    ) -> (TcpStream, TcpStream, tokio::task::JoinHandle<io::Result<RelayStats>>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let client = TcpStream::connect(addr).await.unwrap();
        let (a, _) = listener.accept().await.unwrap();
        let server_side = TcpStream::connect(addr).await.unwrap();
        let (b, _) = listener.accept().await.unwrap();
        let relay = tokio::spawn(async move { splice_sockets_with(pool, &a, &b, idle.into()).await });
        (client, server_side, relay)
    }

    /// client ⇄ (a | relay | b) ⇄ server over loopback: 3 MB up, then an answer after the
    /// client's half-close; checked by digest and by the relay's counts.
    async fn splice_carries_both_ways_with_half_close(pool: &'static PipePool) {
        use sha2::Digest;
        let (mut client, mut server_side, relay) = spliced(pool, Duration::from_secs(10)).await;
        let up: Vec<u8> = (0..3_000_000u32).map(|i| (i * 7 % 251) as u8).collect();
        let up2 = up.clone();
        let writer = tokio::spawn(async move {
            client.write_all(&up2).await.unwrap();
            client.shutdown().await.unwrap();
            let mut back = Vec::new();
            client.read_to_end(&mut back).await.unwrap();
            back
        });
        let mut got = Vec::new();
        server_side.read_to_end(&mut got).await.unwrap();
        assert_eq!(sha2::Sha256::digest(&got), sha2::Sha256::digest(&up), "upload corrupted");
        // The server answers after the client's half-close.
        server_side.write_all(b"done").await.unwrap();
        server_side.shutdown().await.unwrap();
        assert_eq!(writer.await.unwrap(), b"done");
        let stats = relay.await.unwrap().unwrap();
        assert_eq!(stats, RelayStats { a_to_b: up.len() as u64, b_to_a: 4 });
        assert_eq!(pool.leased(), 0, "every pipe went back");
    }

    #[tokio::test]
    async fn splice_sockets_carries_both_ways_with_half_close() {
        splice_carries_both_ways_with_half_close(Box::leak(Box::new(PipePool::new(PIPES_MAX)))).await;
    }

    #[tokio::test]
    async fn without_a_free_pipe_a_relay_copies() {
        splice_carries_both_ways_with_half_close(Box::leak(Box::new(PipePool::new(0)))).await;
    }

    #[tokio::test]
    async fn a_quiet_spliced_relay_holds_no_pipe() {
        let pool: &'static PipePool = Box::leak(Box::new(PipePool::new(PIPES_MAX)));
        let (mut client, mut server_side, relay) = spliced(pool, Duration::from_secs(30)).await;
        for round in 0..3u8 {
            let msg = vec![round; 100_000];
            client.write_all(&msg).await.unwrap();
            let mut got = vec![0u8; msg.len()];
            server_side.read_exact(&mut got).await.unwrap();
            assert_eq!(got, msg);
            server_side.write_all(&msg[..10]).await.unwrap();
            let mut back = [0u8; 10];
            client.read_exact(&mut back).await.unwrap();
            assert_eq!(back, [round; 10]);
            // Both directions drained: the relay gives its pipes back while it waits.
            let deadline = Instant::now() + Duration::from_secs(5);
            while pool.leased() > 0 && Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            assert_eq!(pool.leased(), 0, "a relay with nothing in flight still holds a pipe (round {round})");
            assert!(!crate::wake::lock(&pool.kept).is_empty(), "drained pipes are kept for reuse");
        }
        drop((client, server_side));
        let _ = relay.await.unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn idle_timeout_ends_a_silent_relay() {
        let (a, _a_peer) = tokio::io::duplex(64);
        let (b, _b_peer) = tokio::io::duplex(64);
        let err = relay(a, b, Duration::from_secs(30)).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
    }
}
