//! The invariant behind every mutation test: each packet a backend reads is counted
//! exactly once, under the disposition an independent look at the packet predicts.
//!
//! A mutation loop that only shows "no panic" passes when an engine silently loses
//! packets or counts one twice; [`assert_counted_once`] turns each mutated packet into a
//! check of the engine's accounting.

use tungate_core::packet::{self, Classified};
use tungate_core::stats::StatsSnapshot;

/// Checks the counters an engine changed for one `packet`: `rx_packets` by exactly one,
/// and then exactly one disposition:
///
/// * not parseable as IP/TCP/UDP (per [`packet::classify`]) → `malformed`;
/// * well-formed but not handled (ICMP, fragments…) → `unsupported`;
/// * UDP → `udp_rx`;
/// * TCP → at most one of `malformed` (a stranger with a bad checksum), `tcp_unknown_flow`
///   (answered with RST), `tcp_syn_duplicate`, `tcp_requests`; none of them means the
///   segment went to its flow's stack (or was a RST for no flow, dropped silently).
///
/// No other disposition counter may move.
#[track_caller]
pub fn assert_counted_once(before: &StatsSnapshot, after: &StatsSnapshot, packet: &[u8]) {
    let delta = |f: fn(&StatsSnapshot) -> u64| f(after) - f(before);
    assert_eq!(delta(|s| s.rx_packets), 1, "rx_packets counts the packet once: {packet:02x?}");
    let malformed = delta(|s| s.malformed);
    let unsupported = delta(|s| s.unsupported);
    let udp = delta(|s| s.udp_rx);
    let tcp = delta(|s| s.tcp_unknown_flow) + delta(|s| s.tcp_syn_duplicate) + delta(|s| s.tcp_requests);
    let got = (malformed, unsupported, udp, tcp);
    match packet::classify(packet) {
        Err(_) => assert_eq!(got, (1, 0, 0, 0), "an unparseable packet is counted malformed: {packet:02x?}"),
        Ok(Classified::Unsupported) => {
            assert_eq!(got, (0, 1, 0, 0), "an unsupported packet is counted unsupported: {packet:02x?}")
        }
        Ok(Classified::Udp { .. }) => assert_eq!(got, (0, 0, 1, 0), "a UDP datagram is counted once: {packet:02x?}"),
        Ok(Classified::Tcp(_)) => assert!(
            unsupported == 0 && udp == 0 && malformed + tcp <= 1,
            "a TCP segment has at most one disposition, got (malformed, unsupported, udp, tcp) = {got:?}: {packet:02x?}"
        ),
    }
}
