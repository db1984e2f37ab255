//! A tungate backend on [smoltcp] 0.14, used directly.
//!
//! # How a packet travels
//!
//! ```text
//! TUN ─▶ SmoltcpEngine::handle_packet ─▶ FlowTable::inbound (admission, in core)
//!          │ packet::classify (IP header checks, 4-tuple)
//!          ├─ UDP ──────────────▶ its UdpSession (a new one goes to the UdpHandler)
//!          ├─ TCP bare SYN, new ─▶ held flow + TcpRequest to the TcpHandler
//!          │                       accept → listen socket, the held SYN is fed → SYN-ACK
//!          │                       reject → RST from the table
//!          ├─ TCP, admitted flow ─▶ that flow's own smoltcp Interface + one socket
//!          │                       └─ socket buffers ⇄ FlowLink rings ⇄ TcpConn (handler)
//!          └─ anything else ──────▶ RST (TCP) or counted and dropped
//! ```
//!
//! # What it supports
//!
//! IPv4 and IPv6; every contract of `tungate-api` (refusal as RST to the SYN, half-close
//! both ways, `peek`, `abort` as RST, UDP sessions answering from any address); TUN
//! offload (`--offload`: super-packets split by the device on input, TSO on output for
//! IPv4). Not: IP fragments, ICMP and IPv6 extension headers (counted as unsupported and
//! dropped, as in every backend).
//!
//! smoltcp's `Interface::poll` walks every socket in its set for every packet. Instead of
//! one interface for all flows, each flow gets its own small interface and a one-socket
//! set, found through a hash map keyed by 4-tuple, so the work per packet does not grow
//! with the number of flows. Timers live in one binary heap.

mod device;
mod engine;

use std::time::Duration;

use tungate_core::{Backend, BackendError, DeviceInfo, Dispatch, Mtu, Start};

pub use engine::SmoltcpEngine;

/// Tuning of the smoltcp backend. Every default is documented with its reason.
#[derive(Debug, Clone)]
pub struct SmoltcpConfig {
    /// The TUN MTU. smoltcp derives the MSS it advertises and sends from it
    /// (MTU − 40 for IPv4, MTU − 60 for IPv6).
    pub mtu: Mtu,
    /// Per-flow TCP receive buffer, which is also the largest window advertised (window
    /// scaling is negotiated automatically above 64 KiB). 512 KiB covers the
    /// bandwidth-delay product of a local path at tens of Gbit/s with sub-100 µs RTT.
    pub tcp_rx_buffer: usize,
    /// Per-flow TCP send buffer (bytes in flight plus queued).
    pub tcp_tx_buffer: usize,
    /// Capacity of each direction's ring between the stack and the handler.
    pub ring_capacity: usize,
    /// Abort a connection whose client has not answered anything (data, ACK or keep-alive
    /// probe, sent every quarter of this) for this long.
    pub tcp_timeout: Duration,
    /// Verify the TCP checksum of every received segment. Off by default: what a TUN
    /// delivers was built in memory by the local kernel (no wire to corrupt it), and
    /// verifying costs about 4% of the gateway's CPU at MTU 9000 (perf, upload). SYNs
    /// and segments for unknown flows are always verified before they create state.
    pub verify_tcp_checksum: bool,
    /// Emit TCP super-packets (up to 64 KiB, cut into MSS-sized segments by the kernel)
    /// with partial checksums: smoltcp 0.14's segmentation offload on a TUN with offload.
    /// Set from the device ([`PacketDevice::segmentation_offload`](tungate_core::PacketDevice::segmentation_offload)).
    pub segmentation_offload: bool,
}

impl Default for SmoltcpConfig {
    fn default() -> Self {
        SmoltcpConfig {
            mtu: Mtu::DEFAULT,
            tcp_rx_buffer: 512 * 1024,
            tcp_tx_buffer: 512 * 1024,
            ring_capacity: tungate_core::flow::DEFAULT_RING_CAPACITY,
            tcp_timeout: Duration::from_secs(120),
            verify_tcp_checksum: false,
            segmentation_offload: false,
        }
    }
}

/// The smoltcp backend: a [`SmoltcpEngine`] run by the core driver.
#[derive(Debug, Clone, Default)]
pub struct Smoltcp {
    pub config: SmoltcpConfig,
}

impl Smoltcp {
    pub fn new(config: SmoltcpConfig) -> Self {
        Smoltcp { config }
    }
}

impl Backend for Smoltcp {
    const NAME: &'static str = "smoltcp";
    const RX_OFFLOAD: Option<tungate_core::device::offload::RxMode> =
        Some(tungate_core::device::offload::RxMode::Split);

    type Engine = SmoltcpEngine;

    fn engine(self, device: DeviceInfo, handlers: Dispatch, start: Start) -> Result<SmoltcpEngine, BackendError> {
        let mut config = self.config;
        config.mtu = device.mtu;
        config.segmentation_offload = device.segmentation_offload;
        Ok(SmoltcpEngine::new(config, handlers, start.now, start.seed))
    }
}
