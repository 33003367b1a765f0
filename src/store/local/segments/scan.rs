//! Reading the log back at open: frame by frame, in order, telling a torn
//! tail (cut) from damage (refused, or cut on `repair`'s word), and
//! rewriting a batch header after a cut inside its batch.

use super::*;

/// Whether a valid header of a batch of segment `seg` numbered above
/// `after` (any number if `None`) is anywhere in `path` from `from` on.
/// Only called on a segment that failed to read, at open.
fn later_batch(disk: &dyn Disk, path: &Path, seg: u64, from: u64, after: Option<u64>) -> Result<bool, LogError> {
    let mut all = Vec::new();
    disk.reader(path).and_then(|mut r| r.read_to_end(&mut all)).map_err(io_err(path))?;
    let rest = all.get(from as usize..).unwrap_or_default();
    let magic = BATCH_MAGIC.to_be_bytes();
    Ok(rest
        .windows(BATCH_HEADER as usize)
        .any(|w| w[..4] == magic && parse_batch_header(w, seg).is_ok_and(|(n, _)| after.is_none_or(|a| n > a))))
}

/// Where a batch is in its segment: `start` of its header, `end` of its frames.
#[derive(Debug, Clone, Copy)]
struct BatchPos {
    number: u64,
    start: u64,
    end: u64,
}

/// The first thing in a segment that is not a whole valid frame.
struct Bad {
    offset: u64,
    detail: &'static str,
    /// The last batch whose header was read before it.
    batch: Option<BatchPos>,
}

/// Reads the frames of segment `seq` at `path` in order, one at a time (a
/// segment is never loaded whole), calling `f` for each. Returns the first
/// thing that is not a whole valid frame or batch header, if any.
fn read_frames(
    disk: &dyn Disk,
    path: &Path,
    seq: u64,
    mut f: impl FnMut(Scanned<'_>) -> Result<(), crate::store::StoreError>,
) -> Result<Option<Bad>, crate::store::StoreError> {
    let file = disk.reader(path).map_err(io_err(path))?;
    let mut r = std::io::BufReader::with_capacity(1 << 20, file);
    let mut payload = Vec::new();
    let mut pos = 0u64;
    // The batch being read: its number and end.
    let mut batch: Option<BatchPos> = None;
    let bad = |offset, detail, batch| Ok(Some(Bad { offset, detail, batch }));
    loop {
        let mut header = [0u8; 8];
        let mut got = 0;
        while got < header.len() {
            match r.read(&mut header[got..]) {
                Ok(0) => break,
                Ok(n) => got += n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(io_err(path)(e).into()),
            }
        }
        if got == 0 {
            return match batch {
                Some(b) if b.end != pos => bad(pos, "segment ends inside a batch", batch),
                _ => Ok(None),
            };
        }
        if got < header.len() {
            return bad(pos, "truncated frame header", batch);
        }
        if header[0] & 0x80 != 0 {
            // A batch header; the previous batch must end right here.
            if batch.is_some_and(|b| b.end != pos) {
                return bad(pos, "batch header inside a batch", batch);
            }
            let mut h = [0u8; BATCH_HEADER as usize];
            h[..8].copy_from_slice(&header);
            match r.read_exact(&mut h[8..]) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
                    return bad(pos, "truncated batch header", batch)
                }
                Err(e) => return Err(io_err(path)(e).into()),
            }
            let expected = batch.map_or(0, |b| b.number + 1);
            match parse_batch_header(&h, seq) {
                Ok((number, len)) if number == expected => {
                    batch = Some(BatchPos { number, start: pos, end: pos + BATCH_HEADER + len })
                }
                Ok(_) => return bad(pos, "batch out of sequence", batch),
                Err(detail) => return bad(pos, detail, batch),
            }
            pos += BATCH_HEADER;
            continue;
        }
        let len = match frame_len(header) {
            Ok(len) => len,
            Err(detail) => return bad(pos, detail, batch),
        };
        match batch {
            None => return bad(pos, "frame outside a batch", batch),
            Some(b) if pos + FRAME_HEADER + u64::from(len) > b.end => {
                return bad(pos, "frame runs past the end of its batch", batch)
            }
            Some(_) => {}
        }
        payload.resize(len as usize, 0);
        match r.read_exact(&mut payload) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return bad(pos, "truncated frame", batch),
            Err(e) => return Err(io_err(path)(e).into()),
        }
        let id = match check_frame(header, &payload) {
            Ok(id) => id,
            Err(detail) => return bad(pos, detail, batch),
        };
        f(Scanned { id, loc: Loc { seg: seq, offset: pos, len }, record: &payload[ID_LEN..] })?;
        pos += FRAME_HEADER + len as u64;
    }
}

impl SegmentLog {
    /// Opens the log in `dir` (created if missing), calling `each` for every
    /// record in log order, and starts a new segment for writing. A torn tail
    /// of the last segment holding data is cut off; a bad frame anywhere else
    /// is an error. `clean_end` is where the log ended at its last clean
    /// close ([`SegmentLog::end`]): a bad frame before that point is never a
    /// torn write but damage, and is an error too, unless `cut_damaged`:
    /// then a damaged segment is cut at the damage like a torn tail.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn open(
        disk: Arc<dyn Disk>,
        sealer: Option<Arc<crate::store::seal::Sealer>>,
        dir: &Path,
        segment_bytes: u64,
        clean_end: Option<(u64, u64)>,
        cut_damaged: bool,
        mut each: impl FnMut(Scanned<'_>) -> Result<(), crate::store::StoreError>,
    ) -> Result<SegmentLog, crate::store::StoreError> {
        disk.create_dir_all(dir).map_err(io_err(dir))?;
        let mut seqs = Vec::new();
        for name in disk.list(dir).map_err(io_err(dir))? {
            let Some(hex) = name.to_str().and_then(|n| n.strip_prefix(PREFIX)) else { continue };
            if let Ok(seq) = u64::from_str_radix(hex, 16) {
                seqs.push(seq);
            }
        }
        seqs.sort_unstable();
        let mut files = BTreeMap::new();
        let mut disk_bytes = 0;
        // Only the last segment with data may end in a torn frame.
        let mut last_with_data = None;
        for &seq in seqs.iter().rev() {
            let path = seg_path(dir, seq);
            if disk.len(&path).map_err(io_err(&path))? > 0 {
                last_with_data = Some(seq);
                break;
            }
        }
        for &seq in &seqs {
            let path = seg_path(dir, seq);
            // Sealed records are opened before anyone sees them.
            let mut plain = |r: Scanned<'_>| {
                let record = crate::store::seal::Sealer::open(sealer.as_deref(), r.id, r.record)?;
                each(Scanned { id: r.id, loc: r.loc, record: &record })
            };
            let bad = read_frames(&*disk, &path, seq, &mut plain)?;
            let mut len = disk.len(&path).map_err(io_err(&path))?;
            if let Some(Bad { offset, detail, batch }) = bad {
                let closed_cleanly = clean_end.is_some_and(|(s, end)| s > seq || (s == seq && offset < end));
                // A later batch was written only after this one was synced.
                let later = Some(seq) == last_with_data
                    && !closed_cleanly
                    && later_batch(&*disk, &path, seq, offset, batch.map(|b| b.number))?;
                let damaged = Some(seq) != last_with_data || closed_cleanly || later;
                if damaged && !cut_damaged {
                    return Err(LogError::Corrupt { path, offset, detail }.into());
                }
                let dropped = len.saturating_sub(offset);
                if damaged {
                    tracing::error!(
                        segment = %path.display(), offset, detail, dropped_bytes = dropped,
                        "cutting a damaged segment as asked: the messages from this offset to its end are lost"
                    );
                } else {
                    // Never acknowledged: the batch it belongs to was not synced.
                    tracing::warn!(segment = %path.display(), offset, detail, "cutting off a torn tail of the message log");
                }
                let f = disk.open(&path).map_err(io_err(&path))?;
                f.truncate(offset).map_err(io_err(&path))?;
                // Cut inside a batch: its header must say where it now ends,
                // or the next open finds a segment that ends inside a batch.
                // (A crash between the two writes leaves that same state in
                // the last segment, and this open runs again.)
                if let Some(b) = batch.filter(|b| offset < b.end) {
                    let header = batch_header(seq, b.number, offset.saturating_sub(b.start + BATCH_HEADER));
                    write_all_at(&*f, &mut [std::io::IoSlice::new(&header)], b.start)
                        .and_then(|_| f.sync_data())
                        .map_err(io_err(&path))?;
                }
                len = offset;
            }
            let file = disk.open(&path).map_err(io_err(&path))?;
            files.insert(seq, file);
            disk_bytes += len;
        }
        let seq = seqs.last().map_or(1, |s| s + 1);
        let path = seg_path(dir, seq);
        let file = disk.create_new(&path).map_err(io_err(&path))?;
        sync_dir(&*disk, dir)?;
        files.insert(seq, file.clone());
        Ok(SegmentLog {
            disk,
            sealer,
            dir: dir.to_path_buf(),
            segment_bytes,
            pending: Mutex::new(Vec::new()),
            writer: Mutex::new(Writer { seq, file, len: 0, batches: 0, scratch: Vec::new() }),
            files: RwLock::new(files),
            current: AtomicU64::new(seq),
            disk_bytes: AtomicU64::new(disk_bytes),
            broken: AtomicBool::new(false),
        })
    }
}
