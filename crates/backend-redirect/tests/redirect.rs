//! The TCP part of the namespace suite, through tungate-redirect: the client's
//! connections are captured by an nftables REDIRECT rule inside the test's client
//! namespace (`scripts/netns.sh`), not by a TUN.

use std::process::Command;

const BIN: &str = "tungate-redirect";

#[test]
#[ignore = "needs root, network namespaces and the variant binary; run by `make test`"]
fn netns_http_get() {
    tungate_testkit::netns_http_get(BIN);
}

#[test]
#[ignore = "needs root, network namespaces and the variant binary; run by `make test`"]
fn netns_256mib_each_way() {
    tungate_testkit::netns_256mib_each_way(BIN);
}

#[test]
#[ignore = "needs root, network namespaces and the variant binary; run by `make test`"]
fn netns_iperf3_short() {
    tungate_testkit::netns_iperf3_short(BIN);
}

/// REDIRECT completes the handshake before the upstream is dialled: a closed upstream
/// port reaches the client as a reset right after connect, not as a refused connect.
#[test]
#[ignore = "needs root, network namespaces and the variant binary; run by `make test`"]
fn netns_closed_port_reset() {
    tungate_testkit::netns::netns_closed_port_reset(BIN);
}

/// A connection made to the listener itself (not redirected) must not be relayed: its
/// original destination is the listener, and dialling it would loop.
#[test]
#[ignore = "needs root, network namespaces and the variant binary; run by `make test`"]
fn netns_direct_connection_to_the_listener_is_reset() {
    let mut t = tungate_testkit::netns::Topology::start(BIN, 1500);
    let out = t.peer_client(&["reset", "127.0.0.1", "12345"]);
    assert!(out.starts_with("ok reset"), "{out}");
    // And the gateway still serves.
    t.peer_server(&["serve-source", "10.77.0.2", "7101"]);
    let after = t.peer_client(&["download", "10.77.0.2", "7101", "1000000"]);
    assert!(after.starts_with("ok download 1000000 bytes"), "{after}");
}

/// 2 000 short connections one after another: all served, none refused, no relay left.
#[test]
#[ignore = "needs root, network namespaces and the variant binary; run by `make test`"]
fn netns_2000_sequential_connections() {
    tungate_testkit::netns::netns_sequential_connections(BIN, 2000);
}

/// Churn: 10 000 short connections, 50 at a time: none refused or reset, no relay left.
/// Half the TUN backends' 20 000: here the clients and the gateway's upstream sockets
/// share one namespace, source address and destination, so both sides' TIME_WAIT
/// sockets draw on the same 28 232 ephemeral ports (20 000 each ran out of ports).
#[test]
#[ignore = "needs root, network namespaces and the variant binary; run by `make test`"]
fn netns_churn() {
    tungate_testkit::netns::churn(BIN, 10_000, 50);
}

#[test]
#[ignore = "needs the variant binary; run by `make test`"]
fn cli_bad_flags() {
    let bin = tungate_testkit::netns::binary(BIN);
    let out = Command::new(&bin).args(["--listen", "127.0.0.1"]).output().expect("run");
    assert_eq!(out.status.code(), Some(2));
    let out = Command::new(&bin).args(["--proxy", "ftp://x", "--listen", "127.0.0.1:0"]).output().expect("run");
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("unknown proxy scheme"));
    let out = Command::new(&bin).args(["--dns", "fake-ip", "--listen", "127.0.0.1:0"]).output().expect("run");
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("need a TUN variant") && err.trim_end().lines().count() == 1, "{err}");
    let help = Command::new(&bin).arg("--help").output().expect("help");
    let text = String::from_utf8_lossy(&help.stdout);
    for needle in ["--listen", "--mark", "REDIRECT", "nft add rule"] {
        assert!(text.contains(needle), "--help explains {needle}");
    }
}
