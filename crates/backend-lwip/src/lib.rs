//! A tungate backend on the C lwIP stack (2.1.x), compiled with tungate's own
//! `csrc/lwipopts.h` and bound with tungate's own bindgen bindings.
//!
//! # How a packet travels
//!
//! ```text
//! TUN ─▶ LwipEngine::handle_packet ─▶ FlowTable::inbound (admission, in core)
//!          │ packet::classify (IP header checks, 4-tuple)
//!          ├─ UDP ───────────────▶ its UdpSession (a new one goes to the UdpHandler)
//!          ├─ TCP bare SYN, new ──▶ held flow + TcpRequest to the TcpHandler
//!          │                        accept → the held SYN is fed to lwIP → SYN-ACK
//!          │                        reject → RST from the table
//!          ├─ TCP, admitted flow ─▶ ffi::Stack::input → lwIP tcp_input
//!          │                        callbacks record events; pbufs queue in the flow's slot
//!          └─ TCP, other ─────────▶ lwIP (TIME-WAIT) or its listener's RST
//! after the batch: Engine::flush ─▶ per dirty flow: slot pbufs → FlowLink ring → TcpConn,
//!                                   TcpConn → ring → tcp_write, FIN, tcp_output, one ACK
//! lwIP output callback ──────────▶ pooled PacketBuf queue ─▶ poll_transmit ─▶ TUN
//! ```
//!
//! # What it supports
//!
//! IPv4 and IPv6; every contract of `tungate-api` (refusal as RST to the SYN, half-close
//! both ways, `peek`, `abort` as RST, UDP sessions answering from any address). Not: TUN
//! offload (lwIP takes MTU-sized packets); more than one instance per process; IP
//! fragments, ICMP, IPv6 extension headers (counted as unsupported).
//!
//! # Threading and safety
//!
//! lwIP keeps global state: one engine per process ([`LwipEngine::new`] fails with a
//! clear error for a second one). The engine owns every PCB and is driven by one task
//! (`run_engine`); no lock is shared with handler tasks, which talk to it through the
//! flow rings and the wake queue. Every `unsafe` block is in the `ffi` module.
//!
//! # Tuning (see `csrc/lwipopts.h` for every value and its reason)
//!
//! MSS = MTU − 40 (IPv4) / MTU − 60 (IPv6), derived at run time from the TUN MTU, up to
//! 15960; window scaling with a 1 MiB receive window; 1 MiB send buffer; SACK and
//! out-of-order queueing; malloc-backed memory with no pool limits; Nagle off;
//! keep-alive on every connection.

mod engine;
mod ffi;

use std::time::Duration;

use tungate_core::{Backend, BackendError, DeviceInfo, Dispatch, Mtu, Start};

pub use engine::LwipEngine;
pub use ffi::{AlreadyRunning, SetupError, StackError};

/// The receive window lwIP advertises (compile-time, `TCP_WND` in `csrc/lwipopts.h`).
pub const TCP_WINDOW: usize = 1024 * 1024;

/// Tuning of the lwIP backend that is decided at run time.
#[derive(Debug, Clone)]
pub struct LwipConfig {
    /// The TUN MTU; lwIP's interface MTU, from which it derives the MSS.
    pub mtu: Mtu,
    /// Capacity of each direction's ring between the stack and the handler.
    pub ring_capacity: usize,
    /// A handshake fed to lwIP that has not completed by then is given up (lwIP drops a
    /// half-open connection after 20 s of SYN-ACK retries without telling anyone).
    pub handshake_timeout: Duration,
}

impl Default for LwipConfig {
    fn default() -> Self {
        LwipConfig {
            mtu: Mtu::DEFAULT,
            ring_capacity: tungate_core::flow::DEFAULT_RING_CAPACITY,
            handshake_timeout: Duration::from_secs(25),
        }
    }
}

/// The lwIP backend: an [`LwipEngine`] run by the core driver.
#[derive(Debug, Clone, Default)]
pub struct Lwip {
    pub config: LwipConfig,
}

impl Lwip {
    pub fn new(config: LwipConfig) -> Self {
        Lwip { config }
    }
}

impl Backend for Lwip {
    const NAME: &'static str = "lwip";

    type Engine = LwipEngine;

    /// lwIP draws no randomness here (its initial sequence numbers follow a counter).
    fn engine(self, device: DeviceInfo, handlers: Dispatch, start: Start) -> Result<LwipEngine, BackendError> {
        let mut config = self.config;
        config.mtu = device.mtu;
        LwipEngine::new(config, handlers, start.now).map_err(|e| BackendError::Start(Box::new(e)))
    }
}
