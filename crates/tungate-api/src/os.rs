//! The system calls the relay needs that std and tokio do not offer: `splice(2)` through
//! a pipe, and a non-blocking peek into an initialised buffer. This crate's only
//! `unsafe` module.
#![allow(unsafe_code)]

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};

/// A kernel pipe for [`splice(2)`](https://man7.org/linux/man-pages/man2/splice.2.html):
/// bytes move socket → pipe → socket as page references, never through user memory.
///
/// Written here rather than taken from a splice crate: those drive both directions
/// through `&mut` streams and report progress only at the end, while a relay needs both
/// directions on shared sockets and a touch per chunk for its idle timeout.
#[derive(Debug)]
pub(crate) struct Pipe {
    read: std::os::fd::OwnedFd,
    write: std::os::fd::OwnedFd,
}

impl Pipe {
    /// A non-blocking pipe, enlarged to `size` bytes where the system allows it (the
    /// default of 64 KiB caps each splice at 16 pages).
    pub(crate) fn new(size: usize) -> io::Result<Self> {
        use std::os::fd::{FromRawFd, OwnedFd};
        let mut fds = [0 as libc::c_int; 2];
        // SAFETY: pipe2 writes two descriptors into the 2-element array it is given.
        if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_NONBLOCK | libc::O_CLOEXEC) } != 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: pipe2 succeeded, so both are fresh descriptors owned by nobody else.
        let (read, write) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
        let size = libc::c_int::try_from(size).unwrap_or(libc::c_int::MAX);
        // SAFETY: F_SETPIPE_SZ takes an int and only resizes the pipe; failure (above
        // /proc/sys/fs/pipe-max-size for an unprivileged process) leaves it as it was.
        unsafe { libc::fcntl(write.as_raw_fd(), libc::F_SETPIPE_SZ, size) };
        Ok(Pipe { read, write })
    }

    /// Moves up to `len` bytes from the socket `from` into the pipe; `Ok(0)` is EOF.
    pub(crate) fn fill_from(&self, from: BorrowedFd<'_>, len: usize) -> io::Result<usize> {
        splice(from.as_raw_fd(), self.write.as_raw_fd(), len)
    }

    /// Moves up to `len` bytes from the pipe into the socket `to`.
    pub(crate) fn drain_to(&self, to: BorrowedFd<'_>, len: usize) -> io::Result<usize> {
        splice(self.read.as_raw_fd(), to.as_raw_fd(), len)
    }
}

fn splice(from: libc::c_int, to: libc::c_int, len: usize) -> io::Result<usize> {
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
    if n < 0 { Err(io::Error::last_os_error()) } else { Ok(n as usize) }
}

/// Copies what the socket has received into `buf` without consuming it, never waiting:
/// `Ok(0)` is EOF, `WouldBlock` means nothing arrived yet. (socket2's `peek` takes an
/// uninitialised buffer and tokio's waits; a sniffer needs neither.)
pub(crate) fn peek(socket: BorrowedFd<'_>, buf: &mut [u8]) -> io::Result<usize> {
    // SAFETY: `buf` is a live, writable buffer of `buf.len()` bytes for the whole call and
    // the descriptor is borrowed from its owner.
    let n = unsafe {
        libc::recv(socket.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), libc::MSG_PEEK | libc::MSG_DONTWAIT)
    };
    if n < 0 { Err(io::Error::last_os_error()) } else { Ok(n as usize) }
}
