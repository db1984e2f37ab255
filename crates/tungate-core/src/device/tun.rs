//! A Linux TUN device on tun-rs: created by name, or adopted from an inherited descriptor.

use std::io::{self, IoSlice, IoSliceMut};
use std::net::IpAddr;
use std::os::fd::RawFd;

use ipnet::IpNet;

use super::offload::{MAX_SUPER_PACKET, Offload, RxMode, Splitter, VNET_HDR_LEN, VnetHeader};
use super::{PacketBuf, PacketDevice, PacketMeta};
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
    /// Whether to open the TUN with `IFF_VNET_HDR` and TCP/UDP segmentation offload.
    pub offload: Offload,
    /// How offloaded input is delivered (ignored without offload).
    pub rx_mode: RxMode,
}

impl TunConfig {
    pub const DEFAULT_TX_QUEUE_LEN: u32 = 10_000;

    pub fn new(name: impl Into<String>, mtu: Mtu) -> Self {
        TunConfig {
            name: name.into(),
            mtu,
            addresses: Vec::new(),
            tx_queue_len: Self::DEFAULT_TX_QUEUE_LEN,
            offload: Offload::Off,
            rx_mode: RxMode::Split,
        }
    }
}

/// Why a TUN device could not be opened.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TunError {
    #[error("no permission to create TUN {name:?} (needs CAP_NET_ADMIN and access to /dev/net/tun)")]
    Permission { name: String, source: io::Error },
    #[error(
        "no permission to open TUN {name:?}: it exists, {}, and this process lacks CAP_NET_ADMIN \
         (create it for this user: ip tuntap add dev {name} mode tun user USER)",
        match owner { Some(uid) => format!("owned by uid {uid}"), None => "with no owner".to_string() }
    )]
    NotOwner { name: String, owner: Option<u32>, source: io::Error },
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
    #[error("TUN {name:?}: the kernel refused offload (IFF_VNET_HDR with checksum and TSO); use --offload auto or off")]
    OffloadRefused { name: String, source: io::Error },
}

/// A TUN interface opened with `IFF_NO_PI`: every read and write is one IP packet, with a
/// virtio-net header in front when offload is on.
pub struct TunDevice {
    dev: tun_rs::AsyncDevice,
    mtu: Mtu,
    name: String,
    vnet: Option<Box<Vnet>>,
    /// A persistent TUN that existed before (and outlives) this process.
    attached: bool,
}

/// State of an offload-enabled TUN.
struct Vnet {
    rx: RxMode,
    /// [`RxMode::Split`]: the last raw read (header + super-packet) and its segments, of
    /// which `next..count` are not delivered yet.
    raw: Box<[u8]>,
    splitter: Splitter,
    next: usize,
    count: usize,
    /// Set after a GSO write failed with `EINVAL` (a known kernel regression): from then
    /// on super-packets are split here and written as plain segments.
    split_writes: bool,
    /// The write-side splitter and its copy of the packet (made on first use).
    tx_split: Option<(Vec<u8>, Splitter)>,
}

impl Vnet {
    fn new(rx: RxMode) -> Box<Self> {
        let raw = match rx {
            RxMode::Split => vec![0; VNET_HDR_LEN + MAX_SUPER_PACKET].into_boxed_slice(),
            RxMode::Whole => Box::default(),
        };
        Box::new(Vnet {
            rx,
            raw,
            splitter: Splitter::default(),
            next: 0,
            count: 0,
            split_writes: false,
            tx_split: None,
        })
    }
}

impl std::fmt::Debug for TunDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TunDevice")
            .field("name", &self.name)
            .field("mtu", &self.mtu)
            .field("offload", &self.offload())
            .finish()
    }
}

impl TunDevice {
    /// Creates (or attaches to) the named TUN, sets MTU, addresses and queue length, and
    /// brings it up. Routes are left to the operator.
    ///
    /// With [`Offload::Auto`] a kernel that refuses offload gets a plain TUN (logged);
    /// with [`Offload::On`] that is an error.
    pub fn create(config: &TunConfig) -> Result<Self, TunError> {
        match config.offload {
            Offload::Off => Self::create_with(config, false),
            // EINVAL also means "a non-TUN interface has this name": find out which.
            Offload::On => Self::create_with(config, true).or_else(|e| match e {
                TunError::OffloadRefused { .. } => Self::create_with(config, false).and(Err(e)),
                other => Err(other),
            }),
            Offload::Auto => Self::create_with(config, true).or_else(|e| match e {
                TunError::OffloadRefused { source, .. } => {
                    tracing::warn!("TUN offload unavailable ({source}); running without it");
                    Self::create_with(config, false)
                }
                other => Err(other),
            }),
        }
    }

    fn create_with(config: &TunConfig, offload: bool) -> Result<Self, TunError> {
        let name = config.name.clone();
        if let Some(existing) = Existing::read(&name) {
            return Self::attach(config, offload, existing);
        }
        let mut builder = tun_rs::DeviceBuilder::new()
            .name(&config.name)
            .mtu(config.mtu.get() as u16)
            .tx_queue_len(config.tx_queue_len)
            .offload(offload);
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
        let dev = builder.build_async().map_err(|e| {
            // tun-rs fails the build if TUNSETOFFLOAD (csum + TSO) is refused; IFF_VNET_HDR
            // itself is older than any supported kernel.
            if offload && e.raw_os_error() == Some(libc::EINVAL) {
                TunError::OffloadRefused { name: name.clone(), source: e }
            } else {
                classify_create_error(&name, e)
            }
        })?;
        let vnet = offload.then(|| Vnet::new(config.rx_mode));
        for (a, prefix) in extra_v4 {
            dev.add_address_v4(a, prefix).map_err(|source| TunError::Setup {
                name: name.clone(),
                what: "adding an IPv4 address",
                source,
            })?;
        }
        let name = dev.name().unwrap_or(name);
        Ok(TunDevice { dev, mtu: config.mtu, name, vnet, attached: false })
    }

    /// Attaches to a persistent TUN made beforehand (`ip tuntap add … user U`), which its
    /// owner may open without CAP_NET_ADMIN. Changing a link setting needs the capability
    /// even when the value does not change, so only what differs from the request is
    /// set: the MTU, missing addresses, the link state. A shorter transmit queue is kept,
    /// with a warning, when raising it is refused.
    fn attach(config: &TunConfig, offload: bool, existing: Existing) -> Result<Self, TunError> {
        let name = config.name.clone();
        let mut builder = tun_rs::DeviceBuilder::new().name(&config.name).offload(offload);
        if existing.mtu != config.mtu.get() {
            builder = builder.mtu(config.mtu.get() as u16);
        }
        if existing.up {
            builder = builder.inherit_enable_state();
        }
        let dev = builder.build_async().map_err(|e| {
            if offload && e.raw_os_error() == Some(libc::EINVAL) {
                TunError::OffloadRefused { name: name.clone(), source: e }
            } else if matches!(e.raw_os_error(), Some(libc::EPERM) | Some(libc::EACCES))
                && existing.owner.is_some_and(|o| Some(o) == effective_uid())
            {
                // Ours: what was refused is a link change (MTU, up).
                TunError::Setup { name: name.clone(), what: OWN_TUN_CHANGE, source: e }
            } else if matches!(e.raw_os_error(), Some(libc::EPERM) | Some(libc::EACCES)) {
                TunError::NotOwner { name: name.clone(), owner: existing.owner, source: e }
            } else {
                classify_create_error(&name, e)
            }
        })?;
        let setup = |what: &'static str| {
            let name = name.clone();
            move |source| TunError::Setup { name, what, source }
        };
        if existing.tx_queue_len < config.tx_queue_len {
            match dev.set_tx_queue_len(config.tx_queue_len) {
                Ok(()) => {}
                Err(e) if e.raw_os_error() == Some(libc::EPERM) => tracing::warn!(
                    tun = %name,
                    txqueuelen = existing.tx_queue_len,
                    "kept the TUN's transmit queue: raising it to {} needs CAP_NET_ADMIN \
                     (or `ip link set {name} txqueuelen {}` beforehand)",
                    config.tx_queue_len,
                    config.tx_queue_len
                ),
                Err(e) => return Err(setup("setting the transmit queue length")(e)),
            }
        }
        let present = dev.addresses().map_err(setup("reading its addresses"))?;
        for net in config.addresses.iter().filter(|n| !present.contains(&n.addr())) {
            match net.addr() {
                IpAddr::V4(a) => dev.add_address_v4(a, net.prefix_len()).map_err(setup("adding an IPv4 address"))?,
                IpAddr::V6(a) => dev.add_address_v6(a, net.prefix_len()).map_err(setup("adding an IPv6 address"))?,
            }
        }
        let vnet = offload.then(|| Vnet::new(config.rx_mode));
        let name = dev.name().unwrap_or(name);
        Ok(TunDevice { dev, mtu: config.mtu, name, vnet, attached: true })
    }

    /// Adopts an inherited TUN descriptor (Android `VpnService`, a supervisor): its
    /// interface is already configured, so only the MTU the stack should assume is given.
    /// Such a descriptor runs without offload: its framing (no virtio-net header) was
    /// chosen by whoever opened it.
    pub fn adopt_fd(fd: RawFd, mtu: Mtu) -> Result<Self, TunError> {
        let dev = super::sys::adopt_tun_fd(fd).map_err(|source| {
            if source.raw_os_error() == Some(libc::EBADF) && !super::sys::fd_is_open(fd) {
                TunError::FdNotOpen { fd }
            } else {
                TunError::NotATun { fd, source }
            }
        })?;
        let name = dev.name().unwrap_or_else(|_| format!("fd{fd}"));
        Ok(TunDevice { dev, mtu, name, vnet: None, attached: true })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Whether the interface existed before this process and outlives it (a persistent
    /// TUN attached to, or an adopted descriptor).
    pub fn attached(&self) -> bool {
        self.attached
    }

    /// Whether the TUN runs with a virtio-net header and TSO (and how input is delivered).
    pub fn offload(&self) -> Option<RxMode> {
        self.vnet.as_ref().map(|v| v.rx)
    }

    /// [`RxMode::Whole`]: one read, header decoded into the buffer's metadata.
    fn recv_whole(&mut self, buf: &mut PacketBuf) -> io::Result<bool> {
        let mut hdr = [0u8; VNET_HDR_LEN];
        let n = {
            let mut iov = [IoSliceMut::new(&mut hdr), IoSliceMut::new(buf.spare_mut())];
            match self.dev.try_recv_vectored(&mut iov) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(false),
                Err(e) => return Err(e),
            }
        };
        match VnetHeader::decode(&hdr).to_meta() {
            // (A read reports the packet's length even when the buffer cut it short.)
            Some(meta) if n > VNET_HDR_LEN && n - VNET_HDR_LEN <= buf.capacity() => {
                buf.meta = meta;
                buf.set_len(n - VNET_HDR_LEN);
            }
            // A header tungate cannot interpret: deliver an empty packet, which every
            // backend counts as malformed.
            _ => {
                buf.meta = PacketMeta::default();
                buf.set_len(0);
            }
        }
        Ok(true)
    }

    /// [`RxMode::Split`]: segments of the last super-packet first, then one more read.
    /// A packet that cannot be delivered (a header tungate cannot interpret, a
    /// super-packet that cannot be split, a segment larger than `buf`) comes out empty,
    /// which every backend counts as malformed.
    fn recv_split(&mut self, buf: &mut PacketBuf) -> io::Result<bool> {
        let mtu = self.mtu.get();
        let Some(v) = self.vnet.as_deref_mut() else { return Ok(false) };
        buf.meta = PacketMeta::default();
        if v.next >= v.count {
            let n = match self.dev.try_recv(&mut v.raw) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(false),
                Err(e) => return Err(e),
            };
            let meta = (n > VNET_HDR_LEN && n <= v.raw.len())
                .then(|| VnetHeader::decode(v.raw[..VNET_HDR_LEN].try_into().expect("10 bytes")).to_meta())
                .flatten();
            let end = n.min(v.raw.len());
            let packet = &mut v.raw[VNET_HDR_LEN.min(end)..end];
            let delivered = match meta {
                Some(meta) if meta.gso.is_none() => {
                    let complete = meta.csum.is_none_or(|c| super::offload::complete_checksum(packet, c));
                    if complete && packet.len() <= buf.capacity() {
                        buf.spare_mut()[..packet.len()].copy_from_slice(packet);
                        buf.set_len(packet.len());
                    } else {
                        buf.set_len(0);
                    }
                    true
                }
                Some(meta) => match v.splitter.split(packet, &meta, mtu) {
                    Ok(count) => {
                        (v.next, v.count) = (0, count);
                        false
                    }
                    Err(e) => {
                        tracing::debug!("dropping an offloaded packet that cannot be split: {e}");
                        buf.set_len(0);
                        true
                    }
                },
                None => {
                    buf.set_len(0);
                    true
                }
            };
            if delivered {
                return Ok(true);
            }
        }
        let seg = v.splitter.segment(v.next);
        buf.meta.continued = v.next > 0;
        v.next += 1;
        if seg.len() <= buf.capacity() {
            buf.spare_mut()[..seg.len()].copy_from_slice(seg);
            buf.set_len(seg.len());
        } else {
            buf.set_len(0);
        }
        Ok(true)
    }

    /// Writes one packet with its virtio-net header.
    async fn send_vnet(&mut self, packet: &PacketBuf) -> io::Result<()> {
        let split = self.vnet.as_ref().is_some_and(|v| v.split_writes);
        if packet.meta.gso.is_some() && split {
            return self.send_split(packet).await;
        }
        let hdr = VnetHeader::from_meta(&packet.meta).encode();
        match write_parts(&self.dev, &[IoSlice::new(&hdr), IoSlice::new(packet.packet())]).await {
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) && packet.meta.gso.is_some() => {
                tracing::warn!(
                    "TUN {}: the kernel refused a GSO write ({e}); splitting super-packets from now on",
                    self.name
                );
                if let Some(v) = self.vnet.as_deref_mut() {
                    v.split_writes = true;
                }
                self.send_split(packet).await
            }
            other => other,
        }
    }

    /// Splits a super-packet into plain segments with final checksums and writes each
    /// (the fallback for kernels that refuse GSO writes).
    async fn send_split(&mut self, packet: &PacketBuf) -> io::Result<()> {
        let mtu = self.mtu.get();
        let Some(v) = self.vnet.as_deref_mut() else { return Err(io::Error::other("no offload")) };
        let (copy, splitter) = v.tx_split.get_or_insert_with(Default::default);
        copy.clear();
        copy.extend_from_slice(packet.packet());
        let n = splitter.split(copy, &packet.meta, mtu)?;
        let hdr = [0u8; VNET_HDR_LEN];
        for i in 0..n {
            write_parts(&self.dev, &[IoSlice::new(&hdr), IoSlice::new(splitter.segment(i))]).await?;
        }
        Ok(())
    }
}

/// What a refused change of a TUN this user owns needed.
const OWN_TUN_CHANGE: &str = "changing its MTU or bringing it up needs CAP_NET_ADMIN: \
     set them beforehand (ip link set dev NAME mtu N up) to what --mtu asks";

/// This process's effective uid, as /proc/self/status shows it.
fn effective_uid() -> Option<u32> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let uids = status.lines().find_map(|l| l.strip_prefix("Uid:"))?;
    uids.split_whitespace().nth(1)?.parse().ok()
}

/// A persistent TUN that exists already, as sysfs shows it (in this network namespace).
#[derive(Debug)]
struct Existing {
    mtu: usize,
    tx_queue_len: u32,
    up: bool,
    /// Its owner's uid (`ip tuntap add … user U`), if it has one.
    owner: Option<u32>,
}

impl Existing {
    fn read(name: &str) -> Option<Existing> {
        let dir = std::path::Path::new("/sys/class/net").join(name);
        // A TUN/TAP device has tun_flags; another interface of that name is not attached.
        std::fs::metadata(dir.join("tun_flags")).ok()?;
        let read = |file: &str| std::fs::read_to_string(dir.join(file)).ok().map(|s| s.trim().to_owned());
        let number = |file: &str| read(file).and_then(|s| s.parse::<i64>().ok());
        let flags = read("flags").and_then(|f| u32::from_str_radix(f.trim_start_matches("0x"), 16).ok());
        Some(Existing {
            mtu: usize::try_from(number("mtu")?).ok()?,
            tx_queue_len: number("tx_queue_len").unwrap_or(0) as u32,
            up: flags.is_some_and(|f| f & libc::IFF_UP as u32 != 0),
            owner: number("owner").and_then(|o| u32::try_from(o).ok()),
        })
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

/// Writes `parts` as one packet, waiting while the TUN cannot take it.
async fn write_parts(dev: &tun_rs::AsyncDevice, parts: &[IoSlice<'_>]) -> io::Result<()> {
    loop {
        match dev.try_send_vectored(parts) {
            Ok(_) => return Ok(()),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => dev.writable().await?,
            Err(e) => return Err(e),
        }
    }
}

impl PacketDevice for TunDevice {
    async fn readable(&mut self) -> io::Result<()> {
        self.dev.readable().await
    }

    fn try_recv(&mut self, buf: &mut PacketBuf) -> io::Result<bool> {
        match self.vnet.as_ref().map(|v| v.rx) {
            Some(RxMode::Whole) => return self.recv_whole(buf),
            Some(RxMode::Split) => return self.recv_split(buf),
            None => {}
        }
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
        if self.vnet.is_some() {
            return self.send_vnet(packet).await;
        }
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

    fn max_packet_len(&self) -> usize {
        match self.offload() {
            Some(RxMode::Whole) => MAX_SUPER_PACKET,
            _ => self.mtu.get(),
        }
    }

    fn segmentation_offload(&self) -> bool {
        self.vnet.is_some()
    }
}
