//! SOCKS5 (RFC 1928) with username/password authentication (RFC 1929): the wire format,
//! I/O-free ([`codec`]), the handshake that drives it over a stream ([`client`]), and the
//! [`Socks5`] connector behind `--proxy socks5://`.
//!
//! Written here rather than taken from a crate: `fast-socks5` (the one crate with a UDP
//! ASSOCIATE client) creates the relay's UDP socket itself, so the gateway could not put
//! its `SO_MARK` on it and route it around the TUN, and it hides fragmented datagrams
//! (FRAG ≠ 0) that the gateway must drop and count; `tokio-socks` has no UDP at all. The
//! format is small, and an I/O-free codec is what the tests and the fuzzer need.

pub mod client;
pub mod codec;
mod connector;

pub use connector::Socks5;
