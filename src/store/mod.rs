//! The durable store: messages, per-destination due queues and dead letters.
//!
//! Only this module touches the disk. Its interface is deliberately narrow
//! (append, sync, lease due work, settle a delivery, dead letters, stats).
//! The on-disk format is defined in [`format`] and `segments.rs`.
//!
//! Invariants:
//! - [`Store::append`] queues a message *with its destination list* as one
//!   record of the message log: a message and its pending deliveries become
//!   durable together, in one CRC-checked frame. No sled operation.
//! - Nothing is durable until [`Store::sync`] returns `Ok`; ingress
//!   acknowledges only after that (group commit of the log, see `commit.rs`).
//! - A delivery's state changes by one sled insert: a `Done` mark (in the
//!   done tree of the message's segment; a kept copy's in `state`), or a
//!   `Retry`/`Dead` state in `state`. It is pending until marked done or
//!   dead; a crash at any point leaves it pending or settled, never lost.
//! - A segment is deleted once no live message is in it, after the settling
//!   writes that emptied it are durable; its done tree goes after the file
//!   (see `reclaim.rs`). A dead letter copies its message into `kept` first.
//!   What a crash leaves in between is removed at open (see `recover.rs`).
//! - Due queues, live messages, segment counts and per-destination figures
//!   live in memory, rebuilt from the log and sled at open, so they cannot
//!   drift from disk. Operations on one message are serialized by a striped
//!   lock; the disk is written first, memory updated after success.
//! - Settling writes are not fsync'd one by one: losing one to a crash means
//!   a duplicate delivery, never a loss. sled's flusher starts as soon as one
//!   is waiting.

mod cache;
mod commit;
mod disk;
mod error;
mod format;
mod reclaim;
mod recover;
mod segments;

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::num::NonZeroU64;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;

use self::cache::RecordCache;
use self::commit::GroupCommit;
pub use self::error::{EngineError, StoreError};
use self::segments::{Loc, SegmentLog};

use self::format::*;
use self::format::{DeadRecord, QueueRecord, StateRecord};
pub use self::format::{DecodeError, Draft, MessageRecord, MAX_DESTINATIONS};

/// Largest request body a route may accept (`max_body`): its record, with
/// headers and framing, must stay within a log frame (1 GiB).
pub const MAX_BODY: u64 = 512 << 20;

/// Options for [`Store::open`].
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
    /// How often to look for sparse segments; `None` uses [`EVACUATE_EVERY`].
    /// Short values are for tests.
    pub evacuate_every: Option<Duration>,
    /// The message log's files: the real disk, or one that fails on purpose.
    pub(crate) disk: DiskHandle,
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

/// A due delivery handed to a delivery worker: which message, for which
/// destination, and what settling it needs. Only the store makes them; a
/// lease that was settled, replayed or purged since is ignored when settled.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lease {
    pub dest: Arc<str>,
    pub id: u64,
    due_ms: u64,
    record: QueueRecord,
}

impl Lease {
    /// Attempts made before this one.
    pub fn attempts(&self) -> u32 {
        self.record.attempts
    }
}

/// What became of a delivery attempt, for [`Store::settle`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Settle {
    Delivered,
    /// Failed; try again at `at_ms` (unix ms).
    Retry {
        at_ms: u64,
        status: Option<u16>,
        error: String,
    },
    /// Failed for good: into the dead letters.
    Dead {
        status: Option<u16>,
        reason: String,
    },
}

/// Result of [`Store::due`].
#[derive(Debug, Default)]
pub struct Due {
    pub leases: Vec<Lease>,
    /// Due time of the first pending entry not returned (and not skipped), if any.
    pub next_due_ms: Option<u64>,
}

/// A dead-lettered delivery.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeadLetter {
    pub id: u64,
    pub attempts: u32,
    pub dead_at_ms: u64,
    pub last_status: Option<u16>,
    pub reason: String,
}

/// Per-destination figures for metrics and the admin API.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DestStats {
    pub depth: usize,
    /// Receive time (unix ms) of the oldest pending message.
    pub oldest_received_ms: Option<u64>,
    pub dead: usize,
}

/// One destination's deliveries, in memory.
#[derive(Default)]
struct DestIndex {
    /// Pending deliveries by (due ms, message id).
    /// `None` for a delivery never tried (most of them): 8 bytes instead
    /// of a whole record per pending delivery.
    due: BTreeMap<(u64, u64), Option<Box<QueueRecord>>>,
    /// The same message ids, for the oldest-pending figure.
    pending: BTreeSet<u64>,
    dead: usize,
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

/// Cheap to clone; all clones share one database, one log and one flusher.
#[derive(Clone)]
pub struct Store {
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
    index: Mutex<HashMap<String, DestIndex>>,
    /// Live messages, striped by id. Operations on one message hold its stripe.
    msgs: Vec<Mutex<BTreeMap<u64, Msg>>>,
    cache: Mutex<RecordCache>,
    /// Per segment: messages placed in it that are still live.
    live: Mutex<BTreeMap<u64, u32>>,
    /// Open done trees by segment.
    done_trees: Mutex<BTreeMap<u64, sled::Tree>>,
    /// Sealed segments no live message needs, waiting to be deleted.
    unneeded: Mutex<BTreeSet<u64>>,
    /// Sparse sealed segments seen at the last evacuation check.
    evacuate_candidates: Mutex<BTreeSet<u64>>,
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

/// How often settled deliveries are flushed when no ingress flush happens.
const IDLE_FLUSH: Duration = Duration::from_millis(500);

/// A sealed segment with at most this many live messages, twice in a row,
/// has them moved into sled ([`Store::evacuate_sparse`]).
const EVACUATE_MAX_LIVE: u32 = 16;
/// How often the store looks for sparse segments.
const EVACUATE_EVERY: Duration = Duration::from_secs(60);

pub fn now_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

/// Runs store work that reads the disk or writes sled on the blocking pool,
/// so it never holds a runtime thread.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, StoreError> + Send + 'static,
) -> Result<T, StoreError> {
    tokio::task::spawn_blocking(f).await.unwrap_or(Err(StoreError::Closed))
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // Every critical section in this module is a few map or counter updates
    // that cannot panic midway, so a poisoned lock still guards consistent data.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Store {
    /// [`Store::open`] on the blocking pool: recovery reads the whole log
    /// and sled, which must not hold a runtime thread.
    pub async fn open_async(
        path: &Path,
        opts: StoreOptions,
        on_flush: impl Fn(Duration, bool) + Send + Sync + 'static,
    ) -> Result<Store, StoreError> {
        let path = path.to_path_buf();
        blocking(move || Store::open(&path, opts, on_flush)).await
    }

    /// Opens (or creates) the store at `path`. Must run inside a tokio runtime:
    /// it starts the flusher. `on_flush` observes each flush (duration, ok).
    pub fn open(
        path: &Path,
        opts: StoreOptions,
        on_flush: impl Fn(Duration, bool) + Send + Sync + 'static,
    ) -> Result<Store, StoreError> {
        let store_lock = lock_dir(path)?;
        let config = sled::Config::new()
            .path(path)
            .mode(sled::Mode::HighThroughput)
            .cache_capacity(opts.cache_bytes.unwrap_or(8 * 1024 * 1024))
            // Our flusher is the only one; sled's own background flusher would
            // run concurrently with it (see commit.rs for why that is avoided).
            .flush_every_ms(None);
        // sled releases its file lock from its I/O threads shortly after the
        // last handle is dropped, so reopening in the same process (a restart
        // in tests, or after a supervisor-less in-process restart) can find it
        // still held for a moment. A lock held by another process stays held
        // and is reported after the wait.
        let lock_wait = std::time::Instant::now();
        let db = loop {
            match config.open() {
                Ok(db) => break db,
                Err(e)
                    if e.to_string().contains("could not acquire lock")
                        && lock_wait.elapsed() < Duration::from_secs(2) =>
                {
                    std::thread::sleep(Duration::from_millis(10));
                }
                Err(e) => return Err(StoreError::Open { path: path.to_path_buf(), source: Box::new(e.into()) }),
            }
        };
        let meta = db.open_tree("meta")?;
        let log_dir = path.join(SEGMENTS_DIR);
        check_format(path, &db, &meta, &log_dir)?;
        let uid = match meta.get("uid")? {
            Some(v) => v.iter().map(|b| format!("{b:02x}")).collect::<String>(),
            None => {
                let bytes: [u8; 4] = rand::random();
                meta.insert("uid", &bytes)?;
                bytes.iter().map(|b| format!("{b:02x}")).collect()
            }
        };
        let state = db.open_tree("state")?;
        let kept = db.open_tree("kept")?;
        let segment_bytes = opts.segment_bytes.unwrap_or(DEFAULT_SEGMENT_BYTES).max(1);
        let recover::Rebuilt { log, index, msgs, live, bytes, last_id } = recover::rebuild(
            opts.disk.0.clone(),
            &db,
            &log_dir,
            segment_bytes,
            opts.cut_damaged_log,
            &meta,
            &state,
            &kept,
        )?;

        let commit = GroupCommit::new();
        let state_commit = GroupCommit::new();
        let stop = Arc::new(AtomicBool::new(false));
        let inner = Arc::new(Inner {
            path: path.to_path_buf(),
            _lock: store_lock,
            db: db.clone(),
            meta,
            state,
            kept,
            log,
            uid,
            last_id: AtomicU64::new(last_id),
            max_bytes: opts.max_bytes,
            bytes: AtomicU64::new(bytes),
            min_free_bytes: opts.min_free_bytes,
            free: AtomicU64::new(free_space(path).unwrap_or(u64::MAX)),
            free_read_us: AtomicU64::new(0),
            opened: std::time::Instant::now(),
            sled_dirty: AtomicBool::new(false),
            closed: AtomicBool::new(false),
            commit: commit.clone(),
            state_commit: state_commit.clone(),
            stop: stop.clone(),
            ticker_stop: tokio_util::sync::CancellationToken::new(),
            tasks: Mutex::new(Vec::new()),
            flushers: Mutex::new(Vec::new()),
            index: Mutex::new(index),
            msgs,
            cache: Mutex::new(RecordCache::default()),
            live: Mutex::new(live),
            done_trees: Mutex::new(BTreeMap::new()),
            unneeded: Mutex::new(BTreeSet::new()),
            evacuate_candidates: Mutex::new(BTreeSet::new()),
            reclaim: Arc::new(tokio::sync::Notify::new()),
            reclaiming: tokio::sync::Mutex::new(()),
        });
        let mut durability =
            commit::Durability::open(path).map_err(|source| StoreError::OpenIo { path: path.to_path_buf(), source })?;
        // Two flusher threads: the log's (ingress acknowledgements wait for
        // it, and only for it) and sled's (a sled flush can take long when
        // many settling writes are dirty; acknowledgements must not wait).
        let on_flush = Arc::new(on_flush);
        let weak = Arc::downgrade(&inner);
        let log_flush = move || -> Result<(), StoreError> {
            let inner = weak.upgrade().ok_or(StoreError::Closed)?;
            inner.flush_log()
        };
        let weak = Arc::downgrade(&inner);
        let state_flush = move || -> Result<(), StoreError> {
            let inner = weak.upgrade().ok_or(StoreError::Closed)?;
            inner.flush_state(&mut durability)
        };
        let observe = on_flush.clone();
        type Flush = Box<dyn FnMut() -> Result<(), StoreError> + Send>;
        let spawn = |name: &str, commit: Arc<GroupCommit>, flush: Flush, after_failure: &'static str| {
            let (stop, observe) = (stop.clone(), observe.clone());
            std::thread::Builder::new()
                .name(name.into())
                .spawn(move || commit.run(flush, &stop, after_failure, |took, ok| observe(took, ok)))
                .map_err(|source| StoreError::OpenIo { path: path.to_path_buf(), source })
        };
        let flushers = vec![
            spawn("switchboard-log", commit.clone(), Box::new(log_flush), LOG_FLUSH_FAILED)?,
            spawn("switchboard-sled", state_commit.clone(), Box::new(state_flush), STATE_FLUSH_FAILED)?,
        ];
        *lock(&inner.flushers) = flushers;
        let evacuate_every = opts.evacuate_every.unwrap_or(EVACUATE_EVERY);
        let ticker = tokio::spawn(Self::idle_ticker(Arc::downgrade(&inner), inner.ticker_stop.clone(), evacuate_every));
        let reclaimer =
            tokio::spawn(Self::reclaimer(Arc::downgrade(&inner), inner.reclaim.clone(), inner.ticker_stop.clone()));
        lock(&inner.tasks).extend([ticker, reclaimer]);
        // Segments recovery found unneeded.
        for seq in inner.log.sealed() {
            if lock(&inner.live).get(&seq).copied().unwrap_or(0) == 0 {
                lock(&inner.unneeded).insert(seq);
            }
        }
        inner.reclaim.notify_one();
        Ok(Store { inner })
    }

    /// Pokes the flusher when settling writes wait for a flush and no
    /// ingress flush comes along; every `evacuate_every`, evacuates sparse
    /// segments.
    async fn idle_ticker(
        weak: std::sync::Weak<Inner>,
        stop: tokio_util::sync::CancellationToken,
        evacuate_every: Duration,
    ) {
        let mut tick = tokio::time::interval(IDLE_FLUSH);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut last_evacuation = tokio::time::Instant::now();
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = stop.cancelled() => return,
            }
            let Some(inner) = weak.upgrade() else { return };
            if inner.sled_dirty.load(Ordering::SeqCst) {
                inner.state_commit.poke();
            }
            if last_evacuation.elapsed() >= evacuate_every {
                last_evacuation = tokio::time::Instant::now();
                let store = Store { inner };
                match tokio::task::spawn_blocking(move || store.evacuate_sparse()).await {
                    Ok(Ok(_)) => {}
                    Ok(Err(e)) => tracing::warn!(error = %e, "could not move messages out of sparse segments"),
                    Err(e) => tracing::warn!(error = %e, "sparse-segment evacuation stopped"),
                }
            }
        }
    }

    /// Deletes segments no live message needs, once the settling writes that
    /// emptied them are durable (so a crash cannot bring back pending
    /// deliveries whose records are gone).
    async fn reclaimer(
        weak: std::sync::Weak<Inner>,
        wake: Arc<tokio::sync::Notify>,
        stop: tokio_util::sync::CancellationToken,
    ) {
        loop {
            // Holds no reference to the store while it waits.
            tokio::select! {
                _ = wake.notified() => {}
                _ = stop.cancelled() => return,
            }
            let Some(inner) = weak.upgrade() else { return };
            if let Err(e) = inner.reclaim_unneeded().await {
                tracing::error!(error = %e, "could not delete settled segments; retried at the next start");
                return;
            }
        }
    }

    pub fn path(&self) -> &Path {
        &self.inner.path
    }

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
    pub fn append(&self, msg: &MessageRecord, destinations: &[Arc<str>]) -> Result<u64, StoreError> {
        let mut draft = Draft::new(msg.received_ms, &msg.route, &msg.peer, &msg.headers, destinations, msg.body.len());
        draft.extend(&msg.body);
        self.append_draft(draft, destinations)
    }

    /// [`Store::append`] of a record ingress built while reading the body
    /// (`draft` must have been started with the same `destinations`).
    pub fn append_draft(&self, draft: Draft, destinations: &[Arc<str>]) -> Result<u64, StoreError> {
        let inner = &self.inner;
        let received_ms = draft.received_ms();
        let record = draft.into_record();
        let len = recover::record_len(record.len())?;
        self.accepting(u64::from(len))?;
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
        let mut index = self.index();
        for d in destinations {
            // Looked up by `&str` first: a `String` key only for a new destination.
            let e = match index.get_mut(&**d) {
                Some(e) => e,
                None => index.entry(d.to_string()).or_default(),
            };
            e.due.insert((received_ms, id), None);
            e.pending.insert(id);
        }
        Ok(id)
    }

    fn stripe(&self, id: u64) -> &Mutex<BTreeMap<u64, Msg>> {
        &self.inner.msgs[(id as usize) % MSG_STRIPES]
    }

    fn index(&self) -> std::sync::MutexGuard<'_, HashMap<String, DestIndex>> {
        lock(&self.inner.index)
    }

    /// Whether `lease` is still pending as leased (not settled or moved since).
    fn is_current(&self, dest: &str, lease: &Lease) -> bool {
        self.index().get(dest).is_some_and(|e| e.due.contains_key(&(lease.due_ms, lease.id)))
    }

    /// Whether the store takes a new message of `room` bytes right now:
    /// open, its log not broken, `room` left under `max_bytes`, and its
    /// filesystem above `min_free_bytes` (free space at most
    /// [`FREE_SPACE_MAX_AGE`] old, so a disk filled by someone else is
    /// noticed by the next request after that).
    pub fn accepting(&self, room: u64) -> Result<(), StoreError> {
        let inner = &self.inner;
        if inner.closed.load(Ordering::SeqCst) {
            return Err(StoreError::Closed);
        }
        if inner.log.is_broken() {
            inner.commit.note_failure();
            return Err(StoreError::FlushFailed);
        }
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

    /// Free bytes on the store's filesystem, read at most
    /// [`FREE_SPACE_MAX_AGE`] ago.
    pub fn free_bytes(&self) -> u64 {
        let inner = &self.inner;
        let now = inner.opened.elapsed().as_micros() as u64;
        let last = inner.free_read_us.load(Ordering::Relaxed);
        let stale = now.saturating_sub(last) >= FREE_SPACE_MAX_AGE.as_micros() as u64;
        if stale && inner.free_read_us.compare_exchange(last, now, Ordering::AcqRel, Ordering::Relaxed).is_ok() {
            if let Some(free) = free_space(&inner.path) {
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
        let mut due = Due::default();
        let index = self.index();
        let Some(e) = index.get(dest) else { return due };
        let name: Arc<str> = Arc::from(dest);
        for (&(due_ms, id), record) in &e.due {
            if skip.contains(&id) {
                continue;
            }
            if due_ms > now_ms || due.leases.len() >= limit {
                due.next_due_ms = Some(due_ms);
                break;
            }
            let record = record.as_deref().cloned().unwrap_or_default();
            due.leases.push(Lease { dest: name.clone(), due_ms, id, record });
        }
        due
    }

    /// The stored bytes of message `id`'s record, if it is live.
    fn record_bytes(&self, id: u64) -> Result<Option<Bytes>, StoreError> {
        let Some(place) = lock(self.stripe(id)).get(&id).map(|m| m.place) else { return Ok(None) };
        self.record_at(id, place)
    }

    /// The record of message `id`, which is at `place` (the caller may hold
    /// its stripe).
    fn record_at(&self, id: u64, place: Place) -> Result<Option<Bytes>, StoreError> {
        if let Some(r) = lock(&self.inner.cache).map.get(&id) {
            return Ok(Some(r.clone()));
        }
        match place {
            Place::Log(loc) => Ok(Some(self.inner.log.read(id, loc)?)),
            Place::Kept(_) => Ok(self.inner.kept.get(id_key(id))?.map(|v| Bytes::copy_from_slice(&v))),
            // Placement and eviction happen in that order, under the flusher.
            Place::Unplaced => Ok(lock(&self.inner.cache).map.get(&id).cloned()),
        }
    }

    /// The message `id`, if it is still stored.
    /// The message of `lease`. From the record cache when it is there (most
    /// deliveries); otherwise read from disk on the blocking pool, never on
    /// a runtime thread. `None` when the message is gone (it cannot be, in an
    /// undamaged store): the lease is then dropped, so it cannot wedge its
    /// destination.
    pub async fn fetch(&self, lease: &Lease) -> Result<Option<MessageRecord>, StoreError> {
        if let Some(raw) = lock(&self.inner.cache).map.get(&lease.id).cloned() {
            return Ok(Some(MessageRecord::decode(raw)?));
        }
        let (store, lease) = (self.clone(), lease.clone());
        blocking(move || {
            let found = store.load(lease.id)?;
            if found.is_none() {
                store.drop_orphan(&lease.dest, &lease)?;
            }
            Ok(found)
        })
        .await
    }

    /// Records what became of `lease`'s attempt: one state change, not
    /// waited for (a crash before sled's next flush repeats the delivery,
    /// never loses it). A dead letter first copies its message into sled (a
    /// read and a few writes), on the blocking pool.
    pub async fn settle(&self, lease: &Lease, outcome: Settle) -> Result<(), StoreError> {
        let attempts = lease.record.attempts.saturating_add(1);
        match outcome {
            Settle::Delivered => self.delivered(&lease.dest, lease),
            Settle::Retry { at_ms, status, error } => {
                let record = QueueRecord { attempts, last_status: status.unwrap_or(0), last_error: error };
                self.reschedule(&lease.dest, lease, at_ms, &record)
            }
            Settle::Dead { status, reason } => {
                let record = DeadRecord { attempts, dead_at_ms: now_ms(), last_status: status.unwrap_or(0), reason };
                let (store, lease) = (self.clone(), lease.clone());
                blocking(move || store.dead_letter(&lease.dest, &lease, &record)).await
            }
        }
    }

    /// Up to `limit` dead letters of `dest`, oldest message first.
    pub async fn list_dead(&self, dest: &str, limit: usize) -> Result<Vec<DeadLetter>, StoreError> {
        let (store, dest) = (self.clone(), dest.to_string());
        blocking(move || store.dead_letters(&dest, limit)).await
    }

    fn load(&self, id: u64) -> Result<Option<MessageRecord>, StoreError> {
        match self.record_bytes(id)? {
            Some(raw) => Ok(Some(MessageRecord::decode(raw)?)),
            None => Ok(None),
        }
    }

    /// Removes a settled lease from the in-memory queue.
    fn unqueue(&self, dest: &str, lease: &Lease) {
        if let Some(e) = self.index().get_mut(dest) {
            e.due.remove(&(lease.due_ms, lease.id));
            e.pending.remove(&lease.id);
        }
    }

    /// Settles one of message `id`'s deliveries to `dest` for good (`dead`:
    /// the settled one was a dead letter). The caller holds the stripe.
    ///
    /// A message with a frame in the log gets its `Done` in that segment's
    /// done tree, which is dropped with the segment (one operation, not a
    /// removal per key). A kept copy's `Done` is in `state`; when nothing
    /// needs it any more, its `Done`s move to its original's done tree (if
    /// that segment is still there), then the copy and its `state` keys go.
    /// A crash between any two steps leaves a `Done` in place or keys of a
    /// message that is nowhere (removed at open), never a pending delivery.
    fn finish(&self, msgs: &mut BTreeMap<u64, Msg>, dest: &str, id: u64, dead: bool) -> Result<(), StoreError> {
        let inner = &self.inner;
        let Some(m) = msgs.get(&id).cloned() else { return Ok(()) };
        let (pending, dead_left) =
            if dead { (m.pending, m.dead.saturating_sub(1)) } else { (m.pending.saturating_sub(1), m.dead) };
        let finished = pending + dead_left == 0;
        let key = state_key(dest, id);
        match m.place {
            Place::Log(loc) => {
                inner.done_tree(loc.seg)?.insert(&key, &[])?;
            }
            // Its frame lands in the segment being written or the next one.
            Place::Unplaced => {
                let current = inner.log.current();
                inner.done_tree(current)?.insert(&key, &[])?;
                inner.done_tree(current + 1)?.insert(&key, &[])?;
            }
            Place::Kept(_) if !finished => {
                inner.state.insert(&key, StateRecord::Done.encode())?;
            }
            Place::Kept(_) => {}
        }
        inner.sled_written();
        if !finished {
            if let Some(m) = msgs.get_mut(&id) {
                m.pending = pending;
                m.dead = dead_left;
            }
            return Ok(());
        }
        match m.place {
            Place::Kept(origin) => {
                if let Some(v) = inner.kept.get(id_key(id))? {
                    let dests = record_destinations(&v)?;
                    if let Some(origin) = origin.map(NonZeroU64::get).filter(|s| inner.log.has(*s)) {
                        let done = inner.done_tree(origin)?;
                        for d in &dests {
                            done.insert(state_key(d, id), &[])?;
                        }
                    }
                    inner.kept.remove(id_key(id))?;
                    for d in &dests {
                        inner.state.remove(state_key(d, id))?;
                    }
                }
            }
            Place::Log(_) | Place::Unplaced => {
                if m.has_state {
                    // Retry states of a delivered message are dead weight.
                    if let Some(raw) = self.record_at(id, m.place)? {
                        for d in record_destinations(&raw)? {
                            inner.state.remove(state_key(&d, id))?;
                        }
                    }
                }
                if let Place::Log(loc) = m.place {
                    inner.segment_released(loc.seg);
                }
            }
        }
        msgs.remove(&id);
        lock(&inner.cache).remove(id);
        inner.bytes.fetch_sub(u64::from(m.len), Ordering::Relaxed);
        Ok(())
    }

    /// Settles a lease as delivered; the message is deleted when no other
    /// destination still needs it.
    fn delivered(&self, dest: &str, lease: &Lease) -> Result<(), StoreError> {
        let mut msgs = lock(self.stripe(lease.id));
        if !self.is_current(dest, lease) {
            return Ok(());
        }
        self.finish(&mut msgs, dest, lease.id, false)?;
        self.unqueue(dest, lease);
        Ok(())
    }

    /// Moves a lease to a new due time with an updated record.
    fn reschedule(&self, dest: &str, lease: &Lease, due_ms: u64, record: &QueueRecord) -> Result<(), StoreError> {
        let mut msgs = lock(self.stripe(lease.id));
        if !self.is_current(dest, lease) {
            return Ok(());
        }
        let st = StateRecord::Retry { due_ms, record: record.clone() };
        self.inner.state.insert(state_key(dest, lease.id), st.encode())?;
        if let Some(m) = msgs.get_mut(&lease.id) {
            m.has_state = true;
        }
        self.inner.sled_written();
        if let Some(e) = self.index().get_mut(dest) {
            e.due.remove(&(lease.due_ms, lease.id));
            e.due.insert((due_ms, lease.id), Some(Box::new(record.clone())));
        }
        Ok(())
    }

    /// Moves a lease to the dead-letter store. The message is copied into
    /// sled first (if it is not there already), so a dead letter never pins
    /// a segment of the log.
    fn dead_letter(&self, dest: &str, lease: &Lease, record: &DeadRecord) -> Result<(), StoreError> {
        let inner = &self.inner;
        let id = lease.id;
        let mut msgs = lock(self.stripe(id));
        if !self.is_current(dest, lease) {
            return Ok(());
        }
        if !msgs.contains_key(&id) {
            return Ok(());
        }
        let released = self.keep(&mut msgs, id)?;
        inner.state.insert(state_key(dest, id), StateRecord::Dead(record.clone()).encode())?;
        inner.sled_written();
        if let Some(e) = msgs.get_mut(&id) {
            e.pending = e.pending.saturating_sub(1);
            e.dead += 1;
        }
        if let Some(seq) = released {
            inner.segment_released(seq);
        }
        drop(msgs);
        if let Some(e) = self.index().get_mut(dest) {
            e.due.remove(&(lease.due_ms, lease.id));
            e.pending.remove(&lease.id);
            e.dead += 1;
        }
        Ok(())
    }

    /// Copies live message `id` (its stripe is `msgs`, locked by the caller)
    /// into sled's `kept` tree, with the `Done` marks of its deliveries, so it
    /// no longer needs its segment. Returns the segment the caller must
    /// release (after its own writes, so that the reclaimer's wait for a
    /// durable sled covers them), if the message was in one.
    fn keep(&self, msgs: &mut BTreeMap<u64, Msg>, id: u64) -> Result<Option<u64>, StoreError> {
        let inner = &self.inner;
        let Some(m) = msgs.get(&id).cloned() else { return Ok(None) };
        if !matches!(m.place, Place::Kept(_)) {
            let raw = match lock(&inner.cache).map.get(&id) {
                Some(r) => r.clone(),
                None => match m.place {
                    Place::Log(loc) => inner.log.read(id, loc)?,
                    _ => {
                        return Err(StoreError::Corrupt(DecodeError {
                            what: "record cache",
                            detail: format!("message {id} missing"),
                        }))
                    }
                },
            };
            // Deliveries already done are marked in the segment's done tree,
            // which goes with the segment: the kept copy needs its own marks.
            let trees = match m.place {
                Place::Log(loc) => vec![loc.seg],
                _ => vec![inner.log.current(), inner.log.current() + 1],
            };
            for d in record_destinations(&raw)? {
                let key = state_key(&d, id);
                for seq in &trees {
                    if inner.done_tree(*seq)?.contains_key(&key)? {
                        inner.state.insert(&key, StateRecord::Done.encode())?;
                        break;
                    }
                }
            }
            inner.kept.insert(id_key(id), raw.as_ref())?;
            inner.sled_written();
        }
        if let Some(e) = msgs.get_mut(&id) {
            e.place = Place::Kept(match m.place {
                Place::Log(loc) => NonZeroU64::new(loc.seg),
                Place::Kept(origin) => origin,
                Place::Unplaced => None,
            });
            e.has_state = true;
        }
        Ok(match m.place {
            Place::Log(loc) => Some(loc.seg),
            _ => None,
        })
    }

    /// Moves the live messages of sealed segments that hold at most
    /// [`EVACUATE_MAX_LIVE`] of them into `kept`, so that a few messages that
    /// keep failing do not keep whole segments (32 MiB each) on disk. A
    /// segment is evacuated only if it was such a candidate at the previous
    /// call as well (it is not emptying by itself); the store calls this
    /// every [`EVACUATE_EVERY`]. Returns the number of messages moved.
    pub(crate) fn evacuate_sparse(&self) -> Result<usize, StoreError> {
        let inner = &self.inner;
        let candidates: BTreeSet<u64> = {
            let live = lock(&inner.live);
            inner
                .log
                .sealed()
                .into_iter()
                .filter(|s| live.get(s).is_some_and(|n| (1..=EVACUATE_MAX_LIVE).contains(n)))
                .collect()
        };
        let stuck: BTreeSet<u64> = {
            let mut previous = lock(&inner.evacuate_candidates);
            let stuck = previous.intersection(&candidates).copied().collect();
            *previous = candidates;
            stuck
        };
        if stuck.is_empty() {
            return Ok(0);
        }
        let mut moved = 0;
        for stripe in &inner.msgs {
            let mut msgs = lock(stripe);
            let ids: Vec<u64> = msgs
                .iter()
                .filter(|(_, m)| matches!(m.place, Place::Log(loc) if stuck.contains(&loc.seg)))
                .map(|(id, _)| *id)
                .collect();
            for id in ids {
                if let Some(seq) = self.keep(&mut msgs, id)? {
                    inner.segment_released(seq);
                    moved += 1;
                }
            }
        }
        if moved > 0 {
            tracing::info!(segments = ?stuck, messages = moved, "moved the last messages of sparse segments into sled");
        }
        Ok(moved)
    }

    /// Drops a lease whose message is missing (should never happen; kept so
    /// a damaged store cannot wedge a destination).
    fn drop_orphan(&self, dest: &str, lease: &Lease) -> Result<(), StoreError> {
        let mut msgs = lock(self.stripe(lease.id));
        if !self.is_current(dest, lease) {
            return Ok(());
        }
        self.inner.state.remove(state_key(dest, lease.id))?;
        if let Some(m) = msgs.get_mut(&lease.id) {
            m.pending = m.pending.saturating_sub(1);
            if m.pending + m.dead == 0 {
                let len = m.len;
                msgs.remove(&lease.id);
                self.inner.bytes.fetch_sub(u64::from(len), Ordering::Relaxed);
            }
        }
        self.unqueue(dest, lease);
        Ok(())
    }

    /// Up to `limit` dead letters of `dest`, oldest message first.
    fn dead_letters(&self, dest: &str, limit: usize) -> Result<Vec<DeadLetter>, StoreError> {
        let mut out = Vec::new();
        for item in self.inner.state.scan_prefix(dest_prefix(dest)) {
            if out.len() >= limit {
                break;
            }
            let (k, v) = item?;
            if let StateRecord::Dead(record) = StateRecord::decode(&v)? {
                out.push(DeadLetter {
                    id: parse_state_key(&k)?.1,
                    attempts: record.attempts,
                    dead_at_ms: record.dead_at_ms,
                    last_status: (record.last_status != 0).then_some(record.last_status),
                    reason: record.reason,
                });
            }
        }
        Ok(out)
    }

    fn is_dead(&self, dest: &str, id: u64) -> Result<bool, StoreError> {
        Ok(match self.inner.state.get(state_key(dest, id))? {
            Some(v) => matches!(StateRecord::decode(&v)?, StateRecord::Dead(_)),
            None => false,
        })
    }

    /// Moves dead letters of `dest` back into its queue, due now, with a fresh
    /// attempt count. `only` restricts it to one message. Returns how many.
    pub async fn replay_dead(&self, dest: &str, only: Option<u64>) -> Result<usize, StoreError> {
        let (store, name) = (self.clone(), dest.to_string());
        let moved = blocking(move || store.replay_dead_now(&name, only)).await?;
        // An operator action: make it durable before answering.
        self.sync_state().await?;
        Ok(moved)
    }

    fn replay_dead_now(&self, dest: &str, only: Option<u64>) -> Result<usize, StoreError> {
        let ids: Vec<u64> = match only {
            Some(id) => vec![id],
            None => self.dead_letters(dest, usize::MAX)?.into_iter().map(|e| e.id).collect(),
        };
        let now = now_ms();
        let mut moved = 0;
        for id in ids {
            let mut msgs = lock(self.stripe(id));
            if !self.is_dead(dest, id)? {
                continue;
            }
            let st = StateRecord::Retry { due_ms: now, record: QueueRecord::default() };
            self.inner.state.insert(state_key(dest, id), st.encode())?;
            self.inner.sled_written();
            if let Some(m) = msgs.get_mut(&id) {
                m.dead = m.dead.saturating_sub(1);
                m.pending += 1;
            }
            drop(msgs);
            let mut index = self.index();
            let e = index.entry(dest.to_string()).or_default();
            e.due.insert((now, id), None);
            e.pending.insert(id);
            e.dead = e.dead.saturating_sub(1);
            moved += 1;
        }
        Ok(moved)
    }

    /// Deletes dead letters of `dest` (all, or the one `only` names): each
    /// counts as settled, and a message nothing else needs is deleted.
    /// Returns how many.
    pub async fn purge_dead(&self, dest: &str, only: Option<u64>) -> Result<usize, StoreError> {
        let (store, name) = (self.clone(), dest.to_string());
        let purged = blocking(move || store.purge_dead_now(&name, only)).await?;
        self.sync_state().await?;
        Ok(purged)
    }

    fn purge_dead_now(&self, dest: &str, only: Option<u64>) -> Result<usize, StoreError> {
        let ids: Vec<u64> = match only {
            Some(id) => vec![id],
            None => self.dead_letters(dest, usize::MAX)?.into_iter().map(|e| e.id).collect(),
        };
        let mut purged = 0;
        for id in ids {
            let mut msgs = lock(self.stripe(id));
            if !self.is_dead(dest, id)? {
                continue;
            }
            self.finish(&mut msgs, dest, id, true)?;
            drop(msgs);
            if let Some(e) = self.index().get_mut(dest) {
                e.dead = e.dead.saturating_sub(1);
            }
            purged += 1;
        }
        Ok(purged)
    }

    pub fn stats(&self, dest: &str) -> DestStats {
        let index = self.index();
        match index.get(dest) {
            Some(e) => DestStats {
                depth: e.pending.len(),
                oldest_received_ms: e.pending.first().map(|id| id_received_ms(*id)),
                dead: e.dead,
            },
            None => DestStats::default(),
        }
    }

    /// Destinations that have queue or dead entries (including ones no
    /// longer configured).
    pub fn known_destinations(&self) -> Vec<String> {
        self.index().iter().filter(|(_, e)| !e.pending.is_empty() || e.dead > 0).map(|(k, _)| k.clone()).collect()
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

    /// Refuses further appends, flushes everything and stops the flusher.
    /// Stops the store the way a crash would, for tests: the background
    /// threads stop (after the flusher's last flush), and nothing a clean
    /// close writes (`last_id`, where the log ended) is written.
    #[cfg(test)]
    pub(crate) async fn crash(&self) {
        let inner = &self.inner;
        inner.closed.store(true, Ordering::SeqCst);
        inner.stop.store(true, Ordering::SeqCst);
        inner.ticker_stop.cancel();
        inner.commit.poke();
        inner.state_commit.poke();
        let tasks = std::mem::take(&mut *lock(&inner.tasks));
        for t in tasks {
            let _ = t.await;
        }
        let flushers = std::mem::take(&mut *lock(&inner.flushers));
        let _ = tokio::task::spawn_blocking(move || flushers.into_iter().map(|t| t.join()).for_each(drop)).await;
    }

    pub async fn close(&self) -> Result<(), StoreError> {
        let inner = &self.inner;
        if inner.closed.swap(true, Ordering::SeqCst) {
            return Ok(());
        }
        // Best effort from here on: whatever fails, the flusher and ticker
        // must stop so the database is released (a restart reopens it).
        let saved = inner.meta.insert("last_id", &inner.last_id.load(Ordering::SeqCst).to_be_bytes());
        inner.sled_dirty.store(true, Ordering::SeqCst);
        inner.stop.store(true, Ordering::SeqCst);
        inner.ticker_stop.cancel();
        inner.commit.poke();
        inner.state_commit.poke();
        let tasks = std::mem::take(&mut *lock(&inner.tasks));
        for t in tasks {
            let _ = t.await;
        }
        let flushers = std::mem::take(&mut *lock(&inner.flushers));
        let _ = tokio::task::spawn_blocking(move || flushers.into_iter().map(|t| t.join()).for_each(drop)).await;
        // The log's last flush is done: record where it ended, so the next
        // open treats a bad frame before that point as damage, not as a torn
        // write to cut. A permanent fact about that segment (the next open
        // starts a new one), so it is never cleared.
        if inner.commit.failing() == 0 && !inner.log.is_broken() {
            if let Some((seg, end)) = inner.log.end() {
                let mut v = seg.to_be_bytes().to_vec();
                v.extend_from_slice(&end.to_be_bytes());
                let _ = inner.meta.insert(CLEAN_END, v);
            }
        }
        // The flusher's last flush covered everything, but be explicit: this
        // is the one flush a clean shutdown must not miss.
        let db = inner.db.clone();
        tokio::task::spawn_blocking(move || db.flush()).await.map_err(|_| StoreError::FlushFailed)??;
        saved?;
        Ok(())
    }
}

/// Bytes available to unprivileged writers on the filesystem holding `path`.
/// Takes the store directory's lock file (`switchboard.lock`, holding the
/// owner's pid), so a second relay on the same store is refused with a clear
/// error instead of sled's. A lock still held by this process (a store being
/// closed while it reopens, in tests) is waited for a moment.
fn lock_dir(path: &Path) -> Result<nix::fcntl::Flock<std::fs::File>, StoreError> {
    use nix::fcntl::{Flock, FlockArg};
    use std::io::Write;
    let io = |source| StoreError::OpenIo { path: path.to_path_buf(), source };
    std::fs::create_dir_all(path).map_err(io)?;
    let lock_path = path.join("switchboard.lock");
    let started = std::time::Instant::now();
    loop {
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&lock_path)
            .map_err(io)?;
        match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
            Ok(mut f) => {
                f.set_len(0).map_err(io)?;
                write!(f, "{}", std::process::id()).map_err(io)?;
                return Ok(f);
            }
            Err((_, nix::errno::Errno::EWOULDBLOCK)) if started.elapsed() < Duration::from_secs(2) => {
                std::thread::sleep(Duration::from_millis(10));
            }
            Err((_, nix::errno::Errno::EWOULDBLOCK)) => {
                let pid = std::fs::read_to_string(&lock_path).ok().and_then(|s| s.trim().parse().ok());
                return Err(StoreError::Locked { path: path.to_path_buf(), pid });
            }
            Err((_, e)) => return Err(io(std::io::Error::from(e))),
        }
    }
}

fn free_space(path: &Path) -> Option<u64> {
    let st = nix::sys::statvfs::statvfs(path).ok()?;
    Some((st.blocks_available() as u64).saturating_mul(st.fragment_size() as u64))
}

/// Checks (or, for a new store, writes) the format marker. Never deletes.
fn check_format(path: &Path, db: &sled::Db, meta: &sled::Tree, log_dir: &Path) -> Result<(), StoreError> {
    match meta.get("format")? {
        Some(v) => {
            let found = match <[u8; 4]>::try_from(v.as_ref()) {
                Ok(arr) => u32::from_be_bytes(arr),
                Err(_) => {
                    return Err(StoreError::Corrupt(DecodeError {
                        what: "format marker",
                        detail: "expected 4 bytes".into(),
                    }))
                }
            };
            if found != FORMAT_VERSION {
                return Err(StoreError::Version { path: path.to_path_buf(), found, expected: FORMAT_VERSION });
            }
            Ok(())
        }
        None => {
            for name in db.tree_names() {
                if name.as_ref() == b"meta" {
                    continue;
                }
                if !db.open_tree(&name)?.is_empty() {
                    return Err(StoreError::Unmarked { path: path.to_path_buf() });
                }
            }
            let logged = std::fs::read_dir(log_dir).map(|mut d| d.next().is_some()).unwrap_or(false);
            if logged {
                return Err(StoreError::Unmarked { path: path.to_path_buf() });
            }
            meta.insert("format", &FORMAT_VERSION.to_be_bytes())?;
            db.flush()?;
            Ok(())
        }
    }
}

impl Inner {
    /// Notes a sled write that should reach the disk soon: the first one
    /// since the last sled flush asks for the next. (Settling writes are not
    /// waited for, but the sooner they are durable, the fewer deliveries a
    /// crash repeats.)
    fn sled_written(&self) {
        if !self.sled_dirty.swap(true, Ordering::SeqCst) {
            self.state_commit.poke();
        }
    }

    /// One group commit of the log (its flusher thread only): the records
    /// pushed since the last one are written and synced, then placed.
    fn flush_log(&self) -> Result<(), StoreError> {
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
                    // Settled before its flush.
                    None => gone += 1,
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
    fn flush_state(&self, durability: &mut commit::Durability) -> Result<(), StoreError> {
        if self.sled_dirty.swap(false, Ordering::SeqCst) {
            self.db.flush()?;
            durability.sync().map_err(|source| StoreError::Io { what: "fdatasync of sled's files", source })?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests;

#[cfg(test)]
mod fault_tests;
