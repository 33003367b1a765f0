//! Settling deliveries: reading a lease's message, and recording what became
//! of an attempt (delivered, retry at, dead letter), keeping a message in
//! sled (a dead letter's, or the last few of a sparse segment), dropping an
//! orphaned lease. Each change writes first (one sled insert, or the copy
//! into `kept`) and updates the in-memory index only after the write
//! succeeded, under the message's stripe lock.

use super::*;

impl Local {
    /// The message `id`, if it is still stored.
    /// The message of `lease`. From the record cache when it is there (most
    /// deliveries); otherwise read from disk on the blocking pool, never on
    /// a runtime thread. `None` when the message is gone (it cannot be, in an
    /// undamaged store): the lease is then dropped, so it cannot wedge its
    /// destination.
    pub async fn fetch(&self, lease: &Lease) -> Result<Option<MessageRecord>, StoreError> {
        let cached = lock(&self.inner.cache).get(lease.id);
        if let Some(raw) = cached {
            return Ok(Some(MessageRecord::decode(raw)?));
        }
        // A record in the log is read back in a batch with others
        // (`reads.rs`); a kept copy (sled), or a message that is gone, here.
        let place = lock(self.stripe(lease.id)).get(&lease.id).map(|m| m.place);
        if let Some(Place::Log(loc)) = place {
            return Ok(Some(MessageRecord::decode(self.read_back(lease.id, loc).await?)?));
        }
        let (store, lease) = (self.clone(), lease.clone());
        blocking(move || {
            let found = store.load(lease.id)?;
            if found.is_none() {
                store.drop_orphan(&lease.dest, &lease)?;
            }
            Ok(found)
        })
        .await
    }

    /// Records what became of `lease`'s attempt: one state change, not
    /// waited for (a crash before sled's next flush repeats the delivery,
    /// never loses it). A dead letter first copies its message into sled (a
    /// read and a few writes), on the blocking pool.
    pub async fn settle(&self, lease: &Lease, outcome: Settle) -> Result<(), StoreError> {
        let attempts = lease.record.attempts.saturating_add(1);
        match outcome {
            Settle::Delivered { attempt } => self.delivered(&lease.dest, lease, attempt),
            Settle::Retry { at_ms, status, error, attempt } => {
                let record = QueueRecord { attempts, last_status: status.unwrap_or(0), last_error: error };
                self.reschedule(&lease.dest, lease, at_ms, &record, attempt)
            }
            Settle::Dead { status, reason, attempt } => {
                let history = vec![attempt];
                let record =
                    DeadRecord { attempts, dead_at_ms: now_ms(), last_status: status.unwrap_or(0), reason, history };
                let (store, lease) = (self.clone(), lease.clone());
                blocking(move || store.dead_letter(&lease.dest, &lease, &record)).await
            }
        }
    }

    /// The stripe of `lease`'s message, locked, if the lease is still
    /// current (every settling change starts here: under the stripe lock, a
    /// replay or purge cannot move the delivery meanwhile).
    fn leased(&self, dest: &str, lease: &Lease) -> Option<std::sync::MutexGuard<'_, BTreeMap<u64, Msg>>> {
        let msgs = lock(self.stripe(lease.id));
        self.is_current(dest, lease).then_some(msgs)
    }

    /// Whether `lease` is still pending as leased (not settled or moved since).
    pub(super) fn is_current(&self, dest: &str, lease: &Lease) -> bool {
        debug_assert_eq!(dest, &*lease.dest);
        self.inner.index.is_current(lease)
    }

    /// The stored bytes of message `id`'s record, if it is live.
    pub(super) fn record_bytes(&self, id: u64) -> Result<Option<Bytes>, StoreError> {
        let Some(place) = lock(self.stripe(id)).get(&id).map(|m| m.place) else { return Ok(None) };
        self.record_at(id, place)
    }

    /// The record of message `id`, which is at `place` (the caller may hold
    /// its stripe).
    pub(super) fn record_at(&self, id: u64, place: Place) -> Result<Option<Bytes>, StoreError> {
        if let Some(r) = lock(&self.inner.cache).get(id) {
            return Ok(Some(r));
        }
        match place {
            Place::Log(loc) => Ok(Some(self.inner.log.read(id, loc)?)),
            Place::Kept(_) => match self.inner.kept.get(id_key(id))? {
                Some(v) => Ok(Some(Bytes::from(seal::Sealer::open(self.inner.sealer.as_deref(), id, &v)?))),
                None => Ok(None),
            },
            // Placement and eviction happen in that order, under the flusher.
            Place::Unplaced => Ok(lock(&self.inner.cache).get(id)),
        }
    }

    pub(super) fn load(&self, id: u64) -> Result<Option<MessageRecord>, StoreError> {
        match self.record_bytes(id)? {
            Some(raw) => Ok(Some(MessageRecord::decode(raw)?)),
            None => Ok(None),
        }
    }

    /// Settles one of message `id`'s deliveries to `dest` for good, as
    /// `ending` says (delivered with its attempts, or a purged dead letter).
    /// The caller holds the stripe.
    ///
    /// A message with a frame in the log gets its `Done` in that segment's
    /// done tree, which is dropped with the segment (one operation, not a
    /// removal per key). A kept copy's `Done` is in `state`; when nothing
    /// needs it any more, its `Done`s move to its original's done tree (if
    /// that segment is still there), then the copy and its `state` keys go.
    /// With `retain_delivered`, a message nothing needs is retained instead
    /// (`retain.rs`): its record, marks and copy stay until it is forgotten.
    /// A crash between any two steps leaves a `Done` in place or keys of a
    /// message that is nowhere (removed at open), never a pending delivery.
    pub(super) fn finish(
        &self,
        msgs: &mut BTreeMap<u64, Msg>,
        dest: &str,
        id: u64,
        ending: DoneMark,
    ) -> Result<(), StoreError> {
        let inner = &self.inner;
        let Some(m) = msgs.get(&id).cloned() else { return Ok(()) };
        let dead = ending == DoneMark::Purged;
        let (pending, dead_left) =
            if dead { (m.pending, m.dead.saturating_sub(1)) } else { (m.pending.saturating_sub(1), m.dead) };
        let finished = pending + dead_left == 0;
        let retain = finished && inner.retain_ms > 0;
        let key = state_key(dest, id);
        match m.place {
            // Written with the next sled flush (`marks.rs`).
            Place::Log(loc) => inner.mark_done(loc.seg, key, ending.encode()),
            // Its frame lands in the segment being written or the next one.
            Place::Unplaced => {
                let current = inner.log.current();
                let mark = ending.encode();
                inner.mark_done(current, key.clone(), mark.clone());
                inner.mark_done(current + 1, key, mark);
            }
            Place::Kept(_) if !finished || retain => {
                inner.state.insert(&key, ending.into_state().encode())?;
            }
            Place::Kept(_) => {}
        }
        inner.sled_written();
        if !finished {
            if let Some(m) = msgs.get_mut(&id) {
                m.pending = pending;
                m.dead = dead_left;
            }
            return Ok(());
        }
        if m.has_state && !matches!(m.place, Place::Kept(_)) {
            // Retry states of a finished message are dead weight (their
            // attempts are in the marks); a kept copy's are its marks.
            if let Some(raw) = self.record_at(id, m.place)? {
                for d in record_destinations(&raw)? {
                    inner.state.remove(state_key(&d, id))?;
                }
            }
        }
        if retain {
            return self.retain(msgs, id, &m);
        }
        match m.place {
            Place::Kept(origin) => self.drop_kept(id, origin.map(NonZeroU64::get))?,
            Place::Log(loc) => inner.segment_released(loc.seg),
            Place::Unplaced => {}
        }
        msgs.remove(&id);
        {
            let mut lookup = lock(&inner.lookup);
            if !lookup.is_empty() {
                lookup.remove(id);
            }
        }
        lock(&inner.cache).remove(id);
        inner.bytes.fetch_sub(u64::from(m.len), Ordering::Relaxed);
        Ok(())
    }

    /// Deletes the kept copy of message `id`, which nothing needs: its
    /// `Done` marks move to its original's done tree first (if segment
    /// `origin` is still there, so recovery does not bring the frame back),
    /// then the copy and its `state` keys go.
    pub(super) fn drop_kept(&self, id: u64, origin: Option<u64>) -> Result<(), StoreError> {
        let inner = &self.inner;
        let Some(v) = inner.kept.get(id_key(id))? else { return Ok(()) };
        let v = seal::Sealer::open(inner.sealer.as_deref(), id, &v)?;
        let dests = record_destinations(&v)?;
        if let Some(origin) = origin.filter(|s| *s != 0 && inner.log.has(*s)) {
            for d in &dests {
                inner.mark_done(origin, state_key(d, id), Vec::new());
            }
        }
        inner.kept.remove(id_key(id))?;
        for d in &dests {
            inner.state.remove(state_key(d, id))?;
        }
        inner.sled_written();
        Ok(())
    }

    /// The attempts kept for `dest`'s delivery of `id` so far, with
    /// `latest` added (a read of the state key the caller then rewrites:
    /// the history goes to disk in the write settling makes anyway).
    fn history_with(&self, dest: &str, id: u64, latest: Attempt) -> Result<Vec<Attempt>, StoreError> {
        let mut history = match self.inner.state.get(state_key(dest, id))? {
            Some(v) => StateRecord::decode(&v)?.history().to_vec(),
            None => Vec::new(),
        };
        history.push(latest);
        let over = history.len().saturating_sub(format::HISTORY_LEN);
        history.drain(..over);
        Ok(history)
    }

    /// Settles a lease as delivered by `attempt` (its `Done` mark keeps the
    /// delivery's attempts: one insert, as before); the message is deleted
    /// (or retained) when no other destination still needs it.
    pub(super) fn delivered(&self, dest: &str, lease: &Lease, attempt: Attempt) -> Result<(), StoreError> {
        let Some(mut msgs) = self.leased(dest, lease) else { return Ok(()) };
        // Failed attempts before this one are in the retry state, if any.
        let history = match msgs.get(&lease.id) {
            Some(m) if m.has_state => self.history_with(dest, lease.id, attempt)?,
            _ => vec![attempt],
        };
        let ((), written) = Written::by(self.finish(&mut msgs, dest, lease.id, DoneMark::Delivered(history)))?;
        self.inner.index.settled(lease, &written);
        Ok(())
    }

    /// Moves a lease to a new due time with an updated record.
    pub(super) fn reschedule(
        &self,
        dest: &str,
        lease: &Lease,
        due_ms: u64,
        record: &QueueRecord,
        attempt: Attempt,
    ) -> Result<(), StoreError> {
        let Some(mut msgs) = self.leased(dest, lease) else { return Ok(()) };
        let history = self.history_with(dest, lease.id, attempt)?;
        let st = StateRecord::Retry { due_ms, record: record.clone(), history };
        let (_, written) = Written::by(self.inner.state.insert(state_key(dest, lease.id), st.encode()))?;
        if let Some(m) = msgs.get_mut(&lease.id) {
            m.has_state = true;
        }
        self.inner.sled_written();
        self.inner.index.rescheduled(lease, due_ms, record.clone(), &written);
        Ok(())
    }

    /// Moves a lease to the dead-letter store. The message is copied into
    /// sled first (if it is not there already), so a dead letter never pins
    /// a segment of the log.
    pub(super) fn dead_letter(&self, dest: &str, lease: &Lease, record: &DeadRecord) -> Result<(), StoreError> {
        let inner = &self.inner;
        let id = lease.id;
        let Some(mut msgs) = self.leased(dest, lease) else { return Ok(()) };
        if !msgs.contains_key(&id) {
            return Ok(());
        }
        let released = self.keep(&mut msgs, id)?;
        let mut record = record.clone();
        let latest = record.history.pop().unwrap_or_default();
        record.history = self.history_with(dest, id, latest)?;
        let (_, written) = Written::by(inner.state.insert(state_key(dest, id), StateRecord::Dead(record).encode()))?;
        inner.sled_written();
        if let Some(e) = msgs.get_mut(&id) {
            e.pending = e.pending.saturating_sub(1);
            e.dead += 1;
        }
        if let Some(seq) = released {
            inner.segment_released(seq);
        }
        drop(msgs);
        self.inner.index.dead_lettered(lease, &written);
        Ok(())
    }

    /// Copies live message `id` (its stripe is `msgs`, locked by the caller)
    /// into sled's `kept` tree, with the `Done` marks of its deliveries, so it
    /// no longer needs its segment. Returns the segment the caller must
    /// release (after its own writes, so that the reclaimer's wait for a
    /// durable sled covers them), if the message was in one.
    pub(super) fn keep(&self, msgs: &mut BTreeMap<u64, Msg>, id: u64) -> Result<Option<u64>, StoreError> {
        let inner = &self.inner;
        let Some(m) = msgs.get(&id).cloned() else { return Ok(None) };
        if !matches!(m.place, Place::Kept(_)) {
            let raw = match lock(&inner.cache).map.get(&id) {
                Some(r) => r.clone(),
                None => match m.place {
                    Place::Log(loc) => inner.log.read(id, loc)?,
                    _ => {
                        return Err(StoreError::Corrupt(DecodeError {
                            what: "record cache",
                            detail: format!("message {id} missing"),
                        }))
                    }
                },
            };
            // Deliveries already done are marked in the segment's done tree,
            // which goes with the segment: the kept copy needs its own marks.
            let trees = match m.place {
                Place::Log(loc) => vec![loc.seg],
                _ => vec![inner.log.current(), inner.log.current() + 1],
            };
            for d in record_destinations(&raw)? {
                for seq in &trees {
                    if let Some(mark) = inner.find_mark(*seq, &d, id)? {
                        inner.state.insert(state_key(&d, id), DoneMark::decode(&mark)?.into_state().encode())?;
                        break;
                    }
                }
            }
            match &inner.sealer {
                Some(s) => inner.kept.insert(id_key(id), s.seal(id, &raw)?)?,
                None => inner.kept.insert(id_key(id), raw.as_ref())?,
            };
            inner.sled_written();
        }
        if let Some(e) = msgs.get_mut(&id) {
            e.place = Place::Kept(match m.place {
                Place::Log(loc) => NonZeroU64::new(loc.seg),
                Place::Kept(origin) => origin,
                Place::Unplaced => None,
            });
            e.has_state = true;
        }
        Ok(match m.place {
            Place::Log(loc) => Some(loc.seg),
            _ => None,
        })
    }

    /// Moves the live messages of sealed segments that hold at most
    /// [`EVACUATE_MAX_LIVE`] of them into `kept`, so that a few messages that
    /// keep failing do not keep whole segments (32 MiB each) on disk. A
    /// segment is evacuated only if it was such a candidate at the previous
    /// call as well (it is not emptying by itself); the store calls this
    /// every [`EVACUATE_EVERY`]. Returns the number of messages moved.
    pub(crate) fn evacuate_sparse(&self) -> Result<usize, StoreError> {
        let inner = &self.inner;
        let candidates: BTreeSet<u64> = {
            let live = lock(&inner.live);
            inner
                .log
                .sealed()
                .into_iter()
                .filter(|s| live.get(s).is_some_and(|n| (1..=EVACUATE_MAX_LIVE).contains(n)))
                .collect()
        };
        let stuck: BTreeSet<u64> = {
            let mut previous = lock(&inner.evacuate_candidates);
            let stuck = previous.intersection(&candidates).copied().collect();
            *previous = candidates;
            stuck
        };
        if stuck.is_empty() {
            return Ok(0);
        }
        let mut moved = 0;
        for stripe in &inner.msgs {
            let mut msgs = lock(stripe);
            let ids: Vec<u64> = msgs
                .iter()
                .filter(|(_, m)| matches!(m.place, Place::Log(loc) if stuck.contains(&loc.seg)))
                .map(|(id, _)| *id)
                .collect();
            for id in ids {
                if let Some(seq) = self.keep(&mut msgs, id)? {
                    inner.segment_released(seq);
                    moved += 1;
                }
            }
        }
        if moved > 0 {
            tracing::info!(segments = ?stuck, messages = moved, "moved the last messages of sparse segments into sled");
        }
        Ok(moved)
    }

    /// Drops a lease whose message is missing (should never happen; kept so
    /// a damaged store cannot wedge a destination).
    pub(super) fn drop_orphan(&self, dest: &str, lease: &Lease) -> Result<(), StoreError> {
        let Some(mut msgs) = self.leased(dest, lease) else { return Ok(()) };
        let (_, written) = Written::by(self.inner.state.remove(state_key(dest, lease.id)))?;
        if let Some(m) = msgs.get_mut(&lease.id) {
            m.pending = m.pending.saturating_sub(1);
            if m.pending + m.dead == 0 {
                let len = m.len;
                msgs.remove(&lease.id);
                self.inner.bytes.fetch_sub(u64::from(len), Ordering::Relaxed);
            }
        }
        self.inner.index.settled(lease, &written);
        Ok(())
    }
}
