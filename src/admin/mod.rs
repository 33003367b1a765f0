//! The admin listener: metrics, health and the operator API.
//!
//! Endpoints (on `admin.addr`, loopback by default; with `admin.token` set,
//! all but `/healthz` and `/readyz` need `Authorization: Bearer <token>`;
//! `admin.tls` serves them over HTTPS):
//! Described in OpenAPI 3.1 by `docs/admin-api.yaml`, served at
//! `GET /api/openapi.yaml`. A request that changes something and carries
//! another site's `Origin` (or `Sec-Fetch-Site: cross-site`) is refused
//! with 403, token or not: a page in the operator's browser cannot drive it.
//! - `GET /`: the status page (`status.html`, embedded; no data of its own,
//!   it reads the API below with the token it asks for).
//! - `GET /metrics`: Prometheus text exposition.
//! - `GET /healthz`: 200 while the process serves requests and its store can
//!   flush; 503 once flushes keep failing (a restart is what recovers the store).
//! - `GET /readyz`: 200 once the store is open and every listener is bound
//!   and while the store accepts callbacks; 503 before that, while shutting
//!   down, and while ingress would refuse callbacks (disk below
//!   `min_free_bytes`, less than `ingress.max_body` left under `max_bytes`,
//!   a failed flush), so a load
//!   balancer sends them elsewhere. It turns 200 again by itself once the
//!   store accepts again.
//! - `GET /api/destinations`: per destination its pending depth, oldest
//!   age, dead letters, state, breaker, deliveries per second over the
//!   last minute and `recent`: 15 minutes of delivered and failed attempts
//!   in 10-second buckets, kept by the relay (oldest first).
//! - `GET /api/dead-letters/{destination}?limit=N`: dead letters, oldest first (default 100).
//! - `POST /api/dead-letters/{destination}/replay[?id=MSG_ID][&since=T][&until=T][&wait=0]`:
//!   moves dead letters (all, one, or those received in a time range) back
//!   into the destination's queue (its rate limit applies); answers how
//!   many, or with `wait=0` at once 202 and an operation to follow.
//! - `GET /api/config`: the loaded configuration file, its SHA-256, when it
//!   was loaded, and the reloads (SIGHUP) so far with the last error.
//! - `GET /api/operations/{id}`: a replay or purge started with `wait=0`:
//!   `total`, `done`, `finished`, the count or the error.
//! - `POST /api/destinations/{destination}/pause` and `/resume`: stops or
//!   restarts deliveries to a destination (its queue is kept); persisted.
//!   A `410 Gone` from a destination pauses it the same way. A resume
//!   makes the retries that waited due at once.
//! - `POST /api/destinations/{destination}/retry-now`: the destination's
//!   deliveries waiting for a retry are due now (the worker sends them
//!   within its concurrency, rate limit and breaker); answers how many.
//!   The worker does the same by itself when the destination answers again
//!   after failures. 501 with `store.kind = "jetstream"`.
//! - `DELETE /api/dead-letters/{destination}[?id=MSG_ID][&since=T][&until=T][&wait=0]`:
//!   deletes dead letters likewise; messages nothing else needs are deleted too.
//! - `GET /api/messages/{id}[?body=1]`: one message: route, receive time,
//!   sender, stored headers (credentials masked), body size (the body with
//!   `body=1`), and per destination its state (pending with the next
//!   attempt's time, delivered, dead with why, filtered) and its last
//!   attempts (time, duration, status or error, the response's first
//!   bytes). 404 once every destination is done with it.
//! - `GET /api/messages?destination=D&state=pending|dead&since=T&until=T&limit=N&cursor=C`:
//!   the messages a destination has in that state, received in that time
//!   range (RFC 3339 or unix ms), oldest first, `limit` (100) a page, and
//!   `next_cursor` for the next page.
//! - `GET /api/messages?field=requestId&value=R`: the stored messages whose
//!   body has that value in a field their route indexes (`index = [...]`).

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use http::{header, HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;

use crate::metrics::Metrics;
use crate::store::{now_ms, Capability, Pause, Store};
use crate::wake::Wakers;

mod loaded;
mod messages;
mod operations;

pub use self::loaded::Loaded;
use self::operations::Kind;
pub use self::operations::Operations;

pub struct Admin {
    pub store: Store,
    pub metrics: Arc<Metrics>,
    pub wakers: Wakers,
    pub ready: Arc<AtomicBool>,
    /// What the configuration says, swapped by a reload.
    pub view: arc_swap::ArcSwap<View>,
    /// Replays and purges run in the background (`wait=0`), the latest kept.
    pub operations: operations::Operations,
    /// Owns the background operations (the relay waits for them at shutdown).
    pub tracker: tokio_util::task::TaskTracker,
    /// The loaded configuration file and its reloads (`GET /api/config`).
    pub loaded: Arc<Loaded>,
}

/// The admin API's part of the configuration (replaced whole on reload).
pub struct View {
    /// Configured destination names (metrics cover these plus any the store still holds).
    pub destinations: Vec<String>,
    /// Room the store must have for `/readyz` to say ready: `ingress.max_body`,
    /// so "ready" means a callback of the default limit would be taken.
    pub ready_room: u64,
    /// Bearer token for everything but /healthz and /readyz.
    pub token: Option<crate::secret::Secret>,
    /// Host names answered besides IP addresses and `localhost`.
    pub allowed_hosts: Vec<String>,
    /// Each route's destinations (a message's other ones were filtered out).
    pub routes: HashMap<String, Vec<String>>,
    /// Headers that carry senders' credentials: shown masked.
    pub sensitive: Vec<http::HeaderName>,
    /// Body fields routes index (`index = [...]`): lookups by them.
    pub indexed: Vec<String>,
}

impl crate::server::Handler for Admin {
    async fn handle(&self, req: Request<Incoming>, _peer: std::net::SocketAddr) -> Response<Full<Bytes>> {
        Admin::handle(self, req).await
    }
}

/// Whether `req` changes something and comes from another site's page: a
/// browser sends `Origin` (and `Sec-Fetch-Site`) with a cross-site form or
/// fetch; an operator's curl or the CLI sends neither. Without
/// `admin.token` this is what keeps a page the operator happens to open
/// from pausing a destination or purging dead letters behind their back.
fn cross_site(req: &Request<Incoming>) -> bool {
    if req.method() == Method::GET || req.method() == Method::HEAD {
        return false;
    }
    let h = req.headers();
    if h.get("sec-fetch-site").is_some_and(|v| v.as_bytes() == b"cross-site") {
        return true;
    }
    let Some(origin) = h.get(header::ORIGIN).and_then(|v| v.to_str().ok()) else { return false };
    let host = h.get(header::HOST).and_then(|v| v.to_str().ok()).unwrap_or_default();
    // `Origin: null` (a sandboxed or file page) is another site too.
    origin.split_once("://").map(|(_, rest)| rest) != Some(host)
}

/// The credentials of an `Authorization: Bearer ...` value; the scheme
/// is case-insensitive (RFC 9110, 11.1).
fn bearer(value: &str) -> Option<&str> {
    let (scheme, token) = value.split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| token.trim_start())
}

/// The host a request names (`Host`, or the HTTP/2 `:authority`), without
/// its port, lower case; `None` if it names none.
fn named_host(req: &Request<Incoming>) -> Option<String> {
    let authority = req
        .uri()
        .authority()
        .map(|a| a.as_str().to_string())
        .or_else(|| req.headers().get(header::HOST).and_then(|v| v.to_str().ok()).map(str::to_string))?;
    let authority = authority.rsplit_once('@').map_or(authority.as_str(), |(_, h)| h);
    let host = match authority.strip_prefix('[') {
        // An IPv6 literal: `[::1]:9090`.
        Some(rest) => rest.split_once(']').map_or(rest, |(ip, _)| ip),
        None => match authority.rsplit_once(':') {
            Some((h, port)) if port.bytes().all(|b| b.is_ascii_digit()) => h,
            _ => authority,
        },
    };
    Some(host.trim_end_matches('.').to_ascii_lowercase())
}

/// Whether the admin API answers a request naming `host`. DNS rebinding
/// makes a page of another site reach this listener under that site's
/// name, with the browser's `Origin` matching its `Host`: so a name is
/// refused unless the operator listed it. An IP address cannot be rebound
/// (a browser sends the address it connected to), and `localhost` resolves
/// on this machine only.
fn host_allowed(host: Option<&str>, allowed: &[String]) -> bool {
    match host {
        // HTTP/1.0 without `Host`: no browser sends that.
        None => true,
        Some(h) => h.parse::<std::net::IpAddr>().is_ok() || h == "localhost" || allowed.iter().any(|a| a == h),
    }
}

/// The status page: one file, no external assets (works air-gapped).
const STATUS_PAGE: &str = include_str!("status.html");

/// The page's content security policy: its one inline script is allowed
/// by its SHA-256 (so no other script, injected or not, runs), and the
/// page talks to this listener only and is never framed.
fn status_page_policy() -> &'static HeaderValue {
    static POLICY: std::sync::OnceLock<HeaderValue> = std::sync::OnceLock::new();
    POLICY.get_or_init(|| {
        use base64::Engine;
        use sha2::Digest;
        let script = STATUS_PAGE
            .split_once("<script>")
            .and_then(|(_, rest)| rest.split_once("</script>"))
            .map_or("", |(script, _)| script);
        let hash = base64::engine::general_purpose::STANDARD.encode(sha2::Sha256::digest(script.as_bytes()));
        let policy = format!("default-src 'none'; script-src 'sha256-{hash}'; style-src 'unsafe-inline'; connect-src 'self'; img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'");
        HeaderValue::from_str(&policy).unwrap_or_else(|_| HeaderValue::from_static("default-src 'none'"))
    })
}

/// `GET /`: the page, with a policy that lets it talk to this listener
/// only, run its own inline script and nothing else, and never be framed.
fn status_page() -> Response<Full<Bytes>> {
    let mut resp = respond(StatusCode::OK, "text/html; charset=utf-8", STATUS_PAGE);
    let h = resp.headers_mut();
    h.insert(header::CONTENT_SECURITY_POLICY, status_page_policy().clone());
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.insert(header::REFERRER_POLICY, HeaderValue::from_static("no-referrer"));
    resp
}

/// This API, described (OpenAPI 3.1; checked against the live server by
/// `tests/it/openapi.rs`).
const OPENAPI: &str = include_str!("../../docs/admin-api.yaml");

fn respond(status: StatusCode, content_type: &'static str, body: impl Into<Bytes>) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(body.into()));
    *resp.status_mut() = status;
    resp.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    resp
}

fn json(status: StatusCode, v: serde_json::Value) -> Response<Full<Bytes>> {
    respond(status, "application/json", v.to_string())
}

fn query_params(req: &Request<Incoming>) -> HashMap<String, String> {
    req.uri().query().map(|q| url::form_urlencoded::parse(q.as_bytes()).into_owned().collect()).unwrap_or_default()
}

impl Admin {
    fn all_destinations(&self) -> Vec<String> {
        let mut names = self.view.load().destinations.clone();
        for d in self.store.known_destinations() {
            if !names.contains(&d) {
                names.push(d);
            }
        }
        names
    }

    fn authorized(&self, req: &Request<Incoming>) -> bool {
        use subtle::ConstantTimeEq;
        let view = self.view.load();
        let Some(token) = &view.token else { return true };
        let given =
            req.headers().get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()).and_then(bearer).unwrap_or_default();
        token.expose().as_bytes().ct_eq(given.as_bytes()).into()
    }

    async fn handle(&self, req: Request<Incoming>) -> Response<Full<Bytes>> {
        let path = req.uri().path().to_string();
        let segments: Vec<&str> = path.trim_start_matches('/').split('/').collect();
        // The status page itself holds no data (it asks for the token).
        let open = matches!(segments.as_slice(), ["healthz"] | ["readyz"] | [""]);
        let host = named_host(&req);
        let probe = matches!(segments.as_slice(), ["healthz"] | ["readyz"]);
        if !probe && !host_allowed(host.as_deref(), &self.view.load().allowed_hosts) {
            let host = host.unwrap_or_default();
            let shown: String = host.chars().take(100).collect();
            return json(
                StatusCode::FORBIDDEN,
                serde_json::json!({ "error": format!("host {shown:?} is not this admin listener's name: use its IP address or localhost, or list the name in admin.allowed_hosts") }),
            );
        }
        if !open && !self.authorized(&req) {
            let mut resp = json(StatusCode::UNAUTHORIZED, serde_json::json!({ "error": "bearer token required" }));
            resp.headers_mut().insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
            return resp;
        }
        if cross_site(&req) {
            return json(
                StatusCode::FORBIDDEN,
                serde_json::json!({ "error": "cross-site requests may not change anything here" }),
            );
        }
        match (req.method(), segments.as_slice()) {
            (&Method::GET, ["metrics"]) => respond(
                StatusCode::OK,
                "text/plain; version=0.0.4",
                self.metrics.render(&self.store, &self.all_destinations(), &self.view.load().destinations),
            ),
            (&Method::GET, ["healthz"]) => self.health(),
            (&Method::GET, ["readyz"]) => self.readiness(),
            (&Method::GET, ["api", "destinations"]) => self.destination_list(),
            (&Method::GET, ["api", "messages"]) => self.message_list(&query_params(&req)).await,
            (&Method::GET, ["api", "messages", id]) => self.message(id, &query_params(&req)).await,
            (&Method::GET, ["api", "dead-letters", dest]) => self.dead_letter_list(dest, &req).await,
            (&Method::DELETE, ["api", "dead-letters", dest]) => self.dead_operation(Kind::Purge, dest, &req).await,
            (&Method::POST, ["api", "dead-letters", dest, "replay"]) => {
                self.dead_operation(Kind::Replay, dest, &req).await
            }
            (&Method::GET, ["api", "operations", id]) => self.operation(id),
            (&Method::GET, ["api", "config"]) => json(StatusCode::OK, self.loaded.to_json()),
            (&Method::GET, ["api", "openapi.yaml"]) => respond(StatusCode::OK, "application/yaml", OPENAPI),
            (&Method::GET, [""]) => status_page(),
            (&Method::POST, ["api", "destinations", dest, "replay"]) => self.destination_replay(dest, &req).await,
            (&Method::POST, ["api", "destinations", dest, "pause"]) => self.pause(dest, true).await,
            (&Method::POST, ["api", "destinations", dest, "resume"]) => self.pause(dest, false).await,
            (&Method::POST, ["api", "destinations", dest, "retry-now"]) => self.retry_now(dest),
            _ => json(StatusCode::NOT_FOUND, serde_json::json!({ "error": "not found" })),
        }
    }

    fn health(&self) -> Response<Full<Bytes>> {
        if self.store.is_healthy() {
            respond(StatusCode::OK, "text/plain", "ok\n")
        } else {
            respond(StatusCode::SERVICE_UNAVAILABLE, "text/plain", "store flushes are failing: restart needed\n")
        }
    }

    fn readiness(&self) -> Response<Full<Bytes>> {
        if !self.ready.load(Ordering::SeqCst) || self.store.is_closed() {
            return respond(StatusCode::SERVICE_UNAVAILABLE, "text/plain", "not ready\n");
        }
        // A store with a record limit of its own (JetStream's max_payload)
        // makes ingress refuse above it (413); ready means it takes what
        // is below.
        let ready_room = self.view.load().ready_room;
        let room = self.store.max_record().map_or(ready_room, |m| ready_room.min(m));
        match self.store.accepting(room) {
            Ok(()) => respond(StatusCode::OK, "text/plain", "ready\n"),
            Err(e) => respond(StatusCode::SERVICE_UNAVAILABLE, "text/plain", format!("not ready: {e}\n")),
        }
    }

    fn destination_list(&self) -> Response<Full<Bytes>> {
        let now = now_ms();
        let view = self.view.load();
        let list: Vec<_> = self
            .all_destinations()
            .iter()
            .map(|d| {
                let s = self.store.stats(d);
                let recent = self.wakers.recent(d).series(now);
                serde_json::json!({
                    "name": d,
                    "configured": view.destinations.contains(d),
                    "pending": s.depth,
                    "oldest_age_seconds": s.oldest_received_ms.map(|t| now.saturating_sub(t) as f64 / 1000.0),
                    "dead_letters": s.dead,
                    "state": if self.store.paused(d).is_some() { "paused" } else { "active" },
                    "breaker": self.wakers.breaker_state(d).as_str(),
                    "paused_reason": self.store.paused(d).map(Pause::reason),
                    "delivered_per_second": recent.delivered_per_second,
                    "recent": {
                        "bucket_seconds": recent.bucket_seconds,
                        "delivered": recent.delivered,
                        "failed": recent.failed,
                    },
                })
            })
            .collect();
        let store = serde_json::json!({
            "kind": self.store.kind().as_str(),
            // What this backend can do; the page hides what it cannot.
            "capabilities": Capability::ALL
                .iter()
                .map(|c| (c.name().to_string(), serde_json::json!(self.store.capabilities().has(*c))))
                .collect::<serde_json::Map<_, _>>(),
            "bytes": self.store.bytes(),
            "retained_messages": self.store.retained(),
        });
        json(StatusCode::OK, serde_json::json!({ "destinations": list, "store": store }))
    }

    async fn dead_letter_list(&self, dest: &str, req: &Request<Incoming>) -> Response<Full<Bytes>> {
        let limit = match query_params(req).get("limit").map(|l| l.parse::<usize>()) {
            None => 100,
            Some(Ok(n)) if n >= 1 => n,
            Some(_) => {
                return json(StatusCode::BAD_REQUEST, serde_json::json!({ "error": "limit: a positive number" }))
            }
        };
        if !self.view.load().destinations.iter().any(|d| d == dest)
            && !self.store.known_destinations().iter().any(|d| d == dest)
        {
            return json(StatusCode::NOT_FOUND, serde_json::json!({ "error": "unknown destination" }));
        }
        match self.store.list_dead(dest, limit).await {
            Ok(list) => {
                let items: Vec<_> = list
                    .iter()
                    .map(|e| {
                        serde_json::json!({
                            "id": self.store.external_id(e.id),
                            "attempts": e.attempts,
                            "dead_at": crate::text::rfc3339(e.dead_at_ms),
                            "last_status": e.last_status,
                            "reason": e.reason,
                        })
                    })
                    .collect();
                json(StatusCode::OK, serde_json::json!({ "destination": dest, "dead_letters": items }))
            }
            Err(e) => messages::store_error(&e),
        }
    }

    /// Makes the destination's waiting retries due now (the worker sends
    /// them within its concurrency, rate limit and breaker).
    fn retry_now(&self, dest: &str) -> Response<Full<Bytes>> {
        if !self.view.load().destinations.iter().any(|d| d == dest) {
            return json(StatusCode::NOT_FOUND, serde_json::json!({ "error": "unknown destination" }));
        }
        match self.store.retry_now(dest) {
            Ok(n) => {
                self.wakers.wake(dest);
                tracing::info!(destination = %dest, brought_forward = n, "retries brought forward by an operator");
                json(StatusCode::OK, serde_json::json!({ "destination": dest, "brought_forward": n }))
            }
            Err(e) => messages::store_error(&e),
        }
    }

    /// Pauses or resumes a configured destination; persisted, so a restart
    /// keeps it (only `paused = true` in the configuration pauses again at
    /// start).
    async fn pause(&self, dest: &str, pause: bool) -> Response<Full<Bytes>> {
        if !self.view.load().destinations.iter().any(|d| d == dest) {
            return json(StatusCode::NOT_FOUND, serde_json::json!({ "error": "unknown destination" }));
        }
        let was = self.store.paused(dest);
        match self.store.set_paused(dest, pause.then_some(Pause::Operator)).await {
            Ok(()) => {
                let destination: std::sync::Arc<str> = dest.into();
                match (pause, was) {
                    (true, None) => {
                        let reason = Pause::Operator.reason();
                        self.wakers.events().emit(crate::events::Event::Paused { destination, reason })
                    }
                    (false, Some(_)) => self.wakers.events().emit(crate::events::Event::Resumed { destination }),
                    _ => {}
                }
                if !pause {
                    // Resumed: retries that waited out the pause go now.
                    // (JetStream cannot bring them forward; they keep their delay.)
                    let _ = self.store.retry_now(dest);
                }
                self.wakers.wake(dest);
                tracing::info!(destination = %dest, paused = pause, "destination state changed by an operator");
                let state = if pause { "paused" } else { "active" };
                json(StatusCode::OK, serde_json::json!({ "destination": dest, "state": state }))
            }
            Err(e) => json(StatusCode::SERVICE_UNAVAILABLE, serde_json::json!({ "error": e.to_string() })),
        }
    }
}

#[cfg(test)]
mod policy_tests {
    use super::*;

    /// Regression (issue 23, point 5): the page's policy allowed any inline
    /// script (`'unsafe-inline'`). It names the page's own script by hash;
    /// the headless-browser test (`tests/it/status_page.rs`) shows the page
    /// still works under it.
    #[test]
    fn the_status_page_allows_only_its_own_script() {
        let policy = status_page_policy().to_str().expect("ascii").to_string();
        let script_src = policy.split(';').find(|d| d.trim().starts_with("script-src")).expect("script-src");
        assert!(!script_src.contains("unsafe-inline"), "{policy}");
        assert!(script_src.trim().starts_with("script-src 'sha256-") && script_src.len() > 60, "{policy}");
        assert_eq!(STATUS_PAGE.matches("<script").count(), 1, "one inline script, the one hashed");
    }

    #[test]
    fn host_names_are_parsed_and_only_ips_localhost_and_listed_names_allowed() {
        let listed = vec!["relay.internal".to_string()];
        for (host, ok) in [
            (Some("127.0.0.1"), true),
            (Some("::1"), true),
            (Some("localhost"), true),
            (Some("relay.internal"), true),
            (Some("rebind.evil.example"), false),
            (Some("localhost.evil.example"), false),
            (None, true),
        ] {
            assert_eq!(host_allowed(host, &listed), ok, "{host:?}");
        }
        assert_eq!(bearer("bearer abc"), Some("abc"));
        assert_eq!(bearer("BEARER abc"), Some("abc"));
        assert_eq!(bearer("Basic abc"), None);
        assert_eq!(bearer("Bearerabc"), None);
    }
}
