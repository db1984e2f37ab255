//! The shared conformance suite on backend-ipstack. Its limits (`tungate_testkit::mem::Limits`):
//! ipstack advertises an unscaled window, and reads the wall clock itself (so its in-memory
//! tests run in real time).

tungate_testkit::conformance_suite!(
    limits = tungate_testkit::mem::Limits { window_scaling: false, wall_clock: true },
    backend_ipstack::Ipstack::default(),
    "tungate-ipstack"
);

/// ipstack buffers unread data without limit; the admission cap (1 MiB unread per flow)
/// plus the flow's 256 KiB ring must keep the gateway's growth under 16 MiB.
#[test]
#[ignore = "needs root, network namespaces and the variant binary; run by `make test`"]
fn netns_slow_reader_memory_is_bounded() {
    tungate_testkit::netns::netns_slow_reader("tungate-ipstack", 16 * 1024);
}
