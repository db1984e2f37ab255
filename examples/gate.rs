//! The conformance suite's `Gate` handler (`tungate_testkit::gate`) on a real TUN, so the
//! namespace suite can hold every TUN backend to it — the system stack too, which has no
//! in-memory form. Not an example to copy from: see `own_gateway.rs` for that.
//!
//! `gate --backend NAME --tcp-to ADDR --udp-to ADDR` plus the TUN flags the namespace
//! harness passes (`--tun`, `--mtu`, `--address`, `--mark`).

use std::net::SocketAddr;
use std::sync::Arc;

use clap::Parser;
use tungate_core::device::tun::{TunConfig, TunDevice};
use tungate_core::{Backend, Dispatch, Mtu};
use tungate_testkit::gate::Gate;

#[derive(Parser)]
struct Args {
    #[arg(long)]
    backend: String,
    #[arg(long)]
    tun: String,
    #[arg(long, default_value = "1500")]
    mtu: Mtu,
    #[arg(long)]
    address: Vec<ipnet::IpNet>,
    /// Accepted for the harness; the gate dials destinations it was told, in its own
    /// namespace's routing (the test routes them around the TUN).
    #[arg(long)]
    mark: Option<String>,
    /// Where relayed TCP connections go.
    #[arg(long)]
    tcp_to: SocketAddr,
    /// Where relayed UDP sessions go.
    #[arg(long)]
    udp_to: SocketAddr,
}

async fn serve<B: Backend>(backend: B, device: TunDevice, gate: Gate) -> Result<(), String> {
    println!("{{\"event\": \"ready\", \"backend\": \"{}\"}}", B::NAME);
    let gate = Arc::new(gate);
    let stop = async { tokio::signal::ctrl_c().await.unwrap_or_default() };
    tungate_core::serve(backend, device, Dispatch::new(gate.clone(), gate), stop).await.map_err(|e| e.to_string())
}

#[tokio::main]
async fn main() -> Result<(), String> {
    let args = Args::parse();
    let mut config = TunConfig::new(args.tun, args.mtu);
    config.addresses = args.address.clone();
    let device = TunDevice::create(&config).map_err(|e| e.to_string())?;
    let gate = Gate { tcp_to: args.tcp_to, udp_to: args.udp_to, peeked: Arc::default() };
    match args.backend.as_str() {
        "smoltcp" => serve(backend_smoltcp::Smoltcp::default(), device, gate).await,
        "lwip" => serve(backend_lwip::Lwip::default(), device, gate).await,
        "ipstack" => serve(backend_ipstack::Ipstack::default(), device, gate).await,
        "netstack-smoltcp" => serve(backend_netstack_smoltcp::NetstackSmoltcp::default(), device, gate).await,
        "system" => serve(backend_system::System::new(&args.address), device, gate).await,
        other => Err(format!("--backend {other}: unknown")),
    }
}
