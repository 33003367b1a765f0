//! Tests of the real `switchboard` binary: the CLI, signals and `kill -9`.

use std::io::BufRead;
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use crate::support::*;

/// The relay binary as a child process, with its JSON logs captured.
pub struct RelayProcess {
    pub child: Child,
    pub ingress: SocketAddr,
    pub admin: SocketAddr,
    pub logs: Arc<Mutex<Vec<String>>>,
}

impl RelayProcess {
    /// Starts `switchboard run` on `config` and waits for its listening lines.
    pub async fn start(config: &Path) -> RelayProcess {
        Self::start_with_env(config, &[]).await
    }

    /// Like [`RelayProcess::start`], with extra environment variables.
    pub async fn start_with_env(config: &Path, env: &[(&str, &str)]) -> RelayProcess {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_switchboard"));
        cmd.args(["run", "--log-format", "json", "--config"]).arg(config).env("RUST_LOG", "info");
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child =
            cmd.stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::piped()).spawn().expect("spawn switchboard");
        let stderr = child.stderr.take().expect("stderr");
        let logs: Arc<Mutex<Vec<String>>> = Arc::default();
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<String>();
        let l2 = logs.clone();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(stderr).lines().map_while(Result::ok) {
                l2.lock().expect("lock").push(line.clone());
                let _ = tx.send(line);
            }
        });
        let (mut ingress, mut admin) = (None, None);
        let deadline = tokio::time::Instant::now() + WAIT;
        while ingress.is_none() || admin.is_none() {
            let line = match tokio::time::timeout_at(deadline, rx.recv()).await {
                Ok(Some(l)) => l,
                _ => panic!("relay did not report its listeners; logs:\n{}", logs.lock().expect("lock").join("\n")),
            };
            let Ok(v) = serde_json::from_str::<serde_json::Value>(&line) else { continue };
            let addr = v["addr"].as_str().and_then(|a| a.parse::<SocketAddr>().ok());
            match v["message"].as_str() {
                Some("ingress listening") => ingress = addr,
                Some("admin listening") => admin = addr,
                _ => {}
            }
        }
        let (Some(ingress), Some(admin)) = (ingress, admin) else { unreachable!("loop ends when both are set") };
        // Keep draining so the child never blocks on a full pipe.
        tokio::spawn(async move { while rx.recv().await.is_some() {} });
        RelayProcess { child, ingress, admin, logs }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.ingress, path)
    }

    pub fn admin_url(&self, path: &str) -> String {
        format!("http://{}{}", self.admin, path)
    }

    pub fn kill9(&mut self) {
        self.child.kill().expect("SIGKILL");
        let _ = self.child.wait();
    }

    pub fn signal(&self, sig: Signal) {
        kill(Pid::from_raw(self.child.id() as i32), sig).expect("signal");
    }

    /// Waits for the child to exit (polling; a child has no async handle here).
    pub async fn wait_exit(&mut self, within: Duration) -> std::process::ExitStatus {
        eventually!(
            within,
            "the relay's exit",
            self.child.try_wait().expect("try_wait").ok_or_else(|| "running".to_string())
        )
    }

    pub fn child_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    pub fn logs(&self) -> String {
        self.logs.lock().expect("lock").join("\n")
    }

    /// Waits (bounded by WAIT) until the relay has logged `text`; returns
    /// its logs. The relay's stderr is read by a thread, so a line may lag
    /// the event that caused it: never read the logs once right after.
    pub async fn wait_log(&self, text: &str) -> String {
        eventually!(WAIT, format!("{text:?} logged"), {
            let logs = self.logs();
            if logs.contains(text) {
                Ok(logs)
            } else {
                Err(logs)
            }
        })
    }

    /// Polls the relay's `/metrics` until `pred` holds (bounded by WAIT);
    /// returns the text that satisfied it.
    pub async fn wait_metrics(&self, what: &str, pred: impl Fn(&str) -> bool) -> String {
        let url = format!("http://{}/metrics", self.admin);
        eventually!(WAIT, what, {
            let text = String::from_utf8_lossy(&get(&url).await.2).into_owned();
            if pred(&text) {
                Ok(text)
            } else {
                Err(text)
            }
        })
    }
}

impl Drop for RelayProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Posts `n` bodies `{prefix}-{i}` to the relay's `/in`; each must be
/// acknowledged. Returns the ids, in order.
async fn post_acked(relay: &RelayProcess, prefix: &str, n: usize) -> Vec<String> {
    let mut ids = Vec::new();
    for i in 0..n {
        let (status, _, body) = post(&relay.url("/in"), "text/plain", format!("{prefix}-{i}")).await;
        assert_eq!(status, 200);
        ids.push(acked_id(&body));
    }
    ids
}

/// Runs `switchboard check --config <config>` and returns what it did.
pub fn check(config: &Path) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_switchboard")).args(["check", "--config"]).arg(config).output().expect("run check")
}

/// Asserts that a one-destination config (`a`, with `extra` TOML) is refused
/// by `check` with exit 78, naming `key` and saying `why`.
pub fn assert_config_error(dir: &Path, extra: &str, key: &str, why: &str) {
    let out = check(&write(dir, &config(&[("a", "http://127.0.0.1:1/a", extra)])));
    assert_eq!(out.status.code(), Some(78), "{extra}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains(key) && err.contains(why), "{extra}: {err}");
}

pub fn write(dir: &Path, toml: &str) -> std::path::PathBuf {
    let text = toml.replace("{store}", &dir.join("store").display().to_string());
    let path = dir.join("switchboard.toml");
    std::fs::write(&path, text).expect("write config");
    path
}

#[test]
fn check_masks_secrets_and_reports_errors_with_file_and_key() {
    let dir = tempfile::tempdir().expect("tempdir");
    let good = write(dir.path(), &config(&[("a", "https://bob:hunter2-secret@example.invalid/cb", "")]));
    let out = Command::new(env!("CARGO_BIN_EXE_switchboard")).args(["check", "-c"]).arg(&good).output().expect("run");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}");
    assert!(stdout.contains("valid"), "{stdout}");
    assert!(stdout.contains("max_body = 1048576"), "defaults are printed: {stdout}");
    assert!(!stdout.contains("hunter2"), "secret printed: {stdout}");

    let bad = dir.path().join("bad.toml");
    std::fs::write(
        &bad,
        "[[listeners]]\naddr = \"127.0.0.1:1\"\n[[routes]]\npath = \"/x\"\ndestinations = [\"nope\"]\n",
    )
    .expect("write");
    let out = check(&bad);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(78), "{stderr}");
    assert!(stderr.contains("bad.toml"), "{stderr}");
    assert!(stderr.contains("routes[0].destinations[0]: unknown destination \"nope\""), "{stderr}");

    let out = Command::new(env!("CARGO_BIN_EXE_switchboard")).args(["run", "-c"]).arg(&bad).output().expect("run");
    assert_eq!(out.status.code(), Some(78));

    let out = Command::new(env!("CARGO_BIN_EXE_switchboard")).arg("--version").output().expect("run");
    assert!(String::from_utf8_lossy(&out.stdout).contains(env!("CARGO_PKG_VERSION")));
    let out = Command::new(env!("CARGO_BIN_EXE_switchboard")).args(["run", "--help"]).output().expect("run");
    assert!(String::from_utf8_lossy(&out.stdout).contains("--config"));
}

#[tokio::test]
async fn sigterm_exits_zero_and_kill9_loses_nothing_acknowledged() {
    let dir = tempfile::tempdir().expect("tempdir");
    let down = dead_addr().await;
    let extra = "[destinations.d.retry]\ninitial = \"20ms\"\nmax_interval = \"100ms\"";
    let path = write(dir.path(), &config(&[("d", &format!("http://{down}/d"), extra)]));

    // 1. Accept with the destination down, stop with SIGTERM: exit 0.
    let mut relay = RelayProcess::start(&path).await;
    let mut ids = post_acked(&relay, "term", 10).await;
    relay.signal(Signal::SIGTERM);
    let status = relay.wait_exit(WAIT).await;
    assert!(status.success(), "exit {status:?}; logs:\n{}", relay.logs());

    // 2. Restart, accept more, then kill -9 right after the last 2xx.
    let mut relay = RelayProcess::start(&path).await;
    for i in 0..40 {
        let (status, _, body) = post(&relay.url("/in"), "text/plain", format!("kill-{i}")).await;
        assert_eq!(status, 200);
        ids.push(acked_id(&body));
    }
    relay.kill9();

    // 3. Restart with the destination up: every acknowledged message arrives.
    let dest = TestReceiver::ok_at(down).await;
    let relay = RelayProcess::start(&path).await;
    dest.wait_until(WAIT, "all 50 acknowledged ids", |got| {
        let seen = counts_by_header(got, "webhook-id");
        ids.iter().all(|id| seen.contains_key(id))
    })
    .await;
    let (status, _, body) = get(&relay.admin_url("/readyz")).await;
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    drop(relay);
}

/// A damaged message log: `run` refuses it and names `repair`; `repair`
/// cuts the damaged segment, reports what is left, and `run` starts again
/// and delivers the messages before the damage.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn repair_cuts_a_damaged_log_that_run_refuses() {
    let dir = tempfile::tempdir().expect("tempdir");
    let down = dead_addr().await;
    let path = write(dir.path(), &config(&[("d", &format!("http://{down}/d"), "")]));
    let mut relay = RelayProcess::start(&path).await;
    let ids = post_acked(&relay, "repair", 3).await;
    relay.signal(Signal::SIGTERM);
    assert!(relay.wait_exit(WAIT).await.success(), "logs:\n{}", relay.logs());

    // Damage the last byte of the log: the third message's frame.
    let segments = dir.path().join("store").join("segments");
    let last = std::fs::read_dir(&segments)
        .expect("segments")
        .map(|e| e.expect("entry").path())
        .filter(|p| std::fs::metadata(p).map(|m| m.len() > 0).unwrap_or(false))
        .max()
        .expect("a segment with data");
    let mut data = std::fs::read(&last).expect("read");
    let n = data.len();
    data[n - 1] ^= 0xff;
    std::fs::write(&last, &data).expect("write");

    let out = Command::new(env!("CARGO_BIN_EXE_switchboard")).args(["run", "-c"]).arg(&path).output().expect("run");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(stderr.contains("is corrupt at offset") && stderr.contains("switchboard repair"), "{stderr}");
    assert_eq!(std::fs::read(&last).expect("untouched"), data);

    let out =
        Command::new(env!("CARGO_BIN_EXE_switchboard")).args(["repair", "-c"]).arg(&path).output().expect("repair");
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "{stdout}{stderr}");
    assert!(stdout.contains("d: 2 pending, 0 dead-lettered"), "{stdout}");
    assert!(stderr.contains("cutting a damaged segment"), "{stderr}");

    let dest = TestReceiver::ok_at(down).await;
    let relay = RelayProcess::start(&path).await;
    dest.wait_until(WAIT, "the two messages before the damage", |got| {
        let seen = counts_by_header(got, "webhook-id");
        ids[..2].iter().all(|id| seen.contains_key(id))
    })
    .await;
    drop(relay);
}

#[test]
fn run_refuses_a_corrupt_or_foreign_store_and_leaves_it_alone() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = write(dir.path(), &config(&[("a", "http://127.0.0.1:1/", "")]));
    let store = dir.path().join("store");
    std::fs::create_dir_all(&store).expect("mkdir");
    std::fs::write(store.join("conf"), b"\xff\xfe not a sled config").expect("write");
    std::fs::write(store.join("db"), vec![0x5au8; 8192]).expect("write");
    let out = Command::new(env!("CARGO_BIN_EXE_switchboard")).args(["run", "-c"]).arg(&path).output().expect("run");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "started on a corrupt store: {stderr}");
    assert!(stderr.contains("opening store") && stderr.contains(&*store.display().to_string()), "{stderr}");
    assert_eq!(std::fs::read(store.join("db")).expect("still there"), vec![0x5au8; 8192], "never wiped");
}
