//! Flow control per destination: the rate limit holds for every attempt,
//! replays included, measured by a receiver that counts arrivals per
//! 100 ms window.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crate::support::*;

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
        let out =
            crate::binary::check(&crate::binary::write(dir.path(), &config(&[("a", "http://127.0.0.1:1/a", extra)])));
        assert_eq!(out.status.code(), Some(78), "{extra}");
        assert!(
            String::from_utf8_lossy(&out.stderr).contains(key),
            "{extra}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}
