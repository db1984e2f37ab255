//! Helpers for tests that drive an engine by hand (packets in, packets out, a simulated
//! clock), shared by every packet-level backend's unit tests.

use std::time::Instant;

use tungate_core::engine::Engine;
use tungate_core::{PacketBuf, Stats, TcpConn, TcpRequest};

/// Accepts a request on a stack whose connections are rings: the connection is there at
/// once, no runtime needed.
pub fn accept_now(request: TcpRequest) -> TcpConn {
    tungate_core::api::tcp::now_or_never(request.accept()).expect("a ring flow is accepted at once")
}

/// Accepts a request on a stack that hands over kernel sockets (the system stack's NAT),
/// for tests that drive only the packet side: the decision is recorded and the handler
/// side keeps waiting for the socket (its future is leaked, so it never gives up).
pub fn accept_waiting_for_socket(request: TcpRequest) {
    let mut accept = Box::pin(request.accept());
    let waker = std::task::Waker::noop();
    let pending = accept.as_mut().poll(&mut std::task::Context::from_waker(waker)).is_pending();
    assert!(pending, "a socket-capable flow waits for its socket");
    std::mem::forget(accept);
}

/// The engines' mutation test, once for every engine: 50 000 mutants of `good` (a
/// segment of a flow the engine holds open) through [`survive_mutations`], with every
/// request `hold` gets refused; some must be malformed and some must reach the path
/// for segments of no flow.
pub fn mutations_of_an_open_flow<E: Engine>(engine: &mut E, stats: &Stats, good: &[u8], hold: &Hold) {
    survive_mutations(engine, stats, good, 50_000, |_| hold.clear());
    let stats = stats.snapshot();
    assert!(stats.malformed > 0, "some mutations were malformed: {stats:?}");
    assert!(stats.tcp_unknown_flow > 0, "some mutations reached the stranger path too");
}

/// Feeds `n` mutants of `good` to an engine, checking after each that it counted the
/// packet once under the heading a look at it predicts ([`assert_counted_once`]). Every
/// 64 packets the engine's batch ends (flush, wake-ups, `between`, output drained), so
/// mutations also meet flows in every stage.
///
/// [`assert_counted_once`]: crate::mutation::assert_counted_once
pub fn survive_mutations<E: Engine>(
    engine: &mut E,
    stats: &Stats,
    good: &[u8],
    n: usize,
    mut between: impl FnMut(&mut E),
) {
    let now = Instant::now();
    for (i, p) in crate::mutation::mutants(good, n, 1).enumerate() {
        let mut buf = PacketBuf::from_slice(&p);
        let before = stats.snapshot();
        engine.handle_packet(now, &mut buf);
        crate::mutation::assert_counted_once(&before, &stats.snapshot(), &p);
        if i % 64 == 0 {
            engine.flush(now);
            engine.handle_wakeups(now);
            between(engine);
            while engine.poll_transmit().is_some() {}
        }
    }
}

/// A handler that holds every TCP request undecided (the test decides when) and ignores
/// UDP sessions.
#[derive(Debug, Clone, Default)]
pub struct Hold(pub std::sync::Arc<std::sync::Mutex<Vec<TcpRequest>>>);

impl Hold {
    /// The oldest request not yet taken.
    pub fn take(&self) -> TcpRequest {
        let mut held = self.0.lock().unwrap_or_else(|p| p.into_inner());
        assert!(!held.is_empty(), "no request is held");
        held.remove(0)
    }

    /// Drops every held request (each is then rejected).
    pub fn clear(&self) {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).clear();
    }

    pub fn len(&self) -> usize {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// A dispatch whose TCP and UDP handler is this one, with fresh counters.
    pub fn dispatch(&self) -> tungate_core::Dispatch {
        tungate_core::Dispatch::new(std::sync::Arc::new(self.clone()), std::sync::Arc::new(self.clone()))
    }
}

impl tungate_core::TcpHandler for Hold {
    fn handle_tcp(&self, request: TcpRequest) {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).push(request);
    }
}

impl tungate_core::UdpHandler for Hold {
    fn handle_udp(&self, _: tungate_core::UdpSession) {}
}

/// Takes every packet the engine has to write; returns the TCP segments among them.
pub fn drain_tcp<E: Engine>(engine: &mut E) -> Vec<tungate_core::packet::TcpSummary> {
    let mut out = Vec::new();
    while let Some(p) = engine.poll_transmit() {
        if let Ok(tungate_core::packet::Classified::Tcp(seg)) = tungate_core::packet::classify(p.packet()) {
            out.push(seg);
        }
    }
    out
}

/// The TCP segment in `packet`, its checksum verified; panics on anything else.
#[track_caller]
pub fn tcp_of(packet: &[u8]) -> tungate_core::packet::TcpSummary {
    match tungate_core::packet::classify(packet) {
        Ok(tungate_core::packet::Classified::Tcp(seg)) => {
            assert!(tungate_core::packet::tcp_checksum_ok(packet, &seg), "checksum of {seg:?}");
            seg
        }
        other => panic!("not TCP: {other:?}"),
    }
}
