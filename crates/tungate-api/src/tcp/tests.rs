use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::*;
use crate::RingBudget;
use crate::wake::{FlowId, WakeQueue};

fn addr(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

#[tokio::test]
async fn bytes_cross_both_ways_with_half_close() {
    let wake = WakeQueue::new();
    let (link, req) =
        new_flow(FlowId(7), addr("10.0.0.1:1000"), addr("10.0.0.2:80"), &RingBudget::unlimited(16), wake.clone());
    let mut q = Vec::new();
    assert_eq!(link.decision(), Decision::Pending);
    let mut conn = req.accept().await;
    wake.drain_into(&mut q);
    assert_eq!(q, vec![FlowId(7)]);

    // Stack → handler, more than the ring holds: the rest waits and the flow is blocked.
    let sig = link.pump(|io| assert_eq!(io.deliver(b"0123456789abcdefXYZ"), 16));
    assert_eq!(sig.decision, Decision::Accepted);
    let mut buf = [0u8; 32];
    let n = conn.read(&mut buf).await.unwrap();
    assert_eq!(&buf[..n], b"0123456789abcdef");
    // Reading from a blocked ring queues the flow again.
    q.clear();
    wake.drain_into(&mut q);
    assert_eq!(q, vec![FlowId(7)]);

    // Handler → stack, then shutdown: FIN only once the ring is empty.
    conn.write_all(b"reply").await.unwrap();
    conn.shutdown().await.unwrap();
    let mut out = [0u8; 3];
    let sig = link.pump(|io| assert_eq!(io.fill(&mut out), 3));
    assert!(!sig.tx_finished);
    let mut out = [0u8; 8];
    let sig = link.pump(|io| assert_eq!(io.fill(&mut out), 2));
    assert!(sig.tx_finished);

    link.set_rx_eof();
    assert_eq!(conn.read(&mut buf).await.unwrap(), 0);
}

#[tokio::test]
async fn dropping_a_conn_resets_only_if_client_bytes_are_lost() {
    let wake = WakeQueue::new();
    // Nothing unread: FIN; bytes arriving afterwards: RST.
    let (link, req) =
        new_flow(FlowId(1), addr("10.0.0.1:1"), addr("10.0.0.2:2"), &RingBudget::unlimited(16), wake.clone());
    drop(req.accept().await);
    let sig = link.pump(|_| {});
    assert!(sig.tx_finished && sig.handler_gone && !sig.abort_requested);
    let sig = link.pump(|io| assert_eq!(io.deliver(b"late"), 4));
    assert!(sig.abort_requested, "data for a closed flow is answered with RST");

    // Unread bytes at drop: RST at once.
    let (link, req) = new_flow(FlowId(2), addr("10.0.0.1:1"), addr("10.0.0.2:2"), &RingBudget::unlimited(16), wake);
    let conn = req.accept().await;
    link.pump(|io| assert_eq!(io.deliver(b"unread"), 6));
    drop(conn);
    assert!(link.pump(|_| {}).abort_requested);
}

#[tokio::test]
async fn reset_surfaces_as_error_and_drop_rejects() {
    let wake = WakeQueue::new();
    let (link, req) = new_flow(FlowId(1), addr("[::1]:1"), addr("[::2]:2"), &RingBudget::unlimited(16), wake.clone());
    drop(req);
    assert_eq!(link.decision(), Decision::Rejected);

    let (link, req) = new_flow(FlowId(2), addr("[::1]:1"), addr("[::2]:2"), &RingBudget::unlimited(16), wake);
    let mut conn = req.accept().await;
    link.set_closed(true);
    let mut buf = [0u8; 4];
    assert_eq!(conn.read(&mut buf).await.unwrap_err().kind(), io::ErrorKind::ConnectionReset);
    assert_eq!(conn.write(b"x").await.unwrap_err().kind(), io::ErrorKind::ConnectionReset);
}

#[tokio::test(start_paused = true)]
async fn peek_waits_for_enough_bytes_consumes_nothing_and_is_bounded() {
    let wake = WakeQueue::new();
    let (link, mut req) =
        new_flow(FlowId(3), addr("10.0.0.1:1"), addr("10.0.0.2:443"), &RingBudget::unlimited(64), wake);
    // Peeking accepts: the stack completes the handshake before any byte exists.
    let link = std::sync::Arc::new(link);
    let feeder = {
        let link = link.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(10)).await;
            assert_eq!(link.decision(), Decision::Accepted);
            link.pump(|io| assert_eq!(io.deliver(b"hello "), 6));
            tokio::time::sleep(Duration::from_millis(10)).await;
            link.pump(|io| assert_eq!(io.deliver(b"world"), 5));
        })
    };
    let mut buf = [0u8; 11];
    assert_eq!(req.peek(&mut buf, Duration::from_secs(1)).await.unwrap(), 11);
    assert_eq!(&buf, b"hello world", "the peek waited for the second segment");
    feeder.await.unwrap();

    // Asking for more than will come: the wait is bounded, and what came is returned.
    let start = tokio::time::Instant::now();
    let mut big = [0u8; 40];
    assert_eq!(req.peek(&mut big, Duration::from_millis(300)).await.unwrap(), 11);
    assert_eq!(start.elapsed(), Duration::from_millis(300));

    // Nothing was consumed: the handler reads every byte after accepting.
    let mut conn = req.accept().await;
    link.set_rx_eof();
    let mut all = Vec::new();
    conn.read_to_end(&mut all).await.unwrap();
    assert_eq!(all, b"hello world");
}

#[tokio::test]
async fn rejecting_after_a_peek_resets() {
    let wake = WakeQueue::new();
    let (link, mut req) =
        new_flow(FlowId(4), addr("10.0.0.1:1"), addr("10.0.0.2:22"), &RingBudget::unlimited(64), wake);
    let mut buf = [0u8; 4];
    // Nothing arrives: a server-speaks-first protocol; the peek gives up after its wait.
    assert_eq!(req.peek(&mut buf, Duration::from_millis(20)).await.unwrap(), 0);
    assert_eq!(link.decision(), Decision::Accepted);
    req.reject();
    assert!(link.pump(|_| {}).abort_requested, "the client, already connected, gets RST");
}

#[test]
fn ring_accept_is_ready_at_once() {
    let (_link, req) =
        new_flow(FlowId(5), addr("10.0.0.1:1"), addr("10.0.0.2:2"), &RingBudget::unlimited(16), WakeQueue::new());
    assert!(now_or_never(req.accept()).is_some());
}

/// The system stack's case: the connection is a kernel socket the stack hands over. A
/// peek waits for the second write and leaves every byte to the reads after it.
#[tokio::test]
async fn a_handed_over_socket_peeks_and_then_reads_everything() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let mut client = tokio::net::TcpStream::connect(listener.local_addr().unwrap()).await.unwrap();
    let (terminated, _) = listener.accept().await.unwrap();
    let (link, mut req) =
        new_flow(FlowId(6), addr("10.0.0.1:1"), addr("10.0.0.2:80"), &RingBudget::unlimited(64), WakeQueue::new());
    link.offer_socket();
    let stack = tokio::spawn(async move {
        // The stack sees the decision, then hands its socket over.
        while link.decision() != Decision::Accepted {
            tokio::task::yield_now().await;
        }
        link.into_port().hand_over(terminated).map_err(|_| "the handler wanted the socket").unwrap();
    });
    client.write_all(b"GET / HT").await.unwrap();
    let writer = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(30)).await;
        client.write_all(b"TP/1.1\r\n").await.unwrap();
        client
    });
    let mut buf = [0u8; 16];
    assert_eq!(req.peek(&mut buf, Duration::from_secs(5)).await.unwrap(), 16);
    assert_eq!(&buf, b"GET / HTTP/1.1\r\n");
    stack.await.unwrap();
    // More than will come: the wait runs out with the bytes there.
    let mut more = [0u8; 64];
    assert_eq!(req.peek(&mut more, Duration::from_millis(100)).await.unwrap(), 16);
    let mut conn = req.accept().await;
    assert!(format!("{conn:?}").contains("socket"), "{conn:?}");
    let mut all = [0u8; 16];
    let read = tokio::time::timeout(Duration::from_secs(5), conn.read_exact(&mut all)).await;
    read.expect("bytes a peek left in the socket are still readable").unwrap();
    assert_eq!(&all, b"GET / HTTP/1.1\r\n");
    drop(writer.await.unwrap());
}

/// A cancelled accept on a stack that hands over sockets: nobody takes the connection, so
/// it is reset — the stack's port fails at once instead of bridging to nobody until the
/// idle timeout.
#[tokio::test]
async fn a_cancelled_accept_resets_the_connection() {
    let wake = WakeQueue::new();
    let (link, req) =
        new_flow(FlowId(8), addr("10.0.0.1:1"), addr("10.0.0.2:22"), &RingBudget::unlimited(64), wake.clone());
    link.offer_socket();
    let waited = tokio::time::timeout(Duration::from_millis(10), req.accept()).await;
    assert!(waited.is_err(), "the accept waits for the stack's socket");
    let mut q = Vec::new();
    wake.drain_into(&mut q);
    assert_eq!(q, vec![FlowId(8)], "the stack is told");
    assert_eq!(link.decision(), Decision::Accepted);
    let mut port = link.into_port();
    let mut buf = [0u8; 4];
    let read = tokio::time::timeout(Duration::from_secs(5), port.read(&mut buf)).await.expect("no hang");
    assert_eq!(read.unwrap_err().kind(), io::ErrorKind::ConnectionReset);
}

/// A peek whose wait was cancelled has accepted already: dropping the request then
/// resets the connection; it does not turn the decision into a rejection.
#[tokio::test]
async fn dropping_a_request_after_a_cancelled_peek_resets() {
    let (link, mut req) =
        new_flow(FlowId(9), addr("10.0.0.1:1"), addr("10.0.0.2:25"), &RingBudget::unlimited(64), WakeQueue::new());
    link.offer_socket();
    let mut buf = [0u8; 4];
    let peeked = tokio::time::timeout(Duration::from_millis(10), req.peek(&mut buf, Duration::from_secs(5))).await;
    assert!(peeked.is_err(), "cancelled while waiting for the socket");
    drop(req);
    let signals = link.pump(|_| {});
    assert_eq!(signals.decision, Decision::Accepted, "decided once");
    assert!(signals.abort_requested && signals.handler_gone);
}

/// Storage follows use: none while nothing crossed, up to the capacity under a bulk
/// download, and all of it back once the relay has seen the flow quiet.
#[tokio::test]
async fn rings_follow_use_and_a_quiet_relay_frees_them() {
    let cap = 256 * 1024;
    let wake = WakeQueue::new();
    let (link, req) = new_flow(FlowId(3), addr("10.0.0.1:1"), addr("10.0.0.2:2"), &RingBudget::unlimited(cap), wake);
    let conn = req.accept().await;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let upstream = tokio::net::TcpStream::connect(listener.local_addr().unwrap()).await.unwrap();
    let (mut server, _) = listener.accept().await.unwrap();
    let relay = tokio::spawn(conn.relay(upstream, Duration::from_secs(60)));
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(link.ring_storage(), (0, 0), "a relay waiting for bytes holds no ring storage");

    let body: Vec<u8> = (0..4_000_000u32).map(|i| (i % 253) as u8).collect();
    let sent = body.clone();
    let writer = tokio::spawn(async move {
        server.write_all(&sent).await.unwrap();
        server
    });
    let (mut got, mut out, mut most) = (Vec::new(), vec![0u8; 100_000], 0);
    while got.len() < body.len() {
        link.pump(|io| {
            let n = io.fill(&mut out);
            got.extend_from_slice(&out[..n]);
        });
        most = most.max(link.ring_storage().1);
        tokio::time::sleep(Duration::from_micros(200)).await;
    }
    assert!(got == body, "download corrupted");
    assert!(most > crate::ring::MIN_STORAGE, "a bulk download grows the ring (largest {most})");
    let mut server = writer.await.unwrap();

    link.pump(|io| assert_eq!(io.deliver(b"bye"), 3));
    let mut three = [0u8; 3];
    server.read_exact(&mut three).await.unwrap();
    assert_eq!(&three, b"bye");
    let deadline = tokio::time::Instant::now() + crate::relay::QUIET + Duration::from_secs(3);
    while link.ring_storage() != (0, 0) && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(link.ring_storage(), (0, 0), "a quiet flow keeps ring storage");
    relay.abort();
}

/// Past the gateway's ring budget rings stop growing and flows still carry every byte: a
/// bulk download under a 16 KiB budget never holds more, another flow still gets its first
/// page, and all storage goes back to the budget when the flows end.
#[tokio::test]
async fn a_spent_ring_budget_stops_growth_and_every_byte_still_crosses() {
    let limit = 16 * 1024;
    let stats = std::sync::Arc::new(crate::Stats::default());
    let budget = RingBudget::new(256 * 1024, Some(limit), stats.clone());
    let (link, req) = new_flow(FlowId(3), addr("10.0.0.1:1"), addr("10.0.0.2:2"), &budget, WakeQueue::new());
    let conn = req.accept().await;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let upstream = tokio::net::TcpStream::connect(listener.local_addr().unwrap()).await.unwrap();
    let (mut server, _) = listener.accept().await.unwrap();
    let relay = tokio::spawn(conn.relay(upstream, Duration::from_secs(60)));

    let body: Vec<u8> = (0..2_000_000u32).map(|i| (i % 251) as u8).collect();
    let sent = body.clone();
    let writer = tokio::spawn(async move {
        server.write_all(&sent).await.unwrap();
        server.shutdown().await.unwrap();
    });
    let (mut got, mut out, mut most) = (Vec::new(), vec![0u8; 100_000], 0);
    while got.len() < body.len() {
        link.pump(|io| {
            let n = io.fill(&mut out);
            got.extend_from_slice(&out[..n]);
        });
        most = most.max(budget.used());
        tokio::time::sleep(Duration::from_micros(200)).await;
    }
    assert!(got == body, "download corrupted");
    assert_eq!(most, limit, "the download's ring grew to the budget and no further");
    assert!(stats.snapshot().ring_growth_refused > 0);

    let (other, other_req) = new_flow(FlowId(4), addr("10.0.0.1:3"), addr("10.0.0.2:2"), &budget, WakeQueue::new());
    let mut other_conn = other_req.accept().await;
    other.pump(|io| assert_eq!(io.deliver(b"still carried"), 13, "a flow past the budget gets a page"));
    let mut buf = [0u8; 13];
    other_conn.read_exact(&mut buf).await.unwrap();
    assert_eq!(&buf, b"still carried");

    writer.await.unwrap();
    relay.abort();
    let _ = relay.await;
    drop((link, other, other_conn));
    assert_eq!(budget.used(), 0, "every ring's storage went back to the budget");
}

/// A flow whose handler is gone holds no ring storage once its rings are empty, though
/// the stack keeps the flow (closing handshake, TIME-WAIT): the rx ring's when the handler
/// drops its connection, the tx ring's when the stack has sent the last byte.
#[tokio::test]
async fn a_finished_handler_leaves_no_ring_storage() {
    let (link, req) = new_flow(
        FlowId(5),
        addr("10.0.0.1:1"),
        addr("10.0.0.2:2"),
        &RingBudget::unlimited(256 * 1024),
        WakeQueue::new(),
    );
    let mut conn = req.accept().await;
    let upload = vec![3u8; 100_000];
    link.pump(|io| assert_eq!(io.deliver(&upload), upload.len()));
    let mut got = vec![0u8; upload.len()];
    conn.read_exact(&mut got).await.unwrap();
    let download: Vec<u8> = (0..200_000u32).map(|i| (i % 241) as u8).collect();
    conn.write_all(&download).await.unwrap();
    let (rx, tx) = link.ring_storage();
    assert!(rx > crate::ring::MIN_STORAGE && tx > crate::ring::MIN_STORAGE, "both rings grew: {rx} {tx}");
    drop(conn);
    assert_eq!(link.ring_storage(), (0, tx), "the rx ring went with the handler; tx still holds the download");
    let mut sent = Vec::new();
    let mut out = vec![0u8; 64 * 1024];
    while sent.len() < download.len() {
        link.pump(|io| {
            let n = io.fill(&mut out);
            sent.extend_from_slice(&out[..n]);
        });
    }
    assert!(sent == download, "the download after the handler left is intact");
    assert_eq!(link.ring_storage(), (0, 0), "the drained tx ring went too");
}
