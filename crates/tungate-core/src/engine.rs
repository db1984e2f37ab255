//! The I/O-free engine contract and the async driver that runs an engine on a device.
//!
//! An [`Engine`] is a TCP/IP stack as a state machine: it never reads a clock, touches an
//! fd or sleeps. The driver ([`run_engine`]) owns the I/O and calls, in a loop:
//!
//! 1. [`Engine::handle_wakeups`] — flows the handlers touched (data, shutdown, decisions)
//!    and queued UDP replies;
//! 2. [`Engine::handle_timeout`] — timers that expired;
//! 3. [`Engine::poll_transmit`] until empty — write each packet to the device (waiting if
//!    the device pushes back), then [`Engine::recycle`] the buffer;
//! 4. sleep until the device is readable, the wake queue is notified, or
//!    [`Engine::poll_timeout`] passes; on readable, read a batch and feed every packet to
//!    [`Engine::handle_packet`], then call [`Engine::flush`].
//!
//! Tests drive an engine the same way with a simulated clock and in-memory packets.

use std::future::Future;
use std::io;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::device::{PacketBuf, PacketDevice};
use crate::flow::WakeQueue;

/// A packet-level TCP/IP stack with no I/O of its own.
pub trait Engine: Send + 'static {
    /// Processes one packet read from the device. Never panics on any input: malformed
    /// packets are counted and dropped.
    fn handle_packet(&mut self, now: Instant, packet: &mut PacketBuf);

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

    /// The next packet to write to the device.
    fn poll_transmit(&mut self) -> Option<PacketBuf>;

    /// Gives back a buffer returned by [`poll_transmit`](Self::poll_transmit) once written.
    fn recycle(&mut self, buf: PacketBuf);

    /// The queue handlers use to ask for [`handle_wakeups`](Self::handle_wakeups).
    fn wake_queue(&self) -> Arc<WakeQueue>;
}

/// Packets read per wake-up before the engine's output is flushed. 64 keeps latency low
/// while amortising the readiness check; larger batches measured no faster.
pub const RX_BATCH: usize = 64;

/// Runs `engine` on `device` until `shutdown` completes or the device fails.
pub async fn run_engine<E: Engine, D: PacketDevice>(
    mut engine: E,
    mut device: D,
    shutdown: impl Future<Output = ()>,
) -> io::Result<()> {
    let wake = engine.wake_queue();
    let capacity = device.max_packet_len();
    let mut batch: Vec<PacketBuf> = (0..RX_BATCH).map(|_| PacketBuf::with_capacity(capacity)).collect();
    let far = || tokio::time::Instant::now() + Duration::from_secs(3600);
    let sleep = tokio::time::sleep_until(far());
    tokio::pin!(shutdown, sleep);
    let mut armed: Option<Instant> = None;
    loop {
        let now = Instant::now();
        engine.handle_wakeups(now);
        engine.handle_timeout(now);
        while let Some(packet) = engine.poll_transmit() {
            device.send(&packet).await?;
            engine.recycle(packet);
        }
        let deadline = engine.poll_timeout();
        if deadline != armed {
            armed = deadline;
            sleep.as_mut().reset(deadline.map(tokio::time::Instant::from_std).unwrap_or_else(far));
        }
        tokio::select! {
            biased;
            () = &mut shutdown => return Ok(()),
            ready = device.readable() => {
                ready?;
                let n = device.try_recv_batch(&mut batch)?;
                let now = Instant::now();
                for packet in &mut batch[..n] {
                    engine.handle_packet(now, packet);
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
        fn handle_packet(&mut self, _: Instant, _: &mut PacketBuf) {}
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
        fn recycle(&mut self, _: PacketBuf) {}
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
        run_engine(engine, device, tokio::time::sleep(Duration::from_millis(300))).await.unwrap();
        // One pass at start, one when the timer fires, one at shutdown; a spinning loop
        // would make millions.
        let n = calls.load(Ordering::Relaxed);
        assert!(n <= 5, "the driver looped {n} times while idle");
    }
}
