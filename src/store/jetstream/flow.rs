//! Publishing (ingress), pulling and settling (delivery).

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::{self, AckKind};
use async_nats::HeaderMap;
use bytes::Bytes;
use futures_util::StreamExt;

use super::{Dest, Jet, Names, H_DESTS, H_FOR, H_ID, H_SEAL};
use crate::store::record::{record_destinations, Draft, MessageRecord, QueueRecord};
use crate::store::{lock, now_ms, Due, Handle, Lease, Settle, StoreError};

/// How long one pull request waits for messages on the server.
const PULL_EXPIRES: Duration = Duration::from_secs(1);
/// How much longer the relay waits for that request's end before it
/// takes the server (or the route to it) for gone.
const PULL_GRACE: Duration = Duration::from_secs(2);

/// Room left in `max_payload` for the headers we add to a record.
pub(super) const HEADER_ROOM: u64 = 512;

/// A message to publish (built by `append_draft`, published by `durable`).
pub(crate) struct Publish {
    record: Bytes,
    /// The callback's de-duplication key, if its route has one.
    dedupe: Option<([u8; 16], Duration)>,
    /// Its lookup keys (`lookup.rs`) and when it was received.
    index: Vec<u64>,
    received_ms: u64,
    /// Its ordering partition (`lanes.rs`), if it has a key.
    partition: Option<u64>,
}

impl Jet {
    /// Builds the message; nothing is sent until [`Jet::durable`].
    pub fn append_draft(
        &self,
        draft: Draft,
        _destinations: &[Arc<str>],
        marks: crate::store::Marks<'_>,
    ) -> Result<Publish, StoreError> {
        let dedupe = marks.dedupe.map(|key| (key, marks.dedupe_window));
        let partition = self.partition(marks.order);
        let received_ms = draft.received_ms();
        let record = draft.into_record();
        self.accepting(record.len() as u64 + HEADER_ROOM)?;
        Ok(Publish { record, dedupe, index: marks.index.to_vec(), received_ms, partition })
    }

    /// Publishes and waits for the stream's acknowledgement (on a quorum
    /// for `replicas = 3`), at most `publish_timeout`; a publish whose ack
    /// did not come is sent once more with the same `Nats-Msg-Id` (the
    /// stream stores it once). Then, for a de-duplicating route, the key
    /// is stored too (its ack awaited) before the callback is acknowledged.
    pub async fn durable(&self, p: Publish) -> Result<u64, StoreError> {
        let ready = self.ready()?;
        let names = Names(&self.inner.config.stream);
        let mut headers = HeaderMap::new();
        headers.insert(async_nats::header::NATS_MESSAGE_ID, format!("{:032x}", rand::random::<u128>()).as_str());
        let payload = match &self.inner.config.sealer {
            Some(sealer) => {
                let seal = rand::random::<u64>();
                headers.insert(H_SEAL, seal.to_string().as_str());
                headers.insert(H_DESTS, record_destinations(&p.record)?.join(",").as_str());
                Bytes::from(sealer.seal(seal, &p.record)?)
            }
            None => p.record.clone(),
        };
        let subject = match p.partition {
            Some(n) => names.lane_subject(n),
            None => names.inbound(),
        };
        let timeout = self.inner.config.publish_timeout;
        let deadline = tokio::time::Instant::now() + timeout;
        let mut last = String::new();
        for _ in 0..2 {
            let sent = tokio::time::timeout_at(
                deadline,
                ready.js.publish_with_headers(subject.clone(), headers.clone(), payload.clone()),
            )
            .await;
            let ack = match sent {
                Err(_) => break,
                Ok(Err(e)) if e.kind() == jetstream::context::PublishErrorKind::MaxPayloadExceeded => {
                    return Err(StoreError::TooLarge(p.record.len()));
                }
                Ok(Err(e)) => {
                    last = e.to_string();
                    continue;
                }
                Ok(Ok(ack)) => ack,
            };
            match tokio::time::timeout_at(deadline, ack).await {
                Err(_) => break,
                Ok(Err(e)) => last = e.to_string(),
                Ok(Ok(ack)) => {
                    if self.inner.publish_failures.swap(0, Ordering::Relaxed) > 0 {
                        tracing::info!("JetStream publishes succeed again");
                    }
                    // Stored: its copy is kept whatever happens next.
                    self.keep(ack.sequence, &subject, &headers, &payload);
                    if let Some((key, window)) = p.dedupe {
                        self.remember(&key, window, ack.sequence).await?;
                    }
                    if !p.index.is_empty() {
                        self.index(ack.sequence, p.received_ms, &p.index).await;
                    }
                    return Ok(ack.sequence);
                }
            }
        }
        if last.is_empty() {
            last = format!("no acknowledgement within {}", humantime::format_duration(timeout));
        }
        let failed = self.inner.publish_failures.fetch_add(1, Ordering::Relaxed);
        self.inner.last_publish_failure_ms.store(now_ms(), Ordering::Relaxed);
        self.leave_a_silent_server(&ready.client, failed + 1);
        if failed == 0 {
            tracing::warn!(error = %last, "JetStream publish failed: callbacks are refused (503) until publishes succeed");
        }
        Err(StoreError::Unavailable(format!("JetStream publish failed: {last}")))
    }

    /// Publishes failing in a row while the connection stands: the server
    /// takes them but no quorum answers (a node cut off from its cluster
    /// by a partition, or one whose stream peers are gone). Its clients'
    /// pings still succeed, so the client would stay for the partition's
    /// whole length, refusing every callback while the rest of the cluster
    /// may have a quorum. After three failures in a row, at most once per
    /// two `publish_timeout`s, reconnect to another server
    /// (`setup::another_server`).
    fn leave_a_silent_server(&self, client: &async_nats::Client, in_a_row: u64) {
        if in_a_row < 3 || client.connection_state() != async_nats::connection::State::Connected {
            return;
        }
        let now = now_ms();
        let gap = 2 * self.inner.config.publish_timeout.as_millis() as u64;
        let last = self.inner.last_switch_ms.load(Ordering::Relaxed);
        if now.saturating_sub(last) < gap
            || self.inner.last_switch_ms.compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed).is_err()
        {
            return;
        }
        let info = client.server_info();
        tracing::warn!(
            server = %format!("{}:{}", info.host, info.port),
            failed_in_a_row = in_a_row,
            "NATS server takes publishes but does not acknowledge them; reconnecting to another server"
        );
        let client = client.clone();
        self.inner.tasks.spawn(async move {
            if let Err(e) = client.force_reconnect().await {
                tracing::debug!(error = %e, "forced reconnect not sent");
            }
        });
    }

    /// The bucket of a route's de-duplication `window`.
    fn dedupe_bucket(&self, window: Duration) -> Result<Option<&async_nats::jetstream::kv::Store>, StoreError> {
        Ok(self.ready()?.dedupe.iter().find(|(w, _)| *w == window).map(|(_, b)| b))
    }

    /// Stores a de-duplication key with the message it belongs to, in its
    /// window's bucket (the server forgets it when the window is over).
    async fn remember(&self, key: &[u8; 16], window: Duration, seq: u64) -> Result<(), StoreError> {
        let Some(bucket) = self.dedupe_bucket(window)? else { return Ok(()) };
        bucket
            .put(hex(key), Bytes::from(seq.to_be_bytes().to_vec()))
            .await
            .map(|_| ())
            .map_err(|e| StoreError::Unavailable(format!("JetStream: storing the de-duplication key: {e}")))
    }

    /// The message a de-duplication key was stored with within `window`:
    /// whatever its window's bucket still holds (no clock is compared here:
    /// a relay an hour behind or ahead of the one that stored the key
    /// answers the same).
    pub async fn duplicate(&self, key: &[u8; 16], window: Duration) -> Result<Option<u64>, StoreError> {
        let Some(bucket) = self.dedupe_bucket(window)? else { return Ok(None) };
        let found = bucket
            .get(hex(key))
            .await
            .map_err(|e| StoreError::Unavailable(format!("JetStream: reading a de-duplication key: {e}")))?;
        Ok(found.filter(|v| v.len() >= 8).map(|v| be_u64(&v[..8])))
    }

    /// Up to `limit` pulled messages of `dest` for its worker.
    pub fn due(&self, dest: &str, limit: usize) -> Due {
        let Some(d) = self.dest(dest) else { return Due::default() };
        let mut waiting = lock(&d.waiting);
        let n = limit.min(waiting.len());
        let leases: Vec<Lease> = waiting.drain(..n).collect();
        Due { leases, next_due_ms: waiting.front().map(|l| l.due_ms) }
    }

    /// The message of `lease`, from the held delivery.
    pub async fn fetch(&self, lease: &Lease) -> Result<Option<MessageRecord>, StoreError> {
        let Handle::Jet(seq) = lease.handle else { return Ok(None) };
        let Some(d) = self.dest(&lease.dest) else { return Ok(None) };
        let held = lock(&d.held).get(&seq).map(|m| (m.headers.clone(), m.payload.clone()));
        match held {
            None => Ok(None),
            Some((headers, p)) => Ok(Some(MessageRecord::decode(self.open_payload(headers.as_ref(), &p)?)?)),
        }
    }

    /// How old `lease`'s message is (for `max_age`): by the server's clock
    /// (`clock.rs`), so the clock of the relay that took it does not
    /// count; a replay (stored again, keeping its id) by `received_ms`.
    pub fn age_ms(&self, lease: &Lease, received_ms: u64, now: u64) -> u64 {
        let by_record = now.saturating_sub(received_ms);
        let Handle::Jet(seq) = lease.handle else { return by_record };
        let Some(d) = self.dest(&lease.dest) else { return by_record };
        let stored = {
            let held = lock(&d.held);
            let Some(m) = held.get(&seq) else { return by_record };
            if m.headers.as_ref().is_some_and(|h| h.get(H_ID).is_some()) {
                return by_record;
            }
            match m.info() {
                Ok(info) => super::clock::stored_ms(&info),
                Err(_) => return by_record,
            }
        };
        self.inner.server_clock.age_ms(now, stored)
    }

    /// Delivered: ack. Retry: nak with the delay until `at_ms`. Dead: the
    /// record into the dead-letter stream (its ack awaited), then ack.
    pub async fn settle(&self, lease: &Lease, outcome: Settle) -> Result<(), StoreError> {
        let Handle::Jet(seq) = lease.handle else { return Ok(()) };
        let Some(d) = self.dest(&lease.dest) else { return Ok(()) };
        let Some(msg) = lock(&d.held).remove(&seq) else { return Ok(()) };
        d.room.notify_one();
        let acked = match &outcome {
            Settle::Delivered { .. } => msg.ack().await,
            Settle::Retry { at_ms, .. } => {
                msg.ack_with(AckKind::Nak(Some(Duration::from_millis(at_ms.saturating_sub(now_ms()))))).await
            }
            Settle::Dead { status, reason, .. } => {
                let attempts = lease.record.attempts.saturating_add(1);
                let seal = msg.headers.as_ref().and_then(|h| h.get(H_SEAL)).map(|v| v.as_str().to_string());
                let subject = msg.subject.to_string();
                let dead = super::dead::Dead { id: lease.id, seq, seal, attempts, status: *status, subject };
                self.dead_letter(&lease.dest, &dead, &msg.payload, reason).await?;
                msg.ack().await
            }
        };
        acked.map_err(|e| StoreError::Unavailable(format!("JetStream: acknowledging a delivery: {e}")))?;
        // After the settle, off the attempt's slot: a crash in between
        // leaves the history behind, never ahead (`history.rs`).
        let (me, dest, id, first) = (self.clone(), lease.dest.clone(), lease.id, lease.attempts() == 0);
        self.inner.tasks.spawn(async move { me.record_history(&dest, id, &outcome, first).await });
        Ok(())
    }

    /// Keeps up to `cap` messages of `dest` pulled and held from `lane`
    /// (a lane of one message at a time asks for one: the server holds
    /// the rest of its partition until that one is acknowledged).
    pub(super) async fn pull(&self, d: Arc<Dest>, lane: super::lanes::Lane) {
        let stop = &d.stop;
        let consumer = lane.consumer;
        let mut failing = false;
        loop {
            let room = d.room.notified();
            tokio::pin!(room);
            room.as_mut().enable();
            let held = lock(&d.held).len();
            if held >= d.cap && !lane.single {
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = room => continue,
                }
            }
            let most = if lane.single { 1 } else { d.cap - held };
            let batch = consumer.batch().max_messages(most).expires(PULL_EXPIRES).messages().await;
            let mut batch = match batch {
                Ok(b) => b,
                Err(e) => {
                    if !failing {
                        tracing::warn!(destination = %d.name, consumer = %lane.name, error = %e, "pulling from JetStream failed; retrying");
                        failing = true;
                    }
                    tokio::select! {
                        _ = stop.cancelled() => return,
                        // A pause before the next pull, not a synchronisation.
                        _ = tokio::time::sleep(Duration::from_millis(500)) => continue,
                    }
                }
            };
            loop {
                // A pull whose server died never ends by itself (no status
                // comes back): give up on it past its expiry, and pull anew.
                let next = tokio::select! {
                    _ = stop.cancelled() => return,
                    m = tokio::time::timeout(PULL_EXPIRES + PULL_GRACE, batch.next()) => m,
                };
                let Ok(next) = next else {
                    tracing::debug!(destination = %d.name, "pull request not answered; pulling again");
                    break;
                };
                match next {
                    None => break,
                    Some(Ok(msg)) => {
                        failing = false;
                        self.take(&d, msg).await;
                    }
                    Some(Err(e)) => {
                        tracing::debug!(destination = %d.name, error = %e, "pull batch ended");
                        break;
                    }
                }
            }
        }
    }

    /// A pulled message: held for the worker if it is for this
    /// destination, acknowledged at once if not.
    async fn take(&self, d: &Dest, msg: jetstream::Message) {
        let Ok(info) = msg.info() else { return };
        let (seq, delivered) = (info.stream_sequence, info.delivered);
        if delivered == 1 {
            self.inner.server_clock.observe(now_ms(), super::clock::stored_ms(&info));
        }
        let headers = msg.headers.clone().unwrap_or_default();
        let for_me = match (headers.get(H_FOR), headers.get(H_DESTS)) {
            (Some(only), _) => only.as_str() == &*d.name,
            (None, Some(list)) => list.as_str().split(',').any(|n| n == &*d.name),
            (None, None) => {
                match self.open_payload(Some(&headers), &msg.payload).and_then(|r| Ok(record_destinations(&r)?)) {
                    Ok(list) => list.iter().any(|n| n.as_str() == &*d.name),
                    Err(e) => {
                        tracing::error!(destination = %d.name, seq, error = %e, "a message in the stream is not a switchboard record; dropped it");
                        let _ = msg.ack_with(AckKind::Term).await;
                        return;
                    }
                }
            }
        };
        if !for_me {
            let _ = msg.ack().await;
            return;
        }
        let id = headers.get(H_ID).and_then(|v| v.as_str().parse().ok()).unwrap_or(seq);
        let record =
            QueueRecord { attempts: u32::try_from(delivered.saturating_sub(1)).unwrap_or(0), ..Default::default() };
        let lease = Lease { dest: d.name.clone(), id, due_ms: now_ms(), record, handle: Handle::Jet(seq) };
        lock(&d.held).insert(seq, msg);
        lock(&d.waiting).push_back(lease);
        self.inner.wakers.wake(&d.name);
    }

    /// Renews the leases of held messages every third of `ack_wait`, so
    /// waiting for a slot, a token or a closed breaker, or a long attempt,
    /// never lets the server give the message to another relay meanwhile.
    pub(super) async fn renew_leases(&self) {
        let every = self.inner.config.ack_wait / 3;
        loop {
            tokio::select! {
                _ = self.inner.stop.cancelled() => return,
                _ = tokio::time::sleep(every) => {}
            }
            for d in self.dests() {
                let held: Vec<jetstream::Message> = lock(&d.held).values().cloned().collect();
                for m in held {
                    let _ = m.ack_with(AckKind::Progress).await;
                }
            }
        }
    }
}

fn hex(key: &[u8]) -> String {
    key.iter().map(|b| format!("{b:02x}")).collect()
}

fn be_u64(b: &[u8]) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[..8]);
    u64::from_be_bytes(a)
}
