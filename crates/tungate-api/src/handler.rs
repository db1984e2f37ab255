//! What a gateway does with the flows a stack terminates.
//!
//! Both handler traits are called synchronously from the stack's loop and must not block:
//! a handler typically spawns a task per request or session. Handlers compose: a layer
//! (fake-IP lookup, sniffing) implements the same trait, renames the request or session
//! ([`TcpRequest::set_target`]) and passes it on to the handler it wraps.

use std::fmt;
use std::sync::Arc;

use crate::stats::Stats;
use crate::tcp::TcpRequest;
use crate::udp::UdpSession;

/// Receives every new TCP connection the stack terminates.
pub trait TcpHandler: Send + Sync + 'static {
    /// Decide about `request` (accept or reject, possibly later from a spawned task).
    fn handle_tcp(&self, request: TcpRequest);
}

/// Receives every new UDP session: the first datagram from a client to a destination.
pub trait UdpHandler: Send + Sync + 'static {
    fn handle_udp(&self, session: UdpSession);
}

impl<T: TcpHandler + ?Sized> TcpHandler for Arc<T> {
    fn handle_tcp(&self, request: TcpRequest) {
        (**self).handle_tcp(request)
    }
}

impl<T: UdpHandler + ?Sized> UdpHandler for Arc<T> {
    fn handle_udp(&self, session: UdpSession) {
        (**self).handle_udp(session)
    }
}

/// Where a backend hands what it terminates — TCP requests to `tcp`, UDP sessions to
/// `udp` — and where it counts what it does (`stats`, shared with the binary and tests).
#[derive(Clone)]
pub struct Dispatch {
    pub tcp: Arc<dyn TcpHandler>,
    pub udp: Arc<dyn UdpHandler>,
    pub stats: Arc<Stats>,
}

impl fmt::Debug for Dispatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Dispatch").finish_non_exhaustive()
    }
}

impl Dispatch {
    pub fn new(tcp: Arc<dyn TcpHandler>, udp: Arc<dyn UdpHandler>) -> Self {
        Dispatch { tcp, udp, stats: Arc::default() }
    }
}
