//! The HTTP server scaffold shared by the ingress and admin listeners.
//!
//! [`serve`] accepts connections on one bound listener and serves each in a
//! task of its own, tracked so that shutdown can wait for it:
//! - **Limits at accept.** A connection takes a slot of the shared
//!   `Limits` semaphore before `accept` (further connections wait
//!   in the kernel's accept queue, costing no file descriptor). Right after
//!   `accept`, before the connection is served, the TCP peer is checked
//!   against the listener's `allow_ips` (unless the peer is a trusted proxy,
//!   whose clients are checked per request) and against the per-address
//!   limit; a refused connection gives its slot back at once.
//! - **A deadline from accept to the first request head** (TLS handshake
//!   included): a connection that has not sent a complete request head
//!   within `head_timeout` of its accept is answered 408 and closed, whether
//!   it sent a byte or not. hyper's own header timeout starts only once the
//!   first byte arrived (the HTTP-version sniffing of `auto` waits for one
//!   without a timer); it still bounds the heads of later keep-alive requests.
//! - **JSON errors from the HTTP layer.** hyper answers a request it cannot
//!   parse (400, 414, 431) with an empty body before any handler runs; the
//!   connection's I/O wrapper (`Guarded`) replaces exactly those canned
//!   responses with the documented `{"error": "..."}` shape.
//! - **Drain.** On shutdown the listener is closed, connections are asked to
//!   finish (hyper graceful shutdown) and are waited for up to `grace`.
//!
//! Refusals at accept on a plain-HTTP listener are answered with a JSON
//! error before closing (403, or 503 with `Retry-After` for the per-address
//! limit); on a TLS listener they are closed without an answer, since
//! answering would cost the TLS handshake the refusal is there to avoid.

use std::collections::HashMap;
use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Buf, Bytes};
use http::{Request, Response};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio::time::{Instant, Sleep};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::metrics::Metrics;

/// Upper bound on the bytes of a request head (request line plus headers).
pub const MAX_HEAD_BYTES: usize = 64 * 1024;

/// Pause after a failed `accept` (e.g. out of file descriptors) so the loop
/// does not spin while the condition lasts.
const ACCEPT_ERROR_PAUSE: Duration = Duration::from_millis(50);

/// How long a refusal at accept may take to write its answer and see the
/// client go away; bounded so refused connections cannot pile up.
const REFUSAL_LINGER: Duration = Duration::from_secs(1);

/// Whether `ip` is in `allow` (an empty list allows every address).
/// IPv4-mapped IPv6 addresses count as the IPv4 address they carry.
pub fn allowed(ip: IpAddr, allow: &[ipnet::IpNet]) -> bool {
    let ip = ip.to_canonical();
    allow.is_empty() || allow.iter().any(|n| n.contains(&ip))
}

/// Answers requests: the ingress or the admin API.
pub trait Handler: Send + Sync + 'static {
    fn handle(&self, req: Request<Incoming>, peer: SocketAddr) -> impl Future<Output = Response<Full<Bytes>>> + Send;
}

/// Open connections per client address.
type PerIp = Arc<Mutex<HashMap<IpAddr, usize>>>;

/// Connection limits shared by every listener of one kind.
#[derive(Clone)]
pub struct Limits {
    global: Arc<Semaphore>,
    per_ip: Option<(usize, PerIp)>,
}

impl Limits {
    pub fn new(max_connections: usize, max_per_ip: Option<usize>) -> Limits {
        Limits { global: Arc::new(Semaphore::new(max_connections)), per_ip: max_per_ip.map(|n| (n, Arc::default())) }
    }

    /// A slot for one more connection from `ip`, if its limit allows.
    fn take_ip(&self, ip: IpAddr) -> Result<Option<IpSlot>, ()> {
        let Some((max, map)) = &self.per_ip else { return Ok(None) };
        let mut m = map.lock().unwrap_or_else(|p| p.into_inner());
        let n = m.entry(ip).or_default();
        if *n >= *max {
            return Err(());
        }
        *n += 1;
        Ok(Some(IpSlot { ip, map: map.clone() }))
    }
}

/// One connection's share of its address's limit, given back on drop.
struct IpSlot {
    ip: IpAddr,
    map: PerIp,
}

impl Drop for IpSlot {
    fn drop(&mut self) {
        let mut m = self.map.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = m.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                m.remove(&self.ip);
            }
        }
    }
}

/// How one listener serves.
#[derive(Clone)]
pub struct ServerConfig {
    /// "ingress" or "admin", for logs and metric labels.
    pub kind: &'static str,
    pub tls: Option<crate::tls::CertStore>,
    /// From accept to a complete first request head, TLS handshake included.
    pub head_timeout: Duration,
    pub max_headers: usize,
    /// TCP peers this listener serves (empty: all).
    pub allow_ips: Vec<ipnet::IpNet>,
    /// Peers exempt from the accept-time `allow_ips` check: their clients
    /// are known only from the forwarding headers, checked per request.
    pub trusted_proxies: Vec<ipnet::IpNet>,
    /// `Retry-After` of a refusal for the per-address limit.
    pub retry_after: Duration,
    pub grace: Duration,
}

fn builder(cfg: &ServerConfig) -> auto::Builder<TokioExecutor> {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(cfg.head_timeout)
        .max_headers(cfg.max_headers)
        .max_buf_size(MAX_HEAD_BYTES);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(64)
        .max_header_list_size(MAX_HEAD_BYTES as u32)
        .keep_alive_interval(Duration::from_secs(30));
    builder
}

/// Accepts connections on `listener` until `shutdown`, then lets requests in
/// flight finish for up to `cfg.grace`.
pub async fn serve<H: Handler>(
    listener: TcpListener,
    cfg: ServerConfig,
    limits: Limits,
    handler: Arc<H>,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
) {
    let builder = builder(&cfg);
    let acceptor = cfg.tls.as_ref().map(|t| tokio_rustls::TlsAcceptor::from(t.server_config()));
    let graceful = GracefulShutdown::new();
    let tracker = TaskTracker::new();
    let local = listener.local_addr().ok();
    let kind = cfg.kind;
    let resets = Arc::new(crate::throttle::LogThrottle::default());
    loop {
        let permit = tokio::select! {
            p = limits.global.clone().acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => break,
            },
            _ = shutdown.cancelled() => break,
        };
        let (stream, peer) = tokio::select! {
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    tracing::warn!(listener = kind, error = %e, "accept failed");
                    tokio::time::sleep(ACCEPT_ERROR_PAUSE).await;
                    continue;
                }
            },
            _ = shutdown.cancelled() => break,
        };
        let accepted = Instant::now();
        let _ = stream.set_nodelay(true);
        let ip = peer.ip().to_canonical();
        let proxy = cfg.trusted_proxies.iter().any(|n| n.contains(&ip));
        if !proxy && !allowed(ip, &cfg.allow_ips) {
            drop(permit);
            metrics.connections_refused.with_label_values(&[kind, "ip_not_allowed"]).inc();
            if acceptor.is_none() {
                tracker.spawn(refuse(stream, Refusal::NotAllowed));
            }
            continue;
        }
        let Ok(slot) = limits.take_ip(ip) else {
            drop(permit);
            metrics.connections_refused.with_label_values(&[kind, "per_ip_limit"]).inc();
            if acceptor.is_none() {
                tracker.spawn(refuse(stream, Refusal::PerIpLimit(cfg.retry_after)));
            }
            continue;
        };
        let conn = Connection {
            builder: builder.clone(),
            watcher: graceful.watcher(),
            acceptor: acceptor.clone(),
            deadline: accepted + cfg.head_timeout,
            handler: handler.clone(),
            metrics: metrics.clone(),
            kind,
            resets: resets.clone(),
        };
        tracker.spawn(async move {
            let _held = (permit, slot);
            conn.run(stream, peer).await;
        });
    }
    drop(listener);
    tracker.close();
    let addr = local.map_or_else(|| "unknown".to_string(), |a| a.to_string());
    tracing::info!(listener = kind, addr = %addr, "listener closed; finishing requests in flight");
    let drained = async {
        graceful.shutdown().await;
        tracker.wait().await;
    };
    if tokio::time::timeout(cfg.grace, drained).await.is_err() {
        tracing::warn!(listener = kind, addr = %addr, "grace period over with connections still open");
    }
}

/// One accepted connection and what serving it needs.
struct Connection<H> {
    builder: auto::Builder<TokioExecutor>,
    watcher: hyper_util::server::graceful::Watcher,
    acceptor: Option<tokio_rustls::TlsAcceptor>,
    deadline: Instant,
    handler: Arc<H>,
    metrics: Arc<Metrics>,
    kind: &'static str,
    /// HTTP/2 connections closed for resetting too many streams (a "rapid
    /// reset" flood, CVE-2023-44487): h2 refuses them with
    /// `ENHANCE_YOUR_CALM` and its own warning per connection, which a
    /// flood turns into a line per connection. Its warnings are filtered
    /// out (`main.rs`); these are counted
    /// (`switchboard_connections_refused_total{reason="h2_resets"}`) and
    /// logged here once a second at most.
    resets: Arc<crate::throttle::LogThrottle>,
}

/// Whether a connection's error is h2 refusing a peer that reset too many
/// streams.
fn too_many_resets(e: &(dyn std::error::Error + 'static)) -> bool {
    // h2's reason reads "detected excessive load generating behavior" or,
    // by its code's name, "enhance your calm".
    let chain = crate::text::error_chain(e).to_ascii_lowercase();
    ["too_many_resets", "enhance your calm", "enhance_your_calm", "excessive load"].iter().any(|s| chain.contains(s))
}

impl<H: Handler> Connection<H> {
    async fn run(self, stream: TcpStream, peer: SocketAddr) {
        let open = (self.kind == "ingress").then(|| self.metrics.ingress_connections.clone());
        if let Some(g) = &open {
            g.inc();
        }
        let head_seen = Arc::new(AtomicBool::new(false));
        let svc = {
            let (handler, head_seen) = (self.handler.clone(), head_seen.clone());
            service_fn(move |req| {
                head_seen.store(true, Ordering::Relaxed);
                let handler = handler.clone();
                async move { Ok::<_, Infallible>(handler.handle(req, peer).await) }
            })
        };
        let timed_out = |metrics: &Metrics| metrics.connections_refused.with_label_values(&[self.kind, "head_timeout"]);
        let result = match &self.acceptor {
            None => {
                let io = Guarded::new(stream, self.deadline, head_seen.clone());
                let expired = io.expired.clone();
                let r = self.watcher.watch(self.builder.serve_connection(TokioIo::new(io), svc)).await;
                if expired.load(Ordering::Relaxed) {
                    timed_out(&self.metrics).inc();
                }
                r
            }
            Some(acceptor) => match tokio::time::timeout_at(self.deadline, acceptor.accept(stream)).await {
                Ok(Ok(tls)) => {
                    let io = Guarded::new(tls, self.deadline, head_seen.clone());
                    let expired = io.expired.clone();
                    let r = self.watcher.watch(self.builder.serve_connection(TokioIo::new(io), svc)).await;
                    if expired.load(Ordering::Relaxed) {
                        timed_out(&self.metrics).inc();
                    }
                    r
                }
                Ok(Err(e)) => {
                    tracing::debug!(peer = %peer, error = %e, "TLS handshake failed");
                    Ok(())
                }
                Err(_) => {
                    timed_out(&self.metrics).inc();
                    tracing::debug!(peer = %peer, "TLS handshake not finished before the head deadline");
                    Ok(())
                }
            },
        };
        if let Err(e) = result {
            if too_many_resets(e.as_ref()) {
                self.metrics.connections_refused.with_label_values(&[self.kind, "h2_resets"]).inc();
                if let Some(more) = self.resets.admit() {
                    tracing::warn!(listener = self.kind, peer = %peer, more_since_last_line = more, "closed an HTTP/2 connection that reset too many streams");
                }
            }
            tracing::debug!(peer = %peer, error = %e, "connection ended with an error");
        }
        if let Some(g) = &open {
            g.dec();
        }
    }
}

/// Why a connection was refused at accept.
enum Refusal {
    NotAllowed,
    PerIpLimit(Duration),
}

/// Answers a refused plain-HTTP connection with a JSON error and closes it.
async fn refuse(mut stream: TcpStream, why: Refusal) {
    let resp = match why {
        Refusal::NotAllowed => error_response(403, "Forbidden", "source address not allowed", None),
        Refusal::PerIpLimit(after) => {
            error_response(503, "Service Unavailable", "too many connections from this address", Some(after))
        }
    };
    let _ = tokio::time::timeout(REFUSAL_LINGER, async {
        stream.write_all(&resp).await?;
        stream.shutdown().await?;
        // Read what the client sent until it closes, so closing does not
        // reset the connection before the client read the answer.
        let mut sink = [0u8; 4096];
        while stream.read(&mut sink).await? > 0 {}
        Ok::<_, io::Error>(())
    })
    .await;
}

/// A complete HTTP/1.1 error response with the documented JSON body; the
/// connection closes after it.
pub fn error_response(code: u16, reason: &str, message: &str, retry_after: Option<Duration>) -> Bytes {
    let body = serde_json::json!({ "error": message }).to_string();
    let retry = retry_after.map(|d| format!("retry-after: {}\r\n", d.as_secs().max(1))).unwrap_or_default();
    Bytes::from(format!(
        "HTTP/1.1 {code} {reason}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n{retry}connection: close\r\n\r\n{body}",
        body.len()
    ))
}

/// A connection's I/O as hyper sees it: enforces the deadline for the first
/// request head and turns hyper's empty-bodied parse-error answers into JSON.
struct Guarded<S> {
    inner: S,
    deadline: Pin<Box<Sleep>>,
    head_seen: Arc<AtomicBool>,
    /// Set once the deadline passed without a request head.
    expired: Arc<AtomicBool>,
    /// Whether the client spoke HTTP/2 (its preface starts with "PRI").
    h2: Option<bool>,
    /// Bytes we write in place of what hyper asked for, and how many bytes
    /// of hyper's buffer to report written once they are out.
    replacing: Option<(Bytes, usize)>,
}

impl<S> Guarded<S> {
    fn new(inner: S, deadline: Instant, head_seen: Arc<AtomicBool>) -> Self {
        Guarded {
            inner,
            deadline: Box::pin(tokio::time::sleep_until(deadline)),
            head_seen,
            expired: Arc::default(),
            h2: None,
            replacing: None,
        }
    }
}

impl<S: AsyncWrite + Unpin> Guarded<S> {
    /// Writes out `replacing`; ready with hyper's byte count once done.
    fn poll_replacement(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
        while let Some((out, claim)) = &mut self.replacing {
            if out.is_empty() {
                let claim = *claim;
                self.replacing = None;
                return Poll::Ready(Ok(claim));
            }
            match Pin::new(&mut self.inner).poll_write(cx, out) {
                Poll::Ready(Ok(0)) => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
                Poll::Ready(Ok(n)) => out.advance(n),
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => return Poll::Pending,
            }
        }
        Poll::Ready(Ok(0))
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncRead for Guarded<S> {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let waiting = !this.head_seen.load(Ordering::Relaxed);
        if waiting && !this.expired.load(Ordering::Relaxed) && this.deadline.as_mut().poll(cx).is_ready() {
            this.expired.store(true, Ordering::Relaxed);
            if this.h2 != Some(true) {
                let resp = error_response(408, "Request Timeout", "request head not received in time", None);
                this.replacing = Some((resp, 0));
            }
        }
        if this.expired.load(Ordering::Relaxed) && waiting {
            // Answer 408 (best effort), then end the stream: hyper closes.
            return match this.poll_replacement(cx) {
                Poll::Pending => Poll::Pending,
                Poll::Ready(_) => Poll::Ready(Ok(())),
            };
        }
        let before = buf.filled().len();
        let r = Pin::new(&mut this.inner).poll_read(cx, buf);
        if this.h2.is_none() && buf.filled().len() > before {
            this.h2 = Some(buf.filled()[before..].starts_with(b"PRI "));
        }
        r
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncWrite for Guarded<S> {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if this.replacing.is_none() {
            if let Some(resp) = json_for_canned_error(buf) {
                this.replacing = Some((resp, buf.len()));
            }
        }
        if this.replacing.is_some() {
            return this.poll_replacement(cx);
        }
        Pin::new(&mut this.inner).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }

    // Not vectored: hyper then flattens each response into one buffer, so a
    // canned error is always seen whole by `poll_write`.
    fn is_write_vectored(&self) -> bool {
        false
    }
}

/// If `buf` is exactly one of hyper's automatic error responses (a 4xx head
/// with `content-length: 0`, no content type and nothing after it), the
/// same status with a JSON body. Our own handlers always send a body and a
/// content type, so they never match.
fn json_for_canned_error(buf: &[u8]) -> Option<Bytes> {
    if !(buf.starts_with(b"HTTP/1.1 4") || buf.starts_with(b"HTTP/1.0 4")) || buf.len() < 12 {
        return None;
    }
    let end = buf.windows(4).position(|w| w == b"\r\n\r\n")?;
    if end + 4 != buf.len() {
        return None;
    }
    let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
    if head.contains("\r\ncontent-type:") || !head.contains("\r\ncontent-length: 0") {
        return None;
    }
    let code: u16 = std::str::from_utf8(&buf[9..12]).ok()?.parse().ok()?;
    let (reason, message) = match code {
        431 => ("Request Header Fields Too Large", "request headers too large or too many"),
        414 => ("URI Too Long", "request target too long"),
        408 => ("Request Timeout", "request head not received in time"),
        _ => ("Bad Request", "malformed request"),
    };
    Some(error_response(code, reason, message, None))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_hyper_canned_errors_are_rewritten() {
        let canned = b"HTTP/1.1 431 Request Header Fields Too Large\r\ncontent-length: 0\r\ndate: x\r\n\r\n";
        let out = json_for_canned_error(canned).expect("rewritten");
        let text = String::from_utf8_lossy(&out);
        assert!(text.starts_with("HTTP/1.1 431 "), "{text}");
        assert!(text.contains("content-type: application/json"), "{text}");
        assert!(text.ends_with("{\"error\":\"request headers too large or too many\"}"), "{text}");
        // Our own answers carry a type and a body: left alone.
        let ours = b"HTTP/1.1 400 Bad Request\r\ncontent-type: application/json\r\ncontent-length: 2\r\n\r\n{}";
        assert!(json_for_canned_error(ours).is_none());
        assert!(json_for_canned_error(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n").is_none());
        assert!(json_for_canned_error(b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\n").is_none());
    }
}
