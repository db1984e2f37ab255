//! A peer host on the far side of an in-memory TUN: a smoltcp TCP/IP stack playing the
//! client applications, plus raw UDP and raw-packet access for the suite.

use std::collections::{HashMap, VecDeque};
use std::future::poll_fn;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};

use smoltcp::iface::{Config, Interface, SocketHandle, SocketSet};
use smoltcp::phy::{self, DeviceCapabilities, Medium};
use smoltcp::socket::tcp;
use smoltcp::time::Instant as SmolInstant;
use smoltcp::wire::{HardwareAddress, IpAddress, IpCidr};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::{Notify, mpsc};
// The test runtime's clock (simulated in the in-memory suite), as the gateway's driver uses.
use tokio::time::Instant;
use tungate_core::device::mem::MemPeer;
use tungate_core::packet::{self, Classified};

/// The peer's own addresses; the gateway's TUN side is `.1`.
pub const PEER_V4: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 2);
pub const GATEWAY_V4: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 1);
pub const PEER_V6: Ipv6Addr = Ipv6Addr::new(0xfd18, 0, 0, 0, 0, 0, 0, 2);
pub const GATEWAY_V6: Ipv6Addr = Ipv6Addr::new(0xfd18, 0, 0, 0, 0, 0, 0, 1);

/// A received UDP datagram.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Datagram {
    pub src: SocketAddr,
    pub dst: SocketAddr,
    pub payload: Vec<u8>,
}

struct Inner {
    iface: Interface,
    sockets: SocketSet<'static>,
    inbox: VecDeque<Vec<u8>>,
    outbox: VecDeque<Vec<u8>>,
    next_port: u16,
    epoch: Instant,
    mtu: usize,
}

/// The client host. Cheap to clone.
#[derive(Clone)]
pub struct PeerHost {
    inner: Arc<Mutex<Inner>>,
    poke: Arc<Notify>,
    raw_tx: mpsc::Sender<Vec<u8>>,
    udp_rx: Arc<tokio::sync::Mutex<mpsc::UnboundedReceiver<Datagram>>>,
    resets: Arc<Mutex<Vec<packet::TcpSummary>>>,
    /// TCP ports whose segments go to a [`tap`](Self::tap) instead of the peer's stack.
    taps: Taps,
}

type Taps = Arc<Mutex<HashMap<u16, mpsc::UnboundedSender<Vec<u8>>>>>;

impl std::fmt::Debug for PeerHost {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PeerHost").finish_non_exhaustive()
    }
}

fn lock(m: &Mutex<Inner>) -> MutexGuard<'_, Inner> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

struct PeerDevice<'a> {
    inbox: &'a mut VecDeque<Vec<u8>>,
    outbox: &'a mut VecDeque<Vec<u8>>,
    mtu: usize,
}

struct PeerRx(Vec<u8>);
struct PeerTx<'a>(&'a mut VecDeque<Vec<u8>>);

impl phy::RxToken for PeerRx {
    fn consume<R, F: FnOnce(&[u8]) -> R>(self, f: F) -> R {
        f(&self.0)
    }
}

impl phy::TxToken for PeerTx<'_> {
    fn consume<R, F: FnOnce(&mut [u8]) -> R>(self, len: usize, f: F) -> R {
        let mut buf = vec![0; len];
        let r = f(&mut buf);
        self.0.push_back(buf);
        r
    }
}

impl phy::Device for PeerDevice<'_> {
    type RxToken<'b>
        = PeerRx
    where
        Self: 'b;
    type TxToken<'b>
        = PeerTx<'b>
    where
        Self: 'b;

    fn receive(&mut self, _: SmolInstant) -> Option<(PeerRx, PeerTx<'_>)> {
        let p = self.inbox.pop_front()?;
        Some((PeerRx(p), PeerTx(self.outbox)))
    }

    fn transmit(&mut self, _: SmolInstant) -> Option<PeerTx<'_>> {
        Some(PeerTx(self.outbox))
    }

    fn capabilities(&self) -> DeviceCapabilities {
        let mut caps = DeviceCapabilities::default();
        caps.medium = Medium::Ip;
        caps.max_transmission_unit = self.mtu;
        caps
    }
}

impl Inner {
    fn poll(&mut self) -> Option<std::time::Duration> {
        let now = SmolInstant::from_micros(self.epoch.elapsed().as_micros() as i64);
        let mut dev = PeerDevice { inbox: &mut self.inbox, outbox: &mut self.outbox, mtu: self.mtu };
        self.iface.poll(now, &mut dev, &mut self.sockets);
        self.iface.poll_delay(now, &self.sockets).map(|d| std::time::Duration::from_micros(d.total_micros()))
    }
}

impl PeerHost {
    /// Starts the peer on `link` (the far end of the gateway's in-memory device).
    pub fn start(link: MemPeer) -> Self {
        let MemPeer { mut rx, tx, mtu } = link;
        let mtu = mtu.get();
        let mut config = Config::new(HardwareAddress::Ip);
        // Fixed, like the engine's (`mem::ENGINE_SEED`): a run repeats exactly.
        config.random_seed = 0x9ee7_5eed;
        let epoch = Instant::now();
        let (mut inbox, mut outbox) = (VecDeque::new(), VecDeque::new());
        let mut dev = PeerDevice { inbox: &mut inbox, outbox: &mut outbox, mtu };
        let mut iface = Interface::new(config, &mut dev, SmolInstant::from_micros(0));
        iface.update_ip_addrs(|a| {
            let _ = a.push(IpCidr::new(IpAddress::Ipv4(PEER_V4), 24));
            let _ = a.push(IpCidr::new(IpAddress::Ipv6(PEER_V6), 64));
        });
        let _ = iface.routes_mut().add_default_ipv4_route(GATEWAY_V4);
        let _ = iface.routes_mut().add_default_ipv6_route(GATEWAY_V6);
        let inner = Arc::new(Mutex::new(Inner {
            iface,
            sockets: SocketSet::new(Vec::new()),
            inbox,
            outbox,
            next_port: 20000,
            epoch,
            mtu,
        }));
        let poke = Arc::new(Notify::new());
        let (udp_tx, udp_rx) = mpsc::unbounded_channel();
        let resets: Arc<Mutex<Vec<packet::TcpSummary>>> = Arc::default();
        let taps: Taps = Arc::default();

        // Receiver: never blocks, so the gateway's writes always drain (no deadlock
        // between two hosts each waiting to send). UDP is tapped off before the stack.
        {
            let inner = inner.clone();
            let poke = poke.clone();
            let resets = resets.clone();
            let taps = taps.clone();
            tokio::spawn(async move {
                while let Some(p) = rx.recv().await {
                    match packet::classify(&p) {
                        Ok(Classified::Udp { src, dst, payload }) => {
                            let _ = udp_tx.send(Datagram { src, dst, payload: payload.to_vec() });
                            continue;
                        }
                        Ok(Classified::Tcp(seg)) => {
                            // Recorded, then given to the stack (or tap) like any segment.
                            if seg.rst {
                                resets.lock().unwrap_or_else(|p| p.into_inner()).push(seg);
                            }
                            if let Some(tap) = lock_taps(&taps).get(&seg.dst.port()) {
                                let _ = tap.send(p);
                                continue;
                            }
                        }
                        _ => {}
                    }
                    lock(&inner).inbox.push_back(p);
                    poke.notify_one();
                }
            });
        }
        // Poller: runs the stack and sends what it emits.
        {
            let inner = inner.clone();
            let poke = poke.clone();
            let tx = tx.clone();
            tokio::spawn(async move {
                loop {
                    let (out, delay) = {
                        let mut g = lock(&inner);
                        let delay = g.poll();
                        (std::mem::take(&mut g.outbox), delay)
                    };
                    for p in out {
                        if tx.send(p).await.is_err() {
                            return;
                        }
                    }
                    let delay = delay.unwrap_or(std::time::Duration::from_secs(1));
                    if !delay.is_zero() {
                        let _ = tokio::time::timeout(delay, poke.notified()).await;
                    }
                }
            });
        }
        PeerHost { inner, poke, raw_tx: tx, udp_rx: Arc::new(tokio::sync::Mutex::new(udp_rx)), resets, taps }
    }

    /// Takes every TCP segment the gateway sends to `port` (of either address) away from
    /// the peer's stack, for a client driven by hand ([`crate::rawtcp`]). Ports from
    /// 61000 up are never the stack's own.
    pub fn tap(&self, port: u16) -> mpsc::UnboundedReceiver<Vec<u8>> {
        let (tx, rx) = mpsc::unbounded_channel();
        lock_taps(&self.taps).insert(port, tx);
        rx
    }

    /// The peer's source address of the family of `dst`.
    pub fn local_ip_for(dst: SocketAddr) -> IpAddr {
        if dst.is_ipv4() { IpAddr::V4(PEER_V4) } else { IpAddr::V6(PEER_V6) }
    }

    /// Opens a TCP connection to `dst`; fails with `ConnectionRefused` on RST.
    pub async fn connect(&self, dst: SocketAddr) -> io::Result<PeerStream> {
        self.connect_with_buffers(dst, 512 * 1024).await
    }

    /// [`connect`](Self::connect) with `len`-byte send and receive buffers: small ones
    /// for many short connections, whose cost should be the gateway's, not the peer's.
    pub async fn connect_with_buffers(&self, dst: SocketAddr, len: usize) -> io::Result<PeerStream> {
        let (handle, local) = {
            let mut g = lock(&self.inner);
            let mut socket =
                tcp::Socket::new(tcp::SocketBuffer::new(vec![0; len]), tcp::SocketBuffer::new(vec![0; len]));
            socket.set_nagle_enabled(false);
            g.next_port = if g.next_port >= 60000 { 20000 } else { g.next_port + 1 };
            let local = SocketAddr::new(Self::local_ip_for(dst), g.next_port);
            let inner = &mut *g;
            socket
                .connect(inner.iface.context(), dst, local)
                .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, format!("{e:?}")))?;
            (inner.sockets.add(socket), local)
        };
        self.poke.notify_one();
        let stream = PeerStream { peer: self.clone(), handle, local, closed_write: false };
        poll_fn(|cx| {
            let mut g = lock(&self.inner);
            let s = g.sockets.get_mut::<tcp::Socket>(handle);
            match s.state() {
                tcp::State::SynSent | tcp::State::SynReceived => {
                    s.register_send_waker(cx.waker());
                    Poll::Pending
                }
                tcp::State::Closed => {
                    Poll::Ready(Err(io::Error::new(io::ErrorKind::ConnectionRefused, "connection refused (RST)")))
                }
                _ => Poll::Ready(Ok(())),
            }
        })
        .await?;
        Ok(stream)
    }

    /// Sends a UDP datagram `from → to` (any source address: the suite checks the
    /// gateway reports it faithfully).
    pub async fn send_udp(&self, from: SocketAddr, to: SocketAddr, payload: &[u8]) {
        let mut buf = vec![0u8; 65536];
        let n = packet::build_udp(from, to, payload, &mut buf).expect("datagram fits");
        buf.truncate(n);
        self.send_raw(buf).await;
    }

    /// Receives the next UDP datagram the gateway sent to the peer.
    pub async fn recv_udp(&self) -> Option<Datagram> {
        self.udp_rx.lock().await.recv().await
    }

    /// Every TCP RST the gateway has sent to the peer so far, as it crossed the link.
    pub fn resets(&self) -> Vec<packet::TcpSummary> {
        self.resets.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Injects a raw packet, well-formed or not.
    pub async fn send_raw(&self, packet: Vec<u8>) {
        let _ = self.raw_tx.send(packet).await;
    }
}

/// One TCP connection of the peer host.
pub struct PeerStream {
    peer: PeerHost,
    handle: SocketHandle,
    local: SocketAddr,
    closed_write: bool,
}

impl std::fmt::Debug for PeerStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PeerStream").field("local", &self.local).finish()
    }
}

impl PeerStream {
    pub fn local_addr(&self) -> SocketAddr {
        self.local
    }
}

impl AsyncRead for PeerStream {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let mut g = lock(&self.peer.inner);
        let s = g.sockets.get_mut::<tcp::Socket>(self.handle);
        if s.can_recv() {
            let n = s.recv_slice(buf.initialize_unfilled()).unwrap_or(0);
            buf.advance(n);
            drop(g);
            self.peer.poke.notify_one();
            return Poll::Ready(Ok(()));
        }
        if !s.may_recv() {
            return match s.state() {
                // Closed without having received FIN: reset.
                tcp::State::Closed if s.remote_endpoint().is_none() && !self.closed_write => {
                    Poll::Ready(Err(io::Error::new(io::ErrorKind::ConnectionReset, "reset")))
                }
                _ => Poll::Ready(Ok(())),
            };
        }
        s.register_recv_waker(cx.waker());
        Poll::Pending
    }
}

impl AsyncWrite for PeerStream {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, data: &[u8]) -> Poll<io::Result<usize>> {
        let mut g = lock(&self.peer.inner);
        let s = g.sockets.get_mut::<tcp::Socket>(self.handle);
        if !s.may_send() {
            return Poll::Ready(Err(io::Error::new(io::ErrorKind::BrokenPipe, "cannot send")));
        }
        if s.can_send() {
            let n = s.send_slice(data).unwrap_or(0);
            drop(g);
            self.peer.poke.notify_one();
            return Poll::Ready(Ok(n));
        }
        s.register_send_waker(cx.waker());
        Poll::Pending
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        lock(&self.peer.inner).sockets.get_mut::<tcp::Socket>(self.handle).close();
        self.closed_write = true;
        self.peer.poke.notify_one();
        Poll::Ready(Ok(()))
    }
}

impl Drop for PeerStream {
    fn drop(&mut self) {
        let mut g = lock(&self.peer.inner);
        let s = g.sockets.get_mut::<tcp::Socket>(self.handle);
        if s.state() == tcp::State::Closed || s.state() == tcp::State::TimeWait {
            g.sockets.remove(self.handle);
        } else {
            // Let the stack finish the close; a closed socket is collected on the next drop.
            s.close();
        }
    }
}

fn lock_taps(taps: &Taps) -> MutexGuard<'_, HashMap<u16, mpsc::UnboundedSender<Vec<u8>>>> {
    taps.lock().unwrap_or_else(|p| p.into_inner())
}
