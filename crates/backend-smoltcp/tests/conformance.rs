//! The shared conformance suite, instantiated for backend-smoltcp.

// Through a TUN with offload: GSO super-packets split on input, TSO super-packets out.
tungate_testkit::conformance_suite!(backend_smoltcp::Smoltcp::default(), "tungate-smoltcp --offload on");
// And through a plain TUN.
tungate_testkit::conformance_suite!(netns_only conformance_netns_plain, "tungate-smoltcp --offload off");

/// 2 000 connections open at once through tungate-smoltcp (the same load test as lwIP's).
#[test]
#[ignore = "needs root, network namespaces and the variant binary; run by `make test`"]
fn netns_2000_concurrent_connections() {
    tungate_testkit::netns::netns_many_connections("tungate-smoltcp", 2000);
}
