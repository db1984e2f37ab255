//! `--setup` and `--cleanup` in a client namespace whose only way out is its default
//! route: the gateway's own routes, rule and sysctls carry the traffic, and the
//! namespace's routing state is what it was after every way the gateway can end.

use crate::netns::Topology;
use crate::proxies::{dante_on, dig, each_way_64mib, refused, resolver, servers};

/// The proxy listens on the server namespace's veth address, which --setup must leave
/// on the host's route (a throw route); the test servers are on 10.77.0.2, which only
/// the TUN reaches.
const SETUP: [&str; 3] = ["--setup", "--proxy", "socks5://10.78.0.2:1080"];

/// Makes the client namespace a host whose only way out is a default route to the server
/// namespace, runs `extra` there, and returns its routing state once it settled (IPv6
/// link-local routes come a moment after a link is up).
fn host(t: &Topology, extra: &[&[&str]]) -> String {
    let routes: [&[&str]; 2] = [
        &["ip", "route", "add", "default", "via", "10.78.0.2"],
        &["ip", "-6", "route", "add", "default", "via", "fd78::2"],
    ];
    for cmd in routes.iter().chain(extra) {
        let out = t.client(cmd);
        assert!(out.status.success(), "{cmd:?}: {}", String::from_utf8_lossy(&out.stderr));
    }
    std::thread::sleep(std::time::Duration::from_millis(300));
    t.host_state()
}

/// Through dante with only --setup's routing: 64 MiB each way by digest, UDP echo, a
/// refusal; the gateway saw exactly the client's connections (its own to the proxy
/// never came back through the TUN); then directly (with strict rp_filter loosened on
/// the uplink); routes, rules, nftables and rp_filter are as before after SIGTERM, after
/// SIGKILL and the next start, and after SIGKILL and --cleanup.
pub fn netns_setup(bin: &str) {
    let mut t = Topology::bare(bin, 1500);
    // Strict reverse-path filtering: a reply to the gateway's marked socket would be
    // dropped unless --setup loosens it.
    let before = host(
        &t,
        &[&["sysctl", "-qw", "net.ipv4.conf.all.rp_filter=1"], &["sysctl", "-qw", "net.ipv4.conf.c0.rp_filter=1"]],
    );
    dante_on(&mut t, "10.78.0.2", 1080, "none");
    servers(&mut t);
    let setup = SETUP;
    let env = "NETNS_GATEWAY_SETUP=1";

    // Served by --setup's routes alone, then SIGTERM.
    t.start_gateway(env, &setup);
    let during = t.host_state();
    for expected in
        ["not from all fwmark 0x100 lookup 7467", "throw 10.78.0.2 table 7467", "default dev tun0 table 7467"]
    {
        assert!(during.contains(expected), "no {expected:?} while the gateway runs:\n{during}");
    }
    // A second gateway with the same table and rule priority is refused, and touches
    // nothing of the first one's.
    let second = t.run_gateway_binary(&["--tun", "tun1", "--address", "198.18.1.1/24", "--setup"]);
    let err = String::from_utf8_lossy(&second.stderr);
    assert!(!second.status.success() && err.contains("exists already"), "a second --setup: {err}");
    assert_eq!(t.host_state(), during, "a refused second gateway changed the host");
    each_way_64mib(&t, true);
    let udp = t.peer_client(&["udp", "10.77.0.2", "5353", "20"]);
    assert!(udp.starts_with("ok udp 20"), "{udp}");
    refused(&t);
    let stats = t.stop_gateway();
    // Upload, download, the refused connect: the gateway's own connections to dante
    // (marked) never entered the TUN, or each would have been a flow of its own.
    assert_eq!(stats["tcp_requests"], 3, "flows the TUN carried: {stats:?}");
    assert!(stats["rx_bytes"] >= 64 << 20 && stats["tx_bytes"] >= 64 << 20, "{stats:?}");
    assert_eq!(t.host_state(), before, "SIGTERM left the host changed");

    // SIGKILL: what remains is removed by the next start, before it installs anything.
    // That one dials directly: replies to its marked sockets come in on the uplink from
    // an address the table routes into the TUN, which strict rp_filter would drop.
    t.start_gateway(env, &setup);
    t.kill_gateway();
    let left = t.host_state();
    assert_ne!(left, before, "a killed gateway cannot have removed its rule");
    t.start_gateway(env, &["--setup"]);
    let up = t.peer_client(&["upload", "10.77.0.2", "9000", "1048576"]);
    assert!(up.starts_with("ok upload 1048576 bytes"), "{up}");
    assert!(t.gateway_log().contains("removing what an earlier run on this TUN left installed"), "{}", t.gateway_log());
    let stats = t.stop_gateway();
    assert_eq!(stats["tcp_requests"], 1, "{stats:?}");
    assert_eq!(t.host_state(), before, "the restart after SIGKILL left the host changed");

    // SIGKILL, then --cleanup.
    t.start_gateway(env, &setup);
    t.kill_gateway();
    let out = t.run_gateway_binary(&["--tun", "tun0", "--cleanup"]);
    assert!(out.status.success(), "--cleanup: {}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(t.host_state(), before, "--cleanup left the host changed");
    let out = t.run_gateway_binary(&["--tun", "tun0", "--cleanup"]);
    assert!(out.status.success(), "--cleanup with nothing to do: {}", String::from_utf8_lossy(&out.stderr));
}

/// Runs its arguments as uid/gid 65534 with the capabilities `$TEST_CAPS` names (setpriv
/// flags) and a usable TUN device. The machine's /dev/net/tun may be root-only (0600 here;
/// distributions ship 0666): in the process's own mount namespace (`ip netns exec` made
/// one, whose mounts do not reach the machine), a 0666 node on a fresh tmpfs is bound
/// over it.
const AS_NOBODY: &str = r#"#!/bin/sh
set -e
dev=$(mktemp -d)
mount -t tmpfs -o mode=0755 tungate-test-dev "$dev"
mknod -m 666 "$dev/tun" c 10 200
mount --bind "$dev/tun" /dev/net/tun
# shellcheck disable=SC2086 # setpriv flags, split on purpose
exec setpriv --reuid 65534 --regid 65534 --clear-groups $TEST_CAPS -- "$@"
"#;

/// The capabilities `dist/systemd/tungate.service` gives the gateway.
const SERVICE_CAPS: &str = "--inh-caps +net_admin,+net_raw --ambient-caps +net_admin,+net_raw";

/// The gateway as an unprivileged user holding only CAP_NET_ADMIN and CAP_NET_RAW (what
/// `dist/systemd/tungate.service` gives it), its state in the directory systemd would
/// name (`RUNTIME_DIRECTORY`): --setup works, a direct upload crosses the TUN by digest,
/// SIGTERM leaves the host as it was. Without the capability, and without a writable
/// state directory, the one-line error says what is missing.
pub fn netns_setup_unprivileged(bin: &str) {
    let mut t = Topology::bare(bin, 1500);
    let before = host(&t, &[]);
    t.peer_server(&["serve-sink", "10.77.0.2", "9000"]);
    let wrap = t.write_state("as-nobody.sh", AS_NOBODY.as_bytes());
    let state = std::path::Path::new(&wrap).parent().expect("a directory").join("run");
    std::fs::create_dir_all(&state).expect("mkdir the state directory");
    let chown = std::process::Command::new("chown").args(["65534:65534", state.to_str().expect("utf-8")]).status();
    assert!(chown.is_ok_and(|s| s.success()), "chown the state directory");
    let env = format!(
        "NETNS_GATEWAY_SETUP=1 RUNTIME_DIRECTORY={} TEST_CAPS='{SERVICE_CAPS}' NETNS_GATEWAY_WRAP='sh {wrap}'",
        state.display()
    );
    t.start_gateway(&env, &["--setup"]);
    let up = t.peer_client(&["upload", "10.77.0.2", "9000", "4194304"]);
    assert!(up.starts_with("ok upload 4194304 bytes"), "{up}");
    assert!(
        std::fs::read_dir(&state).expect("the state directory").count() == 1,
        "the state file is in RUNTIME_DIRECTORY"
    );
    let stats = t.stop_gateway();
    assert_eq!(stats["tcp_requests"], 1, "the upload crossed the TUN: {stats:?}");
    assert_eq!(t.host_state(), before, "SIGTERM left the host changed");

    let bin_path = t.run_gateway_binary_path();
    let run = |caps: &str, runtime: &str| {
        let (caps, runtime) = (format!("TEST_CAPS={caps}"), format!("RUNTIME_DIRECTORY={runtime}"));
        let args = ["--tun", "tun0", "--address", "198.18.0.1/24", "--setup"];
        let out = t.client(&[&["env", &caps, &runtime, "sh", &wrap, &bin_path][..], &args].concat());
        // Logs go to stderr too: the error is its last line.
        let err = String::from_utf8_lossy(&out.stderr).lines().last().unwrap_or_default().to_owned();
        (out.status.success(), err)
    };
    // Without CAP_NET_ADMIN: the TUN cannot be made.
    let (ok, err) = run("", state.to_str().expect("utf-8"));
    assert!(!ok && err.contains("error: --tun tun0:") && err.contains("needs CAP_NET_ADMIN"), "no capability: {err}");
    // With it, but a state directory the user cannot write.
    let (ok, err) = run(SERVICE_CAPS, "/proc/tungate-nowhere");
    assert!(
        !ok && err.contains("error: --setup: creating the state directory /proc/tungate-nowhere"),
        "no state directory: {err}"
    );
    assert_eq!(t.host_state(), before, "a failed start left the host changed");
}

/// SIGTERM with --setup while a download runs: one that ends within --drain-timeout
/// completes by digest (and a new connection meanwhile is refused); one that does not is
/// reset — the client sees ECONNRESET, never a clean end of a short stream. Either way the
/// gateway exits and the host is as before.
pub fn netns_drain(bin: &str) {
    let mut t = Topology::bare(bin, 1500);
    let before = host(&t, &[]);
    // 1 MB/s: 2 MB take about 2 s, 30 MB about 30 s.
    t.peer_server(&["serve-slow-source", "10.77.0.2", "9001", "1000000"]);
    t.peer_server(&["serve-sink", "10.77.0.2", "9000"]);
    let env = "NETNS_GATEWAY_SETUP=1";
    let wait = |child: std::process::Child| {
        let out = child.wait_with_output().expect("client ran");
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr),
        )
    };

    // Ends within the drain: completes; a new connection meanwhile is refused.
    t.start_gateway(env, &["--setup", "--drain-timeout", "20"]);
    let download = t.spawn_peer_client(&["download", "10.77.0.2", "9001", "2000000"]);
    std::thread::sleep(std::time::Duration::from_millis(500));
    let started = std::time::Instant::now();
    let signal = t.signal_gateway("TERM");
    std::thread::sleep(std::time::Duration::from_millis(300));
    let refused = t.peer_client(&["refused", "10.77.0.2", "9000"]);
    assert!(refused.starts_with("ok refused"), "{refused}");
    let (ok, out) = wait(download);
    assert!(ok && out.starts_with("ok download 2000000 bytes"), "the download cut by the drain: {out}");
    let stats = t.wait_gateway(signal);
    assert!(started.elapsed() < std::time::Duration::from_secs(15), "the gateway waited past its last flow");
    assert_eq!(stats["tcp_requests"], 1, "the refused connection never became a flow: {stats:?}");
    assert_eq!(stats["tcp_drain_resets"], 0, "{stats:?}");
    assert_eq!(t.host_state(), before, "the drain left the host changed");

    // Does not end within the drain: reset, not closed.
    t.start_gateway(env, &["--setup", "--drain-timeout", "1"]);
    let download = t.spawn_peer_client(&["download", "10.77.0.2", "9001", "30000000"]);
    std::thread::sleep(std::time::Duration::from_millis(500));
    let signal = t.signal_gateway("TERM");
    let (ok, out) = wait(download);
    assert!(!ok && out.contains("ConnectionResetError"), "a download cut by the drain must be reset: {out}");
    let stats = t.wait_gateway(signal);
    assert_eq!((stats["tcp_requests"], stats["tcp_drain_resets"]), (1, 1), "the gateway reset it: {stats:?}");
    assert_eq!(t.host_state(), before, "the reset drain left the host changed");
}

/// Mounts the cgroup v2 file system where nft looks cgroups up, then runs its arguments:
/// `ip netns exec` mounts a fresh /sys, without /sys/fs/cgroup, in the process's own
/// mount namespace (whose mounts do not reach the machine).
const WITH_CGROUP2: &str = r#"#!/bin/sh
set -e
mount -t cgroup2 tungate-test-cgroup2 /sys/fs/cgroup
exec "$@"
"#;

/// A cgroup v2 of the test's own, removed when dropped.
struct TestCgroup {
    dir: std::path::PathBuf,
    /// Its path below the cgroup v2 root.
    name: String,
}

impl TestCgroup {
    fn new(t: &Topology) -> TestCgroup {
        let info = std::fs::read_to_string("/proc/self/mountinfo").expect("/proc/self/mountinfo");
        let root = info
            .lines()
            .find_map(|l| {
                let (mount, fs) = l.split_once(" - ")?;
                fs.starts_with("cgroup2 ").then(|| mount.split(' ').nth(4))?
            })
            .expect("a cgroup v2 file system mounted on this machine");
        let name = format!("tungate-test-{}", t.id);
        let dir = std::path::Path::new(root).join(&name);
        std::fs::create_dir(&dir).unwrap_or_else(|e| panic!("mkdir {}: {e}", dir.display()));
        TestCgroup { dir, name }
    }

    /// A command prefix that runs the rest in this cgroup, in the client namespace.
    fn run_in(&self) -> Vec<String> {
        let enter = format!(
            "mount -t cgroup2 tungate-test-cgroup2 /sys/fs/cgroup && echo $$ > /sys/fs/cgroup/{}/cgroup.procs && exec \"$@\"",
            self.name
        );
        vec!["sh".into(), "-c".into(), enter, "sh".into()]
    }
}

impl Drop for TestCgroup {
    fn drop(&mut self) {
        // Its last member may still be exiting.
        for _ in 0..50 {
            if std::fs::remove_dir(&self.dir).is_ok() {
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
        eprintln!("could not remove the test cgroup {}", self.dir.display());
    }
}

/// Scoped capture: with `--uid` and `--cgroup` only their owners' connections go through
/// the gateway (and dante, so the server sees dante's address), everything else directly
/// (the server sees the client's own); with `--exclude-uid` and `--exclude-cgroup` the
/// converse. Strict rp_filter throughout: the replies of a scoped capture come out of the
/// TUN from sources that unmarked lookups route to the uplink, so the TUN's own check
/// must be loosened. Routes, rules, nftables and rp_filter are as before after each run.
pub fn netns_setup_scoped(bin: &str) {
    let mut t = Topology::bare(bin, 1500);
    let before = host(
        &t,
        &[&["sysctl", "-qw", "net.ipv4.conf.all.rp_filter=1"], &["sysctl", "-qw", "net.ipv4.conf.default.rp_filter=1"]],
    );
    dante_on(&mut t, "10.78.0.2", 1080, "none");
    t.peer_server(&["serve-whoami", "10.77.0.2", "9100"]);
    t.peer_server(&["serve-sink", "10.77.0.2", "9000"]);
    let cgroup = TestCgroup::new(&t);
    let wrap = t.write_state("with-cgroup2.sh", WITH_CGROUP2.as_bytes());
    let env = format!("NETNS_GATEWAY_SETUP=1 NETNS_GATEWAY_WRAP='sh {wrap}'");
    let nobody: &[&str] = &["setpriv", "--reuid", "65534", "--regid", "65534", "--clear-groups"];
    let in_cgroup = cgroup.run_in();
    let in_cgroup: Vec<&str> = in_cgroup.iter().map(String::as_str).collect();
    let root: &[&str] = &[];
    let whoami = |via: &[&str]| t.peer_client_via(via, &["whoami", "10.77.0.2", "9100"]).trim().to_owned();
    let direct = "peer 10.78.0.1";

    let mut only = SETUP.to_vec();
    only.extend(["--uid", "65534", "--cgroup", &cgroup.name]);
    t.start_gateway(&env, &only);
    let during = t.host_state();
    assert!(during.contains("fwmark 0x101 lookup 7467") && during.contains("meta skuid 65534"), "{during}");
    assert_eq!(whoami(root), direct, "root, in no named cgroup, was captured");
    assert_ne!(whoami(nobody), direct, "--uid 65534 did not capture uid 65534");
    assert_ne!(whoami(&in_cgroup), direct, "--cgroup did not capture a process in it");
    let up = t.peer_client_via(nobody, &["upload", "10.77.0.2", "9000", "4194304"]);
    assert!(up.starts_with("ok upload 4194304 bytes"), "{up}");
    let stats = t.stop_gateway();
    assert_eq!(stats["tcp_requests"], 3, "the flows the TUN carried: {stats:?}");
    assert_eq!(t.host_state(), before, "a scoped run left the host changed");

    let mut except = SETUP.to_vec();
    except.extend(["--exclude-uid", "65534", "--exclude-cgroup", &cgroup.name]);
    t.start_gateway(&env, &except);
    assert_ne!(whoami(root), direct, "root was not captured");
    assert_eq!(whoami(nobody), direct, "--exclude-uid 65534 captured uid 65534");
    assert_eq!(whoami(&in_cgroup), direct, "--exclude-cgroup captured a process in it");
    let stats = t.stop_gateway();
    assert_eq!(stats["tcp_requests"], 1, "the flows the TUN carried: {stats:?}");
    assert_eq!(t.host_state(), before, "a run with exclusions left the host changed");

    // Without cgroup v2 where nft looks, the error says what to do.
    let out =
        t.run_gateway_binary(&["--tun", "tun0", "--address", "198.18.0.1/24", "--setup", "--cgroup", &cgroup.name]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("no cgroup v2 file system is mounted"), "{err}");
}

/// `--capture-local`: a TCP and a UDP service on 127.0.0.1 and on the namespace's own veth
/// address, and an HTTP server on 127.0.0.1 called by name, are served through the
/// gateway, which dials them itself although --proxy names dante (dante would reach its
/// own namespace's loopback, where nothing listens), --udp says drop and --sniff names
/// the HTTP flow; data by digest, flows by the gateway's counters. IPv6 is not
/// captured (see `setup::capture_local`) and keeps working: `::1` and the veth's
/// `fd78::1`. Without the flag none is captured. The rules (the moved `local` rule with its protocol) and sysctls are as
/// before after each run, and after SIGKILL and the next start.
pub fn netns_setup_capture_local(bin: &str) {
    let mut t = Topology::bare(bin, 1500);
    let before = host(&t, &[]);
    dante_on(&mut t, "10.78.0.2", 1080, "none");
    for host in ["127.0.0.1", "10.78.0.1", "fd78::1", "::1"] {
        t.peer_server_on_client(&["serve-sink", host, "9000"]);
    }
    for host in ["127.0.0.1", "10.78.0.1"] {
        t.peer_server_on_client(&["serve-udp-echo", host, "5353"]);
    }
    let body = crate::services::pattern(1 << 20, 7);
    let page = t.write_state("local-file.bin", &body);
    let www = std::path::Path::new(&page).parent().expect("a directory").to_str().expect("utf-8").to_owned();
    std::fs::rename(&page, format!("{www}/file.bin")).expect("rename");
    t.peer_server_on_client(&["serve-http", &www, "127.0.0.1", "8080"]);
    let env = "NETNS_GATEWAY_SETUP=1";
    let exchange = |t: &Topology| {
        // By name: with --sniff the Host header names "localhost", which must still be
        // dialled here, not by dante.
        t.curl_get("http://localhost:8080/file.bin", &["-4"], &body);
        for host in ["127.0.0.1", "10.78.0.1", "fd78::1", "::1"] {
            let up = t.peer_client(&["upload", host, "9000", "4194304"]);
            assert!(up.starts_with("ok upload 4194304 bytes"), "{host}: {up}");
        }
        for host in ["127.0.0.1", "10.78.0.1"] {
            let udp = t.peer_client(&["udp", host, "5353", "20"]);
            assert!(udp.starts_with("ok udp 20"), "{host}: {udp}");
        }
    };

    // --udp drop and --sniff: neither applies to the host's own addresses.
    let mut local = SETUP.to_vec();
    local.extend(["--capture-local", "--udp", "drop", "--sniff"]);
    t.start_gateway(env, &local);
    let during = t.host_state();
    for expected in ["from 0.0.0.0 to 127.0.0.0/8 iif lo lookup 7467", "from all lookup local proto 116"] {
        assert!(during.contains(expected), "no {expected:?} while the gateway runs:\n{during}");
    }
    exchange(&t);
    let stats = t.stop_gateway();
    assert_eq!(
        (stats["tcp_requests"], stats["udp_sessions"]),
        (3, 2),
        "curl, 127.0.0.1 and 10.78.0.1 by TCP, the last two by UDP: {stats:?}"
    );
    assert_eq!(t.host_state(), before, "--capture-local left the host changed");

    // Killed with the local rule moved: the next start puts it back first.
    t.start_gateway(env, &local);
    t.kill_gateway();
    t.start_gateway(env, &SETUP);
    exchange(&t);
    let stats = t.stop_gateway();
    assert_eq!((stats["tcp_requests"], stats["udp_sessions"]), (0, 0), "captured without the flag: {stats:?}");
    assert_eq!(t.host_state(), before, "the start after a killed --capture-local left the host changed");
}

/// `--setup --dns fake-ip` with the namespace's resolver on the far side: `dig` with no
/// server named (resolv.conf's) is answered by the gateway from the fake pool, a TXT
/// query is forwarded to the resolver through the upstream, curl by name fetches a file
/// by digest; a capture on the uplink meanwhile sees no DNS packet (port 53) at all.
pub fn netns_setup_dns(bin: &str) {
    let mut t = Topology::bare(bin, 1500);
    let before = host(&t, &[]);
    t.server_etc("hosts", "127.0.0.1 localhost\n10.77.0.2 web.test\n");
    t.client_etc("resolv.conf", "nameserver 10.77.0.53\noptions timeout:2 attempts:1\n");
    dante_on(&mut t, "10.78.0.2", 1080, "none");
    resolver(&mut t);
    let body = servers(&mut t);
    let capture = UplinkDns::start(&t);

    let mut setup = SETUP.to_vec();
    setup.extend(["--dns", "fake-ip"]);
    t.start_gateway("NETNS_GATEWAY_SETUP=1", &setup);
    let a = dig(&t, &["web.test", "A"]);
    let a: std::net::Ipv4Addr = a.first().and_then(|a| a.parse().ok()).unwrap_or_else(|| panic!("A: {a:?}"));
    assert_eq!(a.octets()[..2], [198, 19], "{a} is not from the fake pool");
    assert_eq!(dig(&t, &["txt.test", "TXT"]), ["\"hello tungate\""], "TXT forwarded to the resolver");
    t.curl_get("http://web.test:8080/file.bin", &[], &body);
    let stats = t.stop_gateway();
    assert!(stats["dns_fake_answers"] >= 1 && stats["dns_forwarded"] >= 1, "{stats:?}");
    capture.assert_none();
    assert_eq!(t.host_state(), before, "--setup --dns left the host changed");
}

/// A capture of DNS (port 53) on the client namespace's uplink, `c0`.
struct UplinkDns {
    tcpdump: std::process::Child,
    pcap: String,
}

impl UplinkDns {
    fn start(t: &Topology) -> UplinkDns {
        use std::io::BufRead;
        let pcap = t.write_state("uplink-dns.pcap", b"");
        let mut tcpdump = std::process::Command::new("ip")
            .args(["netns", "exec", &t.cli, "tcpdump", "-i", "c0", "-n", "-U", "-w", &pcap, "port 53"])
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("tcpdump");
        let mut line = String::new();
        let stderr = tcpdump.stderr.take().expect("piped");
        std::io::BufReader::new(stderr).read_line(&mut line).expect("tcpdump's first line");
        assert!(line.contains("listening on c0"), "tcpdump: {line}");
        UplinkDns { tcpdump, pcap }
    }

    /// Stops the capture; panics if it holds any packet.
    fn assert_none(mut self) {
        let _ = self.tcpdump.kill();
        let _ = self.tcpdump.wait();
        let read = std::process::Command::new("tcpdump").args(["-n", "-r", &self.pcap]).output().expect("tcpdump -r");
        assert!(read.status.success(), "tcpdump -r: {}", String::from_utf8_lossy(&read.stderr));
        let seen = String::from_utf8_lossy(&read.stdout);
        assert!(seen.trim().is_empty(), "DNS left by the uplink around the gateway:\n{seen}");
    }
}

/// systemd-resolved in the client namespace (unpacked by `make deps`, on a private
/// system bus), whose uplink link asks the resolver on the far side: its own queries go
/// out bound to the uplink, which no route catches. With `--setup --dns fake-ip` the
/// gateway makes the TUN resolved's DNS link for every name: `dig @127.0.0.53` is
/// answered from the fake pool, TXT is forwarded through dante to the same resolver,
/// no DNS packet leaves by the uplink, and after the gateway is gone resolved's links
/// and the host's routing are as before — after SIGKILL too, and a `--cleanup` after
/// resolved stopped completes.
pub fn netns_setup_resolved(bin: &str) {
    let dir = std::env::var("TUNGATE_RESOLVED_DIR").unwrap_or_else(|_| "/var/cache/tungate/systemd-resolved".into());
    let daemon = format!("{dir}/lib/systemd/systemd-resolved");
    let resolvectl = format!("{dir}/usr/bin/resolvectl");
    assert!(std::path::Path::new(&daemon).is_file(), "no {daemon}: `make deps` unpacks systemd-resolved there");
    let mut t = Topology::bare(bin, 1500);
    let before = host(&t, &[]);
    // resolved drops to its own user; the namespace's passwd and group name it.
    for (file, line) in [
        ("passwd", "systemd-resolve:x:64991:64991::/run/systemd:/usr/sbin/nologin"),
        ("group", "systemd-resolve:x:64991:"),
    ] {
        let host = std::fs::read_to_string(format!("/etc/{file}")).expect("the host's passwd and group");
        t.client_etc(file, &format!("{host}{line}\n"));
    }
    // Its stub only (no global server), and nothing sent but to the servers set here:
    // no fallback servers, LLMNR or mDNS; no cache, so every query is asked anew.
    t.client_etc("resolv.conf", "nameserver 127.0.0.53\n");
    // (A directory in /etc/netns/NS takes the place of /etc/NAME as a whole.)
    let conf_dir = format!("/etc/netns/{}/systemd", t.cli);
    std::fs::create_dir_all(&conf_dir).expect("/etc/netns/NS/systemd");
    std::fs::write(
        format!("{conf_dir}/resolved.conf"),
        "[Resolve]\nDNS=\nFallbackDNS=\nLLMNR=no\nMulticastDNS=no\nDNSSEC=no\nDNSOverTLS=no\nCache=no\nReadEtcHosts=no\n",
    )
    .expect("resolved.conf");
    let bus = t.state_file("system_bus_socket");
    let bus_env = format!("DBUS_SYSTEM_BUS_ADDRESS=unix:path={bus}");
    let bus_conf = t.write_state(
        "system-bus.conf",
        format!(
            "<!DOCTYPE busconfig PUBLIC \"-//freedesktop//DTD D-Bus Bus Configuration 1.0//EN\" \
             \"http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd\">\n<busconfig><type>system</type>\
             <listen>unix:path={bus}</listen><auth>EXTERNAL</auth><policy context=\"default\"><allow user=\"*\"/>\
             <allow own=\"*\"/><allow send_destination=\"*\"/><allow receive_sender=\"*\"/></policy></busconfig>\n"
        )
        .as_bytes(),
    );
    t.client_daemon("dbus", &["dbus-daemon", "--nofork", "--nopidfile", &format!("--config-file={bus_conf}")]);
    // A private /run: resolved writes its state under /run/systemd.
    let run = format!("mount -t tmpfs tmpfs /run && mkdir /run/systemd && exec env {bus_env} {daemon}");
    t.client_daemon("resolved", &["sh", "-c", &run]);
    let resolve = |t: &Topology, args: &[&str]| {
        let mut full = vec!["env", bus_env.as_str(), resolvectl.as_str()];
        full.extend_from_slice(args);
        let out = t.client(&full);
        assert!(out.status.success(), "resolvectl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let mut up = false;
    for _ in 0..100 {
        let out = t.client(&["ss", "-Hlun", "src", "127.0.0.53"]);
        if !out.stdout.is_empty() {
            up = true;
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    assert!(
        up,
        "systemd-resolved did not start:\n{}",
        std::fs::read_to_string(t.state_file("resolved.log")).unwrap_or_default()
    );
    // The uplink's own DNS server, as DHCP would have set it.
    resolve(&t, &["dns", "c0", "10.77.0.53"]);
    dante_on(&mut t, "10.78.0.2", 1080, "none");
    resolver(&mut t);
    let stub = |args: &[&str]| {
        let mut full = vec!["@127.0.0.53"];
        full.extend_from_slice(args);
        dig(&t, &full)
    };
    // Without the gateway resolved asks by the uplink: the real answer.
    assert_eq!(stub(&["real.test", "A"]), ["10.77.0.2"], "resolved answers through c0 first");
    let links_before = resolve(&t, &["status"]);

    let capture = UplinkDns::start(&t);

    let mut setup = SETUP.to_vec();
    setup.extend(["--dns", "fake-ip"]);
    t.start_gateway(&format!("export {bus_env}; NETNS_GATEWAY_SETUP=1"), &setup);
    let during = resolve(&t, &["status", "tun0"]);
    assert!(during.contains("10.77.0.53") && during.contains("~."), "the TUN as resolved's DNS link:\n{during}");
    let a = stub(&["real.test", "A"]);
    let a: std::net::Ipv4Addr = a.first().and_then(|a| a.parse().ok()).unwrap_or_else(|| panic!("A: {a:?}"));
    assert_eq!(a.octets()[..2], [198, 19], "{a} is not from the fake pool: resolved asked around the gateway");
    assert_eq!(stub(&["txt.test", "TXT"]), ["\"hello tungate\""], "TXT forwarded through the gateway");
    let stats = t.stop_gateway();
    assert!(stats["dns_fake_answers"] >= 1 && stats["dns_forwarded"] >= 1, "{stats:?}");
    capture.assert_none();
    assert_eq!(resolve(&t, &["status"]), links_before, "resolved's links after the gateway");
    assert_eq!(stub(&["real.test", "A"]), ["10.77.0.2"], "resolved answers through c0 again");
    assert_eq!(t.host_state(), before, "--setup beside resolved left the host changed");

    // SIGKILL: the TUN's settings go with the link; and a --cleanup after resolved
    // itself stopped completes (nothing of the TUN's is left in a resolved that is gone).
    t.start_gateway(&format!("export {bus_env}; NETNS_GATEWAY_SETUP=1"), &setup);
    t.kill_gateway();
    let mut links = String::new();
    for _ in 0..40 {
        links = resolve(&t, &["status"]);
        if links == links_before {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    assert_eq!(links, links_before, "resolved's links after SIGKILL");
    t.stop_daemons();
    let out = t.run_gateway_binary(&["--tun", "tun0", "--cleanup"]);
    assert!(out.status.success(), "--cleanup without resolved: {}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(t.host_state(), before, "--cleanup beside a stopped resolved left the host changed");
}

/// The gateway as an unprivileged user with no capability at all, on a TUN made for that
/// user beforehand (`ip tuntap add … user 65534`, addressed and up): it attaches without
/// touching the link, and curl (by digest) and an upload through dante work. On a TUN
/// that has no owner the one-line error says so and how to make one.
pub fn netns_owned_tun(bin: &str) {
    use std::io::BufRead;
    let mut t = Topology::bare(bin, 1500);
    let made: [&[&str]; 5] = [
        &["ip", "tuntap", "add", "dev", "tun0", "mode", "tun", "user", "65534"],
        &["ip", "addr", "add", "198.18.0.1/24", "dev", "tun0"],
        &["ip", "link", "set", "tun0", "up"],
        &["ip", "route", "add", "10.77.0.0/24", "dev", "tun0"],
        &["ip", "tuntap", "add", "dev", "tun1", "mode", "tun"],
    ];
    for cmd in made {
        let out = t.client(cmd);
        assert!(out.status.success(), "{cmd:?}: {}", String::from_utf8_lossy(&out.stderr));
    }
    dante_on(&mut t, "10.78.0.2", 1080, "none");
    let body = servers(&mut t);
    let wrap = t.write_state("as-nobody.sh", AS_NOBODY.as_bytes());
    let gateway = |tun: &str| {
        std::process::Command::new("ip")
            .args(["netns", "exec", &t.cli, "env", "TEST_CAPS=", "sh", &wrap, &t.run_gateway_binary_path()])
            .args(["--tun", tun, "--address", "198.18.0.1/24", "--offload", "off"])
            .args(["--proxy", "socks5://10.78.0.2:1080"])
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("spawn the gateway")
    };

    let mut child = gateway("tun0");
    let stdout = std::io::BufReader::new(child.stdout.take().expect("piped"));
    let mut lines = stdout.lines();
    let ready = lines.by_ref().map_while(Result::ok).find(|l| l.contains("\"event\":\"ready\""));
    if ready.is_none() {
        let _ = child.kill();
        let out = child.wait_with_output().expect("the gateway's output");
        panic!("no ready event: {}", String::from_utf8_lossy(&out.stderr));
    }
    t.curl_get("http://10.77.0.2:8080/file.bin", &[], &body);
    let up = t.peer_client(&["upload", "10.77.0.2", "9000", "4194304"]);
    assert!(up.starts_with("ok upload 4194304 bytes"), "{up}");
    let term = std::process::Command::new("kill").args(["-TERM", &child.id().to_string()]).status();
    assert!(term.is_ok_and(|s| s.success()), "kill -TERM");
    let exit = lines.map_while(Result::ok).find(|l| l.contains("\"event\":\"exit\"")).expect("an exit event");
    assert!(exit.contains("\"tcp_requests\":2"), "curl and the upload crossed the TUN: {exit}");
    assert!(child.wait().expect("the gateway's status").success(), "the gateway's exit status");
    let link = t.client(&["ip", "-d", "link", "show", "tun0"]);
    assert!(String::from_utf8_lossy(&link.stdout).contains("user nobody"), "the user's TUN stays as it was");

    let out = gateway("tun1").wait_with_output().expect("the gateway's output");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("it exists, with no owner") && err.contains("user USER"),
        "the error on a TUN without owner: {err}"
    );
}
