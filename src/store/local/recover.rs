//! Recovery at open: reads the message log and sled's `kept` copies, applies
//! each delivery's `state` and `Done` marks, and rebuilds the in-memory due
//! queues, live messages, per-segment live counts and byte count. It removes
//! only what a crash can leave behind: a kept copy every destination is done
//! with (unless retained), `state` keys of messages no longer live (or
//! retained in `kept`), done trees of deleted segments, retained keys of
//! messages that are live again or whose record is gone. A retained message
//! in the log counts as live in its segment (it holds it), and its lookup
//! keys are rebuilt.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::num::NonZeroU64;
use std::path::Path;
use std::sync::Mutex;

use super::format::*;
use super::index::DestIndex;
use super::segments::SegmentLog;
use super::{Msg, Place, RetainedPlace, RetainedRecord, StateRecord, StoreError, MSG_STRIPES};

pub(super) struct Rebuilt {
    pub log: SegmentLog,
    pub index: HashMap<String, DestIndex>,
    pub msgs: Vec<Mutex<BTreeMap<u64, Msg>>>,
    pub live: BTreeMap<u64, u32>,
    pub bytes: u64,
    pub last_id: u64,
    /// De-duplication keys carried by the records of the log (id, key).
    pub dedupe_keys: Vec<(u64, [u8; 16])>,
    /// Lookup keys of the live and retained messages.
    pub lookup: super::lookup::Lookup,
    /// Messages retained after delivery, and their bytes.
    pub retained: u64,
    pub retained_bytes: u64,
    /// The done trees of the segments there are.
    pub done_trees: BTreeMap<u64, sled::Tree>,
    /// The number of the next batch of `Done` marks (`marks.rs`).
    pub mark_batches: u64,
}

struct Builder {
    states: HashMap<(String, u64), StateRecord>,
    /// Messages with keys in `state` (whatever marks override them).
    with_state: HashSet<u64>,
    index: HashMap<String, DestIndex>,
    msgs: Vec<BTreeMap<u64, Msg>>,
    bytes: u64,
    lookup: super::lookup::Lookup,
}

impl Builder {
    /// Queues what is left of message `id` from its state keys; returns
    /// whether anything still needs it.
    fn add(&mut self, id: u64, raw: &[u8], place: Place) -> Result<bool, StoreError> {
        let (mut pending, mut dead) = (0u32, 0u32);
        let marks = record_marks(raw)?;
        for dest in record_destinations(raw)? {
            let key = marks.order.iter().find(|(d, _)| *d == dest).map(|(_, k)| *k);
            let e = self.index.entry(dest.clone()).or_default();
            match self.states.get(&(dest, id)) {
                Some(StateRecord::Done { .. } | StateRecord::Purged) => continue,
                Some(StateRecord::Dead(_)) => {
                    e.recovered_dead(id, key);
                    dead += 1;
                }
                Some(StateRecord::Retry { due_ms, record, .. }) => {
                    e.recovered_pending(id, Some((*due_ms, record.clone())), key);
                    pending += 1;
                }
                None => {
                    e.recovered_pending(id, None, key);
                    pending += 1;
                }
            }
        }
        if pending + dead == 0 {
            return Ok(false);
        }
        let len = record_len(raw.len())?;
        self.bytes += u64::from(len);
        let has_state = matches!(place, Place::Kept(_)) || self.with_state.contains(&id);
        self.lookup.add(id, &marks.index);
        self.msgs[(id as usize) % MSG_STRIPES].insert(id, Msg { place, has_state, len, pending, dead });
        Ok(true)
    }
}

/// Rebuilds memory from disk: retained keys, done marks, kept copies,
/// then the log, then the clean-ups recovery decides on.
/// Long on purpose: one algorithm over one set of maps; its steps share
/// them and their order is the point (a kept copy wins over its frame, a
/// retained key holds only if nothing says otherwise).
#[allow(clippy::too_many_arguments)]
pub(super) fn rebuild(
    disk: std::sync::Arc<dyn super::disk::Disk>,
    sealer: Option<std::sync::Arc<super::seal::Sealer>>,
    with_dedupe: bool,
    db: &sled::Db,
    log_dir: &Path,
    segment_bytes: u64,
    cut_damaged: bool,
    meta: &sled::Tree,
    state: &sled::Tree,
    kept: &sled::Tree,
    retained_tree: &sled::Tree,
) -> Result<Rebuilt, StoreError> {
    let mut last_id = match meta.get("last_id")? {
        Some(v) => decode_u64(&v, "meta last_id")?,
        None => 0,
    };
    let mut b = Builder {
        states: HashMap::new(),
        with_state: HashSet::new(),
        index: HashMap::new(),
        msgs: (0..MSG_STRIPES).map(|_| BTreeMap::new()).collect(),
        bytes: 0,
        lookup: Default::default(),
    };
    let mut retained: BTreeMap<u64, RetainedRecord> = BTreeMap::new();
    for (id, v) in super::retained_blocks::oldest(retained_tree, u64::MAX, usize::MAX)? {
        retained.insert(id, RetainedRecord::decode(&v)?);
    }
    // Changes recovery makes to `retained`, written at the end.
    let mut retained_changes = super::retained_blocks::Waiting::new();
    let mut state_keys = Vec::new();
    for item in state.iter() {
        let (k, v) = item?;
        let (dest, id) = parse_state_key(&k)?;
        b.states.insert((dest.to_string(), id), StateRecord::decode(&v)?);
        b.with_state.insert(id);
        state_keys.push((k, id));
    }
    // A `Done` mark ends a delivery whatever `state` says.
    let mut done_trees = BTreeMap::new();
    let mut retained_marks: HashMap<u64, u32> = HashMap::new();
    let mut highest_batch = 0;
    for name in db.tree_names() {
        let Some(seq) = parse_done_tree_name(&name) else { continue };
        let tree = db.open_tree(&name)?;
        let highest = super::marks::for_each_mark(&tree, |dest, id, _| {
            // A retained message's marks are only counted (there may be
            // millions): the log scan checks it has them all.
            if retained.get(&id).is_some_and(|r| matches!(r.place, RetainedPlace::Log(loc) if loc.seg == seq)) {
                *retained_marks.entry(id).or_default() += 1;
                return Ok(());
            }
            b.states.insert((dest.to_string(), id), StateRecord::Done { history: Vec::new() });
            Ok(())
        })?;
        highest_batch = highest_batch.max(highest);
        done_trees.insert(seq, tree);
    }
    // Retained keys that no longer hold (a crash while a message was sent
    // again, or its record is gone): dropped after the reading.
    let mut stale = Vec::new();
    let mut retained_kept = HashSet::new();
    let mut kept_ids = HashSet::new();
    let mut finished_kept = Vec::new();
    for item in kept.iter() {
        let (k, v) = item?;
        let id = parse_id_key(&k)?;
        last_id = last_id.max(id);
        kept_ids.insert(id);
        let v = super::seal::Sealer::open(sealer.as_deref(), id, &v)?;
        let live = b.add(id, &v, Place::Kept(None))?;
        match retained.get(&id) {
            // Sent again (the retained key was to go last).
            Some(_) if live => stale.push(id),
            Some(r) if matches!(r.place, RetainedPlace::Kept { .. }) => {
                retained_kept.insert(id);
                b.lookup.add(id, &record_marks(&v)?.index);
            }
            _ if !live => finished_kept.push(id),
            _ => {}
        }
    }
    for (id, r) in &retained {
        if matches!(r.place, RetainedPlace::Kept { .. }) && !retained_kept.contains(id) && !kept_ids.contains(id) {
            stale.push(*id);
        }
    }
    let mut retained_log: HashSet<u64> = HashSet::new();
    // A kept copy is authoritative; its original in the log is skipped.
    // Every message with a frame keeps its state keys until its segment is
    // deleted (emptied segments are deleted by the reclaimer after open).
    let mut live: BTreeMap<u64, u32> = BTreeMap::new();
    let clean_end = match meta.get(CLEAN_END)? {
        Some(v) if v.len() == 16 => {
            Some((decode_u64(&v[..8], "meta clean_end")?, decode_u64(&v[8..], "meta clean_end")?))
        }
        Some(_) => {
            return Err(StoreError::Corrupt(DecodeError { what: "meta clean_end", detail: "expected 16 bytes".into() }))
        }
        None => None,
    };
    let mut dedupe_keys = Vec::new();
    let log = SegmentLog::open(disk, sealer, log_dir, segment_bytes, clean_end, cut_damaged, |r| {
        last_id = last_id.max(r.id);
        if kept_ids.contains(&r.id) {
            if let Some(m) = b.msgs[(r.id as usize) % MSG_STRIPES].get_mut(&r.id) {
                if let Place::Kept(origin) = &mut m.place {
                    *origin = NonZeroU64::new(r.loc.seg);
                }
            }
        } else {
            let counted = retained_marks.get(&r.id).map(|n| *n as usize);
            let all_marked = match counted {
                Some(n) => n == record_destinations(r.record)?.len(),
                None => false,
            };
            if counted.is_some() && !all_marked {
                // Counted but not all there (sent again, cut by a crash):
                // its marks as any message's.
                if let Some(tree) = done_trees.get(&r.loc.seg) {
                    for d in record_destinations(r.record)? {
                        if super::marks::find_in_tree(tree, &d, r.id)?.is_some() {
                            b.states.insert((d, r.id), StateRecord::Done { history: Vec::new() });
                        }
                    }
                }
            }
            if !all_marked && b.add(r.id, r.record, Place::Log(r.loc))? {
                *live.entry(r.loc.seg).or_default() += 1;
                if retained.contains_key(&r.id) {
                    stale.push(r.id);
                }
            } else if let Some(kept) = retained.get_mut(&r.id) {
                // Retained: it holds its segment.
                *live.entry(r.loc.seg).or_default() += 1;
                retained_log.insert(r.id);
                b.lookup.add(r.id, &record_marks(r.record)?.index);
                if kept.place != RetainedPlace::Log(r.loc) {
                    kept.place = RetainedPlace::Log(r.loc);
                    retained_changes.insert(r.id, Some(kept.encode()));
                }
            }
        }
        if with_dedupe {
            if let Some(key) = super::format::record_dedupe_key(&bytes::Bytes::copy_from_slice(r.record))? {
                dedupe_keys.push((r.id, key));
            }
        }
        Ok(())
    })?;
    // A kept copy nothing needs: its last settle was interrupted.
    for id in finished_kept {
        kept.remove(id_key(id))?;
    }
    // Retained in the log, but its frame is not there (cut by a repair, or
    // settled before a flush that never happened).
    for (id, r) in &retained {
        if !matches!(r.place, RetainedPlace::Kept { .. }) && !retained_log.contains(id) {
            stale.push(*id);
        }
    }
    for id in &stale {
        retained_changes.insert(*id, None);
        retained.remove(id);
    }
    super::retained_blocks::apply(retained_tree, &retained_changes)?;
    // `state` keys of messages that are no longer live: left by a crash in
    // the middle of a last settle (their `Done` marks are in place).
    let live_ids: HashSet<u64> = b.msgs.iter().flat_map(|m| m.keys().copied()).collect();
    for (k, id) in state_keys {
        if !live_ids.contains(&id) && !retained_kept.contains(&id) {
            state.remove(k)?;
        }
    }
    // Done trees of deleted segments (a crash after the file went).
    let present: HashSet<u64> = log.sealed().into_iter().chain([log.current()]).collect();
    let gone: Vec<u64> = done_trees.keys().filter(|s| !present.contains(s)).copied().collect();
    for seq in gone {
        done_trees.remove(&seq);
        db.drop_tree(done_tree_name(seq))?;
    }
    Ok(Rebuilt {
        log,
        index: b.index,
        msgs: b.msgs.into_iter().map(Mutex::new).collect(),
        live,
        bytes: b.bytes,
        last_id,
        dedupe_keys,
        lookup: b.lookup,
        retained: retained.len() as u64,
        // Records of earlier builds have no size: a log frame's is close.
        retained_bytes: retained
            .values()
            .map(|r| match (r.len, r.place) {
                (0, RetainedPlace::Log(loc)) => u64::from(loc.len),
                (len, _) => u64::from(len),
            })
            .sum(),
        done_trees,
        mark_batches: highest_batch + 1,
    })
}

/// A record's size as kept in memory; a record that would not fit in a log
/// frame (1 GiB, far above [`super::MAX_BODY`]) is refused.
pub(super) fn record_len(len: usize) -> Result<u32, StoreError> {
    u32::try_from(len).ok().filter(|l| *l <= super::segments::MAX_RECORD).ok_or(StoreError::TooLarge(len))
}
