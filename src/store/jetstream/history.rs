//! Attempt history and inspection on JetStream: one key per delivery in
//! the `S-history` bucket (`<destination>.<id>`), the last 8 attempts with
//! the delivery's state (pending with the next attempt's time, delivered,
//! dead with why), in the shared record's attempt encoding.
//!
//! **Written after the settle it records** (the ack, nak or dead letter
//! first), by a task of its own so the write does not hold the attempt's
//! slot: a relay that dies between the two leaves the history one attempt
//! behind (it says pending, or shows the previous failure), never
//! "delivered" for a delivery that was not; a retry's write that overtakes
//! the previous one's may drop that attempt from the list. Cost per
//! settle: one key write, plus one read from the second attempt on.
//! Awaiting them on the attempt's task halved JetStream fan-out (run 9).
//! Kept 7 days (the bucket's `max_age`).
//!
//! **Inspection** reads the message from the work stream by its id (its
//! sequence) and each destination's key: a message every destination is
//! done with is gone from the stream (Interest retention), so it answers
//! 404 as the local store does without retention; a dead letter whose
//! other destinations are done is listed under `dead-letters`, not here.

use bytes::Bytes;

use super::Jet;
use crate::store::record::{put_history, put_str16, read_history, record_destinations, Reader, RECORD_V1};
use crate::store::{
    now_ms, Attempt, DecodeError, DeliveryState, DeliveryView, Inspection, MessageRecord, Settle, StoreError,
};

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
    /// settle (see the module doc). A failure to write is logged, not
    /// returned: the delivery itself is settled.
    /// `first`: the delivery's first attempt, so there is no earlier
    /// history to read (most settles: one write, no read).
    pub(super) async fn record_history(&self, dest: &str, id: u64, outcome: &Settle, first: bool) {
        let Ok(ready) = self.ready() else { return };
        let k = key(dest, id);
        let mut history = if first {
            Vec::new()
        } else {
            match ready.history.get(k.clone()).await {
                Ok(Some(v)) => Kept::decode(&v).map(|k| k.history).unwrap_or_default(),
                _ => Vec::new(),
            }
        };
        let kept = match outcome {
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
        };
        if let Err(e) = ready.history.put(k, Bytes::from(kept.encode())).await {
            if let Some(also) = self.inner.history_failures_logged.admit() {
                tracing::warn!(destination = dest, error = %e, also_failed_since_last_line = also, "JetStream: could not record a delivery attempt's history");
            }
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
}
