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
/// `udp` — where it counts what it does (`stats`, shared with the binary and tests), and
/// how much memory all flows' rings may hold together (`max_ring_memory`, `None`: no
/// limit; see [`RingBudget`](crate::RingBudget)), and how many sessions the stack keeps
/// at once (`max_sessions`, for TCP and for UDP each, `None`: no limit): past it, the
/// least recently active session is evicted to make room for the new one (TCP: reset
/// both ways; UDP: closed), counted in `tcp_evicted` and `udp_evicted`.
#[derive(Clone)]
pub struct Dispatch {
    pub tcp: Arc<dyn TcpHandler>,
    pub udp: Arc<dyn UdpHandler>,
    pub stats: Arc<Stats>,
    pub max_ring_memory: Option<u64>,
    pub max_sessions: Option<std::num::NonZeroUsize>,
}

impl fmt::Debug for Dispatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Dispatch").finish_non_exhaustive()
    }
}

impl Dispatch {
    pub fn new(tcp: Arc<dyn TcpHandler>, udp: Arc<dyn UdpHandler>) -> Self {
        Dispatch { tcp, udp, stats: Arc::default(), max_ring_memory: None, max_sessions: None }
    }

    /// The budget of this gateway's rings, each of `capacity` bytes.
    pub fn ring_budget(&self, capacity: usize) -> crate::RingBudget {
        crate::RingBudget::new(capacity, self.max_ring_memory, self.stats.clone())
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use super::*;
    use crate::target::{NameSource, Target};
    use crate::tcp::new_flow;
    use crate::wake::{FlowId, WakeQueue};

    /// A naming layer: renames every request, then hands it to the handler it wraps.
    struct Rename<H>(H);

    impl<H: TcpHandler> TcpHandler for Rename<H> {
        fn handle_tcp(&self, mut request: TcpRequest) {
            let port = request.dst().port();
            request.set_target(Target::Domain { name: "example.test".into(), port }, NameSource::Other("test"));
            self.0.handle_tcp(request);
        }
    }

    /// The wrapped handler: records what it was asked to connect to, and refuses.
    #[derive(Default)]
    struct Record(Mutex<Vec<(Target, NameSource)>>);

    impl TcpHandler for Record {
        fn handle_tcp(&self, request: TcpRequest) {
            let naming = request.naming().clone();
            self.0.lock().expect("lock").push((naming.target, naming.source));
            request.reject();
        }
    }

    #[test]
    fn a_layer_renames_a_request_for_the_handler_it_wraps() {
        let inner = Arc::new(Record::default());
        let layered: Arc<dyn TcpHandler> = Arc::new(Rename(inner.clone()));
        let (link, request) = new_flow(
            FlowId(1),
            "10.0.0.1:5".parse().unwrap(),
            "198.18.0.9:443".parse().unwrap(),
            &crate::RingBudget::unlimited(16),
            WakeQueue::new(),
        );
        assert_eq!(request.target(), &Target::Addr("198.18.0.9:443".parse().unwrap()), "the destination until renamed");
        layered.handle_tcp(request);
        let seen = inner.0.lock().expect("lock").clone();
        assert_eq!(seen, vec![(Target::Domain { name: "example.test".into(), port: 443 }, NameSource::Other("test"))]);
        assert_eq!(link.decision(), crate::tcp::Decision::Rejected, "the inner handler's decision reached the stack");
    }
}
