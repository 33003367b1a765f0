//! Trying a deployment: `switchboard sink` (a receiver that prints what it
//! gets and answers as told) and `switchboard send-test` (a ThingSpace-shaped
//! callback into the relay's own listener, followed through the admin API
//! until every destination has it, or to where it is stuck).

use std::convert::Infallible;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use rand::Rng;
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::ingress::auth::Auth;

/// How `sink` answers.
#[derive(Debug, Clone)]
pub struct SinkOptions {
    pub status: u16,
    pub delay: Duration,
    /// This share of requests (0.0-1.0) gets `fail_status` instead.
    pub fail_ratio: f64,
    pub fail_status: u16,
}

/// Serves on `listener` until `shutdown`: prints each request (method, path,
/// headers, body) to stdout and answers as `opts` says.
pub async fn sink(
    listener: tokio::net::TcpListener,
    opts: SinkOptions,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let tracker = tokio_util::task::TaskTracker::new();
    loop {
        let (stream, peer) = tokio::select! {
            _ = shutdown.cancelled() => break,
            a = listener.accept() => match a {
                Ok(a) => a,
                Err(_) => continue,
            },
        };
        let opts = opts.clone();
        tracker.spawn(async move {
            let svc = hyper::service::service_fn(move |req: http::Request<Incoming>| {
                let opts = opts.clone();
                async move { Ok::<_, Infallible>(answer(req, peer, &opts).await) }
            });
            let _ = hyper_util::server::conn::auto::Builder::new(hyper_util::rt::TokioExecutor::new())
                .serve_connection(hyper_util::rt::TokioIo::new(stream), svc)
                .await;
        });
    }
    tracker.close();
    let _ = tokio::time::timeout(Duration::from_secs(2), tracker.wait()).await;
    Ok(())
}

async fn answer(req: http::Request<Incoming>, peer: SocketAddr, opts: &SinkOptions) -> http::Response<Full<Bytes>> {
    let (parts, body) = req.into_parts();
    let body = body.collect().await.map(|b| b.to_bytes()).unwrap_or_default();
    let fail = opts.fail_ratio > 0.0 && rand::thread_rng().gen_bool(opts.fail_ratio.min(1.0));
    let status = if fail { opts.fail_status } else { opts.status };
    let mut out = format!("--- {} {} from {peer}, answering {status}\n", parts.method, parts.uri);
    for (name, value) in &parts.headers {
        out.push_str(&format!("{name}: {}\n", String::from_utf8_lossy(value.as_bytes())));
    }
    out.push('\n');
    out.push_str(&String::from_utf8_lossy(&body));
    out.push('\n');
    print!("{out}");
    if !opts.delay.is_zero() {
        tokio::time::sleep(opts.delay).await;
    }
    let mut resp = http::Response::new(Full::new(Bytes::from_static(b"{}")));
    *resp.status_mut() = http::StatusCode::from_u16(status).unwrap_or(http::StatusCode::OK);
    resp
}

/// The callbacks `send-test` can send (`--sample`).
pub const SAMPLES: [(&str, &str); 3] = [
    ("customfields", include_str!("../../tests/samples/carrierservice-customfields.json")),
    ("fault", include_str!("../../tests/samples/carrierservice-fault.json")),
    ("nidd", include_str!("../../tests/samples/niddservice-uplink.json")),
];

/// What `send-test` found.
pub struct TestReport {
    pub lines: Vec<String>,
    /// Every destination has it (or filtered it out).
    pub delivered: bool,
}

/// Posts sample `sample` to `route` (default: the first) on the relay's
/// first plain-HTTP listener, with the route's credentials and a fresh
/// `requestId` (so de-duplication does not swallow it), then follows it
/// through the admin API for at most `wait`.
pub async fn send_test(
    config: &Config,
    route: Option<&str>,
    sample: &str,
    wait: Duration,
) -> anyhow::Result<TestReport> {
    let route = match route {
        Some(p) => config
            .routes
            .iter()
            .find(|r| r.path == p)
            .ok_or_else(|| anyhow::anyhow!("no route {p:?} in the configuration"))?,
        None => config.routes.first().ok_or_else(|| anyhow::anyhow!("the configuration has no route"))?,
    };
    let Some((_, text)) = SAMPLES.iter().find(|(n, _)| *n == sample) else {
        let names: Vec<&str> = SAMPLES.iter().map(|(n, _)| *n).collect();
        anyhow::bail!("no sample {sample:?}; there are: {}", names.join(", "));
    };
    let listener = config
        .listeners
        .iter()
        .find(|l| l.tls.is_none())
        .ok_or_else(|| anyhow::anyhow!("send-test posts over plain HTTP, and every listener has TLS"))?;
    let mut body: serde_json::Value = serde_json::from_str(text)?;
    body["requestId"] = serde_json::json!(format!("send-test-{:016x}", rand::random::<u64>()));
    let mut req = http::Request::post(format!("http://{}{}", loopback(listener.addr), route.path))
        .header("content-type", "application/json")
        .header("user-agent", "switchboard send-test");
    match route.auth.as_deref() {
        None => {}
        Some(Auth::BodyFields { username_field, password_field, username, passwords }) => {
            body[username_field] = serde_json::json!(username.expose());
            body[password_field] =
                serde_json::json!(passwords.first().map(|p| p.expose().to_string()).unwrap_or_default());
        }
        Some(Auth::Basic { username, passwords }) => {
            use base64::Engine;
            let pass = passwords.first().map(|p| p.expose().to_string()).unwrap_or_default();
            let token = base64::engine::general_purpose::STANDARD.encode(format!("{}:{pass}", username.expose()));
            req = req.header("authorization", format!("Basic {token}"));
        }
        Some(Auth::Header { name, values }) => {
            req = req.header(name, values.first().map(|v| v.expose().to_string()).unwrap_or_default());
        }
        Some(Auth::Hmac(_)) => {
            anyhow::bail!("route {} signs with HMAC; send-test does not sign (use the sender)", route.path)
        }
    }
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new()).build_http();
    let req = req.body(Full::new(Bytes::from(body.to_string())))?;
    let resp = tokio::time::timeout(Duration::from_secs(30), client.request(req))
        .await
        .map_err(|_| anyhow::anyhow!("the relay did not answer within 30 s"))?
        .map_err(|e| anyhow::anyhow!("relay not reachable at {}: {e}", loopback(listener.addr)))?;
    let status = resp.status();
    let answer: serde_json::Value =
        serde_json::from_slice(&resp.into_body().collect().await?.to_bytes()).unwrap_or(serde_json::Value::Null);
    if !status.is_success() {
        anyhow::bail!("the relay refused the callback: {status} {}", answer["error"].as_str().unwrap_or_default());
    }
    let mut lines = vec![format!("sent the {sample} sample to {}: {status} {answer}", route.path)];
    let Some(id) = answer["id"].as_str() else {
        lines.push("no destination of the route wants it (filtered)".into());
        return Ok(TestReport { lines, delivered: true });
    };
    follow(config, id, wait, lines).await
}

/// Polls `GET /api/messages/{id}` until the message is gone (every
/// destination delivered it), every destination is done with it and one
/// dead-lettered it, or `wait` is over.
async fn follow(config: &Config, id: &str, wait: Duration, mut lines: Vec<String>) -> anyhow::Result<TestReport> {
    let target = crate::client::ctl::Target {
        admin: Some(format!("http://{}", loopback(config.admin.addr))),
        token: config.admin.token.as_ref().map(|t| t.expose().to_string()),
        config: None,
    };
    let admin = crate::client::ctl::AdminClient::new(&target)?;
    let deadline = Instant::now() + wait;
    let last = loop {
        match admin.message(id, false).await {
            Err(crate::client::ctl::CtlError::NoSuchMessage(..)) => {
                lines.push("delivered to every destination of the route".into());
                return Ok(TestReport { lines, delivered: true });
            }
            Err(e) => return Err(e.into()),
            Ok(v) => {
                let done = v["destinations"]
                    .as_array()
                    .is_some_and(|a| a.iter().all(|d| d["state"] == "delivered" || d["state"] == "filtered"));
                if done {
                    lines.push("delivered to every destination of the route".into());
                    return Ok(TestReport { lines, delivered: true });
                }
                // Every destination is done with it and one dead-lettered
                // it: waiting longer changes nothing.
                let states: Vec<&str> = v["destinations"]
                    .as_array()
                    .map(|a| a.iter().filter_map(|d| d["state"].as_str()).collect())
                    .unwrap_or_default();
                let ended = |s: &&str| matches!(*s, "delivered" | "filtered" | "dead" | "purged");
                if !states.is_empty() && states.iter().all(ended) {
                    lines.push("dead-lettered at a destination (waiting longer would not change that):".into());
                    lines.extend(crate::client::ctl::message_text(&v).lines().map(str::to_string));
                    return Ok(TestReport { lines, delivered: false });
                }
                if Instant::now() >= deadline {
                    break v;
                }
            }
        }
        // A poll interval of the operator's tool, not a synchronisation.
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    lines.push(format!("not delivered everywhere within {}:", humantime::format_duration(wait)));
    lines.extend(crate::client::ctl::message_text(&last).lines().map(str::to_string));
    Ok(TestReport { lines, delivered: false })
}

/// Where to reach an address the relay listens on from this machine.
fn loopback(addr: SocketAddr) -> SocketAddr {
    if addr.ip().is_unspecified() {
        SocketAddr::new(std::net::Ipv4Addr::LOCALHOST.into(), addr.port())
    } else {
        addr
    }
}
