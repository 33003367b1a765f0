//! Flow control per destination: the rate limit holds for every attempt,
//! replays included, measured by a receiver that counts arrivals per
//! 100 ms window.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crate::support::*;

/// Posts `m0`..`m{n-1}` to `/in`, each acknowledged.
async fn post_many(relay: &TestRelay, n: usize) {
    for i in 0..n {
        assert_eq!(post(&relay.url("/in"), "text/plain", format!("m{i}")).await.0, 200);
    }
}

/// Most arrivals in any 100 ms window.
fn busiest_window(received: &[Received]) -> usize {
    let mut times: Vec<_> = received.iter().map(|r| r.at).collect();
    times.sort();
    (0..times.len())
        .map(|i| times[i..].iter().take_while(|t| t.duration_since(times[i]) < Duration::from_millis(100)).count())
        .max()
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_rate_limit_holds_for_every_attempt_replays_included() {
    let accept_all = Arc::new(AtomicBool::new(false));
    let flag = accept_all.clone();
    let r = TestReceiver::scripted(move |_, got| {
        let refuse = !flag.load(Ordering::SeqCst) && String::from_utf8_lossy(&got.body).contains("refuse");
        Reply::Status(if refuse { 400 } else { 200 })
    })
    .await;
    // 20 a second, 4 at once: at most 4 + 2 arrivals in any 100 ms window.
    let relay = TestRelay::start(&config(&[(
        "limited",
        &r.url("/l"),
        "concurrency = 16\nrate_limit = { per_second = 20, burst = 4 }",
    )]))
    .await;
    let mut posts = tokio::task::JoinSet::new();
    for i in 0..40 {
        let url = relay.url("/in");
        let body = if i < 30 { format!("ok-{i}") } else { format!("refuse-{i}") };
        posts.spawn(async move { post(&url, "text/plain", body).await.0 });
    }
    while let Some(s) = posts.join_next().await {
        assert_eq!(s.expect("post"), 200);
    }
    relay
        .wait_metrics("ten dead letters", |m| metric(m, "switchboard_dead_letters{destination=\"limited\"}") == 10.0)
        .await;
    accept_all.store(true, Ordering::SeqCst);
    let (status, _, _) = request("POST", &relay.admin_url("/api/dead-letters/limited/replay"), &[], "").await;
    assert_eq!(status, 200);
    let got = r.wait_for(50, WAIT).await;
    assert_eq!(got.len(), 50, "40 first attempts and 10 replays");
    let busiest = busiest_window(&got);
    assert!(busiest <= 6, "{busiest} arrivals in one 100 ms window (limit 20/s, burst 4)");
    // The replays alone are limited too.
    let replays: Vec<Received> =
        got.iter().filter(|g| String::from_utf8_lossy(&g.body).contains("refuse")).skip(10).cloned().collect();
    assert_eq!(replays.len(), 10);
    assert!(busiest_window(&replays) <= 6);
}

#[test]
fn bad_rate_limits_are_config_errors() {
    let dir = tempfile::tempdir().expect("tempdir");
    for (extra, key) in [
        ("rate_limit = { per_second = 0 }", "destinations.a.rate_limit.per_second"),
        ("rate_limit = { per_second = -5 }", "destinations.a.rate_limit.per_second"),
        ("rate_limit = { per_second = 10, burst = 0 }", "destinations.a.rate_limit.burst"),
    ] {
        crate::binary::assert_config_error(dir.path(), extra, key, "");
    }
}

/// A `410 Gone` pauses the destination: persisted across a restart, the
/// queue kept (the message that got the 410 too), visible in the admin API
/// and metrics, resumed only by the operator.
#[tokio::test]
async fn a_410_pauses_the_destination_until_an_operator_resumes_it() {
    let gone = Arc::new(AtomicBool::new(true));
    let flag = gone.clone();
    let r =
        TestReceiver::scripted(move |_, _| Reply::Status(if flag.load(Ordering::SeqCst) { 410 } else { 200 })).await;
    let other = TestReceiver::ok().await;
    let toml = config(&[("gone", &r.url("/g"), ""), ("other", &other.url("/o"), "")]);
    let dir = Arc::new(tempfile::tempdir().expect("tempdir"));
    let relay = TestRelay::start_in(dir.clone(), &toml).await;
    assert_eq!(post(&relay.url("/in"), "text/plain", "first").await.0, 200);
    relay
        .wait_metrics("paused by the 410", |m| metric(m, "switchboard_destination_paused{destination=\"gone\"}") == 1.0)
        .await;
    for i in 0..3 {
        assert_eq!(post(&relay.url("/in"), "text/plain", format!("later-{i}")).await.0, 200);
    }
    other.wait_for(4, WAIT).await; // the other destination is not held up
    assert_eq!(r.count(), 1, "nothing more is sent to a destination that answered 410");
    let (_, _, body) = get(&relay.admin_url("/api/destinations")).await;
    let v: serde_json::Value = serde_json::from_slice(&body).expect("json");
    let d = v["destinations"].as_array().expect("list").iter().find(|d| d["name"] == "gone").expect("gone").clone();
    assert_eq!(d["state"], "paused");
    assert_eq!(d["pending"], 4, "the queue is kept, the 410'd message included");
    assert!(d["paused_reason"].as_str().unwrap_or_default().contains("410"));
    relay.stop().await.expect("stop");

    // A restart does not resume it.
    gone.store(false, Ordering::SeqCst);
    let relay = TestRelay::start_in(dir, &toml).await;
    let m = relay.metrics().await;
    assert_eq!(metric(&m, "switchboard_destination_paused{destination=\"gone\"}"), 1.0);
    assert_eq!(metric(&m, "switchboard_queue_depth{destination=\"gone\"}"), 4.0);
    assert_eq!(r.count(), 1);
    // The operator does.
    let (status, _, _) = request("POST", &relay.admin_url("/api/destinations/gone/resume"), &[], "").await;
    assert_eq!(status, 200);
    let got = r.wait_for(5, WAIT).await;
    let mut bodies: Vec<String> = got[1..].iter().map(|g| String::from_utf8_lossy(&g.body).into_owned()).collect();
    bodies.sort();
    assert_eq!(bodies, ["first", "later-0", "later-1", "later-2"]);
    // And can pause it again by hand.
    let (status, _, _) = request("POST", &relay.admin_url("/api/destinations/gone/pause"), &[], "").await;
    assert_eq!(status, 200);
    relay
        .wait_metrics("paused by hand", |m| metric(m, "switchboard_destination_paused{destination=\"gone\"}") == 1.0)
        .await;
    let (status, _, _) = request("POST", &relay.admin_url("/api/destinations/nope/pause"), &[], "").await;
    assert_eq!(status, 404);
}

/// The circuit breaker: after 3 consecutive failures no attempts are made
/// for the cool-down, then one probe; while open, no message's attempt count
/// is spent (with max_attempts = 3 nothing is dead-lettered though the
/// outage outlasts many retry intervals); after recovery everything drains.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_breaker_opens_probes_and_spends_no_attempts_while_open() {
    let down = Arc::new(AtomicBool::new(true));
    let flag = down.clone();
    let r =
        TestReceiver::scripted(move |_, _| Reply::Status(if flag.load(Ordering::SeqCst) { 503 } else { 200 })).await;
    let relay = TestRelay::start(&config(&[(
        "flaky",
        &r.url("/f"),
        "concurrency = 1\nbreaker = { failures = 3, cool_down = \"200ms\" }\n[destinations.flaky.retry]\ninitial = \"10ms\"\nmax_interval = \"20ms\"\njitter = 0.0\nmax_attempts = 3",
    )]))
    .await;
    post_many(&relay, 10).await;
    let failed = "switchboard_delivery_attempts_total{destination=\"flaky\",result=\"5xx\"}";
    // Three failures open it; two probes later (200 ms, then 400 ms), still down.
    relay.wait_metrics("the breaker opened and probed twice", |m| metric(m, failed) >= 5.0).await;
    let (_, _, body) = get(&relay.admin_url("/api/destinations")).await;
    let v: serde_json::Value = serde_json::from_slice(&body).expect("json");
    let state = v["destinations"][0]["breaker"].as_str().unwrap_or_default().to_string();
    assert!(state == "open" || state == "half_open", "{state}");
    down.store(false, Ordering::SeqCst);
    relay
        .wait_metrics("everything delivered after recovery", |m| {
            metric(m, "switchboard_deliveries_total{destination=\"flaky\",outcome=\"delivered\"}") == 10.0
        })
        .await;
    let m = relay.metrics().await;
    assert_eq!(metric(&m, "switchboard_dead_letters{destination=\"flaky\"}"), 0.0, "no attempts spent while open");
    assert!(metric(&m, failed) < 10.0, "fewer failed attempts than messages: {}", metric(&m, failed));
    assert_eq!(metric(&m, "switchboard_breaker_state{destination=\"flaky\",state=\"closed\"}"), 1.0);
}

#[test]
fn bad_breakers_are_config_errors() {
    let dir = tempfile::tempdir().expect("tempdir");
    for (extra, key) in [
        ("breaker = { failures = 0 }", "destinations.a.breaker.failures"),
        ("breaker = { failures = 3, cool_down = \"0s\" }", "destinations.a.breaker.cool_down"),
    ] {
        crate::binary::assert_config_error(dir.path(), extra, key, "");
    }
}

/// A destination that refuses messages with a 4xx is up: its breaker stays
/// closed, and every message gets its own answer (dead letters here).
#[tokio::test]
async fn refusals_do_not_open_the_breaker() {
    let r = TestReceiver::scripted(|_, _| Reply::Status(400)).await;
    let relay = TestRelay::start(&config(&[(
        "strict",
        &r.url("/s"),
        "concurrency = 1\nbreaker = { failures = 2, cool_down = \"1h\" }",
    )]))
    .await;
    post_many(&relay, 5).await;
    let m = relay
        .wait_metrics("five dead letters", |m| metric(m, "switchboard_dead_letters{destination=\"strict\"}") == 5.0)
        .await;
    assert_eq!(metric(&m, "switchboard_breaker_state{destination=\"strict\",state=\"closed\"}"), 1.0);
    assert_eq!(r.count(), 5);
}

/// A store's id prefix (`msg_<uid>...`) is made at its first start: it must
/// be on disk before the first callback is acknowledged, or a kill -9 before
/// any settle (nothing else writes sled then) gives the store a new one and
/// every acknowledged id a new name (CI saw the resend test below fail so).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_acknowledged_id_names_the_message_after_a_kill9_right_after_the_first_start() {
    use crate::binary::{write, RelayProcess};
    // A destination that accepts connections and never answers: no attempt
    // settles, so nothing but the start itself writes sled.
    let hole = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let url = format!("http://{}/hole", hole.local_addr().expect("addr"));
    let dir = tempfile::tempdir().expect("tempdir");
    let path = write(dir.path(), &config(&[("app", &url, "")]));
    let mut relay = RelayProcess::start(&path).await;
    let (s, _, body) = post(&relay.url("/in"), "application/json", "{}").await;
    assert_eq!(s, 200);
    let id = acked_id(&body);
    relay.kill9();
    let relay = RelayProcess::start(&path).await;
    let (s, _, b) = get(&relay.admin_url(&format!("/api/messages/{id}"))).await;
    assert_eq!(s, 200, "{id} after the restart: {}", String::from_utf8_lossy(&b));
    drop(hole);
}

/// De-duplication survives kill -9: a ThingSpace resend (callbackCount 2)
/// after a crash is answered with the first id and delivered once; with the
/// window shortened below the callback's age (a restart with another
/// config), the same resend is a new message.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resend_after_kill9_is_recognised_within_the_window() {
    use crate::binary::{write, RelayProcess};
    let r = TestReceiver::ok().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let with_window = |w: &str| {
        config(&[("app", &r.url("/app"), "")]).replace(
            "destinations = [\"app\"]",
            &format!("destinations = [\"app\"]\ndedupe = {{ window = \"{w}\", ignore = [\"callbackCount\"] }}"),
        )
    };
    let path = write(dir.path(), &with_window("24h"));
    let first =
        r#"{"requestId":"r-1","deviceIds":[{"id":"8914","kind":"Iccid"}],"status":"Success","callbackCount":1}"#;
    let resend = first.replace("\"callbackCount\":1", "\"callbackCount\":2");
    let other = first.replace("8914", "8915");
    let mut relay = RelayProcess::start(&path).await;
    let (s, _, body) = post(&relay.url("/in"), "application/json", first).await;
    assert_eq!(s, 200);
    let id = acked_id(&body);
    relay.kill9();

    let mut relay = RelayProcess::start(&path).await;
    let (s, _, body) = post(&relay.url("/in"), "application/json", resend.clone()).await;
    assert_eq!(s, 200);
    let v: serde_json::Value = serde_json::from_slice(&body).expect("json");
    assert_eq!((v["id"].as_str(), v["duplicate"].as_bool()), (Some(id.as_str()), Some(true)), "{v}");
    // Another device's callback of the same request is not a duplicate.
    let (s, _, body) = post(&relay.url("/in"), "application/json", other).await;
    assert_eq!(s, 200);
    assert!(!String::from_utf8_lossy(&body).contains("duplicate"));
    r.wait_for(2, WAIT).await;
    let ids: std::collections::BTreeSet<String> = r
        .received()
        .iter()
        .filter(|g| String::from_utf8_lossy(&g.body).contains("8914"))
        .filter_map(|g| g.header("x-switchboard-id"))
        .collect();
    assert_eq!(ids.len(), 1, "within the window, the resend is the same message: {ids:?}");
    relay.signal(nix::sys::signal::Signal::SIGTERM);
    relay.wait_exit(WAIT).await;

    // Restarted with a window shorter than the first callback's age.
    let path = write(dir.path(), &with_window("1ms"));
    let relay = RelayProcess::start(&path).await;
    let (s, _, body) = post(&relay.url("/in"), "application/json", resend).await;
    assert_eq!(s, 200);
    assert!(!String::from_utf8_lossy(&body).contains("duplicate"), "outside the window: a new message");
    // Delivery is at-least-once (kill -9 may repeat one): count messages,
    // by their id, not requests.
    let got = r
        .wait_until(WAIT, "the resend outside the window delivered", |got| {
            got.iter().any(|g| String::from_utf8_lossy(&g.body).contains("\"callbackCount\":2"))
        })
        .await;
    let ids: std::collections::BTreeSet<String> = got
        .iter()
        .filter(|g| String::from_utf8_lossy(&g.body).contains("8914"))
        .filter_map(|g| g.header("x-switchboard-id"))
        .collect();
    assert_eq!(ids.len(), 2, "the first message, and the resend once outside the window: {ids:?}");
    assert!(ids.contains(&id));
}

#[test]
fn bad_dedupe_rules_are_config_errors() {
    let dir = tempfile::tempdir().expect("tempdir");
    for (rule, key, why) in [
        ("dedupe = { window = \"0s\" }", "routes[0].dedupe.window", "greater than 0"),
        ("dedupe = { window = \"1h\", ignore = [\"\"] }", "routes[0].dedupe.ignore", "names nothing"),
        ("dedupe = { window = \"1h\" }\ndedupe_window = \"1h\"", "routes[0].dedupe", "not both"),
        ("dedupe = { window = \"1h\", key = \"x\" }", "routes.0.dedupe", "unknown key `key`"),
        ("dedupe = { window = \"1h\", fields = [\"a[x]\"] }", "routes[0].dedupe.fields[0]", "not a number"),
        (
            "dedupe = { window = \"1h\", headers = [\"bad name\"] }",
            "routes[0].dedupe.headers[0]",
            "invalid header name",
        ),
        ("dedupe = { window = \"1h\", ignore = [\"a\"], fields = [\"b\"] }", "routes[0].dedupe", "not both"),
    ] {
        let toml = config(&[("a", "http://127.0.0.1:1/a", "")])
            .replace("destinations = [\"a\"]", &format!("destinations = [\"a\"]\n{rule}"));
        let out = crate::binary::check(&crate::binary::write(dir.path(), &toml));
        assert_eq!(out.status.code(), Some(78), "{rule}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(key) && err.contains(why), "{rule}: {err}");
    }
}
