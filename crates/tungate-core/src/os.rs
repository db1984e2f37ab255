//! Process-level OS services with `unsafe` inside (the second of tungate-core's two
//! `unsafe` modules, next to `device/sys.rs`).
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

/// A kernel pipe for [`splice(2)`](https://man7.org/linux/man-pages/man2/splice.2.html):
/// bytes move socket → pipe → socket as page references, never through user memory.
///
/// Written here rather than taken from a splice crate: those drive both directions
/// through `&mut` streams and report progress only at the end, while a relay needs both
/// directions on shared sockets and a touch per chunk for its idle timeout.
#[cfg(target_os = "linux")]
#[derive(Debug)]
pub struct Pipe {
    read: std::os::fd::OwnedFd,
    write: std::os::fd::OwnedFd,
}

#[cfg(target_os = "linux")]
impl Pipe {
    /// A non-blocking pipe, enlarged to `size` bytes where the system allows it (the
    /// default of 64 KiB caps each splice at 16 pages).
    pub fn new(size: usize) -> std::io::Result<Self> {
        use std::os::fd::{FromRawFd, OwnedFd};
        let mut fds = [0 as libc::c_int; 2];
        // SAFETY: pipe2 writes two descriptors into the 2-element array it is given.
        if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_NONBLOCK | libc::O_CLOEXEC) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: pipe2 succeeded, so both are fresh descriptors owned by nobody else.
        let (read, write) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
        let size = libc::c_int::try_from(size).unwrap_or(libc::c_int::MAX);
        // SAFETY: F_SETPIPE_SZ takes an int and only resizes the pipe; failure (above
        // /proc/sys/fs/pipe-max-size for an unprivileged process) leaves it as it was.
        unsafe { libc::fcntl(std::os::fd::AsRawFd::as_raw_fd(&write), libc::F_SETPIPE_SZ, size) };
        Ok(Pipe { read, write })
    }

    /// Moves up to `len` bytes from the socket `from` into the pipe; `Ok(0)` is EOF.
    pub fn fill_from(&self, from: std::os::fd::BorrowedFd<'_>, len: usize) -> std::io::Result<usize> {
        use std::os::fd::AsRawFd;
        splice(from.as_raw_fd(), self.write.as_raw_fd(), len)
    }

    /// Moves up to `len` bytes from the pipe into the socket `to`.
    pub fn drain_to(&self, to: std::os::fd::BorrowedFd<'_>, len: usize) -> std::io::Result<usize> {
        use std::os::fd::AsRawFd;
        splice(self.read.as_raw_fd(), to.as_raw_fd(), len)
    }
}

#[cfg(target_os = "linux")]
fn splice(from: libc::c_int, to: libc::c_int, len: usize) -> std::io::Result<usize> {
    // SAFETY: both descriptors are borrowed from live owners for the duration of the call;
    // null offsets are required for pipes and sockets; the kernel checks everything else.
    let n = unsafe {
        libc::splice(
            from,
            std::ptr::null_mut(),
            to,
            std::ptr::null_mut(),
            len,
            libc::SPLICE_F_MOVE | libc::SPLICE_F_NONBLOCK,
        )
    };
    if n < 0 { Err(std::io::Error::last_os_error()) } else { Ok(n as usize) }
}
