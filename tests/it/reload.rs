//! Configuration reload without a restart: the real binary under load
//! through 20 SIGHUP reloads that add and remove a route and a destination
//! and change another's settings, plus a reload of an invalid file; no
//! acknowledged callback is lost, what was reloaded takes effect, a removed
//! destination's deliveries are kept and reported.

use std::time::Duration;

use nix::sys::signal::Signal;
use tokio::sync::watch;

use crate::binary::{write, RelayProcess};
use crate::promises::{seqs, Load};
use crate::support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reloads_under_load_lose_nothing_and_take_effect() {
    let app = TestReceiver::ok().await;
    let extra = TestReceiver::scripted(|_, _| Reply::Status(503)).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let base = config(&[("app", &app.url("/app"), "concurrency = 8")]);
    // Version B: app's timeout and concurrency changed, a destination
    // `extra` (always refusing, so its deliveries stay pending) on a route
    // of its own and on /in.
    let with_extra = config(&[
        ("app", &app.url("/app"), "concurrency = 4\ntimeout = \"7s\""),
        ("extra", &extra.url("/x"), "retry = { initial = \"1h\", max_interval = \"1h\" }"),
    ])
    .replace("[destinations.app]", "[[routes]]\npath = \"/in2\"\ndestinations = [\"extra\"]\n[destinations.app]");
    let path = write(dir.path(), &base);
    let relay = RelayProcess::start(&path).await;
    let (tx, rx) = watch::channel(vec![relay.ingress]);
    let mut load = Load::start(8, 100_000, rx);
    let metric_of = |relay: &RelayProcess, series: &'static str| {
        let url = relay.admin_url("/metrics");
        async move { metric(&String::from_utf8_lossy(&get(&url).await.2), series) }
    };
    for i in 0..20 {
        load.wait_acked(load.acked_count() + 50).await;
        write(dir.path(), if i % 2 == 0 { &with_extra } else { &base });
        relay.signal(Signal::SIGHUP);
        eventually!(WAIT, format!("reload {i}"), {
            if metric_of(&relay, "switchboard_config_reloads_total{result=\"ok\"}").await >= f64::from(i + 1) {
                Ok(())
            } else {
                Err(relay.logs())
            }
        });
        if i == 18 {
            // Version B is in force: its route answers.
            assert_eq!(post(&relay.url("/in2"), "text/plain", "to extra").await.0, 200);
        }
    }
    // The last reload went back to the base: /in2 is gone, `extra` is not
    // configured but its pending deliveries are kept and reported.
    assert_eq!(post(&relay.url("/in2"), "text/plain", "gone").await.0, 404);
    let (_, _, body) = get(&relay.admin_url("/api/destinations")).await;
    let v: serde_json::Value = serde_json::from_slice(&body).expect("json");
    let x = v["destinations"].as_array().and_then(|a| a.iter().find(|d| d["name"] == "extra")).cloned().expect("extra");
    assert_eq!(x["configured"], false, "{v}");
    assert!(x["pending"].as_u64().is_some_and(|n| n >= 1), "{v}");
    assert_eq!(metric_of(&relay, "switchboard_destination_configured{destination=\"extra\"}").await, 0.0);

    // An invalid file changes nothing and says why.
    write(dir.path(), &base.replace("concurrency = 8", "concurrency = 0"));
    relay.signal(Signal::SIGHUP);
    eventually!(WAIT, "the refused reload", {
        if metric_of(&relay, "switchboard_config_reloads_total{result=\"error\"}").await >= 1.0 {
            Ok(())
        } else {
            Err(relay.logs())
        }
    });
    let (_, _, cfg) = get(&relay.admin_url("/api/config")).await;
    let cfg: serde_json::Value = serde_json::from_slice(&cfg).expect("json");
    assert!(cfg["last_error"].as_str().is_some_and(|e| e.contains("destinations.app.concurrency")), "{cfg}");
    assert_eq!(cfg["reloads"]["ok"], 20);
    assert_eq!(cfg["sha256"].as_str().map(str::len), Some(64));
    assert!(relay.logs().contains("configuration reload refused"), "{}", relay.logs());

    let target = load.acked_count() + 100;
    load.wait_acked(target).await;
    let (acked, refused) = load.finish().await;
    drop(tx);
    let got = app
        .wait_until(Duration::from_secs(60), "every acknowledged callback at app", |got| {
            let s = seqs(got);
            acked.iter().all(|q| s.contains_key(q))
        })
        .await;
    let s = seqs(&got);
    let lost = acked.iter().filter(|q| !s.contains_key(q)).count();
    println!("reloads=20 acked={} refused={refused} lost={lost}", acked.len());
    assert_eq!(lost, 0);
    assert_eq!(refused, 0, "a reload never refuses callbacks");
}

/// A reload that makes a header a sender credential (auth added to a
/// route) withholds it at once from every destination, those whose own
/// settings did not change (their workers keep running) included; and
/// after auth is taken off again, callbacks stored under it still do not
/// carry it on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_that_adds_sender_auth_withholds_its_header_from_unchanged_destinations() {
    let app = TestReceiver::ok().await;
    let paused_app = TestReceiver::ok().await;
    let fwd = TestReceiver::ok().await;
    let dir = std::sync::Arc::new(tempfile::tempdir().expect("tempdir"));
    // `fwd` asks for the sender's credentials, so the route stores them.
    let base = config(&[
        ("app", &app.url("/app"), ""),
        ("later", &paused_app.url("/later"), ""),
        ("fwd", &fwd.url("/fwd"), "forward_sender_credentials = true"),
    ])
    .replace("[store]\n", "[store]\nretain_delivered = \"1h\"\n");
    let with_auth = base.replace(
        "[destinations.app]",
        "[routes.auth.header]\nname = \"X-Token\"\nvalues = [\"s3cret-token\"]\n[destinations.app]",
    );
    let reload = std::sync::Arc::new(tokio::sync::Notify::new());
    let relay = TestRelay::start_with_reload(dir.clone(), &base, reload.clone()).await;
    let reloads = |n: f64| {
        let relay = &relay;
        async move {
            relay.wait_metrics("reloaded", |m| metric(m, "switchboard_config_reloads_total{result=\"ok\"}") == n).await;
        }
    };
    let url = relay.url("/in");
    let send = || request("POST", &url, &[("x-token", "s3cret-token")], "cb");
    assert_eq!(send().await.0, 200);
    paused_app.wait_for(1, WAIT).await;
    let got = app.wait_for(1, WAIT).await;
    assert_eq!(got[0].header("x-token").as_deref(), Some("s3cret-token"), "an ordinary header before");

    write_config(dir.path(), &with_auth);
    reload.notify_one();
    reloads(1.0).await;
    // `later` is paused while the route has auth: its copy is delivered
    // only after auth is gone again.
    let (s, _, _) = request("POST", &relay.admin_url("/api/destinations/later/pause"), &[], "").await;
    assert_eq!(s, 200);
    assert_eq!(send().await.0, 200);
    let got = app.wait_for(2, WAIT).await;
    assert_eq!(got[1].header("x-token"), None, "a credential now: withheld by the unchanged destination");
    let got = fwd.wait_for(2, WAIT).await;
    assert_eq!(got[1].header("x-token").as_deref(), Some("s3cret-token"), "forwarded where asked");

    write_config(dir.path(), &base);
    reload.notify_one();
    reloads(2.0).await;
    let (s, _, _) = request("POST", &relay.admin_url("/api/destinations/later/resume"), &[], "").await;
    assert_eq!(s, 200);
    let got = paused_app.wait_for(2, WAIT).await;
    assert_eq!(got.iter().filter(|r| r.header("x-token").is_some()).count(), 1, "only the one sent before auth");
    // Inspection masks it too (the second callback is stored with it).
    let id = got[1].header("x-switchboard-id").expect("id");
    let (s, _, body) = get(&relay.admin_url(&format!("/api/messages/{id}"))).await;
    let text = String::from_utf8_lossy(&body);
    assert_eq!(s, 200, "retained: {text}");
    assert!(text.contains("x-token") && !text.contains("s3cret-token"), "{text}");
    relay.stop().await.expect("stop");
}

/// A secret a destination reads from a file (`file:`), rotated on disk:
/// the next reload restarts that destination with the new value, though
/// its table's text did not change (how mounted Kubernetes secrets and
/// Vault agents rotate).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_picks_up_a_destination_secret_rotated_in_its_file() {
    let app = TestReceiver::ok().await;
    let dir = std::sync::Arc::new(tempfile::tempdir().expect("tempdir"));
    let token = dir.path().join("token");
    std::fs::write(&token, "first-token\n").expect("write token");
    let toml = config(&[(
        "app",
        &app.url("/app"),
        &format!("add_headers = {{ \"X-Token\" = \"file:{}\" }}", token.display()),
    )]);
    let reload = std::sync::Arc::new(tokio::sync::Notify::new());
    let relay = TestRelay::start_with_reload(dir.clone(), &toml, reload.clone()).await;
    assert_eq!(post(&relay.url("/in"), "text/plain", "one").await.0, 200);
    let got = app.wait_for(1, WAIT).await;
    assert_eq!(got[0].header("x-token").as_deref(), Some("first-token"));

    std::fs::write(&token, "second-token\n").expect("rotate token");
    reload.notify_one();
    relay.wait_metrics("reloaded", |m| metric(m, "switchboard_config_reloads_total{result=\"ok\"}") == 1.0).await;
    assert_eq!(post(&relay.url("/in"), "text/plain", "two").await.0, 200);
    let got = app.wait_for(2, WAIT).await;
    assert_eq!(got[1].header("x-token").as_deref(), Some("second-token"), "the rotated value");
    relay.stop().await.expect("stop");
}

/// On JetStream, destinations added and removed by reloads (issue 25): an
/// added one (ordered per key) gets what arrives after it, a removed one's
/// undelivered callbacks wait in the stream (and it is listed, not
/// configured, with them), and when it is added again it gets them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jetstream_destinations_come_and_go_with_reloads() {
    let dir = std::sync::Arc::new(tempfile::tempdir().expect("tempdir"));
    let nats = crate::nats::NatsNode::single(dir.path());
    let a = TestReceiver::ok().await;
    let b_up = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
    let taken: std::sync::Arc<std::sync::Mutex<Vec<String>>> = Default::default();
    let (flag, t) = (b_up.clone(), taken.clone());
    let b = TestReceiver::scripted(move |_, got| {
        if !flag.load(std::sync::atomic::Ordering::SeqCst) {
            return Reply::Status(503);
        }
        t.lock().expect("lock").push(String::from_utf8_lossy(&got.body).into_owned());
        Reply::Status(200)
    })
    .await;
    let retry = "retry = { initial = \"10ms\", max_interval = \"50ms\" }";
    let ordered = format!("ordering = \"per_key\"\norder_key = \"n\"\n{retry}");
    let only_a = crate::jetstream::jet_config(&[nats.url()], "rl", 1, &[("a", &a.url("/a"), "")]);
    let both =
        crate::jetstream::jet_config(&[nats.url()], "rl", 1, &[("a", &a.url("/a"), ""), ("b", &b.url("/b"), &ordered)]);
    let reload = std::sync::Arc::new(tokio::sync::Notify::new());
    let relay = TestRelay::start_with_reload(dir.clone(), &only_a, reload.clone()).await;
    let reloads = |n: f64| {
        let relay = &relay;
        async move {
            relay.wait_metrics("reloaded", |m| metric(m, "switchboard_config_reloads_total{result=\"ok\"}") == n).await;
        }
    };
    let url = relay.url("/in");
    let send = |n: usize| post(&url, "application/json", format!("{{\"n\":{n}}}"));
    assert_eq!(send(0).await.0, 200);
    a.wait_for(1, WAIT).await;

    // b added: it gets what arrives from now on.
    write_config(dir.path(), &both);
    reload.notify_one();
    reloads(1.0).await;
    assert_eq!(send(1).await.0, 200);
    let got = b.wait_for(1, WAIT).await;
    assert_eq!(String::from_utf8_lossy(&got[0].body), "{\"n\":1}");

    // b refuses, then is removed with a callback undelivered.
    b_up.store(false, std::sync::atomic::Ordering::SeqCst);
    assert_eq!(send(2).await.0, 200);
    b.wait_for(2, WAIT).await;
    write_config(dir.path(), &only_a);
    reload.notify_one();
    reloads(2.0).await;
    assert_eq!(send(3).await.0, 200);
    a.wait_for(4, WAIT).await;
    // Reported as locally: not configured, its callback waiting.
    let v = eventually!(WAIT, "b listed with what waits for it", {
        let (_, _, body) = get(&relay.admin_url("/api/destinations")).await;
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
        let b = v["destinations"].as_array().and_then(|a| a.iter().find(|d| d["name"] == "b")).cloned();
        match b {
            Some(b) if b["pending"].as_u64().is_some_and(|n| n >= 1) => Ok(b),
            _ => Err(v.to_string()),
        }
    });
    assert_eq!(v["configured"], false, "{v}");

    // Back, and up: the kept callback reaches it (and nothing routed while
    // it was gone).
    b_up.store(true, std::sync::atomic::Ordering::SeqCst);
    write_config(dir.path(), &both);
    reload.notify_one();
    reloads(3.0).await;
    b.wait_until(WAIT, "the callback kept while b was removed", |_| taken.lock().expect("lock").len() >= 2).await;
    let taken = taken.lock().expect("lock").clone();
    assert_eq!(taken, ["{\"n\":1}", "{\"n\":2}"], "n=2 kept for b; n=3 was not routed to it");
    relay.stop().await.expect("stop");
}
