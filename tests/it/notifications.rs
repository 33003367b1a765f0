//! Operational events (`[notifications]`), with the real binary: what an
//! ops receiver gets when a destination fails and recovers, is paused and
//! resumed, dead-letters a burst, when the store fills up and when a reload
//! is refused.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use crate::binary::{write, RelayProcess};
use crate::support::*;

/// The events an ops receiver got, in order: (type, data).
fn events(got: &[Received]) -> Vec<(String, serde_json::Value)> {
    got.iter()
        .filter_map(|r| serde_json::from_slice::<serde_json::Value>(&r.body).ok())
        .map(|v| (v["type"].as_str().unwrap_or_default().to_string(), v["data"].clone()))
        .collect()
}

fn types(got: &[Received]) -> Vec<String> {
    events(got).into_iter().map(|(t, _)| t).collect()
}

/// `config(destinations)` plus an `ops` destination (on no route) and
/// `[notifications]` with `extra`.
fn with_ops(toml: String, ops: &TestReceiver, extra: &str) -> String {
    format!(
        "{toml}[destinations.ops]\nurl = \"{}\"\n[notifications]\ndestination = \"ops\"\n{extra}\n",
        ops.url("/ops")
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_destination_is_told_once_then_its_recovery_pause_resume_and_a_refused_reload() {
    let down = Arc::new(AtomicBool::new(true));
    let flag = down.clone();
    let flaky =
        TestReceiver::scripted(move |_, _| Reply::Status(if flag.load(Ordering::SeqCst) { 503 } else { 200 })).await;
    let ops = TestReceiver::ok().await;
    let gone = TestReceiver::scripted(|_, _| Reply::Status(410)).await;
    let toml = with_ops(
        config(&[
            (
                "flaky",
                &flaky.url("/f"),
                "concurrency = 1\nbreaker = { failures = 3, cool_down = \"200ms\" }\n[destinations.flaky.retry]\ninitial = \"10ms\"\nmax_interval = \"20ms\"\njitter = 0.0",
            ),
            ("gone", &gone.url("/g"), ""),
        ]),
        &ops,
        "",
    );
    let dir = tempfile::tempdir().expect("tempdir");
    let path = write(dir.path(), &toml);
    let relay = RelayProcess::start(&path).await;
    for i in 0..5 {
        let (status, _, _) = post(&relay.url("/in"), "application/json", format!("{{\"n\":{i}}}")).await;
        assert_eq!(status, 200);
    }
    let got = ops.wait_until(WAIT, "destination.failing", |g| types(g).contains(&"destination.failing".into())).await;
    let (_, data) = events(&got).into_iter().find(|(t, _)| t == "destination.failing").expect("failing");
    assert_eq!(data["destination"], "flaky");
    assert_eq!(data["why"], "circuit breaker opened");
    assert!(data["last_error"].as_str().unwrap_or_default().contains("503"), "{data}");
    // The breaker probes and fails again meanwhile: told once.
    flaky.wait_until(WAIT, "two probes after the breaker opened", |g| g.len() >= 5).await;
    down.store(false, Ordering::SeqCst);
    let got =
        ops.wait_until(WAIT, "destination.recovered", |g| types(g).contains(&"destination.recovered".into())).await;
    let t = types(&got);
    assert_eq!(t.iter().filter(|t| *t == "destination.failing").count(), 1, "{t:?}");
    let failing = t.iter().position(|t| t == "destination.failing");
    assert!(failing < t.iter().position(|t| t == "destination.recovered"), "{t:?}");
    for r in &got {
        assert_eq!(r.header("content-type").as_deref(), Some("application/json"));
        let v: serde_json::Value = serde_json::from_slice(&r.body).expect("json");
        assert!(v["timestamp"].as_str().is_some_and(|s| s.ends_with('Z')), "{v}");
    }

    // Paused and resumed by an operator.
    for action in ["pause", "resume"] {
        let (status, _, _) =
            request("POST", &relay.admin_url(&format!("/api/destinations/flaky/{action}")), &[], "").await;
        assert_eq!(status, 200);
    }
    let got = ops.wait_until(WAIT, "paused, resumed", |g| types(g).contains(&"destination.resumed".into())).await;
    let paused: Vec<serde_json::Value> =
        events(&got).into_iter().filter(|(t, _)| t == "destination.paused").map(|(_, d)| d).collect();
    let reason = |d: &str| paused.iter().find(|p| p["destination"] == d).map(|p| p["reason"].clone());
    assert_eq!(reason("flaky"), Some("paused by an operator".into()), "{paused:?}");
    // The 410 paused `gone` at its first callback.
    assert_eq!(reason("gone"), Some("the destination answered 410 Gone".into()), "{paused:?}");

    // A reload refused (a typo in the file).
    write(dir.path(), &toml.replace("[notifications]", "[notifications]\nfailing_aftr = 3"));
    relay.signal(nix::sys::signal::Signal::SIGHUP);
    let got = ops.wait_until(WAIT, "config.reload_failed", |g| types(g).contains(&"config.reload_failed".into())).await;
    let (_, data) = events(&got).into_iter().find(|(t, _)| t == "config.reload_failed").expect("reload");
    assert!(data["error"].as_str().unwrap_or_default().contains("failing_aftr"), "{data}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_of_a_hundred_dead_letters_is_one_event() {
    let strict = TestReceiver::scripted(|_, _| Reply::Status(400)).await;
    let ops = TestReceiver::ok().await;
    let toml = with_ops(
        config(&[("strict", &strict.url("/s"), "paused = true\nconcurrency = 8")]),
        &ops,
        "dead_letter_window = \"5s\"\nevents = [\"message.dead_lettered\"]",
    );
    let dir = tempfile::tempdir().expect("tempdir");
    let relay = RelayProcess::start(&write(dir.path(), &toml)).await;
    let mut ids = Vec::new();
    for i in 0..100 {
        let (status, _, body) = post(&relay.url("/in"), "application/json", format!("{{\"n\":{i}}}")).await;
        assert_eq!(status, 200);
        let v: serde_json::Value = serde_json::from_slice(&body).expect("json");
        ids.push(v["id"].as_str().expect("id").to_string());
    }
    // Queued while paused; resumed, all 100 are refused (400) at once.
    let (status, _, _) = request("POST", &relay.admin_url("/api/destinations/strict/resume"), &[], "").await;
    assert_eq!(status, 200);
    let got = ops.wait_until(WAIT, "a dead-letter event", |g| !g.is_empty()).await;
    let all = events(&got);
    assert_eq!(all.len(), 1, "{all:?}");
    let (kind, data) = &all[0];
    assert_eq!(kind, "message.dead_lettered");
    assert_eq!(data["destination"], "strict");
    assert_eq!(data["count"], 100, "{data}");
    let first: Vec<&str> = data["first_ids"].as_array().expect("ids").iter().filter_map(|v| v.as_str()).collect();
    assert_eq!(first.len(), 10);
    assert!(first.iter().all(|id| ids.iter().any(|i| i == id)), "{first:?}");
    assert!(data["last_reason"].as_str().unwrap_or_default().contains("400"), "{data}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_store_is_told_while_it_is_full() {
    let r = TestReceiver::scripted(|_, _| Reply::Status(400)).await;
    let ops = TestReceiver::ok().await;
    // The ops destination reshapes events into Slack messages with the
    // shipped script, one at a time (in the order they were told).
    let slack = format!("file:{}/deploy/transforms/slack.js", env!("CARGO_MANIFEST_DIR"));
    let toml = with_ops(
        config(&[("a", &r.url("/a"), "paused = true")]),
        &ops,
        "events = [\"store.refusing\", \"message.dead_lettered\"]\ndead_letter_window = \"1s\"",
    )
    .replace("[store]\n", "[store]\nmax_bytes = 4000\n")
    .replace("[admin]", "[ingress]\nmax_body = 1100\n[admin]")
    .replace(
        "[notifications]",
        &format!("concurrency = 1\n[destinations.ops.transform]\nscript = \"{slack}\"\n[notifications]"),
    );
    let dir = tempfile::tempdir().expect("tempdir");
    let relay = RelayProcess::start(&write(dir.path(), &toml)).await;
    let mut refused = false;
    for i in 0..20 {
        let (status, _, _) = post(&relay.url("/in"), "text/plain", format!("{i:>1000}")).await;
        if status == 503 {
            refused = true;
            break;
        }
        assert_eq!(status, 200);
    }
    assert!(refused, "max_bytes was never reached");
    let got = ops.wait_until(WAIT, "a Slack message", |g| !g.is_empty()).await;
    let v: serde_json::Value = serde_json::from_slice(&got[0].body).expect("json");
    let text = v["text"].as_str().unwrap_or_default();
    assert!(text.contains("the relay refuses callbacks: store is full"), "{v}");
    assert!(
        v["blocks"][1]["elements"][0]["text"].as_str().unwrap_or_default().starts_with("store.refusing at "),
        "{v}"
    );
    // Still refusing callbacks: the event used the store's margin, not room.
    assert_eq!(post(&relay.url("/in"), "text/plain", format!("{:>1000}", 0)).await.0, 503);
    // Told once while it stays full, though the reason's text changes (the
    // event itself took room: "store is full: N of max_bytes"; before the
    // fix, one more event each second). `a` resumed dead-letters what it
    // holds; that event is told at the end of its 1 s window, at least a
    // second of checks later, and arrives after every event told before it.
    let (s, _, _) = request("POST", &relay.admin_url("/api/destinations/a/resume"), &[], "").await;
    assert_eq!(s, 200);
    let got = ops
        .wait_until(WAIT, "the dead letters told", |g| {
            g.iter().any(|r| String::from_utf8_lossy(&r.body).contains("dead-lettered for"))
        })
        .await;
    let refusals = got.iter().filter(|r| String::from_utf8_lossy(&r.body).contains("refuses callbacks")).count();
    assert_eq!(
        refusals,
        1,
        "{:?}",
        got.iter().map(|r| String::from_utf8_lossy(&r.body).into_owned()).collect::<Vec<_>>()
    );
}

#[test]
fn notification_settings_are_config_errors_naming_the_key() {
    for (extra, key) in [
        ("destination = \"nope\"", "notifications.destination"),
        ("destination = \"a\"\nevents = [\"destination.exploded\"]", "notifications.events"),
        ("destination = \"a\"\nfailing_after = 0", "notifications.failing_after"),
        ("destination = \"a\"\ndead_letter_window = \"0s\"", "notifications.dead_letter_window"),
    ] {
        let dir = tempfile::tempdir().expect("tempdir");
        let toml = format!("{}[notifications]\n{extra}\n", config(&[("a", "http://127.0.0.1:1/", "")]));
        let path = write(dir.path(), &toml);
        let err = switchboard::config::Config::load(&path).expect_err(extra).to_string();
        assert!(err.contains(key), "{extra}: {err}");
    }
}

/// The same events on the JetStream store: dead letters aggregated, and
/// NATS gone then back: `store.refusing` waits in the relay (nothing can be
/// stored meanwhile) and arrives, then `store.accepting`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_jetstream_dead_letters_and_an_outage_of_nats_are_told() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut nats = crate::nats::NatsNode::single(dir.path());
    let strict = TestReceiver::scripted(|_, _| Reply::Status(400)).await;
    let ops = TestReceiver::ok().await;
    let toml = with_ops(
        crate::jetstream::jet_config(&[nats.url()], "ev", 1, &[("strict", &strict.url("/s"), "")]),
        &ops,
        "dead_letter_window = \"2s\"",
    );
    let relay = RelayProcess::start(&write(dir.path(), &toml)).await;
    for i in 0..20 {
        assert_eq!(post(&relay.url("/in"), "application/json", format!("{{\"n\":{i}}}")).await.0, 200);
    }
    ops.wait_until(WAIT, "dead letters", |g| types(g).contains(&"message.dead_lettered".into())).await;
    let dead = |g: &[Received]| -> Vec<serde_json::Value> {
        events(g).into_iter().filter(|(t, _)| t == "message.dead_lettered").map(|(_, d)| d).collect()
    };
    let count = |d: &[serde_json::Value]| d.iter().map(|d| d["count"].as_u64().unwrap_or(0)).sum::<u64>();
    let got = ops.wait_until(WAIT, "20 dead letters told", |g| count(&dead(g)) >= 20).await;
    // One window, or two if the burst straddled its end.
    assert!(dead(&got).len() <= 2 && count(&dead(&got)) == 20, "{:?}", dead(&got));

    nats.kill9();
    // NATS stays down until the relay holds the `store.refusing` event
    // it cannot store.
    eventually!(WAIT, "an event waiting for the store", {
        let (_, _, body) = get(&relay.admin_url("/metrics")).await;
        match metric(&String::from_utf8_lossy(&body), "switchboard_notifications_waiting") {
            n if n >= 1.0 => Ok(()),
            n => Err(format!("{n} waiting")),
        }
    });
    nats.start();
    // Both told, refusing first (by their timestamps: the ops destination
    // delivers with its concurrency, so arrival order may differ).
    let got = ops
        .wait_until(WAIT, "refusing and accepting", |g| {
            let t = types(g);
            t.contains(&"store.refusing".into()) && t.contains(&"store.accepting".into())
        })
        .await;
    let at = |kind: &str| -> (String, serde_json::Value) {
        got.iter()
            .filter_map(|r| serde_json::from_slice::<serde_json::Value>(&r.body).ok())
            .find(|v| v["type"] == kind)
            .map(|v| (v["timestamp"].as_str().unwrap_or_default().to_string(), v["data"].clone()))
            .unwrap_or_default()
    };
    // Once each: the relay's start (connecting to NATS after it listens)
    // is not an outage.
    let t = types(&got);
    let count = |k: &str| t.iter().filter(|x| *x == k).count();
    assert_eq!((count("store.refusing"), count("store.accepting")), (1, 1), "{t:?}");
    let (refusing_at, data) = at("store.refusing");
    assert!(refusing_at < at("store.accepting").0, "{refusing_at} {:?}", at("store.accepting"));
    assert!(data["reason"].as_str().unwrap_or_default().contains("NATS"), "{data}");
}
