//! Named sender verifiers (`[routes.auth.github]` and the others) against
//! requests signed by the senders' own libraries: `@octokit/webhooks-methods`
//! (GitHub) and `stripe` (Stripe's test header) from npm; `slack_sdk`,
//! `twilio`, `svix` and `standardwebhooks` from PyPI (Shopify publishes no
//! signer: its documented HMAC with Python's `hmac`). For each: a signed
//! callback is delivered; a wrong secret, a tampered body and (where the
//! sender signs a time) a stale timestamp are refused with 401 and counted
//! under the right reason. Slack's `url_verification` is answered and not
//! forwarded; GitHub's delivery id is the default de-duplication key.
//! `.ci/run` installs the libraries; without it they are installed once
//! under `target/`.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;

use crate::support::*;

const WHSEC: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// A Python with the senders' libraries (`test_python`).
fn python() -> &'static Path {
    static PYTHON: OnceLock<PathBuf> = OnceLock::new();
    PYTHON.get_or_init(|| test_python("signers", &["slack_sdk", "twilio", "svix", "standardwebhooks"]))
}

/// An npm prefix with `stripe` and `@octokit/webhooks-methods`:
/// `$SWITCHBOARD_NPM_PREFIX`, else `target/npm-signers`, filled once.
fn npm_prefix() -> &'static Path {
    static PREFIX: OnceLock<PathBuf> = OnceLock::new();
    PREFIX.get_or_init(|| {
        if let Some(p) = std::env::var_os("SWITCHBOARD_NPM_PREFIX") {
            return PathBuf::from(p);
        }
        let prefix = root().join("target/npm-signers");
        if !prefix.join("node_modules/stripe").exists()
            || !prefix.join("node_modules/@octokit/webhooks-methods").exists()
        {
            std::fs::create_dir_all(&prefix).expect("npm prefix");
            let ok = Command::new("npm")
                .args(["install", "--silent", "--prefix"])
                .arg(&prefix)
                .args(["stripe", "@octokit/webhooks-methods"])
                .status();
            assert!(ok.is_ok_and(|s| s.success()), "cannot install stripe and @octokit/webhooks-methods from npm");
        }
        prefix
    })
}

/// Headers (and the URL, which Twilio's JSON signing extends) for `body`
/// as `provider` signs it with `secret` at `ts`.
fn sign(provider: &str, secret: &str, public_url: &str, ts: u64, body: &str) -> (Vec<(String, String)>, String) {
    let mut cmd = match provider {
        "github" | "stripe" => {
            let mut c = Command::new("node");
            c.arg(root().join("tests/it/js/sign_webhook.mjs")).args([provider, secret, &ts.to_string()]);
            c.env("SWITCHBOARD_NPM_PREFIX", npm_prefix());
            c
        }
        _ => {
            let mut c = Command::new(python());
            c.arg(root().join("tests/it/py/sign_webhook.py")).args([provider, secret, public_url, &ts.to_string()]);
            c
        }
    };
    let mut child = cmd.stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().expect("signer");
    std::io::Write::write_all(&mut child.stdin.take().expect("stdin"), body.as_bytes()).expect("body to signer");
    let out = child.wait_with_output().expect("signer output");
    assert!(out.status.success(), "{provider} signer: {}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("signer json");
    let headers = v["headers"]
        .as_object()
        .expect("headers")
        .iter()
        .map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().to_string()))
        .collect();
    (headers, v["url"].as_str().unwrap_or(public_url).to_string())
}

fn now_s() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).expect("clock").as_secs()
}

/// Posts `body` to `path` with `headers`, keeping the query of `signed_url`.
async fn send(
    relay: &TestRelay,
    path: &str,
    signed_url: &str,
    headers: &[(String, String)],
    body: &str,
) -> (u16, String) {
    let query = signed_url.split_once('?').map(|(_, q)| format!("?{q}")).unwrap_or_default();
    let h: Vec<(&str, &str)> = headers.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let (s, _, b) = request("POST", &relay.url(&format!("{path}{query}")), &h, body.to_string()).await;
    (s, String::from_utf8_lossy(&b).into_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn named_senders_signed_by_their_own_libraries_pass_and_forgeries_are_refused() {
    let sink = TestReceiver::ok().await;
    let twilio_url = "https://hooks.example.com/twilio";
    // (provider, route, secret in the config, signs a time)
    let cases: [(&str, &str, &str, bool); 7] = [
        ("github", "/github", "gh-secret", false),
        ("stripe", "/stripe", "whsec_stripe_test_secret", true),
        ("shopify", "/shopify", "shpss_secret", false),
        ("slack", "/slack", "8f742231b10e8888abcd99yyyzzz85a5", true),
        ("twilio", "/twilio", "twilio-auth-token", false),
        ("standard-webhooks", "/sw", WHSEC, true),
        ("svix", "/svix", WHSEC, true),
    ];
    let mut toml = config(&[("sink", &sink.url("/s"), "")]);
    for (provider, route, secret, _) in cases {
        toml.push_str(&format!("[[routes]]\npath = \"{route}\"\ndestinations = [\"sink\"]\n"));
        if provider == "github" {
            toml.push_str("dedupe = { window = \"1h\" }\n");
        }
        // Rotation: a retired secret first (a base64 key where keys are).
        let old = if secret.starts_with("whsec_M") { "whsec_b2xkLXNlY3JldA==" } else { "old-secret" };
        toml.push_str(&format!("[routes.auth.{provider}]\nsecrets = [\"{old}\", \"{secret}\"]\n"));
        if provider == "twilio" {
            toml.push_str(&format!("public_url = \"{twilio_url}\"\n"));
        }
    }
    let relay = TestRelay::start(&toml).await;
    let mut delivered = 0;
    for (provider, route, secret, signs_time) in cases {
        let body = format!("{{\"id\":\"evt_{provider}\",\"type\":\"test\",\"n\":1}}");
        let (headers, url) = sign(provider, secret, twilio_url, now_s(), &body);
        let (s, answer) = send(&relay, route, &url, &headers, &body).await;
        assert_eq!(s, 200, "{provider}: {answer}");
        delivered += 1;
        sink.wait_for(delivered, WAIT).await;

        let (headers, url) = sign(provider, "not-the-secret", twilio_url, now_s(), &body);
        let wrong = if provider == "standard-webhooks" || provider == "svix" {
            // Their keys are base64: another valid key.
            sign(provider, "whsec_AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=", twilio_url, now_s(), &body)
        } else {
            (headers, url)
        };
        let (s, answer) = send(&relay, route, &wrong.1, &wrong.0, &body).await;
        assert_eq!((s, answer.contains("signature")), (401, true), "{provider}, wrong secret: {answer}");

        let (headers, url) = sign(provider, secret, twilio_url, now_s(), &body);
        let tampered = body.replace("\"n\":1", "\"n\":2");
        let (s, answer) = send(&relay, route, &url, &headers, &tampered).await;
        assert_eq!(s, 401, "{provider}, tampered body: {answer}");

        if signs_time {
            let (headers, url) = sign(provider, secret, twilio_url, now_s() - 3600, &body);
            let (s, answer) = send(&relay, route, &url, &headers, &body).await;
            assert_eq!(s, 401, "{provider}, an hour old: {answer}");
        }
    }
    let m = relay.metrics().await;
    for (provider, route, _, signs_time) in cases {
        let count = |reason: &str| {
            metric(&m, &format!("switchboard_ingress_rejected_total{{reason=\"{reason}\",route=\"{route}\"}}"))
        };
        assert_eq!(count("bad_signature"), 2.0, "{provider}: wrong secret and tampered body");
        assert_eq!(count("stale_timestamp"), if signs_time { 1.0 } else { 0.0 }, "{provider}");
    }
    assert_eq!(sink.count(), cases.len(), "only the signed callbacks were forwarded");

    // Twilio's form bodies: the URL and the sorted parameters are signed.
    let form = "CallSid=CA1234567890ABCDE&Caller=%2B12349013030&Digits=1234&From=%2B12349013030&To=%2B18005551212";
    let (headers, url) = sign("twilio", cases[4].2, twilio_url, now_s(), form);
    let (s, answer) = send(&relay, "/twilio", &url, &headers, form).await;
    assert_eq!(s, 200, "twilio form: {answer}");
    let (s, _) = send(&relay, "/twilio", &url, &headers, &form.replace("1234&", "1235&")).await;
    assert_eq!(s, 401, "a changed parameter");
    sink.wait_for(cases.len() + 1, WAIT).await;

    // Slack's url_verification: answered with the challenge, not forwarded.
    let challenge =
        r#"{"token":"t","challenge":"3eZbrw1aBm2rZgRNFdxV2595E9CY3gmdALWMmHkvFXO7tYXAYM8P","type":"url_verification"}"#;
    let (headers, url) = sign("slack", cases[3].2, twilio_url, now_s(), challenge);
    let (s, answer) = send(&relay, "/slack", &url, &headers, challenge).await;
    assert_eq!(s, 200, "{answer}");
    let v: serde_json::Value = serde_json::from_str(&answer).expect("json");
    assert_eq!(v["challenge"], "3eZbrw1aBm2rZgRNFdxV2595E9CY3gmdALWMmHkvFXO7tYXAYM8P");
    // An unsigned handshake is refused like anything else.
    let (s, _) = send(&relay, "/slack", "", &[], challenge).await;
    assert_eq!(s, 401);

    // GitHub's X-GitHub-Delivery is the route's de-duplication key: a
    // redelivery (same id, even a different body) is answered as a
    // duplicate and not forwarded again.
    let ts = now_s() + 7;
    let first = r#"{"zen":"Keep it logically awesome."}"#;
    let again = r#"{"zen":"Keep it logically awesome.","redelivery":true}"#;
    let (h1, _) = sign("github", "gh-secret", "", ts, first);
    let (h2, _) = sign("github", "gh-secret", "", ts, again);
    let (s, a1) = send(&relay, "/github", "", &h1, first).await;
    assert_eq!(s, 200, "{a1}");
    let (s, a2) = send(&relay, "/github", "", &h2, again).await;
    assert_eq!(s, 200, "{a2}");
    assert!(a2.contains("\"duplicate\":true"), "{a2}");
    sink.wait_for(cases.len() + 2, WAIT).await;
    let m = relay.metrics().await;
    assert_eq!(metric(&m, "switchboard_ingress_duplicates_total{route=\"/github\"}"), 1.0);
    assert_eq!(sink.count(), cases.len() + 2);
    relay.stop().await.expect("stop");
}

/// A named sender's keys are checked like the rest of the file.
#[test]
fn named_sender_settings_are_config_errors_naming_the_key() {
    let dir = tempfile::tempdir().expect("tempdir");
    let base = config(&[("a", "http://127.0.0.1:1/a", "")]);
    for (extra, key, why) in [
        ("[routes.auth.twilio]\nsecrets = [\"t\"]\n", "routes[0].auth.twilio.public_url", "signs the URL"),
        (
            "[routes.auth.github]\nsecrets = [\"s\"]\ntolerance = \"1m\"\n",
            "routes[0].auth.github.tolerance",
            "signs no timestamp",
        ),
        ("[routes.auth.svix]\nsecrets = [\"not base64!\"]\n", "routes[0].auth.svix.secrets[0]", "not a base64"),
        (
            "[routes.auth.github]\nsecrets = [\"s\"]\n[routes.auth.basic]\nusername = \"u\"\npasswords = [\"p\"]\n",
            "routes[0].auth",
            "exactly one",
        ),
        (
            "[routes.auth.shopify]\nsecrets = [\"s\"]\npublic_url = \"https://x/\"\n",
            "routes[0].auth.shopify.public_url",
            "only used by twilio",
        ),
    ] {
        let toml = base.replace("[destinations.a]", &format!("{extra}[destinations.a]"));
        let out = crate::binary::check(&crate::binary::write(dir.path(), &toml));
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(78), "{toml}: {err}");
        assert!(err.contains(key) && err.contains(why), "{toml}: {err}");
    }
}
