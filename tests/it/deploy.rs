//! The files under `deploy/`: every YAML and JSON parses, the example
//! ThingSpace config passes `switchboard check`, and every metric name the
//! alert rules and the dashboard use exists in a live relay's `/metrics`.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use crate::support::*;

fn deploy_files(ext: &[&str]) -> Vec<PathBuf> {
    fn walk(dir: &Path, ext: &[&str], out: &mut Vec<PathBuf>) {
        for e in std::fs::read_dir(dir).expect("read deploy dir") {
            let p = e.expect("entry").path();
            if p.is_dir() {
                walk(&p, ext, out);
            } else if p.extension().and_then(|x| x.to_str()).is_some_and(|x| ext.contains(&x)) {
                out.push(p);
            }
        }
    }
    let mut out = Vec::new();
    walk(&Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy"), ext, &mut out);
    out.sort();
    out
}

#[test]
fn every_yaml_and_json_file_parses() {
    let yaml = deploy_files(&["yml", "yaml"]);
    assert!(yaml.len() >= 4, "expected the k8s and prometheus files, found {yaml:?}");
    for f in yaml {
        let text = std::fs::read_to_string(&f).expect("read");
        for (i, doc) in serde_yaml::Deserializer::from_str(&text).enumerate() {
            let v = <serde_yaml::Value as serde::Deserialize>::deserialize(doc)
                .unwrap_or_else(|e| panic!("{} document {i}: {e}", f.display()));
            if f.components().any(|c| c.as_os_str() == "kubernetes") {
                assert!(v.get("apiVersion").is_some() && v.get("kind").is_some(), "{} document {i}", f.display());
            }
        }
    }
    for f in deploy_files(&["json"]) {
        let text = std::fs::read_to_string(&f).expect("read");
        serde_json::from_str::<serde_json::Value>(&text).unwrap_or_else(|e| panic!("{}: {e}", f.display()));
    }
}

#[test]
fn kubernetes_configmaps_hold_valid_switchboard_configs() {
    for f in deploy_files(&["yaml"]) {
        let text = std::fs::read_to_string(&f).expect("read");
        for doc in serde_yaml::Deserializer::from_str(&text) {
            let v = <serde_yaml::Value as serde::Deserialize>::deserialize(doc).expect("yaml");
            if let Some(toml) = v.get("data").and_then(|d| d.get("switchboard.toml")).and_then(|t| t.as_str()) {
                let dir = tempfile::tempdir().expect("tempdir");
                let path = dir.path().join("switchboard.toml");
                // Secrets from the environment (a Kubernetes Secret there):
                // any value does for the check.
                let toml = toml.replace("\"env:SWITCHBOARD_NATS_PASSWORD\"", "\"stand-in\"");
                std::fs::write(&path, toml).expect("write");
                switchboard::config::Config::load(&path).unwrap_or_else(|e| panic!("{}: {e}", f.display()));
            }
        }
    }
}

#[test]
fn thingspace_example_passes_check() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/thingspace.toml");
    let out = crate::binary::check(&path);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
}

/// Metric names (`switchboard_*`, `process_*`) mentioned in `text`.
fn metric_names(text: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let bytes = text.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        let rest = &text[i..];
        if (rest.starts_with("switchboard_") || rest.starts_with("process_"))
            && (i == 0 || !(bytes[i - 1].is_ascii_alphanumeric() || bytes[i - 1] == b'_'))
        {
            let end = rest.find(|c: char| !(c.is_ascii_alphanumeric() || c == '_')).unwrap_or(rest.len());
            names.insert(rest[..end].to_string());
            i += end;
        } else {
            i += 1;
        }
    }
    names
}

#[tokio::test]
async fn alert_rules_and_dashboard_use_only_exported_metric_names() {
    // Traffic that makes every labelled series appear: a delivery, a retry
    // and a dead letter.
    let ok = TestReceiver::ok().await;
    let bad = TestReceiver::scripted(|n, _| if n == 0 { Reply::Status(500) } else { Reply::Status(400) }).await;
    let ca = crate::tls::Ca::new();
    let dir = tempfile::tempdir().expect("tempdir");
    let (cert, key) = crate::tls::write_pair(dir.path(), "leaf", &ca.leaf(1, None));
    let toml = config(&[
        ("ok", &ok.url("/ok"), ""),
        ("bad", &bad.url("/bad"), "[destinations.bad.retry]\ninitial = \"10ms\""),
    ])
    .replace(
        "[[listeners]]\naddr = \"127.0.0.1:0\"\n",
        &format!(
            "[[listeners]]\naddr = \"127.0.0.1:0\"\n[[listeners]]\naddr = \"127.0.0.1:0\"\ntls = {{ cert = \"{}\", key = \"{}\" }}\n",
            cert.display(),
            key.display()
        ),
    );
    let toml = toml.replace(
        "[destinations.ok]",
        "[[routes]]\npath = \"/guarded\"\ndestinations = [\"ok\"]\nallow_ips = [\"10.0.0.0/8\"]\n[destinations.ok]",
    );
    let relay = TestRelay::start(&toml).await;
    assert_eq!(post(&relay.url("/in"), "application/json", "{}").await.0, 200);
    assert_eq!(post(&relay.url("/guarded"), "application/json", "{}").await.0, 403);
    let exposition = relay
        .wait_metrics("a delivery and a dead letter", |m| {
            metric(m, "switchboard_deliveries_total{destination=\"ok\",outcome=\"delivered\"}") == 1.0
                && metric(m, "switchboard_deliveries_total{destination=\"bad\",outcome=\"dead_lettered\"}") == 1.0
        })
        .await;
    let exported: BTreeSet<String> = exposition
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| l.split(['{', ' ']).next())
        .map(str::to_owned)
        .collect();
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    for file in ["deploy/prometheus/alerts.yml", "deploy/grafana/switchboard.json"] {
        let used = metric_names(&std::fs::read_to_string(root.join(file)).expect("read"));
        assert!(!used.is_empty(), "{file} uses no metrics?");
        let missing: Vec<_> = used.iter().filter(|n| !exported.contains(*n)).collect();
        assert!(missing.is_empty(), "{file} uses metrics the relay does not export: {missing:?}");
    }
}

/// Before any callback, the series with known label values are there at 0
/// (so `rate()` alerts work on a fresh relay), and the live exposition
/// passes `promtool check metrics` (Debian's `prometheus` package; `.ci/run`
/// installs it).
#[tokio::test]
async fn metrics_exist_at_zero_from_the_start_and_pass_promtool() {
    let toml = config(&[("a", "http://127.0.0.1:1/a", "ordering = \"per_key\"\norder_key = \"id\"")]).replace(
        "destinations = [\"a\"]\n",
        "destinations = [\"a\"]\ndedupe_window = \"1m\"\n[routes.auth.header]\nname = \"X-Token\"\nvalues = [\"s3cret-token-value\"]\n",
    );
    let relay = TestRelay::start(&toml).await;
    let text = relay.metrics().await;
    for series in [
        "switchboard_ingress_requests_total{code=\"200\",route=\"/in\"} 0",
        "switchboard_ingress_requests_total{code=\"503\",route=\"/in\"} 0",
        "switchboard_ingress_requests_total{code=\"404\",route=\"unmatched\"} 0",
        "switchboard_ingress_rejected_total{reason=\"ip_not_allowed\",route=\"/in\"} 0",
        "switchboard_ingress_rejected_total{reason=\"bad_credentials\",route=\"/in\"} 0",
        "switchboard_ingress_duplicates_total{route=\"/in\"} 0",
        "switchboard_deliveries_total{destination=\"a\",outcome=\"delivered\"} 0",
        "switchboard_deliveries_total{destination=\"a\",outcome=\"dead_lettered\"} 0",
        "switchboard_delivery_attempts_total{destination=\"a\",result=\"5xx\"} 0",
        "switchboard_delivery_attempts_total{destination=\"a\",result=\"connect\"} 0",
        "switchboard_order_key_missing_total{destination=\"a\"} 0",
    ] {
        assert!(text.lines().any(|l| l == series), "missing {series:?} in:\n{text}");
    }
    let promtool = std::process::Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn();
    let Ok(mut child) = promtool else {
        panic!("promtool not found: install Debian's prometheus package (.ci/run does)");
    };
    std::io::Write::write_all(&mut child.stdin.take().expect("stdin"), text.as_bytes()).expect("write");
    let out = child.wait_with_output().expect("promtool");
    assert!(
        out.status.success(),
        "promtool check metrics: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    relay.stop().await.expect("stop");
}
