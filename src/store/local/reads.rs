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
//! Measured (docs/benchmarks.md): with one blocking-pool hop per miss,
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

#[cfg(test)]
mod tests {
    use super::super::tests::{all_due, dests, msg, open, rt};
    use super::*;

    /// A fetch that misses the cache reads the record back from the log with
    /// the records that follow it: the next fetches, this destination's and
    /// the other's, find them in memory. Many concurrent misses are served by
    /// one queue and each gets its own record.
    #[test]
    fn a_cache_miss_reads_ahead_and_concurrent_misses_get_their_own_records() {
        rt().block_on(async {
            let dir = tempfile::tempdir().expect("tempdir");
            let store = open(dir.path());
            let mut ids = Vec::new();
            for i in 0..40 {
                ids.push(store.append(&msg(&format!("body {i}")), &dests(&["a", "b"])).expect("append"));
                if i % 7 == 0 {
                    // Several batches: the read-ahead crosses batch headers.
                    store.sync().await.expect("sync");
                }
            }
            store.sync().await.expect("sync");
            store.close().await.expect("close");
            drop(store);
            // Reopened: nothing is in memory.
            let store = open(dir.path());
            assert!(ids.iter().all(|id| lock(&store.inner.cache).get(*id).is_none()), "a fresh cache");
            let leases = all_due(&store, "a");
            let first = store.fetch(&leases[0]).await.expect("fetch").expect("found");
            assert_eq!(first.body, Bytes::from("body 0"));
            let cached = ids[1..].iter().filter(|id| lock(&store.inner.cache).get(**id).is_some()).count();
            assert_eq!(cached, ids.len() - 1, "the records after the first one were read ahead");
            // Every destination's fetches, all at once.
            lock(&store.inner.cache).remove(ids[20]);
            let mut all = leases.clone();
            all.extend(all_due(&store, "b"));
            let fetched = futures_util::future::join_all(all.iter().map(|l| store.fetch(l))).await;
            for (lease, got) in all.iter().zip(fetched) {
                let i = ids.iter().position(|id| *id == lease.id).expect("known id");
                assert_eq!(got.expect("fetch").expect("found").body, Bytes::from(format!("body {i}")));
            }
            store.close().await.expect("close");
        });
    }
}
