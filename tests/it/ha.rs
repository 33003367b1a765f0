//! No single point of failure: two relay binaries share one JetStream
//! stream under load, with a flaky destination, while relays are killed
//! (kill -9) and restarted one by one, NATS nodes are killed (the stream
//! leader among them) and come back, and NATS is stopped for 10 s. In every
//! case every acknowledged callback reaches every destination; duplicates
//! are counted; a third destination orders per key (each sender's
//! callbacks one key) and gets each sender's acknowledged callbacks in
//! order. Delivered callbacks are kept (`retain_delivered`) and, on R3,
//! inspection says delivered at every destination for a sample of the
//! acknowledged callbacks at the end: the history agrees with what the
//! destinations got. `SWITCHBOARD_HA_CYCLES`
//! (default 3) sets the relay kills.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use tokio::sync::watch;

use crate::binary::{write, RelayProcess};
use crate::jetstream::jet_config;
use crate::nats::*;
use crate::promises::{accepted, flaky_receiver, out_of_order, try_wait_accepted, Load, HA_PARTITIONS};
use crate::support::*;

pub(crate) const FAST: &str = "concurrency = 8\nretry = { initial = \"10ms\", max_interval = \"200ms\" }";

/// Two relays, their receivers and the load.
pub(crate) struct Ha {
    pub(crate) relays: Vec<Option<RelayProcess>>,
    path: PathBuf,
    addrs: watch::Sender<Vec<SocketAddr>>,
    pub(crate) load: Load,
    pub(crate) healthy: TestReceiver,
    pub(crate) flaky: TestReceiver,
    /// Ordered per key (`key`: one per sender), healthy.
    pub(crate) ordered: TestReceiver,
    started: Instant,
    servers: Vec<String>,
    /// The history checked at the end (`history_agrees`).
    history: bool,
    _dir: tempfile::TempDir,
}

impl Ha {
    pub(crate) async fn start(servers: &[String], replicas: usize) -> Ha {
        Self::start_paced(servers, replicas, Duration::ZERO).await
    }

    /// Like [`Ha::start`] with each of the 8 senders pausing `pause`
    /// after each request.
    pub(crate) async fn start_paced(servers: &[String], replicas: usize, pause: Duration) -> Ha {
        let healthy = TestReceiver::ok().await;
        let flaky = flaky_receiver().await;
        let ordered = TestReceiver::ok().await;
        let dir = tempfile::tempdir().expect("tempdir");
        let by_key = format!("{FAST}\nordering = \"per_key\"\norder_key = \"key\"");
        let toml = jet_config(
            servers,
            "ha",
            replicas,
            &[
                ("healthy", &healthy.url("/h"), FAST),
                ("flaky", &flaky.url("/f"), FAST),
                ("ordered", &ordered.url("/o"), &by_key),
            ],
        );
        // Delivered callbacks kept (the kept stream's copies in play under
        // every fault); their history checked at the end on R3 only: the
        // R1 test kills relays, and a relay killed between an ack and its
        // history write leaves that delivery's history behind for good
        // (docs/jetstream.md).
        let history = replicas == 3;
        let store = format!("[store]\norder_partitions = {HA_PARTITIONS}\n");
        let toml = toml.replace("[store]\n", &store);
        let toml = toml.replace("[store]\n", "[store]\nretain_delivered = \"1h\"\n");
        let path = write(dir.path(), &toml);
        let mut relays = Vec::new();
        for _ in 0..2 {
            relays.push(Some(RelayProcess::start(&path).await));
        }
        let (addrs, rx) = watch::channel(Vec::new());
        let ha = Ha {
            relays,
            path,
            addrs,
            load: Load::start_paced(8, 100_000, rx, pause),
            healthy,
            flaky,
            ordered,
            started: Instant::now(),
            servers: servers.to_vec(),
            history,
            _dir: dir,
        };
        ha.publish();
        ha
    }

    /// Tells the senders which relays are up.
    pub(crate) fn publish(&self) {
        self.addrs.send_replace(self.relays.iter().flatten().map(|r| r.ingress).collect());
    }

    /// Waits for `n` more acknowledged callbacks.
    /// (A stall fails the test with the relays' warnings and errors.)
    pub(crate) async fn more(&self, n: usize) {
        if let Err(e) = self.load.try_wait_acked(self.load.acked_count() + n).await {
            for r in self.relays.iter().flatten() {
                for l in r.logs().lines().filter(|l| !l.contains("\"INFO\"") && !l.contains("\"DEBUG\"")) {
                    println!("relay {}: {l}", r.ingress);
                }
            }
            println!("{}", jet_state(&self.servers, "ha").await);
            panic!("{e}");
        }
    }

    pub(crate) fn kill9(&mut self, i: usize) {
        if let Some(mut r) = self.relays[i].take() {
            r.kill9();
        }
        self.publish();
    }

    pub(crate) async fn restart(&mut self, i: usize) {
        self.relays[i] = Some(RelayProcess::start(&self.path).await);
        self.publish();
    }

    /// SIGTERM (a rolling restart's stop), waiting for the exit.
    pub(crate) async fn stop(&mut self, i: usize) {
        if let Some(mut r) = self.relays[i].take() {
            self.addrs.send_replace(self.relays.iter().flatten().map(|r| r.ingress).collect());
            r.signal(nix::sys::signal::Signal::SIGTERM);
            let status = r.wait_exit(WAIT).await;
            assert!(status.success(), "relay exited with {status}");
        }
    }

    /// After a scenario and its healing, with the load still running:
    /// waits until both destinations have every callback acknowledged so
    /// far, prints the scenario's figures (acknowledged, refused, lost,
    /// duplicates since the previous checkpoint) and fails on any loss.
    pub(crate) async fn checkpoint(&self, what: &str, tally: &mut Tally) {
        let acked = self.load.acked();
        let refused = self.load.refused_count();
        let mut lost = 0;
        let mut dups = [0usize; 3];
        for (k, (name, r)) in self.destinations().into_iter().enumerate() {
            let got =
                self.all_arrive(name, r, &acked, &format!("{what}: {name} has every acknowledged callback")).await;
            let s = accepted(name, &got);
            lost += acked.iter().filter(|q| !s.contains_key(q)).count();
            dups[k] = s.values().map(|c| c - 1).sum();
            if name == "ordered" {
                let bad = out_of_order(&got, &acked);
                assert!(bad.is_empty(), "{what}: out of order (sender, delivered before, after): {bad:?}");
            }
        }
        println!(
            "{what}: acked={} refused={} lost={lost} duplicates healthy={} flaky={} ordered={} (in order) (totals: acked={} refused={refused}) at {:.1}s",
            acked.len() - tally.acked,
            refused - tally.refused,
            dups[0] - tally.duplicates[0],
            dups[1] - tally.duplicates[1],
            dups[2] - tally.duplicates[2],
            acked.len(),
            self.started.elapsed().as_secs_f64()
        );
        assert_eq!(lost, 0, "{what}: acknowledged callbacks lost");
        *tally = Tally { acked: acked.len(), refused, duplicates: dups };
    }

    /// Stops the load, waits for every acknowledged callback at both
    /// destinations, prints the figures and fails on any loss.
    /// `events`: disruptions (relay kills and restarts, NATS failures);
    /// each can repeat at most what the relays held (twice a destination's
    /// concurrency of 8, per relay) at the healthy destination.
    pub(crate) async fn finish(mut self, what: &str, cycles: usize, events: usize) {
        let (acked, refused) = self.load.finish().await;
        if std::env::var_os("SWITCHBOARD_HA_LOGS").is_some() {
            for r in self.relays.iter().flatten() {
                for l in r.logs().lines().filter(|l| !l.contains("\"INFO\"") && !l.contains("\"DEBUG\"")) {
                    println!("relay {}: {l}", r.ingress);
                }
            }
        }
        let (mut lost, mut duplicates, mut per) = (0, 0, Vec::new());
        for (name, r) in self.destinations() {
            let got = self.all_arrive(name, r, &acked, &format!("{name} has every acknowledged callback")).await;
            let s = accepted(name, &got);
            lost += acked.iter().filter(|q| !s.contains_key(q)).count();
            let dups: usize = s.values().map(|c| c - 1).sum();
            if name == "healthy" {
                let bound = events * 2 * 16;
                assert!(dups <= bound, "{dups} duplicates at the healthy destination, more than held ({bound})");
            }
            if name == "ordered" {
                let bad = out_of_order(&got, &acked);
                assert!(bad.is_empty(), "{what}: out of order (sender, delivered before, after): {bad:?}");
            }
            duplicates += dups;
            per.push(format!("{name}={dups}"));
        }
        println!(
            "{what}: cycles={cycles} acked={} refused={refused} lost={lost} duplicates={duplicates} ({}) elapsed={:.1}s",
            acked.len(),
            per.join(" "),
            self.started.elapsed().as_secs_f64()
        );
        assert_eq!(lost, 0);
        assert!(acked.len() >= cycles * 100, "only {} acknowledged", acked.len());
        if self.history {
            history_agrees(&self, what, &acked).await;
        }
        drop(self.relays);
    }
}

impl Ha {
    /// Waits up to 120 s for every callback of `acked` at `r`; on failure
    /// prints what is missing, what NATS says about the stream and its
    /// consumers, and the relays' warnings, then fails.
    async fn all_arrive(&self, name: &str, r: &TestReceiver, acked: &HashSet<u64>, what: &str) -> Vec<Received> {
        let waited = try_wait_accepted(r, name, Duration::from_secs(120), what, acked).await;
        match waited {
            Ok(()) => r.received(),
            Err(e) => {
                let s = accepted(name, &r.received());
                let mut missing: Vec<u64> = acked.iter().filter(|q| !s.contains_key(q)).copied().collect();
                missing.sort_unstable();
                println!("{name}: {} missing, first {:?}", missing.len(), &missing[..missing.len().min(20)]);
                println!("{}", crate::nats::jet_state(&self.servers, "ha").await);
                explain_missing(&self.relays, self.destinations(), &missing[..missing.len().min(5)]).await;
                for r in self.relays.iter().flatten() {
                    for l in r.logs().lines().filter(|l| !l.contains("\"INFO\"") && !l.contains("\"DEBUG\"")) {
                        println!("relay {}: {l}", r.ingress);
                    }
                }
                panic!("{e}");
            }
        }
    }

    /// The destinations and their receivers, by name.
    fn destinations(&self) -> [(&'static str, &TestReceiver); 3] {
        [("healthy", &self.healthy), ("flaky", &self.flaky), ("ordered", &self.ordered)]
    }
}

/// For a failure's message: where else each of `missing` arrived, with
/// which id, and what inspection on a relay says of it.
async fn explain_missing(relays: &[Option<RelayProcess>], all: [(&str, &TestReceiver); 3], missing: &[u64]) {
    let relay = relays.iter().flatten().next();
    for seq in missing {
        let mut id = None;
        for (name, r) in all {
            let hits: Vec<String> = r
                .received()
                .iter()
                .filter(|g| crate::promises::seqs(std::slice::from_ref(*g)).contains_key(seq))
                .map(|g| g.header("x-switchboard-id").unwrap_or_default())
                .collect();
            println!("  {seq} at {name}: {} requests, ids {hits:?}", hits.len());
            id = id.or(hits.into_iter().next());
        }
        if let (Some(id), Some(relay)) = (id, relay) {
            let (status, _, body) = get(&relay.admin_url(&format!("/api/messages/{id}"))).await;
            println!("  {seq}: GET /api/messages/{id}: {status} {}", String::from_utf8_lossy(&body));
        }
    }
}

/// History and inspection agree with what the destinations received:
/// for a sample of the acknowledged callbacks (every 23rd, at most 500),
/// `GET /api/messages/{id}` on a relay says delivered at each of the three
/// destinations (kept by `retain_delivered`). The history is written
/// after each settle, and a write that failed is tried again later, so it
/// may lag: waited for, a minute at most.
async fn history_agrees(ha: &Ha, what: &str, acked: &HashSet<u64>) {
    let Some(relay) = ha.relays.iter().flatten().next() else { return };
    let ids: std::collections::HashMap<u64, String> = ha
        .healthy
        .received()
        .iter()
        .filter_map(|r| {
            Some((*crate::promises::seqs(std::slice::from_ref(r)).keys().next()?, r.header("x-switchboard-id")?))
        })
        .collect();
    let mut sample: Vec<u64> = acked.iter().copied().collect();
    sample.sort_unstable();
    let sample: Vec<u64> = sample.into_iter().step_by(23).take(500).collect();
    for seq in &sample {
        let id = ids.get(seq).unwrap_or_else(|| panic!("{what}: callback {seq} has no id at the healthy destination"));
        let url = relay.admin_url(&format!("/api/messages/{id}"));
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        loop {
            let (status, _, body) = get(&url).await;
            if status == 200 && delivered_everywhere(&body) {
                break;
            }
            if tokio::time::Instant::now() >= deadline {
                history_disagrees(ha, what, *seq, id).await;
            }
            tokio::time::sleep(crate::support::POLL).await;
        }
    }
    println!("{what}: history and inspection agree for {} sampled callbacks", sample.len());
}

/// Whether an inspection (`GET /api/messages/{id}`) says delivered at the
/// three destinations.
fn delivered_everywhere(body: &[u8]) -> bool {
    let v: serde_json::Value = serde_json::from_slice(body).unwrap_or_default();
    let delivered = |name: &str| {
        v["destinations"].as_array().is_some_and(|a| a.iter().any(|d| d["name"] == name && d["state"] == "delivered"))
    };
    ["flaky", "healthy", "ordered"].into_iter().all(delivered)
}

/// Fails [`history_agrees`] for callback `seq` (message `id`), printing
/// what each relay answers for it, where it arrived, what NATS says and
/// the relays' warnings.
async fn history_disagrees(ha: &Ha, what: &str, seq: u64, id: &str) -> ! {
    for r in ha.relays.iter().flatten() {
        let (status, _, body) = get(&r.admin_url(&format!("/api/messages/{id}"))).await;
        println!("relay {}: GET /api/messages/{id}: {status} {}", r.ingress, String::from_utf8_lossy(&body));
    }
    for (name, r) in ha.destinations() {
        let at: Vec<String> = r
            .received()
            .iter()
            .filter(|x| x.header("x-switchboard-id").as_deref() == Some(id))
            .map(|x| format!("{:?} ago", x.at.elapsed()))
            .collect();
        println!("{name} got {id}: {at:?}");
    }
    println!("{}", crate::nats::jet_state(&ha.servers, "ha").await);
    for r in ha.relays.iter().flatten() {
        for l in r.logs().lines().filter(|l| !l.contains("\"INFO\"") && !l.contains("\"DEBUG\"")) {
            println!("relay {}: {l}", r.ingress);
        }
    }
    panic!("{what}: the history of callback {seq} ({id}) does not say delivered everywhere within 60 s (above: what each relay says)");
}

/// Figures at the previous checkpoint.
#[derive(Default)]
pub(crate) struct Tally {
    pub(crate) acked: usize,
    pub(crate) refused: usize,
    pub(crate) duplicates: [usize; 3],
}

fn cycles() -> usize {
    std::env::var("SWITCHBOARD_HA_CYCLES").ok().and_then(|v| v.parse().ok()).unwrap_or(3)
}

/// (a) kill -9 one relay at a time, repeatedly; (c) a rolling restart of
/// both; (d) NATS stopped for 10 s (every callback meanwhile refused), then
/// back: one node, two relays.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_relays_on_one_stream_lose_nothing_through_kills_restarts_and_a_nats_outage() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut nats = NatsNode::single(dir.path());
    let mut ha = Ha::start(&[nats.url()], 1).await;
    let n = cycles();
    for cycle in 0..n {
        ha.more(100).await;
        ha.kill9(cycle % 2);
        ha.more(100).await;
        ha.restart(cycle % 2).await;
    }
    for i in 0..2 {
        ha.more(100).await;
        ha.stop(i).await;
        ha.more(50).await;
        ha.restart(i).await;
    }
    ha.more(100).await;
    let before = ha.load.acked_count();
    nats.kill9();
    // The outage lasts 10 s by design: a scenario's length, not a wait for
    // something to happen.
    tokio::time::sleep(Duration::from_secs(10)).await;
    let during = ha.load.acked_count() - before;
    nats.start();
    ha.more(200).await;
    // Only answers already on their way when it died (one per sender).
    assert!(during <= 8, "{during} callbacks acknowledged while NATS was down");
    ha.finish("jetstream relay kills, rolling restart, NATS down 10 s", n + 3, n + 3).await;
}

/// (b) three NATS nodes, an R3 stream: each node in turn is killed under
/// load and brought back. The stream's leader is among them: leadership
/// moves only when the leader dies, so whichever node leads at the first
/// kill is still leading when its own turn comes, unless it was killed
/// before.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_r3_stream_loses_nothing_when_nats_nodes_die() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut nodes = cluster(dir.path());
    let servers: Vec<String> = nodes.iter().map(NatsNode::url).collect();
    let ha = Ha::start(&servers, 3).await;
    for node in nodes.iter_mut() {
        ha.more(100).await;
        node.kill9();
        ha.more(100).await;
        node.start();
    }
    ha.more(100).await;
    ha.finish("jetstream R3, each of 3 nodes killed and restarted", 3, 3).await;
}
