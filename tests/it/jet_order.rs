//! Ordering per key on JetStream (`store/jetstream/lanes.rs`): one key's
//! callbacks reach the destination in the order they were acknowledged,
//! whichever relay took them and whichever delivers them; a key that keeps
//! failing holds only its partition; a relay killed with a key's head in
//! flight hands that head to another relay before anything after it.

use std::collections::{BTreeMap, HashSet};
use std::sync::{Arc, Mutex};

use sha2::{Digest, Sha256};

use crate::jetstream::jet_config;
use crate::nats::*;
use crate::order::{callback, fails_first, key_seq, ORDERED};
use crate::support::*;

const PARTITIONS: u64 = 8;

/// The partition the relay puts `key` in: the first 8 bytes of its
/// SHA-256, big-endian, modulo the partitions (`ingress/order.rs`).
fn partition(key: &str) -> u64 {
    let d = Sha256::digest(key.as_bytes());
    let mut first = [0u8; 8];
    first.copy_from_slice(&d[..8]);
    u64::from_be_bytes(first) % PARTITIONS
}

fn ordered_config(servers: &[String], url: &str) -> String {
    jet_config(servers, "ord", 1, &[("ordered", url, ORDERED)])
        .replace("replicas = 1\n", &format!("replicas = 1\norder_partitions = {PARTITIONS}\n"))
}

/// A receiver that refuses (503) until `up` is set, then takes every
/// request and records its message id in `taken`.
pub(crate) async fn gated_receiver() -> (TestReceiver, Arc<std::sync::atomic::AtomicBool>, Arc<Mutex<HashSet<String>>>)
{
    let up = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let taken: Arc<Mutex<HashSet<String>>> = Arc::default();
    let (flag, t) = (up.clone(), taken.clone());
    let r = TestReceiver::scripted(move |_, got| {
        if !flag.load(std::sync::atomic::Ordering::SeqCst) {
            return Reply::Status(503);
        }
        t.lock().expect("lock").extend(got.header("x-switchboard-id"));
        Reply::Status(200)
    })
    .await;
    (r, up, taken)
}

/// Two relays on one stream; each key's callbacks posted one after the
/// other, alternating between the relays; 30 % of first attempts refused
/// and a key refused throughout posted first. Every key outside that
/// key's partition arrives complete and in order; the keys of its
/// partition wait behind its head (nothing of theirs is delivered), and
/// only the head of the refused key is ever attempted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jetstream_orders_each_key_across_relays_and_a_refused_key_holds_only_its_partition() {
    let dir = tempfile::tempdir().expect("tempdir");
    let nats = NatsNode::single(dir.path());
    let delivered: Arc<Mutex<Vec<(String, usize)>>> = Arc::default();
    let d = delivered.clone();
    let r = TestReceiver::scripted(move |_, got| {
        let Some((key, seq)) = key_seq(&got.body) else { return Reply::Status(400) };
        let first = got.header("x-switchboard-attempt").as_deref() == Some("1");
        if key == "stuck" || (first && fails_first(&key, seq)) {
            return Reply::Status(503);
        }
        d.lock().expect("lock").push((key, seq));
        Reply::Status(200)
    })
    .await;
    let toml = ordered_config(&[nats.url()], &r.url("/o"));
    let relays = [TestRelay::start(&toml).await, TestRelay::start(&toml).await];
    for relay in &relays {
        eventually!(WAIT, "the relay ready", {
            match get(&relay.admin_url("/readyz")).await.0 {
                200 => Ok(()),
                s => Err(format!("readyz {s}")),
            }
        });
    }
    let (s, _, b) = post(&relays[0].url("/in"), "application/json", callback("stuck", 0)).await;
    assert_eq!(s, 200, "{}", String::from_utf8_lossy(&b));
    assert_eq!(post(&relays[1].url("/in"), "application/json", callback("stuck", 1)).await.0, 200);
    let keys: Vec<String> = (0..24).map(|k| format!("dev-{k:02}")).collect();
    let per_key = 10;
    let mut posters = tokio::task::JoinSet::new();
    for (i, k) in keys.iter().enumerate() {
        let urls = [relays[0].url("/in"), relays[1].url("/in")];
        let k = k.clone();
        posters.spawn(async move {
            for seq in 0..per_key {
                let (s, _, _) = post(&urls[(i + seq) % 2], "application/json", callback(&k, seq)).await;
                assert_eq!(s, 200);
            }
        });
    }
    while let Some(done) = posters.join_next().await {
        done.expect("poster");
    }
    let blocked: Vec<&String> = keys.iter().filter(|k| partition(k) == partition("stuck")).collect();
    let free = keys.len() - blocked.len();
    assert!(free > 0, "some keys are outside the stuck key's partition");
    r.wait_until(WAIT, "every key outside the stuck partition", |_| {
        delivered.lock().expect("lock").len() >= free * per_key
    })
    .await;
    let mut got: BTreeMap<String, Vec<usize>> = BTreeMap::new();
    for (k, s) in delivered.lock().expect("lock").iter() {
        got.entry(k.clone()).or_default().push(*s);
    }
    for k in keys.iter().filter(|k| !blocked.contains(k)) {
        assert_eq!(got.get(k), Some(&(0..per_key).collect::<Vec<_>>()), "key {k} out of order: {got:?}");
    }
    for k in &blocked {
        assert_eq!(got.get(*k), None, "key {k} shares the stuck key's partition: it waits");
    }
    let stuck: Vec<usize> =
        r.received().iter().filter_map(|g| key_seq(&g.body)).filter(|(k, _)| k == "stuck").map(|(_, s)| s).collect();
    assert!(stuck.len() >= 2, "the stuck head was retried: {stuck:?}");
    assert!(stuck.iter().all(|s| *s == 0), "only the stuck key's head was attempted: {stuck:?}");
    println!(
        "JetStream ordering, 2 relays, {PARTITIONS} partitions: {free} keys x {per_key} in order, {} keys held behind a refused head",
        blocked.len()
    );
    for relay in relays {
        relay.stop().await.expect("stop");
    }
}

/// The relay holding a key's head is killed (-9) while the head's attempt
/// is in flight; the key's later callbacks, taken by the other relay,
/// wait: the server hands the head to the surviving relay after
/// `ack_wait` (3 s) and the key arrives complete and in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_killed_with_a_head_in_flight_hands_it_over_before_the_rest() {
    let dir = tempfile::tempdir().expect("tempdir");
    let nats = NatsNode::single(dir.path());
    let r = TestReceiver::scripted(|_, got| match key_seq(&got.body) {
        Some((_, 0)) if got.header("x-switchboard-attempt").as_deref() == Some("1") => Reply::Hang,
        Some(_) => Reply::Status(200),
        None => Reply::Status(400),
    })
    .await;
    let path = crate::binary::write(dir.path(), &ordered_config(&[nats.url()], &r.url("/o")));
    let mut first = crate::binary::RelayProcess::start(&path).await;
    let url = |relay: &crate::binary::RelayProcess| format!("http://{}/in", relay.ingress);
    assert_eq!(post(&url(&first), "application/json", callback("k", 0)).await.0, 200);
    r.wait_for(1, WAIT).await;
    let second = crate::binary::RelayProcess::start(&path).await;
    for seq in 1..5 {
        assert_eq!(post(&url(&second), "application/json", callback("k", seq)).await.0, 200);
    }
    first.kill9();
    let got = r.wait_until(WAIT, "the head again and the four after it", |g| g.len() >= 6).await;
    let order: Vec<usize> = got.iter().filter_map(|g| key_seq(&g.body)).map(|(_, s)| s).collect();
    assert_eq!(order, vec![0, 0, 1, 2, 3, 4], "the head (hung, then handed over) before the rest");
    assert_eq!(got[1].header("x-switchboard-attempt").as_deref(), Some("2"), "the server's second delivery");
    drop(second);
}

/// A dead-lettered head releases the rest of its key; replayed, it goes
/// back to its partition (after what came meanwhile) and is delivered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_lettered_head_releases_its_key_and_its_replay_is_delivered() {
    let dir = tempfile::tempdir().expect("tempdir");
    let nats = NatsNode::single(dir.path());
    let accept_bad = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flag = accept_bad.clone();
    let r = TestReceiver::scripted(move |_, got| {
        let bad = String::from_utf8_lossy(&got.body).contains("\"seq\":0");
        Reply::Status(if bad && !flag.load(std::sync::atomic::Ordering::SeqCst) { 400 } else { 200 })
    })
    .await;
    let relay = TestRelay::start(&ordered_config(&[nats.url()], &r.url("/o"))).await;
    for seq in 0..4 {
        assert_eq!(post(&relay.url("/in"), "application/json", callback("k", seq)).await.0, 200);
    }
    let got = r.wait_until(WAIT, "the refused head and the three after it", |g| g.len() >= 4).await;
    let order: Vec<usize> = got.iter().filter_map(|g| key_seq(&g.body)).map(|(_, s)| s).collect();
    assert_eq!(order, vec![0, 1, 2, 3], "the dead-lettered head, then the rest");
    accept_bad.store(true, std::sync::atomic::Ordering::SeqCst);
    let (s, _, b) = request("POST", &relay.admin_url("/api/dead-letters/ordered/replay"), &[], "").await;
    assert_eq!(s, 200, "{}", String::from_utf8_lossy(&b));
    let got = r.wait_until(WAIT, "the replayed head", |g| g.len() >= 5).await;
    assert_eq!(key_seq(&got[4].body).map(|(_, s)| s), Some(0));
    relay.stop().await.expect("stop");
}

/// `ordering` changed between restarts with callbacks queued (the
/// destination refusing): none, then per_key, then fifo, then none again.
/// Each change makes the new consumers from the old ones' ack floor and
/// deletes the old ones; every callback is delivered once the destination
/// takes them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn changing_ordering_with_callbacks_queued_loses_none() {
    let dir = tempfile::tempdir().expect("tempdir");
    let nats = NatsNode::single(dir.path());
    let (r, up, taken) = gated_receiver().await;
    let retry = "retry = { initial = \"10ms\", max_interval = \"50ms\", max_attempts = 100000 }";
    let settings = [
        String::new(),
        "ordering = \"per_key\"\norder_key = \"deviceIds.0.id\"".to_string(),
        "ordering = \"fifo\"".to_string(),
        String::new(),
    ];
    let mut posted = 0;
    for (round, ordering) in settings.iter().enumerate() {
        let toml = jet_config(&[nats.url()], "chg", 1, &[("d", &r.url("/d"), &format!("{ordering}\n{retry}"))])
            .replace("replicas = 1\n", "replicas = 1\norder_partitions = 4\n");
        let relay = TestRelay::start(&toml).await;
        if round + 1 == settings.len() {
            up.store(true, std::sync::atomic::Ordering::SeqCst);
            let want = posted;
            let got = r.wait_until(WAIT, "every queued callback", |_| taken.lock().expect("lock").len() >= want).await;
            println!(
                "{want} callbacks queued across three changes of ordering: all delivered ({} requests)",
                got.len()
            );
            relay.stop().await.expect("stop");
            break;
        }
        for seq in 0..10 {
            let body = callback(&format!("k{}", seq % 3), round * 10 + seq);
            assert_eq!(post(&relay.url("/in"), "application/json", body).await.0, 200);
            posted += 1;
        }
        // Attempts go on under the new consumers (under fifo, the oldest
        // callback first: this round's wait behind it).
        let before = r.count();
        r.wait_until(WAIT, &format!("attempts in round {round}"), |g| g.len() > before + 5).await;
        relay.stop().await.expect("stop");
    }
}
