//! The CLI against a running relay's admin API: `status`, `dlq`,
//! `destinations`, tables and `--json`, and the one-line errors with
//! their exit codes.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use crate::support::*;

const TOKEN: &str = "cli-test-token-123";

/// Runs `switchboard ARGS`; returns exit code, stdout, stderr.
pub(crate) async fn sb(args: &[&str]) -> (i32, String, String) {
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_switchboard"))
        .args(args)
        .env_remove("SWITCHBOARD_ADMIN")
        .env_remove("SWITCHBOARD_ADMIN_TOKEN")
        .output()
        .await
        .expect("run switchboard");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_shows_status_handles_dead_letters_and_destinations() {
    let accept = Arc::new(AtomicBool::new(false));
    let flag = accept.clone();
    let r =
        TestReceiver::scripted(move |_, _| Reply::Status(if flag.load(Ordering::SeqCst) { 200 } else { 400 })).await;
    let toml = config(&[("app", &r.url("/app"), "")]).replace(
        "[admin]\naddr = \"127.0.0.1:0\"\n",
        &format!("[admin]\naddr = \"127.0.0.1:0\"\ntoken = \"{TOKEN}\"\n"),
    );
    let relay = TestRelay::start(&toml).await;
    let admin = relay.admin_url("");
    let (s, _, body) = post(&relay.url("/in"), "text/plain", "refused at first").await;
    assert_eq!(s, 200);
    let id = acked_id(&body);
    let auth = [("authorization", format!("Bearer {TOKEN}"))];
    eventually!(WAIT, "a dead letter", {
        let (_, _, m) =
            request("GET", &relay.admin_url("/metrics"), &[("authorization", auth[0].1.as_str())], "").await;
        let m = String::from_utf8_lossy(&m).into_owned();
        if metric(&m, "switchboard_dead_letters{destination=\"app\"}") == 1.0 {
            Ok(())
        } else {
            Err(m)
        }
    });
    let a = ["--admin", admin.as_str(), "--token", TOKEN];

    let (code, out, err) = sb(&[&["status"], &a[..]].concat()).await;
    assert_eq!(code, 0, "{err}");
    assert!(out.starts_with("DESTINATION") && out.contains("app") && out.contains("active"), "{out}");
    let (code, out, _) = sb(&[&["status", "--json"], &a[..]].concat()).await;
    assert_eq!(code, 0);
    let v: serde_json::Value = serde_json::from_str(&out).expect("json");
    assert_eq!(v["destinations"][0]["dead_letters"], 1, "{v}");
    assert!(v["destinations"][0]["delivered_per_second"].is_number(), "{v}");

    let (code, out, _) = sb(&[&["dlq", "list", "app"], &a[..]].concat()).await;
    assert_eq!(code, 0);
    assert!(out.contains(&id) && out.contains("400"), "{out}");

    let (code, _, err) = sb(&[&["dlq", "purge", "app"], &a[..]].concat()).await;
    assert_eq!(code, 2, "purging all needs --yes: {err}");
    assert!(err.contains("--yes"), "{err}");

    accept.store(true, Ordering::SeqCst);
    let (code, out, err) = sb(&[&["dlq", "replay", "app"], &a[..]].concat()).await;
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("replayed 1"), "{out}");
    let got = r.wait_for(2, WAIT).await;
    assert_eq!(got[1].header("x-switchboard-id").as_deref(), Some(id.as_str()));

    let (code, out, _) = sb(&[&["destinations", "pause", "app"], &a[..]].concat()).await;
    assert_eq!((code, out.trim()), (0, "app: paused"));
    let (_, out, _) = sb(&[&["status"], &a[..]].concat()).await;
    assert!(out.contains("paused"), "{out}");
    let (code, out, _) = sb(&[&["destinations", "resume", "app"], &a[..]].concat()).await;
    assert_eq!((code, out.trim()), (0, "app: active"));

    // One clear line and a distinct exit code for each failure.
    let (code, _, err) = sb(&["destinations", "pause", "nope", "--admin", &admin, "--token", TOKEN]).await;
    assert_eq!((code, err.trim()), (5, "error: no such destination: nope"));
    let (code, _, err) = sb(&["status", "--admin", &admin, "--token", "wrong"]).await;
    assert_eq!(code, 4, "{err}");
    assert!(err.starts_with("error: token refused") && err.lines().count() == 1, "{err}");
    assert!(!err.contains("wrong") && !err.contains(TOKEN), "no token in errors: {err}");
    // Issue 23, point 10: no token is "required", not "refused"; an
    // address without a scheme is plain HTTP; no address is a usage error.
    let (code, _, err) = sb(&["status", "--admin", &admin]).await;
    assert_eq!(code, 4, "{err}");
    assert!(err.contains("requires a token") && err.lines().count() == 1, "{err}");
    let bare = admin.trim_start_matches("http://").to_string();
    let (code, out, err) = sb(&["destinations", "resume", "app", "--admin", &bare, "--token", TOKEN]).await;
    assert_eq!((code, out.trim()), (0, "app: active"), "{err}");
    let (code, _, err) = sb(&["status"]).await;
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("where is the relay?"), "{err}");
    // A misspelt state or a time the relay cannot read: the CLI says so
    // (exit 2), not a raw API path with exit 1.
    let (code, _, err) = sb(&["messages", "list", "app", "--state", "pendng", "--admin", &admin]).await;
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("pendng") && err.contains("delivered"), "{err}");
    let (code, _, err) = sb(&["messages", "list", "app", "--since", "yesterday", "--admin", &admin]).await;
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("RFC 3339"), "{err}");
    let (code, _, err) = sb(&["dlq", "replay", "app", "--until", "soon", "--admin", &admin]).await;
    assert_eq!(code, 2, "{err}");
    let gone = format!("http://{}", dead_addr().await);
    let (code, _, err) = sb(&["status", "--admin", &gone]).await;
    assert_eq!(code, 3, "{err}");
    assert!(err.starts_with(&format!("error: relay not reachable at {gone}")) && err.lines().count() == 1, "{err}");

    // The admin address and token from the config file.
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = dir.path().join("cli.toml");
    std::fs::write(
        &cfg,
        format!("[admin]\naddr = \"{}\"\ntoken = \"{TOKEN}\"\n", relay.admin_url("").trim_start_matches("http://")),
    )
    .expect("write");
    let (code, out, err) = sb(&["status", "--config", &cfg.display().to_string()]).await;
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("app"), "{out}");
    relay.stop().await.expect("stop");
}
