//! Dead letters (the `S-dead` stream), paused destinations (the `S-state`
//! bucket) and the figures read from the server.

use std::collections::HashMap;

use async_nats::jetstream::message::StreamMessage;
use async_nats::HeaderMap;
use bytes::Bytes;
use futures_util::StreamExt;

use super::{Jet, Names, H_ATTEMPTS, H_DEAD_AT, H_FOR, H_ID, H_REASON, H_SEAL, H_STATUS, H_SUBJECT};
use crate::store::record::id_received_ms;
use crate::store::{lock, now_ms, DeadLetter, DestStats, Selection, StoreError};

/// Most dead letters one replay or purge walks through.
const MAX_WALK: usize = 1_000_000;

/// What a dead letter records besides its record and reason.
pub(super) struct Dead {
    pub id: u64,
    /// The delivered message's stream sequence.
    pub seq: u64,
    /// Its seal header (`H_SEAL`), if the record is sealed: it moves with it.
    pub seal: Option<String>,
    pub attempts: u32,
    pub status: Option<u16>,
    /// The subject it was delivered from (`S.in` or a partition's): a
    /// replay goes back there (`lanes.rs`).
    pub subject: String,
}

impl Jet {
    /// Publishes a dead letter (the record as stored, sealed or not;
    /// attempts, status, reason in headers) and waits for its ack.
    pub(super) async fn dead_letter(
        &self,
        dest: &str,
        d: &Dead,
        record: &Bytes,
        reason: &str,
    ) -> Result<(), StoreError> {
        let ready = self.ready()?;
        let mut h = HeaderMap::new();
        h.insert(async_nats::header::NATS_MESSAGE_ID, format!("dead-{dest}-{}", d.seq).as_str());
        h.insert(H_ID, d.id.to_string().as_str());
        if let Some(seal) = &d.seal {
            h.insert(H_SEAL, seal.as_str());
        }
        h.insert(H_ATTEMPTS, d.attempts.to_string().as_str());
        h.insert(H_STATUS, d.status.unwrap_or(0).to_string().as_str());
        h.insert(H_REASON, header_safe(reason).as_str());
        h.insert(H_DEAD_AT, now_ms().to_string().as_str());
        h.insert(H_SUBJECT, d.subject.as_str());
        let subject = Names(&self.inner.config.stream).dead_subject(dest);
        let ack = ready.js.publish_with_headers(subject, h, record.clone()).await.map_err(unavailable)?;
        ack.await.map_err(unavailable)?;
        Ok(())
    }

    /// Dead letters of `dest` in stream order, with their sequence in the
    /// dead-letter stream; up to `limit`.
    pub(super) async fn walk_dead(&self, dest: &str, limit: usize) -> Result<Vec<(u64, StreamMessage)>, StoreError> {
        let ready = self.ready()?;
        let subject = Names(&self.inner.config.stream).dead_subject(dest);
        let mut out = Vec::new();
        let mut from = 1;
        while out.len() < limit {
            let got = ready.dead.raw_message_builder().sequence(from).next_by_subject(subject.clone()).send().await;
            match got {
                Ok(m) => {
                    from = m.sequence + 1;
                    out.push((m.sequence, m));
                }
                Err(e) if e.kind() == async_nats::jetstream::stream::LastRawMessageErrorKind::NoMessageFound => break,
                Err(e) => return Err(unavailable(e)),
            }
        }
        Ok(out)
    }

    /// The dead letters of `dest` that `sel` covers (its total reported).
    async fn covered(&self, dest: &str, sel: &Selection) -> Result<Vec<(u64, StreamMessage)>, StoreError> {
        let all = self.walk_dead(dest, MAX_WALK).await?;
        let picked: Vec<(u64, StreamMessage)> = all
            .into_iter()
            .filter(|(_, m)| sel.covers(dead_letter_of(m).id, self.record_received_ms(m).unwrap_or(0)))
            .collect();
        sel.set_total(picked.len());
        Ok(picked)
    }

    pub async fn list_dead(&self, dest: &str, limit: usize) -> Result<Vec<DeadLetter>, StoreError> {
        Ok(self.walk_dead(dest, limit).await?.iter().map(|(_, m)| dead_letter_of(m)).collect())
    }

    /// Republishes dead letters of `dest` (all, or the one `only` names)
    /// into the stream for `dest` alone, keeping their ids, then deletes
    /// them from the dead-letter stream. Returns how many.
    pub async fn replay_dead(&self, dest: &str, sel: &Selection) -> Result<usize, StoreError> {
        let ready = self.ready()?;
        let mut moved = 0;
        for (dead_seq, m) in self.covered(dest, sel).await? {
            sel.step();
            let id = dead_letter_of(&m).id;
            self.republish_for(dest, id, &format!("replay-{dest}-{dead_seq}"), &m).await?;
            ready.dead.delete_message(dead_seq).await.map_err(unavailable)?;
            moved += 1;
        }
        self.inner.wakers.wake(dest);
        Ok(moved)
    }

    /// Publishes `m`'s record (sealed as it is) into the work stream for
    /// `dest` alone, as message `id`, and waits for the ack (`msg_id`: the
    /// publish's de-duplication id). Dead-letter and delivered replays.
    pub(super) async fn republish_for(
        &self,
        dest: &str,
        id: u64,
        msg_id: &str,
        m: &StreamMessage,
    ) -> Result<(), StoreError> {
        let ready = self.ready()?;
        let mut h = HeaderMap::new();
        h.insert(async_nats::header::NATS_MESSAGE_ID, msg_id);
        h.insert(H_ID, id.to_string().as_str());
        h.insert(H_FOR, dest);
        if let Some(seal) = m.headers.get(H_SEAL) {
            h.insert(H_SEAL, seal.as_str());
        }
        // Back to the subject (partition) it came from: a copy sourced by
        // an older build has it as its own, a kept copy and a dead letter
        // in a header of ours.
        let names = Names(&self.inner.config.stream);
        let from = if m.subject.starts_with(&names.inbound()) {
            Some(m.subject.to_string())
        } else {
            m.headers.get(H_SUBJECT).map(|v| v.as_str().to_string())
        };
        let inbound = from.filter(|s| *s == names.inbound() || s.starts_with(&format!("{}.", names.inbound())));
        let inbound = inbound.unwrap_or_else(|| names.inbound());
        let ack = ready.js.publish_with_headers(inbound, h, m.payload.clone()).await.map_err(unavailable)?;
        ack.await.map_err(unavailable)?;
        Ok(())
    }

    /// Deletes dead letters of `dest` (all, or the one `only` names).
    pub async fn purge_dead(&self, dest: &str, sel: &Selection) -> Result<usize, StoreError> {
        let ready = self.ready()?;
        let mut purged = 0;
        for (dead_seq, _) in self.covered(dest, sel).await? {
            sel.step();
            ready.dead.delete_message(dead_seq).await.map_err(unavailable)?;
            purged += 1;
        }
        Ok(purged)
    }

    pub fn paused_reason(&self, dest: &str) -> Option<String> {
        lock(&self.inner.paused).get(dest).cloned()
    }

    /// Pauses or resumes `dest` for every relay (stored in the bucket
    /// before it returns).
    pub async fn set_paused(&self, dest: &str, reason: Option<String>) -> Result<(), StoreError> {
        let state = &self.ready()?.state;
        let key = format!("paused.{dest}");
        match &reason {
            Some(r) => state.put(&key, Bytes::from(r.clone())).await.map(|_| ()).map_err(unavailable)?,
            None => state.delete(&key).await.map_err(unavailable)?,
        }
        match reason {
            Some(r) => lock(&self.inner.paused).insert(dest.to_string(), r),
            None => lock(&self.inner.paused).remove(dest),
        };
        self.inner.wakers.wake(dest);
        Ok(())
    }

    /// Reads depth and oldest pending (consumer info, and the first message
    /// past its ack floor), dead letters per destination and the stream's
    /// bytes. Failures leave the last figures.
    pub(super) async fn refresh_figures(&self) {
        let Ok(ready) = self.ready() else { return };
        let names = Names(&self.inner.config.stream);
        let mut dead: HashMap<String, usize> = HashMap::new();
        if let Ok(mut subjects) = ready.dead.info_with_subjects(names.dead_subject(">")).await {
            while let Some(Ok((subject, count))) = subjects.next().await {
                if let Some(d) = subject.rsplit('.').next() {
                    dead.insert(d.to_string(), count);
                }
            }
        }
        let mut stats = HashMap::new();
        for d in self.all_known() {
            let name = &d.name;
            let Ok((depth, floor)) = self.queue_of(name).await else { continue };
            let oldest = if depth == 0 {
                None
            } else {
                let first = ready
                    .stream
                    .raw_message_builder()
                    .sequence(floor + 1)
                    .next_by_subject(names.every_inbound())
                    .send()
                    .await;
                first.ok().map(|m| self.record_received_ms(&m).unwrap_or_else(|| id_received_ms(0)))
            };
            stats.insert(
                name.to_string(),
                DestStats { depth, oldest_received_ms: oldest, dead: dead.get(&**name).copied().unwrap_or(0) },
            );
        }
        for (d, n) in &dead {
            stats.entry(d.clone()).or_insert(DestStats { depth: 0, oldest_received_ms: None, dead: *n });
        }
        let bytes = ready.stream.get_info().await.map(|i| i.state.bytes).ok();
        let kept = match &ready.kept {
            Some(k) => k.get_info().await.map(|i| (i.state.messages, i.state.bytes)).ok(),
            None => None,
        };
        let mut f = lock(&self.inner.figures);
        if let Some(k) = kept {
            f.kept = k;
        }
        f.stats = stats;
        f.dead_dests = dead.into_keys().collect();
        if let Some(b) = bytes {
            f.stream_bytes = b;
        }
    }
}

/// The receive time a record carries.
impl Jet {
    /// `dest`'s queue over its lanes (`lanes.rs`): messages not yet
    /// acknowledged, and the lowest ack floor (a stream sequence).
    pub(super) async fn queue_of(&self, dest: &str) -> Result<(usize, u64), StoreError> {
        let ready = self.ready()?;
        let lanes = match self.known(dest) {
            Some(d) => lock(&d.lanes).clone(),
            None => Vec::new(),
        };
        let lanes = if lanes.is_empty() { vec![Names::consumer(dest)] } else { lanes };
        let (mut depth, mut floor) = (0, u64::MAX);
        for lane in lanes {
            let info = ready.stream.consumer_info(lane).await.map_err(unavailable)?;
            depth += info.num_pending as usize + info.num_ack_pending;
            floor = floor.min(info.ack_floor.stream_sequence);
        }
        Ok((depth, floor))
    }

    /// When a dead letter's callback was received (from its record, opened).
    pub(super) fn record_received_ms(&self, m: &StreamMessage) -> Option<u64> {
        let record = self.open_payload(Some(&m.headers), &m.payload).ok()?;
        crate::store::record::MessageRecord::decode(record).ok().map(|r| r.received_ms)
    }
}

fn dead_letter_of(m: &StreamMessage) -> DeadLetter {
    let h = |name: &str| m.headers.get(name).map(|v| v.as_str().to_string()).unwrap_or_default();
    DeadLetter {
        id: h(H_ID).parse().unwrap_or(0),
        attempts: h(H_ATTEMPTS).parse().unwrap_or(0),
        dead_at_ms: h(H_DEAD_AT).parse().unwrap_or(0),
        last_status: h(H_STATUS).parse().ok().filter(|s| *s != 0),
        reason: h(H_REASON),
    }
}

/// A header value cannot hold line breaks.
fn header_safe(s: &str) -> String {
    s.chars().map(|c| if c.is_control() { ' ' } else { c }).take(300).collect()
}

fn unavailable(e: impl std::fmt::Display) -> StoreError {
    StoreError::Unavailable(format!("JetStream: {e}"))
}
