//! Example programs built on tungate's crates, each run by the namespace suite:
//!
//! * `own-gateway` (`cargo run -p tungate-examples --example own-gateway -- --help`): a
//!   gateway with a handler of its own on any TUN backend, in under 100 lines.
//! * `gate`: the conformance suite's `Gate` handler on a TUN, for the namespace suite (the
//!   system stack has no in-memory form).
