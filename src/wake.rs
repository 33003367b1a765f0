//! What a destination's worker shares with the rest of the relay: its
//! wake-up signal (ingress, on a new message, and admin, on a replay or a
//! resume, wake it; otherwise it sleeps until its next due time) and its
//! circuit breaker's state (read by the admin API), and its recent
//! deliveries (`recent.rs`, written by the worker, read by the admin API).
//! A module of its own so
//! that ingress, delivery and admin, peers over the store, need not import
//! each other.

use std::collections::HashMap;
use std::sync::atomic::AtomicU8;
use std::sync::Arc;

use tokio::sync::Notify;

use crate::recent::Recent;

#[derive(Clone)]
struct Shared {
    wake: Arc<Notify>,
    breaker: Arc<AtomicU8>,
    recent: Arc<Recent>,
}

impl Default for Shared {
    fn default() -> Shared {
        Shared { wake: Arc::default(), breaker: Arc::default(), recent: Arc::new(Recent::new(crate::text::now_ms())) }
    }
}

/// One entry per configured destination (a reload adds new ones); cheap
/// to clone.
#[derive(Clone, Default)]
pub struct Wakers(Arc<arc_swap::ArcSwap<HashMap<Arc<str>, Shared>>>);

impl Wakers {
    pub fn new<'a>(destinations: impl IntoIterator<Item = &'a Arc<str>>) -> Wakers {
        let map: HashMap<Arc<str>, Shared> = destinations.into_iter().map(|d| (d.clone(), Shared::default())).collect();
        Wakers(Arc::new(arc_swap::ArcSwap::from_pointee(map)))
    }

    /// Adds `destination` (a reload added it); a no-op if it is there.
    pub fn add(&self, destination: &Arc<str>) {
        self.0.rcu(|map| {
            let mut map = HashMap::clone(map);
            map.entry(destination.clone()).or_insert_with(Shared::default);
            map
        });
    }

    /// Wakes `destination`'s worker (a no-op for an unknown name).
    pub fn wake(&self, destination: &str) {
        if let Some(s) = self.0.load().get(destination) {
            s.wake.notify_one();
        }
    }

    /// The signal a worker waits on.
    pub fn get(&self, destination: &str) -> Arc<Notify> {
        self.0.load().get(destination).map(|s| s.wake.clone()).unwrap_or_default()
    }

    /// The destination's breaker state by name: "closed", "open" or
    /// "half_open" (the cell holds 0, 1 or 2; `delivery/breaker.rs` writes it).
    pub fn breaker_state(&self, destination: &str) -> &'static str {
        match self.breaker(destination).load(std::sync::atomic::Ordering::Relaxed) {
            1 => "open",
            2 => "half_open",
            _ => "closed",
        }
    }

    /// The cell holding the destination's breaker state (0 closed, 1 open,
    /// 2 half-open).
    pub fn breaker(&self, destination: &str) -> Arc<AtomicU8> {
        self.0.load().get(destination).map(|s| s.breaker.clone()).unwrap_or_default()
    }

    /// The destination's recent deliveries (a fresh, unshared one for an
    /// unknown name).
    pub fn recent(&self, destination: &str) -> Arc<Recent> {
        self.0
            .load()
            .get(destination)
            .map(|s| s.recent.clone())
            .unwrap_or_else(|| Arc::new(Recent::new(crate::text::now_ms())))
    }
}
