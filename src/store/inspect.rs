//! What operators ask of a store, in the interface's words: what became of
//! one message at each destination (with the attempts kept), and the
//! messages of a destination in a state, by time. Each backend answers
//! them its own way (`local/inspect.rs`).

#[cfg(doc)]
use super::Store;
use super::{Attempt, MessageRecord};

/// A message and each of its deliveries, for [`Store::inspect`].
#[derive(Debug, Clone)]
pub struct Inspection {
    pub id: u64,
    pub record: MessageRecord,
    pub deliveries: Vec<DeliveryView>,
    /// Retained after delivery until then (unix ms); `None`: still needed.
    pub retained_until_ms: Option<u64>,
}

/// One destination's delivery of a message.
#[derive(Debug, Clone)]
pub struct DeliveryView {
    pub destination: String,
    pub state: DeliveryState,
    /// The attempts kept (the last few, oldest first).
    pub attempts: Vec<Attempt>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DeliveryState {
    /// Not delivered yet; the next attempt is due at `due_ms`.
    Pending {
        due_ms: u64,
    },
    /// Delivered, when the attempt that delivered it ended (unknown for
    /// deliveries recorded before attempts were kept).
    Delivered {
        at_ms: Option<u64>,
    },
    /// Its dead letter was deleted by an operator.
    Purged,
    Dead {
        dead_at_ms: u64,
        last_status: Option<u16>,
        reason: String,
    },
}

/// Which deliveries [`Store::list_messages`] lists.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Listing {
    Pending,
    Dead,
    /// Delivered to the destination and still stored (pending elsewhere,
    /// or retained).
    Delivered,
}

/// What [`Store::list_messages`] lists: the messages of `destination` in
/// `state`, received within `since_ms..=until_ms`, after message `after`
/// (the cursor), at most `limit`, oldest first.
#[derive(Debug, Clone)]
pub struct MessageQuery {
    pub destination: String,
    pub state: Listing,
    pub since_ms: u64,
    pub until_ms: u64,
    pub after: Option<u64>,
    pub limit: usize,
}

/// A page of [`Store::list_messages`]: ids oldest first, and the cursor of
/// the next page if there is one.
#[derive(Debug, Clone, Default)]
pub struct Page {
    pub ids: Vec<u64>,
    /// The cursor to pass as `after` for the next page.
    pub next: Option<u64>,
    /// When each of `ids` was received (unix ms), for a backend whose ids
    /// do not carry it (JetStream's are stream sequences); empty when they
    /// do (`id_received_ms`).
    pub received_ms: Vec<u64>,
}
