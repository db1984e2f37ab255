//! `--setup`: the host routing that sends traffic through the TUN, installed once the
//! TUN is up and removed when the gateway exits — or, after a crash, at the next start
//! with the same `--tun`, or by `--cleanup`.
//!
//! What it installs, for each address family that a `--route` names:
//!
//! * **A table of the gateway's own** (`--table`, default [`DEFAULT_TABLE`]): one route
//!   `ROUTE dev TUN` for each `--route`, and one *throw* route for each `--exclude`, for
//!   the proxy server's address and for the TUN's own prefixes. A throw route ends the
//!   lookup in this table, so those destinations take the host's usual routes.
//! * **One policy rule** (`--rule-priority`, default [`DEFAULT_RULE_PRIORITY`]):
//!   `not fwmark MARK lookup TABLE`. Every socket of the gateway carries MARK (`--mark`,
//!   default [`DEFAULT_MARK`] with `--setup`), so nothing the gateway sends consults the
//!   table: loop-free by construction, whatever the routes say. Unmarked packets consult
//!   it first and, where it has no route or a throw route, go on to the host's other
//!   rules (`local` at 0 stays ahead: the host's own addresses are not captured, unless
//!   `--capture-local` puts rules ahead of it, see ARCHITECTURE, "Host set-up").
//! * **`rp_filter` loosened** (IPv4), only where it is strict: a reply to the gateway's
//!   marked socket arrives on the uplink, but the reverse-path check looks its source up
//!   without the mark, finds the TUN and would drop it. Each interface whose effective
//!   setting (the larger of `all` and its own) is 1 gets 2 (loose).
//! * **Scoped capture** (`--uid`, `--cgroup`, `--exclude-uid`, `--exclude-cgroup`): an
//!   nftables table of the gateway's own ([`Scope`], `inet tungate_TUN`) whose `route`
//!   chain in the output hook marks local programs' packets by owner. Excluded owners get
//!   MARK, the gateway's own mark, so the rule above passes them by. With `--uid` or
//!   `--cgroup` the rule becomes `fwmark CAPTURE lookup TABLE` (CAPTURE = MARK + 1), and
//!   only what the chain marked CAPTURE consults the table; the kernel routes a packet
//!   again when this chain changes its mark. The chain first returns for packets that
//!   carry MARK already, so the gateway's own sockets are never captured, whatever uid
//!   or cgroup it runs in. Replies then come out of the TUN from sources that the
//!   host's tables route elsewhere: the TUN's own rp_filter is loosened too.
//!
//! Each item is written to the state file ([`State`], under [`STATE_DIR`], one per TUN
//! and network namespace) *before* it is installed, and removed from the host in reverse
//! order on exit; so after SIGKILL the next start finds and removes exactly what the dead
//! run left. The dead run's TUN is gone with its process, and its routes with it; what
//! remains (the rule, throw routes, sysctls) leaves the host routing as before: the rule
//! finds no route to the TUN in the table and lookups go on to the host's tables.
//!
//! The plan ([`plan`]) is computed without I/O; [`Installer`] talks netlink
//! (rtnetlink) and writes the sysctls.

use std::net::IpAddr;
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use ipnet::IpNet;
use serde::{Deserialize, Serialize};

/// The gateway's own routing table with `--setup`.
pub const DEFAULT_TABLE: u32 = 7467;
/// The priority of its policy rule: ahead of `main` (32766), after `local` (0).
pub const DEFAULT_RULE_PRIORITY: u32 = 7467;
/// The mark on the gateway's own sockets with `--setup` when `--mark` is not given.
pub const DEFAULT_MARK: u32 = 0x7467;
/// The kernel's `local` table.
const LOCAL_TABLE: u32 = 255;
/// The protocol of the copy of the `local` rule that `--capture-local` puts behind its
/// own rules (netlink refuses a rule identical to one that exists): "t".
const MOVED_LOCAL_PROTOCOL: u8 = 0x74;
/// The nftables priority of the scoping chain: `mangle`, where marks are set.
const NFT_PRIORITY: &str = "mangle";
/// Where the state files live (a tmpfs: gone after a reboot, as is what they record),
/// unless systemd names the service's runtime directory ([`state_dir`]).
pub const STATE_DIR: &str = "/run/tungate";

/// The state directory: `$RUNTIME_DIRECTORY` (its first entry) when systemd sets it for
/// the service (`RuntimeDirectory=`, owned by the service's user), else [`STATE_DIR`].
pub fn state_dir() -> PathBuf {
    std::env::var_os("RUNTIME_DIRECTORY")
        .and_then(|dirs| dirs.to_str().and_then(|d| d.split(':').next()).map(PathBuf::from))
        .filter(|d| d.is_absolute())
        .unwrap_or_else(|| PathBuf::from(STATE_DIR))
}

/// What a route in the gateway's table does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RouteKind {
    /// Into the TUN.
    Tun,
    /// Ends the lookup in the table: the host's own routes apply.
    Throw,
}

/// One thing `--setup` changes on the host.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "item", rename_all = "lowercase")]
pub enum Item {
    Route {
        table: u32,
        dst: IpNet,
        kind: RouteKind,
    },
    /// `not fwmark MARK lookup TABLE` at `priority`, for IPv6 or IPv4; with `marked`,
    /// `fwmark MARK lookup TABLE` (scoped capture: MARK is then the capture mark).
    Rule {
        v6: bool,
        priority: u32,
        mark: u32,
        table: u32,
        #[serde(default)]
        marked: bool,
    },
    /// `iif lo from FROM to DST lookup TABLE` at priority 0, ahead of `local` once it is
    /// moved (`--capture-local`).
    LocalRule {
        v6: bool,
        from: IpNet,
        dst: IpNet,
        table: u32,
    },
    /// The kernel's `local` rule at priority 0 put behind the rules above: a copy (of
    /// protocol 116) added after them, then the original (of
    /// protocol `protocol`, learned when installing) deleted. Undone by adding the
    /// original back if it is missing and deleting every copy.
    LocalMoved {
        v6: bool,
        #[serde(default)]
        protocol: u8,
    },
    /// An nftables table `inet TABLE` of the gateway's own (scoped capture), created with
    /// its chains in one transaction and removed whole.
    Nft {
        table: String,
        chains: Vec<NftChain>,
    },
    /// systemd-resolved told to send every query through the TUN (`--setup` with `--dns`,
    /// where resolved runs): `servers` as the TUN link's DNS servers, `~.` as its routing
    /// domain (every name) and the link as a default route for DNS. resolved's own queries
    /// go out bound to the link whose server they ask, which no route can redirect; this
    /// makes that link the TUN. Undone by reverting the link's settings (which also go
    /// with the TUN).
    Resolved {
        ifindex: u32,
        servers: Vec<IpAddr>,
    },
    /// A file under /proc/sys and the value it had.
    Sysctl {
        path: PathBuf,
        previous: String,
        value: String,
    },
}

impl std::fmt::Display for Item {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Item::Route { table, dst, kind: RouteKind::Tun } => write!(f, "route {dst} dev TUN table {table}"),
            Item::Route { table, dst, kind: RouteKind::Throw } => write!(f, "route throw {dst} table {table}"),
            Item::Rule { v6, priority, mark, table, marked } => {
                let family = if *v6 { "-6 " } else { "" };
                let not = if *marked { "" } else { "not " };
                write!(f, "rule {family}priority {priority} {not}fwmark {mark:#x} lookup {table}")
            }
            Item::LocalRule { v6, from, dst, table } => {
                let family = if *v6 { "-6 " } else { "" };
                write!(f, "rule {family}priority 0 iif lo from {from} to {dst} lookup {table}")
            }
            Item::LocalMoved { v6, .. } => {
                let family = if *v6 { "-6 " } else { "" };
                write!(f, "rule {family}priority 0 lookup local, behind the rules above")
            }
            Item::Nft { table, chains } => {
                write!(f, "nftables table inet {table}:")?;
                for c in chains {
                    write!(f, " chain {} {{ {}; {} }}", c.name, c.hook, c.rules.join("; "))?;
                }
                Ok(())
            }
            Item::Sysctl { path, previous, value } => write!(f, "sysctl {} {previous} -> {value}", path.display()),
            Item::Resolved { ifindex, servers } => {
                let servers: Vec<String> = servers.iter().map(ToString::to_string).collect();
                write!(f, "systemd-resolved link {ifindex}: dns {}, domain ~., default-route yes", servers.join(" "))
            }
        }
    }
}

/// A base chain of the scoped capture's nftables table.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NftChain {
    pub name: String,
    /// `type … hook … priority …`.
    pub hook: String,
    pub rules: Vec<String>,
}

/// What the user asked `--setup` for.
#[derive(Debug, Clone)]
pub struct Request {
    pub routes: Vec<IpNet>,
    pub exclude: Vec<IpNet>,
    /// The proxy server's addresses (empty with `--proxy direct`).
    pub proxy: Vec<IpAddr>,
    /// The TUN's own prefixes.
    pub tun_prefixes: Vec<IpNet>,
    pub table: u32,
    pub priority: u32,
    pub mark: u32,
    /// The TUN device's name (names the nftables table of a scoped capture; its
    /// masquerade leaves what enters the TUN alone).
    pub tun: String,
    pub scope: Scope,
    /// `--capture-local`: the host's own addresses (interfaces other than the TUN), whose
    /// traffic from local programs is captured too (with `127.0.0.0/8`).
    pub capture_local: Option<Vec<IpAddr>>,
}

/// Whose traffic is captured: every local program's, or only the owners named, less the
/// owners excluded. Matched in the output path, so it applies to local programs only
/// (traffic the host forwards has no owner).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Scope {
    pub uids: Vec<Uid>,
    pub cgroups: Vec<Cgroup>,
    pub exclude_uids: Vec<Uid>,
    pub exclude_cgroups: Vec<Cgroup>,
}

impl Scope {
    /// Only the owners named are captured.
    pub fn is_restricted(&self) -> bool {
        !self.uids.is_empty() || !self.cgroups.is_empty()
    }

    fn is_everyone(&self) -> bool {
        *self == Scope::default()
    }
}

/// A user as nftables matches it (`meta skuid`): a number, or a name nft looks up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Uid(String);

impl std::str::FromStr for Uid {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        if s.parse::<u32>().is_ok() {
            return Ok(Uid(s.into()));
        }
        // A user name as shadow-utils allows them (e.g. `Debian-exim`); nothing else
        // reaches the nft script.
        let mut chars = s.chars();
        let first_ok = chars.next().is_some_and(|c| c.is_ascii_alphabetic() || c == '_');
        if first_ok && chars.all(|c| c.is_ascii_alphanumeric() || "_-.".contains(c)) {
            Ok(Uid(format!("\"{s}\"")))
        } else {
            Err(format!("{s:?} is neither a uid number nor a user name (letters, digits, _ - .)"))
        }
    }
}

/// A cgroup v2 as nftables matches it (`socket cgroupv2 level N "PATH"`): its depth
/// below the cgroup v2 root, and its path below /sys/fs/cgroup, the one place nft looks
/// cgroups up (it matches the cgroup's id, taken when the rule is loaded).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cgroup {
    pub level: usize,
    pub nft_path: String,
}

/// Where nft looks cgroup paths up.
const NFT_CGROUP_ROOT: &str = "/sys/fs/cgroup";

impl Cgroup {
    /// `--cgroup PATH`: PATH as /proc/PID/cgroup shows it (below the cgroup v2 root), or
    /// the cgroup's directory. `mountinfo` is /proc/self/mountinfo (a parameter for the
    /// tests); the directory must exist.
    pub fn resolve(arg: &str, mountinfo: &str) -> anyhow::Result<Cgroup> {
        let root = mountinfo
            .lines()
            .find_map(|line| {
                let (mount, fs) = line.split_once(" - ")?;
                (fs.split(' ').next() == Some("cgroup2")).then(|| mount.split(' ').nth(4).map(PathBuf::from))?
            })
            .with_context(|| {
                format!(
                    "--cgroup {arg}: no cgroup v2 file system is mounted here (under `ip netns exec`, \
                     which mounts a fresh /sys, mount one at {NFT_CGROUP_ROOT})"
                )
            })?;
        let below = Path::new(arg).strip_prefix(&root).unwrap_or(Path::new(arg.trim_start_matches('/')));
        let parts: Vec<_> = below.components().collect();
        if parts.is_empty() || !parts.iter().all(|c| matches!(c, std::path::Component::Normal(_))) {
            bail!("--cgroup {arg}: not a cgroup below the cgroup v2 root {}", root.display());
        }
        let dir = root.join(below);
        if !dir.join("cgroup.procs").is_file() {
            bail!("--cgroup {arg}: no cgroup {} (create it first)", dir.display());
        }
        let nft_path =
            dir.strip_prefix(NFT_CGROUP_ROOT).ok().and_then(Path::to_str).filter(|p| !p.contains('"')).with_context(
                || {
                    format!(
                        "--cgroup {arg}: nft looks cgroups up below {NFT_CGROUP_ROOT}, but {} is not there",
                        dir.display()
                    )
                },
            )?;
        Ok(Cgroup { level: parts.len(), nft_path: nft_path.into() })
    }

    fn nft_match(&self) -> String {
        format!("socket cgroupv2 level {} \"{}\"", self.level, self.nft_path)
    }
}

/// The nftables chains of a scoped capture. `output` (a `route` chain: the kernel routes
/// a packet again when it changes the mark), in order: packets that carry the gateway's
/// mark are left alone, excluded owners get it, the owners named get the capture mark.
///
/// With exclusions, `postrouting` masquerades what an exclusion sent away from the TUN
/// from a TUN address: a socket's source address is chosen when it connects, by a lookup
/// without the mark, which (unrestricted) finds the TUN; the packet, marked afterwards,
/// leaves by the uplink and needs the uplink's address. (The converse is harmless: the
/// owners named enter the TUN from the uplink's address, and the gateway answers any.)
fn scope_chains(request: &Request) -> Vec<NftChain> {
    let (scope, mark) = (&request.scope, request.mark);
    let capture = capture_mark(mark);
    let owners = |uids: &[Uid], cgroups: &[Cgroup]| -> Vec<String> {
        let uids = uids.iter().map(|u| format!("meta skuid {}", u.0));
        uids.chain(cgroups.iter().map(Cgroup::nft_match)).collect()
    };
    let excluded = owners(&scope.exclude_uids, &scope.exclude_cgroups);
    let mut rules = vec![format!("meta mark {mark:#x} return")];
    for owner in &excluded {
        rules.push(format!("{owner} meta mark set {mark:#x} return"));
    }
    for owner in owners(&scope.uids, &scope.cgroups) {
        rules.push(format!("{owner} meta mark set {capture:#x}"));
    }
    let mut chains = vec![NftChain {
        name: "output".into(),
        hook: format!("type route hook output priority {NFT_PRIORITY}"),
        rules,
    }];
    if !excluded.is_empty() {
        let rules = request
            .tun_prefixes
            .iter()
            .map(|net| {
                let ip = if net.addr().is_ipv4() { "ip" } else { "ip6" };
                format!("meta mark {mark:#x} oifname != \"{}\" {ip} saddr {} masquerade", request.tun, net.trunc())
            })
            .collect();
        chains.push(NftChain {
            name: "postrouting".into(),
            hook: "type nat hook postrouting priority srcnat".into(),
            rules,
        });
    }
    chains
}

/// The mark the scoping chain gives captured packets: the gateway's mark + 1.
pub fn capture_mark(mark: u32) -> u32 {
    mark.wrapping_add(1)
}

/// The routes and rules for `request`, in the order they are installed: a scoped
/// capture's nftables table, then for each family a route names, the throw routes, the
/// routes into the TUN, then the rule (so the rule never points at a half-built table).
pub fn plan(request: &Request) -> Vec<Item> {
    let mut items = Vec::new();
    let scope = &request.scope;
    if !scope.is_everyone() {
        let name: String = request.tun.chars().map(|c| if c.is_ascii_alphanumeric() { c } else { '_' }).collect();
        items.push(Item::Nft { table: format!("tungate_{name}"), chains: scope_chains(request) });
    }
    let (rule_mark, marked) =
        if scope.is_restricted() { (capture_mark(request.mark), true) } else { (request.mark, false) };
    for v6 in [false, true] {
        let family = |net: &IpNet| matches!(net, IpNet::V6(_)) == v6;
        let routes: Vec<IpNet> = request.routes.iter().filter(|n| family(n)).map(IpNet::trunc).collect();
        if routes.is_empty() {
            continue;
        }
        let proxy = request.proxy.iter().map(|&a| IpNet::from(a));
        let mut throws: Vec<IpNet> = request
            .exclude
            .iter()
            .chain(&request.tun_prefixes)
            .copied()
            .chain(proxy)
            .filter(family)
            .map(|n| n.trunc())
            .collect();
        throws.sort();
        throws.dedup();
        for dst in throws {
            items.push(Item::Route { table: request.table, dst, kind: RouteKind::Throw });
        }
        let mut routes = routes;
        routes.sort();
        routes.dedup();
        for dst in routes {
            items.push(Item::Route { table: request.table, dst, kind: RouteKind::Tun });
        }
        items.push(Item::Rule { v6, priority: request.priority, mark: rule_mark, table: request.table, marked });
        if let Some(own) = &request.capture_local {
            items.extend(capture_local(request, v6, own));
        }
    }
    items
}

/// `--capture-local` for one family (see ARCHITECTURE, "Host set-up"): routes into the
/// TUN for the host's own addresses and 127.0.0.0/8 (the gateway's loopback dial source
/// thrown), `fwmark MARK lookup local` (the gateway's own dials), then for each address
/// `iif lo from S to A lookup TABLE` for S the unset source (a socket choosing its
/// source: a new flow) and each TUN prefix (that flow's later lookups and the
/// reverse-path check of its replies), and last `local` moved behind them. A lookup
/// with another source — a server answering, a connection older than the capture, a
/// program that bound its source — still finds `local` first.
///
/// IPv4 only. IPv6 cannot be captured this way: the kernel drops a packet from `::1`
/// that arrives on any interface but `lo`, and for an own address the source it picks
/// is that same address (RFC 6724's first rule), so a new flow looks like an old one.
fn capture_local(request: &Request, v6: bool, own: &[IpAddr]) -> Vec<Item> {
    let tun_nets: Vec<IpNet> = request.tun_prefixes.iter().filter(|n| n.addr().is_ipv4()).map(IpNet::trunc).collect();
    if v6 || tun_nets.is_empty() {
        // IPv6: see above. No IPv4 TUN address: nothing to source the packets from.
        return Vec::new();
    }
    let proxy = request.proxy.iter().map(|&a| IpNet::from(a));
    let throws: Vec<IpNet> = request.exclude.iter().chain(&request.tun_prefixes).copied().chain(proxy).collect();
    let mut dsts: Vec<IpNet> = own
        .iter()
        .filter_map(|a| match a {
            IpAddr::V4(a) if !a.is_loopback() && !a.is_link_local() => Some(IpNet::from(IpAddr::V4(*a))),
            _ => None,
        })
        // What a throw route leaves to the host stays with it (the proxy, --exclude, the
        // TUN's own prefixes).
        .filter(|a| !throws.iter().any(|t| t.contains(&a.addr())))
        .collect();
    dsts.push("127.0.0.0/8".parse().expect("literal"));
    dsts.sort();
    dsts.dedup();
    let table = request.table;
    let source = IpNet::from(IpAddr::V4(tungate_upstream::LOCAL_SOURCE_V4));
    let mut items = vec![Item::Route { table, dst: source, kind: RouteKind::Throw }];
    for &dst in &dsts {
        items.push(Item::Route { table, dst, kind: RouteKind::Tun });
    }
    items.push(Item::Rule { v6, priority: 0, mark: request.mark, table: LOCAL_TABLE, marked: true });
    let unset = IpNet::from(IpAddr::from([0u8; 4]));
    for &dst in &dsts {
        for &from in std::iter::once(&unset).chain(&tun_nets) {
            items.push(Item::LocalRule { v6, from, dst, table });
        }
    }
    items.push(Item::LocalMoved { v6, protocol: 0 });
    items
}

/// The effective IPv4 reverse-path filter of each interface whose setting is strict,
/// loosened: `(path, previous, "2")`. `conf` is /proc/sys/net/ipv4/conf (a parameter for
/// the tests); `all`, `default` and `lo` are left alone, and the TUN unless `with_tun`
/// (a scoped capture, whose replies come out of the TUN from sources that unmarked
/// lookups route elsewhere).
pub fn strict_rp_filters(conf: &Path, tun: &str, with_tun: bool) -> anyhow::Result<Vec<Item>> {
    let read = |p: &Path| -> anyhow::Result<String> {
        Ok(std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?.trim().to_owned())
    };
    let all: u32 = read(&conf.join("all/rp_filter"))?.parse().unwrap_or(0);
    let mut items = Vec::new();
    let mut names: Vec<_> = std::fs::read_dir(conf)
        .with_context(|| format!("reading {}", conf.display()))?
        .filter_map(|e| e.ok().and_then(|e| e.file_name().into_string().ok()))
        .collect();
    names.sort();
    for name in names {
        if ["all", "default", "lo"].contains(&name.as_str()) || (name == tun && !with_tun) {
            continue;
        }
        let path = conf.join(&name).join("rp_filter");
        let Ok(own) = read(&path) else { continue };
        if all.max(own.parse().unwrap_or(0)) == 1 {
            items.push(Item::Sysctl { path, previous: own, value: "2".into() });
        }
    }
    Ok(items)
}

/// The state file: what a run installed, written before each item is installed.
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct State {
    pub tun: String,
    pub pid: u32,
    pub items: Vec<Item>,
}

/// The state file of TUN `tun` in this process's network namespace.
pub fn state_path(dir: &Path, tun: &str) -> anyhow::Result<PathBuf> {
    use std::os::unix::fs::MetadataExt;
    let ns = std::fs::metadata("/proc/self/ns/net").context("reading /proc/self/ns/net")?.ino();
    if tun.contains('/') || tun.is_empty() {
        bail!("--tun {tun:?}: not an interface name");
    }
    Ok(dir.join(format!("{tun}.netns-{ns}.json")))
}

impl State {
    pub fn load(path: &Path) -> anyhow::Result<Option<State>> {
        match std::fs::read(path) {
            Ok(bytes) => {
                let state = serde_json::from_slice(&bytes)
                    .with_context(|| format!("{}: not a tungate state file (remove it by hand)", path.display()))?;
                Ok(Some(state))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
        }
    }

    /// Writes the file whole (a temporary file renamed over it: a crash leaves the old
    /// or the new one, never half of one).
    pub fn save(&self, path: &Path) -> anyhow::Result<()> {
        let dir = path.parent().context("state file has no directory")?;
        std::fs::create_dir_all(dir).with_context(|| {
            format!("--setup: creating the state directory {} (see RUNTIME_DIRECTORY)", dir.display())
        })?;
        let tmp = path.with_extension("json.tmp");
        std::fs::write(&tmp, serde_json::to_vec_pretty(self)?).with_context(|| format!("writing {}", tmp.display()))?;
        std::fs::rename(&tmp, path).with_context(|| format!("writing {}", path.display()))
    }
}

/// Installs items and removes them again, recording each in the state file first.
pub struct Installer {
    handle: rtnetlink::Handle,
    connection: tokio::task::JoinHandle<()>,
    path: PathBuf,
    state: State,
    /// The TUN's interface index, for the routes into it.
    tun_index: u32,
}

impl std::fmt::Debug for Installer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Installer").field("path", &self.path).field("items", &self.state.items.len()).finish()
    }
}

impl Drop for Installer {
    fn drop(&mut self) {
        self.connection.abort();
    }
}

/// An item to install exists already: someone else's (another gateway with the same
/// table and rule priority), so it is neither taken over nor later removed.
#[derive(Debug, thiserror::Error)]
#[error(
    "--setup: {0}: exists already, so it is neither taken over nor removed later (another gateway \
     with the same --table and --rule-priority, or on a TUN of the same name? choose others)"
)]
struct AlreadyThere(Item);

const ENOENT: i32 = 2;
const ESRCH: i32 = 3;
const EEXIST: i32 = 17;
const EPERM: i32 = 1;

fn errno(e: &rtnetlink::Error) -> Option<i32> {
    match e {
        rtnetlink::Error::NetlinkError(m) => Some(m.raw_code().abs()),
        _ => None,
    }
}

/// A netlink error with what it was doing, and what is missing when it was refused.
fn netlink_error(e: rtnetlink::Error, what: &Item) -> anyhow::Error {
    let hint = match errno(&e) {
        Some(EPERM) => " (--setup needs CAP_NET_ADMIN)",
        _ => "",
    };
    anyhow::anyhow!("--setup: {what}: {e}{hint}")
}

impl Installer {
    /// Connects to the kernel's routing netlink for the TUN `tun` and removes what a run
    /// that died left (its state file under `dir`). Returns how many items that was.
    pub async fn open(dir: &Path, tun: &str) -> anyhow::Result<(Installer, usize)> {
        let path = state_path(dir, tun)?;
        let (connection, handle, _) = rtnetlink::new_connection().context("--setup: opening a netlink socket")?;
        let connection = tokio::spawn(connection);
        let mut installer = Installer {
            handle,
            connection,
            path,
            state: State { tun: tun.into(), pid: std::process::id(), items: Vec::new() },
            tun_index: 0,
        };
        let mut left = 0;
        if let Some(old) = State::load(&installer.path)? {
            left = old.items.len();
            tracing::warn!(
                state = %installer.path.display(),
                pid = old.pid,
                items = left,
                "removing what an earlier run on this TUN left installed"
            );
            installer.state.items = old.items;
            installer.undo().await?;
        }
        Ok((installer, left))
    }

    /// Looks up the TUN `name`, which the routes into it name by index.
    pub async fn attach(&mut self, name: &str) -> anyhow::Result<()> {
        use futures_util::TryStreamExt;
        let mut links = self.handle.link().get().match_name(name.to_owned()).execute();
        let link = links.try_next().await.with_context(|| format!("--setup: looking up {name}"))?;
        self.tun_index = link.with_context(|| format!("--setup: no interface {name}"))?.header.index;
        Ok(())
    }

    /// The TUN's interface index (after [`Installer::attach`]).
    pub fn tun_index(&self) -> u32 {
        self.tun_index
    }

    /// Installs `items` in order, each recorded in the state file first. On an error,
    /// what was installed stays recorded: the caller undoes it.
    pub async fn install(&mut self, items: Vec<Item>) -> anyhow::Result<()> {
        for mut item in items {
            if let Item::LocalMoved { v6, protocol } = &mut item {
                *protocol = self
                    .local_rules(*v6)
                    .await?
                    .into_iter()
                    .find(|&p| p != MOVED_LOCAL_PROTOCOL)
                    .context("--setup: --capture-local: the host has no `local` rule at priority 0 to move")?;
            }
            // Recorded first: if the process dies between the two, the next start removes
            // an item that may not exist, which is harmless.
            self.state.items.push(item.clone());
            if let Err(e) = self.state.save(&self.path) {
                self.state.items.pop();
                return Err(e);
            }
            if let Err(e) = self.apply(&item, true).await {
                if e.downcast_ref::<AlreadyThere>().is_some() {
                    // Not ours: never to be removed by us.
                    self.state.items.pop();
                    self.state.save(&self.path)?;
                }
                return Err(e);
            }
            tracing::info!("--setup: {item}");
        }
        Ok(())
    }

    /// Removes everything recorded, newest first, then the state file. An item already
    /// gone (a route that left with the TUN) is not an error; the first other error is
    /// returned after every item was tried, and the items that could not be removed stay
    /// in the state file for the next start or `--cleanup`.
    pub async fn undo(&mut self) -> anyhow::Result<()> {
        let mut first_error = None;
        let mut failed = Vec::new();
        while let Some(item) = self.state.items.pop() {
            match self.apply(&item, false).await {
                Ok(()) => tracing::info!("--setup: removed {item}"),
                Err(e) => {
                    tracing::error!("{e:#}");
                    first_error.get_or_insert(e);
                    failed.push(item);
                }
            }
        }
        if !failed.is_empty() {
            // Kept for the next start or --cleanup, in the order they were installed.
            failed.reverse();
            self.state.items = failed;
            let kept = self.state.save(&self.path);
            self.state.items.clear();
            if let Err(e) = kept {
                tracing::error!("{e:#}");
            }
            return first_error.map_or(Ok(()), Err);
        }
        match std::fs::remove_file(&self.path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => {
                first_error.get_or_insert(anyhow::Error::new(e).context(format!("removing {}", self.path.display())));
            }
        }
        first_error.map_or(Ok(()), Err)
    }

    async fn apply(&self, item: &Item, add: bool) -> anyhow::Result<()> {
        let result = match item {
            Item::Route { table, dst, kind } => {
                let oif = (*kind == RouteKind::Tun).then_some(self.tun_index);
                let message = route_message(*table, *dst, *kind, oif, !add);
                if add {
                    self.handle.route().add(message).execute().await
                } else {
                    self.handle.route().del(message).execute().await
                }
            }
            Item::Rule { v6, priority, mark, table, marked } => {
                let message = rule_message(*v6, *priority, *mark, *table, *marked);
                if add {
                    let mut request = self.handle.rule().add();
                    *request.message_mut() = message;
                    request.execute().await
                } else {
                    self.handle.rule().del(message).execute().await
                }
            }
            Item::Sysctl { path, previous, value } => {
                let write = if add { value } else { previous };
                return match std::fs::write(path, write) {
                    // The TUN's own setting, gone with the TUN.
                    Err(e) if !add && e.kind() == std::io::ErrorKind::NotFound => Ok(()),
                    written => {
                        written.with_context(|| format!("--setup: writing {write} to {} (needs root)", path.display()))
                    }
                };
            }
            Item::Nft { table, chains } => return nft(item, table, chains, add),
            Item::Resolved { ifindex, servers } => return resolved(item, *ifindex, servers, add),
            Item::LocalRule { v6, from, dst, table } => {
                let message = local_rule_message(*v6, *from, *dst, *table);
                if add {
                    let mut request = self.handle.rule().add();
                    *request.message_mut() = message;
                    request.execute().await
                } else {
                    self.handle.rule().del(message).execute().await
                }
            }
            Item::LocalMoved { v6, protocol } => return self.move_local(item, *v6, *protocol, add).await,
        };
        match result {
            Ok(()) => Ok(()),
            Err(e) if add && errno(&e) == Some(EEXIST) => Err(AlreadyThere(item.clone()).into()),
            // Already gone (a route that left with its TUN).
            Err(e) if !add && matches!(errno(&e), Some(ENOENT | ESRCH)) => Ok(()),
            Err(e) => Err(netlink_error(e, item)),
        }
    }
}

impl Installer {
    /// The addresses of every interface but the TUN (after [`Installer::attach`]).
    pub async fn own_addresses(&self) -> anyhow::Result<Vec<IpAddr>> {
        use futures_util::TryStreamExt;
        use rtnetlink::packet_route::address::AddressAttribute;
        let mut addresses = self.handle.address().get().execute();
        let mut found = Vec::new();
        while let Some(a) = addresses.try_next().await.context("--setup: listing the host's addresses")? {
            if a.header.index == self.tun_index {
                continue;
            }
            // IPv4's own address is IFA_LOCAL (IFA_ADDRESS is the peer's on a
            // point-to-point link); IPv6 has IFA_ADDRESS only.
            let local = a.attributes.iter().find_map(|x| match x {
                AddressAttribute::Local(ip) => Some(*ip),
                _ => None,
            });
            let address = a.attributes.iter().find_map(|x| match x {
                AddressAttribute::Address(ip) => Some(*ip),
                _ => None,
            });
            found.extend(local.or(address));
        }
        Ok(found)
    }

    /// The protocols of the `local` rules at priority 0, in order.
    async fn local_rules(&self, v6: bool) -> anyhow::Result<Vec<u8>> {
        use futures_util::TryStreamExt;
        use rtnetlink::packet_route::rule::RuleAttribute;
        let version = if v6 { rtnetlink::IpVersion::V6 } else { rtnetlink::IpVersion::V4 };
        let mut rules = self.handle.rule().get(version).execute();
        let mut found = Vec::new();
        while let Some(rule) = rules.try_next().await.context("--setup: listing the policy rules")? {
            let mut priority = 0;
            let mut table = u32::from(rule.header.table);
            let mut protocol = 0;
            // Only the plain rule: no selector (--capture-local's own `fwmark MARK lookup
            // local` is another).
            let mut plain = rule.header.src_len == 0 && rule.header.dst_len == 0;
            for attribute in &rule.attributes {
                match attribute {
                    RuleAttribute::Priority(p) => priority = *p,
                    RuleAttribute::Table(t) => table = *t,
                    RuleAttribute::Protocol(p) => protocol = u8::from(*p),
                    RuleAttribute::FwMark(_)
                    | RuleAttribute::Iifname(_)
                    | RuleAttribute::Oifname(_)
                    | RuleAttribute::UidRange(_)
                    | RuleAttribute::IpProtocol(_)
                    | RuleAttribute::SourcePortRange(_)
                    | RuleAttribute::DestinationPortRange(_) => plain = false,
                    _ => {}
                }
            }
            if priority == 0 && table == LOCAL_TABLE && plain {
                found.push(protocol);
            }
        }
        Ok(found)
    }

    /// Puts the `local` rule behind --capture-local's (see [`Item::LocalMoved`]), or
    /// restores it: the original back if it is missing, every copy deleted.
    async fn move_local(&self, item: &Item, v6: bool, protocol: u8, add: bool) -> anyhow::Result<()> {
        let present = self.local_rules(v6).await?;
        let rule = |protocol: u8| local_table_rule(v6, protocol);
        let run = |e: rtnetlink::Error| netlink_error(e, item);
        if add {
            let mut request = self.handle.rule().add();
            *request.message_mut() = rule(MOVED_LOCAL_PROTOCOL);
            request.execute().await.map_err(run)?;
            return self.handle.rule().del(rule(protocol)).execute().await.map_err(run);
        }
        if !present.iter().any(|&p| p != MOVED_LOCAL_PROTOCOL) {
            let mut request = self.handle.rule().add();
            *request.message_mut() = rule(protocol);
            request.execute().await.map_err(run)?;
        }
        for _ in present.iter().filter(|&&p| p == MOVED_LOCAL_PROTOCOL) {
            self.handle.rule().del(rule(MOVED_LOCAL_PROTOCOL)).execute().await.map_err(run)?;
        }
        Ok(())
    }
}

/// `lookup local` at priority 0 with the given protocol.
fn local_table_rule(v6: bool, protocol: u8) -> rtnetlink::packet_route::rule::RuleMessage {
    use rtnetlink::packet_route::AddressFamily;
    use rtnetlink::packet_route::rule::{RuleAction, RuleAttribute, RuleMessage};
    let mut m = RuleMessage::default();
    m.header.family = if v6 { AddressFamily::Inet6 } else { AddressFamily::Inet };
    m.header.action = RuleAction::ToTable;
    m.header.table = LOCAL_TABLE as u8;
    m.attributes.push(RuleAttribute::Table(LOCAL_TABLE));
    m.attributes.push(RuleAttribute::Priority(0));
    m.attributes.push(RuleAttribute::Protocol(protocol.into()));
    m
}

/// `iif lo from FROM to DST lookup TABLE` at priority 0.
fn local_rule_message(v6: bool, from: IpNet, dst: IpNet, table: u32) -> rtnetlink::packet_route::rule::RuleMessage {
    use rtnetlink::packet_route::AddressFamily;
    use rtnetlink::packet_route::rule::{RuleAction, RuleAttribute, RuleMessage};
    let mut m = RuleMessage::default();
    m.header.family = if v6 { AddressFamily::Inet6 } else { AddressFamily::Inet };
    m.header.action = RuleAction::ToTable;
    m.header.src_len = from.prefix_len();
    m.header.dst_len = dst.prefix_len();
    m.attributes.push(RuleAttribute::Table(table));
    m.attributes.push(RuleAttribute::Priority(0));
    m.attributes.push(RuleAttribute::Iifname("lo".into()));
    m.attributes.push(RuleAttribute::Source(from.addr()));
    m.attributes.push(RuleAttribute::Destination(dst.addr()));
    m
}

/// A route in `table`: into the interface `oif` (`RouteKind::Tun`) or a throw route. For
/// a delete, protocol and scope match any.
fn route_message(
    table: u32,
    dst: IpNet,
    kind: RouteKind,
    oif: Option<u32>,
    delete: bool,
) -> rtnetlink::packet_route::route::RouteMessage {
    use rtnetlink::RouteMessageBuilder;
    use rtnetlink::packet_route::route::{RouteProtocol, RouteScope, RouteType};
    let kind = match kind {
        RouteKind::Tun => RouteType::Unicast,
        RouteKind::Throw => RouteType::Throw,
    };
    let mut message = match dst {
        IpNet::V4(net) => {
            let mut b = RouteMessageBuilder::<std::net::Ipv4Addr>::new()
                .destination_prefix(net.network(), net.prefix_len())
                .table_id(table)
                .kind(kind);
            if let Some(oif) = oif {
                b = b.output_interface(oif).scope(RouteScope::Link);
            }
            b.build()
        }
        IpNet::V6(net) => {
            let mut b = RouteMessageBuilder::<std::net::Ipv6Addr>::new()
                .destination_prefix(net.network(), net.prefix_len())
                .table_id(table)
                .kind(kind);
            if let Some(oif) = oif {
                b = b.output_interface(oif);
            }
            b.build()
        }
    };
    if delete {
        message.header.protocol = RouteProtocol::Unspec;
        if dst.addr().is_ipv4() {
            message.header.scope = RouteScope::NoWhere;
        }
    }
    message
}

/// Creates (`add`) or deletes the nftables table `inet TABLE` with its chains, in one
/// transaction.
///
/// Through the `nft` program's script syntax: nft 1.0.6 (Debian 12) rejects `socket
/// cgroupv2` in its JSON input ("Invalid socket key value"), and the `nftables` crate's
/// `Socket` has no `level`; a script is the one form that says it on the nft people run.
fn nft(item: &Item, table: &str, chains: &[NftChain], add: bool) -> anyhow::Result<()> {
    use std::io::Write;
    let script = if add {
        let mut s = format!("create table inet {table}\n");
        for NftChain { name, hook, rules } in chains {
            s += &format!("add chain inet {table} {name} {{ {hook}; policy accept; }}\n");
            for rule in rules {
                s += &format!("add rule inet {table} {name} {rule}\n");
            }
        }
        s
    } else {
        format!("delete table inet {table}\n")
    };
    // Blocking, once at start and exit, for a few milliseconds.
    let mut child = std::process::Command::new("nft")
        .args(["-f", "-"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .with_context(|| format!("--setup: {item}: running nft (the scoped capture needs nftables' nft program)"))?;
    let mut stdin = child.stdin.take().context("nft's stdin")?;
    stdin.write_all(script.as_bytes()).with_context(|| format!("--setup: {item}: writing to nft"))?;
    drop(stdin);
    let out = child.wait_with_output().with_context(|| format!("--setup: {item}: running nft"))?;
    if out.status.success() {
        return Ok(());
    }
    let err = String::from_utf8_lossy(&out.stderr);
    if add && err.contains("File exists") {
        return Err(AlreadyThere(item.clone()).into());
    }
    if !add && err.contains("No such file or directory") {
        return Ok(());
    }
    let hint = if err.contains("Operation not permitted") { " (--setup needs CAP_NET_ADMIN)" } else { "" };
    bail!("--setup: {item}: nft: {}{hint}", err.trim())
}

/// systemd-resolved's D-Bus API (`org.freedesktop.resolve1.Manager`) through `busctl`, the
/// systemd tool installed wherever resolved is: three calls at start and one at exit do not
/// justify a D-Bus client library in every binary.
fn resolved(item: &Item, ifindex: u32, servers: &[IpAddr], add: bool) -> anyhow::Result<()> {
    let index = ifindex.to_string();
    let calls: Vec<Vec<String>> = if add {
        let mut dns = vec!["SetLinkDNS".into(), "ia(iay)".into(), index.clone(), servers.len().to_string()];
        for server in servers {
            let (family, bytes) = match server {
                // Linux's AF_INET and AF_INET6.
                IpAddr::V4(a) => (2, a.octets().to_vec()),
                IpAddr::V6(a) => (10, a.octets().to_vec()),
            };
            dns.extend([family.to_string(), bytes.len().to_string()]);
            dns.extend(bytes.iter().map(u8::to_string));
        }
        vec![
            dns,
            ["SetLinkDomains", "ia(sb)", &index, "1", ".", "true"].map(String::from).to_vec(),
            ["SetLinkDefaultRoute", "ib", &index, "true"].map(String::from).to_vec(),
        ]
    } else {
        // A resolved that is gone (or was never ours to tell) holds nothing of the TUN's:
        // it keeps per-link settings only while it runs and the link exists.
        if resolved_here().is_none() {
            return Ok(());
        }
        vec![["RevertLink", "i", &index].map(String::from).to_vec()]
    };
    for call in calls {
        let out = busctl(&["call", "org.freedesktop.resolve1", "/org/freedesktop/resolve1", RESOLVE1_MANAGER], &call)
            .with_context(|| format!("--setup: {item}"))?;
        if out.status.success() {
            continue;
        }
        let err = String::from_utf8_lossy(&out.stderr);
        // The link left with the TUN: resolved forgot it.
        if !add && err.contains("not known") {
            return Ok(());
        }
        bail!("--setup: {item}: busctl {}: {}", call[0], err.trim());
    }
    Ok(())
}

const RESOLVE1_MANAGER: &str = "org.freedesktop.resolve1.Manager";

fn busctl(args: &[&str], more: &[String]) -> anyhow::Result<std::process::Output> {
    std::process::Command::new("busctl")
        .arg("--system")
        .args(args)
        .args(more)
        .stdin(std::process::Stdio::null())
        .output()
        .context("running busctl (systemd's D-Bus tool)")
}

/// `Some` if systemd-resolved owns its name on the system bus and runs in this network
/// namespace. D-Bus is not per network namespace: a resolved on the bus may serve another
/// namespace, whose link numbers are not ours, and is never told anything.
fn resolved_here() -> Option<()> {
    let has = busctl(
        &["call", "org.freedesktop.DBus", "/org/freedesktop/DBus", "org.freedesktop.DBus", "NameHasOwner"],
        &["s".into(), "org.freedesktop.resolve1".into()],
    )
    .ok()?;
    if !has.status.success() || String::from_utf8_lossy(&has.stdout).trim() != "b true" {
        return None;
    }
    let pid = busctl(
        &[
            "call",
            "org.freedesktop.DBus",
            "/org/freedesktop/DBus",
            "org.freedesktop.DBus",
            "GetConnectionUnixProcessID",
        ],
        &["s".into(), "org.freedesktop.resolve1".into()],
    )
    .ok()?;
    let pid = String::from_utf8_lossy(&pid.stdout).trim().strip_prefix("u ")?.parse::<u32>().ok()?;
    let theirs = std::fs::metadata(format!("/proc/{pid}/ns/net")).ok()?;
    let ours = std::fs::metadata("/proc/self/ns/net").ok()?;
    use std::os::unix::fs::MetadataExt;
    if (theirs.dev(), theirs.ino()) != (ours.dev(), ours.ino()) {
        tracing::info!("--setup: systemd-resolved (pid {pid}) serves another network namespace: left alone");
        return None;
    }
    Some(())
}

/// The DNS servers systemd-resolved uses now (global and per link, the TUN's own left
/// out), if resolved runs on the system bus in this network namespace; `None` where it
/// does not (or there is no `busctl`).
pub fn resolved_servers(tun_index: u32) -> Option<Vec<IpAddr>> {
    resolved_here()?;
    let out = busctl(
        &["--json=short", "get-property", "org.freedesktop.resolve1", "/org/freedesktop/resolve1", RESOLVE1_MANAGER],
        &["DNS".into()],
    )
    .ok()?;
    let value: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
    Some(parse_resolved_dns(&value, tun_index))
}

/// `{"type":"a(iiay)","data":[[ifindex, family, [bytes]], …]}` → the addresses not on
/// link `skip`, in order, each once.
fn parse_resolved_dns(value: &serde_json::Value, skip: u32) -> Vec<IpAddr> {
    let mut found = Vec::new();
    for entry in value["data"].as_array().into_iter().flatten() {
        if entry[0].as_u64() == Some(u64::from(skip)) {
            continue;
        }
        let bytes: Vec<u8> = entry[2]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|b| b.as_u64().and_then(|b| u8::try_from(b).ok()))
            .collect();
        let ip = match <[u8; 4]>::try_from(bytes.as_slice()) {
            Ok(v4) => IpAddr::from(v4),
            Err(_) => match <[u8; 16]>::try_from(bytes.as_slice()) {
                Ok(v6) => IpAddr::from(v6),
                Err(_) => continue,
            },
        };
        if !found.contains(&ip) {
            found.push(ip);
        }
    }
    found
}

/// `not fwmark MARK/0xffffffff lookup TABLE` at `priority` (`fwmark MARK/0xffffffff
/// lookup TABLE` when `marked`). (rtnetlink's rule builder has no invert flag or mask:
/// the message is made here.)
fn rule_message(
    v6: bool,
    priority: u32,
    mark: u32,
    table: u32,
    marked: bool,
) -> rtnetlink::packet_route::rule::RuleMessage {
    use rtnetlink::packet_route::AddressFamily;
    use rtnetlink::packet_route::rule::{RuleAction, RuleAttribute, RuleFlags, RuleMessage};
    let mut m = RuleMessage::default();
    m.header.family = if v6 { AddressFamily::Inet6 } else { AddressFamily::Inet };
    m.header.action = RuleAction::ToTable;
    if !marked {
        m.header.flags = RuleFlags::Invert;
    }
    m.attributes.push(RuleAttribute::Table(table));
    m.attributes.push(RuleAttribute::Priority(priority));
    m.attributes.push(RuleAttribute::FwMark(mark));
    m.attributes.push(RuleAttribute::FwMask(0xffff_ffff));
    m
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resolved_dns_servers_are_read_without_the_tun_link() {
        let value: serde_json::Value = serde_json::from_str(
            r#"{"type":"a(iiay)","data":[[0,2,[10,77,0,53]],[3,2,[10,77,0,53]],[3,10,[253,119,0,0,0,0,0,0,0,0,0,0,0,0,0,83]],[9,2,[198,18,0,53]],[4,2,[1,2,3]]]}"#,
        )
        .unwrap();
        let found = parse_resolved_dns(&value, 9);
        assert_eq!(found, ["10.77.0.53".parse::<IpAddr>().unwrap(), "fd77::53".parse().unwrap()]);
        let item = Item::Resolved { ifindex: 9, servers: found };
        assert_eq!(item.to_string(), "systemd-resolved link 9: dns 10.77.0.53 fd77::53, domain ~., default-route yes");
    }

    fn request() -> Request {
        Request {
            routes: vec!["0.0.0.0/0".parse().unwrap(), "::/0".parse().unwrap()],
            exclude: vec!["192.168.1.7/24".parse().unwrap()],
            proxy: vec!["10.78.0.2".parse().unwrap()],
            tun_prefixes: vec!["198.18.0.1/24".parse().unwrap(), "fd18::1/64".parse().unwrap()],
            table: 7467,
            priority: 7467,
            mark: 0x7467,
            tun: "tun-0".into(),
            scope: Scope::default(),
            capture_local: None,
        }
    }

    #[test]
    fn a_scoped_capture_marks_by_owner_and_routes_only_the_marked() {
        let cgroup = Cgroup { level: 2, nft_path: "unified/apps/browser".into() };
        let scope = Scope {
            uids: vec!["1000".parse().unwrap()],
            cgroups: vec![cgroup.clone()],
            exclude_uids: vec!["nobody".parse().unwrap()],
            exclude_cgroups: vec![],
        };
        let items = plan(&Request { scope, ..request() });
        let shown: Vec<String> = items.iter().map(ToString::to_string).collect();
        assert_eq!(
            shown[0],
            "nftables table inet tungate_tun_0: chain output { type route hook output priority mangle; \
             meta mark 0x7467 return; \
             meta skuid \"nobody\" meta mark set 0x7467 return; \
             meta skuid 1000 meta mark set 0x7468; \
             socket cgroupv2 level 2 \"unified/apps/browser\" meta mark set 0x7468 } \
             chain postrouting { type nat hook postrouting priority srcnat; \
             meta mark 0x7467 oifname != \"tun-0\" ip saddr 198.18.0.0/24 masquerade; \
             meta mark 0x7467 oifname != \"tun-0\" ip6 saddr fd18::/64 masquerade }"
        );
        assert!(shown.contains(&"rule priority 7467 fwmark 0x7468 lookup 7467".to_string()), "{shown:?}");
        assert!(shown.contains(&"rule -6 priority 7467 fwmark 0x7468 lookup 7467".to_string()), "{shown:?}");

        // Exclusions alone: everyone else is captured, the excluded carry the bypass mark.
        let scope = Scope { exclude_cgroups: vec![cgroup], ..Scope::default() };
        let shown: Vec<String> = plan(&Request { scope, ..request() }).iter().map(ToString::to_string).collect();
        assert!(shown[0].contains("socket cgroupv2 level 2 \"unified/apps/browser\" meta mark set 0x7467 return }"));
        assert!(shown.contains(&"rule priority 7467 not fwmark 0x7467 lookup 7467".to_string()), "{shown:?}");
        assert!("1000; drop".parse::<Uid>().is_err() && "".parse::<Uid>().is_err());
    }

    #[test]
    fn capture_local_routes_own_ipv4_addresses_ahead_of_the_moved_local_rule() {
        let own = ["10.78.0.1", "127.0.0.1", "169.254.1.1", "198.18.0.1", "fd78::1", "::1"];
        let own = own.iter().map(|a| a.parse().unwrap()).collect();
        let items = plan(&Request { capture_local: Some(own), ..request() });
        let shown: Vec<String> = items.iter().map(ToString::to_string).collect();
        let v4_rule = shown.iter().position(|s| s == "rule priority 7467 not fwmark 0x7467 lookup 7467").unwrap();
        assert_eq!(
            shown[v4_rule + 1..v4_rule + 11],
            [
                "route throw 127.74.67.1/32 table 7467",
                "route 10.78.0.1/32 dev TUN table 7467",
                "route 127.0.0.0/8 dev TUN table 7467",
                "rule priority 0 fwmark 0x7467 lookup 255",
                "rule priority 0 iif lo from 0.0.0.0/32 to 10.78.0.1/32 lookup 7467",
                "rule priority 0 iif lo from 198.18.0.0/24 to 10.78.0.1/32 lookup 7467",
                "rule priority 0 iif lo from 0.0.0.0/32 to 127.0.0.0/8 lookup 7467",
                "rule priority 0 iif lo from 198.18.0.0/24 to 127.0.0.0/8 lookup 7467",
                "rule priority 0 lookup local, behind the rules above",
                "route throw fd18::/64 table 7467",
            ]
        );
        assert!(
            !shown.iter().any(|s| s.contains("fd78::1") || s.contains("-6 priority 0")),
            "IPv6 stays out: {shown:?}"
        );
    }

    #[test]
    fn cgroups_resolve_below_the_cgroup2_mount() {
        let root = std::env::temp_dir().join(format!("tungate-cg-{}", std::process::id()));
        std::fs::create_dir_all(root.join("apps/web")).unwrap();
        std::fs::write(root.join("apps/web/cgroup.procs"), "").unwrap();
        let mountinfo = |at: &Path| {
            format!(
                "30 24 0:26 / /sys rw,nosuid - sysfs sysfs rw\n\
                 35 30 0:30 / {} rw,nosuid shared:9 - cgroup2 cgroup2 rw\n",
                at.display()
            )
        };
        // nft looks up below /sys/fs/cgroup only: a cgroup2 mounted elsewhere is refused.
        let err = Cgroup::resolve("apps/web", &mountinfo(&root)).unwrap_err().to_string();
        assert!(err.contains("below /sys/fs/cgroup"), "{err}");
        let err = Cgroup::resolve("apps/none", &mountinfo(&root)).unwrap_err().to_string();
        assert!(err.contains("no cgroup"), "{err}");
        for bad in ["/", "apps/../..", ""] {
            assert!(Cgroup::resolve(bad, &mountinfo(&root)).is_err(), "{bad:?}");
        }
        let err = Cgroup::resolve("apps/web", "30 24 0:26 / /sys rw - sysfs sysfs rw\n").unwrap_err().to_string();
        assert!(err.contains("no cgroup v2 file system is mounted"), "{err}");
        std::fs::remove_dir_all(&root).unwrap();
        // The machine's own cgroup2, if it sits where nft looks: this process's cgroup.
        let mine = std::fs::read_to_string("/proc/self/cgroup").unwrap();
        let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
        if let Some(path) = mine.lines().find_map(|l| l.strip_prefix("0::/")).filter(|p| !p.is_empty()) {
            if let Ok(found) = Cgroup::resolve(path, &info) {
                assert_eq!(found.level, path.split('/').count());
            }
        }
    }

    #[test]
    fn plan_throws_excludes_proxy_and_tun_before_the_rule() {
        let items = plan(&request());
        let shown: Vec<String> = items.iter().map(ToString::to_string).collect();
        assert_eq!(
            shown,
            [
                "route throw 10.78.0.2/32 table 7467",
                "route throw 192.168.1.0/24 table 7467",
                "route throw 198.18.0.0/24 table 7467",
                "route 0.0.0.0/0 dev TUN table 7467",
                "rule priority 7467 not fwmark 0x7467 lookup 7467",
                "route throw fd18::/64 table 7467",
                "route ::/0 dev TUN table 7467",
                "rule -6 priority 7467 not fwmark 0x7467 lookup 7467",
            ]
        );
        let v4_only = Request { routes: vec!["10.77.0.0/24".parse().unwrap()], ..request() };
        assert!(
            plan(&v4_only).iter().all(|i| !matches!(i, Item::Rule { v6: true, .. })),
            "no v6 rule without a v6 route"
        );
    }

    #[test]
    fn strict_rp_filters_are_found() {
        let dir = std::env::temp_dir().join(format!("tungate-rp-{}", std::process::id()));
        for (name, value) in [("all", "0"), ("default", "1"), ("lo", "1"), ("eth0", "1"), ("eth1", "2"), ("tun0", "1")]
        {
            std::fs::create_dir_all(dir.join(name)).unwrap();
            std::fs::write(dir.join(name).join("rp_filter"), format!("{value}\n")).unwrap();
        }
        let found = strict_rp_filters(&dir, "tun0", false).unwrap();
        assert_eq!(found, [Item::Sysctl { path: dir.join("eth0/rp_filter"), previous: "1".into(), value: "2".into() }]);
        std::fs::write(dir.join("all/rp_filter"), "1").unwrap();
        let found = strict_rp_filters(&dir, "tun0", false).unwrap();
        assert_eq!(found.len(), 1, "eth1 is loose already (the larger value counts): {found:?}");
        std::fs::write(dir.join("eth1/rp_filter"), "0").unwrap();
        assert_eq!(strict_rp_filters(&dir, "tun0", false).unwrap().len(), 2, "eth1 is strict through `all`");
        assert_eq!(strict_rp_filters(&dir, "tun0", true).unwrap().len(), 3, "and the TUN for a scoped capture");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn state_round_trips() {
        let dir = std::env::temp_dir().join(format!("tungate-state-{}", std::process::id()));
        let path = state_path(&dir, "tun7").unwrap();
        assert!(State::load(&path).unwrap().is_none());
        let state = State { tun: "tun7".into(), pid: 1, items: plan(&request()) };
        state.save(&path).unwrap();
        assert_eq!(State::load(&path).unwrap().unwrap().items, state.items);
        assert!(state_path(&dir, "../x").is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
