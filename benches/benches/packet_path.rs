//! In-memory benchmarks of the packet path.
//!
//! * `classify`: the demultiplexer's first look at a packet (IP header checks, 4-tuple).
//! * `smoltcp_inmem`: 8 MiB uploaded and downloaded through backend-smoltcp between a peer
//!   smoltcp host and the suite's in-memory handler: the cost of the engine, the flow
//!   rings and the driver, without TUN system calls.

// A benchmark that cannot set up should stop loudly.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tungate_core::packet;
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

fn smoltcp_inmem(c: &mut Criterion) {
    const LEN: usize = 8 << 20;
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let harness = rt.block_on(async { Harness::start(backend_smoltcp::Smoltcp::default()) });
    let data = services::pattern(LEN, 1);
    let mut g = c.benchmark_group("smoltcp_inmem");
    g.throughput(Throughput::Bytes(LEN as u64));
    g.sample_size(10).measurement_time(Duration::from_secs(10));
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
    g.finish();
}

criterion_group!(benches, classify, smoltcp_inmem);
criterion_main!(benches);
