//! Where a flow should go: the address the client dialled, or a name a naming layer
//! learned for it.

use std::fmt;
use std::net::SocketAddr;

/// The destination a handler should connect a flow to.
///
/// Every flow starts with [`Target::Addr`] set to its original destination. A naming
/// layer (fake-IP DNS, sniffing) may replace it with [`Target::Domain`], so that a proxy
/// is asked for the name and resolves it itself.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Target {
    Addr(SocketAddr),
    Domain { name: String, port: u16 },
}

impl Target {
    pub fn port(&self) -> u16 {
        match self {
            Target::Addr(a) => a.port(),
            Target::Domain { port, .. } => *port,
        }
    }

    /// The domain name, if the target is one.
    pub fn domain(&self) -> Option<&str> {
        match self {
            Target::Domain { name, .. } => Some(name),
            Target::Addr(_) => None,
        }
    }
}

impl From<SocketAddr> for Target {
    fn from(addr: SocketAddr) -> Self {
        Target::Addr(addr)
    }
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Target::Addr(a) => a.fmt(f),
            Target::Domain { name, port } => write!(f, "{name}:{port}"),
        }
    }
}

/// Who chose a flow's [`Target`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum NameSource {
    /// The original destination: nothing renamed the flow.
    Destination,
    /// The destination was a fake address handed out by the gateway's DNS.
    FakeIp,
    /// A TLS ClientHello's server name.
    TlsSni,
    /// An HTTP/1 request's `Host` header.
    HttpHost,
    /// Anything else a layer of the user's own decided.
    Other(&'static str),
}

impl fmt::Display for NameSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            NameSource::Destination => "destination",
            NameSource::FakeIp => "fake-ip",
            NameSource::TlsSni => "tls-sni",
            NameSource::HttpHost => "http-host",
            NameSource::Other(s) => s,
        })
    }
}

/// A flow's target and where it came from, shared by TCP requests and UDP sessions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Naming {
    pub target: Target,
    pub source: NameSource,
}

/// Who a flow is and where it goes: the client, the destination it dialled, and the
/// target a naming layer may have chosen. [`TcpRequest`](crate::TcpRequest) and
/// [`UdpSession`](crate::UdpSession) dereference to it, so `request.src()` and
/// `session.set_target(..)` read as methods of their own.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoints {
    src: SocketAddr,
    dst: SocketAddr,
    naming: Naming,
}

impl Endpoints {
    /// A flow from `src` to `dst`, targeted at `dst` until renamed.
    pub fn new(src: SocketAddr, dst: SocketAddr) -> Self {
        Endpoints { src, dst, naming: Naming { target: Target::Addr(dst), source: NameSource::Destination } }
    }

    /// The client's real source address.
    pub fn src(&self) -> SocketAddr {
        self.src
    }

    /// The original destination the client sent to.
    pub fn dst(&self) -> SocketAddr {
        self.dst
    }

    /// Where the handler should send this flow.
    pub fn target(&self) -> &Target {
        &self.naming.target
    }

    /// The target and who chose it.
    pub fn naming(&self) -> &Naming {
        &self.naming
    }

    /// Renames the flow (a naming layer's job: fake-IP lookup, sniffing).
    pub fn set_target(&mut self, target: Target, source: NameSource) {
        self.naming = Naming { target, source };
    }
}
