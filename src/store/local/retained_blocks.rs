//! The `retained` tree, written in blocks.
//!
//! A message every destination is done with gets a `RetainedRecord` (kept
//! for `retain_delivered`, 24 h by default). One sled insert per finished
//! message was, after the `Done` marks (`marks.rs`), the largest sled cost
//! of a delivery: in a drain to one destination (harness run 7) 14.6 % of
//! the relay's CPU. So changes wait in memory (`put`, `None` to forget)
//! and the sled flusher writes them just before the flush that makes them
//! durable, as it writes marks: one read and one write of a block key per
//! block of receive time (16 ms) touched per flush. A block's key is
//! `0xff` and the block (u64 BE); its value the block's records in id
//! order, each (id u64 BE, length u32 BE, record). A message id's first
//! byte is never `0xff`, so records under their own id (stores written
//! before blocks) sort first, and both are read.
//!
//! Readers that walk the tree (the sweep, the byte bound) write the
//! waiting changes first; `get` looks at them first. The waiting map is
//! held while a flush writes it, so a reader never misses a record between
//! the two. Lock order: a message's stripe → `retained_waiting`.

use super::*;

/// Changes waiting for the next sled flush, by message id.
pub(super) type Waiting = BTreeMap<u64, Option<Vec<u8>>>;

const BLOCK_SHIFT: u32 = crate::store::ID_SEQ_BITS + 4;

fn block_key(id: u64) -> [u8; 9] {
    let mut k = [0xff; 9];
    k[1..].copy_from_slice(&(id >> BLOCK_SHIFT).to_be_bytes());
    k
}

fn is_block_key(k: &[u8]) -> bool {
    k.len() == 9 && k[0] == 0xff
}

fn decode_block(v: &[u8]) -> Result<BTreeMap<u64, Vec<u8>>, StoreError> {
    super::marks::entries(v).map(|e| e.map(|(id, r)| (id, r.to_vec()))).collect()
}

fn encode_block(records: &BTreeMap<u64, Vec<u8>>) -> Vec<u8> {
    let mut v = Vec::with_capacity(records.values().map(|r| r.len() + 12).sum());
    for (id, r) in records {
        super::marks::push_entry(&mut v, *id, r);
    }
    v
}

/// Applies `changes` to `tree` now: a read and a write (or removal) of each
/// block touched; records under their own id are removed when changed.
pub(super) fn apply(tree: &sled::Tree, changes: &Waiting) -> Result<(), StoreError> {
    type Change<'a> = (u64, &'a Option<Vec<u8>>);
    let mut by_block: BTreeMap<[u8; 9], Vec<Change<'_>>> = BTreeMap::new();
    for (id, change) in changes {
        by_block.entry(block_key(*id)).or_default().push((*id, change));
    }
    for (key, changes) in by_block {
        let mut records = match tree.get(key)? {
            Some(v) => decode_block(&v)?,
            None => BTreeMap::new(),
        };
        for (id, change) in changes {
            tree.remove(id_key(id))?;
            match change {
                Some(r) => records.insert(id, r.clone()),
                None => records.remove(&id),
            };
        }
        if records.is_empty() {
            tree.remove(key)?;
        } else {
            tree.insert(key, encode_block(&records))?;
        }
    }
    Ok(())
}

/// Record `id` as written in `tree` (under its own id or in its block).
fn get_in(tree: &sled::Tree, id: u64) -> Result<Option<Vec<u8>>, StoreError> {
    if let Some(v) = tree.get(id_key(id))? {
        return Ok(Some(v.to_vec()));
    }
    match tree.get(block_key(id))? {
        Some(v) => Ok(decode_block(&v)?.remove(&id)),
        None => Ok(None),
    }
}

/// The records of `tree` with ids below `end`, oldest first, at most
/// `limit` (recovery: all of them).
pub(super) fn oldest(tree: &sled::Tree, end: u64, limit: usize) -> Result<Vec<(u64, Vec<u8>)>, StoreError> {
    let mut found: BTreeMap<u64, Vec<u8>> = BTreeMap::new();
    for item in tree.range(..id_key(end)) {
        let (k, v) = item?;
        // Blocks sort after every record under its own id.
        if found.len() >= limit || is_block_key(&k) {
            break;
        }
        found.insert(parse_id_key(&k)?, v.to_vec());
    }
    let last = block_key(end);
    let mut from_blocks = 0;
    for item in tree.range([0xffu8; 1].as_slice()..=last.as_slice()) {
        let (k, v) = item?;
        if !is_block_key(&k) {
            continue;
        }
        for (id, r) in decode_block(&v)?.into_iter().filter(|(id, _)| *id < end) {
            found.insert(id, r);
            from_blocks += 1;
        }
        if from_blocks >= limit {
            break;
        }
    }
    Ok(found.into_iter().take(limit).collect())
}

impl Inner {
    /// Sets (or with `None` forgets) message `id`'s retained record at the
    /// next sled flush.
    pub(super) fn put_retained(&self, id: u64, record: Option<&RetainedRecord>) {
        lock(&self.retained_waiting).insert(id, record.map(RetainedRecord::encode));
        self.sled_written();
    }

    /// Message `id`'s retained record, waiting or written.
    pub(super) fn get_retained(&self, id: u64) -> Result<Option<RetainedRecord>, StoreError> {
        let waiting = lock(&self.retained_waiting);
        let v = match waiting.get(&id) {
            Some(change) => change.clone(),
            None => {
                drop(waiting);
                get_in(&self.retained, id)?
            }
        };
        v.map(|v| RetainedRecord::decode(&v)).transpose().map_err(StoreError::from)
    }

    /// Writes the waiting changes (the sled flusher before its flush; a
    /// reader before it walks the tree).
    pub(super) fn write_retained(&self) -> Result<(), StoreError> {
        let mut waiting = lock(&self.retained_waiting);
        if waiting.is_empty() {
            return Ok(());
        }
        apply(&self.retained, &waiting)?;
        waiting.clear();
        Ok(())
    }

    /// Up to `limit` retained records with ids below `end`, oldest first.
    pub(super) fn oldest_retained(&self, end: u64, limit: usize) -> Result<Vec<(u64, RetainedRecord)>, StoreError> {
        self.write_retained()?;
        let mut out = Vec::new();
        for (id, v) in oldest(&self.retained, end, limit)? {
            out.push((id, RetainedRecord::decode(&v)?));
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blocks_and_single_records_read_alike_and_oldest_first() {
        let dir = tempfile::tempdir().expect("tempdir");
        let db = sled::Config::new().path(dir.path()).temporary(true).open().expect("sled");
        let tree = db.open_tree("retained").expect("tree");
        let base = 1_900_000_000_000u64 << crate::store::ID_SEQ_BITS;
        let (a, b, c) = (base + 1, base + 2, base + (1 << (BLOCK_SHIFT + 3)));
        tree.insert(id_key(b), b"old b".as_slice()).expect("single");
        let changes: Waiting = [(a, Some(b"a".to_vec())), (c, Some(b"c".to_vec()))].into();
        apply(&tree, &changes).expect("apply");
        assert_eq!(get_in(&tree, a).expect("a"), Some(b"a".to_vec()));
        assert_eq!(get_in(&tree, b).expect("b"), Some(b"old b".to_vec()));
        let ids = |v: Vec<(u64, Vec<u8>)>| v.into_iter().map(|(i, _)| i).collect::<Vec<_>>();
        assert_eq!(ids(oldest(&tree, u64::MAX, usize::MAX).expect("all")), vec![a, b, c]);
        assert_eq!(ids(oldest(&tree, c, usize::MAX).expect("before c")), vec![a, b]);
        assert_eq!(ids(oldest(&tree, u64::MAX, 2).expect("two")), vec![a, b]);
        // Changing b moves it into its block; forgetting a and c empties theirs.
        let changes: Waiting = [(a, None), (b, Some(b"new b".to_vec())), (c, None)].into();
        apply(&tree, &changes).expect("apply");
        assert_eq!(ids(oldest(&tree, u64::MAX, usize::MAX).expect("all")), vec![b]);
        assert_eq!(get_in(&tree, b).expect("b"), Some(b"new b".to_vec()));
        assert_eq!(tree.len(), 1, "one block key left");
    }
}
