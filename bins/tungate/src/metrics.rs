//! Live metrics (`--stats-addr`): the gateway's counters as Prometheus text at `/metrics`.
//!
//! A task answers the scrapes; it reads the same relaxed atomics the exit event reports
//! ([`Stats`]), so the hot path pays nothing for it (a scrape encodes a few dozen numbers). Encoding is prometheus-client's
//! (OpenMetrics text, which Prometheus reads): every counter becomes
//! `tungate_<name>_total`, the levels in [`StatsSnapshot::GAUGES`] `tungate_<name>`, each
//! labelled with the variant's backend and the kind of upstream (`direct`, `socks5`,
//! `http`), so the `upstream_*` counters read as errors per upstream.

use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::Context;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::registry::Registry;
use tungate_core::Stats;
use tungate_core::stats::StatsSnapshot;

/// The counters of one gateway, read at each scrape.
#[derive(Debug)]
struct Counters(Arc<Stats>);

impl Collector for Counters {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let snapshot = self.0.snapshot();
        for ((name, value), (_, help)) in snapshot.fields().zip(StatsSnapshot::HELP) {
            let help = help.trim();
            if StatsSnapshot::GAUGES.contains(&name) {
                let gauge = ConstGauge::new(i64::try_from(value).unwrap_or(i64::MAX));
                gauge.encode(encoder.encode_descriptor(name, help, None, gauge.metric_type())?)?;
            } else {
                let counter = ConstCounter::new(value);
                counter.encode(encoder.encode_descriptor(name, help, None, counter.metric_type())?)?;
            }
        }
        Ok(())
    }
}

/// The registry a scrape encodes: `stats` under the `tungate_` prefix, labelled
/// `backend="NAME"` and `upstream="KIND"`.
fn registry(backend: &str, upstream: &str, stats: Arc<Stats>) -> Registry {
    use std::borrow::Cow;
    let labels = [
        (Cow::Borrowed("backend"), Cow::Owned(backend.to_owned())),
        (Cow::Borrowed("upstream"), Cow::Owned(upstream.to_owned())),
    ];
    let mut registry = Registry::with_prefix_and_labels("tungate", labels.into_iter());
    registry.register_collector(Box::new(Counters(stats)));
    registry
}

/// The text of one scrape.
fn render(registry: &Registry) -> String {
    let mut text = String::new();
    // Writing into a String cannot fail.
    let _ = prometheus_client::encoding::text::encode(&mut text, registry);
    text
}

/// Binds `addr` now (so a bad address is an error at start) and answers `GET /metrics`
/// from a task of its own for as long as the process runs.
///
/// The server is a few lines on tokio and httparse (both already linked) rather than an
/// HTTP server crate: with tiny_http, `/metrics` added 276 KB to the stripped smoltcp
/// variant (3.85 MB before); this way it adds 71 KB, for one fixed route.
pub(crate) async fn serve(addr: SocketAddr, backend: &str, upstream: &str, stats: Arc<Stats>) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind(addr).await.with_context(|| format!("--stats-addr {addr}"))?;
    serve_on(listener, backend, upstream, stats);
    tracing::info!(%addr, "metrics at http://{addr}/metrics");
    Ok(())
}

/// Answers scrapes on `listener` from a task of its own.
fn serve_on(listener: tokio::net::TcpListener, backend: &str, upstream: &str, stats: Arc<Stats>) {
    let registry = Arc::new(registry(backend, upstream, stats));
    tokio::spawn(async move {
        loop {
            match listener.accept().await {
                Ok((stream, _)) => {
                    tokio::spawn(answer(stream, registry.clone()));
                }
                Err(e) => {
                    // Out of descriptors, say: the gateway goes on; scrapes resume later.
                    tracing::debug!("metrics: accept failed: {e}");
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                }
            }
        }
    });
}

/// How long a connection may take to send a request head before it is closed.
const IDLE: std::time::Duration = std::time::Duration::from_secs(10);

/// Largest request head read; a scrape's is a few hundred bytes.
const MAX_HEAD: usize = 8192;

/// Answers the requests of one connection (keep-alive) until it closes or errs.
async fn answer(mut stream: tokio::net::TcpStream, registry: Arc<Registry>) {
    let mut head = Vec::with_capacity(1024);
    loop {
        // A client that sends nothing (or half a request) does not hold a task and a
        // descriptor for good.
        let request = tokio::time::timeout(IDLE, read_head(&mut stream, &mut head)).await;
        let (status, body, close) = match request.unwrap_or_else(|_| Ok(None)) {
            Ok(Some(request)) => request.respond(&registry),
            Ok(None) => return,
            Err(e) => {
                tracing::debug!("metrics: bad request: {e}");
                ("400 Bad Request", "bad request\n".to_owned(), true)
            }
        };
        let content_type = if status.starts_with("200") { CONTENT_TYPE } else { "text/plain; charset=utf-8" };
        let response = format!(
            "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\n{}\r\n{body}",
            body.len(),
            if close { "Connection: close\r\n" } else { "" }
        );
        if stream.write_all(response.as_bytes()).await.is_err() || close {
            return;
        }
    }
}

const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// What a request asked for.
struct Request {
    get_metrics: bool,
    close: bool,
}

impl Request {
    fn respond(&self, registry: &Registry) -> (&'static str, String, bool) {
        if self.get_metrics {
            ("200 OK", render(registry), self.close)
        } else {
            ("404 Not Found", "tungate serves GET /metrics\n".to_owned(), self.close)
        }
    }
}

/// Reads one request head from `stream` (`None` at a clean end of the connection).
/// `head` keeps what was read past the request (a pipelined next one).
async fn read_head(stream: &mut tokio::net::TcpStream, head: &mut Vec<u8>) -> anyhow::Result<Option<Request>> {
    loop {
        let mut headers = [httparse::EMPTY_HEADER; 32];
        let mut request = httparse::Request::new(&mut headers);
        if let httparse::Status::Complete(len) = request.parse(head)? {
            let close = request.version == Some(0)
                || request
                    .headers
                    .iter()
                    .any(|h| h.name.eq_ignore_ascii_case("connection") && h.value.eq_ignore_ascii_case(b"close"));
            let get_metrics = request.method == Some("GET") && request.path == Some("/metrics");
            head.drain(..len);
            return Ok(Some(Request { get_metrics, close }));
        }
        if head.len() >= MAX_HEAD {
            anyhow::bail!("request head over {MAX_HEAD} bytes");
        }
        let mut chunk = [0u8; 1024];
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            return if head.is_empty() { Ok(None) } else { Err(anyhow::anyhow!("connection closed mid-request")) };
        }
        head.extend_from_slice(&chunk[..n]);
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::Ordering;

    use super::*;

    /// Every counter appears with its value, HELP text and backend label; levels are gauges.
    #[test]
    fn a_scrape_shows_every_counter_with_its_value() {
        let stats = Arc::new(Stats::default());
        stats.rx_bytes.store(123_456, Ordering::Relaxed);
        stats.tcp_active.store(7, Ordering::Relaxed);
        let text = render(&registry("smoltcp", "socks5", stats.clone()));
        assert!(text.contains("tungate_rx_bytes_total{backend=\"smoltcp\",upstream=\"socks5\"} 123456\n"), "{text}");
        assert!(text.contains("# TYPE tungate_tcp_active gauge\n"), "{text}");
        assert!(text.contains("tungate_tcp_active{backend=\"smoltcp\",upstream=\"socks5\"} 7\n"), "{text}");
        assert!(text.contains("# HELP tungate_rx_packets Packets read from the device.\n"), "{text}");
        for (name, _) in stats.snapshot().fields() {
            assert!(text.contains(&format!("tungate_{name}")), "{name} missing:\n{text}");
        }
        assert!(text.ends_with("# EOF\n"), "{text}");
    }

    /// Over a socket: two scrapes on one connection, a 404 for anything else.
    #[tokio::test]
    async fn the_server_answers_scrapes_and_refuses_other_paths() {
        let stats = Arc::new(Stats::default());
        stats.tx_packets.store(42, Ordering::Relaxed);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        serve_on(listener, "lwip", "direct", stats);
        let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect");
        s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\nGET /nothing HTTP/1.1\r\nConnection: close\r\n\r\n")
            .await
            .expect("write");
        let mut text = String::new();
        s.read_to_string(&mut text).await.expect("read");
        assert!(text.starts_with("HTTP/1.1 200 OK\r\n"), "{text}");
        assert!(text.contains("tungate_tx_packets_total{backend=\"lwip\",upstream=\"direct\"} 42\n"), "{text}");
        assert!(text.contains("HTTP/1.1 404 Not Found\r\n"), "{text}");
    }
}
