//! A tungate backend on the [`netstack_smoltcp`] crate (0.2), the convenient wrapper
//! around smoltcp that several proxies use, for comparison with backend-smoltcp.
//!
//! # How a packet travels
//!
//! ```text
//! TUN ─▶ Admission (tungate-core): UDP → UdpSession; new SYN held until the handler
//!          │ decides; RST for strangers
//!          ▼ Forward (one Vec per packet: the crate's Sink takes ownership)
//!        netstack Stack (Sink) ─▶ Runner task (smoltcp 0.12 Interface, every socket)
//!        netstack Stack (Stream) ─▶ TUN          TcpListener ─▶ Admission::take_port
//!                                                → bridge(netstack stream, FlowPort)
//! ```
//!
//! # What it supports
//!
//! IPv4 and IPv6; every contract of `tungate-api` (refusal as RST to the SYN, half-close
//! both ways, `peek`, `abort` as RST, UDP sessions on tungate's own path) — with the
//! measures below. Not: TUN offload; connections survive a runner panic (they are reset
//! when the stack is rebuilt).
//!
//! # Risks, and what we do about them
//!
//! * **smoltcp 0.12's sequence-number panic** ("attempt to subtract sequence numbers with
//!   underflow", smoltcp #1048; smoltcp 0.13 rejects bytes outside its receive window,
//!   #1079): netstack-smoltcp pins smoltcp 0.12, which accepts client data past the
//!   window edge it advertised. Its advertised window is rounded down to a multiple of
//!   its scale unit, so with the reader stopped an ACK can move the edge back by up to
//!   `2^shift − 1` bytes; a client that already had data in flight up to the old edge
//!   then makes the next window computation panic (an explicit `panic!`, also in release
//!   builds) inside the crate's `Runner`, which processes every connection. Seen in CI
//!   as a 64 MiB upload through microsocks reset mid-way. Admission prevents it
//!   ([`quirks`]): it tracks each flow's furthest advertised edge from
//!   the crate's output and trims client data at that edge less `2^shift − 1` (the
//!   client resends the rest). `tests/conformance.rs` drives a client into the exact
//!   sequence; without the trim, or with the trim at the edge itself, the stack panics.
//! * **Any other runner death**: the runner runs as its own task, and when it ends for
//!   any reason (a panic included) the stack is rebuilt: the connections it held are
//!   reset, the process and every other part of the gateway keep running, and new
//!   connections work at once. The rebuild is logged and counted.
//! * **No refusal and duplicate streams**: the crate answers every SYN and makes a second
//!   stream for a retransmitted SYN. Admission holds SYNs until the handler decides
//!   (refusals get RST from tungate), and a stream nobody asked for is dropped.
//! * **A repeated SYN took another client's connection**: the crate's socket for a
//!   repeated SYN listens on the destination, so until it was closed with its unwanted
//!   stream it accepted the next SYN to that destination from *any* client, whose own
//!   socket then listened forever (the connection hung). Seen as failures at the end of
//!   bursts of 5 000 connections whose handshakes took over a second. Admission drops a
//!   SYN repeated after the first went to the crate ([`quirks`];
//!   smoltcp retransmits its SYN-ACK itself); `repeated_syn_before_another_client` in the
//!   conformance suite failed in every run without it.
//! * **No RST**: the crate cannot reset a connection (dropping its stream sends FIN).
//!   When the handler aborts, admission sends the client a RST at its last ACK and
//!   replaces the crate's FIN with RST (`Admission::pass_output`).
//! * **UDP** never reaches the crate (it would end its UDP stream on one malformed
//!   packet): tungate's own UDP path serves it, as in every backend.
//! * **Memory**: each connection holds two smoltcp buffers and two rings of
//!   [`NetstackConfig::tcp_buffer`] bytes each (the crate allocates them at SYN time).
//!   Received data is bounded per flow by those buffers: the window closes when the
//!   handler stops reading. The crate's socket set never shrinks (a slot per connection
//!   it held at once), so the stack is rebuilt once idle after a large burst
//!   ([`StreamStack::release_idle`]).

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use futures::{Sink, Stream};
use netstack_smoltcp::{StackBuilder, TcpListener, TcpStream};
use tungate_core::admission::Admission;
use tungate_core::stream_stack::{StreamEngine, StreamStack};
use tungate_core::{Backend, BackendError, DeviceInfo, Dispatch, Mtu, PacketBuf, Start};

pub mod quirks;

use quirks::NetstackQuirks;

/// Tuning of the netstack-smoltcp backend.
#[derive(Debug, Clone)]
pub struct NetstackConfig {
    /// The TUN MTU; smoltcp derives its MSS from it.
    pub mtu: Mtu,
    /// Capacity of each direction's ring between the stack and the handler.
    pub ring_capacity: usize,
    /// smoltcp's per-connection receive and send buffers (window scaling above 64 KiB).
    /// 512 KiB, as backend-smoltcp: the crate's 320 KiB default is close, and the same
    /// value keeps the comparison about the code, not the tuning.
    pub tcp_buffer: u32,
    /// Packets queued between the TUN and the crate in each direction.
    pub channel_depth: usize,
}

impl Default for NetstackConfig {
    fn default() -> Self {
        NetstackConfig {
            mtu: Mtu::DEFAULT,
            ring_capacity: tungate_core::flow::DEFAULT_RING_CAPACITY,
            tcp_buffer: 512 * 1024,
            channel_depth: 1024,
        }
    }
}

/// The netstack-smoltcp backend.
#[derive(Debug, Clone, Default)]
pub struct NetstackSmoltcp {
    pub config: NetstackConfig,
    /// Times the stack was rebuilt after its runner ended (see the crate docs).
    pub restarts: Arc<AtomicU64>,
}

impl NetstackSmoltcp {
    pub fn new(config: NetstackConfig) -> Self {
        NetstackSmoltcp { config, restarts: Arc::default() }
    }
}

impl Backend for NetstackSmoltcp {
    const NAME: &'static str = "netstack-smoltcp";
    type Engine = NetstackEngine;

    /// The crate seeds itself and reads the wall clock itself.
    fn engine(self, device: DeviceInfo, handlers: Dispatch, _: Start) -> Result<NetstackEngine, BackendError> {
        engine(self.config, self.restarts, None, device, handlers)
    }
}

/// The engine the driver runs: netstack-smoltcp behind its admission layer.
pub type NetstackEngine = StreamEngine<NetstackStack, NetstackQuirks>;

/// The backend behind its admission layer, with a runner hook for tests.
fn engine(
    mut config: NetstackConfig,
    restarts: Arc<AtomicU64>,
    hook: Option<RunnerHook>,
    device: DeviceInfo,
    handlers: Dispatch,
) -> Result<NetstackEngine, BackendError> {
    config.mtu = device.mtu;
    let admission = Admission::with_quirks(
        handlers,
        config.mtu,
        config.ring_capacity,
        Duration::from_secs(25),
        NetstackQuirks::default(),
    );
    let stack = NetstackStack::start(config, restarts, hook)?;
    Ok(StreamEngine::new(stack, admission, device.max_packet_len))
}

type RunnerFuture = Pin<Box<dyn Future<Output = io::Result<()>> + Send>>;

/// A factory for the runner future, so tests can stand in a runner that panics.
pub type RunnerHook = Arc<dyn Fn(RunnerFuture) -> RunnerFuture + Send + Sync>;

/// One netstack-smoltcp instance and the task that runs it.
struct Instance {
    stack: netstack_smoltcp::Stack,
    listener: TcpListener,
    runner: tokio::task::JoinHandle<io::Result<()>>,
}

impl Drop for Instance {
    fn drop(&mut self) {
        self.runner.abort();
    }
}

/// netstack-smoltcp as a [`StreamStack`], rebuilt when its runner ends.
pub struct NetstackStack {
    config: NetstackConfig,
    instance: Instance,
    restarts: Arc<AtomicU64>,
    hook: Option<RunnerHook>,
}

impl NetstackStack {
    fn start(config: NetstackConfig, restarts: Arc<AtomicU64>, hook: Option<RunnerHook>) -> io::Result<Self> {
        let instance = Self::instance(&config, hook.as_ref())?;
        Ok(NetstackStack { config, instance, restarts, hook })
    }

    fn instance(config: &NetstackConfig, hook: Option<&RunnerHook>) -> io::Result<Instance> {
        let (stack, runner, _udp, listener) = StackBuilder::default()
            .enable_tcp(true)
            .enable_udp(false)
            .enable_icmp(false)
            .mtu(config.mtu.get())
            .tcp_recv_buffer_size(config.tcp_buffer)
            .tcp_send_buffer_size(config.tcp_buffer)
            .stack_buffer_size(config.channel_depth)
            .tcp_buffer_size(config.channel_depth)
            .build()?;
        let (Some(runner), Some(listener)) = (runner, listener) else {
            return Err(io::Error::other("netstack-smoltcp built without TCP"));
        };
        let runner: RunnerFuture = Box::pin(runner);
        let runner = match hook {
            Some(hook) => hook(runner),
            None => runner,
        };
        Ok(Instance { stack, listener, runner: tokio::spawn(runner) })
    }

    /// Rebuilds the stack if its runner ended (a panic in smoltcp 0.12 included). The old
    /// instance's connections die with it; their bridges end and the handlers see resets.
    fn check_runner(&mut self, cx: &mut Context<'_>) -> io::Result<()> {
        let Poll::Ready(ended) = Pin::new(&mut self.instance.runner).poll(cx) else { return Ok(()) };
        match ended {
            Err(e) if e.is_panic() => {
                tracing::error!("netstack-smoltcp panicked; rebuilding the stack (its connections are reset)")
            }
            Err(e) => tracing::error!("netstack-smoltcp's runner stopped ({e}); rebuilding the stack"),
            Ok(r) => tracing::error!("netstack-smoltcp's runner returned {r:?}; rebuilding the stack"),
        }
        self.restarts.fetch_add(1, Ordering::Relaxed);
        self.instance = Self::instance(&self.config, self.hook.as_ref())?;
        // The new runner must be polled once to register this task's waker.
        let _ = Pin::new(&mut self.instance.runner).poll(cx);
        Ok(())
    }
}

/// The crate's stream, whose `shutdown` completes once the FIN is asked for.
///
/// The crate's own `poll_shutdown` completes only when its socket is closed, which for a
/// connection that closed first is after smoltcp's 10 s TIME-WAIT: the bridge, and so
/// the flow, stayed that long, and a client that reused the port in between (after about
/// 3 000 short connections the server closed first) had its new SYN taken for the old
/// flow's and answered by nothing (11 s). The crate sends the FIN once its send buffer is
/// drained, whether the stream is kept or dropped, so nothing is lost by not waiting.
pub struct NetstackStream {
    inner: TcpStream,
    shut: bool,
}

impl tokio::io::AsyncRead for NetstackStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl tokio::io::AsyncWrite for NetstackStream {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, data: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, data)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if !self.shut {
            self.shut = true;
            // Marks the write half closing and wakes the runner; `Pending` until the
            // socket closes, which is not waited for (see the type's docs).
            if let Poll::Ready(Err(e)) = Pin::new(&mut self.inner).poll_shutdown(cx) {
                return Poll::Ready(Err(e));
            }
        }
        Poll::Ready(Ok(()))
    }
}

impl std::fmt::Debug for NetstackStack {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NetstackStack").field("config", &self.config).finish_non_exhaustive()
    }
}

impl std::fmt::Debug for NetstackStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NetstackStream").finish_non_exhaustive()
    }
}

impl StreamStack for NetstackStack {
    type Stream = NetstackStream;

    fn poll_input_ready(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.check_runner(cx)?;
        Pin::new(&mut self.instance.stack).poll_ready(cx).map(runner_gone)
    }

    fn input(&mut self, packet: PacketBuf) -> io::Result<()> {
        // The crate rejects what it cannot parse as IP with an error; admission already
        // dropped malformed packets, so an error here is not worth stopping for.
        // `start_send` only stores the packet in the Sink's one-slot buffer: it reaches
        // the runner on the next `poll_ready` or `poll_flush`.
        if let Err(e) = Pin::new(&mut self.instance.stack).start_send(packet.packet().to_vec()) {
            tracing::debug!("netstack-smoltcp refused a packet: {e}");
        }
        Ok(())
    }

    fn poll_flush(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        // A rebuilt stack starts empty: what the old one buffered is gone with it, and
        // the client retransmits.
        self.check_runner(cx)?;
        Pin::new(&mut self.instance.stack).poll_flush(cx).map(runner_gone)
    }

    fn poll_output(&mut self, cx: &mut Context<'_>) -> Poll<Option<PacketBuf>> {
        if let Err(e) = self.check_runner(cx) {
            tracing::error!("netstack-smoltcp could not be rebuilt: {e}");
            return Poll::Ready(None);
        }
        match Pin::new(&mut self.instance.stack).poll_next(cx) {
            Poll::Ready(Some(Ok(packet))) => Poll::Ready(Some(PacketBuf::from_vec(packet))),
            Poll::Ready(Some(Err(e))) => {
                tracing::debug!("netstack-smoltcp output error: {e}");
                cx.waker().wake_by_ref();
                Poll::Pending
            }
            Poll::Ready(None) => Poll::Ready(None),
            Poll::Pending => Poll::Pending,
        }
    }

    /// The crate's smoltcp 0.12 socket set keeps a slot for every connection it held at
    /// once, and its socket map its capacity: a fresh instance gives both back.
    fn release_idle(&mut self) -> io::Result<bool> {
        self.instance = Self::instance(&self.config, self.hook.as_ref())?;
        Ok(true)
    }

    fn poll_accept(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<(NetstackStream, SocketAddr, SocketAddr)>> {
        self.check_runner(cx)?;
        match Pin::new(&mut self.instance.listener).poll_next(cx) {
            // The crate's "local" address is the client, "remote" the original destination.
            Poll::Ready(Some((inner, client, dst))) => {
                Poll::Ready(Ok((NetstackStream { inner, shut: false }, client, dst)))
            }
            Poll::Ready(None) => Poll::Ready(Err(io::Error::other("netstack-smoltcp stopped accepting"))),
            Poll::Pending => Poll::Pending,
        }
    }
}

/// The Sink fails only when its channel is closed, i.e. the runner's future was dropped:
/// on a multi-thread runtime that can be seen before the runner's `JoinHandle` completes.
/// Not a reason to stop the gateway: the packet is lost (its client retransmits), and
/// `check_runner` rebuilds the stack as soon as the handle completes (it wakes the driver).
fn runner_gone(r: io::Result<()>) -> io::Result<()> {
    if let Err(e) = r {
        tracing::debug!("netstack-smoltcp's input channel is closed ({e}); waiting for the rebuild");
    }
    Ok(())
}

#[doc(hidden)]
/// Test support: runs the backend with `hook` wrapping every runner it starts.
pub fn with_runner_hook(backend: NetstackSmoltcp, hook: RunnerHook) -> HookedNetstack {
    HookedNetstack { backend, hook }
}

#[doc(hidden)]
#[derive(Clone)]
pub struct HookedNetstack {
    backend: NetstackSmoltcp,
    hook: RunnerHook,
}

impl std::fmt::Debug for HookedNetstack {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HookedNetstack").finish_non_exhaustive()
    }
}

impl Backend for HookedNetstack {
    const NAME: &'static str = "netstack-smoltcp";
    type Engine = NetstackEngine;

    fn engine(self, device: DeviceInfo, handlers: Dispatch, _: Start) -> Result<NetstackEngine, BackendError> {
        engine(self.backend.config, self.backend.restarts, Some(self.hook), device, handlers)
    }
}
