//! In-memory benchmarks of the packet path.
//!
//! * `classify`: the demultiplexer's first look at a packet (IP header checks, 4-tuple).
//! * `<backend>_inmem`, for every backend with an in-memory form (smoltcp, lwip, ipstack,
//!   netstack-smoltcp; the system stack needs the kernel): 8 MiB uploaded and downloaded
//!   through the backend between a peer smoltcp host and the suite's in-memory services,
//!   digest- or length-checked (the cost of the engine, the flow rings and the driver,
//!   without TUN system calls), and `connections/N`: N connections one after another,
//!   each 64 bytes to the echo service and back, then closed by both sides (flow set-up
//!   and tear-down; the peer's sockets get small buffers so that their cost stays low).
//!
//! The in-memory peer is a second smoltcp stack polled by a task: it bounds some of these
//! figures more than the gateway does (see results/criterion.md); `make bench` measures
//! through a real TUN with kernel clients.

// A benchmark that cannot set up should stop loudly.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::runtime::Runtime;
use tungate_core::{Backend, packet};
use tungate_testkit::mem::{Harness, dst_v4};
use tungate_testkit::services;

fn classify(c: &mut Criterion) {
    let mut buf = vec![0u8; 1500];
    let n = packet::build_udp("198.18.0.2:4000".parse().unwrap(), dst_v4(53), &[7u8; 1400], &mut buf).unwrap();
    let pkt = &buf[..n];
    let mut g = c.benchmark_group("classify");
    g.throughput(Throughput::Elements(1));
    g.bench_function("udp_1428B", |b| b.iter(|| packet::classify(std::hint::black_box(pkt)).is_ok()));
    g.finish();
}

/// Bulk both ways and connection set-up (`conns` per iteration) through `backend`, as
/// group `<name>_inmem`.
fn inmem<B: Backend>(c: &mut Criterion, name: &str, backend: B, conns: u64) {
    const LEN: usize = 8 << 20;
    let rt = runtime();
    let harness = rt.block_on(async { Harness::start(backend) });
    let data = services::pattern(LEN, 1);
    let mut g = c.benchmark_group(format!("{name}_inmem"));
    g.sample_size(10).measurement_time(Duration::from_secs(10));
    g.throughput(Throughput::Bytes(LEN as u64));
    g.bench_with_input(BenchmarkId::new("upload", "8MiB"), &data, |b, data| {
        b.to_async(&rt).iter(|| async {
            let mut s = harness.peer.connect(dst_v4(services::SINK)).await.unwrap();
            s.write_all(data).await.unwrap();
            s.shutdown().await.unwrap();
            let mut digest = Vec::new();
            s.read_to_end(&mut digest).await.unwrap();
            assert_eq!(digest.len(), 32);
        })
    });
    g.bench_function(BenchmarkId::new("download", "8MiB"), |b| {
        b.to_async(&rt).iter(|| async {
            let mut s = harness.peer.connect(dst_v4(services::SOURCE)).await.unwrap();
            s.write_u64(LEN as u64).await.unwrap();
            let mut got = Vec::with_capacity(LEN);
            s.read_to_end(&mut got).await.unwrap();
            assert_eq!(got.len(), LEN);
        })
    });
    g.throughput(Throughput::Elements(conns));
    g.bench_function(BenchmarkId::new("connections", conns), |b| {
        b.to_async(&rt).iter(|| async {
            for i in 0..conns {
                let mut s = harness.peer.connect_with_buffers(dst_v4(services::ECHO), 4096).await.unwrap();
                let sent = [i as u8; 64];
                s.write_all(&sent).await.unwrap();
                s.shutdown().await.unwrap();
                let mut echoed = Vec::with_capacity(64);
                s.read_to_end(&mut echoed).await.unwrap();
                assert_eq!(echoed, sent);
            }
        })
    });
    g.finish();
    // lwIP admits one stack per process: this one goes before the next group starts.
    rt.block_on(harness.stop());
}

fn runtime() -> Runtime {
    tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap()
}

fn smoltcp(c: &mut Criterion) {
    inmem(c, "smoltcp", backend_smoltcp::Smoltcp::default(), 100);
}

fn lwip(c: &mut Criterion) {
    inmem(c, "lwip", backend_lwip::Lwip::default(), 100);
}

fn ipstack(c: &mut Criterion) {
    // 10, not 100: a connection the client closed first took ipstack about 0.4 s here
    // before 9e8232b (results/criterion.md); 100 made one sample take 40 s.
    inmem(c, "ipstack", backend_ipstack::Ipstack::default(), 10);
}

fn netstack_smoltcp(c: &mut Criterion) {
    inmem(c, "netstack_smoltcp", backend_netstack_smoltcp::NetstackSmoltcp::default(), 100);
}

criterion_group!(benches, classify, smoltcp, lwip, ipstack, netstack_smoltcp);
criterion_main!(benches);
