//! Recovery at open: rebuilds the in-memory due queues, reference counts and
//! byte count from the `messages` and `state` trees, and removes what an
//! interrupted last settle can leave behind (a message every destination is
//! done with; state keys of a message already deleted). Nothing else is ever
//! deleted here.

use std::collections::HashMap;
use std::sync::Mutex;

use super::format::*;
use super::{DestIndex, QueueRecord, StateRecord, StoreError, REF_STRIPES};

pub(super) struct Rebuilt {
    pub index: HashMap<String, DestIndex>,
    pub refs: Vec<Mutex<HashMap<u64, u32>>>,
    pub bytes: u64,
    pub last_id: u64,
}

pub(super) fn rebuild(meta: &sled::Tree, messages: &sled::Tree, state: &sled::Tree) -> Result<Rebuilt, StoreError> {
    let mut last_id = match meta.get("last_id")? {
        Some(v) => decode_u64(&v, "meta last_id")?,
        None => 0,
    };
    let mut states: HashMap<(String, u64), StateRecord> = HashMap::new();
    for item in state.iter() {
        let (k, v) = item?;
        let (dest, id) = parse_state_key(&k)?;
        states.insert((dest.to_string(), id), StateRecord::decode(&v)?);
    }
    let mut index: HashMap<String, DestIndex> = HashMap::new();
    let refs: Vec<Mutex<HashMap<u64, u32>>> = (0..REF_STRIPES).map(|_| Mutex::default()).collect();
    let mut bytes = 0u64;
    let mut finished = Vec::new();
    for item in messages.iter() {
        let (k, v) = item?;
        let id = parse_id_key(&k)?;
        last_id = last_id.max(id);
        let mut count = 0u32;
        for dest in record_destinations(&v)? {
            let e = index.entry(dest.clone()).or_default();
            match states.remove(&(dest, id)) {
                Some(StateRecord::Done) => continue,
                Some(StateRecord::Dead(_)) => e.dead += 1,
                Some(StateRecord::Retry { due_ms, record }) => {
                    e.due.insert((due_ms, id), record);
                    e.pending.insert(id);
                }
                None => {
                    e.due.insert((id_received_ms(id), id), QueueRecord::default());
                    e.pending.insert(id);
                }
            }
            count += 1;
        }
        if count == 0 {
            finished.push(k);
        } else {
            bytes += v.len() as u64;
            if let Ok(mut stripe) = refs[(id as usize) % REF_STRIPES].lock() {
                stripe.insert(id, count);
            }
        }
    }
    // Messages every destination is done with, and states of messages
    // already deleted: both left by a crash in the middle of a last settle.
    for k in finished {
        let id = parse_id_key(&k)?;
        if let Some(v) = messages.remove(&k)? {
            for dest in record_destinations(&v)? {
                state.remove(state_key(&dest, id))?;
            }
        }
    }
    for (dest, id) in states.keys() {
        state.remove(state_key(dest, *id))?;
    }

    Ok(Rebuilt { index, refs, bytes, last_id })
}
