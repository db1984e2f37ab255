//! The in-memory suite's handler: a small set of servers chosen by destination port.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tungate_core::{TcpConn, TcpHandler, TcpRequest, UdpHandler, UdpSession};

/// Echo every byte back; shut down after the client's FIN.
pub const ECHO: u16 = 7;
/// Read to EOF, then answer with the SHA-256 of what was read (32 bytes) and close.
pub const SINK: u16 = 9;
/// Read an 8-byte big-endian length, then send that many bytes of [`pattern`] and close.
pub const SOURCE: u16 = 19;
/// Send a greeting and shut down at once, then read to EOF and record what came.
pub const GREET_FIRST: u16 = 21;
/// Read an 8-byte big-endian length and exactly that many bytes, answer their SHA-256,
/// then close: an upload whose end does not depend on the client's FIN.
pub const SINK_COUNTED: u16 = 10;
/// TCP: as [`SINK`], but reads at most 16 KiB per millisecond (a handler slower than the
/// client, so the stack still holds bytes when the client's FIN arrives).
pub const SLOW_SINK: u16 = 13;
/// Refused by the handler: the client must see RST.
pub const REFUSE: u16 = 1;
pub const GREETING: &[u8] = b"220 hello, this side is closed for writing\r\n";

/// The deterministic byte stream SOURCE sends, also used by clients to generate uploads.
pub fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
    out
}

/// A datagram as the UDP handler received it: (src, dst, payload).
pub type UdpSeen = (SocketAddr, SocketAddr, Vec<u8>);

/// What the handler saw for a flow.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Seen {
    pub dst: SocketAddr,
    pub received: Vec<u8>,
}

/// The handler behind the in-memory suite.
#[derive(Debug, Clone, Default)]
pub struct Services {
    /// Flows by client address, filled when a GREET_FIRST flow ends; other flows record
    /// their destination on accept.
    pub seen: Arc<Mutex<HashMap<SocketAddr, Seen>>>,
    /// UDP datagrams as the handler received them: (src, dst, payload).
    pub udp_seen: Arc<Mutex<Vec<UdpSeen>>>,
}

impl Services {
    pub fn seen(&self, client: SocketAddr) -> Option<Seen> {
        self.seen.lock().ok()?.get(&client).cloned()
    }
}

impl TcpHandler for Services {
    fn handle_tcp(&self, request: TcpRequest) {
        if request.dst().port() == REFUSE {
            request.reject();
            return;
        }
        let seen = self.seen.clone();
        tokio::spawn(async move {
            let flow = request.accept().await;
            let (src, dst) = (flow.src(), flow.dst());
            if let Ok(mut m) = seen.lock() {
                m.insert(src, Seen { dst, received: Vec::new() });
            }
            let received = serve(flow, dst.port()).await.unwrap_or_default();
            if let Ok(mut m) = seen.lock() {
                m.insert(src, Seen { dst, received });
            }
        });
    }
}

async fn serve(mut flow: TcpConn, port: u16) -> std::io::Result<Vec<u8>> {
    let mut buf = vec![0u8; 64 * 1024];
    match port {
        ECHO => {
            loop {
                let n = flow.read(&mut buf).await?;
                if n == 0 {
                    break;
                }
                flow.write_all(&buf[..n]).await?;
            }
            flow.shutdown().await?;
        }
        SINK | SLOW_SINK => {
            let mut hash = Sha256::new();
            let chunk = if port == SLOW_SINK { 16 * 1024 } else { buf.len() };
            loop {
                let n = flow.read(&mut buf[..chunk]).await?;
                if n == 0 {
                    break;
                }
                hash.update(&buf[..n]);
                if port == SLOW_SINK {
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
            }
            flow.write_all(&hash.finalize()).await?;
            flow.shutdown().await?;
        }
        SINK_COUNTED => {
            let mut left = flow.read_u64().await? as usize;
            let mut hash = Sha256::new();
            while left > 0 {
                let n = flow.read(&mut buf[..left.min(64 * 1024)]).await?;
                if n == 0 {
                    break;
                }
                hash.update(&buf[..n]);
                left -= n;
            }
            flow.write_all(&hash.finalize()).await?;
            flow.shutdown().await?;
        }
        SOURCE => {
            let len = flow.read_u64().await? as usize;
            let data = pattern(len, len as u64);
            flow.write_all(&data).await?;
            flow.shutdown().await?;
        }
        GREET_FIRST => {
            flow.write_all(GREETING).await?;
            flow.shutdown().await?;
            let mut received = Vec::new();
            flow.read_to_end(&mut received).await?;
            return Ok(received);
        }
        _ => flow.abort(),
    }
    Ok(Vec::new())
}

impl UdpHandler for Services {
    /// Echoes every datagram of the session back from its destination, recording it.
    fn handle_udp(&self, mut session: UdpSession) {
        let seen = self.udp_seen.clone();
        tokio::spawn(async move {
            while let Some(payload) = session.recv().await {
                if let Ok(mut v) = seen.lock() {
                    v.push((session.src(), session.dst(), payload.clone()));
                }
                let _ = session.send(&payload);
            }
        });
    }
}
