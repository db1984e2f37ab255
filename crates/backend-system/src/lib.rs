//! The kernel "system" stack: the kernel's own TCP terminates every connection; tungate
//! only rewrites headers.
//!
//! # How a packet travels
//!
//! ```text
//! app S:sp → D:dp ─▶ TUN ─▶ Nat::handle_packet: rewrite to F:np → G:L ─▶ TUN ─▶ kernel TCP
//!                                                                    (listener on G:L)
//! app ◀─ TUN ◀─ rewrite to D:dp → S:sp ◀─ Nat::handle_packet ◀─ TUN ◀─ G:L → F:np ◀┘
//!
//! listener.accept() → peer F:np → Nat::take_port → (S:sp, D:dp, FlowPort)
//!                   → FlowPort::hand_over: the handler's TcpConn is the kernel socket
//!                     (relayed with splice(2)); a handler that gave up waiting gets a reset
//! ```
//!
//! G is the TUN's own address (from `--address`), F one of a few fake client addresses
//! right after G in the TUN's prefix. The kernel does TCP on both legs — window scaling,
//! SACK, congestion control, retransmission — so user space never segments or ACKs.
//! With TUN offload ([`RxMode::Whole`]) the rewrite happens on 64 KiB super-packets, one
//! read and one write each. UDP takes tungate's own path, as in every backend.
//!
//! This backend needs a real kernel TUN in the same network namespace as its listener:
//! it has no in-memory form, so the conformance suite runs it through a TUN only.
//!
//! # What it supports
//!
//! IPv4 and IPv6 (each needs a TUN address of its family with room for the fake clients
//! in its prefix); every contract of `tungate-api`, with the handler's `TcpConn` being
//! the kernel socket itself (`peek` is `MSG_PEEK`, `abort` a zero-linger close, `relay`
//! `splice(2)`); TUN offload (`--offload`, super-packets rewritten whole). Not: IP
//! fragments or ICMP (counted as unsupported); more than 64 512 × fake-client
//! concurrent connections per family.

pub mod checksum;
pub mod nat;

use std::future::{Future, poll_fn};
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::task::Poll;
use std::time::{Duration, Instant};

use ipnet::IpNet;
use tokio::net::TcpListener;
use tungate_core::device::offload::RxMode;
use tungate_core::engine::RX_BATCH;
use tungate_core::stream_stack::bridge;
use tungate_core::{Backend, BackendError, Dispatch, PacketBuf, PacketDevice, Stats};

pub use nat::{Nat, NatConfig};
use tungate_core::admission::Verdict;

/// Settings of the system backend.
#[derive(Debug, Clone)]
pub struct SystemConfig {
    /// The TUN's own addresses: the first IPv4 and the first IPv6 one become the
    /// listeners' addresses G; the fake client addresses F follow them in their prefix.
    pub addresses: Vec<IpNet>,
    /// Fake client addresses per family. Each gives 64 512 NAT ports; four make room for
    /// a quarter of a million flows, including those resting after TIME-WAIT.
    pub fake_clients: usize,
    /// Listen backlog: SYNs arrive as fast as clients connect, and the accept loop shares
    /// one thread with everything else.
    pub backlog: i32,
    pub nat: NatConfig,
}

impl Default for SystemConfig {
    fn default() -> Self {
        SystemConfig { addresses: Vec::new(), fake_clients: 4, backlog: 4096, nat: NatConfig::default() }
    }
}

/// The system backend. See the crate docs.
#[derive(Debug, Clone, Default)]
pub struct System {
    pub config: SystemConfig,
}

impl System {
    /// A system backend for a TUN with these addresses.
    pub fn new(addresses: &[IpNet]) -> Self {
        System { config: SystemConfig { addresses: addresses.to_vec(), ..Default::default() } }
    }
}

const NEEDS_ADDRESS: &str = "the system stack needs the TUN's own address (--address) to listen on";

/// The listener address G and `count` fake client addresses after it in its prefix.
pub fn plan_addresses(net: &IpNet, count: usize) -> Result<(IpAddr, Vec<IpAddr>), String> {
    let g = net.addr();
    // Host addresses after G first, then those before it; never the network address
    // (nor, for IPv4, the broadcast address).
    let pick = |start: u128, first: u128, end: u128| -> Vec<u128> {
        (start + 1..end).chain(first + 1..start).take(count).collect()
    };
    let fakes: Vec<IpAddr> = match net {
        IpNet::V4(n) => {
            let (first, last) = (u32::from(n.network()), u32::from(n.broadcast()));
            pick(u32::from(n.addr()).into(), first.into(), last.into())
                .into_iter()
                .map(|a| IpAddr::V4(Ipv4Addr::from(a as u32)))
                .collect()
        }
        IpNet::V6(n) => {
            let (first, last) = (u128::from(n.network()), u128::from(n.broadcast()));
            pick(u128::from(n.addr()), first, last.saturating_add(1))
                .into_iter()
                .map(|a| IpAddr::V6(Ipv6Addr::from(a)))
                .collect()
        }
    };
    if fakes.is_empty() {
        return Err(format!(
            "--address {net}: the prefix has no room for the fake client addresses the system stack needs (use a prefix of /30 or shorter)"
        ));
    }
    Ok((g, fakes))
}

/// A listener on `ip` (port chosen by the kernel). `IP_FREEBIND`: an IPv6 address may
/// still be tentative (DAD) when the gateway starts.
fn listen(ip: IpAddr, backlog: i32) -> io::Result<TcpListener> {
    use socket2::{Domain, Protocol, Socket, Type};
    let domain = if ip.is_ipv4() { Domain::IPV4 } else { Domain::IPV6 };
    let socket = Socket::new(domain, Type::STREAM, Some(Protocol::TCP))?;
    if ip.is_ipv6() {
        socket.set_only_v6(true)?;
        socket.set_freebind_ipv6(true)?;
    } else {
        socket.set_freebind(true)?;
    }
    socket.set_reuse_address(true)?;
    socket.bind(&SocketAddr::new(ip, 0).into())?;
    socket.listen(backlog)?;
    socket.set_nonblocking(true)?;
    TcpListener::from_std(socket.into())
}

impl Backend for System {
    const NAME: &'static str = "system";
    const RX_OFFLOAD: Option<RxMode> = Some(RxMode::Whole);

    fn validate(&self) -> Result<(), BackendError> {
        let mut any = false;
        for family_v4 in [true, false] {
            if let Some(net) = self.config.addresses.iter().find(|a| a.addr().is_ipv4() == family_v4) {
                plan_addresses(net, self.config.fake_clients).map_err(BackendError::Config)?;
                any = true;
            }
        }
        if !any {
            return Err(BackendError::Config(NEEDS_ADDRESS.into()));
        }
        Ok(())
    }

    fn run<D: PacketDevice>(
        self,
        device: D,
        handlers: Dispatch,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> impl Future<Output = Result<(), BackendError>> + Send {
        let mut nat = self.config.nat.clone();
        nat.mtu = device.mtu();
        async move {
            let mut listeners = Vec::new();
            for family_v4 in [true, false] {
                let Some(net) = self.config.addresses.iter().find(|a| a.addr().is_ipv4() == family_v4) else {
                    continue;
                };
                let (g, fakes) = plan_addresses(net, self.config.fake_clients).map_err(BackendError::Config)?;
                let listener = listen(g, self.config.backlog).map_err(|source| BackendError::Listen {
                    addr: g,
                    what: format!("the TUN address, --address {net}"),
                    source,
                })?;
                let local = listener.local_addr()?;
                tracing::info!(listen = %local, fake_clients = ?fakes, "system stack listening");
                for f in fakes {
                    match f {
                        IpAddr::V4(a) => nat.fake_v4.push(a),
                        IpAddr::V6(a) => nat.fake_v6.push(a),
                    }
                }
                if family_v4 {
                    nat.listen_v4 = Some(local);
                } else {
                    nat.listen_v6 = Some(local);
                }
                listeners.push(listener);
            }
            if listeners.is_empty() {
                return Err(BackendError::Config(NEEDS_ADDRESS.into()));
            }
            let stats = handlers.stats.clone();
            drive(Nat::new(nat, handlers), device, listeners, stats, shutdown).await?;
            Ok(())
        }
    }
}

/// Writes one packet; a packet the kernel refuses (`EINVAL`: a header it will not take)
/// or the fallback splitter cannot split is dropped and counted (`tx_refused`: our own
/// output, not malformed input) instead of stopping the gateway.
async fn send<D: PacketDevice>(device: &mut D, packet: &PacketBuf, stats: &Stats) -> io::Result<()> {
    match device.send(packet).await {
        Ok(()) => Ok(()),
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) || e.kind() == io::ErrorKind::InvalidInput => {
            tracing::debug!("the TUN refused a packet: {e}");
            Stats::inc(&stats.tx_refused);
            Ok(())
        }
        Err(e) => Err(e),
    }
}

/// The backend's one task: TUN reads and rewrites, handler decisions, accepts, sweeps.
async fn drive<D: PacketDevice>(
    mut nat: Nat,
    mut device: D,
    listeners: Vec<TcpListener>,
    stats: std::sync::Arc<Stats>,
    shutdown: impl Future<Output = ()>,
) -> io::Result<()> {
    let wake = nat.wake_queue();
    let capacity = device.max_packet_len();
    let mut buf = PacketBuf::with_capacity(capacity);
    // Bridges end with the driver: dropping the set aborts them and their ports report
    // a reset to the handlers.
    let mut bridges = tokio::task::JoinSet::new();
    let mut sweep = tokio::time::interval(Duration::from_secs(1));
    sweep.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    tokio::pin!(shutdown);
    loop {
        nat.service(Instant::now());
        while let Some(packet) = nat.poll_transmit() {
            send(&mut device, &packet, &stats).await?;
            nat.recycle(packet);
        }
        let accept = poll_fn(|cx| {
            for l in &listeners {
                if let Poll::Ready(r) = l.poll_accept(cx) {
                    return Poll::Ready(r);
                }
            }
            Poll::Pending
        });
        tokio::select! {
            biased;
            () = &mut shutdown => return Ok(()),
            ready = device.readable() => {
                ready?;
                // One buffer, read → rewrite → write, packet by packet: the write copies
                // bytes the read just put in cache (a batch of 64 KiB super-packets would
                // cycle through megabytes and miss it).
                let now = Instant::now();
                for _ in 0..RX_BATCH {
                    if !device.try_recv(&mut buf)? {
                        break;
                    }
                    if nat.handle_packet(now, &mut buf) == Verdict::Forward {
                        send(&mut device, &buf, &stats).await?;
                    }
                }
            }
            accepted = accept => match accepted {
                Ok((stream, peer)) => match nat.take_port(peer) {
                    Some((client, dst, port)) => {
                        let _ = stream.set_nodelay(true);
                        tracing::debug!(%client, %dst, nat = %peer, "accepted");
                        // The handler takes the kernel socket itself if it can; else
                        // the bytes cross the flow's rings.
                        if let Err((stream, port)) = port.hand_over(stream) {
                            bridges.spawn(async move {
                                bridge(stream, port).await;
                            });
                        }
                    }
                    // Not a flow of ours (someone dialled G:L directly, or a flow that
                    // already ended): refuse with RST.
                    None => {
                        let _ = socket2::SockRef::from(&stream).set_linger(Some(Duration::ZERO));
                    }
                },
                // Out of descriptors and the like: the kernel keeps the connection queued.
                Err(e) => {
                    tracing::warn!("accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            },
            Some(_) = bridges.join_next(), if !bridges.is_empty() => {}
            () = wake.notified() => {}
            _ = sweep.tick(), if nat.needs_sweep() => nat.sweep(Instant::now()),
        }
    }
}
