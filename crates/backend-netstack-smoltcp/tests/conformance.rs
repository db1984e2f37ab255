//! The shared conformance suite on backend-netstack-smoltcp.

tungate_testkit::conformance_suite!(backend_netstack_smoltcp::NetstackSmoltcp::default(), "tungate-netstack-smoltcp");

/// Behind a slow reader netstack-smoltcp's window closes — and this load reliably hits
/// smoltcp 0.12's sequence-number panic inside the crate's runner (seen on every run
/// here). The test checks the guard: the process survives, the stack is rebuilt, a new
/// connection is served, and memory stays under 96 MiB over idle (measured: +63 MiB; the
/// growth before the panic was not isolated further).
#[test]
#[ignore = "needs root, network namespaces and the variant binary; run by `make test`"]
fn netns_slow_reader_memory_is_bounded_and_the_panic_is_survived() {
    tungate_testkit::netns::netns_slow_reader("tungate-netstack-smoltcp", 96 * 1024);
}
