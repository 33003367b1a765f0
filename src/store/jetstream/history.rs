//! Attempt history and inspection on JetStream: one key per delivery in
//! the `S-history` bucket (`<destination>.<id>`), the last 8 attempts with
//! the delivery's state (pending with the next attempt's time, delivered,
//! dead with why), in the shared record's attempt encoding.
//!
//! **Written after the settle it records** (the ack, nak or dead letter
//! first), by a task of its own so the write does not hold the attempt's
//! slot: a relay that dies between the two leaves the history one attempt
//! behind (it says pending, or shows the previous failure), never
//! "delivered" for a delivery that was not. Cost per settle: one write
//! (`create`) for a first attempt, one read and one write (`update` at the
//! revision read) from the second on. Awaiting them on the attempt's task
//! halved JetStream fan-out (run 9). Kept 7 days (the bucket's `max_age`).
//!
//! **A write that fails** (NATS in trouble: a node killed, a partition) is
//! queued, not dropped (it was dropped before, so a delivered callback's
//! history could say pending for good): one task per relay tries the queue
//! in order, one write at a time, waiting 0.25 s doubling to 8 s after a
//! failure, so a relay adds at most one request per wait to a NATS that is
//! struggling. Each write reads the key and replaces it only at the
//! revision it read, so a late write never undoes a later one: an attempt
//! already recorded is not added twice, and one older than the last
//! recorded goes in its place in time without changing the state. The
//! queue holds [`REDO_MAX`] writes; past that (a NATS outage of many
//! minutes under load) writes are dropped and counted in the log; one
//! that keeps failing for about ten minutes ([`REDO_TRIES`]) is given up
//! and logged, so it cannot hold the rest. A relay
//! stopped or killed with writes queued loses them (the history lags).
//!
//! **Inspection** reads the message from the work stream by its id (its
//! sequence) and each destination's key: a message every destination is
//! done with is gone from the stream (Interest retention), so it answers
//! 404 as the local store does without retention; a dead letter whose
//! other destinations are done is listed under `dead-letters`, not here.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::Notify;

use super::Jet;
use crate::store::record::{put_history, put_str16, read_history, record_destinations, Reader, RECORD_V1};
use crate::store::{
    lock, now_ms, Attempt, DecodeError, DeliveryState, DeliveryView, Inspection, MessageRecord, Settle, StoreError,
};

/// Most history writes waiting to be tried again (see the module doc).
pub(super) const REDO_MAX: usize = 20_000;

/// How often the queue's head is tried again before it is given up (the
/// waits reach 8 s: about ten minutes).
const REDO_TRIES: u32 = 80;

/// History writes that failed, tried again in order by one task.
#[derive(Default)]
pub(super) struct Redo {
    queue: Mutex<VecDeque<Rewrite>>,
    wake: Notify,
    /// Writes dropped because the queue was full.
    dropped: AtomicU64,
}

/// A write to try again.
#[derive(Clone)]
pub(super) enum Rewrite {
    /// A delivery's history.
    History { dest: String, id: u64, outcome: Settle },
    /// A callback's kept copy (`kept.rs`).
    Copy(super::kept::Copy),
}

/// The record of a delivery after `outcome`, its earlier attempts
/// `history`.
fn kept(outcome: &Settle, mut history: Vec<Attempt>) -> Kept {
    match outcome {
        Settle::Delivered { attempt } => {
            history.push(attempt.clone());
            let ended = attempt.at_ms.saturating_add(u64::from(attempt.duration_ms));
            Kept { state: DELIVERED, at_ms: ended, status: attempt.status, reason: String::new(), history }
        }
        Settle::Retry { at_ms, status, error, attempt } => {
            history.push(attempt.clone());
            Kept { state: PENDING, at_ms: *at_ms, status: status.unwrap_or(0), reason: error.clone(), history }
        }
        Settle::Dead { status, reason, attempt } => {
            history.push(attempt.clone());
            Kept { state: DEAD, at_ms: now_ms(), status: status.unwrap_or(0), reason: reason.clone(), history }
        }
    }
}

/// What the key should say after `outcome`, given what it says now;
/// `None` if it has that attempt already. An attempt older than the last
/// recorded (a write tried again after a later one) goes in its place in
/// time and leaves the state alone.
fn merged(current: Option<Kept>, outcome: &Settle) -> Option<Kept> {
    let attempt = match outcome {
        Settle::Delivered { attempt } | Settle::Retry { attempt, .. } | Settle::Dead { attempt, .. } => attempt,
    };
    let mut record = match current {
        Some(c) if c.history.contains(attempt) => return None,
        Some(mut c) if c.history.last().is_some_and(|l| l.at_ms > attempt.at_ms) => {
            let at = c.history.partition_point(|a| a.at_ms <= attempt.at_ms);
            c.history.insert(at, attempt.clone());
            c
        }
        Some(c) => kept(outcome, c.history),
        None => kept(outcome, Vec::new()),
    };
    record.history.sort_by_key(|a| a.at_ms);
    let extra = record.history.len().saturating_sub(crate::store::record::HISTORY_LEN);
    record.history.drain(..extra);
    Some(record)
}

/// How long history keys are kept.
pub(super) const HISTORY_MAX_AGE: std::time::Duration = std::time::Duration::from_secs(7 * 24 * 3600);

const PENDING: u8 = 1;
const DELIVERED: u8 = 2;
const DEAD: u8 = 3;

/// A delivery's state as the history has it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Recorded {
    Pending,
    Delivered,
    Dead,
}

/// One delivery's state as the bucket keeps it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Kept {
    state: u8,
    /// Pending: the next attempt's time; delivered: when it ended; dead:
    /// when it was given up.
    at_ms: u64,
    status: u16,
    reason: String,
    history: Vec<Attempt>,
}

impl Kept {
    fn encode(&self) -> Vec<u8> {
        let mut out = vec![RECORD_V1, self.state];
        out.extend_from_slice(&self.at_ms.to_be_bytes());
        out.extend_from_slice(&self.status.to_be_bytes());
        put_str16(&mut out, &self.reason);
        put_history(&mut out, &self.history);
        out
    }

    fn decode(raw: &[u8]) -> Result<Kept, DecodeError> {
        let mut r = Reader::versioned(raw, "delivery history")?;
        let (state, at_ms, status, reason) = (r.u8()?, r.u64()?, r.u16()?, r.str16()?);
        Ok(Kept { state, at_ms, status, reason, history: read_history(&mut r)? })
    }

    fn view(self, destination: String) -> DeliveryView {
        let state = match self.state {
            DELIVERED => DeliveryState::Delivered { at_ms: Some(self.at_ms) },
            DEAD => DeliveryState::Dead {
                dead_at_ms: self.at_ms,
                last_status: (self.status != 0).then_some(self.status),
                reason: self.reason,
            },
            _ => DeliveryState::Pending { due_ms: self.at_ms },
        };
        DeliveryView { destination, state, attempts: self.history }
    }
}

fn key(dest: &str, id: u64) -> String {
    format!("{dest}.{id}")
}

impl Jet {
    /// Records what `outcome` made of `dest`'s delivery of `id`, after the
    /// settle; a write that fails is queued for [`Jet::redo_history`] (see
    /// the module doc). `first`: the delivery's first attempt, so there is
    /// normally no earlier history to read (most settles: one write).
    pub(super) async fn record_history(&self, dest: &str, id: u64, outcome: &Settle, first: bool) {
        if let Err(e) = self.write_history(dest, id, outcome, first).await {
            if let Some(also) = self.inner.history_failures_logged.admit() {
                tracing::warn!(destination = dest, error = %e, also_failed_since_last_line = also, "JetStream: could not record a delivery attempt's history; it is queued and tried again");
            }
            self.redo_later(Rewrite::History { dest: dest.to_string(), id, outcome: outcome.clone() });
        }
    }

    /// Queues `w` for [`Jet::redo_history`] (dropped and counted if the
    /// queue is full).
    pub(super) fn redo_later(&self, w: Rewrite) {
        let redo = &self.inner.redo;
        let mut queue = lock(&redo.queue);
        if queue.len() >= REDO_MAX {
            redo.dropped.fetch_add(1, Ordering::Relaxed);
            return;
        }
        queue.push_back(w);
        redo.wake.notify_one();
    }

    /// One try of a queued write.
    async fn rewrite(&self, w: &Rewrite) -> Result<(), String> {
        match w {
            Rewrite::History { dest, id, outcome } => self.write_history(dest, *id, outcome, false).await,
            Rewrite::Copy(c) => self.publish_copy(c).await,
        }
    }

    /// One write of a delivery's history (see the module doc).
    async fn write_history(&self, dest: &str, id: u64, outcome: &Settle, first: bool) -> Result<(), String> {
        let ready = self.ready().map_err(|e| e.to_string())?;
        let k = key(dest, id);
        // A first attempt creates the key without reading it; a key there
        // already (a replay, a write tried again) takes the reading path.
        if first && ready.history.create(&k, Bytes::from(kept(outcome, Vec::new()).encode())).await.is_ok() {
            return Ok(());
        }
        let entry = ready.history.entry(k.clone()).await.map_err(|e| e.to_string())?;
        let current = entry.as_ref().and_then(|e| Kept::decode(&e.value).ok());
        let Some(record) = merged(current, outcome) else { return Ok(()) };
        let value = Bytes::from(record.encode());
        match entry {
            Some(e) => ready.history.update(&k, value, e.revision).await.map(|_| ()).map_err(|e| e.to_string()),
            None => ready.history.create(&k, value).await.map(|_| ()).map_err(|e| e.to_string()),
        }
    }

    /// Tries the queued history writes again, in order, one at a time,
    /// until the relay stops (one task per relay; see the module doc).
    pub(super) async fn redo_history(&self) {
        let redo = &self.inner.redo;
        let mut wait = Duration::from_millis(250);
        let mut tries = 0;
        loop {
            let head = lock(&redo.queue).front().cloned();
            let Some(w) = head else {
                let dropped = redo.dropped.swap(0, Ordering::Relaxed);
                if dropped > 0 {
                    tracing::warn!(dropped, "JetStream: history writes and kept copies dropped, the queue of writes to try again was full: those deliveries' history lags, those callbacks are not kept");
                }
                tokio::select! {
                    _ = self.inner.stop.cancelled() => return,
                    _ = redo.wake.notified() => continue,
                }
            };
            match self.rewrite(&w).await {
                Ok(()) => {
                    lock(&redo.queue).pop_front();
                    wait = Duration::from_millis(250);
                    tries = 0;
                }
                // One that never succeeds (NATS refuses it for good) must
                // not hold the rest: given up after about ten minutes.
                Err(e) if tries >= REDO_TRIES => {
                    tracing::warn!(error = %e, "JetStream: a history write or kept copy given up after {REDO_TRIES} tries");
                    lock(&redo.queue).pop_front();
                    tries = 0;
                }
                Err(_) => {
                    tries += 1;
                    tokio::select! {
                        _ = self.inner.stop.cancelled() => return,
                        // A pause before trying again, not a synchronisation.
                        _ = tokio::time::sleep(wait) => {}
                    }
                    wait = (wait * 2).min(Duration::from_secs(8));
                }
            }
        }
    }

    /// At a clean stop: one more try of the queued writes, for `within`
    /// at most, stopping at the first that fails; what is left is logged
    /// (those deliveries' history lags).
    pub(super) async fn finish_history(&self, within: Duration) {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            let head = lock(&self.inner.redo.queue).front().cloned();
            let Some(w) = head else { return };
            let tried = tokio::time::timeout_at(deadline, self.rewrite(&w)).await;
            if !matches!(tried, Ok(Ok(()))) {
                let left = lock(&self.inner.redo.queue).len();
                tracing::warn!(
                    left,
                    "JetStream: stopping with history writes or kept copies not made: those deliveries' history lags, those callbacks are not kept"
                );
                return;
            }
            lock(&self.inner.redo.queue).pop_front();
        }
    }

    /// Whether the history says `dest` got message `id`.
    pub(super) async fn delivered_to(&self, dest: &str, id: u64) -> Result<bool, StoreError> {
        Ok(self.recorded(dest, id).await? == Some(Recorded::Delivered))
    }

    /// What the history says of `dest`'s delivery of `id` (`None`: no
    /// attempt recorded yet).
    pub(super) async fn recorded(&self, dest: &str, id: u64) -> Result<Option<Recorded>, StoreError> {
        let kept = self
            .ready()?
            .history
            .get(key(dest, id))
            .await
            .map_err(|e| StoreError::Unavailable(format!("JetStream: reading a delivery's history: {e}")))?;
        Ok(kept.as_deref().and_then(|v| Kept::decode(v).ok()).map(|k| match k.state {
            DELIVERED => Recorded::Delivered,
            DEAD => Recorded::Dead,
            _ => Recorded::Pending,
        }))
    }

    /// Message `id` with each destination's delivery, while it is in the
    /// work stream, or kept (`kept.rs`).
    pub async fn inspect(&self, id: u64) -> Result<Option<Inspection>, StoreError> {
        let ready = self.ready()?;
        let (msg, retained_until_ms) = match ready.stream.get_raw_message(id).await {
            Ok(m) => (m, None),
            Err(e) if e.kind() == async_nats::jetstream::stream::LastRawMessageErrorKind::NoMessageFound => {
                // Every destination is done with it: its kept copy, if
                // retention is on (`kept.rs`).
                match self.kept_message(id).await? {
                    Some((m, until)) => (m, Some(until)),
                    None => return Ok(None),
                }
            }
            Err(e) => return Err(StoreError::Unavailable(format!("JetStream: reading message {id}: {e}"))),
        };
        let raw = self.open_payload(Some(&msg.headers), &msg.payload)?;
        let record = MessageRecord::decode(raw.clone())?;
        let mut deliveries = Vec::new();
        for dest in record_destinations(&raw)? {
            let kept = ready
                .history
                .get(key(&dest, id))
                .await
                .map_err(|e| StoreError::Unavailable(format!("JetStream: reading a delivery's history: {e}")))?;
            let view = match kept.as_deref().map(Kept::decode) {
                Some(Ok(k)) => k.view(dest),
                // Not attempted yet: due since it was received.
                _ => DeliveryView {
                    destination: dest,
                    state: DeliveryState::Pending { due_ms: record.received_ms },
                    attempts: Vec::new(),
                },
            };
            deliveries.push(view);
        }
        Ok(Some(Inspection { id, record, deliveries, retained_until_ms }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kept_states_round_trip_and_read_as_the_interfaces_states() {
        let tried =
            Attempt { at_ms: 5, duration_ms: 7, status: 503, error: "http 503".into(), snippet: b"busy".to_vec() };
        for state in [PENDING, DELIVERED, DEAD] {
            let k = Kept { state, at_ms: 99, status: 503, reason: "why".into(), history: vec![tried.clone()] };
            assert_eq!(Kept::decode(&k.encode()).expect("decode"), k);
        }
        let dead = Kept { state: DEAD, at_ms: 9, status: 400, reason: "refused".into(), history: vec![] };
        assert!(matches!(
            dead.view("d".into()).state,
            DeliveryState::Dead { dead_at_ms: 9, last_status: Some(400), .. }
        ));
        assert!(Kept::decode(&[RECORD_V1, 1]).is_err(), "truncated");
    }

    fn attempt(at_ms: u64, status: u16) -> Attempt {
        Attempt { at_ms, duration_ms: 1, status, error: String::new(), snippet: Vec::new() }
    }

    fn retry(at_ms: u64) -> Settle {
        Settle::Retry { at_ms: at_ms + 100, status: Some(503), error: "http 503".into(), attempt: attempt(at_ms, 503) }
    }

    #[test]
    fn a_write_tried_again_never_undoes_a_later_one_nor_adds_an_attempt_twice() {
        let first = merged(None, &retry(10)).expect("a first attempt is written");
        assert_eq!((first.state, first.history.len()), (PENDING, 1));
        // The second attempt delivered; then the first's write, queued
        // after a failure, comes again.
        let delivered = Settle::Delivered { attempt: attempt(20, 200) };
        let now = merged(Some(first.clone()), &delivered).expect("the delivery is written");
        assert_eq!(now.state, DELIVERED);
        assert!(merged(Some(now.clone()), &retry(10)).is_none(), "attempt 1 is there already");
        // Attempt 1's write had failed for good before: it is put back in
        // its place in time, and the delivery stays delivered.
        let only_second = merged(None, &delivered).expect("written");
        let late = merged(Some(only_second), &retry(10)).expect("the missing attempt is added");
        assert_eq!(late.state, DELIVERED);
        assert_eq!(late.history.iter().map(|a| a.at_ms).collect::<Vec<_>>(), vec![10, 20]);
    }

    #[test]
    fn a_merged_history_keeps_the_last_eight_attempts() {
        let mut k = None;
        for at in 1..=12 {
            k = merged(k, &retry(at * 10));
        }
        let k = k.expect("written");
        assert_eq!(k.history.len(), crate::store::record::HISTORY_LEN);
        assert_eq!(k.history.first().map(|a| a.at_ms), Some(50));
        assert_eq!(k.at_ms, 220, "the last attempt's next time");
    }
}
