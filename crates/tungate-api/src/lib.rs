//! The handler-facing contract of the tungate TUN gateway.
//!
//! A backend (a TCP/IP stack behind a TUN) terminates every TCP connection and UDP flow
//! and hands it to a handler through the types here; the handler decides where it goes.
//! This crate knows no TUN and no stack, so a handler crate (a proxy, a DNS layer) depends
//! on it alone.
//!
//! ```text
//!   stack ──TcpRequest──▶ TcpHandler ──accept──▶ TcpConn ──relay──▶ upstream socket
//!     │  (src, dst, target;  (reject → RST,     (AsyncRead/Write,
//!     │   SYN held)           peek first)        peek, abort)
//!     └──UdpSession──▶ UdpHandler: recv client datagrams, send replies from any address
//! ```
//!
//! A handler that relays every connection to its original destination, refusing the
//! client's connection when the destination refuses (the SYN is held until then):
//!
//! ```no_run
//! use std::time::Duration;
//! use tungate_api::{Target, TcpHandler, TcpRequest};
//!
//! struct Direct;
//!
//! impl TcpHandler for Direct {
//!     fn handle_tcp(&self, request: TcpRequest) {
//!         tokio::spawn(async move {
//!             let Target::Addr(to) = *request.target() else { return request.reject() };
//!             match tokio::net::TcpStream::connect(to).await {
//!                 Ok(upstream) => {
//!                     let client = request.accept().await;
//!                     let _ = client.relay(upstream, Duration::from_secs(600)).await;
//!                 }
//!                 Err(_) => request.reject(),
//!             }
//!         });
//!     }
//! }
//! ```
//!
//! * [`tcp`]: [`TcpRequest`] → [`TcpConn`], and the stack's side of a flow;
//! * [`udp`]: [`UdpSession`], and the stack's session table;
//! * [`target`]: [`Target`] (an address or a domain name) and who named it;
//! * [`relay`]: copying both ways with half-close and an idle timeout.
//!
//! `unsafe` lives only in the private `os` module (`splice(2)`, a non-blocking peek).

mod handler;
mod os;
pub mod recency;
pub mod relay;
mod ring;
pub mod stats;
pub mod target;
pub mod tcp;
pub mod udp;
mod wake;

pub use handler::{Dispatch, TcpHandler, UdpHandler};
pub use relay::RelayStats;
pub use ring::RingBudget;
pub use stats::{Stats, StatsSnapshot};
pub use target::{Endpoints, NameSource, Naming, Target};
pub use tcp::{TcpConn, TcpRequest};
pub use udp::{UdpSendError, UdpSender, UdpSession};
pub use wake::{FlowId, WakeQueue};
