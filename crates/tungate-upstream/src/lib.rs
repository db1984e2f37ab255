//! Handlers that carry the gateway's flows onward, written on `tungate-api` alone.
//!
//! [`Direct`] dials each flow's original destination itself. Every upstream socket can
//! carry an `SO_MARK` so that policy routing sends it around the TUN instead of back into
//! it (`ip rule add fwmark 0x100 lookup 100`).

mod direct;
pub mod socks5;

pub use direct::{Direct, DirectConfig};
