//! How handlers ask a stack's loop for attention.

use std::sync::{Arc, Mutex, MutexGuard};

use tokio::sync::Notify;

/// A stack's handle for one flow: an index into its flow table, never a reference.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct FlowId(pub usize);

/// Flows (and other sources of work) that need the stack's attention, plus the notifier
/// the stack's driver sleeps on.
#[derive(Debug, Default)]
pub struct WakeQueue {
    queue: Mutex<Vec<FlowId>>,
    notify: Notify,
}

impl WakeQueue {
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    /// Queues `id` and wakes the driver.
    pub fn push(&self, id: FlowId) {
        lock(&self.queue).push(id);
        self.notify.notify_one();
    }

    /// Wakes the driver without a flow (e.g. a UDP reply was queued).
    pub fn wake(&self) {
        self.notify.notify_one();
    }

    /// Moves every queued id into `out` (which the caller reuses, so no allocation).
    pub fn drain_into(&self, out: &mut Vec<FlowId>) {
        out.append(&mut lock(&self.queue));
    }

    /// Waits for a `push` or `wake`; a wake that came before this call is not lost.
    pub async fn notified(&self) {
        self.notify.notified().await
    }
}

/// Locks a mutex, recovering the data if a panicking thread poisoned it: every critical
/// section in this crate leaves the state consistent between statements.
pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}
