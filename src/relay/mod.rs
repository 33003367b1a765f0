//! The relay: the composition root. It opens the store, starts a worker
//! per destination, serves ingress and admin on already-bound listeners,
//! watches certificates, applies reloads (`reload.rs`), and drains on
//! shutdown (`shutdown.rs`: signals into a cancellation token and reload
//! requests). The only module that names every stage; the stages name
//! none of it.

mod notify;
pub mod reload;
pub mod shutdown;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio::net::TcpListener;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::{self, Config};
use crate::metrics::Metrics;
use crate::store::{Store, StoreOptions};
use crate::wake::Wakers;
use crate::{admin, ingress, server, tls};

/// The admin listener's head deadline: it is for operators and probes on
/// a private address, who send their request at once.
const ADMIN_HEAD_TIMEOUT: Duration = Duration::from_secs(10);

/// Admin connections served at once: probes, a scraper and a few operators.
const ADMIN_MAX_CONNECTIONS: usize = 64;

/// Already-bound sockets for [`run`]: tests bind `127.0.0.1:0` themselves.
/// `ingress[i]` serves `config.listeners[i]` (its TLS, proxies, allowlist).
pub struct Listeners {
    pub ingress: Vec<TcpListener>,
    pub admin: TcpListener,
}

impl Listeners {
    /// Binds every address the configuration names.
    pub async fn bind(config: &Config) -> anyhow::Result<Listeners> {
        let mut ingress = Vec::new();
        for l in &config.listeners {
            let addr = l.addr;
            let l = TcpListener::bind(addr).await.with_context(|| format!("binding ingress listener {addr}"))?;
            ingress.push(l);
        }
        let admin = TcpListener::bind(config.admin.addr)
            .await
            .with_context(|| format!("binding admin listener {}", config.admin.addr))?;
        Ok(Listeners { ingress, admin })
    }
}

/// Runs the relay until `shutdown` is cancelled, then drains: listeners stop
/// accepting, requests and deliveries in flight get `config.grace_period` to
/// finish, and the store is flushed and closed.
fn store_options(config: &Config, cut_damaged_log: bool) -> anyhow::Result<StoreOptions> {
    let opts = StoreOptions {
        dedupe_retention: config.routes.iter().filter_map(|r| r.dedupe.as_ref().map(|d| d.window)).max(),
        dedupe_max_keys: config.store.dedupe_max_keys,
        retain_delivered: config.store.retain_delivered,
        retain_max_bytes: match config.store.retain_max_bytes {
            config::RetainBytes::ShareOfDisk => config::retain_share_of_disk(&config.store.path),
            config::RetainBytes::Limit(n) => Some(n),
            config::RetainBytes::Unbounded => None,
        },
        max_bytes: config.store.max_bytes,
        min_free_bytes: config.store.min_free_bytes,
        cache_bytes: None,
        segment_bytes: None,
        cut_damaged_log,
        ..StoreOptions::default()
    };
    if config.store.encryption.is_empty() {
        return Ok(opts);
    }
    opts.encrypt_with(&encryption_keys(config)?).map_err(|e| anyhow::anyhow!("store.encryption: {e}"))
}

/// `[store.encryption]`'s keys, decoded (id, 32 bytes each).
fn encryption_keys(config: &Config) -> anyhow::Result<Vec<(String, Vec<u8>)>> {
    use base64::Engine;
    let mut keys = Vec::new();
    for (id, key) in &config.store.encryption {
        // Validation decoded these already; the error never shows the key.
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(key.expose().trim())
            .map_err(|_| anyhow::anyhow!("store.encryption key {id:?} is not base64"))?;
        keys.push((id.clone(), bytes));
    }
    Ok(keys)
}

/// `switchboard repair`: opens the store of `config`, cutting any damaged
/// segment of the message log at the damage (each cut is logged at error
/// level with the bytes dropped), and closes it again. Returns one line per
/// configured destination with what is pending and dead-lettered after it.
pub async fn repair(config: &Config) -> anyhow::Result<Vec<String>> {
    let path = &config.store.path;
    let store = Store::open_async(path, store_options(config, true)?, |_, _| {})
        .await
        .with_context(|| format!("opening store {}", path.display()))?;
    let lines = config
        .destinations
        .iter()
        .map(|d| {
            let s = store.stats(&d.name);
            format!("{}: {} pending, {} dead-lettered", d.name, s.depth, s.dead)
        })
        .collect();
    store.close().await.with_context(|| format!("closing store {}", path.display()))?;
    Ok(lines)
}

pub async fn run(config: Config, listeners: Listeners, shutdown: CancellationToken) -> anyhow::Result<()> {
    run_with_reload(config, listeners, shutdown, Arc::new(Notify::new())).await
}

/// [`run`], with `reload` woken (e.g. on SIGHUP) to re-read the
/// configuration file (`reload.rs`) and the TLS certificates.
pub async fn run_with_reload(
    config: Config,
    listeners: Listeners,
    shutdown: CancellationToken,
    reload: Arc<Notify>,
) -> anyhow::Result<()> {
    anyhow::ensure!(
        listeners.ingress.len() == config.listeners.len(),
        "{} ingress sockets for {} configured listeners",
        listeners.ingress.len(),
        config.listeners.len()
    );
    if crate::text::clock_offset_ms() != 0 {
        tracing::warn!(
            offset_ms = crate::text::clock_offset_ms(),
            "SWITCHBOARD_TEST_CLOCK_OFFSET_MS is set: this relay's clock is stepped on purpose (tests only)"
        );
    }
    let metrics = Arc::new(Metrics::new());
    metrics.preregister();
    crate::ingress::preregister(&metrics, &config.routes);
    crate::delivery::preregister(&metrics, &config.destinations);
    // Certificates first: a listener that cannot serve TLS must stop start-up.
    let certs = Certificates::load(&config)?;
    let mut wakers = Wakers::new(config.destinations.iter().map(|d| &d.name));
    let notifications = config.notifications.clone().map(|settings| {
        let (events, rx) = crate::events::Events::new(&settings);
        wakers = wakers.clone().with_events(events.clone());
        (settings, events, rx)
    });
    let mut exporter = None;
    if let Some(otlp) = config.otlp.clone() {
        let (tracer, export) =
            crate::otel::Tracer::new(otlp, metrics.otlp_dropped_spans.clone(), shutdown.child_token())?;
        wakers = wakers.clone().with_tracer(tracer);
        exporter = Some(export);
    }
    let store = open_store(&config, &metrics, &wakers).await?;
    let relay = Parts { config: &config, wakers, store, metrics, tracker: TaskTracker::new(), shutdown };
    if let Some(export) = exporter {
        relay.tracker.spawn(export);
    }
    if let Some((settings, events, rx)) = notifications {
        let notifier = notify::Notifier::new(
            settings,
            events,
            relay.store.clone(),
            relay.wakers.clone(),
            relay.metrics.clone(),
            config.ingress.max_body,
        );
        relay.tracker.spawn(notifier.run(rx, relay.shutdown.clone()));
    }
    certs.export(&relay.metrics);
    let ingress = relay.start_ingress(listeners.ingress, certs.ingress);
    let certificates = Arc::new(Notify::new());
    if !certs.all.is_empty() {
        let watch = watch_certificates(certs.all, relay.metrics.clone(), certificates.clone(), relay.shutdown.clone());
        relay.tracker.spawn(watch);
    }
    let ready = Arc::new(AtomicBool::new(false));
    let loaded = Arc::new(admin::Loaded::new(config.source.clone(), config::sha256_hex(&config.source)));
    let admin = relay.start_admin(listeners.admin, certs.admin, ready.clone(), loaded.clone());
    let mut reloader = reload::Reloader::new(
        config.clone(),
        relay.store.clone(),
        relay.metrics.clone(),
        relay.wakers.clone(),
        relay.tracker.clone(),
        relay.shutdown.clone(),
        ingress,
        admin,
        loaded,
        certs.destinations,
    );
    reloader.start_all()?;
    relay.tracker.spawn(reloader.run(reload, certificates));
    relay.tracker.close();
    ready.store(true, Ordering::SeqCst);
    let store_at = match &config.store.jetstream {
        Some(j) => format!("jetstream {} at {}", j.stream, j.servers.join(", ")),
        None => config.store.path.display().to_string(),
    };
    tracing::info!(store = %store_at, routes = config.routes.len(), destinations = config.destinations.len(), "switchboard started");

    relay.shutdown.cancelled().await;
    ready.store(false, Ordering::SeqCst);
    relay.drain().await
}

/// The certificates of the TLS listeners, loaded once at start.
struct Certificates {
    /// Per ingress listener, in order.
    ingress: Vec<Option<tls::CertStore>>,
    admin: Option<tls::CertStore>,
    /// Per destination with a client certificate.
    destinations: HashMap<String, tls::CertStore>,
    /// Every one with the name it is reported under (listener address,
    /// "admin", or "destination/NAME").
    all: Vec<(String, tls::CertStore)>,
}

impl Certificates {
    fn load(config: &Config) -> anyhow::Result<Certificates> {
        let mut all = Vec::new();
        let mut ingress = Vec::new();
        for l in &config.listeners {
            let tls = match &l.tls {
                Some(files) => {
                    let store = tls::CertStore::open(files.clone()).with_context(|| format!("listener {}", l.addr))?;
                    all.push((l.addr.to_string(), store.clone()));
                    Some(store)
                }
                None => None,
            };
            ingress.push(tls);
        }
        let admin = match &config.admin.tls {
            Some(files) => {
                let store = tls::CertStore::open(files.clone()).context("admin listener")?;
                all.push(("admin".to_string(), store.clone()));
                Some(store)
            }
            None => None,
        };
        let mut destinations = HashMap::new();
        for d in &config.destinations {
            if let Some(files) = &d.client_cert {
                let store = tls::CertStore::open(files.clone())
                    .with_context(|| format!("client certificate of destination {}", d.name))?;
                all.push((format!("destination/{}", d.name), store.clone()));
                destinations.insert(d.name.to_string(), store);
            }
        }
        Ok(Certificates { ingress, admin, destinations, all })
    }

    fn export(&self, metrics: &Metrics) {
        for (name, store) in &self.all {
            metrics.tls_expiry.with_label_values(&[name]).set(store.not_after() as f64);
            // Both outcomes exist from the start, so increase() sees the first one.
            metrics.tls_reloads.with_label_values(&[name, "ok"]);
            metrics.tls_reloads.with_label_values(&[name, "error"]);
        }
    }
}

/// Opens the store (recovery on the blocking pool) with its flush metrics,
/// and warns about deliveries kept for destinations no longer configured.
async fn open_store(config: &Config, metrics: &Arc<Metrics>, wakers: &Wakers) -> anyhow::Result<Store> {
    if let Some(jet) = &config.store.jetstream {
        let dests = config.destinations.iter().map(|d| (d.name.clone(), d.concurrency)).collect();
        let mut jet = jet.clone();
        if !config.store.encryption.is_empty() {
            jet = jet.seal_with(&encryption_keys(config)?).map_err(|e| anyhow::anyhow!("store.encryption: {e}"))?;
        }
        return Store::open_jetstream(jet.clone(), dests, wakers.clone())
            .await
            .with_context(|| format!("opening JetStream stream {:?} at {}", jet.stream, jet.servers.join(", ")));
    }
    let flush_metrics = metrics.clone();
    let store = Store::open_async(&config.store.path, store_options(config, false)?, move |took, ok| {
        flush_metrics.store_flushes.with_label_values(&[if ok { "ok" } else { "error" }]).inc();
        flush_metrics.store_flush_duration.observe(took.as_secs_f64());
    })
    .await
    .with_context(|| format!("opening store {}", config.store.path.display()))?;
    for orphan in store.known_destinations().into_iter().filter(|d| config.destination(d).is_none()) {
        let s = store.stats(&orphan);
        tracing::warn!(destination = %orphan, pending = s.depth, dead_letters = s.dead,
            "store holds deliveries for a destination that is no longer configured; they are kept, not delivered");
    }
    Ok(store)
}

/// What the stages of a running relay share: each starts its tasks on
/// `tracker`, which `drain` waits for.
struct Parts<'a> {
    config: &'a Config,
    store: Store,
    metrics: Arc<Metrics>,
    wakers: Wakers,
    tracker: TaskTracker,
    shutdown: CancellationToken,
}

impl Parts<'_> {
    /// The ingress on every listener, sharing one connection limit.
    fn start_ingress(&self, sockets: Vec<TcpListener>, tls: Vec<Option<tls::CertStore>>) -> Arc<ingress::Ingress> {
        let config = self.config;
        let ingress = Arc::new(ingress::Ingress::new(
            config::route_table(&config.routes),
            config.ingress.clone(),
            self.store.clone(),
            self.metrics.clone(),
            self.wakers.clone(),
        ));
        let limits = server::Limits::new(config.ingress.max_connections, config.ingress.max_connections_per_ip);
        for ((socket, tls), l) in sockets.into_iter().zip(tls).zip(&config.listeners) {
            if let Ok(addr) = socket.local_addr() {
                tracing::info!(addr = %addr, tls = tls.is_some(), "ingress listening");
            }
            let cfg = server::ServerConfig {
                kind: "ingress",
                tls,
                head_timeout: config.ingress.header_read_timeout,
                max_headers: config.ingress.max_headers,
                allow_ips: l.allow_ips.clone(),
                trusted_proxies: l.trusted_proxies.clone(),
                retry_after: config.ingress.retry_after,
                grace: config.grace_period,
            };
            let ctx =
                ingress::ListenerCtx { trusted_proxies: l.trusted_proxies.clone(), allow_ips: l.allow_ips.clone() };
            let handler = Arc::new(ingress::ListenerIngress { ingress: ingress.clone(), ctx });
            let serve =
                server::serve(socket, cfg, limits.clone(), handler, self.metrics.clone(), self.shutdown.clone());
            self.tracker.spawn(serve);
        }
        ingress
    }

    fn start_admin(
        &self,
        socket: TcpListener,
        tls: Option<tls::CertStore>,
        ready: Arc<AtomicBool>,
        loaded: Arc<admin::Loaded>,
    ) -> Arc<admin::Admin> {
        let config = self.config;
        let admin = Arc::new(admin::Admin {
            store: self.store.clone(),
            metrics: self.metrics.clone(),
            wakers: self.wakers.clone(),
            ready,
            view: arc_swap::ArcSwap::from_pointee(self::reload::admin_view(config)),
            operations: admin::Operations::default(),
            tracker: self.tracker.clone(),
            loaded,
        });
        if let Ok(addr) = socket.local_addr() {
            tracing::info!(addr = %addr, "admin listening");
        }
        let cfg = server::ServerConfig {
            kind: "admin",
            tls,
            head_timeout: ADMIN_HEAD_TIMEOUT,
            max_headers: 100,
            allow_ips: Vec::new(),
            trusted_proxies: Vec::new(),
            retry_after: config.ingress.retry_after,
            grace: config.grace_period,
        };
        let limits = server::Limits::new(ADMIN_MAX_CONNECTIONS, None);
        let serve = server::serve(socket, cfg, limits, admin.clone(), self.metrics.clone(), self.shutdown.clone());
        self.tracker.spawn(serve);
        admin
    }

    /// After shutdown: waits for every task (each bounds its own drain by
    /// the grace period), then flushes and closes the store.
    async fn drain(self) -> anyhow::Result<()> {
        let grace = self.config.grace_period;
        tracing::info!(grace = %humantime::format_duration(grace), "shutting down");
        // The margin covers the final bookkeeping after each task's grace.
        let margin = Duration::from_secs(2);
        if tokio::time::timeout(grace + margin, self.tracker.wait()).await.is_err() {
            tracing::warn!("tasks still running after the grace period; closing the store anyway");
        }
        let failed = self.store.flush_failed();
        self.store.close().await.context("closing store")?;
        if failed {
            tracing::warn!("store closed after failed flushes: everything acknowledged is on disk, what was refused was never acknowledged; fix the cause before the next start");
        } else {
            tracing::info!("store flushed and closed; bye");
        }
        Ok(())
    }
}

/// Reloads certificates on `reload` (after a configuration reload) and when
/// their files change.
/// A failed reload keeps the certificate in use and says why.
async fn watch_certificates(
    certs: Vec<(String, tls::CertStore)>,
    metrics: Arc<Metrics>,
    reload: Arc<Notify>,
    shutdown: CancellationToken,
) {
    loop {
        let forced = tokio::select! {
            _ = reload.notified() => true,
            _ = tokio::time::sleep(tls::WATCH_INTERVAL) => false,
            _ = shutdown.cancelled() => return,
        };
        for (name, store) in &certs {
            if !forced && !store.changed_on_disk() {
                continue;
            }
            match store.reload() {
                Ok(()) => {
                    metrics.tls_reloads.with_label_values(&[name, "ok"]).inc();
                    metrics.tls_expiry.with_label_values(&[name]).set(store.not_after() as f64);
                    tracing::info!(listener = %name, files = ?store.files(), "certificate reloaded");
                }
                Err(e) => {
                    metrics.tls_reloads.with_label_values(&[name, "error"]).inc();
                    tracing::warn!(listener = %name, error = %e, "certificate reload failed; keeping the current certificate");
                }
            }
        }
    }
}
