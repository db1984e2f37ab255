//! The engine contract and the one driver every backend runs on.
//!
//! An [`Engine`] is a TCP/IP stack as a state machine: it never reads a clock, touches the
//! device or sleeps. The driver ([`run_engine`]) owns the device and the clock and calls,
//! in a fixed order, in one loop for every backend:
//!
//! ```text
//!   ┌─▶ 1. handle_wakeups(now)   flows the handlers touched, queued UDP replies, decisions
//!   │   2. handle_timeout(now)   timers that expired
//!   │   3. poll_transmit → device.send, until empty   (send waits, never drops; the
//!   │                                                 buffer goes back to its pool on drop)
//!   │   4. sleep until the first of (in this order of preference):
//!   │        shutdown                          → drain, then return (see run_engine)
//!   │        poll_io(cx, now) ready            (a stream stack's output and accepts,
//!   │                                           the kernel's accepts, ended bridges)
//!   │        device readable (if wants_packets) → read up to RX_BATCH packets:
//!   │             handle_packet(now, p) each; Transmit → device.send(p) at once; then flush(now)
//!   │        wake queue notified
//!   │        poll_timeout() passed
//!   └───────────────────────────────────────┘
//! ```
//!
//! The packet counters are kept by the device ([`Counted`](crate::device::Counted)), not
//! here. Packet engines (smoltcp, lwIP) have no asynchronous parts; the stream stacks
//! (ipstack, netstack-smoltcp) run behind [`StreamEngine`](crate::stream_stack::StreamEngine),
//! whose crates do their work in their own tasks that `poll_io` reaps; the system NAT's
//! outcome for most packets is [`Handled::Transmit`], and its kernel accepts are polled
//! input. Tests drive an engine the same way with their own clock and in-memory packets.

use std::future::{Future, poll_fn};
use std::io;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use crate::admission::Flows;
use crate::device::{PacketBuf, PacketDevice};
use crate::flow::WakeQueue;
use crate::icmp::Icmp;

/// What became of a packet an engine was given.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Handled {
    /// The engine took it (into its stack, a flow, a queue) or dropped it (counted).
    Consumed,
    /// Write it back to the device as the engine rewrote it in place (the system NAT).
    Transmit,
}

/// A TCP/IP stack with no I/O of its own.
pub trait Engine: Send + 'static {
    /// Device reads per wake-up go into this many buffers at a time. The system NAT,
    /// which writes each packet straight back, reads into one buffer so the write copies
    /// bytes still in cache (a batch of 64 KiB super-packets would cycle through
    /// megabytes); packet stacks read a whole batch.
    const READ_BUFFERS: usize = RX_BATCH;

    /// Processes one packet read from the device. Never panics on any input: malformed
    /// packets are counted and dropped.
    fn handle_packet(&mut self, now: Instant, packet: &mut PacketBuf) -> Handled;

    /// Called after each batch of [`handle_packet`](Self::handle_packet) calls: emit what the
    /// batch made due (an engine may defer ACKs and data to here, one per flow per batch).
    fn flush(&mut self, now: Instant) {
        let _ = now;
    }

    /// Services every flow queued on [`wake_queue`](Self::wake_queue) and queued UDP replies.
    fn handle_wakeups(&mut self, now: Instant);

    /// Fires the timers due at `now`.
    fn handle_timeout(&mut self, now: Instant);

    /// The earliest time [`handle_timeout`](Self::handle_timeout) has work, if any.
    fn poll_timeout(&mut self) -> Option<Instant>;

    /// The next packet to write to the device. Dropped once written: a pooled buffer
    /// goes back to its [`PacketPool`](crate::device::PacketPool).
    fn poll_transmit(&mut self) -> Option<PacketBuf>;

    /// The queue handlers use to ask for [`handle_wakeups`](Self::handle_wakeups).
    fn wake_queue(&self) -> Arc<WakeQueue>;

    /// Whether the driver should read the device now. An engine whose own input is
    /// backed up says no: the kernel queues, then drops, as for a full host.
    fn wants_packets(&self) -> bool {
        true
    }

    /// The engine's TCP flows, for a drain at shutdown ([`run_engine`]); `None`: the
    /// driver stops at once.
    fn flows(&mut self) -> Option<&mut dyn Flows> {
        None
    }

    /// Advances the engine's asynchronous parts (a stream stack's tasks, a kernel
    /// listener, bridge tasks), registering `cx` for each. `Ready(Ok)` when it did
    /// something (the driver services and transmits again), `Pending` when nothing was
    /// ready; an error stops the driver.
    fn poll_io(&mut self, cx: &mut Context<'_>, now: Instant) -> Poll<io::Result<()>> {
        let _ = (cx, now);
        Poll::Pending
    }
}

/// The driver's clock, the only one an engine sees: tokio's, so that a runtime with paused
/// time (a test's simulated clock) drives every engine and every timer on one time line.
pub fn clock() -> Instant {
    tokio::time::Instant::now().into_std()
}

/// Packets read per wake-up before the engine's output is flushed. 64 keeps latency low
/// while amortising the readiness check; larger batches measured no faster.
pub const RX_BATCH: usize = 64;

/// How long a drain that ran out of time waits for its resets to go out.
const RESET_GRACE: Duration = Duration::from_secs(2);

/// Runs `engine` on `device` until `shutdown` completes and the drain ends, or the device
/// (or the engine's own I/O) fails. The only driver loop in the tree. `icmp` takes the
/// echo requests it answers out of the packets read before the engine sees them (`None`:
/// all go to the engine), and its replies are written with the engine's output.
///
/// The drain: once `shutdown` completes, a new connection is refused (RST to its SYN)
/// while the open ones go on, for at most `drain`; those still open then are reset both
/// ways (a flow cut mid-stream ends in a reset, never a FIN, which would tell its client
/// the data was complete), and the driver returns once they are gone or after
/// 2 s. A zero `drain`, or an engine without [`Engine::flows`], returns at once.
pub async fn run_engine<E: Engine, D: PacketDevice>(
    mut engine: E,
    mut device: D,
    shutdown: impl Future<Output = ()>,
    mut icmp: Option<Icmp>,
    drain: Duration,
) -> io::Result<()> {
    let wake = engine.wake_queue();
    let capacity = device.max_packet_len();
    let mut batch: Vec<PacketBuf> = (0..E::READ_BUFFERS).map(|_| PacketBuf::with_capacity(capacity)).collect();
    let far = || tokio::time::Instant::now() + Duration::from_secs(3600);
    let sleep = tokio::time::sleep_until(far());
    tokio::pin!(shutdown, sleep);
    let mut armed: Option<Instant> = None;
    // While draining: until when, and whether the flows left were reset.
    let mut draining: Option<(Instant, bool)> = None;
    loop {
        let now = clock();
        engine.handle_wakeups(now);
        engine.handle_timeout(now);
        while let Some(packet) = engine.poll_transmit() {
            device.send(&packet).await?;
        }
        while let Some(packet) = icmp.as_mut().and_then(Icmp::poll_transmit) {
            device.send(&packet).await?;
        }
        if let Some((until, reset)) = &mut draining {
            let open = engine.flows().map_or(0, |f| f.open());
            if open == 0 || (*reset && now >= *until) {
                return Ok(());
            }
            if now >= *until {
                tracing::info!(open, "drain time is up: resetting the connections still open");
                if let Some(flows) = engine.flows() {
                    flows.evict_all();
                }
                (*until, *reset) = (now + RESET_GRACE, true);
                continue;
            }
        }
        let deadline = match (engine.poll_timeout(), draining) {
            (Some(d), Some((until, _))) => Some(d.min(until)),
            (d, until) => d.or(until.map(|(u, _)| u)),
        };
        if deadline != armed {
            armed = deadline;
            sleep.as_mut().reset(deadline.map(tokio::time::Instant::from_std).unwrap_or_else(far));
        }
        let read_device = engine.wants_packets();
        let io = poll_fn(|cx| engine.poll_io(cx, clock()));
        tokio::select! {
            biased;
            () = &mut shutdown, if draining.is_none() => {
                let Some(flows) = engine.flows().filter(|_| !drain.is_zero()) else { return Ok(()) };
                flows.drain();
                tracing::info!(open = flows.open(), ?drain, "shutting down: new connections refused, open ones may finish");
                draining = Some((clock() + drain, false));
            }
            // The engine's own I/O before the device: a stream stack's output and accepts
            // must not wait behind a flood of packets that admission answers itself (UDP,
            // RSTs), which never fills the stack's input queue.
            done = io => done?,
            ready = device.readable(), if read_device => {
                ready?;
                let now = clock();
                let mut read = 0;
                while read < RX_BATCH {
                    let n = device.try_recv_batch(&mut batch)?;
                    for packet in &mut batch[..n] {
                        if icmp.as_mut().is_some_and(|i| i.intercept(packet)) {
                            continue;
                        }
                        if engine.handle_packet(now, packet) == Handled::Transmit {
                            device.send(packet).await?;
                        }
                    }
                    read += n;
                    if n < batch.len() {
                        break;
                    }
                }
                engine.flush(now);
            }
            () = wake.notified() => {}
            () = &mut sleep => {
                // A fired `Sleep` stays ready: park it far away until a deadline is set.
                armed = None;
                sleep.as_mut().reset(far());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;
    use crate::config::Mtu;

    /// An engine with one timer, 20 ms after start, that counts how often it is driven.
    struct OneTimer {
        deadline: Option<Instant>,
        calls: Arc<AtomicUsize>,
        wake: Arc<WakeQueue>,
    }

    impl Engine for OneTimer {
        fn handle_packet(&mut self, _: Instant, _: &mut PacketBuf) -> Handled {
            Handled::Consumed
        }
        fn handle_wakeups(&mut self, _: Instant) {
            self.calls.fetch_add(1, Ordering::Relaxed);
        }
        fn handle_timeout(&mut self, now: Instant) {
            if self.deadline.is_some_and(|d| d <= now) {
                self.deadline = None;
            }
        }
        fn poll_timeout(&mut self) -> Option<Instant> {
            self.deadline
        }
        fn poll_transmit(&mut self) -> Option<PacketBuf> {
            None
        }
        fn wake_queue(&self) -> Arc<WakeQueue> {
            self.wake.clone()
        }
    }

    #[tokio::test]
    async fn the_driver_sleeps_after_its_last_timer_fired() {
        let calls = Arc::new(AtomicUsize::new(0));
        let engine = OneTimer {
            deadline: Some(Instant::now() + Duration::from_millis(20)),
            calls: calls.clone(),
            wake: WakeQueue::new(),
        };
        let (device, _peer) = crate::device::mem::pair(Mtu::DEFAULT, 4);
        run_engine(engine, device, tokio::time::sleep(Duration::from_millis(300)), None, Duration::ZERO).await.unwrap();
        // One pass at start, one when the timer fires, one at shutdown; a spinning loop
        // would make millions.
        let n = calls.load(Ordering::Relaxed);
        assert!(n <= 5, "the driver looped {n} times while idle");
    }
}
