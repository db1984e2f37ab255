//! The shared conformance suite, instantiated for backend-smoltcp.

tungate_testkit::conformance_suite!(backend_smoltcp::Smoltcp::default(), "tungate-smoltcp");
