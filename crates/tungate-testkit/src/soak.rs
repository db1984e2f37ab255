//! The soak (`make soak`, `tungate-soak`): one variant under mixed load for a long time,
//! in throwaway namespaces, watched for growth.
//!
//! The load (`e2e_peer.py soak`) runs in the client namespace: bulk both ways, short
//! connections, UDP sessions coming and going, and DNS by fake-IP followed by a
//! connection to the fake address; any failed or corrupted transfer fails the soak. Every
//! 10 s the gateway's resident memory, open descriptors and flows (from `/metrics`) are
//! sampled into a CSV. After a warm-up (UDP sessions live 60 s, so the population
//! settles in a minute or two), the soak fails if RSS or descriptors ended more than
//! 10 % above where they were after the warm-up (the median of a minute's samples at
//! each end, so one sample's churn does not decide).

use std::io::Write;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use crate::netns::{Topology, peer_script};
use crate::proxies::route_fake_pools;

/// One sample of the gateway.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Sample {
    pub seconds: u64,
    pub rss_kib: u64,
    pub fds: u64,
    pub tcp_active: u64,
    pub udp_active: u64,
    pub ring_bytes: u64,
}

/// What a soak saw.
#[derive(Debug, Clone)]
pub struct SoakReport {
    pub variant: String,
    pub samples: Vec<Sample>,
    /// The load's last line ("ok soak 1800s {...}") or why it failed.
    pub load: Result<String, String>,
    /// Medians after the warm-up and at the end: (RSS KiB, fds) each.
    pub start: (u64, u64),
    pub end: (u64, u64),
    pub peak: (u64, u64),
    /// Samples after the warm-up.
    pub judged: usize,
    /// The gateway's exit counters.
    pub exit: std::collections::HashMap<String, u64>,
}

impl SoakReport {
    /// Why the soak failed, if it did: a failed transfer, or growth past 10 %.
    pub fn verdict(&self) -> Result<(), String> {
        self.load.as_ref().map_err(Clone::clone)?;
        if self.judged < 12 {
            return Err(format!("too short to judge: {} samples after the warm-up (12 needed)", self.judged));
        }
        let grew = |what: &str, start: u64, end: u64| {
            (end * 10 > start * 11).then(|| format!("{what} grew from {start} to {end} (more than 10 %)"))
        };
        let problems: Vec<String> =
            [grew("RSS (KiB)", self.start.0, self.end.0), grew("open fds", self.start.1, self.end.1)]
                .into_iter()
                .flatten()
                .collect();
        if problems.is_empty() { Ok(()) } else { Err(problems.join("; ")) }
    }
}

fn median(mut v: Vec<u64>) -> u64 {
    v.sort_unstable();
    v.get(v.len() / 2).copied().unwrap_or(0)
}

/// Runs `variant` (a binary name in `$TUNGATE_BIN_DIR`, with flags after it) under the
/// soak load for `duration`, writing each sample to `csv` as it is taken.
pub fn soak(variant: &str, duration: Duration, csv: &Path) -> SoakReport {
    const EVERY: Duration = Duration::from_secs(10);
    let t = Topology::start(&format!("{variant} --dns fake-ip --stats-addr 127.0.0.1:9464"), 1500);
    // The gateway resolves the names the fake addresses stand for from its namespace's
    // hosts file (the load asks the gateway's DNS, not this file).
    let hosts: String = (0..50).map(|i| format!("10.77.0.2 soak-{i}.test\n")).collect();
    t.client_etc("hosts", &format!("127.0.0.1 localhost\n{hosts}"));
    t.restart_gateway(&[]);
    route_fake_pools(&t);
    let mut t = t;
    t.peer_server(&["serve-echo", "10.77.0.2", "7000"]);
    t.peer_server(&["serve-udp-echo", "10.77.0.2", "7001"]);
    let t = t;
    let mut out = std::fs::File::create(csv).unwrap_or_else(|e| panic!("{}: {e}", csv.display()));
    writeln!(out, "seconds,rss_kib,fds,tcp_active,udp_active,ring_bytes").expect("csv");
    let done = AtomicBool::new(false);
    let started = Instant::now();
    let secs = duration.as_secs().to_string();
    let (samples, load) = std::thread::scope(|scope| {
        let load = scope.spawn(|| {
            let script = peer_script();
            let args =
                ["python3", script.to_str().expect("utf-8"), "soak", "10.77.0.2", "7000", "7001", "10.77.0.53", &secs];
            let output = t.client(&args);
            done.store(true, Ordering::Relaxed);
            let stdout = String::from_utf8_lossy(&output.stdout).trim().to_owned();
            let stderr = String::from_utf8_lossy(&output.stderr);
            match output.status.success() {
                true => Ok(stdout),
                false => Err(format!("{stdout} {}", stderr.lines().rev().take(5).collect::<Vec<_>>().join(" | "))),
            }
        });
        let mut samples = Vec::new();
        let mut next = started + EVERY;
        while !done.load(Ordering::Relaxed) {
            std::thread::sleep(Duration::from_millis(200));
            if Instant::now() < next {
                continue;
            }
            next += EVERY;
            let s = sample(&t, started.elapsed().as_secs());
            writeln!(out, "{},{},{},{},{},{}", s.seconds, s.rss_kib, s.fds, s.tcp_active, s.udp_active, s.ring_bytes)
                .expect("csv");
            eprintln!(
                "[soak {variant}] {:>5}s of {}: rss {} KiB, fds {}, tcp {}, udp {}",
                s.seconds,
                duration.as_secs(),
                s.rss_kib,
                s.fds,
                s.tcp_active,
                s.udp_active
            );
            samples.push(s);
        }
        (samples, load.join().expect("load thread"))
    });
    let exit = t.stop_gateway();
    let warm = Duration::from_secs(120).max(duration / 10).as_secs();
    let after: Vec<&Sample> = samples.iter().filter(|s| s.seconds >= warm).collect();
    let window = |from: &[&Sample]| {
        let w: Vec<&&Sample> = from.iter().take(6).collect();
        (median(w.iter().map(|s| s.rss_kib).collect()), median(w.iter().map(|s| s.fds).collect()))
    };
    let start = window(&after);
    let tail: Vec<&Sample> = after.iter().rev().copied().collect();
    let end = window(&tail);
    let peak = (after.iter().map(|s| s.rss_kib).max().unwrap_or(0), after.iter().map(|s| s.fds).max().unwrap_or(0));
    let judged = after.len();
    SoakReport { variant: variant.to_owned(), samples, load, start, end, peak, judged, exit }
}

fn sample(t: &Topology, seconds: u64) -> Sample {
    let scrape = t.scrape(9464);
    let metric = |name: &str| scrape.get(name).copied().unwrap_or(0);
    Sample {
        seconds,
        rss_kib: t.gateway_rss_kib(),
        fds: t.gateway_fds() as u64,
        tcp_active: metric("tcp_active"),
        udp_active: metric("udp_active"),
        ring_bytes: metric("ring_bytes"),
    }
}
