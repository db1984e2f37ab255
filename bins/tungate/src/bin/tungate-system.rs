//! `tungate-system`: the gateway on the kernel's own TCP (NAT to a listener on the TUN's
//! address), with TUN offload when the kernel allows it.

fn main() -> std::process::ExitCode {
    tungate::main(|settings| backend_system::System::new(&settings.addresses))
}
