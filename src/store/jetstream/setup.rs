//! Connecting, creating or checking the streams, buckets and consumers,
//! and the background tasks (pullers, lease renewal, figures, pauses).

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use async_nats::jetstream::{self, kv, stream};
use async_nats::ConnectErrorKind;
use futures_util::StreamExt;
use tokio_util::sync::CancellationToken;

use super::{Dest, Inner, Jet, JetConfig, Names, Ready, UID_KEY};
use crate::store::{lock, StoreError};
use crate::wake::Wakers;

/// The stream's duplicate window: long enough for a publish retried after
/// a lost ack (within `publish_timeout`), short enough that the server does
/// not remember every message id for long (it keeps each for the window).
const DUPLICATE_WINDOW: Duration = Duration::from_secs(120);

/// How often figures (depth, oldest, dead letters) are read from the server.
const FIGURES_EVERY: Duration = Duration::from_secs(1);

/// Why a connection attempt failed.
enum Refused {
    /// Retrying will not help (wrong credentials, TLS, a bad address).
    Fatal(String),
    /// The servers may come up: retry.
    Unreachable(String),
}

impl Jet {
    /// See [`crate::store::Store::open_jetstream`].
    pub async fn open(
        config: JetConfig,
        destinations: Vec<(Arc<str>, usize)>,
        wakers: Wakers,
    ) -> Result<Jet, StoreError> {
        let stop = CancellationToken::new();
        let dests = destinations
            .into_iter()
            .map(|(name, concurrency)| (name.clone(), Dest::new(name, concurrency, &stop)))
            .collect();
        let ordered = config.ordered.clone();
        let jet = Jet {
            inner: Arc::new(Inner {
                config,
                ready: OnceLock::new(),
                dests: Mutex::new(dests),
                removed: Mutex::default(),
                ordered: Mutex::new(ordered),
                wakers,
                paused: Mutex::default(),
                figures: Mutex::default(),
                publish_failures: AtomicU64::new(0),
                last_switch_ms: AtomicU64::new(0),
                history_failures_logged: Default::default(),
                redo: Default::default(),
                last_publish_failure_ms: AtomicU64::new(0),
                broken: Mutex::new(None),
                closed: AtomicBool::new(false),
                server_clock: Default::default(),
                stop,
                tasks: tokio_util::task::TaskTracker::new(),
            }),
        };
        match jet.connect().await {
            Ok(client) => match jet.set_up(client).await {
                Ok(()) => {}
                Err(StoreError::Setup(why)) => return Err(StoreError::Setup(why)),
                Err(e) => {
                    tracing::warn!(error = %e, "JetStream not ready; retrying in the background, callbacks are refused (503) until then");
                    let late = jet.clone();
                    jet.inner.tasks.spawn(async move { late.connect_later().await });
                }
            },
            Err(Refused::Fatal(why)) => return Err(StoreError::Setup(why)),
            Err(Refused::Unreachable(why)) => {
                tracing::warn!(servers = ?jet.inner.config.servers, error = %why,
                    "NATS not reachable; retrying in the background, callbacks are refused (503) and /readyz is 503 until then");
                let late = jet.clone();
                jet.inner.tasks.spawn(async move { late.connect_later().await });
            }
        }
        Ok(jet)
    }

    /// Retries the connection with backoff (1 s doubling to 30 s) until it
    /// works or the store closes.
    async fn connect_later(&self) {
        let mut wait = Duration::from_secs(1);
        loop {
            tokio::select! {
                _ = self.inner.stop.cancelled() => return,
                _ = tokio::time::sleep(wait) => {}
            }
            match self.connect().await {
                Ok(client) => match self.set_up(client).await {
                    Ok(()) => return,
                    Err(StoreError::Setup(why)) => {
                        tracing::error!(error = %why, "JetStream store cannot be used; fix the configuration or the stream, then restart");
                        *lock(&self.inner.broken) = Some(why);
                        return;
                    }
                    Err(e) => {
                        tracing::debug!(error = %e, "JetStream not ready yet; retrying");
                        wait = (wait * 2).min(Duration::from_secs(30));
                    }
                },
                Err(Refused::Fatal(why)) => {
                    tracing::error!(error = %why, "NATS refused the relay; fix the configuration, then restart");
                    *lock(&self.inner.broken) = Some(why);
                    return;
                }
                Err(Refused::Unreachable(_)) => wait = (wait * 2).min(Duration::from_secs(30)),
            }
        }
    }

    async fn connect(&self) -> Result<async_nats::Client, Refused> {
        let c = &self.inner.config;
        let opts = async_nats::ConnectOptions::new()
            .name("switchboard")
            .connection_timeout(Duration::from_secs(5))
            .max_reconnects(None)
            .reconnect_to_server_callback(|servers, left| async move { another_server(servers, &left) })
            .event_callback(|event| async move {
                match event {
                    async_nats::Event::Disconnected => {
                        tracing::warn!("connection to NATS lost; reconnecting (callbacks are refused meanwhile)")
                    }
                    async_nats::Event::Connected => tracing::info!("connected to NATS"),
                    other => tracing::debug!(event = %other, "NATS client event"),
                }
            });
        let opts = super::with_access(opts, &c.auth, c.ca_file.as_ref(), c.client_cert.as_ref(), "store.creds_file")
            .await
            .map_err(Refused::Fatal)?;
        let mut addrs = Vec::new();
        for s in &c.servers {
            let addr = s
                .parse::<async_nats::ServerAddr>()
                .map_err(|e| Refused::Fatal(format!("store.servers: {s:?} is not a server address: {e}")))?;
            addrs.push(addr);
        }
        opts.connect(addrs).await.map_err(|e| match e.kind() {
            ConnectErrorKind::AuthorizationViolation | ConnectErrorKind::Authentication => {
                Refused::Fatal("NATS refused the credentials (authorization violation): check the store's user/password, token, nkey or creds_file".into())
            }
            ConnectErrorKind::Tls => Refused::Fatal(format!("TLS with NATS failed: {e}")),
            ConnectErrorKind::ServerParse => Refused::Fatal(format!("store.servers: {e}")),
            // A TLS handshake the server or we refused (no or an unknown
            // client certificate, an untrusted server): a setting to fix,
            // not an outage to wait out.
            _ => match tls_refusal(&e) {
                Some(why) => Refused::Fatal(format!(
                    "TLS with NATS failed: {why} (check store.ca_file, store.client_cert and store.client_key)"
                )),
                None => Refused::Unreachable(e.to_string()),
            },
        })
    }

    /// Creates or checks the streams, buckets and consumers, then starts
    /// the background tasks. A stream whose settings contradict the
    /// configuration is refused, never changed.
    async fn set_up(&self, client: async_nats::Client) -> Result<(), StoreError> {
        let c = &self.inner.config;
        let names = Names(&c.stream);
        let mut js = jetstream::new(client.clone());
        js.set_timeout(c.publish_timeout);
        let stream = self.main_stream(&js).await?;
        let uid = stream.cached_info().config.metadata.get(UID_KEY).cloned().ok_or_else(|| {
            StoreError::Setup(format!(
                "stream {:?} exists but was not created by switchboard (no {UID_KEY} in its metadata); give store.stream another name",
                c.stream
            ))
        })?;
        let dead = ensure_stream(
            &js,
            stream::Config {
                name: names.dead_stream(),
                subjects: vec![names.dead_subject("*")],
                retention: stream::RetentionPolicy::Limits,
                storage: stream::StorageType::File,
                num_replicas: c.replicas,
                ..Default::default()
            },
        )
        .await?;
        let state = ensure_bucket(
            &js,
            kv::Config { bucket: names.state_bucket(), history: 1, num_replicas: c.replicas, ..Default::default() },
        )
        .await?;
        let history = ensure_bucket(
            &js,
            kv::Config {
                bucket: names.history_bucket(),
                history: 1,
                max_age: super::history::HISTORY_MAX_AGE,
                num_replicas: c.replicas,
                ..Default::default()
            },
        )
        .await?;
        let mut dedupe = Vec::new();
        for window in &c.dedupe_windows {
            let config = kv::Config {
                bucket: names.dedupe_bucket(*window),
                history: 1,
                max_age: *window,
                num_replicas: c.replicas,
                ..Default::default()
            };
            dedupe.push((*window, ensure_bucket(&js, config).await?));
        }
        let (kept, index) = copies(&js, &names, c).await?;
        let existing = Self::consumers_of(&stream).await?;
        let mut consumers = Vec::new();
        for d in self.dests() {
            let lanes = self.lanes(&stream, &d.name, &existing).await?;
            consumers.push((d, lanes));
        }
        let max_payload = client.server_info().max_payload;
        let ready = Ready { client, js, stream, dead, state, history, kept, dedupe, index, uid, max_payload };
        if self.inner.ready.set(ready).is_err() {
            return Ok(());
        }
        self.load_paused().await?;
        self.refresh_figures().await;
        for (d, lanes) in consumers {
            self.spawn_pullers(&d, lanes);
        }
        // Destinations a reload added while this relay was connecting.
        for d in self.dests() {
            if let Err(e) = self.start_destination(&d).await {
                tracing::warn!(destination = %d.name, error = %e, "could not set up an added destination's consumers");
            }
        }
        self.spawn_background();
        tracing::info!(stream = %c.stream, replicas = c.replicas, "JetStream store ready");
        Ok(())
    }

    /// The relay's background tasks once set up: lease renewal, the
    /// figures, the paused destinations, the queue of writes to try again
    /// (`history.rs`) and the server clock's probe (`clock.rs`).
    fn spawn_background(&self) {
        let me = self.clone();
        self.inner.tasks.spawn(async move { me.renew_leases().await });
        let me = self.clone();
        self.inner.tasks.spawn(async move {
            loop {
                tokio::select! {
                    _ = me.inner.stop.cancelled() => return,
                    _ = tokio::time::sleep(FIGURES_EVERY) => me.refresh_figures().await,
                }
            }
        });
        let me = self.clone();
        self.inner.tasks.spawn(async move { me.watch_paused().await });
        let me = self.clone();
        self.inner.tasks.spawn(async move { me.redo_history().await });
        let me = self.clone();
        self.inner.tasks.spawn(async move {
            loop {
                me.probe_clock().await;
                tokio::select! {
                    _ = me.inner.stop.cancelled() => return,
                    _ = tokio::time::sleep(super::clock::PROBE_EVERY) => {}
                }
            }
        });
    }

    /// The message stream: created with Interest retention, or checked.
    async fn main_stream(&self, js: &jetstream::Context) -> Result<stream::Stream, StoreError> {
        let c = &self.inner.config;
        let names = Names(&c.stream);
        let want = stream::Config {
            name: c.stream.clone(),
            subjects: vec![names.inbound(), names.lane_subjects()],
            retention: stream::RetentionPolicy::Interest,
            storage: stream::StorageType::File,
            num_replicas: c.replicas,
            duplicate_window: DUPLICATE_WINDOW,
            max_bytes: c.max_bytes.map_or(-1, |b| b as i64),
            discard: stream::DiscardPolicy::New,
            metadata: HashMap::from([(UID_KEY.to_string(), format!("{:08x}", rand::random::<u32>()))]),
            ..Default::default()
        };
        // Twice: relays starting together race to create it; the loser
        // reads the winner's.
        for last in [false, true] {
            match js.get_stream(&c.stream).await {
                Ok(mut existing) => {
                    let info = existing.info().await.map_err(|e| setup_error("reading the stream", e))?;
                    check_stream(&info.config, &want)?;
                    if info.config.subjects.contains(&names.lane_subjects()) {
                        return Ok(existing);
                    }
                    // Made by a build without ordering: add the partitions'
                    // subjects (nothing else changes).
                    let mut config = info.config.clone();
                    config.subjects.push(names.lane_subjects());
                    js.update_stream(config).await.map_err(|e| setup_error("adding the partitions' subjects", e))?;
                    return js.get_stream(&c.stream).await.map_err(|e| setup_error("reading the stream", e));
                }
                Err(e) if matches!(e.kind(), jetstream::context::GetStreamErrorKind::JetStream(_)) => {
                    match js.create_stream(want.clone()).await {
                        Ok(made) => return Ok(made),
                        Err(e) if last => return Err(setup_error(&format!("creating stream {:?}", c.stream), e)),
                        Err(_) => continue,
                    }
                }
                Err(e) => return Err(setup_error(&format!("looking up stream {:?}", c.stream), e)),
            }
        }
        unreachable!("the second round returns")
    }

    /// Reads the paused destinations.
    async fn load_paused(&self) -> Result<(), StoreError> {
        let state = &self.ready()?.state;
        let mut keys = state.keys().await.map_err(|e| setup_error("listing paused destinations", e))?;
        let mut found = HashMap::new();
        while let Some(k) = keys.next().await {
            let Ok(k) = k else { continue };
            let Some(dest) = k.strip_prefix("paused.") else { continue };
            if let Ok(Some(v)) = state.get(&k).await {
                found.insert(dest.to_string(), String::from_utf8_lossy(&v).into_owned());
            }
        }
        *lock(&self.inner.paused) = found;
        Ok(())
    }

    /// Follows pauses and resumes made by any relay.
    async fn watch_paused(&self) {
        let Ok(ready) = self.ready() else { return };
        loop {
            let mut watch = match ready.state.watch("paused.>").await {
                Ok(w) => w,
                Err(e) => {
                    tracing::debug!(error = %e, "watching paused destinations failed; retrying");
                    tokio::select! {
                        _ = self.inner.stop.cancelled() => return,
                        _ = tokio::time::sleep(Duration::from_secs(1)) => continue,
                    }
                }
            };
            loop {
                let entry = tokio::select! {
                    _ = self.inner.stop.cancelled() => return,
                    e = watch.next() => e,
                };
                let Some(Ok(entry)) = entry else { break };
                let Some(dest) = entry.key.strip_prefix("paused.") else { continue };
                match entry.operation {
                    kv::Operation::Put => {
                        lock(&self.inner.paused)
                            .insert(dest.to_string(), String::from_utf8_lossy(&entry.value).into_owned());
                    }
                    kv::Operation::Delete | kv::Operation::Purge => {
                        lock(&self.inner.paused).remove(dest);
                    }
                }
                self.inner.wakers.wake(dest);
            }
        }
    }
}

/// Refuses a stream whose settings contradict what the relay needs.
fn check_stream(have: &stream::Config, want: &stream::Config) -> Result<(), StoreError> {
    let name = &want.name;
    if have.retention != want.retention {
        return Err(StoreError::Setup(format!(
            "stream {name:?} has retention {:?}; switchboard needs {:?} (it never changes an existing stream's retention: delete the stream or choose another store.stream)",
            have.retention, want.retention
        )));
    }
    if have.num_replicas != want.num_replicas {
        return Err(StoreError::Setup(format!(
            "stream {name:?} has {} replicas; store.replicas is {}",
            have.num_replicas, want.num_replicas
        )));
    }
    if !have.subjects.iter().any(|s| want.subjects.contains(s)) {
        return Err(StoreError::Setup(format!(
            "stream {name:?} has subjects {:?}; switchboard publishes to {:?}",
            have.subjects, want.subjects
        )));
    }
    Ok(())
}

async fn ensure_stream(js: &jetstream::Context, want: stream::Config) -> Result<stream::Stream, StoreError> {
    match js.get_stream(&want.name).await {
        Ok(mut existing) => {
            let info = existing.info().await.map_err(|e| setup_error("reading the stream", e))?;
            check_stream(&info.config, &want)?;
            Ok(existing)
        }
        Err(_) => {
            let name = want.name.clone();
            js.create_stream(want).await.map_err(|e| setup_error(&format!("creating stream {name:?}"), e))
        }
    }
}

async fn ensure_bucket(js: &jetstream::Context, want: kv::Config) -> Result<kv::Store, StoreError> {
    match js.get_key_value(&want.bucket).await {
        Ok(b) => Ok(b),
        Err(_) => {
            let name = want.bucket.clone();
            js.create_key_value(want).await.map_err(|e| setup_error(&format!("creating bucket {name:?}"), e))
        }
    }
}

pub(super) fn setup_error(what: &str, e: impl std::fmt::Display) -> StoreError {
    StoreError::Unavailable(format!("JetStream: {what}: {e}"))
}

/// The TLS error behind a failed connection, if a handshake was refused.
fn tls_refusal(e: &(dyn std::error::Error + 'static)) -> Option<String> {
    let mut cur = Some(e);
    while let Some(err) = cur {
        let tls = err.downcast_ref::<rustls::Error>().or_else(|| {
            err.downcast_ref::<std::io::Error>()
                .and_then(|io| io.get_ref())
                .and_then(|i| i.downcast_ref::<rustls::Error>())
        });
        if let Some(t) = tls {
            return Some(t.to_string());
        }
        cur = err.source();
    }
    None
}

/// Where to reconnect: a server other than the one just left, the least
/// failing first (at random among equals). The server left may be alive
/// and reachable but cut off from its cluster (it takes publishes and never
/// acknowledges them: `flow.rs` leaves it); the default choice, at random
/// among all, would come back to it one time in three. `None` (the
/// client's own choice) when the pool has no other server.
fn another_server(
    servers: Vec<async_nats::Server>,
    left: &async_nats::ServerInfo,
) -> Option<async_nats::ReconnectToServer> {
    let others: Vec<async_nats::Server> =
        servers.into_iter().filter(|s| !(s.addr.host() == left.host && s.addr.port() == left.port)).collect();
    let least = others.iter().map(|s| s.failed_attempts).min()?;
    let best: Vec<&async_nats::Server> = others.iter().filter(|s| s.failed_attempts == least).collect();
    let pick = best.get(rand::random::<usize>() % best.len().max(1))?;
    Some(async_nats::ReconnectToServer { addr: pick.addr.clone(), delay: None })
}

/// The streams the server fills beside the work stream: `S-kept` (with
/// `retain_delivered`; a leftover one is warned about) and `S-index`.
async fn copies(
    js: &jetstream::Context,
    names: &Names<'_>,
    c: &JetConfig,
) -> Result<(Option<stream::Stream>, stream::Stream), StoreError> {
    let kept = match c.retain {
        Some((age, bytes)) => Some(super::kept::ensure_kept(js, names, c.replicas, age, bytes).await?),
        None => {
            if js.get_stream(names.kept_stream()).await.is_ok() {
                tracing::warn!(
                    stream = %names.kept_stream(),
                    "store.retain_delivered is off but the kept stream exists: it is no longer filled; delete it to free its space (nats stream rm)"
                );
            }
            None
        }
    };
    let index_age = c.retain.map_or(super::lookup::INDEX_MAX_AGE, |(age, _)| age);
    let index = super::lookup::ensure_index(js, names, c.replicas, index_age).await?;
    Ok((kept, index))
}
