//! The record cache: message records by id, so that deliveries seldom read
//! the disk. It holds every record not yet flushed (it can be read nowhere
//! else) and recently flushed ones up to a budget, evicting the oldest
//! flushed first.

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
}

/// Budget of [`RecordCache`] beyond unflushed records.
const RECORD_CACHE_BYTES: usize = 8 << 20;

impl RecordCache {
    pub(super) fn insert(&mut self, id: u64, record: Bytes) {
        self.bytes += record.len();
        self.map.insert(id, record);
        self.evict();
    }

    pub(super) fn remove(&mut self, id: u64) {
        if let Some(r) = self.map.remove(&id) {
            self.bytes -= r.len();
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
