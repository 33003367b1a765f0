//! The receiving side of operational events (`events.rs`): one task that
//! turns what the stages emit into messages for the notification
//! destination, stored like any callback (durable, then delivered with that
//! destination's retries, signing, rate limit and transform).
//!
//! - `message.dead_lettered` is aggregated per destination: the first dead
//!   letter opens a window (`dead_letter_window`); at its end one event
//!   says how many, with the first ids. A flood of failures is so a bounded
//!   number of events: per destination one dead-letter event per window,
//!   and state changes (failing, recovered, paused, resumed) only when the
//!   state changes.
//! - `store.refusing` / `store.accepting` come from here: once a second,
//!   whether the store has room for the largest callback (`/readyz`'s
//!   question); told when that changes (not when only the reason's text
//!   does), and at start only a refusal that outlasts 10 s.
//! - An event the store cannot take (NATS unreachable, the local log
//!   broken) waits here, at most [`PENDING`] of them, and is stored when the
//!   store takes it again; the local store takes events below
//!   `min_free_bytes` and past `max_bytes` (`Marks::reserve`), so a full disk
//!   is told while it lasts. Events dropped (a full channel or a full
//!   waiting list) are told by a `notifications.dropped` event.

use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::events::{Event, Events, Settings};
use crate::metrics::Metrics;
use crate::store::{now_ms, Draft, Marks, Store};
use crate::wake::Wakers;

/// At most this many events wait for a store that cannot take them.
const PENDING: usize = 1000;
/// The first ids listed in an aggregated dead-letter event.
const FIRST_IDS: usize = 10;
/// How long a store refusing at start is given before it is told.
const START_GRACE: Duration = Duration::from_secs(10);
/// The route name stored with events (shown by inspection).
pub const ROUTE: &str = "switchboard:notifications";

/// One destination's dead letters in the current window.
struct DeadWindow {
    opened: tokio::time::Instant,
    count: u64,
    first_ids: Vec<String>,
    last_reason: String,
}

pub(crate) struct Notifier {
    settings: Settings,
    events: Events,
    store: Store,
    wakers: Wakers,
    dead: BTreeMap<Arc<str>, DeadWindow>,
    waiting: VecDeque<(&'static str, Vec<u8>)>,
    dropped: u64,
    /// What was last told of the store: `Some(true)` refusing, `None`
    /// nothing yet (the relay is starting).
    told_refusing: Option<bool>,
    started: tokio::time::Instant,
    /// What the store must have room for to count as accepting: the
    /// largest callback (`ingress.max_body`), as `/readyz` asks.
    room: u64,
    metrics: Arc<Metrics>,
}

impl Notifier {
    pub(crate) fn new(
        settings: Settings,
        events: Events,
        store: Store,
        wakers: Wakers,
        metrics: Arc<Metrics>,
        room: u64,
    ) -> Notifier {
        Notifier {
            settings,
            events,
            store,
            wakers,
            dead: BTreeMap::new(),
            waiting: VecDeque::new(),
            dropped: 0,
            told_refusing: None,
            started: tokio::time::Instant::now(),
            room,
            metrics,
        }
    }

    /// Until `shutdown`; then the open dead-letter windows are sent at once.
    pub(crate) async fn run(mut self, mut rx: mpsc::Receiver<Event>, shutdown: CancellationToken) {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => break,
                Some(event) = rx.recv() => self.take(event).await,
                _ = tick.tick() => self.every_second().await,
            }
        }
        while let Ok(event) = rx.try_recv() {
            self.take(event).await;
        }
        self.close_windows(true).await;
        self.flush().await;
    }

    async fn take(&mut self, event: Event) {
        match event {
            Event::DeadLettered { destination, id, reason } => {
                let now = tokio::time::Instant::now();
                let w = self.dead.entry(destination).or_insert_with(|| DeadWindow {
                    opened: now,
                    count: 0,
                    first_ids: Vec::new(),
                    last_reason: String::new(),
                });
                w.count += 1;
                if w.first_ids.len() < FIRST_IDS {
                    w.first_ids.push(id);
                }
                w.last_reason = reason;
            }
            other => {
                let body = crate::events::body(other.kind(), SystemTime::now(), other.data());
                self.send(other.kind(), body).await;
            }
        }
    }

    async fn every_second(&mut self) {
        let state = self.store.accepting(self.room).err().map(|e| e.to_string());
        let refusing = state.is_some();
        // Told on a change of refusing or accepting, not of the reason's
        // text (a full disk's free bytes change every second). At start,
        // accepting is the normal state and told by nothing; refusing is
        // told once it outlasts the start (a JetStream relay connects
        // after it starts).
        let tell = match self.told_refusing {
            Some(before) => before != refusing,
            None if !refusing => {
                self.told_refusing = Some(false);
                false
            }
            None => self.started.elapsed() >= START_GRACE,
        };
        if tell {
            self.told_refusing = Some(refusing);
            let event = match state {
                Some(reason) => Event::StoreRefusing { reason },
                None => Event::StoreAccepting,
            };
            if self.events.wants(event.kind()) {
                self.send(event.kind(), crate::events::body(event.kind(), SystemTime::now(), event.data())).await;
            }
        }
        self.close_windows(false).await;
        let dropped = self.events.take_dropped();
        self.metrics.notifications.with_label_values(&["dropped"]).inc_by(dropped);
        self.dropped += dropped;
        if self.dropped > 0 && self.events.wants("notifications.dropped") && self.waiting.len() < PENDING {
            let data = serde_json::json!({ "dropped": self.dropped });
            let body = crate::events::body("notifications.dropped", SystemTime::now(), data);
            self.dropped = 0;
            self.send("notifications.dropped", body).await;
        }
        self.flush().await;
    }

    /// Sends the dead-letter windows that are over (all of them if `all`).
    async fn close_windows(&mut self, all: bool) {
        let window = self.settings.dead_letter_window;
        let over: Vec<Arc<str>> =
            self.dead.iter().filter(|(_, w)| all || w.opened.elapsed() >= window).map(|(d, _)| d.clone()).collect();
        for d in over {
            let Some(w) = self.dead.remove(&d) else { continue };
            let data = serde_json::json!({
                "destination": &*d,
                "count": w.count,
                "first_ids": w.first_ids,
                "last_reason": w.last_reason,
                "window_seconds": window.as_secs_f64(),
            });
            self.send("message.dead_lettered", crate::events::body("message.dead_lettered", SystemTime::now(), data))
                .await;
        }
    }

    /// Stores `body` for the notification destination (after any waiting
    /// before it), or keeps it waiting.
    async fn send(&mut self, kind: &'static str, body: Vec<u8>) {
        if self.waiting.len() >= PENDING {
            self.dropped += 1;
            self.metrics.notifications.with_label_values(&["dropped"]).inc();
            return;
        }
        self.waiting.push_back((kind, body));
        self.flush().await;
    }

    /// Stores the waiting events, oldest first, until the store refuses one.
    async fn flush(&mut self) {
        while let Some((kind, body)) = self.waiting.front() {
            match self.store_one(body).await {
                Ok(()) => {
                    self.metrics.notifications.with_label_values(&[kind]).inc();
                    self.waiting.pop_front();
                }
                Err(e) => {
                    tracing::debug!(error = %e, waiting = self.waiting.len(), "operational event waits for the store");
                    break;
                }
            }
        }
        self.metrics.notifications_waiting.set(self.waiting.len() as i64);
    }

    async fn store_one(&self, body: &[u8]) -> Result<(), crate::store::StoreError> {
        let dest = &self.settings.destination;
        let headers = [
            ("content-type".to_string(), Bytes::from_static(b"application/json")),
            (crate::trace::HEADER.to_string(), Bytes::from(crate::trace::new_traceparent())),
        ];
        let mut draft = Draft::new(now_ms(), ROUTE, "switchboard", &headers, std::slice::from_ref(dest), body.len());
        draft.extend(body);
        let marks = Marks { reserve: true, ..Marks::default() };
        let appended = self.store.append_draft(draft, std::slice::from_ref(dest), marks)?;
        self.wakers.wake(dest);
        self.store.durable(appended).await?;
        Ok(())
    }
}
