//! The conformance suite every tungate backend must pass, written once.
//!
//! * [`mem`]: against a [`peer::PeerHost`] (a smoltcp host) across an in-memory TUN, with
//!   [`services::Services`] as the handler (echo, sink-and-hash, source, refuse, UDP echo).
//! * [`netns`]: the variant binary on a real kernel TUN inside throwaway network
//!   namespaces, with kernel clients (curl, iperf3, python sockets) and the direct upstream.
//!
//! A backend crate instantiates both with one line in `tests/conformance.rs`:
//!
//! ```ignore
//! tungate_testkit::conformance_suite!(backend_smoltcp::Smoltcp::default(), "tungate-smoltcp");
//! ```
//!
//! Every test asserts on data that crossed the stack: SHA-256 digests, byte counts,
//! addresses and counters.

pub mod cli;
pub mod engine;
pub mod gate;
pub mod hostsetup;
pub mod mem;
pub mod mutation;
pub mod netns;
pub mod peer;
pub mod proxies;
pub mod rawtcp;
pub mod services;
pub mod soak;

pub use cli::{cli_bad_flags, cli_sigterm_exits_cleanly, cli_tun_busy_and_permission};
pub use hostsetup::{
    netns_drain, netns_owned_tun, netns_setup, netns_setup_capture_local, netns_setup_dns, netns_setup_resolved,
    netns_setup_scoped, netns_setup_unprivileged,
};
pub use netns::{
    netns_256mib_each_way, netns_bulk_under_a_memory_cap, netns_bulk_under_faults, netns_churn,
    netns_churn_server_closes, netns_closed_port_refused, netns_counters_match_the_tun, netns_hold_10k, netns_http_get,
    netns_iperf3_short, netns_metrics, netns_pcap, netns_ping, netns_session_limit, netns_tun_fd, netns_udp_echo,
    netns_udp_refused,
};
pub use proxies::{
    netns_dns, netns_http_connect_tinyproxy, netns_sniff, netns_socks5_dante, netns_socks5_dante_auth,
    netns_socks5_microsocks,
};

/// Instantiates the whole suite for one backend: `$backend` is an expression building
/// the backend, `$bin` the variant binary's name (found in `$TUNGATE_BIN_DIR`).
///
/// A backend that admits one instance per process (lwIP keeps global state) is
/// instantiated with `one_per_process` first: its in-memory tests then take turns
/// instead of running in parallel. The tests themselves are the same.
///
/// A backend with no in-memory form (the kernel system stack, whose TCP is the kernel's)
/// is instantiated with `netns_only MODULE, "bin [flags]"`: the namespace half only, once
/// per flag set (e.g. offload on and off), each in its own module.
///
/// A backend documented to lack a capability is instantiated with
/// `limits = mem::Limits { .. }`: the affected tests check the documented substitute
/// behaviour instead (see [`mem::Limits`]); nothing is skipped.
///
/// The in-memory tests run on tokio's simulated clock with fixed seeds ([`mem::run`]),
/// except for a backend whose crate reads the wall clock itself, instantiated with
/// `wall_clock` (or `Limits::wall_clock`): its tests run in real time.
#[macro_export]
macro_rules! conformance_suite {
    (netns_only $module:ident, $bin:expr) => {
        $crate::conformance_suite!(@netns $module $bin);
    };
    (wall_clock, $backend:expr, $bin:expr) => {
        $crate::conformance_suite!(@suite [false] [$crate::mem::Limits { wall_clock: true, ..$crate::mem::Limits::NONE }] $backend, $bin);
    };
    (one_per_process, $backend:expr, $bin:expr) => {
        $crate::conformance_suite!(@suite [true] [$crate::mem::Limits::NONE] $backend, $bin);
    };
    (limits = $limits:expr, $backend:expr, $bin:expr) => {
        $crate::conformance_suite!(@suite [false] [$limits] $backend, $bin);
    };
    ($backend:expr, $bin:expr) => {
        $crate::conformance_suite!(@suite [false] [$crate::mem::Limits::NONE] $backend, $bin);
    };
    (@suite [$serial:literal] [$limits:expr] $backend:expr, $bin:expr) => {
        $crate::conformance_suite!(@mem [$serial] [$limits] $backend;
            handshake_and_addresses, bulk_16mib_upload_v4, bulk_16mib_download_v4, bulk_16mib_upload_v6,
            bulk_16mib_download_v6, half_close_client_first, half_close_server_first, refused_gets_rst_v4,
            refused_gets_rst_v6, concurrent_200_flows, udp_echo_v4, udp_echo_v6,
            malformed_burst, unknown_segment_gets_rst, survives_loss_and_duplication, corruption_is_detected,
            gate_peeks_then_relays_or_aborts, gate_udp_sessions_relay_or_drop, furthest_window_edge_sender, closed_connections_are_forgotten,
            repeated_syn_before_another_client, upload_then_half_close_to_a_slow_reader,
            session_limit_evicts_the_least_recently_active, duplicates_are_acknowledged, fin_is_sent_again,
            lost_reply_after_the_clients_fin, late_segment_with_an_older_ack);
        $crate::conformance_suite!(@netns conformance_netns $bin);
    };
    // The namespace half, the same list for every instantiation.
    (@netns $module:ident $bin:expr) => {
        $crate::conformance_suite!(@netns_tests $module $bin;
            netns_http_get, netns_256mib_each_way, netns_udp_echo, netns_closed_port_refused,
            netns_iperf3_short, cli_bad_flags, cli_tun_busy_and_permission,
            cli_sigterm_exits_cleanly, netns_socks5_dante, netns_socks5_dante_auth,
            netns_socks5_microsocks, netns_http_connect_tinyproxy, netns_sniff, netns_dns,
            netns_churn, netns_churn_server_closes, netns_hold_10k, netns_bulk_under_a_memory_cap,
            netns_counters_match_the_tun, netns_pcap, netns_metrics, netns_bulk_under_faults,
            netns_session_limit, netns_ping, netns_setup, netns_setup_scoped, netns_setup_capture_local, netns_setup_dns, netns_setup_resolved, netns_setup_unprivileged, netns_drain, netns_owned_tun,
            netns_udp_refused, netns_tun_fd);
    };
    (@mem [$serial:literal] [$limits:expr] $backend:expr; $($name:ident),*) => {
        mod conformance_mem {
            #[allow(unused_imports)]
            use super::*;
            /// Held by each test when the backend admits one instance per process.
            static ONE_AT_A_TIME: ::std::sync::Mutex<()> = ::std::sync::Mutex::new(());
            $(
                #[test]
                fn $name() {
                    let _turn = if $serial { Some(ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner())) } else { None };
                    $crate::mem::run($limits, |limits| $crate::mem::$name($backend, limits));
                }
            )*
        }
    };
    (@netns_tests $module:ident $bin:expr; $($name:ident),*) => {
        mod $module {
            $(
                #[test]
                #[ignore = "needs root, network namespaces and the variant binary; run by `make test`"]
                fn $name() {
                    $crate::$name($bin);
                }
            )*
        }
    };
}
