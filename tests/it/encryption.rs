//! Payloads encrypted at rest: no byte of a distinctive body or header is
//! anywhere under the store directory; messages survive a restart and
//! kill -9; a key rotation reads old records; a missing or wrong key
//! refuses the store, naming the key.

use std::path::Path;
use std::sync::Arc;

use crate::binary::{write, RelayProcess};
use crate::support::*;

fn key(byte: u8) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode([byte; 32])
}

/// Every file under `dir`, read whole.
fn files(dir: &Path) -> Vec<(std::path::PathBuf, Vec<u8>)> {
    let mut out = Vec::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        for e in std::fs::read_dir(&d).expect("read dir") {
            let p = e.expect("entry").path();
            if p.is_dir() {
                todo.push(p);
            } else {
                out.push((p.clone(), std::fs::read(&p).expect("read file")));
            }
        }
    }
    out
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

fn encrypted(toml: &str, keys: &[(&str, &str)]) -> String {
    let list: Vec<String> = keys.iter().map(|(id, k)| format!("{{ id = \"{id}\", key = \"{k}\" }}")).collect();
    toml.replace(
        "[store]\npath = \"{store}\"",
        &format!("[store]\npath = \"{{store}}\"\n[store.encryption]\nkeys = [{}]", list.join(", ")),
    )
}

#[tokio::test]
async fn no_plaintext_on_disk_rotation_reads_old_records_and_a_missing_key_refuses() {
    let down = dead_addr().await;
    let refusing = TestReceiver::scripted(|_, _| Reply::Status(400)).await;
    let base = config(&[("later", &format!("http://{down}/later"), ""), ("refusing", &refusing.url("/r"), "")]);
    let (k1, k2) = (key(1), key(2));
    let dir = Arc::new(tempfile::tempdir().expect("tempdir"));
    let relay = TestRelay::start_in(dir.clone(), &encrypted(&base, &[("k1", &k1)])).await;
    let bodies: Vec<String> = (0..3).map(|i| format!("{{\"secret\":\"PLAINTEXT-MARKER-{i}-7f3a\"}}")).collect();
    for b in &bodies {
        let (s, _, _) = request(
            "POST",
            &relay.url("/in"),
            &[("content-type", "application/json"), ("x-marker", "HEADER-MARKER-91c2")],
            b.clone(),
        )
        .await;
        assert_eq!(s, 200);
    }
    // The refusing destination dead-letters them: copies go to sled too.
    relay
        .wait_metrics("three dead letters", |m| metric(m, "switchboard_dead_letters{destination=\"refusing\"}") == 3.0)
        .await;
    relay.stop().await.expect("clean stop");
    let stored = files(&dir.path().join("store"));
    assert!(stored.iter().any(|(_, d)| !d.is_empty()), "the store wrote something");
    for (path, data) in &stored {
        for needle in [&b"PLAINTEXT-MARKER"[..], b"HEADER-MARKER", b"7f3a\""] {
            assert!(
                !contains(data, needle),
                "{} holds plaintext {:?}",
                path.display(),
                String::from_utf8_lossy(needle)
            );
        }
    }

    // Rotation: k2 encrypts from now on, k1 still reads what it sealed.
    let _up = TestReceiver::ok_at(down).await;
    let relay = TestRelay::start_in(dir.clone(), &encrypted(&base, &[("k2", &k2), ("k1", &k1)])).await;
    let got = _up.wait_for(3, WAIT).await;
    let mut seen: Vec<String> = got.iter().map(|g| String::from_utf8_lossy(&g.body).into_owned()).collect();
    seen.sort();
    assert_eq!(seen, bodies, "every message delivered intact after the restart");
    assert!(got.iter().all(|g| g.header("x-marker").as_deref() == Some("HEADER-MARKER-91c2")));
    relay.stop().await.expect("clean stop");

    // Without k1, the dead-lettered copies (sealed with k1) cannot be read.
    let (path, config) = write_config(dir.path(), &encrypted(&base, &[("k2", &k2)]));
    let _ = path;
    let listeners = switchboard::Listeners {
        ingress: vec![tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind")],
        admin: tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind"),
    };
    let err = switchboard::run(config, listeners, tokio_util::sync::CancellationToken::new())
        .await
        .expect_err("a store sealed with a key that is gone must not open");
    let err = format!("{err:#}");
    assert!(err.contains("\"k1\"") && err.contains("not configured"), "{err}");

    // A wrong key under the right id does not open them either.
    let (_, config) = write_config(dir.path(), &encrypted(&base, &[("k2", &k2), ("k1", &key(9))]));
    let listeners = switchboard::Listeners {
        ingress: vec![tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind")],
        admin: tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind"),
    };
    let err = switchboard::run(config, listeners, tokio_util::sync::CancellationToken::new())
        .await
        .expect_err("a wrong key must not open the store");
    assert!(format!("{err:#}").contains("k1"), "{err:#}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn encrypted_messages_survive_kill9() {
    let down = dead_addr().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let toml = encrypted(&config(&[("d", &format!("http://{down}/d"), "")]), &[("k1", &key(5))]);
    let path = write(dir.path(), &toml);
    let mut relay = RelayProcess::start(&path).await;
    for i in 0..20 {
        assert_eq!(post(&relay.url("/in"), "text/plain", format!("kill9-marker-{i}")).await.0, 200);
    }
    relay.kill9();
    for (p, data) in files(&dir.path().join("store")) {
        assert!(!contains(&data, b"kill9-marker"), "{} holds plaintext", p.display());
    }
    let receiver = TestReceiver::ok_at(down).await;
    let _relay = RelayProcess::start(&path).await;
    let got = receiver.wait_for(20, WAIT).await;
    let mut seen: Vec<String> = got.iter().map(|g| String::from_utf8_lossy(&g.body).into_owned()).collect();
    seen.sort();
    seen.dedup();
    assert_eq!(seen.len(), 20, "every acknowledged message delivered after kill -9");
}

#[test]
fn bad_encryption_keys_are_config_errors_and_check_says_it_is_on() {
    let dir = tempfile::tempdir().expect("tempdir");
    let base = config(&[("a", "http://127.0.0.1:1/a", "")]);
    for (keys, key, why) in [
        (vec![("k1", "c2hvcnQ=")], "store.encryption.keys[0].key", "must be 32 bytes"),
        (vec![("k1", "env:SWITCHBOARD_SURELY_UNSET_KEY")], "store.encryption.keys[0].key", "is not set"),
        (vec![("k1", key(1).leak() as &str), ("k1", key(2).leak())], "store.encryption.keys[1].id", "used twice"),
    ] {
        let out = crate::binary::check(&write(dir.path(), &encrypted(&base, &keys)));
        assert_eq!(out.status.code(), Some(78));
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(key) && err.contains(why), "{err}");
        assert!(!err.contains("c2hvcnQ="), "{err}");
    }
    let k = key(3);
    let out = crate::binary::check(&write(dir.path(), &encrypted(&base, &[("k2", &k), ("k1", &key(4))])));
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let printed = String::from_utf8_lossy(&out.stdout);
    assert!(printed.contains("# store encryption: on (key \"k2\" encrypts; k2, k1 decrypt)"), "{printed}");
    assert!(!printed.contains(&k), "{printed}");
}

/// The configuration shape issue 13 gives, exactly as written except for
/// where the client certificate lives (a temp dir instead of
/// /etc/switchboard): it loads, and the relay serves with it.
#[tokio::test]
async fn the_issue_shape_for_trusted_deliveries_loads_as_written() {
    let dir = tempfile::tempdir().expect("tempdir");
    let ca = crate::tls::Ca::new();
    let (cert, keyf) = crate::tls::write_pair(dir.path(), "client", &ca.leaf(1, None));
    let shape = r#"[destinations.team-a]
url = "https://team-a.internal/callbacks"
filter = { path = "username", in = ["acct-A"] }     # also: equals, exists, prefix; all/any/not of such
forward_headers = { deny = ["user-agent"] }          # or { allow = [...] }; default: all
add_headers = { "X-Source" = "switchboard" }
[destinations.team-a.signing]
secrets = ["whsec_C2FVsBQIhrscChlQIMV+b5sSYspob7oD"] # v1; several sign with each
[destinations.team-a.tls]
client_cert = "/etc/switchboard/client.pem"
client_key = "/etc/switchboard/client-key.pem"
[store.encryption]
keys = [{ id = "k2", key = "env:SWITCHBOARD_KEY_K2" }, { id = "k1", key = "env:SWITCHBOARD_KEY_K1" }]  # the first encrypts, all decrypt
"#
    .replace("/etc/switchboard/client.pem", &cert.display().to_string())
    .replace("/etc/switchboard/client-key.pem", &keyf.display().to_string());
    let toml = format!(
        "[store]\npath = \"{{store}}\"\n[[listeners]]\naddr = \"127.0.0.1:0\"\n[admin]\naddr = \"127.0.0.1:0\"\n[[routes]]\npath = \"/in\"\ndestinations = [\"team-a\"]\n{shape}"
    );
    // [store] above and [store.encryption] below: TOML allows a sub-table
    // anywhere after its parent.
    let path = write(dir.path(), &toml);
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_switchboard"))
        .args(["check", "--config"])
        .arg(&path)
        .env("SWITCHBOARD_KEY_K2", key(2))
        .env("SWITCHBOARD_KEY_K1", key(1))
        .output()
        .expect("check");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let printed = String::from_utf8_lossy(&out.stdout);
    assert!(printed.contains("# store encryption: on (key \"k2\" encrypts; k2, k1 decrypt)"), "{printed}");
    assert!(!printed.contains("C2FVsBQ"), "the signing secret is masked: {printed}");
    let relay =
        RelayProcess::start_with_env(&path, &[("SWITCHBOARD_KEY_K2", &key(2)), ("SWITCHBOARD_KEY_K1", &key(1))]).await;
    let (status, _, body) = post(&relay.url("/in"), "application/json", "{\"username\":\"acct-B\"}").await;
    assert_eq!(status, 200);
    assert!(String::from_utf8_lossy(&body).contains("\"filtered\":true"), "acct-B is not for team A");
}
