//! Listing on JetStream (`GET /api/messages?destination&state&since&until`,
//! `messages list`): no index, a walk over the stream that holds the
//! state asked for, each message checked against the history bucket
//! (`history.rs`), a page at a time:
//!
//! - **pending**: the work stream from the destination consumer's ack
//!   floor up (everything below it is settled), the messages that are the
//!   destination's (their destination list, or a replay for it) and whose
//!   history is not delivered or dead. A delivery acknowledged beyond the
//!   ack floor whose history write has not landed yet is listed as pending
//!   (history lags, it never runs ahead: `history.rs`).
//! - **delivered**: the kept stream if retention is on (`kept.rs`), else
//!   the work stream (messages another destination still holds), the
//!   messages whose history says delivered.
//! - **dead**: the dead-letter stream's subject for the destination.
//!
//! The cursor is a position in the walked stream (a stream sequence), so a
//! replay (an old id at a new position) does not break paging. A page
//! looks at most `MAX_SCAN` messages; a page cut short by it still returns
//! a cursor, so the walk goes on from there.

use async_nats::jetstream::message::StreamMessage;
use async_nats::jetstream::stream;

use super::history::Recorded;
use super::kept::source_seq;
use super::{Jet, Names, H_DESTS, H_FOR, H_ID};
use crate::store::record::record_destinations;
use crate::store::{Listing, MessageQuery, MessageRecord, Page, StoreError};

/// Most messages one page looks at.
const MAX_SCAN: usize = 20_000;

/// Most dead letters one page walks.
const MAX_DEAD: usize = 1_000_000;

fn unavailable(e: impl std::fmt::Display) -> StoreError {
    StoreError::Unavailable(format!("JetStream: listing messages: {e}"))
}

/// Where a walk reads and how it tells a message's id.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Walked {
    Work,
    Kept,
}

impl Jet {
    pub async fn list_messages(&self, q: &MessageQuery) -> Result<Page, StoreError> {
        let ready = self.ready()?;
        match q.state {
            Listing::Dead => self.dead_page(q).await,
            Listing::Pending => {
                // Below every lane's ack floor everything is settled.
                let (_, floor) = self.queue_of(&q.destination).await.map_err(unavailable)?;
                self.walk_page(&ready.stream, Walked::Work, floor + 1, q).await
            }
            Listing::Delivered => match &ready.kept {
                Some(kept) => self.walk_page(kept, Walked::Kept, 1, q).await,
                None => self.walk_page(&ready.stream, Walked::Work, 1, q).await,
            },
        }
    }

    /// A page of the messages of `stream` from sequence `from` (or past
    /// the cursor) that `q` asks for.
    async fn walk_page(
        &self,
        stream: &stream::Stream,
        walked: Walked,
        from: u64,
        q: &MessageQuery,
    ) -> Result<Page, StoreError> {
        let subject = Names(&self.inner.config.stream).every_inbound();
        let mut page = Page::default();
        let mut from = from.max(q.after.map_or(0, |a| a.saturating_add(1)));
        // Where the last listed message is: the next page goes on after it.
        let mut cursor = None;
        let mut scanned = None;
        for _ in 0..MAX_SCAN {
            let got = stream.raw_message_builder().sequence(from).next_by_subject(subject.clone()).send().await;
            let m = match got {
                Ok(m) => m,
                Err(e) if e.kind() == stream::LastRawMessageErrorKind::NoMessageFound => return Ok(page),
                Err(e) => return Err(unavailable(e)),
            };
            from = m.sequence + 1;
            scanned = Some(m.sequence);
            let Some((id, received_ms)) = self.listed(&m, walked, q).await? else { continue };
            if page.ids.len() == q.limit {
                page.next = cursor;
                return Ok(page);
            }
            page.ids.push(id);
            page.received_ms.push(received_ms);
            cursor = Some(m.sequence);
        }
        // Cut short by MAX_SCAN: the cursor says where to go on.
        page.next = scanned;
        Ok(page)
    }

    /// `m`'s id and receive time if `q` lists it.
    async fn listed(
        &self,
        m: &StreamMessage,
        walked: Walked,
        q: &MessageQuery,
    ) -> Result<Option<(u64, u64)>, StoreError> {
        let dest = q.destination.as_str();
        let replay_for = m.headers.get(H_FOR).map(|v| v.as_str().to_string());
        let id = match (walked, &replay_for) {
            // A kept replay: its original is kept too.
            (Walked::Kept, Some(_)) => return Ok(None),
            (Walked::Kept, None) => source_seq(m),
            (Walked::Work, Some(d)) if d != dest => return Ok(None),
            (Walked::Work, Some(_)) => m.headers.get(H_ID).and_then(|v| v.as_str().parse().ok()),
            (Walked::Work, None) => Some(m.sequence),
        };
        let Some(id) = id else { return Ok(None) };
        if replay_for.is_none() {
            if let Some(dests) = m.headers.get(H_DESTS) {
                if !dests.as_str().split(',').any(|d| d == dest) {
                    return Ok(None);
                }
            }
        }
        let record = self.open_payload(Some(&m.headers), &m.payload)?;
        let Ok(decoded) = MessageRecord::decode(record.clone()) else { return Ok(None) };
        if replay_for.is_none() && !record_destinations(&record)?.iter().any(|d| d == dest) {
            return Ok(None);
        }
        if decoded.received_ms < q.since_ms || decoded.received_ms > q.until_ms {
            return Ok(None);
        }
        let recorded = self.recorded(dest, id).await?;
        let wanted = match q.state {
            Listing::Pending => !matches!(recorded, Some(Recorded::Delivered | Recorded::Dead)),
            Listing::Delivered => recorded == Some(Recorded::Delivered),
            Listing::Dead => false,
        };
        Ok(wanted.then_some((id, decoded.received_ms)))
    }

    /// A page of `q.destination`'s dead letters, in dead-letter order.
    async fn dead_page(&self, q: &MessageQuery) -> Result<Page, StoreError> {
        let mut page = Page::default();
        let mut cursor = None;
        for (seq, m) in self.walk_dead(&q.destination, MAX_DEAD).await? {
            if q.after.is_some_and(|a| seq <= a) {
                continue;
            }
            let Some(id) = m.headers.get(H_ID).and_then(|v| v.as_str().parse::<u64>().ok()) else { continue };
            let received = self.record_received_ms(&m).unwrap_or(0);
            if received < q.since_ms || received > q.until_ms {
                continue;
            }
            if page.ids.len() == q.limit {
                page.next = cursor;
                return Ok(page);
            }
            page.ids.push(id);
            page.received_ms.push(received);
            cursor = Some(seq);
        }
        Ok(page)
    }
}
