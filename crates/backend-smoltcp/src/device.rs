//! The smoltcp `phy::Device` a flow's interface polls: at most one received packet (the
//! one being demultiplexed) and transmit tokens that write into recycled buffers on the
//! engine's output queue. No allocation once the pool is warm.

use std::collections::VecDeque;

use smoltcp::phy::{self, Checksum, DeviceCapabilities, Medium};
use smoltcp::time::Instant;
use tungate_core::PacketBuf;

pub(crate) struct FlowDevice<'a> {
    pub(crate) rx: Option<&'a [u8]>,
    pub(crate) out: &'a mut Output,
}

/// Packets waiting for the TUN plus spare buffers.
#[derive(Debug, Default)]
pub(crate) struct Output {
    pub(crate) queue: VecDeque<PacketBuf>,
    pub(crate) pool: Vec<PacketBuf>,
    pub(crate) mtu: usize,
    pub(crate) verify_tcp_checksum: bool,
}

impl Output {
    /// Spare buffers kept for reuse; beyond this, returned buffers are freed.
    const POOL_LIMIT: usize = 4096;

    pub(crate) fn buffer(&mut self) -> PacketBuf {
        self.pool.pop().unwrap_or_else(|| PacketBuf::with_capacity(self.mtu))
    }

    pub(crate) fn recycle(&mut self, buf: PacketBuf) {
        if self.pool.len() < Self::POOL_LIMIT && buf.capacity() == self.mtu {
            self.pool.push(buf);
        }
    }
}

pub(crate) struct Rx<'a>(&'a [u8]);

pub(crate) struct Tx<'a>(&'a mut Output);

impl phy::RxToken for Rx<'_> {
    fn consume<R, F: FnOnce(&[u8]) -> R>(self, f: F) -> R {
        f(self.0)
    }
}

impl phy::TxToken for Tx<'_> {
    fn consume<R, F: FnOnce(&mut [u8]) -> R>(self, len: usize, f: F) -> R {
        let mut buf = self.0.buffer();
        // smoltcp never asks for more than the MTU we advertise; a larger request would be
        // a smoltcp bug, and growing the buffer keeps us correct even then.
        if len > buf.capacity() {
            buf = PacketBuf::with_capacity(len);
        }
        buf.set_len(len);
        let r = f(buf.packet_mut());
        self.0.queue.push_back(buf);
        r
    }
}

impl phy::Device for FlowDevice<'_> {
    type RxToken<'b>
        = Rx<'b>
    where
        Self: 'b;
    type TxToken<'b>
        = Tx<'b>
    where
        Self: 'b;

    fn receive(&mut self, _now: Instant) -> Option<(Self::RxToken<'_>, Self::TxToken<'_>)> {
        let packet = self.rx.take()?;
        Some((Rx(packet), Tx(self.out)))
    }

    fn transmit(&mut self, _now: Instant) -> Option<Self::TxToken<'_>> {
        Some(Tx(self.out))
    }

    fn capabilities(&self) -> DeviceCapabilities {
        let mut caps = DeviceCapabilities::default();
        caps.medium = Medium::Ip;
        caps.max_transmission_unit = self.out.mtu;
        // `packet::classify` has verified the IPv4 header checksum already.
        caps.checksum.ipv4 = Checksum::Tx;
        if !self.out.verify_tcp_checksum {
            caps.checksum.tcp = Checksum::Tx;
        }
        caps
    }
}
