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
//!
//! Protection: headers must arrive within `header_read_timeout` (HTTP/1), at
//! most `max_headers` headers of at most 64 KiB in all, and at most
//! `max_connections` connections are served at once across all listeners;
//! further connections wait in the kernel's accept queue.
//!
//! The client address is the TCP peer, or, when the peer is one of the
//! listener's `trusted_proxies`, the rightmost untrusted `X-Forwarded-For` /
//! `Forwarded` hop. Header-only authentication (basic, header) runs before
//! the body is read; body-based (body_fields, hmac) right after.
//!
//! Invariant: ingress never talks to a downstream. It writes to the store and
//! wakes the destinations' schedulers, nothing more.

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use http::{header, HeaderName, HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, LengthLimitError, Limited};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use crate::auth;
use crate::config::{IngressConfig, Route};
use crate::delivery::Wakers;
use crate::metrics::Metrics;
use crate::store::{now_ms, MessageRecord, Store};

/// Upper bound on the bytes of a request head (request line plus headers).
const MAX_HEAD_BYTES: usize = 64 * 1024;

/// Pause after a failed `accept` (e.g. out of file descriptors) so the loop
/// does not spin while the condition lasts.
const ACCEPT_ERROR_PAUSE: Duration = Duration::from_millis(50);

/// Everything a request handler needs, shared by all connections.
pub struct Ingress {
    pub routes: HashMap<String, Arc<Route>>,
    pub config: IngressConfig,
    pub store: Store,
    pub metrics: Arc<Metrics>,
    pub wakers: Wakers,
    pub dedupe: crate::dedupe::Dedupe,
}

/// Headers that describe one connection, not the message: never stored or forwarded.
pub fn is_hop_by_hop(name: &HeaderName) -> bool {
    matches!(
        name.as_str(),
        "connection"
            | "keep-alive"
            | "proxy-connection"
            | "proxy-authenticate"
            | "proxy-authorization"
            | "te"
            | "trailer"
            | "transfer-encoding"
            | "upgrade"
            | "host"
            | "content-length"
            | "expect"
            | "http2-settings"
    )
}

/// Per-listener settings the handler needs.
#[derive(Clone, Default)]
pub struct ListenerCtx {
    pub tls: Option<crate::tls::CertStore>,
    pub trusted_proxies: Vec<ipnet::IpNet>,
    pub allow_ips: Vec<ipnet::IpNet>,
}

/// Accepts connections on `listener` until `shutdown`, then lets requests in
/// flight finish for up to `grace`.
pub async fn serve(
    listener: TcpListener,
    ctx: ListenerCtx,
    ingress: Arc<Ingress>,
    connections: Arc<Semaphore>,
    shutdown: CancellationToken,
    grace: Duration,
) {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(ingress.config.header_read_timeout)
        .max_headers(ingress.config.max_headers)
        .max_buf_size(MAX_HEAD_BYTES);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(64)
        .max_header_list_size(MAX_HEAD_BYTES as u32)
        .keep_alive_interval(Duration::from_secs(30));
    let acceptor = ctx.tls.as_ref().map(|t| tokio_rustls::TlsAcceptor::from(t.server_config()));
    let ctx = Arc::new(ctx);
    let graceful = GracefulShutdown::new();
    let local = listener.local_addr().ok();
    loop {
        let permit = tokio::select! {
            p = connections.clone().acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => break,
            },
            _ = shutdown.cancelled() => break,
        };
        let (stream, peer) = tokio::select! {
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(ACCEPT_ERROR_PAUSE).await;
                    continue;
                }
            },
            _ = shutdown.cancelled() => break,
        };
        let _ = stream.set_nodelay(true);
        let ingress = ingress.clone();
        let builder = builder.clone();
        let watcher = graceful.watcher();
        let acceptor = acceptor.clone();
        let ctx = ctx.clone();
        tokio::spawn(async move {
            let _permit = permit;
            ingress.metrics.ingress_connections.inc();
            let svc = {
                let ingress = ingress.clone();
                service_fn(move |req| {
                    let (ingress, ctx) = (ingress.clone(), ctx.clone());
                    async move { Ok::<_, Infallible>(ingress.handle(req, peer, &ctx).await) }
                })
            };
            let result = match acceptor {
                None => watcher.watch(builder.serve_connection(TokioIo::new(stream), svc)).await,
                Some(acceptor) => {
                    // The handshake shares the header timeout: a client that
                    // opens a connection and never finishes it is cut off too.
                    let hs = tokio::time::timeout(ingress.config.header_read_timeout, acceptor.accept(stream)).await;
                    match hs {
                        Ok(Ok(tls)) => watcher.watch(builder.serve_connection(TokioIo::new(tls), svc)).await,
                        Ok(Err(e)) => {
                            tracing::debug!(peer = %peer, error = %e, "TLS handshake failed");
                            Ok(())
                        }
                        Err(_) => {
                            tracing::debug!(peer = %peer, "TLS handshake timed out");
                            Ok(())
                        }
                    }
                }
            };
            if let Err(e) = result {
                tracing::debug!(peer = %peer, error = %e, "connection ended with an error");
            }
            ingress.metrics.ingress_connections.dec();
        });
    }
    drop(listener);
    tracing::info!(addr = ?local, "ingress listener closed; finishing requests in flight");
    if tokio::time::timeout(grace, graceful.shutdown()).await.is_err() {
        tracing::warn!(addr = ?local, "grace period over with ingress connections still open");
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
        let Some(route) = self.routes.get(req.uri().path()).cloned() else {
            self.metrics.ingress_requests.with_label_values(&["unmatched", "404"]).inc();
            return error(StatusCode::NOT_FOUND, "no route for this path");
        };
        let client = auth::client_ip(peer.ip().to_canonical(), req.headers(), &ctx.trusted_proxies);
        let resp = if !auth::allowed(client, &ctx.allow_ips) || !auth::allowed(client, &route.allow_ips) {
            self.metrics.ingress_rejected.with_label_values(&[&route.path, "ip_not_allowed"]).inc();
            error(StatusCode::FORBIDDEN, "source address not allowed")
        } else {
            self.accept(req, client, &route).await
        };
        self.metrics.ingress_requests.with_label_values(&[&route.path, resp.status().as_str()]).inc();
        resp
    }

    fn unauthorized(&self, route: &Route, r: &auth::Rejection) -> Response<Full<Bytes>> {
        self.metrics.ingress_rejected.with_label_values(&[&route.path, r.label]).inc();
        error(StatusCode::UNAUTHORIZED, r.reason)
    }

    async fn accept(&self, req: Request<Incoming>, client: IpAddr, route: &Route) -> Response<Full<Bytes>> {
        if req.method() != Method::POST {
            let mut resp = error(StatusCode::METHOD_NOT_ALLOWED, "only POST is accepted on this route");
            resp.headers_mut().insert(header::ALLOW, HeaderValue::from_static("POST"));
            return resp;
        }
        // Header-only checks run before reading a byte of the body.
        if let Some(a) = route.auth.as_deref().filter(|a| !a.needs_body()) {
            if let Err(r) = a.check(req.headers(), &[], SystemTime::now()) {
                return close(self.unauthorized(route, &r));
            }
        }
        let limit = route.max_body;
        if let Some(len) = req.headers().get(header::CONTENT_LENGTH) {
            match len.to_str().ok().and_then(|s| s.trim().parse::<u64>().ok()) {
                Some(n) if n > limit => return too_large(limit),
                Some(_) => {}
                None => return error(StatusCode::BAD_REQUEST, "invalid Content-Length"),
            }
        }
        let (parts, body) = req.into_parts();
        let read = Limited::new(body, usize::try_from(limit).unwrap_or(usize::MAX)).collect();
        let body = match tokio::time::timeout(self.config.body_read_timeout, read).await {
            Err(_) => return close(error(StatusCode::REQUEST_TIMEOUT, "request body not received in time")),
            Ok(Err(e)) if e.downcast_ref::<LengthLimitError>().is_some() => return too_large(limit),
            Ok(Err(_)) => return close(error(StatusCode::BAD_REQUEST, "malformed request body")),
            Ok(Ok(collected)) => collected.to_bytes(),
        };
        if let Some(a) = route.auth.as_deref().filter(|a| a.needs_body()) {
            if let Err(r) = a.check(&parts.headers, &body, SystemTime::now()) {
                return self.unauthorized(route, &r);
            }
        }

        let dedupe_key = route.dedupe_window.map(|_| crate::dedupe::Dedupe::key(&route.path, &body));
        if let Some(key) = &dedupe_key {
            if let Some(id) = self.dedupe.lookup(key, Instant::now()) {
                self.metrics.ingress_duplicates.with_label_values(&[&route.path]).inc();
                return json_response(StatusCode::OK, serde_json::json!({ "id": id, "duplicate": true }));
            }
        }
        let headers = stored_headers(&parts.headers);
        let record =
            MessageRecord { received_ms: now_ms(), route: route.path.clone(), peer: client.to_string(), headers, body };
        let started = Instant::now();
        let id = match self.store.append(&record, &route.destinations) {
            Ok(id) => id,
            Err(e) => return self.unavailable(&e),
        };
        // Schedulers may start on it now; it is acknowledged only once durable.
        for d in &route.destinations {
            self.wakers.wake(d);
        }
        if let Err(e) = self.store.sync().await {
            return self.unavailable(&e);
        }
        self.metrics.ingress_persist.observe(started.elapsed().as_secs_f64());
        let id = self.store.external_id(id);
        if let (Some(key), Some(window)) = (dedupe_key, route.dedupe_window) {
            self.dedupe.remember(key, id.clone(), Instant::now() + window);
        }
        // The id is `msg_` and hex digits: nothing to escape.
        let mut resp = Response::new(Full::new(Bytes::from(format!("{{\"id\":\"{id}\"}}"))));
        resp.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
        resp
    }

    fn unavailable(&self, e: &crate::store::StoreError) -> Response<Full<Bytes>> {
        tracing::warn!(error = %e, "refusing a callback: the store cannot take it");
        let mut resp = error(StatusCode::SERVICE_UNAVAILABLE, "cannot store the message right now; retry later");
        resp.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(self.config.retry_after.as_secs().max(1)));
        resp
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

/// The request's end-to-end headers, in order, as stored with the message.
fn stored_headers(headers: &http::HeaderMap) -> Vec<(String, Bytes)> {
    // Headers the sender marked as hop-by-hop through `Connection` (usually none).
    let listed: Vec<String> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|s| s.trim().to_ascii_lowercase())
        .collect();
    headers
        .iter()
        .filter(|(name, _)| !is_hop_by_hop(name) && !listed.iter().any(|l| l == name.as_str()))
        .map(|(name, value)| (name.as_str().to_string(), Bytes::copy_from_slice(value.as_bytes())))
        .collect()
}
