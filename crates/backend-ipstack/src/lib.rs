//! A tungate backend on the [`ipstack`] crate (1.0), the simple stream stack many
//! tun2proxy-style tools use, made correct and bounded at our layer.
//!
//! # How a packet travels
//!
//! ```text
//! TUN ─▶ Admission (tungate-core): UDP → UdpSession; new SYN held until the handler
//!          │ decides; RST for strangers; client data past the unread cap dropped
//!          ▼ Forward
//!        Pipe (bounded channel, pooled buffers) ─▶ ipstack's own tasks ─▶ Pipe ─▶ TUN
//!                                                  │ accept()
//!                                                  ▼
//!                         Admission::take_port → bridge(ipstack stream, FlowPort) → handler
//! ```
//!
//! # What it supports
//!
//! IPv4 and IPv6; refusal as RST to the SYN, half-close both ways (client first through
//! the FIN hold below), `peek`, `abort` as RST, UDP sessions (tungate's own path) — with
//! the work-arounds below; recovery from loss (client data reaches it in order only, see
//! [`quirks`]). No TUN offload, no window scaling.
//!
//! # What ipstack cannot do, and what we do about it
//!
//! The work-arounds that act on packets live in [`quirks`] (core's stream admission calls
//! them for every flow); the ones on the stream are in this file.
//!
//! * **Reassembly that stalls on overlap**: a retransmission cut at other boundaries than a
//!   segment ipstack holds out of order stopped its reassembly for good (lossy uploads
//!   stalled; so did, now and then, a clean upload after the unread cap below dropped a
//!   segment). Client data reaches ipstack in order only ([`quirks`]).
//! * **No receive back-pressure**: ipstack ACKs and buffers (unbounded) whatever arrives
//!   in order, read or not. A client segment that would leave more than
//!   [`IpstackConfig::unread_limit`] bytes unread inside ipstack is dropped; the client
//!   retransmits it once the handler caught up. Memory per flow: that limit + the flow's
//!   256 KiB ring ([`quirks`]).
//! * **The end before the data**: `poll_read` reports the end as soon as the client's FIN
//!   arrived, before the data still queued for the reader, so an upload closed faster
//!   than the handler read lost its tail (64 MiB uploads through dante: 3 and then 5 of 6
//!   lost bytes; 3 MB to a slow reader in memory: 2–12 % lost). The client's FIN is held
//!   until the handler has every byte before it ([`quirks`]).
//! * **FIN with data**: ipstack drops the payload of a segment that carries FIN; such a
//!   segment goes to it as two, the data then a bare FIN ([`quirks`]).
//! * **Retransmission only on arrival**: ipstack checks its 1 s retransmission timers
//!   only when a packet for the flow arrives; a download whose last segment the client
//!   never got (trimmed at its window's edge) stalled for good, in 2 of 17 suite runs. A
//!   quiet flow's last ACK goes to ipstack again after 1.1 s, then backing off ([`quirks`]).
//! * **No refusal**: ipstack answers every SYN. Admission holds SYNs until the handler
//!   decides and answers refusals with RST itself (core, for every stream stack).
//! * **No RST on abort**: ipstack has no abort. When the handler aborts, admission sends
//!   the client a RST at its last ACK and replaces whatever ipstack still sends for the
//!   flow with RST (core, `Admission::pass_output`).
//! * **`Drop` panics on a current-thread runtime** (it calls `block_in_place`, then
//!   blocks until the stream's task ends): streams are dropped on a reaper thread of
//!   their own instead ([`StreamStack::dispose`]).
//! * **RST does not wake a stream**: admission ends the bridge itself when the client's
//!   RST passes by.
//! * **UDP**: ipstack's per-flow UDP streams can only answer from the original
//!   destination; UDP never reaches ipstack here — it takes tungate's own path (any
//!   source, same as every backend).
//! * **Writes before the SYN-ACK are lost**: ipstack hands out a stream before the
//!   stream's task has sent the SYN-ACK. A write in between goes out at sequence number
//!   ISN, and the SYN-ACK then follows at ISN + the bytes written: the client never gets
//!   those bytes (a server's greeting vanished under load). Writes and shutdown wait
//!   until the flow's SYN-ACK has passed through our pipe (`Gates`).
//! * **A connection's end never wakes its reader**: when ipstack's connection task ends
//!   (the client's last ACK, or its linger), nothing wakes a pending `poll_read` (the
//!   stream keeps its own data sender, so the channel never closes either) until the
//!   stream's idle timeout, 10 minutes here. A bridge waiting for the client's EOF held
//!   its relay and upstream socket that long: 300 closed connections left 300 relays
//!   open, and a churn of 20 000 ran out of file descriptors. Once the pipe has seen
//!   ipstack send the flow's FIN, a pending read is polled again on a timer (10 ms,
//!   doubling to 1 s) until it reports the end.
//! * **TIME-WAIT ignores a new SYN**: a client whose kernel reused the port of a
//!   connection ipstack closed first waited 1 s per retry; ipstack's TIME-WAIT is 50 ms
//!   here (`TIME_WAIT`).
//!
//! Tuning: MSS = MTU − 60, at most 8192 (one value for IPv4 and IPv6: ipstack takes a
//! single MSS option; larger segments stall its reassembly, see `ipstack_mss`), the largest window ipstack can advertise (65535: it has no window scaling),
//! 256 KiB unacknowledged bytes towards the client (its default of 16 KiB caps a flow
//! at a few hundred Mbit/s), idle timeout 10 min (same as the direct upstream's relays).

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker, ready};
use std::time::{Duration, Instant};

use ipstack::{IpStack, IpStackConfig, IpStackStream, IpStackTcpStream, TcpConfig, TcpOptions};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::mpsc;
use tokio_util::sync::PollSender;
use tungate_core::admission::{Admission, FlowKey, give_back_growth};
use tungate_core::packet::{self, Classified};
use tungate_core::stream_stack::{StreamEngine, StreamStack};
use tungate_core::{Backend, BackendError, DeviceInfo, Dispatch, Mtu, PacketBuf, PacketPool, Start};

pub mod quirks;

use quirks::IpstackQuirks;

/// Tuning of the ipstack backend. Every default is documented with its reason.
#[derive(Debug, Clone)]
pub struct IpstackConfig {
    /// The TUN MTU; ipstack's read buffer and the MSS option follow it.
    pub mtu: Mtu,
    /// Capacity of each direction's ring between the stack and the handler.
    pub ring_capacity: usize,
    /// Client bytes ipstack may hold unread per flow before further segments are dropped
    /// at our layer (see the crate docs). 1 MiB keeps a fast flow's pipeline full.
    pub unread_limit: u64,
    /// Bytes ipstack may have in flight towards the client.
    pub max_unacked_bytes: u32,
    /// ipstack resets a connection with no reads or writes for this long.
    pub idle_timeout: Duration,
    /// Packets queued from the TUN into ipstack before the TUN is no longer read.
    pub input_depth: usize,
}

impl Default for IpstackConfig {
    fn default() -> Self {
        IpstackConfig {
            mtu: Mtu::DEFAULT,
            ring_capacity: tungate_core::flow::DEFAULT_RING_CAPACITY,
            unread_limit: 1 << 20,
            max_unacked_bytes: 256 * 1024,
            idle_timeout: Duration::from_secs(600),
            input_depth: 256,
        }
    }
}

/// The ipstack backend.
#[derive(Debug, Clone, Default)]
pub struct Ipstack {
    pub config: IpstackConfig,
}

impl Ipstack {
    pub fn new(config: IpstackConfig) -> Self {
        Ipstack { config }
    }
}

/// The engine the driver runs: ipstack behind its admission layer.
pub type IpstackEngine = StreamEngine<IpstackStack, IpstackQuirks>;

impl Backend for Ipstack {
    const NAME: &'static str = "ipstack";

    type Engine = IpstackEngine;

    /// ipstack draws its own randomness and runs its own timers on tokio's clock.
    fn engine(self, device: DeviceInfo, handlers: Dispatch, _: Start) -> Result<Self::Engine, BackendError> {
        let mut config = self.config;
        config.mtu = device.mtu;
        let mtu = u16::try_from(config.mtu.get()).unwrap_or(u16::MAX);
        let quirks = IpstackQuirks { unread_limit: config.unread_limit };
        let admission =
            Admission::with_quirks(handlers, config.mtu, config.ring_capacity, Duration::from_secs(25), quirks);
        let stack = IpstackStack::start(&config, mtu);
        Ok(StreamEngine::new(stack, admission, device.max_packet_len))
    }
}

/// The MSS ipstack advertises: MTU − 60 (one value for IPv4 and IPv6), but at most 8192.
///
/// ipstack moves at most 8192 bytes per pass from a segment to its reader and ACKs only
/// those; the kernel then retransmits the rest with new boundaries, the pieces overlap in
/// ipstack's reassembly, and the transfer stalls for good. Uploads at MTU 9000 (MSS 8940)
/// moved no data at all in `make bench` until the MSS was capped (seen with tcpdump:
/// ACKs advancing by 8192 per 8940-byte segment, then the stall).
fn ipstack_mss(mtu: u16) -> u16 {
    mtu.saturating_sub(60).min(8192)
}

/// ipstack as a [`StreamStack`], behind two packet channels.
pub struct IpstackStack {
    to_stack: PollSender<PacketBuf>,
    from_stack: mpsc::UnboundedReceiver<PacketBuf>,
    accepted: mpsc::UnboundedReceiver<IpStackTcpStream>,
    gates: Gates,
    accept_task: tokio::task::JoinHandle<()>,
    /// What it was started with, to start afresh ([`StreamStack::release_idle`]).
    config: IpstackConfig,
    mtu: u16,
}

impl Drop for IpstackStack {
    fn drop(&mut self) {
        self.accept_task.abort();
    }
}

impl IpstackStack {
    fn start(config: &IpstackConfig, mtu: u16) -> Self {
        let gates = Gates::default();
        let (to_stack, stack_rx) = mpsc::channel(config.input_depth);
        let (stack_tx, from_stack) = mpsc::unbounded_channel();
        let pool = PacketPool::new(usize::from(mtu), POOL_MAX);
        let pipe = Pipe { rx: stack_rx, tx: stack_tx, pool, gates: gates.clone() };
        let mut tcp = TcpConfig::default();
        tcp.max_unacked_bytes = config.max_unacked_bytes;
        tcp.read_buffer_size = usize::from(u16::MAX);
        tcp.timeout = config.idle_timeout;
        // ipstack ignores a SYN on a 4-tuple it holds in TIME-WAIT (2 s by default): a
        // client whose kernel reused the port waited a second per retry (5 000 exchanges in
        // which the server closes first: 50 took 1 s). Segments here never cross a network,
        // so no old duplicate can be delayed long enough to need it; a retransmitted FIN
        // after it gets a RST from admission.
        tcp.two_msl = TIME_WAIT;
        // ipstack drops a segment from its send queue after this many retransmissions
        // (data loss, default 3); 12 rides out seconds of loss like other stacks' limits.
        tcp.max_retransmit_count = 12;
        tcp.options = Some(vec![TcpOptions::MaximumSegmentSize(ipstack_mss(mtu))]);
        let mut ip = IpStackConfig::default();
        ip.mtu_unchecked(mtu).with_tcp_config(tcp);
        let mut stack = IpStack::new(ip, pipe);
        let (accepted_tx, accepted) = mpsc::unbounded_channel();
        let accept_task = tokio::spawn(async move {
            loop {
                match stack.accept().await {
                    Ok(IpStackStream::Tcp(stream)) => {
                        if accepted_tx.send(stream).is_err() {
                            break;
                        }
                    }
                    // Only TCP is forwarded to ipstack.
                    Ok(other) => tracing::debug!("ipstack produced a non-TCP stream: {:?}", other.peer_addr()),
                    Err(e) => {
                        tracing::error!("ipstack stopped: {e}");
                        break;
                    }
                }
            }
            // `IpStack`'s own drop only aborts its task (no blocking).
            drop(stack);
        });
        IpstackStack {
            to_stack: PollSender::new(to_stack),
            from_stack,
            accepted,
            gates,
            accept_task,
            config: config.clone(),
            mtu,
        }
    }
}

/// An ipstack stream that writes only after its SYN-ACK went out (see the crate docs),
/// and whose `shutdown` is retried on a timer: ipstack sends FIN only if nothing is in
/// flight at the moment `poll_shutdown` is called, and otherwise parks a waker that
/// nothing wakes when the ACKs arrive, so the FIN would never be sent.
pub struct Stream {
    inner: IpStackTcpStream,
    retry: Option<Pin<Box<tokio::time::Sleep>>>,
    /// Pending reads after ipstack's FIN: the timer and its current gap.
    read_retry: Option<(Pin<Box<tokio::time::Sleep>>, Duration)>,
    gate: Arc<Gate>,
    key: FlowKey,
    gates: Gates,
}

/// How long ipstack keeps a connection it closed first in TIME-WAIT (see `start`).
const TIME_WAIT: Duration = Duration::from_millis(50);

/// How often a pending ipstack shutdown is polled again.
const SHUTDOWN_RETRY: Duration = Duration::from_millis(5);
/// A read pending after ipstack sent its FIN is polled again after this long, then
/// after twice as long each time, up to [`READ_RETRY_LAST`]: the end usually follows
/// within a round trip (the client's last ACK), and a flow still open costs little.
const READ_RETRY_FIRST: Duration = Duration::from_millis(10);
const READ_RETRY_LAST: Duration = Duration::from_secs(1);

impl AsyncRead for Stream {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        loop {
            if let Poll::Ready(r) = Pin::new(&mut self.inner).poll_read(cx, buf) {
                self.read_retry = None;
                return Poll::Ready(r);
            }
            // ipstack never wakes a reader when its connection ends (see the crate
            // docs): once it has answered the client's FIN with its own, look again on
            // a backing-off timer.
            if !self.gate.poll_fin(cx) {
                return Poll::Pending;
            }
            let (retry, gap) = self
                .read_retry
                .get_or_insert_with(|| (Box::pin(tokio::time::sleep(READ_RETRY_FIRST)), READ_RETRY_FIRST));
            if retry.as_mut().poll(cx).is_pending() {
                return Poll::Pending;
            }
            *gap = (*gap * 2).min(READ_RETRY_LAST);
            let next = tokio::time::Instant::now() + *gap;
            retry.as_mut().reset(next);
        }
    }
}

impl AsyncWrite for Stream {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, data: &[u8]) -> Poll<io::Result<usize>> {
        ready!(self.gate.poll_open(cx));
        Pin::new(&mut self.inner).poll_write(cx, data)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.gate.ours.store(true, Ordering::Release);
        ready!(self.gate.poll_open(cx));
        loop {
            if let Poll::Ready(r) = Pin::new(&mut self.inner).poll_shutdown(cx) {
                return Poll::Ready(r);
            }
            let retry = self.retry.get_or_insert_with(|| Box::pin(tokio::time::sleep(SHUTDOWN_RETRY)));
            if retry.as_mut().poll(cx).is_pending() {
                return Poll::Pending;
            }
            retry.as_mut().reset(tokio::time::Instant::now() + SHUTDOWN_RETRY);
        }
    }
}

impl std::fmt::Debug for IpstackStack {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IpstackStack").field("mtu", &self.mtu).finish_non_exhaustive()
    }
}

impl std::fmt::Debug for Stream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Stream").finish_non_exhaustive()
    }
}

impl StreamStack for IpstackStack {
    type Stream = Stream;

    fn poll_input_ready(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.to_stack.poll_reserve(cx).map_err(|_| io::Error::other("ipstack stopped reading"))
    }

    fn input(&mut self, packet: PacketBuf) -> io::Result<()> {
        self.to_stack.send_item(packet).map_err(|_| io::Error::other("ipstack stopped reading"))
    }

    fn poll_output(&mut self, cx: &mut Context<'_>) -> Poll<Option<PacketBuf>> {
        self.from_stack.poll_recv(cx)
    }

    fn poll_accept(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<(Stream, SocketAddr, SocketAddr)>> {
        match self.accepted.poll_recv(cx) {
            // ipstack's local address is the client's, its peer the original destination.
            Poll::Ready(Some(inner)) => {
                let (client, dst) = (inner.local_addr(), inner.peer_addr());
                let key = (client, dst);
                let gate = self.gates.take(key);
                let stream = Stream { inner, retry: None, read_retry: None, gate, key, gates: self.gates.clone() };
                Poll::Ready(Ok((stream, client, dst)))
            }
            Poll::Ready(None) => Poll::Ready(Err(io::Error::other("ipstack stopped accepting"))),
            Poll::Pending => Poll::Pending,
        }
    }

    /// ipstack's session map keeps its capacity: a fresh instance gives it back. Streams
    /// of the old one still being reaped end with its task.
    fn release_idle(&mut self) -> io::Result<bool> {
        *self = IpstackStack::start(&self.config, self.mtu);
        Ok(true)
    }

    fn dispose(stream: Stream) {
        stream.gates.forget(stream.key, &stream.gate);
        reap(stream.inner);
    }
}

/// Drops ipstack streams on a thread of their own.
///
/// ipstack's `Drop` calls `block_in_place` and then blocks until the stream's task ends:
/// that panics on a current-thread runtime (tungate's default), would stall a worker of a
/// multi-threaded one, and on tokio's blocking pool it holds up runtime shutdown (the
/// pool is waited for). One reaper thread, outside every runtime's worker set, does it.
fn reap(stream: IpStackTcpStream) {
    static REAPER: std::sync::OnceLock<Option<std::sync::mpsc::Sender<IpStackTcpStream>>> = std::sync::OnceLock::new();
    let reaper = REAPER.get_or_init(|| {
        let (tx, rx) = std::sync::mpsc::channel::<IpStackTcpStream>();
        let runtime = tokio::runtime::Builder::new_current_thread().build().ok()?;
        std::thread::Builder::new()
            .name("ipstack-reaper".into())
            .spawn(move || {
                // Entered, so ipstack's `Handle::current()` finds a handle; its
                // `block_on`s wait for tasks of the gateway's runtime, which wake them.
                let _entered = runtime.enter();
                for stream in rx {
                    drop(stream);
                }
            })
            .ok()?;
        Some(tx)
    });
    match reaper {
        Some(tx) => {
            if let Err(std::sync::mpsc::SendError(stream)) = tx.send(stream) {
                std::mem::forget(stream);
            }
        }
        // No thread could be started: leaking is better than panicking in ipstack's Drop.
        None => std::mem::forget(stream),
    }
}

/// Whether ipstack has sent a flow's SYN-ACK (see the crate docs): opened by the pipe,
/// awaited by the flow's [`Stream`] before it writes or shuts down.
#[derive(Debug, Default)]
struct Gate {
    open: AtomicBool,
    waker: Mutex<Option<Waker>>,
    /// ipstack has sent the flow's FIN in answer to the client's (not after our own
    /// shutdown); a reader waiting for that.
    fin: AtomicBool,
    reader: Mutex<Option<Waker>>,
    /// Our side asked ipstack to shut down.
    ours: AtomicBool,
}

impl Gate {
    fn open(&self) {
        self.open.store(true, Ordering::Release);
        if let Some(waker) = self.waker.lock().unwrap_or_else(|p| p.into_inner()).take() {
            waker.wake();
        }
    }

    fn is_open(&self) -> bool {
        self.open.load(Ordering::Acquire)
    }

    fn poll_open(&self, cx: &mut Context<'_>) -> Poll<()> {
        if self.is_open() {
            return Poll::Ready(());
        }
        *self.waker.lock().unwrap_or_else(|p| p.into_inner()) = Some(cx.waker().clone());
        // Checked again: the pipe may have opened it between the check and the store.
        if self.is_open() { Poll::Ready(()) } else { Poll::Pending }
    }

    fn fin_sent(&self) {
        // After our own shutdown, ipstack's FIN is ours: the end of such a flow was
        // always noticed (the pending shutdown is polled on its own timer), and reading
        // eagerly there lost the client's last bytes (ipstack reports the end before
        // the data it still holds once the connection is closed).
        if self.ours.load(Ordering::Acquire) {
            return;
        }
        self.fin.store(true, Ordering::Release);
        if let Some(waker) = self.reader.lock().unwrap_or_else(|p| p.into_inner()).take() {
            waker.wake();
        }
    }

    /// Whether ipstack has sent the flow's FIN in answer to the client's; if not, `cx` is
    /// woken when it does.
    fn poll_fin(&self, cx: &mut Context<'_>) -> bool {
        if self.fin.load(Ordering::Acquire) {
            return true;
        }
        *self.reader.lock().unwrap_or_else(|p| p.into_inner()) = Some(cx.waker().clone());
        self.fin.load(Ordering::Acquire)
    }
}

/// The flows' gates, shared by the pipe (SYN-ACKs and FINs, on ipstack's tasks) and the
/// driver (accepted streams).
#[derive(Debug, Clone, Default)]
struct Gates(Arc<Mutex<GateTables>>);

#[derive(Debug, Default)]
struct GateTables {
    /// Flows whose SYN-ACK and accepted stream have not both been seen yet. Either may
    /// come first; an entry goes once both have (or the stream is disposed of).
    pending: HashMap<FlowKey, GateEntry>,
    /// Gates of the streams handed out and not yet disposed of, for their FIN.
    live: HashMap<FlowKey, Arc<Gate>>,
}

#[derive(Debug)]
struct GateEntry {
    gate: Arc<Gate>,
    /// A stream holds this gate.
    taken: bool,
    since: Instant,
}

/// Untaken entries (a SYN-ACK whose stream never came, e.g. a retransmitted SYN-ACK for a
/// flow already set up) are dropped after this long, checked when the table grows.
const GATE_TTL: Duration = Duration::from_secs(60);

impl Gates {
    fn lock(&self) -> std::sync::MutexGuard<'_, GateTables> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn entry(table: &mut HashMap<FlowKey, GateEntry>, key: FlowKey) -> &mut GateEntry {
        // Swept at every 256th entry, not on every insert: a burst of thousands of new
        // flows must not scan the table per flow.
        if table.len() >= 256 && table.len() % 256 == 0 && !table.contains_key(&key) {
            table.retain(|_, e| e.taken || e.since.elapsed() < GATE_TTL);
        }
        table.entry(key).or_insert_with(|| GateEntry { gate: Arc::default(), taken: false, since: Instant::now() })
    }

    /// The SYN-ACK for `key` (client, original destination) went out.
    fn syn_ack(&self, key: FlowKey) {
        let table = &mut self.lock().pending;
        let entry = Self::entry(table, key);
        entry.gate.open();
        if entry.taken {
            table.remove(&key);
            give_back_growth(table);
        }
    }

    /// ipstack sent `key`'s FIN.
    fn fin(&self, key: FlowKey) {
        if let Some(gate) = self.lock().live.get(&key) {
            gate.fin_sent();
        }
    }

    /// The stream for `key` was accepted: its gate.
    fn take(&self, key: FlowKey) -> Arc<Gate> {
        let mut tables = self.lock();
        let entry = Self::entry(&mut tables.pending, key);
        entry.taken = true;
        let gate = entry.gate.clone();
        if gate.is_open() {
            tables.pending.remove(&key);
            give_back_growth(&mut tables.pending);
        }
        tables.live.insert(key, gate.clone());
        gate
    }

    /// A stream is gone: its gate goes too.
    fn forget(&self, key: FlowKey, gate: &Arc<Gate>) {
        let mut tables = self.lock();
        if tables.pending.get(&key).is_some_and(|e| Arc::ptr_eq(&e.gate, gate)) {
            tables.pending.remove(&key);
            give_back_growth(&mut tables.pending);
        }
        if tables.live.get(&key).is_some_and(|g| Arc::ptr_eq(g, gate)) {
            tables.live.remove(&key);
            give_back_growth(&mut tables.live);
        }
    }
}

/// The flow (client, original destination) of a segment ipstack sends, if `p` is one
/// with every flag of `flags` set. Runs on every output packet: the flags byte is looked
/// at before anything is parsed.
fn flow_with_flags(p: &[u8], flags: u8) -> Option<FlowKey> {
    let layout = packet::Layout::tcp(p)?;
    if layout.tcp_flags(p)? & flags != flags {
        return None;
    }
    match packet::classify(p) {
        Ok(Classified::Tcp(seg)) => Some((seg.dst, seg.src)),
        _ => None,
    }
}

/// TCP flag bits (byte 13 of the header).
const FIN: u8 = 0x01;
const SYN_ACK: u8 = 0x12;

/// Buffers the pool of ipstack's output keeps: two TUN batches' worth. A burst beyond it
/// allocates fresh buffers and frees them after (1 024 kept 1.5 MiB at MTU 1500 for good
/// after a burst).
const POOL_MAX: usize = 128;

/// The device ipstack sees: each read is one packet from the driver, each write one packet
/// to the TUN. Writes never block ipstack (its own output queue is unbounded anyway, and
/// the driver drains this one first).
struct Pipe {
    rx: mpsc::Receiver<PacketBuf>,
    tx: mpsc::UnboundedSender<PacketBuf>,
    pool: PacketPool,
    gates: Gates,
}

impl AsyncRead for Pipe {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        match self.rx.poll_recv(cx) {
            Poll::Ready(Some(packet)) => {
                // ipstack reads into an MTU-sized buffer; the admission layer only
                // forwards packets the TUN delivered, which fit.
                let n = packet.len().min(buf.remaining());
                buf.put_slice(&packet.packet()[..n]);
                Poll::Ready(Ok(()))
            }
            Poll::Ready(None) => Poll::Ready(Ok(())),
            Poll::Pending => Poll::Pending,
        }
    }
}

impl AsyncWrite for Pipe {
    fn poll_write(self: Pin<&mut Self>, _cx: &mut Context<'_>, data: &[u8]) -> Poll<io::Result<usize>> {
        // Opened before the SYN-ACK is queued: the stream's first write then follows it.
        if let Some(key) = flow_with_flags(data, SYN_ACK) {
            self.gates.syn_ack(key);
        }
        if let Some(key) = flow_with_flags(data, FIN) {
            self.gates.fin(key);
        }
        let mut buf = self.pool.take_fitting(data.len());
        buf.spare_mut()[..data.len()].copy_from_slice(data);
        buf.set_len(data.len());
        match self.tx.send(buf) {
            Ok(()) => Poll::Ready(Ok(data.len())),
            Err(_) => Poll::Ready(Err(io::Error::from(io::ErrorKind::BrokenPipe))),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The gate tables give back what a burst grew them to once its streams are gone (they
    /// held 8 000 flows' worth of entries for good, about a MiB each at that size).
    #[test]
    fn gates_give_back_a_bursts_growth() {
        let gates = Gates::default();
        let dst: std::net::SocketAddr = "10.77.0.2:80".parse().expect("addr");
        let taken: Vec<(FlowKey, Arc<Gate>)> = (0..4000u16)
            .map(|port| {
                let key = (std::net::SocketAddr::new("10.0.0.1".parse().expect("addr"), 10_000 + port), dst);
                gates.syn_ack(key);
                (key, gates.take(key))
            })
            .collect();
        let grown = gates.lock().live.capacity();
        assert!(grown >= 4000, "{grown}");
        for (key, gate) in &taken {
            gates.forget(*key, gate);
        }
        let tables = gates.lock();
        assert!(tables.live.is_empty() && tables.pending.is_empty());
        assert!(tables.live.capacity() <= 1024, "kept {} of {grown}", tables.live.capacity());
    }
}
