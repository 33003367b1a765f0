//! Inspection on the local store: one message's deliveries (with the
//! attempts kept), and the messages of a destination in a state, by time,
//! for operators. Reads only; runs on the blocking pool.

use super::*;

impl Local {
    /// Stored messages with lookup key `key`, oldest first.
    pub fn lookup(&self, key: u64) -> Vec<u64> {
        lock(&self.inner.lookup).find(key)
    }

    /// Message `id` with each delivery's state and attempts, while it is
    /// stored (pending or dead somewhere, or retained after delivery);
    /// `None` once it is deleted.
    pub async fn inspect(&self, id: u64) -> Result<Option<Inspection>, StoreError> {
        let store = self.clone();
        blocking(move || store.inspect_now(id)).await
    }

    fn inspect_now(&self, id: u64) -> Result<Option<Inspection>, StoreError> {
        let inner = &self.inner;
        let Some((place, retained)) = self.place_of(id)? else { return Ok(None) };
        let Some(raw) = self.record_at(id, place)? else { return Ok(None) };
        let dests = record_destinations(&raw)?;
        let record = MessageRecord::decode(raw)?;
        let mut deliveries = Vec::with_capacity(dests.len());
        for d in dests {
            let key = state_key(&d, id);
            let state = match inner.state.get(&key)? {
                Some(v) => Some(StateRecord::decode(&v)?),
                None => None,
            };
            let mark = match self.done_mark(place, &d, id)? {
                Some(m) => Some(DoneMark::decode(&m)?),
                None => None,
            };
            let (state, attempts) = match (mark, state) {
                (Some(DoneMark::Purged), s) | (None, s @ Some(StateRecord::Purged)) => {
                    (DeliveryState::Purged, s.map(|s| s.history().to_vec()).unwrap_or_default())
                }
                (Some(DoneMark::Delivered(h)), _) | (None, Some(StateRecord::Done { history: h })) => {
                    (DeliveryState::Delivered { at_ms: delivered_at(&h) }, h)
                }
                (None, Some(StateRecord::Dead(r))) => {
                    let state = DeliveryState::Dead {
                        dead_at_ms: r.dead_at_ms,
                        last_status: (r.last_status != 0).then_some(r.last_status),
                        reason: r.reason,
                    };
                    (state, r.history)
                }
                (None, Some(StateRecord::Retry { due_ms, history, .. })) => {
                    (DeliveryState::Pending { due_ms }, history)
                }
                (None, None) => (DeliveryState::Pending { due_ms: id_received_ms(id) }, Vec::new()),
            };
            deliveries.push(DeliveryView { destination: d, state, attempts });
        }
        let retained_until_ms = retained.map(|r| r.finished_ms.saturating_add(inner.retain_ms));
        Ok(Some(Inspection { id, record, deliveries, retained_until_ms }))
    }

    /// The `Done` mark for `key` in the done tree(s) a message at `place`
    /// uses, if there is one (trees there are only: inspecting creates
    /// nothing).
    pub(super) fn done_mark(&self, place: Place, dest: &str, id: u64) -> Result<Option<Vec<u8>>, StoreError> {
        let segments: Vec<u64> = match place {
            Place::Log(loc) => vec![loc.seg],
            Place::Unplaced => {
                let current = self.inner.log.current();
                vec![current, current + 1]
            }
            Place::Kept(_) => vec![],
        };
        for seq in segments {
            if let Some(v) = self.inner.find_mark(seq, dest, id)? {
                return Ok(Some(v));
            }
        }
        Ok(None)
    }

    pub async fn list_messages(&self, q: &MessageQuery) -> Result<Page, StoreError> {
        let unit = 1u64 << ID_SEQ_BITS;
        let from = q.since_ms.saturating_mul(unit).max(q.after.map_or(0, |a| a.saturating_add(1)));
        let to = q.until_ms.saturating_add(1).saturating_mul(unit);
        match q.state {
            Listing::Pending => Ok(self.inner.index.pending_page(&q.destination, from, to, q.limit)),
            Listing::Dead => {
                let (store, dest, limit) = (self.clone(), q.destination.clone(), q.limit);
                blocking(move || store.dead_page(&dest, from, to, limit)).await
            }
            Listing::Delivered => {
                let (store, dest, limit) = (self.clone(), q.destination.clone(), q.limit);
                blocking(move || store.delivered_page(&dest, from, to, limit)).await
            }
        }
    }

    fn dead_page(&self, dest: &str, from: u64, to: u64, limit: usize) -> Result<Page, StoreError> {
        let mut page = Page::default();
        for item in self.inner.state.range(state_key(dest, from)..state_key(dest, to)) {
            let (k, v) = item?;
            let (_, id) = parse_state_key(&k)?;
            if !matches!(StateRecord::decode(&v)?, StateRecord::Dead(_)) {
                continue;
            }
            if page.ids.len() == limit {
                page.next = page.ids.last().copied();
                break;
            }
            page.ids.push(id);
        }
        Ok(page)
    }
}

/// When the last of `history`'s attempts ended.
fn delivered_at(history: &[Attempt]) -> Option<u64> {
    history.last().map(|a| a.at_ms.saturating_add(u64::from(a.duration_ms)))
}
