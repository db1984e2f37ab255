//! Admission: the contract every backend gives its handlers, written once.
//!
//! A new connection's SYN is **held** until the handler decides: accepted, the SYN goes
//! on to the backend's stack (which completes the handshake); rejected, the client gets
//! RST from here. A retransmitted SYN for a held flow is dropped; a client RST withdraws
//! the request; a segment for no flow is answered with RST (RFC 9293 §3.10.7.1) or, for a
//! stack that may still hold the connection, given to it. UDP goes to the handler as
//! sessions. [`FlowTable`] is that contract, I/O-free; every backend keeps its flows in
//! one, with its own per-flow state as `T`:
//!
//! | backend | `T` (an admitted flow) | a released SYN goes to |
//! |---|---|---|
//! | smoltcp engine | the flow's interface and socket | its own smoltcp interface |
//! | lwIP engine | the PCB's slot | `ip_input` |
//! | stream stacks ([`Admission`]) | the port waiting for the stack's stream | the crate's input |
//! | system NAT | the NAT address and close tracking | the kernel, rewritten |

mod stream;
mod table;

pub use stream::{Aborts, Admission, NoQuirks, Pass, QuirkCx, StreamQuirks, Verdict};
pub use table::{Close, Decided, FlowKey, FlowTable, Flows, Held, Inbound, Opening, Seen, give_back_growth};
