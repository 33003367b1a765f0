//! The in-memory index of deliveries, per destination: the due queue the
//! workers lease from, the pending set behind the depth and oldest-age
//! figures, and the dead-letter count. Derived state: rebuilt from disk at
//! open (`recover.rs`), then changed only through [`Index`]'s methods.
//!
//! Disk first, memory after, held by the types: every method that changes
//! the index takes a [`Written`], the proof that the write it mirrors
//! succeeded. A `Written` comes only from the `Ok` of a write
//! ([`Written::by`]), from a record pushed onto the log's queue (it counts
//! from its push: it is in the record cache until its flush and is not
//! acknowledged before; [`Written::pushed`]), or from recovery (what it read
//! is on disk). A change that skipped or failed its write cannot compile.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::{Arc, Mutex};

use super::format::{id_received_ms, QueueRecord};
use super::{lock, DestStats, Due, Lease};

/// Proof that the write a change of the index mirrors succeeded.
#[must_use]
pub(super) struct Written(());

impl Written {
    /// The proof of `write`, if it succeeded.
    pub(super) fn by<T, E>(write: Result<T, E>) -> Result<(T, Written), E> {
        write.map(|v| (v, Written(())))
    }

    /// A record pushed onto the message log's queue (see the module doc).
    pub(super) fn pushed() -> Written {
        Written(())
    }
}

/// One destination's deliveries.
#[derive(Default)]
pub(super) struct DestIndex {
    /// Pending deliveries by (due ms, message id). `None` for a delivery
    /// never tried (most of them): 8 bytes instead of a record each.
    due: BTreeMap<(u64, u64), Option<Box<QueueRecord>>>,
    /// The same message ids, for the oldest-pending figure.
    pending: BTreeSet<u64>,
    dead: usize,
}

impl DestIndex {
    /// Recovery: a pending delivery read back from disk (`record` is its
    /// retry state, `None` if never tried: due since it arrived).
    pub(super) fn recovered_pending(&mut self, id: u64, retry: Option<(u64, QueueRecord)>) {
        match retry {
            Some((due_ms, record)) => self.due.insert((due_ms, id), Some(Box::new(record))),
            None => self.due.insert((id_received_ms(id), id), None),
        };
        self.pending.insert(id);
    }

    /// Recovery: a dead letter read back from disk.
    pub(super) fn recovered_dead(&mut self) {
        self.dead += 1;
    }
}

/// Every destination's deliveries, behind one lock (taken after a
/// message's stripe lock, never before: see the store's module doc).
#[derive(Default)]
pub(super) struct Index(Mutex<HashMap<String, DestIndex>>);

impl Index {
    pub(super) fn new(recovered: HashMap<String, DestIndex>) -> Index {
        Index(Mutex::new(recovered))
    }

    /// Up to `limit` entries of `dest` due at `now_ms`, oldest due first,
    /// skipping ids in `skip`.
    pub(super) fn due(&self, dest: &str, now_ms: u64, limit: usize, skip: &HashSet<u64>) -> Due {
        let mut due = Due::default();
        let index = lock(&self.0);
        let Some(e) = index.get(dest) else { return due };
        let name: Arc<str> = Arc::from(dest);
        for (&(due_ms, id), record) in &e.due {
            if skip.contains(&id) {
                continue;
            }
            if due_ms > now_ms || due.leases.len() >= limit {
                due.next_due_ms = Some(due_ms);
                break;
            }
            let record = record.as_deref().cloned().unwrap_or_default();
            due.leases.push(Lease { dest: name.clone(), due_ms, id, record });
        }
        due
    }

    /// Whether `lease` is still pending as leased (not settled or moved since).
    pub(super) fn is_current(&self, lease: &Lease) -> bool {
        lock(&self.0).get(&*lease.dest).is_some_and(|e| e.due.contains_key(&(lease.due_ms, lease.id)))
    }

    pub(super) fn stats(&self, dest: &str) -> DestStats {
        match lock(&self.0).get(dest) {
            Some(e) => DestStats {
                depth: e.pending.len(),
                oldest_received_ms: e.pending.first().map(|id| id_received_ms(*id)),
                dead: e.dead,
            },
            None => DestStats::default(),
        }
    }

    /// Destinations with pending or dead deliveries.
    pub(super) fn known(&self) -> Vec<String> {
        lock(&self.0).iter().filter(|(_, e)| !e.pending.is_empty() || e.dead > 0).map(|(k, _)| k.clone()).collect()
    }

    /// A new message `id`, pending for each of `dests`, due now.
    pub(super) fn queued(&self, dests: &[Arc<str>], received_ms: u64, id: u64, _: &Written) {
        let mut index = lock(&self.0);
        for d in dests {
            // Looked up by `&str` first: a `String` key only for a new destination.
            let e = match index.get_mut(&**d) {
                Some(e) => e,
                None => index.entry(d.to_string()).or_default(),
            };
            e.due.insert((received_ms, id), None);
            e.pending.insert(id);
        }
    }

    /// `lease` failed and is due again at `due_ms` with `record`.
    pub(super) fn rescheduled(&self, lease: &Lease, due_ms: u64, record: QueueRecord, _: &Written) {
        if let Some(e) = lock(&self.0).get_mut(&*lease.dest) {
            e.due.remove(&(lease.due_ms, lease.id));
            e.due.insert((due_ms, lease.id), Some(Box::new(record)));
        }
    }

    /// `lease` is settled for good (delivered, or dropped as an orphan).
    pub(super) fn settled(&self, lease: &Lease, _: &Written) {
        if let Some(e) = lock(&self.0).get_mut(&*lease.dest) {
            e.due.remove(&(lease.due_ms, lease.id));
            e.pending.remove(&lease.id);
        }
    }

    /// `lease` moved to the dead letters.
    pub(super) fn dead_lettered(&self, lease: &Lease, _: &Written) {
        if let Some(e) = lock(&self.0).get_mut(&*lease.dest) {
            e.due.remove(&(lease.due_ms, lease.id));
            e.pending.remove(&lease.id);
            e.dead += 1;
        }
    }

    /// A dead letter of `dest` is pending again, due at `now_ms`.
    pub(super) fn replayed(&self, dest: &str, id: u64, now_ms: u64, _: &Written) {
        let mut index = lock(&self.0);
        let e = index.entry(dest.to_string()).or_default();
        e.due.insert((now_ms, id), None);
        e.pending.insert(id);
        e.dead = e.dead.saturating_sub(1);
    }

    /// A dead letter of `dest` was deleted.
    pub(super) fn purged(&self, dest: &str, _: &Written) {
        if let Some(e) = lock(&self.0).get_mut(dest) {
            e.dead = e.dead.saturating_sub(1);
        }
    }
}
