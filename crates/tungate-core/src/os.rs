//! Process-level OS services with `unsafe` inside (the second of tungate-core's two
//! `unsafe` modules, next to `device/sys.rs`). The relay's system calls (`splice(2)`,
//! peek) live in `tungate-api`'s `os` module.
#![allow(unsafe_code)]

use std::sync::Arc;

use crate::stats::Stats;

/// Returns free heap memory to the OS.
///
/// glibc keeps freed memory in its arenas; after thousands of flows close, a gateway's
/// resident size stays near its peak although nothing is in use (measured: 2 000
/// connections took tungate-lwip from 4 to 93 MiB, and it stayed at 15 MiB after they
/// closed). `malloc_trim(0)` releases whole free pages anywhere in the heap. A no-op on
/// other C libraries (bionic and musl return memory on their own terms).
pub fn release_free_heap() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only walks glibc's own heap bookkeeping under its arena locks;
    // it is thread-safe and has no preconditions.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// Gives every large allocation (128 KiB and up: the stacks' socket buffers, grown
/// rings) a mapping of its own for the rest of the process.
///
/// glibc's default threshold for that moves up to the size of the first large buffer
/// freed; after the first connection closes, a 512 KiB socket buffer comes from the heap,
/// where `calloc` zeroes (so touches) every page of it and where freed buffers stay
/// resident. Fixed at 128 KiB (`M_MMAP_THRESHOLD`), every such buffer is fresh
/// zero-filled memory whose pages are committed only as bytes are written into them, and
/// is returned whole when freed: a held connection that carried a few bytes costs the
/// pages those bytes touched, not its buffers' capacity (numbers in ARCHITECTURE.md,
/// "Memory"). Call once, early in `main`; a no-op on other C libraries.
pub fn map_large_allocations() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only sets a glibc tuning parameter (under its own lock); any value
    // is valid and nothing else depends on the old one.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 128 * 1024);
    }
}

/// Whether the gateway's counters know how many flows are open.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FlowCount {
    /// `tcp_active` follows every flow.
    Known,
    /// Flows are handed over and never seen to close (`tcp_active` means nothing).
    Unknown,
}

/// Gives freed heap back to the OS once most of a burst of connections has ended (see
/// [`release_free_heap`]). Checked every 2 s; trims after at least 256
/// new connections, when at most a quarter as many are still open, and then again each
/// time the connections open at the last trim shrink to a quarter, down to none.
///
/// With [`FlowCount::Unknown`] (tungate-redirect hands each socket to the handler and
/// never sees it close) it trims every 10 s instead, once any connection came (one walk
/// of glibc's free lists; nothing when nothing is free).
pub async fn release_memory_after_bursts(stats: Arc<Stats>, flows: FlowCount) {
    use std::sync::atomic::Ordering::Relaxed;
    let mut interval = tokio::time::interval(std::time::Duration::from_secs(2));
    let (mut requests_at_trim, mut active_at_trim, mut ticks) = (0, 0, 0u64);
    loop {
        interval.tick().await;
        ticks += 1;
        let requests = stats.tcp_requests.load(Relaxed);
        let active = stats.tcp_active.load(Relaxed);
        let new = requests - requests_at_trim;
        // Trimmed again each time the flows left from the last trim shrink to a quarter
        // (down to none): a burst's tail ends after its first trim, and its memory came
        // back only with the next burst (11 MiB of 177 stayed after 2 000 connections).
        let tail_ended = active_at_trim > 0 && active * 4 <= active_at_trim;
        let due = if flows == FlowCount::Unknown {
            requests > 0 && ticks % 5 == 0
        } else {
            (new >= 256 && active * 4 <= new) || tail_ended
        };
        if due {
            release_free_heap();
            (requests_at_trim, active_at_trim) = (requests, active);
            tracing::debug!(new, active, "returned free heap to the OS");
        }
    }
}
