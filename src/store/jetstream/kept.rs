//! Keeping delivered messages on JetStream (`store.retain_delivered`):
//! after a callback's publish is acknowledged, the relay publishes a copy
//! (sealed as the original, headers and all) to `S.kept.<id>` in the
//! limits stream `S-kept`, which expires copies after `retain_delivered`
//! (`max_age`; `max_bytes` from `retain_max_bytes` if set, oldest
//! discarded first). The copy's acknowledgement is awaited off the
//! callback's path (the callback is answered when the original is
//! stored); a copy that fails goes to the relay's queue of writes to try
//! again (`history.rs`). Cost: one more publish per callback, and NATS
//! stores each callback twice. A relay killed between a callback's
//! acknowledgement and its copy leaves that callback out of inspection
//! (404 once delivered) and out of `replay --since`; its delivery is not
//! affected.
//!
//! **Not a source, not a republish** (as up to 2026-12-03): a stream
//! sourcing the work stream does it through a consumer of the server's
//! own that acknowledges what it is sent at once, and with it NATS
//! (2.15.1) dropped callbacks from the work stream (Interest retention)
//! that other destinations had not been sent, when a relay holding some
//! was killed (`tests/it/ha.rs` with retention: 6-18 lost per run, five
//! runs of five). The stream's own republish needs no consumer but is a
//! core publish at most once: copies were lost whenever a node died (the
//! R3 and fault tests found delivered callbacks inspection did not know).
//! A kept stream made by an older build (a source) is turned into this on
//! start; its copies are still found.
//!
//! A copy carries its id in `Switchboard-Id` (older copies, sourced: the
//! server's `Nats-Stream-Source`, whose second field is the sequence) and
//! the subject it was published to (its partition) in
//! `Switchboard-Subject`. Found by id by its subject; older copies, which
//! are in work-stream order, with a binary search over the kept stream's
//! sequences (expiry removes from the front only).
//!
//! Inspection falls back to the copy once the work stream has let the
//! message go; `messages replay D --since T` republishes the copies of
//! messages whose history (`history.rs`) says D got them, for D alone, as a
//! dead letter's replay does (`dead.rs`). Replays are not copied: their
//! original is kept.

use std::time::Duration;

use async_nats::jetstream::message::StreamMessage;
use async_nats::jetstream::{self, stream};

use super::setup::setup_error;
use async_nats::HeaderMap;
use bytes::Bytes;

use super::{Jet, Names, H_DESTS, H_FOR, H_ID, H_SUBJECT};
use crate::store::record::record_destinations;
use crate::store::{now_ms, MessageRecord, Selection, StoreError};

/// Most copies one replay walks through.
const MAX_WALK: usize = 1_000_000;

/// A callback's copy for the kept stream.
#[derive(Clone)]
pub(super) struct Copy {
    pub(super) id: u64,
    pub(super) subject: String,
    pub(super) headers: HeaderMap,
    pub(super) payload: Bytes,
}

/// Creates `S-kept`, or brings an existing one's subjects, `max_age` and
/// `max_bytes` to the configuration's (a source of an older build is
/// removed; its other settings are the relay's own).
pub(super) async fn ensure_kept(
    js: &jetstream::Context,
    names: &Names<'_>,
    replicas: usize,
    max_age: Duration,
    max_bytes: Option<u64>,
) -> Result<stream::Stream, StoreError> {
    let want = stream::Config {
        name: names.kept_stream(),
        subjects: vec![names.kept_subjects()],
        retention: stream::RetentionPolicy::Limits,
        storage: stream::StorageType::File,
        num_replicas: replicas,
        max_age,
        max_bytes: max_bytes.map_or(-1, |b| i64::try_from(b).unwrap_or(i64::MAX)),
        discard: stream::DiscardPolicy::Old,
        ..Default::default()
    };
    match js.get_stream(&want.name).await {
        Ok(mut existing) => {
            let have = existing.info().await.map_err(|e| setup_error("reading the kept stream", e))?.config.clone();
            if have.num_replicas != want.num_replicas {
                return Err(StoreError::Setup(format!(
                    "stream {:?} has {} replicas; store.replicas is {}",
                    want.name, have.num_replicas, want.num_replicas
                )));
            }
            let sourced = have.sources.as_ref().is_some_and(|s| !s.is_empty());
            if sourced
                || have.subjects != want.subjects
                || have.max_age != want.max_age
                || have.max_bytes != want.max_bytes
            {
                tracing::info!(
                    stream = %want.name,
                    sourced,
                    "updating the kept stream to the configuration's: subjects, retain_delivered, retain_max_bytes (a source of an older build removed)"
                );
                let update = stream::Config { sources: Some(Vec::new()), ..want };
                js.update_stream(&update).await.map_err(|e| setup_error("updating the kept stream", e))?;
            }
            Ok(existing)
        }
        Err(_) => js.create_stream(want).await.map_err(|e| setup_error("creating the kept stream", e)),
    }
}

/// The work-stream sequence (the id) a kept copy was copied from.
pub(super) fn source_seq(m: &StreamMessage) -> Option<u64> {
    if let Some(v) = m.headers.get(H_ID) {
        return v.as_str().parse().ok();
    }
    let v = m.headers.get("Nats-Stream-Source")?;
    v.as_str().split_whitespace().nth(1)?.parse().ok()
}

fn time_ms(m: &StreamMessage) -> u64 {
    u64::try_from(m.time.unix_timestamp_nanos() / 1_000_000).unwrap_or(0)
}

fn unavailable(e: impl std::fmt::Display) -> StoreError {
    StoreError::Unavailable(format!("JetStream: the kept stream: {e}"))
}

impl Jet {
    /// Keeps a copy of callback `id`, just stored on `subject` with
    /// `headers` and `payload`, if retention is on (see the module doc).
    pub(super) fn keep(&self, id: u64, subject: &str, headers: &HeaderMap, payload: &Bytes) {
        if self.inner.config.retain.is_none() {
            return;
        }
        let mut headers = headers.clone();
        headers.insert(async_nats::header::NATS_MESSAGE_ID, format!("kept-{id}").as_str());
        headers.insert(H_ID, id.to_string().as_str());
        headers.insert(H_SUBJECT, subject);
        let names = Names(&self.inner.config.stream);
        let copy = Copy { id, subject: names.kept_subject(id), headers, payload: payload.clone() };
        let me = self.clone();
        self.inner.tasks.spawn(async move {
            if let Err(e) = me.publish_copy(&copy).await {
                tracing::debug!(id = copy.id, error = %e, "kept copy not stored; queued to try again");
                me.redo_later(super::history::Rewrite::Copy(copy));
            }
        });
    }

    /// One try of storing a kept copy, its acknowledgement awaited.
    pub(super) async fn publish_copy(&self, c: &Copy) -> Result<(), String> {
        let ready = self.ready().map_err(|e| e.to_string())?;
        let timeout = self.inner.config.publish_timeout;
        let sent = async {
            let ack = ready
                .js
                .publish_with_headers(c.subject.clone(), c.headers.clone(), c.payload.clone())
                .await
                .map_err(|e| e.to_string())?;
            ack.await.map(|_| ()).map_err(|e| e.to_string())
        };
        tokio::time::timeout(timeout, sent).await.unwrap_or_else(|_| Err("no acknowledgement in time".into()))
    }

    /// The kept copy of message `id`, with when it expires (unix ms);
    /// `None` if retention is off or the copy is gone.
    pub(super) async fn kept_message(&self, id: u64) -> Result<Option<(StreamMessage, u64)>, StoreError> {
        let ready = self.ready()?;
        let Some(kept) = &ready.kept else { return Ok(None) };
        let names = Names(&self.inner.config.stream);
        match kept.get_last_raw_message_by_subject(&names.kept_subject(id)).await {
            Ok(m) => {
                let until = time_ms(&m).saturating_add(self.retained_for_ms());
                return Ok(Some((m, until)));
            }
            Err(e) if e.kind() == stream::LastRawMessageErrorKind::NoMessageFound => {}
            Err(e) => return Err(unavailable(e)),
        }
        // A copy sourced by an older build: in work-stream order.
        let state = kept.clone().info().await.map_err(unavailable)?.state.clone();
        let (mut lo, mut hi) = (state.first_sequence, state.last_sequence);
        while lo <= hi && hi > 0 {
            let mid = lo + (hi - lo) / 2;
            let m = match kept.get_raw_message(mid).await {
                Ok(m) => m,
                // Expired while we looked: everything below is gone too.
                Err(e) if e.kind() == stream::LastRawMessageErrorKind::NoMessageFound => {
                    lo = mid + 1;
                    continue;
                }
                Err(e) => return Err(unavailable(e)),
            };
            match source_seq(&m) {
                Some(s) if s == id => {
                    let until = time_ms(&m).saturating_add(self.retained_for_ms());
                    return Ok(Some((m, until)));
                }
                Some(s) if s < id => lo = mid + 1,
                _ => hi = mid.saturating_sub(1),
            }
        }
        Ok(None)
    }

    fn retained_for_ms(&self) -> u64 {
        self.inner.config.retain.map_or(0, |(age, _)| age.as_millis() as u64)
    }

    /// The kept messages `sel` covers that `dest` got (its history says
    /// delivered), oldest first; the total reported to `sel`.
    pub(crate) async fn delivered_covered(
        &self,
        dest: &str,
        sel: &Selection,
    ) -> Result<Vec<StreamMessage>, StoreError> {
        let ready = self.ready()?;
        let Some(kept) = &ready.kept else { return Ok(Vec::new()) };
        let subject = Names(&self.inner.config.stream).every_inbound();
        let mut picked = Vec::new();
        let mut from = 1;
        for _ in 0..MAX_WALK {
            let got = kept.raw_message_builder().sequence(from).next_by_subject(subject.clone()).send().await;
            let m = match got {
                Ok(m) => m,
                Err(e) if e.kind() == stream::LastRawMessageErrorKind::NoMessageFound => break,
                Err(e) => return Err(unavailable(e)),
            };
            from = m.sequence + 1;
            if m.headers.get(H_FOR).is_some() {
                continue;
            }
            let Some(id) = source_seq(&m) else { continue };
            if sel.only.is_some_and(|only| only != id) {
                continue;
            }
            if let Some(dests) = m.headers.get(H_DESTS) {
                if !dests.as_str().split(',').any(|d| d == dest) {
                    continue;
                }
            }
            let record = self.open_payload(Some(&m.headers), &m.payload)?;
            let Ok(decoded) = MessageRecord::decode(record.clone()) else { continue };
            if !sel.covers(id, decoded.received_ms) || !record_destinations(&record)?.iter().any(|d| d == dest) {
                continue;
            }
            if self.delivered_to(dest, id).await? {
                picked.push(m);
            }
        }
        sel.set_total(picked.len());
        Ok(picked)
    }

    /// Sends the kept messages `dest` got that `sel` covers to it again:
    /// each republished into the work stream for `dest` alone, keeping its
    /// id. Returns how many.
    pub async fn replay_delivered(&self, dest: &str, sel: &Selection) -> Result<usize, StoreError> {
        let started = now_ms();
        let mut sent = 0;
        for m in self.delivered_covered(dest, sel).await? {
            sel.step();
            let Some(id) = source_seq(&m) else { continue };
            // One replay of a message per destination per call: a publish
            // retried after a lost ack is stored once; a later replay is
            // a new one.
            self.republish_for(dest, id, &format!("again-{dest}-{id}-{started}"), &m).await?;
            sent += 1;
        }
        self.inner.wakers.wake(dest);
        Ok(sent)
    }
}
