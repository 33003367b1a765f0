//! The durable store: messages, per-destination due queues and dead letters.
//!
//! Only this module touches sled. Its interface is deliberately narrow (append,
//! sync, lease due work, settle a delivery, dead letters, stats) so another
//! engine could stand behind it. The on-disk format is defined in [`format`].
//!
//! Invariants:
//! - [`Store::append`] writes a message *with its destination list* as one
//!   key: a message and its pending deliveries are written atomically, by a
//!   single insert (no sled transaction: sled 0.34 writes and syncs its log on
//!   every transaction commit, which capped throughput).
//! - Nothing is durable until [`Store::sync`] returns `Ok`; ingress
//!   acknowledges only after that (group commit, see [`commit`]).
//! - A delivery's state changes by one insert of its `state` key (retry,
//!   done, dead). It is pending until a `Done` or `Dead` state is written; a
//!   crash at any point leaves it pending or settled, never lost.
//! - The last delivery of a message deletes the message first, then its
//!   state keys; state keys left behind by a crash in between name a message
//!   that no longer exists and are removed at open.
//! - Due queues, reference counts and per-destination figures live in
//!   memory, rebuilt from `messages` and `state` at open, so they cannot
//!   drift from disk. Operations on one message are serialized by a striped
//!   lock; the disk is written first, memory updated after success.
//! - Settling writes are not fsync'd one by one: losing one to a crash means
//!   a duplicate delivery, never a loss. They are flushed by the next group
//!   commit or by the idle ticker.

mod commit;
pub mod format;
mod recover;

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;

use self::commit::{CommitError, GroupCommit};

use self::format::*;
pub use self::format::{DeadRecord, DecodeError, MessageRecord, QueueRecord, StateRecord};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("store is full: {used} of max_bytes {limit} in use")]
    Full { used: u64, limit: u64 },
    #[error("disk nearly full: {free} bytes free on the store's filesystem, min_free_bytes is {min}")]
    DiskFull { free: u64, min: u64 },
    #[error("store flush to disk failed")]
    FlushFailed,
    #[error("store is closed")]
    Closed,
    #[error("cannot open store at {path}: {source}")]
    Open { path: PathBuf, source: sled::Error },
    #[error("store at {path} has format version {found}; this build reads version {expected} (data left untouched)")]
    Version { path: PathBuf, found: u32, expected: u32 },
    #[error("store at {path} holds data but no format marker; refusing to use it (data left untouched)")]
    Unmarked { path: PathBuf },
    #[error("store I/O error: {0}")]
    Io(#[from] sled::Error),
    #[error(transparent)]
    Corrupt(#[from] DecodeError),
}

impl StoreError {
    /// Whether the condition may clear by itself (full, flush failure), so a
    /// sender should retry later.
    pub fn is_transient(&self) -> bool {
        matches!(
            self,
            StoreError::Full { .. } | StoreError::DiskFull { .. } | StoreError::FlushFailed | StoreError::Io(_)
        )
    }
}

impl From<CommitError> for StoreError {
    fn from(e: CommitError) -> Self {
        match e {
            CommitError::FlushFailed => StoreError::FlushFailed,
            CommitError::Closed => StoreError::Closed,
        }
    }
}

/// Options for [`Store::open`].
#[derive(Debug, Clone, Default)]
pub struct StoreOptions {
    /// Refuse new messages once stored message bytes reach this.
    pub max_bytes: Option<u64>,
    /// sled page cache size; `None` uses 32 MiB.
    pub cache_bytes: Option<u64>,
    /// Refuse new messages while the store's filesystem has less free space
    /// than this. sled turns an out-of-space write error into a permanent
    /// failure of the open database, so the relay must stop *before* the disk
    /// is full; the headroom also keeps delivery bookkeeping writable.
    pub min_free_bytes: Option<u64>,
}

/// A due queue entry handed to a delivery worker.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lease {
    pub due_ms: u64,
    pub id: u64,
    pub record: QueueRecord,
}

/// Result of [`Store::due`].
#[derive(Debug, Default)]
pub struct Due {
    pub leases: Vec<Lease>,
    /// Due time of the first pending entry not returned (and not skipped), if any.
    pub next_due_ms: Option<u64>,
}

/// A dead-lettered delivery.
#[derive(Debug, Clone)]
pub struct DeadEntry {
    pub id: u64,
    pub record: DeadRecord,
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
    due: BTreeMap<(u64, u64), QueueRecord>,
    /// The same message ids, for the oldest-pending figure.
    pending: BTreeSet<u64>,
    dead: usize,
}

/// Cheap to clone; all clones share one database and one flusher.
#[derive(Clone)]
pub struct Store {
    inner: Arc<Inner>,
}

struct Inner {
    path: PathBuf,
    db: sled::Db,
    meta: sled::Tree,
    messages: sled::Tree,
    state: sled::Tree,
    uid: String,
    last_id: AtomicU64,
    max_bytes: Option<u64>,
    bytes: AtomicU64,
    min_free_bytes: Option<u64>,
    /// Free bytes on the store's filesystem and when that was read (unix ms).
    free: AtomicU64,
    free_read_ms: AtomicU64,
    /// Settling writes made since the last flush (for the idle flush ticker).
    dirty: AtomicBool,
    closed: AtomicBool,
    commit: Arc<GroupCommit>,
    stop: Arc<AtomicBool>,
    ticker_stop: tokio_util::sync::CancellationToken,
    tasks: Mutex<Vec<tokio::task::JoinHandle<()>>>,
    index: Mutex<HashMap<String, DestIndex>>,
    /// Pending + dead deliveries per message id, striped by id.
    refs: Vec<Mutex<HashMap<u64, u32>>>,
}

/// Lock stripes for per-message reference counts.
const REF_STRIPES: usize = 64;

/// How often settled deliveries are flushed when no ingress flush happens.
const IDLE_FLUSH: Duration = Duration::from_millis(500);

pub fn now_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

impl Store {
    /// Opens (or creates) the store at `path`. Must run inside a tokio runtime:
    /// it starts the flusher. `on_flush` observes each flush (duration, ok).
    pub fn open(
        path: &Path,
        opts: StoreOptions,
        on_flush: impl Fn(Duration, bool) + Send + 'static,
    ) -> Result<Store, StoreError> {
        let config = sled::Config::new()
            .path(path)
            .mode(sled::Mode::HighThroughput)
            .cache_capacity(opts.cache_bytes.unwrap_or(32 * 1024 * 1024))
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
                Err(source) => return Err(StoreError::Open { path: path.to_path_buf(), source }),
            }
        };
        let meta = db.open_tree("meta")?;
        check_format(path, &db, &meta)?;
        let uid = match meta.get("uid")? {
            Some(v) => v.iter().map(|b| format!("{b:02x}")).collect::<String>(),
            None => {
                let bytes: [u8; 4] = rand::random();
                meta.insert("uid", &bytes)?;
                bytes.iter().map(|b| format!("{b:02x}")).collect()
            }
        };
        let messages = db.open_tree("messages")?;
        let state = db.open_tree("state")?;

        let recover::Rebuilt { index, refs, bytes, last_id } = recover::rebuild(&meta, &messages, &state)?;

        let commit = GroupCommit::new();
        let stop = Arc::new(AtomicBool::new(false));
        let inner = Arc::new(Inner {
            path: path.to_path_buf(),
            db: db.clone(),
            meta,
            messages,
            state,
            uid,
            last_id: AtomicU64::new(last_id),
            max_bytes: opts.max_bytes,
            bytes: AtomicU64::new(bytes),
            min_free_bytes: opts.min_free_bytes,
            free: AtomicU64::new(free_space(path).unwrap_or(u64::MAX)),
            free_read_ms: AtomicU64::new(now_ms()),
            dirty: AtomicBool::new(false),
            closed: AtomicBool::new(false),
            commit: commit.clone(),
            stop: stop.clone(),
            ticker_stop: tokio_util::sync::CancellationToken::new(),
            tasks: Mutex::new(Vec::new()),
            index: Mutex::new(index),
            refs,
        });
        let durability = commit::Durability::open(path)
            .map_err(|e| StoreError::Open { path: path.to_path_buf(), source: sled::Error::Io(e) })?;
        let flusher = tokio::spawn(commit.clone().run(db, durability, stop.clone(), on_flush));
        let weak = Arc::downgrade(&inner);
        let ticker_stop = inner.ticker_stop.clone();
        let ticker = tokio::spawn(async move {
            let mut tick = tokio::time::interval(IDLE_FLUSH);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = tick.tick() => {}
                    _ = ticker_stop.cancelled() => return,
                }
                let Some(inner) = weak.upgrade() else { return };
                if inner.dirty.swap(false, Ordering::SeqCst) {
                    inner.commit.poke();
                }
            }
        });
        if let Ok(mut tasks) = inner.tasks.lock() {
            tasks.push(flusher);
            tasks.push(ticker);
        }
        Ok(Store { inner })
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

    /// Writes a message for `destinations`, pending for each and due now,
    /// in one insert. Not durable until [`Store::sync`] returns.
    pub fn append(&self, msg: &MessageRecord, destinations: &[Arc<str>]) -> Result<u64, StoreError> {
        let inner = &self.inner;
        if inner.closed.load(Ordering::SeqCst) {
            return Err(StoreError::Closed);
        }
        if let Some(min) = inner.min_free_bytes {
            let free = self.free_bytes();
            if free < min {
                return Err(StoreError::DiskFull { free, min });
            }
        }
        let value = msg.encode_for(destinations);
        if let Some(limit) = inner.max_bytes {
            let used = inner.bytes.load(Ordering::Relaxed);
            if used + value.len() as u64 > limit {
                return Err(StoreError::Full { used, limit });
            }
        }
        let id = self.next_id(msg.received_ms);
        let len = value.len() as u64;
        {
            let mut refs = self.refs_of(id);
            if let Err(e) = inner.messages.insert(id_key(id), value) {
                inner.commit.note_failure();
                return Err(e.into());
            }
            refs.insert(id, destinations.len() as u32);
        }
        inner.bytes.fetch_add(len, Ordering::Relaxed);
        let mut index = self.index();
        for d in destinations {
            let e = index.entry(d.to_string()).or_default();
            e.due.insert((msg.received_ms, id), QueueRecord::default());
            e.pending.insert(id);
        }
        Ok(id)
    }

    fn index(&self) -> std::sync::MutexGuard<'_, HashMap<String, DestIndex>> {
        // Every update under this lock is a few map operations that cannot
        // panic midway, so a poisoned lock still guards a consistent map.
        self.inner.index.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether `lease` is still pending as leased (not settled or moved since).
    fn is_current(&self, dest: &str, lease: &Lease) -> bool {
        self.index().get(dest).is_some_and(|e| e.due.contains_key(&(lease.due_ms, lease.id)))
    }

    /// Free bytes on the store's filesystem, re-read at most every 100 ms
    /// (one `statvfs` per 100 ms keeps it off the per-request cost).
    pub fn free_bytes(&self) -> u64 {
        const REFRESH_MS: u64 = 100;
        let inner = &self.inner;
        let now = now_ms();
        let last = inner.free_read_ms.load(Ordering::Relaxed);
        if now.saturating_sub(last) >= REFRESH_MS
            && inner.free_read_ms.compare_exchange(last, now, Ordering::AcqRel, Ordering::Relaxed).is_ok()
        {
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

    /// Up to `limit` entries of `dest` due at `now_ms`, oldest due first,
    /// skipping ids in `skip` (those already being delivered).
    pub fn due(&self, dest: &str, now_ms: u64, limit: usize, skip: &HashSet<u64>) -> Result<Due, StoreError> {
        let mut due = Due::default();
        let index = self.index();
        let Some(e) = index.get(dest) else { return Ok(due) };
        for (&(due_ms, id), record) in &e.due {
            if skip.contains(&id) {
                continue;
            }
            if due_ms > now_ms || due.leases.len() >= limit {
                due.next_due_ms = Some(due_ms);
                break;
            }
            due.leases.push(Lease { due_ms, id, record: record.clone() });
        }
        Ok(due)
    }

    /// The message `id`, if it is still stored.
    pub fn load(&self, id: u64) -> Result<Option<MessageRecord>, StoreError> {
        match self.inner.messages.get(id_key(id))? {
            Some(v) => Ok(Some(MessageRecord::decode(Bytes::copy_from_slice(&v))?)),
            None => Ok(None),
        }
    }

    fn refs_of(&self, id: u64) -> std::sync::MutexGuard<'_, HashMap<u64, u32>> {
        let stripe = &self.inner.refs[(id as usize) % REF_STRIPES];
        // A poisoned stripe only means a panic elsewhere while holding it; the
        // map itself is still consistent (every update is a single insert).
        stripe.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Removes a settled lease from the in-memory queue.
    fn unqueue(&self, dest: &str, lease: &Lease) {
        if let Some(e) = self.index().get_mut(dest) {
            e.due.remove(&(lease.due_ms, lease.id));
            e.pending.remove(&lease.id);
        }
    }

    /// Drops one reference to message `id`; the last one deletes the message
    /// (first) and every state key of it (after). Caller holds `refs`.
    fn release(&self, refs: &mut HashMap<u64, u32>, dest: &str, id: u64) -> Result<(), StoreError> {
        let inner = &self.inner;
        let count = refs.get(&id).copied().unwrap_or(0);
        if count > 1 {
            inner.state.insert(state_key(dest, id), StateRecord::Done.encode())?;
            refs.insert(id, count - 1);
            return Ok(());
        }
        if let Some(v) = inner.messages.remove(id_key(id))? {
            inner.bytes.fetch_sub(v.len() as u64, Ordering::Relaxed);
            for d in record_destinations(&v)? {
                inner.state.remove(state_key(&d, id))?;
            }
        }
        refs.remove(&id);
        Ok(())
    }

    /// Settles a lease as delivered; the message is deleted when no other
    /// destination still needs it.
    pub fn delivered(&self, dest: &str, lease: &Lease) -> Result<(), StoreError> {
        let mut refs = self.refs_of(lease.id);
        if !self.is_current(dest, lease) {
            return Ok(());
        }
        self.release(&mut refs, dest, lease.id)?;
        self.unqueue(dest, lease);
        drop(refs);
        self.inner.dirty.store(true, Ordering::SeqCst);
        Ok(())
    }

    /// Moves a lease to a new due time with an updated record.
    pub fn reschedule(&self, dest: &str, lease: &Lease, due_ms: u64, record: &QueueRecord) -> Result<(), StoreError> {
        let _refs = self.refs_of(lease.id);
        if !self.is_current(dest, lease) {
            return Ok(());
        }
        let st = StateRecord::Retry { due_ms, record: record.clone() };
        self.inner.state.insert(state_key(dest, lease.id), st.encode())?;
        if let Some(e) = self.index().get_mut(dest) {
            e.due.remove(&(lease.due_ms, lease.id));
            e.due.insert((due_ms, lease.id), record.clone());
        }
        self.inner.dirty.store(true, Ordering::SeqCst);
        Ok(())
    }

    /// Moves a lease to the dead-letter store (the message stays referenced).
    pub fn dead_letter(&self, dest: &str, lease: &Lease, record: &DeadRecord) -> Result<(), StoreError> {
        let _refs = self.refs_of(lease.id);
        if !self.is_current(dest, lease) {
            return Ok(());
        }
        self.inner.state.insert(state_key(dest, lease.id), StateRecord::Dead(record.clone()).encode())?;
        if let Some(e) = self.index().get_mut(dest) {
            e.due.remove(&(lease.due_ms, lease.id));
            e.pending.remove(&lease.id);
            e.dead += 1;
        }
        self.inner.dirty.store(true, Ordering::SeqCst);
        Ok(())
    }

    /// Drops a lease whose message is missing (should never happen; kept so
    /// a damaged store cannot wedge a destination).
    pub fn drop_orphan(&self, dest: &str, lease: &Lease) -> Result<(), StoreError> {
        let mut refs = self.refs_of(lease.id);
        self.inner.state.remove(state_key(dest, lease.id))?;
        match refs.get(&lease.id).copied() {
            Some(n) if n > 1 => refs.insert(lease.id, n - 1),
            _ => refs.remove(&lease.id),
        };
        self.unqueue(dest, lease);
        Ok(())
    }

    /// Up to `limit` dead letters of `dest`, oldest message first.
    pub fn dead_letters(&self, dest: &str, limit: usize) -> Result<Vec<DeadEntry>, StoreError> {
        let mut out = Vec::new();
        for item in self.inner.state.scan_prefix(dest_prefix(dest)) {
            if out.len() >= limit {
                break;
            }
            let (k, v) = item?;
            if let StateRecord::Dead(record) = StateRecord::decode(&v)? {
                out.push(DeadEntry { id: parse_state_key(&k)?.1, record });
            }
        }
        Ok(out)
    }

    /// Moves dead letters of `dest` back into its queue, due now, with a fresh
    /// attempt count. `only` restricts it to one message. Returns how many.
    pub async fn replay_dead(&self, dest: &str, only: Option<u64>) -> Result<usize, StoreError> {
        let ids: Vec<u64> = match only {
            Some(id) => vec![id],
            None => self.dead_letters(dest, usize::MAX)?.into_iter().map(|e| e.id).collect(),
        };
        let now = now_ms();
        let mut moved = 0;
        for id in ids {
            let _refs = self.refs_of(id);
            let key = state_key(dest, id);
            let is_dead = match self.inner.state.get(&key)? {
                Some(v) => matches!(StateRecord::decode(&v)?, StateRecord::Dead(_)),
                None => false,
            };
            if !is_dead {
                continue;
            }
            let st = StateRecord::Retry { due_ms: now, record: QueueRecord::default() };
            self.inner.state.insert(key, st.encode())?;
            let mut index = self.index();
            let e = index.entry(dest.to_string()).or_default();
            e.due.insert((now, id), QueueRecord::default());
            e.pending.insert(id);
            e.dead = e.dead.saturating_sub(1);
            moved += 1;
        }
        // An operator action: make it durable before answering.
        self.sync().await?;
        Ok(moved)
    }

    /// Deletes dead letters of `dest` (all, or the one `only` names): each
    /// counts as settled, and a message nothing else needs is deleted.
    /// Returns how many.
    pub async fn purge_dead(&self, dest: &str, only: Option<u64>) -> Result<usize, StoreError> {
        let ids: Vec<u64> = match only {
            Some(id) => vec![id],
            None => self.dead_letters(dest, usize::MAX)?.into_iter().map(|e| e.id).collect(),
        };
        let mut purged = 0;
        for id in ids {
            let mut refs = self.refs_of(id);
            let is_dead = match self.inner.state.get(state_key(dest, id))? {
                Some(v) => matches!(StateRecord::decode(&v)?, StateRecord::Dead(_)),
                None => false,
            };
            if !is_dead {
                continue;
            }
            self.release(&mut refs, dest, id)?;
            if let Some(e) = self.index().get_mut(dest) {
                e.dead = e.dead.saturating_sub(1);
            }
            purged += 1;
        }
        self.sync().await?;
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
        match self.inner.index.lock() {
            Ok(index) => {
                index.iter().filter(|(_, e)| !e.pending.is_empty() || e.dead > 0).map(|(k, _)| k.clone()).collect()
            }
            Err(_) => Vec::new(),
        }
    }

    /// Bytes of stored messages (what `max_bytes` limits).
    pub fn bytes(&self) -> u64 {
        self.inner.bytes.load(Ordering::Relaxed)
    }

    pub fn max_bytes(&self) -> Option<u64> {
        self.inner.max_bytes
    }

    /// Size of the database files on disk.
    pub fn disk_bytes(&self) -> u64 {
        self.inner.db.size_on_disk().unwrap_or(0)
    }

    /// False once flushes keep failing. sled 0.34 makes an I/O error (such
    /// as running out of disk, if something else filled it past
    /// `min_free_bytes`) permanent for the open database; only reopening it,
    /// i.e. restarting the process, recovers. `/healthz` reports this so a
    /// supervisor (Kubernetes liveness probe) restarts the relay.
    pub fn is_healthy(&self) -> bool {
        // A few in a row: one failure may be a passing fault.
        const FAILURES: u64 = 3;
        self.inner.commit.failing() < FAILURES
    }

    pub fn is_closed(&self) -> bool {
        self.inner.closed.load(Ordering::SeqCst)
    }

    /// Refuses further appends, flushes everything and stops the flusher.
    pub async fn close(&self) -> Result<(), StoreError> {
        let inner = &self.inner;
        if inner.closed.swap(true, Ordering::SeqCst) {
            return Ok(());
        }
        // Best effort from here on: whatever fails, the flusher and ticker
        // must stop so the database is released (a restart reopens it).
        let saved = inner.meta.insert("last_id", &inner.last_id.load(Ordering::SeqCst).to_be_bytes());
        inner.stop.store(true, Ordering::SeqCst);
        inner.ticker_stop.cancel();
        inner.commit.poke();
        let tasks = match inner.tasks.lock() {
            Ok(mut t) => std::mem::take(&mut *t),
            Err(_) => Vec::new(),
        };
        for t in tasks {
            let _ = t.await;
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
fn free_space(path: &Path) -> Option<u64> {
    let st = nix::sys::statvfs::statvfs(path).ok()?;
    Some((st.blocks_available() as u64).saturating_mul(st.fragment_size() as u64))
}

/// Checks (or, for a new store, writes) the format marker. Never deletes.
fn check_format(path: &Path, db: &sled::Db, meta: &sled::Tree) -> Result<(), StoreError> {
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
            meta.insert("format", &FORMAT_VERSION.to_be_bytes())?;
            db.flush()?;
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests;
