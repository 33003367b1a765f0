//! Keeping delivered messages on JetStream (`store.retain_delivered`): the
//! stream `S-kept` sources the work stream, so the server copies every
//! message published there (sealed as it was published) as it arrives,
//! and expires copies after `retain_delivered` (`max_age`; `max_bytes`
//! from `retain_max_bytes` if set, oldest discarded first). The relay
//! writes nothing for it: the copy costs NATS a second stored message per
//! callback, not the relay a publish.
//!
//! A copy carries the server's `Nats-Stream-Source` header, whose second
//! field is the message's sequence in the work stream, its id. Copies are
//! in work-stream order, so a copy is found by id with a binary search over
//! the kept stream's sequences (expiry removes from the front only).
//!
//! Inspection falls back to the copy once the work stream has let the
//! message go; `messages replay D --since T` republishes the copies of
//! messages whose history (`history.rs`) says D got them, for D alone, as a
//! dead letter's replay does (`dead.rs`). Copies of replays (`H_FOR`) are
//! skipped: their original is kept too.

use std::time::Duration;

use async_nats::jetstream::message::StreamMessage;
use async_nats::jetstream::{self, stream};

use super::setup::setup_error;
use super::{Jet, Names, H_DESTS, H_FOR};
use crate::store::record::record_destinations;
use crate::store::{now_ms, MessageRecord, Selection, StoreError};

/// Most copies one replay walks through.
const MAX_WALK: usize = 1_000_000;

/// Creates `S-kept`, or brings an existing one's `max_age` and
/// `max_bytes` to the configuration's (its other settings are the
/// relay's own).
pub(super) async fn ensure_kept(
    js: &jetstream::Context,
    names: &Names<'_>,
    replicas: usize,
    max_age: Duration,
    max_bytes: Option<u64>,
) -> Result<stream::Stream, StoreError> {
    let want = stream::Config {
        name: names.kept_stream(),
        retention: stream::RetentionPolicy::Limits,
        storage: stream::StorageType::File,
        num_replicas: replicas,
        max_age,
        max_bytes: max_bytes.map_or(-1, |b| i64::try_from(b).unwrap_or(i64::MAX)),
        discard: stream::DiscardPolicy::Old,
        sources: Some(vec![stream::Source { name: names.0.to_string(), ..Default::default() }]),
        ..Default::default()
    };
    tracing::warn!(
        stream = %want.name,
        "store.retain_delivered on JetStream: a relay killed with kill -9 made NATS drop acknowledged callbacks for other destinations in our crash test (docs/jetstream.md, known problems); do not use it where a relay can crash"
    );
    let mut kept = match js.get_stream(&want.name).await {
        Ok(mut existing) => {
            let have = existing.info().await.map_err(|e| setup_error("reading the kept stream", e))?.config.clone();
            if have.num_replicas != want.num_replicas {
                return Err(StoreError::Setup(format!(
                    "stream {:?} has {} replicas; store.replicas is {}",
                    want.name, have.num_replicas, want.num_replicas
                )));
            }
            if have.max_age != want.max_age || have.max_bytes != want.max_bytes {
                tracing::info!(
                    stream = %want.name,
                    "updating the kept stream's max_age and max_bytes to store.retain_delivered and retain_max_bytes"
                );
                js.update_stream(&want).await.map_err(|e| setup_error("updating the kept stream", e))?;
            }
            existing
        }
        Err(_) => js.create_stream(want).await.map_err(|e| setup_error("creating the kept stream", e))?,
    };
    // The work stream keeps a message only for the consumers that exist
    // when it is published (Interest retention): until the server has
    // started the source's consumer, callbacks would be delivered and
    // dropped without a copy. So the relay is ready only once it has.
    // NATS sends no event for it: its stream info is polled every 100 ms,
    // for 30 s at most (then set-up fails and is retried).
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let info = kept.info().await.map_err(|e| setup_error("reading the kept stream", e))?;
        if info.sources.iter().any(|s| s.active.is_some()) {
            return Ok(kept);
        }
        if tokio::time::Instant::now() > deadline {
            return Err(setup_error(
                "the kept stream",
                "the server did not start copying from the work stream within 30s",
            ));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The work-stream sequence (the id) a kept copy was copied from.
pub(super) fn source_seq(m: &StreamMessage) -> Option<u64> {
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
    /// The kept copy of message `id`, with when it expires (unix ms);
    /// `None` if retention is off or the copy is gone.
    pub(super) async fn kept_message(&self, id: u64) -> Result<Option<(StreamMessage, u64)>, StoreError> {
        let ready = self.ready()?;
        let Some(kept) = &ready.kept else { return Ok(None) };
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
