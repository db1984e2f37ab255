//! Handlers that carry the gateway's flows onward, written on `tungate-api` alone.
//!
//! One handler, the [`Router`], serves every flow: it connects the flow through an
//! upstream — a [`Connector`]: [`Direct`], [`Socks5`] or [`HttpConnect`], chosen by
//! [`ProxySpec`] (`--proxy`) — and relays. The gateway's own sockets (to destinations and
//! to proxies, TCP and UDP) carry an `SO_MARK` ([`Dialer`]) so that policy routing sends
//! them around the TUN instead of back into it (`ip rule add fwmark 0x100 lookup 100`).

mod connector;
mod direct;
pub mod dns;
pub mod http;
mod os;
mod router;
pub mod sniff;
pub mod socks5;
mod spec;

pub use connector::{BoxFuture, ConnectError, Connector, Datagram, Dialer, LOCAL_SOURCE_V4, UdpPath, with_scratch};
pub use direct::Direct;
pub use http::HttpConnect;
pub use router::{Router, RouterConfig, UdpPolicy};
pub use socks5::Socks5;
pub use spec::{ProxySpec, ResolveError};
