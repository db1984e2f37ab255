//! What every upstream offers the [`Router`](crate::Router): a TCP stream to a target, and
//! a UDP path for a session. Each upstream (direct, SOCKS5, HTTP CONNECT) is one module
//! implementing [`Connector`]; the router holds an `Arc<dyn Connector>` and never asks
//! which one it has.

use std::fmt;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::time::Duration;

use socket2::{Domain, Protocol, SockRef, Socket, Type};
use tokio::net::{TcpSocket, TcpStream, UdpSocket};
use tungate_api::Target;

/// A boxed future, so that connectors can live behind `dyn`.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// An upstream: opens TCP streams and UDP paths towards targets.
pub trait Connector: fmt::Debug + Send + Sync + 'static {
    /// A stream connected to `target` through this upstream, ready to relay: handshakes
    /// with a proxy are done. An error means the client must see a refusal.
    fn connect<'a>(&'a self, target: &'a Target) -> BoxFuture<'a, Result<TcpStream, ConnectError>>;

    /// A path for one UDP session whose first datagram goes to `target`.
    /// [`ConnectError::NoUdp`] when this upstream cannot carry UDP at all.
    fn open_udp<'a>(&'a self, target: &'a Target) -> BoxFuture<'a, Result<Box<dyn UdpPath>, ConnectError>>;
}

/// One UDP session's way out and back.
pub trait UdpPath: Send + Sync {
    /// Sends one datagram to `to`.
    fn send_to<'a>(&'a self, to: &'a Target, payload: &'a [u8]) -> BoxFuture<'a, io::Result<()>>;

    /// The next datagram that came back: who sent it and its payload. `Ok(None)` when
    /// the path has ended (a SOCKS5 association's TCP closed).
    ///
    /// Owned, not read into the caller's buffer: a session waits here for most of its
    /// life, and a waiting future that held a 64 KiB buffer cost every live UDP session
    /// that much (57 KiB of RSS each in the soak). Implementations wait for readiness
    /// and read into [`with_scratch`]'s per-thread buffer.
    fn recv_from(&self) -> BoxFuture<'_, io::Result<Option<Datagram>>>;
}

/// A datagram that came back on a [`UdpPath`]: who sent it, and its payload.
pub type Datagram = (SocketAddr, Vec<u8>);

/// Runs `f` with this thread's 64 KiB receive buffer (the largest UDP datagram fits):
/// one per worker thread instead of one per waiting session. `f` must not wait.
pub fn with_scratch<R>(f: impl FnOnce(&mut [u8]) -> R) -> R {
    thread_local! {
        static SCRATCH: std::cell::RefCell<Vec<u8>> = std::cell::RefCell::new(vec![0u8; 65536]);
    }
    SCRATCH.with(|s| f(&mut s.borrow_mut()))
}

/// Why an upstream could not carry a flow. The router turns every one into what a direct
/// refusal would give the client (RST, or a dropped datagram) and a log line.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConnectError {
    /// The upstream answered that the destination refused or cannot be reached (a SOCKS5
    /// reply code, an HTTP status): this flow only.
    #[error("{upstream} refused {target}: {reason}")]
    Refused { upstream: String, target: Target, reason: String },
    /// The proxy rejected the gateway's credentials: every flow through it fails.
    #[error("{upstream} rejected the credentials: {reason}")]
    Auth { upstream: String, reason: String },
    /// The upstream cannot carry UDP (HTTP CONNECT; a SOCKS5 server that refuses UDP
    /// ASSOCIATE).
    #[error("{upstream} does not carry UDP: {reason}")]
    NoUdp { upstream: String, reason: String },
    /// The upstream does not take this target (a name given to the direct upstream
    /// that does not resolve).
    #[error("{upstream} cannot reach {target}: {reason}")]
    Target { upstream: String, target: Target, reason: String },
    /// Reaching the upstream failed, or it broke the protocol.
    #[error("{upstream}: {what}: {source}")]
    Io { upstream: String, what: &'static str, source: io::Error },
}

/// Opens the gateway's own sockets: every one carries `--mark`, so that policy routing
/// keeps it out of the TUN, and gives up after `connect_timeout`.
#[derive(Debug, Clone)]
pub struct Dialer {
    /// `SO_MARK` (needs CAP_NET_ADMIN).
    pub mark: Option<u32>,
    pub connect_timeout: Duration,
    /// Addresses a *name* must not resolve to for the direct upstream (the fake-IP
    /// pools: dialing one loops back into the TUN). Loopback and unspecified addresses
    /// are always refused for names, so a client cannot reach the gateway's own host by
    /// naming `localhost`.
    pub refuse_resolved: Vec<ipnet::IpNet>,
    /// The host's own IPv4 addresses under `--capture-local`: dialled from
    /// [`LOCAL_SOURCE_V4`], which the capture leaves alone, so that the answers of a
    /// server that picks its source per datagram are not captured too.
    pub local: Vec<ipnet::IpNet>,
}

/// The source of the gateway's dials to the host's own IPv4 addresses under
/// `--capture-local` (a loopback address: `127.0.0.0/8` is local to every Linux host).
pub const LOCAL_SOURCE_V4: std::net::Ipv4Addr = std::net::Ipv4Addr::new(127, 74, 67, 1);

impl Default for Dialer {
    fn default() -> Self {
        Dialer { mark: None, connect_timeout: Duration::from_secs(10), refuse_resolved: Vec::new(), local: Vec::new() }
    }
}

impl Dialer {
    /// The source address to bind for `to`: the loopback one for the host's own addresses.
    fn local_source(&self, to: SocketAddr) -> Option<SocketAddr> {
        (to.is_ipv4() && self.local.iter().any(|n| n.contains(&to.ip()))).then(|| (LOCAL_SOURCE_V4, 0).into())
    }

    /// A TCP connection to `to`, Nagle off.
    pub async fn tcp(&self, to: SocketAddr) -> io::Result<TcpStream> {
        let socket = if to.is_ipv4() { TcpSocket::new_v4()? } else { TcpSocket::new_v6()? };
        if let Some(mark) = self.mark {
            SockRef::from(&socket).set_mark(mark)?;
        }
        if let Some(source) = self.local_source(to) {
            socket.bind(source)?;
        }
        socket.set_nodelay(true)?;
        tokio::time::timeout(self.connect_timeout, socket.connect(to))
            .await
            .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, format!("connecting to {to} timed out")))?
    }

    /// A UDP socket of `peer`'s family; connected to `peer` when `connect`, else bound to
    /// any port (to send anywhere and hear from anyone: full cone).
    pub fn udp(&self, peer: SocketAddr, connect: bool) -> io::Result<UdpSocket> {
        let socket = Socket::new(Domain::for_address(peer), Type::DGRAM, Some(Protocol::UDP))?;
        if let Some(mark) = self.mark {
            socket.set_mark(mark)?;
        }
        socket.set_nonblocking(true)?;
        if connect {
            socket.connect(&peer.into())?;
        } else {
            let any: SocketAddr = if peer.is_ipv4() { ([0, 0, 0, 0], 0).into() } else { ([0u16; 8], 0).into() };
            socket.bind(&self.local_source(peer).unwrap_or(any).into())?;
            // Unconnected, the kernel would keep a port unreachable to itself.
            crate::os::report_errors(std::os::fd::AsFd::as_fd(&socket), peer.is_ipv6())?;
        }
        UdpSocket::from_std(socket.into())
    }
}
