//! Core traits and shared types of the tungate TUN gateway.
//!
//! ```text
//!  TUN device ──packets──▶ Engine (a TCP/IP stack, I/O-free) ──TcpRequest / datagram──▶ handlers
//!  (PacketDevice)  ◀─packets── driver::run_engine ◀──── TcpConn bytes / UdpSession ───── (direct, SOCKS5…)
//! ```
//!
//! * [`device`]: the packet-device trait, a Linux TUN on tun-rs and an in-memory pair for tests.
//! * [`api`] (the `tungate-api` crate, re-exported): what handlers see — [`TcpRequest`] →
//!   [`TcpConn`], [`UdpSession`], [`Target`] — and [`flow`], the stack's side of a flow.
//! * [`handler`]: building handlers' UDP replies into packets, and what a layer in front
//!   of a stack writes itself.
//! * [`engine`]: the I/O-free engine contract every packet-level backend implements, and the
//!   async driver that connects an engine to a device.
//! * [`backend`]: the trait the binaries drive; backends live in their own crates.
//! * [`admission`]: the layer in front of stacks that hand out connections as streams
//!   (held SYNs, RST for strangers, UDP on tungate's own path) and the stream↔flow bridge.
//!
//! `unsafe` is allowed only in `device/sys.rs` (adopting an inherited file descriptor) and
//! [`os`] (returning free heap memory to the OS).

pub mod admission;
pub mod backend;
pub mod config;
pub mod device;
pub mod engine;
pub mod handler;
pub mod os;
pub mod packet;
pub mod stream_stack;

pub use backend::{Backend, BackendError};
pub use config::{Mtu, MtuError};
pub use device::{PacketBuf, PacketDevice};
pub use tungate_api as api;
pub use tungate_api::{
    FlowId, Handlers, Stats, Target, TcpConn, TcpHandler, TcpRequest, UdpHandler, UdpSender, UdpSession, stats,
};

/// The stack's side of TCP flows, from `tungate-api` (where it shares its state with the
/// handler's side).
pub mod flow {
    pub use tungate_api::tcp::{
        DEFAULT_RING_CAPACITY, Decision, FlowIo, FlowLink, FlowPort, FlowProgress, FlowSignals, new_flow,
    };
    pub use tungate_api::udp::UdpSessions;
    pub use tungate_api::{FlowId, WakeQueue};
}
