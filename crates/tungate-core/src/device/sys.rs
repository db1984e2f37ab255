//! The only `unsafe` code of tungate-core: adopting an inherited TUN file descriptor.
#![allow(unsafe_code)]

use std::io;
use std::os::fd::RawFd;

/// Whether `fd` names an open file descriptor in this process.
pub(crate) fn fd_is_open(fd: RawFd) -> bool {
    // SAFETY: F_GETFD only reads the descriptor's flags; it has no memory effects and is
    // defined for any integer (an invalid one yields EBADF).
    unsafe { libc::fcntl(fd, libc::F_GETFD) != -1 }
}

/// Takes ownership of `fd` as a tun-rs device. tun-rs checks with `TUNGETIFF` that it is a
/// TUN/TAP descriptor and fails otherwise.
pub(crate) fn adopt_tun_fd(fd: RawFd) -> io::Result<tun_rs::AsyncDevice> {
    if !fd_is_open(fd) {
        return Err(io::Error::from_raw_os_error(libc::EBADF));
    }
    // SAFETY: the descriptor is open (checked above) and, by the `--tun-fd` contract, was
    // handed to this process to own: nothing else in the process uses or closes it. tun-rs
    // requires IFF_NO_PI framing without IFF_VNET_HDR, which is what Android's VpnService
    // and `ip tuntap` give; it validates the descriptor with TUNGETIFF before use.
    unsafe { tun_rs::AsyncDevice::from_fd(fd) }
}
