//! `Done` marks, written to sled in batches.
//!
//! A delivery that ends (delivered, skipped, purged) leaves a mark in its
//! segment's done tree, so that recovery does not bring it back. A sled
//! insert costs about 3.6 µs of CPU (measured with sled 0.34.7 as
//! configured here: one key per delivery into a tree per segment), which
//! made it the largest single cost of a delivery under fan-out. So marks
//! wait in memory and the state flusher writes them just before the sled
//! flush that makes them durable, one sled key per destination per block of
//! receive time (64 ms) per flush (about 0.6 µs per mark). The durability
//! point is unchanged: a mark was durable at the next sled flush before,
//! and it is now; every flush of sled (paced, or waited for by an operator
//! action, a dead letter or the reclaimer) writes the waiting marks first.
//!
//! A batch's key: `dest_prefix(dest)`, `0xff`, the block (u64 BE), the
//! batch's number (u64 BE, unique in the store: one more than the highest
//! found at open). Its value: (id u64 BE, mark length u32 BE, mark)
//! repeated. A message id's first byte is never `0xff` (ids are
//! milliseconds shifted by 16 bits), so a destination's single marks
//! (`state_key`: stores written before batches, and marks moved by
//! `drop_kept`) sort before its batches and both are read.
//!
//! Lock order: `marks` is taken before `done_trees` (and held while a
//! batch is written, so a segment's tree is not dropped meanwhile).

use super::*;

/// Marks waiting for the next sled flush: per segment, by state key.
pub(super) type PendingMarks = BTreeMap<u64, BTreeMap<Vec<u8>, Vec<u8>>>;

/// The tag after a destination's prefix that starts a batch key.
const BATCH_TAG: u8 = 0xff;

/// Ids per block: 64 ms of receive time.
const BLOCK_SHIFT: u32 = crate::store::ID_SEQ_BITS + 6;

fn block_prefix(dest: &str, id: u64) -> Vec<u8> {
    let mut k = dest_prefix(dest);
    k.push(BATCH_TAG);
    k.extend_from_slice(&(id >> BLOCK_SHIFT).to_be_bytes());
    k
}

/// One key of a done tree: a single mark (`state_key`) or a batch.
enum MarkKey<'a> {
    Single(&'a str, u64),
    Batch { dest: &'a str, number: u64 },
}

fn parse_mark_key(key: &[u8]) -> Result<MarkKey<'_>, StoreError> {
    let nul = key.iter().position(|b| *b == 0);
    match nul.and_then(|n| key.get(n + 1..).map(|rest| (n, rest))) {
        Some((n, rest)) if rest.len() == 17 && rest[0] == BATCH_TAG => {
            let dest = std::str::from_utf8(&key[..n]).map_err(|_| corrupt("destination is not UTF-8"))?;
            Ok(MarkKey::Batch { dest, number: u64::from_be_bytes(array8(&rest[9..])?) })
        }
        _ => {
            let (dest, id) = parse_state_key(key)?;
            Ok(MarkKey::Single(dest, id))
        }
    }
}

fn corrupt(detail: &str) -> StoreError {
    StoreError::Corrupt(DecodeError { what: "done mark batch", detail: detail.to_string() })
}

fn array8(b: &[u8]) -> Result<[u8; 8], StoreError> {
    b.get(..8).and_then(|s| s.try_into().ok()).ok_or_else(|| corrupt("cut short"))
}

/// The (id, mark) entries of a batch's value.
pub(super) fn entries(v: &[u8]) -> impl Iterator<Item = Result<(u64, &[u8]), StoreError>> {
    let mut rest = v;
    std::iter::from_fn(move || {
        if rest.is_empty() {
            return None;
        }
        let entry = (|| {
            let id = u64::from_be_bytes(array8(rest)?);
            let len = rest.get(8..12).ok_or_else(|| corrupt("cut short"))?;
            let len = u32::from_be_bytes([len[0], len[1], len[2], len[3]]) as usize;
            let mark = rest.get(12..12 + len).ok_or_else(|| corrupt("mark cut short"))?;
            rest = &rest[12 + len..];
            Ok((id, mark))
        })();
        if entry.is_err() {
            rest = &[];
        }
        Some(entry)
    })
}

pub(super) fn push_entry(v: &mut Vec<u8>, id: u64, mark: &[u8]) {
    v.extend_from_slice(&id.to_be_bytes());
    v.extend_from_slice(&(mark.len() as u32).to_be_bytes());
    v.extend_from_slice(mark);
}

/// Every mark of a done tree, single or batched: `f(dest, id, mark)`.
/// Returns the highest batch number found (0 if none).
pub(super) fn for_each_mark(
    tree: &sled::Tree,
    mut f: impl FnMut(&str, u64, &[u8]) -> Result<(), StoreError>,
) -> Result<u64, StoreError> {
    let mut highest = 0;
    for item in tree.iter() {
        let (k, v) = item?;
        match parse_mark_key(&k)? {
            MarkKey::Single(dest, id) => f(dest, id, &v)?,
            MarkKey::Batch { dest, number } => {
                highest = highest.max(number);
                for e in entries(&v) {
                    let (id, mark) = e?;
                    f(dest, id, mark)?;
                }
            }
        }
    }
    Ok(highest)
}

/// `dest`'s mark for message `id` written in `tree` (single or batched).
pub(super) fn find_in_tree(tree: &sled::Tree, dest: &str, id: u64) -> Result<Option<Vec<u8>>, StoreError> {
    if let Some(v) = tree.get(state_key(dest, id))? {
        return Ok(Some(v.to_vec()));
    }
    for item in tree.scan_prefix(block_prefix(dest, id)) {
        let (_, v) = item?;
        for e in entries(&v) {
            let (found, mark) = e?;
            if found == id {
                return Ok(Some(mark.to_vec()));
            }
        }
    }
    Ok(None)
}

impl Inner {
    /// Marks `key` (a `state_key`) done in segment `seg`'s tree at the next
    /// sled flush.
    pub(super) fn mark_done(&self, seg: u64, key: Vec<u8>, mark: Vec<u8>) {
        lock(&self.marks).entry(seg).or_default().insert(key, mark);
        self.sled_written();
    }

    /// Writes the waiting marks: the state flusher, before sled's flush,
    /// and a reader that scans the trees.
    pub(super) fn write_marks(&self) -> Result<(), StoreError> {
        let mut pending = lock(&self.marks);
        while let Some((&seg, marks)) = pending.first_key_value() {
            let tree = self.done_tree(seg)?;
            let mut batches: BTreeMap<Vec<u8>, Vec<u8>> = BTreeMap::new();
            for (key, mark) in marks {
                let (dest, id) = parse_state_key(key)?;
                push_entry(batches.entry(block_prefix(dest, id)).or_default(), id, mark);
            }
            for (mut key, value) in batches {
                key.extend_from_slice(&self.mark_batches.fetch_add(1, Ordering::Relaxed).to_be_bytes());
                tree.insert(key, value)?;
            }
            pending.remove(&seg);
        }
        Ok(())
    }

    /// `dest`'s mark for message `id` in segment `seg`, if there is one
    /// (trees there are only: looking creates nothing).
    pub(super) fn find_mark(&self, seg: u64, dest: &str, id: u64) -> Result<Option<Vec<u8>>, StoreError> {
        let key = state_key(dest, id);
        let pending = lock(&self.marks);
        if let Some(m) = pending.get(&seg).and_then(|m| m.get(&key)) {
            return Ok(Some(m.clone()));
        }
        let Some(tree) = lock(&self.done_trees).get(&seg).cloned() else { return Ok(None) };
        drop(pending);
        find_in_tree(&tree, dest, id)
    }

    /// Removes `dest`'s mark for message `id` from segment `seg`, wherever
    /// it is (waiting, single or in a batch, which is rewritten without it).
    pub(super) fn remove_mark(&self, seg: u64, dest: &str, id: u64) -> Result<(), StoreError> {
        let key = state_key(dest, id);
        let mut pending = lock(&self.marks);
        if let Some(m) = pending.get_mut(&seg) {
            m.remove(&key);
        }
        let Some(tree) = lock(&self.done_trees).get(&seg).cloned() else { return Ok(()) };
        tree.remove(&key)?;
        for item in tree.scan_prefix(block_prefix(dest, id)) {
            let (k, v) = item?;
            let mut kept = Vec::with_capacity(v.len());
            let mut had = false;
            for e in entries(&v) {
                let (other, mark) = e?;
                if other == id {
                    had = true;
                } else {
                    push_entry(&mut kept, other, mark);
                }
            }
            if had && kept.is_empty() {
                tree.remove(k)?;
            } else if had {
                tree.insert(k, kept)?;
            }
        }
        drop(pending);
        self.sled_written();
        Ok(())
    }

    /// `dest`'s marks in segment `seg`'s tree for ids in `from..to`, in id
    /// order, after writing the waiting ones.
    pub(super) fn marks_in(
        &self,
        tree: &sled::Tree,
        dest: &str,
        from: u64,
        to: u64,
    ) -> Result<BTreeMap<u64, Vec<u8>>, StoreError> {
        let mut found = BTreeMap::new();
        for item in tree.range(state_key(dest, from)..state_key(dest, to)) {
            let (k, v) = item?;
            // The range's end may lie past the first batches.
            if let MarkKey::Single(_, id) = parse_mark_key(&k)? {
                found.insert(id, v.to_vec());
            }
        }
        let mut last = block_prefix(dest, to);
        last.extend_from_slice(&[0xff; 8]);
        for item in tree.range(block_prefix(dest, from)..=last) {
            let (_, v) = item?;
            for e in entries(&v) {
                let (id, mark) = e?;
                if (from..to).contains(&id) {
                    found.insert(id, mark.to_vec());
                }
            }
        }
        Ok(found)
    }

    /// Writes the waiting marks and flushes sled, as the state flusher does
    /// (tests that then crash the store).
    #[cfg(test)]
    pub(super) fn flush_sled(&self) -> Result<(), StoreError> {
        self.write_marks()?;
        self.write_retained()?;
        self.db.flush()?;
        Ok(())
    }

    /// Drops segment `seq`'s tree and the marks waiting for it.
    pub(super) fn drop_done_tree(&self, seq: u64) -> Result<(), StoreError> {
        let mut pending = lock(&self.marks);
        pending.remove(&seq);
        lock(&self.done_trees).remove(&seq);
        self.db.drop_tree(done_tree_name(seq))?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batch_entries_round_trip_and_damage_is_an_error() {
        let mut v = Vec::new();
        push_entry(&mut v, 7, b"mark");
        push_entry(&mut v, 9, b"");
        let got: Vec<(u64, Vec<u8>)> =
            entries(&v).map(|e| e.map(|(i, m)| (i, m.to_vec()))).collect::<Result<_, _>>().expect("entries");
        assert_eq!(got, vec![(7, b"mark".to_vec()), (9, Vec::new())]);
        assert!(entries(&v[..v.len() - 3]).any(|e| e.is_err()), "a batch cut short");
    }

    #[test]
    fn batch_keys_sort_after_single_marks_and_parse_apart() {
        let id = 1_900_000_000_000u64 << crate::store::ID_SEQ_BITS;
        let single = state_key("a", id);
        let mut batch = block_prefix("a", id);
        batch.extend_from_slice(&5u64.to_be_bytes());
        assert!(single < batch);
        assert!(batch < state_key("a\u{1}", 0), "a destination's batches stay inside its prefix");
        assert!(matches!(parse_mark_key(&single).expect("single"), MarkKey::Single("a", i) if i == id));
        assert!(matches!(parse_mark_key(&batch).expect("batch"), MarkKey::Batch { dest: "a", number: 5 }));
    }
}
