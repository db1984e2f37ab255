//! The packet and byte counters, kept once for every backend: a device wrapper that counts what
//! crosses it, so that no stack or driver counts packets of its own; and the one policy
//! for a packet the device refuses.

use std::future::Future;
use std::io;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use super::{PacketBuf, PacketDevice};
use crate::config::Mtu;
use crate::stats::Stats;

/// `D`, counting `rx_packets` (and `rx_bytes`) per packet read (a super-packet the device splits on input
/// counts once, as the kernel's interface counts it) and `tx_packets` (and `tx_bytes`) per
/// packet the device took. A packet the device refuses as invalid (the kernel's `EINVAL` for a header
/// it will not take, or offload's fallback splitter for one it cannot split) is dropped
/// and counted in `tx_refused` — our own output, not malformed input — instead of
/// stopping the gateway. [`serve`](crate::serve) wraps every backend's device in it.
#[derive(Debug)]
pub struct Counted<D> {
    inner: D,
    stats: Arc<Stats>,
}

impl<D: PacketDevice> Counted<D> {
    pub fn new(inner: D, stats: Arc<Stats>) -> Self {
        Counted { inner, stats }
    }

    fn count_read(&self, bufs: &[PacketBuf]) {
        let reads = bufs.iter().filter(|b| !b.meta.continued).count() as u64;
        if reads > 0 {
            self.stats.rx_packets.fetch_add(reads, Ordering::Relaxed);
        }
        let bytes: usize = bufs.iter().map(PacketBuf::len).sum();
        if bytes > 0 {
            self.stats.rx_bytes.fetch_add(bytes as u64, Ordering::Relaxed);
        }
    }
}

impl<D: PacketDevice> PacketDevice for Counted<D> {
    fn readable(&mut self) -> impl Future<Output = io::Result<()>> + Send {
        self.inner.readable()
    }

    fn try_recv(&mut self, buf: &mut PacketBuf) -> io::Result<bool> {
        let got = self.inner.try_recv(buf)?;
        if got {
            self.count_read(std::slice::from_ref(buf));
        }
        Ok(got)
    }

    fn try_recv_batch(&mut self, bufs: &mut [PacketBuf]) -> io::Result<usize> {
        let n = self.inner.try_recv_batch(bufs)?;
        self.count_read(&bufs[..n]);
        Ok(n)
    }

    async fn send(&mut self, packet: &PacketBuf) -> io::Result<()> {
        match self.inner.send(packet).await {
            Ok(()) => {
                Stats::inc(&self.stats.tx_packets);
                self.stats.tx_bytes.fetch_add(packet.len() as u64, Ordering::Relaxed);
            }
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) || e.kind() == io::ErrorKind::InvalidInput => {
                tracing::debug!("the device refused a packet: {e}");
                Stats::inc(&self.stats.tx_refused);
            }
            Err(e) => return Err(e),
        }
        Ok(())
    }

    fn mtu(&self) -> Mtu {
        self.inner.mtu()
    }

    fn max_packet_len(&self) -> usize {
        self.inner.max_packet_len()
    }

    fn segmentation_offload(&self) -> bool {
        self.inner.segmentation_offload()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::device::mem;

    #[tokio::test]
    async fn reads_and_writes_are_counted_once_each() {
        let (device, mut peer) = mem::pair(Mtu::DEFAULT, 16);
        let stats = Arc::new(Stats::default());
        let mut device = Counted::new(device, stats.clone());
        for i in 0..5u8 {
            peer.tx.send(vec![0x45, i]).await.expect("send");
        }
        let mut bufs: Vec<PacketBuf> = (0..8).map(|_| PacketBuf::with_capacity(1500)).collect();
        let mut read = 0;
        while read < 5 {
            device.readable().await.expect("readable");
            read += device.try_recv_batch(&mut bufs[read..]).expect("read");
        }
        // A later segment of a split super-packet is not a read of its own.
        bufs[0].meta.continued = true;
        device.count_read(&bufs[..1]);
        for buf in &bufs[..3] {
            device.send(buf).await.expect("send");
        }
        for _ in 0..3 {
            peer.rx.recv().await.expect("written");
        }
        let s = stats.snapshot();
        assert_eq!((s.rx_packets, s.tx_packets), (5, 3));
        // Bytes: the five 2-byte packets read (the re-count adds bufs[0] again), three written.
        assert_eq!((s.rx_bytes, s.tx_bytes), (12, 6));
    }

    /// A device that refuses every packet as the kernel refuses a bad header.
    struct Refusing;

    impl PacketDevice for Refusing {
        async fn readable(&mut self) -> io::Result<()> {
            std::future::pending().await
        }
        fn try_recv(&mut self, _: &mut PacketBuf) -> io::Result<bool> {
            Ok(false)
        }
        async fn send(&mut self, _: &PacketBuf) -> io::Result<()> {
            Err(io::Error::from_raw_os_error(libc::EINVAL))
        }
        fn mtu(&self) -> Mtu {
            Mtu::DEFAULT
        }
    }

    #[tokio::test]
    async fn a_refused_packet_is_counted_and_does_not_stop_the_gateway() {
        let stats = Arc::new(Stats::default());
        let mut device = Counted::new(Refusing, stats.clone());
        device.send(&PacketBuf::from_slice(&[0x45; 20])).await.expect("a refusal is not an error");
        let s = stats.snapshot();
        assert_eq!((s.tx_refused, s.tx_packets), (1, 0));
    }
}
