//! Reading records back from the log for deliveries: batched, off the
//! runtime threads, and ahead of need.
//!
//! A fetch that misses the record cache queues a request here and awaits
//! its answer. One task on the blocking pool serves the queue while it is
//! not empty (it is started by the request that finds none running), so a
//! burst of misses costs one hop to the blocking pool, not one each. Each
//! read takes the wanted frame and the [`AHEAD`] bytes that follow it in its
//! segment; the records found there that the store still places at that
//! spot go into the cache's read-back part, where the next fetches of this
//! destination (which reads in id order) and of the others (which read the
//! same records moments apart) find them. Requests are served in log order,
//! and one whose record an earlier read brought in is answered from the
//! cache.
//!
//! Measured (README, Benchmark): with one blocking-pool hop per miss,
//! saturating fan-out ×3 delivered 0.69× of `89e2214`'s deliveries/s; with
//! the same reads done on the runtime thread, 0.85×; with every record in
//! memory, 0.95×.

use super::*;

/// How far past a wanted frame a read goes: about 230 records of 1 KiB,
/// one `pread` from the page cache of a few tens of microseconds.
pub(super) const AHEAD: usize = 256 << 10;

/// A fetch waiting for its record.
pub(super) struct ReadRequest {
    id: u64,
    loc: Loc,
    reply: tokio::sync::oneshot::Sender<Result<Bytes, StoreError>>,
}

/// The queue of reads and whether a task is serving it.
#[derive(Default)]
pub(super) struct ReadQueue {
    waiting: Vec<ReadRequest>,
    serving: bool,
}

/// The serving task's hold on the queue: if it ends without emptying the
/// queue (dropped unrun by a runtime shutting down, or a panic), it clears
/// `serving` so that the next request starts another.
struct Serving {
    store: Local,
    finished: bool,
}

impl Drop for Serving {
    fn drop(&mut self) {
        if !self.finished {
            let mut q = lock(&self.store.inner.reads);
            q.serving = false;
            // Requests left behind get `Closed` when their senders drop.
            q.waiting.clear();
        }
    }
}

impl Serving {
    /// Serves the read queue until it is empty.
    fn serve(&mut self) {
        let store = &self.store;
        loop {
            let mut batch = {
                let mut q = lock(&store.inner.reads);
                if q.waiting.is_empty() {
                    q.serving = false;
                    self.finished = true;
                    return;
                }
                std::mem::take(&mut q.waiting)
            };
            batch.sort_unstable_by_key(|r| (r.loc.seg, r.loc.offset));
            for r in batch {
                let found = lock(&store.inner.cache).get(r.id);
                let answer = match found {
                    Some(record) => Ok(record),
                    None => store.read_with_ahead(r.id, r.loc),
                };
                // The fetch may have given up (its task was cancelled).
                let _ = r.reply.send(answer);
            }
        }
    }
}

impl Local {
    /// Record `id`, flushed at `loc`, read back (or found in the cache by
    /// the time its turn comes).
    pub(super) async fn read_back(&self, id: u64, loc: Loc) -> Result<Bytes, StoreError> {
        let (reply, answer) = tokio::sync::oneshot::channel();
        let start = {
            let mut q = lock(&self.inner.reads);
            q.waiting.push(ReadRequest { id, loc, reply });
            !std::mem::replace(&mut q.serving, true)
        };
        if start {
            let mut serving = Serving { store: self.clone(), finished: false };
            tokio::task::spawn_blocking(move || serving.serve());
        }
        answer.await.unwrap_or(Err(StoreError::Closed))
    }

    /// Reads record `id` at `loc` and the records that follow it; keeps
    /// those still placed where they were found.
    fn read_with_ahead(&self, id: u64, loc: Loc) -> Result<Bytes, StoreError> {
        let (record, following) = self.inner.log.read_ahead(id, loc, AHEAD)?;
        for (next, at, bytes) in following {
            // Under the stripe, as every change of a message's place is: a
            // record kept here is one the store still has at this spot.
            let msgs = lock(self.stripe(next));
            if msgs.get(&next).is_some_and(|m| m.place == Place::Log(at)) {
                lock(&self.inner.cache).read_back(next, bytes);
            }
        }
        Ok(record)
    }
}
