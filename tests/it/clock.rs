//! A relay's own clock stepped (issue 25's last fault), without touching
//! the host's: `SWITCHBOARD_TEST_CLOCK_OFFSET_MS` steps what the relay
//! reads as the time. Two relays on one JetStream stream, one an hour
//! behind and one an hour ahead: a ThingSpace-style resend (same callback,
//! `callbackCount` 2) to the other relay is still a duplicate within the
//! route's 10-minute window, in both directions (found by this test: the
//! window was decided by comparing one relay's clock with the time another
//! relay had stored; now each window is a bucket the server expires), and
//! retries by either relay go out at their delay, not an hour off.

use crate::binary::{write, RelayProcess};
use crate::support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relays_an_hour_apart_agree_on_duplicates_and_retry_on_time() {
    let dir = tempfile::tempdir().expect("tempdir");
    let nats = crate::nats::NatsNode::single(dir.path());
    let healthy = TestReceiver::ok().await;
    // Every callback's first attempt fails: each is retried once, by
    // whichever relay the server hands it to.
    let flaky = TestReceiver::scripted(|_, got| {
        Reply::Status(if got.header("x-switchboard-attempt").as_deref() == Some("1") { 503 } else { 200 })
    })
    .await;
    let fast = "retry = { initial = \"50ms\", max_interval = \"100ms\" }";
    let toml = crate::jetstream::jet_config(
        &[nats.url()],
        "clock",
        1,
        &[("healthy", &healthy.url("/h"), fast), ("flaky", &flaky.url("/f"), fast)],
    )
    .replace(
        "destinations = [\"healthy\", \"flaky\"]\n",
        "destinations = [\"healthy\", \"flaky\"]\ndedupe = { window = \"10m\", ignore = [\"callbackCount\"] }\n",
    );
    let path = write(dir.path(), &toml);
    let hour = 3_600_000i64;
    let behind =
        RelayProcess::start_with_env(&path, &[("SWITCHBOARD_TEST_CLOCK_OFFSET_MS", &(-hour).to_string())]).await;
    let ahead = RelayProcess::start_with_env(&path, &[("SWITCHBOARD_TEST_CLOCK_OFFSET_MS", &hour.to_string())]).await;
    for relay in [&behind, &ahead] {
        eventually!(WAIT, "the relay ready", {
            match get(&relay.admin_url("/readyz")).await.0 {
                200 => Ok(()),
                s => Err(format!("readyz {s}")),
            }
        });
        assert!(relay.logs().contains("clock is stepped on purpose"), "the relay says its clock is stepped");
    }
    let n = 20;
    for i in 0..n {
        // Even: first to the relay behind, resent to the one ahead; odd: the other way.
        let (first, resend) = if i % 2 == 0 { (&behind, &ahead) } else { (&ahead, &behind) };
        let (s, _, b) = post(&first.url("/in"), "application/json", format!(r#"{{"n":{i},"callbackCount":1}}"#)).await;
        assert_eq!(s, 200, "{}", String::from_utf8_lossy(&b));
        let id = acked_id(&b);
        let (s, _, b) = post(&resend.url("/in"), "application/json", format!(r#"{{"n":{i},"callbackCount":2}}"#)).await;
        assert_eq!(s, 200);
        let v: serde_json::Value = serde_json::from_slice(&b).expect("json");
        assert_eq!((v["duplicate"].as_bool(), v["id"].as_str()), (Some(true), Some(id.as_str())), "resend of {i}: {v}");
    }
    // Each callback once at the healthy destination; each delivered to the
    // flaky one after its retry (a retry an hour late would not arrive).
    let got = healthy.wait_for(n, WAIT).await;
    let mut seen: Vec<u64> =
        got.iter().filter_map(|r| serde_json::from_slice::<serde_json::Value>(&r.body).ok()?["n"].as_u64()).collect();
    seen.sort_unstable();
    assert_eq!(seen, (0..n as u64).collect::<Vec<_>>(), "each callback once");
    flaky
        .wait_until(WAIT, "every callback delivered after its retry", |g| {
            g.iter().filter(|r| r.header("x-switchboard-attempt").as_deref() == Some("2")).count() >= n
        })
        .await;
}

/// `max_age` by the server's clock (`store/jetstream/clock.rs`): callbacks
/// taken by a relay an hour behind, then attempted (and refused) by a
/// relay an hour ahead, are two hours old by the two relays' clocks and a
/// few seconds by the truth. With `max_age = 30m` they are retried and
/// delivered, not dead-lettered at their first failure.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_age_counts_by_the_servers_clock_not_the_relays() {
    let dir = tempfile::tempdir().expect("tempdir");
    let nats = crate::nats::NatsNode::single(dir.path());
    let (r, up, taken) = crate::jet_order::gated_receiver().await;
    let retry = "retry = { initial = \"50ms\", max_interval = \"100ms\", max_age = \"30m\" }";
    let path = write(dir.path(), &crate::jetstream::jet_config(&[nats.url()], "age", 1, &[("d", &r.url("/d"), retry)]));
    let hour = 3_600_000i64;
    let mut behind =
        RelayProcess::start_with_env(&path, &[("SWITCHBOARD_TEST_CLOCK_OFFSET_MS", &(-hour).to_string())]).await;
    let n = 5;
    for i in 0..n {
        let (s, _, b) = post(&behind.url("/in"), "application/json", format!(r#"{{"n":{i}}}"#)).await;
        assert_eq!(s, 200, "{}", String::from_utf8_lossy(&b));
    }
    r.wait_for(n, WAIT).await;
    // A clean stop gives back what it holds.
    behind.signal(nix::sys::signal::Signal::SIGTERM);
    assert!(behind.wait_exit(WAIT).await.success());
    let ahead = RelayProcess::start_with_env(&path, &[("SWITCHBOARD_TEST_CLOCK_OFFSET_MS", &hour.to_string())]).await;
    // The relay ahead refused at least once per callback, then the
    // destination takes them.
    let before = r.count();
    r.wait_until(WAIT, "attempts by the relay ahead", |g| g.len() >= before + 2 * n).await;
    up.store(true, std::sync::atomic::Ordering::SeqCst);
    r.wait_until(WAIT, "every callback delivered, none dead-lettered", |_| taken.lock().expect("lock").len() >= n)
        .await;
    let m = String::from_utf8_lossy(&get(&ahead.admin_url("/metrics")).await.2).into_owned();
    assert_eq!(metric(&m, "switchboard_dead_letters{destination=\"d\"}"), 0.0);
}
