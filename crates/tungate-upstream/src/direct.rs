//! The direct upstream: dial the destination itself.

use std::io;
use std::net::SocketAddr;

use tokio::net::{TcpStream, UdpSocket};
use tungate_api::Target;

use crate::connector::{BoxFuture, ConnectError, Connector, Datagram, Dialer, UdpPath, with_scratch};

/// Dials every flow's destination from the gateway's own (marked) sockets. A name (from
/// fake-IP DNS or sniffing) is resolved with the system resolver; that resolver's own
/// traffic must not route into the TUN.
#[derive(Debug, Clone)]
pub struct Direct {
    dialer: Dialer,
}

const NAME: &str = "direct upstream";

impl Direct {
    pub fn new(dialer: Dialer) -> Self {
        Direct { dialer }
    }
}

impl Direct {
    /// The address to dial for `target`: a name's first address that is not refused
    /// (see [`Dialer::refuse_resolved`]).
    async fn resolve(&self, target: &Target) -> Result<SocketAddr, ConnectError> {
        let (name, port) = match target {
            Target::Addr(a) => return Ok(*a),
            Target::Domain { name, port } => (name.as_str(), *port),
        };
        let failed = |reason: String| ConnectError::Target { upstream: NAME.into(), target: target.clone(), reason };
        let addrs = tokio::net::lookup_host((name, port)).await.map_err(|e| failed(e.to_string()))?;
        let refused = |ip: std::net::IpAddr| {
            ip.is_loopback() || ip.is_unspecified() || self.dialer.refuse_resolved.iter().any(|n| n.contains(&ip))
        };
        let mut seen = None;
        for addr in addrs {
            if !refused(addr.ip()) {
                return Ok(addr);
            }
            seen = Some(addr.ip());
        }
        Err(failed(match seen {
            Some(ip) => format!("it resolves to {ip}, which the direct upstream does not dial for a name"),
            None => "the name has no address".into(),
        }))
    }
}

impl Connector for Direct {
    fn connect<'a>(&'a self, target: &'a Target) -> BoxFuture<'a, Result<TcpStream, ConnectError>> {
        Box::pin(async move {
            let to = self.resolve(target).await?;
            self.dialer.tcp(to).await.map_err(|e| match e.kind() {
                // What the destination said: refused, unreachable, no answer.
                io::ErrorKind::ConnectionRefused
                | io::ErrorKind::HostUnreachable
                | io::ErrorKind::NetworkUnreachable
                | io::ErrorKind::TimedOut => {
                    ConnectError::Refused { upstream: NAME.into(), target: target.clone(), reason: e.to_string() }
                }
                _ => ConnectError::Io { upstream: NAME.into(), what: "dialing", source: e },
            })
        })
    }

    fn open_udp<'a>(&'a self, target: &'a Target) -> BoxFuture<'a, Result<Box<dyn UdpPath>, ConnectError>> {
        Box::pin(async move {
            let to = self.resolve(target).await?;
            let socket = self.dialer.udp(to, false).map_err(|e| ConnectError::Io {
                upstream: NAME.into(),
                what: "opening a UDP socket",
                source: e,
            })?;
            Ok(Box::new(DirectUdp { socket, first: (target.clone(), to) }) as Box<dyn UdpPath>)
        })
    }
}

/// An unconnected socket: datagrams go to any destination, and come back from anyone the
/// session has sent to or who learned its port (full cone).
struct DirectUdp {
    socket: UdpSocket,
    /// The session's target and the address it resolved to.
    first: (Target, SocketAddr),
}

impl UdpPath for DirectUdp {
    fn send_to<'a>(&'a self, to: &'a Target, payload: &'a [u8]) -> BoxFuture<'a, io::Result<()>> {
        Box::pin(async move {
            let addr = match to {
                Target::Addr(a) => *a,
                _ if *to == self.first.0 => self.first.1,
                Target::Domain { name, .. } => {
                    return Err(io::Error::new(io::ErrorKind::Unsupported, format!("{name} was not resolved")));
                }
            };
            // Waits for room in the socket buffer (tokio's `try_send` refuses until the
            // reactor has seen a new socket writable, which would drop a session's first
            // datagram); meanwhile the session queue fills and then drops, as a router would.
            self.socket.send_to(payload, addr).await.map(drop)
        })
    }

    fn recv_from(&self) -> BoxFuture<'_, io::Result<Option<Datagram>>> {
        Box::pin(async move {
            use std::os::fd::AsFd;
            use tokio::io::Interest;
            loop {
                // An ICMP error (see `Dialer::udp`) makes the socket ready with an error,
                // not readable.
                let ready = self.socket.ready(Interest::READABLE | Interest::ERROR).await?;
                if ready.is_error() {
                    match self.socket.try_io(Interest::ERROR, || crate::os::take_error(self.socket.as_fd())) {
                        Ok(errno) => return Err(io::Error::from_raw_os_error(errno)),
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                        Err(e) => return Err(e),
                    }
                }
                if !ready.is_readable() {
                    continue;
                }
                let got = with_scratch(|buf| self.socket.try_recv_from(buf).map(|(n, from)| (from, buf[..n].to_vec())));
                match got {
                    Ok(datagram) => return Ok(Some(datagram)),
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    Err(e) => {
                        // The receive reported the error itself: its queued copy goes.
                        crate::os::discard_errors(self.socket.as_fd());
                        return Err(e);
                    }
                }
            }
        })
    }
}
