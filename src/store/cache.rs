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

use std::collections::BTreeMap;

use bytes::Bytes;

/// Records by id: every unflushed one (they can be read nowhere else) and
/// recent flushed ones up to a budget, so deliveries rarely read the disk.
#[derive(Default)]
pub(super) struct RecordCache {
    pub(super) map: BTreeMap<u64, Bytes>,
    bytes: usize,
    /// Ids up to this one are flushed and may be evicted.
    pub(super) flushed_upto: u64,
    /// Records read back from the log ahead of need.
    read_back: BTreeMap<u64, Bytes>,
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
        self.map.get(&id).or_else(|| self.read_back.get(&id)).cloned()
    }

    /// A record read back from the log; the oldest read back go first
    /// when over budget (the destination that needed them has read them).
    pub(super) fn read_back(&mut self, id: u64, record: Bytes) {
        if self.map.contains_key(&id) {
            return;
        }
        self.read_back_bytes += record.len();
        if let Some(old) = self.read_back.insert(id, record) {
            self.read_back_bytes -= old.len();
        }
        while self.read_back_bytes > READ_BACK_BYTES {
            match self.read_back.pop_first() {
                Some((_, r)) => self.read_back_bytes -= r.len(),
                None => break,
            }
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
        if let Some(r) = self.read_back.remove(&id) {
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
