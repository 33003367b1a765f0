//! The durable store: messages, per-destination due queues and dead
//! letters, behind one interface, over two backends of equal standing.
//!
//! **Interface** (`api.rs`: what ingress, delivery and admin use; nothing
//! else of the store is public). [`Store`] dispatches to its backend with a
//! `match`: [`Store::append_draft`] + [`Store::durable`] (persist, then
//! acknowledge), [`Store::accepting`]; [`Store::due`] hands out [`Lease`]s,
//! [`Store::fetch`] reads a lease's message, [`Store::settle`] records what
//! became of it ([`Settle`]: delivered, retry at, dead letter); dead letters
//! ([`Store::list_dead`], [`Store::replay_dead`], [`Store::purge_dead`]);
//! inspection and retention; figures ([`Store::stats`] and friends);
//! [`Store::capabilities`], what the backend can do; open and
//! [`Store::close`]. Callers never see sled, segments, frames, streams or
//! consumers.
//!
//! **This folder** holds what both backends share: the interface
//! (`api.rs`), its vocabulary (below: leases, settling, selections,
//! figures), `capabilities.rs` (the one table of what each backend can do),
//! `record.rs` (the record both store: a callback with its destinations and
//! marks, and an attempt as history keeps it), `inspect.rs` (what operators
//! ask, in the interface's words), `seal.rs` (sealing records with
//! AES-256-GCM) and `error.rs`. Each backend is a folder: `local/` (a
//! segment log and sled; its module doc lists its files, threads and lock
//! order) and `jetstream/` (NATS JetStream). Neither imports the other.
//!
//! A third backend would be a third folder and a third variant of `api.rs`'s
//! enum, implementing each method of [`Store`] (or answering
//! [`StoreError::Unsupported`] where its [`Capabilities`] say it cannot),
//! turning a [`record::MessageRecord`] into whatever it stores, and making
//! [`Lease`]s with its own [`Handle`] variant.

mod api;
mod capabilities;
mod error;
mod inspect;
mod jetstream;
mod local;
pub(crate) mod record;
pub(crate) mod seal;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

pub use self::api::Store;
pub use self::capabilities::{Capabilities, Capability, StoreKind};
pub use self::error::{EngineError, StoreError};
pub use self::inspect::{DeliveryState, DeliveryView, Inspection, Listing, MessageQuery, Page};
pub use self::jetstream::{with_access, JetAuth, JetConfig, JetOrder};
pub use self::local::StoreOptions;
pub use self::local::FREE_SPACE_MAX_AGE;
use self::record::QueueRecord;
pub use self::record::{
    id_received_ms, lookup_key, Attempt, DecodeError, Draft, MessageRecord, ID_SEQ_BITS, MAX_DESTINATIONS, SNIPPET_LEN,
};

/// Largest request body a route may accept (`max_body`): its record, with
/// headers and framing, must stay within a log frame (1 GiB).
pub const MAX_BODY: u64 = 512 << 20;

/// A due delivery handed to a delivery worker: which message, for which
/// destination, and what settling it needs. Only the store makes them; a
/// lease that was settled, replayed or purged since is ignored when settled.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lease {
    pub dest: Arc<str>,
    pub id: u64,
    due_ms: u64,
    record: QueueRecord,
    /// What the backend settles the lease by (JetStream: the message).
    handle: Handle,
}

/// The backend's part of a lease.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
enum Handle {
    /// The local store: the due time and record say it all.
    #[default]
    Local,
    /// JetStream: the stream sequence of the delivered message, whose ack
    /// handle the backend holds until the lease is settled.
    Jet(u64),
}

/// What a message carries besides its bytes, for the store to keep with it
/// (in the same record, the same write): its de-duplication key, its
/// ordering key per ordered destination, its lookup keys.
#[derive(Debug, Clone, Copy, Default)]
pub struct Marks<'a> {
    pub dedupe: Option<[u8; 16]>,
    /// The route's de-duplication window (with `dedupe`).
    pub dedupe_window: std::time::Duration,
    pub order: &'a [(Arc<str>, u64)],
    pub index: &'a [u64],
    /// The relay's own operational event (`[notifications]`): the local
    /// store takes it even below `min_free_bytes` or past `max_bytes`
    /// (that margin is what lets "the store is refusing" be told; events
    /// are few and small), never when closed or broken.
    pub reserve: bool,
}

/// A message handed to [`Store::append_draft`], to be made durable by
/// [`Store::durable`] before it is acknowledged.
pub struct Appended(AppendedIn);

enum AppendedIn {
    /// Pushed onto the local log's queue with this id.
    Local(u64),
    /// To be published to JetStream.
    Jet(jetstream::Publish),
}

impl Lease {
    /// Attempts made before this one.
    pub fn attempts(&self) -> u32 {
        self.record.attempts
    }
}

/// What became of a delivery attempt, for [`Store::settle`]. A failed
/// attempt carries what the attempt history keeps of it (written with the
/// delivery's new state, in the same insert).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Settle {
    /// Delivered by `attempt` (kept in the delivery's history).
    Delivered { attempt: Attempt },
    /// Failed; try again at `at_ms` (unix ms).
    Retry { at_ms: u64, status: Option<u16>, error: String, attempt: Attempt },
    /// Failed for good: into the dead letters.
    Dead { status: Option<u16>, reason: String, attempt: Attempt },
}

/// Result of [`Store::due`].
#[derive(Debug, Default)]
pub struct Due {
    pub leases: Vec<Lease>,
    /// Due time of the first pending entry not returned (and not skipped), if any.
    pub next_due_ms: Option<u64>,
}

/// Which dead letters a replay or purge covers (one message, or those
/// received within a time range), and where it reports its progress.
#[derive(Debug, Clone, Default)]
pub struct Selection {
    pub only: Option<u64>,
    /// Received at or after this (unix ms).
    pub since_ms: u64,
    /// Received at or before this (unix ms); `None`: no bound.
    pub until_ms: Option<u64>,
    pub progress: Option<Arc<Progress>>,
}

/// What a replay covers: dead letters, or messages the destination got.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    Dead,
    Delivered,
}

/// How far a replay or purge is: `done` of `total` dead letters looked at.
#[derive(Debug, Default)]
pub struct Progress {
    pub total: AtomicUsize,
    pub done: AtomicUsize,
}

impl Selection {
    pub fn all() -> Selection {
        Selection::default()
    }

    pub fn one(id: u64) -> Selection {
        Selection { only: Some(id), ..Selection::default() }
    }

    /// Whether message `id`, received at `received_ms`, is covered.
    pub fn covers(&self, id: u64, received_ms: u64) -> bool {
        self.only.is_none_or(|o| o == id)
            && received_ms >= self.since_ms
            && self.until_ms.is_none_or(|u| received_ms <= u)
    }

    pub(crate) fn set_total(&self, n: usize) {
        if let Some(p) = &self.progress {
            p.total.store(n, Ordering::Relaxed);
        }
    }

    pub(crate) fn step(&self) {
        if let Some(p) = &self.progress {
            p.done.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// A dead-lettered delivery.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeadLetter {
    pub id: u64,
    pub attempts: u32,
    pub dead_at_ms: u64,
    pub last_status: Option<u16>,
    pub reason: String,
}

/// Per-destination figures for metrics and the admin API.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DestStats {
    pub depth: usize,
    /// Receive time (unix ms) of the oldest pending message.
    pub oldest_received_ms: Option<u64>,
    pub dead: usize,
}

pub use crate::text::now_ms;

pub(crate) fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // Every critical section in this module is a few map or counter updates
    // that cannot panic midway, so a poisoned lock still guards consistent data.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Why a destination is paused. Stored as its [`Pause::reason`] text (what
/// the admin API shows), read back by [`Pause::from_stored`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pause {
    /// `paused = true` in the configuration: set at every start, cleared
    /// when the key goes.
    Configuration,
    /// The destination answered `410 Gone`: until an operator resumes it.
    Gone,
    /// An operator paused it (admin API, CLI, status page).
    Operator,
}

impl Pause {
    pub fn reason(self) -> &'static str {
        match self {
            Pause::Configuration => "paused in the configuration",
            Pause::Gone => "the destination answered 410 Gone",
            Pause::Operator => "paused by an operator",
        }
    }

    /// A stored reason; a text this build did not write counts as an
    /// operator's pause (only an operator's resume clears it).
    pub fn from_stored(reason: &str) -> Pause {
        [Pause::Configuration, Pause::Gone].into_iter().find(|p| p.reason() == reason).unwrap_or(Pause::Operator)
    }
}

#[cfg(test)]
mod tests {
    use super::Pause;

    #[test]
    fn a_pause_reads_back_as_written_and_an_unknown_reason_as_an_operators() {
        for p in [Pause::Configuration, Pause::Gone, Pause::Operator] {
            assert_eq!(Pause::from_stored(p.reason()), p);
        }
        assert_eq!(Pause::from_stored("paused by hand in 2025"), Pause::Operator);
    }
}
