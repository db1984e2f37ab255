//! DNS through the gateway: fake-IP answers ([`FakeIp`], [`answer`]), hijacking every
//! port-53 query to one resolver, and forwarding UDP queries over TCP ([`TcpDns`]) for
//! upstreams that carry no UDP.

mod answer;
mod fakeip;
mod tcp;

pub use answer::{Answer, answer};
pub use fakeip::{FakeIp, MAX_NAMES};
pub use tcp::TcpDns;

use std::net::SocketAddr;
use std::sync::Arc;

use ipnet::IpNet;

/// What the gateway does with DNS.
#[derive(Debug, Clone, Default)]
pub struct DnsConfig {
    /// `--dns fake-ip`: A/AAAA queries are answered from these pools.
    pub fake_ip: Option<Arc<FakeIp>>,
    /// TTL of fake answers, in seconds.
    pub fake_ip_ttl: u32,
    /// `--dns hijack=IP:PORT`: every port-53 query (UDP and TCP) goes to this resolver.
    pub hijack: Option<SocketAddr>,
    /// `--dns-over-tcp`: forward UDP queries over TCP.
    pub over_tcp: bool,
}

impl DnsConfig {
    /// Whether port-53 UDP sessions are handled as DNS rather than relayed as they are.
    pub fn intercepts(&self) -> bool {
        self.fake_ip.is_some() || self.hijack.is_some() || self.over_tcp
    }
}

/// The default fake-IP pools: outside every private range and the TUN's usual
/// 198.18.0.0/24, inside the benchmarking and unique-local blocks.
pub fn default_fake_ip_ranges() -> Vec<IpNet> {
    vec!["198.19.0.0/16".parse().expect("valid"), "fd19:f4e1::/64".parse().expect("valid")]
}
