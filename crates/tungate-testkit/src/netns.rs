//! The real-TUN level of the conformance suite.
//!
//! Each test builds the topology of `scripts/netns.sh` (two namespaces joined by a veth;
//! the variant binary and its TUN in the client namespace; servers on 10.77.0.2 and
//! fd77::2 in the server namespace) and tears it down on drop, pass or fail. Clients and
//! servers are kernel sockets (`scripts/e2e_peer.py`), curl and iperf3. Tests take a
//! global lock: they share two cores, and timing checks (a refusal within 1 s) must not
//! depend on what runs beside them.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU32, Ordering};

use sha2::{Digest, Sha256};

static SERIAL: Mutex<()> = Mutex::new(());
static NEXT_ID: AtomicU32 = AtomicU32::new(0);

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..").canonicalize().expect("repository root")
}

/// The variant binary, from `$TUNGATE_BIN_DIR` (set by `make test`).
pub fn binary(name: &str) -> PathBuf {
    let dir = std::env::var_os("TUNGATE_BIN_DIR").unwrap_or_else(|| {
        panic!("TUNGATE_BIN_DIR is not set: build the variants and run the namespace suite with `make test`")
    });
    let path = Path::new(&dir).join(name);
    assert!(path.is_file(), "{} does not exist: run `make all` first", path.display());
    path
}

fn peer_script() -> PathBuf {
    repo_root().join("scripts/e2e_peer.py")
}

/// A two-namespace topology with a running gateway; removed on drop.
pub struct Topology {
    pub id: String,
    pub srv: String,
    pub cli: String,
    servers: Vec<Child>,
    _serial: std::sync::MutexGuard<'static, ()>,
}

impl std::fmt::Debug for Topology {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Topology").field("id", &self.id).finish()
    }
}

/// Runs `script` with `scripts/netns.sh` sourced.
fn netns_lib(script: &str) -> std::process::ExitStatus {
    let lib = repo_root().join("scripts/netns.sh");
    Command::new("bash")
        .arg("-c")
        .arg(format!("set -eu; source '{}'; {script}", lib.display()))
        .stdin(Stdio::null())
        .status()
        .expect("bash runs")
}

impl Topology {
    /// Creates the namespaces (veth MTU `mtu`) and starts `bin` as the gateway.
    pub fn start(bin: &str, mtu: u32) -> Topology {
        let serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
        let bin = binary(bin);
        let id = format!("t{}-{}", std::process::id(), NEXT_ID.fetch_add(1, Ordering::Relaxed));
        let topo = Topology {
            srv: format!("tg-srv-{id}"),
            cli: format!("tg-cli-{id}"),
            id,
            servers: Vec::new(),
            _serial: serial,
        };
        let status = netns_lib(&format!(
            "netns_up {id} {mtu} && netns_start_gateway {id} '{bin}' {mtu}",
            id = topo.id,
            bin = bin.display()
        ));
        assert!(status.success(), "setting up namespaces and the gateway failed (see stderr above)");
        topo
    }

    /// Starts a long-running command in the server namespace and waits for it to print
    /// "listening".
    pub fn server(&mut self, args: &[&str]) {
        let mut child = Command::new("ip")
            .args(["netns", "exec", &self.srv])
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .spawn()
            .expect("spawn server");
        let mut line = String::new();
        let stdout = child.stdout.take().expect("piped");
        BufReader::new(stdout).read_line(&mut line).expect("read server output");
        assert_eq!(line.trim(), "listening", "server {args:?} did not start");
        self.servers.push(child);
    }

    /// Starts an `e2e_peer.py` server.
    pub fn peer_server(&mut self, args: &[&str]) {
        let script = peer_script();
        let mut full = vec!["python3", script.to_str().expect("utf-8 path")];
        full.extend_from_slice(args);
        self.server(&full);
    }

    /// Runs a command in the client namespace and returns its output.
    pub fn client(&self, args: &[&str]) -> Output {
        Command::new("ip")
            .args(["netns", "exec", &self.cli])
            .args(args)
            .stdin(Stdio::null())
            .output()
            .expect("run client")
    }

    /// Runs an `e2e_peer.py` client, asserting success; returns its stdout.
    pub fn peer_client(&self, args: &[&str]) -> String {
        let script = peer_script();
        let mut full = vec!["python3", script.to_str().expect("utf-8 path")];
        full.extend_from_slice(args);
        let out = self.client(&full);
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(
            out.status.success(),
            "client {args:?} failed: {stdout}{}\n--- gateway log ---\n{}",
            String::from_utf8_lossy(&out.stderr),
            self.gateway_log()
        );
        stdout
    }

    pub fn gateway_log(&self) -> String {
        let dir = std::env::var("NETNS_RUNDIR")
            .unwrap_or_else(|_| format!("{}/tungate-netns", std::env::var("TMPDIR").unwrap_or_else(|_| "/tmp".into())));
        std::fs::read_to_string(format!("{dir}/{}/gateway.log", self.id)).unwrap_or_default()
    }
}

impl Drop for Topology {
    fn drop(&mut self) {
        for child in &mut self.servers {
            let _ = child.kill();
            let _ = child.wait();
        }
        netns_lib(&format!("netns_down {}", self.id));
    }
}

pub fn netns_http_get(bin: &str) {
    let mut t = Topology::start(bin, 1500);
    let dir = std::env::temp_dir().join(format!("tungate-http-{}", t.id));
    std::fs::create_dir_all(&dir).expect("mkdir");
    let body = crate::services::pattern(3 * 1024 * 1024 + 17, 99);
    std::fs::write(dir.join("file.bin"), &body).expect("write file");
    let d = dir.to_str().expect("utf-8");
    t.peer_server(&["serve-http", d, "10.77.0.2", "8080"]);
    t.peer_server(&["serve-http", d, "fd77::2", "8080"]);
    for url in ["http://10.77.0.2:8080/file.bin", "http://[fd77::2]:8080/file.bin"] {
        let out = t.client(&["curl", "-sS", "--fail", "--max-time", "30", url]);
        assert!(out.status.success(), "curl {url}: {}\n{}", String::from_utf8_lossy(&out.stderr), t.gateway_log());
        assert_eq!(out.stdout.len(), body.len(), "{url}: length");
        assert_eq!(Sha256::digest(&out.stdout), Sha256::digest(&body), "{url}: body corrupted");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

pub fn netns_256mib_each_way(bin: &str) {
    let mut t = Topology::start(bin, 1500);
    t.peer_server(&["serve-sink", "10.77.0.2", "9000"]);
    t.peer_server(&["serve-source", "10.77.0.2", "9001"]);
    let n = (256u64 << 20).to_string();
    let up = t.peer_client(&["upload", "10.77.0.2", "9000", &n]);
    assert!(up.starts_with("ok upload 268435456 bytes"), "{up}");
    let down = t.peer_client(&["download", "10.77.0.2", "9001", &n]);
    assert!(down.starts_with("ok download 268435456 bytes"), "{down}");
}

pub fn netns_udp_echo(bin: &str) {
    let mut t = Topology::start(bin, 1500);
    t.peer_server(&["serve-udp-echo", "10.77.0.2", "5353"]);
    t.peer_server(&["serve-udp-echo", "fd77::2", "5353"]);
    let v4 = t.peer_client(&["udp", "10.77.0.2", "5353", "20"]);
    assert!(v4.starts_with("ok udp 20"), "{v4}");
    let v6 = t.peer_client(&["udp", "fd77::2", "5353", "20"]);
    assert!(v6.starts_with("ok udp 20"), "{v6}");
}

pub fn netns_closed_port_refused(bin: &str) {
    let t = Topology::start(bin, 1500);
    // Nothing listens on port 9 in the server namespace: the gateway's dial is refused,
    // so the client must see RST (a refused connect), not an open-then-dead connection.
    for host in ["10.77.0.2", "fd77::2"] {
        let out = t.peer_client(&["refused", host, "9"]);
        assert!(out.starts_with("ok refused"), "{out}");
    }
}

pub fn netns_iperf3_short(bin: &str) {
    let t = Topology::start(bin, 1500);
    let status = netns_lib(&format!("netns_start_iperf_server {}", t.id));
    assert!(status.success(), "iperf3 server");
    let out = t.client(&["iperf3", "-c", "10.77.0.2", "-t", "2", "-J"]);
    let json = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "iperf3 failed: {json}\n{}", t.gateway_log());
    let received = json
        .split("\"sum_received\"")
        .nth(1)
        .and_then(|s| s.split("\"bytes\":").nth(1))
        .and_then(|s| s.trim_start().split(|c: char| !c.is_ascii_digit()).next())
        .and_then(|s| s.parse::<u64>().ok())
        .expect("iperf3 JSON has end.sum_received.bytes");
    assert!(received > 1_000_000, "iperf3 moved only {received} bytes");
}
