//! The command line shared by every variant binary. A variant's `main` names its backend
//! and how to build it; everything else (flags, TUN set-up, upstream, signals) is here.

use std::net::IpAddr;
use std::process::ExitCode;
use std::str::FromStr;
use std::sync::Arc;
use tracing_subscriber::filter::Targets;
use tracing_subscriber::prelude::*;

use tungate_core::events::{Event, Ready};

use anyhow::{Context, bail};

mod metrics;
pub mod setup;
use clap::Parser;
use ipnet::IpNet;
use tungate_core::device::capture::Capture;
use tungate_core::device::offload::Offload;
use tungate_core::device::tun::{TunConfig, TunDevice};
use tungate_core::icmp::IcmpMode;
use tungate_core::{Backend, Dispatch, Mtu};
use tungate_upstream::dns::{DnsConfig, FakeIp};
use tungate_upstream::{Dialer, ProxySpec, Router, RouterConfig, UdpPolicy};

/// A TUN gateway: terminates every TCP connection and UDP flow that enters the TUN and
/// hands it, with its real source and original destination, to an upstream.
///
/// The program creates (or adopts) the TUN and assigns its addresses. With --setup it also
/// routes traffic into the TUN (a table and a policy rule of its own, loop-free: its own
/// sockets carry --mark and skip them) and removes all of it on exit; without, route the
/// traffic yourself (see the example below).
#[derive(Debug, Parser)]
#[command(version, after_help = EXAMPLE)]
pub struct Args {
    /// Create (or attach to) the TUN interface NAME.
    #[arg(long, value_name = "NAME", required_unless_present = "tun_fd", conflicts_with = "tun_fd")]
    pub tun: Option<String>,

    /// Adopt an already-open TUN file descriptor (Android VpnService, a supervisor).
    /// Its addresses are not changed; --address only tells the stack its own addresses.
    #[arg(long, value_name = "FD")]
    pub tun_fd: Option<i32>,

    /// Link MTU of the TUN, which is also the stack's packet size (576-65535; IPv6 needs 1280).
    #[arg(long, value_name = "N", default_value = "1500", value_parser = parse_mtu)]
    pub mtu: Mtu,

    /// Address of the TUN as ADDRESS/PREFIX, IPv4 or IPv6; repeatable.
    #[arg(long = "address", value_name = "CIDR", value_parser = parse_cidr)]
    pub addresses: Vec<IpNet>,

    #[command(flatten)]
    pub upstream: UpstreamArgs,

    /// TUN offload (Linux virtio-net header with TSO/USO): the kernel hands the gateway
    /// 64 KiB super-packets instead of MTU-sized ones. `auto` enables it when the kernel
    /// and the backend support it; `on` fails if either does not. Never used with --tun-fd.
    #[arg(long, value_name = "MODE", default_value = "auto", value_parser = parse_offload)]
    pub offload: Offload,

    /// Write every packet crossing the TUN, both ways, to FILE as a pcap (raw IP; tcpdump
    /// and Wireshark read it). Written by a thread of its own: packets that arrive faster
    /// than it writes are left out and counted (pcap_dropped), the gateway never waits.
    /// With offload, packets read appear as the segments the stack saw and packets written
    /// as the super-packets handed to the kernel.
    #[arg(long, value_name = "FILE")]
    pub pcap: Option<std::path::PathBuf>,

    /// Stop capturing once the --pcap file would exceed SIZE (e.g. 100MiB; K/M/G are
    /// binary); later packets are counted as dropped. Default: no bound.
    #[arg(long, value_name = "SIZE", requires = "pcap", value_parser = parse_capture_size)]
    pub pcap_max_size: Option<u64>,

    /// Sessions kept at once, for TCP and for UDP each. Past it, the least recently
    /// active session makes room for the new one: a TCP connection is reset both ways
    /// (RST to the client and to the upstream), a UDP session is closed; counted in
    /// tcp_evicted and udp_evicted. Activity is a packet from the client. Default: no
    /// limit (then memory and --max-memory bound what a flood of flows costs).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..=10_000_000))]
    pub max_sessions: Option<u64>,

    /// On SIGINT/SIGTERM, new connections are refused at once (RST) and open ones may
    /// finish for up to SECS; those still open then are reset both ways (never closed
    /// with a FIN, which would tell a client its data was complete). Then --setup is
    /// undone and the exit event printed. 0: stop at once.
    #[arg(long, value_name = "SECS", default_value_t = 5, value_parser = clap::value_parser!(u64).range(0..=3600))]
    pub drain_timeout: u64,

    /// Pings (ICMP echo) through the TUN: `direct` pings the destination from the gateway
    /// (with --mark; an unprivileged ICMP socket where net.ipv4.ping_group_range allows,
    /// else a raw socket, which needs CAP_NET_RAW) and answers with the real reply or
    /// "destination unreachable"; `reply` answers every ping itself; `drop` drops them.
    /// Default: `direct` with --proxy direct, `reply` with a proxy (which carries no ICMP).
    #[arg(long, value_name = "MODE", value_parser = ["direct", "reply", "drop"])]
    pub icmp: Option<String>,

    /// Stack backend to use; each variant binary contains exactly one.
    #[arg(long, value_name = "NAME")]
    pub backend: Option<String>,

    #[command(flatten)]
    pub setup: SetupArgs,

    #[command(flatten)]
    pub process: ProcessArgs,
}

/// Host set-up (`--setup`, `--cleanup`): see the `setup` module.
#[derive(Debug, clap::Args)]
#[command(next_help_heading = "Host set-up (Linux, needs CAP_NET_ADMIN)")]
pub struct SetupArgs {
    /// Route traffic into the TUN, and remove that on exit: a route into the TUN for each
    /// --route in table --table, throw routes (the host's usual routing) for each
    /// --exclude, the proxy's address and the TUN's own prefixes, the rule
    /// `not fwmark MARK lookup TABLE` at --rule-priority (the gateway's sockets carry MARK,
    /// so nothing it sends can enter the TUN), and rp_filter loosened (1 -> 2) where it is
    /// strict. Recorded first in /run/tungate/ ($RUNTIME_DIRECTORY under systemd); after a
    /// crash the next start with the same --tun, or --cleanup, removes what is left.
    /// --mark defaults to 0x7467 with it. With --dns, where systemd-resolved runs, the TUN
    /// becomes its DNS link for every name (`~.`), so its own queries come through too.
    #[arg(long, requires = "tun", conflicts_with = "tun_fd")]
    pub setup: bool,

    /// Remove what an earlier run with --setup on this --tun left installed, and exit.
    #[arg(long, requires = "tun", conflicts_with = "setup")]
    pub cleanup: bool,

    /// Destination to route into the TUN with --setup; repeatable. Default: 0.0.0.0/0 and ::/0.
    #[arg(long = "route", value_name = "CIDR", requires = "setup", value_parser = parse_cidr)]
    pub routes: Vec<IpNet>,

    /// Destination to leave on the host's usual routes with --setup; repeatable.
    #[arg(long = "exclude", value_name = "CIDR", requires = "setup", value_parser = parse_cidr)]
    pub exclude: Vec<IpNet>,

    /// The routing table of --setup.
    #[arg(long, value_name = "N", default_value_t = setup::DEFAULT_TABLE,
          value_parser = clap::value_parser!(u32).range(1..=0xfffe_ffff))]
    pub table: u32,

    /// The priority of --setup's policy rule: after `local` (0), ahead of `main` (32766).
    #[arg(long, value_name = "N", default_value_t = setup::DEFAULT_RULE_PRIORITY,
          value_parser = clap::value_parser!(u32).range(1..=32765))]
    pub rule_priority: u32,

    /// Capture only the traffic of local programs of this user (uid or name) and of
    /// each --cgroup; repeatable. An nftables chain (table `inet tungate_TUN`) marks
    /// their packets MARK+1 and the rule becomes `fwmark MARK+1 lookup TABLE`.
    #[arg(long = "uid", value_name = "UID", requires = "setup")]
    pub uids: Vec<setup::Uid>,

    /// Capture only the traffic of the programs in this cgroup v2 (its path as
    /// /proc/PID/cgroup shows it, e.g. system.slice/app.service, or its directory) and of
    /// each --uid; repeatable. nft matches the cgroup's id: create it first.
    #[arg(long = "cgroup", value_name = "PATH", requires = "setup")]
    pub cgroups: Vec<String>,

    /// Leave this user's traffic on the host's usual routes (its packets get MARK); repeatable.
    #[arg(long = "exclude-uid", value_name = "UID", requires = "setup")]
    pub exclude_uids: Vec<setup::Uid>,

    /// Leave this cgroup's traffic on the host's usual routes (its packets get MARK); repeatable.
    #[arg(long = "exclude-cgroup", value_name = "PATH", requires = "setup")]
    pub exclude_cgroups: Vec<String>,

    /// Capture local programs' connections and datagrams to the host's own IPv4
    /// addresses too (127.0.0.0/8 and every interface's address as they are at the start;
    /// IPv6 cannot be), and dial them from the gateway itself (from 127.74.67.1), whatever
    /// --proxy says. Policy rules at priority 0 ahead of `local`, which moves behind them.
    #[arg(long, requires = "setup", conflicts_with_all = ["uids", "cgroups"])]
    pub capture_local: bool,
}

impl SetupArgs {
    /// Whether only named users or cgroups are captured.
    fn scope_is_restricted(&self) -> bool {
        !self.uids.is_empty() || !self.cgroups.is_empty()
    }

    /// Whose traffic --setup captures; the cgroups are looked up (they must exist).
    fn scope(&self) -> anyhow::Result<setup::Scope> {
        let mountinfo = || std::fs::read_to_string("/proc/self/mountinfo").context("reading /proc/self/mountinfo");
        let cgroups = |paths: &[String]| -> anyhow::Result<Vec<setup::Cgroup>> {
            if paths.is_empty() {
                return Ok(Vec::new());
            }
            let info = mountinfo()?;
            paths.iter().map(|p| setup::Cgroup::resolve(p, &info)).collect()
        };
        Ok(setup::Scope {
            uids: self.uids.clone(),
            cgroups: cgroups(&self.cgroups)?,
            exclude_uids: self.exclude_uids.clone(),
            exclude_cgroups: cgroups(&self.exclude_cgroups)?,
        })
    }
}

/// The flags of the process around the stack: shared by every variant, the redirect
/// baseline included.
#[derive(Debug, clap::Args)]
pub struct ProcessArgs {
    /// SO_MARK put on every upstream socket (decimal or 0x-hex), so that policy routing
    /// (or the redirect baseline's capture rule) keeps the gateway's own connections out
    /// of what it captures.
    #[arg(long, value_name = "N", value_parser = parse_mark)]
    pub mark: Option<u32>,

    /// Memory the flows' buffers between the stack and the handlers may hold together
    /// (e.g. 64MiB, 1G; K/M/G are binary). Past it buffers stop growing: every flow is
    /// still accepted and keeps at least a 4 KiB page per direction, and moves its bytes
    /// through what it has (slower, never stalled). Each flow's buffers otherwise grow
    /// with what it has in flight, up to 256 KiB per direction. The stacks' own socket
    /// buffers are not counted (see README, "Memory").
    #[arg(long, value_name = "SIZE", value_parser = parse_memory_size)]
    pub max_memory: Option<u64>,

    /// Threads for the stack and the relays (1 = everything on one thread).
    #[arg(long, value_name = "N", default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=64))]
    pub threads: u16,

    /// Serve the live counters as Prometheus/OpenMetrics text at http://ADDR:PORT/metrics
    /// (off by default). Give a loopback address (127.0.0.1:9100) unless others should
    /// read them: the address is bound as given.
    #[arg(long, value_name = "ADDR:PORT")]
    pub stats_addr: Option<std::net::SocketAddr>,

    /// Log level: error, warn, info, debug or trace.
    #[arg(long, value_name = "LEVEL", default_value = "info", value_parser = ["error", "warn", "info", "debug", "trace"])]
    pub log_level: String,
}

/// Runs a variant's process: large-allocation policy, logging, the open-file limit, the
/// runtime; `prepare` checks the flags and builds the work (before the runtime exists),
/// which then runs on it. An error anywhere is printed as `tungate-NAME: error: …` and
/// the exit code says it failed. What every variant's `main` comes down to.
fn launch<F>(name: &str, process: &ProcessArgs, prepare: impl FnOnce() -> anyhow::Result<F>) -> ExitCode
where
    F: std::future::Future<Output = anyhow::Result<()>>,
{
    tungate_core::os::map_large_allocations();
    // RUST_LOG as comma-separated `level` and `target=level` directives, through
    // tracing-subscriber's `Targets` rather than its `EnvFilter`, whose span and field
    // filters bring a regex engine: 4 % of the stripped binary (results/sizes-knobs-20261208.md).
    let filter = std::env::var("RUST_LOG")
        .ok()
        .and_then(|directives| directives.parse::<Targets>().ok())
        .or_else(|| process.log_level.parse::<Targets>().ok())
        .unwrap_or_else(|| Targets::new().with_default(tracing::Level::INFO));
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let output = tracing_subscriber::fmt::layer().with_writer(std::io::stderr).with_ansi(ansi);
    tracing_subscriber::registry().with(output.with_filter(filter)).init();
    let result = prepare().and_then(|work| {
        // Every relayed connection holds an upstream socket: a gateway with thousands of
        // flows needs more descriptors than the usual soft limit of 1024. Raise the soft
        // limit to the hard one; if that fails, run with what there is.
        match rlimit::increase_nofile_limit(u64::MAX) {
            Ok(n) => tracing::debug!(limit = n, "open-file limit"),
            Err(e) => tracing::warn!("cannot raise the open-file limit: {e}"),
        }
        let runtime = match process.threads {
            1 => tokio::runtime::Builder::new_current_thread().enable_all().build(),
            n => tokio::runtime::Builder::new_multi_thread().worker_threads(n as usize).enable_all().build(),
        }
        .context("starting the runtime")?;
        runtime.block_on(work)
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("tungate-{name}: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// The life of a serving gateway, the same for every variant: announces `ready`, gives
/// memory back after bursts, serves until `serve` ends, then reports the counters.
async fn serve_and_report(
    process: &ProcessArgs,
    upstream: &ProxySpec,
    ready: Ready,
    stats: Arc<tungate_core::Stats>,
    flows: tungate_core::os::FlowCount,
    serve: impl std::future::Future<Output = anyhow::Result<()>>,
) -> anyhow::Result<()> {
    if let Some(addr) = process.stats_addr {
        metrics::serve(addr, &ready.backend, upstream.kind(), stats.clone()).await?;
    }
    emit_event(Event::Ready(ready));
    tokio::spawn(tungate_core::os::release_memory_after_bursts(stats.clone(), flows));
    serve.await?;
    tracing::info!(stats = ?stats.snapshot(), "shut down");
    emit_event(Event::exit(&stats));
    Ok(())
}

/// Where flows go and how they are named: shared by every variant.
#[derive(Debug, clap::Args)]
pub struct UpstreamArgs {
    /// Where flows go: `direct` dials the destination itself;
    /// `socks5://[USER:PASS@]HOST[:PORT]` (port 1080) sends TCP by CONNECT and UDP by UDP
    /// ASSOCIATE; `http://[USER:PASS@]HOST[:PORT]` (port 80) sends TCP by HTTP CONNECT.
    /// A proxy named by host is resolved once, at start. A flow the upstream refuses is
    /// refused to the client (RST to its SYN), as a direct refusal would be.
    #[arg(long, value_name = "URL", default_value = "direct", value_parser = parse_proxy)]
    pub proxy: ProxySpec,

    /// What UDP does when the upstream cannot carry it (HTTP CONNECT; a SOCKS5 server
    /// that refuses UDP ASSOCIATE): `proxy` drops it (and counts it), `direct` sends it
    /// from the gateway itself, around the proxy (with --mark), `drop` drops all UDP.
    #[arg(long, value_name = "POLICY", default_value = "proxy", value_parser = parse_udp_policy)]
    pub udp: UdpPolicy,

    /// Read a host name from each TCP connection's first bytes (TLS ClientHello SNI,
    /// HTTP/1 Host) and ask the upstream for that name instead of the address. The
    /// client's handshake then completes before the upstream is asked, so a refused
    /// destination reaches the client as a reset after its first bytes, not as a
    /// refused connect. Protocols where the server speaks first (SMTP, SSH banners) wait
    /// --sniff-timeout before they are connected.
    #[arg(long)]
    pub sniff: bool,

    /// How long --sniff waits for a connection's first bytes, in milliseconds.
    #[arg(long, value_name = "MS", default_value_t = 300, value_parser = clap::value_parser!(u64).range(1..=10_000))]
    pub sniff_timeout: u64,

    /// DNS handling; repeatable. `fake-ip`: A and AAAA queries sent to any address
    /// through the TUN are answered with an address from --fake-ip-range (TTL 1 s), and a
    /// connection to that address goes to the upstream as the name; a fake address no
    /// longer mapped is refused. Other queries are forwarded. `hijack=IP:PORT`: every
    /// port-53 query, UDP and TCP, goes to that resolver (through the upstream).
    #[arg(long = "dns", value_name = "MODE", value_parser = parse_dns_mode)]
    pub dns: Vec<DnsMode>,

    /// Address pool for --dns fake-ip (CIDR); repeatable, one IPv4 and one IPv6 at
    /// most; must not overlap the TUN's own --address prefixes. Route the pools into the
    /// TUN. [default: 198.19.0.0/16 and fd19:f4e1::/64]
    #[arg(long = "fake-ip-range", value_name = "CIDR", value_parser = parse_cidr)]
    pub fake_ip_ranges: Vec<IpNet>,

    /// Forward UDP DNS queries over TCP (through the upstream): for proxies that carry
    /// no UDP.
    #[arg(long)]
    pub dns_over_tcp: bool,

    /// Seconds a flow may take to connect through the upstream (dial and proxy
    /// handshake) before the client gets RST (TCP) or the session is dropped (UDP).
    #[arg(long, value_name = "SECS", default_value_t = 15, value_parser = clap::value_parser!(u64).range(1..=3600))]
    pub connect_timeout: u64,

    /// Seconds a TCP connection may carry nothing either way before both ends are reset.
    #[arg(long, value_name = "SECS", default_value_t = 600, value_parser = clap::value_parser!(u64).range(1..=604_800))]
    pub tcp_idle_timeout: u64,

    /// Seconds a TCP connection one side has finished (FIN) may carry nothing before
    /// both ends are reset (Linux conntrack's FIN-WAIT timeout by default).
    #[arg(long, value_name = "SECS", default_value_t = 120, value_parser = clap::value_parser!(u64).range(1..=604_800))]
    pub tcp_half_close_timeout: u64,

    /// Seconds a UDP session may carry no datagram either way before it is closed (the
    /// client's next datagram opens a new one). DNS sessions use 10 s.
    #[arg(long, value_name = "SECS", default_value_t = 60, value_parser = clap::value_parser!(u64).range(1..=604_800))]
    pub udp_idle_timeout: u64,
}

/// One `--dns` mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DnsMode {
    FakeIp,
    Hijack(std::net::SocketAddr),
}

fn parse_dns_mode(s: &str) -> Result<DnsMode, String> {
    if s == "fake-ip" {
        return Ok(DnsMode::FakeIp);
    }
    match s.strip_prefix("hijack=") {
        Some(addr) => addr
            .parse()
            .map(DnsMode::Hijack)
            .map_err(|_| format!("{addr:?} is not IP:PORT (e.g. hijack=10.0.0.53:53 or hijack=[fd00::53]:53)")),
        None => Err(format!("{s:?} is not a DNS mode (fake-ip or hijack=IP:PORT)")),
    }
}

impl UpstreamArgs {
    /// The DNS settings; the fake-IP pools must not overlap `own` (the TUN's prefixes).
    fn dns(&self, own: &[IpNet]) -> anyhow::Result<DnsConfig> {
        let fake_ip = self.dns.contains(&DnsMode::FakeIp);
        let hijack = self.dns.iter().find_map(|m| match m {
            DnsMode::Hijack(a) => Some(*a),
            DnsMode::FakeIp => None,
        });
        if self.dns.iter().filter(|m| matches!(m, DnsMode::Hijack(_))).count() > 1 {
            bail!("--dns hijack=… is given more than once; there is one resolver");
        }
        if !fake_ip && !self.fake_ip_ranges.is_empty() {
            bail!("--fake-ip-range needs --dns fake-ip");
        }
        let fake_ip = match fake_ip {
            false => None,
            true => {
                let ranges = match self.fake_ip_ranges.is_empty() {
                    true => tungate_upstream::dns::default_fake_ip_ranges(),
                    false => self.fake_ip_ranges.clone(),
                };
                for range in &ranges {
                    if let Some(mine) =
                        own.iter().find(|a| a.contains(&range.network()) || range.contains(&a.network()))
                    {
                        bail!("--fake-ip-range {range} overlaps the TUN's own prefix {mine}; choose another range");
                    }
                }
                Some(Arc::new(FakeIp::new(&ranges).map_err(anyhow::Error::msg)?))
            }
        };
        Ok(DnsConfig { fake_ip, fake_ip_ttl: 1, hijack, over_tcp: self.dns_over_tcp })
    }
}

const EXAMPLE: &str = r#"Example (all of a host's traffic through a SOCKS5 proxy, undone on exit):
  tungate-smoltcp --tun tun0 --address 198.18.0.1/24 --proxy socks5://192.0.2.10:1080 --setup
After a crash (SIGKILL), the next start on tun0 removes what is left, or:
  tungate-smoltcp --tun tun0 --cleanup

The same routing by hand, for 10.77.0.0/24 only:
  tungate-smoltcp --tun tun0 --address 198.18.0.1/24 --mark 0x100 &
  ip route add 10.77.0.0/24 dev tun0
  ip rule add fwmark 0x100 lookup 100
  ip route add 10.77.0.0/24 via <real gateway> table 100

While it runs, standard output carries only two JSON lines, for supervisors and scripts:
  {"event":"ready","backend":..,"pid":..,..}    once the gateway serves traffic
  {"event":"exit","stats":{"rx_packets":..,..}}  after a clean shutdown, with every counter
Logs (--log-level) go to standard error.

For tests only: TUNGATE_TEST_FAULTS=loss=10,reorder=10,dup=5,truncate=1,seed=7,both
drops, reorders, duplicates and truncates that many packets per thousand between the TUN
and the stack (read; with `both`, written too), to test recovery through a real TUN.
Never set it on a gateway people use."#;

/// Prints one machine-readable event line on stdout (see the `--help` text): the only
/// thing a running gateway writes there, so a supervisor or test reads it without parsing
/// logs.
fn emit_event(event: Event) {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    // A closed stdout is the supervisor's choice; it must not stop the gateway.
    let _ = writeln!(out, "{}", event.to_line()).and_then(|()| out.flush());
}

fn parse_proxy(s: &str) -> Result<ProxySpec, String> {
    s.parse()
}

fn parse_udp_policy(s: &str) -> Result<UdpPolicy, String> {
    s.parse()
}

/// The router the flags describe, every socket marked with `--mark`.
async fn router(
    args: &UpstreamArgs,
    dns: DnsConfig,
    mark: Option<u32>,
    host: &HostSetup,
    stats: &Arc<tungate_core::Stats>,
) -> anyhow::Result<Router> {
    let local = host.local.clone();
    let proxy = match host.proxy_at {
        Some(ip) => args.proxy.at(ip),
        None => args.proxy.clone(),
    };
    let refuse_resolved = dns.fake_ip.as_ref().map(|f| f.ranges().to_vec()).unwrap_or_default();
    let dialer = Dialer { mark, refuse_resolved, ..Dialer::default() };
    let upstream = proxy.connector(dialer.clone(), stats.clone()).await?;
    // Only the direct path dials the host's own addresses from the loopback source: a
    // proxy on this host is reached from its usual one.
    let direct = ProxySpec::Direct.connector(Dialer { local: local.clone(), ..dialer }, stats.clone()).await?;
    let secs = std::time::Duration::from_secs;
    let config = RouterConfig {
        udp: args.udp,
        connect_timeout: secs(args.connect_timeout),
        tcp_idle_timeout: secs(args.tcp_idle_timeout),
        tcp_half_close_timeout: secs(args.tcp_half_close_timeout),
        udp_idle_timeout: secs(args.udp_idle_timeout),
        sniff: args.sniff.then(|| std::time::Duration::from_millis(args.sniff_timeout)),
        dns,
        local,
    };
    Ok(Router::new(upstream, direct, config, stats.clone()))
}

fn parse_mtu(s: &str) -> Result<Mtu, String> {
    Mtu::from_str(s).map_err(|e| e.to_string())
}

fn parse_offload(s: &str) -> Result<Offload, String> {
    s.parse()
}

fn parse_cidr(s: &str) -> Result<IpNet, String> {
    IpNet::from_str(s).map_err(|_| format!("{s:?} is not ADDRESS/PREFIX (e.g. 198.18.0.1/24 or fd18::1/64)"))
}

/// `64MiB`, `64M`, `1G`, `65536`: binary units, at least 1 MiB (less would leave every
/// flow at its first page).
fn parse_capture_size(s: &str) -> Result<u64, String> {
    parse_size::Config::new().with_binary().parse_size(s).map_err(|e| format!("{s:?}: {e}"))
}

fn parse_memory_size(s: &str) -> Result<u64, String> {
    let bytes = parse_size::Config::new().with_binary().parse_size(s).map_err(|e| format!("{s:?}: {e}"))?;
    if bytes < 1 << 20 {
        return Err(format!("{s:?}: at least 1MiB"));
    }
    Ok(bytes)
}

fn parse_mark(s: &str) -> Result<u32, String> {
    let parsed = match s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
        Some(hex) => u32::from_str_radix(hex, 16),
        None => s.parse(),
    };
    parsed.map_err(|_| format!("{s:?} is not a 32-bit mark (decimal or 0x-hex)"))
}

/// Checks the combination of flags that clap cannot. `offload_capable`: the backend
/// takes offloaded input.
fn validate(args: &Args, backend: &str, offload_capable: bool) -> anyhow::Result<()> {
    if args.offload == Offload::On {
        if !offload_capable {
            bail!("--offload on: backend {backend:?} does not support TUN offload; use --offload off (or auto)");
        }
        if let Some(fd) = args.tun_fd {
            bail!("--offload on: an inherited TUN (--tun-fd {fd}) runs without offload; use --offload auto or off");
        }
    }
    if let Some(wanted) = &args.backend {
        if wanted != backend {
            bail!(
                "backend {wanted:?} is not compiled into this variant (tungate-{backend} contains only {backend:?}); \
                 run tungate-{wanted} instead"
            );
        }
    }
    if !args.mtu.supports_ipv6() {
        if let Some(v6) = args.addresses.iter().find(|a| matches!(a.addr(), IpAddr::V6(_))) {
            bail!("--address {v6}: IPv6 needs an MTU of at least 1280, but --mtu is {}", args.mtu);
        }
    }
    Ok(())
}

/// Runs a variant: parses flags, opens the TUN, serves until SIGINT/SIGTERM.
/// What a variant's `main` gets to build its backend from.
#[derive(Debug, Clone)]
pub struct StackSettings {
    pub mtu: Mtu,
    /// The TUN's own addresses (`--address`). Stacks that accept every destination
    /// (smoltcp) do not need them; a kernel NAT stack listens on one of them.
    pub addresses: Vec<IpNet>,
}

/// `make_backend` builds the backend from the command line's stack settings.
pub fn main<B: Backend>(make_backend: impl FnOnce(&StackSettings) -> B) -> ExitCode {
    let args = Args::parse();
    launch(B::NAME, &args.process, || run(&args, make_backend))
}

/// Checks the flags and builds the backend; the returned work opens the TUN and serves.
fn run<'a, B: Backend>(
    args: &'a Args,
    make_backend: impl FnOnce(&StackSettings) -> B,
) -> anyhow::Result<impl std::future::Future<Output = anyhow::Result<()>> + 'a> {
    validate(args, B::NAME, B::RX_OFFLOAD.is_some())?;
    let dns = args.upstream.dns(&args.addresses)?;
    let settings = StackSettings { mtu: args.mtu, addresses: args.addresses.clone() };
    let backend = make_backend(&settings);
    let process = &args.process;
    // With --setup the gateway's sockets must carry a mark: its rule routes by it.
    let mark = process.mark.or(args.setup.setup.then_some(setup::DEFAULT_MARK));
    Ok(async move {
        if let Some(tun) = args.tun.as_deref().filter(|_| args.setup.cleanup) {
            let dir = setup::state_dir();
            let removed = match setup::State::load(&setup::state_path(&dir, tun)?)? {
                Some(_) => setup::Installer::open(&dir, tun).await?.1,
                None => 0,
            };
            tracing::info!(tun, removed, "--cleanup: done");
            return Ok(());
        }
        let device = match (&args.tun, args.tun_fd) {
            (_, Some(fd)) => TunDevice::adopt_fd(fd, args.mtu).with_context(|| format!("--tun-fd {fd}"))?,
            (Some(name), None) => {
                let mut config = TunConfig::new(name.clone(), args.mtu);
                config.addresses = args.addresses.clone();
                if let Some(mode) = B::RX_OFFLOAD {
                    config.offload = args.offload;
                    config.rx_mode = mode;
                }
                TunDevice::create(&config).with_context(|| format!("--tun {name}"))?
            }
            (None, None) => bail!("one of --tun or --tun-fd is required"),
        };
        // After the device (whose errors come first), before "ready".
        backend.validate()?;
        // Before the set-up: a signal from here on ends the serving, never the process
        // with its set-up in place.
        let shutdown = shutdown_signal();
        let mut host = match &args.tun {
            Some(tun) => set_up_host(args, tun, &device, mark).await?,
            None => HostSetup::default(),
        };
        let served = serve_tun(args, backend, device, dns, mark, &host, shutdown).await;
        let undone = match host.installer.as_mut() {
            Some(installer) => installer.undo().await,
            None => Ok(()),
        };
        served.and(undone)
    })
}

/// What --setup installed, and what the router must know of it.
#[derive(Debug, Default)]
struct HostSetup {
    installer: Option<setup::Installer>,
    /// The host's own addresses --capture-local captures.
    local: Vec<IpNet>,
    /// The proxy's address, resolved before the routes were installed: once they are,
    /// the resolver's own queries may be routed into the TUN, which is not read yet.
    proxy_at: Option<std::net::IpAddr>,
}

/// With --setup: removes what an earlier run left, then installs the routes and rules
/// (undoing what it installed if that fails). Without: only the removal, if an earlier
/// run with --setup on this TUN left a state file.
async fn set_up_host(args: &Args, tun: &str, device: &TunDevice, mark: Option<u32>) -> anyhow::Result<HostSetup> {
    let device_name = device.name();
    let dir = setup::state_dir();
    if !args.setup.setup {
        if setup::State::load(&setup::state_path(&dir, tun)?)?.is_some() {
            setup::Installer::open(&dir, tun).await?;
        }
        return Ok(HostSetup::default());
    }
    if device.attached() {
        bail!(
            "--setup: {device_name} is a persistent TUN, which outlives this process: after a crash \
             its routes would hold the host's traffic until the next start. Let the gateway create \
             the TUN, or route into it by hand"
        );
    }
    let mark = match mark {
        Some(0) => bail!("--mark 0 with --setup: the gateway's own sockets would be unmarked and loop"),
        Some(u32::MAX) if args.setup.scope_is_restricted() => {
            bail!("--mark 0xffffffff with --uid or --cgroup: the capture mark is --mark + 1")
        }
        _ => mark,
    };
    let (mut installer, _) = setup::Installer::open(&dir, tun).await?;
    let proxy = match &args.upstream.proxy {
        ProxySpec::Direct => Vec::new(),
        ProxySpec::Socks5 { host, port, .. } | ProxySpec::Http { host, port, .. } => {
            let found = tokio::net::lookup_host((host.as_str(), *port))
                .await
                .with_context(|| format!("--setup: resolving the proxy {host}"))?;
            found.map(|a| a.ip()).collect()
        }
    };
    let mut routes = if args.setup.routes.is_empty() {
        vec!["0.0.0.0/0".parse().expect("literal"), "::/0".parse().expect("literal")]
    } else {
        args.setup.routes.clone()
    };
    // Fake addresses exist only inside the gateway: they always go into the TUN.
    if let Some(pools) = args.upstream.dns(&args.addresses)?.fake_ip {
        routes.extend(pools.ranges().iter().copied());
    }
    installer.attach(device_name).await?;
    let capture_local = match args.setup.capture_local {
        true => Some(installer.own_addresses().await?),
        false => None,
    };
    let proxy_at = proxy.first().copied();
    let request = setup::Request {
        routes,
        exclude: args.setup.exclude.clone(),
        proxy,
        tun_prefixes: args.addresses.clone(),
        table: args.setup.table,
        priority: args.setup.rule_priority,
        mark: mark.unwrap_or(setup::DEFAULT_MARK),
        tun: device_name.into(),
        scope: args.setup.scope()?,
        capture_local,
    };
    let mut items = setup::plan(&request);
    let conf = std::path::Path::new("/proc/sys/net/ipv4/conf");
    if items.iter().any(|i| matches!(i, setup::Item::LocalRule { v6: false, .. })) {
        // Replies from 127.0.0.0/8 come out of the TUN: not martian there.
        let path = conf.join(device_name).join("route_localnet");
        let previous = std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
        items.insert(0, setup::Item::Sysctl { path, previous: previous.trim().into(), value: "1".into() });
    }
    items.extend(setup::strict_rp_filters(conf, device_name, request.scope.is_restricted())?);
    if args.setup.capture_local && !items.iter().any(|i| matches!(i, setup::Item::LocalRule { .. })) {
        bail!("--capture-local captures IPv4 only: it needs an IPv4 --address and an IPv4 --route");
    }
    // With --dns, systemd-resolved's own queries come through the TUN too: it asks each
    // link's servers on sockets bound to that link, past every route.
    if !args.upstream.dns.is_empty() {
        match setup::resolved_servers(installer.tun_index()) {
            Some(mut servers) => {
                // Knowing none, it asks an address in the TUN's prefix, which the gateway answers.
                if servers.is_empty() {
                    servers.extend(stand_in_resolver(&args.addresses));
                }
                if !servers.is_empty() {
                    items.push(setup::Item::Resolved { ifindex: installer.tun_index(), servers });
                }
            }
            None => tracing::debug!("--setup: no systemd-resolved on the system bus"),
        }
    }
    let local = items
        .iter()
        .filter_map(|i| match i {
            setup::Item::LocalRule { dst, .. } => Some(*dst),
            _ => None,
        })
        .collect::<std::collections::BTreeSet<_>>()
        .into_iter()
        .collect();
    if let Err(e) = installer.install(items).await {
        if let Err(undo) = installer.undo().await {
            tracing::error!("--setup: undoing after a failed set-up: {undo:#}");
        }
        return Err(e);
    }
    Ok(HostSetup { installer: Some(installer), local, proxy_at })
}

/// An address in the TUN's first prefix (host 53, or 54 if that is the TUN's own) for a
/// resolver that knows no server: queries to it enter the TUN and the gateway answers.
fn stand_in_resolver(addresses: &[IpNet]) -> Option<IpAddr> {
    let net = addresses.iter().find(|n| n.prefix_len() < n.max_prefix_len() - 6)?;
    let host = |n: u8| match net.network() {
        IpAddr::V4(a) => IpAddr::from(std::net::Ipv4Addr::from(u32::from(a) + u32::from(n))),
        IpAddr::V6(a) => IpAddr::from(std::net::Ipv6Addr::from(u128::from(a) + u128::from(n))),
    };
    [host(53), host(54)].into_iter().find(|&a| a != net.addr())
}

/// Serves the TUN until SIGINT/SIGTERM, then reports.
async fn serve_tun<B: Backend>(
    args: &Args,
    backend: B,
    device: TunDevice,
    dns: DnsConfig,
    mark: Option<u32>,
    host: &HostSetup,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let process = &args.process;
    {
        let stats = Arc::new(tungate_core::Stats::default());
        let faults = test_faults()?;
        let (capture, writer) = match &args.pcap {
            Some(path) => {
                let (capture, writer) = Capture::create(path, args.pcap_max_size, stats.clone())
                    .with_context(|| format!("--pcap {}", path.display()))?;
                (Some(capture), Some(writer))
            }
            None => (None, None),
        };
        let icmp = match (args.icmp.as_deref(), &args.upstream.proxy) {
            (Some("drop"), _) => IcmpMode::Drop,
            (Some("reply"), _) => IcmpMode::Reply,
            (Some(_), _) | (None, ProxySpec::Direct) => IcmpMode::Direct { mark },
            (None, _) => IcmpMode::Reply,
        };
        let router = router(&args.upstream, dns, mark, host, &stats).await?;
        let handlers = Dispatch {
            tcp: Arc::new(router.clone()),
            udp: Arc::new(router),
            stats: stats.clone(),
            max_ring_memory: process.max_memory,
            max_sessions: args.max_sessions.and_then(|n| std::num::NonZeroUsize::new(n as usize)),
        };
        let addresses: Vec<String> = args.addresses.iter().map(|a| a.to_string()).collect();
        tracing::info!(
            backend = B::NAME,
            tun = device.name(),
            offload = device.offload().is_some(),
            mtu = %args.mtu,
            addresses = %addresses.join(","),
            mark = ?mark,
            proxy = ?args.upstream.proxy,
            udp = ?args.upstream.udp,
            sniff = args.upstream.sniff,
            dns = ?args.upstream.dns,
            max_memory = ?process.max_memory,
            max_sessions = ?args.max_sessions,
            icmp = ?icmp,
            "ready"
        );
        let ready = Ready {
            backend: B::NAME.into(),
            pid: std::process::id(),
            tun: Some(device.name().to_owned()),
            offload: Some(device.offload().is_some()),
            mtu: Some(args.mtu.get()),
            listen: None,
        };
        let serve = async {
            let options = tungate_core::ServeOptions::default()
                .capture(capture)
                .faults(faults)
                .icmp(icmp)
                .drain(std::time::Duration::from_secs(args.drain_timeout));
            let served = tungate_core::serve_with(backend, device, handlers, shutdown, options).await;
            // The capture's queue closed with the device: what it held is written now.
            if let Some(writer) = writer {
                writer.finish().context("--pcap")?;
            }
            served.context("backend stopped")
        };
        serve_and_report(process, &args.upstream.proxy, ready, stats, tungate_core::os::FlowCount::Known, serve).await
    }
}

/// The test-only fault stage, if `TUNGATE_TEST_FAULTS` asks for one (see `--help`).
fn test_faults() -> anyhow::Result<Option<tungate_core::device::fault::Faults>> {
    let Ok(spec) = std::env::var("TUNGATE_TEST_FAULTS") else { return Ok(None) };
    let faults = spec.parse().map_err(|e| anyhow::anyhow!("TUNGATE_TEST_FAULTS={spec:?}: {e}"))?;
    tracing::warn!(
        ?faults,
        "TUNGATE_TEST_FAULTS is set: injecting faults between the TUN and the stack (for tests only)"
    );
    Ok(Some(faults))
}

/// Installs the SIGINT/SIGTERM handlers now (before "ready" is logged, so a signal sent
/// right after it is never handled by the default action) and returns the future that
/// completes on the first of them.
fn shutdown_signal() -> impl std::future::Future<Output = ()> + Send + 'static {
    use tokio::signal::unix::{SignalKind, signal};
    let handlers = (signal(SignalKind::interrupt()), signal(SignalKind::terminate()));
    async move {
        let (Ok(mut int), Ok(mut term)) = handlers else {
            // Without signal handlers the default action (terminate) still applies.
            return std::future::pending().await;
        };
        tokio::select! {
            _ = int.recv() => tracing::info!("SIGINT: shutting down"),
            _ = term.recv() => tracing::info!("SIGTERM: shutting down"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stand_in_resolver_lies_in_the_tun_prefix_but_is_not_its_address() {
        let nets = |s: &[&str]| s.iter().map(|n| n.parse().unwrap()).collect::<Vec<IpNet>>();
        assert_eq!(stand_in_resolver(&nets(&["198.18.0.1/24"])), Some("198.18.0.53".parse().unwrap()));
        assert_eq!(stand_in_resolver(&nets(&["198.18.0.53/24"])), Some("198.18.0.54".parse().unwrap()));
        assert_eq!(stand_in_resolver(&nets(&["10.0.0.1/30", "fd18::1/64"])), Some("fd18::35".parse().unwrap()));
        assert_eq!(stand_in_resolver(&nets(&["10.0.0.1/32"])), None);
    }

    fn args(extra: &[&str]) -> Result<Args, clap::Error> {
        Args::try_parse_from(["tungate-x"].iter().chain(extra))
    }

    #[test]
    fn flags_parse_and_validate() {
        let a = args(&[
            "--tun",
            "tun0",
            "--mtu",
            "9000",
            "--address",
            "198.18.0.1/24",
            "--address",
            "fd18::1/64",
            "--mark",
            "0x100",
        ])
        .unwrap();
        assert_eq!(a.process.mark, Some(0x100));
        assert_eq!(a.addresses.len(), 2);
        assert!(validate(&a, "smoltcp", true).is_ok());

        assert!(args(&["--tun", "t", "--mtu", "100"]).is_err());
        assert!(args(&["--tun", "t", "--address", "198.18.0.1"]).is_err());
        assert!(args(&["--tun", "t", "--mark", "0xzz"]).is_err());
        assert!(args(&["--mtu", "1500"]).is_err(), "a device is required");
        assert!(args(&["--tun", "t", "--tun-fd", "3"]).is_err(), "one device only");

        let socks = args(&["--tun", "t", "--proxy", "socks5://al:pw@127.0.0.1:1080", "--udp", "direct"]).unwrap();
        assert!(matches!(socks.upstream.proxy, ProxySpec::Socks5 { port: 1080, .. }));
        assert_eq!(socks.upstream.udp, UdpPolicy::Direct);
        assert!(
            args(&["--tun", "t", "--proxy", "socks4://h:1"]).unwrap_err().to_string().contains("unknown proxy scheme")
        );
        assert!(args(&["--tun", "t", "--udp", "maybe"]).is_err());

        let dns = args(&["--tun", "t", "--dns", "fake-ip", "--dns", "hijack=10.0.0.53:53", "--dns-over-tcp"]).unwrap();
        let config = dns.upstream.dns(&["198.18.0.1/24".parse().unwrap()]).unwrap();
        assert_eq!(config.hijack, Some("10.0.0.53:53".parse().unwrap()));
        assert!(config.over_tcp);
        let pools = config.fake_ip.expect("fake-ip on");
        assert_eq!(pools.ranges().len(), 2, "one IPv4 and one IPv6 pool by default");
        let own = ["198.19.0.1/24".parse().unwrap()];
        assert!(dns.upstream.dns(&own).unwrap_err().to_string().contains("overlaps the TUN's own prefix"));
        let range_only = args(&["--tun", "t", "--fake-ip-range", "198.20.0.0/16"]).unwrap();
        assert!(range_only.upstream.dns(&[]).unwrap_err().to_string().contains("needs --dns fake-ip"));
        assert!(args(&["--tun", "t", "--dns", "hijack=10.0.0.53"]).unwrap_err().to_string().contains("IP:PORT"));
        assert!(args(&["--tun", "t", "--dns", "fake"]).is_err());
        let other = args(&["--tun", "t", "--backend", "lwip"]).unwrap();
        assert!(validate(&other, "smoltcp", true).unwrap_err().to_string().contains("not compiled into this variant"));
        let small = args(&["--tun", "t", "--mtu", "1000", "--address", "fd18::1/64"]).unwrap();
        assert!(validate(&small, "smoltcp", true).is_err());
        let on = args(&["--tun", "t", "--offload", "on"]).unwrap();
        assert!(validate(&on, "lwip", false).unwrap_err().to_string().contains("does not support TUN offload"));
        let fd_on = args(&["--tun-fd", "3", "--offload", "on"]).unwrap();
        assert!(validate(&fd_on, "system", true).unwrap_err().to_string().contains("inherited"));
        assert!(args(&["--tun", "t", "--offload", "maybe"]).is_err());

        let memory = |s: &str| args(&["--tun", "t", "--max-memory", s]).map(|a| a.process.max_memory);
        assert_eq!(memory("64MiB").unwrap(), Some(64 << 20));
        assert_eq!(memory("64M").unwrap(), Some(64 << 20), "units are binary");
        assert_eq!(memory("1G").unwrap(), Some(1 << 30));
        assert_eq!(memory("2097152").unwrap(), Some(2 << 20));
        assert!(memory("512K").unwrap_err().to_string().contains("at least 1MiB"));
        assert!(memory("lots").unwrap_err().to_string().contains("\"lots\""));
        assert_eq!(args(&["--tun", "t"]).unwrap().process.max_memory, None, "no limit by default");

        let setup = args(&["--tun", "t", "--setup", "--route", "10.0.0.0/8", "--exclude", "10.1.0.0/16"]).unwrap();
        assert!(setup.setup.setup && setup.setup.routes.len() == 1 && setup.setup.exclude.len() == 1);
        assert_eq!(
            (setup.setup.table, setup.setup.rule_priority),
            (setup::DEFAULT_TABLE, setup::DEFAULT_RULE_PRIORITY)
        );
        assert!(args(&["--tun", "t", "--route", "10.0.0.0/8"]).is_err(), "--route needs --setup");
        assert!(args(&["--tun", "t", "--exclude", "10.0.0.0/8"]).is_err(), "--exclude needs --setup");
        assert!(args(&["--tun-fd", "3", "--setup"]).is_err(), "--setup needs --tun");
        assert!(args(&["--tun", "t", "--uid", "1000"]).is_err(), "--uid needs --setup");
        assert!(args(&["--tun", "t", "--setup", "--uid", "1000;x"]).is_err(), "a uid is a number or a name");
        let scoped = args(&["--tun", "t", "--setup", "--uid", "nobody", "--exclude-uid", "0"]).unwrap();
        assert_eq!((scoped.setup.uids.len(), scoped.setup.exclude_uids.len()), (1, 1));
        assert!(args(&["--tun", "t", "--setup", "--cleanup"]).is_err());
        assert!(args(&["--tun", "t", "--setup", "--rule-priority", "32766"]).is_err(), "not behind main");
        assert!(args(&["--tun", "t", "--setup", "--route", "10.0.0.1"]).is_err(), "a CIDR");
    }
}

#[cfg(feature = "redirect")]
pub mod redirect {
    //! The command line of `tungate-redirect`.

    use std::net::SocketAddr;
    use std::process::ExitCode;
    use std::sync::Arc;

    use anyhow::{Context, bail};
    use clap::Parser;
    use tungate_core::events::Ready;

    /// The no-TUN baseline: serves TCP connections that an nftables REDIRECT rule sends to
    /// its listeners, with their original destination (SO_ORIGINAL_DST), through the same
    /// handler as the TUN variants.
    ///
    /// The program installs no rule. Capture locally originated traffic with, e.g.:
    ///   nft add table ip tungate
    ///   nft add chain ip tungate output '{ type nat hook output priority -100; }'
    ///   nft add rule ip tungate output ip daddr 10.77.0.0/24 meta mark != 0x100 \
    ///       meta l4proto tcp redirect to :12345
    /// and keep the gateway's own dials out of it with --mark 0x100.
    #[derive(Debug, Parser)]
    #[command(version)]
    pub struct Args {
        /// Address to listen on (the REDIRECT target); repeatable for IPv4 and IPv6.
        #[arg(long = "listen", value_name = "ADDR:PORT", default_values = ["127.0.0.1:12345", "[::1]:12345"])]
        pub listen: Vec<SocketAddr>,

        #[command(flatten)]
        pub upstream: super::UpstreamArgs,

        #[command(flatten)]
        pub process: super::ProcessArgs,
    }

    pub fn main() -> ExitCode {
        let args = Args::parse();
        super::launch("redirect", &args.process, || run(&args))
    }

    fn run(args: &Args) -> anyhow::Result<impl std::future::Future<Output = anyhow::Result<()>> + '_> {
        if !args.upstream.dns.is_empty() || args.upstream.dns_over_tcp {
            bail!("--dns and --dns-over-tcp need a TUN variant: tungate-redirect captures TCP only, and no DNS");
        }
        let process = &args.process;
        Ok(async move {
            let mut listeners = Vec::new();
            for addr in &args.listen {
                let l = tokio::net::TcpListener::bind(addr).await.with_context(|| format!("--listen {addr}"))?;
                listeners.push(l);
            }
            let shutdown = super::shutdown_signal();
            let stats = Arc::new(tungate_core::Stats::default());
            // The REDIRECT rule captures TCP only; --udp has nothing to act on here.
            let router = super::router(
                &args.upstream,
                super::DnsConfig::default(),
                process.mark,
                &super::HostSetup::default(),
                &stats,
            )
            .await?;
            let listen: Vec<String> = args.listen.iter().map(|a| a.to_string()).collect();
            tracing::info!(
                backend = "redirect",
                listen = %listen.join(","),
                mark = ?process.mark,
                max_memory = ?process.max_memory,
                "ready"
            );
            let ready = Ready {
                backend: "redirect".into(),
                pid: std::process::id(),
                tun: None,
                offload: None,
                mtu: None,
                listen: Some(listen),
            };
            let serve = async {
                backend_redirect::serve(listeners, Arc::new(router), stats.clone(), process.max_memory, shutdown)
                    .await?;
                Ok(())
            };
            let flows = tungate_core::os::FlowCount::Unknown;
            super::serve_and_report(process, &args.upstream.proxy, ready, stats.clone(), flows, serve).await
        })
    }
}
