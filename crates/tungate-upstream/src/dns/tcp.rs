//! DNS over TCP (RFC 1035 §4.2.2: each message preceded by its 2-byte length) as a UDP
//! path: queries from a client's UDP session go out framed on one TCP connection through
//! the upstream, and each response comes back as a datagram. Responses may come in any
//! order; the client matches them by ID, as it would over UDP.

use std::io;
use std::net::SocketAddr;
use std::sync::Mutex;

use tokio::net::TcpStream;
use tungate_api::Target;

use crate::connector::{BoxFuture, Datagram, UdpPath, with_scratch};

/// One TCP connection carrying a session's queries; see the module docs.
#[derive(Debug)]
pub struct TcpDns {
    stream: TcpStream,
    /// Reported as the sender of every response.
    from: SocketAddr,
    /// Bytes read but not yet a whole response (kept across cancelled receives).
    rx: Mutex<Vec<u8>>,
}

impl TcpDns {
    pub fn new(stream: TcpStream, from: SocketAddr) -> Self {
        TcpDns { stream, from, rx: Mutex::new(Vec::new()) }
    }
}

impl UdpPath for TcpDns {
    fn send_to<'a>(&'a self, _to: &'a Target, payload: &'a [u8]) -> BoxFuture<'a, io::Result<()>> {
        Box::pin(async move {
            let len = u16::try_from(payload.len()).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
            let mut framed = Vec::with_capacity(2 + payload.len());
            framed.extend(len.to_be_bytes());
            framed.extend_from_slice(payload);
            let mut sent = 0;
            while sent < framed.len() {
                self.stream.writable().await?;
                match self.stream.try_write(&framed[sent..]) {
                    Ok(n) => sent += n,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    Err(e) => return Err(e),
                }
            }
            Ok(())
        })
    }

    fn recv_from(&self) -> BoxFuture<'_, io::Result<Option<Datagram>>> {
        Box::pin(async move {
            loop {
                {
                    let mut rx = self.rx.lock().unwrap_or_else(|p| p.into_inner());
                    if let [hi, lo, ..] = rx[..] {
                        let len = usize::from(u16::from_be_bytes([hi, lo]));
                        if rx.len() >= 2 + len {
                            let response = rx[2..2 + len].to_vec();
                            rx.drain(..2 + len);
                            return Ok(Some((self.from, response)));
                        }
                    }
                }
                self.stream.readable().await?;
                let read = with_scratch(|chunk| {
                    let n = self.stream.try_read(chunk)?;
                    self.rx.lock().unwrap_or_else(|p| p.into_inner()).extend_from_slice(&chunk[..n]);
                    Ok::<_, io::Error>(n)
                });
                match read {
                    Ok(0) => return Ok(None),
                    Ok(_) => {}
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    Err(e) => return Err(e),
                }
            }
        })
    }
}
