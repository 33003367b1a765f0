//! Prometheus metrics: every series the relay exports is defined here.
//!
//! Naming: `switchboard_<name>_<unit>`, `_total` for counters. Labels are
//! bounded: a configured route path (or `unmatched`), a configured destination
//! name, an outcome or status code. Never a URL, an id or a body value.
//!
//! Each relay owns its own [`Registry`] (no global state), so tests can run
//! several relays in one process.

use prometheus::{
    Encoder, Gauge, GaugeVec, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, Opts,
    Registry, TextEncoder,
};

use crate::store::{now_ms, Store};

/// Latency buckets from 100 µs to 60 s (persist, attempt and lag share them).
const LATENCY_BUCKETS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
];

/// Lag reaches hours when a destination is down, so its buckets go further.
const LAG_BUCKETS: &[f64] = &[
    0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 3600.0, 14400.0,
    86400.0,
];

pub struct Metrics {
    registry: Registry,
    pub ingress_requests: IntCounterVec,
    pub ingress_persist: Histogram,
    pub ingress_connections: IntGauge,
    pub transform_failures: IntCounterVec,
    pub notifications_waiting: IntGauge,
    pub otlp_dropped_spans: IntCounter,
    pub notifications: IntCounterVec,
    pub ingress_rejected: IntCounterVec,
    pub ingress_duplicates: IntCounterVec,
    pub connections_refused: IntCounterVec,
    pub ingress_buffered_bytes: IntGauge,
    pub ingress_buffer_waits: IntCounterVec,
    pub strip_skipped: IntCounterVec,
    pub filter_unparsable: IntCounterVec,
    pub order_key_missing: IntCounterVec,
    pub config_reloads: IntCounterVec,
    pub destination_configured: GaugeVec,
    pub tls_expiry: GaugeVec,
    pub tls_reloads: IntCounterVec,
    pub deliveries: IntCounterVec,
    pub delivery_attempts: IntCounterVec,
    pub delivery_duration: HistogramVec,
    pub delivery_lag: HistogramVec,
    pub queue_depth: GaugeVec,
    pub queue_oldest_age: GaugeVec,
    pub dead_letters: GaugeVec,
    pub destination_paused: GaugeVec,
    pub breaker_state: GaugeVec,
    pub dedupe_keys: IntGauge,
    pub dedupe_forgotten: IntGauge,
    pub store_bytes: IntGauge,
    pub store_retained: IntGauge,
    pub store_retained_bytes: IntGauge,
    pub store_max_bytes: IntGauge,
    pub store_disk_bytes: IntGauge,
    pub store_free_bytes: IntGauge,
    pub store_info: GaugeVec,
    pub store_accepting: IntGauge,
    pub store_flushes: IntCounterVec,
    pub store_flush_duration: Histogram,
    pub up: Gauge,
    pub store_errors: IntCounter,
}

fn counter_vec(r: &Registry, name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    let c = IntCounterVec::new(Opts::new(name, help), labels).expect("metric definition is static and valid");
    r.register(Box::new(c.clone())).expect("metric names are unique");
    c
}

fn gauge_vec(r: &Registry, name: &str, help: &str, labels: &[&str]) -> GaugeVec {
    let g = GaugeVec::new(Opts::new(name, help), labels).expect("metric definition is static and valid");
    r.register(Box::new(g.clone())).expect("metric names are unique");
    g
}

fn int_gauge(r: &Registry, name: &str, help: &str) -> IntGauge {
    let g = IntGauge::new(name, help).expect("metric definition is static and valid");
    r.register(Box::new(g.clone())).expect("metric names are unique");
    g
}

fn histogram_vec(r: &Registry, name: &str, help: &str, labels: &[&str], buckets: &[f64]) -> HistogramVec {
    let h = HistogramVec::new(HistogramOpts::new(name, help).buckets(buckets.to_vec()), labels)
        .expect("metric definition is static and valid");
    r.register(Box::new(h.clone())).expect("metric names are unique");
    h
}

fn histogram(r: &Registry, name: &str, help: &str, buckets: &[f64]) -> Histogram {
    let h = Histogram::with_opts(HistogramOpts::new(name, help).buckets(buckets.to_vec()))
        .expect("metric definition is static and valid");
    r.register(Box::new(h.clone())).expect("metric names are unique");
    h
}

impl Metrics {
    /// Every series, declared once, in the order of the struct's fields.
    /// Long on purpose: one table of definitions, no logic; splitting it
    /// would only scatter the names. The `expect`s above only fire on a
    /// programming error in this file (an invalid or duplicate static
    /// name), which every test run would catch.
    pub fn new() -> Metrics {
        let r = Registry::new();
        let up = Gauge::new("switchboard_up", "1 while the relay is running").expect("static metric");
        r.register(Box::new(up.clone())).expect("metric names are unique");
        up.set(1.0);
        #[cfg(target_os = "linux")]
        {
            let pc = prometheus::process_collector::ProcessCollector::for_self();
            let _ = r.register(Box::new(pc));
        }
        let store_errors = IntCounter::new(
            "switchboard_store_errors_total",
            "Store operations that failed (delivery bookkeeping; ingress failures show as 503s)",
        )
        .expect("static metric");
        r.register(Box::new(store_errors.clone())).expect("metric names are unique");
        let otlp_dropped_spans = IntCounter::new(
            "switchboard_otlp_dropped_spans_total",
            "Spans not exported: the export queue was full, or the collector did not take a batch",
        )
        .expect("static metric");
        r.register(Box::new(otlp_dropped_spans.clone())).expect("metric names are unique");
        Metrics {
            ingress_requests: counter_vec(
                &r,
                "switchboard_ingress_requests_total",
                "Ingress requests by route and response status code",
                &["route", "code"],
            ),
            ingress_persist: histogram(
                &r,
                "switchboard_ingress_persist_seconds",
                "Time from a complete request body to a durable write (fsync included)",
                LATENCY_BUCKETS,
            ),
            ingress_connections: int_gauge(&r, "switchboard_ingress_connections", "Open ingress connections"),
            notifications_waiting: int_gauge(
                &r,
                "switchboard_notifications_waiting",
                "Operational events held in memory because the store cannot take them right now",
            ),
            notifications: counter_vec(
                &r,
                "switchboard_notifications_total",
                "Operational events by type: stored for the notification destination, or dropped (type=\"dropped\")",
                &["type"],
            ),
            transform_failures: counter_vec(
                &r,
                "switchboard_transform_failures_total",
                "Deliveries dead-lettered because the destination's transform failed (threw, ran past its timeout or memory)",
                &["destination"],
            ),
            ingress_rejected: counter_vec(
                &r,
                "switchboard_ingress_rejected_total",
                "Requests refused by source allowlist or sender authentication, by route and reason",
                &["route", "reason"],
            ),
            ingress_duplicates: counter_vec(
                &r,
                "switchboard_ingress_duplicates_total",
                "Requests answered with an earlier message's id (dedupe_window), by route",
                &["route"],
            ),
            connections_refused: counter_vec(
                &r,
                "switchboard_connections_refused_total",
                "Connections closed by a listener before a request was served (or an HTTP/2 one for resetting too many streams), by listener and reason (ip_not_allowed, per_ip_limit, head_timeout, h2_resets)",
                &["listener", "reason"],
            ),
            ingress_buffered_bytes: int_gauge(
                &r,
                "switchboard_ingress_buffered_bytes",
                "Request body bytes held in memory by ingress (bounded by ingress.max_buffered_bytes)",
            ),
            ingress_buffer_waits: counter_vec(
                &r,
                "switchboard_ingress_buffer_waits_total",
                "Requests that waited for room under ingress.max_buffered_bytes, by route and result (admitted, refused)",
                &["route", "result"],
            ),
            filter_unparsable: counter_vec(
                &r,
                "switchboard_filter_unparsable_total",
                "Callbacks whose body a destination filter had to read but that were not JSON (no body condition matched), by route",
                &["route"],
            ),
            config_reloads: counter_vec(
                &r,
                "switchboard_config_reloads_total",
                "Configuration reloads (SIGHUP), by result (ok, error: the running configuration stayed)",
                &["result"],
            ),
            destination_configured: gauge_vec(
                &r,
                "switchboard_destination_configured",
                "1 for a configured destination, 0 for one the store still holds deliveries of but the configuration no longer has",
                &["destination"],
            ),
            order_key_missing: counter_vec(
                &r,
                "switchboard_order_key_missing_total",
                "Callbacks queued unordered for a destination with ordering = per_key because they lack its order_key",
                &["destination"],
            ),
            strip_skipped: counter_vec(
                &r,
                "switchboard_strip_skipped_total",
                "Bodies forwarded unchanged because they were not a JSON object (strip_body_fields)",
                &["destination"],
            ),
            tls_expiry: gauge_vec(
                &r,
                "switchboard_tls_certificate_expiry_timestamp_seconds",
                "notAfter of the certificate a TLS listener serves, unix seconds",
                &["listener"],
            ),
            tls_reloads: counter_vec(
                &r,
                "switchboard_tls_reloads_total",
                "Certificate reloads by listener and result (ok, error)",
                &["listener", "result"],
            ),
            deliveries: counter_vec(
                &r,
                "switchboard_deliveries_total",
                "Settled delivery attempts by destination and outcome (delivered, retried, dead_lettered; filtered: not queued, its filter did not match)",
                &["destination", "outcome"],
            ),
            delivery_attempts: counter_vec(
                &r,
                "switchboard_delivery_attempts_total",
                "Delivery attempts by destination and result (2xx, 4xx, 5xx, connect, timeout, io)",
                &["destination", "result"],
            ),
            delivery_duration: histogram_vec(
                &r,
                "switchboard_delivery_duration_seconds",
                "Duration of one delivery attempt",
                &["destination"],
                LATENCY_BUCKETS,
            ),
            delivery_lag: histogram_vec(
                &r,
                "switchboard_delivery_lag_seconds",
                "Time from receiving a message to delivering it",
                &["destination"],
                LAG_BUCKETS,
            ),
            queue_depth: gauge_vec(
                &r,
                "switchboard_queue_depth",
                "Pending deliveries per destination",
                &["destination"],
            ),
            queue_oldest_age: gauge_vec(
                &r,
                "switchboard_queue_oldest_age_seconds",
                "Age of the oldest pending delivery per destination (0 when empty)",
                &["destination"],
            ),
            dead_letters: gauge_vec(
                &r,
                "switchboard_dead_letters",
                "Deliveries in the dead-letter store per destination",
                &["destination"],
            ),
            destination_paused: gauge_vec(
                &r,
                "switchboard_destination_paused",
                "1 while a destination is paused (by a 410 from it, an operator, or paused = true), else 0",
                &["destination"],
            ),
            breaker_state: gauge_vec(
                &r,
                "switchboard_breaker_state",
                "1 for the circuit breaker state a destination is in (closed, open, half_open), 0 for the others",
                &["destination", "state"],
            ),
            dedupe_keys: int_gauge(
                &r,
                "switchboard_dedupe_keys",
                "De-duplication keys remembered (store.dedupe_max_keys bounds them)",
            ),
            dedupe_forgotten: int_gauge(
                &r,
                "switchboard_dedupe_forgotten_keys",
                "De-duplication keys forgotten before their window ended, at the store.dedupe_max_keys cap, since start",
            ),
            store_bytes: int_gauge(
                &r,
                "switchboard_store_bytes",
                "Bytes of stored messages (what store.max_bytes limits)",
            ),
            store_retained: int_gauge(
                &r,
                "switchboard_store_retained_messages",
                "Messages kept after every destination was done with them (store.retain_delivered)",
            ),
            store_retained_bytes: int_gauge(
                &r,
                "switchboard_store_retained_bytes",
                "Bytes of the messages kept after delivery (what store.retain_max_bytes bounds)",
            ),
            store_max_bytes: int_gauge(&r, "switchboard_store_max_bytes", "Configured store.max_bytes (0: no limit)"),
            store_disk_bytes: int_gauge(&r, "switchboard_store_disk_bytes", "Size of the store's files on disk"),
            store_info: gauge_vec(
                &r,
                "switchboard_store_info",
                "1 for the kind of store the relay runs on (local, jetstream)",
                &["kind"],
            ),
            store_accepting: int_gauge(
                &r,
                "switchboard_store_accepting",
                "1 while the store takes new callbacks (JetStream: connected and set up, publishes acknowledged); 0 while ingress answers 503",
            ),
            store_free_bytes: int_gauge(
                &r,
                "switchboard_store_free_bytes",
                "Free space on the store's filesystem (ingress refuses below store.min_free_bytes)",
            ),
            store_flushes: counter_vec(
                &r,
                "switchboard_store_flushes_total",
                "Store flushes (group commits) by result",
                &["result"],
            ),
            store_flush_duration: histogram(
                &r,
                "switchboard_store_flush_seconds",
                "Duration of one store flush (fsync)",
                LATENCY_BUCKETS,
            ),
            up,
            store_errors,
            otlp_dropped_spans,
            registry: r,
        }
    }

    /// Creates, at 0, the series of the relay itself whose label values
    /// are known before the first event (each stage creates its own:
    /// `ingress::preregister`, `delivery::preregister`), so `rate()` and
    /// `increase()` see the first event and dashboards show 0 rather than
    /// nothing on a fresh relay.
    pub fn preregister(&self) {
        self.ingress_requests.with_label_values(&["unmatched", "404"]);
        self.config_reloads.with_label_values(&["ok"]);
        self.config_reloads.with_label_values(&["error"]);
    }

    /// Refreshes the gauges computed from the store, then encodes everything.
    pub fn render(&self, store: &Store, destinations: &[String], configured: &[String]) -> String {
        let now = now_ms();
        for d in destinations {
            let c = if configured.contains(d) { 1.0 } else { 0.0 };
            self.destination_configured.with_label_values(&[d]).set(c);
            let s = store.stats(d);
            self.queue_depth.with_label_values(&[d]).set(s.depth as f64);
            let age = s.oldest_received_ms.map(|t| now.saturating_sub(t) as f64 / 1000.0).unwrap_or(0.0);
            self.queue_oldest_age.with_label_values(&[d]).set(age);
            self.dead_letters.with_label_values(&[d]).set(s.dead as f64);
            let paused = if store.paused(d).is_some() { 1.0 } else { 0.0 };
            self.destination_paused.with_label_values(&[d]).set(paused);
        }
        self.store_bytes.set(store.bytes() as i64);
        self.store_retained.set(store.retained().min(i64::MAX as u64) as i64);
        self.store_retained_bytes.set(store.retained_bytes().min(i64::MAX as u64) as i64);
        let (keys, forgotten) = store.dedupe_figures();
        self.dedupe_keys.set(keys as i64);
        self.dedupe_forgotten.set(forgotten.min(i64::MAX as u64) as i64);
        self.store_max_bytes.set(store.max_bytes().unwrap_or(0) as i64);
        self.store_disk_bytes.set(store.disk_bytes() as i64);
        self.store_free_bytes.set(store.free_bytes().min(i64::MAX as u64) as i64);
        self.store_info.with_label_values(&[store.kind().as_str()]).set(1.0);
        self.store_accepting.set(i64::from(store.accepting(0).is_ok()));
        let mut buf = Vec::new();
        if let Err(e) = TextEncoder::new().encode(&self.registry.gather(), &mut buf) {
            tracing::warn!(error = %e, "cannot encode metrics");
        }
        String::from_utf8(buf).unwrap_or_default()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}
