//! The store's interface: what ingress, delivery and admin call, and all a
//! backend provides. [`Store`] dispatches to its backend with a `match`
//! (enum dispatch): the async methods stay plain `async fn`s, with no boxed
//! futures and no `dyn`, and a second backend (NATS JetStream) is one more
//! variant. Measured: the match costs nothing the benchmark can see (docs/benchmarks.md,
//! Benchmark: before and after the store restructuring).

use std::collections::HashSet;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use super::jetstream::{Jet, JetConfig};
use super::local::Local;
use super::{
    Appended, AppendedIn, Capabilities, Capability, DeadLetter, DestStats, Draft, Due, Inspection, Lease, Marks,
    MessageQuery, MessageRecord, Page, Pause, Selection, Settle, Source, StoreError, StoreKind, StoreOptions,
};

/// The durable store the relay runs on. Cheap to clone.
#[derive(Clone)]
pub struct Store(Backend);

#[derive(Clone)]
enum Backend {
    /// The embedded store (`store.path`): segment log + sled.
    Local(Local),
    /// NATS JetStream (`store.kind = "jetstream"`), shared by several relays.
    Jet(Jet),
}

impl Store {
    /// Opens (or creates) the local store at `path`, recovery on the
    /// blocking pool. `on_flush` observes each flush (duration, ok).
    pub async fn open_async(
        path: &Path,
        opts: StoreOptions,
        on_flush: impl Fn(Duration, bool) + Send + Sync + 'static,
    ) -> Result<Store, StoreError> {
        Ok(Store(Backend::Local(Local::open_async(path, opts, on_flush).await?)))
    }

    /// Connects to JetStream and creates or checks its streams and the
    /// consumers of `destinations` (name, concurrency). A server that
    /// cannot be reached yet is retried in the background (the store
    /// refuses callbacks until then); wrong credentials or a stream whose
    /// settings contradict the configuration are an error here.
    pub async fn open_jetstream(
        config: JetConfig,
        destinations: Vec<(Arc<str>, usize)>,
        wakers: crate::wake::Wakers,
    ) -> Result<Store, StoreError> {
        Ok(Store(Backend::Jet(Jet::open(config, destinations, wakers).await?)))
    }

    /// Which kind of store this is.
    pub fn kind(&self) -> StoreKind {
        match &self.0 {
            Backend::Local(_) => StoreKind::Local,
            Backend::Jet(_) => StoreKind::JetStream,
        }
    }

    /// What this store can do (`capabilities.rs`, the one table).
    pub fn capabilities(&self) -> Capabilities {
        self.kind().capabilities()
    }

    /// The refusal of something this backend cannot do.
    fn unsupported<T>(&self, c: Capability) -> Result<T, StoreError> {
        let why = self.capabilities().refusal(c);
        Err(StoreError::Unsupported(why.unwrap_or_else(|| format!("{} is not available", c.what()))))
    }

    /// The largest stored record the store takes, if it has a limit of its
    /// own (JetStream: the server's `max_payload`); ingress answers 413
    /// above it.
    pub fn max_record(&self) -> Option<u64> {
        match &self.0 {
            Backend::Local(_) => None,
            Backend::Jet(s) => s.max_record(),
        }
    }

    /// Refuses further appends, makes everything durable, stops the store's
    /// threads and tasks.
    pub async fn close(&self) -> Result<(), StoreError> {
        match &self.0 {
            Backend::Local(s) => s.close().await,
            Backend::Jet(s) => s.close().await,
        }
    }

    // --- Ingress -----------------------------------------------------------

    /// Whether a new message of `room` bytes would be taken right now.
    pub fn accepting(&self, room: u64) -> Result<(), StoreError> {
        match &self.0 {
            Backend::Local(s) => s.accepting(room),
            Backend::Jet(s) => s.accepting(room),
        }
    }

    /// Queues a message built while its body was read, pending for each of
    /// `destinations` (the ones `draft` was started with). Not durable, and
    /// not to be acknowledged, until [`Store::durable`] returns.
    /// `marks`: its de-duplication key (remembered with it), its ordering
    /// key for each destination that delivers in order by key (of a key's
    /// messages, one at a time is leased, oldest first), its lookup keys.
    pub fn append_draft(
        &self,
        draft: Draft,
        destinations: &[Arc<str>],
        marks: Marks<'_>,
    ) -> Result<Appended, StoreError> {
        match &self.0 {
            Backend::Local(s) => Ok(Appended(AppendedIn::Local(s.append_draft(draft, destinations, marks)?))),
            Backend::Jet(s) => Ok(Appended(AppendedIn::Jet(s.append_draft(draft, destinations, marks)?))),
        }
    }

    /// Stored messages whose route indexes a body field with this key
    /// ([`crate::store::lookup_key`]), oldest first: (id, received at).
    /// JetStream: from its index stream (`jetstream/lookup.rs`).
    pub async fn lookup(&self, key: u64) -> Result<Vec<(u64, u64)>, StoreError> {
        match &self.0 {
            Backend::Local(s) => Ok(s.lookup(key).into_iter().map(|id| (id, super::id_received_ms(id))).collect()),
            Backend::Jet(s) => s.lookup(key).await,
        }
    }

    /// Waits until `appended` is durable: the local log's group commit
    /// covered it, or JetStream acknowledged its publish (stored on a
    /// quorum of the stream's replicas). Only then may ingress answer 2xx.
    /// Returns the message's id.
    pub async fn durable(&self, appended: Appended) -> Result<u64, StoreError> {
        match (&self.0, appended.0) {
            (Backend::Local(s), AppendedIn::Local(id)) => {
                s.sync().await?;
                Ok(id)
            }
            (Backend::Jet(s), AppendedIn::Jet(publish)) => s.durable(publish).await,
            _ => Err(StoreError::Closed),
        }
    }

    /// The message an earlier callback with this de-duplication key became,
    /// if it was accepted within `window` (remembered across restarts).
    /// (JetStream: read from the key-value bucket every relay writes.)
    pub async fn duplicate_of(&self, key: &[u8; 16], window: Duration) -> Result<Option<u64>, StoreError> {
        match &self.0 {
            Backend::Local(s) => Ok(s.duplicate_of(key, window)),
            Backend::Jet(s) => s.duplicate(key, window).await,
        }
    }

    /// De-duplication keys remembered, and forgotten at the cap so far.
    pub fn dedupe_figures(&self) -> (usize, u64) {
        match &self.0 {
            Backend::Local(s) => s.dedupe_figures(),
            Backend::Jet(s) => s.dedupe_figures(),
        }
    }

    /// Waits until everything appended before this call is durable.
    pub async fn sync(&self) -> Result<(), StoreError> {
        match &self.0 {
            Backend::Local(s) => s.sync().await,
            Backend::Jet(s) => s.sync().await,
        }
    }

    /// The id senders and receivers see (`msg_...`).
    pub fn external_id(&self, id: u64) -> String {
        match &self.0 {
            Backend::Local(s) => s.external_id(id),
            Backend::Jet(s) => s.external_id(id),
        }
    }

    pub fn parse_external_id(&self, id: &str) -> Option<u64> {
        match &self.0 {
            Backend::Local(s) => s.parse_external_id(id),
            Backend::Jet(s) => s.parse_external_id(id),
        }
    }

    // --- Delivery ----------------------------------------------------------

    /// Up to `limit` deliveries of `dest` due at `now_ms`, oldest due
    /// first, skipping `skip` (those in flight); and when the next is due.
    pub fn due(&self, dest: &str, now_ms: u64, limit: usize, skip: &HashSet<u64>) -> Due {
        match &self.0 {
            Backend::Local(s) => s.due(dest, now_ms, limit, skip),
            Backend::Jet(s) => s.due(dest, limit),
        }
    }

    /// Makes `dest`'s deliveries that wait for a retry due now, when the
    /// destination answers again or an operator asks; returns how many.
    /// The worker still leases them within its concurrency and rate limit.
    /// JetStream: `Unsupported` (a nak'd message is the server's until its
    /// delay is over; there is no way to ask for it sooner).
    pub fn retry_now(&self, dest: &str) -> Result<usize, StoreError> {
        match &self.0 {
            Backend::Local(s) => Ok(s.retry_now(dest)),
            Backend::Jet(_) => self.unsupported(Capability::RetryNow),
        }
    }

    /// The message of `lease` (`None` if it is gone: the lease is dropped).
    pub async fn fetch(&self, lease: &Lease) -> Result<Option<MessageRecord>, StoreError> {
        match &self.0 {
            Backend::Local(s) => s.fetch(lease).await,
            Backend::Jet(s) => s.fetch(lease).await,
        }
    }

    /// A destination a reload added: the JetStream store makes its
    /// consumers (with its `ordering`) and pulls them; the local store
    /// needs nothing.
    pub async fn add_destination(
        &self,
        name: &Arc<str>,
        concurrency: usize,
        order: Option<crate::store::JetOrder>,
    ) -> Result<(), StoreError> {
        match &self.0 {
            Backend::Local(_) => Ok(()),
            Backend::Jet(s) => s.add_destination(name.clone(), concurrency, order).await,
        }
    }

    /// A destination a reload removed (its worker stopped): JetStream
    /// stops pulling for it; its deliveries are kept by both backends.
    pub async fn remove_destination(&self, name: &str) {
        if let Backend::Jet(s) = &self.0 {
            s.remove_destination(name).await;
        }
    }

    /// How old `lease`'s message (received at `received_ms` by the relay
    /// that took it) is at `now`, for `max_age`: JetStream goes by the
    /// server's clock, so another relay's skewed clock does not count.
    pub fn age_ms(&self, lease: &Lease, received_ms: u64, now: u64) -> u64 {
        match &self.0 {
            Backend::Local(_) => now.saturating_sub(received_ms),
            Backend::Jet(s) => s.age_ms(lease, received_ms, now),
        }
    }

    /// Records what became of `lease`'s attempt.
    pub async fn settle(&self, lease: &Lease, outcome: Settle) -> Result<(), StoreError> {
        match &self.0 {
            Backend::Local(s) => s.settle(lease, outcome).await,
            Backend::Jet(s) => s.settle(lease, outcome).await,
        }
    }

    // --- Dead letters (admin) ----------------------------------------------

    /// Up to `limit` dead letters of `dest`, oldest message first.
    pub async fn list_dead(&self, dest: &str, limit: usize) -> Result<Vec<DeadLetter>, StoreError> {
        match &self.0 {
            Backend::Local(s) => s.list_dead(dest, limit).await,
            Backend::Jet(s) => s.list_dead(dest, limit).await,
        }
    }

    /// Moves the dead letters of `dest` that `sel` covers back into its
    /// queue, due now; durable before it returns. Returns how many.
    pub async fn replay_dead(&self, dest: &str, sel: &Selection) -> Result<usize, StoreError> {
        match &self.0 {
            Backend::Local(s) => s.replay_dead(dest, sel).await,
            Backend::Jet(s) => s.replay_dead(dest, sel).await,
        }
    }

    /// Deletes the dead letters of `dest` that `sel` covers; durable before
    /// it returns. Returns how many.
    pub async fn purge_dead(&self, dest: &str, sel: &Selection) -> Result<usize, StoreError> {
        match &self.0 {
            Backend::Local(s) => s.purge_dead(dest, sel).await,
            Backend::Jet(s) => s.purge_dead(dest, sel).await,
        }
    }

    /// Sends the stored messages `dest` got that `sel` covers to it again
    /// (due now, through its queue); durable before it returns. Returns
    /// how many. JetStream: from the kept stream (`jetstream/kept.rs`).
    pub async fn replay_delivered(&self, dest: &str, sel: &Selection) -> Result<usize, StoreError> {
        match &self.0 {
            Backend::Local(s) => s.replay_delivered(dest, sel).await,
            Backend::Jet(s) => s.replay_delivered(dest, sel).await,
        }
    }

    /// How many messages of `dest` an operation on `source` with `sel`
    /// would cover now (to refuse one that covers none).
    pub async fn covered(&self, dest: &str, sel: &Selection, source: Source) -> Result<usize, StoreError> {
        let sel = Selection { progress: None, ..sel.clone() };
        match (&self.0, source) {
            (Backend::Local(s), source) => {
                let (s, dest) = (s.clone(), dest.to_string());
                super::local::blocking(move || match source {
                    Source::Dead => s.dead_ids(&dest, &sel).map(|ids| ids.len()),
                    Source::Delivered => s.delivered_ids(&dest, &sel).map(|ids| ids.len()),
                })
                .await
            }
            (Backend::Jet(s), Source::Dead) => Ok(s
                .list_dead(dest, usize::MAX)
                .await?
                .iter()
                .filter(|d| sel.covers(d.id, super::id_received_ms(d.id)))
                .count()),
            (Backend::Jet(s), Source::Delivered) => s.delivered_covered(dest, &sel).await.map(|v| v.len()),
        }
    }

    /// How long delivered messages are kept (ms; 0: not kept) and how many
    /// bytes of them at most (`None`: no byte bound).
    pub fn retention(&self) -> (u64, Option<u64>) {
        match &self.0 {
            Backend::Local(s) => s.retention(),
            Backend::Jet(s) => s.retention(),
        }
    }

    /// Messages kept after delivery (`store.retain_delivered`).
    pub fn retained(&self) -> u64 {
        match &self.0 {
            Backend::Local(s) => s.retained(),
            Backend::Jet(s) => s.kept_figures().0,
        }
    }

    /// Bytes of the messages kept after delivery (`store.retain_max_bytes`).
    pub fn retained_bytes(&self) -> u64 {
        match &self.0 {
            Backend::Local(s) => s.retained_bytes(),
            Backend::Jet(s) => s.kept_figures().1,
        }
    }

    // --- Inspection (admin) -------------------------------------------------

    /// Message `id` with each delivery's state and its attempts, while it
    /// is stored. JetStream: not available (`Unsupported`).
    pub async fn inspect(&self, id: u64) -> Result<Option<Inspection>, StoreError> {
        match &self.0 {
            Backend::Local(s) => s.inspect(id).await,
            Backend::Jet(s) => s.inspect(id).await,
        }
    }

    /// A page of the messages `q` asks for, oldest first.
    pub async fn list_messages(&self, q: &MessageQuery) -> Result<Page, StoreError> {
        match &self.0 {
            Backend::Local(s) => s.list_messages(q).await,
            Backend::Jet(s) => s.list_messages(q).await,
        }
    }

    // --- Destination state (admin, delivery) --------------------------------

    /// Why `dest` is paused, if it is.
    pub fn paused(&self, dest: &str) -> Option<Pause> {
        let stored = match &self.0 {
            Backend::Local(s) => s.paused_reason(dest),
            Backend::Jet(s) => s.paused_reason(dest),
        };
        stored.as_deref().map(Pause::from_stored)
    }

    /// Pauses (`Some(why)`) or resumes (`None`) `dest`; persisted.
    pub async fn set_paused(&self, dest: &str, pause: Option<Pause>) -> Result<(), StoreError> {
        let reason = pause.map(|p| p.reason().to_string());
        match &self.0 {
            Backend::Local(s) => s.set_paused(dest, reason).await,
            Backend::Jet(s) => s.set_paused(dest, reason).await,
        }
    }

    // --- Figures and health ------------------------------------------------

    pub fn stats(&self, dest: &str) -> DestStats {
        match &self.0 {
            Backend::Local(s) => s.stats(dest),
            Backend::Jet(s) => s.stats(dest),
        }
    }

    /// Destinations with pending or dead deliveries (configured or not).
    pub fn known_destinations(&self) -> Vec<String> {
        match &self.0 {
            Backend::Local(s) => s.known_destinations(),
            Backend::Jet(s) => s.known_destinations(),
        }
    }

    /// Bytes of stored messages (what `store.max_bytes` limits).
    pub fn bytes(&self) -> u64 {
        match &self.0 {
            Backend::Local(s) => s.bytes(),
            Backend::Jet(s) => s.bytes(),
        }
    }

    pub fn max_bytes(&self) -> Option<u64> {
        match &self.0 {
            Backend::Local(s) => s.max_bytes(),
            Backend::Jet(s) => s.max_bytes(),
        }
    }

    /// Size of the store's files.
    pub fn disk_bytes(&self) -> u64 {
        match &self.0 {
            Backend::Local(s) => s.disk_bytes(),
            Backend::Jet(s) => s.disk_bytes(),
        }
    }

    /// Free space where the store writes.
    pub fn free_bytes(&self) -> u64 {
        match &self.0 {
            Backend::Local(s) => s.free_bytes(),
            Backend::Jet(s) => s.free_bytes(),
        }
    }

    /// False once flushes keep failing (a restart is what recovers).
    pub fn is_healthy(&self) -> bool {
        match &self.0 {
            Backend::Local(s) => s.is_healthy(),
            Backend::Jet(s) => s.is_healthy(),
        }
    }

    /// Whether a flush failed since the store was opened (for the last log
    /// line at shutdown).
    pub fn flush_failed(&self) -> bool {
        match &self.0 {
            Backend::Local(s) => s.flush_failed(),
            Backend::Jet(s) => s.flush_failed(),
        }
    }

    pub fn is_closed(&self) -> bool {
        match &self.0 {
            Backend::Local(s) => s.is_closed(),
            Backend::Jet(s) => s.is_closed(),
        }
    }
}
