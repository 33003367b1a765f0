//! The JetStream store against a real `nats-server`: what the local store
//! does (deliver, retry, dead letters, replay, pause) works the same, and
//! the relay refuses what it cannot keep.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use crate::nats::*;
use crate::support::*;

/// `support::config` with the store on JetStream.
pub fn jet_config(servers: &[String], stream: &str, replicas: usize, dests: &[(&str, &str, &str)]) -> String {
    config(dests).replace("[store]\npath = \"{store}\"\n", &jet_store(servers, stream, replicas))
}

/// Destinations, retries by nak with the policy's delay, dead letters
/// listed, replayed (same id) and purged, a pause seen by the admin API.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jetstream_delivers_retries_dead_letters_and_replays() {
    let dir = tempfile::tempdir().expect("tempdir");
    let nats = NatsNode::single(dir.path());
    let ok = TestReceiver::ok().await;
    let flaky = TestReceiver::scripted(|_, got| {
        Reply::Status(if got.header("x-switchboard-attempt").as_deref() == Some("1") { 503 } else { 200 })
    })
    .await;
    let accept_bad = Arc::new(AtomicBool::new(false));
    let flag = accept_bad.clone();
    let picky = TestReceiver::scripted(move |_, got| {
        let bad = String::from_utf8_lossy(&got.body).contains("bad");
        Reply::Status(if bad && !flag.load(Ordering::SeqCst) { 400 } else { 200 })
    })
    .await;
    let retry = "retry = { initial = \"50ms\", max_interval = \"200ms\" }";
    let relay = TestRelay::start(&jet_config(
        &[nats.url()],
        "sb1",
        1,
        &[("ok", &ok.url("/ok"), ""), ("flaky", &flaky.url("/f"), retry), ("picky", &picky.url("/p"), retry)],
    ))
    .await;
    let mut ids = Vec::new();
    for i in 0..5 {
        let (s, _, body) = post(&relay.url("/in"), "text/plain", format!("m{i}")).await;
        assert_eq!(s, 200);
        ids.push(acked_id(&body));
    }
    let (s, _, body) = post(&relay.url("/in"), "text/plain", "bad one").await;
    assert_eq!(s, 200);
    let bad_id = acked_id(&body);
    ok.wait_for(6, WAIT).await;
    flaky.wait_until(WAIT, "6 delivered after a failed first attempt", |g| g.len() >= 12).await;
    let got: std::collections::BTreeSet<String> =
        ok.received().iter().filter_map(|g| g.header("x-switchboard-id")).collect();
    assert!(ids.iter().all(|id| got.contains(id)), "{got:?} vs {ids:?}");
    let dead = relay
        .wait_metrics("a dead letter", |m| metric(m, "switchboard_dead_letters{destination=\"picky\"}") == 1.0)
        .await;
    assert_eq!(metric(&dead, "switchboard_queue_depth{destination=\"ok\"}"), 0.0);
    let (s, _, list) = get(&relay.admin_url("/api/dead-letters/picky")).await;
    assert_eq!(s, 200);
    let list: serde_json::Value = serde_json::from_slice(&list).expect("json");
    assert_eq!(list["dead_letters"][0]["id"].as_str(), Some(bad_id.as_str()), "{list}");
    assert_eq!(list["dead_letters"][0]["last_status"].as_u64(), Some(400), "{list}");

    accept_bad.store(true, Ordering::SeqCst);
    let (s, _, _) = request("POST", &relay.admin_url("/api/dead-letters/picky/replay"), &[], "").await;
    assert_eq!(s, 200);
    let got = picky
        .wait_until(WAIT, "the replayed dead letter", |g| {
            g.iter().filter(|r| String::from_utf8_lossy(&r.body).contains("bad")).count() >= 2
        })
        .await;
    let replayed = got.iter().rfind(|r| String::from_utf8_lossy(&r.body).contains("bad")).expect("replayed");
    assert_eq!(replayed.header("x-switchboard-id").as_deref(), Some(bad_id.as_str()), "replay keeps the id");
    relay
        .wait_metrics("no dead letter left", |m| metric(m, "switchboard_dead_letters{destination=\"picky\"}") == 0.0)
        .await;
    // Only picky got the replay.
    assert_eq!(ok.count(), 6);

    // A pause is stored in the bucket and shown.
    let (s, _, _) = request("POST", &relay.admin_url("/api/destinations/ok/pause"), &[], "").await;
    assert_eq!(s, 200);
    let (_, _, body) = get(&relay.admin_url("/api/destinations")).await;
    let v: serde_json::Value = serde_json::from_slice(&body).expect("json");
    let ok_state = v["destinations"].as_array().and_then(|a| a.iter().find(|d| d["name"] == "ok")).cloned();
    assert_eq!(ok_state.map(|d| d["state"].clone()), Some(serde_json::json!("paused")), "{v}");
    assert_eq!(post(&relay.url("/in"), "text/plain", "while paused").await.0, 200);
    let (s, _, _) = request("POST", &relay.admin_url("/api/destinations/ok/resume"), &[], "").await;
    assert_eq!(s, 200);
    ok.wait_for(7, WAIT).await;
    relay.stop().await.expect("stop");
}
