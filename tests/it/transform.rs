//! Transformations with the real relay: ThingSpace to Slack and SOAP to
//! JSON with the shipped scripts; the original kept byte for byte; a
//! failing script dead-letters at once with its reason and line, never
//! retried, and a replay after fixing it (a reload) delivers; `null` is a
//! filter; a signature covers what is sent; `check` names a syntax
//! error's file and line.

use crate::support::*;

fn script(name: &str) -> String {
    format!("file:{}/deploy/transforms/{name}", env!("CARGO_MANIFEST_DIR"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn destinations_get_reshaped_callbacks_and_the_original_is_kept() {
    let slack = TestReceiver::ok().await;
    let api = TestReceiver::ok().await;
    let raw = TestReceiver::ok().await;
    let toml = config(&[
        (
            "slack",
            &slack.url("/slack"),
            &format!("[destinations.slack.transform]\nscript = \"{}\"\n", script("thingspace-to-slack.js")),
        ),
        (
            "api",
            &api.url("/api"),
            &format!("[destinations.api.transform]\nscript = \"{}\"\n", script("soap-to-json.js")),
        ),
        ("raw", &raw.url("/raw"), ""),
    ]);
    let relay = TestRelay::start(&toml).await;
    let fault = sample("carrierservice-fault.json");
    let (s, _, b) = post(&relay.url("/in"), "application/json", fault.clone()).await;
    assert_eq!(s, 200, "{}", String::from_utf8_lossy(&b));
    let soap = r#"<?xml version="1.0" encoding="UTF-8"?>
<soapenv:Envelope xmlns:soapenv="http://schemas.xmlsoap.org/soap/envelope/" xmlns:ts="http://thingspace.verizon.com/callback">
  <soapenv:Body>
    <ts:CarrierServiceCallback>
      <ts:requestId>076f7ea9-8230-49b1-9386-8dafaddc7d9e</ts:requestId>
      <ts:deviceIds><ts:id kind="Iccid">20180903000000000009</ts:id></ts:deviceIds>
      <ts:status>Success</ts:status>
    </ts:CarrierServiceCallback>
  </soapenv:Body>
</soapenv:Envelope>"#;
    let (s, _, _) = post(&relay.url("/in"), "text/xml", soap).await;
    assert_eq!(s, 200);

    let got = slack.wait_for(1, WAIT).await;
    let msg: serde_json::Value = serde_json::from_slice(&got[0].body).expect("slack gets JSON");
    let text = msg["text"].as_str().expect("text");
    assert!(text.contains("076f7ea9") && text.contains("Device is already active"), "{msg}");
    assert!(
        msg["blocks"][0]["text"]["text"].as_str().is_some_and(|t| t.contains("Iccid 20180903000000000009")),
        "{msg}"
    );
    assert_eq!(got[0].header("content-type").as_deref(), Some("application/json"));
    assert!(got[0].header("x-switchboard-id").is_some(), "the relay's own headers stay");

    let got = api.wait_for(2, WAIT).await;
    let converted = got
        .iter()
        .find(|r| r.header("content-type").as_deref() == Some("application/json") && !r.body.starts_with(b"{\n"))
        .expect("the SOAP one");
    let v: serde_json::Value = serde_json::from_slice(&converted.body).expect("json");
    assert_eq!(v["operation"], "CarrierServiceCallback", "{v}");
    assert_eq!(v["requestId"], "076f7ea9-8230-49b1-9386-8dafaddc7d9e", "{v}");
    assert_eq!(v["deviceIds"]["id"]["@kind"], "Iccid", "{v}");
    assert_eq!(v["status"], "Success", "{v}");

    // The original, byte for byte, to the destination without a transform.
    let got = raw.wait_for(2, WAIT).await;
    assert!(got.iter().any(|r| r.body == fault), "the JSON original unchanged");
    assert!(got.iter().any(|r| r.body == soap.as_bytes()), "the SOAP original unchanged");
    relay.stop().await.expect("stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_transform_dead_letters_at_once_and_a_fixed_one_replays() {
    let dest = TestReceiver::ok().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let js = dir.path().join("t.js");
    std::fs::write(
        &js,
        "function transform(req) {\n  // line 2\n  if (!req.body.missing) throw new Error('missing is required');\n  return {};\n}\n",
    )
    .expect("script");
    let toml = config(&[(
        "d",
        &dest.url("/d"),
        &format!(
            "retry = {{ initial = \"10ms\", max_interval = \"20ms\" }}\n[destinations.d.transform]\nscript = \"file:{}\"\n",
            js.display()
        ),
    )]);
    // The real binary: a reload is a SIGHUP.
    let path = crate::binary::write(dir.path(), &toml);
    let mut relay = crate::binary::RelayProcess::start(&path).await;
    let metrics = |relay: &crate::binary::RelayProcess| {
        let url = relay.admin_url("/metrics");
        async move { String::from_utf8_lossy(&get(&url).await.2).into_owned() }
    };
    let (s, _, b) = post(&relay.url("/in"), "application/json", r#"{"n":1}"#).await;
    assert_eq!(s, 200);
    let id = acked_id(&b);
    let m =
        relay.wait_metrics("dead-lettered", |m| metric(m, "switchboard_dead_letters{destination=\"d\"}") == 1.0).await;
    assert_eq!(metric(&m, "switchboard_transform_failures_total{destination=\"d\"}"), 1.0);
    assert_eq!(metric(&m, "switchboard_delivery_attempts_total{destination=\"d\",result=\"success\"}"), 0.0);
    let (_, _, list) = get(&relay.admin_url("/api/dead-letters/d")).await;
    let list: serde_json::Value = serde_json::from_slice(&list).expect("json");
    let reason = list["dead_letters"][0]["reason"].as_str().unwrap_or_default().to_string();
    assert!(
        reason.starts_with("transform failed: Error: missing is required") && reason.ends_with("at line 3"),
        "{list}"
    );
    assert_eq!(list["dead_letters"][0]["attempts"].as_u64(), Some(1), "never retried: {list}");
    assert_eq!(dest.count(), 0);

    // Fixed (and `null` for some): a reload, then a replay delivers it.
    std::fs::write(&js, "function transform(req) {\n  if (req.body.skip) return null;\n  return { body: { n: req.body.n + 1 }, headers: { 'X-Shaped': 'yes' } };\n}\n").expect("script");
    relay.signal(nix::sys::signal::Signal::SIGHUP);
    eventually!(WAIT, "reloaded", {
        let m = metrics(&relay).await;
        if metric(&m, "switchboard_config_reloads_total{result=\"ok\"}") == 1.0 {
            Ok(())
        } else {
            Err(m)
        }
    });
    let (s, _, _) = request("POST", &relay.admin_url("/api/dead-letters/d/replay"), &[], "").await;
    assert_eq!(s, 200);
    let got = dest.wait_for(1, WAIT).await;
    assert_eq!(&got[0].body[..], br#"{"n":2}"#);
    assert_eq!(got[0].header("x-shaped").as_deref(), Some("yes"));
    assert_eq!(got[0].header("x-switchboard-id").as_deref(), Some(id.as_str()));
    let (s, _, _) = post(&relay.url("/in"), "application/json", r#"{"n":5,"skip":true}"#).await;
    assert_eq!(s, 200);
    eventually!(WAIT, "filtered by the transform", {
        let m = metrics(&relay).await;
        if metric(&m, "switchboard_deliveries_total{destination=\"d\",outcome=\"filtered\"}") == 1.0 {
            Ok(())
        } else {
            Err(m)
        }
    });
    assert_eq!(dest.count(), 1, "null: not sent");
    relay.kill9();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_signing_destination_signs_what_the_transform_made() {
    let dest = TestReceiver::ok().await;
    let secret = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
    let toml = config(&[(
        "d",
        &dest.url("/d"),
        &format!("[destinations.d.signing]\nsecrets = [\"{secret}\"]\n[destinations.d.transform]\nsource = \"function transform(req) {{ return {{ body: 'shaped ' + req.body.n }}; }}\"\n"),
    )]);
    let relay = TestRelay::start(&toml).await;
    post(&relay.url("/in"), "application/json", r#"{"n":7}"#).await;
    let got = dest.wait_for(1, WAIT).await;
    assert_eq!(&got[0].body[..], b"shaped 7");
    // The signature is over the bytes sent (HMAC-SHA256 of id.ts.body).
    use base64::Engine;
    use hmac::Mac;
    let key = base64::engine::general_purpose::STANDARD.decode(&secret[6..]).expect("key");
    let (id, ts) = (got[0].header("webhook-id").expect("id"), got[0].header("webhook-timestamp").expect("ts"));
    let mut mac = <hmac::Hmac<sha2::Sha256> as Mac>::new_from_slice(&key).expect("key");
    mac.update(format!("{id}.{ts}.shaped 7").as_bytes());
    let want = format!("v1,{}", base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes()));
    assert_eq!(got[0].header("webhook-signature").as_deref(), Some(want.as_str()));
    relay.stop().await.expect("stop");
}

#[test]
fn check_names_a_scripts_file_and_line() {
    let dir = tempfile::tempdir().expect("tempdir");
    let js = dir.path().join("broken.js");
    std::fs::write(&js, "function transform(req) {\n  return { body: ;\n}\n").expect("script");
    let toml = config(&[(
        "a",
        "http://127.0.0.1:1/a",
        &format!("[destinations.a.transform]\nscript = \"file:{}\"\n", js.display()),
    )]);
    let out = crate::binary::check(&crate::binary::write(dir.path(), &toml));
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(78), "{err}");
    assert!(err.contains("destinations.a.transform") && err.contains("broken.js") && err.contains("line 2"), "{err}");
    let toml =
        config(&[("a", "http://127.0.0.1:1/a", "[destinations.a.transform]\nsource = \"function nope() {}\"\n")]);
    let out = crate::binary::check(&crate::binary::write(dir.path(), &toml));
    assert!(String::from_utf8_lossy(&out.stderr).contains("no function transform(req)"));
    assert_eq!(out.status.code(), Some(78));
}

/// `switchboard transform` prints what a destination would get, or the
/// error with exit 1.
#[test]
fn the_cli_prints_what_a_destination_would_receive() {
    let dir = tempfile::tempdir().expect("tempdir");
    let body = dir.path().join("fault.json");
    std::fs::write(&body, sample("carrierservice-fault.json")).expect("body");
    let toml = config(&[
        ("slack", "http://127.0.0.1:1/s", &format!("[destinations.slack.transform]\nscript = \"{}\"\n", script("thingspace-to-slack.js"))),
        ("strict", "http://127.0.0.1:1/t", "[destinations.strict.transform]\nsource = \"function transform(req) {\\n  throw new Error('nope');\\n}\"\n"),
    ]);
    let path = crate::binary::write(dir.path(), &toml);
    let run = |dest: &str| {
        std::process::Command::new(env!("CARGO_BIN_EXE_switchboard"))
            .args(["transform", "--config"])
            .arg(&path)
            .args(["--destination", dest, "--file"])
            .arg(&body)
            .output()
            .expect("cli")
    };
    let out = run("slack");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(text.contains("content-type: application/json") && text.contains("Device is already active"), "{text}");
    let out = run("strict");
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("transform failed") && err.contains("nope") && err.contains("line 2"), "{err}");
}

/// `--message ID`: the stored callback, read from a running relay's admin
/// API, through the destination's transform (after its
/// `strip_body_fields`, as delivery does).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_runs_a_transform_on_a_stored_message() {
    let dir = tempfile::tempdir().expect("tempdir");
    let source = "function transform(req) {\n  return { body: { seen: req.body, id: req.id, route: req.route } };\n}";
    let toml = config(&[(
        "shaped",
        "http://127.0.0.1:1/s",
        &format!(
            "paused = true\nstrip_body_fields = [\"password\"]\n[destinations.shaped.transform]\nsource = {source:?}\n"
        ),
    )]);
    let relay = TestRelay::start(&toml).await;
    let (status, _, body) =
        post(&relay.url("/in"), "application/json", r#"{"requestId":"r-9","password":"hunter2"}"#).await;
    assert_eq!(status, 200);
    let id = acked_id(&body);
    let path = crate::binary::write(dir.path(), &toml);
    // `switchboard transform` on a stored message, run off the runtime.
    let try_message = |id: String| {
        let (path, admin) = (path.clone(), relay.admin_url(""));
        tokio::task::spawn_blocking(move || {
            std::process::Command::new(env!("CARGO_BIN_EXE_switchboard"))
                .args(["transform", "--config"])
                .arg(&path)
                .args(["--destination", "shaped", "--message", &id, "--admin", &admin])
                .output()
                .expect("cli")
        })
    };
    let out = try_message(id).await.expect("join");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(text.contains(r#""seen":{"requestId":"r-9"}"#), "the stored body, stripped: {text}");
    assert!(text.contains(&format!(r#""id":"{}""#, acked_id(&body))) && text.contains(r#""route":"/in""#), "{text}");
    assert!(!text.contains("hunter2"), "{text}");
    // An id of this store that names no message: the admin API's 404, exit 5.
    let mut unknown = acked_id(&body);
    let last = if unknown.ends_with('f') { "e" } else { "f" };
    unknown.replace_range(unknown.len() - 1.., last);
    let out = try_message(unknown).await.expect("join");
    assert_eq!(out.status.code(), Some(5), "{}", String::from_utf8_lossy(&out.stderr));
}

/// On the JetStream store: a destination gets the reshaped callback while
/// the stored one stays as received (inspection shows the original body),
/// and a script that throws dead-letters at once with its reason and line.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transforms_on_the_jetstream_store() {
    let dir = tempfile::tempdir().expect("tempdir");
    let nats = crate::nats::NatsNode::single(dir.path());
    let shaped = TestReceiver::ok().await;
    let plain = TestReceiver::scripted(|_, _| Reply::Status(503)).await;
    let broken = TestReceiver::ok().await;
    let toml = crate::jetstream::jet_config(
        &[nats.url()],
        "shapes",
        1,
        &[
            (
                "shaped",
                &shaped.url("/s"),
                "[destinations.shaped.transform]\nsource = \"function transform(req) { return { body: { id: req.body.requestId } }; }\"",
            ),
            ("plain", &plain.url("/p"), "retry = { initial = \"1h\", max_interval = \"1h\" }"),
            (
                "broken",
                &broken.url("/b"),
                "[destinations.broken.transform]\nsource = \"function transform(req) {\\n  throw new Error('no shape');\\n}\"",
            ),
        ],
    );
    let relay = TestRelay::start(&toml).await;
    eventually!(WAIT, "the relay ready", {
        match get(&relay.admin_url("/readyz")).await.0 {
            200 => Ok(()),
            s => Err(format!("readyz {s}")),
        }
    });
    let original = r#"{"requestId":"r-7","status":"Success"}"#;
    let (s, _, b) = post(&relay.url("/in"), "application/json", original).await;
    assert_eq!(s, 200);
    let id = acked_id(&b);
    let got = shaped.wait_for(1, WAIT).await;
    assert_eq!(&got[0].body[..], br#"{"id":"r-7"}"#);
    let m = relay
        .wait_metrics("broken dead-lettered", |m| metric(m, "switchboard_dead_letters{destination=\"broken\"}") == 1.0)
        .await;
    assert_eq!(metric(&m, "switchboard_transform_failures_total{destination=\"broken\"}"), 1.0);
    assert_eq!(broken.count(), 0);
    let (_, _, list) = get(&relay.admin_url("/api/dead-letters/broken")).await;
    let list: serde_json::Value = serde_json::from_slice(&list).expect("json");
    let reason = list["dead_letters"][0]["reason"].as_str().unwrap_or_default().to_string();
    assert!(reason.starts_with("transform failed: Error: no shape") && reason.ends_with("at line 2"), "{list}");
    // `plain` still holds the message: the stored body is the original.
    let (s, _, b) = get(&relay.admin_url(&format!("/api/messages/{id}?body=1"))).await;
    assert_eq!(s, 200, "{}", String::from_utf8_lossy(&b));
    let v: serde_json::Value = serde_json::from_slice(&b).expect("json");
    assert_eq!(v["body"], original, "{v}");
    relay.stop().await.expect("stop");
}
