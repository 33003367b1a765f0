//! Per-destination wake-up signals: ingress (a new message) and admin (a
//! replay) wake a destination's worker, which otherwise sleeps until its
//! next due time. A module of its own so that ingress and delivery, peers
//! over the store, need not import each other.

use std::collections::HashMap;
use std::sync::Arc;

use tokio::sync::Notify;

/// One `Notify` per configured destination; cheap to clone.
#[derive(Clone, Default)]
pub struct Wakers(Arc<HashMap<Arc<str>, Arc<Notify>>>);

impl Wakers {
    pub fn new<'a>(destinations: impl IntoIterator<Item = &'a Arc<str>>) -> Wakers {
        Wakers(Arc::new(destinations.into_iter().map(|d| (d.clone(), Arc::new(Notify::new()))).collect()))
    }

    /// Wakes `destination`'s worker (a no-op for an unknown name).
    pub fn wake(&self, destination: &str) {
        if let Some(n) = self.0.get(destination) {
            n.notify_one();
        }
    }

    /// The signal a worker waits on.
    pub fn get(&self, destination: &str) -> Arc<Notify> {
        self.0.get(destination).cloned().unwrap_or_default()
    }
}
