//! `tungate-smoltcp`: the gateway on the smoltcp backend.

fn main() -> std::process::ExitCode {
    tungate::main(|settings| {
        backend_smoltcp::Smoltcp::new(backend_smoltcp::SmoltcpConfig { mtu: settings.mtu, ..Default::default() })
    })
}
