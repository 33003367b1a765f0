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

    /// A change queued for the next sled flush, which writes it before it
    /// flushes (`marks.rs`, `retained_blocks.rs`).
    pub(super) fn queued() -> Written {
        Written(())
    }
}

/// One destination's deliveries.
#[derive(Default)]
pub(super) struct DestIndex {
    /// Deliveries that may be leased, by (due ms, message id). `None` for
    /// a delivery never tried (most of them): 8 bytes instead of a record
    /// each. A message waiting behind an older one of its ordering key is
    /// not here but in `order`.
    due: BTreeMap<(u64, u64), Option<Box<QueueRecord>>>,
    /// Every pending message id, for the depth and oldest-pending figures.
    pending: BTreeSet<u64>,
    dead: usize,
    /// Ordering by key, once a message with an ordering key arrived.
    order: Option<Box<Order>>,
}

/// A destination's order by key (`ordering = "per_key"` or `"fifo"`): of
/// each key's pending messages only the oldest, its head, is in `due`, so
/// one key's messages are attempted one at a time in arrival order (ids
/// sort by arrival); a head that fails holds its key alone.
#[derive(Default)]
struct Order {
    /// The key of each keyed message pending or dead-lettered here (a
    /// replayed dead letter rejoins its key).
    key_of: HashMap<u64, u64>,
    /// Per key, its pending messages by id. The head's entry holds its due
    /// time (its retry state is in `due`); the others' hold the due time
    /// and retry state they take into `due` when they become the head.
    chains: HashMap<u64, BTreeMap<u64, Waiting>>,
}

type Waiting = (u64, Option<Box<QueueRecord>>);

impl DestIndex {
    /// Recovery: a pending delivery read back from disk (`record` is its
    /// retry state, `None` if never tried: due since it arrived), with its
    /// ordering key if it has one.
    pub(super) fn recovered_pending(&mut self, id: u64, retry: Option<(u64, QueueRecord)>, key: Option<u64>) {
        match retry {
            Some((due_ms, record)) => self.insert(id, due_ms, Some(Box::new(record)), key),
            None => self.insert(id, id_received_ms(id), None, key),
        }
    }

    /// Recovery: a dead letter read back from disk.
    pub(super) fn recovered_dead(&mut self, id: u64, key: Option<u64>) {
        self.dead += 1;
        if let Some(key) = key {
            self.order.get_or_insert_with(Box::default).key_of.insert(id, key);
        }
    }

    /// `id` is pending, due at `due_ms`: leasable at once unless an older
    /// message of its key is pending (then it waits behind it). A message
    /// older than its key's head (a replayed dead letter; recovery, which
    /// reads kept copies before the log) becomes the head, and the old head
    /// waits again.
    fn insert(&mut self, id: u64, due_ms: u64, record: Option<Box<QueueRecord>>, key: Option<u64>) {
        self.pending.insert(id);
        let Some(key) = key else {
            self.due.insert((due_ms, id), record);
            return;
        };
        let order = self.order.get_or_insert_with(Box::default);
        order.key_of.insert(id, key);
        let chain = order.chains.entry(key).or_default();
        match chain.first_key_value().map(|(head, (head_due, _))| (*head, *head_due)) {
            Some((head, _)) if head < id => {
                chain.insert(id, (due_ms, record));
            }
            Some((head, _)) if head == id => {}
            Some((head, head_due)) => {
                let state = self.due.remove(&(head_due, head)).flatten();
                chain.insert(head, (head_due, state));
                chain.insert(id, (due_ms, None));
                self.due.insert((due_ms, id), record);
            }
            None => {
                chain.insert(id, (due_ms, None));
                self.due.insert((due_ms, id), record);
            }
        }
    }

    /// `id` is no longer pending (delivered, dead-lettered, dropped): the
    /// next message of its key, if any, becomes leasable. `forget`: its key
    /// is not needed any more (not a dead letter that may be replayed).
    fn remove(&mut self, due_ms: u64, id: u64, forget: bool) {
        self.due.remove(&(due_ms, id));
        self.pending.remove(&id);
        let Some(order) = self.order.as_deref_mut() else { return };
        let key = if forget { order.key_of.remove(&id) } else { order.key_of.get(&id).copied() };
        let Some(key) = key else { return };
        let Some(chain) = order.chains.get_mut(&key) else { return };
        let was_head = chain.first_key_value().is_some_and(|(head, _)| *head == id);
        chain.remove(&id);
        if was_head {
            if let Some(mut next) = chain.first_entry() {
                let (next_due, state) = std::mem::take(next.get_mut());
                next.insert((next_due, None));
                self.due.insert((next_due, *next.key()), state);
            }
        }
        if chain.is_empty() {
            order.chains.remove(&key);
        }
    }

    /// Every delivery waiting for a retry later than `now_ms` is due at
    /// `now_ms` instead (keeping its retry state); returns how many. Only
    /// entries due later than `now_ms` move, so none is leased (a lease
    /// was due when it was taken) and every lease stays current.
    fn expedite(&mut self, now_ms: u64) -> usize {
        let later: Vec<(u64, u64)> = self.due.range((now_ms.saturating_add(1), 0)..).map(|(k, _)| *k).collect();
        for &(due_ms, id) in &later {
            let state = self.due.remove(&(due_ms, id)).flatten();
            self.due.insert((now_ms, id), state);
        }
        let mut moved = later.len();
        if let Some(order) = self.order.as_deref_mut() {
            for chain in order.chains.values_mut() {
                let mut heads = true;
                for (_, (due_ms, _)) in chain.iter_mut() {
                    if *due_ms > now_ms {
                        *due_ms = now_ms;
                        // The head's move is counted above, with its entry in `due`.
                        moved += usize::from(!heads);
                    }
                    heads = false;
                }
            }
        }
        moved
    }

    /// `id`, due at `old_due`, is due again at `due_ms` with `record`.
    fn reschedule(&mut self, old_due: u64, id: u64, due_ms: u64, record: QueueRecord) {
        let key = self.order.as_deref().and_then(|o| o.key_of.get(&id).copied());
        if let (Some(key), Some(order)) = (key, self.order.as_deref_mut()) {
            if let Some(chain) = order.chains.get_mut(&key) {
                let is_head = chain.first_key_value().is_some_and(|(head, _)| *head == id);
                if !is_head {
                    // An older message became the head since it was leased
                    // (a replay): it waits with its new state.
                    chain.insert(id, (due_ms, Some(Box::new(record))));
                    return;
                }
                chain.insert(id, (due_ms, None));
            }
        }
        self.due.remove(&(old_due, id));
        self.due.insert((due_ms, id), Some(Box::new(record)));
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
            due.leases.push(Lease { dest: name.clone(), due_ms, id, record, handle: super::Handle::Local });
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

    /// Up to `limit` pending ids of `dest` within `from..to`, oldest first.
    pub(super) fn pending_page(&self, dest: &str, from: u64, to: u64, limit: usize) -> crate::store::Page {
        let mut page = crate::store::Page::default();
        if from >= to {
            return page;
        }
        if let Some(e) = lock(&self.0).get(dest) {
            for &id in e.pending.range(from..to) {
                if page.ids.len() == limit {
                    page.next = page.ids.last().copied();
                    break;
                }
                page.ids.push(id);
            }
        }
        page
    }

    /// Destinations with pending or dead deliveries.
    pub(super) fn known(&self) -> Vec<String> {
        lock(&self.0).iter().filter(|(_, e)| !e.pending.is_empty() || e.dead > 0).map(|(k, _)| k.clone()).collect()
    }

    /// A new message `id`, pending for each of `dests`, due now; `order`
    /// holds its ordering key for the destinations that deliver in order.
    pub(super) fn queued(&self, dests: &[Arc<str>], received_ms: u64, id: u64, order: &[(Arc<str>, u64)], _: &Written) {
        let mut index = lock(&self.0);
        for d in dests {
            // Looked up by `&str` first: a `String` key only for a new destination.
            let e = match index.get_mut(&**d) {
                Some(e) => e,
                None => index.entry(d.to_string()).or_default(),
            };
            let key = order.iter().find(|(o, _)| o == d).map(|(_, k)| *k);
            e.insert(id, received_ms, None, key);
        }
    }

    /// `lease` failed and is due again at `due_ms` with `record`.
    pub(super) fn rescheduled(&self, lease: &Lease, due_ms: u64, record: QueueRecord, _: &Written) {
        if let Some(e) = lock(&self.0).get_mut(&*lease.dest) {
            e.reschedule(lease.due_ms, lease.id, due_ms, record);
        }
    }

    /// `lease` is settled for good (delivered, or dropped as an orphan).
    pub(super) fn settled(&self, lease: &Lease, _: &Written) {
        if let Some(e) = lock(&self.0).get_mut(&*lease.dest) {
            e.remove(lease.due_ms, lease.id, true);
        }
    }

    /// `lease` moved to the dead letters.
    pub(super) fn dead_lettered(&self, lease: &Lease, _: &Written) {
        if let Some(e) = lock(&self.0).get_mut(&*lease.dest) {
            e.remove(lease.due_ms, lease.id, false);
            e.dead += 1;
        }
    }

    /// A dead letter of `dest` is pending again, due at `now_ms`.
    pub(super) fn replayed(&self, dest: &str, id: u64, now_ms: u64, _: &Written) {
        let mut index = lock(&self.0);
        let e = index.entry(dest.to_string()).or_default();
        let key = e.order.as_deref().and_then(|o| o.key_of.get(&id).copied());
        e.insert(id, now_ms, None, key);
        e.dead = e.dead.saturating_sub(1);
    }

    /// Message `id`, delivered to `dest`, is to be delivered again (due
    /// `now_ms`, in its key's order if `dest` delivers in order).
    pub(super) fn requeued(&self, dest: &str, id: u64, now_ms: u64, key: Option<u64>, _: &Written) {
        let mut index = lock(&self.0);
        let e = index.entry(dest.to_string()).or_default();
        e.insert(id, now_ms, None, key);
    }

    /// Brings `dest`'s waiting retries forward to `now_ms` (a destination
    /// that answers again, a resume, an operator's retry-now). Memory only:
    /// the later due times stay on disk, so after a crash the retries wait
    /// for their timers again, as they would have without this. Returns
    /// how many moved.
    pub(super) fn expedite(&self, dest: &str, now_ms: u64) -> usize {
        lock(&self.0).get_mut(dest).map_or(0, |e| e.expedite(now_ms))
    }

    /// A dead letter of `dest` was deleted.
    pub(super) fn purged(&self, dest: &str, id: u64, _: &Written) {
        if let Some(e) = lock(&self.0).get_mut(dest) {
            e.dead = e.dead.saturating_sub(1);
            if let Some(order) = e.order.as_deref_mut() {
                order.key_of.remove(&id);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const D: &str = "d";

    fn ids(index: &Index, now: u64) -> Vec<u64> {
        index.due(D, now, usize::MAX, &HashSet::new()).leases.iter().map(|l| l.id).collect()
    }

    fn lease(index: &Index, id: u64) -> Lease {
        let due = index.due(D, u64::MAX, usize::MAX, &HashSet::new());
        due.leases.into_iter().find(|l| l.id == id).expect("leasable")
    }

    /// Ids 1..=n (received at 0 ms), keys by `key_of`; `None`: unordered.
    fn queued(key_of: impl Fn(u64) -> Option<u64>, n: u64) -> Index {
        let index = Index::default();
        let dest: Arc<str> = Arc::from(D);
        for id in 1..=n {
            let order: Vec<(Arc<str>, u64)> = key_of(id).map(|k| (dest.clone(), k)).into_iter().collect();
            index.queued(std::slice::from_ref(&dest), 0, id, &order, &Written::pushed());
        }
        index
    }

    #[test]
    fn only_the_oldest_message_of_a_key_is_leasable() {
        // Keys: 1,3,5 -> a; 2,4 -> b; 6 unordered.
        let index = queued(|id| if id == 6 { None } else { Some(id % 2) }, 6);
        assert_eq!(ids(&index, 10), vec![1, 2, 6]);
        assert_eq!(index.stats(D).depth, 6);
        index.settled(&lease(&index, 1), &Written::pushed());
        assert_eq!(ids(&index, 10), vec![2, 3, 6]);
    }

    #[test]
    fn a_failing_head_holds_only_its_own_key() {
        let index = queued(|id| Some(id % 2), 4);
        let one = lease(&index, 1);
        index.rescheduled(&one, 1_000, QueueRecord { attempts: 1, ..Default::default() }, &Written::pushed());
        assert_eq!(ids(&index, 10), vec![2], "key a waits for 1's retry; key b flows");
        index.settled(&lease(&index, 2), &Written::pushed());
        assert_eq!(ids(&index, 10), vec![4]);
        assert_eq!(ids(&index, 1_000), vec![4, 1], "1 is due again (after 4, due since 0), 3 still behind it");
        let again = lease(&index, 1);
        assert_eq!(again.attempts(), 1, "the retry state stayed with the head");
        index.dead_lettered(&again, &Written::pushed());
        assert_eq!(ids(&index, 10), vec![3, 4], "a dead-lettered head releases the next");
    }

    #[test]
    fn a_replayed_dead_letter_becomes_its_keys_head_again() {
        let index = queued(|_| Some(7), 3);
        let one = lease(&index, 1);
        index.dead_lettered(&one, &Written::pushed());
        let two = lease(&index, 2);
        index.rescheduled(&two, 500, QueueRecord { attempts: 2, ..Default::default() }, &Written::pushed());
        index.replayed(D, 1, 20, &Written::pushed());
        assert_eq!(ids(&index, 1_000), vec![1], "the replayed message goes first; 2 waits with its state");
        index.settled(&lease(&index, 1), &Written::pushed());
        assert_eq!(ids(&index, 100), Vec::<u64>::new(), "2 is due at 500, as rescheduled");
        let two = lease(&index, 2);
        assert_eq!(two.attempts(), 2);
        index.settled(&two, &Written::pushed());
        assert_eq!(ids(&index, 1_000), vec![3]);
    }

    #[test]
    fn expedite_makes_waiting_retries_due_now_and_keeps_their_state_and_order() {
        // 1, 2 unordered; 3, 4 of one key (4 waits behind 3).
        let index = queued(|id| (id > 2).then_some(9), 4);
        let one = lease(&index, 1);
        index.rescheduled(&one, 60_000, QueueRecord { attempts: 1, ..Default::default() }, &Written::pushed());
        let three = lease(&index, 3);
        index.rescheduled(&three, 90_000, QueueRecord { attempts: 2, ..Default::default() }, &Written::pushed());
        let two = lease(&index, 2);
        assert_eq!(ids(&index, 100), vec![2], "only 2, never tried, is due");
        assert_eq!(index.expedite(D, 100), 2, "1 and the head 3 waited for a retry");
        assert_eq!(ids(&index, 100), vec![2, 1, 3], "due now; 2 (leased, due since 0) untouched");
        assert!(index.is_current(&two), "a lease in flight stays current");
        let three = lease(&index, 3);
        assert_eq!(three.attempts(), 2, "the retry state stayed");
        index.settled(&three, &Written::pushed());
        assert_eq!(ids(&index, 100), vec![2, 4, 1], "the key's next message follows");
        assert_eq!(index.expedite(D, 100), 0, "nothing waits any more");
        assert_eq!(index.expedite("unknown", 100), 0);
    }

    #[test]
    fn recovery_in_any_order_keeps_the_oldest_as_head() {
        let mut e = DestIndex::default();
        // Kept copies are read before the log: 5 (retrying) before 2 and 3.
        e.recovered_pending(5, Some((40, QueueRecord { attempts: 3, ..Default::default() })), Some(9));
        e.recovered_pending(3, None, Some(9));
        e.recovered_pending(2, None, Some(9));
        e.recovered_dead(1, Some(9));
        let index = Index::new(HashMap::from([(D.to_string(), e)]));
        assert_eq!(ids(&index, 1_000), vec![2]);
        index.settled(&lease(&index, 2), &Written::pushed());
        index.settled(&lease(&index, 3), &Written::pushed());
        assert_eq!(ids(&index, 39), Vec::<u64>::new());
        assert_eq!(lease(&index, 5).attempts(), 3);
        index.replayed(D, 1, 0, &Written::pushed());
        assert_eq!(ids(&index, 1_000), vec![1], "the recovered dead letter kept its key");
    }
}
