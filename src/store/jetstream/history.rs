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
//! history could say pending for good): one task per relay tries the
//! queue, one write at a time, waiting 0.25 s doubling to 8 s after a
//! failure, so a relay adds at most one request per wait to a NATS that is
//! struggling. A write that fails goes to the back of the queue: one that
//! keeps failing (a kept copy the kept stream refuses, a key whose stream
//! has no leader yet) does not hold the others, as it did up to
//! 2026-12-03. Each write reads the key and replaces it only at the
//! revision it read, so their order does not matter and a late write
//! never undoes a later one: an attempt already recorded is not added
//! twice, and one older than the last recorded goes in its place in time
//! without changing the state. The queue holds [`REDO_MAX`] writes; past
//! that (a NATS outage of many minutes under load) writes are dropped and
//! counted in the log; one that fails [`REDO_TRIES`] times is given up and
//! logged. A relay stopped or killed with writes queued loses them (the
//! history lags).
//!
//! **Read from the leader**: a write's read and inspection's read go to
//! the bucket stream's leader (`leader_read`), not to the replica that
//! answers a direct get first (see there).
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

use async_nats::jetstream::kv;
use async_nats::jetstream::stream::LastRawMessageErrorKind;
use bytes::Bytes;
use tokio::sync::Notify;

use super::Jet;
use crate::store::record::{put_history, put_str16, read_history, record_destinations, Reader, RECORD_V1};
use crate::store::{
    lock, now_ms, Attempt, DecodeError, DeliveryState, DeliveryView, Inspection, MessageRecord, Settle, StoreError,
};

/// Most history writes waiting to be tried again (see the module doc).
pub(super) const REDO_MAX: usize = 20_000;

/// How often a queued write is tried before it is given up (with one
/// write failing alone, the waits reach 8 s: about ten minutes).
const REDO_TRIES: u32 = 80;

/// History writes that failed, tried again by one task.
#[derive(Default)]
pub(super) struct Redo {
    queue: Mutex<VecDeque<Queued>>,
    /// The number the next queued write gets.
    next: AtomicU64,
    wake: Notify,
    /// Writes dropped because the queue was full.
    dropped: AtomicU64,
}

/// A queued write, its number and how often it failed.
struct Queued {
    n: u64,
    write: Rewrite,
    tries: u32,
}

impl Redo {
    /// Queues `w` (dropped and counted if the queue is full).
    fn push(&self, w: Rewrite) {
        let mut queue = lock(&self.queue);
        if queue.len() >= REDO_MAX {
            self.dropped.fetch_add(1, Ordering::Relaxed);
            return;
        }
        let n = self.next.fetch_add(1, Ordering::Relaxed);
        queue.push_back(Queued { n, write: w, tries: 0 });
        self.wake.notify_one();
    }

    /// The write to try next, and its number.
    fn head(&self) -> Option<(u64, Rewrite)> {
        lock(&self.queue).front().map(|q| (q.n, q.write.clone()))
    }

    /// Write `n` is made: out of the queue.
    fn made(&self, n: u64) {
        let mut queue = lock(&self.queue);
        if let Some(at) = queue.iter().position(|q| q.n == n) {
            queue.remove(at);
        }
    }

    /// Write `n` failed: to the back of the queue, so one that keeps
    /// failing does not hold the others (each write reads before it
    /// replaces, so their order does not matter); given up (returned) at
    /// its [`REDO_TRIES`]th failure.
    fn failed(&self, n: u64) -> Option<Rewrite> {
        let mut queue = lock(&self.queue);
        let at = queue.iter().position(|q| q.n == n)?;
        let mut q = queue.remove(at)?;
        q.tries += 1;
        if q.tries >= REDO_TRIES {
            return Some(q.write);
        }
        queue.push_back(q);
        None
    }

    fn len(&self) -> usize {
        lock(&self.queue).len()
    }
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

/// The header a KV delete or purge marker carries.
const KV_OPERATION: &str = "KV-Operation";

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

/// `key`'s value and revision in `bucket`, as the bucket's stream leader
/// has it (`None`: no such key). Not the bucket's own `get`: the bucket
/// allows direct gets, which every replica answers, and NATS hands a
/// request to a replica on the relay's own server first; a replica still
/// catching up after a partition answers with what it has, so a relay
/// read a delivery's history as it was before (pending, or no attempt),
/// and its update at that revision failed for as long as the replica
/// lagged. The leader answers what is stored.
async fn leader_read(bucket: &kv::Store, key: &str) -> Result<Option<(Bytes, u64)>, String> {
    let subject = format!("{}{key}", bucket.prefix);
    match bucket.stream.get_last_raw_message_by_subject(&subject).await {
        // A key this bucket never deletes; a delete or purge marker (an
        // operator's) reads as no history.
        Ok(m) if m.headers.get(KV_OPERATION).is_some() => Ok(None),
        Ok(m) => Ok(Some((m.payload, m.sequence))),
        Err(e) if e.kind() == LastRawMessageErrorKind::NoMessageFound => Ok(None),
        Err(e) => Err(format!("JetStream: reading a delivery's history: {e}")),
    }
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
        self.inner.redo.push(w);
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
        let entry = leader_read(&ready.history, &k).await?;
        let current = entry.as_ref().and_then(|(value, _)| Kept::decode(value).ok());
        let Some(record) = merged(current, outcome) else { return Ok(()) };
        let value = Bytes::from(record.encode());
        match entry {
            Some((_, revision)) => {
                ready.history.update(&k, value, revision).await.map(|_| ()).map_err(|e| e.to_string())
            }
            None => ready.history.create(&k, value).await.map(|_| ()).map_err(|e| e.to_string()),
        }
    }

    /// Tries the queued history writes again, one at a time, a failed one
    /// to the back of the queue, until the relay stops (one task per
    /// relay; see the module doc).
    pub(super) async fn redo_history(&self) {
        let redo = &self.inner.redo;
        let mut wait = Duration::from_millis(250);
        loop {
            let Some((n, w)) = redo.head() else {
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
                    redo.made(n);
                    wait = Duration::from_millis(250);
                }
                Err(e) => {
                    // One that never succeeds (NATS refuses it for good)
                    // is given up after about ten minutes.
                    if redo.failed(n).is_some() {
                        tracing::warn!(error = %e, "JetStream: a history write or kept copy given up after {REDO_TRIES} tries");
                    }
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
        let redo = &self.inner.redo;
        while let Some((n, w)) = redo.head() {
            let tried = tokio::time::timeout_at(deadline, self.rewrite(&w)).await;
            if !matches!(tried, Ok(Ok(()))) {
                tracing::warn!(
                    left = redo.len(),
                    "JetStream: stopping with history writes or kept copies not made: those deliveries' history lags, those callbacks are not kept"
                );
                return;
            }
            redo.made(n);
        }
    }

    /// Whether the history says `dest` got message `id`.
    pub(super) async fn delivered_to(&self, dest: &str, id: u64) -> Result<bool, StoreError> {
        Ok(self.recorded(dest, id).await? == Some(Recorded::Delivered))
    }

    /// What the history says of `dest`'s delivery of `id` (`None`: no
    /// attempt recorded yet).
    pub(super) async fn recorded(&self, dest: &str, id: u64) -> Result<Option<Recorded>, StoreError> {
        let kept = leader_read(&self.ready()?.history, &key(dest, id)).await.map_err(StoreError::Unavailable)?;
        Ok(kept.and_then(|(v, _)| Kept::decode(&v).ok()).map(|k| match k.state {
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
            let kept = leader_read(&ready.history, &key(&dest, id)).await.map_err(StoreError::Unavailable)?;
            let view = match kept.map(|(v, _)| Kept::decode(&v)) {
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

    fn queued(id: u64) -> Rewrite {
        Rewrite::History { dest: "d".into(), id, outcome: retry(id) }
    }

    fn id_of(w: &Rewrite) -> u64 {
        match w {
            Rewrite::History { id, .. } => *id,
            Rewrite::Copy(c) => c.id,
        }
    }

    #[test]
    fn a_queued_write_that_keeps_failing_does_not_hold_the_others_and_is_given_up() {
        let redo = Redo::default();
        redo.push(queued(1));
        redo.push(queued(2));
        let (n1, w) = redo.head().expect("queued");
        assert_eq!(id_of(&w), 1);
        assert!(redo.failed(n1).is_none(), "tried again later");
        // Write 2 is tried next and made; 1 is still there.
        let (n2, w) = redo.head().expect("queued");
        assert_eq!(id_of(&w), 2, "a failed write goes to the back");
        redo.made(n2);
        assert_eq!(redo.len(), 1);
        for _ in 1..REDO_TRIES - 1 {
            assert!(redo.failed(n1).is_none());
        }
        let given_up = redo.failed(n1).expect("given up at its last try");
        assert_eq!(id_of(&given_up), 1);
        assert!(redo.head().is_none());
    }

    #[test]
    fn a_write_made_or_failed_is_found_by_its_number_wherever_it_is() {
        let redo = Redo::default();
        for id in 1..=3 {
            redo.push(queued(id));
        }
        let (n1, _) = redo.head().expect("queued");
        // A write made while it is not at the front (a stop's last try
        // and the task's, at once) takes out that write, not the front.
        redo.made(n1 + 1);
        let left: Vec<u64> = lock(&redo.queue).iter().map(|q| id_of(&q.write)).collect();
        assert_eq!(left, vec![1, 3]);
        assert!(redo.failed(n1 + 1).is_none(), "already out: nothing to do");
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
