//! The record cache: message records by id, so that deliveries seldom read
//! the disk. It holds every record not yet flushed (it can be read nowhere
//! else) and recently flushed ones up to a budget, evicting the oldest
//! flushed first; and, apart with a budget of their own, records read back
//! from the log ahead of need (`reads.rs`).
//!
//! Why two parts: under a backlog, deliveries lag ingest by more than the
//! first budget holds, so recent records are evicted before anyone reads
//! them and every delivery reads the disk. Records read back are what the
//! destinations read next (each reads in id order, and fan-out destinations
//! read the same ones within moments), so they get a budget that new
//! records cannot evict. Records never change once written, so an entry is
//! never stale: at worst it is no longer needed, and evicted in turn.

use std::collections::{BTreeMap, HashMap, VecDeque};

use bytes::Bytes;

/// Records by id: every unflushed one (they can be read nowhere else) and
/// recent flushed ones up to a budget, so deliveries rarely read the disk.
#[derive(Default)]
pub(super) struct RecordCache {
    pub(super) map: BTreeMap<u64, Bytes>,
    bytes: usize,
    /// Ids up to this one are flushed and may be evicted.
    pub(super) flushed_upto: u64,
    /// Records read back from the log ahead of need, with the order they
    /// came in (a sequence number each, so that a stale place in `order`,
    /// of a record removed or read back again since, is known as stale).
    read_back: HashMap<u64, (u64, Bytes)>,
    order: VecDeque<(u64, u64)>,
    read_back_seq: u64,
    read_back_bytes: usize,
}

/// Budget of [`RecordCache`] beyond unflushed records.
const RECORD_CACHE_BYTES: usize = 8 << 20;

/// Budget of the records read back ahead of need: about 7,000 records of
/// 1 KiB, several read-aheads (`reads::AHEAD`) for each of a few
/// destinations reading at different places.
const READ_BACK_BYTES: usize = 8 << 20;

impl RecordCache {
    /// Record `id`, if cached (recent or read back).
    pub(super) fn get(&self, id: u64) -> Option<Bytes> {
        self.map.get(&id).or_else(|| self.read_back.get(&id).map(|(_, r)| r)).cloned()
    }

    /// A record read back from the log. Over budget, those read back
    /// longest ago go first, whatever their ids: the records a destination
    /// has just read ahead are the ones it needs next. (Evicting the lowest
    /// ids instead measured 1.25 fetches served per read in run 4: the
    /// destination furthest behind lost its fresh read-ahead to the others'
    /// before it could use it.)
    pub(super) fn read_back(&mut self, id: u64, record: Bytes) {
        if self.map.contains_key(&id) {
            return;
        }
        self.read_back_seq += 1;
        let seq = self.read_back_seq;
        self.read_back_bytes += record.len();
        if let Some((_, old)) = self.read_back.insert(id, (seq, record)) {
            self.read_back_bytes -= old.len();
        }
        self.order.push_back((seq, id));
        while self.read_back_bytes > READ_BACK_BYTES {
            let Some((seq, id)) = self.order.pop_front() else { break };
            if self.read_back.get(&id).is_some_and(|(s, _)| *s == seq) {
                if let Some((_, r)) = self.read_back.remove(&id) {
                    self.read_back_bytes -= r.len();
                }
            }
        }
        // Places of records removed since (delivered everywhere) are
        // dropped now and then, so `order` stays near the map's size.
        if self.order.len() > 2 * self.read_back.len() + 1024 {
            let live = &self.read_back;
            self.order.retain(|(seq, id)| live.get(id).is_some_and(|(s, _)| s == seq));
        }
    }

    pub(super) fn insert(&mut self, id: u64, record: Bytes) {
        self.bytes += record.len();
        self.map.insert(id, record);
        self.evict();
    }

    pub(super) fn remove(&mut self, id: u64) {
        if let Some(r) = self.map.remove(&id) {
            self.bytes -= r.len();
        }
        if let Some((_, r)) = self.read_back.remove(&id) {
            self.read_back_bytes -= r.len();
        }
    }

    pub(super) fn evict(&mut self) {
        while self.bytes > RECORD_CACHE_BYTES {
            match self.map.first_key_value() {
                Some((&id, _)) if id <= self.flushed_upto => self.remove(id),
                _ => break,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Regression (run 4 at 1.25 fetches served per read): the records a
    /// destination far behind the others has just read ahead have the
    /// lowest ids in the cache, and must outlive the others' older ones.
    #[test]
    fn read_back_evicts_what_came_in_first_not_the_lowest_ids() {
        let mut cache = RecordCache::default();
        let record = Bytes::from(vec![7u8; 1024]);
        let leaders = READ_BACK_BYTES / 1024;
        for id in 0..leaders as u64 {
            cache.read_back(1_000_000 + id, record.clone());
        }
        for id in 0..100 {
            cache.read_back(id, record.clone());
        }
        assert!((0..100).all(|id| cache.get(id).is_some()), "the latest read-ahead is kept");
        assert!((0..100).all(|id| cache.get(1_000_000 + id).is_none()), "the first read back went first");
        assert!(cache.get(1_000_000 + leaders as u64 - 1).is_some());
        assert!(cache.read_back_bytes <= READ_BACK_BYTES);
        // Removing (delivered everywhere) frees the budget; stale places in
        // the order are dropped, not counted.
        for id in 0..100 {
            cache.remove(id);
        }
        for id in 0..4096 {
            cache.read_back(2_000_000 + id, Bytes::from_static(b"x"));
            cache.remove(2_000_000 + id);
        }
        assert!(cache.order.len() <= 2 * cache.read_back.len() + 1024 + 1);
    }
}
