//! Process-level OS services with `unsafe` inside (the second of tungate-core's two
//! `unsafe` modules, next to `device/sys.rs`). The relay's system calls (`splice(2)`,
//! peek) live in `tungate-api`'s `os` module.
#![allow(unsafe_code)]

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
