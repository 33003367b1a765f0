//! Operational events (`[notifications]`): what the relay tells an
//! operator about itself, as JSON messages `{ "type", "timestamp", "data" }`
//! delivered through its own durable queue to one ordinary destination.
//!
//! This leaf is the sending side: [`Events`] is a cheap handle the stages
//! hold (through [`crate::wake::Wakers`]); [`Events::emit`] never blocks and
//! never fails (a full channel drops the event and counts it). The
//! receiving side, which aggregates, stores and wakes the destination, is
//! `relay/notify.rs`. Events about the notification destination itself are
//! never emitted: its own failures cannot feed it (no loops).

use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use tokio::sync::mpsc;

/// Every event type, as named in `events = [...]` and in each event's
/// `type`.
pub const TYPES: [&str; 9] = [
    "destination.failing",
    "destination.recovered",
    "destination.paused",
    "destination.resumed",
    "message.dead_lettered",
    "store.refusing",
    "store.accepting",
    "config.reload_failed",
    "notifications.dropped",
];

/// `[notifications]`, validated.
#[derive(Debug, Clone)]
pub struct Settings {
    /// The destination events go to (an ordinary `[destinations.NAME]`).
    pub destination: Arc<str>,
    /// The types sent (all of [`TYPES`] by default).
    pub events: Vec<String>,
    /// Attempts failed in a row that make a destination `failing` (a
    /// breaker opening does too).
    pub failing_after: u64,
    /// Dead letters of one destination are sent as one event per window.
    pub dead_letter_window: std::time::Duration,
}

/// What happened. Dead letters are reported one by one here and
/// aggregated per destination by the receiving side.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// The breaker opened, or `failing_after` attempts failed in a row.
    Failing {
        destination: Arc<str>,
        why: String,
        failed_attempts: u64,
        last_error: String,
    },
    /// It answered again after [`Event::Failing`].
    Recovered {
        destination: Arc<str>,
        failed_attempts: u64,
    },
    /// Paused by a `410 Gone` or an operator.
    Paused {
        destination: Arc<str>,
        reason: &'static str,
    },
    Resumed {
        destination: Arc<str>,
    },
    DeadLettered {
        destination: Arc<str>,
        id: String,
        reason: String,
    },
    /// Ingress refuses callbacks: the store cannot take them.
    StoreRefusing {
        reason: String,
    },
    StoreAccepting,
    ReloadFailed {
        error: String,
    },
}

impl Event {
    pub fn kind(&self) -> &'static str {
        match self {
            Event::Failing { .. } => TYPES[0],
            Event::Recovered { .. } => TYPES[1],
            Event::Paused { .. } => TYPES[2],
            Event::Resumed { .. } => TYPES[3],
            Event::DeadLettered { .. } => TYPES[4],
            Event::StoreRefusing { .. } => TYPES[5],
            Event::StoreAccepting => TYPES[6],
            Event::ReloadFailed { .. } => TYPES[7],
        }
    }

    /// The destination the event is about, if any.
    pub fn destination(&self) -> Option<&str> {
        match self {
            Event::Failing { destination, .. }
            | Event::Recovered { destination, .. }
            | Event::Paused { destination, .. }
            | Event::Resumed { destination }
            | Event::DeadLettered { destination, .. } => Some(destination),
            _ => None,
        }
    }

    /// The event's `data` (dead letters: one; the receiving side sends
    /// them aggregated).
    pub fn data(&self) -> serde_json::Value {
        use serde_json::json;
        match self {
            Event::Failing { destination, why, failed_attempts, last_error } => json!({
                "destination": &**destination, "why": why, "failed_attempts": failed_attempts, "last_error": last_error,
            }),
            Event::Recovered { destination, failed_attempts } => {
                json!({ "destination": &**destination, "failed_attempts": failed_attempts })
            }
            Event::Paused { destination, reason } => json!({ "destination": &**destination, "reason": reason }),
            Event::Resumed { destination } => json!({ "destination": &**destination }),
            Event::DeadLettered { destination, id, reason } => {
                json!({ "destination": &**destination, "count": 1, "first_ids": [id], "last_reason": reason })
            }
            Event::StoreRefusing { reason } => json!({ "reason": reason }),
            Event::StoreAccepting => json!({}),
            Event::ReloadFailed { error } => json!({ "error": error }),
        }
    }
}

/// The JSON body of one event.
pub fn body(kind: &str, at: std::time::SystemTime, data: serde_json::Value) -> Vec<u8> {
    let timestamp = humantime::format_rfc3339_millis(at).to_string();
    serde_json::json!({ "type": kind, "timestamp": timestamp, "data": data }).to_string().into_bytes()
}

/// How many events the channel holds before [`Events::emit`] drops.
pub const CHANNEL: usize = 4096;

struct On {
    tx: mpsc::Sender<Event>,
    destination: Arc<str>,
    wanted: HashSet<&'static str>,
    failing_after: u64,
    dropped: AtomicU64,
}

/// The handle the stages emit through; off (every emit a no-op) unless
/// `[notifications]` is configured. Cheap to clone.
#[derive(Clone, Default)]
pub struct Events(Option<Arc<On>>);

impl Events {
    /// A handle sending what `settings` ask for, and the receiving end for
    /// `relay/notify.rs`.
    pub fn new(settings: &Settings) -> (Events, mpsc::Receiver<Event>) {
        let (tx, rx) = mpsc::channel(CHANNEL);
        let wanted = TYPES.iter().copied().filter(|t| settings.events.iter().any(|w| w == t)).collect();
        let on = On {
            tx,
            destination: settings.destination.clone(),
            wanted,
            failing_after: settings.failing_after,
            dropped: AtomicU64::new(0),
        };
        (Events(Some(Arc::new(on))), rx)
    }

    /// Attempts failed in a row that make a destination `failing`
    /// (`u64::MAX` when off).
    pub fn failing_after(&self) -> u64 {
        self.0.as_ref().map_or(u64::MAX, |on| on.failing_after)
    }

    /// Whether `[notifications]` is on and wants `kind`.
    pub fn wants(&self, kind: &str) -> bool {
        self.0.as_ref().is_some_and(|on| on.wanted.contains(kind))
    }

    /// The notification destination, if any.
    pub fn destination(&self) -> Option<&Arc<str>> {
        self.0.as_ref().map(|on| &on.destination)
    }

    /// Sends `event` unless it is unwanted or about the notification
    /// destination itself; never waits (a full channel drops it, counted).
    pub fn emit(&self, event: Event) {
        let Some(on) = &self.0 else { return };
        if !on.wanted.contains(event.kind()) || event.destination() == Some(&*on.destination) {
            return;
        }
        if on.tx.try_send(event).is_err() {
            on.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Events dropped since the last call (the channel was full).
    pub fn take_dropped(&self) -> u64 {
        self.0.as_ref().map_or(0, |on| on.dropped.swap(0, Ordering::Relaxed))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(events: &[&str]) -> Settings {
        Settings {
            destination: "ops".into(),
            events: events.iter().map(|e| e.to_string()).collect(),
            failing_after: 3,
            dead_letter_window: std::time::Duration::from_secs(60),
        }
    }

    #[test]
    fn unwanted_events_and_events_about_the_notification_destination_are_not_sent() {
        let (events, mut rx) = Events::new(&settings(&["destination.failing"]));
        let failing = |d: &str| Event::Failing {
            destination: d.into(),
            why: "x".into(),
            failed_attempts: 3,
            last_error: "503".into(),
        };
        events.emit(failing("ops"));
        events.emit(Event::Resumed { destination: "billing".into() });
        events.emit(failing("billing"));
        assert_eq!(rx.try_recv().ok(), Some(failing("billing")));
        assert!(rx.try_recv().is_err());
        Events::default().emit(failing("billing")); // off: a no-op
    }

    #[test]
    fn a_full_channel_drops_and_counts() {
        let (events, _rx) = Events::new(&settings(&["store.accepting"]));
        for _ in 0..CHANNEL + 5 {
            events.emit(Event::StoreAccepting);
        }
        assert_eq!(events.take_dropped(), 5);
        assert_eq!(events.take_dropped(), 0);
    }

    #[test]
    fn bodies_are_type_timestamp_data() {
        let at = std::time::UNIX_EPOCH + std::time::Duration::from_millis(1_790_000_000_123);
        let b = body("store.accepting", at, serde_json::json!({}));
        let v: serde_json::Value = serde_json::from_slice(&b).expect("json");
        assert_eq!(v["type"], "store.accepting");
        assert_eq!(v["timestamp"], "2026-09-21T14:13:20.123Z");
        assert!(v["data"].is_object());
    }
}
