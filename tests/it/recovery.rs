//! Issue 23, point 6: a destination that comes back gets what waits for it
//! at once, not when each retry's timer ends: when it answers 2xx again
//! after failures, when an operator resumes it, and when an operator asks
//! (`destinations retry-now`). With the real binary; every retry timer
//! here is an hour, so without bringing them forward nothing would arrive
//! within the test's wait.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use crate::binary::{write, RelayProcess};
use crate::support::*;

/// A retry policy whose timers outlast any test.
const HOUR_RETRIES: &str = "[destinations.d.retry]\ninitial = \"1h\"\nmax_interval = \"1h\"\njitter = 0.0";

/// A receiver answering 503 until `up` is set, then 200.
async fn flaky(up: &Arc<AtomicBool>) -> TestReceiver {
    let flag = up.clone();
    TestReceiver::scripted(move |_, _| Reply::Status(if flag.load(Ordering::SeqCst) { 200 } else { 503 })).await
}

async fn post_n(relay: &RelayProcess, prefix: &str, n: usize) {
    for i in 0..n {
        let (status, _, _) = post(&relay.url("/in"), "text/plain", format!("{prefix}-{i}")).await;
        assert_eq!(status, 200);
    }
}

/// Bodies the receiver answered 200 to (it answers by the flag at the time).
fn bodies(got: &[Received], from: usize) -> Vec<String> {
    let mut b: Vec<String> = got[from..].iter().map(|g| String::from_utf8_lossy(&g.body).into_owned()).collect();
    b.sort();
    b
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_destination_that_answers_again_gets_its_waiting_retries_at_once() {
    let up = Arc::new(AtomicBool::new(false));
    let r = flaky(&up).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let relay = RelayProcess::start(&write(dir.path(), &config(&[("d", &r.url("/d"), HOUR_RETRIES)]))).await;
    post_n(&relay, "early", 3).await;
    relay
        .wait_metrics("three failed attempts", |m| {
            metric(m, "switchboard_deliveries_total{destination=\"d\",outcome=\"retried\"}") == 3.0
        })
        .await;
    assert_eq!(r.count(), 3);

    // The receiver is back; the next callback reaches it, and with it the
    // three that wait an hour for their retries.
    up.store(true, Ordering::SeqCst);
    post_n(&relay, "late", 1).await;
    let got = r.wait_for(7, WAIT).await;
    assert_eq!(bodies(&got, 3), ["early-0", "early-1", "early-2", "late-0"]);
    // The relay's stderr is read by a thread of the test: the line may
    // come a moment after the requests it preceded.
    let line = eventually!(WAIT, "the line saying the destination answers again", {
        let logs = relay.logs();
        logs.lines().find(|l| l.contains("destination answers again")).map(str::to_string).ok_or(logs)
    });
    let v: serde_json::Value = serde_json::from_str(&line).expect("json log line");
    assert_eq!(v["brought_forward"], 3, "{line}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retry_now_and_resume_send_what_waits_for_a_retry() {
    let up = Arc::new(AtomicBool::new(false));
    let r = flaky(&up).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let relay = RelayProcess::start(&write(dir.path(), &config(&[("d", &r.url("/d"), HOUR_RETRIES)]))).await;
    let admin = relay.admin_url("");
    let a = ["--admin", admin.as_str()];

    // An operator who knows the receiver is back.
    post_n(&relay, "first", 2).await;
    r.wait_for(2, WAIT).await;
    relay
        .wait_metrics("two failed attempts", |m| {
            metric(m, "switchboard_deliveries_total{destination=\"d\",outcome=\"retried\"}") == 2.0
        })
        .await;
    up.store(true, Ordering::SeqCst);
    let (code, out, err) = crate::cli::sb(&[&["destinations", "retry-now", "d"], &a[..]].concat()).await;
    assert_eq!((code, out.trim()), (0, "d: 2 waiting retries due now"), "{err}");
    let got = r.wait_for(4, WAIT).await;
    assert_eq!(bodies(&got, 2), ["first-0", "first-1"]);

    // Retries that waited out a pause go when it is resumed.
    up.store(false, Ordering::SeqCst);
    post_n(&relay, "second", 2).await;
    relay
        .wait_metrics("two more failed attempts", |m| {
            metric(m, "switchboard_deliveries_total{destination=\"d\",outcome=\"retried\"}") == 4.0
        })
        .await;
    let (code, _, err) = crate::cli::sb(&[&["destinations", "pause", "d"], &a[..]].concat()).await;
    assert_eq!(code, 0, "{err}");
    up.store(true, Ordering::SeqCst);
    let (code, out, err) = crate::cli::sb(&[&["destinations", "resume", "d"], &a[..]].concat()).await;
    assert_eq!((code, out.trim()), (0, "d: active"), "{err}");
    let got = r.wait_for(8, WAIT).await;
    assert_eq!(bodies(&got, 6), ["second-0", "second-1"]);

    // Nothing waits: the API says so; an unknown destination is a 404.
    let (status, _, body) = request("POST", &relay.admin_url("/api/destinations/d/retry-now"), &[], "").await;
    let v: serde_json::Value = serde_json::from_slice(&body).expect("json");
    assert_eq!((status, v["brought_forward"].as_u64()), (200, Some(0)), "{v}");
    let (status, _, _) = request("POST", &relay.admin_url("/api/destinations/nope/retry-now"), &[], "").await;
    assert_eq!(status, 404);
}
