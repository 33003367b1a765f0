//! Dead letters: listing, replaying (back into the destination's queue, due
//! now, attempts reset) and purging them. Operator actions: the sled work
//! runs on the blocking pool, and each is made durable before it answers.

use super::*;

impl Local {
    /// Up to `limit` dead letters of `dest`, oldest message first.
    pub async fn list_dead(&self, dest: &str, limit: usize) -> Result<Vec<DeadLetter>, StoreError> {
        let (store, dest) = (self.clone(), dest.to_string());
        blocking(move || store.dead_letters(&dest, limit)).await
    }

    /// Up to `limit` dead letters of `dest`, oldest message first.
    pub(super) fn dead_letters(&self, dest: &str, limit: usize) -> Result<Vec<DeadLetter>, StoreError> {
        let mut out = Vec::new();
        for item in self.inner.state.scan_prefix(dest_prefix(dest)) {
            if out.len() >= limit {
                break;
            }
            let (k, v) = item?;
            if let StateRecord::Dead(record) = StateRecord::decode(&v)? {
                out.push(DeadLetter {
                    id: parse_state_key(&k)?.1,
                    attempts: record.attempts,
                    dead_at_ms: record.dead_at_ms,
                    last_status: (record.last_status != 0).then_some(record.last_status),
                    reason: record.reason,
                });
            }
        }
        Ok(out)
    }

    /// The dead letters of `dest` an operation covers (its total reported).
    pub(in crate::store) fn dead_ids(&self, dest: &str, sel: &Selection) -> Result<Vec<u64>, StoreError> {
        let ids: Vec<u64> = match sel.only {
            Some(id) => vec![id],
            None => self.dead_letters(dest, usize::MAX)?.into_iter().map(|e| e.id).collect(),
        };
        let ids: Vec<u64> = ids.into_iter().filter(|id| sel.covers(*id, id_received_ms(*id))).collect();
        sel.set_total(ids.len());
        Ok(ids)
    }

    pub(super) fn is_dead(&self, dest: &str, id: u64) -> Result<bool, StoreError> {
        Ok(match self.inner.state.get(state_key(dest, id))? {
            Some(v) => matches!(StateRecord::decode(&v)?, StateRecord::Dead(_)),
            None => false,
        })
    }

    /// Moves the dead letters of `dest` that `sel` covers back into its
    /// queue, due now, with a fresh attempt count. Returns how many.
    pub async fn replay_dead(&self, dest: &str, sel: &Selection) -> Result<usize, StoreError> {
        let (name, sel) = (dest.to_string(), sel.clone());
        self.operator_action(move |store| store.replay_dead_now(&name, &sel)).await
    }

    /// An operator action: `work` on the blocking pool, made durable
    /// before it answers.
    pub(super) async fn operator_action<T: Send + 'static>(
        &self,
        work: impl FnOnce(Local) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        let store = self.clone();
        let done = blocking(move || work(store)).await?;
        self.sync_state().await?;
        Ok(done)
    }

    pub(super) fn replay_dead_now(&self, dest: &str, sel: &Selection) -> Result<usize, StoreError> {
        let ids = self.dead_ids(dest, sel)?;
        let now = now_ms();
        let mut moved = 0;
        for id in ids {
            sel.step();
            let mut msgs = lock(self.stripe(id));
            if !self.is_dead(dest, id)? {
                continue;
            }
            // Attempts start again from 0; what they did before stays visible.
            let history = match self.inner.state.get(state_key(dest, id))? {
                Some(v) => StateRecord::decode(&v)?.history().to_vec(),
                None => Vec::new(),
            };
            let st = StateRecord::Retry { due_ms: now, record: QueueRecord::default(), history };
            let (_, written) = Written::by(self.inner.state.insert(state_key(dest, id), st.encode()))?;
            self.inner.sled_written();
            if let Some(m) = msgs.get_mut(&id) {
                m.dead = m.dead.saturating_sub(1);
                m.pending += 1;
            }
            drop(msgs);
            self.inner.index.replayed(dest, id, now, &written);
            moved += 1;
        }
        Ok(moved)
    }

    /// Deletes the dead letters of `dest` that `sel` covers: each counts as
    /// settled, and a message nothing else needs is deleted. Returns how many.
    pub async fn purge_dead(&self, dest: &str, sel: &Selection) -> Result<usize, StoreError> {
        let (name, sel) = (dest.to_string(), sel.clone());
        self.operator_action(move |store| store.purge_dead_now(&name, &sel)).await
    }

    pub(super) fn purge_dead_now(&self, dest: &str, sel: &Selection) -> Result<usize, StoreError> {
        let ids = self.dead_ids(dest, sel)?;
        let mut purged = 0;
        for id in ids {
            sel.step();
            let mut msgs = lock(self.stripe(id));
            if !self.is_dead(dest, id)? {
                continue;
            }
            let ((), written) = Written::by(self.finish(&mut msgs, dest, id, DoneMark::Purged))?;
            drop(msgs);
            self.inner.index.purged(dest, id, &written);
            purged += 1;
        }
        Ok(purged)
    }

    /// Why `dest` is paused at run time, if it is.
    pub fn paused_reason(&self, dest: &str) -> Option<String> {
        lock(&self.inner.paused).get(dest).cloned()
    }

    /// Pauses `dest` (with why) or resumes it (`None`); durable before it
    /// returns, so a restart keeps the state.
    pub async fn set_paused(&self, dest: &str, reason: Option<String>) -> Result<(), StoreError> {
        let (name, why) = (dest.to_string(), reason.clone());
        self.operator_action(move |store| {
            let key = [open::PAUSED_PREFIX, name.as_bytes()].concat();
            match &why {
                Some(r) => store.inner.meta.insert(key, r.as_bytes()).map(|_| ())?,
                None => store.inner.meta.remove(key).map(|_| ())?,
            }
            store.inner.sled_written();
            match why {
                Some(r) => lock(&store.inner.paused).insert(name, r),
                None => lock(&store.inner.paused).remove(&name),
            };
            Ok(())
        })
        .await
    }
}
