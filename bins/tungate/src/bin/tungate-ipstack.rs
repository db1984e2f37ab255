//! `tungate-ipstack`: the gateway on the ipstack backend (see crates/backend-ipstack for
//! what ipstack cannot do and what tungate does about it).

fn main() -> std::process::ExitCode {
    tungate::main(|settings| {
        backend_ipstack::Ipstack::new(backend_ipstack::IpstackConfig { mtu: settings.mtu, ..Default::default() })
    })
}
