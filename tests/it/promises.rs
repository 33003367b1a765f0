//! The product's promises under failure: kill -9 under load, disk full,
//! destination outage and graceful shutdown under load.
//!
//! `SWITCHBOARD_CRASH_CYCLES` (default 4) sets the number of kill cycles.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rand::Rng;
use tokio::sync::{watch, Notify};

use crate::binary::{write, RelayProcess};
use crate::support::*;

const FAST: &str = "concurrency = 8\n[destinations.NAME.retry]\ninitial = \"10ms\"\nmax_interval = \"200ms\"";

fn fast(name: &str) -> String {
    FAST.replace("NAME", name)
}

/// Sequence numbers seen by a receiver, with their counts.
pub(crate) fn seqs(received: &[Received]) -> HashMap<u64, usize> {
    seqs_of(received.iter())
}

fn seqs_of<'a>(received: impl Iterator<Item = &'a Received>) -> HashMap<u64, usize> {
    let mut m = HashMap::new();
    for r in received {
        // The load's bodies start `{"seq":N,`: read that without a JSON
        // parse (waits re-count every request on each arrival).
        let quick = r.body.strip_prefix(b"{\"seq\":").and_then(|rest| {
            let digits = rest.iter().take_while(|b| b.is_ascii_digit()).count();
            std::str::from_utf8(&rest[..digits]).ok()?.parse::<u64>().ok()
        });
        let seq =
            quick.or_else(|| serde_json::from_slice::<serde_json::Value>(&r.body).ok().and_then(|v| v["seq"].as_u64()));
        if let Some(seq) = seq {
            *m.entry(seq).or_insert(0) += 1;
        }
    }
    m
}

/// Waits until `receiver` has every sequence number in `acked`.
async fn wait_for_seqs<'a>(
    receiver: &TestReceiver,
    within: Duration,
    what: &str,
    acked: impl IntoIterator<Item = &'a u64>,
) -> Vec<Received> {
    try_wait_accepted(receiver, "", within, what, acked).await.unwrap_or_else(|e| panic!("{e}"));
    receiver.received()
}

/// Waits until destination `name`'s receiver accepted (as [`accepted`]
/// counts) every sequence number in `acked`, looking at each request
/// once however long the wait.
pub(crate) async fn try_wait_accepted<'a>(
    receiver: &TestReceiver,
    name: &str,
    within: Duration,
    what: &str,
    acked: impl IntoIterator<Item = &'a u64>,
) -> Result<(), String> {
    let mut missing: HashSet<u64> = acked.into_iter().copied().collect();
    receiver
        .try_wait_folding(within, what, |start, tail| {
            for seq in accepted_from(name, start, tail).into_keys() {
                missing.remove(&seq);
            }
            missing.is_empty()
        })
        .await
}

/// A receiver that fails ~30 % of requests: 503s and connections dropped
/// without an answer.
pub(crate) async fn flaky_receiver() -> TestReceiver {
    TestReceiver::scripted(|n, _| match (n * 7919) % 10 {
        0 | 1 => Reply::Status(503),
        2 => Reply::Reset,
        _ => Reply::Status(200),
    })
    .await
}

/// What a destination of these tests accepted: every request but the
/// flaky receiver's refusals.
pub(crate) fn accepted(name: &str, received: &[Received]) -> HashMap<u64, usize> {
    accepted_from(name, 0, received)
}

/// [`accepted`] of requests `start..` of a receiver's list (the flaky
/// receiver's answers go by the request's index).
pub(crate) fn accepted_from(name: &str, start: usize, received: &[Received]) -> HashMap<u64, usize> {
    if name == "flaky" {
        seqs_of(received.iter().enumerate().filter(|(n, _)| ((start + n) * 7919) % 10 >= 3).map(|(_, r)| r))
    } else {
        seqs(received)
    }
}

/// The HA tests' `store.order_partitions`: 8, not the default 16, as each
/// partition of an ordered destination is a consumer, and each consumer
/// of an R3 stream a Raft group of its own that NATS elects a leader for
/// after every fault (on two cores, 16 more groups slowed the recovery
/// after a node kill past the tests' 20 s).
pub(crate) const HA_PARTITIONS: u64 = 8;

/// Each sender's ordering key (its bodies' `key`): on JetStream the keys
/// of different senders fall in different partitions of [`HA_PARTITIONS`]
/// (`lanes.rs`), so one sender's stalled head never holds another's.
fn sender_keys(senders: u64) -> Vec<String> {
    use sha2::{Digest, Sha256};
    let partition = |k: &str| {
        let d = Sha256::digest(k.as_bytes());
        let mut first = [0u8; 8];
        first.copy_from_slice(&d[..8]);
        u64::from_be_bytes(first) % HA_PARTITIONS
    };
    let mut used = std::collections::HashSet::new();
    (0..senders)
        .map(|s| {
            let key = (0..).map(|j| format!("k{s}.{j}")).find(|k| senders > HA_PARTITIONS || used.insert(partition(k)));
            key.unwrap_or_default()
        })
        .collect()
}

/// Per sender (a sender's sequence numbers are `s * 1_000_000 + i`), the
/// acknowledged callbacks' first deliveries must come in the order they
/// were acknowledged (a sender posts the next only after the answer to
/// the one before); repeats of a delivered callback are duplicates, not
/// disorder. Returns the violations (sender, a later seq delivered before
/// an earlier one).
pub(crate) fn out_of_order(received: &[Received], acked: &std::collections::HashSet<u64>) -> Vec<(u64, u64, u64)> {
    let mut seen = std::collections::HashSet::new();
    let mut last: HashMap<u64, u64> = HashMap::new();
    let mut bad = Vec::new();
    for seq in received.iter().filter_map(|r| seqs_of(std::iter::once(r)).into_keys().next()) {
        if !acked.contains(&seq) || !seen.insert(seq) {
            continue;
        }
        let sender = seq / 1_000_000;
        match last.insert(sender, seq) {
            Some(before) if before > seq => bad.push((sender, before, seq)),
            _ => {}
        }
    }
    bad
}

/// Concurrent senders posting `{"seq": N}` bodies to the relay addresses
/// that are current (sender `s` to the `s % n`th of `n`), recording which
/// sequence numbers got a 2xx.
pub(crate) struct Load {
    acked: Arc<Mutex<HashSet<u64>>>,
    refused: Arc<AtomicUsize>,
    progress: Arc<Notify>,
    stop: Arc<AtomicBool>,
    held: watch::Sender<bool>,
    tasks: tokio::task::JoinSet<()>,
}

impl Load {
    pub(crate) fn start(senders: u64, max_per_sender: u64, addr: watch::Receiver<Vec<SocketAddr>>) -> Load {
        Self::start_paced(senders, max_per_sender, addr, Duration::ZERO)
    }

    /// Like [`Load::start`], each sender waiting `pause` after each
    /// request: a bounded rate for long runs (the receivers keep every
    /// request, and each wait re-counts them all).
    pub(crate) fn start_paced(
        senders: u64,
        max_per_sender: u64,
        addr: watch::Receiver<Vec<SocketAddr>>,
        pause: Duration,
    ) -> Load {
        let acked: Arc<Mutex<HashSet<u64>>> = Arc::default();
        let refused = Arc::new(AtomicUsize::new(0));
        let progress = Arc::new(Notify::new());
        let stop = Arc::new(AtomicBool::new(false));
        let (held, held_rx) = watch::channel(false);
        let mut tasks = tokio::task::JoinSet::new();
        let keys = sender_keys(senders);
        for s in 0..senders {
            let (acked, refused, progress, stop, mut addr, mut held) =
                (acked.clone(), refused.clone(), progress.clone(), stop.clone(), addr.clone(), held_rx.clone());
            let key = keys[s as usize].clone();
            tasks.spawn(async move {
                let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
                    .build_http::<http_body_util::Full<bytes::Bytes>>();
                for i in 0..max_per_sender {
                    if stop.load(Ordering::SeqCst) {
                        return;
                    }
                    if *held.borrow_and_update() {
                        // Held (see `Load::hold`): wait for the release,
                        // looking at `stop` every 50 ms.
                        let _ = tokio::time::timeout(Duration::from_millis(50), held.wait_for(|h| !*h)).await;
                        continue;
                    }
                    let current = addr.borrow_and_update().clone();
                    let Some(&target) = current.get(s as usize % current.len().max(1)) else {
                        // No relay right now: wait for the next one, but look
                        // at `stop` every 50 ms (regression: a sender parked
                        // here forever hung `finish` once the relay was gone).
                        match tokio::time::timeout(Duration::from_millis(50), addr.changed()).await {
                            Ok(Err(_)) => return,
                            Ok(Ok(())) | Err(_) => continue,
                        }
                    };
                    let seq = s * 1_000_000 + i;
                    let body = format!("{{\"seq\":{seq},\"key\":\"{key}\",\"pad\":\"{}\"}}", "p".repeat(200));
                    let req = http::Request::post(format!("http://{target}/in"))
                        .header("content-type", "application/json")
                        .body(http_body_util::Full::new(bytes::Bytes::from(body)))
                        .expect("request");
                    let ok = match tokio::time::timeout(WAIT, client.request(req)).await {
                        Ok(Ok(resp)) => resp.status().is_success(),
                        _ => false,
                    };
                    if !pause.is_zero() {
                        tokio::time::sleep(pause).await;
                    }
                    if ok {
                        acked.lock().expect("lock").insert(seq);
                        progress.notify_waiters();
                    } else {
                        refused.fetch_add(1, Ordering::SeqCst);
                        // The relay is gone or refusing: wait for the next one
                        // (or for a short while, if it is the same relay).
                        let _ =
                            tokio::time::timeout(Duration::from_millis(50), addr.wait_for(|a| !a.contains(&target)))
                                .await;
                    }
                }
            });
        }
        Load { acked, refused, progress, stop, held, tasks }
    }

    /// Holds the senders (true) after the requests in flight, or lets
    /// them go on (false).
    pub(crate) fn hold(&self, hold: bool) {
        self.held.send_replace(hold);
    }

    pub(crate) fn acked_count(&self) -> usize {
        self.acked.lock().expect("lock").len()
    }

    /// The sequence numbers acknowledged so far (the load goes on).
    pub(crate) fn acked(&self) -> HashSet<u64> {
        self.acked.lock().expect("lock").clone()
    }

    pub(crate) fn refused_count(&self) -> usize {
        self.refused.load(Ordering::SeqCst)
    }

    pub(crate) async fn wait_acked(&self, n: usize) {
        if let Err(e) = self.try_wait_acked(n).await {
            panic!("{e}");
        }
    }

    /// Waits up to `WAIT` for `n` acknowledged callbacks.
    pub(crate) async fn try_wait_acked(&self, n: usize) -> Result<(), String> {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let notified = self.progress.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.acked_count() >= n {
                return Ok(());
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return Err(format!("load stalled at {} acked, waiting for {n}", self.acked_count()));
            }
        }
    }

    /// Stops the senders and waits for them; what was acknowledged and
    /// how many were refused.
    pub(crate) async fn finish(&mut self) -> (HashSet<u64>, usize) {
        self.stop.store(true, Ordering::SeqCst);
        while self.tasks.join_next().await.is_some() {}
        let acked = self.acked.lock().expect("lock").clone();
        (acked, self.refused.load(Ordering::SeqCst))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill9_under_load_loses_nothing_acknowledged() {
    kill9_under_load(false).await;
}

/// The same with `store.retain_delivered` on: recovery must tell a
/// delivered (retained) message from a pending one after every kill; once
/// drained nothing is pending and what was delivered is listed as such.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill9_under_load_with_retention_loses_nothing_and_leaves_nothing_pending() {
    kill9_under_load(true).await;
}

async fn kill9_under_load(retain: bool) {
    let cycles: usize = std::env::var("SWITCHBOARD_CRASH_CYCLES").ok().and_then(|v| v.parse().ok()).unwrap_or(4);
    let healthy = TestReceiver::ok().await;
    let flaky = flaky_receiver().await;
    let late_addr = dead_addr().await; // down for the first half of the run
    let dir = tempfile::tempdir().expect("tempdir");
    let toml = config(&[
        ("healthy", &healthy.url("/h"), &fast("healthy")),
        ("flaky", &flaky.url("/f"), &fast("flaky")),
        ("late", &format!("http://{late_addr}/l"), &fast("late")),
    ]);
    let toml = if retain { toml.replace("[store]\n", "[store]\nretain_delivered = \"1h\"\n") } else { toml };
    let path = write(dir.path(), &toml);

    let (addr_tx, addr_rx) = watch::channel(Vec::new());
    let mut load = Load::start(16, 100_000, addr_rx);
    let mut late = None;
    let mut rng = rand::thread_rng();
    let started = Instant::now();
    for cycle in 0..cycles {
        let mut relay = RelayProcess::start(&path).await;
        addr_tx.send_replace(vec![relay.ingress]);
        if cycle == cycles / 2 {
            let l = tokio::net::TcpListener::bind(late_addr).await.expect("rebind late destination");
            late = Some(TestReceiver::on(l, Arc::new(|_, _| Reply::Status(200))));
        }
        // Kill at a random point: after a random number of further 2xx.
        let target = load.acked_count() + rng.gen_range(50..400);
        load.wait_acked(target).await;
        relay.kill9();
        addr_tx.send_replace(Vec::new());
    }
    let relay = RelayProcess::start(&path).await;
    addr_tx.send_replace(vec![relay.ingress]);
    let target = load.acked_count() + 100;
    load.wait_acked(target).await;
    let (acked, refused) = load.finish().await;
    let late = match late {
        Some(l) => l,
        None => TestReceiver::ok_at(late_addr).await,
    };

    // Drain: every acknowledged sequence number reaches every destination.
    let drain = Duration::from_secs(120);
    let mut duplicates = 0;
    let mut per_destination = Vec::new();
    let mut lost = 0;
    for (name, r) in [("healthy", &healthy), ("flaky", &flaky), ("late", &late)] {
        try_wait_accepted(r, name, drain, &format!("{name} has all acked"), &acked)
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        let got = r.received();
        let s = accepted(name, &got);
        lost += acked.iter().filter(|q| !s.contains_key(q)).count();
        let dups = s.values().map(|c| c - 1).sum::<usize>();
        duplicates += dups;
        per_destination.push(format!("{name}={dups}"));
        if name == "healthy" {
            // A healthy destination gets a message again only after a crash:
            // at most once per kill.
            let worst = s.values().copied().max().unwrap_or(0);
            assert!(worst <= cycles + 1, "a message reached the healthy destination {worst} times in {cycles} kills");
        }
    }
    println!(
        "crash summary: retain={retain} cycles={cycles} acked={} refused={refused} lost={lost} duplicates={duplicates} ({}) elapsed={:.1}s",
        acked.len(),
        per_destination.join(" "),
        started.elapsed().as_secs_f64()
    );
    assert_eq!(lost, 0);
    assert!(acked.len() >= cycles * 50);
    if retain {
        let m = eventually!(WAIT, "nothing pending after the drain", {
            let m = String::from_utf8_lossy(&get(&relay.admin_url("/metrics")).await.2).into_owned();
            let depth: f64 = ["healthy", "flaky", "late"]
                .iter()
                .map(|d| metric(&m, &format!("switchboard_queue_depth{{destination=\"{d}\"}}")))
                .sum();
            if depth == 0.0 {
                Ok(m)
            } else {
                Err(format!("{depth} pending"))
            }
        });
        let retained = metric(&m, "switchboard_store_retained_messages");
        assert!(retained > 0.0, "delivered messages are retained");
        let (s, _, body) = get(&relay.admin_url("/api/messages?destination=late&state=delivered&limit=1000")).await;
        assert_eq!(s, 200);
        let listed = serde_json::from_slice::<serde_json::Value>(&body).expect("json")["messages"]
            .as_array()
            .map_or(0, Vec::len);
        assert!(listed > 0, "late got them: listed as delivered");
        println!("retained after the drain: {retained}, listed as delivered to late: {listed} (first page)");
    }
    drop(relay);
}

/// Mounts a size-limited tmpfs, or says why it cannot.
pub struct Tmpfs {
    dir: tempfile::TempDir,
}

impl Tmpfs {
    pub fn mount(size: &str) -> Result<Tmpfs, String> {
        let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
        let out = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir.path())
            .output()
            .map_err(|e| format!("cannot run mount: {e}"))?;
        if !out.status.success() {
            return Err(String::from_utf8_lossy(&out.stderr).trim().to_string());
        }
        Ok(Tmpfs { dir })
    }

    /// A tmpfs of `size`, or the test fails saying why: a test that cannot
    /// run must not pass. Mounting needs root (`.ci/run` runs as root).
    pub fn mount_or_fail(size: &str) -> Tmpfs {
        Tmpfs::mount(size).unwrap_or_else(|why| {
            panic!("this test needs a size-limited tmpfs and cannot mount one here ({why}); run it as root, as .ci/run does")
        })
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    pub fn free(&self) -> u64 {
        let st = nix::sys::statvfs::statvfs(self.path()).expect("statvfs");
        st.blocks_available() as u64 * st.fragment_size() as u64
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg("-l").arg(self.dir.path()).status();
    }
}

#[tokio::test]
async fn disk_full_refuses_with_503_keeps_delivering_and_recovers() {
    let fs = Tmpfs::mount_or_fail("64m");
    const MIB: u64 = 1024 * 1024;
    let down = dead_addr().await;
    let store = fs.path().join("store");
    let toml = config(&[("d", &format!("http://{down}/d"), &fast("d"))]).replace(
        "[store]\npath = \"{store}\"",
        &format!("[store]\npath = \"{}\"\nmin_free_bytes = {}", store.display(), 16 * MIB),
    );
    let relay = TestRelay::start(&toml).await;
    // Leave ~6 MiB above the 16 MiB threshold.
    assert_eq!(post(&relay.url("/in"), "application/json", "{\"seq\":0}").await.0, 200);
    let ballast = fs.path().join("ballast");
    let ballast_size = fs.free().saturating_sub(22 * MIB);
    std::fs::write(&ballast, vec![0u8; ballast_size as usize]).expect("ballast");

    let mut acked = vec![0u64];
    let mut refusal = None;
    let pad = "x".repeat(2000);
    for seq in 1..20_000u64 {
        let (status, headers, _) =
            post(&relay.url("/in"), "application/json", format!("{{\"seq\":{seq},\"p\":\"{pad}\"}}")).await;
        match status {
            200 => acked.push(seq),
            503 => {
                refusal = Some(headers);
                break;
            }
            s => panic!("unexpected {s}"),
        }
    }
    let headers = refusal.expect("the disk filled up to the threshold and ingress refused");
    assert!(headers.get("retry-after").is_some());
    // Keep the disk clearly below the threshold: the store's own files
    // shrink and grow a little as retries rewrite delivery state (sled
    // reuses and trims its log), and a few KiB above 16 MiB rightly
    // accepts again.
    let topup = fs.path().join("ballast-2");
    std::fs::write(&topup, vec![0u8; fs.free().saturating_sub(12 * MIB) as usize]).expect("top-up ballast");
    for _ in 0..20 {
        assert_eq!(
            post(&relay.url("/in"), "application/json", "{\"seq\":999999}").await.0,
            503,
            "never a 2xx while full"
        );
    }
    assert!(fs.free() > 8 * MIB, "the guard stopped well before the disk was full");
    assert_eq!(get(&relay.admin_url("/healthz")).await.0, 200, "the relay stays up");

    // It keeps delivering what it has.
    let dest = TestReceiver::ok_at(down).await;
    wait_for_seqs(&dest, WAIT, "all acked delivered while the disk is full", &acked).await;

    // Space returns: ingress accepts again by itself.
    std::fs::remove_file(&ballast).expect("remove ballast");
    std::fs::remove_file(&topup).expect("remove top-up ballast");
    eventually!(WAIT, "ingress accepting again after space returned", {
        let (status, _, _) = post(&relay.url("/in"), "application/json", "{\"seq\":424242}").await;
        assert!(status == 200 || status == 503, "{status}");
        if status == 200 {
            Ok(())
        } else {
            Err(status.to_string())
        }
    });
    dest.wait_until(WAIT, "the post-recovery message", |got| seqs(got).contains_key(&424242)).await;
    relay.stop().await.expect("clean stop");
}

#[tokio::test]
async fn outage_backlog_shows_in_metrics_and_drains_after_recovery() {
    let down = dead_addr().await;
    let toml = config(&[(
        "d",
        &format!("http://{down}/d"),
        "[destinations.d.retry]\ninitial = \"20ms\"\nmax_interval = \"100ms\"\njitter = 0.0",
    )]);
    let relay = TestRelay::start(&toml).await;
    let n = 30;
    for seq in 0..n {
        assert_eq!(post(&relay.url("/in"), "application/json", format!("{{\"seq\":{seq}}}")).await.0, 200);
    }
    // Down for several retry intervals: every message retried at least 4 times.
    let m = relay
        .wait_metrics("4 retries per message", |m| {
            metric(m, "switchboard_deliveries_total{destination=\"d\",outcome=\"retried\"}") >= (4 * n) as f64
        })
        .await;
    assert_eq!(metric(&m, "switchboard_queue_depth{destination=\"d\"}"), n as f64);
    let age_before = metric(&m, "switchboard_queue_oldest_age_seconds{destination=\"d\"}");
    assert!(age_before > 0.0, "oldest age rises during the outage");

    let recovered_at = Instant::now();
    let dest = TestReceiver::ok_at(down).await;
    dest.wait_until(WAIT, "the whole backlog", |got| seqs(got).len() == n as usize).await;
    let took = recovered_at.elapsed();
    let m = relay
        .wait_metrics("empty queue", |m| {
            metric(m, "switchboard_queue_depth{destination=\"d\"}") == 0.0
                && metric(m, "switchboard_queue_oldest_age_seconds{destination=\"d\"}") == 0.0
        })
        .await;
    assert_eq!(metric(&m, "switchboard_deliveries_total{destination=\"d\",outcome=\"delivered\"}"), n as f64);
    // Bounded by the retry cap (100 ms) plus delivery time; 10 s is a generous ceiling.
    assert!(took < Duration::from_secs(10), "backlog took {took:?} after recovery");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_under_load_finishes_in_flight_and_restart_delivers_all() {
    let down = dead_addr().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let path = write(dir.path(), &config(&[("d", &format!("http://{down}/d"), &fast("d"))]));
    let mut relay = RelayProcess::start(&path).await;
    let (addr_tx, addr_rx) = watch::channel(vec![relay.ingress]);
    let mut load = Load::start(16, 100_000, addr_rx);
    load.wait_acked(300).await;
    let signalled = Instant::now();
    relay.signal(nix::sys::signal::Signal::SIGTERM);
    let status = relay.wait_exit(Duration::from_secs(5 + 5)).await;
    assert!(status.success(), "exit {status:?}\n{}", relay.logs());
    let stopped_in = signalled.elapsed();
    assert!(stopped_in < Duration::from_secs(5 + 2), "took {stopped_in:?} (grace period 5 s)");
    addr_tx.send_replace(Vec::new());
    let (acked, refused) = load.finish().await;

    let dest = TestReceiver::ok_at(down).await;
    let _relay = RelayProcess::start(&path).await;
    wait_for_seqs(&dest, WAIT, "every acked message", &acked).await;
    println!("sigterm under load: acked={} refused={refused} stopped_in={stopped_in:?}", acked.len());
}

#[tokio::test]
async fn disk_filled_by_someone_else_turns_healthz_red_and_a_restart_recovers() {
    let fs = Tmpfs::mount_or_fail("32m");
    let down = dead_addr().await;
    let store = fs.path().join("store");
    // The guard is off (min_free_bytes = 0), as if another process filled the
    // disk faster than the guard could see.
    let toml = config(&[("d", &format!("http://{down}/d"), &fast("d"))]).replace(
        "[store]\npath = \"{store}\"",
        &format!("[store]\npath = \"{}\"\nmin_free_bytes = 0", store.display()),
    );
    let dir = Arc::new(tempfile::tempdir().expect("tempdir"));
    let relay = TestRelay::start_in(dir.clone(), &toml).await;
    let mut acked = Vec::new();
    for seq in 0..5u64 {
        assert_eq!(post(&relay.url("/in"), "application/json", format!("{{\"seq\":{seq}}}")).await.0, 200);
        acked.push(seq);
    }
    // Fill the filesystem to the last byte.
    let ballast = fs.path().join("ballast");
    {
        use std::io::Write;
        let mut f = std::fs::File::create(&ballast).expect("ballast");
        let chunk = vec![0u8; 64 * 1024];
        while f.write_all(&chunk).is_ok() {}
        let _ = f.write_all(&[0u8; 512]);
    }
    let mut saw_503 = false;
    for seq in 100..200u64 {
        let (status, _, _) =
            post(&relay.url("/in"), "application/json", format!("{{\"seq\":{seq},\"p\":\"{}\"}}", "x".repeat(4000)))
                .await;
        assert_ne!(status, 200, "a 2xx while the store cannot write");
        saw_503 |= status == 503;
        if get(&relay.admin_url("/healthz")).await.0 == 503 {
            break;
        }
    }
    assert!(saw_503);
    assert_eq!(get(&relay.admin_url("/healthz")).await.0, 503, "persistent flush failures show on /healthz");

    // What a supervisor does: restart. With space back, the store recovers.
    std::fs::remove_file(&ballast).expect("remove ballast");
    let _ = relay.stop().await; // closing cannot flush; that is expected
    let relay = TestRelay::start_in(dir, &toml).await;
    assert_eq!(get(&relay.admin_url("/healthz")).await.0, 200);
    assert_eq!(post(&relay.url("/in"), "application/json", "{\"seq\":7}").await.0, 200);
    acked.push(7);
    let dest = TestReceiver::ok_at(down).await;
    wait_for_seqs(&dest, WAIT, "every acknowledged message", &acked).await;
}
