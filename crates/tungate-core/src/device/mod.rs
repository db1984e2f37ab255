//! Packet devices: where IP packets come from and go to.
//!
//! A [`PacketDevice`] moves whole IP packets (no link header, no packet-information prefix).
//! It is readiness-based so a driver can read a batch without an await per packet:
//! `readable().await`, then `try_recv` until it reports no more. Writes apply back-pressure
//! (`send` waits) and never drop; a stack's retransmission timers are far too coarse to
//! treat a local queue as lossy.
//!
//! [`Counted`] wraps any device and keeps the gateway's packet counters; [`capture::Captured`]
//! copies what crosses it to a pcap file.
//!
//! Implementations: [`tun::TunDevice`] (Linux TUN on tun-rs, optionally with offload) and
//! [`mem::MemDevice`] (an in-memory pair for tests and benchmarks).

use std::future::Future;
use std::io;
use std::sync::{Arc, Mutex, MutexGuard};

use crate::config::Mtu;

pub mod capture;
mod counted;
pub mod fault;
pub mod mem;
pub mod offload;

pub use counted::Counted;
#[cfg(target_os = "linux")]
pub(crate) mod sys;
#[cfg(target_os = "linux")]
pub mod tun;

/// Per-packet metadata that travels with a [`PacketBuf`]: the virtio-net header fields of
/// an offload-enabled TUN (see [`offload`]). Both are `None` for a plain packet.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct PacketMeta {
    /// The packet is a super-packet the kernel (or the device) splits into segments.
    pub gso: Option<offload::Gso>,
    /// The transport checksum is not final: the field holds the pseudo-header sum, and
    /// the checksum over the transport header and payload is still to be folded in.
    pub csum: Option<offload::PartialChecksum>,
    /// A later segment of a super-packet the device read and split (a packet it read
    /// before): not a read of its own ([`Counted`]).
    pub continued: bool,
}

/// A packet buffer: fixed capacity, a filled length and metadata.
///
/// A buffer taken from a [`PacketPool`] goes back to it when dropped, whoever drops it
/// (the driver after writing it, a stack after reading it, a queue being cleared), so the
/// hot path does not allocate per packet and nobody hands buffers back by hand.
#[derive(Debug, Clone)]
pub struct PacketBuf {
    data: Box<[u8]>,
    len: usize,
    pub meta: PacketMeta,
    home: Option<PacketPool>,
}

impl PacketBuf {
    /// A buffer of its own (freed when dropped).
    pub fn with_capacity(capacity: usize) -> Self {
        PacketBuf { data: vec![0; capacity].into_boxed_slice(), len: 0, meta: PacketMeta::default(), home: None }
    }

    /// A buffer that takes over `packet` (no copy when its capacity equals its length).
    pub fn from_vec(packet: Vec<u8>) -> Self {
        let len = packet.len();
        PacketBuf { data: packet.into_boxed_slice(), len, meta: PacketMeta::default(), home: None }
    }

    /// A buffer holding a copy of `packet`.
    pub fn from_slice(packet: &[u8]) -> Self {
        PacketBuf { data: packet.into(), len: packet.len(), meta: PacketMeta::default(), home: None }
    }

    pub fn capacity(&self) -> usize {
        self.data.len()
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Marks the first `len` bytes as the packet. Panics if `len` exceeds the capacity,
    /// which is a caller bug, not a property of received data.
    pub fn set_len(&mut self, len: usize) {
        assert!(len <= self.data.len(), "packet length {len} exceeds buffer capacity");
        self.len = len;
    }

    /// The whole capacity, for a device or stack to write into before [`set_len`](Self::set_len).
    pub fn spare_mut(&mut self) -> &mut [u8] {
        &mut self.data
    }

    pub fn packet(&self) -> &[u8] {
        &self.data[..self.len]
    }

    pub fn packet_mut(&mut self) -> &mut [u8] {
        &mut self.data[..self.len]
    }
}

impl Drop for PacketBuf {
    fn drop(&mut self) {
        if let Some(pool) = self.home.take() {
            pool.put(std::mem::take(&mut self.data));
        }
    }
}

/// Buffers of one size that go back to the pool when their [`PacketBuf`] is dropped. At
/// most `keep` wait in the pool: what a burst allocated beyond that is freed, not kept
/// for good. Cloning shares the pool; it may be used from any thread (a handler's UDP
/// reply is built on the handler's, the driver drops it after writing it).
#[derive(Clone)]
pub struct PacketPool(Arc<PoolShared>);

struct PoolShared {
    size: usize,
    keep: usize,
    free: Mutex<Vec<Box<[u8]>>>,
}

impl std::fmt::Debug for PacketPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PacketPool").field("size", &self.0.size).field("kept", &self.kept()).finish()
    }
}

impl PacketPool {
    /// A pool of `size`-byte buffers that keeps at most `keep` of them.
    pub fn new(size: usize, keep: usize) -> Self {
        PacketPool(Arc::new(PoolShared { size, keep, free: Mutex::new(Vec::new()) }))
    }

    /// An empty buffer of the pool's size that comes back when dropped.
    pub fn take(&self) -> PacketBuf {
        let data = self.lock().pop().unwrap_or_else(|| vec![0; self.0.size].into_boxed_slice());
        PacketBuf { data, len: 0, meta: PacketMeta::default(), home: Some(self.clone()) }
    }

    /// A buffer for a packet of `len` bytes: the pool's if it fits, else one of its own.
    pub fn take_fitting(&self, len: usize) -> PacketBuf {
        if len <= self.0.size { self.take() } else { PacketBuf::with_capacity(len) }
    }

    /// How many buffers wait in the pool.
    pub fn kept(&self) -> usize {
        self.lock().len()
    }

    fn put(&self, data: Box<[u8]>) {
        let mut free = self.lock();
        if free.len() < self.0.keep && data.len() == self.0.size {
            free.push(data);
        }
    }

    fn lock(&self) -> MutexGuard<'_, Vec<Box<[u8]>>> {
        self.0.free.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// A source and sink of IP packets.
pub trait PacketDevice: Send + 'static {
    /// Waits until a packet may be available. Cancel-safe; may wake spuriously.
    fn readable(&mut self) -> impl Future<Output = io::Result<()>> + Send;

    /// Reads one packet into `buf` without waiting. `Ok(false)` means none is available.
    fn try_recv(&mut self, buf: &mut PacketBuf) -> io::Result<bool>;

    /// Reads up to `bufs.len()` packets without waiting; returns how many were filled.
    /// Devices with a batch system call (or offload) override this.
    fn try_recv_batch(&mut self, bufs: &mut [PacketBuf]) -> io::Result<usize> {
        let mut n = 0;
        while n < bufs.len() && self.try_recv(&mut bufs[n])? {
            n += 1;
        }
        Ok(n)
    }

    /// Writes one packet, waiting while the device cannot take it.
    fn send(&mut self, packet: &PacketBuf) -> impl Future<Output = io::Result<()>> + Send;

    /// The link MTU: the largest packet a stack should build.
    fn mtu(&self) -> Mtu;

    /// The largest packet [`try_recv`](Self::try_recv) can deliver: the MTU, or 64 KiB
    /// when the device hands out offload super-packets whole ([`offload::RxMode::Whole`]).
    /// Receive buffers must be at least this large.
    fn max_packet_len(&self) -> usize {
        self.mtu().get()
    }

    /// Whether [`send`](Self::send) takes TCP super-packets (a [`PacketMeta::gso`] of up
    /// to 64 KiB with a partial checksum) and segments them — TUN offload.
    fn segmentation_offload(&self) -> bool {
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_dropped_buffer_goes_home_and_the_pool_keeps_at_most_keep() {
        let pool = PacketPool::new(1500, 2);
        let mut a = pool.take();
        a.spare_mut()[0] = 0x45;
        a.set_len(1);
        let a_ptr = a.packet().as_ptr();
        let (b, c) = (pool.take(), pool.take());
        assert_eq!(pool.kept(), 0);
        drop(a);
        assert_eq!(pool.kept(), 1, "the buffer came back on drop");
        let again = pool.take();
        assert_eq!(again.packet().as_ptr(), a_ptr, "and is handed out again");
        assert!(again.is_empty(), "empty, whatever it held");
        drop((again, b, c));
        assert_eq!(pool.kept(), 2, "a burst's third buffer is freed, not kept");
        // A buffer too large for the pool is a buffer of its own.
        let big = pool.take_fitting(9000);
        assert_eq!(big.capacity(), 9000);
        drop(big);
        assert_eq!(pool.kept(), 2);
        // A clone comes home too (the pool still keeps at most two).
        let mut d = pool.take();
        d.set_len(10);
        let e = d.clone();
        drop((d, e));
        assert_eq!(pool.kept(), 2);
    }
}
