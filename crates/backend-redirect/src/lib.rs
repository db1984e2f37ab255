//! The no-TUN baseline: the kernel captures connections with an nftables `REDIRECT`
//! rule and delivers them to a local listener; the original destination comes from
//! `SO_ORIGINAL_DST`. Each connection goes to the same [`TcpHandler`] as in every
//! backend, as a [`tungate_core::TcpConn`] over the kernel socket itself, so with the direct
//! upstream the bytes never enter user memory (splice). This is the ceiling for
//! capture approaches — the kernel's TCP on both legs and no packet work at all.
//!
//! The rule (installed by the operator; by the tests inside their namespace only):
//!
//! ```text
//! table ip tungate {
//!   chain output {
//!     type nat hook output priority -100;
//!     ip daddr 10.77.0.0/24 meta mark != 0x100 meta l4proto tcp redirect to :12345
//!   }
//! }
//! ```
//!
//! (`meta mark != 0x100` keeps the gateway's own upstream dials out of the capture; the
//! same in an `ip6` table for IPv6. For forwarded traffic a `prerouting` chain redirects
//! to the incoming interface's address, so listen there, not on loopback.)
//!
//! Differences from the TUN backends, by construction: the kernel completes the
//! client's handshake before the handler sees the connection, so a refused upstream
//! reaches the client as a reset right after `connect` succeeded, not as a refused
//! `connect`; and UDP is not captured (REDIRECT has no original destination for it).

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tungate_core::api::RingBudget;
use tungate_core::flow::{self, Decision, FlowId, WakeQueue};
use tungate_core::stream_stack::bridge;
use tungate_core::{Stats, TcpHandler};

/// The destination the client connected to before `REDIRECT` rewrote it.
pub fn original_dst(stream: &TcpStream) -> io::Result<SocketAddr> {
    let sock = socket2::SockRef::from(stream);
    let addr = match stream.local_addr()? {
        SocketAddr::V4(_) => sock.original_dst()?,
        SocketAddr::V6(_) => sock.original_dst_ipv6()?,
    };
    addr.as_socket().ok_or_else(|| io::Error::other("SO_ORIGINAL_DST returned a non-IP address"))
}

/// Accepts on every listener until `shutdown`, handing each connection to `handler`; the
/// rings of connections bridged through them hold at most `max_ring_memory` together.
pub async fn serve(
    listeners: Vec<TcpListener>,
    handler: Arc<dyn TcpHandler>,
    stats: Arc<Stats>,
    max_ring_memory: Option<u64>,
    shutdown: impl std::future::Future<Output = ()>,
) -> io::Result<()> {
    let rings = RingBudget::new(flow::DEFAULT_RING_CAPACITY, max_ring_memory, stats.clone());
    let mut connections = tokio::task::JoinSet::new();
    let own: Vec<SocketAddr> = listeners.iter().filter_map(|l| l.local_addr().ok()).collect();
    tokio::pin!(shutdown);
    loop {
        let accept = std::future::poll_fn(|cx| {
            for l in &listeners {
                if let std::task::Poll::Ready(r) = l.poll_accept(cx) {
                    return std::task::Poll::Ready(r);
                }
            }
            std::task::Poll::Pending
        });
        tokio::select! {
            biased;
            () = &mut shutdown => return Ok(()),
            accepted = accept => match accepted {
                Ok((stream, client)) => match original_dst(&stream) {
                    // A connection made to the listener itself (not redirected) reports the
                    // listener as its original destination: relaying it would dial the
                    // listener again, and again. Refuse it.
                    Ok(dst) if own.contains(&dst) || stream.local_addr().is_ok_and(|l| l == dst) => {
                        tracing::debug!(%client, %dst, "a direct connection to the listener; resetting");
                        let _ = socket2::SockRef::from(&stream).set_linger(Some(Duration::ZERO));
                    }
                    Ok(dst) => {
                        connections.spawn(serve_one(stream, client, dst, handler.clone(), stats.clone(), rings.clone()));
                    }
                    Err(e) => tracing::debug!(%client, "no original destination ({e}); closing"),
                },
                Err(e) => {
                    tracing::warn!("accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            },
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
        }
    }
}

/// One captured connection: the handler decides, then takes the socket itself (or the
/// bytes cross a flow's rings when the handler gave up waiting).
async fn serve_one(
    stream: TcpStream,
    client: SocketAddr,
    dst: SocketAddr,
    handler: Arc<dyn TcpHandler>,
    stats: Arc<Stats>,
    rings: RingBudget,
) {
    Stats::inc(&stats.tcp_requests);
    let wake = WakeQueue::new();
    let (link, request) = flow::new_flow(FlowId(0), client, dst, &rings, wake.clone());
    link.offer_socket();
    tracing::debug!(%client, %dst, "tcp request");
    handler.handle_tcp(request);
    loop {
        match link.decision() {
            Decision::Pending => wake.notified().await,
            Decision::Accepted => {
                let _ = stream.set_nodelay(true);
                if let Err((stream, port)) = link.into_port().hand_over(stream) {
                    bridge(stream, port).await;
                }
                break;
            }
            Decision::Rejected => {
                Stats::inc(&stats.tcp_rejected);
                // The handshake is done already: a reset is the closest to a refusal.
                let _ = socket2::SockRef::from(&stream).set_linger(Some(Duration::ZERO));
                break;
            }
        }
    }
}
