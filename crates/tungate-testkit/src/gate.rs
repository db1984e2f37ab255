//! A handler written on the public contract alone, as a user of the crates would write
//! one: it accepts, peeks at the client's first bytes and by them either aborts or relays
//! everything untouched to a destination it chose. The suite runs it on every backend.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::net::{TcpStream, UdpSocket};
use tungate_core::{TcpHandler, TcpRequest, UdpHandler, UdpSession};

/// A connection or session whose first bytes are these is refused.
pub const DENY: &[u8] = b"DENY";

/// (client, original destination, the first bytes peeked) of one TCP connection.
pub type Peeked = (SocketAddr, SocketAddr, Vec<u8>);

/// Peeks, then refuses [`DENY`] or relays to `tcp_to` / `udp_to`.
#[derive(Debug, Clone)]
pub struct Gate {
    pub tcp_to: SocketAddr,
    pub udp_to: SocketAddr,
    pub peeked: Arc<Mutex<Vec<Peeked>>>,
}

impl TcpHandler for Gate {
    fn handle_tcp(&self, mut request: TcpRequest) {
        let gate = self.clone();
        tokio::spawn(async move {
            let mut first = [0u8; 4];
            let Ok(n) = request.peek(&mut first, Duration::from_secs(5)).await else { return };
            let seen = (request.src(), request.dst(), first[..n].to_vec());
            gate.peeked.lock().expect("lock").push(seen);
            if &first[..n] == DENY {
                return request.reject(); // connected already: the client gets RST
            }
            let Ok(upstream) = TcpStream::connect(gate.tcp_to).await else { return request.reject() };
            let _ = request.accept().await.relay(upstream, Duration::from_secs(30)).await;
        });
    }
}

impl UdpHandler for Gate {
    fn handle_udp(&self, mut session: UdpSession) {
        let to = self.udp_to;
        tokio::spawn(async move {
            let Some(first) = session.recv().await else { return };
            if first.starts_with(DENY) {
                return; // the session closes unanswered
            }
            let any: SocketAddr = if to.is_ipv4() { ([0, 0, 0, 0], 0).into() } else { ([0u16; 8], 0).into() };
            let Ok(socket) = UdpSocket::bind(any).await else { return };
            if socket.connect(to).await.is_err() || socket.send(&first).await.is_err() {
                return;
            }
            let mut buf = vec![0u8; 65536];
            loop {
                tokio::select! {
                    datagram = session.recv() => match datagram {
                        Some(d) => { let _ = socket.send(&d).await; }
                        None => return,
                    },
                    Ok(n) = socket.recv(&mut buf) => { let _ = session.send(&buf[..n]); }
                }
            }
        });
    }
}
