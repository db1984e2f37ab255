//! `tungate-netstack-smoltcp`: the gateway on the netstack-smoltcp backend (smoltcp 0.12
//! underneath; see crates/backend-netstack-smoltcp for the panic guard).

fn main() -> std::process::ExitCode {
    tungate::main(|settings| {
        backend_netstack_smoltcp::NetstackSmoltcp::new(backend_netstack_smoltcp::NetstackConfig {
            mtu: settings.mtu,
            ..Default::default()
        })
    })
}
