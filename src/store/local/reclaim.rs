//! The life of a segment after it is sealed: counting the live messages in
//! it, handing it to the reclaimer once the last is settled, and deleting
//! it (file first, then its done tree) after the settling writes that
//! emptied it are durable.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use super::format::done_tree_name;
use super::{lock, Inner, StoreError};

impl Inner {
    /// Deletes the segments queued as unneeded, after making durable the
    /// settling writes that emptied them. One run at a time.
    pub(super) async fn reclaim_unneeded(self: &Arc<Self>) -> Result<(), StoreError> {
        let _one = self.reclaiming.lock().await;
        let segs = std::mem::take(&mut *lock(&self.unneeded));
        if segs.is_empty() {
            return Ok(());
        }
        self.sled_dirty.store(true, Ordering::SeqCst);
        self.state_commit.wait_durable().await?;
        let inner = self.clone();
        tokio::task::spawn_blocking(move || {
            for seq in segs {
                if let Err(e) = inner.delete_segment(seq) {
                    tracing::error!(segment = seq, error = %e, "could not delete a settled segment; it is retried at the next start");
                }
            }
        })
        .await
        .map_err(|_| StoreError::Closed)
    }

    /// One live message of segment `seq` is settled or moved out; the last
    /// one hands a sealed segment to the reclaimer.
    pub(super) fn segment_released(&self, seq: u64) {
        let mut live = lock(&self.live);
        let left = match live.get_mut(&seq) {
            Some(n) => {
                *n = n.saturating_sub(1);
                *n
            }
            None => 0,
        };
        if left == 0 {
            live.remove(&seq);
            drop(live);
            if seq != self.log.current() {
                lock(&self.unneeded).insert(seq);
                self.reclaim.notify_one();
            }
        }
    }

    /// Deletes segment `seq`, which no live message needs: the file first
    /// (durably), then its done tree, in one operation. A crash in between
    /// leaves a done tree of a missing segment, dropped at open.
    pub(super) fn delete_segment(&self, seq: u64) -> Result<(), StoreError> {
        if !self.log.has(seq) {
            return Ok(());
        }
        if lock(&self.live).get(&seq).is_some_and(|n| *n > 0) {
            tracing::error!(segment = seq, "segment still holds a live message; not deleted");
            return Ok(());
        }
        self.log.remove(seq)?;
        self.drop_done_tree(seq)?;
        self.sled_written();
        Ok(())
    }

    /// The done tree of segment `seq` (opened once, then cached).
    pub(super) fn done_tree(&self, seq: u64) -> Result<sled::Tree, StoreError> {
        if let Some(t) = lock(&self.done_trees).get(&seq) {
            return Ok(t.clone());
        }
        let t = self.db.open_tree(done_tree_name(seq))?;
        lock(&self.done_trees).insert(seq, t.clone());
        Ok(t)
    }
}
