//! The stack side of the tungate TUN gateway: packet devices, admission, the one driver
//! and the [`Backend`] trait every stack crate implements. Handlers are written against
//! [`api`] (the `tungate-api` crate, re-exported here) and never see this side.
//!
//! ```text
//!  TUN device ──packets──▶ admission (held SYNs, UDP sessions) ──TcpRequest / UdpSession──▶ handlers
//!  (PacketDevice)            │ admitted flows                                             (direct, SOCKS5…)
//!                            ▼
//!                  a backend's stack (Engine or StreamStack) ◀── TcpConn bytes ──┘
//! ```
//!
//! Another project uses it in three steps — pick a backend crate, give it a TUN, bring a
//! handler (a complete program: `examples/own_gateway.rs`):
//!
//! ```no_run
//! use std::sync::Arc;
//! use tungate_core::device::tun::{TunConfig, TunDevice};
//! use tungate_core::{Backend, Dispatch, Mtu, TcpHandler, UdpHandler};
//!
//! /// Serves `tun0` with `backend` (e.g. `backend_smoltcp::Smoltcp::default()`) until Ctrl-C.
//! async fn serve<B, H>(backend: B, handler: Arc<H>) -> Result<(), Box<dyn std::error::Error>>
//! where
//!     B: Backend,
//!     H: TcpHandler + UdpHandler,
//! {
//!     let mut config = TunConfig::new("tun0", Mtu::DEFAULT);
//!     config.addresses = vec!["198.18.0.1/30".parse()?];
//!     let tun = TunDevice::create(&config)?;
//!     let stop = async { tokio::signal::ctrl_c().await.unwrap_or_default() };
//!     tungate_core::serve(backend, tun, Dispatch::new(handler.clone(), handler), stop).await?;
//!     Ok(())
//! }
//! ```
//!
//! * [`device`]: the packet-device trait, a Linux TUN on tun-rs and an in-memory pair for tests.
//! * [`admission`]: the contract every backend gives its handlers, written once
//!   ([`admission::FlowTable`]: held SYNs, RST for strangers, UDP sessions), and the
//!   layer in front of stacks that hand out streams.
//! * [`flow`]: the stack's side of a flow (rings and ports shared with the handler's side).
//! * [`events`]: the two JSON lines a running gateway writes on standard output, typed.
//! * [`outbound`]: the queues of packets for the device that are not a stack's own:
//!   handlers' UDP replies and what admission writes itself.
//! * [`engine`]: the engine contract every backend meets, and the one driver that runs it;
//!   [`stream_stack`]: the engine made of a stack that hands out streams, behind admission.
//! * [`backend`]: the trait the binaries drive (an engine factory) and [`serve`];
//!   backends live in their own crates.
//!
//! `unsafe` is allowed only in `device/sys.rs` (adopting an inherited file descriptor) and
//! [`os`] (returning free heap memory to the OS).

pub mod admission;
pub mod backend;
pub mod config;
pub mod device;
pub mod engine;
pub mod events;
pub mod icmp;
pub mod os;
pub mod outbound;
pub mod packet;
pub mod stream_stack;

pub use backend::{Backend, BackendError, DeviceInfo, ServeOptions, Start, serve, serve_seeded, serve_with};
pub use config::{Mtu, MtuError};
pub use device::{PacketBuf, PacketDevice, PacketPool};
pub use tungate_api as api;
pub use tungate_api::{
    Dispatch, FlowId, Stats, Target, TcpConn, TcpHandler, TcpRequest, UdpHandler, UdpSender, UdpSession, stats,
};

/// The stack's side of TCP flows, from `tungate-api` (where it shares its state with the
/// handler's side).
pub mod flow {
    pub use tungate_api::tcp::{
        DEFAULT_RING_CAPACITY, Decision, FlowHandle, FlowIo, FlowLink, FlowPort, FlowProgress, FlowSignals, new_flow,
    };
    pub use tungate_api::udp::UdpSessions;
    pub use tungate_api::{FlowId, WakeQueue};
}
