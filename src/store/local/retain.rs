//! Keeping messages after delivery (`store.retain_delivered`): a message
//! every destination is done with stays, with each delivery's attempts,
//! for that long, so an operator can still see what happened to it, list
//! what a destination got, and send it again (to one destination).
//!
//! Nothing is copied to retain a message: its frame stays in its segment
//! (counted as live there, so the segment is kept; a kept copy stays in
//! `kept`), its `Done` marks keep the attempts, and one key under its id
//! in `retained` says when it finished and where its record is. No memory
//! per retained message, except its lookup keys when its route indexes a
//! field. The sweeper forgets retained messages past their time: the key
//! goes, the segment's count drops (an emptied segment is deleted as
//! usual), a kept copy is deleted.
//!
//! Sending a delivered message again makes it a live message once more,
//! pending for that destination: the delivery's state becomes a retry due
//! now (its attempts kept), then its `Done` mark goes, then the retained
//! key. Recovery decides from what is on disk: a message with a pending
//! delivery is live (its retained key, if still there, is dropped),
//! otherwise it is retained if its key is there.

use super::*;

impl Local {
    /// Retains message `id`, which every destination is done with (its
    /// last `Done` is written, its retry states gone); the caller holds its
    /// stripe.
    pub(super) fn retain(&self, msgs: &mut BTreeMap<u64, Msg>, id: u64, m: &Msg) -> Result<(), StoreError> {
        let inner = &self.inner;
        let place = match m.place {
            Place::Log(loc) => RetainedPlace::Log(loc),
            Place::Kept(origin) => RetainedPlace::Kept { origin: origin.map_or(0, NonZeroU64::get) },
            Place::Unplaced => RetainedPlace::Unplaced,
        };
        let record = RetainedRecord { finished_ms: now_ms(), place, len: m.len };
        inner.put_retained(id, Some(&record));
        if place == RetainedPlace::Unplaced {
            lock(&inner.retained_unplaced).insert(id);
        }
        inner.retained_count.fetch_add(1, Ordering::Relaxed);
        inner.retained_bytes.fetch_add(u64::from(m.len), Ordering::Relaxed);
        msgs.remove(&id);
        lock(&inner.cache).remove(id);
        inner.bytes.fetch_sub(u64::from(m.len), Ordering::Relaxed);
        Ok(())
    }

    /// Messages retained now.
    pub fn retained(&self) -> u64 {
        self.inner.retained_count.load(Ordering::Relaxed)
    }

    /// Bytes of the messages retained now.
    pub fn retained_bytes(&self) -> u64 {
        self.inner.retained_bytes.load(Ordering::Relaxed)
    }

    /// How long and how many bytes delivered messages are kept
    /// (`store.retain_delivered`, `store.retain_max_bytes`).
    pub fn retention(&self) -> (u64, Option<u64>) {
        (self.inner.retain_ms, self.inner.retain_max_bytes)
    }

    /// The retained record of message `id`, if it is retained.
    pub(super) fn retained_record(&self, id: u64) -> Result<Option<RetainedRecord>, StoreError> {
        self.inner.get_retained(id)
    }

    /// Forgets the retained messages past their time at `now`. Returns how
    /// many.
    pub(crate) fn sweep_retained(&self, now: u64) -> Result<usize, StoreError> {
        let inner = &self.inner;
        let retain = inner.retain_ms;
        if retain == 0 && inner.retained_count.load(Ordering::Relaxed) == 0 {
            return Ok(0);
        }
        // A message finishes after it is received: none received after the
        // horizon can be due.
        let horizon = now.saturating_sub(retain);
        let end = horizon.saturating_add(1).saturating_mul(1 << ID_SEQ_BITS);
        let mut due = Vec::new();
        for (id, r) in inner.oldest_retained(end, usize::MAX)? {
            if r.finished_ms.saturating_add(retain) <= now {
                due.push((id, r));
            }
        }
        for (id, r) in &due {
            self.forget(*id, r)?;
        }
        if !due.is_empty() {
            tracing::debug!(messages = due.len(), "forgot retained messages past store.retain_delivered");
        }
        Ok(due.len() + self.make_room()?)
    }

    /// Retention is bounded in bytes and yields to new callbacks: above
    /// `retain_max_bytes` the oldest retained messages are forgotten until
    /// it holds; while the filesystem has less than twice
    /// `min_free_bytes` free (ingress refuses below once), the oldest are
    /// forgotten before their time, a tenth of them (at least 1,000) per
    /// sweep. Returns how many.
    fn make_room(&self) -> Result<usize, StoreError> {
        let inner = &self.inner;
        let mut forgotten = 0;
        if let Some(max) = inner.retain_max_bytes {
            let before = inner.retained_bytes.load(Ordering::Relaxed);
            if before > max {
                let mut oldest = Vec::new();
                let mut over = before - max;
                let count = inner.retained_count.load(Ordering::Relaxed) as usize;
                for (id, r) in inner.oldest_retained(u64::MAX, count.max(1))? {
                    over = over.saturating_sub(u64::from(r.len).max(1));
                    oldest.push((id, r));
                    if over == 0 {
                        break;
                    }
                }
                for (id, r) in &oldest {
                    self.forget(*id, r)?;
                }
                tracing::info!(
                    messages = oldest.len(),
                    retained_bytes = before,
                    retain_max_bytes = max,
                    "forgot the oldest retained messages before store.retain_delivered: store.retain_max_bytes reached"
                );
                forgotten += oldest.len();
            }
        }
        let Some(min) = inner.min_free_bytes else { return Ok(forgotten) };
        let free = self.free_bytes();
        if free >= min.saturating_mul(2) || inner.retained_count.load(Ordering::Relaxed) == 0 {
            return Ok(forgotten);
        }
        let batch = (inner.retained_count.load(Ordering::Relaxed) / 10).max(1000) as usize;
        let mut oldest = Vec::with_capacity(batch.min(100_000));
        oldest.extend(inner.oldest_retained(u64::MAX, batch)?);
        for (id, r) in &oldest {
            self.forget(*id, r)?;
        }
        tracing::warn!(
            messages = oldest.len(),
            free_bytes = free,
            min_free_bytes = min,
            "disk nearly full: forgot the oldest retained messages before store.retain_delivered"
        );
        Ok(forgotten + oldest.len())
    }

    /// Forgets retained message `id` (its record as read: `r`).
    fn forget(&self, id: u64, r: &RetainedRecord) -> Result<(), StoreError> {
        let inner = &self.inner;
        let msgs = lock(self.stripe(id));
        // Sent again meanwhile, or forgotten already.
        if msgs.contains_key(&id) || self.retained_record(id)?.as_ref() != Some(r) {
            return Ok(());
        }
        match r.place {
            RetainedPlace::Kept { origin } => self.drop_kept(id, Some(origin))?,
            RetainedPlace::Log(_) => {}
            RetainedPlace::Unplaced => {
                // Still unplaced: its flush releases its segment.
                lock(&inner.retained_unplaced).remove(&id);
            }
        }
        inner.put_retained(id, None);
        if let RetainedPlace::Log(loc) = r.place {
            inner.segment_released(loc.seg);
        }
        drop(msgs);
        inner.retained_count.fetch_sub(1, Ordering::Relaxed);
        inner.unretained(r);
        let mut lookup = lock(&inner.lookup);
        if !lookup.is_empty() {
            lookup.remove(id);
        }
        Ok(())
    }

    /// Where the record of stored message `id` is: live, or retained.
    pub(super) fn place_of(&self, id: u64) -> Result<Option<(Place, Option<RetainedRecord>)>, StoreError> {
        let msgs = lock(self.stripe(id));
        self.place_in(&msgs, id)
    }

    /// [`Local::place_of`] with message `id`'s stripe (`msgs`) held.
    fn place_in(
        &self,
        msgs: &BTreeMap<u64, Msg>,
        id: u64,
    ) -> Result<Option<(Place, Option<RetainedRecord>)>, StoreError> {
        if let Some(place) = msgs.get(&id).map(|m| m.place) {
            return Ok(Some((place, None)));
        }
        let Some(r) = self.retained_record(id)? else { return Ok(None) };
        let place = match r.place {
            RetainedPlace::Log(loc) => Place::Log(loc),
            RetainedPlace::Kept { origin } => Place::Kept(NonZeroU64::new(origin)),
            RetainedPlace::Unplaced => Place::Unplaced,
        };
        Ok(Some((place, Some(r))))
    }

    /// How `dest`'s delivery of message `id` (at `place`) ended, if it did.
    pub(super) fn ending(&self, dest: &str, id: u64, place: Place) -> Result<Option<DoneMark>, StoreError> {
        let key = state_key(dest, id);
        if let Some(mark) = self.done_mark(place, dest, id)? {
            return Ok(Some(DoneMark::decode(&mark)?));
        }
        Ok(match self.inner.state.get(&key)? {
            Some(v) => match StateRecord::decode(&v)? {
                StateRecord::Done { history } => Some(DoneMark::Delivered(history)),
                StateRecord::Purged => Some(DoneMark::Purged),
                _ => None,
            },
            None => None,
        })
    }

    /// Up to `limit` stored messages (live or retained) received in
    /// `from..to` (ids) that `dest` got, oldest first: from the done trees
    /// of the segments there are (a range of each), and kept copies'
    /// `Done`s in `state`.
    pub(super) fn delivered_page(&self, dest: &str, from: u64, to: u64, limit: usize) -> Result<Page, StoreError> {
        let inner = &self.inner;
        let range = state_key(dest, from)..state_key(dest, to);
        let mut found: BTreeSet<u64> = BTreeSet::new();
        // The marks waiting for a flush are read with the rest.
        inner.write_marks()?;
        // Segments hold ids in order (ids are taken in log order): once a
        // page is full, later segments cannot add to it.
        let trees: Vec<sled::Tree> = lock(&inner.done_trees).values().cloned().collect();
        for tree in trees {
            if found.len() > limit {
                break;
            }
            let delivered = |v: &[u8]| Ok(matches!(DoneMark::decode(v)?, DoneMark::Delivered(_)));
            let marks = inner.marks_in(&tree, dest, from, to)?;
            self.take_stored(marks.into_iter().map(Ok), delivered, limit, &mut found)?;
        }
        // Kept copies' marks, any id.
        let delivered = |v: &[u8]| Ok(matches!(StateRecord::decode(v)?, StateRecord::Done { .. }));
        let kept = inner.state.range(range).map(|item| -> Result<(u64, Vec<u8>), StoreError> {
            let (k, v) = item?;
            Ok((parse_state_key(&k)?.1, v.to_vec()))
        });
        self.take_stored(kept, delivered, limit, &mut found)?;
        let mut page = Page { ids: found.into_iter().take(limit + 1).collect(), ..Page::default() };
        if page.ids.len() > limit {
            page.ids.truncate(limit);
            page.next = page.ids.last().copied();
        }
        Ok(page)
    }

    /// Adds to `found` the first `limit + 1` ids of `marks` (in id order)
    /// whose value says `delivered` and whose message is still stored (all
    /// a page can take from that source).
    fn take_stored(
        &self,
        marks: impl Iterator<Item = Result<(u64, Vec<u8>), StoreError>>,
        delivered: impl Fn(&[u8]) -> Result<bool, StoreError>,
        limit: usize,
        found: &mut BTreeSet<u64>,
    ) -> Result<(), StoreError> {
        let mut n = 0;
        for item in marks {
            let (id, v) = item?;
            if !delivered(&v)? {
                continue;
            }
            if self.place_of(id)?.is_none() {
                continue; // done everywhere, not retained: its segment is not deleted yet
            }
            found.insert(id);
            n += 1;
            if n > limit {
                break;
            }
        }
        Ok(())
    }

    /// Sends the stored messages `dest` got that `sel` covers to it again:
    /// each becomes pending there, due now (its attempts kept), through
    /// its queue like any delivery. Returns how many.
    pub async fn replay_delivered(&self, dest: &str, sel: &Selection) -> Result<usize, StoreError> {
        let (name, sel) = (dest.to_string(), sel.clone());
        self.operator_action(move |store| store.replay_delivered_now(&name, &sel)).await
    }

    /// The delivered messages of `dest` an operation covers.
    pub(in crate::store) fn delivered_ids(&self, dest: &str, sel: &Selection) -> Result<Vec<u64>, StoreError> {
        let unit = 1u64 << ID_SEQ_BITS;
        let ids = match sel.only {
            Some(id) => match self.place_of(id)? {
                Some((place, _)) if matches!(self.ending(dest, id, place)?, Some(DoneMark::Delivered(_))) => vec![id],
                _ => vec![],
            },
            None => {
                let from = sel.since_ms.saturating_mul(unit);
                let to = sel.until_ms.map_or(u64::MAX, |u| u.saturating_add(1).saturating_mul(unit));
                self.delivered_page(dest, from, to, usize::MAX - 1)?.ids
            }
        };
        let ids: Vec<u64> = ids.into_iter().filter(|id| sel.covers(*id, id_received_ms(*id))).collect();
        sel.set_total(ids.len());
        Ok(ids)
    }

    pub(super) fn replay_delivered_now(&self, dest: &str, sel: &Selection) -> Result<usize, StoreError> {
        let ids = self.delivered_ids(dest, sel)?;
        let mut moved = 0;
        for id in ids {
            sel.step();
            if self.send_again(dest, id)? {
                moved += 1;
            }
        }
        Ok(moved)
    }

    /// Makes `dest`'s delivery of stored message `id` pending again, due
    /// now, if `dest` got it. Returns whether it did.
    fn send_again(&self, dest: &str, id: u64) -> Result<bool, StoreError> {
        let inner = &self.inner;
        let mut msgs = lock(self.stripe(id));
        let Some((place, retained)) = self.place_in(&msgs, id)? else { return Ok(false) };
        // Not flushed yet (a millisecond's window): nothing to read it from.
        if place == Place::Unplaced && retained.is_some() {
            return Ok(false);
        }
        let Some(DoneMark::Delivered(history)) = self.ending(dest, id, place)? else { return Ok(false) };
        let Some(raw) = self.record_at(id, place)? else { return Ok(false) };
        let now = now_ms();
        let key = state_key(dest, id);
        // 1. The retry state (a `Done` mark still wins over it at open).
        let st = StateRecord::Retry { due_ms: now, record: QueueRecord::default(), history };
        inner.state.insert(&key, st.encode())?;
        // 2. The mark goes: pending from here on (a kept copy's was the key
        // just written).
        let trees: Vec<u64> = match place {
            Place::Log(loc) => vec![loc.seg],
            Place::Unplaced => vec![inner.log.current(), inner.log.current() + 1],
            Place::Kept(_) => vec![],
        };
        for seq in trees {
            inner.remove_mark(seq, dest, id)?;
        }
        // 3. No longer retained.
        if retained.is_some() {
            inner.put_retained(id, None);
        }
        let written = Written::queued();
        inner.sled_written();
        match msgs.get_mut(&id) {
            Some(m) => {
                m.pending += 1;
                m.has_state = true;
            }
            None => {
                let len = recover::record_len(raw.len())?;
                msgs.insert(id, Msg { place, len, has_state: true, pending: 1, dead: 0 });
                inner.bytes.fetch_add(u64::from(len), Ordering::Relaxed);
                inner.retained_count.fetch_sub(1, Ordering::Relaxed);
                if let Some(r) = &retained {
                    inner.unretained(r);
                }
            }
        }
        drop(msgs);
        let marks = record_marks(&raw)?;
        let order_key = marks.order.iter().find(|(d, _)| d == dest).map(|(_, k)| *k);
        inner.index.requeued(dest, id, now, order_key, &written);
        Ok(true)
    }
}

impl Inner {
    /// `r`'s bytes no longer count as retained.
    fn unretained(&self, r: &RetainedRecord) {
        let len = u64::from(r.len);
        let _ = self.retained_bytes.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |b| Some(b.saturating_sub(len)));
    }

    /// The flush placed message `id`, settled before it: if it is retained,
    /// its record now says where it is, and it holds its segment (true).
    /// The caller holds its stripe.
    pub(super) fn placed_retained(&self, id: u64, loc: segments::Loc) -> bool {
        if self.retain_ms == 0 || !lock(&self.retained_unplaced).remove(&id) {
            return false;
        }
        let placed = || -> Result<bool, StoreError> {
            let Some(mut r) = self.get_retained(id)? else { return Ok(false) };
            r.place = RetainedPlace::Log(loc);
            self.put_retained(id, Some(&r));
            Ok(true)
        };
        match placed() {
            Ok(held) => held,
            Err(e) => {
                // Recovery places it from the log at the next start.
                tracing::warn!(error = %e, "could not record where a retained message is");
                false
            }
        }
    }
}
