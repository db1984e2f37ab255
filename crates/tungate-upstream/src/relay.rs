//! Copying bytes both ways between two streams with half-close and an idle timeout.

use std::io;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::time::Instant;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// Buffer per direction: large enough that one read drains a full ring or socket
/// buffer at MTU 9000 rates, small enough that 20 000 relays fit in memory.
const BUF: usize = 64 * 1024;

/// How a relay ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RelayStats {
    /// Bytes copied a → b and b → a.
    pub a_to_b: u64,
    pub b_to_a: u64,
}

/// Copies `a → b` and `b → a` until both directions have seen EOF (each EOF is passed on
/// as a write shutdown, so half-closes cross intact), an error occurs, or nothing moved
/// for `idle`.
pub async fn relay<A, B>(a: A, b: B, idle: Duration) -> io::Result<RelayStats>
where
    A: AsyncRead + AsyncWrite + Unpin,
    B: AsyncRead + AsyncWrite + Unpin,
{
    let start = Instant::now();
    let last = Arc::new(AtomicU64::new(0));
    let (mut ar, mut aw) = tokio::io::split(a);
    let (mut br, mut bw) = tokio::io::split(b);
    let one = pump(&mut ar, &mut bw, &last, start);
    let two = pump(&mut br, &mut aw, &last, start);
    let both = async { tokio::try_join!(one, two) };
    tokio::pin!(both);
    loop {
        let since = Duration::from_micros(last.load(Ordering::Relaxed));
        let deadline = start + since + idle;
        tokio::select! {
            r = &mut both => {
                let (a_to_b, b_to_a) = r?;
                return Ok(RelayStats { a_to_b, b_to_a });
            }
            () = tokio::time::sleep_until(deadline) => {
                let since = Duration::from_micros(last.load(Ordering::Relaxed));
                if Instant::now() >= start + since + idle {
                    return Err(io::Error::new(io::ErrorKind::TimedOut, "relay idle timeout"));
                }
            }
        }
    }
}

async fn pump<R, W>(r: &mut R, w: &mut W, last: &AtomicU64, start: Instant) -> io::Result<u64>
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
        last.store(start.elapsed().as_micros() as u64, Ordering::Relaxed);
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

    #[tokio::test(start_paused = true)]
    async fn idle_timeout_ends_a_silent_relay() {
        let (a, _a_peer) = tokio::io::duplex(64);
        let (b, _b_peer) = tokio::io::duplex(64);
        let err = relay(a, b, Duration::from_secs(30)).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
    }
}
