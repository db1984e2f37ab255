//! The example program, run as a user would run it: inside throwaway namespaces, on every
//! TUN backend, carrying curl GETs (see `tungate_testkit::netns::netns_example_http_get`).

macro_rules! on_every_backend {
    ($($test:ident => $backend:literal),* $(,)?) => {$(
        #[test]
        #[ignore = "needs root, network namespaces and the built example; run by `make test`"]
        fn $test() {
            tungate_testkit::netns::netns_example_http_get($backend);
        }
    )*};
}

on_every_backend! {
    own_gateway_smoltcp => "smoltcp",
    own_gateway_lwip => "lwip",
    own_gateway_ipstack => "ipstack",
    own_gateway_netstack_smoltcp => "netstack-smoltcp",
    own_gateway_system => "system",
}
