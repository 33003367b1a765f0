//! A NATS destination (`url = "nats://..."`, `subject`, `jetstream`) with a
//! real `nats-server`: delivered means the stream's PubAck; the message id
//! travels as `Nats-Msg-Id` and the relay's headers as NATS headers, the
//! body as is; NATS down then back: retried, each id once in the stream; a
//! subject no stream takes: a clear reason, dead-lettered by the policy;
//! core NATS (`jetstream = false`) reaches a subscriber.

use std::collections::HashMap;

use futures_util::StreamExt;

use crate::nats::{NatsNode, TlsNkeyNode};
use crate::support::*;

/// Every message in stream `name`: (Nats-Msg-Id, x-switchboard-attempt, body).
async fn stream_messages(url: &str, name: &str) -> Vec<(String, String, Vec<u8>)> {
    let client = async_nats::connect(url).await.expect("connect");
    let js = async_nats::jetstream::new(client);
    let stream = js.get_stream(name).await.expect("stream");
    let mut out = Vec::new();
    let mut seq = 1;
    while let Ok(m) = stream.raw_message_builder().sequence(seq).next_by_subject("callbacks.>".to_string()).send().await
    {
        seq = m.sequence + 1;
        let h = |n: &str| m.headers.get(n).map(|v| v.as_str().to_string()).unwrap_or_default();
        out.push((h("Nats-Msg-Id"), h("x-switchboard-attempt"), m.payload.to_vec()));
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn callbacks_reach_a_jetstream_subject_once_per_id_through_an_outage() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut nats = NatsNode::single(dir.path());
    {
        let client = async_nats::connect(nats.url()).await.expect("connect");
        async_nats::jetstream::new(client)
            .create_stream(async_nats::jetstream::stream::Config {
                name: "CB".into(),
                subjects: vec!["callbacks.>".into()],
                ..Default::default()
            })
            .await
            .expect("stream");
    }
    let fast = "retry = { initial = \"50ms\", max_interval = \"200ms\" }\ntimeout = \"2s\"\nconnect_timeout = \"1s\"";
    let toml = config(&[
        ("bus", &nats.url(), &format!("subject = \"callbacks.thingspace\"\n{fast}")),
        (
            "lost",
            &nats.url(),
            "subject = \"nowhere.at.all\"\nretry = { initial = \"10ms\", max_interval = \"20ms\", max_attempts = 3 }\ntimeout = \"1s\"",
        ),
    ]);
    let relay = TestRelay::start(&toml).await;
    let mut ids = Vec::new();
    let body = sample("carrierservice-fault.json");
    for _ in 0..3 {
        let (s, _, b) = post(&relay.url("/in"), "application/json", body.clone()).await;
        assert_eq!(s, 200);
        ids.push(acked_id(&b));
    }
    let got = eventually!(WAIT, "3 messages in the stream", {
        let got = stream_messages(&nats.url(), "CB").await;
        if got.len() == 3 {
            Ok(got)
        } else {
            Err(format!("{}", got.len()))
        }
    });
    for (id, _, payload) in &got {
        assert!(ids.contains(id), "Nats-Msg-Id is the message id: {id}");
        assert_eq!(payload, &body.to_vec(), "the body as is");
    }
    // A subject no stream takes: retried, then dead-lettered with why.
    let m = relay
        .wait_metrics("lost dead-lettered", |m| metric(m, "switchboard_dead_letters{destination=\"lost\"}") == 3.0)
        .await;
    assert_eq!(metric(&m, "switchboard_dead_letters{destination=\"bus\"}"), 0.0);
    let (_, _, list) = get(&relay.admin_url("/api/dead-letters/lost")).await;
    let list: serde_json::Value = serde_json::from_slice(&list).expect("json");
    assert!(
        list["dead_letters"][0]["reason"]
            .as_str()
            .is_some_and(|r| r.contains("no JetStream stream takes subject \"nowhere.at.all\"")),
        "{list}"
    );

    // NATS down: callbacks are still taken (the local store), retried, and
    // once NATS is back each id is in the stream once.
    nats.kill9();
    for _ in 0..3 {
        let (s, _, b) = post(&relay.url("/in"), "application/json", body.clone()).await;
        assert_eq!(s, 200);
        ids.push(acked_id(&b));
    }
    relay
        .wait_metrics("attempts failing while NATS is down", |m| {
            metric(m, "switchboard_deliveries_total{destination=\"bus\",outcome=\"retried\"}") >= 3.0
        })
        .await;
    nats.start();
    let got = eventually!(WAIT, "6 messages, each id once", {
        let got = stream_messages(&nats.url(), "CB").await;
        let per: HashMap<&str, usize> = got.iter().fold(HashMap::new(), |mut m, (id, _, _)| {
            *m.entry(id.as_str()).or_default() += 1;
            m
        });
        if per.len() == 6 && ids.iter().all(|i| per.get(i.as_str()) == Some(&1)) && got.len() == 6 {
            Ok(got)
        } else {
            Err(format!("{per:?}"))
        }
    });
    // Attempted more than once each (retried above) yet stored once: the
    // stream de-duplicated the retries by Nats-Msg-Id.
    assert_eq!(got.len(), 6);
    relay.stop().await.expect("stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn core_nats_reaches_a_subscriber_with_the_relays_headers() {
    let dir = tempfile::tempdir().expect("tempdir");
    let nats = NatsNode::single(dir.path());
    let client = async_nats::connect(nats.url()).await.expect("connect");
    let mut sub = client.subscribe("alerts.devices").await.expect("subscribe");
    client.flush().await.expect("flush");
    let toml = config(&[("alerts", &nats.url(), "subject = \"alerts.devices\"\njetstream = false")]);
    let relay = TestRelay::start(&toml).await;
    let (s, _, b) = post(&relay.url("/in"), "application/json", r#"{"n":1}"#).await;
    assert_eq!(s, 200);
    let id = acked_id(&b);
    let m = tokio::time::timeout(WAIT, sub.next()).await.expect("in time").expect("a message");
    assert_eq!(&m.payload[..], br#"{"n":1}"#);
    let headers = m.headers.expect("headers");
    assert_eq!(headers.get("x-switchboard-id").map(|v| v.as_str()), Some(id.as_str()));
    assert_eq!(headers.get("content-type").map(|v| v.as_str()), Some("application/json"));
    relay.stop().await.expect("stop");
}

/// TLS with the destination's own CA (`ca_file`) and client certificate
/// (`tls.client_cert`), and an NKey (`[destinations.NAME.nats]`), as the
/// JetStream store connects; a wrong NKey is refused by the server: the
/// delivery is retried with the server's reason, never reported delivered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_tls_with_a_client_certificate_and_an_nkey() {
    let dir = tempfile::tempdir().expect("tempdir");
    let TlsNkeyNode { nats, ca_file, client_cert, client_key, seed } = TlsNkeyNode::start(dir.path());
    let url = format!("tls://127.0.0.1:{}", nats.port);
    let tls = format!(
        "ca_file = {:?}\n[destinations.DEST.tls]\nclient_cert = {:?}\nclient_key = {:?}\n",
        ca_file.display().to_string(),
        client_cert.display().to_string(),
        client_key.display().to_string()
    );
    let wrong = nkeys::KeyPair::new_user().seed().expect("seed");
    let dest = |name: &str, nkey: &str| {
        format!(
            "subject = \"alerts.{name}\"\njetstream = false\nconnect_timeout = \"1s\"\nretry = {{ initial = \"50ms\", max_interval = \"100ms\" }}\n{}[destinations.{name}.nats]\nnkey = {nkey:?}\n",
            tls.replace("DEST", name)
        )
    };
    let toml = config(&[("good", &url, &dest("good", &seed)), ("bad", &url, &dest("bad", &wrong))]);
    // The test's own subscriber, over TLS with the same credentials.
    let client = async_nats::ConnectOptions::new()
        .add_root_certificates(ca_file.clone())
        .add_client_certificate(client_cert.clone(), client_key.clone())
        .require_tls(true)
        .nkey(seed.clone())
        .connect(&url)
        .await
        .expect("connect");
    let mut sub = client.subscribe("alerts.>").await.expect("subscribe");
    client.flush().await.expect("flush");
    let relay = TestRelay::start(&toml).await;
    let (s, _, _) = post(&relay.url("/in"), "application/json", r#"{"n":1}"#).await;
    assert_eq!(s, 200);
    let m = tokio::time::timeout(WAIT, sub.next()).await.expect("in time").expect("a message");
    assert_eq!(m.subject.as_str(), "alerts.good");
    assert_eq!(&m.payload[..], br#"{"n":1}"#);
    let failed = "switchboard_delivery_attempts_total{destination=\"bad\",result=\"connect\"}";
    let metrics = relay.wait_metrics("the wrong NKey refused, retried", |m| metric(m, failed) >= 2.0).await;
    assert_eq!(metric(&metrics, "switchboard_deliveries_total{destination=\"bad\",outcome=\"delivered\"}"), 0.0);
    relay.stop().await.expect("stop");
}

/// A NATS destination's settings are checked like the rest of the file
/// (`check` only: nothing connects to the address).
#[test]
fn nats_destination_settings_are_config_errors_naming_the_key() {
    let dir = tempfile::tempdir().expect("tempdir");
    for (dest, key, why) in [
        (("a", "nats://127.0.0.1:1", ""), "destinations.a.subject", "needs the subject"),
        (("a", "nats://127.0.0.1:1", "subject = \"a.*\""), "destinations.a.subject", "wildcards"),
        (("a", "http://127.0.0.1:1/a", "subject = \"a.b\""), "destinations.a.subject", "only for a nats://"),
        (
            ("a", "http://127.0.0.1:1/a", "[destinations.a.nats]\ntoken = \"t\""),
            "destinations.a.nats",
            "only for a nats://",
        ),
        (
            ("a", "nats://u:p@127.0.0.1:1", "subject = \"a.b\"\n[destinations.a.nats]\ntoken = \"t\""),
            "destinations.a.nats",
            "one way to authenticate",
        ),
        (
            (
                "a",
                "nats://127.0.0.1:1",
                "subject = \"a.b\"\n[destinations.a.nats]\nnkey = \"env:SWITCHBOARD_NOT_SET_EVER\"",
            ),
            "destinations.a.nats.nkey",
            "not set",
        ),
    ] {
        let toml = config(&[dest]);
        let out = crate::binary::check(&crate::binary::write(dir.path(), &toml));
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(78), "{toml}: {err}");
        assert!(err.contains(key) && err.contains(why), "{toml}: {err}");
    }
}
