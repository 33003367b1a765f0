//! Switchboard benchmark harness: `cargo bench --bench relay [-- --quick]`.
//!
//! Runs the release binary as a child process on loopback against receivers
//! and a load generator that live in this process, and prints one table:
//! ceiling (a no-persistence server built in here), durable ingest, ack
//! latency at a fixed rate, fan-out ×3, isolation with a black-holed
//! destination, memory, and backlog recovery. Only 2xx answers count.
//! Every run is bounded in time and count; nothing leaves 127.0.0.1.
//!
//! Runs 1 (ceiling) and 2 (durable ingest) alternate in slices (5 of 2 s
//! each in full mode) and report the sums: the ratio of the two is what the
//! target is about, and the speed of this shared VM drifts by tens of percent
//! within a minute.
//!
//! `--quick` (what CI runs) uses short runs and a small backlog: a smoke test
//! of the harness, its figures are not measurements.

use std::convert::Infallible;
use std::io::BufRead;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::{TcpListener, TcpStream};

type AnyResult<T> = Result<T, Box<dyn std::error::Error + Send + Sync>>;

struct Settings {
    quick: bool,
    /// `--only 2,4`: run just these (for working on one figure).
    only: Option<Vec<String>>,
    run: Duration,
    connections: usize,
    backlog: u64,
}

fn main() -> AnyResult<()> {
    // `cargo bench` passes `--bench`; `cargo test --all-targets` runs bench
    // targets without it, and a 2-minute measurement is no test.
    if !std::env::args().any(|a| a == "--bench") {
        println!("switchboard benchmark: not run (use `cargo bench --bench relay [-- --quick]`)");
        return Ok(());
    }
    if std::env::args().any(|a| a == "--ceiling-server") {
        return ceiling_server_process();
    }
    let quick = std::env::args().any(|a| a == "--quick");
    let args: Vec<String> = std::env::args().collect();
    let only = args
        .iter()
        .position(|a| a == "--only")
        .and_then(|i| args.get(i + 1))
        .map(|list| list.split(',').map(|r| r.trim().to_string()).collect::<Vec<_>>());
    let settings = Settings {
        quick,
        only,
        run: if quick { Duration::from_secs(2) } else { Duration::from_secs(10) },
        connections: 64,
        backlog: if quick { 2_000 } else { 200_000 },
    };
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    rt.block_on(bench(settings))
}

impl Settings {
    fn wants(&self, run: &str) -> bool {
        self.only.as_ref().is_none_or(|o| o.iter().any(|r| r == run))
    }
}

// ---------------------------------------------------------------------------
// Receivers
// ---------------------------------------------------------------------------

#[derive(Clone, Copy, PartialEq)]
enum Mode {
    Ok,
    BlackHole,
}

/// A large body whose bytes all equal its first one (see [`intact`]).
fn large_body(i: usize) -> Bytes {
    Bytes::from(vec![b'A' + (i % 26) as u8; LARGE_BODY])
}

/// Size of the bodies of run 8: the default `max_body`.
const LARGE_BODY: usize = 1 << 20;

/// Whether a received body is a whole [`large_body`].
fn intact(body: &[u8]) -> bool {
    body.len() == LARGE_BODY && body.iter().all(|b| *b == body[0])
}

/// A local destination: answers 200 and counts, or never answers.
struct Receiver {
    addr: SocketAddr,
    count: Arc<AtomicU64>,
    /// Bodies that were whole large bodies (run 8).
    intact: Arc<AtomicU64>,
    lags_us: Arc<Mutex<Vec<u32>>>,
    stop: Arc<AtomicBool>,
}

impl Receiver {
    async fn start(mode: Mode, epoch: Instant) -> AnyResult<Receiver> {
        Self::on(TcpListener::bind("127.0.0.1:0").await?, mode, epoch)
    }

    fn on(listener: TcpListener, mode: Mode, epoch: Instant) -> AnyResult<Receiver> {
        let addr = listener.local_addr()?;
        let count = Arc::new(AtomicU64::new(0));
        let whole = Arc::new(AtomicU64::new(0));
        let lags_us: Arc<Mutex<Vec<u32>>> = Arc::default();
        let stop = Arc::new(AtomicBool::new(false));
        let (c, w, l, s) = (count.clone(), whole.clone(), lags_us.clone(), stop.clone());
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                if s.load(Ordering::Relaxed) {
                    return;
                }
                let (c, w, l) = (c.clone(), w.clone(), l.clone());
                tokio::spawn(async move {
                    let svc = service_fn(move |req: http::Request<hyper::body::Incoming>| {
                        let (c, w, l) = (c.clone(), w.clone(), l.clone());
                        async move {
                            if mode == Mode::BlackHole {
                                std::future::pending::<()>().await;
                            }
                            let body = req.into_body().collect().await.map(|b| b.to_bytes()).unwrap_or_default();
                            c.fetch_add(1, Ordering::Relaxed);
                            if body.len() == LARGE_BODY && intact(&body) {
                                w.fetch_add(1, Ordering::Relaxed);
                            }
                            if let Some(sent) = sent_at_us(&body) {
                                let now = epoch.elapsed().as_micros() as u64;
                                if let Ok(mut v) = l.lock() {
                                    v.push(now.saturating_sub(sent).min(u32::MAX as u64) as u32);
                                }
                            }
                            Ok::<_, Infallible>(http::Response::new(Full::new(Bytes::from_static(b"ok"))))
                        }
                    });
                    let _ =
                        hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(stream), svc).await;
                });
            }
        });
        Ok(Receiver { addr, count, intact: whole, lags_us, stop })
    }

    fn url(&self) -> String {
        format!("http://{}/cb", self.addr)
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// Bodies carry `"t":<µs since epoch>` so receivers can measure lag.
fn sent_at_us(body: &[u8]) -> Option<u64> {
    let s = std::str::from_utf8(body.get(..40)?).ok()?;
    let rest = s.split("\"t\":").nth(1)?;
    rest.split(|c: char| !c.is_ascii_digit()).next()?.parse().ok()
}

/// A 1 KiB JSON body shaped like a ThingSpace callback.
fn body(epoch: Instant) -> Bytes {
    let head =
        format!("{{\"t\":{:020},\"username\":\"\",\"password\":\"\",\"requestId\":\"", epoch.elapsed().as_micros());
    let mut s = head;
    while s.len() < 1024 - 3 {
        s.push('x');
    }
    s.push_str("\"}");
    while s.len() < 1024 {
        s.push(' ');
    }
    Bytes::from(s)
}

// ---------------------------------------------------------------------------
// Ceiling server: answers 200 at once, persists nothing.
// ---------------------------------------------------------------------------

/// The ceiling server as a process of its own, like the relay (same tokio
/// defaults: one worker thread per core), so the two are measured alike. It
/// prints its address and serves until its stdin closes.
fn ceiling_server_process() -> AnyResult<()> {
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    rt.block_on(async {
        let addr = ceiling_server().await?;
        println!("{addr}");
        tokio::task::spawn_blocking(|| std::io::copy(&mut std::io::stdin(), &mut std::io::sink())).await??;
        Ok(())
    })
}

/// Starts [`ceiling_server_process`]; it exits when the returned child is
/// dropped (its stdin closes) or killed.
fn spawn_ceiling_server() -> AnyResult<(Child, SocketAddr)> {
    let mut child = Command::new(std::env::current_exe()?)
        .args(["--bench", "--ceiling-server"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()?;
    let out = child.stdout.take().ok_or("no stdout")?;
    let mut line = String::new();
    std::io::BufReader::new(out).read_line(&mut line)?;
    let addr = line.trim().parse()?;
    Ok((child, addr))
}

async fn ceiling_server() -> AnyResult<SocketAddr> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let _ = stream.set_nodelay(true);
            tokio::spawn(async move {
                let svc = service_fn(|req: http::Request<hyper::body::Incoming>| async move {
                    let _ = req.into_body().collect().await;
                    Ok::<_, Infallible>(http::Response::new(Full::new(Bytes::from_static(b"{\"id\":\"x\"}"))))
                });
                let _ = hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(stream), svc).await;
            });
        }
    });
    Ok(addr)
}

// ---------------------------------------------------------------------------
// Load generator
// ---------------------------------------------------------------------------

#[derive(Default)]
struct LoadResult {
    ok: u64,
    errors: u64,
    elapsed: Duration,
    latencies_us: Vec<u32>,
}

impl LoadResult {
    /// Adds another run's counts and latencies (kept sorted).
    fn absorb(&mut self, other: LoadResult) {
        self.ok += other.ok;
        self.errors += other.errors;
        self.elapsed += other.elapsed;
        self.latencies_us.extend(other.latencies_us);
        self.latencies_us.sort_unstable();
    }

    fn rps(&self) -> f64 {
        self.ok as f64 / self.elapsed.as_secs_f64()
    }
    /// Percentile in ms; latencies are sorted when the run ends.
    fn pct(&self, p: f64) -> f64 {
        sorted_percentile(&self.latencies_us, p)
    }
}

fn percentile(v: &mut [u32], p: f64) -> f64 {
    v.sort_unstable();
    sorted_percentile(v, p)
}

fn sorted_percentile(v: &[u32], p: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    let i = ((v.len() as f64 - 1.0) * p).round() as usize;
    v[i] as f64 / 1000.0
}

type Sender = hyper::client::conn::http1::SendRequest<Full<Bytes>>;

async fn connect(addr: SocketAddr) -> AnyResult<Sender> {
    let stream = TcpStream::connect(addr).await?;
    stream.set_nodelay(true)?;
    let (send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(conn);
    Ok(send)
}

async fn send(send: &mut Sender, addr: SocketAddr, path: &str, body: Bytes) -> AnyResult<bool> {
    send.ready().await?;
    let req = http::Request::post(path)
        .header("host", addr.to_string())
        .header("content-type", "application/json")
        .header("user-agent", "Verizon's callback service")
        .body(Full::new(body))?;
    let resp = send.send_request(req).await?;
    let ok = resp.status().is_success();
    let _ = resp.into_body().collect().await;
    Ok(ok)
}

/// Closed loop: `conns` connections, each sending back to back for `dur`
/// (or until `max` requests in all).
async fn closed_loop(
    addr: SocketAddr,
    path: &str,
    conns: usize,
    dur: Duration,
    max: u64,
    epoch: Instant,
) -> LoadResult {
    let started = Instant::now();
    let deadline = started + dur;
    let sent = Arc::new(AtomicU64::new(0));
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..conns {
        let (path, sent) = (path.to_string(), sent.clone());
        tasks.spawn(async move {
            let mut r = LoadResult::default();
            let mut conn = None;
            while Instant::now() < deadline && sent.fetch_add(1, Ordering::Relaxed) < max {
                if conn.is_none() {
                    conn = connect(addr).await.ok();
                }
                let Some(c) = conn.as_mut() else {
                    r.errors += 1;
                    continue;
                };
                let t = Instant::now();
                match send(c, addr, &path, body(epoch)).await {
                    Ok(true) => {
                        r.ok += 1;
                        r.latencies_us.push(t.elapsed().as_micros() as u32);
                    }
                    Ok(false) => r.errors += 1,
                    Err(_) => {
                        r.errors += 1;
                        conn = None;
                    }
                }
            }
            r
        });
    }
    let mut total = LoadResult::default();
    while let Some(Ok(r)) = tasks.join_next().await {
        total.ok += r.ok;
        total.errors += r.errors;
        total.latencies_us.extend(r.latencies_us);
    }
    total.elapsed = started.elapsed();
    total.latencies_us.sort_unstable();
    total
}

/// Open loop: one request every 1/`rate` s for `dur`, on a pool of
/// connections; latency counts from the scheduled send time, so a stall
/// shows up in the tail (no coordinated omission).
async fn open_loop(addr: SocketAddr, path: &str, rate: u64, dur: Duration, epoch: Instant) -> LoadResult {
    // At most this many requests in flight (and connections open): a stall
    // shows as latency (measured from the scheduled send time) and, past the
    // timeout, as failures, instead of an ever-growing number of connections.
    const MAX_IN_FLIGHT: usize = 512;
    const TIMEOUT: Duration = Duration::from_secs(10);
    let pool: Arc<tokio::sync::Mutex<Vec<Sender>>> = Arc::default();
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_IN_FLIGHT));
    let started = tokio::time::Instant::now();
    let total = (rate as f64 * dur.as_secs_f64()) as u64;
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..total {
        let at = started + Duration::from_secs_f64(i as f64 / rate as f64);
        tokio::time::sleep_until(at).await;
        let (pool, path, slots) = (pool.clone(), path.to_string(), slots.clone());
        tasks.spawn(async move {
            let attempt = async {
                let Ok(_slot) = slots.acquire().await else { return false };
                let mut conn = match pool.lock().await.pop() {
                    Some(c) => c,
                    None => match connect(addr).await {
                        Ok(c) => c,
                        Err(_) => return false,
                    },
                };
                let ok = matches!(send(&mut conn, addr, &path, body(epoch)).await, Ok(true));
                if ok {
                    pool.lock().await.push(conn);
                }
                ok
            };
            let ok = matches!(tokio::time::timeout(TIMEOUT, attempt).await, Ok(true));
            (ok, at.elapsed().as_micros() as u32)
        });
    }
    let mut r = LoadResult::default();
    while let Some(Ok((ok, lat))) = tasks.join_next().await {
        if ok {
            r.ok += 1;
            r.latencies_us.push(lat);
        } else {
            r.errors += 1;
        }
    }
    r.elapsed = started.elapsed();
    r.latencies_us.sort_unstable();
    r
}

// ---------------------------------------------------------------------------
// The relay as a child process
// ---------------------------------------------------------------------------

struct Relay {
    child: Child,
    ingress: SocketAddr,
    admin: SocketAddr,
}

impl Relay {
    async fn start(dir: &Path, destinations: &[(&str, String, &str)]) -> AnyResult<Relay> {
        let names: Vec<String> = destinations.iter().map(|(n, _, _)| format!("{n:?}")).collect();
        let mut toml = format!(
            "[store]\npath = \"{}\"\nmin_free_bytes = 0\n[[listeners]]\naddr = \"127.0.0.1:0\"\n[admin]\naddr = \"127.0.0.1:0\"\n[shutdown]\ngrace_period = \"2s\"\n[[routes]]\npath = \"/in\"\ndestinations = [{}]\n",
            dir.join("store").display(),
            names.join(", ")
        );
        for (name, url, extra) in destinations {
            toml.push_str(&format!("[destinations.{name}]\nurl = \"{url}\"\n{extra}\n"));
        }
        let path = dir.join("bench.toml");
        std::fs::write(&path, toml)?;
        let mut child = Command::new(env!("CARGO_BIN_EXE_switchboard"))
            .args(["run", "--log-format", "json", "--config"])
            .arg(&path)
            .env("RUST_LOG", "switchboard=info,warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()?;
        let stderr = child.stderr.take().ok_or("no stderr")?;
        let (tx, rx) = std::sync::mpsc::channel::<(String, SocketAddr)>();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(stderr).lines().map_while(Result::ok) {
                let Ok(v) = serde_json::from_str::<serde_json::Value>(&line) else { continue };
                if let (Some(msg), Some(addr)) =
                    (v["message"].as_str(), v["addr"].as_str().and_then(|a| a.parse().ok()))
                {
                    let _ = tx.send((msg.to_string(), addr));
                }
            }
        });
        let (mut ingress, mut admin) = (None, None);
        while ingress.is_none() || admin.is_none() {
            let (msg, addr) = rx.recv_timeout(Duration::from_secs(60))?;
            match msg.as_str() {
                "ingress listening" => ingress = Some(addr),
                "admin listening" => admin = Some(addr),
                _ => {}
            }
        }
        Ok(Relay { child, ingress: ingress.ok_or("no ingress")?, admin: admin.ok_or("no admin")? })
    }

    fn rss_kib(&self, field: &str) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).unwrap_or_default();
        status
            .lines()
            .find_map(|l| l.strip_prefix(field))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or(0)
    }

    /// CPU seconds (user + system) the relay has used so far.
    fn cpu_secs(&self) -> f64 {
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", self.child.id())).unwrap_or_default();
        // Fields after the ")" that ends the command name; utime and stime are
        // the 14th and 15th fields of the line, in clock ticks (100 Hz here).
        let rest = stat.rsplit(')').next().unwrap_or_default();
        let f: Vec<&str> = rest.split_whitespace().collect();
        let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
        (ticks(11) + ticks(12)) / 100.0
    }

    fn rss_mb(&self) -> f64 {
        self.rss_kib("VmRSS:") as f64 / 1024.0
    }

    fn peak_mb(&self) -> f64 {
        self.rss_kib("VmHWM:") as f64 / 1024.0
    }

    async fn metric(&self, series: &str) -> f64 {
        let Ok(mut c) = connect(self.admin).await else { return f64::NAN };
        let req = http::Request::get("/metrics").header("host", "x").body(Full::new(Bytes::new()));
        let Ok(req) = req else { return f64::NAN };
        let Ok(resp) = c.send_request(req).await else { return f64::NAN };
        let Ok(b) = resp.into_body().collect().await else { return f64::NAN };
        let text = String::from_utf8_lossy(&b.to_bytes()).into_owned();
        text.lines()
            .find_map(|l| l.strip_prefix(series).and_then(|r| r.strip_prefix(' ')).and_then(|v| v.trim().parse().ok()))
            .unwrap_or(0.0)
    }

    fn stop(mut self) {
        let _ = Command::new("kill").arg("-TERM").arg(self.child.id().to_string()).status();
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                // The next run should not pay for this one's disk writeback.
                let _ = Command::new("sync").status();
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Waits until `cond` holds or `limit` passes; returns how long it took.
async fn wait_until(limit: Duration, mut cond: impl FnMut() -> bool) -> Option<Duration> {
    let t = Instant::now();
    while t.elapsed() < limit {
        if cond() {
            return Some(t.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    None
}

fn row(name: &str, figures: &str) {
    println!("| {name:<34} | {figures} |");
}

async fn bench(s: Settings) -> AnyResult<()> {
    let epoch = Instant::now();
    let tmp = tempfile::tempdir()?;
    let mut n = 0;
    let mut fresh_dir = || -> PathBuf {
        n += 1;
        let d = tmp.path().join(format!("run{n}"));
        let _ = std::fs::create_dir_all(&d);
        d
    };
    println!(
        "switchboard benchmark ({} mode): {} s per run, {} connections, 1 KiB JSON bodies, loopback only",
        if s.quick { "quick" } else { "full" },
        s.run.as_secs(),
        s.connections
    );
    println!("| {:<34} | figures |", "run");
    println!("|{}|---------|", "-".repeat(36));

    let (mut idle, mut ingest_peak, mut fixed_peak) = (0.0, 0.0, 0.0);
    if s.wants("1") || s.wants("2") {
        // 1. Ceiling: a no-persistence server in a process of its own (the
        // relay is one too); the in-process figure is printed for reference.
        let inproc_addr = ceiling_server().await?;
        let inproc = closed_loop(inproc_addr, "/in", s.connections, s.run, u64::MAX, epoch).await;
        // 1 and 2 alternate in short slices against two processes started
        // once, so a change in the machine's speed during the run (this VM's
        // neighbours) weighs on both figures alike instead of on the ratio.
        let (mut server, ceiling_addr) = spawn_ceiling_server()?;
        let relay = Relay::start(&fresh_dir(), &[("paused", "http://127.0.0.1:1/".into(), "paused = true")]).await?;
        idle = relay.rss_mb();
        let rounds = if s.quick { 2 } else { 5 };
        let slice = s.run / rounds;
        let (mut ceiling, mut ingest) = (LoadResult::default(), LoadResult::default());
        let (mut ingest_cpu_secs, mut ratios) = (0.0, Vec::new());
        for _ in 0..rounds {
            let c = closed_loop(ceiling_addr, "/in", s.connections, slice, u64::MAX, epoch).await;
            let cpu0 = relay.cpu_secs();
            let r = closed_loop(relay.ingress, "/in", s.connections, slice, u64::MAX, epoch).await;
            ingest_cpu_secs += relay.cpu_secs() - cpu0;
            ratios.push(format!("{:.0}", 100.0 * r.rps() / c.rps().max(1.0)));
            ceiling.absorb(c);
            ingest.absorb(r);
        }
        let _ = server.kill();
        let _ = server.wait();
        row(
            "1b. ceiling, server inside the harness",
            &format!(
                "{:.0} req/s, p50 {:.2} ms, p99 {:.2} ms (reference only: server and load share one runtime)",
                inproc.rps(),
                inproc.pct(0.5),
                inproc.pct(0.99)
            ),
        );
        row(
            "1. ceiling (no persistence, own process)",
            &format!(
                "{:.0} req/s, p50 {:.2} ms, p99 {:.2} ms, p999 {:.2} ms",
                ceiling.rps(),
                ceiling.pct(0.5),
                ceiling.pct(0.99),
                ceiling.pct(0.999)
            ),
        );

        // 2. Durable ingest, destination paused.
        let ingest_cpu = ingest_cpu_secs / ingest.elapsed.as_secs_f64();
        let flushes = relay.metric("switchboard_store_flushes_total{result=\"ok\"}").await;
        row(
            "2. durable ingest (fsync, 64 conns)",
            &format!(
                "{:.0} req/s ({:.0} % of ceiling; per slice {} %), p50 {:.2} ms, p99 {:.2} ms, p999 {:.2} ms, {} non-2xx, {:.1} acks per fsync, relay CPU {:.0} % of one core ({:.0} us per request)",
                ingest.rps(),
                100.0 * ingest.rps() / ceiling.rps(),
                ratios.join("/"),
                ingest.pct(0.5),
                ingest.pct(0.99),
                ingest.pct(0.999),
                ingest.errors,
                ingest.ok as f64 / flushes.max(1.0),
                ingest_cpu * 100.0,
                ingest_cpu * 1e6 / ingest.rps().max(1.0)
            ),
        );
        ingest_peak = relay.peak_mb();
        relay.stop();
    }
    if s.wants("3") {
        // 3. Ack latency at a fixed rate.
        let relay = Relay::start(&fresh_dir(), &[("paused", "http://127.0.0.1:1/".into(), "paused = true")]).await?;
        let fixed = open_loop(relay.ingress, "/in", 1000, s.run, epoch).await;
        row(
            "3. ack latency at 1000 req/s (open)",
            &format!(
                "{} ok, {} failed, p50 {:.2} ms, p99 {:.2} ms, p999 {:.2} ms",
                fixed.ok,
                fixed.errors,
                fixed.pct(0.5),
                fixed.pct(0.99),
                fixed.pct(0.999)
            ),
        );
        fixed_peak = relay.peak_mb();
        relay.stop();
    }

    // 4. Fan-out to 3 healthy destinations: saturating, then at a fixed rate.
    let (mut fan_peak, mut iso_peak) = (0.0, 0.0);
    let mut fan_rate = 0.0;
    if s.wants("4") || s.wants("5") {
        let (fan, peak) = fan_out(&s, &fresh_dir(), false, epoch).await?;
        fan_rate = fan.healthy_rate;
        fan_peak = peak;
    }
    if s.wants("4b") {
        fan_out_fixed(&s, &fresh_dir(), 6000, epoch).await?;
    }
    // 5. Isolation: one of the three black-holed.
    if s.wants("5") {
        let (iso, peak) = fan_out(&s, &fresh_dir(), true, epoch).await?;
        iso_peak = peak;
        row(
            "5. isolation (1 of 3 black-holed)",
            &format!(
                "healthy deliveries {:.0}/s = {:.0} % of run 4 (ingest {:.0} msg/s)",
                iso.healthy_rate,
                100.0 * iso.healthy_rate / fan_rate.max(1.0),
                iso.ingest_rate
            ),
        );
    }

    if s.wants("6") {
        // 6. Memory.
        row(
            "6. memory (relay RSS)",
            &format!("idle {idle:.1} MB; peak: ingest {ingest_peak:.1}, fixed-rate {fixed_peak:.1}, fan-out {fan_peak:.1}, isolation {iso_peak:.1} MB"),
        );
    }

    // 7. Backlog and recovery.
    if s.wants("7") {
        backlog(&s, &fresh_dir(), epoch).await?;
    }

    // 8. Many large bodies at once.
    if s.wants("8") {
        large_bodies(&s, &fresh_dir(), epoch).await?;
    }
    println!("done in {:.0} s", epoch.elapsed().as_secs_f64());
    Ok(())
}

struct FanOut {
    ingest_rate: f64,
    healthy_rate: f64,
}

async fn fan_out(s: &Settings, dir: &Path, black_hole: bool, epoch: Instant) -> AnyResult<(FanOut, f64)> {
    let a = Receiver::start(Mode::Ok, epoch).await?;
    let b = Receiver::start(Mode::Ok, epoch).await?;
    let c = Receiver::start(if black_hole { Mode::BlackHole } else { Mode::Ok }, epoch).await?;
    let extra = "concurrency = 32";
    let c_extra = if black_hole { "concurrency = 32\ntimeout = \"5s\"" } else { extra };
    let relay = Relay::start(dir, &[("a", a.url(), extra), ("b", b.url(), extra), ("c", c.url(), c_extra)]).await?;
    let load = closed_loop(relay.ingress, "/in", s.connections, s.run, u64::MAX, epoch).await;
    let delivered_during = a.count.load(Ordering::Relaxed) + b.count.load(Ordering::Relaxed);
    let depth_a = relay.metric("switchboard_queue_depth{destination=\"a\"}").await;
    // Let the healthy destinations catch up (bounded), to see the backlog drain.
    let catch_up = wait_until(Duration::from_secs(60), || {
        a.count.load(Ordering::Relaxed) >= load.ok && b.count.load(Ordering::Relaxed) >= load.ok
    })
    .await;
    let secs = load.elapsed.as_secs_f64();
    let mut lags: Vec<u32> = a.lags_us.lock().map(|v| v.clone()).unwrap_or_default();
    lags.extend(b.lags_us.lock().map(|v| v.clone()).unwrap_or_default());
    if !black_hole {
        lags.extend(c.lags_us.lock().map(|v| v.clone()).unwrap_or_default());
    }
    let all_delivered = delivered_during + if black_hole { 0 } else { c.count.load(Ordering::Relaxed) };
    let result = FanOut { ingest_rate: load.rps(), healthy_rate: delivered_during as f64 / secs };
    if !black_hole {
        row(
            "4. fan-out x3",
            &format!(
                "ingest {:.0} msg/s, deliveries {:.0}/s during the run, queue depth (a) at end {:.0}, caught up {}, lag p50 {:.1} ms, p99 {:.1} ms",
                load.rps(),
                all_delivered as f64 / secs,
                depth_a,
                catch_up.map(|d| format!("{:.1} s after", d.as_secs_f64())).unwrap_or_else(|| "not within 60 s".into()),
                percentile(&mut lags.clone(), 0.5),
                percentile(&mut lags, 0.99)
            ),
        );
    }
    let peak = relay.peak_mb();
    relay.stop();
    Ok((result, peak))
}

/// Fan-out ×3 with ingest held at `rate` msg/s (open loop): do deliveries
/// keep up, and with what lag?
async fn fan_out_fixed(s: &Settings, dir: &Path, rate: u64, epoch: Instant) -> AnyResult<()> {
    let rs = [
        Receiver::start(Mode::Ok, epoch).await?,
        Receiver::start(Mode::Ok, epoch).await?,
        Receiver::start(Mode::Ok, epoch).await?,
    ];
    let extra = "concurrency = 32";
    let relay =
        Relay::start(dir, &[("a", rs[0].url(), extra), ("b", rs[1].url(), extra), ("c", rs[2].url(), extra)]).await?;
    let cpu0 = relay.cpu_secs();
    let load = open_loop(relay.ingress, "/in", rate, s.run, epoch).await;
    let secs = load.elapsed.as_secs_f64();
    let cpu = (relay.cpu_secs() - cpu0) / secs;
    let delivered: u64 = rs.iter().map(|r| r.count.load(Ordering::Relaxed)).sum();
    let depth = relay.metric("switchboard_queue_depth{destination=\"a\"}").await;
    let caught =
        wait_until(Duration::from_secs(60), || rs.iter().all(|r| r.count.load(Ordering::Relaxed) >= load.ok)).await;
    let mut lags: Vec<u32> = Vec::new();
    for r in &rs {
        lags.extend(r.lags_us.lock().map(|v| v.clone()).unwrap_or_default());
    }
    row(
        &format!("4b. fan-out x3 at {rate} msg/s (open)"),
        &format!(
            "ingest {:.0} msg/s ({} failed), deliveries {:.0}/s, queue depth (a) at end {:.0}, caught up {}, lag p50 {:.1} ms, p99 {:.1} ms, ack p99 {:.2} ms, relay CPU {:.0} % of one core",
            load.ok as f64 / secs,
            load.errors,
            delivered as f64 / secs,
            depth,
            caught.map(|d| format!("{:.2} s after", d.as_secs_f64())).unwrap_or_else(|| "not within 60 s".into()),
            percentile(&mut lags.clone(), 0.5),
            percentile(&mut lags, 0.99),
            load.pct(0.99),
            cpu * 100.0
        ),
    );
    relay.stop();
    Ok(())
}

async fn backlog(s: &Settings, dir: &Path, epoch: Instant) -> AnyResult<()> {
    // Fill: the destination is paused, so everything stays pending.
    let relay = Relay::start(dir, &[("down", "http://127.0.0.1:1/".into(), "paused = true")]).await?;
    let fill = closed_loop(relay.ingress, "/in", s.connections, Duration::from_secs(600), s.backlog, epoch).await;
    relay.stop();
    // Restart with the destination up.
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let url = format!("http://{}/cb", listener.local_addr()?);
    let receiver = Receiver::on(listener, Mode::Ok, epoch)?;
    let started = Instant::now();
    let relay = Relay::start(dir, &[("down", url, "concurrency = 32")]).await?;
    let up = started.elapsed();
    let first = wait_until(Duration::from_secs(120), || receiver.count.load(Ordering::Relaxed) > 0).await;
    let rss_backlog = relay.rss_mb();
    let drain_start = Instant::now();
    let drained = wait_until(Duration::from_secs(600), || receiver.count.load(Ordering::Relaxed) >= fill.ok).await;
    let drain_rate = receiver.count.load(Ordering::Relaxed) as f64 / drain_start.elapsed().as_secs_f64();
    row(
        "7. backlog and recovery",
        &format!(
            "{} pending; restart: listening after {:.2} s, first delivery {} after start; RSS with backlog {:.1} MB (peak {:.1}); drain {:.0} msg/s{}",
            fill.ok,
            up.as_secs_f64(),
            first.map(|d| format!("{:.2} s", (d + up).as_secs_f64())).unwrap_or_else(|| "never".into()),
            rss_backlog,
            relay.peak_mb(),
            drain_rate,
            if drained.is_some() { "" } else { " (not drained within 600 s)" }
        ),
    );
    relay.stop();
    Ok(())
}

/// Run 8: `n` concurrent POSTs of 1 MiB each (500 in full mode), every one
/// on its own connection, against the defaults (`max_body` 1 MiB,
/// `max_buffered_bytes` 64 MiB). Reports the relay's peak RSS and checks
/// that every acknowledged body reached the destination whole.
async fn large_bodies(s: &Settings, dir: &Path, epoch: Instant) -> AnyResult<()> {
    let n = if s.quick { 50 } else { 500 };
    let receiver = Receiver::start(Mode::Ok, epoch).await?;
    let relay = Relay::start(dir, &[("a", receiver.url(), "")]).await?;
    let idle = relay.peak_mb();
    let started = Instant::now();
    let mut posts = tokio::task::JoinSet::new();
    for i in 0..n {
        let addr = relay.ingress;
        posts.spawn(async move {
            let mut c = connect(addr).await?;
            send(&mut c, addr, "/in", large_body(i)).await
        });
    }
    let (mut acked, mut refused) = (0u64, 0u64);
    while let Some(done) = posts.join_next().await {
        match done {
            Ok(Ok(true)) => acked += 1,
            _ => refused += 1,
        }
    }
    let took = started.elapsed();
    let delivered = wait_until(Duration::from_secs(120), || receiver.intact.load(Ordering::Relaxed) >= acked).await;
    row(
        &format!("8. {n} concurrent 1 MiB POSTs"),
        &format!(
            "{acked} acknowledged, {refused} refused, in {:.1} s; relay peak RSS {:.1} MB (idle {idle:.1}); {} of the acknowledged delivered intact{}",
            took.as_secs_f64(),
            relay.peak_mb(),
            receiver.intact.load(Ordering::Relaxed),
            if delivered.is_some() { "" } else { " (not all within 120 s)" }
        ),
    );
    relay.stop();
    Ok(())
}
