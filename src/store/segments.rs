//! The message log: message records in append-only segment files.
//!
//! Ingress hands a record to [`SegmentLog::push`] (a vector push under a
//! mutex, nothing else). The group commit's flusher calls
//! [`SegmentLog::flush`]: it frames every record pushed since the last flush
//! into one buffer, writes it with one `pwrite` at the end of the current
//! segment, and `fdatasync`s it. One write and one sync cover every request
//! of the batch, and no sled operation is on the ingress path.
//!
//! Layout: `<store>/segments/seg-<seq as 16 hex digits>`. A frame is
//! `[u32 BE payload length][u32 BE CRC-32 of payload][payload]`, the payload
//! being `[u64 BE message id][message record]` (see [`super::format`]). Each
//! batch starts with a batch header, `[u32 BE BATCH_MAGIC][u32 BE CRC-32 of
//! the next 24 bytes][u64 BE segment number][u64 BE batch number in the
//! segment][u64 BE bytes of the frames that follow]`; its first word has the
//! top bit set, which no frame length has, and the segment number keeps
//! stale bytes of another segment (blocks reused after a crash) from
//! passing for one of this segment's batches.
//!
//! Invariants:
//! - A batch is written to one segment. A new segment is created (and the
//!   directory fsync'd) only between batches, once the current one reaches
//!   the segment size. So a frame torn by a crash can only be in the last
//!   segment that holds data, and every frame after it is from the same
//!   unacknowledged batch: recovery truncates that tail. A bad frame anywhere
//!   else is corruption, and the store refuses to open (data untouched).
//!   After a clean close nothing can be torn: the store records where the
//!   log ended ([`SegmentLog::end`]) and a bad frame before it is corruption.
//!   After a crash, batch headers narrow what can be torn to the last batch:
//!   a batch is written only once the one before it is synced, so a bad
//!   frame or header followed anywhere by a valid header of a later batch
//!   of the segment is corruption too. Only damage in the last batch is cut.
//! - Message ids are assigned under the same lock as the push, so frames are
//!   in id order across the whole log.
//! - After a failed write or sync the log refuses further flushes: after a
//!   failed `fdatasync` the kernel may have dropped the dirty pages, so
//!   nothing written since the last good sync can be trusted. A restart
//!   (re-reading the log) is the only recovery; `/healthz` reports it.

use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use bytes::Bytes;

use super::disk::{write_all_at, Disk, SegFile};

const FRAME_HEADER: u64 = 8;
const ID_LEN: usize = 8;
/// A frame longer than this is not a frame (bodies are limited far below).
const MAX_PAYLOAD: u32 = 1 << 30;
/// First word of a batch header (top bit set: never a frame length).
const BATCH_MAGIC: u32 = 0xB47C_0001;
const BATCH_HEADER: u64 = 32;
/// The largest record a frame holds.
pub(crate) const MAX_RECORD: u32 = MAX_PAYLOAD - ID_LEN as u32;
const PREFIX: &str = "seg-";

/// Where a flushed record is: segment, offset of its frame, payload length.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Loc {
    pub seg: u64,
    pub offset: u64,
    pub len: u32,
}

/// What one flush wrote.
#[derive(Debug, Default)]
pub(crate) struct Placed {
    /// Each record's id and location, in id order.
    pub records: Vec<(u64, Loc)>,
    /// A segment that this flush sealed (no record is written to it again).
    pub sealed: Option<u64>,
}

/// A record found when reading a segment (borrowed from the reader's buffer).
pub(crate) struct Scanned<'a> {
    pub id: u64,
    pub loc: Loc,
    pub record: &'a [u8],
}

#[derive(Debug, thiserror::Error)]
pub enum LogError {
    #[error("segment {path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error(
        "segment {path} is corrupt at offset {offset}: {detail} (data left untouched; `switchboard repair` \
         cuts the segment there, losing the records from that offset to its end)"
    )]
    Corrupt { path: PathBuf, offset: u64, detail: &'static str },
    #[error("message log failed earlier; restart to recover")]
    Broken,
}

struct Writer {
    seq: u64,
    file: Arc<dyn SegFile>,
    len: u64,
    /// Batches written to this segment.
    batches: u64,
    /// Frame buffer, reused across flushes.
    scratch: Vec<u8>,
}

pub(crate) struct SegmentLog {
    disk: Arc<dyn Disk>,
    dir: PathBuf,
    segment_bytes: u64,
    /// Records pushed since the last flush, in id order.
    pending: Mutex<Vec<(u64, Bytes)>>,
    /// Only the flusher (and open) touch this.
    writer: Mutex<Writer>,
    /// Every segment still on disk, for reads.
    files: RwLock<BTreeMap<u64, Arc<dyn SegFile>>>,
    /// The segment being written (mirrors `writer.seq`, readable without
    /// waiting for a flush in progress).
    current: AtomicU64,
    disk_bytes: AtomicU64,
    broken: AtomicBool,
}

/// Records up to this size are copied into the batch buffer; larger ones are
/// written in place (a copy of a few KiB costs less than an extra iovec).
const INLINE_RECORD: usize = 16 * 1024;

/// A part of a batch as written: a range of the batch buffer, or a record.
enum Piece {
    Scratch(std::ops::Range<usize>),
    Record(usize),
}

fn seg_path(dir: &Path, seq: u64) -> PathBuf {
    dir.join(format!("{PREFIX}{seq:016x}"))
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> LogError + '_ {
    move |source| LogError::Io { path: path.to_path_buf(), source }
}

fn sync_dir(disk: &dyn Disk, dir: &Path) -> Result<(), LogError> {
    disk.sync_dir(dir).map_err(io_err(dir))
}

/// Checks one frame: `header` is its 8 bytes, `payload` what follows.
fn check_frame(header: [u8; 8], payload: &[u8]) -> Result<u64, &'static str> {
    let crc = u32::from_be_bytes([header[4], header[5], header[6], header[7]]);
    if crc32fast::hash(payload) != crc {
        return Err("checksum mismatch");
    }
    let mut id = [0u8; ID_LEN];
    id.copy_from_slice(&payload[..ID_LEN]);
    Ok(u64::from_be_bytes(id))
}

/// A batch header of segment `seg`: batch `number`, `len` bytes of frames.
fn batch_header(seg: u64, number: u64, len: u64) -> [u8; BATCH_HEADER as usize] {
    let mut h = [0u8; BATCH_HEADER as usize];
    h[..4].copy_from_slice(&BATCH_MAGIC.to_be_bytes());
    h[8..16].copy_from_slice(&seg.to_be_bytes());
    h[16..24].copy_from_slice(&number.to_be_bytes());
    h[24..].copy_from_slice(&len.to_be_bytes());
    let crc = crc32fast::hash(&h[8..]);
    h[4..8].copy_from_slice(&crc.to_be_bytes());
    h
}

fn be_u64_at(b: &[u8], at: usize) -> u64 {
    let mut v = [0u8; 8];
    v.copy_from_slice(&b[at..at + 8]);
    u64::from_be_bytes(v)
}

/// Parses a batch header of segment `seg`: `(number, len)`.
fn parse_batch_header(h: &[u8], seg: u64) -> Result<(u64, u64), &'static str> {
    if h.len() < BATCH_HEADER as usize || h[..4] != BATCH_MAGIC.to_be_bytes() {
        return Err("unknown record type");
    }
    if crc32fast::hash(&h[8..BATCH_HEADER as usize]).to_be_bytes() != h[4..8] {
        return Err("batch header checksum mismatch");
    }
    if be_u64_at(h, 8) != seg {
        return Err("batch header of another segment");
    }
    Ok((be_u64_at(h, 16), be_u64_at(h, 24)))
}

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

fn frame_len(header: [u8; 8]) -> Result<u32, &'static str> {
    let len = u32::from_be_bytes([header[0], header[1], header[2], header[3]]);
    if len > MAX_PAYLOAD || (len as usize) < ID_LEN {
        return Err("impossible frame length");
    }
    Ok(len)
}

/// Reads the frames of segment `seq` at `path` in order, one at a time (a
/// segment is never loaded whole), calling `f` for each. Returns the first
/// thing that is not a whole valid frame or batch header, if any.
fn read_frames(
    disk: &dyn Disk,
    path: &Path,
    seq: u64,
    mut f: impl FnMut(Scanned<'_>) -> Result<(), super::StoreError>,
) -> Result<Option<Bad>, super::StoreError> {
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
    pub(crate) fn open(
        disk: Arc<dyn Disk>,
        dir: &Path,
        segment_bytes: u64,
        clean_end: Option<(u64, u64)>,
        cut_damaged: bool,
        mut each: impl FnMut(Scanned<'_>) -> Result<(), super::StoreError>,
    ) -> Result<SegmentLog, super::StoreError> {
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
            let bad = read_frames(&*disk, &path, seq, &mut each)?;
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

    /// Where the frames written so far end: segment and offset. Recorded at
    /// a clean close, so that the next open can tell damage from a torn write.
    pub(crate) fn end(&self) -> Option<(u64, u64)> {
        self.writer.lock().ok().map(|w| (w.seq, w.len))
    }

    /// The segment being written (never deleted while it is).
    pub(crate) fn current(&self) -> u64 {
        self.current.load(Ordering::SeqCst)
    }

    /// Whether segment `seq` is still on disk.
    pub(crate) fn has(&self, seq: u64) -> bool {
        self.files.read().map(|f| f.contains_key(&seq)).unwrap_or(false)
    }

    /// Queues a record for the next flush; `make_id` runs under the queue's
    /// lock, so ids are in log order.
    pub(crate) fn push(&self, make_id: impl FnOnce() -> u64, record: Bytes) -> u64 {
        // A panic cannot happen between the lock and the push; a poisoned
        // lock still guards a consistent vector.
        let mut pending = self.pending.lock().unwrap_or_else(|p| p.into_inner());
        let id = make_id();
        pending.push((id, record));
        id
    }

    /// Writes and syncs everything pushed so far (flusher only). Seals the
    /// segment and starts the next one once it is full.
    pub(crate) fn flush(&self) -> Result<Placed, LogError> {
        if self.broken.load(Ordering::SeqCst) {
            return Err(LogError::Broken);
        }
        let batch = std::mem::take(&mut *self.pending.lock().unwrap_or_else(|p| p.into_inner()));
        let mut w = self.writer.lock().map_err(|_| LogError::Broken)?;
        let mut placed = Placed { records: Vec::with_capacity(batch.len()), sealed: None };
        if batch.is_empty() {
            return Ok(placed);
        }
        let seq = w.seq;
        let mut scratch = std::mem::take(&mut w.scratch);
        scratch.clear();
        scratch.resize(BATCH_HEADER as usize, 0);
        // Small records are copied into `scratch` with their frame headers
        // (one contiguous write); large ones are written from where they
        // are (ingress read the body into them), so a large body is never
        // copied again: `pieces` lists the parts in order.
        let mut pieces: Vec<Piece> = Vec::new();
        let mut from = 0;
        let mut end = 0u64;
        for (i, (id, record)) in batch.iter().enumerate() {
            let len = (ID_LEN + record.len()) as u32;
            let offset = w.len + end + scratch.len() as u64 - from as u64;
            let mut hasher = crc32fast::Hasher::new();
            hasher.update(&id.to_be_bytes());
            hasher.update(record);
            scratch.extend_from_slice(&len.to_be_bytes());
            scratch.extend_from_slice(&hasher.finalize().to_be_bytes());
            scratch.extend_from_slice(&id.to_be_bytes());
            if record.len() <= INLINE_RECORD {
                scratch.extend_from_slice(record);
            } else {
                pieces.push(Piece::Scratch(from..scratch.len()));
                end += (scratch.len() - from) as u64 + record.len() as u64;
                pieces.push(Piece::Record(i));
                from = scratch.len();
            }
            placed.records.push((*id, Loc { seg: seq, offset, len }));
        }
        pieces.push(Piece::Scratch(from..scratch.len()));
        let total = end + (scratch.len() - from) as u64;
        let header = batch_header(seq, w.batches, total - BATCH_HEADER);
        scratch[..BATCH_HEADER as usize].copy_from_slice(&header);
        let path = seg_path(&self.dir, seq);
        let mut slices: Vec<std::io::IoSlice<'_>> = pieces
            .iter()
            .map(|p| match p {
                Piece::Scratch(r) => std::io::IoSlice::new(&scratch[r.clone()]),
                Piece::Record(i) => std::io::IoSlice::new(&batch[*i].1),
            })
            .filter(|s| !s.is_empty())
            .collect();
        let result = write_all_at(&*w.file, &mut slices, w.len).and_then(|_| w.file.sync_data());
        drop(slices);
        if let Err(e) = result {
            self.broken.store(true, Ordering::SeqCst);
            // The batch was never acknowledged, but the page cache may
            // still hold it: a restart without a reboot would read it back
            // as part of the log, a clean close would then vouch for it,
            // and a power loss later would turn it into "damage" that
            // refuses the store. Cut it off now (found by the fault test).
            if let Err(t) = w.file.truncate(w.len) {
                tracing::error!(segment = %path.display(), error = %t, "cannot cut off a batch that failed to sync; if the machine loses power before the next start, `switchboard repair` may be needed");
            }
            return Err(io_err(&path)(e));
        }
        w.len += total;
        w.batches += 1;
        self.disk_bytes.fetch_add(total, Ordering::Relaxed);
        // Keep a modest buffer for the next batch, not the largest ever seen.
        if scratch.capacity() <= 4 << 20 {
            w.scratch = scratch;
        }
        if w.len >= self.segment_bytes {
            let next = seq + 1;
            let path = seg_path(&self.dir, next);
            let created = self.disk.create_new(&path);
            let file = match created.map_err(io_err(&path)).and_then(|f| sync_dir(&*self.disk, &self.dir).map(|_| f)) {
                Ok(f) => f,
                Err(e) => {
                    self.broken.store(true, Ordering::SeqCst);
                    return Err(e);
                }
            };
            self.files.write().map_err(|_| LogError::Broken)?.insert(next, file.clone());
            *w = Writer { seq: next, file, len: 0, batches: 0, scratch: std::mem::take(&mut w.scratch) };
            self.current.store(next, Ordering::SeqCst);
            placed.sealed = Some(seq);
        }
        Ok(placed)
    }

    /// Reads the record at `loc`, checking its frame.
    pub(crate) fn read(&self, id: u64, loc: Loc) -> Result<Bytes, LogError> {
        let path = seg_path(&self.dir, loc.seg);
        let file = self.files.read().map_err(|_| LogError::Broken)?.get(&loc.seg).cloned();
        let Some(file) = file else {
            return Err(io_err(&path)(std::io::Error::new(std::io::ErrorKind::NotFound, "segment deleted")));
        };
        let mut buf = vec![0u8; FRAME_HEADER as usize + loc.len as usize];
        file.read_exact_at(&mut buf, loc.offset).map_err(io_err(&path))?;
        let mut header = [0u8; 8];
        header.copy_from_slice(&buf[..FRAME_HEADER as usize]);
        let data = Bytes::from(buf);
        let payload = &data[FRAME_HEADER as usize..];
        let found = frame_len(header).and_then(|len| {
            if len != loc.len {
                return Err("frame length does not match its index entry");
            }
            check_frame(header, payload)
        });
        match found {
            Ok(found) if found == id => Ok(data.slice(FRAME_HEADER as usize + ID_LEN..)),
            Ok(_) => {
                Err(LogError::Corrupt { path, offset: loc.offset, detail: "record does not match its index entry" })
            }
            Err(detail) => Err(LogError::Corrupt { path, offset: loc.offset, detail }),
        }
    }

    /// Deletes a sealed segment and makes the deletion durable.
    pub(crate) fn remove(&self, seq: u64) -> Result<(), LogError> {
        let path = seg_path(&self.dir, seq);
        let len = self.disk.len(&path).unwrap_or(0);
        self.files.write().map_err(|_| LogError::Broken)?.remove(&seq);
        match self.disk.remove(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(io_err(&path)(e)),
        }
        sync_dir(&*self.disk, &self.dir)?;
        self.disk_bytes.fetch_sub(len.min(self.disk_bytes.load(Ordering::Relaxed)), Ordering::Relaxed);
        Ok(())
    }

    /// Segments on disk other than the one being written.
    pub(crate) fn sealed(&self) -> Vec<u64> {
        let current = self.current();
        match self.files.read() {
            Ok(files) => files.keys().copied().filter(|s| *s != current).collect(),
            Err(_) => Vec::new(),
        }
    }

    pub(crate) fn disk_bytes(&self) -> u64 {
        self.disk_bytes.load(Ordering::Relaxed)
    }

    pub(crate) fn is_broken(&self) -> bool {
        self.broken.load(Ordering::SeqCst)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn open(dir: &Path, seen: &mut Vec<(u64, Bytes)>) -> Result<SegmentLog, super::super::StoreError> {
        open_after(dir, None, seen)
    }

    fn open_after(
        dir: &Path,
        clean_end: Option<(u64, u64)>,
        seen: &mut Vec<(u64, Bytes)>,
    ) -> Result<SegmentLog, super::super::StoreError> {
        SegmentLog::open(Arc::new(super::super::disk::RealDisk), dir, 100, clean_end, false, |s| {
            seen.push((s.id, Bytes::copy_from_slice(s.record)));
            Ok(())
        })
    }

    /// Large records are written in place next to small ones copied into the
    /// batch buffer: every frame must land where `Placed` says, whole.
    #[test]
    fn large_and_small_records_mixed_in_one_batch_read_back_whole() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut seen = Vec::new();
        let log = open(dir.path(), &mut seen).expect("open");
        let sizes = [10, INLINE_RECORD + 1, 3, 200_000, 0, INLINE_RECORD, 70_000, 5];
        let records: Vec<Bytes> =
            sizes.iter().enumerate().map(|(i, n)| Bytes::from(vec![b'a' + i as u8; *n])).collect();
        for (i, r) in records.iter().enumerate() {
            log.push(|| i as u64 + 1, r.clone());
        }
        let placed = log.flush().expect("flush");
        for ((id, loc), r) in placed.records.iter().zip(&records) {
            assert_eq!(&log.read(*id, *loc).expect("read"), r, "record {id}");
        }
        drop(log);
        open(dir.path(), &mut seen).expect("reopen");
        assert_eq!(seen.iter().map(|(_, b)| b.clone()).collect::<Vec<_>>(), records);
    }

    #[test]
    fn records_survive_reopen_in_order_and_segments_roll() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut seen = Vec::new();
        let log = open(dir.path(), &mut seen).expect("open");
        let mut next = 0u64;
        let mut sealed = Vec::new();
        let mut locs = Vec::new();
        for batch in 0..4 {
            for i in 0..3 {
                next += 1;
                let id = next;
                log.push(|| id, Bytes::from(format!("record {batch}.{i}")));
            }
            let placed = log.flush().expect("flush");
            sealed.extend(placed.sealed);
            locs.extend(placed.records);
        }
        assert!(!sealed.is_empty(), "100-byte segments roll");
        for (id, loc) in &locs {
            assert!(log.read(*id, *loc).expect("read").starts_with(b"record "));
        }
        assert!(log.read(locs[0].0 + 1, locs[0].1).is_err(), "a location that names another id is refused");
        drop(log);
        let log = open(dir.path(), &mut seen).expect("reopen");
        assert_eq!(seen.iter().map(|(id, _)| *id).collect::<Vec<_>>(), (1..=12).collect::<Vec<_>>());
        assert_eq!(seen[0].1, Bytes::from_static(b"record 0.0"));
        assert!(!log.sealed().contains(&log.current()));
    }

    #[test]
    fn a_torn_tail_is_cut_and_corruption_elsewhere_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut seen = Vec::new();
        let log = open(dir.path(), &mut seen).expect("open");
        // Batches of 80 bytes (24-byte header, 56-byte frame) in 100-byte
        // segments: the second flush seals segment 1, the third writes to
        // segment 2.
        for id in 1..=3u64 {
            log.push(|| id, Bytes::from_static(b"0123456789012345678901234567890123456789"));
            log.flush().expect("flush");
        }
        let first = log.sealed()[0];
        let current = log.current();
        assert_eq!((first, current), (1, 2));
        drop(log);
        // A crash in the middle of writing a frame to the last segment.
        let last = seg_path(dir.path(), current);
        let mut torn = std::fs::read(&last).expect("read");
        torn.extend_from_slice(&[0, 0, 0, 40, 1, 2]);
        std::fs::write(&last, &torn).expect("write");
        let _ = open(dir.path(), &mut seen).expect("torn tail is cut");
        assert_eq!(std::fs::metadata(&last).expect("meta").len(), (torn.len() - 6) as u64);
        assert_eq!(seen.len(), 3);

        // A flipped byte in an earlier segment is corruption.
        let path = seg_path(dir.path(), first);
        let mut data = std::fs::read(&path).expect("read");
        let n = data.len();
        data[n - 1] ^= 0xff;
        std::fs::write(&path, &data).expect("write");
        let err = open(dir.path(), &mut Vec::new()).err().expect("refused");
        assert!(err.to_string().contains("checksum mismatch"), "{err}");
        assert_eq!(std::fs::read(&path).expect("untouched"), data);
    }

    /// After a clean close nothing can be torn: a bad frame in the last
    /// segment is damage, and the store refuses to open instead of cutting
    /// acknowledged records.
    #[test]
    fn after_a_clean_close_a_bad_last_frame_is_damage_not_a_torn_tail() {
        let dir = tempfile::tempdir().expect("tempdir");
        let log = open(dir.path(), &mut Vec::new()).expect("open");
        for id in 1..=2u64 {
            log.push(|| id, Bytes::from_static(b"0123456789"));
        }
        log.flush().expect("flush");
        let end = log.end().expect("end");
        let path = seg_path(dir.path(), end.0);
        drop(log);
        let mut data = std::fs::read(&path).expect("read");
        let n = data.len();
        data[n - 1] ^= 0xff;
        std::fs::write(&path, &data).expect("write");

        let err = open_after(dir.path(), Some(end), &mut Vec::new()).err().expect("refused");
        assert!(err.to_string().contains("checksum mismatch"), "{err}");
        assert_eq!(std::fs::read(&path).expect("untouched"), data);
        // A marker from an earlier clean close says nothing about a later segment.
        let err = open_after(dir.path(), Some((end.0 + 1, 0)), &mut Vec::new()).err().expect("refused");
        assert!(err.to_string().contains("checksum mismatch"), "{err}");
        // A marker of an earlier segment (a crash since) or none at all: the
        // same bytes are a torn tail.
        let mut seen = Vec::new();
        let _ = open_after(dir.path(), Some((0, 0)), &mut seen).expect("cut");
        assert_eq!(seen.len(), 1, "the first record survives, the torn second is cut");
    }

    /// After a crash, only the last batch can be torn: damage to a frame or
    /// a batch header that a later batch of the segment follows refuses the
    /// store (data untouched); damage in the last batch is cut.
    #[test]
    fn after_a_crash_only_the_last_batch_is_cut() {
        let dir = tempfile::tempdir().expect("tempdir");
        let log =
            SegmentLog::open(Arc::new(super::super::disk::RealDisk), dir.path(), 1 << 20, None, false, |_| Ok(()))
                .expect("open");
        let mut locs = Vec::new();
        for id in 1..=6u64 {
            log.push(|| id, Bytes::from(format!("record {id}")));
            if id % 2 == 0 {
                locs.extend(log.flush().expect("flush").records);
            }
        }
        let path = seg_path(dir.path(), log.current());
        drop(log);
        let clean = std::fs::read(&path).expect("read");
        let frame = |i: usize| (locs[i].1.offset + FRAME_HEADER) as usize + ID_LEN;
        // Batch k's header sits right before its first record (records 0, 2, 4).
        let header = |k: usize| (locs[2 * k].1.offset - BATCH_HEADER) as usize + 20;
        let reopen = |flip_at: usize| {
            let mut data = clean.clone();
            data[flip_at] ^= 0xff;
            std::fs::write(&path, &data).expect("write");
            let mut seen = Vec::new();
            let opened =
                SegmentLog::open(Arc::new(super::super::disk::RealDisk), dir.path(), 1 << 20, None, false, |s| {
                    seen.push(s.id);
                    Ok(())
                });
            (opened.map(|_| seen), data)
        };

        for (what, at) in [("frame in batch 0", frame(1)), ("header of batch 1", header(1))] {
            let (opened, damaged) = reopen(at);
            let err = opened.err().unwrap_or_else(|| panic!("{what}: damage taken for a torn tail"));
            assert!(err.to_string().contains("mismatch"), "{what}: {err}");
            assert_eq!(std::fs::read(&path).expect("untouched"), damaged, "{what}: data untouched");
        }
        // The last batch (records 5 and 6) may be a torn write: cut.
        let (opened, _) = reopen(frame(5));
        assert_eq!(opened.expect("cut"), [1, 2, 3, 4, 5]);
        assert_eq!(std::fs::metadata(&path).expect("meta").len(), locs[5].1.offset);
        std::fs::write(&path, &clean).expect("restore");
        let (opened, _) = reopen(header(2));
        assert_eq!(opened.expect("cut"), [1, 2, 3, 4]);
    }

    /// A cut inside a batch rewrites that batch's header: after more
    /// segments are written (and a clean close), the cut segment opens as a
    /// whole one, not as one that ends inside a batch.
    #[test]
    fn a_segment_cut_inside_a_batch_opens_cleanly_later() {
        let dir = tempfile::tempdir().expect("tempdir");
        fn ids(seen: &mut Vec<u64>) -> impl FnMut(Scanned<'_>) -> Result<(), super::super::StoreError> + '_ {
            move |s| {
                seen.push(s.id);
                Ok(())
            }
        }
        let log =
            SegmentLog::open(Arc::new(super::super::disk::RealDisk), dir.path(), 1 << 20, None, false, |_| Ok(()))
                .expect("open");
        for id in 1..=3u64 {
            log.push(|| id, Bytes::from(format!("record {id}")));
        }
        let locs = log.flush().expect("flush").records;
        let path = seg_path(dir.path(), log.current());
        drop(log);
        // A torn write: the batch's last record is damaged.
        let mut data = std::fs::read(&path).expect("read");
        let n = data.len();
        data[n - 1] ^= 0xff;
        std::fs::write(&path, &data).expect("write");

        let mut seen = Vec::new();
        let log =
            SegmentLog::open(Arc::new(super::super::disk::RealDisk), dir.path(), 1 << 20, None, false, ids(&mut seen))
                .expect("cut");
        assert_eq!(seen, [1, 2]);
        assert_eq!(std::fs::metadata(&path).expect("meta").len(), locs[2].1.offset);
        log.push(|| 4, Bytes::from_static(b"record 4"));
        log.flush().expect("flush");
        let end = log.end();
        drop(log);

        let mut seen = Vec::new();
        let _ =
            SegmentLog::open(Arc::new(super::super::disk::RealDisk), dir.path(), 1 << 20, end, false, ids(&mut seen))
                .expect("reopen");
        assert_eq!(seen, [1, 2, 4]);
    }

    /// `repair`: damage in a sealed segment is cut there on request; the
    /// later segments stay whole, and the repaired log then opens normally.
    #[test]
    fn a_damaged_sealed_segment_is_cut_on_request_and_then_opens_normally() {
        let dir = tempfile::tempdir().expect("tempdir");
        let log = SegmentLog::open(Arc::new(super::super::disk::RealDisk), dir.path(), 150, None, false, |_| Ok(()))
            .expect("open");
        let mut locs = Vec::new();
        for id in 1..=6u64 {
            log.push(|| id, Bytes::from(format!("record {id}")));
            if id % 2 == 0 {
                locs.extend(log.flush().expect("flush").records);
            }
        }
        drop(log);
        // Records 1 and 2 are the first batch of segment 1; damage record 2.
        let first = seg_path(dir.path(), locs[1].1.seg);
        assert_ne!(locs[1].1.seg, locs[5].1.seg, "the damaged segment is sealed");
        let mut data = std::fs::read(&first).expect("read");
        data[(locs[1].1.offset + FRAME_HEADER) as usize + ID_LEN] ^= 0xff;
        std::fs::write(&first, &data).expect("write");

        let open_ids = |cut: bool| {
            let mut seen = Vec::new();
            SegmentLog::open(Arc::new(super::super::disk::RealDisk), dir.path(), 150, None, cut, |s| {
                seen.push(s.id);
                Ok(())
            })
            .map(|_| seen)
        };
        assert!(open_ids(false).is_err(), "damage in a sealed segment refuses the store");
        let kept = open_ids(true).expect("cut on request");
        assert!(kept.contains(&1) && !kept.contains(&2) && kept.contains(&6), "{kept:?}");
        assert_eq!(open_ids(false).expect("opens normally after the repair"), kept);
    }
}
