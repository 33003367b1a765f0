//! The on-disk format: every key and record the store writes, in one place.
//! Longer than our usual file on purpose (rule 7 of STYLE: stored records
//! are a versioned format defined in one file): a reader checks a format
//! change against this one file.
//!
//! Format version 2 (recorded under `meta/format`). Message records are in
//! the message log, `segments/seg-<seq>` (framing in `segments.rs`);
//! sled holds everything else:
//!
//! | tree    | key                                  | value                              |
//! |---------|--------------------------------------|------------------------------------|
//! | `meta`  | `format`                             | u32 BE version                     |
//! | `meta`  | `uid`                                | 4 random bytes                     |
//! | `meta`  | `last_id`                            | u64 BE                             |
//! | `state` | destination, 0x00, message id u64 BE | [`StateRecord`]: retry, done or dead |
//! | `kept`  | message id, u64 BE                   | [`MessageRecord`] of a message with a dead letter |
//! | `done-<seq>` | destination, 0x00, message id u64 BE | [`DoneMark`]: delivered (with its attempts) or purged (message in segment `seq`) |
//! | `retained` | message id, u64 BE | [`RetainedRecord`]: kept after delivery until then, and where its record is |
//!
//! A message's deliveries are its record's destination list: one frame,
//! written and synced by one group commit, so a message and its pending
//! deliveries appear atomically. A destination with no `state` entry is
//! pending since the message arrived; `Retry` holds its next due time and
//! attempt count; `Done` and `Dead` end it. The `Done` of a message in the
//! log is a key in its segment's `done-<seq>` tree instead, so deleting a
//! segment drops its marks in one operation; a kept copy's `Done` is in
//! `state`. Every state change is a single insert of one key (sled 0.34
//! writes and syncs its log on every transaction commit, which made
//! transactions the relay's bottleneck).
//! A copy in `kept` takes precedence over the message's frame in the log.
//!
//! Version 1 kept message records in a sled tree `messages`; such a store is
//! refused (with its data left untouched) by this build.
//!
//! A message id is `received_ms << 16 | sequence`, so ids sort by arrival and
//! carry their own receive time. Destination names never contain 0x00
//! (config validation allows only `[A-Za-z0-9_-]`), so `name ++ 0x00` is a
//! prefix that no other destination's keys share.
//!
//! Every record starts with a version byte; a decoder rejects versions it does
//! not know instead of guessing. All integers are big-endian.

use bytes::Bytes;

pub const FORMAT_VERSION: u32 = 3;

/// The sled tree holding the `Done` marks (keys as in `state`, empty values)
/// of messages whose frame is in segment `seq`; dropped with the segment.
pub fn done_tree_name(seq: u64) -> String {
    format!("done-{seq:016x}")
}

/// The segment a done tree belongs to, if `name` is one.
pub fn parse_done_tree_name(name: &[u8]) -> Option<u64> {
    let hex = std::str::from_utf8(name).ok()?.strip_prefix("done-")?;
    u64::from_str_radix(hex, 16).ok()
}

/// The message log's directory inside the store directory.
pub const SEGMENTS_DIR: &str = "segments";
const RECORD_V1: u8 = 1;

/// Bits of a message id below the millisecond timestamp.
pub const ID_SEQ_BITS: u32 = 16;

pub fn id_received_ms(id: u64) -> u64 {
    id >> ID_SEQ_BITS
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("corrupt {what}: {detail}")]
pub struct DecodeError {
    pub what: &'static str,
    pub detail: String,
}

fn bad(what: &'static str, detail: impl Into<String>) -> DecodeError {
    DecodeError { what, detail: detail.into() }
}

/// A stored callback: where it came in, its headers and its exact body bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MessageRecord {
    pub received_ms: u64,
    pub route: String,
    /// The sender's address as the relay saw it (IP only), or empty.
    pub peer: String,
    /// End-to-end request headers in arrival order (hop-by-hop ones removed).
    pub headers: Vec<(String, Bytes)>,
    pub body: Bytes,
}

impl MessageRecord {
    /// Encodes the record without destinations (see [`MessageRecord::encode_for`]).
    pub fn encode(&self) -> Vec<u8> {
        self.encode_for::<&str>(&[])
    }

    /// Encodes the record with the destinations it is to be delivered to.
    pub fn encode_for<D: AsRef<str>>(&self, destinations: &[D]) -> Vec<u8> {
        let mut draft =
            Draft::new(self.received_ms, &self.route, &self.peer, &self.headers, destinations, self.body.len());
        draft.extend(&self.body);
        draft.buf
    }

    /// Decodes a record; `raw` is the value as stored (shared, not copied, for the body).
    pub fn decode(raw: Bytes) -> Result<MessageRecord, DecodeError> {
        const WHAT: &str = "message record";
        let mut r = Reader::versioned(&raw, WHAT)?;
        let received_ms = r.u64()?;
        let route = r.str16()?;
        let peer_len = r.u8()? as usize;
        let peer = String::from_utf8(r.take(peer_len)?.to_vec()).map_err(|_| bad(WHAT, "peer is not UTF-8"))?;
        let dests = r.u8()? as usize;
        for _ in 0..dests {
            let len = r.u8()? as usize;
            r.take(len)?;
        }
        let count = r.u16()? as usize;
        let mut headers = Vec::with_capacity(count);
        for _ in 0..count {
            let name = r.str16()?;
            let len = r.u32()? as usize;
            let start = r.pos;
            r.take(len)?;
            headers.push((name, raw.slice(start..start + len)));
        }
        let body = raw.slice(r.pos..);
        Ok(MessageRecord { received_ms, route, peer, headers, body })
    }
}

/// The destination list of a record: a count byte, then each name with its
/// length byte.
fn put_destinations<D: AsRef<str>>(out: &mut Vec<u8>, destinations: &[D]) {
    let count = destinations.len().min(MAX_DESTINATIONS);
    out.push(count as u8);
    for d in destinations.iter().take(count) {
        let d = &d.as_ref().as_bytes()[..d.as_ref().len().min(255)];
        out.push(d.len() as u8);
        out.extend_from_slice(d);
    }
}

/// Most destinations a route may list: the record stores their count in a byte.
pub const MAX_DESTINATIONS: usize = 255;

/// A message record built while its body arrives: everything before the body
/// is encoded first and the body is appended in place, so the body is copied
/// once, from the network's buffers into the record the log writes.
pub struct Draft {
    buf: Vec<u8>,
    body_start: usize,
    received_ms: u64,
    /// Where the destination list is (its count byte, and the end).
    dests: std::ops::Range<usize>,
    /// Where the header count (u16) is.
    headers_at: usize,
}

impl Draft {
    /// Starts a record; `body_hint` is the expected body size (capacity).
    /// At most [`MAX_DESTINATIONS`] destinations (config validation bounds
    /// routes); names of at most 255 bytes (validation allows 64).
    pub fn new<D: AsRef<str>>(
        received_ms: u64,
        route: &str,
        peer: &str,
        headers: &[(String, Bytes)],
        destinations: &[D],
        body_hint: usize,
    ) -> Draft {
        let headers_len: usize = headers.iter().map(|(n, v)| 6 + n.len() + v.len()).sum();
        let dests_len: usize = destinations.iter().map(|d| 1 + d.as_ref().len()).sum();
        let head = 1 + 8 + 2 + route.len() + 1 + peer.len() + 1 + dests_len + 2 + headers_len;
        let mut out = Vec::with_capacity(head + body_hint);
        out.push(RECORD_V1);
        out.extend_from_slice(&received_ms.to_be_bytes());
        put_str16(&mut out, route);
        let peer = &peer.as_bytes()[..peer.len().min(255)];
        out.push(peer.len() as u8);
        out.extend_from_slice(peer);
        let dests_at = out.len();
        put_destinations(&mut out, destinations);
        let dests = dests_at..out.len();
        let headers_at = out.len();
        let count = headers.len().min(u16::MAX as usize);
        out.extend_from_slice(&(count as u16).to_be_bytes());
        for (name, value) in headers.iter().take(count) {
            put_str16(&mut out, name);
            out.extend_from_slice(&(value.len() as u32).to_be_bytes());
            out.extend_from_slice(value);
        }
        let body_start = out.len();
        Draft { buf: out, body_start, received_ms, dests, headers_at }
    }

    /// Adds a stored header after the sender's (the store's own, such as
    /// the de-duplication key; a name no HTTP header can have, so it is
    /// never forwarded).
    pub(crate) fn push_header(&mut self, name: &str, value: &[u8]) {
        let at = self.headers_at;
        let count = u16::from_be_bytes([self.buf[at], self.buf[at + 1]]);
        if count == u16::MAX {
            return;
        }
        self.buf[at..at + 2].copy_from_slice(&(count + 1).to_be_bytes());
        let mut entry = Vec::with_capacity(6 + name.len() + value.len());
        put_str16(&mut entry, name);
        entry.extend_from_slice(&(value.len() as u32).to_be_bytes());
        entry.extend_from_slice(value);
        let n = entry.len();
        self.buf.splice(self.body_start..self.body_start, entry);
        self.body_start += n;
    }

    /// Narrows the destinations to `kept` (a subset of those it was started
    /// with, e.g. after filters ran on the body): the list is rewritten in
    /// place, the rest of the record moves up.
    pub fn retain_destinations<D: AsRef<str>>(&mut self, kept: &[D]) {
        let mut block = Vec::new();
        put_destinations(&mut block, kept);
        let old = self.dests.len();
        self.buf.splice(self.dests.clone(), block.iter().copied());
        self.body_start = self.body_start + block.len() - old;
        self.headers_at = self.headers_at + block.len() - old;
        self.dests = self.dests.start..self.dests.start + block.len();
    }

    /// Appends the next piece of the body.
    pub fn extend(&mut self, chunk: &[u8]) {
        self.buf.extend_from_slice(chunk);
    }

    /// The body received so far.
    pub fn body(&self) -> &[u8] {
        &self.buf[self.body_start..]
    }

    pub fn received_ms(&self) -> u64 {
        self.received_ms
    }

    pub(crate) fn into_record(self) -> Bytes {
        Bytes::from(self.buf)
    }
}

/// The stored header that carries a message's de-duplication key (a name
/// with a colon: no HTTP header can have it, so delivery never sends it).
pub const DEDUPE_HEADER: &str = ":switchboard-dedupe";

/// The de-duplication key a stored record carries, if any.
pub fn record_dedupe_key(raw: &Bytes) -> Result<Option<[u8; 16]>, DecodeError> {
    let m = MessageRecord::decode(raw.clone())?;
    Ok(m.headers.iter().find(|(n, _)| n == DEDUPE_HEADER).and_then(|(_, v)| <[u8; 16]>::try_from(&v[..]).ok()))
}

/// The stored header that carries a message's ordering keys: for each
/// destination that delivers in order (`ordering` = `per_key` or `fifo`),
/// `[name length u8][name][key u64 BE]`. Written by ingress with the
/// message (same frame, same fdatasync), read back at open to rebuild
/// each key's order.
pub const ORDER_HEADER: &str = ":switchboard-order";

/// Encodes the value of [`ORDER_HEADER`].
pub fn encode_order_keys(keys: &[(std::sync::Arc<str>, u64)]) -> Vec<u8> {
    let mut out = Vec::with_capacity(keys.iter().map(|(d, _)| 9 + d.len()).sum());
    for (dest, key) in keys {
        let name = &dest.as_bytes()[..dest.len().min(255)];
        out.push(name.len() as u8);
        out.extend_from_slice(name);
        out.extend_from_slice(&key.to_be_bytes());
    }
    out
}

/// Skips a record's receive time, route and peer: returns the number of
/// destinations, whose list comes next.
fn at_destinations(r: &mut Reader<'_>) -> Result<usize, DecodeError> {
    let _received = r.u64()?;
    let _route = r.str16()?;
    let peer_len = r.u8()? as usize;
    r.take(peer_len)?;
    Ok(r.u8()? as usize)
}

/// The stored header that carries a message's lookup keys (8 bytes each):
/// hashes of the body fields its route indexes (`index = [...]`).
pub const INDEX_HEADER: &str = ":switchboard-index";

/// What the store rebuilds from a record at open, besides its deliveries.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct RecordMarks {
    /// Ordering keys (destination, key).
    pub order: Vec<(String, u64)>,
    /// Lookup keys.
    pub index: Vec<u64>,
}

/// The ordering and lookup keys a stored record carries, if any. Reads the
/// record in place (no copy of the body).
pub fn record_marks(raw: &[u8]) -> Result<RecordMarks, DecodeError> {
    const WHAT: &str = "message record";
    let mut r = Reader::versioned(raw, WHAT)?;
    for _ in 0..at_destinations(&mut r)? {
        let len = r.u8()? as usize;
        r.take(len)?;
    }
    let mut out = RecordMarks::default();
    for _ in 0..r.u16()? {
        let name = r.str16()?;
        let len = r.u32()? as usize;
        let value = r.take(len)?;
        if name == INDEX_HEADER {
            out.index.extend(value.chunks_exact(8).map(be_u64));
            continue;
        }
        if name != ORDER_HEADER {
            continue;
        }
        let mut v = Reader { buf: value, pos: 0, what: WHAT };
        while v.pos < value.len() {
            let n = v.u8()? as usize;
            let dest =
                String::from_utf8(v.take(n)?.to_vec()).map_err(|_| bad(WHAT, "order key destination is not UTF-8"))?;
            out.order.push((dest, v.u64()?));
        }
    }
    Ok(out)
}

/// The destinations a stored message is to be delivered to.
pub fn record_destinations(raw: &[u8]) -> Result<Vec<String>, DecodeError> {
    const WHAT: &str = "message record";
    let mut r = Reader::versioned(raw, WHAT)?;
    let n = at_destinations(&mut r)?;
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        let len = r.u8()? as usize;
        out.push(String::from_utf8(r.take(len)?.to_vec()).map_err(|_| bad(WHAT, "destination is not UTF-8"))?);
    }
    Ok(out)
}

/// Where one destination's delivery of one message stands. `history`: the
/// last attempts (at most [`HISTORY_LEN`]), oldest first.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StateRecord {
    /// Pending, due at `due_ms`, after `record.attempts` failed attempts.
    Retry {
        due_ms: u64,
        record: QueueRecord,
        history: Vec<Attempt>,
    },
    /// Delivered; `history` ends with the attempt that delivered it (empty
    /// in records written before it was kept).
    Done {
        history: Vec<Attempt>,
    },
    Dead(DeadRecord),
    /// Its dead letter was deleted by an operator: done, not delivered.
    Purged,
}

const STATE_RETRY: u8 = 1;
const STATE_DONE: u8 = 2;
const STATE_DEAD: u8 = 3;
const STATE_PURGED: u8 = 4;

/// The value of a `Done` mark in a done tree for a purged dead letter.
pub const PURGED_MARK: &[u8] = b"p";
/// First byte of a `Done` mark that carries the delivery's attempts (an
/// empty mark, written before attempts were kept, is a delivery too).
const MARK_WITH_HISTORY: u8 = b'h';

/// What a `Done` mark in a done tree says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DoneMark {
    Delivered(Vec<Attempt>),
    Purged,
}

impl DoneMark {
    pub fn encode(&self) -> Vec<u8> {
        match self {
            DoneMark::Purged => PURGED_MARK.to_vec(),
            DoneMark::Delivered(history) => {
                let mut out = vec![MARK_WITH_HISTORY];
                put_history(&mut out, history);
                out
            }
        }
    }

    pub fn decode(raw: &[u8]) -> Result<DoneMark, DecodeError> {
        match raw.first() {
            None => Ok(DoneMark::Delivered(Vec::new())),
            Some(_) if raw == PURGED_MARK => Ok(DoneMark::Purged),
            Some(&MARK_WITH_HISTORY) => {
                let mut r = Reader { buf: raw, pos: 1, what: "done mark" };
                Ok(DoneMark::Delivered(read_history(&mut r)?))
            }
            Some(b) => Err(bad("done mark", format!("unknown kind {b}"))),
        }
    }

    /// The same ending as a `state` record (a kept copy's marks are there).
    pub fn into_state(self) -> StateRecord {
        match self {
            DoneMark::Delivered(history) => StateRecord::Done { history },
            DoneMark::Purged => StateRecord::Purged,
        }
    }
}

/// State records written since attempt history: the history follows the
/// kind's fields. Version 1 records (no history) are still read.
const STATE_V2: u8 = 2;

/// Attempts a delivery's history keeps (the latest ones).
pub const HISTORY_LEN: usize = 8;
/// Bytes of a response body an attempt keeps.
pub const SNIPPET_LEN: usize = 512;

/// One delivery attempt, as the history keeps it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Attempt {
    /// When it started (unix ms).
    pub at_ms: u64,
    pub duration_ms: u32,
    /// The destination's status, 0 if it did not answer.
    pub status: u16,
    /// Why it failed (empty when it did not): a transport error's kind and
    /// reason, or the status's.
    pub error: String,
    /// The first bytes of the response body ([`SNIPPET_LEN`] at most).
    pub snippet: Vec<u8>,
}

impl Attempt {
    fn put(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.at_ms.to_be_bytes());
        out.extend_from_slice(&self.duration_ms.to_be_bytes());
        out.extend_from_slice(&self.status.to_be_bytes());
        put_str16(out, &self.error);
        let n = self.snippet.len().min(SNIPPET_LEN);
        out.extend_from_slice(&(n as u16).to_be_bytes());
        out.extend_from_slice(&self.snippet[..n]);
    }

    fn read(r: &mut Reader<'_>) -> Result<Attempt, DecodeError> {
        let (at_ms, duration_ms, status, error) = (r.u64()?, r.u32()?, r.u16()?, r.str16()?);
        let n = r.u16()? as usize;
        Ok(Attempt { at_ms, duration_ms, status, error, snippet: r.take(n)?.to_vec() })
    }
}

fn put_history(out: &mut Vec<u8>, history: &[Attempt]) {
    let from = history.len().saturating_sub(HISTORY_LEN);
    out.push((history.len() - from) as u8);
    for a in &history[from..] {
        a.put(out);
    }
}

fn read_history(r: &mut Reader<'_>) -> Result<Vec<Attempt>, DecodeError> {
    (0..r.u8()?).map(|_| Attempt::read(r)).collect()
}

impl StateRecord {
    pub fn encode(&self) -> Vec<u8> {
        let mut out = vec![STATE_V2];
        match self {
            StateRecord::Retry { due_ms, record, history } => {
                out.push(STATE_RETRY);
                out.extend_from_slice(&due_ms.to_be_bytes());
                out.extend_from_slice(&record.attempts.to_be_bytes());
                out.extend_from_slice(&record.last_status.to_be_bytes());
                put_str16(&mut out, &record.last_error);
                put_history(&mut out, history);
            }
            StateRecord::Done { history } => {
                out.push(STATE_DONE);
                put_history(&mut out, history);
            }
            StateRecord::Purged => out.push(STATE_PURGED),
            StateRecord::Dead(d) => {
                out.push(STATE_DEAD);
                out.extend_from_slice(&d.attempts.to_be_bytes());
                out.extend_from_slice(&d.dead_at_ms.to_be_bytes());
                out.extend_from_slice(&d.last_status.to_be_bytes());
                put_str16(&mut out, &d.reason);
                put_history(&mut out, &d.history);
            }
        }
        out
    }

    pub fn decode(raw: &[u8]) -> Result<StateRecord, DecodeError> {
        const WHAT: &str = "delivery state";
        if raw.first() == Some(&STATE_V2) {
            let mut r = Reader { buf: raw, pos: 1, what: WHAT };
            return match r.u8()? {
                STATE_RETRY => {
                    let due_ms = r.u64()?;
                    let record = QueueRecord { attempts: r.u32()?, last_status: r.u16()?, last_error: r.str16()? };
                    Ok(StateRecord::Retry { due_ms, record, history: read_history(&mut r)? })
                }
                // Written without a history before deliveries kept theirs.
                STATE_DONE if r.pos == raw.len() => Ok(StateRecord::Done { history: Vec::new() }),
                STATE_DONE => Ok(StateRecord::Done { history: read_history(&mut r)? }),
                STATE_PURGED => Ok(StateRecord::Purged),
                STATE_DEAD => {
                    let (attempts, dead_at_ms, last_status, reason) = (r.u32()?, r.u64()?, r.u16()?, r.str16()?);
                    let history = read_history(&mut r)?;
                    Ok(StateRecord::Dead(DeadRecord { attempts, dead_at_ms, last_status, reason, history }))
                }
                k => Err(bad(WHAT, format!("unknown state kind {k}"))),
            };
        }
        let mut r = Reader::versioned(raw, WHAT)?;
        match r.u8()? {
            STATE_RETRY => {
                let due_ms = r.u64()?;
                Ok(StateRecord::Retry { due_ms, record: QueueRecord::decode(&raw[r.pos..])?, history: Vec::new() })
            }
            STATE_DONE => Ok(StateRecord::Done { history: Vec::new() }),
            STATE_DEAD => Ok(StateRecord::Dead(DeadRecord::decode(&raw[r.pos..])?)),
            k => Err(bad(WHAT, format!("unknown state kind {k}"))),
        }
    }

    /// The attempts this state keeps.
    pub fn history(&self) -> &[Attempt] {
        match self {
            StateRecord::Retry { history, .. } => history,
            StateRecord::Dead(d) => &d.history,
            StateRecord::Done { history } => history,
            StateRecord::Purged => &[],
        }
    }
}

/// A message kept after every destination was done with it
/// (`store.retain_delivered`): the value under its id in `retained`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RetainedRecord {
    /// When its last delivery ended (unix ms): it is forgotten at this plus
    /// the retention.
    pub finished_ms: u64,
    pub place: RetainedPlace,
    /// Its record's size in bytes (what `store.retain_max_bytes` counts);
    /// 0 in records written before it was kept (recovery counts a log
    /// frame's size for those).
    pub len: u32,
}

/// Where a retained message's record is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RetainedPlace {
    /// Settled before its batch was flushed: placed by the flush that
    /// writes it (or, after a crash, by recovery reading the log).
    Unplaced,
    Log(super::segments::Loc),
    /// A copy in `kept`; `origin` is its frame's segment, 0 if none.
    Kept {
        origin: u64,
    },
}

const RETAINED_UNPLACED: u8 = 0;
const RETAINED_LOG: u8 = 1;
const RETAINED_KEPT: u8 = 2;

impl RetainedRecord {
    pub fn encode(&self) -> Vec<u8> {
        let mut out = vec![RECORD_V1];
        out.extend_from_slice(&self.finished_ms.to_be_bytes());
        match self.place {
            RetainedPlace::Unplaced => out.push(RETAINED_UNPLACED),
            RetainedPlace::Log(loc) => {
                out.push(RETAINED_LOG);
                out.extend_from_slice(&loc.seg.to_be_bytes());
                out.extend_from_slice(&loc.offset.to_be_bytes());
                out.extend_from_slice(&loc.len.to_be_bytes());
            }
            RetainedPlace::Kept { origin } => {
                out.push(RETAINED_KEPT);
                out.extend_from_slice(&origin.to_be_bytes());
            }
        }
        out.extend_from_slice(&self.len.to_be_bytes());
        out
    }

    pub fn decode(raw: &[u8]) -> Result<RetainedRecord, DecodeError> {
        const WHAT: &str = "retained message";
        let mut r = Reader::versioned(raw, WHAT)?;
        let finished_ms = r.u64()?;
        let place = match r.u8()? {
            RETAINED_UNPLACED => RetainedPlace::Unplaced,
            RETAINED_LOG => RetainedPlace::Log(super::segments::Loc { seg: r.u64()?, offset: r.u64()?, len: r.u32()? }),
            RETAINED_KEPT => RetainedPlace::Kept { origin: r.u64()? },
            k => return Err(bad(WHAT, format!("unknown place {k}"))),
        };
        // A trailing size; absent in records of earlier builds.
        let len = if r.pos < r.buf.len() { r.u32()? } else { 0 };
        Ok(RetainedRecord { finished_ms, place, len })
    }
}

/// A pending delivery's state.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct QueueRecord {
    /// Attempts made so far.
    pub attempts: u32,
    /// Status of the last attempt, 0 if none or no status line.
    pub last_status: u16,
    pub last_error: String,
}

impl QueueRecord {
    /// The version 1 layout (state records embed it; still read).
    #[cfg(test)]
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(1 + 4 + 2 + 2 + self.last_error.len());
        out.push(RECORD_V1);
        out.extend_from_slice(&self.attempts.to_be_bytes());
        out.extend_from_slice(&self.last_status.to_be_bytes());
        put_str16(&mut out, &self.last_error);
        out
    }

    pub fn decode(raw: &[u8]) -> Result<QueueRecord, DecodeError> {
        const WHAT: &str = "queue record";
        let mut r = Reader::versioned(raw, WHAT)?;
        Ok(QueueRecord { attempts: r.u32()?, last_status: r.u16()?, last_error: r.str16()? })
    }
}

/// A delivery that was given up on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeadRecord {
    pub attempts: u32,
    pub dead_at_ms: u64,
    pub last_status: u16,
    pub reason: String,
    /// Its last attempts, oldest first.
    pub history: Vec<Attempt>,
}

impl DeadRecord {
    /// The version 1 layout (state records embed it; still read).
    #[cfg(test)]
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(1 + 4 + 8 + 2 + 2 + self.reason.len());
        out.push(RECORD_V1);
        out.extend_from_slice(&self.attempts.to_be_bytes());
        out.extend_from_slice(&self.dead_at_ms.to_be_bytes());
        out.extend_from_slice(&self.last_status.to_be_bytes());
        put_str16(&mut out, &self.reason);
        out
    }

    pub fn decode(raw: &[u8]) -> Result<DeadRecord, DecodeError> {
        const WHAT: &str = "dead-letter record";
        let mut r = Reader::versioned(raw, WHAT)?;
        Ok(DeadRecord {
            attempts: r.u32()?,
            dead_at_ms: r.u64()?,
            last_status: r.u16()?,
            reason: r.str16()?,
            history: Vec::new(),
        })
    }
}

pub fn dest_prefix(dest: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(dest.len() + 1);
    k.extend_from_slice(dest.as_bytes());
    k.push(0);
    k
}

/// Key of a `state` entry: destination, 0x00, message id.
pub fn state_key(dest: &str, id: u64) -> Vec<u8> {
    let mut k = dest_prefix(dest);
    k.extend_from_slice(&id.to_be_bytes());
    k
}

pub fn parse_state_key(key: &[u8]) -> Result<(&str, u64), DecodeError> {
    let (dest, rest) = split_dest(key, "state key")?;
    if rest.len() != 8 {
        return Err(bad("state key", "expected 8 bytes after the destination"));
    }
    Ok((dest, be_u64(rest)))
}

fn split_dest<'a>(key: &'a [u8], what: &'static str) -> Result<(&'a str, &'a [u8]), DecodeError> {
    let nul = key.iter().position(|b| *b == 0).ok_or_else(|| bad(what, "no destination separator"))?;
    let dest = std::str::from_utf8(&key[..nul]).map_err(|_| bad(what, "destination is not UTF-8"))?;
    Ok((dest, &key[nul + 1..]))
}

pub fn id_key(id: u64) -> [u8; 8] {
    id.to_be_bytes()
}

pub fn parse_id_key(key: &[u8]) -> Result<u64, DecodeError> {
    if key.len() != 8 {
        return Err(bad("message key", format!("expected 8 bytes, found {}", key.len())));
    }
    Ok(be_u64(key))
}

/// `meta` key: where the message log ended at the last clean close
/// (segment, offset; 16 bytes).
pub const CLEAN_END: &str = "clean_end";

pub fn decode_u64(raw: &[u8], what: &'static str) -> Result<u64, DecodeError> {
    let arr: [u8; 8] = raw.try_into().map_err(|_| bad(what, "expected 8 bytes"))?;
    Ok(u64::from_be_bytes(arr))
}

fn be_u64(b: &[u8]) -> u64 {
    let mut arr = [0u8; 8];
    arr.copy_from_slice(&b[..8]);
    u64::from_be_bytes(arr)
}

fn put_str16(out: &mut Vec<u8>, s: &str) {
    // Longer strings are cut at a char boundary: they are route paths, header
    // names and error texts, which ingress and delivery keep short anyway.
    let mut end = s.len().min(u16::MAX as usize);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    out.extend_from_slice(&(end as u16).to_be_bytes());
    out.extend_from_slice(&s.as_bytes()[..end]);
}

struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
    what: &'static str,
}

impl<'a> Reader<'a> {
    /// A reader past the record's version byte, which must be one this
    /// build knows: a decoder never guesses at a newer format.
    fn versioned(buf: &'a [u8], what: &'static str) -> Result<Reader<'a>, DecodeError> {
        let mut r = Reader { buf, pos: 0, what };
        let version = r.u8()?;
        if version != RECORD_V1 {
            return Err(bad(what, format!("unknown record version {version}")));
        }
        Ok(r)
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], DecodeError> {
        let end =
            self.pos.checked_add(n).filter(|e| *e <= self.buf.len()).ok_or_else(|| bad(self.what, "truncated"))?;
        let s = &self.buf[self.pos..end];
        self.pos = end;
        Ok(s)
    }
    fn u8(&mut self) -> Result<u8, DecodeError> {
        Ok(self.take(1)?[0])
    }
    fn u16(&mut self) -> Result<u16, DecodeError> {
        let b = self.take(2)?;
        Ok(u16::from_be_bytes([b[0], b[1]]))
    }
    fn u32(&mut self) -> Result<u32, DecodeError> {
        let b = self.take(4)?;
        Ok(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }
    fn u64(&mut self) -> Result<u64, DecodeError> {
        Ok(be_u64(self.take(8)?))
    }
    fn str16(&mut self) -> Result<String, DecodeError> {
        let len = self.u16()? as usize;
        let b = self.take(len)?;
        String::from_utf8(b.to_vec()).map_err(|_| bad(self.what, "string is not UTF-8"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_draft_narrowed_to_fewer_destinations_decodes_whole() {
        let headers = vec![("content-type".to_string(), Bytes::from_static(b"application/json"))];
        let mut d = Draft::new(5, "/in", "10.0.0.1", &headers, &["app", "audit", "team-a"], 4);
        d.extend(b"{\"a\"");
        d.extend(b":1}");
        d.retain_destinations(&["team-a"]);
        assert_eq!(d.body(), b"{\"a\":1}");
        let raw = d.into_record();
        assert_eq!(record_destinations(&raw).expect("dests"), ["team-a"]);
        let m = MessageRecord::decode(raw).expect("decode");
        assert_eq!((m.received_ms, m.route.as_str(), m.peer.as_str()), (5, "/in", "10.0.0.1"));
        assert_eq!(m.headers, headers);
        assert_eq!(&m.body[..], b"{\"a\":1}");
    }

    #[test]
    fn message_round_trip() {
        let m = MessageRecord {
            received_ms: 1_700_000_000_123,
            route: "/thingspace/CarrierService".into(),
            peer: "3.87.163.45".into(),
            headers: vec![
                ("content-type".into(), Bytes::from_static(b"application/json")),
                ("x-bin".into(), Bytes::from_static(&[0xff, 0x00])),
            ],
            body: Bytes::from_static(b"\x00\x01binary\xff"),
        };
        let raw = Bytes::from(m.encode_for(&["app", "audit"]));
        assert_eq!(MessageRecord::decode(raw.clone()).expect("decode"), m);
        assert_eq!(record_destinations(&raw).expect("destinations"), ["app", "audit"]);
    }

    #[test]
    fn state_round_trip() {
        let tried = |i: u64| Attempt {
            at_ms: 1_000 + i,
            duration_ms: 12,
            status: 503,
            error: "http 503".into(),
            snippet: b"<html>busy</html>".to_vec(),
        };
        for st in [
            StateRecord::Retry {
                due_ms: 77,
                record: QueueRecord { attempts: 3, last_status: 503, last_error: "http 503".into() },
                history: vec![tried(1), tried(2)],
            },
            StateRecord::Done { history: vec![tried(4)] },
            StateRecord::Done { history: vec![] },
            StateRecord::Purged,
            StateRecord::Dead(DeadRecord {
                attempts: 9,
                dead_at_ms: 5,
                last_status: 400,
                reason: "http 400".into(),
                history: vec![tried(3)],
            }),
        ] {
            assert_eq!(StateRecord::decode(&st.encode()).expect("decode"), st);
        }
        assert!(StateRecord::decode(&[1, 9]).is_err());
        assert!(StateRecord::decode(&[2, 9]).is_err());
        // Done marks: empty (written before history), purged, with attempts.
        for mark in [DoneMark::Delivered(vec![tried(5), tried(6)]), DoneMark::Purged] {
            assert_eq!(DoneMark::decode(&mark.encode()).expect("mark"), mark);
        }
        assert_eq!(DoneMark::decode(&[]).expect("old mark"), DoneMark::Delivered(vec![]));
        assert!(DoneMark::decode(b"h\x01").is_err(), "a history cut short");
        assert!(DoneMark::decode(b"z").is_err());
        for place in [
            RetainedPlace::Unplaced,
            RetainedPlace::Log(crate::store::segments::Loc { seg: 3, offset: 4096, len: 700 }),
            RetainedPlace::Kept { origin: 9 },
        ] {
            let r = RetainedRecord { finished_ms: 1234, place, len: 700 };
            assert_eq!(RetainedRecord::decode(&r.encode()).expect("retained"), r);
            // Written by an earlier build: no size.
            let old = &r.encode()[..r.encode().len() - 4];
            assert_eq!(RetainedRecord::decode(old).expect("retained"), RetainedRecord { len: 0, ..r });
        }
        assert!(RetainedRecord::decode(&[RECORD_V1, 0, 0]).is_err());
        // Only the last HISTORY_LEN attempts are kept, snippets bounded.
        let long = Attempt { snippet: vec![b'x'; 4 * SNIPPET_LEN], ..tried(0) };
        let st = StateRecord::Retry {
            due_ms: 1,
            record: QueueRecord::default(),
            history: (0..20).map(|i| Attempt { at_ms: i, ..long.clone() }).collect(),
        };
        let back = StateRecord::decode(&st.encode()).expect("decode");
        assert_eq!(back.history().len(), HISTORY_LEN);
        assert_eq!(back.history()[0].at_ms, 20 - HISTORY_LEN as u64);
        assert!(back.history().iter().all(|a| a.snippet.len() == SNIPPET_LEN));
    }

    /// Regression guard for stores written before attempt history: their
    /// version 1 state records still read, with no history.
    #[test]
    fn version_1_state_records_still_read() {
        let q = QueueRecord { attempts: 2, last_status: 500, last_error: "http 500".into() };
        let mut v1 = vec![RECORD_V1, STATE_RETRY];
        v1.extend_from_slice(&42u64.to_be_bytes());
        v1.extend_from_slice(&q.encode());
        assert_eq!(
            StateRecord::decode(&v1).expect("v1 retry"),
            StateRecord::Retry { due_ms: 42, record: q, history: vec![] }
        );
        let d = DeadRecord { attempts: 1, dead_at_ms: 9, last_status: 410, reason: "gone".into(), history: vec![] };
        let mut v1 = vec![RECORD_V1, STATE_DEAD];
        v1.extend_from_slice(&d.encode());
        assert_eq!(StateRecord::decode(&v1).expect("v1 dead"), StateRecord::Dead(d));
        assert_eq!(
            StateRecord::decode(&[RECORD_V1, STATE_DONE]).expect("v1 done"),
            StateRecord::Done { history: vec![] }
        );
        // A version 2 `Done` written before deliveries kept their history.
        assert_eq!(
            StateRecord::decode(&[STATE_V2, STATE_DONE]).expect("v2 done"),
            StateRecord::Done { history: vec![] }
        );
    }

    #[test]
    fn truncated_and_unknown_versions_are_errors_not_panics() {
        let m = MessageRecord {
            received_ms: 1,
            route: "/a".into(),
            peer: String::new(),
            headers: vec![("h".into(), Bytes::from_static(b"v"))],
            body: Bytes::new(),
        };
        let raw = m.encode();
        for cut in 0..raw.len() - 1 {
            // Every strict prefix shorter than the header section must fail cleanly.
            let _ = MessageRecord::decode(Bytes::copy_from_slice(&raw[..cut]));
        }
        let mut v2 = raw.clone();
        v2[0] = 2;
        assert!(MessageRecord::decode(Bytes::from(v2)).is_err());
        assert!(QueueRecord::decode(&[]).is_err());
        assert!(DeadRecord::decode(&[9, 0]).is_err());
    }

    #[test]
    fn state_keys_round_trip_and_do_not_collide_across_destinations() {
        assert_eq!(parse_state_key(&state_key("audit", 7)).expect("parse"), ("audit", 7));
        assert!(parse_state_key(b"app").is_err());
        // "app" keys never fall inside the "app2" prefix range and vice versa.
        assert!(!state_key("app2", 0).starts_with(&dest_prefix("app")));
        assert!(state_key("app", 1) < state_key("app", 2), "a destination's keys sort by message id");
    }
}
