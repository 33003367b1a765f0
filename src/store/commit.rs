//! Group commit: one flusher task, many waiters, one fsync covering them all.
//!
//! A writer that needs durability calls [`GroupCommit::wait_durable`] *after*
//! its write. It reads the number of flushes started so far, `n`, and waits for
//! flush `n + 1` to finish. Flush `n + 1` starts after that read (the counter is
//! only incremented by the flusher right before it calls `flush`), and so after
//! the write: it covers it. While one flush runs, every writer that arrives
//! queues behind the next one, so a burst of requests shares a single fsync.
//!
//! There is exactly one flusher because concurrent `sled::Db::flush_async`
//! calls can deadlock (sled #1308, fixed upstream but never released); the
//! blocking `flush` runs on the blocking pool.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use tokio::sync::{watch, Notify};

#[derive(Debug, Clone, Copy)]
struct Flushed {
    generation: u64,
    ok: bool,
}

pub(crate) struct GroupCommit {
    started: AtomicU64,
    done: watch::Sender<Flushed>,
    wake: Notify,
}

#[derive(Debug, thiserror::Error)]
pub enum CommitError {
    #[error("flush to disk failed")]
    FlushFailed,
    #[error("store is closed")]
    Closed,
}

impl GroupCommit {
    pub(crate) fn new() -> Arc<GroupCommit> {
        let (done, _) = watch::channel(Flushed { generation: 0, ok: true });
        Arc::new(GroupCommit { started: AtomicU64::new(0), done, wake: Notify::new() })
    }

    /// Waits until a flush that started after this call has completed.
    pub(crate) async fn wait_durable(&self) -> Result<(), CommitError> {
        let needed = self.started.load(Ordering::SeqCst) + 1;
        let mut rx = self.done.subscribe();
        self.wake.notify_one();
        let flushed = *rx.wait_for(|f| f.generation >= needed).await.map_err(|_| CommitError::Closed)?;
        if flushed.ok {
            Ok(())
        } else {
            Err(CommitError::FlushFailed)
        }
    }

    /// The flusher loop; returns when `stop` is set and it has been woken.
    /// `on_flush` observes each flush's duration and result (for metrics).
    pub(crate) async fn run(
        self: Arc<Self>,
        db: sled::Db,
        stop: Arc<std::sync::atomic::AtomicBool>,
        on_flush: impl Fn(std::time::Duration, bool) + Send + 'static,
    ) {
        loop {
            self.wake.notified().await;
            let generation = self.started.fetch_add(1, Ordering::SeqCst) + 1;
            let db2 = db.clone();
            let start = Instant::now();
            let result = tokio::task::spawn_blocking(move || db2.flush()).await;
            let ok = match result {
                Ok(Ok(_)) => true,
                Ok(Err(e)) => {
                    tracing::error!(error = %e, "store flush failed; acknowledgements are refused until a flush succeeds");
                    false
                }
                Err(e) => {
                    tracing::error!(error = %e, "store flush task failed");
                    false
                }
            };
            on_flush(start.elapsed(), ok);
            self.done.send_replace(Flushed { generation, ok });
            if stop.load(Ordering::SeqCst) {
                // Anyone still waiting (or arriving later) is refused: their
                // writes may not be covered by a flush that will never come.
                self.done.send_replace(Flushed { generation: u64::MAX, ok: false });
                return;
            }
        }
    }

    /// Wakes the flusher (used at shutdown so it notices `stop`).
    pub(crate) fn poke(&self) {
        self.wake.notify_one();
    }
}
