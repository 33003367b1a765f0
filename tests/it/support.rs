//! Test support: the real relay on port 0, scriptable HTTP receivers, and a
//! small HTTP client. Everything runs on loopback with real sockets and a
//! real sled store in a temp dir.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

/// Generous bound for "this should happen soon" waits: never a sleep, only
/// the longest a condition may take before the test fails.
pub const WAIT: Duration = Duration::from_secs(20);

/// Interval between polls of an endpoint that has no change notification.
pub const POLL: Duration = Duration::from_millis(20);

/// Evaluates `$probe` (an expression, `.await` allowed, giving
/// `Result<T, String>`) every [`POLL`] until it is `Ok(value)`, for at
/// most `$within`; then fails with `$what` and the last `Err` (the state it
/// saw). For state with nothing to wait on (another process's metrics, a
/// probe endpoint, logs); a receiver waits on its own signal instead.
/// The one polling loop of the suite.
macro_rules! eventually {
    ($within:expr, $what:expr, $probe:expr) => {{
        let within: std::time::Duration = $within;
        let deadline = tokio::time::Instant::now() + within;
        loop {
            match $probe {
                Ok(v) => break v,
                Err(last) => {
                    let last: String = last;
                    assert!(
                        tokio::time::Instant::now() < deadline,
                        "{}: not within {:?}; last seen: {}",
                        $what,
                        within,
                        last
                    );
                }
            }
            tokio::time::sleep($crate::support::POLL).await;
        }
    }};
}
pub(crate) use eventually;

/// One request a receiver got.
#[derive(Debug, Clone)]
pub struct Received {
    pub at: Instant,
    pub headers: http::HeaderMap,
    pub body: Bytes,
}

impl Received {
    pub fn header(&self, name: &str) -> Option<String> {
        self.headers.get(name).and_then(|v| v.to_str().ok()).map(str::to_owned)
    }
}

/// What a receiver does with request number `n` (0-based).
#[derive(Debug, Clone)]
pub enum Reply {
    Status(u16),
    StatusWith(u16, Vec<(&'static str, String)>),
    /// Never answer (the connection stays open until the test ends).
    Hang,
    /// Drop the connection without an answer (after reading the request).
    Reset,
    /// Answer `status` after a while (a slow destination).
    Slow(Duration, u16),
    /// Answer `status` with this body.
    Body(u16, &'static str),
}

type Script = Arc<dyn Fn(usize, &Received) -> Reply + Send + Sync>;

/// A scriptable HTTP receiver on 127.0.0.1:0 that records every request.
pub struct TestReceiver {
    pub addr: SocketAddr,
    received: Arc<Mutex<Vec<Received>>>,
    changed: Arc<Notify>,
    stop: CancellationToken,
}

impl TestReceiver {
    /// Answers 200 to everything.
    pub async fn ok() -> TestReceiver {
        Self::scripted(|_, _| Reply::Status(200)).await
    }

    pub async fn scripted(script: impl Fn(usize, &Received) -> Reply + Send + Sync + 'static) -> TestReceiver {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind receiver");
        Self::on(listener, Arc::new(script))
    }

    /// Serves on an already-bound listener (to bring a "down" destination up
    /// on the address it was configured with).
    pub fn on(listener: TcpListener, script: Script) -> TestReceiver {
        let addr = listener.local_addr().expect("local addr");
        let received: Arc<Mutex<Vec<Received>>> = Arc::default();
        let changed = Arc::new(Notify::new());
        let stop = CancellationToken::new();
        let (r, c, s) = (received.clone(), changed.clone(), stop.clone());
        tokio::spawn(async move {
            loop {
                let (stream, _) = tokio::select! {
                    a = listener.accept() => match a { Ok(x) => x, Err(_) => continue },
                    _ = s.cancelled() => return,
                };
                let (r, c, script, s2) = (r.clone(), c.clone(), script.clone(), s.clone());
                tokio::spawn(async move {
                    let svc = service_fn(move |req: http::Request<Incoming>| {
                        let (r, c, script, s2) = (r.clone(), c.clone(), script.clone(), s2.clone());
                        async move {
                            let (parts, body) = req.into_parts();
                            let body = body.collect().await.map(|b| b.to_bytes()).unwrap_or_default();
                            let rec = Received { at: Instant::now(), headers: parts.headers, body };
                            let n = {
                                let mut g = r.lock().expect("lock");
                                g.push(rec.clone());
                                g.len() - 1
                            };
                            // The script runs before waiters are woken, so
                            // what it records is there when they look.
                            let reply = script(n, &rec);
                            c.notify_waiters();
                            let mut body: &'static [u8] = b"ok";
                            let (status, headers) = match reply {
                                Reply::Status(s) => (s, vec![]),
                                Reply::StatusWith(s, h) => (s, h),
                                Reply::Hang => {
                                    s2.cancelled().await;
                                    (503, vec![])
                                }
                                Reply::Reset => return Err(std::io::Error::other("scripted reset")),
                                Reply::Slow(after, s) => {
                                    tokio::time::sleep(after).await;
                                    (s, vec![])
                                }
                                Reply::Body(s, b) => {
                                    body = b.as_bytes();
                                    (s, vec![])
                                }
                            };
                            let mut resp = http::Response::new(Full::new(Bytes::from_static(body)));
                            *resp.status_mut() = http::StatusCode::from_u16(status).expect("status");
                            for (k, v) in headers {
                                resp.headers_mut().insert(k, v.parse().expect("header"));
                            }
                            Ok::<_, std::io::Error>(resp)
                        }
                    });
                    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        TestReceiver { addr, received, changed, stop }
    }

    /// Brings a destination that was down up on its configured address,
    /// answering 200 to everything.
    pub async fn ok_at(addr: SocketAddr) -> TestReceiver {
        let listener = TcpListener::bind(addr).await.expect("rebind the destination address");
        Self::on(listener, Arc::new(|_, _| Reply::Status(200)))
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    pub fn received(&self) -> Vec<Received> {
        self.received.lock().expect("lock").clone()
    }

    pub fn count(&self) -> usize {
        self.received.lock().expect("lock").len()
    }

    /// Waits until at least `n` requests arrived, failing after `within`.
    pub async fn wait_for(&self, n: usize, within: Duration) -> Vec<Received> {
        self.wait_until(within, &format!("{n} requests"), |got| got.len() >= n).await
    }

    /// Waits until `pred` holds for the received list.
    pub async fn wait_until(&self, within: Duration, what: &str, pred: impl Fn(&[Received]) -> bool) -> Vec<Received> {
        self.try_wait_until(within, what, pred).await.unwrap_or_else(|e| panic!("{e}"))
    }

    /// Waits until `fold` says done, handing it only the requests that
    /// arrived since its previous call, with the index of the first:
    /// a wait over thousands of requests costs what arrives, not the
    /// whole list again at every arrival (which, on two cores, starved
    /// the relays and NATS it was waiting for).
    pub async fn try_wait_folding(
        &self,
        within: Duration,
        what: &str,
        mut fold: impl FnMut(usize, &[Received]) -> bool,
    ) -> Result<(), String> {
        let deadline = tokio::time::Instant::now() + within;
        let mut seen = 0;
        loop {
            let notified = self.changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let tail = self.received.lock().expect("lock")[seen..].to_vec();
            let start = seen;
            seen += tail.len();
            if fold(start, &tail) {
                return Ok(());
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return Err(format!(
                    "receiver {}: {what} did not happen within {within:?} ({seen} requests)",
                    self.addr
                ));
            }
        }
    }

    /// [`TestReceiver::wait_until`], the failure returned.
    pub async fn try_wait_until(
        &self,
        within: Duration,
        what: &str,
        pred: impl Fn(&[Received]) -> bool,
    ) -> Result<Vec<Received>, String> {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            let notified = self.changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let got = self.received();
            if pred(&got) {
                return Ok(got);
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return Err(format!(
                    "receiver {}: {what} did not happen within {within:?} ({} requests)",
                    self.addr,
                    got.len()
                ));
            }
        }
    }
}

impl Drop for TestReceiver {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// An address on which nothing listens (connection refused): bind port 0,
/// note the port, close it.
pub async fn dead_addr() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    l.local_addr().expect("addr")
}

/// The relay, in process, on port 0 listeners, with a store in a temp dir.
pub struct TestRelay {
    pub ingress: SocketAddr,
    /// One per configured listener, in order (`ingress` is the first).
    pub ingress_all: Vec<SocketAddr>,
    pub admin: SocketAddr,
    /// Holds the store's temp dir for as long as the relay runs.
    _dir: Arc<tempfile::TempDir>,
    shutdown: CancellationToken,
    task: Option<tokio::task::JoinHandle<anyhow::Result<()>>>,
}

/// Writes `toml` (with `{store}` replaced by the store path) to the dir and
/// loads it with the real loader.
pub fn write_config(dir: &Path, toml: &str) -> (PathBuf, switchboard::config::Config) {
    let store = dir.join("store");
    let text = toml.replace("{store}", &store.display().to_string());
    let path = dir.join("switchboard.toml");
    std::fs::write(&path, text).expect("write config");
    let config = switchboard::config::Config::load(&path).unwrap_or_else(|e| panic!("config: {e}"));
    (path, config)
}

impl TestRelay {
    /// Starts the relay with `toml`. Listener and admin addresses in it are
    /// ignored: port-0 sockets are bound here.
    pub async fn start(toml: &str) -> TestRelay {
        Self::start_in(Arc::new(tempfile::tempdir().expect("tempdir")), toml).await
    }

    /// Starts on an existing directory (to restart on the same store).
    pub async fn start_in(dir: Arc<tempfile::TempDir>, toml: &str) -> TestRelay {
        Self::start_with_reload(dir, toml, Arc::new(Notify::new())).await
    }

    /// Starts with a reload trigger (what SIGHUP does in the binary).
    pub async fn start_with_reload(dir: Arc<tempfile::TempDir>, toml: &str, reload: Arc<Notify>) -> TestRelay {
        let (_, config) = write_config(dir.path(), toml);
        let mut ingress = Vec::new();
        for _ in &config.listeners {
            ingress.push(TcpListener::bind("127.0.0.1:0").await.expect("bind ingress"));
        }
        let ingress_all: Vec<SocketAddr> = ingress.iter().map(|l| l.local_addr().expect("addr")).collect();
        let admin = TcpListener::bind("127.0.0.1:0").await.expect("bind admin");
        let admin_addr = admin.local_addr().expect("addr");
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(switchboard::run_with_reload(
            config,
            switchboard::Listeners { ingress, admin },
            shutdown.clone(),
            reload,
        ));
        TestRelay { ingress: ingress_all[0], ingress_all, admin: admin_addr, _dir: dir, shutdown, task: Some(task) }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.ingress, path)
    }

    pub fn admin_url(&self, path: &str) -> String {
        format!("http://{}{}", self.admin, path)
    }

    /// Graceful stop; returns what `run` returned.
    pub async fn stop(mut self) -> anyhow::Result<()> {
        self.shutdown.cancel();
        let task = self.task.take().expect("running");
        tokio::time::timeout(WAIT, task).await.expect("relay stops within the wait").expect("relay task")
    }

    pub async fn metrics(&self) -> String {
        let (status, _, body) = get(&self.admin_url("/metrics")).await;
        assert_eq!(status, 200);
        String::from_utf8(body.to_vec()).expect("utf8")
    }

    /// Waits until `/metrics` satisfies `pred`.
    pub async fn wait_metrics(&self, what: &str, pred: impl Fn(&str) -> bool) -> String {
        eventually!(WAIT, format!("metrics showing {what}"), {
            let m = self.metrics().await;
            if pred(&m) {
                Ok(m)
            } else {
                Err(m)
            }
        })
    }
}

impl Drop for TestRelay {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

/// The value of a metric series (exact label set as printed), or 0.
pub fn metric(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|l| {
            l.strip_prefix(series).and_then(|rest| rest.strip_prefix(' ')).and_then(|v| v.trim().parse().ok())
        })
        .unwrap_or(0.0)
}

fn client() -> Client<hyper_util::client::legacy::connect::HttpConnector, Full<Bytes>> {
    Client::builder(TokioExecutor::new()).build_http()
}

pub async fn request(
    method: &str,
    url: &str,
    headers: &[(&str, &str)],
    body: impl Into<Bytes>,
) -> (u16, http::HeaderMap, Bytes) {
    let mut req = http::Request::builder().method(method).uri(url);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let req = req.body(Full::new(body.into())).expect("request");
    let resp = tokio::time::timeout(WAIT, client().request(req)).await.expect("response in time").expect("response");
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    let body = resp.into_body().collect().await.expect("body").to_bytes();
    (status, headers, body)
}

pub async fn post(url: &str, content_type: &str, body: impl Into<Bytes>) -> (u16, http::HeaderMap, Bytes) {
    request("POST", url, &[("content-type", content_type)], body).await
}

pub async fn get(url: &str) -> (u16, http::HeaderMap, Bytes) {
    request("GET", url, &[], Bytes::new()).await
}

/// The message id from an ingress 200 answer.
pub fn acked_id(body: &[u8]) -> String {
    let v: serde_json::Value = serde_json::from_slice(body).expect("json answer");
    v["id"].as_str().expect("id").to_string()
}

pub fn sample(name: &str) -> Bytes {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/samples").join(name);
    match std::fs::read(&path) {
        Ok(b) => Bytes::from(b),
        // The shared samples sit beside the repo; keep a copy in the repo too.
        Err(_) => Bytes::from(
            std::fs::read(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/samples").join(name)).expect("sample"),
        ),
    }
}

/// A config with one route `/in` to the given destinations (name, url, extra TOML).
pub fn config(destinations: &[(&str, &str, &str)]) -> String {
    let names: Vec<String> = destinations.iter().map(|(n, _, _)| format!("{n:?}")).collect();
    let mut s = format!(
        "[store]\npath = \"{{store}}\"\n[[listeners]]\naddr = \"127.0.0.1:0\"\n[admin]\naddr = \"127.0.0.1:0\"\n[shutdown]\ngrace_period = \"5s\"\n[[routes]]\npath = \"/in\"\ndestinations = [{}]\n",
        names.join(", ")
    );
    for (name, url, extra) in destinations {
        s.push_str(&format!("[destinations.{name}]\nurl = \"{url}\"\n{extra}\n"));
    }
    s
}

pub fn counts_by_header(received: &[Received], header: &str) -> HashMap<String, usize> {
    let mut m = HashMap::new();
    for r in received {
        *m.entry(r.header(header).unwrap_or_default()).or_insert(0) += 1;
    }
    m
}

/// A Python for the tests that use PyPI packages: `$SWITCHBOARD_TEST_PYTHON`
/// (the virtual environment `.ci/run` fills), else `target/test-venv`, made
/// here if missing and given `packages` once (marked by
/// `.switchboard-ready-<marker>`; PyPI is reachable from these machines).
pub fn test_python(marker: &str, packages: &[&str]) -> PathBuf {
    if let Some(p) = std::env::var_os("SWITCHBOARD_TEST_PYTHON") {
        return PathBuf::from(p);
    }
    let venv = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/test-venv");
    let python = venv.join("bin/python");
    let ready = venv.join(format!(".switchboard-ready-{marker}"));
    if !ready.exists() {
        let ok = std::process::Command::new("python3").arg("-m").arg("venv").arg(&venv).status();
        assert!(ok.is_ok_and(|s| s.success()), "cannot create a Python virtual environment at {}", venv.display());
        let ok = std::process::Command::new(&python).args(["-m", "pip", "install", "-q"]).args(packages).status();
        assert!(ok.is_ok_and(|s| s.success()), "cannot install {} from PyPI", packages.join(", "));
        std::fs::write(&ready, b"").expect("mark the venv ready");
    }
    python
}
