//! Putting the ingress on the internet, past TLS: source allowlists,
//! sender authentication, credential stripping, admin token, and no secret
//! in logs or `check` output.

use std::net::SocketAddr;

use bytes::Bytes;
use http_body_util::Full;
use hyper_util::rt::TokioIo;
use tokio::net::TcpSocket;

use crate::binary::{write, RelayProcess};
use crate::support::*;
use crate::tls::{write_pair, Ca};

/// Posts from a specific loopback source address (127.0.0.0/8 all reach us).
async fn post_from(src: &str, addr: SocketAddr, headers: &[(&str, &str)], body: &'static str) -> u16 {
    let sock = TcpSocket::new_v4().expect("socket");
    sock.bind(format!("{src}:0").parse().expect("src")).expect("bind source");
    let stream = sock.connect(addr).await.expect("connect");
    let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await.expect("handshake");
    tokio::spawn(conn);
    let mut req = http::Request::post("/in").header("host", "x").header("content-type", "application/json");
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let resp =
        send.send_request(req.body(Full::new(Bytes::from_static(body.as_bytes()))).expect("req")).await.expect("resp");
    resp.status().as_u16()
}

#[tokio::test]
async fn allowlists_with_and_without_trusted_proxies() {
    let r = TestReceiver::ok().await;
    let toml = config(&[("a", &r.url("/a"), "")])
        .replace(
            "destinations = [\"a\"]\n",
            "destinations = [\"a\"]\nallow_ips = [\"127.0.0.10/32\", \"3.87.163.45/32\", \"2001:db8::/32\"]\n",
        )
        .replace(
            "[[listeners]]\naddr = \"127.0.0.1:0\"\n",
            "[[listeners]]\naddr = \"127.0.0.1:0\"\ntrusted_proxies = [\"127.0.0.20/32\"]\n",
        );
    let relay = TestRelay::start(&toml).await;
    let a = relay.ingress;
    assert_eq!(post_from("127.0.0.10", a, &[], "{\"n\":1}").await, 200, "allowed source");
    assert_eq!(post_from("127.0.0.11", a, &[], "{\"n\":2}").await, 403, "source not in allow_ips");
    // Spoofed X-Forwarded-For from an untrusted peer is ignored.
    assert_eq!(post_from("127.0.0.11", a, &[("x-forwarded-for", "3.87.163.45")], "{\"n\":3}").await, 403);
    // The trusted proxy's header is believed: rightmost untrusted hop.
    assert_eq!(post_from("127.0.0.20", a, &[("x-forwarded-for", "9.9.9.9, 3.87.163.45")], "{\"n\":4}").await, 200);
    assert_eq!(post_from("127.0.0.20", a, &[("x-forwarded-for", "3.87.163.45, 9.9.9.9")], "{\"n\":5}").await, 403);
    assert_eq!(post_from("127.0.0.20", a, &[("forwarded", "for=\"[2001:db8::7]:1234\"")], "{\"n\":6}").await, 200);
    assert_eq!(post_from("127.0.0.20", a, &[], "{\"n\":7}").await, 403, "the proxy itself is not allowed");

    let got = r.wait_for(3, WAIT).await;
    let mut bodies: Vec<_> = got.iter().map(|x| String::from_utf8_lossy(&x.body).into_owned()).collect();
    bodies.sort();
    assert_eq!(bodies, ["{\"n\":1}", "{\"n\":4}", "{\"n\":6}"], "refused requests were not persisted");
    let fwd = got.iter().find(|x| x.body.as_ref() == b"{\"n\":4}").expect("n4");
    assert_eq!(fwd.header("x-forwarded-for").as_deref(), Some("9.9.9.9, 3.87.163.45, 3.87.163.45"));
    let m = relay.metrics().await;
    assert_eq!(metric(&m, "switchboard_ingress_rejected_total{reason=\"ip_not_allowed\",route=\"/in\"}"), 4.0, "{m}");
}

fn auth_config(dest: &str, auth: &str) -> String {
    config(&[("a", dest, "")]).replace("destinations = [\"a\"]\n", &format!("destinations = [\"a\"]\n{auth}\n"))
}

#[tokio::test]
async fn body_fields_auth_with_rotation_and_the_real_sample() {
    // The current password comes from a file reference, the previous one inline.
    let secrets = tempfile::tempdir().expect("tempdir");
    let pw = secrets.path().join("ts-password");
    std::fs::write(&pw, "pwd\n").expect("write");
    let r = TestReceiver::ok().await;
    let relay = TestRelay::start(&auth_config(
        &r.url("/a"),
        &format!(
            "[routes.auth.body_fields]\nusername = \"user\"\npasswords = [\"file:{}\", \"previous-secret\"]",
            pw.display()
        ),
    ))
    .await;
    let url = relay.url("/in");
    let sample = sample("niddservice-uplink.json");
    assert_eq!(post(&url, "application/json", sample.clone()).await.0, 200, "the real sample authenticates");
    let rotated = String::from_utf8_lossy(&sample).replace("\"pwd\"", "\"previous-secret\"");
    assert_eq!(post(&url, "application/json", rotated).await.0, 200, "the previous password is still accepted");
    let wrong = String::from_utf8_lossy(&sample).replace("\"pwd\"", "\"guess\"");
    let (status, _, body) = post(&url, "application/json", wrong).await;
    assert_eq!(status, 401);
    assert!(String::from_utf8_lossy(&body).contains("wrong credentials"));
    let (status, _, body) = post(&url, "application/json", "{\"requestId\":\"x\"}").await;
    assert_eq!(status, 401);
    assert!(String::from_utf8_lossy(&body).contains("missing"));
    let (status, _, body) = post(&url, "text/xml", "<soap:Envelope/>").await;
    assert_eq!(status, 401);
    assert!(String::from_utf8_lossy(&body).contains("JSON"), "{}", String::from_utf8_lossy(&body));
    let wrong_user = String::from_utf8_lossy(&sample).replace("\"user\"", "\"other\"");
    assert_eq!(post(&url, "application/json", wrong_user).await.0, 401);

    assert_eq!(r.wait_for(2, WAIT).await.len(), 2);
    let m = relay.metrics().await;
    assert_eq!(metric(&m, "switchboard_ingress_rejected_total{reason=\"bad_credentials\",route=\"/in\"}"), 2.0);
    assert_eq!(metric(&m, "switchboard_ingress_rejected_total{reason=\"not_json\",route=\"/in\"}"), 1.0);
    assert_eq!(metric(&m, "switchboard_ingress_rejected_total{reason=\"missing_credentials\",route=\"/in\"}"), 1.0);
    assert_eq!(r.count(), 2, "nothing refused was persisted");
}

#[tokio::test]
async fn basic_header_and_hmac_auth() {
    use base64::Engine;
    use hmac::Mac;
    let r = TestReceiver::ok().await;

    let relay = TestRelay::start(&auth_config(
        &r.url("/a"),
        "[routes.auth.basic]\nusername = \"ts\"\npasswords = [\"new\", \"old\"]",
    ))
    .await;
    let url = relay.url("/in");
    let basic =
        |u: &str, p: &str| format!("Basic {}", base64::engine::general_purpose::STANDARD.encode(format!("{u}:{p}")));
    assert_eq!(request("POST", &url, &[("authorization", &basic("ts", "new"))], "{}").await.0, 200);
    assert_eq!(request("POST", &url, &[("authorization", &basic("ts", "old"))], "{}").await.0, 200);
    assert_eq!(request("POST", &url, &[("authorization", &basic("ts", "bad"))], "{}").await.0, 401);
    assert_eq!(request("POST", &url, &[], "{}").await.0, 401);
    drop(relay);

    let relay = TestRelay::start(&auth_config(
        &r.url("/a"),
        "[routes.auth.header]\nname = \"X-Callback-Secret\"\nvalues = [\"s3cret\"]",
    ))
    .await;
    let url = relay.url("/in");
    assert_eq!(request("POST", &url, &[("x-callback-secret", "s3cret")], "{}").await.0, 200);
    assert_eq!(request("POST", &url, &[("x-callback-secret", "nope")], "{}").await.0, 401);
    assert_eq!(request("POST", &url, &[], "{}").await.0, 401);
    drop(relay);

    let relay = TestRelay::start(&auth_config(
        &r.url("/a"),
        "[routes.auth.hmac]\nheader = \"X-Hub-Signature-256\"\nprefix = \"sha256=\"\nsecrets = [\"hooksecret\"]",
    ))
    .await;
    let url = relay.url("/in");
    let body = "{\"event\":\"location\"}";
    let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(b"hooksecret").expect("key");
    mac.update(body.as_bytes());
    let sig: String = mac.finalize().into_bytes().iter().map(|b| format!("{b:02x}")).collect();
    assert_eq!(request("POST", &url, &[("x-hub-signature-256", &format!("sha256={sig}"))], body).await.0, 200);
    assert_eq!(
        request("POST", &url, &[("x-hub-signature-256", &format!("sha256={sig}"))], "{\"event\":\"tampered\"}").await.0,
        401
    );
    assert_eq!(request("POST", &url, &[], body).await.0, 401);
    assert_eq!(r.wait_for(4, WAIT).await.len(), 4);
}

#[tokio::test]
async fn strip_body_fields_only_for_the_destination_that_asks() {
    let stripped = TestReceiver::ok().await;
    let original = TestReceiver::ok().await;
    let relay = TestRelay::start(&config(&[
        ("app", &stripped.url("/app"), "strip_body_fields = [\"username\", \"password\"]"),
        ("audit", &original.url("/audit"), ""),
    ]))
    .await;
    let sample = sample("niddservice-uplink.json");
    assert_eq!(post(&relay.url("/in"), "application/json", sample.clone()).await.0, 200);
    assert_eq!(post(&relay.url("/in"), "text/xml", "<not-json/>").await.0, 200);
    let app = stripped.wait_for(2, WAIT).await;
    let audit = original.wait_for(2, WAIT).await;
    let a: serde_json::Value = serde_json::from_slice(&app[0].body).expect("json");
    assert!(a.get("username").is_none() && a.get("password").is_none(), "{a}");
    let orig: serde_json::Value = serde_json::from_slice(&sample).expect("json");
    assert_eq!(a["requestId"], orig["requestId"]);
    assert_eq!(a["niddResponse"], orig["niddResponse"]);
    assert_eq!(audit[0].body, sample, "the other destination gets the original bytes");
    assert_eq!(&app[1].body[..], b"<not-json/>", "non-JSON is forwarded unchanged");
    let m = relay.metrics().await;
    assert_eq!(metric(&m, "switchboard_strip_skipped_total{destination=\"app\"}"), 1.0);
}

#[tokio::test]
async fn admin_token_protects_all_but_health() {
    let r = TestReceiver::ok().await;
    let toml = config(&[("a", &r.url("/a"), "")])
        .replace("[admin]\naddr = \"127.0.0.1:0\"\n", "[admin]\naddr = \"127.0.0.1:0\"\ntoken = \"admintok\"\n");
    let relay = TestRelay::start(&toml).await;
    assert_eq!(get(&relay.admin_url("/healthz")).await.0, 200);
    assert_eq!(get(&relay.admin_url("/readyz")).await.0, 200);
    assert_eq!(get(&relay.admin_url("/metrics")).await.0, 401);
    assert_eq!(request("GET", &relay.admin_url("/metrics"), &[("authorization", "Bearer wrong")], "").await.0, 401);
    assert_eq!(request("GET", &relay.admin_url("/metrics"), &[("authorization", "Bearer admintok")], "").await.0, 200);
    assert_eq!(request("POST", &relay.admin_url("/api/dead-letters/a/replay"), &[], "").await.0, 401);
}

#[tokio::test]
async fn secrets_never_reach_logs_or_check_output() {
    let dir = tempfile::tempdir().expect("tempdir");
    let r = TestReceiver::ok().await;
    let toml = config(&[("a", &r.url("/a"), "strip_body_fields = [\"password\"]")])
        .replace("destinations = [\"a\"]\n", "destinations = [\"a\"]\n[routes.auth.body_fields]\nusername = \"user\"\npasswords = [\"env:SB_TEST_SECRET_PW\", \"inline-old-Secret-77\"]\n")
        .replace("[admin]\naddr = \"127.0.0.1:0\"\n", "[admin]\naddr = \"0.0.0.0:0\"\ntoken = \"admin-Token-55\"\n");
    // An OTLP collector's key, sent with exports that fail (nothing listens
    // on port 1): neither the check nor the failures' log lines show it.
    let down = dead_addr().await;
    let toml = format!(
        "{toml}[telemetry.otlp]\nendpoint = \"http://{down}\"\ninterval = \"50ms\"\nheaders = {{ x-api-key = \"otlp-Key-31\" }}\n"
    );
    let path = write(dir.path(), &toml);

    let out = std::process::Command::new(env!("CARGO_BIN_EXE_switchboard"))
        .args(["check", "--config"])
        .arg(&path)
        .env("SB_TEST_SECRET_PW", "env-Secret-99")
        .output()
        .expect("check");
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "{text}");
    for secret in ["env-Secret-99", "inline-old-Secret-77", "admin-Token-55", "otlp-Key-31"] {
        assert!(!text.contains(secret), "check printed {secret}: {text}");
    }
    assert!(text.contains("env:SB_TEST_SECRET_PW"), "references are shown as written: {text}");
    assert!(!text.contains("warning: admin.addr"), "a token is set: no admin warning: {text}");

    // Run with debug logs, send right and wrong credentials.
    let relay =
        RelayProcess::start_with_env(&path, &[("RUST_LOG", "debug"), ("SB_TEST_SECRET_PW", "env-Secret-99")]).await;
    let good = "{\"username\":\"user\",\"password\":\"env-Secret-99\",\"n\":1}";
    let bad = "{\"username\":\"user\",\"password\":\"wrong-Guess-11\",\"n\":2}";
    assert_eq!(post(&relay.url("/in"), "application/json", good).await.0, 200);
    assert_eq!(post(&relay.url("/in"), "application/json", bad).await.0, 401);
    assert_eq!(
        post(&relay.url("/in"), "application/json", "{\"username\":\"user\",\"password\":\"inline-old-Secret-77\"}")
            .await
            .0,
        200
    );
    r.wait_for(2, WAIT).await;
    let (status, _, metrics) =
        request("GET", &relay.admin_url("/metrics"), &[("authorization", "Bearer admin-Token-55")], "").await;
    assert_eq!(status, 200);
    eventually!(WAIT, "an OTLP export failed and was logged", {
        if relay.logs().contains("OTLP export failed") {
            Ok(())
        } else {
            Err("not yet".to_string())
        }
    });
    let logs = relay.logs();
    assert!(logs.len() > 100, "debug logs were captured");
    for secret in ["env-Secret-99", "inline-old-Secret-77", "admin-Token-55", "wrong-Guess-11", "otlp-Key-31"] {
        assert!(!logs.contains(secret), "logs contain {secret}");
        assert!(!String::from_utf8_lossy(&metrics).contains(secret), "metrics contain {secret}");
    }
    drop(relay);
}

#[test]
fn check_warns_about_ports_and_plain_http_but_passes() {
    let dir = tempfile::tempdir().expect("tempdir");
    let toml = config(&[("a", "http://127.0.0.1:1/", "")]).replace(
        "[[listeners]]\naddr = \"127.0.0.1:0\"\n",
        "[[listeners]]\naddr = \"0.0.0.0:8080\"\n[[listeners]]\naddr = \"0.0.0.0:9001\"\n",
    );
    let path = write(dir.path(), &toml);
    let out = crate::binary::check(&path);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(stderr.contains("listeners[0].addr: port 8080 is not one a sender can register"), "{stderr}");
    assert!(!stderr.contains("listeners[1].addr: port"), "9001 is a ThingSpace port: {stderr}");
    assert!(stderr.contains("listeners[1]: plain HTTP on non-loopback"), "{stderr}");

    let custom = toml.replace("[[routes]]", "[check]\npublic_ports = [\"8000-8100\"]\n[[routes]]");
    let path = write(dir.path(), &custom);
    let out = crate::binary::check(&path);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!stderr.contains("port 8080"), "{stderr}");
    assert!(stderr.contains("port 9001"), "{stderr}");

    // Retention with nothing guarding the disk.
    let unguarded = config(&[("a", "http://127.0.0.1:1/", "")])
        .replace("[store]\n", "[store]\nretain_delivered = \"1d\"\nmin_free_bytes = 0\n");
    let out = crate::binary::check(&write(dir.path(), &unguarded));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(stderr.contains("store.retain_delivered with store.min_free_bytes = 0"), "{stderr}");
    let guarded = unguarded.replace("min_free_bytes = 0\n", "");
    let out = crate::binary::check(&write(dir.path(), &guarded));
    assert!(!String::from_utf8_lossy(&out.stderr).contains("store.retain_delivered"));
}

/// The configuration contract from the HTTPS issue, exactly as written
/// except for the two certificate paths (which must exist to validate).
const CONTRACT: &str = r#"
[[listeners]]
addr = "0.0.0.0:9443"
tls = { cert = "/etc/switchboard/fullchain.pem", key = "/etc/switchboard/privkey.pem" }
trusted_proxies = ["10.0.0.0/8"]

[[routes]]
path = "/thingspace/CarrierService"
destinations = ["app", "audit"]
allow_ips = ["3.87.163.45/32", "3.91.119.203/32", "127.0.0.0/8"]
[routes.auth.body_fields]
username = "acct-0252012345"
passwords = ["env:TS_CALLBACK_PASSWORD", "previous-secret"]

[destinations.app]
url = "https://app.internal.example/callbacks"
strip_body_fields = ["username", "password"]

[destinations.audit]
url = "http://127.0.0.1:8082/audit"
"#;

#[test]
fn the_issue_config_contract_loads_as_written() {
    let ca = Ca::new();
    let dir = tempfile::tempdir().expect("tempdir");
    let (cert, key) = write_pair(dir.path(), "fullchain", &ca.leaf(7, None));
    let text = CONTRACT
        .replace("/etc/switchboard/fullchain.pem", &cert.display().to_string())
        .replace("/etc/switchboard/privkey.pem", &key.display().to_string());
    let path = dir.path().join("contract.toml");
    std::fs::write(&path, text).expect("write");
    let run = |env: &[(&str, &str)]| {
        let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_switchboard"));
        cmd.args(["check", "-c"]).arg(&path).env_remove("TS_CALLBACK_PASSWORD");
        for (k, v) in env {
            cmd.env(k, v);
        }
        cmd.output().expect("check")
    };
    let out = run(&[("TS_CALLBACK_PASSWORD", "current-secret")]);
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "{text}");
    assert!(!text.contains("current-secret") && !text.contains("previous-secret"), "{text}");
    // Without the variable: a config error naming the key and the variable, not a value.
    let out = run(&[]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(78), "{stderr}");
    assert!(
        stderr
            .contains("routes[0].auth.body_fields.passwords[0]: environment variable TS_CALLBACK_PASSWORD is not set"),
        "{stderr}"
    );
}

/// A cross-site page in the operator's browser cannot change anything on
/// the admin API (a form post carries the page's Origin), even without a
/// token; the same request without Origin (curl, the CLI) works.
#[tokio::test]
async fn cross_site_requests_cannot_change_anything_on_the_admin_api() {
    let r = TestReceiver::ok().await;
    let relay = TestRelay::start(&config(&[("app", &r.url("/a"), "")])).await;
    let url = relay.admin_url("/api/destinations/app/pause");
    for headers in [
        vec![("origin", "http://evil.example"), ("content-type", "application/x-www-form-urlencoded")],
        vec![("origin", "null")],
        vec![("sec-fetch-site", "cross-site")],
    ] {
        let (s, _, body) = request("POST", &url, &headers, "x=1").await;
        assert_eq!(s, 403, "{headers:?}: {}", String::from_utf8_lossy(&body));
    }
    let (_, _, body) = get(&relay.admin_url("/api/destinations")).await;
    assert!(String::from_utf8_lossy(&body).contains("\"state\":\"active\""), "nothing was paused");
    let same_origin = format!("http://{}", relay.admin_url("").trim_start_matches("http://"));
    let (s, _, _) = request("POST", &url, &[("origin", &same_origin)], "").await;
    assert_eq!(s, 200, "the admin's own page may");
    let (s, _, _) = request("POST", &relay.admin_url("/api/destinations/app/resume"), &[], "").await;
    assert_eq!(s, 200, "curl and the CLI may");
    relay.stop().await.expect("stop");
}

/// Regression (DNS rebinding, issue 23): a page of another site whose name
/// was rebound to the admin listener's address sends that name as `Host`
/// and a matching `Origin`; without a token it purged dead letters. The
/// admin API now answers only to IP addresses, `localhost` and the names
/// in `admin.allowed_hosts`; the probes answer to anything.
#[tokio::test]
async fn dns_rebinding_names_get_nothing_from_the_admin_api() {
    let r = TestReceiver::ok().await;
    let cfg = config(&[("app", &r.url("/a"), "")]).replace(
        "[admin]\naddr = \"127.0.0.1:0\"\n",
        "[admin]\naddr = \"127.0.0.1:0\"\nallowed_hosts = [\"Relay.Internal.\"]\n",
    );
    let relay = TestRelay::start(&cfg).await;
    let port =
        relay.admin_url("").trim_start_matches("http://").rsplit_once(':').map(|(_, p)| p.to_string()).expect("port");
    let evil = format!("rebind.evil.example:{port}");
    let evil_origin = format!("http://{evil}");
    let pause = relay.admin_url("/api/destinations/app/pause");
    let (s, _, body) = request("POST", &pause, &[("host", &evil), ("origin", &evil_origin)], "").await;
    let text = String::from_utf8_lossy(&body);
    assert_eq!(s, 403, "{text}");
    assert!(text.contains("rebind.evil.example") && text.contains("admin.allowed_hosts"), "says why: {text}");
    let (s, _, _) = request("GET", &relay.admin_url("/api/destinations"), &[("host", &evil)], "").await;
    assert_eq!(s, 403, "reading is refused too");
    let (s, _, _) = request("GET", &relay.admin_url("/metrics"), &[("host", &evil)], "").await;
    assert_eq!(s, 403);
    let (_, _, body) = get(&relay.admin_url("/api/destinations")).await;
    assert!(String::from_utf8_lossy(&body).contains("\"state\":\"active\""), "nothing was paused");
    // Probes answer to any name (a load balancer's health check).
    let (s, _, _) = request("GET", &relay.admin_url("/healthz"), &[("host", &evil)], "").await;
    assert_eq!(s, 200);
    // IP addresses, localhost and the listed name are this listener's.
    for host in [
        format!("127.0.0.1:{port}"),
        format!("localhost:{port}"),
        format!("relay.internal:{port}"),
        "[::1]".to_string(),
    ] {
        let (s, _, body) = request("GET", &relay.admin_url("/api/destinations"), &[("host", &host)], "").await;
        assert_eq!(s, 200, "{host}: {}", String::from_utf8_lossy(&body));
    }
    let listed = format!("http://relay.internal:{port}");
    let (s, _, _) =
        request("POST", &pause, &[("host", &format!("relay.internal:{port}")), ("origin", &listed)], "").await;
    assert_eq!(s, 200, "a listed name's own page may change things");
    relay.stop().await.expect("stop");
}

/// The `Bearer` scheme is case-insensitive (RFC 9110, 11.1): `bearer` and
/// `BEARER` with the right token are let in (issue 23, point 5).
#[tokio::test]
async fn admin_token_scheme_is_case_insensitive() {
    let r = TestReceiver::ok().await;
    let cfg = config(&[("app", &r.url("/a"), "")])
        .replace("[admin]\naddr = \"127.0.0.1:0\"\n", "[admin]\naddr = \"127.0.0.1:0\"\ntoken = \"admintok\"\n");
    let relay = TestRelay::start(&cfg).await;
    let url = relay.admin_url("/api/destinations");
    for value in ["Bearer admintok", "bearer admintok", "BEARER admintok"] {
        let (s, _, _) = request("GET", &url, &[("authorization", value)], "").await;
        assert_eq!(s, 200, "{value}");
    }
    for value in ["bearer wrong", "Basic admintok", "bearer", "admintok"] {
        let (s, _, _) = request("GET", &url, &[("authorization", value)], "").await;
        assert_eq!(s, 401, "{value}");
    }
    relay.stop().await.expect("stop");
}

/// Regression (issue 23, point 4): a JSON body nested deeper than the
/// parser's 128 levels could not be stripped and went to a stripping
/// destination with its password. It is now a dead letter there, with the
/// reason, while the destination that strips nothing gets the original.
#[tokio::test]
async fn a_json_body_too_deep_to_strip_never_reaches_a_stripping_destination() {
    let stripped = TestReceiver::ok().await;
    let original = TestReceiver::ok().await;
    let relay = TestRelay::start(&config(&[
        ("app", &stripped.url("/app"), "strip_body_fields = [\"password\"]"),
        ("audit", &original.url("/audit"), ""),
    ]))
    .await;
    let deep = format!("{{\"password\":\"pw-Secret-31\",\"x\":{}1{}}}", "[".repeat(200), "]".repeat(200));
    assert_eq!(post(&relay.url("/in"), "application/json", deep.clone()).await.0, 200);
    let audit = original.wait_for(1, WAIT).await;
    assert_eq!(audit[0].body, deep.as_bytes(), "the other destination gets the original bytes");
    let url = relay.admin_url("/api/dead-letters/app");
    let listed = eventually!(WAIT, "a dead letter for app", {
        let (_, _, body) = get(&url).await;
        let v: serde_json::Value = serde_json::from_slice(&body).expect("json");
        if v["dead_letters"].as_array().is_some_and(|d| !d.is_empty()) {
            Ok(v)
        } else {
            Err(v.to_string())
        }
    });
    let reason = listed["dead_letters"][0]["reason"].as_str().unwrap_or_default().to_string();
    assert!(reason.contains("strip_body_fields") && reason.contains("cannot be parsed"), "{reason}");
    assert!(!reason.contains("pw-Secret-31"));
    assert_eq!(listed["dead_letters"][0]["attempts"], 1, "not retried");
    // Issue 23, point 10: one time format in the API, RFC 3339 UTC.
    let at = listed["dead_letters"][0]["dead_at"].as_str().unwrap_or_default();
    assert!(humantime::parse_rfc3339(at).is_ok() && at.ends_with('Z'), "{listed}");
    assert!(listed["dead_letters"][0].get("dead_at_ms").is_none(), "{listed}");
    // A plain body that is not JSON still goes (nothing to strip), counted.
    assert_eq!(post(&relay.url("/in"), "text/xml", "<a/>").await.0, 200);
    let got = stripped.wait_for(1, WAIT).await;
    assert_eq!(&got[0].body[..], b"<a/>", "the deep body never reached app");
    relay.stop().await.expect("stop");
}
