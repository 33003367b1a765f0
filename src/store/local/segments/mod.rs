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

use crate::store::local::disk::{write_all_at, Disk, SegFile};

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

/// A record found after a wanted one ([`SegmentLog::read_ahead`]): its id,
/// where it is, its bytes.
pub(crate) type Following = (u64, Loc, Bytes);

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
    /// Seals each record as it is written; opens it as it is read.
    sealer: Option<Arc<crate::store::seal::Sealer>>,
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

/// A fixed description of why a sealed record read back does not open.
fn sealed_detail(e: &crate::store::StoreError) -> &'static str {
    match e {
        crate::store::StoreError::MissingKey { .. } => "sealed with an encryption key that is not configured",
        _ => "sealed record does not open (wrong key, or damaged)",
    }
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

/// The frame at `pos` of `data`, checked: its id and payload length. An
/// error if it is not whole within `data` or does not check.
fn frame_at(data: &[u8], pos: usize) -> Result<(u64, u32), &'static str> {
    let mut header = [0u8; FRAME_HEADER as usize];
    header.copy_from_slice(data.get(pos..pos + FRAME_HEADER as usize).ok_or("frame cut short")?);
    let len = frame_len(header)?;
    let start = pos + FRAME_HEADER as usize;
    let payload = data.get(start..start + len as usize).ok_or("frame cut short")?;
    Ok((check_frame(header, payload)?, len))
}

fn frame_len(header: [u8; 8]) -> Result<u32, &'static str> {
    let len = u32::from_be_bytes([header[0], header[1], header[2], header[3]]);
    if len > MAX_PAYLOAD || (len as usize) < ID_LEN {
        return Err("impossible frame length");
    }
    Ok(len)
}

impl SegmentLog {
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
    /// Long on purpose: the group commit, one algorithm whose failure paths
    /// (cut the batch, poison the log) must sit next to the writes they undo.
    pub(crate) fn flush(&self) -> Result<Placed, LogError> {
        if self.broken.load(Ordering::SeqCst) {
            return Err(LogError::Broken);
        }
        let mut batch = std::mem::take(&mut *self.pending.lock().unwrap_or_else(|p| p.into_inner()));
        if let Some(sealer) = &self.sealer {
            for (id, record) in &mut batch {
                match sealer.seal(*id, record) {
                    Ok(sealed) => *record = Bytes::from(sealed),
                    Err(e) => {
                        self.broken.store(true, Ordering::SeqCst);
                        return Err(LogError::Io {
                            path: seg_path(&self.dir, self.current()),
                            source: std::io::Error::other(e.to_string()),
                        });
                    }
                }
            }
        }
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
        Ok(self.read_ahead(id, loc, 0)?.0)
    }

    /// Reads the record at `loc` (checked as [`SegmentLog::read`] checks it)
    /// and, in the same read, up to `ahead` bytes that follow it in the
    /// segment: the records of the whole frames found there, each with its
    /// id and place (a copy, so that none pins the read's buffer).
    ///
    /// Reading ahead is best effort: it stops at the first frame that is
    /// cut by the end of what was read, or that does not check (bytes past
    /// the last synced batch may be anything); the caller keeps only the
    /// records that its index places where they were found.
    pub(crate) fn read_ahead(&self, id: u64, loc: Loc, ahead: usize) -> Result<(Bytes, Vec<Following>), LogError> {
        let path = seg_path(&self.dir, loc.seg);
        let file = self.files.read().map_err(|_| LogError::Broken)?.get(&loc.seg).cloned();
        let Some(file) = file else {
            return Err(io_err(&path)(std::io::Error::new(std::io::ErrorKind::NotFound, "segment deleted")));
        };
        let wanted = FRAME_HEADER as usize + loc.len as usize;
        let mut buf = vec![0u8; wanted + ahead];
        let got = if ahead == 0 {
            file.read_exact_at(&mut buf, loc.offset).map_err(io_err(&path))?;
            wanted
        } else {
            let got = file.read_up_to(&mut buf, loc.offset).map_err(io_err(&path))?;
            if got < wanted {
                let eof = std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "frame beyond the end of its segment");
                return Err(io_err(&path)(eof));
            }
            got
        };
        buf.truncate(got);
        let data = Bytes::from(buf);
        let corrupt = |detail| LogError::Corrupt { path: path.clone(), offset: loc.offset, detail };
        let mut header = [0u8; FRAME_HEADER as usize];
        header.copy_from_slice(&data[..FRAME_HEADER as usize]);
        match frame_len(header) {
            Ok(len) if len != loc.len => return Err(corrupt("frame length does not match its index entry")),
            Ok(_) => {}
            Err(detail) => return Err(corrupt(detail)),
        }
        let record = match frame_at(&data, 0) {
            Ok((found, _)) if found == id => data.slice(FRAME_HEADER as usize + ID_LEN..wanted),
            Ok(_) => return Err(corrupt("record does not match its index entry")),
            Err(detail) => return Err(corrupt(detail)),
        };
        let record = self.open_record(id, record).map_err(corrupt)?;
        let mut following = Vec::new();
        let mut pos = wanted;
        while pos + FRAME_HEADER as usize <= data.len() {
            let word = u32::from_be_bytes([data[pos], data[pos + 1], data[pos + 2], data[pos + 3]]);
            if word == BATCH_MAGIC {
                pos += BATCH_HEADER as usize;
                continue;
            }
            let Ok((found, len)) = frame_at(&data, pos) else { break };
            let start = pos + FRAME_HEADER as usize + ID_LEN;
            let end = pos + FRAME_HEADER as usize + len as usize;
            let Ok(opened) = self.open_record(found, Bytes::copy_from_slice(&data[start..end])) else { break };
            following.push((found, Loc { seg: loc.seg, offset: loc.offset + pos as u64, len }, opened));
            pos = end;
        }
        Ok((record, following))
    }

    /// A record as read from a frame, opened if the log is sealed.
    fn open_record(&self, id: u64, record: Bytes) -> Result<Bytes, &'static str> {
        match &self.sealer {
            None => Ok(record),
            Some(s) => {
                crate::store::seal::Sealer::open(Some(s), id, &record).map(Bytes::from).map_err(|e| sealed_detail(&e))
            }
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

mod scan;
#[cfg(test)]
mod tests;
