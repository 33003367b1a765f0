//! Run 9: the JetStream store (one node R1; three nodes R3 with one, two
//! and three relays) next to the local store, in the same run: durable
//! ingest and fan-out x3, with CPU per request of the relays and of the
//! NATS servers, from /proc.

use super::*;

/// The `nats-server` binary: `$SWITCHBOARD_NATS_SERVER`, or the one the
/// tests install under `target/nats-venv`.
fn nats_server() -> Option<PathBuf> {
    let p = std::env::var_os("SWITCHBOARD_NATS_SERVER")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("target/nats-venv/bin/nats-server"));
    p.exists().then_some(p)
}

fn free_port() -> AnyResult<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// A NATS node as a child process.
struct Node {
    child: Child,
    port: u16,
}

impl Node {
    fn cpu_secs(&self) -> f64 {
        proc_cpu_secs(self.child.id())
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `n` nodes (1, or 3 in one cluster), each up before it returns;
/// `jetstream` is added to each node's `jetstream { }` block.
fn nodes(bin: &Path, dir: &Path, n: usize, jetstream: &str) -> AnyResult<Vec<Node>> {
    let clients: Vec<u16> = (0..n).map(|_| free_port()).collect::<AnyResult<_>>()?;
    let routes: Vec<u16> = (0..n).map(|_| free_port()).collect::<AnyResult<_>>()?;
    let mut out = Vec::new();
    for i in 0..n {
        let d = dir.join(format!("n{i}"));
        std::fs::create_dir_all(&d)?;
        let mut conf = format!(
            "server_name: n{i}\nlisten: 127.0.0.1:{}\njetstream {{ store_dir: {:?}, {jetstream} }}\n",
            clients[i],
            d.join("js").display().to_string()
        );
        if n > 1 {
            let others: Vec<String> =
                (0..n).filter(|j| *j != i).map(|j| format!("nats-route://127.0.0.1:{}", routes[j])).collect();
            conf.push_str(&format!(
                "cluster {{ name: bench, listen: 127.0.0.1:{}, routes: [{}] }}\n",
                routes[i],
                others.join(", ")
            ));
        }
        let path = d.join("nats.conf");
        std::fs::write(&path, conf)?;
        let mut child = Command::new(bin).arg("-c").arg(&path).stdout(Stdio::null()).stderr(Stdio::piped()).spawn()?;
        let stderr = child.stderr.take().ok_or("no stderr")?;
        let (tx, rx) = std::sync::mpsc::channel::<()>();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(stderr).lines().map_while(Result::ok) {
                if line.contains("Server is ready") {
                    let _ = tx.send(());
                }
            }
        });
        rx.recv_timeout(Duration::from_secs(30))?;
        out.push(Node { child, port: clients[i] });
    }
    Ok(out)
}

/// CPU seconds (user + system) of process `pid` so far: utime and stime,
/// the 14th and 15th fields of /proc/PID/stat, in clock ticks (100 Hz).
pub(crate) fn proc_cpu_secs(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let rest = stat.rsplit(')').next().unwrap_or_default();
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    (ticks(11) + ticks(12)) / 100.0
}

/// One setup's figures.
struct Figures {
    ingest: LoadResult,
    relay_cpu_us: f64,
    nats_cpu_us: f64,
    deliveries: f64,
}

/// Closed loop over several relays at once (connections split evenly).
async fn load_all(relays: &[Relay], s: &Settings, epoch: Instant) -> LoadResult {
    let per = (s.connections / relays.len()).max(1);
    let runs = relays.iter().map(|r| closed_loop(r.ingress, "/in", per, s.run, u64::MAX, epoch));
    let mut total = LoadResult::default();
    for r in futures_util::future::join_all(runs).await {
        total.ok += r.ok;
        total.errors += r.errors;
        total.elapsed = total.elapsed.max(r.elapsed);
        total.latencies_us.extend(r.latencies_us);
    }
    total.latencies_us.sort_unstable();
    total
}

/// Starts `n` relays on `store` (each waits until its store is ready).
async fn relays(
    s: &Settings,
    dir: &Path,
    n: usize,
    dests: &[(&str, String, &str)],
    store: &str,
) -> AnyResult<Vec<Relay>> {
    let mut out = Vec::new();
    for i in 0..n {
        let d = dir.join(format!("relay{i}"));
        std::fs::create_dir_all(&d)?;
        let r = Relay::start_on(s, &d, dests, store).await?;
        let ready = wait_ready(r.admin, Duration::from_secs(60)).await;
        if !ready {
            return Err("relay not ready within 60 s".into());
        }
        out.push(r);
    }
    Ok(out)
}

async fn wait_ready(admin: SocketAddr, limit: Duration) -> bool {
    let t = Instant::now();
    while t.elapsed() < limit {
        if let Ok(mut c) = connect(admin).await {
            let req = http::Request::get("/readyz").header("host", "x").body(Full::new(Bytes::new()));
            if let Ok(req) = req {
                if let Ok(resp) = c.send_request(req).await {
                    if resp.status().is_success() {
                        return true;
                    }
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    false
}

/// Durable ingest (the destination paused), then fan-out x3, on one setup.
async fn measure(
    s: &Settings,
    dir: &Path,
    n_relays: usize,
    store: &str,
    dest_extra: &str,
    nats: &[Node],
    epoch: Instant,
) -> AnyResult<Figures> {
    let paused = [("paused", "http://127.0.0.1:1/".to_string(), "paused = true")];
    let rs = relays(s, &dir.join("ingest"), n_relays, &paused, store).await?;
    let cpu0: f64 = rs.iter().map(Relay::cpu_secs).sum();
    let ncpu0: f64 = nats.iter().map(Node::cpu_secs).sum();
    let ingest = load_all(&rs, s, epoch).await;
    let relay_cpu = rs.iter().map(Relay::cpu_secs).sum::<f64>() - cpu0;
    let nats_cpu = nats.iter().map(Node::cpu_secs).sum::<f64>() - ncpu0;
    for r in rs {
        r.stop();
    }
    let recv = [
        Receiver::start(Mode::Ok, epoch).await?,
        Receiver::start(Mode::Ok, epoch).await?,
        Receiver::start(Mode::Ok, epoch).await?,
    ];
    let settings = format!("concurrency = 32{dest_extra}");
    let dests: Vec<(&str, String, &str)> =
        ["a", "b", "c"].iter().zip(&recv).map(|(n, r)| (*n, r.url(), settings.as_str())).collect();
    // Another stream for the fan-out: the ingest run's messages stay behind
    // the paused destination's consumer.
    let store = store.replace("stream = \"bench\"", "stream = \"fanout\"").replace("local-store", "local-fanout");
    let rs = relays(s, &dir.join("fanout"), n_relays, &dests, &store).await?;
    let load = load_all(&rs, s, epoch).await;
    let delivered: u64 = recv.iter().map(|r| r.count.load(Ordering::Relaxed)).sum();
    let deliveries = delivered as f64 / load.elapsed.as_secs_f64();
    for r in rs {
        r.stop();
    }
    let ok = ingest.ok.max(1) as f64;
    Ok(Figures { relay_cpu_us: relay_cpu * 1e6 / ok, nats_cpu_us: nats_cpu * 1e6 / ok, ingest, deliveries })
}

fn report(name: &str, f: &Figures) {
    row(
        name,
        &format!(
            "ingest {:.0} req/s, p99 {:.2} ms, {} non-2xx; CPU per request: relays {:.0} us, NATS {:.0} us; fan-out x3 {:.0} deliveries/s",
            f.ingest.rps(),
            f.ingest.pct(0.99),
            f.ingest.errors,
            f.relay_cpu_us,
            f.nats_cpu_us,
            f.deliveries
        ),
    );
}

/// Records run 9's figures for `setup` (for `--baseline`'s table).
fn record(s: &Settings, setup: &str, f: &Figures) {
    use crate::baseline::Better::*;
    s.figure(&format!("9 {setup}: ingest req/s"), f.ingest.rps(), Higher);
    s.figure(&format!("9 {setup}: fan-out deliveries/s"), f.deliveries, Higher);
    s.figure(&format!("9 {setup}: relay CPU us/request"), f.relay_cpu_us, Lower);
}

/// Run 9s: the JetStream store with `[store.encryption]` against the same
/// setup without it (issue 25: at most 15 % less durable ingest and
/// fan-out), R1 with one relay and R3 with one to three, each pair alternating which goes
/// first over two rounds, fresh nodes each time.
pub(crate) async fn sealed(s: &Settings, dir: &Path, epoch: Instant) -> AnyResult<()> {
    const KEY: &str = "MDEyMzQ1Njc4OWFiY2RlZjAxMjM0NTY3ODlhYmNkZWY=";
    let with = |on: bool| {
        let store = if on {
            format!("[store.encryption]\nkeys = [{{ id = \"k1\", key = \"{KEY}\" }}]\n")
        } else {
            String::new()
        };
        (store, String::new())
    };
    paired(s, dir, epoch, "9s", ("sealed", "plain"), with).await
}

/// Run 9o: ordering per key (`deviceIds.0.id`, 1,000 devices, 16
/// partitions) on the three fan-out destinations against none, as 9s.
pub(crate) async fn ordered(s: &Settings, dir: &Path, epoch: Instant) -> AnyResult<()> {
    let with = |on: bool| {
        let dest = if on { "\nordering = \"per_key\"\norder_key = \"deviceIds.0.id\"" } else { "" };
        (String::new(), dest.to_string())
    };
    paired(s, dir, epoch, "9o", ("ordered", "unordered"), with).await
}

/// Run 9k: `retain_delivered` (each callback's copy published by the
/// relay to the kept stream, `jetstream/kept.rs`) against none, as 9s.
pub(crate) async fn kept(s: &Settings, dir: &Path, epoch: Instant) -> AnyResult<()> {
    let with = |on: bool| {
        let store = if on { "retain_delivered = \"1h\"\n" } else { "" };
        (store.to_string(), String::new())
    };
    paired(s, dir, epoch, "9k", ("kept", "not kept"), with).await
}

/// Runs `name`'s setup with (`with(true)`: what it adds to `[store]` and
/// to each fan-out destination) and without, R1 with one relay, then R3
/// with one, two and three relays,
/// alternating which goes first over two rounds (`--rounds N`: N), fresh
/// nodes each time; prints each and the ratios.
async fn paired(
    s: &Settings,
    dir: &Path,
    epoch: Instant,
    name: &str,
    labels: (&str, &str),
    with: impl Fn(bool) -> (String, String),
) -> AnyResult<()> {
    let Some(bin) = nats_server() else {
        row(
            &format!("{name}. JetStream"),
            "skipped: no nats-server (set SWITCHBOARD_NATS_SERVER or run the tests once)",
        );
        return Ok(());
    };
    let jet = |servers: &[Node], replicas: usize, on: bool| {
        let list: Vec<String> = servers.iter().map(|n| format!("\"nats://127.0.0.1:{}\"", n.port)).collect();
        let store = format!(
            "[store]\nkind = \"jetstream\"\nservers = [{}]\nstream = \"bench\"\nreplicas = {replicas}\n{}",
            list.join(", "),
            with(on).0
        );
        (store, with(on).1)
    };
    // R1 with one relay; R3 with one, two and three (issue 25's figures).
    for (replicas, nodes_n, relays) in [(1, 1, 1), (3, 3, 1), (3, 3, 2), (3, 3, 3)] {
        let mut ratios = Vec::new();
        for round in 0..s.pair_rounds {
            let mut pair = [(false, None), (true, None)];
            if round % 2 == 1 {
                pair.reverse();
            }
            for (on, out) in pair.iter_mut() {
                let tag = format!("{name}-r{replicas}-{relays}-{round}-{}", u8::from(*on));
                let ns = nodes(&bin, &dir.join(&tag), nodes_n, "")?;
                let (store, dest) = jet(&ns, replicas, *on);
                let f = measure(s, &dir.join(format!("{tag}-run")), relays, &store, &dest, &ns, epoch).await?;
                let label = if *on { labels.0 } else { labels.1 };
                report(&format!("{name}. JetStream R{replicas}, {relays} relay(s), round {}, {label}", round + 1), &f);
                *out = Some(f);
            }
            let get = |want: bool| pair.iter().find(|(o, _)| *o == want).and_then(|(_, f)| f.as_ref());
            if let (Some(off), Some(on)) = (get(false), get(true)) {
                ratios.push((on.ingest.rps() / off.ingest.rps(), on.deliveries / off.deliveries));
            }
        }
        let list = |i: usize| {
            ratios.iter().map(|r| format!("{:.2}", if i == 0 { r.0 } else { r.1 })).collect::<Vec<_>>().join(" / ")
        };
        let median = |i: usize| {
            let mut v: Vec<f64> = ratios.iter().map(|r| if i == 0 { r.0 } else { r.1 }).collect();
            v.sort_by(f64::total_cmp);
            match v.len() {
                0 => f64::NAN,
                n if n % 2 == 1 => v[n / 2],
                n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
            }
        };
        row(
            &format!("{name}. R{replicas}, {relays} relay(s), {} / {}", labels.0, labels.1),
            &format!(
                "durable ingest {} (median {:.2}), fan-out {} (median {:.2}) (per round)",
                list(0),
                median(0),
                list(1),
                median(1)
            ),
        );
    }
    Ok(())
}

/// Run 9.
pub(crate) async fn jetstream(s: &Settings, dir: &Path, epoch: Instant) -> AnyResult<()> {
    let Some(bin) = nats_server() else {
        row("9. JetStream", "skipped: no nats-server (set SWITCHBOARD_NATS_SERVER or run the tests once)");
        return Ok(());
    };
    let local = format!("[store]\npath = \"{}\"\nmin_free_bytes = 0\n", dir.join("local-store").display());
    let f = measure(s, &dir.join("local"), 1, &local, "", &[], epoch).await?;
    report("9. local store, 1 relay", &f);
    record(s, "local", &f);
    let jet = |servers: &[Node], replicas: usize| {
        let list: Vec<String> = servers.iter().map(|n| format!("\"nats://127.0.0.1:{}\"", n.port)).collect();
        format!(
            "[store]\nkind = \"jetstream\"\nservers = [{}]\nstream = \"bench\"\nreplicas = {replicas}\n",
            list.join(", ")
        )
    };
    // NATS acknowledges a write before it is fsync'd (sync_interval: 2 min
    // by default); `sync_interval: always` fsyncs each write, as the local
    // store does before its 2xx.
    for (sync, name) in [("", "default sync"), ("sync_interval: always", "sync_interval always")] {
        let one = nodes(&bin, &dir.join(format!("r1-{}", sync.len())), 1, sync)?;
        let f = measure(s, &dir.join(format!("r1-run-{}", sync.len())), 1, &jet(&one, 1), "", &one, epoch).await?;
        report(&format!("9. JetStream R1, 1 node, {name}"), &f);
        record(s, &format!("R1 {name}"), &f);
    }
    for n in 1..=3 {
        // A fresh cluster per relay count: each measures an empty stream.
        let three = nodes(&bin, &dir.join(format!("r3-{n}")), 3, "")?;
        let f = measure(s, &dir.join(format!("r3-{n}-run")), n, &jet(&three, 3), "", &three, epoch).await?;
        report(&format!("9. JetStream R3, 3 nodes, {n} relay{}", if n > 1 { "s" } else { "" }), &f);
        record(s, &format!("R3 x{n}"), &f);
    }
    Ok(())
}
