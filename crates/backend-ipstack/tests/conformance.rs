//! The shared conformance suite on backend-ipstack.

tungate_testkit::conformance_suite!(backend_ipstack::Ipstack::default(), "tungate-ipstack");
