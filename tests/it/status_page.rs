//! The status page in a real browser (headless Chromium through selenium):
//! a receiver that is down shows as failing, with its backlog and dead
//! letters; a destination's answer holding a <script> is shown as text;
//! the sparklines show the relay's last 15 minutes on the first load;
//! Replay on a dead letter, Retry now and Resume on a paused destination,
//! clicked on the page, make the receivers get the callbacks. Screenshots of both
//! states go to target/status-page/. If Chromium cannot start, the test
//! says so and fails.

use std::path::{Path, PathBuf};

use crate::support::*;

/// A Python with selenium: the test venv of `.ci/run`, or made here.
fn python() -> PathBuf {
    let venv = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/test-venv");
    let python = venv.join("bin/python");
    let has = std::process::Command::new(&python).args(["-c", "import selenium"]).status().is_ok_and(|s| s.success());
    if !has {
        let ok = std::process::Command::new("python3").arg("-m").arg("venv").arg(&venv).status();
        assert!(ok.is_ok_and(|s| s.success()), "cannot create {}", venv.display());
        let ok = std::process::Command::new(&python).args(["-m", "pip", "install", "-q", "selenium"]).status();
        assert!(ok.is_ok_and(|s| s.success()), "cannot install selenium from PyPI");
    }
    python
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_status_page_shows_failures_and_replays_and_resumes_in_a_browser() {
    assert!(
        Path::new("/usr/bin/chromium").exists() && Path::new("/usr/bin/chromedriver").exists(),
        "the browser test needs Debian's chromium and chromium-driver (.ci/run installs them)"
    );
    let python = python();
    let billing_addr = dead_addr().await;
    let audit = TestReceiver::ok().await;
    let xss = TestReceiver::scripted(|_, _| Reply::Body(503, "<script>window.pwned=1</script>busy")).await;
    let toml = config(&[
        (
            "billing",
            &format!("http://{billing_addr}/b"),
            "retry = { initial = \"20ms\", max_interval = \"40ms\", max_attempts = 2 }",
        ),
        ("audit", &audit.url("/a"), "paused = true"),
        ("xss", &xss.url("/x"), "retry = { initial = \"1h\", max_interval = \"1h\" }"),
        (
            "shaped",
            "http://127.0.0.1:1/never",
            "[destinations.shaped.transform]\nsource = \"function transform(req) { throw new Error('bad shape'); }\"",
        ),
    ])
    .replace("[admin]\naddr = \"127.0.0.1:0\"\n", "[admin]\naddr = \"127.0.0.1:0\"\ntoken = \"page-token-1\"\n");
    let relay = TestRelay::start(&toml).await;
    for i in 0..2 {
        assert_eq!(post(&relay.url("/in"), "application/json", format!("{{\"n\":{i}}}")).await.0, 200);
    }
    let auth = [("authorization", "Bearer page-token-1")];
    eventually!(WAIT, "the setup's dead letters and attempts", {
        let (_, _, m) = request("GET", &relay.admin_url("/metrics"), &auth, "").await;
        let m = String::from_utf8_lossy(&m).into_owned();
        if metric(&m, "switchboard_dead_letters{destination=\"billing\"}") == 2.0
            && metric(&m, "switchboard_transform_failures_total{destination=\"shaped\"}") == 2.0
            && xss.count() >= 2
        {
            Ok(())
        } else {
            Err(m)
        }
    });
    // The relay keeps the last 15 minutes per destination (issue 23,
    // point 8): the page draws them on its first load.
    let (_, _, body) = request("GET", &relay.admin_url("/api/destinations"), &auth, "").await;
    let v: serde_json::Value = serde_json::from_slice(&body).expect("json");
    let x = v["destinations"].as_array().expect("list").iter().find(|d| d["name"] == "xss").expect("xss").clone();
    let failed: u64 = x["recent"]["failed"].as_array().expect("failed").iter().filter_map(|n| n.as_u64()).sum();
    assert_eq!((failed, x["recent"]["bucket_seconds"].as_u64()), (2, Some(10)), "{x}");
    assert_eq!(x["recent"]["delivered"].as_array().map(Vec::len), Some(90), "{x}");
    // The billing receiver comes up; the page replays one of its dead letters.
    let billing = TestReceiver::ok_at(billing_addr).await;
    let shots = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/status-page");
    std::fs::create_dir_all(&shots).expect("screenshot dir");
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/it/py/status_page.py");
    let out = tokio::process::Command::new(&python)
        .arg(&script)
        .args([relay.admin_url("/"), "page-token-1".into(), shots.display().to_string()])
        .output()
        .await
        .expect("run the browser script");
    assert!(
        out.status.success() && String::from_utf8_lossy(&out.stdout).trim() == "ok",
        "the browser test failed (is Chromium able to start here?): {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    billing.wait_for(1, WAIT).await;
    xss.wait_for(4, WAIT).await; // Retry now sent its two waiting retries (1 h timers)
    audit.wait_for(2, WAIT).await;
    assert!(shots.join("1-failing.png").exists() && shots.join("2-replayed-and-resumed.png").exists());
    relay.stop().await.expect("stop");
}
