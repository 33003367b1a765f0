//! Ingress: the HTTP listeners senders call.
//!
//! A route is an exact path mapped to a list of destinations. `POST` to a
//! route stores the request (body byte-for-byte, end-to-end headers, sender
//! address) and answers `200 {"id": "..."}` only once the store has flushed it
//! to disk. Everything else gets a short JSON error:
//!
//! | situation                                   | status |
//! |---------------------------------------------|--------|
//! | unknown path                                | 404    |
//! | client address not in the listener's or route's `allow_ips` | 403 |
//! | sender authentication failed (route `auth`) | 401    |
//! | method other than POST on a route           | 405 + `Allow: POST` |
//! | `Content-Length` over the route's limit     | 413, before reading the body |
//! | body grows over the limit while read        | 413    |
//! | malformed body framing                      | 400    |
//! | body not complete within `body_read_timeout`| 408    |
//! | store full, failing or closing              | 503 + `Retry-After` |
//! | no room under `max_buffered_bytes` within `body_read_timeout` | 503 + `Retry-After` |
//!
//! Protection (connection handling is in `server.rs`): a connection must
//! complete its first request head within `header_read_timeout` of its
//! accept (TLS handshake included), at most `max_headers` headers of at
//! most 64 KiB in all, at most `max_connections` connections across all
//! listeners (further ones wait in the kernel's accept queue) and, when
//! set, `max_connections_per_ip` from one address. Request bodies held in
//! memory are bounded by `max_buffered_bytes` in all (`budget.rs`): a
//! request is charged its bytes as they arrive and gives them back once
//! answered, one client address holds at most a quarter of the budget, and
//! small callbacks have a reserve. The body is read straight into the
//! store's record ([`Draft`]), its only copy in the relay.
//!
//! The client address is the TCP peer, or, when the peer is one of the
//! listener's `trusted_proxies`, the rightmost untrusted `X-Forwarded-For` /
//! `Forwarded` hop. Header-only authentication (basic, header) runs before
//! the body is read; body-based (body_fields, hmac) right after.
//!
//! Invariant: ingress never talks to a downstream. It writes to the store and
//! wakes the destinations' schedulers, nothing more.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use http::{header, HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;

use crate::server::allowed;

pub mod auth;
pub mod budget;
pub mod dedupe;
pub mod filter;
pub mod order;
pub mod providers;
mod span;
use crate::metrics::Metrics;
use crate::store::{now_ms, Draft, Store};
use crate::wake::Wakers;

/// Ingress limits and timeouts (`[ingress]`, validated).
#[derive(Debug, Clone)]
pub struct IngressConfig {
    pub max_body: u64,
    pub header_read_timeout: Duration,
    pub body_read_timeout: Duration,
    pub max_connections: usize,
    pub max_connections_per_ip: Option<usize>,
    pub max_buffered_bytes: u64,
    pub max_headers: usize,
    pub retry_after: Duration,
}

/// One route: an exact path and what a request on it must pass.
#[derive(Debug, Clone)]
pub struct Route {
    pub path: String,
    pub destinations: Vec<Arc<str>>,
    pub max_body: u64,
    pub allow_ips: Vec<ipnet::IpNet>,
    pub auth: Option<Arc<auth::Auth>>,
    /// Headers carrying the sender's credentials (from `auth`).
    pub credential_headers: Vec<http::HeaderName>,
    /// Whether a destination of this route wants those headers forwarded,
    /// so they are stored with the message.
    pub store_credentials: bool,
    /// De-duplication of resent callbacks, if configured.
    pub dedupe: Option<dedupe::DedupeRule>,
    /// Per destination (same order as `destinations`), its filter if any.
    pub filters: Vec<Option<Arc<filter::Filter>>>,
    /// Per destination (same order), what it orders deliveries by, if it does.
    pub orders: Vec<Option<Arc<order::OrderKey>>>,
    /// Body fields messages can be looked up by (name, path).
    pub index: Vec<(String, Vec<filter::Step>)>,
}

/// Everything a request handler needs, shared by all connections.
pub struct Ingress {
    /// The routes by path, swapped whole by a configuration reload.
    pub routes: arc_swap::ArcSwap<HashMap<String, Arc<Route>>>,
    pub config: IngressConfig,
    pub store: Store,
    pub metrics: Arc<Metrics>,
    pub wakers: Wakers,
    /// Bytes of request bodies that may be held in memory (`max_buffered_bytes`).
    pub budget: Arc<budget::BodyBudget>,
    /// Refusals for a store reason are logged once a second at most (an
    /// outage at hundreds of callbacks a second would otherwise write
    /// hundreds of lines a second).
    refusals_logged: crate::throttle::LogThrottle,
    /// Refusals for want of body memory, likewise.
    budget_refusals_logged: crate::throttle::LogThrottle,
}

impl Ingress {
    pub fn new(
        routes: HashMap<String, Arc<Route>>,
        config: IngressConfig,
        store: Store,
        metrics: Arc<Metrics>,
        wakers: Wakers,
    ) -> Ingress {
        let budget = budget::BodyBudget::new(config.max_buffered_bytes);
        let routes = arc_swap::ArcSwap::from_pointee(routes);
        Ingress {
            routes,
            config,
            store,
            metrics,
            wakers,
            budget,
            refusals_logged: Default::default(),
            budget_refusals_logged: Default::default(),
        }
    }
}

/// Per-listener settings the handler needs.
#[derive(Clone, Default)]
pub struct ListenerCtx {
    pub trusted_proxies: Vec<ipnet::IpNet>,
    pub allow_ips: Vec<ipnet::IpNet>,
}

/// The ingress as one listener serves it.
pub struct ListenerIngress {
    pub ingress: Arc<Ingress>,
    pub ctx: ListenerCtx,
}

impl crate::server::Handler for ListenerIngress {
    async fn handle(&self, req: Request<Incoming>, peer: SocketAddr) -> Response<Full<Bytes>> {
        self.ingress.handle(req, peer, &self.ctx).await
    }
}

fn json_response(status: StatusCode, body: serde_json::Value) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(Bytes::from(body.to_string())));
    *resp.status_mut() = status;
    resp.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    resp
}

fn error(status: StatusCode, reason: &str) -> Response<Full<Bytes>> {
    json_response(status, serde_json::json!({ "error": reason }))
}

impl Ingress {
    async fn handle(&self, req: Request<Incoming>, peer: SocketAddr, ctx: &ListenerCtx) -> Response<Full<Bytes>> {
        let Some(route) = self.routes.load().get(req.uri().path()).cloned() else {
            self.metrics.ingress_requests.with_label_values(&["unmatched", "404"]).inc();
            return error(StatusCode::NOT_FOUND, "no route for this path");
        };
        let client = auth::client_ip(peer.ip().to_canonical(), req.headers(), &ctx.trusted_proxies);
        let tracer = self.wakers.tracer();
        let mut span = tracer.enabled().then(|| span::IngressSpan::start(req.headers()));
        let resp = if !allowed(client, &ctx.allow_ips) || !allowed(client, &route.allow_ips) {
            self.metrics.ingress_rejected.with_label_values(&[&route.path, "ip_not_allowed"]).inc();
            error(StatusCode::FORBIDDEN, "source address not allowed")
        } else {
            self.accept(req, client, &route, &mut span).await
        };
        self.metrics.ingress_requests.with_label_values(&[&route.path, resp.status().as_str()]).inc();
        if let Some(span) = span {
            span.finish(tracer, &route.path, resp.status());
        }
        resp
    }

    fn unauthorized(&self, route: &Route, r: &auth::Rejection) -> Response<Full<Bytes>> {
        self.metrics.ingress_rejected.with_label_values(&[&route.path, r.label]).inc();
        error(StatusCode::UNAUTHORIZED, r.reason)
    }

    /// Long on purpose: the steps in order, each one's refusal an early
    /// return (the order is the promise: nothing stored before every check).
    async fn accept(
        &self,
        req: Request<Incoming>,
        client: IpAddr,
        route: &Route,
        span: &mut Option<span::IngressSpan>,
    ) -> Response<Full<Bytes>> {
        if req.method() != Method::POST {
            let mut resp = error(StatusCode::METHOD_NOT_ALLOWED, "only POST is accepted on this route");
            resp.headers_mut().insert(header::ALLOW, HeaderValue::from_static("POST"));
            return resp;
        }
        // Header-only checks run before reading a byte of the body.
        if let Some(a) = route.auth.as_deref().filter(|a| !a.needs_body()) {
            if let Err(r) = a.check(req.headers(), req.uri().query(), &[], SystemTime::now()) {
                return close(self.unauthorized(route, &r));
            }
        }
        // A store with a limit of its own (JetStream's max_payload) lowers it.
        let limit = self.store.max_record().map_or(route.max_body, |m| route.max_body.min(m));
        let declared = match req.headers().get(header::CONTENT_LENGTH) {
            None => None,
            Some(len) => match len.to_str().ok().and_then(|s| s.trim().parse::<u64>().ok()) {
                Some(n) if n > limit => return too_large(limit),
                Some(n) => Some(n),
                None => return error(StatusCode::BAD_REQUEST, "invalid Content-Length"),
            },
        };
        let (parts, body) = req.into_parts();
        let withheld: &[http::HeaderName] = if route.store_credentials { &[] } else { &route.credential_headers };
        let mut headers = crate::headers::stored(&parts.headers, withheld);
        // Every message has a trace: the sender's, or one started here.
        if let Some(span) = span.as_ref() {
            // Exported: the stored parent is the ingress span.
            headers.retain(|(n, _)| n != crate::trace::HEADER);
            headers.push((crate::trace::HEADER.to_string(), Bytes::from(span.traceparent())));
        } else if !headers.iter().any(|(n, v)| n == crate::trace::HEADER && crate::trace::parse(v).is_some()) {
            headers.retain(|(n, _)| n != crate::trace::HEADER);
            headers.push((crate::trace::HEADER.to_string(), Bytes::from(crate::trace::new_traceparent())));
        }
        let hint = declared.unwrap_or(0) as usize;
        let draft = Draft::new(now_ms(), &route.path, &client.to_string(), &headers, &route.destinations, hint);
        let (draft, _held) = match self.read_body(body, draft, declared, route, client).await {
            Ok(read) => read,
            Err(resp) => return resp,
        };
        if let Some(answer) = self.body_auth(route, &parts, draft.body()) {
            if let (Some(span), true) = (span.as_mut(), answer.status().is_success()) {
                span.outcome = Some("handshake"); // answered, neither stored nor forwarded
            }
            return answer;
        }
        if let Some(span) = span.as_mut() {
            span.size = Some(draft.body().len() as u64);
        }

        let dedupe_key = route.dedupe.as_ref().map(|d| d.key(&route.path, draft.body(), &parts.headers));
        if let (Some(key), Some(rule)) = (&dedupe_key, &route.dedupe) {
            let first = match self.store.duplicate_of(key, rule.window).await {
                Ok(first) => first,
                Err(e) => return self.unavailable(&e),
            };
            if let Some(first) = first {
                // The first may still be on its way to disk: answer only
                // once a flush that started now has covered it.
                if let Err(e) = self.store.sync().await {
                    return self.unavailable(&e);
                }
                self.metrics.ingress_duplicates.with_label_values(&[&route.path]).inc();
                let id = self.store.external_id(first);
                if let Some(span) = span.as_mut() {
                    (span.outcome, span.message_id) = (Some("duplicate"), Some(id.clone()));
                }
                return json_response(StatusCode::OK, serde_json::json!({ "id": id, "duplicate": true }));
            }
        }
        let mut draft = draft;
        let parsed = self.parse_body(route, draft.body());
        let targets = self.targets(route, &parts.headers, parsed.as_ref());
        if targets.is_empty() {
            if let Some(span) = span.as_mut() {
                span.outcome = Some("filtered");
            }
            // Accepted (the sender must not resend it), needed by nobody.
            return json_response(StatusCode::OK, serde_json::json!({ "id": null, "filtered": true }));
        }
        if targets.len() != route.destinations.len() {
            draft.retain_destinations(&targets);
        }
        let started = Instant::now();
        let order = self.order_keys(route, &targets, &parts.headers, parsed.as_ref());
        let index: Vec<u64> = route
            .index
            .iter()
            .filter_map(|(name, steps)| {
                let v = filter::lookup(parsed.as_ref()?, steps)?;
                Some(crate::store::lookup_key(name, v))
            })
            .collect();
        drop(parsed);
        let marks = crate::store::Marks {
            dedupe: dedupe_key,
            dedupe_window: route.dedupe.as_ref().map_or(Duration::ZERO, |d| d.window),
            order: &order,
            index: &index,
            reserve: false,
        };
        let appended = match self.store.append_draft(draft, &targets, marks) {
            Ok(a) => a,
            Err(e) => return self.unavailable(&e),
        };
        // Schedulers may start on it now; it is acknowledged only once durable.
        for d in targets.iter() {
            self.wakers.wake(d);
        }
        let id = match self.store.durable(appended).await {
            Ok(id) => id,
            Err(e) => return self.unavailable(&e),
        };
        self.metrics.ingress_persist.observe(started.elapsed().as_secs_f64());
        let id = self.store.external_id(id);
        if let Some(span) = span.as_mut() {
            span.message_id = Some(id.clone());
        }
        // The id is `msg_` and hex digits: nothing to escape.
        let mut resp = Response::new(Full::new(Bytes::from(format!("{{\"id\":\"{id}\"}}"))));
        resp.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
        resp
    }

    /// The route's checks that need the body: a refusal, or the answer to
    /// a handshake (Slack's `url_verification`), which is neither stored
    /// nor forwarded; `None` to go on.
    fn body_auth(&self, route: &Route, parts: &http::request::Parts, body: &[u8]) -> Option<Response<Full<Bytes>>> {
        let a = route.auth.as_deref().filter(|a| a.needs_body())?;
        if let Err(r) = a.check(&parts.headers, parts.uri.query(), body, SystemTime::now()) {
            return Some(self.unauthorized(route, &r));
        }
        a.handshake(body).map(|answer| json_response(StatusCode::OK, answer))
    }

    /// The body as JSON, parsed once, and only if a filter, an ordering key
    /// or an indexed field of the route looks at it (`None`: not looked at,
    /// or not JSON).
    fn parse_body(&self, route: &Route, body: &[u8]) -> Option<serde_json::Value> {
        let filters = route.filters.iter().flatten().any(|f| f.reads_body());
        let orders = route.orders.iter().flatten().any(|o| o.reads_body());
        if !filters && !orders && route.index.is_empty() {
            return None;
        }
        let parsed = serde_json::from_slice::<serde_json::Value>(body).ok();
        if parsed.is_none() && filters {
            self.metrics.filter_unparsable.with_label_values(&[&route.path]).inc();
        }
        parsed
    }

    /// The destinations this callback is queued for: those whose filter it
    /// matches (all of the route's when none filters).
    fn targets<'r>(
        &self,
        route: &'r Route,
        headers: &http::HeaderMap,
        body: Option<&serde_json::Value>,
    ) -> std::borrow::Cow<'r, [Arc<str>]> {
        if route.filters.iter().all(Option::is_none) {
            return std::borrow::Cow::Borrowed(&route.destinations);
        }
        let subject = filter::Subject { headers, body };
        let mut kept = Vec::with_capacity(route.destinations.len());
        for (d, f) in route.destinations.iter().zip(&route.filters) {
            if f.as_ref().is_none_or(|f| f.matches(&subject)) {
                kept.push(d.clone());
            } else {
                self.metrics.deliveries.with_label_values(&[d, "filtered"]).inc();
            }
        }
        std::borrow::Cow::Owned(kept)
    }

    /// The callback's ordering key for each of `targets` that delivers in
    /// order; one without a value there is delivered unordered, and counted.
    fn order_keys(
        &self,
        route: &Route,
        targets: &[Arc<str>],
        headers: &http::HeaderMap,
        body: Option<&serde_json::Value>,
    ) -> Vec<(Arc<str>, u64)> {
        let mut keys = Vec::new();
        for (d, o) in route.destinations.iter().zip(&route.orders) {
            let Some(o) = o else { continue };
            if !targets.contains(d) {
                continue;
            }
            match o.key(headers, body) {
                Some(k) => keys.push((d.clone(), k)),
                None => self.metrics.order_key_missing.with_label_values(&[d]).inc(),
            }
        }
        keys
    }

    /// Reads the body into `draft` within `body_read_timeout`, holding its
    /// share of `max_buffered_bytes` from its first byte on: all of a
    /// declared length then, chunk by chunk otherwise (`budget.rs`).
    async fn read_body(
        &self,
        mut body: Incoming,
        mut draft: Draft,
        declared: Option<u64>,
        route: &Route,
        client: IpAddr,
    ) -> Result<(Draft, budget::Held), Response<Full<Bytes>>> {
        let deadline = tokio::time::Instant::now() + self.config.body_read_timeout;
        let mut held = self.budget.hold(client, self.metrics.ingress_buffered_bytes.clone());
        let mut read: u64 = 0;
        let mut charged = false;
        loop {
            let frame = match tokio::time::timeout_at(deadline, body.frame()).await {
                Err(_) => return Err(close(error(StatusCode::REQUEST_TIMEOUT, "request body not received in time"))),
                Ok(None) => break,
                Ok(Some(Err(_))) => return Err(close(error(StatusCode::BAD_REQUEST, "malformed request body"))),
                Ok(Some(Ok(frame))) => frame,
            };
            let Ok(chunk) = frame.into_data() else { continue }; // trailers: not stored
            read += chunk.len() as u64;
            if read > route.max_body {
                return Err(too_large(route.max_body));
            }
            match declared {
                _ if chunk.is_empty() => {}
                Some(n) if !charged => {
                    self.room(&mut held, n, n <= budget::SMALL_BODY, deadline, route).await?;
                    charged = true;
                }
                Some(_) => {}
                None => self.room(&mut held, chunk.len() as u64, read <= budget::SMALL_BODY, deadline, route).await?,
            }
            draft.extend(&chunk);
        }
        Ok((draft, held))
    }

    /// `n` more bytes of `max_buffered_bytes` for `held`, waiting for them
    /// until `deadline`.
    async fn room(
        &self,
        held: &mut budget::Held,
        n: u64,
        small: bool,
        deadline: tokio::time::Instant,
        route: &Route,
    ) -> Result<(), Response<Full<Bytes>>> {
        let waits = &self.metrics.ingress_buffer_waits;
        match held.take(n, small, deadline).await {
            Ok(waited) => {
                if waited {
                    waits.with_label_values(&[&route.path, "admitted"]).inc();
                }
                Ok(())
            }
            Err(why) => {
                waits.with_label_values(&[&route.path, "refused"]).inc();
                let reason = match why {
                    budget::Refused::Peer => {
                        "this client address holds its share of the relay's body memory (a quarter of ingress.max_buffered_bytes); retry later"
                    }
                    budget::Refused::Full => "too many request bodies in memory right now; retry later",
                };
                self.log_budget_refusal(route, why);
                Err(close(self.retry_later(reason)))
            }
        }
    }

    /// One warning a second at most for refusals for want of body memory
    /// (a flood would otherwise write one line per request).
    fn log_budget_refusal(&self, route: &Route, why: budget::Refused) {
        let Some(also) = self.budget_refusals_logged.admit() else { return };
        let what = match why {
            budget::Refused::Peer => "one client address held its quarter of ingress.max_buffered_bytes",
            budget::Refused::Full => "ingress.max_buffered_bytes stayed full for body_read_timeout",
        };
        tracing::warn!(route = %route.path, also_refused_since_last_line = also, "refusing callbacks: {what}");
    }

    fn retry_later(&self, reason: &str) -> Response<Full<Bytes>> {
        let mut resp = error(StatusCode::SERVICE_UNAVAILABLE, reason);
        resp.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(self.config.retry_after.as_secs().max(1)));
        resp
    }

    fn unavailable(&self, e: &crate::store::StoreError) -> Response<Full<Bytes>> {
        if let crate::store::StoreError::TooLarge(n) = e {
            let limit = self.store.max_record().unwrap_or(*n as u64);
            return too_large(limit);
        }
        let Some(also) = self.refusals_logged.admit() else {
            return self.retry_later("cannot store the message right now; retry later");
        };
        if e.is_transient() {
            tracing::warn!(error = %e, also_refused_since_last_line = also, "refusing a callback: the store cannot take it right now");
        } else {
            tracing::error!(error = %e, also_refused_since_last_line = also, "refusing a callback: the store failed; an operator is needed");
        }
        self.retry_later("cannot store the message right now; retry later")
    }
}

fn too_large(limit: u64) -> Response<Full<Bytes>> {
    close(error(StatusCode::PAYLOAD_TOO_LARGE, &format!("body exceeds the limit of {limit} bytes")))
}

/// Asks the connection to close after this response: the rest of the request
/// body was not read, so the connection cannot be reused safely.
fn close(mut resp: Response<Full<Bytes>>) -> Response<Full<Bytes>> {
    resp.headers_mut().insert(header::CONNECTION, HeaderValue::from_static("close"));
    resp
}

/// Creates, at 0, the series of `routes` whose label values are known
/// before the first callback: requests per route and the statuses ingress
/// answers with, refusals per reason, duplicates, unparsable bodies, and
/// missing ordering keys per destination.
pub fn preregister(metrics: &Metrics, routes: &[Route]) {
    /// The statuses ingress itself answers with.
    const CODES: [&str; 8] = ["200", "400", "401", "403", "405", "408", "413", "503"];
    for r in routes {
        for code in CODES {
            metrics.ingress_requests.with_label_values(&[&r.path, code]);
        }
        metrics.ingress_rejected.with_label_values(&[&r.path, "ip_not_allowed"]);
        if r.auth.is_some() {
            for reason in auth::REJECTION_LABELS {
                metrics.ingress_rejected.with_label_values(&[&r.path, reason]);
            }
        }
        if r.dedupe.is_some() {
            metrics.ingress_duplicates.with_label_values(&[&r.path]);
        }
        if r.filters.iter().any(|f| f.as_ref().is_some_and(|f| f.reads_body())) {
            metrics.filter_unparsable.with_label_values(&[&r.path]);
        }
        for (d, o) in r.destinations.iter().zip(&r.orders) {
            if o.is_some() {
                metrics.order_key_missing.with_label_values(&[d]);
            }
        }
    }
}
