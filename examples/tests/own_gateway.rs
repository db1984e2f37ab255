//! The example program, run as a user would run it: inside throwaway namespaces, on every
//! TUN backend, carrying curl GETs (see `tungate_testkit::netns::netns_example_http_get`).

//! The suite's `Gate` handler runs through a real TUN here too (`examples/gate`): the only
//! way to hold the system stack, which has no in-memory form, to it.

macro_rules! on_every_backend {
    ($($module:ident => $backend:literal),* $(,)?) => {$(
        mod $module {
            #[test]
            #[ignore = "needs root, network namespaces and the built examples; run by `make test`"]
            fn own_gateway_carries_curl() {
                tungate_testkit::netns::netns_example_http_get($backend);
            }

            #[test]
            #[ignore = "needs root, network namespaces and the built examples; run by `make test`"]
            fn gate_peeks_then_relays_or_aborts() {
                tungate_testkit::netns::netns_gate($backend);
            }
        }
    )*};
}

on_every_backend! {
    smoltcp => "smoltcp",
    lwip => "lwip",
    ipstack => "ipstack",
    netstack_smoltcp => "netstack-smoltcp",
    system => "system",
}
