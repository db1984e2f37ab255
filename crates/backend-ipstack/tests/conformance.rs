//! The shared conformance suite on backend-ipstack, with one documented exception (see
//! `tungate_testkit::mem::Limits`), checked by a substitute test, not skipped:
//! * under 1% loss and duplication its reassembly can stall an upload for good. This is
//!   ipstack's, not admission's unread cap: with the cap off, 3 of 3 lossy 2 MiB uploads
//!   stalled; a trace showed a retransmission at ipstack's ACK point left unanswered (an
//!   out-of-order entry keyed below the ACK point blocks its reassembly for good).

tungate_testkit::conformance_suite!(
    limits = tungate_testkit::mem::Limits { loss_recovery: false, window_scaling: false, wall_clock: true },
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
