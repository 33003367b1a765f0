//! Inspection: what happened to callback X at each destination (states,
//! attempts with status, error and the response's first bytes), and the
//! pages of what a destination has not got.

use crate::support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_shows_each_destinations_state_and_attempts() {
    let ok = TestReceiver::ok().await;
    let busy = TestReceiver::scripted(|_, _| Reply::Status(503)).await;
    let down = dead_addr().await;
    let fast = "retry = { initial = \"20ms\", max_interval = \"40ms\", max_attempts = 3 }";
    let toml = config(&[
        ("ok", &ok.url("/ok"), ""),
        ("busy", &busy.url("/b"), fast),
        ("down", &format!("http://{down}/d"), "retry = { initial = \"1h\", max_interval = \"1h\" }"),
        ("other", &ok.url("/other"), "filter = { path = \"kind\", equals = \"x\" }"),
    ]);
    let relay = TestRelay::start(&toml).await;
    let (s, _, body) = post(&relay.url("/in"), "application/json", r#"{"kind":"y","requestId":"r-1"}"#).await;
    assert_eq!(s, 200);
    let id = acked_id(&body);
    relay
        .wait_metrics("busy dead-lettered, down tried", |m| {
            metric(m, "switchboard_dead_letters{destination=\"busy\"}") == 1.0
                && metric(m, "switchboard_deliveries_total{destination=\"down\",outcome=\"retried\"}") >= 1.0
        })
        .await;
    let (s, _, body) = get(&relay.admin_url(&format!("/api/messages/{id}"))).await;
    assert_eq!(s, 200, "{}", String::from_utf8_lossy(&body));
    let v: serde_json::Value = serde_json::from_slice(&body).expect("json");
    assert_eq!(v["id"], id.as_str());
    assert_eq!(v["route"], "/in");
    assert!(v["received_at"].as_str().is_some_and(|t| t.ends_with('Z')), "{v}");
    assert_eq!(v["body_size"], 30);
    assert!(v.get("body").is_none(), "the body only on request");
    let dest = |name: &str| v["destinations"].as_array().and_then(|a| a.iter().find(|d| d["name"] == name)).cloned();
    let busy_d = dest("busy").expect("busy");
    assert_eq!(busy_d["state"], "dead", "{v}");
    let attempts = busy_d["attempts"].as_array().expect("attempts");
    assert_eq!(attempts.len(), 3, "{v}");
    assert!(attempts.iter().all(|a| a["status"] == 503 && a["at"].is_string() && a["response"] == "ok"), "{v}");
    let down_d = dest("down").expect("down");
    assert_eq!(down_d["state"], "pending", "{v}");
    assert!(down_d["next_attempt_at"].is_string(), "{v}");
    assert_eq!(down_d["attempts"][0]["error"].as_str().map(|e| e.starts_with("connect")), Some(true), "{v}");
    let ok_d = dest("ok").expect("ok");
    assert_eq!(ok_d["state"], "delivered", "{v}");
    assert!(ok_d["delivered_at"].is_string(), "{v}");
    assert_eq!(ok_d["attempts"][0]["status"], 200, "the delivering attempt is kept: {v}");
    assert_eq!(ok_d["attempts"][0]["response"], "ok", "with the answer's first bytes: {v}");
    assert_eq!(dest("other").expect("other")["state"], "filtered", "{v}");

    let (_, _, body) = get(&relay.admin_url(&format!("/api/messages/{id}?body=1"))).await;
    let v: serde_json::Value = serde_json::from_slice(&body).expect("json");
    assert_eq!(v["body"], r#"{"kind":"y","requestId":"r-1"}"#);

    // Pages of what `down` has not got, by time and cursor.
    let mut ids = vec![id.clone()];
    for i in 0..2 {
        ids.push(acked_id(&post(&relay.url("/in"), "application/json", format!("{{\"n\":{i}}}")).await.2));
    }
    let list = |q: String| {
        let url = relay.admin_url(&format!("/api/messages?destination=down&state=pending{q}"));
        async move {
            let (s, _, b) = get(&url).await;
            assert_eq!(s, 200, "{}", String::from_utf8_lossy(&b));
            serde_json::from_slice::<serde_json::Value>(&b).expect("json")
        }
    };
    let page = list("&limit=2".into()).await;
    let got: Vec<&str> = page["messages"].as_array().expect("list").iter().filter_map(|m| m["id"].as_str()).collect();
    assert_eq!(got, [ids[0].as_str(), ids[1].as_str()]);
    let cursor = page["next_cursor"].as_str().expect("a next page").to_string();
    let page = list(format!("&limit=2&cursor={cursor}")).await;
    assert_eq!(page["messages"][0]["id"], ids[2].as_str());
    assert!(page["next_cursor"].is_null());
    let future = crate::store_time_after_now();
    assert_eq!(list(format!("&since={future}")).await["messages"].as_array().map(Vec::len), Some(0));

    let dead = get(&relay.admin_url("/api/messages?destination=busy&state=dead")).await.2;
    let dead: serde_json::Value = serde_json::from_slice(&dead).expect("json");
    assert_eq!(dead["messages"][0]["id"], id.as_str());

    // A purged dead letter is done, and says it was purged, not delivered.
    let (s, _, _) = request("DELETE", &relay.admin_url(&format!("/api/dead-letters/busy?id={id}")), &[], "").await;
    assert_eq!(s, 200);
    let (_, _, body) = get(&relay.admin_url(&format!("/api/messages/{id}"))).await;
    let v: serde_json::Value = serde_json::from_slice(&body).expect("json");
    let busy_state =
        v["destinations"].as_array().and_then(|a| a.iter().find(|d| d["name"] == "busy")).map(|d| d["state"].clone());
    assert_eq!(busy_state, Some(serde_json::json!("purged")), "{v}");

    // The same through the CLI.
    let admin = relay.admin_url("");
    let out = cli(&["messages", "show", &id, "--admin", &admin]).await;
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(
        text.contains("busy") && text.contains("purged") && text.contains("connect") && text.contains("filtered"),
        "{text}"
    );
    let out = cli(&["messages", "list", "down", "--limit", "2", "--admin", &admin]).await;
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains(&ids[1]) && text.contains(&format!("--cursor {}.", ids[1])), "{text}");
    let out = cli(&["messages", "show", "msg_nope", "--admin", &admin]).await;
    assert_eq!(out.status.code(), Some(1), "{}", String::from_utf8_lossy(&out.stderr));

    // Bad input: one clear reason.
    let other_query = format!("/api/messages?destination=down&state=dead&cursor={cursor}");
    for (q, status, why) in [
        ("/api/messages?state=pending", 400, "destination=NAME"),
        ("/api/messages?destination=down&state=lost", 400, "state is"),
        ("/api/messages?destination=down&since=yesterday", 400, "since:"),
        ("/api/messages?destination=down&limit=0", 400, "limit:"),
        ("/api/messages?destination=down&since=2000&until=1000", 400, "until is before since"),
        ("/api/messages?destination=down&cursor=nonsense", 400, "cursor:"),
        (other_query.as_str(), 400, "from another query"),
        ("/api/messages?destination=nowhere", 404, "unknown destination"),
        ("/api/messages/msg_nope", 400, "not a message id"),
        ("/api/dead-letters/nowhere", 404, "unknown destination"),
        ("/api/dead-letters/busy?limit=none", 400, "limit:"),
    ] {
        let (s, _, body) = get(&relay.admin_url(q)).await;
        let v: serde_json::Value = serde_json::from_slice(&body).expect("json");
        assert_eq!(s, status, "{q}: {v}");
        assert!(v["error"].as_str().is_some_and(|e| e.contains(why) && !e.contains('\n')), "{q}: {v}");
    }
    // Empty selections (nothing received after `future`).
    let replay_none = format!("/api/dead-letters/busy/replay?since={future}");
    let purge_none = format!("/api/dead-letters/busy?since={future}");
    let again_none = format!("/api/destinations/down/replay?state=delivered&since={future}");
    for (method, q, status, why) in [
        ("POST", replay_none.as_str(), 404, "nothing to replay: no dead letters of busy match"),
        ("DELETE", purge_none.as_str(), 404, "nothing to purge"),
        ("POST", "/api/dead-letters/busy/replay?since=2000&until=1000", 400, "until is before since"),
        ("POST", again_none.as_str(), 404, "no delivered messages of down match"),
        ("POST", "/api/destinations/down/replay", 400, "state=delivered or state=dead"),
        ("POST", "/api/destinations/nowhere/replay?state=delivered", 404, "unknown destination"),
    ] {
        let (s, _, body) = request(method, &relay.admin_url(q), &[], "").await;
        let v: serde_json::Value = serde_json::from_slice(&body).expect("json");
        assert_eq!(s, status, "{method} {q}: {v}");
        assert!(v["error"].as_str().is_some_and(|e| e.contains(why)), "{method} {q}: {v}");
    }
    let out = cli(&["dlq", "replay", "busy", "--since", &future.to_string(), "--admin", &admin]).await;
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("nothing to replay") && err.trim().lines().count() == 1, "{err}");
    relay.stop().await.expect("stop");
}

/// Runs the CLI binary with `args`.
async fn cli(args: &[&str]) -> std::process::Output {
    tokio::process::Command::new(env!("CARGO_BIN_EXE_switchboard")).args(args).output().await.expect("cli")
}

fn trace_parts(tp: &str) -> (String, String) {
    let p: Vec<&str> = tp.split('-').collect();
    assert_eq!(p.len(), 4, "{tp}");
    assert_eq!((p[0].len(), p[1].len(), p[2].len(), p[3].len()), (2, 32, 16, 2), "{tp}");
    (p[1].to_string(), p[2].to_string())
}

/// Correlation: a callback without `traceparent` gets one at ingress; with
/// one, it keeps the sender's trace. Every attempt to every destination is
/// a child span: the same trace id, a span id of its own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_attempt_is_a_child_span_of_the_messages_trace() {
    let a = TestReceiver::scripted(|n, _| Reply::Status(if n == 0 { 503 } else { 200 })).await;
    let b = TestReceiver::ok().await;
    let fast = "retry = { initial = \"10ms\", max_interval = \"20ms\" }";
    let relay = TestRelay::start(&config(&[("a", &a.url("/a"), fast), ("b", &b.url("/b"), "")])).await;
    assert_eq!(post(&relay.url("/in"), "text/plain", "no trace").await.0, 200);
    let got_a = a.wait_for(2, WAIT).await;
    let got_b = b.wait_for(1, WAIT).await;
    let spans: Vec<(String, String)> =
        got_a.iter().chain(&got_b).map(|r| trace_parts(&r.header("traceparent").expect("traceparent"))).collect();
    assert!(spans.iter().all(|(t, _)| *t == spans[0].0), "one trace: {spans:?}");
    let ids: std::collections::HashSet<&String> = spans.iter().map(|(_, s)| s).collect();
    assert_eq!(ids.len(), 3, "a span per attempt: {spans:?}");

    let sender = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    let (s, _, _) = request("POST", &relay.url("/in"), &[("traceparent", sender)], "traced").await;
    assert_eq!(s, 200);
    let got = b.wait_for(2, WAIT).await;
    let (trace, span) = trace_parts(&got[1].header("traceparent").expect("traceparent"));
    assert_eq!(trace, "4bf92f3577b34da6a3ce929d0e0e4736", "the sender's trace");
    assert_ne!(span, "00f067aa0ba902b7", "a child, not the sender's span");
    relay.stop().await.expect("stop");
}

fn now_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

/// Replay as an operation: the dead letters received in a time range
/// only, run in the background (`wait=0`) and followed to its end; purge
/// likewise; the CLI does the same with `--since`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_letters_replay_and_purge_by_time_range_as_operations() {
    let accept = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flag = accept.clone();
    let r = TestReceiver::scripted(move |_, _| {
        Reply::Status(if flag.load(std::sync::atomic::Ordering::SeqCst) { 200 } else { 400 })
    })
    .await;
    let relay = TestRelay::start(&config(&[("picky", &r.url("/p"), "")])).await;
    let mut ids = Vec::new();
    let mut boundary = Vec::new();
    for i in 0..4 {
        // A boundary between each two callbacks' receive times (the clock
        // moves on by a millisecond: ids carry millisecond receive times).
        let b = now_ms() + 1;
        while now_ms() <= b {
            tokio::task::yield_now().await;
        }
        boundary.push(b + 1);
        ids.push(acked_id(&post(&relay.url("/in"), "text/plain", format!("d{i}")).await.2));
    }
    relay
        .wait_metrics("four dead letters", |m| metric(m, "switchboard_dead_letters{destination=\"picky\"}") == 4.0)
        .await;
    accept.store(true, std::sync::atomic::Ordering::SeqCst);
    // Replay what came since the third boundary: the last two.
    let url = relay.admin_url(&format!("/api/dead-letters/picky/replay?since={}&wait=0", boundary[2]));
    let (s, _, body) = request("POST", &url, &[], "").await;
    assert_eq!(s, 202, "{}", String::from_utf8_lossy(&body));
    let v: serde_json::Value = serde_json::from_slice(&body).expect("json");
    let status = relay.admin_url(v["status"].as_str().expect("status url"));
    let op = eventually!(WAIT, "the operation's end", {
        let (_, _, b) = get(&status).await;
        let op: serde_json::Value = serde_json::from_slice(&b).expect("json");
        if op["finished"] == true {
            Ok(op)
        } else {
            Err(op.to_string())
        }
    });
    assert_eq!(
        (op["replayed"].as_u64(), op["total"].as_u64(), op["done"].as_u64()),
        (Some(2), Some(2), Some(2)),
        "{op}"
    );
    let got = r.wait_for(6, WAIT).await;
    let replayed: std::collections::BTreeSet<String> =
        got[4..].iter().filter_map(|g| g.header("x-switchboard-id")).collect();
    assert_eq!(replayed, ids[2..].iter().cloned().collect(), "only the range");

    // Purge the first one by an until bound (synchronous).
    let url = relay.admin_url(&format!("/api/dead-letters/picky?until={}", boundary[1] - 1));
    let (s, _, body) = request("DELETE", &url, &[], "").await;
    assert_eq!(s, 200);
    assert_eq!(serde_json::from_slice::<serde_json::Value>(&body).expect("json")["purged"], 1);

    // The CLI: the one left, by --since.
    let out =
        cli(&["dlq", "replay", "picky", "--since", &boundary[1].to_string(), "--admin", &relay.admin_url("")]).await;
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).contains("replayed 1"), "{}", String::from_utf8_lossy(&out.stdout));
    let got = r.wait_for(7, WAIT).await;
    assert_eq!(got[6].header("x-switchboard-id").as_deref(), Some(ids[1].as_str()));
    relay.stop().await.expect("stop");
}

/// Lookup by an indexed body field: the callbacks of one ThingSpace
/// request (one requestId, one callback per device), found again after a
/// restart (rebuilt from the log), and forgotten once delivered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_are_found_by_an_indexed_field_across_a_restart() {
    let accept = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flag = accept.clone();
    let r = TestReceiver::scripted(move |_, _| {
        Reply::Status(if flag.load(std::sync::atomic::Ordering::SeqCst) { 200 } else { 503 })
    })
    .await;
    let toml = config(&[("app", &r.url("/app"), "retry = { initial = \"50ms\", max_interval = \"100ms\" }")])
        .replace("destinations = [\"app\"]\n", "destinations = [\"app\"]\nindex = [\"requestId\"]\n");
    let dir = std::sync::Arc::new(tempfile::tempdir().expect("tempdir"));
    let relay = TestRelay::start_in(dir.clone(), &toml).await;
    let mut r1 = Vec::new();
    for dev in ["d1", "d2"] {
        let body = format!(r#"{{"requestId":"r-1","deviceIds":[{{"id":"{dev}"}}]}}"#);
        r1.push(acked_id(&post(&relay.url("/in"), "application/json", body).await.2));
    }
    assert_eq!(post(&relay.url("/in"), "application/json", r#"{"requestId":"r-2"}"#).await.0, 200);
    let find = |relay: &TestRelay, value: &str| {
        let url = relay.admin_url(&format!("/api/messages?field=requestId&value={value}"));
        async move {
            let (s, _, b) = get(&url).await;
            assert_eq!(s, 200, "{}", String::from_utf8_lossy(&b));
            let v: serde_json::Value = serde_json::from_slice(&b).expect("json");
            v["messages"]
                .as_array()
                .expect("list")
                .iter()
                .filter_map(|m| m["id"].as_str().map(str::to_string))
                .collect::<Vec<_>>()
        }
    };
    assert_eq!(find(&relay, "r-1").await, r1);
    assert_eq!(get(&relay.admin_url("/api/messages?field=deviceId&value=x")).await.0, 400, "not an indexed field");
    relay.stop().await.expect("stop");

    let relay = TestRelay::start_in(dir.clone(), &toml).await;
    assert_eq!(find(&relay, "r-1").await, r1, "rebuilt at open");
    let out = cli(&["messages", "find", "requestId", "r-1", "--admin", &relay.admin_url("")]).await;
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains(&r1[0]) && text.contains(&r1[1]), "{text}");
    accept.store(true, std::sync::atomic::Ordering::SeqCst);
    relay.wait_metrics("all delivered", |m| metric(m, "switchboard_queue_depth{destination=\"app\"}") == 0.0).await;
    assert_eq!(find(&relay, "r-1").await, r1, "delivered messages are kept (store.retain_delivered: 24h by default)");
    relay.stop().await.expect("stop");
}

/// Log lines about a failed delivery carry the message id and the route's
/// indexed fields with their values (no ThingSpace parsing in delivery).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failure_log_lines_carry_the_message_id_and_the_routes_indexed_fields() {
    let r = TestReceiver::scripted(|_, _| Reply::Status(503)).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let toml = config(&[("app", &r.url("/a"), "")])
        .replace("path = \"/in\"\n", "path = \"/in\"\nindex = [\"requestId\", \"deviceIds[0].id\"]\n");
    let path = crate::binary::write(dir.path(), &toml);
    let relay = crate::binary::RelayProcess::start(&path).await;
    let (_, _, body) =
        post(&relay.url("/in"), "application/json", r#"{"requestId":"r-log-1","deviceIds":[{"id":"d-7"}]}"#).await;
    let id = acked_id(&body);
    r.wait_for(1, WAIT).await;
    let line = eventually!(WAIT, "the failure line", {
        let logs = relay.logs();
        logs.lines().find(|l| l.contains("delivery failed; will retry")).map(str::to_string).ok_or(logs)
    });
    let v: serde_json::Value = serde_json::from_str(&line).expect("json log line");
    assert_eq!(
        (v["id"].as_str(), v["indexed"].as_str()),
        (Some(id.as_str()), Some("requestId=r-log-1 deviceIds[0].id=d-7")),
        "the route's indexed fields name the callback: {line}"
    );
}

async fn show(relay: &TestRelay, id: &str) -> (u16, serde_json::Value) {
    let (s, _, b) = get(&relay.admin_url(&format!("/api/messages/{id}"))).await;
    (s, serde_json::from_slice(&b).unwrap_or_default())
}

/// `store.retain_delivered`: a message delivered everywhere is still shown
/// (each destination's attempts, when it was delivered, until when it is
/// kept), listed as delivered, found after a restart, and sent again to
/// one destination only (same id), by id or by time, through the CLI too;
/// once past its time it is gone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retained_delivered_messages_are_shown_listed_and_sent_again() {
    // The first message's first attempt fails (not the first request to
    // arrive: with billing's concurrency another may come first; that made
    // this test fail once in .ci/run).
    let flaky = TestReceiver::scripted(|_, got| {
        let first = &got.body[..] == br#"{"n":0}"# && got.header("x-switchboard-attempt").as_deref() == Some("1");
        Reply::Status(if first { 503 } else { 200 })
    })
    .await;
    let other = TestReceiver::ok().await;
    let fast = "retry = { initial = \"10ms\", max_interval = \"20ms\" }";
    let toml = config(&[("billing", &flaky.url("/b"), fast), ("audit", &other.url("/a"), "")])
        .replace("[store]\n", "[store]\nretain_delivered = \"8s\"\n")
        .replace("path = \"/in\"\n", "path = \"/in\"\nindex = [\"n\"]\n");
    let dir = std::sync::Arc::new(tempfile::tempdir().expect("tempdir"));
    let relay = TestRelay::start_in(dir.clone(), &toml).await;
    let before = now_ms();
    let ids: Vec<String> = {
        let mut ids = Vec::new();
        for i in 0..3 {
            ids.push(acked_id(&post(&relay.url("/in"), "application/json", format!("{{\"n\":{i}}}")).await.2));
        }
        ids
    };
    relay
        .wait_metrics("all delivered and retained", |m| {
            metric(m, "switchboard_store_retained_messages") == 3.0
                && metric(m, "switchboard_queue_depth{destination=\"billing\"}") == 0.0
        })
        .await;
    let (s, v) = show(&relay, &ids[0]).await;
    assert_eq!(s, 200, "{v}");
    assert!(v["retained_until"].is_string(), "{v}");
    let out = cli(&["status", "--admin", &relay.admin_url("")]).await;
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("store: local") && text.contains("3 message(s) kept after delivery"), "{text}");
    let billing = v["destinations"].as_array().and_then(|a| a.iter().find(|d| d["name"] == "billing")).cloned();
    let billing = billing.expect("billing");
    assert_eq!(billing["state"], "delivered", "{v}");
    assert!(billing["delivered_at"].is_string(), "{v}");
    let statuses: Vec<u64> =
        billing["attempts"].as_array().expect("attempts").iter().filter_map(|a| a["status"].as_u64()).collect();
    assert_eq!(statuses, [503, 200], "the failed attempt and the one that delivered: {v}");

    let (s, _, body) = get(&relay.admin_url("/api/messages?destination=billing&state=delivered")).await;
    assert_eq!(s, 200);
    let listed: serde_json::Value = serde_json::from_slice(&body).expect("json");
    let listed: Vec<&str> =
        listed["messages"].as_array().expect("list").iter().filter_map(|m| m["id"].as_str()).collect();
    assert_eq!(listed, ids.iter().map(String::as_str).collect::<Vec<_>>());

    // Sent again, to billing alone: by id through the API, by time through
    // the CLI.
    let got_before = flaky.count();
    let (s, _, body) = request(
        "POST",
        &relay.admin_url(&format!("/api/destinations/billing/replay?state=delivered&id={}", ids[1])),
        &[],
        "",
    )
    .await;
    assert_eq!(s, 200, "{}", String::from_utf8_lossy(&body));
    assert_eq!(serde_json::from_slice::<serde_json::Value>(&body).expect("json")["replayed"], 1);
    let got = flaky.wait_for(got_before + 1, WAIT).await;
    assert_eq!(got[got_before].header("x-switchboard-id").as_deref(), Some(ids[1].as_str()), "the same id");
    let out =
        cli(&["messages", "replay", "billing", "--since", &before.to_string(), "--admin", &relay.admin_url("")]).await;
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).contains("sending 3 message(s) again"), "{:?}", out);
    flaky.wait_for(got_before + 4, WAIT).await;
    assert_eq!(other.count(), 3, "audit was not asked");
    relay
        .wait_metrics("billing delivered them again", |m| {
            metric(m, "switchboard_deliveries_total{destination=\"billing\",outcome=\"delivered\"}") >= 7.0
                && metric(m, "switchboard_queue_depth{destination=\"billing\"}") == 0.0
        })
        .await;
    relay.stop().await.expect("stop");

    // A restart finds them; then, past their time, they are gone.
    let relay = TestRelay::start_in(dir.clone(), &toml).await;
    let (s, v) = show(&relay, &ids[2]).await;
    assert_eq!(s, 200, "retained across a restart: {v}");
    let (_, _, b) = get(&relay.admin_url("/api/messages?field=n&value=2")).await;
    let found: serde_json::Value = serde_json::from_slice(&b).expect("json");
    assert_eq!(found["messages"][0]["id"], ids[2].as_str(), "found by its indexed field: {found}");
    let v = eventually!(WAIT, "the message forgotten past its time", {
        let (s, v) = show(&relay, &ids[2]).await;
        if s == 404 {
            Ok(v)
        } else {
            Err(v.to_string())
        }
    });
    assert!(v["error"].as_str().is_some_and(|e| e.contains("retain_delivered")), "{v}");
    relay.stop().await.expect("stop");
}

/// Issue 23, point 7: "did callback X reach billing?" has an answer by
/// default: a delivered message is kept (24 h, bounded in bytes), and
/// `check` says how long and how much; with retention off, a 404 and an
/// empty list of delivered messages say why.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn by_default_delivered_messages_are_kept_and_empty_answers_say_why() {
    let r = TestReceiver::ok().await;
    let toml = config(&[("billing", &r.url("/b"), "")]);
    let dir = tempfile::tempdir().expect("tempdir");
    let (path, loaded) = write_config(dir.path(), &toml);
    assert_eq!(loaded.store.retain_delivered, Some(std::time::Duration::from_secs(24 * 3600)));
    let out = cli(&["check", "--config", &path.display().to_string()]).await;
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    assert!(
        text.contains("# delivered messages: kept 24h (store.retain_delivered, the default), at most ")
            && text.contains("a tenth of the store's filesystem (store.retain_max_bytes, the default)"),
        "{text}"
    );

    let relay = TestRelay::start(&toml).await;
    let id = acked_id(&post(&relay.url("/in"), "application/json", r#"{"n":1}"#).await.2);
    relay
        .wait_metrics("delivered and kept", |m| {
            metric(m, "switchboard_store_retained_messages") == 1.0
                && metric(m, "switchboard_store_retained_bytes") > 0.0
        })
        .await;
    let (s, v) = show(&relay, &id).await;
    assert_eq!((s, v["destinations"][0]["state"].as_str()), (200, Some("delivered")), "{v}");
    let (_, _, b) = get(&relay.admin_url("/api/messages?destination=billing&state=delivered")).await;
    let listed: serde_json::Value = serde_json::from_slice(&b).expect("json");
    assert_eq!(listed["messages"][0]["id"], id.as_str(), "{listed}");
    let retention = listed["retention"].as_str().unwrap_or_default();
    assert!(retention.contains("kept 24h") && retention.contains("retain_max_bytes"), "{listed}");
    relay.stop().await.expect("stop");

    // Off: the answers say so, not just 404 or an empty table.
    let off = toml.replace("[store]\n", "[store]\nretain_delivered = \"0s\"\n");
    let relay = TestRelay::start(&off).await;
    let id = acked_id(&post(&relay.url("/in"), "application/json", r#"{"n":2}"#).await.2);
    r.wait_for(2, WAIT).await;
    relay.wait_metrics("settled", |m| metric(m, "switchboard_queue_depth{destination=\"billing\"}") == 0.0).await;
    let (s, v) = show(&relay, &id).await;
    assert_eq!(s, 404, "{v}");
    assert!(v["error"].as_str().is_some_and(|e| e.contains("store.retain_delivered = \"0s\"")), "{v}");
    let out = cli(&["messages", "list", "billing", "--state", "delivered", "--admin", &relay.admin_url("")]).await;
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("(none: delivered messages are not kept: store.retain_delivered = \"0s\")"), "{text}");
    let out = cli(&["messages", "show", &id, "--admin", &relay.admin_url("")]).await;
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains(&id) && err.contains("retain_delivered = \"0s\""), "{err}");
    relay.stop().await.expect("stop");
}
