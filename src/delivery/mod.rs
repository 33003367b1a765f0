//! Delivery: one scheduler per destination, forwarding stored messages.
//!
//! Each destination gets its own [`Worker`]: its own task, its own HTTP client
//! (and so connection pool), its own concurrency limit. A dead or slow
//! destination only fills its own slots and grows its own queue; nothing it
//! does can delay another destination.
//!
//! The scheduler wakes when ingress signals new work ([`Wakers`]), when the
//! earliest pending entry falls due, or when an attempt finishes. It leases due
//! entries from the store (in memory only: a crash simply makes them due again)
//! and runs each attempt, bounded by the destination's timeout, inside its own
//! task (up to `concurrency` at once, none spawned: see `Worker::run`). The
//! attempt's result is classified and decided on by [`retry`]; the
//! decision is written back to the store (one state change). A retry is a queue entry
//! with a later due time, never a task sleeping with the message in memory.
//!
//! What each attempt sends is built in `request.rs`.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use futures_util::stream::{FuturesUnordered, StreamExt};
use futures_util::FutureExt;
use http::header::HeaderName;
use http_body_util::{BodyExt, Limited};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use self::retry::{Action, Outcome, TransportError};
use crate::events::{Event, Events};
use crate::metrics::Metrics;
use crate::store::{now_ms, Lease, Pause, Settle, Store};
use crate::wake::Wakers;

pub mod breaker;
mod client;
pub mod nats;
pub mod rate;
mod report;
mod request;
pub mod retry;
pub mod signing;
pub mod transform;
mod xml;

/// One destination (`[destinations.NAME]`, validated).
#[derive(Debug, Clone)]
pub struct Destination {
    pub name: Arc<str>,
    /// The target URL without any userinfo (that moves to `basic_auth`).
    pub url: http::Uri,
    /// `user:password` taken from the URL, sent as HTTP Basic credentials.
    pub basic_auth: Option<crate::secret::Secret>,
    pub timeout: Duration,
    pub connect_timeout: Duration,
    pub concurrency: usize,
    pub strip_body_fields: Vec<String>,
    pub forward_sender_credentials: bool,
    pub paused: bool,
    /// Extra trusted CA certificates, already loaded.
    pub extra_roots: Vec<rustls::pki_types::CertificateDer<'static>>,
    pub retry: retry::RetryPolicy,
    /// Standard Webhooks signing, if configured.
    pub signing: Option<Arc<signing::Signer>>,
    /// Which sender headers go, which are added (`headers.rs`).
    pub headers: crate::headers::Policy,
    /// A client certificate to present (mTLS), reloaded like a listener's.
    pub client_cert: Option<crate::tls::TlsFiles>,
    /// Refuse TLS below 1.3 (`min_version = "1.3"`); 1.2 and 1.3 otherwise.
    pub tls13_only: bool,
    /// At most this many attempts a second (replays and retries included).
    pub rate_limit: Option<rate::RateLimit>,
    /// Stop attempting for a while after this many consecutive failures.
    pub breaker: Option<breaker::BreakerConfig>,
    /// Reshapes what this destination gets (`transform.rs`).
    pub transform: Option<Arc<transform::Transform>>,
    /// A NATS subject instead of an HTTP URL (`nats.rs`).
    pub nats: Option<Arc<nats::NatsTarget>>,
}

use self::client::{build_client, HttpClient};

/// How much of a destination's response body we read (and discard) so the
/// connection can be reused; beyond this the connection is dropped.
const MAX_RESPONSE_BODY: usize = 64 * 1024;

/// How long a scheduler waits before leasing again after a store failure.
const STORE_ERROR_PAUSE: Duration = Duration::from_secs(1);

/// One destination's scheduler and its attempts.
pub struct Worker {
    dest: Arc<Destination>,
    /// Per route: the sender-credential headers this destination does not get.
    /// The senders' credential headers by route (`None`: this destination
    /// gets them, `forward_sender_credentials`).
    withheld: Option<Credentials>,
    store: Store,
    metrics: Arc<Metrics>,
    /// The HTTP client and the client-certificate generation it was built
    /// for: after a certificate reload the next attempt builds a new one,
    /// so new connections (pooled ones would keep the old certificate)
    /// present the new certificate.
    client: arc_swap::ArcSwap<(u64, HttpClient)>,
    client_cert: Option<crate::tls::CertStore>,
    wake: Arc<Notify>,
    /// This destination's breaker state, as the admin API sees it.
    breaker_state: Arc<crate::wake::BreakerCell>,
    /// Its last 15 minutes of settled attempts, for the admin API.
    recent: Arc<crate::recent::Recent>,
    indexed: Indexed,
    /// Operational events (`[notifications]`): failing, recovered,
    /// paused, dead letters.
    events: Events,
    /// Spans of attempts (`[telemetry.otlp]`), named `deliver NAME`.
    tracer: crate::otel::Tracer,
    span_name: Arc<str>,
    /// The last retryable failure's reason, for `destination.failing`.
    last_error: std::sync::Mutex<String>,
    /// This destination's series of what every delivered attempt counts,
    /// looked up once (a look-up by label hashes and locks).
    hot: Hot,
}

/// A destination's metric series for a delivered attempt.
struct Hot {
    duration: prometheus::Histogram,
    lag: prometheus::Histogram,
    delivered: prometheus::IntCounter,
    attempts_2xx: prometheus::IntCounter,
}

impl Hot {
    fn new(metrics: &Metrics, name: &str) -> Hot {
        Hot {
            duration: metrics.delivery_duration.with_label_values(&[name]),
            lag: metrics.delivery_lag.with_label_values(&[name]),
            delivered: metrics.deliveries.with_label_values(&[name, "delivered"]),
            attempts_2xx: metrics.delivery_attempts.with_label_values(&[name, "2xx"]),
        }
    }
}

/// Per route, the request headers that carry its senders' credentials:
/// one map shared by every worker, swapped by a reload (so a header that
/// becomes a credential is withheld by every destination at once).
pub type Credentials = Arc<arc_swap::ArcSwap<HashMap<String, Vec<HeaderName>>>>;

/// Per route, the body fields it indexes (`index = [...]`): a failed
/// delivery's log line names them with their values (`requestId=...`), so
/// an operator can find the callback the sender means. Swapped by a reload.
pub type Indexed = Arc<arc_swap::ArcSwap<HashMap<String, Vec<(String, Vec<crate::fieldpath::Step>)>>>>;

impl Worker {
    /// `credentials` maps each route to the headers that carry its senders'
    /// credentials; they are withheld unless the destination sets
    /// `forward_sender_credentials`. `client_cert` is the destination's
    /// client certificate, loaded (and reloaded) by the caller.
    pub fn new(
        dest: Arc<Destination>,
        credentials: Credentials,
        indexed: Indexed,
        client_cert: Option<crate::tls::CertStore>,
        store: Store,
        metrics: Arc<Metrics>,
        wakers: &Wakers,
    ) -> anyhow::Result<Worker> {
        let generation = client_cert.as_ref().map_or(0, |c| c.generation());
        let client = arc_swap::ArcSwap::from_pointee((generation, build_client(&dest, client_cert.clone())?));
        let wake = wakers.get(&dest.name);
        let breaker_state = wakers.breaker(&dest.name);
        let recent = wakers.recent(&dest.name);
        let withheld = (!dest.forward_sender_credentials).then_some(credentials);
        let events = wakers.events().clone();
        let tracer = wakers.tracer().clone();
        let span_name = format!("deliver {}", dest.name).into();
        let hot = Hot::new(&metrics, &dest.name);
        Ok(Worker {
            hot,
            dest,
            withheld,
            store,
            metrics,
            client,
            client_cert,
            wake,
            breaker_state,
            recent,
            indexed,
            events,
            span_name,
            tracer,
            last_error: Default::default(),
        })
    }

    /// Runs until `shutdown`, then waits up to `grace` for attempts in flight;
    /// any still running are abandoned (their entries stay pending).
    /// Long on purpose: the scheduler, one loop whose state (in flight,
    /// breaker, bucket, pause) every branch of its `select!` reads.
    pub async fn run(self, shutdown: CancellationToken, grace: Duration) {
        let this = Arc::new(self);
        let name = this.dest.name.clone();
        // One pause state per destination. `paused = true` in the
        // configuration sets it at every start (and removing the key clears
        // that pause at the next start); a 410 or an operator sets it at run
        // time, and only the admin API's resume clears that.
        let from_config = this.store.paused(&name) == Some(Pause::Configuration);
        let change = match (this.dest.paused, this.store.paused(&name).is_some()) {
            (true, false) => Some(Some(Pause::Configuration)),
            (false, true) if from_config => Some(None),
            _ => None,
        };
        if let Some(reason) = change {
            if let Err(e) = this.store.set_paused(&name, reason).await {
                this.store_failed(&e);
            }
        }
        if let Some(why) = this.store.paused(&name) {
            tracing::info!(destination = %name, reason = why.reason(), "destination paused: messages are queued, not delivered");
        }
        let limit = this.dest.concurrency;
        let mut inflight: HashSet<u64> = HashSet::new();
        // The attempts in flight run inside this task, not as tasks of their
        // own: no spawn, no join hand-off (and its wake-up) per delivery.
        // Each ends with its lease's id and what `attempt` returned, or a
        // panic caught (an attempt's panic must not end the scheduler).
        let mut tasks = FuturesUnordered::new();
        let mut breaker = this.dest.breaker.map(|c| breaker::Breaker::new(c, this.breaker_state.clone()));
        this.publish_breaker(breaker::State::Closed);
        // Failed attempts in a row, to say so once the destination answers
        // again (at the default log level only failures were visible).
        let mut failed_in_a_row: u64 = 0;
        // Whether `destination.failing` was told (and `recovered` is due).
        let mut failing = false;
        let failing_after = this.events.failing_after();
        // After a store failure, leasing pauses: the failed entries are still
        // due, and re-sending them at full speed would only repeat the failure.
        let mut paused_until: Option<tokio::time::Instant> = None;
        let mut bucket = this.dest.rate_limit.map(|r| rate::Bucket::new(r, tokio::time::Instant::now()));
        loop {
            let mut deadline = None;
            if paused_until.is_some_and(|p| p <= tokio::time::Instant::now()) {
                paused_until = None;
            }
            if let Some(p) = paused_until {
                deadline = Some(p);
            } else if this.store.paused(&name).is_some() {
                // Paused: lease nothing until resumed (the resume wakes us).
            } else if inflight.len() < limit {
                let mut room = limit - inflight.len();
                let now = tokio::time::Instant::now();
                let mut breaker_wait = None;
                match breaker.as_mut().map(|b| b.allow(now)) {
                    None | Some(breaker::Allow::All) => {}
                    // Half-open: one probe, and only once nothing else is in flight.
                    Some(breaker::Allow::One) => room = if inflight.is_empty() { 1 } else { 0 },
                    Some(breaker::Allow::Until(t)) => {
                        room = 0;
                        breaker_wait = Some(t);
                    }
                }
                let allowed = bucket.as_mut().map_or(room, |b| b.available(room, now));
                let due = this.store.due(&name, now_ms(), allowed, &inflight);
                if let Some(b) = bucket.as_mut() {
                    b.take(due.leases.len());
                }
                if let (Some(b), false) = (breaker.as_mut(), due.leases.is_empty()) {
                    b.probe_started();
                }
                let rate_bound = allowed < room && due.next_due_ms.is_some_and(|ms| ms <= now_ms());
                for lease in due.leases {
                    inflight.insert(lease.id);
                    let id = lease.id;
                    let w = this.clone();
                    let attempt = async move { w.attempt(lease).await };
                    tasks.push(std::panic::AssertUnwindSafe(attempt).catch_unwind().map(move |r| (id, r)));
                }
                if let Some(t) = breaker_wait {
                    deadline = Some(t);
                } else if rate_bound {
                    // Work is due but the bucket is empty: lease again when
                    // the next token is there.
                    deadline = bucket.as_mut().map(|b| b.next_token(tokio::time::Instant::now()));
                } else if inflight.len() < limit {
                    deadline = due.next_due_ms.map(instant_at);
                }
            }
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = this.wake.notified() => {}
                Some((id, done)) = tasks.next() => {
                    inflight.remove(&id);
                    let mut opened = false;
                    if let (Ok((_, Some(ok))), Some(b)) = (&done, breaker.as_mut()) {
                        if let Some(state) = b.record(*ok, tokio::time::Instant::now()) {
                            opened = state == breaker::State::Open;
                            this.export_breaker(state);
                        }
                    }
                    match &done {
                        Ok((_, Some(false))) => {
                            failed_in_a_row += 1;
                            if !failing && (opened || failed_in_a_row >= failing_after) {
                                failing = true;
                                this.tell_failing(opened, failed_in_a_row);
                            }
                        }
                        Ok((_, Some(true))) if failed_in_a_row > 0 => {
                            if std::mem::take(&mut failing) {
                                let failed_attempts = failed_in_a_row;
                                this.events.emit(Event::Recovered { destination: name.clone(), failed_attempts });
                            }
                            // Whatever waits for a retry is due now: the
                            // receiver is back, and its timers may be minutes
                            // out. The lease below stays within the
                            // concurrency, rate limit and breaker.
                            let brought_forward = this.store.retry_now(&name).unwrap_or(0);
                            let waiting = this.store.stats(&name).depth;
                            tracing::info!(destination = %name, failed_attempts = failed_in_a_row, waiting, brought_forward, "destination answers again: delivering");
                            failed_in_a_row = 0;
                        }
                        _ => {}
                    }
                    match done {
                        Ok((true, _)) => {}
                        Ok((false, _)) => paused_until = Some(tokio::time::Instant::now() + STORE_ERROR_PAUSE),
                        Err(_) => tracing::error!(destination = %name, "delivery attempt panicked; its entry stays pending"),
                    }
                }
                _ = sleep_until(deadline), if deadline.is_some() => {}
            }
        }
        if !tasks.is_empty() {
            tracing::info!(destination = %name, in_flight = tasks.len(), "waiting for deliveries in flight");
            if tokio::time::timeout(grace, async { while tasks.next().await.is_some() {} }).await.is_err() {
                tracing::warn!(destination = %name, abandoned = tasks.len(), "grace period over; abandoned attempts stay pending");
            }
        }
    }

    /// One attempt: load, send, classify, decide, record. Returns whether
    /// the store could be read and updated, and whether the destination
    /// answered as a healthy one would (`None`: no attempt was made).
    async fn attempt(&self, lease: Lease) -> (bool, Option<bool>) {
        let name: &str = &self.dest.name;
        let msg = match self.store.fetch(&lease).await {
            Ok(Some(m)) => m,
            Ok(None) => {
                tracing::error!(destination = name, id = %self.store.external_id(lease.id), "queue entry without a message; dropped it");
                return (true, None);
            }
            Err(e) => {
                self.store_failed(&e);
                return (false, None);
            }
        };
        let attempt = lease.attempts().saturating_add(1);
        let body = match self.body_for(&msg) {
            Ok(body) => body,
            Err(reason) => return (self.unsendable(&lease, attempt, reason).await, None),
        };
        let (body, extra) = match self.reshape(&msg, lease.id, body).await {
            Ok(Some(reshaped)) => reshaped,
            Ok(None) => return (self.skipped(&lease, attempt).await, None),
            Err(reason) => {
                self.metrics.transform_failures.with_label_values(&[name]).inc();
                return (self.unsendable(&lease, attempt, format!("transform failed: {reason}")).await, None);
            }
        };
        let started = Instant::now();
        let started_ms = now_ms();
        let started_at = SystemTime::now();
        let mut span = None;
        let (outcome, snippet) = self.send(&msg, body, &extra, lease.id, attempt, &mut span).await;
        if let Some(span_id) = span {
            self.trace_attempt(&msg, lease.id, attempt, span_id, started_at, &outcome);
        }
        let record = crate::store::Attempt {
            at_ms: started_ms,
            duration_ms: started.elapsed().as_millis().min(u128::from(u32::MAX)) as u32,
            status: outcome.status().unwrap_or(0),
            error: match outcome {
                Outcome::Delivered { .. } => String::new(),
                _ => outcome.reason().to_string(),
            },
            snippet,
        };
        let m = &self.metrics;
        self.hot.duration.observe(started.elapsed().as_secs_f64());
        match outcome.result_label() {
            "2xx" => self.hot.attempts_2xx.inc(),
            label => m.delivery_attempts.with_label_values(&[name, label]).inc(),
        }

        let now = now_ms();
        self.recent.record(now, matches!(outcome, Outcome::Delivered { .. }));
        let age = Duration::from_millis(self.store.age_ms(&lease, msg.received_ms, now));
        if outcome.status() == Some(410) {
            return (self.gone(&lease, now, record).await, Some(false));
        }
        // For the breaker: the destination answered (a 4xx that refuses one
        // message says nothing about its health); only retryable failures
        // (5xx, 408, 429, connection errors, timeouts, resets) count.
        let healthy = !matches!(outcome, Outcome::Retryable { .. });
        if !healthy && self.events.wants("destination.failing") {
            if let Ok(mut last) = self.last_error.lock() {
                outcome.reason().clone_into(&mut last);
            }
        }
        let settle = match self.dest.retry.decide(attempt, &outcome, age) {
            Action::Done => {
                self.hot.delivered.inc();
                self.hot.lag.observe(age.as_secs_f64());
                tracing::debug!(destination = name, id = %self.store.external_id(lease.id), attempt, "delivered");
                Settle::Delivered { attempt: record }
            }
            Action::RetryAfter(delay) => {
                m.deliveries.with_label_values(&[name, "retried"]).inc();
                tracing::info!(destination = name, id = %self.store.external_id(lease.id), indexed = self.indexed_fields(&msg).as_deref(), attempt, reason = outcome.reason(), retry_in = %crate::text::duration(delay), "delivery failed; will retry");
                Settle::Retry {
                    at_ms: now + delay.as_millis() as u64,
                    status: outcome.status(),
                    error: outcome.reason().to_string(),
                    attempt: record,
                }
            }
            Action::DeadLetter { reason } => {
                m.deliveries.with_label_values(&[name, "dead_lettered"]).inc();
                tracing::warn!(destination = name, id = %self.store.external_id(lease.id), indexed = self.indexed_fields(&msg).as_deref(), attempt, reason = %reason, "delivery moved to the dead-letter store");
                self.tell_dead(lease.id, &reason);
                Settle::Dead { status: outcome.status(), reason, attempt: record }
            }
        };
        if let Err(e) = self.store.settle(&lease, settle).await {
            self.store_failed(&e);
            return (false, Some(healthy));
        }
        (true, Some(healthy))
    }

    /// A `410 Gone`: the destination is paused (persisted, until an
    /// operator resumes it), and this delivery stays queued, due at once,
    /// for when it is resumed (Standard Webhooks: stop sending to an
    /// endpoint that answers 410).
    async fn gone(&self, lease: &Lease, now: u64, attempt: crate::store::Attempt) -> bool {
        let name: &str = &self.dest.name;
        self.metrics.deliveries.with_label_values(&[name, "retried"]).inc();
        let error = "410 Gone: destination paused".to_string();
        let keep = Settle::Retry { at_ms: now, status: Some(410), error, attempt };
        if let Err(e) = self.store.settle(lease, keep).await {
            self.store_failed(&e);
            return false;
        }
        if self.store.paused(name).is_none() {
            tracing::warn!(destination = name, "destination answered 410 Gone: paused until an operator resumes it (POST /api/destinations/{name}/resume)");
            if let Err(e) = self.store.set_paused(name, Some(Pause::Gone)).await {
                self.store_failed(&e);
                return false;
            }
            self.events.emit(Event::Paused { destination: self.dest.name.clone(), reason: Pause::Gone.reason() });
        }
        true
    }

    /// The client to send with: rebuilt (with a fresh connection pool) when
    /// the destination's client certificate was reloaded since.
    fn current_client(&self) -> HttpClient {
        let current = self.client.load();
        match &self.client_cert {
            Some(cert) if cert.generation() != current.0 => {
                let generation = cert.generation();
                match build_client(&self.dest, Some(cert.clone())) {
                    Ok(fresh) => {
                        self.client.store(Arc::new((generation, fresh.clone())));
                        fresh
                    }
                    // Built once already with the same settings: keep the old one.
                    Err(_) => current.1.clone(),
                }
            }
            _ => current.1.clone(),
        }
    }

    /// Sends one attempt and classifies its result; with the first bytes
    /// of the response body. Never logs the URL (it may carry a token in
    /// its path or query).
    async fn send(
        &self,
        msg: &crate::store::MessageRecord,
        body: Bytes,
        extra: &[(http::HeaderName, http::HeaderValue)],
        id: u64,
        attempt: u32,
        span: &mut Option<[u8; 8]>,
    ) -> (Outcome, Vec<u8>) {
        let req = match self.build_request(msg, body, extra, id, attempt) {
            Ok(r) => r,
            Err(e) => {
                return (Outcome::Permanent { status: 0, reason: format!("cannot build request: {e}") }, Vec::new())
            }
        };
        if self.tracer.enabled() {
            // The attempt's span id is the one its `traceparent` carries.
            *span = req.headers().get(crate::trace::HEADER).and_then(|v| crate::otel::ids(v.as_bytes())).map(|i| i.1);
        }
        if let Some(target) = &self.dest.nats {
            return self.send_nats(target, req).await;
        }
        let deadline = tokio::time::Instant::now() + self.dest.timeout;
        let client = self.current_client();
        let resp = match tokio::time::timeout_at(deadline, client.request(req)).await {
            Err(_) => {
                let why = format!("no response within {}", humantime::format_duration(self.dest.timeout));
                return (Outcome::transport(TransportError::Timeout, &why), Vec::new());
            }
            Ok(Err(e)) => {
                let kind = if e.is_connect() { TransportError::Connect } else { TransportError::Io };
                return (Outcome::transport(kind, &crate::text::error_chain(&e)), Vec::new());
            }
            Ok(Ok(resp)) => resp,
        };
        let status = resp.status().as_u16();
        let retry_after =
            resp.headers().get(http::header::RETRY_AFTER).and_then(|v| v.to_str().ok()).map(str::to_owned);
        // Drain (a bounded amount of) the body so the connection can be pooled;
        // the status alone decides the outcome.
        let body = tokio::time::timeout_at(deadline, Limited::new(resp.into_body(), MAX_RESPONSE_BODY).collect()).await;
        // The answer's first bytes go into the attempt history.
        let snippet = match body {
            Ok(Ok(b)) => {
                let b = b.to_bytes();
                b[..b.len().min(crate::store::SNIPPET_LEN)].to_vec()
            }
            _ => Vec::new(),
        };
        (Outcome::classify(status, retry_after.as_deref(), &self.dest.retry.retry_on, SystemTime::now()), snippet)
    }

    /// A message this destination must not be sent (its body cannot be
    /// made what the destination asked for): a dead letter at once, with
    /// the reason, never retried (the same bytes give the same result).
    /// Returns whether the store took the change.
    /// The destination's transform on `body` (on its own threads: a script
    /// may take its whole timeout): what to send and the headers it adds,
    /// `None` if the script said not to send, or why it failed.
    async fn reshape(
        &self,
        msg: &crate::store::MessageRecord,
        id: u64,
        body: Bytes,
    ) -> Result<Option<(Bytes, Vec<(http::HeaderName, http::HeaderValue)>)>, String> {
        let Some(t) = &self.dest.transform else { return Ok(Some((body, Vec::new()))) };
        let ext = self.store.external_id(id);
        let input = transform::Input {
            id: &ext,
            route: &msg.route,
            received_ms: msg.received_ms,
            headers: &msg.headers,
            body: &body,
        };
        match t.run(&input).await? {
            transform::Reshaped::Send { body, headers } => Ok(Some((body, headers))),
            transform::Reshaped::Skip => Ok(None),
        }
    }

    /// The transform said not to deliver: done for this destination,
    /// counted as filtered.
    async fn skipped(&self, lease: &Lease, attempt: u32) -> bool {
        let name: &str = &self.dest.name;
        self.metrics.deliveries.with_label_values(&[name, "filtered"]).inc();
        let _ = attempt;
        let record = crate::store::Attempt {
            at_ms: now_ms(),
            error: "not sent: the transform returned null".into(),
            ..Default::default()
        };
        if let Err(e) = self.store.settle(lease, Settle::Delivered { attempt: record }).await {
            self.store_failed(&e);
            return false;
        }
        true
    }

    async fn unsendable(&self, lease: &Lease, attempt: u32, reason: String) -> bool {
        let name: &str = &self.dest.name;
        self.metrics.deliveries.with_label_values(&[name, "dead_lettered"]).inc();
        self.recent.record(now_ms(), false);
        tracing::warn!(destination = name, id = %self.store.external_id(lease.id), attempt, reason = %reason, "delivery moved to the dead-letter store");
        let record = crate::store::Attempt { at_ms: now_ms(), error: reason.clone(), ..Default::default() };
        self.tell_dead(lease.id, &reason);
        let dead = Settle::Dead { status: None, reason, attempt: record };
        if let Err(e) = self.store.settle(lease, dead).await {
            self.store_failed(&e);
            return false;
        }
        true
    }
}

/// Creates, at 0, each destination's series whose label values are known
/// before its first attempt: deliveries per outcome, attempts per result.
pub fn preregister(metrics: &Metrics, destinations: &[Arc<Destination>]) {
    for d in destinations {
        let name: &str = &d.name;
        for outcome in ["delivered", "retried", "dead_lettered", "filtered"] {
            metrics.deliveries.with_label_values(&[name, outcome]);
        }
        for result in retry::Outcome::RESULT_LABELS {
            metrics.delivery_attempts.with_label_values(&[name, result]);
        }
        if d.transform.is_some() {
            metrics.transform_failures.with_label_values(&[name]);
        }
    }
}

/// The tokio instant corresponding to unix time `ms` (now, if in the past).
fn instant_at(ms: u64) -> tokio::time::Instant {
    let now = now_ms();
    tokio::time::Instant::now() + Duration::from_millis(ms.saturating_sub(now))
}

async fn sleep_until(deadline: Option<tokio::time::Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}
