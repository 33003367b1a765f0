//! OpenTelemetry export (`[telemetry.otlp]`), with the real binary and a
//! real OTLP/HTTP receiver that decodes the protobuf with the
//! `opentelemetry-proto` package (`py/otlp_receiver.py`): the span tree of
//! a callback delivered to two destinations, one after a retry; a
//! collector that is down costs only the counter.

use std::io::BufRead;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex, OnceLock};

use crate::binary::{write, RelayProcess};
use crate::support::*;

/// A Python with `opentelemetry-proto` (`test_python`).
fn python() -> &'static Path {
    static PYTHON: OnceLock<PathBuf> = OnceLock::new();
    PYTHON.get_or_init(|| test_python("otlp", &["opentelemetry-proto"]))
}

/// The receiver process and the spans it printed.
struct Collector {
    child: Child,
    port: u16,
    spans: Arc<Mutex<Vec<serde_json::Value>>>,
}

impl Collector {
    fn start() -> Collector {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/it/py/otlp_receiver.py");
        let mut child = Command::new(python())
            .arg(script)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start the OTLP receiver");
        let mut lines = std::io::BufReader::new(child.stdout.take().expect("stdout")).lines();
        let first = lines.next().and_then(Result::ok).expect("the receiver's port line");
        let port = serde_json::from_str::<serde_json::Value>(&first).expect("json")["port"].as_u64().expect("port");
        let spans: Arc<Mutex<Vec<serde_json::Value>>> = Arc::default();
        let s = spans.clone();
        std::thread::spawn(move || {
            for line in lines.map_while(Result::ok) {
                if let Ok(v) = serde_json::from_str(&line) {
                    s.lock().expect("lock").push(v);
                }
            }
        });
        Collector { child, port: port as u16, spans }
    }

    fn spans(&self) -> Vec<serde_json::Value> {
        self.spans.lock().expect("lock").clone()
    }
}

impl Drop for Collector {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn attr<'a>(span: &'a serde_json::Value, key: &str) -> &'a serde_json::Value {
    &span["attributes"][key]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_callback_and_its_attempts_are_one_span_tree_in_the_senders_trace() {
    let dir = tempfile::tempdir().expect("tempdir");
    span_tree(dir.path(), None).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_span_tree_on_the_jetstream_store() {
    let dir = tempfile::tempdir().expect("tempdir");
    let nats = crate::nats::NatsNode::single(dir.path());
    span_tree(dir.path(), Some(&nats.url())).await;
}

/// The span tree of one callback with a `traceparent`, delivered to `a`
/// at once and to `b` after a 503; on the local store, or on JetStream at
/// `nats`.
async fn span_tree(dir: &Path, nats: Option<&str>) {
    let collector = Collector::start();
    let a = TestReceiver::ok().await;
    let b = TestReceiver::scripted(|n, _| Reply::Status(if n == 0 { 503 } else { 200 })).await;
    let dests = [
        ("a", a.url("/a"), ""),
        ("b", b.url("/b"), "[destinations.b.retry]\ninitial = \"10ms\"\nmax_interval = \"20ms\""),
    ];
    let dests: Vec<(&str, &str, &str)> = dests.iter().map(|(n, u, e)| (*n, u.as_str(), *e)).collect();
    let base = match nats {
        None => config(&dests),
        Some(url) => crate::jetstream::jet_config(&[url.to_string()], "traced", 1, &dests),
    };
    let toml = format!(
        "{base}[telemetry.otlp]\nendpoint = \"http://127.0.0.1:{}\"\nheaders = {{ x-api-key = \"env:OTLP_KEY\" }}\ninterval = \"100ms\"\n",
        collector.port
    );
    let relay = RelayProcess::start_with_env(&write(dir, &toml), &[("OTLP_KEY", "k-4f1c9e")]).await;
    let (trace, sender_span) = ("4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7");
    let traceparent = format!("00-{trace}-{sender_span}-01");
    let (status, _, body) = request(
        "POST",
        &relay.url("/in"),
        &[("content-type", "application/json"), ("traceparent", &traceparent)],
        "{}",
    )
    .await;
    assert_eq!(status, 200);
    let id = serde_json::from_slice::<serde_json::Value>(&body).expect("json")["id"].as_str().expect("id").to_string();
    let b_got = b.wait_until(WAIT, "b's retry", |g| g.len() == 2).await;
    let a_got = a.wait_until(WAIT, "a's delivery", |g| g.len() == 1).await;
    eventually!(WAIT, "four spans exported", {
        match collector.spans().len() {
            4 => Ok(()),
            n => Err(format!("{n} spans: {:?}", collector.spans())),
        }
    });
    let spans = collector.spans();
    for s in &spans {
        assert_eq!(s["trace_id"], trace, "every span in the sender's trace: {s}");
        assert_eq!(s["service"], "switchboard");
        assert_eq!(s["api_key"], "k-4f1c9e", "the configured header goes with each export");
        assert_eq!(s["content_type"], "application/x-protobuf");
        assert!(s["end"].as_u64() >= s["start"].as_u64(), "{s}");
    }
    let ingress = spans.iter().find(|s| s["kind"] == 2).expect("a SERVER span");
    assert_eq!(ingress["name"], "POST /in");
    assert_eq!(ingress["parent_span_id"], sender_span, "a child of the sender's span");
    assert_eq!(attr(ingress, "http.response.status_code"), 200);
    assert_eq!(attr(ingress, "switchboard.outcome"), "durable");
    assert_eq!(attr(ingress, "switchboard.message_id"), id.as_str());
    assert_eq!(attr(ingress, "http.request.body.size"), 2);
    // Each attempt: a CLIENT span, child of the ingress span, with the span
    // id the destination received in its traceparent.
    let attempts: Vec<&serde_json::Value> = spans.iter().filter(|s| s["kind"] == 3).collect();
    assert_eq!(attempts.len(), 3);
    let received = |r: &Received| r.header("traceparent").expect("traceparent").split('-').nth(2).map(str::to_string);
    for (dest, got) in [("a", &a_got), ("b", &b_got)] {
        for r in got.iter() {
            let n: i64 = r.header("x-switchboard-attempt").and_then(|v| v.parse().ok()).expect("attempt header");
            let span = attempts
                .iter()
                .find(|s| attr(s, "switchboard.destination") == dest && attr(s, "switchboard.attempt") == n)
                .unwrap_or_else(|| panic!("no span for {dest} attempt {n}: {spans:?}"));
            assert_eq!(span["name"], format!("deliver {dest}"));
            assert_eq!(span["parent_span_id"], ingress["span_id"]);
            assert_eq!(Some(span["span_id"].as_str().unwrap_or_default().to_string()), received(r));
            assert_eq!(attr(span, "switchboard.message_id"), id.as_str());
            let failed = dest == "b" && n == 1;
            assert_eq!(attr(span, "http.response.status_code"), if failed { 503 } else { 200 });
            assert_eq!(span["status_code"], if failed { 2 } else { 0 }, "{span}");
            if failed {
                assert_eq!(attr(span, "error.type"), "5xx");
            }
        }
    }
    assert!(!relay.logs().contains("k-4f1c9e"), "the collector's key is never logged");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_collector_that_is_down_costs_only_the_counter() {
    let down = dead_addr().await;
    let a = TestReceiver::ok().await;
    let toml = format!(
        "{}[telemetry.otlp]\nendpoint = \"http://{down}\"\ninterval = \"50ms\"\ntimeout = \"1s\"\n",
        config(&[("a", &a.url("/a"), "")])
    );
    let dir = tempfile::tempdir().expect("tempdir");
    let relay = RelayProcess::start(&write(dir.path(), &toml)).await;
    for i in 0..20 {
        assert_eq!(post(&relay.url("/in"), "application/json", format!("{{\"n\":{i}}}")).await.0, 200);
    }
    a.wait_until(WAIT, "every callback delivered", |g| g.len() == 20).await;
    eventually!(WAIT, "40 spans dropped and counted", {
        let (_, _, body) = get(&relay.admin_url("/metrics")).await;
        match metric(&String::from_utf8_lossy(&body), "switchboard_otlp_dropped_spans_total") {
            n if n >= 40.0 => Ok(()),
            n => Err(format!("{n} dropped")),
        }
    });
    // (The relay's stderr is read by a thread: the line may lag the counter.)
    relay.wait_log("OTLP export failed").await;
}

#[test]
fn otlp_settings_are_config_errors_naming_the_key() {
    for (extra, key) in [
        ("endpoint = \"collector:4318\"", "telemetry.otlp.endpoint"),
        ("endpoint = \"http://c:4318\"\nprotocol = \"grpc\"", "telemetry.otlp.protocol"),
        ("endpoint = \"http://c:4318\"\nsample_ratio = 1.5", "telemetry.otlp.sample_ratio"),
        ("endpoint = \"http://c:4318\"\nheaders = { \"bad name\" = \"x\" }", "telemetry.otlp.headers.bad name"),
        (
            "endpoint = \"http://c:4318\"\nheaders = { k = \"env:SWITCHBOARD_NOT_SET_EVER\" }",
            "telemetry.otlp.headers.k",
        ),
        ("endpoint = \"http://c:4318\"\nqueue = 0", "telemetry.otlp.queue"),
    ] {
        let dir = tempfile::tempdir().expect("tempdir");
        let toml = format!("{}[telemetry.otlp]\n{extra}\n", config(&[("a", "http://127.0.0.1:1/", "")]));
        let err = switchboard::config::Config::load(&write(dir.path(), &toml)).expect_err(extra).to_string();
        assert!(err.contains(key), "{extra}: {err}");
    }
}
