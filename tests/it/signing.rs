//! Standard Webhooks signing, checked by the reference implementation: a
//! real receiver records what it got, and the `standardwebhooks` package
//! from PyPI (v1) and `cryptography` (v1a, Ed25519) verify it, for JSON,
//! XML and a stripped body, across a rotation.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use base64::Engine;

use crate::support::*;

/// A Python with `standardwebhooks` and `cryptography` (`test_python`).
fn python() -> &'static Path {
    static PYTHON: OnceLock<PathBuf> = OnceLock::new();
    PYTHON.get_or_init(|| test_python("signing", &["standardwebhooks", "cryptography"]))
}

/// One request to verify: which key, and what the receiver got.
struct Case<'a> {
    kind: &'static str,
    key: &'a str,
    got: &'a Received,
}

/// The reference verifier's verdict per case ("ok" or "FAIL ...").
fn verify(cases: &[Case<'_>]) -> Vec<String> {
    let input: Vec<serde_json::Value> = cases
        .iter()
        .map(|c| {
            let headers: serde_json::Map<String, serde_json::Value> = c
                .got
                .headers
                .iter()
                .filter_map(|(k, v)| Some((k.as_str().to_string(), v.to_str().ok()?.into())))
                .collect();
            serde_json::json!({
                "kind": c.kind,
                "key": c.key,
                "headers": headers,
                "body_b64": base64::engine::general_purpose::STANDARD.encode(&c.got.body),
            })
        })
        .collect();
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/it/py/verify_webhooks.py");
    let mut child = std::process::Command::new(python())
        .arg(script)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("run the verifier");
    {
        use std::io::Write;
        let mut stdin = child.stdin.take().expect("stdin");
        stdin.write_all(serde_json::Value::from(input).to_string().as_bytes()).expect("write cases");
    }
    let out = child.wait_with_output().expect("verifier output");
    assert!(out.status.success(), "verifier failed: {}", String::from_utf8_lossy(&out.stdout));
    String::from_utf8_lossy(&out.stdout).lines().map(str::to_owned).collect()
}

const OLD: &str = "whsec_C2FVsBQIhrscChlQIMV+b5sSYspob7oD";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn receivers_verify_signatures_with_the_reference_implementation() {
    let new = switchboard::delivery::signing::new_hmac_secret();
    let (ed_secret, ed_public) = switchboard::delivery::signing::new_ed25519_pair();
    let receivers = [
        TestReceiver::ok().await,
        TestReceiver::ok().await,
        TestReceiver::ok().await,
        TestReceiver::ok().await,
        TestReceiver::ok().await,
    ];
    let toml = config(&[
        ("v1", &receivers[0].url("/v1"), &format!("[destinations.v1.signing]\nsecrets = [\"{OLD}\"]")),
        // Rotation: the new secret and the old one both sign.
        ("rot", &receivers[1].url("/rot"), &format!("[destinations.rot.signing]\nsecrets = [\"{new}\", \"{OLD}\"]")),
        ("ed", &receivers[2].url("/ed"), &format!("[destinations.ed.signing]\nsecrets = [\"{ed_secret}\"]")),
        (
            "strip",
            &receivers[3].url("/strip"),
            &format!("strip_body_fields = [\"password\"]\n[destinations.strip.signing]\nsecrets = [\"{OLD}\"]"),
        ),
        ("plain", &receivers[4].url("/plain"), ""),
    ]);
    let relay = TestRelay::start(&toml).await;
    let json = sample("carrierservice-fault.json");
    let xml = "<?xml version=\"1.0\"?><soap:Envelope><soap:Body><callback id=\"7\"/></soap:Body></soap:Envelope>";
    assert_eq!(post(&relay.url("/in"), "application/json", json.clone()).await.0, 200);
    assert_eq!(post(&relay.url("/in"), "text/xml", xml).await.0, 200);
    // A sender that signs its own callbacks (Standard Webhooks upstream).
    let sender = [
        ("content-type", "application/json"),
        ("webhook-id", "msg_from_the_sender"),
        ("webhook-timestamp", "1700000000"),
        ("webhook-signature", "v1,c2VuZGVy"),
    ];
    assert_eq!(request("POST", &relay.url("/in"), &sender, "{\"upstream\":true}").await.0, 200);

    let got: Vec<Vec<Received>> = {
        let mut all = Vec::new();
        for r in &receivers {
            all.push(r.wait_for(3, WAIT).await);
        }
        all
    };
    let mut cases = Vec::new();
    for g in &got[0] {
        cases.push(Case { kind: "v1", key: OLD, got: g });
    }
    for g in &got[1] {
        // Either secret verifies: receivers can rotate at their own pace.
        cases.push(Case { kind: "v1", key: OLD, got: g });
        cases.push(Case { kind: "v1", key: &new, got: g });
    }
    for g in &got[2] {
        cases.push(Case { kind: "v1a", key: &ed_public, got: g });
    }
    for g in &got[3] {
        cases.push(Case { kind: "v1", key: OLD, got: g });
    }
    let verdicts = verify(&cases);
    assert_eq!(verdicts.len(), cases.len());
    assert!(verdicts.iter().all(|v| v == "ok"), "{verdicts:?}");

    // The checks bite: a wrong secret, or a body changed by one byte, fails.
    let mut tampered = got[0][0].clone();
    tampered.body = bytes::Bytes::from([&tampered.body[..], b" "].concat());
    let bad = verify(&[Case { kind: "v1", key: &new, got: &got[0][0] }, Case { kind: "v1", key: OLD, got: &tampered }]);
    assert!(bad.iter().all(|v| v.starts_with("FAIL")), "{bad:?}");

    // The stripped body is what was signed and sent, without the field.
    assert!(got[3].iter().all(|g| !String::from_utf8_lossy(&g.body).contains("\"password\"")));
    assert_eq!(got[0].iter().filter(|g| g.body == json).count(), 1, "the unstripped body is byte for byte");
    assert_eq!(got[0].iter().filter(|g| g.body == xml.as_bytes()).count(), 1);

    // A signing destination gets our id (the one it can verify); the sender's
    // id, timestamp and signature go only to destinations that do not sign.
    let upstream = |gs: &[Received]| gs.iter().find(|g| g.body.as_ref() == b"{\"upstream\":true}").cloned();
    let signed = upstream(&got[0]).expect("upstream at v1");
    assert_eq!(signed.header("webhook-id"), signed.header("x-switchboard-id"));
    assert_ne!(signed.header("webhook-timestamp").as_deref(), Some("1700000000"));
    assert!(!signed.header("webhook-signature").unwrap_or_default().contains("c2VuZGVy"));
    let unsigned = upstream(&got[4]).expect("upstream at plain");
    assert_eq!(unsigned.header("webhook-id").as_deref(), Some("msg_from_the_sender"));
    assert_eq!(unsigned.header("webhook-signature").as_deref(), Some("v1,c2VuZGVy"));
    assert!(got[4].iter().filter(|g| g.body == json).all(|g| g.header("webhook-signature").is_none()));
}

/// Bad keys are config errors naming the key, and never printed.
#[test]
fn a_malformed_signing_key_is_a_config_error_naming_the_key() {
    let dir = tempfile::tempdir().expect("tempdir");
    let toml = config(&[(
        "a",
        "http://127.0.0.1:1/a",
        "[destinations.a.signing]\nsecrets = [\"whsec_C2FVsBQIhrscChlQIMV+b5sSYspob7oD\", \"whsk_dG9vLXNob3J0LXNlY3JldA==\"]",
    )]);
    let path = crate::binary::write(dir.path(), &toml);
    let out = crate::binary::check(&path);
    assert_eq!(out.status.code(), Some(78));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("destinations.a.signing.secrets[1]"), "{err}");
    assert!(err.contains("32-byte Ed25519 seed"), "{err}");
    assert!(!err.contains("dG9vLXNob3J0"), "{err}");
    // A valid one is masked in `check`'s output.
    let ok = config(&[(
        "a",
        "http://127.0.0.1:1/a",
        "[destinations.a.signing]\nsecrets = [\"whsec_C2FVsBQIhrscChlQIMV+b5sSYspob7oD\"]",
    )]);
    let out = crate::binary::check(&crate::binary::write(dir.path(), &ok));
    assert!(out.status.success());
    assert!(!String::from_utf8_lossy(&out.stdout).contains("C2FVsBQ"));
}

#[test]
fn keygen_prints_keys_that_sign() {
    let run = |args: &[&str]| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_switchboard")).args(args).output().expect("keygen");
        assert!(out.status.success());
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let secret = run(&["keygen"]);
    assert!(switchboard::delivery::signing::Signer::new([secret.trim()]).is_ok(), "{secret}");
    let pair = run(&["keygen", "--ed25519"]);
    let keys: Vec<&str> = pair.lines().filter(|l| !l.starts_with('#')).collect();
    assert!(keys[0].starts_with("whsk_") && keys[1].starts_with("whpk_"), "{pair}");
    assert!(switchboard::delivery::signing::Signer::new([keys[0]]).is_ok());
    assert_ne!(run(&["keygen"]), secret, "a new secret each time");
}
