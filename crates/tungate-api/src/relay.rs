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
use std::sync::atomic::{AtomicU64, Ordering};
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

/// When anything last moved, shared by both directions of one relay.
#[derive(Debug, Clone)]
struct Activity {
    start: Instant,
    last_us: Arc<AtomicU64>,
}

impl Activity {
    fn new() -> Self {
        Activity { start: Instant::now(), last_us: Arc::default() }
    }

    fn touch(&self) {
        self.last_us.store(self.start.elapsed().as_micros() as u64, Ordering::Relaxed);
    }

    fn idle_deadline(&self, idle: Duration) -> Instant {
        self.start + Duration::from_micros(self.last_us.load(Ordering::Relaxed)) + idle
    }

    /// Runs both directions until they finish, or fails once nothing moved for `idle`.
    async fn watch(
        &self,
        both: impl Future<Output = io::Result<(u64, u64)>>,
        idle: Duration,
    ) -> io::Result<RelayStats> {
        tokio::pin!(both);
        loop {
            tokio::select! {
                r = &mut both => {
                    let (a_to_b, b_to_a) = r?;
                    return Ok(RelayStats { a_to_b, b_to_a });
                }
                () = tokio::time::sleep_until(self.idle_deadline(idle)) => {
                    if Instant::now() >= self.idle_deadline(idle) {
                        return Err(io::Error::new(io::ErrorKind::TimedOut, "relay idle timeout"));
                    }
                }
            }
        }
    }
}

/// Copies `a → b` and `b → a` until both directions have seen EOF (each EOF is passed on
/// as a write shutdown, so half-closes cross intact), an error occurs, or nothing moved
/// for `idle`.
pub async fn relay<A, B>(a: A, b: B, idle: Duration) -> io::Result<RelayStats>
where
    A: AsyncRead + AsyncWrite + Unpin,
    B: AsyncRead + AsyncWrite + Unpin,
{
    let activity = Activity::new();
    let (mut ar, mut aw) = tokio::io::split(a);
    let (mut br, mut bw) = tokio::io::split(b);
    let one = pump(&mut ar, &mut bw, &activity);
    let two = pump(&mut br, &mut aw, &activity);
    activity.watch(async { tokio::try_join!(one, two) }, idle).await
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
            return Ok(total);
        }
        w.write_all(&buf[..n]).await?;
        total += n as u64;
        activity.touch();
    }
}

/// [`relay`] between a flow's rings (a) and an upstream kernel socket (b), without a
/// bounce buffer: one copy fewer per byte each way.
pub(crate) async fn ring_to_socket(flow: &RingConn, upstream: &TcpStream, idle: Duration) -> io::Result<RelayStats> {
    let activity = Activity::new();
    let up = async {
        let mut total = 0u64;
        loop {
            match poll_fn(|cx| flow.poll_read_with(cx, |data| upstream.try_write(data))).await {
                Ok(0) => {
                    SockRef::from(upstream).shutdown(Shutdown::Write)?;
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
    activity.watch(async { tokio::try_join!(up, down) }, idle).await
}

/// Bytes one splice moves at most: the pipe's size. 256 KiB (four times the default):
/// large enough that one splice moves a 64 KiB super-packet's worth several times over,
/// small enough that an unprivileged gateway's relays stay within the per-user pipe budget
/// (`pipe-user-pages-soft`, 64 MiB: 128 relays at full size; beyond, pipes get smaller).
const SPLICE_CHUNK: usize = 256 * 1024;

/// [`relay`] between two kernel sockets (a flow the system stack handed over as its
/// socket, and the upstream) with `splice(2)`: the bytes move as page references through
/// a pipe per direction and never enter user memory.
pub(crate) async fn splice_sockets(a: &TcpStream, b: &TcpStream, idle: Duration) -> io::Result<RelayStats> {
    let activity = Activity::new();
    let one = splice_one_way(a, b, &activity);
    let two = splice_one_way(b, a, &activity);
    activity.watch(async { tokio::try_join!(one, two) }, idle).await
}

async fn splice_one_way(from: &TcpStream, to: &TcpStream, activity: &Activity) -> io::Result<u64> {
    use std::os::fd::AsFd;
    use tokio::io::Interest;
    let pipe = crate::os::Pipe::new(SPLICE_CHUNK)?;
    let mut total = 0u64;
    loop {
        let n = loop {
            match from.try_io(Interest::READABLE, || pipe.fill_from(from.as_fd(), SPLICE_CHUNK)) {
                Ok(n) => break n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => from.readable().await?,
                Err(e) => return Err(e),
            }
        };
        if n == 0 {
            SockRef::from(to).shutdown(Shutdown::Write)?;
            return Ok(total);
        }
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
        total += n as u64;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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

    #[tokio::test]
    async fn splice_sockets_carries_both_ways_with_half_close() {
        use sha2::Digest;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        // client ⇄ (a | relay | b) ⇄ server, all over loopback.
        let mut client = TcpStream::connect(addr).await.unwrap();
        let (a, _) = listener.accept().await.unwrap();
        let mut server_side = TcpStream::connect(addr).await.unwrap();
        let (b, _) = listener.accept().await.unwrap();
        let relay = tokio::spawn(async move { splice_sockets(&a, &b, Duration::from_secs(10)).await });
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
    }

    #[tokio::test(start_paused = true)]
    async fn idle_timeout_ends_a_silent_relay() {
        let (a, _a_peer) = tokio::io::duplex(64);
        let (b, _b_peer) = tokio::io::duplex(64);
        let err = relay(a, b, Duration::from_secs(30)).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
    }
}
