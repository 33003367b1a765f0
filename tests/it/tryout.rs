//! Trying a deployment: `switchboard sink` prints what it gets and answers
//! as told; `switchboard send-test` follows a sample callback to every
//! destination, or says where it is stuck.

use tokio::io::AsyncBufReadExt;

use crate::binary::{write, RelayProcess};
use crate::nats::free_port;
use crate::support::*;

/// `switchboard sink ARGS` on a port of its own; its address, and the child.
async fn sink(args: &[&str]) -> (String, tokio::process::Child) {
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_switchboard"))
        .arg("sink")
        .args(["--addr", "127.0.0.1:0"])
        .args(args)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("spawn sink");
    let mut lines = tokio::io::BufReader::new(child.stderr.take().expect("stderr")).lines();
    let line =
        tokio::time::timeout(WAIT, lines.next_line()).await.expect("sink starts").expect("read").expect("a line");
    let addr = line.strip_prefix("sink listening on ").expect("the address line").to_string();
    (format!("http://{addr}"), child)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sink_prints_requests_and_answers_as_told() {
    let (url, mut child) = sink(&["--status", "418"]).await;
    let (s, _, _) = request("POST", &format!("{url}/cb"), &[("x-probe", "p1")], "hello sink").await;
    assert_eq!(s, 418);
    let mut out = tokio::io::BufReader::new(child.stdout.take().expect("stdout")).lines();
    let mut seen = String::new();
    while !seen.contains("hello sink") {
        let line = tokio::time::timeout(WAIT, out.next_line()).await.expect("output").expect("read").expect("line");
        seen.push_str(&line);
        seen.push('\n');
    }
    assert!(seen.contains("--- POST /cb") && seen.contains("answering 418") && seen.contains("x-probe: p1"), "{seen}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn send_test_follows_a_sample_to_every_destination_or_says_where_it_is_stuck() {
    let r = TestReceiver::ok().await;
    let dir = tempfile::tempdir().expect("tempdir");
    // send-test reads where the relay listens from its configuration.
    let (ingress, admin) = (free_port(), free_port());
    let toml = config(&[("app", &r.url("/app"), "")])
        .replacen("addr = \"127.0.0.1:0\"", &format!("addr = \"127.0.0.1:{ingress}\""), 1)
        .replacen("addr = \"127.0.0.1:0\"", &format!("addr = \"127.0.0.1:{admin}\""), 1)
        .replace(
            "destinations = [\"app\"]\n",
            "destinations = [\"app\"]\ndedupe = { window = \"24h\", ignore = [\"callbackCount\"] }\n[routes.auth.body_fields]\nusername = \"acct\"\npasswords = [\"pw-1\"]\n",
        );
    let path = write(dir.path(), &toml);
    let _relay = RelayProcess::start(&path).await;
    let run = |args: Vec<String>| async move {
        let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_switchboard"))
            .args(args)
            .output()
            .await
            .expect("send-test");
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let cfg = path.display().to_string();
    for _ in 0..2 {
        // Twice: a fresh requestId each time, so de-duplication does not take the second.
        let (code, out, err) = run(vec!["send-test".into(), "--config".into(), cfg.clone()]).await;
        assert_eq!(code, Some(0), "{out}{err}");
        assert!(out.contains("delivered to every destination"), "{out}");
    }
    let got = r.wait_for(2, WAIT).await;
    let body: serde_json::Value = serde_json::from_slice(&got[1].body).expect("json");
    assert!(body["requestId"].as_str().is_some_and(|id| id.starts_with("send-test-")), "{body}");
    assert_eq!(body["deviceResponse"]["changeDeviceCustomFieldsResponse"]["customFields"][0]["key"], "CustomField1");

    // A destination that is down: where it is stuck, and exit 1.
    let down = dead_addr().await;
    let stuck = toml.replace(&r.url("/app"), &format!("http://{down}/app"));
    let path = write(dir.path(), &stuck);
    drop(_relay);
    let _relay = RelayProcess::start(&path).await;
    let (code, out, _) =
        run(vec!["send-test".into(), "--config".into(), path.display().to_string(), "--wait".into(), "1s".into()])
            .await;
    assert_eq!(code, Some(1), "{out}");
    assert!(
        out.contains("not delivered everywhere within 1s") && out.contains("pending") && out.contains("connect"),
        "{out}"
    );

    // Issue 23, point 10: a destination that refuses it for good (400: a
    // dead letter at once) ends the wait; it is not waited out.
    let refusing = TestReceiver::scripted(|_, _| Reply::Status(400)).await;
    let dead = toml.replace(&r.url("/app"), &refusing.url("/app"));
    let path = write(dir.path(), &dead);
    drop(_relay);
    let _relay = RelayProcess::start(&path).await;
    let (code, out, _) =
        run(vec!["send-test".into(), "--config".into(), path.display().to_string(), "--wait".into(), "60s".into()])
            .await;
    assert_eq!(code, Some(1), "{out}");
    assert!(out.contains("dead-lettered at a destination") && out.contains("dead"), "{out}");
    assert!(!out.contains("within 1m"), "waited out --wait: {out}");
}
