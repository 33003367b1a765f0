//! Opening and closing the store, and the background work it runs: the
//! two flusher threads (started here, their flushes are in `flush.rs`),
//! the idle ticker (a flush backstop every 500 ms, sparse-segment checks)
//! and the reclaimer (deleting emptied segments). Opening runs recovery
//! (`recover.rs`) and is blocking: `open_async` runs it on the
//! blocking pool.

use super::*;

impl Local {
    /// `Local::open` on the blocking pool: recovery reads the whole log
    /// and sled, which must not hold a runtime thread.
    pub async fn open_async(
        path: &Path,
        opts: StoreOptions,
        on_flush: impl Fn(Duration, bool) + Send + Sync + 'static,
    ) -> Result<Local, StoreError> {
        let path = path.to_path_buf();
        blocking(move || Local::open(&path, opts, on_flush)).await
    }

    /// Opens (or creates) the store at `path`. Must run inside a tokio runtime:
    /// it starts the flusher. `on_flush` observes each flush (duration, ok).
    /// Long on purpose: one sequence (lock, check the format, rebuild, build
    /// `Inner` field by field, start the threads), each step once.
    pub fn open(
        path: &Path,
        opts: StoreOptions,
        on_flush: impl Fn(Duration, bool) + Send + Sync + 'static,
    ) -> Result<Local, StoreError> {
        let store_lock = lock_dir(path)?;
        refuse_links(path)?;
        let db = open_sled(path, opts.cache_bytes)?;
        let meta = db.open_tree("meta")?;
        let log_dir = path.join(SEGMENTS_DIR);
        if log_dir.is_dir() {
            refuse_links(&log_dir)?;
        }
        check_format(path, &db, &meta, &log_dir)?;
        let new_store = meta.get("uid")?.is_none();
        let uid = store_uid(&meta)?;
        let paused = paused_destinations(&meta)?;
        let state = db.open_tree("state")?;
        let kept = db.open_tree("kept")?;
        let dedupe = db.open_tree("dedupe")?;
        let retained = db.open_tree("retained")?;
        let segment_bytes = opts.segment_bytes.unwrap_or(DEFAULT_SEGMENT_BYTES).max(1);
        let recover::Rebuilt {
            log,
            index,
            msgs,
            live,
            bytes,
            last_id,
            dedupe_keys,
            lookup,
            retained: retained_count,
            retained_bytes,
            done_trees,
            mark_batches,
        } = recover::rebuild(
            opts.disk.0.clone(),
            opts.sealer.clone(),
            opts.dedupe_retention.is_some(),
            &db,
            &log_dir,
            segment_bytes,
            opts.cut_damaged_log,
            &meta,
            &state,
            &kept,
            &retained,
        )?;

        let commit = GroupCommit::new();
        let state_commit = GroupCommit::paced(SETTLE_FLUSH_PACE);
        let stop = Arc::new(AtomicBool::new(false));
        let inner = Arc::new(Inner {
            path: path.to_path_buf(),
            _lock: store_lock,
            db: db.clone(),
            meta,
            state,
            kept,
            retained,
            retain_ms: opts.retain_delivered.map_or(0, |d| d.as_millis() as u64),
            retained_count: AtomicU64::new(retained_count),
            retained_bytes: AtomicU64::new(retained_bytes),
            retain_max_bytes: opts.retain_max_bytes,
            retained_unplaced: Mutex::new(HashSet::new()),
            remembered: Mutex::new(remember(&dedupe, &dedupe_keys, &opts)?),
            dedupe,
            lookup: Mutex::new(lookup),
            sealer: opts.sealer.clone(),
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
            index: Index::new(index),
            msgs,
            cache: Mutex::new(RecordCache::default()),
            reads: Mutex::new(Default::default()),
            live: Mutex::new(live),
            done_trees: Mutex::new(done_trees),
            marks: Mutex::new(Default::default()),
            mark_batches: AtomicU64::new(mark_batches),
            retained_waiting: Mutex::new(Default::default()),
            unneeded: Mutex::new(BTreeSet::new()),
            evacuate_candidates: Mutex::new(BTreeSet::new()),
            paused: Mutex::new(paused),
            reclaim: Arc::new(tokio::sync::Notify::new()),
            reclaiming: tokio::sync::Mutex::new(()),
        });
        *lock(&inner.flushers) = start_flushers(&inner, path, stop, Arc::new(on_flush))?;
        if new_store {
            // The uid's sync (see `store_uid`).
            inner.sled_written();
        }
        let evacuate_every = opts.evacuate_every.unwrap_or(EVACUATE_EVERY);
        let sweep_every = opts.sweep_every.unwrap_or_else(|| {
            (opts.retain_delivered.unwrap_or_default() / 10).clamp(Duration::from_secs(1), Duration::from_secs(60))
        });
        let ticker = tokio::spawn(Self::idle_ticker(
            Arc::downgrade(&inner),
            inner.ticker_stop.clone(),
            evacuate_every,
            sweep_every,
        ));
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
        Ok(Local { inner })
    }

    /// Pokes the flusher when settling writes wait for a flush and no
    /// ingress flush comes along; every `evacuate_every`, evacuates sparse
    /// segments; every `sweep_every`, forgets retained messages past their
    /// time.
    pub(super) async fn idle_ticker(
        weak: std::sync::Weak<Inner>,
        stop: tokio_util::sync::CancellationToken,
        evacuate_every: Duration,
        sweep_every: Duration,
    ) {
        let mut tick = tokio::time::interval(IDLE_FLUSH.min(sweep_every).max(Duration::from_millis(10)));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut last_evacuation = tokio::time::Instant::now();
        let mut last_sweep = tokio::time::Instant::now();
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = stop.cancelled() => return,
            }
            let Some(inner) = weak.upgrade() else { return };
            if inner.sled_dirty.load(Ordering::SeqCst) {
                inner.state_commit.poke();
            }
            let retaining = inner.retain_ms > 0 || inner.retained_count.load(Ordering::Relaxed) > 0;
            if retaining && last_sweep.elapsed() >= sweep_every {
                last_sweep = tokio::time::Instant::now();
                let store = Local { inner: inner.clone() };
                match tokio::task::spawn_blocking(move || store.sweep_retained(now_ms())).await {
                    Ok(Ok(_)) => {}
                    Ok(Err(e)) => tracing::warn!(error = %e, "could not forget retained messages past their time"),
                    Err(e) => tracing::warn!(error = %e, "the sweep of retained messages stopped"),
                }
            }
            if last_evacuation.elapsed() >= evacuate_every {
                last_evacuation = tokio::time::Instant::now();
                let store = Local { inner };
                match tokio::task::spawn_blocking(move || store.evacuate_sparse().and_then(|_| store.prune_dedupe()))
                    .await
                {
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
    pub(super) async fn reclaimer(
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

    /// Stops the ticker and the reclaimer, then the two flusher threads
    /// (each makes one last flush when it sees `stop`), and waits for all.
    async fn stop_background(&self) {
        let inner = &self.inner;
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

    /// Stops the store the way a crash would, for tests: the background
    /// threads stop (after the flusher's last flush), and nothing a clean
    /// close writes (`last_id`, where the log ended) is written.
    #[cfg(test)]
    pub(crate) async fn crash(&self) {
        let inner = &self.inner;
        inner.closed.store(true, Ordering::SeqCst);
        self.stop_background().await;
    }

    /// Refuses further appends, flushes everything and stops the flushers.
    pub async fn close(&self) -> Result<(), StoreError> {
        let inner = &self.inner;
        if inner.closed.swap(true, Ordering::SeqCst) {
            return Ok(());
        }
        // Best effort from here on: whatever fails, the flusher and ticker
        // must stop so the database is released (a restart reopens it).
        let saved = inner.meta.insert("last_id", &inner.last_id.load(Ordering::SeqCst).to_be_bytes());
        inner.sled_dirty.store(true, Ordering::SeqCst);
        self.stop_background().await;
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
        // The flusher's last flush may have started before the last settles
        // (their marks wait in memory): this is the one flush a clean
        // shutdown must not miss.
        let written = inner.write_marks().and_then(|()| inner.write_retained());
        let db = inner.db.clone();
        tokio::task::spawn_blocking(move || db.flush()).await.map_err(|_| StoreError::FlushFailed)??;
        written?;
        saved?;
        Ok(())
    }
}

/// Bytes available to unprivileged writers on the filesystem holding `path`.
/// Takes the store directory's lock file (`switchboard.lock`, holding the
/// owner's pid), so a second relay on the same store is refused with a clear
/// error instead of sled's. A lock still held by this process (a store being
/// closed while it reopens, in tests) is waited for a moment.
pub(super) fn lock_dir(path: &Path) -> Result<nix::fcntl::Flock<std::fs::File>, StoreError> {
    use nix::fcntl::{Flock, FlockArg};
    use std::io::Write;
    use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
    let io = |source| StoreError::OpenIo { path: path.to_path_buf(), source };
    std::fs::DirBuilder::new().recursive(true).mode(0o700).create(path).map_err(io)?;
    let lock_path = path.join("switchboard.lock");
    let started = std::time::Instant::now();
    loop {
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .custom_flags(nix::fcntl::OFlag::O_NOFOLLOW.bits())
            .open(&lock_path)
            .map_err(|e| no_link(&lock_path, e).unwrap_or_else(io))?;
        match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
            Ok(mut f) => {
                f.set_len(0).map_err(io)?;
                write!(f, "{}", std::process::id()).map_err(io)?;
                return Ok(f);
            }
            Err((_, nix::errno::Errno::EWOULDBLOCK)) if started.elapsed() < Duration::from_secs(2) => {
                // A retry wait for a lock (flock has no timeout), not a
                // synchronisation: bounded to 2 s, on the blocking pool.
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

/// A refusal to follow a link (`O_NOFOLLOW` answers `ELOOP`) as the
/// store's own error, naming the link; any other error as it is.
pub(super) fn no_link(path: &Path, e: std::io::Error) -> Result<StoreError, std::io::Error> {
    match e.raw_os_error() {
        Some(code) if code == nix::errno::Errno::ELOOP as i32 => Ok(StoreError::Link { path: path.to_path_buf() }),
        _ => Err(e),
    }
}

/// Refuses the store if an entry of its directory is a symbolic link: sled
/// opens its files itself, following links, so they are checked before it
/// does (segment files are opened with `O_NOFOLLOW`, see `disk.rs`).
pub(super) fn refuse_links(dir: &Path) -> Result<(), StoreError> {
    let entries = std::fs::read_dir(dir).map_err(|source| StoreError::OpenIo { path: dir.to_path_buf(), source })?;
    for entry in entries.flatten() {
        if entry.file_type().is_ok_and(|t| t.is_symlink()) {
            return Err(StoreError::Link { path: entry.path() });
        }
    }
    Ok(())
}

pub(super) fn free_space(path: &Path) -> Option<u64> {
    let st = nix::sys::statvfs::statvfs(path).ok()?;
    Some((st.blocks_available() as u64).saturating_mul(st.fragment_size() as u64))
}

/// Checks (or, for a new store, writes) the format marker. Never deletes.
pub(super) fn check_format(path: &Path, db: &sled::Db, meta: &sled::Tree, log_dir: &Path) -> Result<(), StoreError> {
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

/// Opens sled with our settings: no background flusher of its own (ours is
/// the only one, see `commit.rs`), a small page cache (it holds delivery
/// state and dead-lettered copies only).
pub(super) fn open_sled(path: &Path, cache_bytes: Option<u64>) -> Result<sled::Db, StoreError> {
    let config = sled::Config::new()
        .path(path)
        .mode(sled::Mode::HighThroughput)
        .cache_capacity(cache_bytes.unwrap_or(8 * 1024 * 1024))
        // Our flusher is the only one; sled's own background flusher would
        // run concurrently with it (see commit.rs for why that is avoided).
        .flush_every_ms(None);
    // sled releases its file lock from its I/O threads shortly after the
    // last handle is dropped, so reopening in the same process (a restart
    // in tests, or after a supervisor-less in-process restart) can find it
    // still held for a moment. A lock held by another process stays held
    // and is reported after the wait.
    let lock_wait = std::time::Instant::now();
    loop {
        match config.open() {
            Ok(db) => return Ok(db),
            Err(e)
                if e.to_string().contains("could not acquire lock") && lock_wait.elapsed() < Duration::from_secs(2) =>
            {
                // The same bounded retry wait, for sled's own lock.
                std::thread::sleep(Duration::from_millis(10));
            }
            Err(e) => return Err(StoreError::Open { path: path.to_path_buf(), source: Box::new(e.into()) }),
        }
    }
}

/// The store's random id (what external message ids carry), made at its
/// first open.
pub(super) fn store_uid(meta: &sled::Tree) -> Result<String, StoreError> {
    Ok(match meta.get("uid")? {
        Some(v) => v.iter().map(|b| format!("{b:02x}")).collect::<String>(),
        None => {
            let bytes: [u8; 4] = rand::random();
            meta.insert("uid", &bytes)?;
            // Every id this store acknowledges carries it: written out now
            // (a process crash keeps it; the flusher's first flush, asked
            // for at open, syncs it), not at the first settle's flush.
            meta.flush()?;
            bytes.iter().map(|b| format!("{b:02x}")).collect()
        }
    })
}

type Flush = Box<dyn FnMut() -> Result<(), StoreError> + Send>;

/// Two flusher threads: the log's (ingress acknowledgements wait for it,
/// and only for it) and sled's (a sled flush can take long when many
/// settling writes are dirty; acknowledgements must not wait for it).
pub(super) fn start_flushers(
    inner: &Arc<Inner>,
    path: &Path,
    stop: Arc<AtomicBool>,
    on_flush: Arc<dyn Fn(Duration, bool) + Send + Sync>,
) -> Result<Vec<std::thread::JoinHandle<()>>, StoreError> {
    let mut durability =
        commit::Durability::open(path).map_err(|source| StoreError::OpenIo { path: path.to_path_buf(), source })?;
    let weak = Arc::downgrade(inner);
    let log_flush = move || -> Result<(), StoreError> {
        let inner = weak.upgrade().ok_or(StoreError::Closed)?;
        inner.flush_log()
    };
    let weak = Arc::downgrade(inner);
    let state_flush = move || -> Result<(), StoreError> {
        let inner = weak.upgrade().ok_or(StoreError::Closed)?;
        inner.flush_state(&mut durability)
    };
    let observe = on_flush;
    let spawn = |name: &str, commit: Arc<GroupCommit>, flush: Flush, after_failure: &'static str| {
        let (stop, observe) = (stop.clone(), observe.clone());
        std::thread::Builder::new()
            .name(name.into())
            .spawn(move || commit.run(flush, &stop, after_failure, |took, ok| observe(took, ok)))
            .map_err(|source| StoreError::OpenIo { path: path.to_path_buf(), source })
    };
    let flushers = vec![
        spawn("switchboard-log", inner.commit.clone(), Box::new(log_flush), LOG_FLUSH_FAILED)?,
        spawn("switchboard-sled", inner.state_commit.clone(), Box::new(state_flush), STATE_FLUSH_FAILED)?,
    ];
    Ok(flushers)
}

/// Key prefix in `meta` of a paused destination (value: the reason).
pub(super) const PAUSED_PREFIX: &[u8] = b"paused:";

/// The destinations paused at run time, as persisted.
pub(super) fn paused_destinations(meta: &sled::Tree) -> Result<std::collections::HashMap<String, String>, StoreError> {
    let mut out = std::collections::HashMap::new();
    for item in meta.scan_prefix(PAUSED_PREFIX) {
        let (k, v) = item?;
        let name = String::from_utf8_lossy(&k[PAUSED_PREFIX.len()..]).into_owned();
        out.insert(name, String::from_utf8_lossy(&v).into_owned());
    }
    Ok(out)
}

/// The de-duplication keys kept at open: sled's (expired ones removed) and
/// those the log's records carry (inserted into sled before a crash
/// flushed them, perhaps not).
fn remember(
    tree: &sled::Tree,
    from_log: &[(u64, [u8; 16])],
    opts: &StoreOptions,
) -> Result<remembered::Remembered, StoreError> {
    let Some(retention) = opts.dedupe_retention else {
        return Ok(remembered::Remembered::new(0, 0));
    };
    let retention_ms = retention.as_millis() as u64;
    let now = now_ms();
    let mut keys: Vec<([u8; 16], u64, u64)> = Vec::new();
    for item in tree.iter() {
        let (k, v) = item?;
        let (Ok(key), true) = (<[u8; 16]>::try_from(&k[..]), v.len() == 16) else { continue };
        let id = decode_u64(&v[..8], "dedupe id")?;
        let at = decode_u64(&v[8..], "dedupe time")?;
        if now.saturating_sub(at) > retention_ms {
            tree.remove(k)?;
        } else {
            keys.push((key, id, at));
        }
    }
    for (id, key) in from_log {
        keys.push((*key, *id, id_received_ms(*id)));
    }
    keys.sort_by_key(|(_, id, _)| *id);
    let mut r = remembered::Remembered::new(opts.dedupe_max_keys, retention_ms);
    for (key, id, at) in keys {
        if now.saturating_sub(at) <= retention_ms {
            r.insert(key, id, at);
        }
    }
    Ok(r)
}
