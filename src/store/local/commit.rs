//! Group commit: one flusher thread, many waiters, one fsync covering them all.
//!
//! What one flush does is the store's business (write and sync the message
//! log, then flush sled if settling writes are waiting); this module runs it
//! and tells the waiters.
//!
//! A writer that needs durability calls [`GroupCommit::wait_durable`] *after*
//! its write. It reads the number of flushes started so far, `n`, and waits for
//! flush `n + 1` to finish. Flush `n + 1` starts after that read (the counter is
//! only incremented by the flusher right before it calls `flush`), and so after
//! the write: it covers it. While one flush runs, every writer that arrives
//! queues behind the next one, so a burst of requests shares a single fsync.
//!
//! There is exactly one flusher, a thread of its own, because concurrent
//! `sled::Db::flush_async` calls can deadlock (sled #1308, fixed upstream but
//! never released).
//!
//! `sled::Db::flush` alone is not an fsync: on Linux, sled 0.34.7 makes its
//! log "stable" with `sync_file_range`, which neither writes the file's
//! metadata nor flushes the drive's write cache, and it writes large pages
//! ("blobs", over 128 KiB) to separate files it never syncs. Both survive a
//! process crash (the page cache does) but not a power cut. So after every
//! sled flush, [`Durability::sync`] calls `fdatasync` on the log file and on
//! every blob file written since the last sync, and fsyncs the blob
//! directory. Only then is a write acknowledged.

use std::collections::HashSet;
use std::ffi::OsString;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Instant;

use tokio::sync::Notify;

/// The last finished flush, packed into one word so a waiter reads its
/// generation and result together: `generation << 1 | ok`.
fn pack(generation: u64, ok: bool) -> u64 {
    (generation << 1) | u64::from(ok)
}

fn unpack(word: u64) -> (u64, bool) {
    (word >> 1, word & 1 == 1)
}

/// Generation published when the flusher stops: every waiter is done (refused).
const STOPPED: u64 = u64::MAX >> 1;

pub(crate) struct GroupCommit {
    started: AtomicU64,
    /// The last finished flush, see [`pack`].
    done: AtomicU64,
    /// Waiters by the parity of the generation they wait for. Waiters only
    /// ever need the running flush or the next one, so finishing flush `g`
    /// wakes exactly the waiters of `g` and leaves those of `g + 1` asleep.
    waiters: [Notify; 2],
    /// Set when a flush is wanted; the flusher thread waits on `wanted`.
    want: Mutex<Want>,
    wanted: Condvar,
    /// Least time between the starts of two flushes nobody waits for
    /// (asked for by [`GroupCommit::poke`] alone); zero: none.
    pace: std::time::Duration,
    /// Flushes that failed in a row (0 after any success).
    failing: AtomicU64,
}

/// What the flusher is asked for.
#[derive(Debug, Default, Clone, Copy)]
struct Want {
    flush: bool,
    /// Someone waits for it: no pacing.
    waiter: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum CommitError {
    #[error("flush to disk failed")]
    FlushFailed,
    #[error("store is closed")]
    Closed,
}

/// Makes what sled flushed durable: see the module documentation.
pub(crate) struct Durability {
    log: File,
    blobs: PathBuf,
    synced_blobs: HashSet<OsString>,
}

impl Durability {
    /// `path` is the store directory (sled's `db` log and `blobs/` live there).
    pub(crate) fn open(path: &Path) -> std::io::Result<Durability> {
        let log = File::open(path.join("db"))?;
        // The store directory's own entries (db, conf, blobs) must be durable too.
        File::open(path)?.sync_all()?;
        Ok(Durability { log, blobs: path.join("blobs"), synced_blobs: HashSet::new() })
    }

    pub(crate) fn sync(&mut self) -> std::io::Result<()> {
        self.log.sync_data()?;
        let mut present = HashSet::new();
        let mut new_blob = false;
        match std::fs::read_dir(&self.blobs) {
            Ok(entries) => {
                for entry in entries {
                    let name = entry?.file_name();
                    if !self.synced_blobs.contains(&name) {
                        // A blob sled deleted in the meantime is nothing to sync.
                        match File::open(self.blobs.join(&name)) {
                            Ok(f) => f.sync_data()?,
                            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                            Err(e) => return Err(e),
                        }
                        new_blob = true;
                    }
                    present.insert(name);
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        if new_blob {
            File::open(&self.blobs)?.sync_all()?;
        }
        self.synced_blobs = present;
        Ok(())
    }
}

impl GroupCommit {
    pub(crate) fn new() -> Arc<GroupCommit> {
        Self::paced(std::time::Duration::ZERO)
    }

    /// A group commit whose flushes that nobody waits for start at most
    /// once per `pace` (a waiter's flush starts at once, as always).
    pub(crate) fn paced(pace: std::time::Duration) -> Arc<GroupCommit> {
        Arc::new(GroupCommit {
            started: AtomicU64::new(0),
            done: AtomicU64::new(pack(0, true)),
            waiters: [Notify::new(), Notify::new()],
            want: Mutex::new(Want::default()),
            wanted: Condvar::new(),
            pace,
            failing: AtomicU64::new(0),
        })
    }

    /// Waits until a flush that started after this call has completed.
    pub(crate) async fn wait_durable(&self) -> Result<(), CommitError> {
        let needed = self.started.load(Ordering::SeqCst) + 1;
        let slot = &self.waiters[(needed & 1) as usize];
        // Registered before the check, so a flush finishing in between
        // cannot be missed (`notify_waiters` reaches every `Notified`
        // created before it, polled or not).
        let notified = slot.notified();
        tokio::pin!(notified);
        self.ask(true);
        loop {
            let (generation, ok) = unpack(self.done.load(Ordering::SeqCst));
            if generation == STOPPED {
                return Err(CommitError::Closed);
            }
            if generation >= needed {
                return if ok { Ok(()) } else { Err(CommitError::FlushFailed) };
            }
            notified.as_mut().await;
            notified.set(slot.notified());
        }
    }

    /// Publishes the end of flush `generation` and wakes its waiters.
    fn finish(&self, generation: u64, ok: bool) {
        self.done.store(pack(generation, ok), Ordering::SeqCst);
        self.waiters[(generation & 1) as usize].notify_waiters();
    }

    /// The flusher loop, run on its own thread (a handoff to the blocking
    /// pool per flush cost two thread wakeups more). Returns when `stop` is
    /// set and it has been woken, after one last flush. `flush` does the work
    /// of one group commit; `on_flush` observes its duration and result;
    /// `after_failure` says, in the log, what a failed flush means.
    pub(crate) fn run(
        &self,
        mut flush: impl FnMut() -> Result<(), super::StoreError>,
        stop: &std::sync::atomic::AtomicBool,
        after_failure: &'static str,
        on_flush: impl Fn(std::time::Duration, bool),
    ) {
        let mut last_start: Option<Instant> = None;
        loop {
            {
                let mut want = self.want.lock().unwrap_or_else(|p| p.into_inner());
                while !want.flush {
                    want = self.wanted.wait(want).unwrap_or_else(|p| p.into_inner());
                }
                // Only pokes: wait out the pace, unless a waiter comes or
                // the store stops meanwhile.
                if let Some(at) = last_start.map(|l| l + self.pace) {
                    while !want.waiter && !stop.load(Ordering::SeqCst) {
                        let left = at.saturating_duration_since(Instant::now());
                        if left.is_zero() {
                            break;
                        }
                        want = self.wanted.wait_timeout(want, left).unwrap_or_else(|p| p.into_inner()).0;
                    }
                }
                *want = Want::default();
            }
            let generation = self.started.fetch_add(1, Ordering::SeqCst) + 1;
            let start = Instant::now();
            last_start = Some(start);
            let ok = match flush() {
                Ok(()) => true,
                Err(e) => {
                    tracing::error!(error = %e, consequence = after_failure, "store flush failed");
                    false
                }
            };
            on_flush(start.elapsed(), ok);
            if ok {
                self.failing.store(0, Ordering::SeqCst);
            } else {
                self.failing.fetch_add(1, Ordering::SeqCst);
            }
            self.finish(generation, ok);
            if stop.load(Ordering::SeqCst) {
                // Anyone still waiting (or arriving later) is refused: their
                // writes may not be covered by a flush that will never come.
                self.done.store(pack(STOPPED, false), Ordering::SeqCst);
                self.waiters.iter().for_each(Notify::notify_waiters);
                return;
            }
        }
    }

    /// Counts a failed write toward the same streak as failed flushes (a
    /// sled database with a sticky I/O error fails writes before any flush).
    pub(crate) fn note_failure(&self) {
        self.failing.fetch_add(1, Ordering::SeqCst);
    }

    /// Flushes (and writes) that failed in a row, since the last good flush.
    pub(crate) fn failing(&self) -> u64 {
        self.failing.load(Ordering::SeqCst)
    }

    /// Asks the flusher for a flush that nobody waits for: it may wait out
    /// the pace (also used at shutdown so it notices `stop`).
    pub(crate) fn poke(&self) {
        self.ask(false);
    }

    fn ask(&self, waiter: bool) {
        let mut want = self.want.lock().unwrap_or_else(|p| p.into_inner());
        if !want.flush || (waiter && !want.waiter) {
            want.flush = true;
            want.waiter |= waiter;
            self.wanted.notify_one();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durability_syncs_log_and_new_blobs_and_tolerates_deleted_ones() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join("db"), b"log").expect("db");
        let mut d = Durability::open(dir.path()).expect("open");
        d.sync().expect("sync without a blobs dir");
        std::fs::create_dir(dir.path().join("blobs")).expect("blobs");
        std::fs::write(dir.path().join("blobs/1"), b"one").expect("blob");
        std::fs::write(dir.path().join("blobs/2"), b"two").expect("blob");
        d.sync().expect("sync");
        assert_eq!(d.synced_blobs.len(), 2);
        std::fs::remove_file(dir.path().join("blobs/1")).expect("rm");
        d.sync().expect("sync after a blob was removed");
        assert_eq!(d.synced_blobs.len(), 1, "removed blobs are forgotten");
    }

    /// Every waiter returns, and only after a flush that began after its
    /// write: `written` stands for the log, a flush "covers" what was
    /// written when it began.
    #[test]
    fn every_waiter_is_woken_by_a_flush_that_covers_its_write() {
        use std::sync::atomic::AtomicBool;
        const WRITERS: u64 = 64;
        const ROUNDS: u64 = 200;
        let commit = GroupCommit::new();
        let written = Arc::new(AtomicU64::new(0));
        let covered = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let flusher = {
            let (commit, written, covered, stop) = (commit.clone(), written.clone(), covered.clone(), stop.clone());
            std::thread::spawn(move || {
                commit.run(
                    || {
                        covered.fetch_max(written.load(Ordering::SeqCst), Ordering::SeqCst);
                        Ok(())
                    },
                    &stop,
                    "test",
                    |_, _| {},
                )
            })
        };
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime");
        rt.block_on(async {
            let tasks: Vec<_> = (0..WRITERS)
                .map(|_| {
                    let (commit, written, covered) = (commit.clone(), written.clone(), covered.clone());
                    tokio::spawn(async move {
                        for _ in 0..ROUNDS {
                            let mine = written.fetch_add(1, Ordering::SeqCst) + 1;
                            commit.wait_durable().await.expect("flush ok");
                            assert!(covered.load(Ordering::SeqCst) >= mine, "acknowledged before a covering flush");
                        }
                    })
                })
                .collect();
            let all = futures_join(tasks);
            tokio::time::timeout(std::time::Duration::from_secs(60), all).await.expect("a waiter was never woken");
        });
        stop.store(true, Ordering::SeqCst);
        commit.poke();
        flusher.join().expect("flusher");
        assert_eq!(written.load(Ordering::SeqCst), WRITERS * ROUNDS);
    }

    /// A paced commit: pokes after a flush wait out the pace (here an
    /// hour: they would never flush on their own), a waiter's flush starts
    /// at once and covers them, and stopping does not wait for the pace.
    #[test]
    fn pokes_wait_out_the_pace_and_a_waiter_does_not() {
        use std::sync::atomic::AtomicBool;
        let commit = GroupCommit::paced(std::time::Duration::from_secs(3600));
        let flushes = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let flusher = {
            let (commit, flushes, stop) = (commit.clone(), flushes.clone(), stop.clone());
            std::thread::spawn(move || {
                commit.run(
                    || {
                        flushes.fetch_add(1, Ordering::SeqCst);
                        Ok(())
                    },
                    &stop,
                    "test",
                    |_, _| {},
                )
            })
        };
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
        rt.block_on(async {
            // The first poke flushes at once (no flush before it).
            commit.poke();
            let limit = std::time::Duration::from_secs(20);
            let first = tokio::time::timeout(limit, async {
                while flushes.load(Ordering::SeqCst) == 0 {
                    tokio::task::yield_now().await;
                }
            });
            first.await.expect("the first poke flushed");
            for _ in 0..100 {
                commit.poke();
            }
            tokio::time::timeout(limit, commit.wait_durable()).await.expect("unpaced").expect("ok");
        });
        assert_eq!(flushes.load(Ordering::SeqCst), 2, "the pokes joined the waiter's flush");
        stop.store(true, Ordering::SeqCst);
        commit.poke();
        flusher.join().expect("flusher stops without waiting out the pace");
    }

    async fn futures_join(tasks: Vec<tokio::task::JoinHandle<()>>) {
        for t in tasks {
            t.await.expect("writer task");
        }
    }

    #[test]
    fn waiters_after_stop_are_refused() {
        use std::sync::atomic::AtomicBool;
        let commit = GroupCommit::new();
        let stop = AtomicBool::new(true);
        commit.poke();
        commit.run(|| Ok(()), &stop, "test", |_, _| {});
        let rt = tokio::runtime::Builder::new_current_thread().build().expect("runtime");
        assert!(matches!(rt.block_on(commit.wait_durable()), Err(CommitError::Closed)));
    }

    #[test]
    fn a_store_directory_without_a_log_is_an_error() {
        let dir = tempfile::tempdir().expect("tempdir");
        assert!(Durability::open(dir.path()).is_err());
    }
}
