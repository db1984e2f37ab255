//! The shared conformance suite on backend-netstack-smoltcp.

tungate_testkit::conformance_suite!(backend_netstack_smoltcp::NetstackSmoltcp::default(), "tungate-netstack-smoltcp");
