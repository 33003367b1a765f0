//! End-to-end behaviour of the relay in process: fan-out, isolation, retries,
//! dead letters, restart, errors and metrics.

use std::time::Duration;

use bytes::Bytes;

use crate::support::*;

const FAST_RETRY: &str = "[destinations.DEST.retry]\ninitial = \"20ms\"\nmax_interval = \"100ms\"\njitter = 0.0\n";

fn fast(name: &str) -> String {
    FAST_RETRY.replace("DEST", name)
}

#[tokio::test]
async fn fan_out_reaches_every_destination_with_identical_bytes_and_id() {
    let a = TestReceiver::ok().await;
    let b = TestReceiver::ok().await;
    let c = TestReceiver::ok().await;
    let relay =
        TestRelay::start(&config(&[("a", &a.url("/a"), ""), ("b", &b.url("/b"), ""), ("c", &c.url("/c"), "")])).await;

    let json = sample("carrierservice-fault.json");
    let soap = Bytes::from_static(
        b"<?xml version=\"1.0\"?><soap:Envelope xmlns:soap=\"http://schemas.xmlsoap.org/soap/envelope/\"><soap:Body><x>1</x></soap:Body></soap:Envelope>",
    );
    let binary: Bytes = (0..=255u8).cycle().take(4096).collect::<Vec<u8>>().into();
    let bodies = [(json, "application/json"), (soap, "text/xml; charset=utf-8"), (binary, "application/octet-stream")];
    let mut ids = Vec::new();
    for (body, ct) in &bodies {
        let (status, _, answer) = request(
            "POST",
            &relay.url("/in"),
            &[("content-type", ct), ("user-agent", "Verizon's callback service")],
            body.clone(),
        )
        .await;
        assert_eq!(status, 200, "{}", String::from_utf8_lossy(&answer));
        ids.push(acked_id(&answer));
    }
    for receiver in [&a, &b, &c] {
        let got = receiver.wait_for(3, WAIT).await;
        for ((body, ct), id) in bodies.iter().zip(&ids) {
            let r = got.iter().find(|r| r.header("webhook-id").as_deref() == Some(id)).expect("message with that id");
            assert_eq!(&r.body, body, "body bytes differ for {ct}");
            assert_eq!(r.header("content-type").as_deref(), Some(*ct));
            assert_eq!(r.header("user-agent").as_deref(), Some("Verizon's callback service"));
            assert_eq!(r.header("x-switchboard-id").as_deref(), Some(id.as_str()));
            assert_eq!(r.header("x-switchboard-attempt").as_deref(), Some("1"));
            assert_eq!(r.header("x-forwarded-for").as_deref(), Some("127.0.0.1"));
        }
    }
    relay.stop().await.expect("clean stop");
}

#[tokio::test]
async fn dead_and_hanging_destinations_do_not_delay_a_healthy_one() {
    let healthy = TestReceiver::ok().await;
    let hanging = TestReceiver::scripted(|_, _| Reply::Hang).await;
    let down = dead_addr().await;
    let relay = TestRelay::start(&config(&[
        ("down", &format!("http://{down}/x"), "concurrency = 1"),
        ("hang", &hanging.url("/x"), "concurrency = 1\ntimeout = \"60s\""),
        ("ok", &healthy.url("/x"), "concurrency = 1"),
    ]))
    .await;
    let n = 20;
    for i in 0..n {
        let (status, _, _) = post(&relay.url("/in"), "text/plain", format!("m{i}")).await;
        assert_eq!(status, 200);
    }
    // With concurrency 1 the hanging destination holds its only slot for 60 s;
    // if it could delay the healthy one, these 20 could not arrive within WAIT.
    let got = healthy.wait_for(n, WAIT).await;
    let bodies: std::collections::HashSet<_> = got.iter().map(|r| r.body.clone()).collect();
    assert_eq!(bodies.len(), n);
    assert_eq!(hanging.count(), 1, "the hanging destination holds its single slot");
}

#[tokio::test]
async fn retries_until_success_with_counting_attempt_header() {
    let flaky = TestReceiver::scripted(|n, _| if n < 2 { Reply::Status(503) } else { Reply::Status(200) }).await;
    let relay = TestRelay::start(&config(&[("f", &flaky.url("/f"), &fast("f"))])).await;
    let (status, _, body) = post(&relay.url("/in"), "application/json", "{}").await;
    assert_eq!(status, 200);
    let id = acked_id(&body);
    let got = flaky.wait_for(3, WAIT).await;
    let attempts: Vec<_> = got.iter().map(|r| r.header("x-switchboard-attempt").unwrap_or_default()).collect();
    assert_eq!(attempts, ["1", "2", "3"]);
    assert!(got.iter().all(|r| r.header("webhook-id").as_deref() == Some(id.as_str())));
    let m = relay
        .wait_metrics("one delivery", |m| {
            metric(m, "switchboard_deliveries_total{destination=\"f\",outcome=\"delivered\"}") == 1.0
        })
        .await;
    assert_eq!(metric(&m, "switchboard_deliveries_total{destination=\"f\",outcome=\"retried\"}"), 2.0);
    assert_eq!(metric(&m, "switchboard_queue_depth{destination=\"f\"}"), 0.0);
}

#[tokio::test]
async fn permanent_failure_goes_to_dead_letters_without_retry_and_can_be_replayed() {
    let fail_first = TestReceiver::scripted(|n, _| if n == 0 { Reply::Status(400) } else { Reply::Status(200) }).await;
    let relay = TestRelay::start(&config(&[("p", &fail_first.url("/p"), &fast("p"))])).await;
    let (status, _, body) = post(&relay.url("/in"), "application/json", "{\"a\":1}").await;
    assert_eq!(status, 200);
    let id = acked_id(&body);
    let m =
        relay.wait_metrics("a dead letter", |m| metric(m, "switchboard_dead_letters{destination=\"p\"}") == 1.0).await;
    assert_eq!(metric(&m, "switchboard_deliveries_total{destination=\"p\",outcome=\"retried\"}"), 0.0);
    assert_eq!(fail_first.count(), 1, "a 400 is not retried");

    let (status, _, list) = get(&relay.admin_url("/api/dead-letters/p")).await;
    assert_eq!(status, 200);
    let v: serde_json::Value = serde_json::from_slice(&list).expect("json");
    assert_eq!(v["dead_letters"][0]["id"], id.as_str());
    assert_eq!(v["dead_letters"][0]["last_status"], 400);

    let (status, _, replay) = request("POST", &relay.admin_url("/api/dead-letters/p/replay"), &[], Bytes::new()).await;
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&replay));
    let got = fail_first.wait_for(2, WAIT).await;
    assert_eq!(got[1].body, Bytes::from_static(b"{\"a\":1}"));
    assert_eq!(got[1].header("webhook-id").as_deref(), Some(id.as_str()));
    relay.wait_metrics("no dead letters", |m| metric(m, "switchboard_dead_letters{destination=\"p\"}") == 0.0).await;
}

#[tokio::test]
async fn retry_after_is_honoured_within_its_cap() {
    // The first answer asks for an hour; the cap (400 ms) wins over it, and the
    // backoff (20 ms) must not: the second attempt comes between the two.
    let r = TestReceiver::scripted(|n, _| {
        if n == 0 {
            Reply::StatusWith(429, vec![("retry-after", "3600".to_string())])
        } else {
            Reply::Status(200)
        }
    })
    .await;
    let extra = format!("{}retry_after_cap = \"400ms\"\n", fast("r"));
    let relay = TestRelay::start(&config(&[("r", &r.url("/r"), &extra)])).await;
    let (status, _, _) = post(&relay.url("/in"), "application/json", "{}").await;
    assert_eq!(status, 200);
    let got = r.wait_for(2, WAIT).await;
    let gap = got[1].at - got[0].at;
    assert!(gap >= Duration::from_millis(400), "second attempt after {gap:?}, before the Retry-After cap");
    assert!(gap < Duration::from_secs(60), "Retry-After was not capped: {gap:?}");
}

#[tokio::test]
async fn acknowledged_messages_survive_a_graceful_restart() {
    let dir = std::sync::Arc::new(tempfile::tempdir().expect("tempdir"));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    drop(listener); // down while the relay first runs
    let toml = config(&[("d", &format!("http://{addr}/d"), &fast("d"))]);
    let relay = TestRelay::start_in(dir.clone(), &toml).await;
    let mut ids = Vec::new();
    for i in 0..25 {
        let (status, _, body) = post(&relay.url("/in"), "text/plain", format!("restart-{i}")).await;
        assert_eq!(status, 200);
        ids.push(acked_id(&body));
    }
    relay.stop().await.expect("clean stop");

    let listener = tokio::net::TcpListener::bind(addr).await.expect("rebind the destination address");
    let dest = TestReceiver::on(listener, std::sync::Arc::new(|_, _| Reply::Status(200)));
    let relay = TestRelay::start_in(dir, &toml).await;
    let got = dest
        .wait_until(WAIT, "all 25 ids", |got| {
            let seen = counts_by_header(got, "webhook-id");
            ids.iter().all(|id| seen.contains_key(id))
        })
        .await;
    assert!(got.len() >= 25);
    relay.wait_metrics("empty queue", |m| metric(m, "switchboard_queue_depth{destination=\"d\"}") == 0.0).await;
}

#[tokio::test]
async fn errors_have_clear_statuses() {
    let r = TestReceiver::ok().await;
    let toml = config(&[("a", &r.url("/a"), "")]).replace("[[routes]]", "[ingress]\nmax_body = 1000\n[[routes]]");
    let relay = TestRelay::start(&toml).await;

    let (status, _, body) = post(&relay.url("/nope"), "application/json", "{}").await;
    assert_eq!(status, 404);
    assert!(String::from_utf8_lossy(&body).contains("no route"));

    let (status, headers, _) = get(&relay.url("/in")).await;
    assert_eq!(status, 405);
    assert_eq!(headers.get("allow").and_then(|v| v.to_str().ok()), Some("POST"));

    let (status, _, body) = post(&relay.url("/in"), "application/json", vec![b'x'; 1001]).await;
    assert_eq!(status, 413);
    assert!(String::from_utf8_lossy(&body).contains("1000"));

    let (status, _, _) = post(&relay.url("/in"), "application/json", vec![b'x'; 1000]).await;
    assert_eq!(status, 200, "exactly the limit is accepted");
    let m = relay.metrics().await;
    assert_eq!(metric(&m, "switchboard_ingress_requests_total{code=\"404\",route=\"unmatched\"}"), 1.0);
    assert_eq!(metric(&m, "switchboard_ingress_requests_total{code=\"405\",route=\"/in\"}"), 1.0);
    assert_eq!(metric(&m, "switchboard_ingress_requests_total{code=\"413\",route=\"/in\"}"), 1.0);
    assert_eq!(metric(&m, "switchboard_ingress_requests_total{code=\"200\",route=\"/in\"}"), 1.0);
}

#[tokio::test]
async fn full_store_answers_503_with_retry_after_and_accepts_again_once_drained() {
    // The destination is down at first, so accepted messages stay stored.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    drop(listener);
    let toml =
        config(&[("d", &format!("http://{addr}/d"), &fast("d"))]).replace("[store]\n", "[store]\nmax_bytes = 20000\n");
    let relay = TestRelay::start(&toml).await;
    let body = vec![b'a'; 1000];
    let mut acked = 0;
    let mut refused = None;
    for _ in 0..100 {
        let (status, headers, _) = post(&relay.url("/in"), "text/plain", body.clone()).await;
        match status {
            200 => acked += 1,
            503 => {
                refused = Some(headers);
                break;
            }
            other => panic!("unexpected status {other}"),
        }
    }
    let headers = refused.expect("the store filled up and refused");
    assert!(headers.get("retry-after").is_some(), "503 carries Retry-After");
    assert!((10..=20).contains(&acked), "acked {acked} of ~19 that fit");
    // Still refusing while full.
    let (status, _, _) = post(&relay.url("/in"), "text/plain", body.clone()).await;
    assert_eq!(status, 503);

    // Bring the destination up: the backlog drains and ingress accepts again.
    let dest = TestReceiver::ok_at(addr).await;
    dest.wait_for(acked, WAIT).await;
    relay.wait_metrics("drained store", |m| metric(m, "switchboard_queue_depth{destination=\"d\"}") == 0.0).await;
    let (status, _, _) = post(&relay.url("/in"), "text/plain", body).await;
    assert_eq!(status, 200, "accepts again once space returns");
}

#[tokio::test]
async fn metrics_and_health_endpoints() {
    let r = TestReceiver::ok().await;
    let relay = TestRelay::start(&config(&[("a", &r.url("/a"), "")])).await;
    for _ in 0..3 {
        assert_eq!(post(&relay.url("/in"), "application/json", "{}").await.0, 200);
    }
    r.wait_for(3, WAIT).await;
    let m = relay
        .wait_metrics("3 deliveries", |m| {
            metric(m, "switchboard_deliveries_total{destination=\"a\",outcome=\"delivered\"}") == 3.0
        })
        .await;
    assert_eq!(metric(&m, "switchboard_ingress_requests_total{code=\"200\",route=\"/in\"}"), 3.0);
    assert_eq!(metric(&m, "switchboard_ingress_persist_seconds_count"), 3.0);
    assert_eq!(metric(&m, "switchboard_delivery_attempts_total{destination=\"a\",result=\"2xx\"}"), 3.0);
    assert_eq!(metric(&m, "switchboard_delivery_duration_seconds_count{destination=\"a\"}"), 3.0);
    assert_eq!(metric(&m, "switchboard_delivery_lag_seconds_count{destination=\"a\"}"), 3.0);
    assert_eq!(metric(&m, "switchboard_queue_depth{destination=\"a\"}"), 0.0);
    assert_eq!(metric(&m, "switchboard_queue_oldest_age_seconds{destination=\"a\"}"), 0.0);
    assert_eq!(metric(&m, "switchboard_dead_letters{destination=\"a\"}"), 0.0);
    assert!(metric(&m, "switchboard_store_flushes_total{result=\"ok\"}") >= 1.0);
    assert!(!m.contains("127.0.0.1"), "no URLs in labels");

    let (status, _, body) = get(&relay.admin_url("/healthz")).await;
    assert_eq!((status, &body[..]), (200, &b"ok\n"[..]));
    let (status, _, _) = get(&relay.admin_url("/readyz")).await;
    assert_eq!(status, 200);
}

#[tokio::test]
async fn paused_destination_queues_without_delivering_and_resumes_after_restart() {
    let dir = std::sync::Arc::new(tempfile::tempdir().expect("tempdir"));
    let active = TestReceiver::ok().await;
    let held = TestReceiver::ok().await;
    let paused = config(&[("active", &active.url("/a"), ""), ("held", &held.url("/h"), "paused = true")]);
    let relay = TestRelay::start_in(dir.clone(), &paused).await;
    assert_eq!(post(&relay.url("/in"), "application/json", "{\"p\":1}").await.0, 200);
    active.wait_for(1, WAIT).await;
    relay
        .wait_metrics("one queued for held", |m| metric(m, "switchboard_queue_depth{destination=\"held\"}") == 1.0)
        .await;
    assert_eq!(held.count(), 0, "a paused destination gets nothing");
    relay.stop().await.expect("stop");

    let resumed = config(&[("active", &active.url("/a"), ""), ("held", &held.url("/h"), "")]);
    let _relay = TestRelay::start_in(dir, &resumed).await;
    let got = held.wait_for(1, WAIT).await;
    assert_eq!(&got[0].body[..], b"{\"p\":1}");
}

#[tokio::test]
async fn dead_letters_can_be_purged_and_the_message_is_then_deleted() {
    let ok = TestReceiver::ok().await;
    let refuses = TestReceiver::scripted(|_, _| Reply::Status(400)).await;
    let relay = TestRelay::start(&config(&[("ok", &ok.url("/ok"), ""), ("no", &refuses.url("/no"), "")])).await;
    let (status, _, body) = post(&relay.url("/in"), "application/json", "{\"x\":1}").await;
    assert_eq!(status, 200);
    let id = acked_id(&body);
    let m = relay
        .wait_metrics("one delivered, one dead", |m| {
            metric(m, "switchboard_dead_letters{destination=\"no\"}") == 1.0
                && metric(m, "switchboard_deliveries_total{destination=\"ok\",outcome=\"delivered\"}") == 1.0
        })
        .await;
    assert!(metric(&m, "switchboard_store_bytes") > 0.0, "the dead letter keeps the message");
    let (status, _, _) = request("DELETE", &relay.admin_url("/api/dead-letters/no?id=msg_nope"), &[], "").await;
    assert_eq!(status, 400);
    let (status, _, body) =
        request("DELETE", &relay.admin_url(&format!("/api/dead-letters/no?id={id}")), &[], "").await;
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    assert_eq!(&body[..], b"{\"purged\":1}");
    let m = relay.metrics().await;
    assert_eq!(metric(&m, "switchboard_dead_letters{destination=\"no\"}"), 0.0);
    assert_eq!(metric(&m, "switchboard_store_bytes"), 0.0, "nothing needs the message any more");
}

#[tokio::test]
async fn dedupe_window_answers_a_resent_callback_with_the_first_id_and_stores_it_once() {
    let held = TestReceiver::ok().await;
    let toml = config(&[("held", &held.url("/h"), "paused = true")])
        .replace("destinations = [\"held\"]\n", "destinations = [\"held\"]\ndedupe_window = \"10m\"\n");
    let relay = TestRelay::start(&toml).await;
    let body = sample("carrierservice-fault.json");
    let (s1, _, first) = post(&relay.url("/in"), "application/json", body.clone()).await;
    let (s2, _, second) = post(&relay.url("/in"), "application/json", body.clone()).await;
    assert_eq!((s1, s2), (200, 200));
    assert_eq!(acked_id(&first), acked_id(&second), "the resend gets the first id");
    let v: serde_json::Value = serde_json::from_slice(&second).expect("json");
    assert_eq!(v["duplicate"], true);
    let (s3, _, third) = post(&relay.url("/in"), "application/json", "{\"other\":1}").await;
    assert_eq!(s3, 200);
    assert_ne!(acked_id(&third), acked_id(&first));
    let m = relay.metrics().await;
    assert_eq!(metric(&m, "switchboard_queue_depth{destination=\"held\"}"), 2.0, "the resend was not stored");
    assert_eq!(metric(&m, "switchboard_ingress_duplicates_total{route=\"/in\"}"), 1.0);

    // Without a window, the same two requests are two messages.
    let relay = TestRelay::start(&config(&[("held", &held.url("/h"), "paused = true")])).await;
    assert_eq!(post(&relay.url("/in"), "application/json", body.clone()).await.0, 200);
    assert_eq!(post(&relay.url("/in"), "application/json", body).await.0, 200);
    let m = relay.metrics().await;
    assert_eq!(metric(&m, "switchboard_queue_depth{destination=\"held\"}"), 2.0);
}
