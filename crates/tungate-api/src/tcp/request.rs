//! A new TCP connection waiting for its handler's decision.

use std::fmt;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::task::Poll;
use std::time::Duration;

use super::conn::TcpConn;
use super::state::{Decision, Shared};
use crate::target::Endpoints;

/// A new TCP connection offered to a handler: the client, the destination it dialled,
/// and the [`Target`](crate::Target) to connect it to (the destination unless a naming layer renamed it).
///
/// The client's SYN is held until the handler decides, so a refusal reaches the client as
/// a refused connection: [`accept`](Self::accept) completes the handshake,
/// [`reject`](Self::reject) (or dropping the request) answers the SYN with RST.
/// [`peek`](Self::peek) completes the handshake early to read the client's first bytes;
/// a rejection after a peek resets the connection instead.
pub struct TcpRequest {
    endpoints: Endpoints,
    shared: Option<Arc<Shared>>,
    /// Accepted early for a peek, not yet handed to the handler.
    early: Option<TcpConn>,
}

impl fmt::Debug for TcpRequest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TcpRequest").field("endpoints", &self.endpoints).finish_non_exhaustive()
    }
}

impl TcpRequest {
    pub(crate) fn new(src: SocketAddr, dst: SocketAddr, shared: Arc<Shared>) -> Self {
        TcpRequest { endpoints: Endpoints::new(src, dst), shared: Some(shared), early: None }
    }

    /// Accepts: the stack completes the client's handshake (if a peek has not already)
    /// and the connection is the handler's. Resolves at once on stacks that relay through
    /// rings; on the system stack, once the kernel socket that terminates the connection
    /// is handed over.
    pub async fn accept(mut self) -> TcpConn {
        if let Some(conn) = self.early.take() {
            self.shared = None;
            return conn;
        }
        let shared = self.shared.take().expect("a request is decided once: accept/reject take self");
        TcpConn::accept(self.endpoints.src(), self.endpoints.dst(), shared).await
    }

    /// Refuses: the client's SYN is answered with RST (or, after a [`peek`](Self::peek),
    /// the connection is reset).
    pub fn reject(mut self) {
        self.refuse();
    }

    /// Completes the client's handshake and waits until `buf` is full, the client sent
    /// FIN, or `wait` passed; copies what the client sent so far into `buf` and returns
    /// how many bytes, consuming nothing: the handler still reads every byte after
    /// [`accept`](Self::accept). Use it to sniff a protocol before choosing a target.
    pub async fn peek(&mut self, buf: &mut [u8], wait: Duration) -> io::Result<usize> {
        let min = buf.len();
        self.peek_at_least(buf, min, wait).await
    }

    /// Like [`peek`](Self::peek), done as soon as `min` bytes are there; see
    /// [`TcpConn::peek_at_least`].
    pub async fn peek_at_least(&mut self, buf: &mut [u8], min: usize, wait: Duration) -> io::Result<usize> {
        if self.early.is_none() {
            let shared = self.shared.clone().expect("an undecided request has its flow");
            self.early = Some(TcpConn::accept(self.endpoints.src(), self.endpoints.dst(), shared).await);
        }
        match self.early.as_mut() {
            Some(conn) => conn.peek_at_least(buf, min, wait).await,
            None => Ok(0),
        }
    }

    fn refuse(&mut self) {
        if let Some(conn) = self.early.take() {
            self.shared = None;
            conn.abort();
            return;
        }
        if let Some(shared) = self.shared.take() {
            let mut st = shared.state();
            if st.decision == Decision::Pending {
                st.decision = Decision::Rejected;
            } else {
                // Accepted by a peek whose wait was cancelled: the connection exists.
                st.abort_requested = true;
                st.handler_gone = true;
            }
            shared.wake_stack(&mut st);
        }
    }
}

impl std::ops::Deref for TcpRequest {
    type Target = Endpoints;

    fn deref(&self) -> &Endpoints {
        &self.endpoints
    }
}

impl std::ops::DerefMut for TcpRequest {
    fn deref_mut(&mut self) -> &mut Endpoints {
        &mut self.endpoints
    }
}

impl Drop for TcpRequest {
    fn drop(&mut self) {
        self.refuse();
    }
}

/// Polls a future once; for tests of stacks whose accepted connections are rings (their
/// [`TcpRequest::accept`] is ready at once). `None` if it was not ready.
pub fn now_or_never<F: Future>(f: F) -> Option<F::Output> {
    let mut f = std::pin::pin!(f);
    match f.as_mut().poll(&mut std::task::Context::from_waker(std::task::Waker::noop())) {
        Poll::Ready(v) => Some(v),
        Poll::Pending => None,
    }
}
