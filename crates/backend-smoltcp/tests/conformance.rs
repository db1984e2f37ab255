//! The shared conformance suite, instantiated for backend-smoltcp.

// Through a TUN with offload: GSO super-packets split on input, TSO super-packets out.
tungate_testkit::conformance_suite!(backend_smoltcp::Smoltcp::default(), "tungate-smoltcp --offload on");
// And through a plain TUN.
tungate_testkit::conformance_suite!(netns_only conformance_netns_plain, "tungate-smoltcp --offload off");
