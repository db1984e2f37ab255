//! `--proxy socks5://[user:pass@]host:port`: CONNECT for TCP, one UDP ASSOCIATE per UDP
//! session.

use std::io;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;

use tokio::net::{TcpStream, UdpSocket};
use tungate_api::{Stats, Target};

use super::client::{HandshakeError, handshake};
use super::codec::{self, Auth, Command, RelayDatagram, Socks5Error};
use crate::connector::{BoxFuture, ConnectError, Connector, Dialer, UdpPath};

/// A SOCKS5 proxy at a fixed address (a host name was resolved at start).
#[derive(Debug)]
pub struct Socks5 {
    proxy: SocketAddr,
    auth: Auth,
    dialer: Dialer,
    /// "SOCKS5 proxy 10.0.0.1:1080", for errors.
    name: String,
    stats: Arc<Stats>,
}

impl Socks5 {
    pub fn new(proxy: SocketAddr, auth: Auth, dialer: Dialer, stats: Arc<Stats>) -> Self {
        Socks5 { proxy, auth, dialer, name: format!("SOCKS5 proxy {proxy}"), stats }
    }

    /// A connection to the proxy that has sent `command` for `target` and got success.
    async fn request(&self, command: Command, target: &Target) -> Result<(TcpStream, Target), ConnectError> {
        let mut stream = self.dialer.tcp(self.proxy).await.map_err(|source| ConnectError::Io {
            upstream: self.name.clone(),
            what: "connecting to the proxy",
            source,
        })?;
        match handshake(&mut stream, &self.auth, command, target).await {
            Ok(bound) => Ok((stream, bound)),
            Err(e) => Err(self.error(e, command, target)),
        }
    }

    fn error(&self, e: HandshakeError, command: Command, target: &Target) -> ConnectError {
        let upstream = self.name.clone();
        match e {
            HandshakeError::Socks5(Socks5Error::Reply(code)) => match (command, code.0) {
                // "Command not supported" / "not allowed" for UDP ASSOCIATE: no UDP here.
                (Command::UdpAssociate, 2 | 7) => ConnectError::NoUdp { upstream, reason: code.to_string() },
                _ => ConnectError::Refused { upstream, target: target.clone(), reason: code.to_string() },
            },
            HandshakeError::Socks5(e @ (Socks5Error::AuthFailed(_) | Socks5Error::NoAcceptableMethod)) => {
                ConnectError::Auth { upstream, reason: e.to_string() }
            }
            HandshakeError::Socks5(e) => ConnectError::Io {
                upstream,
                what: "SOCKS5 handshake",
                source: io::Error::new(io::ErrorKind::InvalidData, e),
            },
            HandshakeError::Io(source) => ConnectError::Io { upstream, what: "SOCKS5 handshake", source },
        }
    }
}

impl Connector for Socks5 {
    fn connect<'a>(&'a self, target: &'a Target) -> BoxFuture<'a, Result<TcpStream, ConnectError>> {
        Box::pin(async move { Ok(self.request(Command::Connect, target).await?.0) })
    }

    fn open_udp<'a>(&'a self, _target: &'a Target) -> BoxFuture<'a, Result<Box<dyn UdpPath>, ConnectError>> {
        Box::pin(async move {
            // The address we will send from is not known before the socket exists; all
            // zeros asks the server to take datagrams from this client's address.
            let unknown = Target::Addr((Ipv4Addr::UNSPECIFIED, 0).into());
            let (control, bound) = self.request(Command::UdpAssociate, &unknown).await?;
            let relay = match bound {
                // A server bound to all addresses means "the address you reached me on".
                Target::Addr(a) if a.ip().is_unspecified() => SocketAddr::new(self.proxy.ip(), a.port()),
                Target::Addr(a) => a,
                Target::Domain { name, .. } => {
                    return Err(ConnectError::NoUdp {
                        upstream: self.name.clone(),
                        reason: format!("its UDP relay is a name ({name}), which is not supported"),
                    });
                }
            };
            let socket = self.dialer.udp(relay, true).map_err(|source| ConnectError::Io {
                upstream: self.name.clone(),
                what: "opening the UDP relay socket",
                source,
            })?;
            Ok(Box::new(Association { control, socket, stats: self.stats.clone() }) as Box<dyn UdpPath>)
        })
    }
}

/// One UDP ASSOCIATE: the TCP connection that keeps it alive and the socket connected to
/// the server's relay. Dropping it closes both, which ends the association.
struct Association {
    control: TcpStream,
    socket: UdpSocket,
    stats: Arc<Stats>,
}

impl Association {
    /// Completes when the proxy closes the control connection (the association is over).
    async fn closed(&self) {
        let mut byte = [0u8; 1];
        loop {
            if self.control.readable().await.is_err() {
                return;
            }
            match self.control.try_read(&mut byte) {
                Ok(0) => return,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(_) => return,
                // A server has nothing to say here; ignore it.
                Ok(_) => {}
            }
        }
    }
}

impl UdpPath for Association {
    fn send_to<'a>(&'a self, to: &'a Target, payload: &'a [u8]) -> BoxFuture<'a, io::Result<()>> {
        Box::pin(async move {
            let datagram =
                codec::udp_datagram(to, payload).map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
            self.socket.send(&datagram).await.map(drop)
        })
    }

    fn recv_from<'a>(&'a self, buf: &'a mut [u8]) -> BoxFuture<'a, io::Result<Option<(SocketAddr, usize)>>> {
        Box::pin(async move {
            loop {
                let n = tokio::select! {
                    n = self.socket.recv(buf) => n?,
                    () = self.closed() => return Ok(None),
                };
                let (from, len) = match codec::parse_udp(&buf[..n]) {
                    Ok(RelayDatagram::Whole { from: Target::Addr(from), payload }) => (from, payload.len()),
                    Ok(RelayDatagram::Fragment) => {
                        Stats::inc(&self.stats.udp_fragments);
                        continue;
                    }
                    // A relay that names the sender, or garbage: nothing to deliver it as.
                    Ok(RelayDatagram::Whole { .. }) | Err(_) => {
                        Stats::inc(&self.stats.udp_dropped);
                        continue;
                    }
                };
                // The payload is the datagram's tail; move it to the front.
                buf.copy_within(n - len..n, 0);
                return Ok(Some((from, len)));
            }
        })
    }
}
