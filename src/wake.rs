//! What a destination's worker shares with the rest of the relay: its
//! wake-up signal (ingress, on a new message, and admin, on a replay or a
//! resume, wake it; otherwise it sleeps until its next due time) and its
//! circuit breaker's state (read by the admin API), and its recent
//! deliveries (`recent.rs`, written by the worker, read by the admin API),
//! and the handles every stage emits operational events (`events.rs`) and
//! records spans (`otel.rs`) through.
//! A module of its own so
//! that ingress, delivery and admin, peers over the store, need not import
//! each other.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;

use tokio::sync::Notify;

use crate::events::Events;
use crate::otel::Tracer;
use crate::recent::Recent;

#[derive(Clone)]
struct Shared {
    wake: Arc<Notify>,
    breaker: Arc<BreakerCell>,
    recent: Arc<Recent>,
}

impl Default for Shared {
    fn default() -> Shared {
        Shared { wake: Arc::default(), breaker: Arc::default(), recent: Arc::new(Recent::new(crate::text::now_ms())) }
    }
}

/// One entry per configured destination (a reload adds new ones), and
/// the operational events' handle; cheap to clone.
#[derive(Clone, Default)]
pub struct Wakers(Arc<arc_swap::ArcSwap<HashMap<Arc<str>, Shared>>>, Events, Tracer);

impl Wakers {
    pub fn new<'a>(destinations: impl IntoIterator<Item = &'a Arc<str>>) -> Wakers {
        let map: HashMap<Arc<str>, Shared> = destinations.into_iter().map(|d| (d.clone(), Shared::default())).collect();
        Wakers(Arc::new(arc_swap::ArcSwap::from_pointee(map)), Events::default(), Tracer::default())
    }

    /// These wakers, emitting operational events through `events`.
    pub fn with_events(self, events: Events) -> Wakers {
        Wakers(self.0, events, self.2)
    }

    /// These wakers, recording spans through `tracer`.
    pub fn with_tracer(self, tracer: Tracer) -> Wakers {
        Wakers(self.0, self.1, tracer)
    }

    /// Where stages record spans (`otel.rs`).
    pub fn tracer(&self) -> &Tracer {
        &self.2
    }

    /// Where stages emit operational events (`events.rs`).
    pub fn events(&self) -> &Events {
        &self.1
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

    /// The destination's breaker state (closed for an unknown name).
    pub fn breaker_state(&self, destination: &str) -> BreakerState {
        self.breaker(destination).get()
    }

    /// The cell holding the destination's breaker state (the worker's
    /// breaker writes it, the admin API reads it).
    pub fn breaker(&self, destination: &str) -> Arc<BreakerCell> {
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

/// A destination's circuit breaker state (`delivery/breaker.rs` moves it).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum BreakerState {
    #[default]
    Closed,
    Open,
    HalfOpen,
}

impl BreakerState {
    /// As the admin API and metrics name it.
    pub fn as_str(self) -> &'static str {
        match self {
            BreakerState::Closed => "closed",
            BreakerState::Open => "open",
            BreakerState::HalfOpen => "half_open",
        }
    }
}

/// A [`BreakerState`] shared between a worker and the admin API.
#[derive(Debug, Default)]
pub struct BreakerCell(AtomicU8);

impl BreakerCell {
    pub fn get(&self) -> BreakerState {
        match self.0.load(Ordering::Relaxed) {
            1 => BreakerState::Open,
            2 => BreakerState::HalfOpen,
            _ => BreakerState::Closed,
        }
    }

    pub fn set(&self, s: BreakerState) {
        let v = match s {
            BreakerState::Closed => 0,
            BreakerState::Open => 1,
            BreakerState::HalfOpen => 2,
        };
        self.0.store(v, Ordering::Relaxed);
    }
}
