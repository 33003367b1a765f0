//! The local backend (`store.kind = "local"`, the default): a segment log
//! for message records, sled for delivery state, in one directory.
//!
//! It implements the interface of `store/api.rs` (see `store/mod.rs`)
//! and all of the capability table. Only this folder names sled, segments
//! and frames.
//!
//! **Files**, one job each: `format.rs` (every key and state record: the
//! on-disk format; the message record is `store/record.rs`), `segments/` (the message log, its
//! recovery reading in `scan.rs`), `disk.rs` (the log's file operations;
//! `disk/faulty.rs` fails on purpose, for tests), `index.rs` (due queues per
//! destination, ordering per key, changed only with a proof of the write), `cache.rs` (recent
//! records, and records read back ahead of need), `reads.rs` (reading
//! records back from the log in batches, ahead), `commit.rs` (group commit), `flush.rs` (the two flushes),
//! `open.rs` (open, close, background work), `recover.rs` (rebuilding memory
//! from disk), `settle.rs` (settling, keeping, evacuating), `dead.rs` (dead
//! letters), `reclaim.rs` (deleting emptied segments), `retain.rs` (messages
//! kept after delivery, `store.retain_delivered`: listed, sent again,
//! swept), `inspect.rs` and `lookup.rs` (what operators ask).
//!
//! **Threads**: `switchboard-log` (the message log's group commit: write
//! the batch, fdatasync; ingress waits for it), `switchboard-sled` (sled's
//! group commit: flush, fdatasync; nobody on the request path waits for
//! it), sled's own I/O threads; two tokio tasks (the idle ticker: a flush
//! backstop every 500 ms, the sparse-segment check and the sweep of
//! retained messages; the reclaimer); and
//! the blocking pool for what reads the disk or writes more than one sled
//! key (open and recovery, the reads of fetches that miss the cache, one
//! task serving all that wait at a time (`reads.rs`), dead letters,
//! replay, purge, evacuation). Runtime threads never wait for the disk.
//!
//! **Lock order** (never taken the other way): the log's queue
//! (`segments.pending`) → a message's stripe (`msgs[id % 64]`) → the index
//! or the record cache (never both at once) → `live`, `unneeded`, `retained_unplaced`, `retained_waiting`,
//! `marks` → `done_trees` (leaves). The read queue (`reads`) is taken with no other
//! lock held. The log's `writer` is taken by the flusher alone,
//! before `files`. A stripe serializes everything done to one message: a
//! settling change starts by locking it (`Store::leased`).
//!
//! Invariants:
//! - [`Store::append_draft`] queues a message *with its destination list* as
//!   one record of the message log: a message and its pending deliveries
//!   become durable together, in one CRC-checked frame. No sled operation.
//! - Nothing is durable until [`Store::sync`] returns `Ok`; ingress
//!   acknowledges only after that.
//! - A delivery's state changes by one sled insert: a `Done` mark (in the
//!   done tree of the message's segment; a kept copy's in `state`), or a
//!   `Retry`/`Dead` state in `state`. It is pending until marked done or
//!   dead; a crash at any point leaves it pending or settled, never lost.
//! - Memory follows disk: due queues, live messages, segment counts and
//!   figures are rebuilt at open, and changed only after the write they
//!   mirror succeeded (`index.rs` makes that a type).
//! - Settling writes are not fsync'd one by one: losing one to a crash means

mod cache;
mod commit;
mod dead;
pub(in crate::store) mod disk;
mod flush;
mod format;
mod index;
mod inspect;
mod lookup;
mod marks;
mod open;
mod reads;
mod reclaim;
mod recover;
mod remembered;
mod retain;
mod retained_blocks;
mod segments;
mod settle;

pub(in crate::store) use self::commit::CommitError;
pub(in crate::store) use self::segments::LogError;

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::num::NonZeroU64;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;

use self::cache::RecordCache;
use self::commit::GroupCommit;
use self::format::*;
use self::format::{DeadRecord, DoneMark, RetainedPlace, RetainedRecord, StateRecord};
use self::index::{Index, Written};
use self::segments::{Loc, SegmentLog};
use super::seal;
use super::{
    lock, now_ms, DeadLetter, DeliveryState, DeliveryView, DestStats, Due, Handle, Inspection, Lease, Listing, Marks,
    MessageQuery, Page, Selection, Settle, StoreError,
};

/// Options for [`Store::open_async`].
#[derive(Debug, Clone, Default)]
pub struct StoreOptions {
    /// Refuse new messages once stored message bytes reach this.
    pub max_bytes: Option<u64>,
    /// sled page cache size; `None` uses 8 MiB (sled holds only small
    /// delivery-state keys and dead-lettered copies).
    pub cache_bytes: Option<u64>,
    /// Size at which a segment of the message log is sealed; `None` uses
    /// [`DEFAULT_SEGMENT_BYTES`]. Small values are for tests.
    pub segment_bytes: Option<u64>,
    /// Refuse new messages while the store's filesystem has less free space
    /// than this. sled turns an out-of-space write error into a permanent
    /// failure of the open database, so the relay must stop *before* the disk
    /// is full; the headroom also keeps delivery bookkeeping writable.
    pub min_free_bytes: Option<u64>,
    /// Open a damaged message log by cutting each damaged segment at the
    /// damage (the records from there to the end of that segment are lost),
    /// instead of refusing. For `switchboard repair`, an operator's decision.
    pub cut_damaged_log: bool,
    /// How often to look for sparse segments; `None` uses 60 s.
    /// Short values are for tests.
    pub evacuate_every: Option<Duration>,
    /// The message log's files: the real disk, or one that fails on purpose.
    pub(crate) disk: DiskHandle,
    /// Encryption at rest, if configured (`seal.rs`).
    pub(crate) sealer: Option<Arc<seal::Sealer>>,
    /// How long de-duplication keys are kept (the longest route window);
    /// `None`: no route de-duplicates.
    pub dedupe_retention: Option<Duration>,
    /// Most de-duplication keys kept (`remembered.rs`).
    pub dedupe_max_keys: usize,
    /// How long a message is kept after every destination is done with it
    /// (`retain.rs`); `None` or zero: deleted at once.
    pub retain_delivered: Option<Duration>,
    /// At most this many bytes of retained messages (the oldest are
    /// forgotten first, at the next sweep); `None`: no bound but time and
    /// free space.
    pub retain_max_bytes: Option<u64>,
    /// How often retained messages past their time are forgotten; `None`:
    /// a tenth of the retention, between 1 s and 60 s. Short values are for
    /// tests.
    pub sweep_every: Option<Duration>,
}

impl StoreOptions {
    /// Seals records at rest with `keys` (id and 32 key bytes each; the
    /// first seals, all open): see `seal.rs`.
    pub fn encrypt_with(mut self, keys: &[(String, Vec<u8>)]) -> Result<StoreOptions, String> {
        self.sealer = Some(Arc::new(seal::Sealer::new(keys)?));
        Ok(self)
    }
}

/// The disk the message log writes to (see `disk.rs`).
#[derive(Clone)]
pub(crate) struct DiskHandle(Arc<dyn disk::Disk>);

impl Default for DiskHandle {
    fn default() -> Self {
        DiskHandle(Arc::new(disk::RealDisk))
    }
}

impl std::fmt::Debug for DiskHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("DiskHandle")
    }
}

/// Where a live message's record is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Place {
    /// Pushed, not flushed yet: only in the record cache.
    Unplaced,
    /// In a segment of the message log.
    Log(Loc),
    /// Copied into sled's `kept` tree (it has or had a dead letter), so it
    /// does not pin a segment. Holds the segment of its original frame, if
    /// it was flushed (its `Done` marks move there when it is settled).
    Kept(Option<NonZeroU64>),
}

/// A live message, in memory: where its record is and what still needs it.
#[derive(Debug, Clone)]
struct Msg {
    place: Place,
    /// Stored record size (what `max_bytes` counts).
    len: u32,
    /// Whether it has keys in `state` (a retry or a dead letter).
    has_state: bool,
    /// Deliveries pending (queued or retrying) and dead-lettered.
    pending: u32,
    dead: u32,
}

// One per pending message: memory under a backlog is mostly these.
const _: () = assert!(std::mem::size_of::<Msg>() <= 48);

/// The local backend: a segment log for records, sled for delivery state.
/// Cheap to clone; all clones share one database, one log and its flushers.
#[derive(Clone)]
pub(in crate::store) struct Local {
    inner: Arc<Inner>,
}

struct Inner {
    path: PathBuf,
    /// Held while the store is open: one process per store directory.
    _lock: nix::fcntl::Flock<std::fs::File>,
    db: sled::Db,
    meta: sled::Tree,
    state: sled::Tree,
    kept: sled::Tree,
    /// Messages kept after delivery (`retain.rs`), by id.
    retained: sled::Tree,
    /// `store.retain_delivered` in ms; 0: off.
    retain_ms: u64,
    /// Messages in `retained`, and their bytes.
    retained_count: AtomicU64,
    retained_bytes: AtomicU64,
    /// `store.retain_max_bytes`.
    retain_max_bytes: Option<u64>,
    /// Retained messages settled before their batch was flushed: the flush
    /// places them (`flush.rs`).
    retained_unplaced: Mutex<HashSet<u64>>,
    /// De-duplication keys: sled's copy, and the keys in memory.
    dedupe: sled::Tree,
    /// Stored messages by indexed body field (`lookup.rs`).
    lookup: Mutex<lookup::Lookup>,
    remembered: Mutex<remembered::Remembered>,
    /// Seals records written to disk (log and `kept`), if configured.
    sealer: Option<Arc<seal::Sealer>>,
    log: SegmentLog,
    uid: String,
    last_id: AtomicU64,
    max_bytes: Option<u64>,
    bytes: AtomicU64,
    min_free_bytes: Option<u64>,
    /// Free bytes on the store's filesystem, and when that was read
    /// (microseconds since `opened`).
    free: AtomicU64,
    free_read_us: AtomicU64,
    opened: std::time::Instant,
    /// sled writes made since the last sled flush.
    sled_dirty: AtomicBool,
    closed: AtomicBool,
    /// Group commit of the message log (what ingress waits for).
    commit: Arc<GroupCommit>,
    /// Group commit of sled (settling writes, dead letters, operator actions).
    state_commit: Arc<GroupCommit>,
    stop: Arc<AtomicBool>,
    ticker_stop: tokio_util::sync::CancellationToken,
    tasks: Mutex<Vec<tokio::task::JoinHandle<()>>>,
    flushers: Mutex<Vec<std::thread::JoinHandle<()>>>,
    index: Index,
    /// Live messages, striped by id. Operations on one message hold its stripe.
    msgs: Vec<Mutex<BTreeMap<u64, Msg>>>,
    cache: Mutex<RecordCache>,
    /// Fetches waiting for a record read back from the log (`reads.rs`).
    reads: Mutex<reads::ReadQueue>,
    /// Per segment: messages placed in it that are still live.
    live: Mutex<BTreeMap<u64, u32>>,
    /// Open done trees by segment.
    done_trees: Mutex<BTreeMap<u64, sled::Tree>>,
    /// `Done` marks waiting for the next sled flush (`marks.rs`).
    marks: Mutex<marks::PendingMarks>,
    /// The number of the next batch of marks written.
    mark_batches: AtomicU64,
    /// Changes to `retained` waiting for the next sled flush
    /// (`retained_blocks.rs`).
    retained_waiting: Mutex<retained_blocks::Waiting>,
    /// Sealed segments no live message needs, waiting to be deleted.
    unneeded: Mutex<BTreeSet<u64>>,
    /// Sparse sealed segments seen at the last evacuation check.
    evacuate_candidates: Mutex<BTreeSet<u64>>,
    /// Destinations paused at run time (a 410 from them, or an operator),
    /// with why; persisted in `meta` (`paused:<name>`).
    paused: Mutex<std::collections::HashMap<String, String>>,
    reclaim: Arc<tokio::sync::Notify>,
    reclaiming: tokio::sync::Mutex<()>,
}

/// What a failed flush of the message log means (logged with it). The
/// kernel may have dropped the pages that failed, so the open log cannot be
/// trusted with new writes: only a restart (which re-reads the log) cures it.
const LOG_FLUSH_FAILED: &str = "new callbacks are refused (503) until the relay is restarted; \
everything acknowledged before is on disk; fix the cause (e.g. a full disk), then restart";
/// What a failed flush of sled (delivery bookkeeping) means.
const STATE_FLUSH_FAILED: &str = "delivery bookkeeping may be lost: deliveries since the last good flush \
may be repeated after a restart; /healthz turns 503 while it keeps failing; fix the cause, then restart";

/// How old the free-space figure ingress checks may be. One `statvfs` costs
/// about half a microsecond, 3 % of a request's CPU if made per request;
/// once a millisecond costs nothing measurable, and a disk filled by someone
/// else is still noticed by the next request a millisecond later.
pub const FREE_SPACE_MAX_AGE: Duration = Duration::from_millis(1);

/// Lock stripes for per-message state.
const MSG_STRIPES: usize = 64;

/// Default size at which a segment is sealed and a new one started.
pub const DEFAULT_SEGMENT_BYTES: u64 = 32 << 20;

/// Least time between two sled flushes that nobody waits for (those of
/// settling writes). Unpaced, a drain flushed sled as fast as it could
/// (each flush writing sled's partial buffers and an fdatasync), and
/// sled's I/O threads took about 29 % of the relay's CPU in run 7. A
/// crash repeats the deliveries settled since the last sled flush: at
/// most this much more of them. Operator actions and dead letters wait
/// for their flush, unpaced.
const SETTLE_FLUSH_PACE: Duration = Duration::from_millis(25);

/// How often settled deliveries are flushed when no ingress flush happens.
const IDLE_FLUSH: Duration = Duration::from_millis(500);

/// A sealed segment with at most this many live messages, twice in a row,
/// has them moved into sled ([`Store::evacuate_sparse`]).
const EVACUATE_MAX_LIVE: u32 = 16;
/// How often the store looks for sparse segments.
const EVACUATE_EVERY: Duration = Duration::from_secs(60);

/// Runs store work that reads the disk or writes sled on the blocking pool,
/// so it never holds a runtime thread.
pub(in crate::store) async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, StoreError> + Send + 'static,
) -> Result<T, StoreError> {
    tokio::task::spawn_blocking(f).await.unwrap_or(Err(StoreError::Closed))
}

impl Local {
    /// The external form of a message id (the `webhook-id` header): unique
    /// across stores thanks to the store's random uid.
    pub fn external_id(&self, id: u64) -> String {
        format!("msg_{}{id:016x}", self.inner.uid)
    }

    /// Parses an external id back into the local id, if it is one of ours.
    pub fn parse_external_id(&self, s: &str) -> Option<u64> {
        let rest = s.strip_prefix("msg_")?.strip_prefix(self.inner.uid.as_str())?;
        u64::from_str_radix(rest, 16).ok()
    }

    fn next_id(&self, received_ms: u64) -> u64 {
        let floor = received_ms << ID_SEQ_BITS;
        let mut last = self.inner.last_id.load(Ordering::Relaxed);
        loop {
            let id = floor.max(last + 1);
            match self.inner.last_id.compare_exchange_weak(last, id, Ordering::AcqRel, Ordering::Relaxed) {
                Ok(_) => return id,
                Err(actual) => last = actual,
            }
        }
    }

    /// Queues a message for `destinations`, pending for each and due now.
    /// Not durable until [`Store::sync`] returns.
    #[cfg(test)]
    pub fn append(&self, msg: &MessageRecord, destinations: &[Arc<str>]) -> Result<u64, StoreError> {
        let mut draft = Draft::new(msg.received_ms, &msg.route, &msg.peer, &msg.headers, destinations, msg.body.len());
        draft.extend(&msg.body);
        self.append_draft(draft, destinations, Marks::default())
    }

    /// [`Store::append`] of a record ingress built while reading the body
    /// (`draft` must have been started with the same `destinations`), with
    /// its de-duplication key, if its route has one: remembered with the
    /// message, durable in the same write (see `remembered.rs`); and its
    /// ordering key for each destination that delivers in order (carried
    /// by the record too, so the order is rebuilt at open).
    pub fn append_draft(
        &self,
        mut draft: Draft,
        destinations: &[Arc<str>],
        marks: Marks<'_>,
    ) -> Result<u64, StoreError> {
        let inner = &self.inner;
        let received_ms = draft.received_ms();
        let (dedupe, order) = (marks.dedupe, marks.order);
        if let Some(key) = &dedupe {
            draft.push_header(format::DEDUPE_HEADER, key);
        }
        if !order.is_empty() {
            draft.push_header(format::ORDER_HEADER, &format::encode_order_keys(order));
        }
        if !marks.index.is_empty() {
            let keys: Vec<u8> = marks.index.iter().flat_map(|k| k.to_be_bytes()).collect();
            draft.push_header(format::INDEX_HEADER, &keys);
        }
        let record = draft.into_record();
        let len = recover::record_len(record.len())?;
        if marks.reserve {
            self.writable()?;
        } else {
            self.accepting(u64::from(len))?;
        }
        let count = destinations.len() as u32;
        // The id is taken under the log's lock (ids in log order); the message
        // is registered before anything can lease it.
        let id = inner.log.push(
            || {
                let id = self.next_id(received_ms);
                lock(self.stripe(id))
                    .insert(id, Msg { place: Place::Unplaced, has_state: false, len, pending: count, dead: 0 });
                lock(&inner.cache).insert(id, record.clone());
                id
            },
            record.clone(),
        );
        inner.bytes.fetch_add(u64::from(len), Ordering::Relaxed);
        inner.index.queued(destinations, received_ms, id, order, &Written::pushed());
        if !marks.index.is_empty() {
            lock(&inner.lookup).add(id, marks.index);
        }
        if let Some(key) = dedupe {
            lock(&inner.remembered).insert(key, id, received_ms);
            let mut v = id.to_be_bytes().to_vec();
            v.extend_from_slice(&received_ms.to_be_bytes());
            // Not waited for: the log record carries the key until sled's
            // next flush makes this copy durable.
            if inner.dedupe.insert(key, v).is_ok() {
                inner.sled_written();
            }
        }
        Ok(id)
    }

    fn stripe(&self, id: u64) -> &Mutex<BTreeMap<u64, Msg>> {
        &self.inner.msgs[(id as usize) % MSG_STRIPES]
    }

    /// The message a de-duplication key belongs to, if it was accepted
    /// within `window`.
    pub fn duplicate_of(&self, key: &[u8; 16], window: Duration) -> Option<u64> {
        lock(&self.inner.remembered).get(key, now_ms(), window.as_millis() as u64)
    }

    /// Keys remembered now, and keys forgotten at the cap so far.
    pub fn dedupe_figures(&self) -> (usize, u64) {
        let r = lock(&self.inner.remembered);
        (r.len(), r.evicted)
    }

    /// Forgets expired de-duplication keys, in memory and in sled.
    pub(super) fn prune_dedupe(&self) -> Result<usize, StoreError> {
        let gone = lock(&self.inner.remembered).prune(now_ms());
        for key in &gone {
            self.inner.dedupe.remove(key)?;
        }
        if !gone.is_empty() {
            self.inner.sled_written();
        }
        Ok(gone.len())
    }

    /// Whether the store takes a new message of `room` bytes right now:
    /// open, its log not broken, `room` left under `max_bytes`, and its
    /// filesystem above `min_free_bytes` (free space at most
    /// [`FREE_SPACE_MAX_AGE`] old, so a disk filled by someone else is
    /// noticed by the next request after that).
    pub fn accepting(&self, room: u64) -> Result<(), StoreError> {
        self.writable()?;
        let inner = &self.inner;
        if let Some(min) = inner.min_free_bytes {
            let free = self.free_bytes();
            if free < min {
                return Err(StoreError::DiskFull { free, min });
            }
        }
        if let Some(limit) = inner.max_bytes {
            let used = inner.bytes.load(Ordering::Relaxed);
            if used.saturating_add(room) > limit {
                return Err(StoreError::Full { used, limit });
            }
        }
        Ok(())
    }

    /// Open and its log not broken.
    fn writable(&self) -> Result<(), StoreError> {
        let inner = &self.inner;
        if inner.closed.load(Ordering::SeqCst) {
            return Err(StoreError::Closed);
        }
        if inner.log.is_broken() {
            inner.commit.note_failure();
            return Err(StoreError::FlushFailed);
        }
        Ok(())
    }

    /// Free bytes on the store's filesystem, read at most
    /// [`FREE_SPACE_MAX_AGE`] ago.
    pub fn free_bytes(&self) -> u64 {
        let inner = &self.inner;
        let now = inner.opened.elapsed().as_micros() as u64;
        let last = inner.free_read_us.load(Ordering::Relaxed);
        let stale = now.saturating_sub(last) >= FREE_SPACE_MAX_AGE.as_micros() as u64;
        if stale && inner.free_read_us.compare_exchange(last, now, Ordering::AcqRel, Ordering::Relaxed).is_ok() {
            if let Some(free) = open::free_space(&inner.path) {
                inner.free.store(free, Ordering::Relaxed);
            }
        }
        inner.free.load(Ordering::Relaxed)
    }

    /// Waits until everything written before this call is on disk.
    pub async fn sync(&self) -> Result<(), StoreError> {
        if self.inner.closed.load(Ordering::SeqCst) {
            return Err(StoreError::Closed);
        }
        Ok(self.inner.commit.wait_durable().await?)
    }

    /// Waits until every sled write made before this call is on disk.
    async fn sync_state(&self) -> Result<(), StoreError> {
        if self.inner.closed.load(Ordering::SeqCst) {
            return Err(StoreError::Closed);
        }
        self.inner.sled_dirty.store(true, Ordering::SeqCst);
        Ok(self.inner.state_commit.wait_durable().await?)
    }

    /// Up to `limit` entries of `dest` due at `now_ms`, oldest due first,
    /// skipping ids in `skip` (those already being delivered).
    pub fn due(&self, dest: &str, now_ms: u64, limit: usize, skip: &HashSet<u64>) -> Due {
        self.inner.index.due(dest, now_ms, limit, skip)
    }

    /// Makes `dest`'s waiting retries due now (memory only; see
    /// `Index::expedite`). Returns how many.
    pub fn retry_now(&self, dest: &str) -> usize {
        self.inner.index.expedite(dest, now_ms())
    }

    pub fn stats(&self, dest: &str) -> DestStats {
        self.inner.index.stats(dest)
    }

    /// Destinations that have queue or dead entries (including ones no
    /// longer configured).
    pub fn known_destinations(&self) -> Vec<String> {
        self.inner.index.known()
    }

    /// Bytes of stored messages (what `max_bytes` limits).
    pub fn bytes(&self) -> u64 {
        self.inner.bytes.load(Ordering::Relaxed)
    }

    pub fn max_bytes(&self) -> Option<u64> {
        self.inner.max_bytes
    }

    /// Size of the store's files on disk (message log and sled).
    pub fn disk_bytes(&self) -> u64 {
        self.inner.log.disk_bytes() + self.inner.db.size_on_disk().unwrap_or(0)
    }

    /// False once flushes keep failing. A failed write or `fdatasync` of the
    /// message log, like sled 0.34's I/O errors (such as running out of disk,
    /// if something else filled it past `min_free_bytes`), is permanent for
    /// the open store; only reopening it, i.e. restarting the process,
    /// recovers. `/healthz` reports this so a supervisor (Kubernetes liveness
    /// probe) restarts the relay.
    pub fn is_healthy(&self) -> bool {
        // A few in a row: one failure may be a passing fault.
        const FAILURES: u64 = 3;
        self.inner.commit.failing() < FAILURES && self.inner.state_commit.failing() < FAILURES
    }

    /// Whether a flush failed since the store was opened and none succeeded
    /// since (for the message log: ever, as its failure is permanent).
    pub fn flush_failed(&self) -> bool {
        let inner = &self.inner;
        inner.log.is_broken() || inner.commit.failing() > 0 || inner.state_commit.failing() > 0
    }

    pub fn is_closed(&self) -> bool {
        self.inner.closed.load(Ordering::SeqCst)
    }
}

impl From<sled::Error> for StoreError {
    fn from(e: sled::Error) -> Self {
        match e {
            sled::Error::Io(source) => StoreError::Io { what: "sled", source },
            other => StoreError::Engine(super::EngineError(other.to_string())),
        }
    }
}

#[cfg(test)]
mod tests;

#[cfg(test)]
mod fault_tests;

#[cfg(test)]
mod retain_tests;
