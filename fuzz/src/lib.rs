//! The bodies of tungate's fuzz targets, written once for two runners:
//!
//! * `cargo fuzz` (nightly, `make fuzz`): each file in `fuzz_targets/` is one line that
//!   hands libFuzzer's input to [`run`];
//! * `tests/replay.rs` (stable, `make test`): every committed input under
//!   `corpus/<target>/` and `regressions/<target>/` goes through the same [`run`], so CI
//!   never needs nightly and a crash once found stays fixed.
//!
//! Every body checks something beyond "no panic": a parser that accepts a message must
//! have needed all of it (no prefix accepted) and must re-encode it to the same bytes;
//! packet input is counted once, under the heading a look at the packet predicts
//! ([`tungate_testkit::mutation::assert_counted_once`]).

pub mod codecs;
pub mod engines;
pub mod packets;
pub mod reader;

/// Every target, by the name of its file in `fuzz_targets/` and its corpus directory.
pub const TARGETS: &[&str] = &[
    "classify",
    "admission",
    "socks5",
    "http_head",
    "dns",
    "sniff",
    "engine_smoltcp",
    "engine_lwip",
    "engine_ipstack",
    "engine_netstack_smoltcp",
];

/// Runs one input through the target `name`.
///
/// # Panics
/// When the input breaks the target's invariant (that is the finding), or for an unknown
/// target name.
pub fn run(name: &str, data: &[u8]) {
    match name {
        "classify" => packets::classify(data),
        "admission" => packets::admission(data),
        "socks5" => codecs::socks5(data),
        "http_head" => codecs::http_head(data),
        "dns" => codecs::dns(data),
        "sniff" => codecs::sniff(data),
        "engine_smoltcp" => {
            engines::smoltcp(data);
        }
        "engine_lwip" => {
            engines::lwip(data);
        }
        "engine_ipstack" => {
            engines::ipstack(data);
        }
        "engine_netstack_smoltcp" => {
            engines::netstack_smoltcp(data);
        }
        other => panic!("no fuzz target named {other:?} (known: {TARGETS:?})"),
    }
}
