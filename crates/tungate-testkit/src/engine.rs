//! Helpers for tests that drive an engine by hand (packets in, packets out, a simulated
//! clock), shared by every packet-level backend's unit tests.

use tungate_core::{TcpConn, TcpRequest};

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
