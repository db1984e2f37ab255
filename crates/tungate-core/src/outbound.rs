//! Outbound queues: the packets for the device that are not a stack's own — handlers'
//! UDP replies and what a layer (admission) writes itself.
//!
//! The handler-facing traits and types ([`TcpHandler`](tungate_api::TcpHandler),
//! [`UdpSession`](tungate_api::UdpSession), …) live in `tungate-api`; this module builds
//! what handlers send into IP packets for a backend's device.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};

use tungate_api::udp::{UdpReturn, UdpSendError};
use tungate_api::{Stats, UdpSender, WakeQueue};

use crate::config::Mtu;
use crate::device::{PacketBuf, PacketPool};
use crate::packet::{self, BuildError};

impl From<BuildError> for UdpSendError {
    fn from(e: BuildError) -> Self {
        match e {
            BuildError::FamilyMismatch => UdpSendError::FamilyMismatch,
            BuildError::TooLarge(n) => UdpSendError::TooLarge(n),
        }
    }
}

/// The queue behind a backend's [`UdpSender`], drained by its driver: datagrams are built
/// into pooled buffers; a full queue drops.
#[derive(Debug)]
pub struct UdpOutbox {
    queue: Mutex<VecDeque<PacketBuf>>,
    /// How many are queued, so the driver's look for replies takes no lock while none are.
    queued: std::sync::atomic::AtomicUsize,
    pool: PacketPool,
    limit: usize,
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
            queued: Default::default(),
            pool: PacketPool::new(mtu.get(), Self::DEFAULT_LIMIT),
            limit: Self::DEFAULT_LIMIT,
            wake,
            stats,
        })
    }

    pub fn sender(self: &Arc<Self>) -> UdpSender {
        UdpSender::new(self.clone(), self.stats.clone())
    }

    fn queue(&self, from: SocketAddr, to: SocketAddr, payload: &[u8]) -> Result<(), UdpSendError> {
        if lock(&self.queue).len() >= self.limit {
            return Err(UdpSendError::QueueFull);
        }
        let mut buf = self.pool.take();
        let len = packet::build_udp(from, to, payload, buf.spare_mut())?;
        buf.set_len(len);
        self.enqueue(buf);
        Ok(())
    }

    fn enqueue(&self, buf: PacketBuf) {
        lock(&self.queue).push_back(buf);
        self.queued.fetch_add(1, std::sync::atomic::Ordering::Release);
        self.wake.wake();
    }

    /// Takes the oldest queued reply.
    pub fn pop(&self) -> Option<PacketBuf> {
        if self.queued.load(std::sync::atomic::Ordering::Acquire) == 0 {
            return None;
        }
        let buf = lock(&self.queue).pop_front()?;
        self.queued.fetch_sub(1, std::sync::atomic::Ordering::Release);
        Some(buf)
    }
}

impl UdpReturn for UdpOutbox {
    fn send(&self, from: SocketAddr, to: SocketAddr, payload: &[u8]) -> Result<(), UdpSendError> {
        self.queue(from, to, payload)
    }

    fn refused(&self, from: SocketAddr, to: SocketAddr) -> Result<(), UdpSendError> {
        let icmp = crate::icmp::udp_port_unreachable(from, to).ok_or(UdpSendError::FamilyMismatch)?;
        if lock(&self.queue).len() >= self.limit {
            return Err(UdpSendError::QueueFull);
        }
        let mut buf = self.pool.take();
        buf.spare_mut()[..icmp.len()].copy_from_slice(&icmp);
        buf.set_len(icmp.len());
        self.enqueue(buf);
        Ok(())
    }
}

/// What a layer that answers for a stack writes to the TUN itself — RSTs and released
/// SYNs it queues, and the UDP replies handlers send — with a small pool of buffers for RSTs.
/// Used by [`Admission`](crate::admission::Admission) and the system stack's NAT.
#[derive(Debug)]
pub struct Outbound {
    queue: VecDeque<PacketBuf>,
    pool: PacketPool,
    udp: Arc<UdpOutbox>,
}

impl Outbound {
    /// Spare buffers kept for RSTs.
    const POOL: usize = 64;

    pub fn new(mtu: Mtu, wake: Arc<WakeQueue>, stats: Arc<Stats>) -> Self {
        Outbound {
            queue: VecDeque::new(),
            pool: PacketPool::new(mtu.get(), Self::POOL),
            udp: UdpOutbox::new(mtu, wake, stats),
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
        let mut buf = self.pool.take();
        if let Some(len) = packet::build_tcp_rst(segment, buf.spare_mut()) {
            buf.set_len(len);
            self.queue.push_back(buf);
        }
    }

    /// The next packet to write: queued ones first, then UDP replies.
    pub fn poll_transmit(&mut self) -> Option<PacketBuf> {
        self.queue.pop_front().or_else(|| self.udp.pop())
    }
}
