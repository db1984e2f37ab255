//! A gateway of your own on tungate's crates: pick a backend, give it a TUN, bring a
//! handler. This one relays every TCP connection and UDP session to its original
//! destination and logs the first line each TCP client sends (peeked, not consumed).
//!
//! ```text
//! own-gateway --backend smoltcp --tun tun0 --address 198.18.0.1/30 --mark 0x100
//! ip route add 10.0.0.0/8 dev tun0          # what to send through it
//! ip rule add fwmark 0x100 lookup 100       # and the gateway's own dials around it
//! ```

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use clap::Parser;
use socket2::{Domain, SockRef, Socket, Type};
use tokio::net::{TcpSocket, UdpSocket};
use tungate_core::device::tun::{TunConfig, TunDevice};
use tungate_core::{Backend, Dispatch, Mtu, Target, TcpHandler, TcpRequest, UdpHandler, UdpSession};

#[derive(Parser)]
#[command(about = "A TUN gateway with a handler of its own, on any tungate backend")]
struct Args {
    /// smoltcp, lwip, ipstack, netstack-smoltcp or system.
    #[arg(long)]
    backend: String,
    /// The TUN interface to create (or attach to).
    #[arg(long)]
    tun: String,
    #[arg(long, default_value = "1500")]
    mtu: Mtu,
    /// The TUN's own addresses (CIDR; repeatable).
    #[arg(long)]
    address: Vec<ipnet::IpNet>,
    /// SO_MARK for the gateway's own sockets, so a policy rule can route them around the TUN.
    #[arg(long, value_parser = parse_mark)]
    mark: Option<u32>,
}

/// `0x100` or `256`.
fn parse_mark(s: &str) -> Result<u32, std::num::ParseIntError> {
    s.strip_prefix("0x").map_or_else(|| s.parse(), |hex| u32::from_str_radix(hex, 16))
}

/// The handler: dial first (a refused destination refuses the client), then relay.
struct Relay {
    mark: Option<u32>,
}

impl TcpHandler for Relay {
    fn handle_tcp(&self, request: TcpRequest) {
        let mark = self.mark;
        tokio::spawn(async move {
            let Target::Addr(dst) = *request.target() else { return request.reject() };
            let socket = if dst.is_ipv4() { TcpSocket::new_v4() } else { TcpSocket::new_v6() };
            let dial = async { socket.and_then(|s| mark_and(s, mark)).ok()?.connect(dst).await.ok() };
            let Some(upstream) = dial.await else { return request.reject() };
            let mut client = request.accept().await;
            let mut first = [0u8; 128];
            let n = client.peek(&mut first, Duration::from_millis(200)).await.unwrap_or(0);
            let line = first[..n].split(|&b| b == b'\r' || b == b'\n').next().unwrap_or_default();
            eprintln!("{} -> {dst}: {:?}", client.src(), String::from_utf8_lossy(line));
            let _ = client.relay(upstream, Duration::from_secs(300)).await;
        });
    }
}

fn mark_and(socket: TcpSocket, mark: Option<u32>) -> std::io::Result<TcpSocket> {
    mark.map_or(Ok(()), |m| SockRef::from(&socket).set_mark(m)).map(|()| socket)
}

impl UdpHandler for Relay {
    fn handle_udp(&self, mut session: UdpSession) {
        let Target::Addr(dst) = *session.target() else { return };
        let Ok(socket) = udp_socket(dst, self.mark) else { return };
        tokio::spawn(async move {
            let mut buf = vec![0u8; 65536];
            loop {
                tokio::select! {
                    datagram = session.recv() => match datagram {
                        Some(d) => { let _ = socket.send(&d).await; }
                        None => return, // idle: the session is over
                    },
                    Ok(n) = socket.recv(&mut buf) => { let _ = session.send(&buf[..n]); }
                }
            }
        });
    }
}

fn udp_socket(dst: SocketAddr, mark: Option<u32>) -> std::io::Result<UdpSocket> {
    let socket = Socket::new(Domain::for_address(dst), Type::DGRAM, None)?;
    mark.map_or(Ok(()), |m| socket.set_mark(m))?;
    socket.set_nonblocking(true)?;
    socket.connect(&dst.into())?;
    UdpSocket::from_std(socket.into())
}

async fn serve<B: Backend>(backend: B, device: TunDevice, mark: Option<u32>) -> Result<(), String> {
    let relay = Arc::new(Relay { mark });
    // Tells a supervisor (the test harness) the TUN is up.
    println!("{{\"event\": \"ready\", \"backend\": \"{}\"}}", B::NAME);
    let stop = async { tokio::signal::ctrl_c().await.unwrap_or_default() };
    tungate_core::serve(backend, device, Dispatch::new(relay.clone(), relay), stop).await.map_err(|e| e.to_string())
}

#[tokio::main]
async fn main() -> Result<(), String> {
    let args = Args::parse();
    let mut config = TunConfig::new(args.tun, args.mtu);
    config.addresses = args.address.clone();
    let device = TunDevice::create(&config).map_err(|e| e.to_string())?;
    let (mtu, mark) = (args.mtu, args.mark);
    match args.backend.as_str() {
        "smoltcp" => {
            serve(
                backend_smoltcp::Smoltcp::new(backend_smoltcp::SmoltcpConfig { mtu, ..Default::default() }),
                device,
                mark,
            )
            .await
        }
        "lwip" => {
            serve(backend_lwip::Lwip::new(backend_lwip::LwipConfig { mtu, ..Default::default() }), device, mark).await
        }
        "ipstack" => {
            serve(
                backend_ipstack::Ipstack::new(backend_ipstack::IpstackConfig { mtu, ..Default::default() }),
                device,
                mark,
            )
            .await
        }
        "netstack-smoltcp" => {
            let config = backend_netstack_smoltcp::NetstackConfig { mtu, ..Default::default() };
            serve(backend_netstack_smoltcp::NetstackSmoltcp::new(config), device, mark).await
        }
        "system" => serve(backend_system::System::new(&args.address), device, mark).await,
        other => Err(format!("--backend {other}: not one of smoltcp, lwip, ipstack, netstack-smoltcp, system")),
    }
}
