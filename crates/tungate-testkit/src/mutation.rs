//! The invariant behind every mutation test: each packet a backend reads is counted under
//! at most one disposition, the one a look at the packet predicts (the device wrapper,
//! not the engine, counts it as received: `device::Counted`).
//!
//! A mutation loop that only shows "no panic" passes when an engine counts a packet twice
//! or under the wrong heading; [`assert_counted_once`] turns each mutated packet into a
//! check of the engine's accounting.

use smoltcp::wire::{Ipv4Packet, Ipv6Packet};
use tungate_core::packet::{self, Classified};
use tungate_core::stats::StatsSnapshot;

/// Checks the counters an engine changed while handling one `packet`:
///
/// * not `rx_packets` (the device counts reads, `device::Counted`, once for every backend);
/// * not parseable as IP/TCP/UDP (per [`packet::classify`]) → `malformed` and nothing
///   else; well-formed but not handled (ICMP, fragments…) → `unsupported`; UDP → `udp_rx`;
/// * TCP → at most one of `malformed` (a stranger with a bad checksum), `tcp_unknown_flow`
///   (answered with RST), `tcp_syn_duplicate`, `tcp_requests`, `tcp_rejected` (a SYN the
///   NAT refuses at once: no address free). None of them means the segment went to its
///   flow's stack or was a RST for no flow (dropped silently): a segment the stack itself
///   then discards is not visible in these counters;
/// * nothing that only writes can cause moves: `tx_packets`, `tx_refused`, `udp_tx` (`tcp_active` may:
///   a SYN opens a flow, a RST ends a pending one; `udp_dropped` may, if the UDP handler
///   answers at once into a full queue).
///
/// The classifier is the engines' own, so it is first cross-checked against smoltcp's
/// checked parse: an accepted packet must have a header smoltcp accepts (with a valid
/// checksum for IPv4).
#[track_caller]
pub fn assert_counted_once(before: &StatsSnapshot, after: &StatsSnapshot, packet: &[u8]) {
    let delta = |f: fn(&StatsSnapshot) -> u64| f(after).wrapping_sub(f(before));
    let writes = [
        ("rx_packets", delta(|s| s.rx_packets)),
        ("tx_packets", delta(|s| s.tx_packets)),
        ("tx_refused", delta(|s| s.tx_refused)),
        ("udp_tx", delta(|s| s.udp_tx)),
    ];
    for (name, moved) in writes {
        assert_eq!(moved, 0, "{name} moved in the engine while handling one inbound packet: {packet:02x?}");
    }
    let malformed = delta(|s| s.malformed);
    let unsupported = delta(|s| s.unsupported);
    let udp = delta(|s| s.udp_rx);
    let tcp = delta(|s| s.tcp_unknown_flow)
        + delta(|s| s.tcp_syn_duplicate)
        + delta(|s| s.tcp_requests)
        + delta(|s| s.tcp_rejected);
    let got = (malformed, unsupported, udp, tcp);
    let classified = packet::classify(packet);
    if classified.is_ok() {
        match packet.first().map(|b| b >> 4) {
            Some(4) => {
                let ip = Ipv4Packet::new_checked(packet).expect("an accepted IPv4 header parses in smoltcp");
                assert!(ip.verify_checksum(), "an accepted IPv4 header has a valid checksum: {packet:02x?}");
            }
            Some(6) => {
                Ipv6Packet::new_checked(packet).expect("an accepted IPv6 header parses in smoltcp");
            }
            _ => panic!("the classifier accepted a packet that is neither IPv4 nor IPv6: {packet:02x?}"),
        }
    }
    match classified {
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

/// `n` mutated copies of `good`: one to four bytes overwritten, and every seventh copy
/// also cut short. Deterministic for a `seed`.
pub fn mutants(good: &[u8], n: usize, seed: u64) -> impl Iterator<Item = Vec<u8>> + '_ {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut next = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    (0..n).map(move |i| {
        let mut p = good.to_vec();
        for _ in 0..1 + next() % 4 {
            let at = (next() as usize) % p.len();
            p[at] = next() as u8;
        }
        if i % 7 == 0 {
            p.truncate((next() as usize) % (p.len() + 1));
        }
        p
    })
}
