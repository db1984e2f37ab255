//! The shared conformance suite, instantiated for backend-system.
//!
//! The system stack's TCP is the kernel's own, listening on the TUN's address, so it has
//! no in-memory form: the suite's in-memory half cannot apply. Its namespace half runs
//! twice — with TUN offload (64 KiB super-packets rewritten whole) and without.

tungate_testkit::conformance_suite!(netns_only conformance_netns_offload, "tungate-system --offload on");
tungate_testkit::conformance_suite!(netns_only conformance_netns_plain, "tungate-system --offload off");

/// 20 000 short connections one after another through tungate-system: no NAT port runs
/// out, every one carries its bytes, and no NAT entry is left afterwards.
#[test]
#[ignore = "needs root, network namespaces and the variant binary; run by `make test`"]
fn netns_20000_sequential_connections() {
    tungate_testkit::netns::netns_sequential_connections("tungate-system", 20_000);
}

/// The system stack needs room for its fake client addresses next to the TUN's address:
/// a bad `--address` is one line of error before anything is created.
#[test]
#[ignore = "needs the variant binary; run by `make test`"]
fn cli_address_without_room_is_refused_up_front() {
    let bin = tungate_testkit::netns::binary("tungate-system");
    for (args, needle) in [
        (&["--tun", "tgsys0", "--address", "198.18.0.1/32"][..], "no room for the fake client addresses"),
        (&["--tun", "tgsys0"][..], "needs the TUN's own address"),
    ] {
        let out = std::process::Command::new("unshare").arg("-n").arg(&bin).args(args).output().expect("run");
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{err}");
        assert!(err.contains(needle), "{err}");
        assert!(!err.contains("ready"), "refused before announcing readiness: {err}");
        assert_eq!(err.trim_end().lines().count(), 1, "one line: {err}");
    }
}
