//! The relay as a child process: the release binary on port 0, its RSS,
//! CPU and metrics.

use super::*;

pub(crate) struct Relay {
    pub(crate) child: Child,
    pub(crate) ingress: SocketAddr,
    pub(crate) admin: SocketAddr,
}

impl Relay {
    pub(crate) async fn start(s: &Settings, dir: &Path, destinations: &[(&str, String, &str)]) -> AnyResult<Relay> {
        Self::start_with_store(s, dir, destinations, "").await
    }

    /// [`Relay::start`] with extra `[store]`-level TOML (e.g. encryption).
    pub(crate) async fn start_with_store(
        s: &Settings,
        dir: &Path,
        destinations: &[(&str, String, &str)],
        store_extra: &str,
    ) -> AnyResult<Relay> {
        let store = format!("[store]\npath = \"{}\"\nmin_free_bytes = 0\n{store_extra}\n", dir.join("store").display());
        Self::start_on(s, dir, destinations, &store).await
    }

    /// A relay whose `[store]` section is `store` (e.g. JetStream's), run
    /// from the binary the settings name (this build's, or a baseline's).
    /// A relay that exits before it listens (e.g. an older build refusing
    /// a key it does not know) is an error carrying its last log lines.
    pub(crate) async fn start_on(
        s: &Settings,
        dir: &Path,
        destinations: &[(&str, String, &str)],
        store: &str,
    ) -> AnyResult<Relay> {
        let names: Vec<String> = destinations.iter().map(|(n, _, _)| format!("{n:?}")).collect();
        let mut toml = format!(
            "{store}[[listeners]]\naddr = \"127.0.0.1:0\"\n[admin]\naddr = \"127.0.0.1:0\"\n[shutdown]\ngrace_period = \"2s\"\n[[routes]]\npath = \"/in\"\ndestinations = [{}]\n",
            names.join(", ")
        );
        for (name, url, extra) in destinations {
            toml.push_str(&format!("[destinations.{name}]\nurl = \"{url}\"\n{extra}\n"));
        }
        let path = dir.join("bench.toml");
        std::fs::write(&path, toml)?;
        let mut child = Command::new(&s.bin)
            .args(["run", "--log-format", "json", "--config"])
            .arg(&path)
            .env("RUST_LOG", "switchboard=info,warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()?;
        let stderr = child.stderr.take().ok_or("no stderr")?;
        let (tx, rx) = std::sync::mpsc::channel::<(String, SocketAddr)>();
        let last_lines = Arc::new(Mutex::new(Vec::<String>::new()));
        let kept = last_lines.clone();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(stderr).lines().map_while(Result::ok) {
                let Ok(v) = serde_json::from_str::<serde_json::Value>(&line) else {
                    if let Ok(mut k) = kept.lock() {
                        k.push(line);
                        let excess = k.len().saturating_sub(3);
                        k.drain(..excess);
                    }
                    continue;
                };
                if let (Some(msg), Some(addr)) =
                    (v["message"].as_str(), v["addr"].as_str().and_then(|a| a.parse().ok()))
                {
                    let _ = tx.send((msg.to_string(), addr));
                }
            }
        });
        let (mut ingress, mut admin) = (None, None);
        while ingress.is_none() || admin.is_none() {
            let (msg, addr) = match rx.recv_timeout(Duration::from_secs(60)) {
                Ok(got) => got,
                Err(e) => {
                    let _ = child.kill();
                    let _ = child.wait();
                    let said = last_lines.lock().map(|l| l.join(" / ")).unwrap_or_default();
                    return Err(format!("relay {} did not start ({e}): {said}", s.bin.display()).into());
                }
            };
            match msg.as_str() {
                "ingress listening" => ingress = Some(addr),
                "admin listening" => admin = Some(addr),
                _ => {}
            }
        }
        Ok(Relay { child, ingress: ingress.ok_or("no ingress")?, admin: admin.ok_or("no admin")? })
    }

    pub(crate) fn rss_kib(&self, field: &str) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).unwrap_or_default();
        status
            .lines()
            .find_map(|l| l.strip_prefix(field))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or(0)
    }

    /// CPU seconds (user + system) the relay has used so far.
    pub(crate) fn cpu_secs(&self) -> f64 {
        nats::proc_cpu_secs(self.child.id())
    }

    pub(crate) fn rss_mb(&self) -> f64 {
        self.rss_kib("VmRSS:") as f64 / 1024.0
    }

    pub(crate) fn peak_mb(&self) -> f64 {
        self.rss_kib("VmHWM:") as f64 / 1024.0
    }

    pub(crate) async fn metric(&self, series: &str) -> f64 {
        let Ok(mut c) = connect(self.admin).await else { return f64::NAN };
        let req = http::Request::get("/metrics").header("host", self.admin.to_string()).body(Full::new(Bytes::new()));
        let Ok(req) = req else { return f64::NAN };
        let Ok(resp) = c.send_request(req).await else { return f64::NAN };
        let Ok(b) = resp.into_body().collect().await else { return f64::NAN };
        let text = String::from_utf8_lossy(&b.to_bytes()).into_owned();
        text.lines()
            .find_map(|l| l.strip_prefix(series).and_then(|r| r.strip_prefix(' ')).and_then(|v| v.trim().parse().ok()))
            .unwrap_or(0.0)
    }

    pub(crate) fn stop(mut self) {
        let _ = Command::new("kill").arg("-TERM").arg(self.child.id().to_string()).status();
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                // The next run should not pay for this one's disk writeback.
                let _ = Command::new("sync").status();
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
