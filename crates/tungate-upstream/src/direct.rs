//! The direct upstream: dial the original destination.

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use socket2::{Domain, Protocol, SockRef, Socket, Type};
use tokio::net::{TcpSocket, TcpStream, UdpSocket};
use tungate_core::{Accepted, Stats, TcpHandler, TcpRequest, UdpHandler, UdpSender};

/// Settings of the direct upstream.
#[derive(Debug, Clone)]
pub struct DirectConfig {
    /// `SO_MARK` for every upstream socket (needs CAP_NET_ADMIN), so policy routing can
    /// keep the gateway's own traffic out of the TUN.
    pub mark: Option<u32>,
    /// Give up dialing after this long; the client then gets RST.
    pub connect_timeout: Duration,
    /// Close a TCP relay after this long without a byte either way.
    pub tcp_idle_timeout: Duration,
    /// Forget a UDP NAT entry after this long without a datagram either way.
    pub udp_idle_timeout: Duration,
}

impl Default for DirectConfig {
    fn default() -> Self {
        DirectConfig {
            mark: None,
            connect_timeout: Duration::from_secs(10),
            // As common NATs do: long for TCP, short for UDP.
            tcp_idle_timeout: Duration::from_secs(600),
            udp_idle_timeout: Duration::from_secs(60),
        }
    }
}

/// Dials every flow's original destination; see the crate docs.
#[derive(Debug, Clone)]
pub struct Direct {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    config: DirectConfig,
    /// UDP NAT: (client, original destination) → the connected upstream socket (the
    /// sending half; a task owns a duplicate of it for the return path).
    udp: Mutex<HashMap<(SocketAddr, SocketAddr), Arc<UdpEntry>>>,
    stats: Arc<Stats>,
}

/// One UDP NAT entry.
#[derive(Debug)]
struct UdpEntry {
    send: std::net::UdpSocket,
    /// When the client last sent, in ms since `created`; the return path reads it to tell
    /// an idle entry from one that only carries client → destination traffic.
    last_send_ms: AtomicU64,
    created: Instant,
}

impl UdpEntry {
    fn touch(&self) {
        self.last_send_ms.store(self.created.elapsed().as_millis() as u64, Ordering::Relaxed);
    }

    fn idle_for(&self) -> Duration {
        self.created.elapsed().saturating_sub(Duration::from_millis(self.last_send_ms.load(Ordering::Relaxed)))
    }
}

impl Direct {
    pub fn new(config: DirectConfig, stats: Arc<Stats>) -> Self {
        Direct { inner: Arc::new(Inner { config, udp: Mutex::default(), stats }) }
    }
}

impl Inner {
    async fn dial_tcp(&self, dst: SocketAddr) -> io::Result<TcpStream> {
        let socket = if dst.is_ipv4() { TcpSocket::new_v4()? } else { TcpSocket::new_v6()? };
        if let Some(mark) = self.config.mark {
            SockRef::from(&socket).set_mark(mark)?;
        }
        socket.set_nodelay(true)?;
        let stream = tokio::time::timeout(self.config.connect_timeout, socket.connect(dst))
            .await
            .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "connect timed out"))??;
        Ok(stream)
    }

    /// A connected, non-blocking UDP socket to `dst`: the std half sends (tokio's
    /// `try_send` refuses until the reactor has reported the new socket writable, which
    /// would drop a flow's first datagram), the tokio half receives.
    fn bind_udp(&self, dst: SocketAddr) -> io::Result<(std::net::UdpSocket, UdpSocket)> {
        let socket = Socket::new(Domain::for_address(dst), Type::DGRAM, Some(Protocol::UDP))?;
        if let Some(mark) = self.config.mark {
            socket.set_mark(mark)?;
        }
        socket.set_nonblocking(true)?;
        socket.connect(&dst.into())?;
        let send: std::net::UdpSocket = socket.into();
        let recv = UdpSocket::from_std(send.try_clone()?)?;
        Ok((send, recv))
    }
}

impl TcpHandler for Direct {
    fn handle_tcp(&self, request: TcpRequest) {
        let inner = self.inner.clone();
        tokio::spawn(async move {
            let (src, dst) = (request.src(), request.dst());
            let upstream = match inner.dial_tcp(dst).await {
                Ok(s) => s,
                Err(e) => {
                    tracing::debug!(%src, %dst, error = %e, "dial failed; resetting client");
                    request.reject();
                    return;
                }
            };
            let flow = match request.accept_stream().await {
                Accepted::Flow(flow) => flow,
                Accepted::Stream(client) => {
                    // The system stack: two kernel sockets, spliced (no user-space copy).
                    match crate::splice_sockets(&client, &upstream, inner.config.tcp_idle_timeout).await {
                        Ok(s) => tracing::debug!(%src, %dst, up = s.a_to_b, down = s.b_to_a, "tcp relay done"),
                        Err(e) => {
                            tracing::debug!(%src, %dst, error = %e, "tcp relay failed; resetting both sides");
                            for s in [&client, &upstream] {
                                let _ = SockRef::from(s).set_linger(Some(Duration::ZERO));
                            }
                        }
                    }
                    return;
                }
            };
            match crate::splice(&flow, &upstream, inner.config.tcp_idle_timeout).await {
                Ok(s) => tracing::debug!(%src, %dst, up = s.a_to_b, down = s.b_to_a, "tcp relay done"),
                Err(e) => {
                    // A reset or timeout on either side resets the client too, rather than
                    // ending with a FIN that would pass for a complete response.
                    tracing::debug!(%src, %dst, error = %e, "tcp relay failed; resetting both sides");
                    flow.abort();
                    // Linger 0: dropping the socket sends RST, so the destination does not
                    // take a truncated stream for a complete one either.
                    let _ = SockRef::from(&upstream).set_linger(Some(Duration::ZERO));
                }
            }
        });
    }
}

impl UdpHandler for Direct {
    fn handle_udp(&self, src: SocketAddr, dst: SocketAddr, payload: &[u8], reply: &UdpSender) {
        let inner = &self.inner;
        // Touched under the map lock, so the return path cannot expire an entry between
        // this lookup and the send below (it decides under the same lock).
        let existing = inner.udp.lock().ok().and_then(|m| {
            m.get(&(src, dst)).map(|e| {
                e.touch();
                e.clone()
            })
        });
        let socket = match existing {
            Some(s) => s,
            None => match inner.bind_udp(dst) {
                Ok((send, recv)) => {
                    let entry = Arc::new(UdpEntry { send, last_send_ms: AtomicU64::new(0), created: Instant::now() });
                    if let Ok(mut m) = inner.udp.lock() {
                        m.insert((src, dst), entry.clone());
                    }
                    tokio::spawn(udp_return_path(self.inner.clone(), entry.clone(), recv, src, dst, reply.clone()));
                    entry
                }
                Err(e) => {
                    tracing::debug!(%src, %dst, error = %e, "udp upstream socket failed");
                    Stats::inc(&inner.stats.udp_dropped);
                    return;
                }
            },
        };
        // Non-blocking: a full socket buffer drops the datagram, as a router would.
        if let Err(e) = socket.send.send(payload) {
            tracing::debug!(%src, %dst, error = %e, "udp send upstream failed");
            Stats::inc(&inner.stats.udp_dropped);
        }
    }
}

/// Carries replies for one UDP NAT entry back to the client, from the original
/// destination's address, until the entry is idle for `udp_idle_timeout`.
async fn udp_return_path(
    inner: Arc<Inner>,
    entry: Arc<UdpEntry>,
    socket: UdpSocket,
    src: SocketAddr,
    dst: SocketAddr,
    reply: UdpSender,
) {
    let idle = inner.config.udp_idle_timeout;
    let mut buf = vec![0u8; 65536];
    let mut wait = idle;
    loop {
        match tokio::time::timeout(wait, socket.recv(&mut buf)).await {
            Ok(Ok(n)) => {
                let _ = reply.send(dst, src, &buf[..n]);
                wait = idle;
            }
            // ICMP errors (port unreachable) surface as recv errors on a connected socket;
            // they do not end the NAT entry.
            Ok(Err(_)) => {}
            // No reply for `wait`: the entry lives on if the client sent meanwhile.
            Err(_) => {
                let Ok(mut m) = inner.udp.lock() else { return };
                match idle.checked_sub(entry.idle_for()) {
                    Some(left) if !left.is_zero() => wait = left,
                    _ => {
                        m.remove(&(src, dst));
                        return;
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn udp_entry_idle_tracks_client_sends() {
        let (send, _recv) = Direct::new(DirectConfig::default(), Arc::default())
            .inner
            .bind_udp("127.0.0.1:9".parse().unwrap())
            .unwrap();
        let entry = UdpEntry { send, last_send_ms: AtomicU64::new(0), created: Instant::now() };
        tokio::time::sleep(Duration::from_millis(30)).await;
        assert!(entry.idle_for() >= Duration::from_millis(30));
        entry.touch();
        assert!(entry.idle_for() < Duration::from_millis(30));
    }
}
