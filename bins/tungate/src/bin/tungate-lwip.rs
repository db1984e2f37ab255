//! `tungate-lwip`: the gateway on the lwIP backend (C lwIP 2.1, tuned; see
//! crates/backend-lwip/csrc/lwipopts.h).

fn main() -> std::process::ExitCode {
    tungate::main(|settings| {
        backend_lwip::Lwip::new(backend_lwip::LwipConfig { mtu: settings.mtu, ..Default::default() })
    })
}
