//! A Linux TUN device on tun-rs: created by name, or adopted from an inherited descriptor.

use std::io;
use std::net::IpAddr;
use std::os::fd::RawFd;

use ipnet::IpNet;

use super::{PacketBuf, PacketDevice};
use crate::config::Mtu;

/// How to create a TUN interface.
#[derive(Debug, Clone)]
pub struct TunConfig {
    /// Interface name; an existing persistent TUN of that name is attached to.
    pub name: String,
    pub mtu: Mtu,
    /// Addresses assigned to the interface (and used by stacks as their own).
    pub addresses: Vec<IpNet>,
    /// Kernel transmit queue length. The only loss on a local TUN path is a full queue,
    /// and user-space stacks retransmit slowly, so the default is far above the kernel's 500.
    pub tx_queue_len: u32,
}

impl TunConfig {
    pub const DEFAULT_TX_QUEUE_LEN: u32 = 10_000;

    pub fn new(name: impl Into<String>, mtu: Mtu) -> Self {
        TunConfig { name: name.into(), mtu, addresses: Vec::new(), tx_queue_len: Self::DEFAULT_TX_QUEUE_LEN }
    }
}

/// Why a TUN device could not be opened.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TunError {
    #[error("no permission to create TUN {name:?} (needs CAP_NET_ADMIN and access to /dev/net/tun)")]
    Permission { name: String, source: io::Error },
    #[error("TUN {name:?} is busy (another process has it open, or the name belongs to a non-TUN interface)")]
    Busy { name: String, source: io::Error },
    #[error("/dev/net/tun is missing (is the tun kernel module loaded?)")]
    NoTunDriver(#[source] io::Error),
    #[error("fd {fd} is not an open file descriptor")]
    FdNotOpen { fd: RawFd },
    #[error("fd {fd} is not a TUN device")]
    NotATun { fd: RawFd, source: io::Error },
    #[error("TUN {name:?}: {what}")]
    Setup { name: String, what: &'static str, source: io::Error },
}

/// A TUN interface opened with `IFF_NO_PI`: every read and write is one IP packet.
pub struct TunDevice {
    dev: tun_rs::AsyncDevice,
    mtu: Mtu,
    name: String,
}

impl std::fmt::Debug for TunDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TunDevice").field("name", &self.name).field("mtu", &self.mtu).finish()
    }
}

impl TunDevice {
    /// Creates (or attaches to) the named TUN, sets MTU, addresses and queue length, and
    /// brings it up. Routes are left to the operator.
    pub fn create(config: &TunConfig) -> Result<Self, TunError> {
        let name = config.name.clone();
        let mut builder = tun_rs::DeviceBuilder::new()
            .name(&config.name)
            .mtu(config.mtu.get() as u16)
            .tx_queue_len(config.tx_queue_len);
        // The builder takes one IPv4 address; further ones are added once the link exists.
        let mut has_v4 = false;
        let mut extra_v4 = Vec::new();
        for net in &config.addresses {
            match net.addr() {
                IpAddr::V4(a) if !has_v4 => {
                    builder = builder.ipv4(a, net.prefix_len(), None);
                    has_v4 = true;
                }
                IpAddr::V4(a) => extra_v4.push((a, net.prefix_len())),
                IpAddr::V6(a) => builder = builder.ipv6(a, net.prefix_len()),
            }
        }
        let dev = builder.build_async().map_err(|e| classify_create_error(&name, e))?;
        for (a, prefix) in extra_v4 {
            dev.add_address_v4(a, prefix).map_err(|source| TunError::Setup {
                name: name.clone(),
                what: "adding an IPv4 address",
                source,
            })?;
        }
        let name = dev.name().unwrap_or(name);
        Ok(TunDevice { dev, mtu: config.mtu, name })
    }

    /// Adopts an inherited TUN descriptor (Android `VpnService`, a supervisor): its
    /// interface is already configured, so only the MTU the stack should assume is given.
    pub fn adopt_fd(fd: RawFd, mtu: Mtu) -> Result<Self, TunError> {
        let dev = super::sys::adopt_tun_fd(fd).map_err(|source| {
            if source.raw_os_error() == Some(libc::EBADF) && !super::sys::fd_is_open(fd) {
                TunError::FdNotOpen { fd }
            } else {
                TunError::NotATun { fd, source }
            }
        })?;
        let name = dev.name().unwrap_or_else(|_| format!("fd{fd}"));
        Ok(TunDevice { dev, mtu, name })
    }

    pub fn name(&self) -> &str {
        &self.name
    }
}

fn classify_create_error(name: &str, e: io::Error) -> TunError {
    let name = name.to_owned();
    match e.raw_os_error() {
        Some(libc::EPERM) | Some(libc::EACCES) => TunError::Permission { name, source: e },
        Some(libc::EBUSY) | Some(libc::EEXIST) | Some(libc::EINVAL) => TunError::Busy { name, source: e },
        Some(libc::ENOENT) | Some(libc::ENODEV) => TunError::NoTunDriver(e),
        _ => TunError::Setup { name, what: "creating the interface", source: e },
    }
}

impl PacketDevice for TunDevice {
    async fn readable(&mut self) -> io::Result<()> {
        self.dev.readable().await
    }

    fn try_recv(&mut self, buf: &mut PacketBuf) -> io::Result<bool> {
        match self.dev.try_recv(buf.spare_mut()) {
            Ok(n) => {
                buf.set_len(n);
                Ok(true)
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(false),
            Err(e) => Err(e),
        }
    }

    async fn send(&mut self, packet: &PacketBuf) -> io::Result<()> {
        // A TUN write almost never blocks: try it without building a readiness future
        // (which showed up at ~1% of the gateway's CPU at MTU 1500), wait only if needed.
        match self.dev.try_send(packet.packet()) {
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => self.dev.send(packet.packet()).await.map(|_| ()),
            other => other.map(|_| ()),
        }
    }

    fn mtu(&self) -> Mtu {
        self.mtu
    }
}
