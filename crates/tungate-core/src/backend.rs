//! The trait every backend crate implements and every binary drives.

use std::future::Future;
use std::io;
use std::net::IpAddr;

use crate::Dispatch;
use crate::device::PacketDevice;

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

/// Runs `backend` on `device` until `shutdown` completes, the packet counters kept
/// here ([`Counted`](crate::device::Counted)) for every backend. What every binary and
/// harness calls instead of [`Backend::run`].
pub async fn serve<B: Backend, D: PacketDevice>(
    backend: B,
    device: D,
    handlers: Dispatch,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), BackendError> {
    let device = crate::device::Counted::new(device, handlers.stats.clone());
    backend.run(device, handlers, shutdown).await
}

/// A TCP/IP stack that terminates the TUN's traffic and hands flows to the handlers of a [`Dispatch`].
///
/// Generic over the device so each variant binary is monomorphised for its device and
/// links only its own backend.
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

    /// Serves `device` until `shutdown` completes (`Ok`) or the device fails.
    fn run<D: PacketDevice>(
        self,
        device: D,
        handlers: Dispatch,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> impl Future<Output = Result<(), BackendError>> + Send;
}
