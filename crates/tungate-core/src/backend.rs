//! The trait every backend crate implements and every binary drives.

use std::future::Future;
use std::io;

use crate::Handlers;
use crate::device::PacketDevice;

/// Why a backend stopped.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BackendError {
    #[error("packet device failed: {0}")]
    Device(#[from] io::Error),
    #[error("invalid backend configuration: {0}")]
    Config(String),
}

/// A TCP/IP stack that terminates the TUN's traffic and hands flows to [`Handlers`].
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
        handlers: Handlers,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> impl Future<Output = Result<(), BackendError>> + Send;
}
