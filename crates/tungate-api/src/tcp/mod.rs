//! TCP flows between a stack and a handler.
//!
//! A stack that sees a new SYN creates a linked pair ([`new_flow`]): it keeps the
//! [`FlowLink`] and gives the [`TcpRequest`] to the [`TcpHandler`](crate::TcpHandler). An
//! accepted request becomes a [`TcpConn`]. Bytes cross between the stack and the handler
//! through two bounded rings behind one mutex (the private `state` module); whenever the handler side
//! changes something the stack must act on (data written, space freed in a full ring,
//! shutdown, reset, decision), the flow's [`FlowId`](crate::FlowId) is queued on the
//! stack's [`WakeQueue`](crate::WakeQueue), so the stack services exactly the flows that
//! have work and never scans them all.
//!
//! * [`request`]: the decision (accept, reject, peek first);
//! * [`conn`]: the handler's connection (ring or kernel socket, one type);
//! * [`link`]: the stack's side (packet engines pump under one lock; stream stacks
//!   get an async port).

pub mod conn;
pub mod link;
pub mod request;
mod state;

pub(crate) use conn::RingConn;
pub use conn::TcpConn;
pub use link::{DEFAULT_RING_CAPACITY, FlowHandle, FlowIo, FlowLink, FlowPort, FlowProgress, FlowSignals, new_flow};
pub use request::{TcpRequest, now_or_never};
pub use state::Decision;

#[cfg(test)]
mod tests;
