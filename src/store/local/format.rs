//! The local store's on-disk format: every key and record it writes, in
//! one place (the message record itself is shared with JetStream:
//! `store/record.rs`).
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
//! | `done-<seq>` | destination, 0x00, message id u64 BE; or destination, 0x00, 0xff, block u64 BE, batch u64 BE (`marks.rs`) | [`DoneMark`]: delivered (with its attempts) or purged (message in segment `seq`); a batch: (id, length, mark) repeated |
//! | `retained` | message id, u64 BE; or 0xff, block u64 BE (`retained_blocks.rs`) | [`RetainedRecord`]: kept after delivery until then, and where its record is; a block: (id, length, record) repeated |
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

// The shared record's items, for the local store's files that read both.
pub(in crate::store) use crate::store::record::*;

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

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

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
            RetainedPlace::Log(crate::store::local::segments::Loc { seg: 3, offset: 4096, len: 700 }),
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
