//! The record both backends store: a callback as received (route, peer,
//! headers, exact body bytes) with its destination list and the marks the
//! store keeps with it (de-duplication, ordering and lookup keys), and what
//! a delivery's history keeps of each attempt. The local store writes it
//! into its message log, JetStream publishes it; the backends' own keys and
//! state records are theirs (`local/format.rs`).
//!
//! A message id is `received_ms << 16 | sequence`, so ids sort by arrival
//! and carry their own receive time. Every record starts with a version
//! byte; a decoder rejects versions it does not know instead of guessing.
//! All integers are big-endian.

use bytes::Bytes;

pub(in crate::store) const RECORD_V1: u8 = 1;

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

pub(in crate::store) fn bad(what: &'static str, detail: impl Into<String>) -> DecodeError {
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
pub(in crate::store) fn put_destinations<D: AsRef<str>>(out: &mut Vec<u8>, destinations: &[D]) {
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
pub(in crate::store) fn at_destinations(r: &mut Reader<'_>) -> Result<usize, DecodeError> {
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

pub(in crate::store) fn put_history(out: &mut Vec<u8>, history: &[Attempt]) {
    let from = history.len().saturating_sub(HISTORY_LEN);
    out.push((history.len() - from) as u8);
    for a in &history[from..] {
        a.put(out);
    }
}

pub(in crate::store) fn read_history(r: &mut Reader<'_>) -> Result<Vec<Attempt>, DecodeError> {
    (0..r.u8()?).map(|_| Attempt::read(r)).collect()
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

pub(in crate::store) fn be_u64(b: &[u8]) -> u64 {
    let mut arr = [0u8; 8];
    arr.copy_from_slice(&b[..8]);
    u64::from_be_bytes(arr)
}

pub(in crate::store) fn put_str16(out: &mut Vec<u8>, s: &str) {
    // Longer strings are cut at a char boundary: they are route paths, header
    // names and error texts, which ingress and delivery keep short anyway.
    let mut end = s.len().min(u16::MAX as usize);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    out.extend_from_slice(&(end as u16).to_be_bytes());
    out.extend_from_slice(&s.as_bytes()[..end]);
}

pub(in crate::store) struct Reader<'a> {
    pub(in crate::store) buf: &'a [u8],
    pub(in crate::store) pos: usize,
    pub(in crate::store) what: &'static str,
}

impl<'a> Reader<'a> {
    /// A reader past the record's version byte, which must be one this
    /// build knows: a decoder never guesses at a newer format.
    pub(in crate::store) fn versioned(buf: &'a [u8], what: &'static str) -> Result<Reader<'a>, DecodeError> {
        let mut r = Reader { buf, pos: 0, what };
        let version = r.u8()?;
        if version != RECORD_V1 {
            return Err(bad(what, format!("unknown record version {version}")));
        }
        Ok(r)
    }

    pub(in crate::store) fn take(&mut self, n: usize) -> Result<&'a [u8], DecodeError> {
        let end =
            self.pos.checked_add(n).filter(|e| *e <= self.buf.len()).ok_or_else(|| bad(self.what, "truncated"))?;
        let s = &self.buf[self.pos..end];
        self.pos = end;
        Ok(s)
    }
    pub(in crate::store) fn u8(&mut self) -> Result<u8, DecodeError> {
        Ok(self.take(1)?[0])
    }
    pub(in crate::store) fn u16(&mut self) -> Result<u16, DecodeError> {
        let b = self.take(2)?;
        Ok(u16::from_be_bytes([b[0], b[1]]))
    }
    pub(in crate::store) fn u32(&mut self) -> Result<u32, DecodeError> {
        let b = self.take(4)?;
        Ok(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }
    pub(in crate::store) fn u64(&mut self) -> Result<u64, DecodeError> {
        Ok(be_u64(self.take(8)?))
    }
    pub(in crate::store) fn str16(&mut self) -> Result<String, DecodeError> {
        let len = self.u16()? as usize;
        let b = self.take(len)?;
        String::from_utf8(b.to_vec()).map_err(|_| bad(self.what, "string is not UTF-8"))
    }
}

/// The lookup key of `field` having `value` (a JSON string's characters,
/// any other JSON value's compact text): 8 bytes of SHA-256 of both. What
/// a route's `index` stores with a message, and an operator's lookup asks.
pub fn lookup_key(field: &str, value: &serde_json::Value) -> u64 {
    use sha2::{Digest, Sha256};
    let text = match value {
        serde_json::Value::String(s) => s.clone(),
        other => other.to_string(),
    };
    let mut h = Sha256::new();
    h.update(field.as_bytes());
    h.update([0u8]);
    h.update(text.as_bytes());
    let d = h.finalize();
    let mut b = [0u8; 8];
    b.copy_from_slice(&d[..8]);
    u64::from_be_bytes(b)
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
}
