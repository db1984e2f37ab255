//! The trait every backend crate implements and every binary drives.

use std::future::Future;
use std::io;
use std::net::IpAddr;
use std::time::Instant;

use crate::Dispatch;
use crate::config::Mtu;
use crate::device::PacketDevice;
use crate::device::capture::{Capture, Captured};
use crate::device::fault::{Faults, Faulty};
use crate::engine::{Engine, run_engine};
use crate::icmp::{Icmp, IcmpMode};

/// Why a backend stopped.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BackendError {
    #[error("packet device failed: {0}")]
    Device(#[from] io::Error),
    /// Settings that cannot work (checked before or while starting).
    #[error("invalid backend configuration: {0}")]
    Config(String),
    /// A socket the backend needs could not listen (the system stack's listener).
    #[error("cannot listen on {addr} ({what}): {source}")]
    Listen {
        addr: IpAddr,
        what: String,
        #[source]
        source: io::Error,
    },
    /// The stack itself could not start (lwIP: one stack per process).
    #[error("the stack could not start: {0}")]
    Start(#[source] Box<dyn std::error::Error + Send + Sync>),
}

/// Runs `backend` on `device` until `shutdown` completes: builds its engine and runs it
/// on the one driver ([`run_engine`]), the packet counters kept by
/// [`Counted`](crate::device::Counted) for every backend. What every binary and example
/// calls.
pub async fn serve<B: Backend, D: PacketDevice>(
    backend: B,
    device: D,
    handlers: Dispatch,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), BackendError> {
    serve_with(backend, device, handlers, shutdown, ServeOptions::default()).await
}

/// [`serve`] with the engine's randomness given: a test that runs on a simulated clock
/// passes a fixed seed and so repeats a run exactly (as far as the stack's crate draws
/// its randomness from the engine).
pub async fn serve_seeded<B: Backend, D: PacketDevice>(
    backend: B,
    device: D,
    handlers: Dispatch,
    shutdown: impl Future<Output = ()> + Send + 'static,
    seed: u64,
) -> Result<(), BackendError> {
    serve_with(backend, device, handlers, shutdown, ServeOptions::default().seed(seed)).await
}

/// What [`serve_with`] does beyond [`serve`].
#[derive(Debug, Default)]
#[non_exhaustive]
pub struct ServeOptions {
    /// The engine's randomness (drawn at random when `None`).
    pub seed: Option<u64>,
    /// Where every packet crossing the device is copied ([`Capture`]).
    pub capture: Option<Capture>,
    /// Faults injected between the device and the stack: for tests only ([`Faults`]).
    pub faults: Option<Faults>,
    /// What becomes of ICMP echo requests ([`IcmpMode`]; dropped by default).
    pub icmp: IcmpMode,
    /// How long open connections may finish after `shutdown` (see [`run_engine`]; zero,
    /// the default: none).
    pub drain: std::time::Duration,
}

impl ServeOptions {
    pub fn seed(mut self, seed: u64) -> Self {
        self.seed = Some(seed);
        self
    }

    pub fn capture(mut self, capture: Option<Capture>) -> Self {
        self.capture = capture;
        self
    }

    pub fn faults(mut self, faults: Option<Faults>) -> Self {
        self.faults = faults;
        self
    }

    pub fn icmp(mut self, icmp: IcmpMode) -> Self {
        self.icmp = icmp;
        self
    }

    pub fn drain(mut self, drain: std::time::Duration) -> Self {
        self.drain = drain;
        self
    }
}

/// [`serve`] with options. The device is wrapped once for every backend: the capture tap
/// ([`Captured`]) next to the device (it sees what crossed the TUN), the test-only fault
/// stage ([`Faulty`], a straight pass without faults) around it, the counters outermost
/// (what the stack saw).
pub async fn serve_with<B: Backend, D: PacketDevice>(
    backend: B,
    device: D,
    handlers: Dispatch,
    shutdown: impl Future<Output = ()> + Send + 'static,
    options: ServeOptions,
) -> Result<(), BackendError> {
    let device = Captured::new(device, options.capture);
    let device = Faulty::new(device, options.faults.unwrap_or_default()).counting(handlers.stats.clone());
    let device = crate::device::Counted::new(device, handlers.stats.clone());
    let start = Start { now: crate::engine::clock(), seed: options.seed.unwrap_or_else(rand::random) };
    let stats = handlers.stats.clone();
    let engine = backend.engine(DeviceInfo::of(&device), handlers, start)?;
    let icmp = Icmp::new(options.icmp, stats, engine.wake_queue());
    run_engine(engine, device, shutdown, Some(icmp), options.drain).await?;
    Ok(())
}

/// What an engine starts from: the driver's clock and the caller's randomness. Nothing
/// below the driver reads a clock or draws a random number of its own.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Start {
    pub now: Instant,
    pub seed: u64,
}

/// What a backend is told about the device its engine will run on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct DeviceInfo {
    /// The link MTU: the largest packet the stack should build.
    pub mtu: Mtu,
    /// The largest packet a read delivers ([`PacketDevice::max_packet_len`]).
    pub max_packet_len: usize,
    /// Whether writes take TCP super-packets ([`PacketDevice::segmentation_offload`]).
    pub segmentation_offload: bool,
}

impl DeviceInfo {
    pub fn of(device: &impl PacketDevice) -> Self {
        DeviceInfo {
            mtu: device.mtu(),
            max_packet_len: device.max_packet_len(),
            segmentation_offload: device.segmentation_offload(),
        }
    }
}

/// A TCP/IP stack that terminates the TUN's traffic and hands flows to the handlers of a
/// [`Dispatch`]: a factory of the [`Engine`] that [`serve`] runs on the one driver.
pub trait Backend: Send + 'static {
    /// The name used in the binary's name (`tungate-<NAME>`) and in logs.
    const NAME: &'static str;

    /// How this backend takes TUN offload input, if it can: `None` runs the TUN without
    /// offload (and `--offload on` is refused).
    const RX_OFFLOAD: Option<crate::device::offload::RxMode> = None;

    /// Checks the backend's configuration before any device exists, so a variant fails
    /// on bad settings before it announces readiness.
    fn validate(&self) -> Result<(), BackendError> {
        Ok(())
    }

    /// The state machine the driver runs.
    type Engine: Engine;

    /// Builds the engine for `device`, started at `start.now` with `start.seed` for its
    /// randomness. Called inside the runtime (a backend may open sockets here).
    fn engine(self, device: DeviceInfo, handlers: Dispatch, start: Start) -> Result<Self::Engine, BackendError>;
}
