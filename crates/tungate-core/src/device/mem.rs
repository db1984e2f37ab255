//! An in-memory packet device: a pair of bounded queues standing in for a TUN.
//!
//! The gateway side is a [`MemDevice`]; the other side, a [`MemPeer`], is what a test's
//! peer host (or a benchmark's traffic generator) reads from and writes to. Queues are
//! bounded, so a slow reader pushes back on the writer exactly like a full TUN queue
//! would, minus the loss.

use std::io;

use tokio::sync::mpsc;

use super::{PacketBuf, PacketDevice};
use crate::config::Mtu;

/// The gateway's end of an in-memory link.
#[derive(Debug)]
pub struct MemDevice {
    rx: mpsc::Receiver<Vec<u8>>,
    tx: mpsc::Sender<Vec<u8>>,
    pending: Option<Vec<u8>>,
    mtu: Mtu,
}

/// The far end of an in-memory link: packets the gateway wrote arrive on `rx`, packets
/// sent on `tx` reach the gateway.
#[derive(Debug)]
pub struct MemPeer {
    pub rx: mpsc::Receiver<Vec<u8>>,
    pub tx: mpsc::Sender<Vec<u8>>,
    pub mtu: Mtu,
}

/// Creates a linked device/peer pair whose queues hold `depth` packets each way.
pub fn pair(mtu: Mtu, depth: usize) -> (MemDevice, MemPeer) {
    let (to_gw, from_peer) = mpsc::channel(depth);
    let (to_peer, from_gw) = mpsc::channel(depth);
    (MemDevice { rx: from_peer, tx: to_peer, pending: None, mtu }, MemPeer { rx: from_gw, tx: to_gw, mtu })
}

fn closed() -> io::Error {
    io::Error::new(io::ErrorKind::BrokenPipe, "in-memory peer closed")
}

impl PacketDevice for MemDevice {
    async fn readable(&mut self) -> io::Result<()> {
        if self.pending.is_none() {
            self.pending = Some(self.rx.recv().await.ok_or_else(closed)?);
        }
        Ok(())
    }

    fn try_recv(&mut self, buf: &mut PacketBuf) -> io::Result<bool> {
        let packet = match self.pending.take() {
            Some(p) => p,
            None => match self.rx.try_recv() {
                Ok(p) => p,
                Err(mpsc::error::TryRecvError::Empty) => return Ok(false),
                Err(mpsc::error::TryRecvError::Disconnected) => return Err(closed()),
            },
        };
        // Like a TUN read into a short buffer, an oversized packet is truncated (and will
        // then fail to parse); the device does not decide what is malformed.
        let n = packet.len().min(buf.capacity());
        buf.spare_mut()[..n].copy_from_slice(&packet[..n]);
        buf.set_len(n);
        Ok(true)
    }

    async fn send(&mut self, packet: &PacketBuf) -> io::Result<()> {
        self.tx.send(packet.packet().to_vec()).await.map_err(|_| closed())
    }

    fn mtu(&self) -> Mtu {
        self.mtu
    }
}
