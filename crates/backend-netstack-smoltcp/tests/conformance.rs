//! The shared conformance suite on backend-netstack-smoltcp.

tungate_testkit::conformance_suite!(@suite [false]
    [tungate_testkit::mem::Limits { wall_clock: true, ..tungate_testkit::mem::Limits::NONE }]
    backend_netstack_smoltcp::NetstackSmoltcp::default(), "tungate-netstack-smoltcp");

/// Behind a slow reader netstack-smoltcp's window closes: the upload completes (no
/// stack rebuild), a new connection is served, and memory stays under 96 MiB over idle.
#[test]
#[ignore = "needs root, network namespaces and the variant binary; run by `make test`"]
fn netns_slow_reader_memory_is_bounded() {
    tungate_testkit::netns::netns_slow_reader("tungate-netstack-smoltcp", 96 * 1024);
}

/// A client that sends up to the furthest window edge it was offered, after an ACK
/// whose window rounding moved the edge back: smoltcp 0.12 accepts those bytes and then
/// panics in its window arithmetic, killing the stack and every connection on it (the
/// CI failure of a 64 MiB upload through microsocks). Admission trims them off first;
/// the upload completes, digest-checked, and the stack is never rebuilt.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn data_up_to_the_furthest_window_edge_is_trimmed_not_a_panic() {
    let backend = backend_netstack_smoltcp::NetstackSmoltcp::default();
    let restarts = backend.restarts.clone();
    let report = tungate_testkit::rawtcp::window_edge_sender(backend).await;
    eprintln!("{report:?}");
    assert!(report.shift > 0 && report.shrunk_edges > 0, "the scenario did not arise: {report:?}");
    assert_eq!(restarts.load(std::sync::atomic::Ordering::Relaxed), 0, "the stack was rebuilt");
}
