//! The state one TCP flow shares between its stack side and its handler side.

use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::Waker;

use crate::ring::{Ring, RingBudget};
use crate::wake::{FlowId, WakeQueue, lock};

/// What the handler decided about a new flow.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    Pending,
    Accepted,
    Rejected,
}

#[derive(Debug)]
pub(crate) struct State {
    pub(crate) decision: Decision,
    /// Client → handler bytes.
    pub(crate) rx: Ring,
    /// The client sent FIN and every byte before it is in `rx`.
    pub(crate) rx_eof: bool,
    /// The stack could not move everything into `rx`; wake it when the handler reads.
    pub(crate) rx_blocked: bool,
    /// Handler → client bytes.
    pub(crate) tx: Ring,
    /// The handler shut down its write side (FIN after `tx` drains).
    pub(crate) tx_closed: bool,
    /// The connection was reset (by the client, the handler or the stack).
    pub(crate) reset: bool,
    /// The handler asked for a reset (RST to the client).
    pub(crate) abort_requested: bool,
    /// The client reset the connection, seen by a layer in front of a stream stack.
    pub(crate) client_reset: bool,
    /// Evicted by the flow table to make room under a session limit.
    pub(crate) evicted: bool,
    /// The stack is done with the flow; no more bytes move.
    pub(crate) closed: bool,
    /// The handler dropped its connection.
    pub(crate) handler_gone: bool,
    /// `id` is already in the wake queue (always true for a stream port, which is woken
    /// through `stack_waker` instead).
    pub(crate) queued: bool,
    pub(crate) reader: Option<Waker>,
    pub(crate) writer: Option<Waker>,
    /// The task driving a stream port, when it waits for the handler.
    pub(crate) stack_waker: Option<Waker>,
    /// The stack terminates this flow in a kernel socket it can hand over whole.
    pub(crate) socket_capable: bool,
    /// The handler accepted and the stack may hand that socket over.
    pub(crate) wants_socket: bool,
    /// The socket, handed over and not yet taken.
    pub(crate) socket: Option<tokio::net::TcpStream>,
}

impl State {
    /// Once the handler is gone nothing more is written into `tx` or read from `rx`: an
    /// empty ring's storage goes now, not when the stack forgets the flow (which can be
    /// seconds later: TIME-WAIT, a closing handshake), so a finished flow holds none.
    pub(crate) fn release_if_handler_gone(&mut self) {
        if self.handler_gone {
            self.rx.release_if_empty();
            self.tx.release_if_empty();
        }
    }
}

#[derive(Debug)]
pub(crate) struct Shared {
    pub(crate) id: FlowId,
    pub(crate) wake: Arc<WakeQueue>,
    pub(crate) state: Mutex<State>,
    /// Client bytes delivered to the handler's ring so far (see `FlowProgress`).
    pub(crate) delivered: AtomicU64,
}

impl Shared {
    pub(crate) fn new(id: FlowId, rings: &RingBudget, wake: Arc<WakeQueue>) -> Arc<Self> {
        Arc::new(Shared {
            id,
            wake,
            state: Mutex::new(State {
                decision: Decision::Pending,
                rx: Ring::new(rings.clone()),
                rx_eof: false,
                rx_blocked: false,
                tx: Ring::new(rings.clone()),
                tx_closed: false,
                reset: false,
                abort_requested: false,
                client_reset: false,
                evicted: false,
                closed: false,
                handler_gone: false,
                queued: false,
                reader: None,
                writer: None,
                stack_waker: None,
                socket_capable: false,
                wants_socket: false,
                socket: None,
            }),
            delivered: AtomicU64::new(0),
        })
    }

    pub(crate) fn state(&self) -> MutexGuard<'_, State> {
        lock(&self.state)
    }

    /// Queues the flow for the stack unless it already is. Called with the lock held.
    pub(crate) fn wake_stack(&self, st: &mut State) {
        if let Some(w) = st.stack_waker.take() {
            w.wake();
        }
        if !st.queued {
            st.queued = true;
            self.wake.push(self.id);
        }
    }
}

pub(crate) fn reset_error() -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::ConnectionReset, "TCP flow reset")
}
