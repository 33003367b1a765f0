//! Recovery at open: reads the message log and sled's `kept` copies, applies
//! each delivery's `state`, and rebuilds the in-memory due queues, live
//! messages, per-segment live counts and byte count. It removes only what a
//! crash can leave behind: a kept copy every destination is done with, and
//! state keys of messages that are in neither the log nor `kept`.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::Path;
use std::sync::Mutex;

use super::format::*;
use super::segments::SegmentLog;
use super::{DestIndex, Msg, Place, QueueRecord, StateRecord, StoreError, MSG_STRIPES};

pub(super) struct Rebuilt {
    pub log: SegmentLog,
    pub index: HashMap<String, DestIndex>,
    pub msgs: Vec<Mutex<HashMap<u64, Msg>>>,
    pub live: BTreeMap<u64, u32>,
    pub bytes: u64,
    pub last_id: u64,
}

struct Builder {
    states: HashMap<(String, u64), StateRecord>,
    index: HashMap<String, DestIndex>,
    msgs: Vec<HashMap<u64, Msg>>,
    bytes: u64,
}

impl Builder {
    /// Queues what is left of message `id` from its state keys; returns
    /// whether anything still needs it.
    fn add(&mut self, id: u64, raw: &[u8], place: Place) -> Result<bool, StoreError> {
        let (mut pending, mut dead) = (0u32, 0u32);
        for dest in record_destinations(raw)? {
            let e = self.index.entry(dest.clone()).or_default();
            match self.states.get(&(dest, id)) {
                Some(StateRecord::Done) => continue,
                Some(StateRecord::Dead(_)) => {
                    e.dead += 1;
                    dead += 1;
                }
                Some(StateRecord::Retry { due_ms, record }) => {
                    e.due.insert((*due_ms, id), record.clone());
                    e.pending.insert(id);
                    pending += 1;
                }
                None => {
                    e.due.insert((id_received_ms(id), id), QueueRecord::default());
                    e.pending.insert(id);
                    pending += 1;
                }
            }
        }
        if pending + dead == 0 {
            return Ok(false);
        }
        let len = raw.len() as u64;
        self.bytes += len;
        let origin = match place {
            Place::Log(loc) => Some(loc.seg),
            _ => None,
        };
        self.msgs[(id as usize) % MSG_STRIPES].insert(id, Msg { place, origin, len, pending, dead });
        Ok(true)
    }
}

pub(super) fn rebuild(
    log_dir: &Path,
    segment_bytes: u64,
    meta: &sled::Tree,
    state: &sled::Tree,
    kept: &sled::Tree,
) -> Result<Rebuilt, StoreError> {
    let mut last_id = match meta.get("last_id")? {
        Some(v) => decode_u64(&v, "meta last_id")?,
        None => 0,
    };
    let mut b = Builder {
        states: HashMap::new(),
        index: HashMap::new(),
        msgs: (0..MSG_STRIPES).map(|_| HashMap::new()).collect(),
        bytes: 0,
    };
    for item in state.iter() {
        let (k, v) = item?;
        let (dest, id) = parse_state_key(&k)?;
        b.states.insert((dest.to_string(), id), StateRecord::decode(&v)?);
    }
    // Ids whose state keys must stay: in `kept`, or in a segment that stays.
    let mut known: HashSet<u64> = HashSet::new();
    let mut kept_ids = HashSet::new();
    let mut finished_kept = Vec::new();
    for item in kept.iter() {
        let (k, v) = item?;
        let id = parse_id_key(&k)?;
        last_id = last_id.max(id);
        kept_ids.insert(id);
        if b.add(id, &v, Place::Kept)? {
            known.insert(id);
        } else {
            finished_kept.push(id);
        }
    }
    // A kept copy is authoritative; its original in the log is skipped.
    // Every message with a frame keeps its state keys until its segment is
    // deleted (emptied segments are deleted by the reclaimer after open).
    let mut live: BTreeMap<u64, u32> = BTreeMap::new();
    let log = SegmentLog::open(log_dir, segment_bytes, |r| {
        last_id = last_id.max(r.id);
        known.insert(r.id);
        if kept_ids.contains(&r.id) {
            if let Some(m) = b.msgs[(r.id as usize) % MSG_STRIPES].get_mut(&r.id) {
                m.origin = Some(r.loc.seg);
            }
        } else if b.add(r.id, r.record, Place::Log(r.loc))? {
            *live.entry(r.loc.seg).or_default() += 1;
        }
        Ok(())
    })?;
    // A kept copy nothing needs: its last settle was interrupted.
    for id in finished_kept {
        kept.remove(id_key(id))?;
    }
    // State keys of messages that are nowhere: left by a crash after a
    // segment was deleted, or after a kept copy was.
    let stale: Vec<Vec<u8>> =
        b.states.keys().filter(|(_, id)| !known.contains(id)).map(|(dest, id)| state_key(dest, *id)).collect();
    for k in stale {
        state.remove(k)?;
    }
    Ok(Rebuilt {
        log,
        index: b.index,
        msgs: b.msgs.into_iter().map(Mutex::new).collect(),
        live,
        bytes: b.bytes,
        last_id,
    })
}
