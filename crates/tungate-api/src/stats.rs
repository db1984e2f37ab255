//! Counters every backend keeps. Relaxed atomics: they are statistics, not synchronisation.

use std::sync::atomic::{AtomicU64, Ordering};

macro_rules! counters {
    ($($(#[doc = $doc:literal])* $name:ident),* $(,)?) => {
        /// Packet and flow counters shared between a backend, its handlers and the binary.
        #[derive(Debug, Default)]
        pub struct Stats { $($(#[doc = $doc])* pub $name: AtomicU64,)* }

        /// A plain copy of [`Stats`] at one moment.
        #[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
        pub struct StatsSnapshot { $(pub $name: u64,)* }

        impl Stats {
            pub fn snapshot(&self) -> StatsSnapshot {
                StatsSnapshot { $($name: self.$name.load(Ordering::Relaxed),)* }
            }
        }

        impl StatsSnapshot {
            /// Every counter by name, in declaration order (for reports and machine-readable output).
            pub fn fields(&self) -> impl Iterator<Item = (&'static str, u64)> {
                [$((stringify!($name), self.$name)),*].into_iter()
            }

            /// Every counter's name and its documentation (for `/metrics`' HELP lines).
            pub const HELP: &'static [(&'static str, &'static str)] = &[$((stringify!($name), concat!($($doc),*))),*];
        }
    };
}

counters! {
    /// Packets read from the device.
    rx_packets,
    /// Packets written to the device.
    tx_packets,
    /// Bytes of the packets read from the device (IP headers included).
    rx_bytes,
    /// Bytes of the packets written to the device (IP headers included).
    tx_bytes,
    /// Packets of our own the device refused to take (dropped; e.g. a super-packet the
    /// kernel will not accept).
    tx_refused,
    /// Packets that failed to parse or verify (bad header, length or checksum).
    malformed,
    /// Well-formed packets the gateway does not handle (ICMP, fragments, extension headers…).
    unsupported,
    /// TCP segments for no known flow that were not a SYN (answered with RST).
    tcp_unknown_flow,
    /// Retransmitted SYNs for a flow already being set up (dropped).
    tcp_syn_duplicate,
    /// TCP flows offered to the handler.
    tcp_requests,
    /// TCP flows the handler refused (answered with RST).
    tcp_rejected,
    /// TCP flows currently tracked by the stack.
    tcp_active,
    /// TCP flows reset to make room for a new one under the session limit
    /// (`--max-sessions`): the least recently active, RST both ways.
    tcp_evicted,
    /// Bytes of storage the flows' rings between stack and handler hold now.
    ring_bytes,
    /// Times a flow's ring to the handler filled up, so the stack's receive window closed
    /// until the handler read (back-pressure from a slow upstream or handler).
    tcp_window_stalls,
    /// Times a ring would have grown but the memory limit (`--max-memory`) was reached.
    ring_growth_refused,
    /// UDP datagrams delivered to the UDP handler.
    udp_rx,
    /// UDP datagrams written back through the device.
    udp_tx,
    /// UDP datagrams dropped (queue full, too large for the MTU, socket error).
    udp_dropped,
    /// ICMP port unreachable written to clients: the upstream's socket was refused by
    /// the destination (the client's own socket then reports ECONNREFUSED).
    udp_refused,
    /// TCP connections still open when the drain at shutdown (`--drain-timeout`) ran out:
    /// reset both ways.
    tcp_drain_resets,
    /// UDP sessions opened (the first datagram of a client to a destination).
    udp_sessions,
    /// UDP sessions open now.
    udp_active,
    /// UDP sessions closed to make room for a new one under the session limit
    /// (`--max-sessions`): the least recently active.
    udp_evicted,
    /// Fragmented datagrams (FRAG ≠ 0) from a SOCKS5 UDP relay (dropped: not reassembled).
    udp_fragments,
    /// Flows the upstream could not carry (a proxy's refusal, a failed dial, UDP the
    /// upstream does not carry under `--udp proxy`); by cause in the five below.
    upstream_failed,
    /// Flows the upstream refused: the destination refused or cannot be reached (a
    /// SOCKS5 reply code, an HTTP status, a name that does not resolve).
    upstream_refused,
    /// Flows refused because the proxy rejected the gateway's credentials.
    upstream_auth_failed,
    /// Flows whose upstream (the proxy, or the destination when direct) could not be
    /// reached in time (`--connect-timeout`).
    upstream_timeouts,
    /// Flows whose upstream failed otherwise: unreachable, broke the protocol, I/O.
    upstream_io_errors,
    /// UDP sessions dropped because the upstream carries no UDP (`--udp proxy`), or
    /// flows to a fake-IP address that is no longer mapped.
    upstream_unroutable,
    /// Flows to a fake-IP address renamed to the name it stands for.
    fake_ip_hits,
    /// DNS queries answered from the fake-IP pools (A and AAAA).
    dns_fake_answers,
    /// DNS queries forwarded to a resolver (other types; `--dns hijack`).
    dns_forwarded,
    /// TCP flows named by their TLS ClientHello's server name (`--sniff`).
    sniffed_tls,
    /// TCP flows named by their HTTP Host header (`--sniff`).
    sniffed_http,
    /// TCP flows `--sniff` found no name in (not TLS or HTTP, no name, or nothing in time).
    sniffed_nothing,
    /// Times a stream stack (ipstack, netstack-smoltcp) was rebuilt once idle after
    /// holding many connections, to give back the tables its crate never shrinks.
    stack_idle_rebuilds,
    /// ICMP echo requests (pings) the gateway answered or sent on (`--icmp reply|direct`).
    icmp_echo_requests,
    /// ICMP echo replies written to clients.
    icmp_echo_replies,
    /// ICMP "destination unreachable" written to clients (`--icmp direct`: the route or
    /// the destination failed).
    icmp_unreachable,
    /// Pings dropped: a session's queue was full, or sending failed for another reason.
    icmp_dropped,
    /// Packets written to the capture file (`--pcap`).
    pcap_packets,
    /// Packets not captured: the capture queue was full, or the file reached its size bound.
    pcap_dropped,
    /// Packets the test-only fault stage dropped, duplicated, reordered or truncated (0
    /// unless `TUNGATE_TEST_FAULTS` is set).
    test_faults_injected,
}

impl StatsSnapshot {
    /// The counters that go down as well as up (levels, not totals).
    pub const GAUGES: &'static [&'static str] = &["tcp_active", "udp_active", "ring_bytes"];
}

impl Stats {
    pub fn inc(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }

    pub fn dec(counter: &AtomicU64) {
        counter.fetch_sub(1, Ordering::Relaxed);
    }
}
