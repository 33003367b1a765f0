//! The two flushes, each run by its group commit's thread (`commit.rs`):
//! the message log's (write and fdatasync the batch, then place its records
//! in the index) and sled's (sled's flush, then fdatasync of its files).

use super::*;

impl Inner {
    /// Notes a sled write that should reach the disk soon: the first one
    /// since the last sled flush asks for the next. (Settling writes are not
    /// waited for, but the sooner they are durable, the fewer deliveries a
    /// crash repeats.)
    pub(super) fn sled_written(&self) {
        if !self.sled_dirty.swap(true, Ordering::SeqCst) {
            self.state_commit.poke();
        }
    }

    /// One group commit of the log (its flusher thread only): the records
    /// pushed since the last one are written and synced, then placed.
    pub(super) fn flush_log(&self) -> Result<(), StoreError> {
        // On error, nothing pushed since the last good flush is acknowledged.
        let placed = self.log.flush()?;
        if let (Some(&(last, _)), Some(&(_, first))) = (placed.records.last(), placed.records.first()) {
            // Count every record as live before any becomes placed, so a
            // delivery settling one meanwhile never sees the segment empty.
            let seg = first.seg;
            *lock(&self.live).entry(seg).or_default() += placed.records.len() as u32;
            let mut gone = 0u32;
            for (id, loc) in &placed.records {
                match lock(&self.msgs[(*id as usize) % MSG_STRIPES]).get_mut(id) {
                    Some(m) if m.place == Place::Unplaced => m.place = Place::Log(*loc),
                    // Dead-lettered into `kept` before its flush.
                    Some(m) => {
                        if let Place::Kept(origin) = &mut m.place {
                            *origin = NonZeroU64::new(loc.seg);
                        }
                        gone += 1;
                    }
                    // Settled before its flush (and retained: it holds the segment).
                    None => {
                        if !self.placed_retained(*id, *loc) {
                            gone += 1;
                        }
                    }
                }
            }
            for _ in 0..gone {
                self.segment_released(seg);
            }
            let mut cache = lock(&self.cache);
            cache.flushed_upto = last;
            cache.evict();
        }
        if let Some(sealed) = placed.sealed {
            if !lock(&self.live).contains_key(&sealed) {
                lock(&self.unneeded).insert(sealed);
                self.reclaim.notify_one();
            }
        }
        Ok(())
    }

    /// One group commit of sled (its flusher thread only), if it has writes.
    pub(super) fn flush_state(&self, durability: &mut commit::Durability) -> Result<(), StoreError> {
        if self.sled_dirty.swap(false, Ordering::SeqCst) {
            self.write_marks()?;
            self.write_retained()?;
            self.db.flush()?;
            durability.sync().map_err(|source| StoreError::Io { what: "fdatasync of sled's files", source })?;
        }
        Ok(())
    }
}
