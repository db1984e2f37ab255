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

use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use ipnet::IpNet;
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinSet;
use tungate_core::device::offload::RxMode;
use tungate_core::engine::{Engine, Handled, RX_BATCH};
use tungate_core::flow::WakeQueue;
use tungate_core::stream_stack::bridge;
use tungate_core::{Backend, BackendError, DeviceInfo, Dispatch, PacketBuf, Start};

pub use nat::{Nat, NatConfig};

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

    type Engine = SystemEngine;

    /// The kernel draws the randomness (its sequence numbers and ports).
    fn engine(self, device: DeviceInfo, handlers: Dispatch, start: Start) -> Result<SystemEngine, BackendError> {
        let mut nat = self.config.nat.clone();
        nat.mtu = device.mtu;
        {
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
            Ok(SystemEngine {
                nat: Nat::new(nat, handlers),
                listeners,
                bridges: JoinSet::new(),
                next_sweep: start.now + SWEEP_EVERY,
                accept_paused_until: None,
            })
        }
    }
}

/// How often the NAT table is swept for expired entries while it has any.
const SWEEP_EVERY: Duration = Duration::from_secs(1);

/// How long accepts pause after the listener failed (out of descriptors and the like:
/// the kernel keeps the connection queued meanwhile).
const ACCEPT_BACKOFF: Duration = Duration::from_millis(10);

/// The system stack as an [`Engine`] for the one driver: packets are rewritten in place
/// and written back ([`Handled::Transmit`]); the kernel listeners' accepts and the
/// bridges' ends are its polled input.
pub struct SystemEngine {
    nat: Nat,
    listeners: Vec<TcpListener>,
    /// Bridges end with the engine: dropping the set aborts them and their ports report
    /// a reset to the handlers.
    bridges: JoinSet<()>,
    next_sweep: Instant,
    accept_paused_until: Option<Instant>,
}

impl std::fmt::Debug for SystemEngine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SystemEngine")
            .field("nat", &self.nat)
            .field("bridges", &self.bridges.len())
            .finish_non_exhaustive()
    }
}

impl SystemEngine {
    /// A connection the kernel accepted from `peer` (a NAT address): handed to its flow's
    /// handler (the kernel socket itself if the handler takes it, else bridged to the
    /// flow's rings), or reset if it is no flow of ours (someone dialled G:L directly,
    /// or a flow that already ended).
    fn accepted(&mut self, stream: TcpStream, peer: SocketAddr) {
        let Some((client, dst, port)) = self.nat.take_port(peer) else {
            let _ = socket2::SockRef::from(&stream).set_linger(Some(Duration::ZERO));
            return;
        };
        let _ = stream.set_nodelay(true);
        tracing::debug!(%client, %dst, nat = %peer, "accepted");
        if let Err((stream, port)) = port.hand_over(stream) {
            self.bridges.spawn(async move {
                bridge(stream, port).await;
            });
        }
    }
}

impl Engine for SystemEngine {
    /// One buffer, read → rewrite → write, packet by packet: the write copies bytes the
    /// read just put in cache.
    const READ_BUFFERS: usize = 1;

    fn handle_packet(&mut self, now: Instant, packet: &mut PacketBuf) -> Handled {
        self.nat.handle_packet(now, packet)
    }

    fn handle_wakeups(&mut self, now: Instant) {
        self.nat.service(now);
    }

    fn handle_timeout(&mut self, now: Instant) {
        if now >= self.next_sweep {
            if self.nat.needs_sweep() {
                self.nat.sweep(now);
            }
            self.next_sweep = now + SWEEP_EVERY;
        }
        if self.accept_paused_until.is_some_and(|t| now >= t) {
            self.accept_paused_until = None;
        }
    }

    fn poll_timeout(&mut self) -> Option<Instant> {
        let sweep = self.nat.needs_sweep().then_some(self.next_sweep);
        sweep.into_iter().chain(self.accept_paused_until).min()
    }

    fn poll_transmit(&mut self) -> Option<PacketBuf> {
        self.nat.poll_transmit()
    }

    fn wake_queue(&self) -> Arc<WakeQueue> {
        self.nat.wake_queue()
    }

    fn flows(&mut self) -> Option<&mut dyn tungate_core::admission::Flows> {
        Some(self.nat.flows())
    }

    fn poll_io(&mut self, cx: &mut Context<'_>, now: Instant) -> Poll<io::Result<()>> {
        let mut progress = false;
        while let Poll::Ready(Some(_)) = self.bridges.poll_join_next(cx) {
            progress = true;
        }
        if self.accept_paused_until.is_none() {
            'listeners: for i in 0..self.listeners.len() {
                // At most a batch per listener per pass, so packets are not starved.
                for _ in 0..RX_BATCH {
                    match self.listeners[i].poll_accept(cx) {
                        Poll::Ready(Ok((stream, peer))) => self.accepted(stream, peer),
                        Poll::Ready(Err(e)) => {
                            tracing::warn!("accept failed: {e}");
                            self.accept_paused_until = Some(now + ACCEPT_BACKOFF);
                        }
                        Poll::Pending => break,
                    }
                    progress = true;
                    if self.accept_paused_until.is_some() {
                        break 'listeners;
                    }
                }
            }
        }
        if progress { Poll::Ready(Ok(())) } else { Poll::Pending }
    }
}
