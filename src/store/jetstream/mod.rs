//! The NATS JetStream backend (`store.kind = "jetstream"`): several relays
//! share one replicated stream, so no relay (and no single NATS node, with
//! `replicas = 3`) is a point of failure.
//!
//! **Layout** (all names derive from `store.stream`, here `S`):
//! - stream `S`, subjects `S.in` and `S.in.*` (`S.in.<p>`: a callback
//!   with an ordering key, `lanes.rs`), **Interest** retention: every accepted
//!   callback is one message (the same record bytes the local log writes:
//!   route, sender address, destination list, headers, body; sealed with
//!   `[store.encryption]`, see `H_SEAL`). Its stream
//!   sequence is the message id (`msg_<uid><seq>`, `uid` from the stream's
//!   metadata, the same for every relay). A message is removed once every
//!   destination's consumer acknowledged it.
//! - one durable pull consumer per destination, `d-<name>`, filtering
//!   both subjects (a destination with `ordering` has other ones:
//!   `lanes.rs`). Why one subject and Interest retention, not a subject per
//!   destination: ingress publishes once per callback (one PubAck to wait
//!   for, and a callback is stored for all its destinations or for none);
//!   a consumer acknowledges at once the messages whose destination list
//!   (routes, filters) does not name it. WorkQueue retention would allow
//!   only one consumer per subject.
//! - stream `S-dead`, subjects `S.dead.<destination>`, Limits retention:
//!   dead letters (the record, with the attempts, last status and reason
//!   in headers); replay republishes one into `S.in` for that destination
//!   only (header `Switchboard-For`) and keeps its id (`Switchboard-Id`).
//! - key-value bucket `S-state`: `paused.<destination>` (paused
//!   destinations, seen by every relay through a watch).
//! - key-value bucket `S-history`: each delivery's state and last attempts
//!   (`history.rs`), kept 7 days.
//! - key-value buckets `S-dedupe-<window>ms` (one per distinct route
//!   window): the durable de-duplication keys, expired by the server at
//!   their window, so relays whose clocks disagree still agree on what is
//!   a duplicate.
//! - stream `S-kept` (only with `retain_delivered`): copies of the work
//!   stream's messages the server makes and expires (`kept.rs`).
//! - stream `S-index`, subjects `S.index.<lookup key>`: one entry per
//!   indexed field value and callback, for lookups (`lookup.rs`).
//!
//! **Acknowledgement**: ingress answers 2xx only after the stream's
//! PubAck (for `replicas = 3`: stored on a quorum). Publishes carry a
//! `Nats-Msg-Id`, and one whose ack was lost is retried once with the same
//! id, which the stream's duplicate window (2 minutes) stores once.
//!
//! **Delivery**: per destination, a puller keeps up to twice the
//! destination's concurrency of messages leased from its consumer (held:
//! in-progress acks every third of `ack_wait` keep them while they wait
//! for the worker, a rate limit or a breaker, and while an attempt runs);
//! the worker leases them through [`Jet::due`] like local due entries. A
//! retry is a nak with the retry policy's delay (the server redelivers it,
//! to any relay); `max_deliver` is unlimited, so retries are not stacked
//! on the server's own; the attempt count is the server's delivery count.
//! A relay killed mid-attempt stops renewing its leases, and the server
//! redelivers them after `ack_wait`. A closing relay naks what it holds.
//!
//! What this backend cannot do is its row in `store/capabilities.rs`
//! (the configuration check refuses those keys; the admin API answers 501).

mod clock;
mod dead;
mod flow;
mod history;
mod kept;
mod lanes;
mod listing;
mod lookup;
mod setup;

use std::collections::{HashMap, VecDeque};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use async_nats::jetstream::{self, kv, stream};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use super::{lock, DestStats, Lease, StoreError};
use crate::secret::Secret;
use crate::wake::Wakers;

pub(crate) use self::flow::Publish;
pub use self::lanes::JetOrder;

/// How a relay proves who it is to NATS.
#[derive(Debug, Clone, Default)]
pub enum JetAuth {
    #[default]
    None,
    UserPassword {
        user: String,
        password: Secret,
    },
    Token(Secret),
    /// An NKey seed (`SU...`).
    NKey(Secret),
    /// A `.creds` file (JWT and NKey seed).
    CredsFile(PathBuf),
}

/// `opts` with the way to authenticate (`auth`) and TLS (a CA file and a
/// client certificate, either of which requires TLS): how the store and a
/// NATS destination (`delivery/nats.rs`) both connect. `creds_key` names the
/// `.creds` file's setting in the error if it cannot be read.
pub async fn with_access(
    mut opts: async_nats::ConnectOptions,
    auth: &JetAuth,
    ca_file: Option<&PathBuf>,
    client_cert: Option<&(PathBuf, PathBuf)>,
    creds_key: &str,
) -> Result<async_nats::ConnectOptions, String> {
    opts = match auth {
        JetAuth::None => opts,
        JetAuth::UserPassword { user, password } => opts.user_and_password(user.clone(), password.expose().to_string()),
        JetAuth::Token(t) => opts.token(t.expose().to_string()),
        JetAuth::NKey(seed) => opts.nkey(seed.expose().to_string()),
        JetAuth::CredsFile(path) => {
            opts.credentials_file(path).await.map_err(|e| format!("cannot read {creds_key} {}: {e}", path.display()))?
        }
    };
    if let Some(ca) = ca_file {
        opts = opts.add_root_certificates(ca.clone()).require_tls(true);
    }
    if let Some((cert, key)) = client_cert {
        opts = opts.add_client_certificate(cert.clone(), key.clone()).require_tls(true);
    }
    Ok(opts)
}

/// `[store]` with `kind = "jetstream"`, validated.
#[derive(Debug, Clone)]
pub struct JetConfig {
    /// `nats://host:port` (or `tls://`) of one or more servers of the cluster.
    pub servers: Vec<String>,
    /// Stream name; also the prefix of its subjects and the other names.
    pub stream: String,
    /// 1, or 3 for a stream on a quorum of three servers.
    pub replicas: usize,
    pub auth: JetAuth,
    /// CA certificate (PEM) the servers' certificates are checked against.
    pub ca_file: Option<PathBuf>,
    /// Client certificate and key (PEM) for servers that require one.
    pub client_cert: Option<(PathBuf, PathBuf)>,
    /// The stream's `max_bytes` (new callbacks refused above it); `None`: no limit.
    pub max_bytes: Option<u64>,
    /// The routes' de-duplication windows, each distinct one a bucket
    /// whose keys the server expires at that window (no relay's clock is
    /// read to decide what is within a window); empty: none de-duplicates.
    pub dedupe_windows: Vec<Duration>,
    /// A consumer's `max_ack_pending`: leased and retrying messages, all
    /// relays together.
    pub max_ack_pending: usize,
    /// A consumer's `ack_wait`: how long a killed relay's leases last.
    pub ack_wait: Duration,
    /// How long ingress waits for a PubAck before answering 503.
    pub publish_timeout: Duration,
    /// `store.retain_delivered` (and `retain_max_bytes`, if set): every
    /// message is copied by the server into the stream `S-kept`, kept
    /// that long (`kept.rs`); `None`: not kept.
    pub retain: Option<(Duration, Option<u64>)>,
    /// Seals what is published (`[store.encryption]`): NATS and its disks
    /// see no body or header of a callback (`seal.rs`).
    pub(crate) sealer: Option<Arc<crate::store::seal::Sealer>>,
    /// Destinations with `ordering`, and how (`lanes.rs`).
    pub ordered: HashMap<String, JetOrder>,
    /// How many partitions the ordering keys hash into.
    pub order_partitions: u64,
}

impl JetConfig {
    /// Seals published records with `keys` (id and 32 key bytes each; the
    /// first seals, all open).
    pub fn seal_with(mut self, keys: &[(String, Vec<u8>)]) -> Result<JetConfig, String> {
        self.sealer = Some(Arc::new(crate::store::seal::Sealer::new(keys)?));
        Ok(self)
    }
}

/// The JetStream backend. Cheap to clone.
#[derive(Clone)]
pub struct Jet {
    inner: Arc<Inner>,
}

struct Inner {
    config: JetConfig,
    /// Set once connected and the streams and consumers are in place.
    ready: OnceLock<Ready>,
    /// Configured destinations (added and removed by reloads).
    dests: Mutex<HashMap<Arc<str>, Arc<Dest>>>,
    /// Destinations a reload removed: not pulled, their consumers (and
    /// what they had not acknowledged) kept, still reported.
    removed: Mutex<HashMap<Arc<str>, Arc<Dest>>>,
    /// Destinations with `ordering` (the configuration's at open, and
    /// destinations added by a reload with theirs; `lanes.rs`).
    ordered: Mutex<HashMap<String, JetOrder>>,
    wakers: Wakers,
    /// Paused destinations with why, as the `S-state` bucket says.
    paused: Mutex<HashMap<String, String>>,
    /// Figures refreshed every second from the server.
    figures: Mutex<Figures>,
    /// Publishes that failed in a row (for `/readyz` and the log), and
    /// when the last one failed (unix ms).
    publish_failures: AtomicU64,
    /// When the relay last left a server that took publishes but did not
    /// acknowledge them (unix ms; `flow.rs`).
    last_switch_ms: AtomicU64,
    /// History writes fail in floods while NATS is in trouble.
    history_failures_logged: crate::throttle::LogThrottle,
    /// History writes that failed, to try again (`history.rs`).
    redo: history::Redo,
    last_publish_failure_ms: AtomicU64,
    /// Why the backend cannot work at all (a stream that contradicts the
    /// configuration, found after a late connection), if it cannot.
    broken: Mutex<Option<String>>,
    closed: AtomicBool,
    /// This relay's clock against the server's, for ages (`clock.rs`).
    server_clock: clock::ServerClock,
    stop: CancellationToken,
    tasks: tokio_util::task::TaskTracker,
}

struct Ready {
    client: async_nats::Client,
    js: jetstream::Context,
    stream: stream::Stream,
    dead: stream::Stream,
    state: kv::Store,
    /// Each delivery's attempts and state (`history.rs`).
    history: kv::Store,
    /// The copies kept for `retain_delivered` (`kept.rs`).
    kept: Option<stream::Stream>,
    /// De-duplication keys: one bucket per route window (`flow.rs`).
    dedupe: Vec<(Duration, kv::Store)>,
    /// Lookup entries by indexed field (`lookup.rs`).
    index: stream::Stream,
    /// The stream's id part of external ids (`msg_<uid><seq>`).
    uid: String,
    max_payload: usize,
}

#[derive(Default)]
struct Figures {
    stats: HashMap<String, DestStats>,
    /// Destinations with dead letters (configured or not).
    dead_dests: Vec<String>,
    stream_bytes: u64,
    /// The kept stream's messages and bytes (`kept.rs`).
    kept: (u64, u64),
}

/// One destination's leases on this relay.
struct Dest {
    name: Arc<str>,
    /// Most messages held at once (pulled and not settled).
    cap: usize,
    /// Pulled, waiting for the worker to lease them.
    waiting: Mutex<VecDeque<Lease>>,
    /// Pulled and not settled (waiting or being attempted), by stream
    /// sequence: their ack handles, renewed while held.
    held: Mutex<HashMap<u64, jetstream::Message>>,
    /// A settle made room for the puller.
    room: Notify,
    /// Its consumers' names (`lanes.rs`), once set up.
    lanes: Mutex<Vec<String>>,
    /// Its pullers were started (once).
    started: AtomicBool,
    /// Stops its pullers (removed by a reload, or the store closing).
    stop: CancellationToken,
}

impl Dest {
    fn new(name: Arc<str>, concurrency: usize, stop: &CancellationToken) -> Arc<Dest> {
        Arc::new(Dest {
            name,
            cap: (concurrency * 2).max(8),
            waiting: Mutex::default(),
            held: Mutex::default(),
            room: Notify::new(),
            lanes: Mutex::default(),
            started: AtomicBool::new(false),
            stop: stop.child_token(),
        })
    }
}

/// Subjects and names under the stream's name.
struct Names<'a>(&'a str);

impl Names<'_> {
    fn inbound(&self) -> String {
        format!("{}.in", self.0)
    }
    fn dead_stream(&self) -> String {
        format!("{}-dead", self.0)
    }
    fn dead_subject(&self, dest: &str) -> String {
        format!("{}.dead.{dest}", self.0)
    }
    fn state_bucket(&self) -> String {
        format!("{}-state", self.0)
    }
    fn kept_stream(&self) -> String {
        format!("{}-kept", self.0)
    }
    fn history_bucket(&self) -> String {
        format!("{}-history", self.0)
    }
    fn dedupe_bucket(&self, window: Duration) -> String {
        format!("{}-dedupe-{}ms", self.0, window.as_millis())
    }
    fn consumer(dest: &str) -> String {
        format!("d-{dest}")
    }
}

/// Headers the relay sets on what it publishes.
const H_ID: &str = "Switchboard-Id";
const H_FOR: &str = "Switchboard-For";
const H_ATTEMPTS: &str = "Switchboard-Attempts";
const H_STATUS: &str = "Switchboard-Status";
const H_REASON: &str = "Switchboard-Reason";
const H_DEAD_AT: &str = "Switchboard-Dead-At";
/// On a dead letter: the subject it was delivered from (`lanes.rs`).
const H_SUBJECT: &str = "Switchboard-Subject";
/// On a sealed record: the number its seal is bound to (the associated
/// data `seal.rs` binds a local record to its message id; a JetStream id
/// is known only after the publish, so a random one is drawn and kept
/// here, and copied with the record into dead letters and replays).
const H_SEAL: &str = "Switchboard-Seal";
/// On a sealed record: its destinations, comma-separated (names from the
/// configuration, not secrets), so each destination's puller knows whether
/// a message is its own without opening the record.
const H_DESTS: &str = "Switchboard-Destinations";

impl Jet {
    /// A pulled, dead-lettered or replayed payload as the record it holds:
    /// opened if it was sealed (`H_SEAL`), as is if it is plain (published
    /// before sealing was on). A sealed one without the key refuses.
    fn open_payload(
        &self,
        headers: Option<&async_nats::HeaderMap>,
        payload: &bytes::Bytes,
    ) -> Result<bytes::Bytes, StoreError> {
        let seal = headers.and_then(|h| h.get(H_SEAL)).and_then(|v| v.as_str().parse::<u64>().ok());
        match seal {
            None if self.inner.config.sealer.is_none() => Ok(payload.clone()),
            id => {
                Ok(crate::store::seal::Sealer::open(self.inner.config.sealer.as_deref(), id.unwrap_or(0), payload)?
                    .into())
            }
        }
    }
}

/// Naks what `d` holds, so another relay takes it at once.
async fn give_back(d: &Dest) {
    let held: Vec<jetstream::Message> = lock(&d.held).drain().map(|(_, m)| m).collect();
    lock(&d.waiting).clear();
    for m in held {
        let _ = m.ack_with(jetstream::AckKind::Nak(None)).await;
    }
}

/// How long ingress refuses callbacks after a publish failed.
const PUBLISH_COOL_OFF: Duration = Duration::from_secs(1);

/// The metadata key of the stream's id part of external ids.
const UID_KEY: &str = "switchboard_uid";

impl Jet {
    fn ready(&self) -> Result<&Ready, StoreError> {
        if self.inner.closed.load(Ordering::SeqCst) {
            return Err(StoreError::Closed);
        }
        if let Some(why) = lock(&self.inner.broken).as_ref() {
            return Err(StoreError::Setup(why.clone()));
        }
        self.inner.ready.get().ok_or_else(|| StoreError::Unavailable("not connected to NATS yet".into()))
    }

    fn dest(&self, name: &str) -> Option<Arc<Dest>> {
        lock(&self.inner.dests).get(name).cloned()
    }

    /// Every configured destination.
    fn dests(&self) -> Vec<Arc<Dest>> {
        lock(&self.inner.dests).values().cloned().collect()
    }

    /// A configured destination, or one a reload removed.
    fn known(&self, name: &str) -> Option<Arc<Dest>> {
        self.dest(name).or_else(|| lock(&self.inner.removed).get(name).cloned())
    }

    /// Configured destinations and those a reload removed.
    fn all_known(&self) -> Vec<Arc<Dest>> {
        let mut all = self.dests();
        all.extend(lock(&self.inner.removed).values().cloned());
        all
    }

    pub fn external_id(&self, id: u64) -> String {
        let uid = self.inner.ready.get().map_or("00000000", |r| r.uid.as_str());
        format!("msg_{uid}{id:016x}")
    }

    pub fn parse_external_id(&self, s: &str) -> Option<u64> {
        let uid = &self.inner.ready.get()?.uid;
        let rest = s.strip_prefix("msg_")?.strip_prefix(uid.as_str())?;
        u64::from_str_radix(rest, 16).ok()
    }

    /// Whether a callback of `room` bytes would be taken now: connected,
    /// set up, publishes not failing.
    pub fn accepting(&self, room: u64) -> Result<(), StoreError> {
        let ready = self.ready()?;
        if ready.client.connection_state() != async_nats::connection::State::Connected {
            return Err(StoreError::Unavailable("connection to NATS lost; reconnecting".into()));
        }
        // After a failed publish, refuse for a moment (a sender retries
        // later; `/readyz` turns 503) instead of piling up requests that
        // each wait `publish_timeout`; the next request after it tries again.
        let failed_at = self.inner.last_publish_failure_ms.load(Ordering::Relaxed);
        if self.inner.publish_failures.load(Ordering::Relaxed) > 0
            && super::now_ms().saturating_sub(failed_at) < PUBLISH_COOL_OFF.as_millis() as u64
        {
            return Err(StoreError::Unavailable("JetStream did not acknowledge the last publish".into()));
        }
        if room > ready.max_payload as u64 {
            return Err(StoreError::TooLarge(room as usize));
        }
        Ok(())
    }

    /// The server's `max_payload`, less room for our headers.
    pub fn max_record(&self) -> Option<u64> {
        self.inner.ready.get().map(|r| (r.max_payload as u64).saturating_sub(flow::HEADER_ROOM))
    }

    pub fn stats(&self, dest: &str) -> DestStats {
        lock(&self.inner.figures).stats.get(dest).cloned().unwrap_or_default()
    }

    /// Configured destinations, and any with dead letters.
    pub fn known_destinations(&self) -> Vec<String> {
        let mut out: Vec<String> = self.all_known().iter().map(|d| d.name.to_string()).collect();
        for d in &lock(&self.inner.figures).dead_dests {
            if !out.contains(d) {
                out.push(d.clone());
            }
        }
        out
    }

    pub fn bytes(&self) -> u64 {
        lock(&self.inner.figures).stream_bytes
    }

    /// Messages and bytes kept after delivery (`kept.rs`), as last read.
    pub fn kept_figures(&self) -> (u64, u64) {
        lock(&self.inner.figures).kept
    }

    /// How long delivered messages are kept (ms; 0: not kept) and the
    /// byte bound, if any.
    pub fn retention(&self) -> (u64, Option<u64>) {
        self.inner.config.retain.map_or((0, None), |(age, bytes)| (age.as_millis() as u64, bytes))
    }

    pub fn max_bytes(&self) -> Option<u64> {
        self.inner.config.max_bytes
    }

    /// Nothing of this relay's is on a local disk.
    pub fn disk_bytes(&self) -> u64 {
        0
    }

    pub fn free_bytes(&self) -> u64 {
        0
    }

    /// Unhealthy only when a restart is what it takes: the stream
    /// contradicts the configuration. A lost connection is not (the client
    /// reconnects by itself; `/readyz` says so meanwhile).
    pub fn is_healthy(&self) -> bool {
        lock(&self.inner.broken).is_none()
    }

    pub fn flush_failed(&self) -> bool {
        self.inner.publish_failures.load(Ordering::Relaxed) > 0
    }

    pub fn is_closed(&self) -> bool {
        self.inner.closed.load(Ordering::SeqCst)
    }

    /// Not used: de-duplication keys are checked asynchronously
    /// ([`Jet::duplicate`]); nothing is remembered in memory.
    pub fn dedupe_figures(&self) -> (usize, u64) {
        (0, 0)
    }

    /// Nothing to wait for: a message is durable when its publish is
    /// acknowledged ([`Jet::durable`]).
    pub async fn sync(&self) -> Result<(), StoreError> {
        self.ready().map(|_| ())
    }

    /// Stops pulling, gives back (nak) what this relay holds so another
    /// relay takes it at once, and flushes the connection.
    pub async fn close(&self) -> Result<(), StoreError> {
        let inner = &self.inner;
        if inner.closed.swap(true, Ordering::SeqCst) {
            return Ok(());
        }
        inner.stop.cancel();
        inner.tasks.close();
        inner.tasks.wait().await;
        self.finish_history(Duration::from_secs(5)).await;
        for d in self.dests() {
            give_back(&d).await;
        }
        if let Some(r) = inner.ready.get() {
            let _ = tokio::time::timeout(Duration::from_secs(2), r.client.flush()).await;
        }
        Ok(())
    }
}
