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
