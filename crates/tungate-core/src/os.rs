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
