//! `--proxy socks5://[user:pass@]host:port`: CONNECT for TCP, one UDP ASSOCIATE per UDP
//! session.

use std::io;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;

use tokio::net::{TcpStream, UdpSocket};
use tungate_api::{Stats, Target};

use super::client::{HandshakeError, handshake};
use super::codec::{self, Auth, Command, RelayDatagram, Socks5Error};
use crate::connector::{BoxFuture, ConnectError, Connector, Datagram, Dialer, UdpPath, with_scratch};

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

    fn recv_from(&self) -> BoxFuture<'_, io::Result<Option<Datagram>>> {
        Box::pin(async move {
            loop {
                tokio::select! {
                    ready = self.socket.readable() => ready?,
                    () = self.closed() => return Ok(None),
                };
                let got = with_scratch(|buf| {
                    let n = self.socket.try_recv(buf)?;
                    Ok::<_, io::Error>(match codec::parse_udp(&buf[..n]) {
                        Ok(RelayDatagram::Whole { from: Target::Addr(from), payload }) => {
                            Some((from, payload.to_vec()))
                        }
                        Ok(RelayDatagram::Fragment) => {
                            Stats::inc(&self.stats.udp_fragments);
                            None
                        }
                        // A relay that names the sender, or garbage: nothing to deliver it as.
                        Ok(RelayDatagram::Whole { .. }) | Err(_) => {
                            Stats::inc(&self.stats.udp_dropped);
                            None
                        }
                    })
                });
                match got {
                    Ok(Some(datagram)) => return Ok(Some(datagram)),
                    Ok(None) => {}
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    Err(e) => return Err(e),
                }
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    use super::*;

    /// A SOCKS5 server on loopback that grants one UDP ASSOCIATE, checks the first
    /// datagram's header, answers with a fragment and then a whole datagram from another
    /// address, and closes the association when told.
    async fn relay_server(close: tokio::sync::oneshot::Receiver<()>) -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            let (mut control, _) = listener.accept().await.unwrap();
            let mut greeting = [0u8; 3];
            control.read_exact(&mut greeting).await.unwrap();
            control.write_all(&[5, 0]).await.unwrap();
            let mut request = [0u8; 10];
            control.read_exact(&mut request).await.unwrap();
            assert_eq!(request[..4], [5, 3, 0, 1], "UDP ASSOCIATE for an IPv4 address");
            let relay = UdpSocket::bind("127.0.0.1:0").await.unwrap();
            let port = relay.local_addr().unwrap().port().to_be_bytes();
            // Bound to all addresses: the client must use the proxy's own address.
            control.write_all(&[5, 0, 0, 1, 0, 0, 0, 0, port[0], port[1]]).await.unwrap();
            let mut buf = [0u8; 512];
            let (n, client) = relay.recv_from(&mut buf).await.unwrap();
            let want = [&[0u8, 0, 0, 3, 8][..], b"dns.test", &[0, 53], b"query"].concat();
            assert_eq!(buf[..n], want[..], "header with the name, then the payload");
            relay.send_to(&[0, 0, 1, 1, 192, 0, 2, 9, 0, 53, b'x'], client).await.unwrap();
            relay.send_to(&[&[0, 0, 0, 1, 192, 0, 2, 9, 0, 53][..], b"answer"].concat(), client).await.unwrap();
            let _ = close.await;
            drop(control);
        });
        addr
    }

    #[tokio::test]
    async fn an_association_drops_fragments_and_ends_with_its_tcp_connection() {
        let (close_tx, close_rx) = tokio::sync::oneshot::channel();
        let proxy = relay_server(close_rx).await;
        let stats = Arc::new(Stats::default());
        let socks = Socks5::new(proxy, Auth::None, Dialer::default(), stats.clone());
        let target = Target::Domain { name: "dns.test".into(), port: 53 };
        let path = socks.open_udp(&target).await.unwrap();
        path.send_to(&target, b"query").await.unwrap();
        let (from, payload) = path.recv_from().await.unwrap().expect("a datagram");
        assert_eq!(
            (from, &payload[..]),
            ("192.0.2.9:53".parse().unwrap(), &b"answer"[..]),
            "from the remote, not the relay"
        );
        assert_eq!(stats.udp_fragments.load(std::sync::atomic::Ordering::Relaxed), 1, "the fragment was counted");
        close_tx.send(()).unwrap();
        assert!(path.recv_from().await.unwrap().is_none(), "the association ended with its TCP connection");
    }
}
