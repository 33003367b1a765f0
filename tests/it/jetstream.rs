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
    // Listed as dead too, with its receive time.
    let (s, _, b) = get(&relay.admin_url("/api/messages?destination=picky&state=dead")).await;
    assert_eq!(s, 200, "{}", String::from_utf8_lossy(&b));
    let v: serde_json::Value = serde_json::from_slice(&b).expect("json");
    assert_eq!(v["messages"][0]["id"].as_str(), Some(bad_id.as_str()), "{v}");
    assert!(v["messages"][0]["received_at"].as_str().is_some_and(|t| t.starts_with("20")), "{v}");
    assert_eq!(v["messages"].as_array().map(Vec::len), Some(1), "{v}");

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

/// Runs `switchboard run` on `config`, which must exit by itself within
/// the wait; returns its exit code and what it printed.
async fn run_until_exit(config: &std::path::Path) -> (Option<i32>, String) {
    let child = tokio::process::Command::new(env!("CARGO_BIN_EXE_switchboard"))
        .args(["run", "--config"])
        .arg(config)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("spawn");
    let out = tokio::time::timeout(WAIT, child.wait_with_output())
        .await
        .expect("switchboard run exits by itself")
        .expect("wait");
    (out.status.code(), String::from_utf8_lossy(&out.stderr).into_owned())
}

/// Wrong credentials: one clear error, and the relay exits (retrying
/// would not help). A stream with the wrong retention: refused, named,
/// left as it was.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_credentials_and_a_mismatched_stream_are_refused_clearly() {
    let dir = tempfile::tempdir().expect("tempdir");
    let nats = NatsNode::single_with(dir.path(), free_port(), "authorization { user: sb, password: right-one }");
    let r = TestReceiver::ok().await;
    let store = |pw: &str, stream: &str| {
        jet_config(&[nats.url()], stream, 1, &[("a", &r.url("/a"), "")])
            .replace("replicas = 1\n", &format!("replicas = 1\nuser = \"sb\"\npassword = \"{pw}\"\n"))
    };
    let path = crate::binary::write(dir.path(), &store("wrong-one", "sbw"));
    let (code, err) = run_until_exit(&path).await;
    assert_ne!(code, Some(0));
    assert!(err.contains("refused the credentials"), "{err}");
    assert!(!err.contains("wrong-one") && !err.contains("right-one"), "no password in errors: {err}");

    // A stream of that name with Limits retention, made by someone else.
    let client = async_nats::ConnectOptions::new()
        .user_and_password("sb".into(), "right-one".into())
        .connect(nats.url())
        .await
        .expect("connect");
    let js = async_nats::jetstream::new(client);
    js.create_stream(async_nats::jetstream::stream::Config {
        name: "sbl".into(),
        subjects: vec!["sbl.in".into()],
        ..Default::default()
    })
    .await
    .expect("create stream");
    let path = crate::binary::write(dir.path(), &store("right-one", "sbl"));
    let (code, err) = run_until_exit(&path).await;
    assert_ne!(code, Some(0));
    assert!(err.contains("retention") && err.contains("\"sbl\""), "{err}");
    let info = js.get_stream("sbl").await.expect("stream").cached_info().config.retention;
    assert_eq!(info, async_nats::jetstream::stream::RetentionPolicy::Limits, "left as it was");

    // The right retention, one replica, while the configuration says three.
    js.create_stream(async_nats::jetstream::stream::Config {
        name: "sbr".into(),
        subjects: vec!["sbr.in".into()],
        retention: async_nats::jetstream::stream::RetentionPolicy::Interest,
        ..Default::default()
    })
    .await
    .expect("create stream");
    let path = crate::binary::write(dir.path(), &store("right-one", "sbr").replace("replicas = 1\n", "replicas = 3\n"));
    let (code, err) = run_until_exit(&path).await;
    assert_ne!(code, Some(0));
    assert!(err.contains("has 1 replicas; store.replicas is 3"), "{err}");
}

/// NATS not there at start: the relay runs, /readyz and callbacks are 503
/// (with Retry-After); once NATS comes up, it is ready by itself and
/// delivers. A callback over the server's max_payload is 413, with the limit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_at_start_then_ready_and_max_payload_is_413() {
    use crate::binary::{write, RelayProcess};
    let dir = tempfile::tempdir().expect("tempdir");
    let port = free_port();
    let r = TestReceiver::ok().await;
    let path =
        write(dir.path(), &jet_config(&[format!("nats://127.0.0.1:{port}")], "late", 1, &[("a", &r.url("/a"), "")]));
    let relay = RelayProcess::start(&path).await;
    let (s, _, _) = get(&relay.admin_url("/readyz")).await;
    assert_eq!(s, 503);
    let (s, headers, _) = post(&relay.url("/in"), "text/plain", "too early").await;
    assert_eq!(s, 503);
    assert!(headers.contains_key("retry-after"));
    relay.wait_log("NATS not reachable").await;

    let _nats = NatsNode::single_with(dir.path(), port, "max_payload: 4096");
    eventually!(WAIT, "ready after NATS came up", {
        if get(&relay.admin_url("/readyz")).await.0 == 200 {
            Ok(())
        } else {
            Err(relay.logs())
        }
    });
    let (s, _, body) = post(&relay.url("/in"), "text/plain", "now").await;
    assert_eq!(s, 200, "{}", String::from_utf8_lossy(&body));
    r.wait_for(1, WAIT).await;
    let (s, _, body) = post(&relay.url("/in"), "text/plain", "x".repeat(8192)).await;
    assert_eq!(s, 413, "{}", String::from_utf8_lossy(&body));
    let limit = 4096 - 512;
    assert!(String::from_utf8_lossy(&body).contains(&limit.to_string()), "{}", String::from_utf8_lossy(&body));
}

#[test]
fn what_jetstream_cannot_do_is_a_config_error() {
    let dir = tempfile::tempdir().expect("tempdir");
    // `check` validates; it never connects, so the address is only text.
    let jet = |extra: &str, store_extra: &str| {
        jet_config(&["nats://127.0.0.1:4222".into()], "s", 1, &[("a", "http://127.0.0.1:1/a", extra)])
            .replace("replicas = 1\n", &format!("replicas = 1\n{store_extra}"))
    };
    for (toml, key, why) in [
        (
            jet_config(
                &["nats://127.0.0.1:4222".into()],
                "s",
                1,
                &[
                    ("a", "http://127.0.0.1:1/a", "ordering = \"per_key\"\norder_key = \"id\""),
                    ("b", "http://127.0.0.1:1/b", "ordering = \"per_key\"\norder_key = \"header:x-id\""),
                ],
            ),
            "destinations.b.order_key",
            "the same order_key as destinations.a",
        ),
        (jet("", "order_partitions = 0\n"), "store.order_partitions", "must be 1 to 256"),
        (
            config(&[("a", "http://127.0.0.1:1/a", "")]).replace("[store]\n", "[store]\norder_partitions = 4\n"),
            "store.order_partitions",
            "only used with",
        ),
        (jet("", "replicas = 2\n"), "", ""),
        (jet("", "token = \"t\"\nnkey = \"SUx\"\n"), "store", "one way to authenticate"),
        (jet("", "").replace("ack_wait = \"3s\"", "ack_wait = \"1s\""), "store.ack_wait", "at least 3s"),
        (
            config(&[("a", "http://127.0.0.1:1/a", "")])
                .replace("[store]\n", "[store]\nservers = [\"nats://127.0.0.1:4222\"]\n"),
            "store.servers",
            "only used with",
        ),
    ] {
        if key.is_empty() {
            // TOML refuses a key given twice: still a config error naming it.
            let out = crate::binary::check(&crate::binary::write(dir.path(), &toml));
            assert_eq!(out.status.code(), Some(78));
            assert!(String::from_utf8_lossy(&out.stderr).contains("replicas"));
            continue;
        }
        let out = crate::binary::check(&crate::binary::write(dir.path(), &toml));
        assert_eq!(out.status.code(), Some(78), "{toml}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(key) && err.contains(why), "{toml}: {err}");
    }
    let out = crate::binary::check(&crate::binary::write(
        dir.path(),
        &jet("", "").replace("replicas = 1\n", "replicas = 2\n"),
    ));
    assert!(String::from_utf8_lossy(&out.stderr).contains("store.replicas"), "must be 1 or 3");
    // A valid file passes, and `check` says what this store lacks.
    let out = crate::binary::check(&crate::binary::write(dir.path(), &jet("", "")));
    let all = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert_eq!(out.status.code(), Some(0), "{all}");
    // The capability table's row, every entry named.
    assert!(all.contains("store.kind: \"jetstream\" does not provide "), "{all}");
    assert!(!all.contains("message listing"), "JetStream lists: {all}");
    assert!(all.contains("answers 501") && all.contains("bringing retries forward"), "{all}");
    assert!(!all.contains("ordering per key"), "JetStream orders: {all}");
    let out = crate::binary::check(&crate::binary::write(dir.path(), &jet("ordering = \"fifo\"", "")));
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
}

/// An attempt longer than the consumer's ack_wait (3 s here) keeps its
/// lease: the relay renews it while the destination takes 5 s, so the
/// server never hands the message out again meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_attempt_keeps_its_lease() {
    let dir = tempfile::tempdir().expect("tempdir");
    let nats = NatsNode::single(dir.path());
    let slow = TestReceiver::scripted(|_, _| Reply::Slow(std::time::Duration::from_secs(5), 200)).await;
    let relay =
        TestRelay::start(&jet_config(&[nats.url()], "slow", 1, &[("slow", &slow.url("/s"), "timeout = \"10s\"")]))
            .await;
    assert_eq!(post(&relay.url("/in"), "text/plain", "take your time").await.0, 200);
    slow.wait_for(1, WAIT).await;
    relay
        .wait_metrics("the delivery", |m| {
            metric(m, "switchboard_deliveries_total{destination=\"slow\",outcome=\"delivered\"}") == 1.0
        })
        .await;
    assert_eq!(slow.count(), 1, "the message was handed out again during the attempt");
    relay.stop().await.expect("stop");
}

/// The JetStream store over TLS to a server that requires a client
/// certificate, authenticated by an NKey (the production setup): callbacks
/// are stored and delivered. Without the client certificate, or with
/// another NKey, the relay refuses to run with one line that names no
/// secret.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jetstream_over_tls_with_a_client_certificate_and_an_nkey() {
    let dir = tempfile::tempdir().expect("tempdir");
    let TlsNkeyNode { nats, ca_file, client_cert, client_key, seed } = TlsNkeyNode::start(dir.path());
    let r = TestReceiver::ok().await;
    let url = format!("tls://127.0.0.1:{}", nats.port);
    let toml = |store_extra: &str| {
        jet_config(std::slice::from_ref(&url), "tlsnk", 1, &[("a", &r.url("/a"), "")])
            .replace("replicas = 1\n", &format!("replicas = 1\n{store_extra}"))
    };
    let tls = format!(
        "ca_file = {:?}\nclient_cert = {:?}\nclient_key = {:?}\n",
        ca_file.display().to_string(),
        client_cert.display().to_string(),
        client_key.display().to_string()
    );
    let relay = TestRelay::start(&toml(&format!("{tls}nkey = {seed:?}\n"))).await;
    let (s, _, body) = post(&relay.url("/in"), "text/plain", "over tls").await;
    assert_eq!(s, 200, "{}", String::from_utf8_lossy(&body));
    let got = r.wait_for(1, WAIT).await;
    assert_eq!(&got[0].body[..], b"over tls");
    relay.stop().await.expect("stop");

    // Another NKey; then no client certificate.
    let other = nkeys::KeyPair::new_user().seed().expect("seed");
    let no_cert = format!("ca_file = {:?}\n", ca_file.display().to_string());
    for (extra, secret) in
        [(format!("{no_cert}nkey = {seed:?}\n"), seed.clone()), (format!("{tls}nkey = {other:?}\n"), other.clone())]
    {
        let path = crate::binary::write(dir.path(), &toml(&extra));
        let (code, err) = run_until_exit(&path).await;
        assert_ne!(code, Some(0), "{err}");
        assert!(!err.contains(&secret), "no seed in errors: {err}");
        assert!(err.contains("refused the credentials") || err.contains("TLS with NATS failed"), "{err}");
    }
}

/// Issue 25, point 4: with `[store.encryption]`, what a relay publishes is
/// sealed (AES-256-GCM, the local store's keys and format): no body or
/// header byte of a callback in NATS's files, pending, delivered or dead;
/// destinations get the original; a dead letter replays. The control: the
/// same without keys leaves the marker readable in the same files (NATS
/// keeps stored messages as written), so the search would see it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sealed_records_never_reach_nats_in_clear() {
    const KEY: &str = "MDEyMzQ1Njc4OWFiY2RlZjAxMjM0NTY3ODlhYmNkZWY="; // 32 bytes
    let dir = tempfile::tempdir().expect("tempdir");
    let nats = NatsNode::single(dir.path());
    let files_contain = |needle: &[u8]| {
        let mut stack = vec![dir.path().to_path_buf()];
        while let Some(d) = stack.pop() {
            for e in std::fs::read_dir(&d).expect("read dir").flatten() {
                let p = e.path();
                if p.is_dir() {
                    stack.push(p);
                } else if std::fs::read(&p).is_ok_and(|b| b.windows(needle.len()).any(|w| w == needle)) {
                    return true;
                }
            }
        }
        false
    };
    let hour = "retry = { initial = \"1h\", max_interval = \"1h\" }";

    // Control: plain records are readable in NATS's files.
    let later = TestReceiver::scripted(|_, _| Reply::Status(503)).await;
    let plain = TestRelay::start(&jet_config(&[nats.url()], "plain", 1, &[("later", &later.url("/l"), hour)])).await;
    assert_eq!(post(&plain.url("/in"), "application/json", r#"{"m":"PLAIN-MARKER-7f3a"}"#).await.0, 200);
    later.wait_for(1, WAIT).await;
    plain.stop().await.expect("stop");
    assert!(files_contain(b"PLAIN-MARKER-7f3a"), "the control: a plain record is in NATS's files");

    // Sealed: pending (later), delivered (ok), dead (refusing).
    let ok = TestReceiver::ok().await;
    let accept = Arc::new(AtomicBool::new(false));
    let flag = accept.clone();
    let refusing =
        TestReceiver::scripted(move |_, _| Reply::Status(if flag.load(Ordering::SeqCst) { 200 } else { 400 })).await;
    let toml = jet_config(
        &[nats.url()],
        "sealed",
        1,
        &[("ok", &ok.url("/o"), ""), ("later", &later.url("/l"), hour), ("refusing", &refusing.url("/r"), "")],
    ) + &format!("\n[store.encryption]\nkeys = [{{ id = \"k1\", key = \"{KEY}\" }}]\n");
    let relay = TestRelay::start(&toml).await;
    let body = r#"{"secret":"SEALED-MARKER-91c2"}"#;
    let (s, _, ack) = request(
        "POST",
        &relay.url("/in"),
        &[("content-type", "application/json"), ("x-marker", "HDR-MARKER-55d1")],
        body,
    )
    .await;
    assert_eq!(s, 200, "{}", String::from_utf8_lossy(&ack));
    let got = ok.wait_for(1, WAIT).await;
    assert_eq!((&got[0].body[..], got[0].header("x-marker").as_deref()), (body.as_bytes(), Some("HDR-MARKER-55d1")));
    later.wait_for(2, WAIT).await;
    let dead = eventually!(WAIT, "the dead letter at refusing", {
        let (_, _, b) = get(&relay.admin_url("/api/dead-letters/refusing")).await;
        let v: serde_json::Value = serde_json::from_slice(&b).expect("json");
        if v["dead_letters"].as_array().is_some_and(|d| d.len() == 1) {
            Ok(v)
        } else {
            Err(v.to_string())
        }
    });
    assert_eq!(dead["dead_letters"][0]["last_status"], 400, "{dead}");
    assert!(files_contain(b"Switchboard-Seal"), "sealed records were written (their seal header is)");
    for marker in [&b"SEALED-MARKER-91c2"[..], b"HDR-MARKER-55d1"] {
        assert!(!files_contain(marker), "{} in NATS's files", String::from_utf8_lossy(marker));
    }
    // The dead letter opens again on replay: the original reaches refusing.
    accept.store(true, Ordering::SeqCst);
    let (s, _, _) = request("POST", &relay.admin_url("/api/dead-letters/refusing/replay"), &[], "").await;
    assert_eq!(s, 200);
    let got = refusing.wait_for(2, WAIT).await;
    assert_eq!(&got[1].body[..], body.as_bytes(), "replayed as received");
    relay.stop().await.expect("stop");
    // `check` no longer refuses encryption with JetStream.
    let dir2 = tempfile::tempdir().expect("tempdir");
    let out = crate::binary::check(&crate::binary::write(dir2.path(), &toml));
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
}

/// Issue 25, point 1.1 (inspection and attempt history): `GET
/// /api/messages/{id}` on the JetStream store shows each destination's
/// state and attempts, as the local store does: delivered with its 200,
/// pending with its 503 and the next attempt's time; the CLI too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jetstream_messages_show_each_deliverys_state_and_attempts() {
    let dir = tempfile::tempdir().expect("tempdir");
    let nats = NatsNode::single(dir.path());
    let ok = TestReceiver::ok().await;
    let busy = TestReceiver::scripted(|_, _| Reply::Body(503, "busy now")).await;
    let hour = "retry = { initial = \"1h\", max_interval = \"1h\" }";
    let relay = TestRelay::start(&jet_config(
        &[nats.url()],
        "hist",
        1,
        &[("ok", &ok.url("/o"), ""), ("busy", &busy.url("/b"), hour)],
    ))
    .await;
    let id = acked_id(&post(&relay.url("/in"), "application/json", r#"{"n":1}"#).await.2);
    ok.wait_for(1, WAIT).await;
    busy.wait_for(1, WAIT).await;
    let v = eventually!(WAIT, "both deliveries' history", {
        let (s, _, b) = get(&relay.admin_url(&format!("/api/messages/{id}"))).await;
        let v: serde_json::Value = serde_json::from_slice(&b).unwrap_or_default();
        let d = |name: &str| v["destinations"].as_array().and_then(|a| a.iter().find(|d| d["name"] == name)).cloned();
        match (s, d("ok"), d("busy")) {
            (200, Some(o), Some(b))
                if o["state"] == "delivered" && b["attempts"].as_array().is_some_and(|a| !a.is_empty()) =>
            {
                Ok(v.clone())
            }
            _ => Err(format!("{s} {v}")),
        }
    });
    let d = |name: &str| v["destinations"].as_array().and_then(|a| a.iter().find(|d| d["name"] == name)).cloned();
    let (o, b) = (d("ok").expect("ok"), d("busy").expect("busy"));
    assert_eq!(o["attempts"][0]["status"], 200, "{v}");
    assert!(o["delivered_at"].is_string(), "{v}");
    assert_eq!((b["state"].as_str(), b["attempts"][0]["status"].as_u64()), (Some("pending"), Some(503)), "{v}");
    assert!(b["next_attempt_at"].is_string(), "{v}");
    assert!(b["attempts"][0]["response"].as_str().is_some_and(|r| r.contains("busy now")), "{v}");
    // The CLI shows it the same way; listing is still refused with its reason.
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_switchboard"))
        .args(["messages", "show", &id, "--admin", &relay.admin_url("")])
        .output()
        .await
        .expect("cli");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success() && text.contains("busy") && text.contains("503"), "{text}");
    // Listed by destination and state: pending at busy, delivered at ok
    // (still in the work stream: busy holds it), nothing before it.
    let listed = |q: &'static str| {
        let url = relay.admin_url(&format!("/api/messages?{q}"));
        async move {
            let (s, _, b) = get(&url).await;
            assert_eq!(s, 200, "{q}: {}", String::from_utf8_lossy(&b));
            let v: serde_json::Value = serde_json::from_slice(&b).expect("json");
            v["messages"]
                .as_array()
                .expect("messages")
                .iter()
                .filter_map(|m| m["id"].as_str().map(str::to_owned))
                .collect::<Vec<_>>()
        }
    };
    assert_eq!(listed("destination=busy&state=pending").await, vec![id.clone()]);
    assert_eq!(listed("destination=ok&state=delivered").await, vec![id.clone()]);
    assert!(listed("destination=ok&state=pending").await.is_empty());
    assert!(listed("destination=busy&state=delivered").await.is_empty());
    // Unknown or gone: 404, as locally.
    let gone = format!("{}{:016x}", &id[..id.len() - 16], 1_000_000u64);
    assert_eq!(get(&relay.admin_url(&format!("/api/messages/{gone}"))).await.0, 404);
    relay.stop().await.expect("stop");
}

/// `store.retain_delivered` on JetStream: a delivered message stays
/// inspectable after it left the work stream (from the kept stream, with
/// its history and when it expires), and `messages replay D --since T`
/// sends what D got to D alone again, keeping the ids; a message D did not
/// get (dead-lettered) is not sent as delivered; sealed records stay
/// sealed in the copy.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jetstream_keeps_delivered_messages_and_sends_them_again() {
    let dir = tempfile::tempdir().expect("tempdir");
    let nats = NatsNode::single(dir.path());
    let billing = TestReceiver::scripted(|_, got| {
        Reply::Status(if String::from_utf8_lossy(&got.body).contains("refused") { 400 } else { 200 })
    })
    .await;
    let audit = TestReceiver::ok().await;
    let toml =
        jet_config(&[nats.url()], "kept", 1, &[("billing", &billing.url("/b"), ""), ("audit", &audit.url("/a"), "")])
            .replace("[store]\n", "[store]\nretain_delivered = \"1h\"\n");
    let relay = TestRelay::start(&toml).await;
    let before = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).expect("clock").as_millis() as u64;
    let mut ids = Vec::new();
    for i in 0..3 {
        ids.push(acked_id(&post(&relay.url("/in"), "application/json", format!("{{\"n\":{i}}}")).await.2));
    }
    let refused = acked_id(&post(&relay.url("/in"), "application/json", r#"{"n":"refused"}"#).await.2);
    audit.wait_for(4, WAIT).await;
    billing.wait_for(4, WAIT).await;
    // Delivered everywhere, gone from the work stream (Interest retention),
    // still shown with its history.
    let v = eventually!(WAIT, "a delivered message shown from the kept stream", {
        let (s, _, b) = get(&relay.admin_url(&format!("/api/messages/{}", ids[0]))).await;
        let v: serde_json::Value = serde_json::from_slice(&b).unwrap_or_default();
        let states: Vec<&str> = v["destinations"]
            .as_array()
            .map(|a| a.iter().filter_map(|d| d["state"].as_str()).collect())
            .unwrap_or_default();
        if s == 200 && states == ["delivered", "delivered"] && v["retained_until"].is_string() {
            Ok(v.clone())
        } else {
            Err(format!("{s} {v}"))
        }
    });
    assert_eq!(v["id"], ids[0].as_str(), "{v}");
    let relay_metrics = relay.wait_metrics("4 kept", |m| metric(m, "switchboard_store_retained_messages") == 4.0).await;
    assert!(metric(&relay_metrics, "switchboard_store_retained_bytes") > 0.0);

    // Sent again to billing alone, by time through the CLI; the refused
    // (dead-lettered) one is not among them.
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_switchboard"))
        .args(["messages", "replay", "billing", "--since", &before.to_string(), "--admin", &relay.admin_url("")])
        .output()
        .await
        .expect("cli");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).contains("sending 3 message(s) again"), "{out:?}");
    let got = billing.wait_for(7, WAIT).await;
    let again: std::collections::BTreeSet<String> =
        got[4..].iter().filter_map(|g| g.header("x-switchboard-id")).collect();
    assert_eq!(again, ids.iter().cloned().collect(), "the same ids, the refused one not among them");
    assert!(!again.contains(&refused));
    assert_eq!(audit.count(), 4, "audit was not asked");
    // By id through the API.
    let (s, _, body) = request(
        "POST",
        &relay.admin_url(&format!("/api/destinations/billing/replay?state=delivered&id={}", ids[1])),
        &[],
        "",
    )
    .await;
    assert_eq!(s, 200, "{}", String::from_utf8_lossy(&body));
    let got = billing.wait_for(8, WAIT).await;
    assert_eq!(got[7].header("x-switchboard-id").as_deref(), Some(ids[1].as_str()));
    // `check` says where they are kept.
    let path = crate::binary::write(dir.path(), &toml);
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_switchboard"))
        .args(["check", "--config"])
        .arg(&path)
        .output()
        .await
        .expect("check");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("kept 1h (store.retain_delivered) in the stream kept-kept"), "{text}");
    assert_eq!(billing.count(), 8, "nothing else sent");
}

/// `routes[].index` on JetStream: callbacks are found by an indexed body
/// field from either of two relays (the index is a stream both read), in
/// the order received, with their receive times; each found id can be
/// inspected; the CLI's `messages find` says the same.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jetstream_finds_callbacks_by_an_indexed_field_from_any_relay() {
    let dir = tempfile::tempdir().expect("tempdir");
    let nats = NatsNode::single(dir.path());
    let r = TestReceiver::ok().await;
    // Paused: the callbacks stay in the work stream, to be inspected.
    let toml = jet_config(&[nats.url()], "found", 1, &[("app", &r.url("/app"), "paused = true")])
        .replace("destinations = [\"app\"]\n", "destinations = [\"app\"]\nindex = [\"requestId\"]\n");
    let one = TestRelay::start(&toml).await;
    let two = TestRelay::start(&toml).await;
    for relay in [&one, &two] {
        eventually!(WAIT, "the relay ready", {
            match get(&relay.admin_url("/readyz")).await.0 {
                200 => Ok(()),
                s => Err(format!("readyz {s}")),
            }
        });
    }
    let mut r1 = Vec::new();
    for (relay, dev) in [(&one, "d1"), (&two, "d2")] {
        let body = format!(r#"{{"requestId":"r-1","deviceIds":[{{"id":"{dev}"}}]}}"#);
        let (s, _, b) = post(&relay.url("/in"), "application/json", body).await;
        assert_eq!(s, 200, "{}", String::from_utf8_lossy(&b));
        r1.push(acked_id(&b));
    }
    assert_eq!(post(&one.url("/in"), "application/json", r#"{"requestId":"r-2"}"#).await.0, 200);
    let find = |relay: &TestRelay, value: &str| {
        let url = relay.admin_url(&format!("/api/messages?field=requestId&value={value}"));
        async move {
            let (s, _, b) = get(&url).await;
            assert_eq!(s, 200, "{}", String::from_utf8_lossy(&b));
            serde_json::from_slice::<serde_json::Value>(&b).expect("json")["messages"].clone()
        }
    };
    for relay in [&one, &two] {
        let found = eventually!(WAIT, "both r-1 callbacks indexed", {
            let v = find(relay, "r-1").await;
            let ids: Vec<String> =
                v.as_array().into_iter().flatten().filter_map(|m| m["id"].as_str().map(str::to_string)).collect();
            if ids == r1 {
                Ok(v)
            } else {
                Err(format!("{ids:?} (want {r1:?})"))
            }
        });
        assert!(found[0]["received_at"].as_str().is_some_and(|t| t.starts_with("20")), "{found}");
        assert_eq!(find(relay, "r-3").await.as_array().map(Vec::len), Some(0));
    }
    for id in &r1 {
        assert_eq!(get(&two.admin_url(&format!("/api/messages/{id}"))).await.0, 200, "{id} can be inspected");
    }
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_switchboard"))
        .args(["messages", "find", "requestId", "r-1", "--admin", &two.admin_url("")])
        .output()
        .await
        .expect("cli");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success() && r1.iter().all(|id| text.contains(id.as_str())), "{text}");
    one.stop().await.expect("stop");
    two.stop().await.expect("stop");
}

/// A kept stream made by an older build (sourcing the work stream, with
/// which NATS dropped callbacks when a relay was killed: docs/jetstream.md)
/// is turned into the relay's own copies at start: its source removed, its
/// subject set; a callback after that is kept once and shown from its copy.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sourced_kept_stream_of_an_older_build_is_converted_at_start() {
    let dir = tempfile::tempdir().expect("tempdir");
    let nats = NatsNode::single(dir.path());
    let r = TestReceiver::ok().await;
    let toml = jet_config(&[nats.url()], "old", 1, &[("app", &r.url("/a"), "")])
        .replace("[store]\n", "[store]\nretain_delivered = \"1h\"\n");
    TestRelay::start(&toml).await.stop().await.expect("stop");
    // What an older build made: a source, no subjects.
    let js = async_nats::jetstream::new(async_nats::connect(nats.url()).await.expect("connect"));
    let mut kept = js.get_stream("old-kept").await.expect("kept stream");
    let mut config = kept.info().await.expect("info").config.clone();
    config.subjects = Vec::new();
    config.sources = Some(vec![async_nats::jetstream::stream::Source { name: "old".into(), ..Default::default() }]);
    js.update_stream(&config).await.expect("make it sourced");

    let relay = TestRelay::start(&toml).await;
    let id = acked_id(&post(&relay.url("/in"), "application/json", "{\"n\":1}").await.2);
    r.wait_for(1, WAIT).await;
    eventually!(WAIT, "the delivered callback shown from its copy", {
        let (s, _, b) = get(&relay.admin_url(&format!("/api/messages/{id}"))).await;
        let v: serde_json::Value = serde_json::from_slice(&b).unwrap_or_default();
        let delivered = v["destinations"][0]["state"] == "delivered";
        if s == 200 && delivered && v["retained_until"].is_string() {
            Ok(())
        } else {
            Err(format!("{s} {v}"))
        }
    });
    let info = kept.info().await.expect("info").clone();
    assert!(info.config.sources.as_ref().is_none_or(|s| s.is_empty()), "source removed: {:?}", info.config.sources);
    assert_eq!(info.config.subjects, vec!["old.kept.>".to_string()]);
    assert_eq!(info.state.messages, 1, "one copy, none from a source");
}

/// A destination's first consumer starts at the stream's next sequence as
/// read when it is made, not at `DeliverPolicy::New`: NATS picks New's
/// start when the consumer's leader is elected, which on a busy R3
/// cluster came after callbacks had been acknowledged (they were never
/// sent to that destination).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_destination_starts_at_the_streams_next_sequence() {
    let dir = tempfile::tempdir().expect("tempdir");
    let nats = NatsNode::single(dir.path());
    let (a, b) = (TestReceiver::ok().await, TestReceiver::ok().await);
    let one = jet_config(&[nats.url()], "starts", 1, &[("a", &a.url("/a"), "")]);
    let relay = TestRelay::start(&one).await;
    for i in 0..3 {
        acked_id(&post(&relay.url("/in"), "application/json", format!("{{\"n\":{i}}}")).await.2);
    }
    a.wait_for(3, WAIT).await;
    relay.stop().await.expect("stop");
    let js = async_nats::jetstream::new(async_nats::connect(nats.url()).await.expect("connect"));
    let mut stream = js.get_stream("starts").await.expect("stream");
    let last = stream.info().await.expect("info").state.last_sequence;
    assert!(last >= 3, "three callbacks stored: {last}");

    let two = jet_config(&[nats.url()], "starts", 1, &[("a", &a.url("/a"), ""), ("b", &b.url("/b"), "")]);
    let relay = TestRelay::start(&two).await;
    acked_id(&post(&relay.url("/in"), "application/json", "{\"n\":3}").await.2);
    b.wait_for(1, WAIT).await;
    let info = stream.consumer_info("d-b").await.expect("b's consumer");
    assert_eq!(
        info.config.deliver_policy,
        async_nats::jetstream::consumer::DeliverPolicy::ByStartSequence { start_sequence: last + 1 },
        "b starts after what was stored before it existed"
    );
    assert_eq!(b.count(), 1, "b got only what arrived after it was added");
}

/// Delivery history is read from the bucket stream's leader, not by
/// direct get: every replica answers a direct get (and so does a mirror
/// with `mirror_direct`), and one that lags behind answers an older state
/// (the CI failure of 2026-12-03: a delivered callback whose history
/// showed no attempt). Here a mirror of the history bucket whose copies
/// have expired stands for a replica without the key: NATS hands it about
/// half the direct gets, and it answers "no such key", so 40 inspections
/// in a row by direct get would each have about one chance in two of
/// showing "pending, no attempt".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn history_is_read_from_the_leader_not_from_a_replica_that_lags() {
    let dir = tempfile::tempdir().expect("tempdir");
    let nats = NatsNode::single(dir.path());
    let r = TestReceiver::ok().await;
    // Kept after delivery, so the callback stays inspectable.
    let toml = jet_config(&[nats.url()], "lag", 1, &[("app", &r.url("/a"), "")])
        .replace("[store]\n", "[store]\nretain_delivered = \"1h\"\n");
    let relay = TestRelay::start(&toml).await;
    let id = acked_id(&post(&relay.url("/in"), "application/json", "{\"n\":1}").await.2);
    r.wait_for(1, WAIT).await;
    let url = relay.admin_url(&format!("/api/messages/{id}"));
    let delivered = |s: u16, b: &[u8]| {
        let v: serde_json::Value = serde_json::from_slice(b).unwrap_or_default();
        (s == 200 && v["destinations"][0]["state"] == "delivered", format!("{s} {v}"))
    };
    eventually!(WAIT, "the delivery's history says delivered", {
        let (s, _, b) = get(&url).await;
        match delivered(s, &b) {
            (true, _) => Ok(()),
            (false, seen) => Err(seen),
        }
    });

    // The replica without the key: a mirror of the bucket's stream that
    // answers its direct gets, once its copies have expired.
    use async_nats::jetstream::stream;
    let js = async_nats::jetstream::new(async_nats::connect(nats.url()).await.expect("connect"));
    let mut mirror = js
        .create_stream(stream::Config {
            name: "lag-history-behind".into(),
            mirror: Some(stream::Source { name: "KV_lag-history".into(), ..Default::default() }),
            mirror_direct: true,
            max_age: std::time::Duration::from_secs(1),
            ..Default::default()
        })
        .await
        .expect("a mirror of the history bucket");
    eventually!(WAIT, "the mirror copied the history, then let it expire", {
        match mirror.info().await.map(|i| i.state.clone()) {
            Ok(state) if state.last_sequence >= 1 && state.messages == 0 => Ok(()),
            Ok(state) => Err(format!("{state:?}")),
            Err(e) => Err(e.to_string()),
        }
    });
    for n in 0..40 {
        let (s, _, b) = get(&url).await;
        let (ok, seen) = delivered(s, &b);
        assert!(ok, "inspection {n} read another state than the leader's: {seen}");
    }
}
