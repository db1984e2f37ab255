//! The one handler the gateway runs: name the flow, connect it through the upstream,
//! refuse it the way a direct refusal would look if that fails, relay.
//!
//! ```text
//! TcpRequest ─▶ [fake-IP: the name the destination stands for; unmapped → refused]
//!            ─▶ [--dns hijack: port 53 → the configured resolver]
//!            ─▶ [--sniff: peek the first bytes for a TLS SNI / HTTP Host, at most the
//!                timeout; the name becomes the target]
//!            ─▶ connect(target) ──ok──▶ accept ─▶ relay
//!                      └─err─▶ reject: RST to the client's SYN (its connect is refused;
//!                              after a sniff the handshake is done, so it is a reset)
//! UdpSession ─▶ [fake-IP naming as for TCP]
//!            ─▶ port 53 and DNS handling on: each query answered from the fake-IP pool,
//!               or forwarded (to the hijack resolver; over TCP with --dns-over-tcp)
//!            ─▶ otherwise open_udp(target) on the first datagram ─▶ datagrams both ways
//!                      └─NoUdp─▶ --udp policy: drop, or the direct path
//! ```
//!
//! The router holds its upstream as `Arc<dyn Connector>` and never asks which one it is.

use std::str::FromStr;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use tungate_api::{Endpoints, NameSource, Stats, Target, TcpHandler, TcpRequest, UdpHandler, UdpSession};

use crate::connector::{ConnectError, Connector, UdpPath};
use crate::dns::{Answer, DnsConfig, TcpDns, answer};
use crate::sniff::{MAX_SNIFF, Sniffed, sniff};

/// What UDP does when the upstream cannot carry it (an HTTP proxy; a SOCKS5 server that
/// refuses UDP ASSOCIATE).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UdpPolicy {
    /// Through the upstream only; what it cannot carry is dropped and counted.
    Proxy,
    /// Through the upstream when it can; otherwise sent directly from the gateway (around
    /// the proxy, with `--mark`).
    Direct,
    /// Never carried: every UDP datagram is dropped and counted.
    Drop,
}

impl FromStr for UdpPolicy {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "proxy" => Ok(UdpPolicy::Proxy),
            "direct" => Ok(UdpPolicy::Direct),
            "drop" => Ok(UdpPolicy::Drop),
            _ => Err(format!("{s:?} is not a UDP policy (proxy, direct or drop)")),
        }
    }
}

/// The router's settings.
#[derive(Debug, Clone)]
pub struct RouterConfig {
    pub udp: UdpPolicy,
    /// Upper bound on connecting a flow through the upstream (dial and handshake); the
    /// client then gets RST.
    pub connect_timeout: Duration,
    /// Close a TCP relay after this long without a byte either way.
    pub tcp_idle_timeout: Duration,
    /// Once one direction of a TCP relay has ended (its FIN passed), close it after this
    /// long without a byte.
    pub tcp_half_close_timeout: Duration,
    /// End a UDP session after this long without a datagram either way.
    pub udp_idle_timeout: Duration,
    /// `--sniff`: read a name from each TCP flow's first bytes (TLS SNI, HTTP Host),
    /// waiting at most this long for them. The client's handshake completes before the
    /// upstream is asked, so a refusal then reaches the client as a reset.
    pub sniff: Option<Duration>,
    /// Fake-IP answers, hijacking and DNS over TCP.
    pub dns: DnsConfig,
    /// The host's own addresses (`--capture-local`): flows to them are dialled by the
    /// gateway itself (the direct path), whatever the upstream: a proxy's loopback is
    /// not this host's.
    pub local: Vec<ipnet::IpNet>,
}

impl Default for RouterConfig {
    fn default() -> Self {
        RouterConfig {
            udp: UdpPolicy::Proxy,
            connect_timeout: Duration::from_secs(15),
            // As common NATs do: long for TCP, short for UDP.
            tcp_idle_timeout: Duration::from_secs(600),
            // Linux conntrack's FIN-WAIT timeout.
            tcp_half_close_timeout: Duration::from_secs(120),
            udp_idle_timeout: tungate_api::udp::DEFAULT_IDLE_TIMEOUT,
            sniff: None,
            dns: DnsConfig::default(),
            local: Vec::new(),
        }
    }
}

/// How long a "this upstream does not carry UDP" answer is believed before it is asked
/// again.
const NO_UDP_MEMORY: Duration = Duration::from_secs(60);

/// How long a DNS session (and its TCP connection to the resolver) outlives its last
/// query or response.
const DNS_IDLE_TIMEOUT: Duration = Duration::from_secs(10);

/// The gateway's handler for TCP and UDP; see the module docs.
#[derive(Debug, Clone)]
pub struct Router {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    upstream: Arc<dyn Connector>,
    /// Where UDP goes under [`UdpPolicy::Direct`] when the upstream cannot carry it.
    direct: Arc<dyn Connector>,
    config: RouterConfig,
    stats: Arc<Stats>,
    /// Set once the credentials error has been logged at error level.
    auth_logged: AtomicBool,
    /// When the upstream last said it does not carry UDP.
    no_udp_since: Mutex<Option<Instant>>,
    /// Last warning about an unreachable upstream (one line per 10 s, not per flow).
    io_logged: Mutex<Option<Instant>>,
}

impl Router {
    /// `upstream` carries the flows; `direct` carries UDP under [`UdpPolicy::Direct`].
    pub fn new(
        upstream: Arc<dyn Connector>,
        direct: Arc<dyn Connector>,
        config: RouterConfig,
        stats: Arc<Stats>,
    ) -> Self {
        Router {
            inner: Arc::new(Inner {
                upstream,
                direct,
                config,
                stats,
                auth_logged: AtomicBool::new(false),
                no_udp_since: Mutex::new(None),
                io_logged: Mutex::new(None),
            }),
        }
    }
}

impl Inner {
    /// Counts a failed flow and logs why: a credentials error once, at error level (every
    /// flow fails the same way); an unreachable proxy at most every 10 s; a refused
    /// destination per flow at debug, as a direct refusal would be.
    fn failed(&self, src: std::net::SocketAddr, e: &ConnectError) {
        Stats::inc(&self.stats.upstream_failed);
        let s = &self.stats;
        Stats::inc(match e {
            ConnectError::Refused { .. } | ConnectError::Target { .. } => &s.upstream_refused,
            ConnectError::Auth { .. } => &s.upstream_auth_failed,
            ConnectError::NoUdp { .. } => &s.upstream_unroutable,
            ConnectError::Io { source, .. } if source.kind() == std::io::ErrorKind::TimedOut => &s.upstream_timeouts,
            ConnectError::Io { .. } => &s.upstream_io_errors,
        });
        match e {
            ConnectError::Auth { .. } => {
                if !self.auth_logged.swap(true, Ordering::Relaxed) {
                    tracing::error!("{e}; every connection through it is refused (check the credentials in --proxy)");
                } else {
                    tracing::debug!(%src, "{e}");
                }
            }
            ConnectError::Io { .. } => {
                let mut last = self.io_logged.lock().unwrap_or_else(|p| p.into_inner());
                if last.is_none_or(|t| t.elapsed() >= Duration::from_secs(10)) {
                    *last = Some(Instant::now());
                    tracing::warn!("{e}");
                } else {
                    tracing::debug!(%src, "{e}");
                }
            }
            _ => tracing::debug!(%src, "{e}"),
        }
    }

    /// Names a flow by its destination: a fake address becomes the name it stands for,
    /// and a DNS query is sent to the hijack resolver. `Err` for a fake address that is
    /// not mapped (never handed out, or evicted since): such a flow is refused, never
    /// sent to whatever host the address might be.
    fn name(&self, flow: &mut Endpoints) -> Result<(), ()> {
        let dst = flow.dst();
        let in_pool = self.config.dns.fake_ip.as_ref().filter(|f| f.contains(dst.ip()));
        // A query to a resolver address inside the pool (`dig @198.19.255.53`) is answered
        // here like one to any other address: it names nothing (see `serve_dns`).
        let resolver_in_pool = dst.port() == 53 && self.config.dns.intercepts();
        if let Some(fake) = in_pool.filter(|_| !resolver_in_pool) {
            let Some(name) = fake.lookup(dst.ip()) else {
                tracing::debug!(src = %flow.src(), %dst, "fake address not mapped (expired?); refused");
                Stats::inc(&self.stats.upstream_failed);
                Stats::inc(&self.stats.upstream_unroutable);
                return Err(());
            };
            Stats::inc(&self.stats.fake_ip_hits);
            flow.set_target(Target::Domain { name: name.to_string(), port: dst.port() }, NameSource::FakeIp);
        }
        if let (53, Some(resolver)) = (dst.port(), self.config.dns.hijack) {
            flow.set_target(Target::Addr(resolver), NameSource::Other("dns-hijack"));
        }
        Ok(())
    }

    /// Peeks at the flow's first bytes, for at most `wait` in all, and renames it to
    /// the host they name. Nothing is consumed.
    async fn sniff(&self, request: &mut TcpRequest, wait: Duration) -> std::io::Result<()> {
        let deadline = tokio::time::Instant::now() + wait;
        let mut buf = vec![0u8; MAX_SNIFF];
        let mut need = 1;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            // An error: the client reset while we waited; nothing to connect.
            let n = request.peek_at_least(&mut buf, need, left).await?;
            match sniff(&buf[..n]) {
                Sniffed::Name(name, source) => {
                    tracing::debug!(src = %request.src(), dst = %request.dst(), %name, %source, "sniffed");
                    let s = &self.stats;
                    Stats::inc(if source == NameSource::TlsSni { &s.sniffed_tls } else { &s.sniffed_http });
                    let port = request.dst().port();
                    request.set_target(Target::Domain { name, port }, source);
                    return Ok(());
                }
                // Timed out (fewer bytes than asked for), or the client half-closed.
                Sniffed::NeedMore(more) if n >= need && more > n => need = more,
                _ => {
                    Stats::inc(&self.stats.sniffed_nothing);
                    return Ok(());
                }
            }
        }
    }

    /// Whether `ip` is one of the host's own addresses (`--capture-local`).
    fn is_local(&self, ip: std::net::IpAddr) -> bool {
        self.config.local.iter().any(|n| n.contains(&ip))
    }

    /// The upstream, or the direct path for the host's own addresses.
    fn upstream_for(&self, target: &Target) -> &Arc<dyn Connector> {
        match target {
            Target::Addr(a) if self.is_local(a.ip()) => &self.direct,
            _ => &self.upstream,
        }
    }

    async fn connect(&self, target: &Target) -> Result<tokio::net::TcpStream, ConnectError> {
        match tokio::time::timeout(self.config.connect_timeout, self.upstream_for(target).connect(target)).await {
            Ok(result) => result,
            // The dial itself has its own, shorter limit (`Dialer`): this one catches a
            // proxy that accepts and then never answers.
            Err(_) => Err(ConnectError::Io {
                upstream: "the upstream".into(),
                what: "connecting",
                source: std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    format!("no connection to {target} within {:?}", self.config.connect_timeout),
                ),
            }),
        }
    }

    /// `connector.open_udp`, bounded like a TCP connect (a proxy that never answers UDP
    /// ASSOCIATE must not hold the session, whose idle timer runs only while it is read).
    async fn open_udp(
        &self,
        connector: &Arc<dyn Connector>,
        target: &Target,
    ) -> Result<Box<dyn UdpPath>, ConnectError> {
        match tokio::time::timeout(self.config.connect_timeout, connector.open_udp(target)).await {
            Ok(result) => result,
            Err(_) => Err(ConnectError::Io {
                upstream: "the upstream".into(),
                what: "opening a UDP path",
                source: std::io::ErrorKind::TimedOut.into(),
            }),
        }
    }

    /// The path for a UDP session, or `None` (dropped) as the policy says.
    async fn udp_path(&self, src: std::net::SocketAddr, target: &Target) -> Option<Box<dyn UdpPath>> {
        // The host's own addresses are dialled by the gateway whatever the policy says
        // about the upstream.
        let local = matches!(target, Target::Addr(a) if self.is_local(a.ip()));
        if !local {
            if self.config.udp == UdpPolicy::Drop {
                return None;
            }
            let believed = self
                .no_udp_since
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .is_some_and(|t| t.elapsed() < NO_UDP_MEMORY);
            if !believed {
                match self.open_udp(&self.upstream, target).await {
                    Ok(path) => return Some(path),
                    Err(e @ ConnectError::NoUdp { .. }) => {
                        let first = self
                            .no_udp_since
                            .lock()
                            .unwrap_or_else(|p| p.into_inner())
                            .replace(Instant::now())
                            .is_none();
                        let then = match self.config.udp {
                            UdpPolicy::Direct => "sending UDP directly (--udp direct)",
                            _ => "dropping UDP (--udp proxy; --udp direct sends it around the proxy)",
                        };
                        if first {
                            tracing::warn!("{e}: {then}");
                        } else {
                            tracing::debug!("{e}: {then}");
                        }
                    }
                    Err(e) => {
                        self.failed(src, &e);
                        return None;
                    }
                }
            }
            if self.config.udp != UdpPolicy::Direct {
                Stats::inc(&self.stats.upstream_failed);
                Stats::inc(&self.stats.upstream_unroutable);
                return None;
            }
        }
        match self.open_udp(&self.direct, target).await {
            Ok(path) => Some(path),
            Err(e) => {
                self.failed(src, &e);
                None
            }
        }
    }
}

impl Inner {
    /// A client's DNS session: each query answered from the fake-IP pool or forwarded
    /// (to the session's target: the destination or the hijack resolver), each response
    /// returned as from the address the client asked.
    async fn serve_dns(&self, mut session: UdpSession) {
        // Resolvers use a new port per query: a session (and its TCP connection under
        // --dns-over-tcp) is done long before the 60 s of other UDP.
        session.set_idle_timeout(DNS_IDLE_TIMEOUT);
        let (src, target) = (session.src(), session.target().clone());
        let mut forward: Option<Box<dyn UdpPath>> = None;
        loop {
            let response = async {
                match &forward {
                    Some(path) => path.recv_from().await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                query = session.recv() => {
                    let Some(query) = query else { return };
                    if let Some(fake) = &self.config.dns.fake_ip {
                        if let Answer::Reply(reply) = answer(&query, fake, self.config.dns.fake_ip_ttl) {
                            Stats::inc(&self.stats.dns_fake_answers);
                            let _ = session.send(&reply);
                            continue;
                        }
                    }
                    // A resolver address inside the fake pool exists only here: nowhere
                    // to forward to.
                    let fake_resolver = matches!(&target, Target::Addr(a)
                        if self.config.dns.fake_ip.as_ref().is_some_and(|f| f.contains(a.ip())));
                    if fake_resolver {
                        Stats::inc(&self.stats.udp_dropped);
                        continue;
                    }
                    Stats::inc(&self.stats.dns_forwarded);
                    if forward.is_none() {
                        forward = self.dns_path(src, &target).await;
                    }
                    let sent = match &forward {
                        Some(path) => path.send_to(&target, &query).await,
                        None => Err(std::io::ErrorKind::NotConnected.into()),
                    };
                    if let Err(e) = sent {
                        tracing::debug!(%src, %target, error = %e, "dns query not forwarded");
                        Stats::inc(&self.stats.udp_dropped);
                        // A broken TCP connection is opened again for the next query.
                        forward = None;
                    }
                }
                response = response => match response {
                    Ok(Some((_, response))) => { let _ = session.send(&response); }
                    // The resolver (or proxy) closed the TCP connection: reopen on demand.
                    Ok(None) => forward = None,
                    Err(e) => tracing::trace!(%src, %target, error = %e, "dns recv"),
                },
            }
        }
    }

    /// Where a session's forwarded queries go: a TCP connection through the upstream
    /// under --dns-over-tcp, else the session's UDP path.
    async fn dns_path(&self, src: std::net::SocketAddr, target: &Target) -> Option<Box<dyn UdpPath>> {
        if !self.config.dns.over_tcp {
            return self.udp_path(src, target).await;
        }
        match self.connect(target).await {
            Ok(stream) => {
                let from = match target {
                    Target::Addr(a) => *a,
                    Target::Domain { port, .. } => (std::net::Ipv4Addr::UNSPECIFIED, *port).into(),
                };
                Some(Box::new(TcpDns::new(stream, from)))
            }
            Err(e) => {
                self.failed(src, &e);
                None
            }
        }
    }
}

impl TcpHandler for Router {
    fn handle_tcp(&self, request: TcpRequest) {
        let inner = self.inner.clone();
        tokio::spawn(async move {
            let mut request = request;
            if inner.name(&mut request).is_err() {
                request.reject();
                return;
            }
            // A flow to the host's own address keeps it: it is dialled by the gateway,
            // never named for a proxy.
            let local = inner.is_local(request.dst().ip());
            if let Some(wait) = inner.config.sniff.filter(|_| !local) {
                // A fake-IP name is already the one the client asked for.
                if request.naming().source == NameSource::Destination && inner.sniff(&mut request, wait).await.is_err()
                {
                    request.reject();
                    return;
                }
            }
            let (src, target) = (request.src(), request.target().clone());
            // Asked before the client's handshake completes (unless sniffed): a refusal
            // is a refused connect.
            let upstream = match inner.connect(&target).await {
                Ok(s) => s,
                Err(e) => {
                    inner.failed(src, &e);
                    request.reject();
                    return;
                }
            };
            let client = request.accept().await;
            let timeouts = tungate_api::relay::Timeouts {
                idle: inner.config.tcp_idle_timeout,
                half_close: inner.config.tcp_half_close_timeout,
            };
            match client.relay(upstream, timeouts).await {
                Ok(s) => tracing::debug!(%src, %target, up = s.a_to_b, down = s.b_to_a, "tcp relay done"),
                Err(e) => tracing::debug!(%src, %target, error = %e, "tcp relay failed; both sides reset"),
            }
        });
    }
}

impl UdpHandler for Router {
    fn handle_udp(&self, mut session: UdpSession) {
        let inner = self.inner.clone();
        session.set_idle_timeout(inner.config.udp_idle_timeout);
        tokio::spawn(async move {
            let named = inner.name(&mut session);
            if named.is_ok() && session.dst().port() == 53 && inner.config.dns.intercepts() {
                inner.serve_dns(session).await;
                return;
            }
            let (src, target) = (session.src(), session.target().clone());
            let path = match named {
                Ok(()) => inner.udp_path(src, &target).await,
                Err(()) => None,
            };
            let Some(path) = path else {
                // The session stays open (and its datagrams are counted as dropped
                // here) until it goes idle, so a client retrying is not re-asked for
                // each datagram.
                while session.recv().await.is_some() {
                    Stats::inc(&inner.stats.udp_dropped);
                }
                return;
            };
            // A renamed session (a fake address, a hijacked query) was sent to `dst` by
            // the client: its replies must come from there, whatever the name resolved
            // to. Otherwise full cone: from whoever answered.
            let renamed = target != Target::Addr(session.dst());
            loop {
                tokio::select! {
                    datagram = session.recv() => match datagram {
                        Some(d) => if let Err(e) = path.send_to(&target, &d).await {
                            tracing::debug!(%src, %target, error = %e, "udp send upstream failed");
                            Stats::inc(&inner.stats.udp_dropped);
                        },
                        None => return,
                    },
                    reply = path.recv_from() => match reply {
                        // Full cone: a reply from any address reaches the client as from that address.
                        Ok(Some((from, reply))) => {
                            let _ = if renamed { session.send(&reply) } else { session.send_from(from, &reply) };
                        }
                        Ok(None) => {
                            tracing::debug!(%src, %target, "the upstream ended the UDP association");
                            return;
                        }
                        // The destination refused (an ICMP port unreachable to the
                        // upstream's socket): the client is told the same way. Other
                        // ICMP errors surface as recv errors too; none ends the session.
                        Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
                            tracing::debug!(%src, %target, "udp destination refused");
                            let _ = session.refused();
                        }
                        Err(e) => tracing::trace!(%src, %target, error = %e, "udp recv"),
                    },
                }
            }
        });
    }
}
