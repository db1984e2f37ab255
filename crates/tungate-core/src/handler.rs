//! What a gateway does with the flows a stack terminates.
//!
//! Both handler traits are called synchronously from the stack's loop and must not block:
//! a TCP handler typically spawns a task per request; a UDP handler forwards a datagram
//! with a non-blocking send. Handlers are `Arc<dyn …>`: the cost is one indirect call per
//! flow (TCP) or per datagram (UDP), paid at the edge, not in the packet engine.

use std::collections::VecDeque;
use std::fmt;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};

use crate::config::Mtu;
use crate::device::PacketBuf;
use crate::flow::{TcpRequest, WakeQueue};
use crate::packet::{self, BuildError};
use crate::stats::Stats;

/// Receives every new TCP connection the stack terminates.
pub trait TcpHandler: Send + Sync + 'static {
    /// Decide about `request` (accept or reject, possibly later from a spawned task).
    fn handle_tcp(&self, request: TcpRequest);
}

/// Receives every UDP datagram that arrives on the TUN.
pub trait UdpHandler: Send + Sync + 'static {
    /// `src` is the client, `dst` the original destination. Replies go through `reply`.
    fn handle_udp(&self, src: SocketAddr, dst: SocketAddr, payload: &[u8], reply: &UdpSender);
}

/// The handlers a backend serves, and the counters it keeps.
#[derive(Clone)]
pub struct Handlers {
    pub tcp: Arc<dyn TcpHandler>,
    pub udp: Arc<dyn UdpHandler>,
    pub stats: Arc<Stats>,
}

impl fmt::Debug for Handlers {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Handlers").finish_non_exhaustive()
    }
}

impl Handlers {
    pub fn new(tcp: Arc<dyn TcpHandler>, udp: Arc<dyn UdpHandler>) -> Self {
        Handlers { tcp, udp, stats: Arc::default() }
    }
}

/// Why a UDP reply was not queued.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum UdpSendError {
    #[error("reply queue is full")]
    QueueFull,
    #[error(transparent)]
    Build(#[from] BuildError),
}

/// Sends UDP datagrams back through the TUN with any source address — normally the
/// original destination, so the reply looks like it came from there.
///
/// Cheap to clone; usable from any thread. Datagrams are built into recycled buffers and
/// queued for the stack's driver; a full queue drops (UDP semantics) and counts.
#[derive(Clone)]
pub struct UdpSender {
    outbox: Arc<UdpOutbox>,
}

impl fmt::Debug for UdpSender {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("UdpSender").finish_non_exhaustive()
    }
}

impl UdpSender {
    pub fn send(&self, from: SocketAddr, to: SocketAddr, payload: &[u8]) -> Result<(), UdpSendError> {
        let result = self.outbox.queue(from, to, payload);
        let stats = &self.outbox.stats;
        match &result {
            Ok(()) => Stats::inc(&stats.udp_tx),
            Err(_) => Stats::inc(&stats.udp_dropped),
        }
        result
    }
}

/// The queue behind [`UdpSender`], drained by a backend's driver.
#[derive(Debug)]
pub struct UdpOutbox {
    queue: Mutex<VecDeque<PacketBuf>>,
    pool: Mutex<Vec<PacketBuf>>,
    limit: usize,
    mtu: Mtu,
    wake: Arc<WakeQueue>,
    stats: Arc<Stats>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl UdpOutbox {
    /// Replies queued beyond this are dropped: ~1.5 MB at MTU 1500, enough to ride out
    /// a burst while the stack's loop is busy.
    pub const DEFAULT_LIMIT: usize = 1024;

    pub fn new(mtu: Mtu, wake: Arc<WakeQueue>, stats: Arc<Stats>) -> Arc<Self> {
        Arc::new(UdpOutbox {
            queue: Mutex::default(),
            pool: Mutex::default(),
            limit: Self::DEFAULT_LIMIT,
            mtu,
            wake,
            stats,
        })
    }

    pub fn sender(self: &Arc<Self>) -> UdpSender {
        UdpSender { outbox: self.clone() }
    }

    fn queue(&self, from: SocketAddr, to: SocketAddr, payload: &[u8]) -> Result<(), UdpSendError> {
        if lock(&self.queue).len() >= self.limit {
            return Err(UdpSendError::QueueFull);
        }
        let mut buf = lock(&self.pool).pop().unwrap_or_else(|| PacketBuf::with_capacity(self.mtu.get()));
        let len = packet::build_udp(from, to, payload, buf.spare_mut())?;
        buf.set_len(len);
        lock(&self.queue).push_back(buf);
        self.wake.wake();
        Ok(())
    }

    /// Takes the oldest queued reply.
    pub fn pop(&self) -> Option<PacketBuf> {
        lock(&self.queue).pop_front()
    }

    /// Returns a sent buffer for reuse.
    pub fn recycle(&self, buf: PacketBuf) {
        let mut pool = lock(&self.pool);
        if pool.len() < self.limit {
            pool.push(buf);
        }
    }
}

/// What a layer that answers for a stack writes to the TUN itself — RSTs and released
/// SYNs it queues, and the UDP replies handlers send — with a small pool of buffers.
/// Used by [`Admission`](crate::admission::Admission) and the system stack's NAT.
#[derive(Debug)]
pub struct Outbound {
    queue: VecDeque<PacketBuf>,
    free: Vec<PacketBuf>,
    udp: Arc<UdpOutbox>,
    last_from_udp: bool,
    mtu: Mtu,
}

impl Outbound {
    /// Spare buffers kept for RSTs.
    const POOL: usize = 64;

    pub fn new(mtu: Mtu, wake: Arc<WakeQueue>, stats: Arc<Stats>) -> Self {
        Outbound {
            queue: VecDeque::new(),
            free: Vec::new(),
            udp: UdpOutbox::new(mtu, wake, stats),
            last_from_udp: false,
            mtu,
        }
    }

    /// The sender handlers reply through.
    pub fn udp_sender(&self) -> UdpSender {
        self.udp.sender()
    }

    /// Queues a packet to write.
    pub fn push(&mut self, packet: PacketBuf) {
        self.queue.push_back(packet);
    }

    /// Queues the RST that answers `segment`.
    pub fn send_rst(&mut self, segment: &crate::packet::TcpSummary) {
        let mut buf = self.free.pop().unwrap_or_else(|| PacketBuf::with_capacity(self.mtu.get()));
        buf.meta = Default::default();
        match packet::build_tcp_rst(segment, buf.spare_mut()) {
            Some(len) => {
                buf.set_len(len);
                self.queue.push_back(buf);
            }
            None => self.free.push(buf),
        }
    }

    /// The next packet to write: queued ones first, then UDP replies.
    pub fn poll_transmit(&mut self) -> Option<PacketBuf> {
        if let Some(buf) = self.queue.pop_front() {
            self.last_from_udp = false;
            return Some(buf);
        }
        let buf = self.udp.pop()?;
        self.last_from_udp = true;
        Some(buf)
    }

    /// Gives back the buffer last returned by [`poll_transmit`](Self::poll_transmit).
    pub fn recycle(&mut self, buf: PacketBuf) {
        if self.last_from_udp {
            self.udp.recycle(buf);
        } else if self.free.len() < Self::POOL && buf.capacity() >= self.mtu.get() {
            self.free.push(buf);
        }
    }
}
