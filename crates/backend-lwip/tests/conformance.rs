//! The shared conformance suite on backend-lwip. lwIP keeps global state, so the
//! in-memory tests take turns (`one_per_process`).

tungate_testkit::conformance_suite!(one_per_process, backend_lwip::Lwip::default(), "tungate-lwip");

/// The load test: 2 000 connections open at once through tungate-lwip.
#[test]
#[ignore = "needs root, network namespaces and the variant binary; run by `make test`"]
fn netns_2000_concurrent_connections() {
    tungate_testkit::netns::netns_many_connections("tungate-lwip", 2000);
}
