//! The variant binary's command line: bad input gets one line of error with context and a
//! non-zero exit; SIGTERM ends it cleanly. Every case runs under `unshare -n`, so the
//! TUNs they create (and any name lookup) live and die in a private network namespace.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::netns::binary;

struct Run {
    code: Option<i32>,
    stderr: String,
}

/// Runs the binary with `args` in a private, empty network namespace: a case that
/// unexpectedly gets as far as creating its TUN (or resolving a proxy's name) does so
/// there, never in the machine's own namespace.
fn run(bin: &str, args: &[&str]) -> Run {
    // A case that unexpectedly starts serving is stopped after 20 s (exit 124), and fails.
    let out = Command::new("timeout")
        .args(["-k", "2", "20", "unshare", "-n"])
        .arg(binary(bin))
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("unshare runs");
    Run { code: out.status.code(), stderr: String::from_utf8_lossy(&out.stderr).into_owned() }
}

/// Runs a shell script in a private network namespace with `$BIN` set.
fn in_private_netns(bin: &str, script: &str) -> Run {
    let out = Command::new("unshare")
        .args(["-n", "bash", "-c", script])
        .env("BIN", binary(bin))
        .stdin(Stdio::null())
        .output()
        .expect("unshare runs");
    Run { code: out.status.code(), stderr: String::from_utf8_lossy(&out.stderr).into_owned() }
}

fn assert_one_line_error(r: &Run, code: i32, needle: &str) {
    assert_eq!(r.code, Some(code), "exit code; stderr: {}", r.stderr);
    assert!(r.stderr.contains(needle), "stderr lacks {needle:?}: {}", r.stderr);
    if code == 1 {
        assert_eq!(r.stderr.trim_end().lines().count(), 1, "one line of error: {}", r.stderr);
    }
}

pub fn cli_bad_flags(bin: &str) {
    assert_one_line_error(&run(bin, &["--tun", "t0", "--address", "198.18.0.300/24"]), 2, "is not ADDRESS/PREFIX");
    assert_one_line_error(&run(bin, &["--tun", "t0", "--address", "198.18.0.1"]), 2, "is not ADDRESS/PREFIX");
    assert_one_line_error(&run(bin, &["--tun", "t0", "--mtu", "70000"]), 2, "out of range");
    assert_one_line_error(&run(bin, &["--tun", "t0", "--mtu", "100"]), 2, "out of range");
    assert_one_line_error(&run(bin, &["--tun", "t0", "--mark", "0xnope"]), 2, "not a 32-bit mark");
    assert_one_line_error(&run(bin, &["--tun", "t0", "--backend", "nosuch"]), 1, "not compiled into this variant");
    assert_one_line_error(&run(bin, &["--tun", "t0", "--proxy", "ftp://x"]), 2, "unknown proxy scheme");
    assert_one_line_error(&run(bin, &["--tun", "t0", "--proxy", "socks5://h:1/path"]), 2, "no path");
    assert_one_line_error(&run(bin, &["--tun", "t0", "--udp", "maybe"]), 2, "not a UDP policy");
    assert_one_line_error(&run(bin, &["--tun", "t0", "--dns", "fake"]), 2, "not a DNS mode");
    let overlap = ["--tun", "t0", "--address", "198.19.0.1/24", "--dns", "fake-ip"];
    assert_one_line_error(&run(bin, &overlap), 1, "overlaps the TUN's own prefix");
    // A proxy host that does not resolve: a clear error at start. In an empty namespace,
    // so the lookup cannot leave the machine.
    let unresolved =
        in_private_netns(bin, "exec \"$BIN\" --tun t0 --address 198.18.0.1/24 --proxy socks5://proxy.invalid:1080");
    assert_one_line_error(&unresolved, 1, "cannot resolve proxy.invalid");
    assert_one_line_error(&run(bin, &["--tun-fd", "999"]), 1, "fd 999 is not an open file descriptor");
    // fd 0 is /dev/null here: open, but not a TUN.
    assert_one_line_error(&run(bin, &["--tun-fd", "0"]), 1, "fd 0 is not a TUN device");
    let help = Command::new(binary(bin)).arg("--help").output().expect("help");
    let text = String::from_utf8_lossy(&help.stdout);
    let flags = ["--tun", "--tun-fd", "--mtu", "--address", "--proxy", "--mark", "--log-level", "--offload", "--udp"];
    for flag in flags.into_iter().chain(["--dns", "--fake-ip-range", "--dns-over-tcp", "--sniff", "--sniff-timeout"]) {
        assert!(text.contains(flag), "--help documents {flag}");
    }
}

pub fn cli_tun_busy_and_permission(bin: &str) {
    let busy = in_private_netns(
        bin,
        r#"ip link set lo up
           "$BIN" --tun tgbusy --address 198.18.0.1/24 2>/dev/null & first=$!
           for i in $(seq 100); do ip link show tgbusy >/dev/null 2>&1 && break; sleep 0.05; done
           "$BIN" --tun tgbusy; rc=$?
           kill $first; wait $first
           exit $rc"#,
    );
    assert_one_line_error(&busy, 1, "is busy");
    let denied = in_private_netns(
        bin,
        r#"exec setpriv --reuid=65534 --regid=65534 --clear-groups --inh-caps=-all --bounding-set=-all "$BIN" --tun tgperm"#,
    );
    assert_one_line_error(&denied, 1, "no permission");
}

pub fn cli_sigterm_exits_cleanly(bin: &str) {
    let mut child = Command::new("unshare")
        .args(["-n"])
        .arg(binary(bin))
        .args(["--tun", "tgterm", "--address", "198.18.0.1/24", "--address", "fd18::1/64"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    // Both pipes are read on threads, so a gateway that hangs before "ready" fails the
    // test after a deadline instead of hanging it, with its stderr in the message.
    let stderr = child.stderr.take().expect("piped");
    let errors = std::thread::spawn(move || std::io::read_to_string(stderr).unwrap_or_default());
    let (line_tx, lines) = std::sync::mpsc::channel::<String>();
    let stdout = child.stdout.take().expect("piped");
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if line_tx.send(line).is_err() {
                break;
            }
        }
    });
    let first = lines.recv_timeout(Duration::from_secs(20)).unwrap_or_else(|_| {
        let _ = child.kill();
        let _ = child.wait();
        panic!("no ready event on stdout within 20 s; stderr:\n{}", errors.join().unwrap_or_default())
    });
    let ready = crate::netns::gateway_events(&first);
    assert_eq!(ready.len(), 1, "the first stdout line is one JSON event: {first:?}");
    let tungate_core::events::Event::Ready(ready) = &ready[0] else {
        panic!("the gateway announces readiness first: {first}")
    };
    assert_eq!(ready.pid, child.id(), "the ready event names the gateway's pid: {first}");
    let status = Command::new("kill").args(["-TERM", &child.id().to_string()]).status().expect("kill");
    assert!(status.success());
    let start = Instant::now();
    loop {
        if let Some(status) = child.try_wait().expect("wait") {
            assert!(status.success(), "exit status after SIGTERM: {status}");
            break;
        }
        assert!(start.elapsed() < Duration::from_secs(10), "no exit within 10 s of SIGTERM");
        std::thread::sleep(Duration::from_millis(20));
    }
    // The process has exited: the reader thread ends at EOF and closes the channel.
    let rest: Vec<String> = lines.iter().collect();
    let events = crate::netns::gateway_events(&rest.join("\n"));
    assert_eq!(events.len(), 1, "exactly one more event after SIGTERM: {rest:?}");
    let counters = events[0].exit_counters().unwrap_or_else(|| panic!("an exit event with numeric counters: {rest:?}"));
    assert!(counters.contains_key("rx_packets"), "the exit event carries the counters: {rest:?}");
}
