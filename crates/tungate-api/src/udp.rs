//! UDP as sessions: one per (client, original destination), opened by its first
//! datagram, closed when idle or dropped.
//!
//! The stack side ([`UdpSessions`], owned by a backend's loop) looks each datagram up by
//! its 4-tuple and queues it on its session; a datagram for no live session opens one and
//! hands it to the [`UdpHandler`]. The handler side ([`UdpSession`])
//! receives the client's datagrams and sends replies, from the original destination or,
//! full-cone, from any address. The NAT table, the idle timer and the return path live
//! here, once, for every handler.

use std::collections::VecDeque;
use std::fmt;
use std::net::SocketAddr;
use std::num::NonZeroUsize;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use tokio::time::Instant;

use crate::handler::UdpHandler;
use crate::recency::Recency;
use crate::stats::Stats;
use crate::target::Endpoints;
#[cfg(test)]
use crate::target::Target;
use crate::wake::lock;

/// Why a UDP datagram to the client was not queued.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum UdpSendError {
    #[error("reply queue is full")]
    QueueFull,
    #[error("source and destination are of different IP families")]
    FamilyMismatch,
    #[error("datagram of {0} bytes does not fit the MTU")]
    TooLarge(usize),
}

/// Where a backend takes datagrams for the client: it builds the IP packet and queues it
/// for its device.
pub trait UdpReturn: Send + Sync + 'static {
    fn send(&self, from: SocketAddr, to: SocketAddr, payload: &[u8]) -> Result<(), UdpSendError>;

    /// Tells the client `to` that `from` refused its datagrams (an ICMP port unreachable).
    fn refused(&self, from: SocketAddr, to: SocketAddr) -> Result<(), UdpSendError>;
}

/// Sends UDP datagrams back through the TUN with any source address. Cheap to clone;
/// usable from any thread; a full queue drops (UDP semantics) and counts.
#[derive(Clone)]
pub struct UdpSender {
    path: Arc<dyn UdpReturn>,
    stats: Arc<Stats>,
}

impl fmt::Debug for UdpSender {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("UdpSender").finish_non_exhaustive()
    }
}

impl UdpSender {
    pub fn new(path: Arc<dyn UdpReturn>, stats: Arc<Stats>) -> Self {
        UdpSender { path, stats }
    }

    pub fn send(&self, from: SocketAddr, to: SocketAddr, payload: &[u8]) -> Result<(), UdpSendError> {
        let result = self.path.send(from, to, payload);
        match &result {
            Ok(()) => Stats::inc(&self.stats.udp_tx),
            Err(_) => Stats::inc(&self.stats.udp_dropped),
        }
        result
    }

    /// See [`UdpReturn::refused`]; counted in `udp_refused`.
    pub fn refused(&self, from: SocketAddr, to: SocketAddr) -> Result<(), UdpSendError> {
        let result = self.path.refused(from, to);
        if result.is_ok() {
            Stats::inc(&self.stats.udp_refused);
        }
        result
    }
}

/// Datagrams queued per session beyond this are dropped and counted: a burst of ~700 KB
/// at MTU 1500 while the handler's task is busy.
pub const SESSION_QUEUE: usize = 512;

/// A session closes after this long without a datagram either way, unless its handler
/// sets another ([`UdpSession::set_idle_timeout`]). As common NATs do.
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(60);

#[derive(Debug, Default)]
struct Inbox {
    datagrams: VecDeque<Vec<u8>>,
    waker: Option<Waker>,
    closed: bool,
}

#[derive(Debug)]
struct SessionShared {
    inbox: Mutex<Inbox>,
    epoch: Instant,
    /// Last datagram either way, in ms since `epoch`.
    last_ms: AtomicU64,
    /// Sessions of its table still open (this one included until it closes).
    open: Arc<AtomicUsize>,
    stats: Arc<Stats>,
}

impl SessionShared {
    fn touch(&self) {
        self.touch_at(Instant::now());
    }

    fn touch_at(&self, now: Instant) {
        self.last_ms.store(now.saturating_duration_since(self.epoch).as_millis() as u64, Ordering::Relaxed);
    }

    fn last_activity(&self) -> Instant {
        self.epoch + Duration::from_millis(self.last_ms.load(Ordering::Relaxed))
    }

    fn close(&self) {
        let mut inbox = lock(&self.inbox);
        self.mark_closed(&mut inbox);
        inbox.datagrams.clear();
        if let Some(w) = inbox.waker.take() {
            w.wake();
        }
    }

    /// The one place a session becomes closed (and stops counting as open).
    fn mark_closed(&self, inbox: &mut Inbox) {
        if !inbox.closed {
            inbox.closed = true;
            self.open.fetch_sub(1, Ordering::Relaxed);
            Stats::dec(&self.stats.udp_active);
        }
    }

    fn is_closed(&self) -> bool {
        lock(&self.inbox).closed
    }

    /// Closes for idleness unless a datagram arrived meanwhile (it would be lost, counted
    /// as received, with no new session opened for it).
    fn close_if_empty(&self) -> bool {
        let mut inbox = lock(&self.inbox);
        if !inbox.datagrams.is_empty() {
            return false;
        }
        self.mark_closed(&mut inbox);
        true
    }
}

/// One client's UDP conversation with one destination, seen from the handler.
///
/// [`recv`](Self::recv) yields the client's datagrams in order; [`send`](Self::send)
/// answers from the original destination, [`send_from`](Self::send_from) from any
/// address. The session ends when it has been idle (no datagram either way) for its idle
/// timeout — `recv` then returns `None` — or when the handler drops it; the client's next
/// datagram opens a new one.
pub struct UdpSession {
    endpoints: Endpoints,
    shared: Arc<SessionShared>,
    reply: UdpSender,
    idle: Duration,
}

impl fmt::Debug for UdpSession {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("UdpSession").field("endpoints", &self.endpoints).finish_non_exhaustive()
    }
}

impl std::ops::Deref for UdpSession {
    type Target = Endpoints;

    fn deref(&self) -> &Endpoints {
        &self.endpoints
    }
}

impl std::ops::DerefMut for UdpSession {
    fn deref_mut(&mut self) -> &mut Endpoints {
        &mut self.endpoints
    }
}

impl UdpSession {
    pub fn set_idle_timeout(&mut self, idle: Duration) {
        self.idle = idle;
    }

    /// The client's next datagram; `None` once the session is closed (idle for its
    /// timeout: the session is then removed, and the client's next datagram opens a new
    /// one).
    pub async fn recv(&mut self) -> Option<Vec<u8>> {
        loop {
            // No deadline for an idle timeout too long to add (never expire).
            let Some(deadline) = self.shared.last_activity().checked_add(self.idle) else {
                return std::future::poll_fn(|cx| self.poll_recv(cx)).await;
            };
            tokio::select! {
                datagram = std::future::poll_fn(|cx| self.poll_recv(cx)) => return datagram,
                () = tokio::time::sleep_until(deadline) => {
                    // Replies sent meanwhile kept the session alive; a datagram that just
                    // arrived is delivered first.
                    let idle_since = self.shared.last_activity().checked_add(self.idle);
                    if idle_since.is_some_and(|d| Instant::now() >= d) && self.shared.close_if_empty() {
                        return None;
                    }
                }
            }
        }
    }

    /// Polls for the client's next datagram (see [`recv`](Self::recv); this form does
    /// not apply the idle timeout).
    pub fn poll_recv(&self, cx: &mut Context<'_>) -> Poll<Option<Vec<u8>>> {
        let mut inbox = lock(&self.shared.inbox);
        if let Some(d) = inbox.datagrams.pop_front() {
            return Poll::Ready(Some(d));
        }
        if inbox.closed {
            return Poll::Ready(None);
        }
        inbox.waker = Some(cx.waker().clone());
        Poll::Pending
    }

    /// Sends `payload` to the client from the original destination.
    pub fn send(&self, payload: &[u8]) -> Result<(), UdpSendError> {
        self.send_from(self.endpoints.dst(), payload)
    }

    /// Sends `payload` to the client from `from` (full-cone: any remote may answer).
    pub fn send_from(&self, from: SocketAddr, payload: &[u8]) -> Result<(), UdpSendError> {
        self.shared.touch();
        self.reply.send(from, self.endpoints.src(), payload)
    }

    /// Tells the client that the destination refused its datagrams: an ICMP port
    /// unreachable from the original destination, which the client's socket reports as
    /// ECONNREFUSED (as a refused TCP connect gets RST).
    pub fn refused(&self) -> Result<(), UdpSendError> {
        self.reply.refused(self.endpoints.dst(), self.endpoints.src())
    }

    /// A sender for replies from another task (it does not keep the session alive).
    pub fn sender(&self) -> UdpSender {
        self.reply.clone()
    }

    /// Ends the session now.
    pub fn close(self) {}
}

impl Drop for UdpSession {
    fn drop(&mut self) {
        self.shared.close();
    }
}

/// The stack's side: every live session by (client, original destination). Owned by a
/// backend's loop, which calls [`datagram`](Self::datagram) for each UDP datagram.
pub struct UdpSessions {
    handler: Arc<dyn UdpHandler>,
    sender: UdpSender,
    stats: Arc<Stats>,
    /// By (client, destination), the least recently active first.
    table: Recency<(SocketAddr, SocketAddr), Arc<SessionShared>>,
    /// Closed sessions are removed when the table has grown past this.
    sweep_at: usize,
    /// Sessions open now (the table also holds closed ones until they are swept).
    open: Arc<AtomicUsize>,
    max_open: Option<NonZeroUsize>,
}

impl fmt::Debug for UdpSessions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("UdpSessions").field("sessions", &self.table.len()).finish_non_exhaustive()
    }
}

impl UdpSessions {
    pub fn new(handler: Arc<dyn UdpHandler>, sender: UdpSender, stats: Arc<Stats>) -> Self {
        UdpSessions {
            handler,
            sender,
            stats,
            table: Recency::default(),
            sweep_at: 64,
            open: Arc::default(),
            max_open: None,
        }
    }

    /// At most `max` sessions open at once: a new session closes the least recently
    /// active one (counted in `udp_evicted`) rather than being refused.
    pub fn with_max_sessions(mut self, max: Option<NonZeroUsize>) -> Self {
        self.max_open = max;
        self
    }

    /// Sessions in the table, closed ones not yet swept included.
    pub fn len(&self) -> usize {
        self.table.len()
    }

    pub fn is_empty(&self) -> bool {
        self.table.is_empty()
    }

    /// Delivers one datagram from `src` to `dst`, read at `now` (the driver's clock):
    /// to its session, or to a new session handed to the handler. A full session queue
    /// drops it (counted as `udp_dropped`).
    pub fn datagram(&mut self, now: std::time::Instant, src: SocketAddr, dst: SocketAddr, payload: &[u8]) {
        let now = Instant::from_std(now);
        Stats::inc(&self.stats.udp_rx);
        if let Some(shared) = self.table.touch(&(src, dst)) {
            let mut inbox = lock(&shared.inbox);
            if !inbox.closed {
                if inbox.datagrams.len() >= SESSION_QUEUE {
                    Stats::inc(&self.stats.udp_dropped);
                    return;
                }
                inbox.datagrams.push_back(payload.to_vec());
                if let Some(w) = inbox.waker.take() {
                    w.wake();
                }
                drop(inbox);
                shared.touch_at(now);
                return;
            }
        }
        if let Some(max) = self.max_open {
            // Taken from the least recently active end: closed sessions on the way are
            // only removed; the first open one is evicted.
            while self.open.load(Ordering::Relaxed) >= max.get() {
                let Some((_, oldest)) = self.table.pop_oldest() else { break };
                if !oldest.is_closed() {
                    oldest.close();
                    Stats::inc(&self.stats.udp_evicted);
                    tracing::debug!("udp session evicted (--max-sessions {max})");
                }
            }
        }
        let shared = Arc::new(SessionShared {
            inbox: Mutex::new(Inbox { datagrams: VecDeque::from([payload.to_vec()]), waker: None, closed: false }),
            epoch: now,
            last_ms: AtomicU64::new(0),
            open: self.open.clone(),
            stats: self.stats.clone(),
        });
        self.open.fetch_add(1, Ordering::Relaxed);
        Stats::inc(&self.stats.udp_sessions);
        Stats::inc(&self.stats.udp_active);
        self.table.insert((src, dst), shared.clone());
        if self.table.len() >= self.sweep_at {
            self.table.retain(|_, s| !s.is_closed());
            self.sweep_at = (2 * self.table.len()).max(64);
        }
        self.handler.handle_udp(UdpSession {
            endpoints: Endpoints::new(src, dst),
            shared,
            reply: self.sender.clone(),
            idle: DEFAULT_IDLE_TIMEOUT,
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Records every datagram sent to the client.
    #[derive(Default)]
    struct Capture(Mutex<Vec<(SocketAddr, SocketAddr, Vec<u8>)>>);

    impl UdpReturn for Capture {
        fn send(&self, from: SocketAddr, to: SocketAddr, payload: &[u8]) -> Result<(), UdpSendError> {
            lock(&self.0).push((from, to, payload.to_vec()));
            Ok(())
        }

        fn refused(&self, _: SocketAddr, _: SocketAddr) -> Result<(), UdpSendError> {
            Ok(())
        }
    }

    /// Keeps every session it is given.
    #[derive(Default)]
    struct Keep(Mutex<Vec<UdpSession>>);

    impl UdpHandler for Keep {
        fn handle_udp(&self, session: UdpSession) {
            lock(&self.0).push(session);
        }
    }

    /// The driver's clock: tokio's, paused in these tests.
    fn now() -> std::time::Instant {
        Instant::now().into_std()
    }

    fn addr(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    fn sessions() -> (UdpSessions, Arc<Keep>, Arc<Capture>, Arc<Stats>) {
        let keep = Arc::new(Keep::default());
        let capture = Arc::new(Capture::default());
        let stats = Arc::new(Stats::default());
        let sender = UdpSender::new(capture.clone(), stats.clone());
        (UdpSessions::new(keep.clone(), sender, stats.clone()), keep, capture, stats)
    }

    #[tokio::test(start_paused = true)]
    async fn one_session_per_tuple_in_order_and_replies_from_the_destination() {
        let (mut table, keep, capture, _) = sessions();
        let (a, b, dst) = (addr("10.0.0.1:1000"), addr("10.0.0.1:1001"), addr("10.9.0.1:53"));
        table.datagram(now(), a, dst, b"one");
        table.datagram(now(), b, dst, b"other");
        table.datagram(now(), a, dst, b"two");
        let mut got = std::mem::take(&mut *lock(&keep.0));
        assert_eq!(got.len(), 2, "two 4-tuples, two sessions");
        let first = &mut got[0];
        assert_eq!((first.src(), first.dst(), first.target()), (a, dst, &Target::Addr(dst)));
        assert_eq!(first.recv().await.unwrap(), b"one");
        assert_eq!(first.recv().await.unwrap(), b"two");
        assert_eq!(got[1].recv().await.unwrap(), b"other");
        got[0].send(b"reply").unwrap();
        got[0].send_from(addr("10.9.0.7:99"), b"cone").unwrap();
        assert_eq!(*lock(&capture.0), vec![(dst, a, b"reply".to_vec()), (addr("10.9.0.7:99"), a, b"cone".to_vec())]);
    }

    #[tokio::test(start_paused = true)]
    async fn an_idle_session_closes_and_the_next_datagram_opens_another() {
        let (mut table, keep, _, _) = sessions();
        let (a, dst) = (addr("[fd00::1]:1000"), addr("[fd00::9]:53"));
        table.datagram(now(), a, dst, b"q1");
        let mut s = lock(&keep.0).pop().unwrap();
        s.set_idle_timeout(Duration::from_secs(5));
        assert_eq!(s.recv().await.unwrap(), b"q1");
        tokio::time::sleep(Duration::from_secs(3)).await;
        s.send(b"r1").unwrap();
        // 3 s + 5 s after the reply: the reply kept it alive past the first 5 s.
        let start = Instant::now();
        assert_eq!(s.recv().await, None);
        assert_eq!(start.elapsed(), Duration::from_secs(5));
        table.datagram(now(), a, dst, b"q2");
        let mut again = lock(&keep.0).pop().expect("a new session for the next datagram");
        assert_eq!(again.recv().await.unwrap(), b"q2");
    }

    #[tokio::test(start_paused = true)]
    async fn an_idle_timeout_too_long_to_add_never_expires() {
        let (mut table, keep, _, _) = sessions();
        let (a, dst) = (addr("10.0.0.1:7"), addr("10.9.0.1:7"));
        table.datagram(now(), a, dst, b"first");
        let mut s = lock(&keep.0).pop().unwrap();
        s.set_idle_timeout(Duration::MAX);
        assert_eq!(s.recv().await.unwrap(), b"first");
        tokio::time::sleep(Duration::from_secs(86_400)).await;
        table.datagram(now(), a, dst, b"a day later");
        assert_eq!(s.recv().await.unwrap(), b"a day later", "the same session");
    }

    #[tokio::test]
    async fn a_full_queue_drops_and_counts_and_closed_sessions_are_swept() {
        let (mut table, keep, _, stats) = sessions();
        let dst = addr("10.9.0.1:9");
        for i in 0..SESSION_QUEUE + 10 {
            table.datagram(now(), addr("10.0.0.1:1"), dst, &i.to_le_bytes());
        }
        assert_eq!(stats.snapshot().udp_dropped, 10);
        lock(&keep.0).clear();
        for port in 2..1000u16 {
            table.datagram(now(), SocketAddr::new(addr("10.0.0.1:1").ip(), port), dst, b"x");
            lock(&keep.0).clear();
        }
        assert!(table.len() < 200, "closed sessions linger: {}", table.len());
    }
}
