//! The direct upstream: dial the original destination.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use socket2::{Domain, Protocol, SockRef, Socket, Type};
use tokio::net::{TcpSocket, TcpStream, UdpSocket};
use tungate_api::{Stats, Target, TcpHandler, TcpRequest, UdpHandler, UdpSession};

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
    /// End a UDP session after this long without a datagram either way.
    pub udp_idle_timeout: Duration,
}

impl Default for DirectConfig {
    fn default() -> Self {
        DirectConfig {
            mark: None,
            connect_timeout: Duration::from_secs(10),
            // As common NATs do: long for TCP, short for UDP.
            tcp_idle_timeout: Duration::from_secs(600),
            udp_idle_timeout: tungate_api::udp::DEFAULT_IDLE_TIMEOUT,
        }
    }
}

/// Dials every flow's original destination; see the crate docs. A flow named by a
/// naming layer (a domain target) is refused: the direct upstream does not resolve names.
#[derive(Debug, Clone)]
pub struct Direct {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    config: DirectConfig,
    stats: Arc<Stats>,
}

impl Direct {
    pub fn new(config: DirectConfig, stats: Arc<Stats>) -> Self {
        Direct { inner: Arc::new(Inner { config, stats }) }
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

    /// A connected, non-blocking UDP socket to `dst`, marked like the TCP ones.
    fn bind_udp(&self, dst: SocketAddr) -> io::Result<UdpSocket> {
        let socket = Socket::new(Domain::for_address(dst), Type::DGRAM, Some(Protocol::UDP))?;
        if let Some(mark) = self.config.mark {
            socket.set_mark(mark)?;
        }
        socket.set_nonblocking(true)?;
        socket.connect(&dst.into())?;
        UdpSocket::from_std(socket.into())
    }
}

/// The address a direct upstream dials, or why it cannot.
fn address(target: &Target) -> io::Result<SocketAddr> {
    match target {
        Target::Addr(a) => Ok(*a),
        Target::Domain { name, .. } => {
            Err(io::Error::new(io::ErrorKind::Unsupported, format!("direct upstream does not resolve names ({name})")))
        }
    }
}

impl TcpHandler for Direct {
    fn handle_tcp(&self, request: TcpRequest) {
        let inner = self.inner.clone();
        tokio::spawn(async move {
            let (src, target) = (request.src(), request.target().clone());
            let upstream = match address(&target) {
                Ok(to) => inner.dial_tcp(to).await,
                Err(e) => Err(e),
            };
            let upstream = match upstream {
                Ok(s) => s,
                Err(e) => {
                    tracing::debug!(%src, %target, error = %e, "dial failed; resetting client");
                    request.reject();
                    return;
                }
            };
            let client = request.accept().await;
            match client.relay(upstream, inner.config.tcp_idle_timeout).await {
                Ok(s) => tracing::debug!(%src, %target, up = s.a_to_b, down = s.b_to_a, "tcp relay done"),
                Err(e) => tracing::debug!(%src, %target, error = %e, "tcp relay failed; both sides reset"),
            }
        });
    }
}

impl UdpHandler for Direct {
    fn handle_udp(&self, mut session: UdpSession) {
        let inner = self.inner.clone();
        session.set_idle_timeout(inner.config.udp_idle_timeout);
        tokio::spawn(async move {
            let (src, target) = (session.src(), session.target().clone());
            let socket = match address(&target).and_then(|to| inner.bind_udp(to)) {
                Ok(s) => s,
                Err(e) => {
                    tracing::debug!(%src, %target, error = %e, "udp upstream socket failed");
                    Stats::inc(&inner.stats.udp_dropped);
                    return;
                }
            };
            let mut buf = vec![0u8; 65536];
            loop {
                tokio::select! {
                    datagram = session.recv() => match datagram {
                        // Waits for room in the socket buffer (tokio's `try_send` refuses
                        // until the reactor has seen a new socket writable, which would drop
                        // a session's first datagram); meanwhile the session queue fills and
                        // then drops, as a router would.
                        Some(d) => if let Err(e) = socket.send(&d).await {
                            tracing::debug!(%src, %target, error = %e, "udp send upstream failed");
                            Stats::inc(&inner.stats.udp_dropped);
                        },
                        None => return,
                    },
                    // ICMP errors (port unreachable) surface as recv errors on a connected
                    // socket; they do not end the session.
                    reply = socket.recv(&mut buf) => if let Ok(n) = reply {
                        let _ = session.send(&buf[..n]);
                    },
                }
            }
        });
    }
}
