//! `tungate-smoltcp`: the gateway on the smoltcp backend.

fn main() -> std::process::ExitCode {
    tungate::main::<backend_smoltcp::Smoltcp>(|mtu| {
        backend_smoltcp::Smoltcp::new(backend_smoltcp::SmoltcpConfig { mtu, ..Default::default() })
    })
}
