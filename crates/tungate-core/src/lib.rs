//! Core traits and shared types of the tungate TUN gateway.
//!
//! ```text
//!  TUN device ──packets──▶ Engine (a TCP/IP stack, I/O-free) ──TcpRequest / datagram──▶ handlers
//!  (PacketDevice)  ◀─packets── driver::run_engine ◀──── TcpFlow bytes / UdpSender ───── (direct, SOCKS5…)
//! ```
//!
//! * [`device`]: the packet-device trait, a Linux TUN on tun-rs and an in-memory pair for tests.
//! * [`flow`]: the byte pipes between a stack and a handler: [`flow::TcpRequest`] → [`flow::TcpFlow`].
//! * [`handler`]: the TCP and UDP handler traits and the [`handler::UdpSender`] for replies.
//! * [`engine`]: the I/O-free engine contract every packet-level backend implements, and the
//!   async driver that connects an engine to a device.
//! * [`backend`]: the trait the binaries drive; backends live in their own crates.
//! * [`admission`]: the layer in front of stacks that hand out connections as streams
//!   (held SYNs, RST for strangers, UDP on tungate's own path) and the stream↔flow bridge.
//!
//! `unsafe` is allowed only in `device/sys.rs` (adopting an inherited file descriptor) and
//! [`os`] (returning free heap memory to the OS, splice pipes).

pub mod admission;
pub mod backend;
pub mod config;
pub mod device;
pub mod engine;
pub mod flow;
pub mod handler;
pub mod os;
pub mod packet;
pub mod stats;
pub mod stream_stack;

pub use backend::{Backend, BackendError};
pub use config::{Mtu, MtuError};
pub use device::{PacketBuf, PacketDevice};
pub use flow::{Accepted, FlowId, FlowPort, TcpFlow, TcpRequest};
pub use handler::{Handlers, TcpHandler, UdpHandler, UdpSender};
pub use stats::Stats;
