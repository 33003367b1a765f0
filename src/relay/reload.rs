//! Configuration reload without a restart (SIGHUP, `systemctl reload`).
//!
//! The file is read and validated again; one that fails validation changes
//! nothing (the running configuration stays, the log and
//! `switchboard_config_reloads_total{result="error"}` say why). A valid one
//! is applied: the route table is swapped whole (routes, auth, filters,
//! de-duplication, ordering keys, indexes), the admin API's view too (its
//! destinations, token); each destination whose `[destinations.NAME]`
//! table changed gets a new worker once the old one finished its attempts
//! in flight (a changed URL, timeout, retry policy, concurrency, auth,
//! signing, filter...); an added destination gets a worker; a removed one's
//! worker stops, and its pending deliveries stay in the store, reported by
//! `switchboard status` (not configured) and
//! `switchboard_destination_configured`, delivered if it comes back, or
//! purged by the operator. What needs a restart (listener and admin
//! addresses, ingress limits, the store) is logged and left as it runs.
//! Certificates of the listeners are re-read too, as before.
//!
//! The routes' sender-credential headers are one map every worker reads
//! per attempt, swapped before the routes: a header that becomes a
//! credential is withheld at once by every destination (that did not ask
//! for credentials), and one that stops being one stays withheld until a
//! restart (callbacks stored under the old route still carry it).
//! A destination restarts when its table's text changes or a secret file
//! it names (`file:`) does: a secret rotated on disk is picked up by the
//! next reload. `env:` values cannot change under a running process.
//! On JetStream an added destination's consumers are made by the reload
//! (`Store::add_destination`), a removed one stops being pulled and its
//! consumers stay (what it had not acknowledged waits for it); a changed
//! `ordering` of a destination that stays needs a restart there (logged).

use std::collections::HashMap;
use std::sync::Arc;

use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::Config;
use crate::delivery::Worker;
use crate::metrics::Metrics;
use crate::store::{Capability, Store};
use crate::wake::Wakers;

/// A destination's running worker.
struct Running {
    /// The destination's table as the file wrote it, with its secret files' hashes (what a reload compares).
    fingerprint: String,
    stop: CancellationToken,
    done: tokio::task::JoinHandle<()>,
}

/// Everything a reload changes, and what it needs to start workers.
pub(crate) struct Reloader {
    pub(crate) config: Config,
    pub(crate) store: Store,
    pub(crate) metrics: Arc<Metrics>,
    pub(crate) wakers: Wakers,
    pub(crate) tracker: TaskTracker,
    pub(crate) shutdown: CancellationToken,
    pub(crate) ingress: Arc<crate::ingress::Ingress>,
    pub(crate) admin: Arc<crate::admin::Admin>,
    pub(crate) loaded: Arc<crate::admin::Loaded>,
    /// Client certificates of destinations, by name (as loaded at start).
    pub(crate) client_certs: HashMap<String, crate::tls::CertStore>,
    /// The senders' credential headers by route, shared by the workers.
    credentials: crate::delivery::Credentials,
    /// The body fields each route indexes, shared by the workers.
    indexed: crate::delivery::Indexed,
    workers: HashMap<String, Running>,
}

/// The credential headers of `routes`, added to those of `before` (a
/// header that was a route's credential stays withheld: callbacks stored
/// under the old settings still carry it).
fn credential_map(
    before: &HashMap<String, Vec<http::HeaderName>>,
    routes: &[crate::ingress::Route],
) -> HashMap<String, Vec<http::HeaderName>> {
    let mut map = before.clone();
    for r in routes {
        let names = map.entry(r.path.clone()).or_default();
        for h in &r.credential_headers {
            if !names.contains(h) {
                names.push(h.clone());
            }
        }
    }
    map
}

/// The body fields each route indexes, by route path.
fn index_map(routes: &[crate::ingress::Route]) -> HashMap<String, Vec<(String, Vec<crate::fieldpath::Step>)>> {
    routes.iter().map(|r| (r.path.clone(), r.index.clone())).collect()
}

/// Each destination's table in the file, as text, with the hash of every
/// secret file it names (`file:`): a secret rotated on disk changes it too.
fn fingerprints(path: &std::path::Path) -> HashMap<String, String> {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let Ok(v) = toml::from_str::<toml::Value>(&text) else { return HashMap::new() };
    v.get("destinations")
        .and_then(|d| d.as_table())
        .map(|t| {
            t.iter()
                .map(|(k, v)| {
                    let mut print = v.to_string();
                    secret_files(v, &mut |file| {
                        print.push('\0');
                        print.push_str(&crate::config::sha256_hex(std::path::Path::new(file)));
                    });
                    (k.clone(), print)
                })
                .collect()
        })
        .unwrap_or_default()
}

/// Calls `found` with the path of every `file:` string in `v`.
fn secret_files(v: &toml::Value, found: &mut impl FnMut(&str)) {
    match v {
        toml::Value::String(s) => {
            if let Some(path) = s.strip_prefix("file:") {
                found(path);
            }
        }
        toml::Value::Array(items) => items.iter().for_each(|i| secret_files(i, found)),
        toml::Value::Table(t) => t.values().for_each(|i| secret_files(i, found)),
        _ => {}
    }
}

impl Reloader {
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn new(
        config: Config,
        store: Store,
        metrics: Arc<Metrics>,
        wakers: Wakers,
        tracker: TaskTracker,
        shutdown: CancellationToken,
        ingress: Arc<crate::ingress::Ingress>,
        admin: Arc<crate::admin::Admin>,
        loaded: Arc<crate::admin::Loaded>,
        client_certs: HashMap<String, crate::tls::CertStore>,
    ) -> Reloader {
        let credentials = Arc::new(arc_swap::ArcSwap::from_pointee(credential_map(&HashMap::new(), &config.routes)));
        let indexed = Arc::new(arc_swap::ArcSwap::from_pointee(index_map(&config.routes)));
        Reloader {
            credentials,
            indexed,
            config,
            store,
            metrics,
            wakers,
            tracker,
            shutdown,
            ingress,
            admin,
            loaded,
            client_certs,
            workers: HashMap::new(),
        }
    }

    /// Starts a worker for every configured destination.
    pub(crate) fn start_all(&mut self) -> anyhow::Result<()> {
        let prints = fingerprints(&self.config.source);
        for d in self.config.destinations.clone() {
            let print = prints.get(&*d.name).cloned().unwrap_or_default();
            self.start(d, print)?;
        }
        Ok(())
    }

    /// Starts `dest`'s worker.
    fn start(&mut self, dest: Arc<crate::delivery::Destination>, fingerprint: String) -> anyhow::Result<()> {
        use anyhow::Context;
        let credentials = self.credentials.clone();
        self.wakers.add(&dest.name);
        let cert = match &dest.client_cert {
            None => None,
            Some(files) => match self.client_certs.get(&*dest.name) {
                Some(c) if c.files() == files => Some(c.clone()),
                _ => {
                    let c = crate::tls::CertStore::open(files.clone())
                        .with_context(|| format!("client certificate of destination {}", dest.name))?;
                    self.client_certs.insert(dest.name.to_string(), c.clone());
                    Some(c)
                }
            },
        };
        let worker = Worker::new(
            dest.clone(),
            credentials,
            self.indexed.clone(),
            cert,
            self.store.clone(),
            self.metrics.clone(),
            &self.wakers,
        )
        .with_context(|| format!("setting up destination {}", dest.name))?;
        let stop = self.shutdown.child_token();
        let done = self.tracker.spawn(worker.run(stop.clone(), self.config.grace_period));
        self.workers.insert(dest.name.to_string(), Running { fingerprint, stop, done });
        Ok(())
    }

    /// Stops `name`'s worker and waits for its attempts in flight.
    async fn stop(&mut self, name: &str) {
        if let Some(r) = self.workers.remove(name) {
            r.stop.cancel();
            let _ = r.done.await;
        }
    }

    /// Waits for reload requests until shutdown; each re-reads the file
    /// and applies it, then wakes `certificates` (the listeners' files).
    pub(crate) async fn run(mut self, reload: Arc<Notify>, certificates: Arc<Notify>) {
        loop {
            tokio::select! {
                _ = self.shutdown.cancelled() => return,
                _ = reload.notified() => {}
            }
            match self.reload().await {
                Ok(summary) => {
                    self.loaded.reloaded(crate::config::sha256_hex(&self.config.source));
                    self.metrics.config_reloads.with_label_values(&["ok"]).inc();
                    tracing::info!(file = %self.config.source.display(), changes = %summary, "configuration reloaded");
                }
                Err(e) => {
                    self.loaded.refused(format!("{e:#}"));
                    let error = format!("{e:#}");
                    self.wakers.events().emit(crate::events::Event::ReloadFailed { error });
                    self.metrics.config_reloads.with_label_values(&["error"]).inc();
                    tracing::error!(
                        error = format!("{e:#}"),
                        "configuration reload refused; the running configuration stays"
                    );
                }
            }
            certificates.notify_one();
        }
    }

    /// Loads, validates and applies the file; returns what changed.
    async fn reload(&mut self) -> anyhow::Result<String> {
        let new = Config::load(&self.config.source)?;
        let old = &self.config;
        let names = |c: &Config| -> Vec<String> { c.destinations.iter().map(|d| d.name.to_string()).collect() };
        let (old_names, new_names) = (names(old), names(&new));
        let added: Vec<String> = new_names.iter().filter(|n| !old_names.contains(n)).cloned().collect();
        let removed: Vec<String> = old_names.iter().filter(|n| !new_names.contains(n)).cloned().collect();
        if let (Some(refusal), false) = (
            self.store.capabilities().refusal(Capability::DestinationsOnReload),
            added.is_empty() && removed.is_empty(),
        ) {
            anyhow::bail!("{} ({refusal})", added.iter().chain(&removed).cloned().collect::<Vec<_>>().join(", "));
        }
        restart_needed(old, &new);
        // Credentials first: every worker withholds the new route's
        // credential headers before ingress accepts a callback under it.
        self.credentials.store(Arc::new(credential_map(&self.credentials.load(), &new.routes)));
        self.indexed.store(Arc::new(index_map(&new.routes)));
        // Workers next: a route may name a destination only now added.
        let prints = fingerprints(&new.source);
        let mut changed = Vec::new();
        for d in &new.destinations {
            let print = prints.get(&*d.name).cloned().unwrap_or_default();
            match self.workers.get(&*d.name) {
                Some(r) if r.fingerprint == print => {}
                Some(_) => {
                    self.stop(&d.name).await;
                    changed.push(d.name.to_string());
                    self.start(d.clone(), print)?;
                }
                None => {
                    let order = new.store.jetstream.as_ref().and_then(|j| j.ordered.get(&*d.name).copied());
                    self.store
                        .add_destination(&d.name, d.concurrency, order)
                        .await
                        .map_err(|e| anyhow::anyhow!("destination {}: {e}", d.name))?;
                    self.start(d.clone(), print)?;
                }
            }
        }
        for name in &removed {
            self.stop(name).await;
            self.store.remove_destination(name).await;
            let s = self.store.stats(name);
            tracing::warn!(destination = %name, pending = s.depth, dead_letters = s.dead,
                "destination removed from the configuration: its deliveries are kept, not delivered, until it comes back or they are purged");
        }
        crate::ingress::preregister(&self.metrics, &new.routes);
        crate::delivery::preregister(&self.metrics, &new.destinations);
        self.ingress.routes.store(Arc::new(crate::config::route_table(&new.routes)));
        // Masked in answers as long as they are withheld.
        let mut view = admin_view(&new);
        for h in self.credentials.load().values().flatten() {
            if !view.sensitive.contains(h) {
                view.sensitive.push(h.clone());
            }
        }
        self.admin.view.store(Arc::new(view));
        self.config = new;
        Ok(format!("added [{}], removed [{}], changed [{}]", added.join(", "), removed.join(", "), changed.join(", ")))
    }
}

/// Logs each setting that changed but only takes effect after a restart.
fn restart_needed(old: &Config, new: &Config) {
    let mut keys = Vec::new();
    let addrs = |c: &Config| c.listeners.iter().map(|l| l.addr).collect::<Vec<_>>();
    if addrs(old) != addrs(new) {
        keys.push("listeners");
    }
    if old.admin.addr != new.admin.addr {
        keys.push("admin.addr");
    }
    if format!("{:?}", old.ingress) != format!("{:?}", new.ingress) {
        keys.push("ingress");
    }
    if old.store.path != new.store.path || old.store.jetstream.is_some() != new.store.jetstream.is_some() {
        keys.push("store");
    }
    if old.store.retain_delivered != new.store.retain_delivered {
        keys.push("store.retain_delivered");
    }
    // On JetStream a destination's consumers follow its ordering, made at
    // start (one added by a reload gets its own at once).
    if let (Some(o), Some(n)) = (&old.store.jetstream, &new.store.jetstream) {
        // Destinations in both files (an added one gets its ordering).
        let kept = |j: &crate::store::JetConfig| {
            let mut v: Vec<(String, crate::store::JetOrder)> = j
                .ordered
                .iter()
                .filter(|(d, _)| {
                    let named = |c: &Config| c.destinations.iter().any(|x| &*x.name == d.as_str());
                    named(old) && named(new)
                })
                .map(|(d, o)| (d.clone(), *o))
                .collect();
            v.sort_by(|a, b| a.0.cmp(&b.0));
            (v, j.order_partitions)
        };
        if kept(o) != kept(n) {
            keys.push("destinations.*.ordering, store.order_partitions (JetStream)");
        }
    }
    if format!("{:?}", old.notifications) != format!("{:?}", new.notifications) {
        keys.push("notifications");
    }
    if !keys.is_empty() {
        tracing::warn!(keys = %keys.join(", "), "these settings changed but take effect only after a restart");
    }
}

/// The admin API's part of `config` (replaced whole on reload).
pub(crate) fn admin_view(config: &Config) -> crate::admin::View {
    crate::admin::View {
        destinations: config.destinations.iter().map(|d| d.name.to_string()).collect(),
        ready_room: config.ingress.max_body,
        token: config.admin.token.clone(),
        allowed_hosts: config.admin.allowed_hosts.clone(),
        routes: config
            .routes
            .iter()
            .map(|r| (r.path.clone(), r.destinations.iter().map(|d| d.to_string()).collect()))
            .collect(),
        sensitive: config.routes.iter().flat_map(|r| r.credential_headers.iter().cloned()).collect(),
        indexed: config.routes.iter().flat_map(|r| r.index.iter().map(|(name, _)| name.clone())).collect(),
    }
}
