//! The socket options std, tokio and socket2 do not offer: ICMP errors reported on an
//! unconnected UDP socket. This crate's only `unsafe` module.
#![allow(unsafe_code)]

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};

/// Makes the kernel report ICMP errors for datagrams sent from the unconnected UDP socket
/// `socket` (`IP_RECVERR` / `IPV6_RECVERR`): a port unreachable then fails the next
/// receive with ECONNREFUSED, as on a connected socket. Each error is also queued on the
/// socket's error queue, which [`discard_errors`] empties.
pub(crate) fn report_errors(socket: BorrowedFd<'_>, v6: bool) -> io::Result<()> {
    let (level, name) =
        if v6 { (libc::IPPROTO_IPV6, libc::IPV6_RECVERR) } else { (libc::IPPROTO_IP, libc::IP_RECVERR) };
    let on: libc::c_int = 1;
    // SAFETY: `socket` is an open descriptor for the duration of the call; the option
    // value is a c_int on the stack whose size is passed with it.
    let rc = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            level,
            name,
            (&on as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc == 0 { Ok(()) } else { Err(io::Error::last_os_error()) }
}

/// Takes the oldest error from the error queue of `socket` (see [`report_errors`]): its
/// errno (ECONNREFUSED for a port unreachable); `WouldBlock` when the queue is empty.
/// Taking it also clears the error a receive would report.
pub(crate) fn take_error(socket: BorrowedFd<'_>) -> io::Result<i32> {
    let mut data = [0u8; 64];
    // Room for one `sock_extended_err` and the offender's address after it.
    let mut control = [0u64; 32];
    let mut iov = libc::iovec { iov_base: data.as_mut_ptr().cast(), iov_len: data.len() };
    // SAFETY: a zeroed msghdr is a valid "no name, no control" header; the iovec and the
    // control buffer set below are stack buffers that outlive the call, with their sizes.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr().cast();
    msg.msg_controllen = std::mem::size_of_val(&control) as _;
    // SAFETY: `socket` is open; `msg` describes valid buffers (above).
    let n = unsafe { libc::recvmsg(socket.as_raw_fd(), &mut msg, libc::MSG_ERRQUEUE | libc::MSG_DONTWAIT) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `msg` was filled by the kernel: CMSG_FIRSTHDR/CMSG_NXTHDR walk its control
    // buffer within `msg_controllen`, and an IP_RECVERR/IPV6_RECVERR message's data is a
    // `sock_extended_err` (read unaligned: the buffer gives no alignment guarantee for it).
    unsafe {
        let mut cmsg = libc::CMSG_FIRSTHDR(&msg);
        while !cmsg.is_null() {
            let (level, kind) = ((*cmsg).cmsg_level, (*cmsg).cmsg_type);
            if (level == libc::IPPROTO_IP && kind == libc::IP_RECVERR)
                || (level == libc::IPPROTO_IPV6 && kind == libc::IPV6_RECVERR)
            {
                let err = std::ptr::read_unaligned(libc::CMSG_DATA(cmsg).cast::<libc::sock_extended_err>());
                return Ok(err.ee_errno as i32);
            }
            cmsg = libc::CMSG_NXTHDR(&msg, cmsg);
        }
    }
    Ok(libc::EIO)
}

/// Empties the error queue of `socket` without waiting: after a receive reported the
/// error, its queued copy must not be reported again.
pub(crate) fn discard_errors(socket: BorrowedFd<'_>) {
    for _ in 0..64 {
        if take_error(socket).is_err() {
            return;
        }
    }
}
