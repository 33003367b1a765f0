//! The public endpoint as an attacker sees it (issue: idle-connection
//! exhaustion, memory from concurrent large bodies, sender credentials
//! leaking downstream, and the smaller defects found with them). Each test
//! names the defect it guards; the flood tests run the real binary.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

use crate::binary::{write, RelayProcess};
use crate::hostile::{raw, read_all, status_of};
use crate::support::*;

/// A connection to `addr` from the loopback address `src` (127.0.0.0/8 is
/// all ours), so a flood can come from another "client" than the test.
async fn connect_from(src: &str, addr: SocketAddr) -> TcpStream {
    let s = TcpSocket::new_v4().expect("socket");
    s.bind(format!("{src}:0").parse().expect("src")).expect("bind source");
    s.connect(addr).await.expect("connect")
}

/// The JSON error of a raw HTTP response: its content type must be JSON
/// and its body `{"error": "..."}`.
fn json_error(resp: &str) -> String {
    let (head, body) = resp.split_once("\r\n\r\n").unwrap_or_else(|| panic!("no head end: {resp:?}"));
    assert!(head.to_ascii_lowercase().contains("content-type: application/json"), "not JSON: {resp:?}");
    let v: serde_json::Value = serde_json::from_str(body).unwrap_or_else(|e| panic!("body not JSON ({e}): {resp:?}"));
    v["error"].as_str().unwrap_or_else(|| panic!("no error field: {resp:?}")).to_string()
}

fn binary_config(receiver: &TestReceiver, ingress: &str) -> String {
    config(&[("a", &receiver.url("/a"), "")]).replace("[[routes]]", &format!("[ingress]\n{ingress}\n[[routes]]"))
}

/// Defect 1: about 1,024 connections that never send a byte stopped all
/// ingress. With `max_connections_per_ip`, a flood from one address takes
/// only its share; the rest are refused at accept with a JSON 503.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_flood_from_one_address_leaves_room_for_others_with_the_per_ip_limit() {
    let r = TestReceiver::ok().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let toml = binary_config(&r, "max_connections = 64\nmax_connections_per_ip = 8\nheader_read_timeout = \"60s\"");
    let relay = RelayProcess::start(&write(dir.path(), &toml)).await;
    const FLOOD: usize = 100;
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let mut held = Vec::new();
    for _ in 0..FLOOD {
        let mut s = connect_from("127.0.0.2", relay.ingress).await;
        let tx = tx.clone();
        held.push(tokio::spawn(async move {
            let resp = read_all(&mut s, Duration::from_secs(120)).await;
            let _ = tx.send(resp);
        }));
    }
    let mut refused = 0;
    while refused < FLOOD - 8 {
        let resp = tokio::time::timeout(WAIT, rx.recv()).await.expect("refusals arrive").expect("open channel");
        assert_eq!(status_of(&resp), Some(503), "{resp}");
        assert!(resp.to_ascii_lowercase().contains("retry-after: "), "{resp}");
        assert_eq!(json_error(&resp), "too many connections from this address");
        refused += 1;
    }
    // 8 idle connections from 127.0.0.2 stay open; 127.0.0.1 is served.
    let (status, _, _) = post(&relay.url("/in"), "application/json", "{\"from\":\"127.0.0.1\"}").await;
    assert_eq!(status, 200);
    r.wait_for(1, WAIT).await;
    let (_, _, m) = get(&relay.admin_url("/metrics")).await;
    let m = String::from_utf8_lossy(&m).into_owned();
    let series = "switchboard_connections_refused_total{listener=\"ingress\",reason=\"per_ip_limit\"}";
    assert_eq!(metric(&m, series), (FLOOD - 8) as f64, "{m}");
    assert!(rx.try_recv().is_err(), "only the refused connections were answered");
    held.iter().for_each(|h| h.abort());
}

/// Defect 1, without the per-address limit: connections that never send a
/// byte (or only part of a head) are answered 408 and closed once
/// `header_read_timeout` has passed since their accept, so a flood larger
/// than `max_connections` clears by itself and a real sender gets through.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_flood_is_cleared_by_the_head_timeout_counted_from_accept() {
    let r = TestReceiver::ok().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let toml = binary_config(&r, "max_connections = 32\nheader_read_timeout = \"1s\"");
    let relay = RelayProcess::start(&write(dir.path(), &toml)).await;
    let mut flood = tokio::task::JoinSet::new();
    for i in 0..40 {
        let mut s = connect_from("127.0.0.2", relay.ingress).await;
        if i % 10 == 0 {
            // A few send part of a head and stop.
            s.write_all(b"POST /in HT").await.expect("write");
        }
        flood.spawn(async move { read_all(&mut s, WAIT).await });
    }
    let (status, _, _) = post(&relay.url("/in"), "application/json", "{}").await;
    assert_eq!(status, 200, "a sender gets through once the flood is cut off");
    let mut closed = 0;
    while let Some(resp) = flood.join_next().await {
        let resp = resp.expect("reader");
        // read_all returns at EOF; within WAIT means the relay closed it.
        assert_eq!(status_of(&resp), Some(408), "{resp:?}");
        assert_eq!(json_error(&resp), "request head not received in time");
        closed += 1;
    }
    assert_eq!(closed, 40);
    let (_, _, m) = get(&relay.admin_url("/metrics")).await;
    let m = String::from_utf8_lossy(&m).into_owned();
    assert_eq!(metric(&m, "switchboard_connections_refused_total{listener=\"ingress\",reason=\"head_timeout\"}"), 40.0);
    assert_eq!(metric(&m, "switchboard_ingress_connections"), 0.0, "{m}");
}

/// Defect 1 on TLS: a client that completes the handshake and then sends
/// nothing was never closed either (only the handshake had a timeout).
#[tokio::test]
async fn tls_connection_idle_after_the_handshake_is_closed() {
    use crate::tls::{client_config, connect_tls, tls_config, write_pair, Ca};
    let ca = Ca::new();
    let dir = Arc::new(tempfile::tempdir().expect("tempdir"));
    let (cert, key) = write_pair(dir.path(), "leaf", &ca.leaf(1, None));
    let r = TestReceiver::ok().await;
    let toml = tls_config(&r.url("/a"), &cert, &key)
        .replace("[[routes]]", "[ingress]\nheader_read_timeout = \"500ms\"\n[[routes]]");
    let relay = TestRelay::start_in(dir, &toml).await;
    let mut tls = connect_tls(relay.ingress_all[1], client_config(&ca, &rustls::version::TLS13, &[b"http/1.1"])).await;
    let mut out = Vec::new();
    let read = tokio::time::timeout(WAIT, tls.read_to_end(&mut out)).await;
    assert!(read.is_ok(), "an idle TLS connection stayed open");
    let text = String::from_utf8_lossy(&out);
    assert_eq!(status_of(&text), Some(408), "{text}");
}

/// A listener's `allow_ips` is checked at accept: a connection from
/// elsewhere is answered 403 before it sends anything, and takes no slot.
#[tokio::test]
async fn a_listener_allowlist_refuses_at_accept() {
    let r = TestReceiver::ok().await;
    let toml = config(&[("a", &r.url("/a"), "")])
        .replace("addr = \"127.0.0.1:0\"\n[admin]", "addr = \"127.0.0.1:0\"\nallow_ips = [\"10.0.0.0/8\"]\n[admin]")
        .replace("[[routes]]", "[ingress]\nmax_connections = 1\n[[routes]]");
    let relay = TestRelay::start(&toml).await;
    for _ in 0..3 {
        // With max_connections = 1, each would wait for the previous one if
        // refused connections kept their slot.
        let mut s = TcpStream::connect(relay.ingress).await.expect("connect");
        let resp = read_all(&mut s, WAIT).await;
        assert_eq!(status_of(&resp), Some(403), "{resp:?}");
        assert_eq!(json_error(&resp), "source address not allowed");
    }
    let m = relay.metrics().await;
    assert_eq!(
        metric(&m, "switchboard_connections_refused_total{listener=\"ingress\",reason=\"ip_not_allowed\"}"),
        3.0
    );
}

/// Defect 5: errors raised by the HTTP layer (bad framing, 431) came back
/// with an empty body.
#[tokio::test]
async fn errors_from_the_http_layer_are_json() {
    let (relay, _r) = crate::hostile::relay("").await;
    let cases: [(&[u8], u16); 3] = [
        (b"POST /in HTTP/1.1\r\nHost: x\r\nBad Header Line\r\n\r\n", 400),
        (b"\x16\x03\x01\x02\x00garbage\r\n\r\n", 400),
        (format!("POST /in HTTP/1.1\r\nHost: x\r\nX-Big: {}\r\n\r\n", "v".repeat(100_000)).leak().as_bytes(), 431),
    ];
    for (bytes, want) in cases {
        let resp = raw(relay.ingress, bytes, WAIT).await;
        assert_eq!(status_of(&resp), Some(want), "{resp:?}");
        assert!(!json_error(&resp).is_empty());
    }
    let mut many = String::from("POST /in HTTP/1.1\r\nHost: x\r\n");
    for i in 0..50 {
        many.push_str(&format!("X-H{i}: v\r\n"));
    }
    many.push_str("\r\n");
    let resp = raw(relay.ingress, many.as_bytes(), WAIT).await;
    assert_eq!(status_of(&resp), Some(431), "{resp:?}");
    assert_eq!(json_error(&resp), "request headers too large or too many");
    // The handler's own errors keep their shape.
    let resp = raw(relay.ingress, b"GET /nope HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n", WAIT).await;
    assert_eq!(json_error(&resp), "no route for this path");
}

/// A request from `src` that declares `len` body bytes and sends 3.
async fn stalled_body_from(src: &str, addr: SocketAddr, len: usize) -> TcpStream {
    let mut s = connect_from(src, addr).await;
    let head = format!("POST /in HTTP/1.1\r\nHost: x\r\nContent-Type: text/plain\r\nContent-Length: {len}\r\n\r\nabc");
    s.write_all(head.as_bytes()).await.expect("write");
    s
}

/// Reads until `want` has arrived (or the connection ends), bounded by WAIT.
async fn read_until(s: &mut TcpStream, want: &str) -> String {
    let mut out = Vec::new();
    let mut buf = [0u8; 1024];
    while !String::from_utf8_lossy(&out).contains(want) {
        match tokio::time::timeout(WAIT, s.read(&mut buf)).await.expect("read in time") {
            Ok(0) | Err(_) => break,
            Ok(n) => out.extend_from_slice(&buf[..n]),
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// How much later the holder's body deadline is than the waiter's.
const DEADLINE_GAP: Duration = Duration::from_millis(300);

/// Defect 2: memory was bounded only by connections x max_body. Bodies
/// held in memory are bounded by `max_buffered_bytes`: a request that does
/// not fit waits for room, is refused with 503 if none comes within its
/// `body_read_timeout`, and is admitted once room is given back.
#[tokio::test]
async fn bodies_in_memory_are_bounded_by_max_buffered_bytes() {
    const MIB: usize = 1 << 20;
    let r = TestReceiver::ok().await;
    let toml = config(&[("a", &r.url("/a"), "")]).replace(
        "[[routes]]",
        "[ingress]\nmax_body = 1048576\nmax_buffered_bytes = 1048576\nbody_read_timeout = \"1s\"\n[[routes]]",
    );
    let relay = TestRelay::start(&toml).await;
    // A chunked request whose body read has started (hyper sends 100
    // Continue when the handler first reads the body): its deadline runs.
    let mut chunked = TcpStream::connect(relay.ingress).await.expect("connect");
    chunked
        .write_all(b"POST /in HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nExpect: 100-continue\r\n\r\n")
        .await
        .expect("write");
    assert!(read_until(&mut chunked, "100 Continue").await.contains("100 Continue"));
    // A later request takes all the room and stalls. Its deadline must be
    // later than the chunked one's by more than the timer's granularity, or
    // both expire in one tick and the chunked request may get the room back
    // at its own deadline: this wait makes that gap, it synchronises nothing.
    tokio::time::sleep(DEADLINE_GAP).await;
    // From another address: one address may hold only a quarter (or one
    // body) of the budget, and the waiter should meet a full budget, not
    // its own address's limit.
    let holder = stalled_body_from("127.0.0.2", relay.ingress, MIB).await;
    relay
        .wait_metrics("the stalled body holds the room", |m| {
            metric(m, "switchboard_ingress_buffered_bytes") == MIB as f64
        })
        .await;
    // The chunked request's first chunk finds no room before its deadline
    // (70 KiB: more than a small callback, which has a reserve).
    let chunk = vec![b'c'; 70 << 10];
    chunked.write_all(format!("{:x}\r\n", chunk.len()).as_bytes()).await.expect("write chunk size");
    chunked.write_all(&chunk).await.expect("write chunk");
    chunked.write_all(b"\r\n").await.expect("write chunk end");
    let resp = read_all(&mut chunked, WAIT).await;
    assert_eq!(status_of(&resp), Some(503), "{resp:?}");
    assert!(resp.to_ascii_lowercase().contains("retry-after: "), "{resp}");
    assert_eq!(json_error(&resp), "too many request bodies in memory right now; retry later");
    let m = relay.metrics().await;
    assert_eq!(metric(&m, "switchboard_ingress_buffer_waits_total{result=\"refused\",route=\"/in\"}"), 1.0, "{m}");
    drop(holder);
    relay
        .wait_metrics("the stalled request gave its room back", |m| {
            metric(m, "switchboard_ingress_buffered_bytes") == 0.0
        })
        .await;
    let big = bytes::Bytes::from(vec![b'x'; MIB]);
    let (status, _, _) = post(&relay.url("/in"), "text/plain", big.clone()).await;
    assert_eq!(status, 200);
    let got = r.wait_for(1, WAIT).await;
    assert_eq!(got[0].body, big);
}

/// Defect 2, under load: many large bodies at once, more than the bound
/// holds; they wait their turn, and every acknowledged one arrives intact.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_large_bodies_wait_their_turn_and_arrive_intact() {
    let r = TestReceiver::ok().await;
    let toml = config(&[("a", &r.url("/a"), "")])
        .replace("[[routes]]", "[ingress]\nmax_body = 1048576\nmax_buffered_bytes = 3145728\n[[routes]]");
    let relay = TestRelay::start(&toml).await;
    let mut posts = tokio::task::JoinSet::new();
    for i in 0..24u8 {
        let url = relay.url("/in");
        posts.spawn(async move {
            let body = bytes::Bytes::from(vec![b'a' + i; 1 << 20]);
            let (status, _, _) = post(&url, "application/octet-stream", body).await;
            (i, status)
        });
    }
    while let Some(done) = posts.join_next().await {
        let (i, status) = done.expect("post task");
        assert_eq!(status, 200, "body {i}");
    }
    let got = r.wait_for(24, WAIT).await;
    let mut seen: Vec<u8> = got
        .iter()
        .map(|g| {
            assert_eq!(g.body.len(), 1 << 20);
            assert!(g.body.iter().all(|b| *b == g.body[0]), "a body arrived altered");
            g.body[0]
        })
        .collect();
    seen.sort();
    assert_eq!(seen, (0..24).map(|i| b'a' + i).collect::<Vec<_>>());
    let m = relay.metrics().await;
    assert!(metric(&m, "switchboard_ingress_buffer_waits_total{result=\"admitted\",route=\"/in\"}") > 0.0, "{m}");
}

/// Defect 3: the sender's credentials reached every destination. Each
/// mode's credential headers are withheld, except from a destination that
/// sets `forward_sender_credentials`.
#[tokio::test]
async fn sender_credentials_reach_only_destinations_that_ask() {
    let plain = TestReceiver::ok().await;
    let audit = TestReceiver::ok().await;
    let secret = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
    let toml = format!(
        r#"[store]
path = "{{store}}"
[[listeners]]
addr = "127.0.0.1:0"
[admin]
addr = "127.0.0.1:0"
[[routes]]
path = "/basic"
destinations = ["plain", "audit"]
[routes.auth.basic]
username = "ts"
passwords = ["pw"]
[[routes]]
path = "/header"
destinations = ["plain", "audit"]
[routes.auth.header]
name = "X-Callback-Token"
values = ["tok-123"]
[[routes]]
path = "/hmac"
destinations = ["plain"]
[routes.auth.hmac]
scheme = "standard-webhooks"
secrets = ["{secret}"]
[destinations.plain]
url = "{}"
[destinations.audit]
url = "{}"
forward_sender_credentials = true
"#,
        plain.url("/p"),
        audit.url("/a")
    );
    let relay = TestRelay::start(&toml).await;
    let basic = "Basic dHM6cHc="; // ts:pw
    let (s, _, _) = request("POST", &relay.url("/basic"), &[("authorization", basic), ("x-keep", "1")], "{}").await;
    assert_eq!(s, 200);
    let (s, _, _) =
        request("POST", &relay.url("/header"), &[("x-callback-token", "tok-123"), ("x-keep", "2")], "{}").await;
    assert_eq!(s, 200);
    let ts = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).expect("time").as_secs().to_string();
    let sig = {
        use base64::Engine;
        use hmac::Mac;
        let key = base64::engine::general_purpose::STANDARD.decode(&secret[6..]).expect("key");
        let mut m = <hmac::Hmac<sha2::Sha256> as Mac>::new_from_slice(&key).expect("mac");
        m.update(format!("msg_1.{ts}.{{}}").as_bytes());
        format!("v1,{}", base64::engine::general_purpose::STANDARD.encode(m.finalize().into_bytes()))
    };
    let hdrs = [("webhook-id", "msg_1"), ("webhook-timestamp", ts.as_str()), ("webhook-signature", sig.as_str())];
    let (s, _, _) = request("POST", &relay.url("/hmac"), &[&hdrs[..], &[("x-keep", "3")]].concat(), "{}").await;
    assert_eq!(s, 200);

    let got = plain.wait_for(3, WAIT).await;
    for g in &got {
        assert!(g.header("x-keep").is_some(), "other headers still travel");
        for h in ["authorization", "x-callback-token", "webhook-signature", "webhook-timestamp"] {
            assert!(g.header(h).is_none(), "{h} reached a destination that did not ask: {:?}", g.headers);
        }
    }
    let hmac = got.iter().find(|g| g.header("x-keep").as_deref() == Some("3")).expect("hmac one");
    assert_eq!(hmac.header("webhook-id").as_deref(), Some("msg_1"), "the sender's id is kept");
    let got = audit.wait_for(2, WAIT).await;
    let by = |k: &str| got.iter().find(|g| g.header("x-keep").as_deref() == Some(k)).expect("delivered");
    assert_eq!(by("1").header("authorization").as_deref(), Some(basic));
    assert_eq!(by("2").header("x-callback-token").as_deref(), Some("tok-123"));
}

/// Defect 4: `check` masked URL userinfo but printed query-string secrets.
#[test]
fn check_masks_query_string_values() {
    let dir = tempfile::tempdir().expect("tempdir");
    let toml = config(&[("a", "https://user:pw-secret@example.com/hook?token=tok-secret&v=2", "")]);
    let path = write(dir.path(), &toml);
    let out = crate::binary::check(&path);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let printed = String::from_utf8_lossy(&out.stdout);
    assert!(!printed.contains("tok-secret") && !printed.contains("pw-secret"), "{printed}");
    assert!(printed.contains("https://***:***@example.com/hook?token=***&v=***"), "{printed}");
}

/// Defect 6: `/readyz` stayed 200 while every POST got 503. It follows what
/// ingress would answer, and turns 200 again by itself.
#[tokio::test]
async fn readyz_is_503_while_callbacks_are_refused_and_recovers_by_itself() {
    let up = Arc::new(AtomicBool::new(false));
    let flag = up.clone();
    let r =
        TestReceiver::scripted(move |_, _| Reply::Status(if flag.load(Ordering::SeqCst) { 200 } else { 503 })).await;
    let toml = config(&[("a", &r.url("/a"), "[destinations.a.retry]\ninitial = \"50ms\"\nmax_interval = \"100ms\"")])
        .replace(
            "[store]\npath = \"{store}\"",
            "[store]\npath = \"{store}\"\nmax_bytes = 4000\n[ingress]\nmax_body = 1100",
        );
    let relay = TestRelay::start(&toml).await;
    assert_eq!(get(&relay.admin_url("/readyz")).await.0, 200);
    let mut refused = false;
    for i in 0..20 {
        let (status, _, _) = post(&relay.url("/in"), "text/plain", format!("{i:>1000}")).await;
        if status == 503 {
            refused = true;
            break;
        }
        assert_eq!(status, 200);
    }
    assert!(refused, "max_bytes was never reached");
    let (status, _, body) = get(&relay.admin_url("/readyz")).await;
    assert_eq!(status, 503, "{}", String::from_utf8_lossy(&body));
    assert!(String::from_utf8_lossy(&body).contains("store is full"), "{}", String::from_utf8_lossy(&body));
    up.store(true, Ordering::SeqCst);
    eventually!(WAIT, "readyz 200 after the backlog drained", {
        let (s, _, b) = get(&relay.admin_url("/readyz")).await;
        if s == 200 {
            Ok(())
        } else {
            Err(format!("{s} {}", String::from_utf8_lossy(&b)))
        }
    });
    assert_eq!(post(&relay.url("/in"), "text/plain", "again").await.0, 200);
}

/// Defect 6: the free-space check used a value up to 100 ms old, so a POST
/// right after someone else filled the disk past the floor got 200.
#[tokio::test]
async fn free_space_is_checked_at_the_moment_of_accepting() {
    let fs = crate::promises::Tmpfs::mount_or_fail("64m");
    let r = TestReceiver::ok().await;
    let store = fs.path().join("store");
    let toml = config(&[("a", &r.url("/a"), "")]).replace(
        "[store]\npath = \"{store}\"",
        &format!("[store]\npath = \"{}\"\nmin_free_bytes = 33554432", store.display()),
    );
    let relay = TestRelay::start(&toml).await;
    for round in 0..5 {
        assert_eq!(post(&relay.url("/in"), "text/plain", "before").await.0, 200, "round {round}");
        // Someone else takes the disk below the floor, right after a request.
        let ballast = fs.path().join("ballast");
        let filled = std::time::Instant::now();
        std::fs::write(&ballast, vec![0u8; (fs.free() - 16 * 1024 * 1024) as usize]).expect("ballast");
        // The store's figure may be FREE_SPACE_MAX_AGE old; writing the
        // ballast takes longer than that, or this test proves nothing.
        assert!(filled.elapsed() >= switchboard::store::FREE_SPACE_MAX_AGE);
        let (status, headers, _) = post(&relay.url("/in"), "text/plain", "after").await;
        assert_eq!(status, 503, "round {round}: a 2xx below min_free_bytes");
        assert!(headers.contains_key("retry-after"));
        assert_eq!(get(&relay.admin_url("/readyz")).await.0, 503);
        std::fs::remove_file(&ballast).expect("remove ballast");
        assert_eq!(get(&relay.admin_url("/readyz")).await.0, 200);
    }
}

/// Defect 6: a second relay on the same store failed with a raw repeated
/// `WouldBlock`; it names the lock and the pid holding it.
#[tokio::test]
async fn a_second_relay_on_the_same_store_gets_a_clear_lock_error() {
    let r = TestReceiver::ok().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let path = write(dir.path(), &config(&[("a", &r.url("/a"), "")]));
    let first = RelayProcess::start(&path).await;
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new(env!("CARGO_BIN_EXE_switchboard"))
            .args(["run", "--config"])
            .arg(&path)
            .output()
            .expect("second relay")
    })
    .await
    .expect("join");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    let want = format!("is locked by another process (pid {}?)", first.child.id());
    assert!(err.contains(&want), "{err}");
    assert!(!err.contains("WouldBlock"), "{err}");
}

/// Defect 6: the human log format wrote ANSI colour codes into files.
#[tokio::test]
async fn human_logs_to_a_file_have_no_colour_codes() {
    let r = TestReceiver::ok().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let path = write(dir.path(), &config(&[("a", &r.url("/a"), "")]));
    let log = std::fs::File::create(dir.path().join("relay.log")).expect("log file");
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_switchboard"))
        .args(["run", "--config"])
        .arg(&path)
        .env("RUST_LOG", "info")
        .env_remove("NO_COLOR")
        .stderr(log)
        .spawn()
        .expect("spawn");
    let text = eventually!(WAIT, "the start line in the log file", {
        let text = std::fs::read_to_string(dir.path().join("relay.log")).unwrap_or_default();
        if text.contains("switchboard started") {
            Ok(text)
        } else {
            Err(text)
        }
    });
    let _ = child.kill();
    let _ = child.wait();
    assert!(!text.contains('\u{1b}'), "colour codes in a file: {text:?}");
}

/// Defect 6: after ENOSPC the log said "refused until a flush succeeds"
/// (only a restart cures it) and, on SIGTERM, "store flushed and closed".
#[tokio::test]
async fn a_failed_store_logs_what_cures_it_and_does_not_claim_a_clean_close() {
    let fs = crate::promises::Tmpfs::mount_or_fail("16m");
    let down = dead_addr().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let toml = config(&[("a", &format!("http://{down}/a"), "")]).replace(
        "[store]\npath = \"{store}\"",
        &format!("[store]\npath = \"{}\"\nmin_free_bytes = 0", fs.path().join("store").display()),
    );
    let relay = RelayProcess::start(&write(dir.path(), &toml)).await;
    assert_eq!(post(&relay.url("/in"), "text/plain", "one").await.0, 200);
    {
        use std::io::Write;
        let mut f = std::fs::File::create(fs.path().join("ballast")).expect("ballast");
        let chunk = vec![0u8; 64 * 1024];
        while f.write_all(&chunk).is_ok() {}
        let _ = f.write_all(&[0u8; 512]);
    }
    let mut refused = false;
    for i in 0..100 {
        let (status, _, _) = post(&relay.url("/in"), "text/plain", format!("{i:>8000}")).await;
        assert_ne!(status, 200, "a 2xx with a full disk");
        if status == 503 && relay.logs().contains("store flush failed") {
            refused = true;
            break;
        }
    }
    assert!(refused, "no failed flush: {}", relay.logs());
    let mut relay = relay;
    relay.signal(nix::sys::signal::Signal::SIGTERM);
    relay.wait_exit(WAIT).await;
    let logs = relay.logs();
    assert!(logs.contains("until the relay is restarted"), "{logs}");
    assert!(!logs.contains("until a flush succeeds"), "{logs}");
    assert!(logs.contains("store closed after failed flushes"), "{logs}");
    assert!(!logs.contains("store flushed and closed"), "{logs}");
}

/// Defect 6: `check` did not warn when `min_free_bytes` is more than the
/// store's whole filesystem (every callback would be refused).
#[test]
fn check_warns_when_min_free_bytes_exceeds_the_filesystem() {
    let dir = tempfile::tempdir().expect("tempdir");
    let toml = config(&[("a", "http://127.0.0.1:1/a", "")])
        .replace("[store]\npath = \"{store}\"", "[store]\npath = \"{store}\"\nmin_free_bytes = 1000000000000000000");
    let path = write(dir.path(), &toml);
    let out = crate::binary::check(&path);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("warning: store.min_free_bytes: 1000000000000000000 bytes is more than the whole filesystem"),
        "{err}"
    );
}

/// Defect 6: a bad duration gave no example of a valid one.
#[test]
fn a_bad_duration_error_shows_valid_examples() {
    let dir = tempfile::tempdir().expect("tempdir");
    let toml = config(&[("a", "http://127.0.0.1:1/a", "timeout = \"ten seconds\"")]);
    let path = write(dir.path(), &toml);
    let err = switchboard::config::Config::load(&path).expect_err("invalid").to_string();
    assert!(err.contains("destinations.a.timeout"), "{err}");
    assert!(err.contains("such as \"30s\""), "{err}");
}

/// A store that refuses callbacks (here: full) is logged once a second at
/// most, with how many refusals the line did not say, not once per
/// callback: an outage at high rates must not flood the log.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refusals_are_logged_once_a_second_not_per_callback() {
    let r = TestReceiver::ok().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let toml = config(&[("a", &r.url("/a"), "paused = true")]).replace("[store]\n", "[store]\nmax_bytes = 300\n");
    let path = crate::binary::write(dir.path(), &toml);
    let relay = crate::binary::RelayProcess::start(&path).await;
    let mut refused = 0;
    for i in 0..40 {
        let (s, _, _) = post(&relay.url("/in"), "text/plain", format!("fill-{i}-{}", "x".repeat(200))).await;
        if s == 503 {
            refused += 1;
        }
    }
    assert!(refused >= 30, "the store filled up: {refused} refused");
    let logs = relay.logs();
    let lines = logs.lines().filter(|l| l.contains("refusing a callback")).count();
    assert!((1..=3).contains(&lines), "{lines} log lines for {refused} refusals:\n{logs}");
}

/// Regression (issue 23, point 1): a request took its whole declared
/// `Content-Length` of the body budget before sending a byte, and kept it
/// for `body_read_timeout`: 64 requests declaring 1 MiB from one address,
/// sending nothing, made every other sender wait ~29 s. Now nothing is held
/// before a body's first byte, one address holds at most a quarter of the
/// budget, and small callbacks have a reserve when the budget is full.
/// The real binary; attackers on 127.0.0.2-6, the honest sender on
/// 127.0.0.1. "In time" is far under `body_read_timeout` (10 s here),
/// which is what every request waited before.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn declared_bodies_that_never_come_hold_nothing_and_one_address_holds_a_quarter() {
    const MIB: usize = 1 << 20;
    let r = TestReceiver::ok().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let toml = binary_config(
        &r,
        "max_body = 1048576\nmax_buffered_bytes = 4194304\nbody_read_timeout = \"10s\"\nheader_read_timeout = \"60s\"",
    );
    let relay = RelayProcess::start(&write(dir.path(), &toml)).await;
    let in_time = Duration::from_secs(3);
    // 1. From one address: 16 declaring 1 MiB and sending nothing, 8 more
    // sending their first bytes (they hold the address's quarter: 1 MiB).
    let mut attack = Vec::new();
    for _ in 0..16 {
        let mut s = connect_from("127.0.0.2", relay.ingress).await;
        let head = format!("POST /in HTTP/1.1\r\nHost: x\r\nContent-Length: {MIB}\r\n\r\n");
        s.write_all(head.as_bytes()).await.expect("write");
        attack.push(s);
    }
    for _ in 0..8 {
        attack.push(stalled_body_from("127.0.0.2", relay.ingress, MIB).await);
    }
    let held = |m: &str| metric(m, "switchboard_ingress_buffered_bytes");
    relay.wait_metrics("the attack holds its quarter", |m| held(m) >= MIB as f64).await;
    let admin = format!("http://{}/metrics", relay.admin);
    let (_, _, m) = get(&admin).await;
    assert_eq!(
        held(&String::from_utf8_lossy(&m)),
        MIB as f64,
        "one address holds its quarter, the bodies that never came hold nothing"
    );
    let sample = sample("niddservice-uplink.json");
    let large = bytes::Bytes::from(vec![b'l'; MIB / 2]);
    for body in [sample.clone(), large] {
        let started = tokio::time::Instant::now();
        let (s, _, _) = post(&relay.url("/in"), "application/json", body.clone()).await;
        assert_eq!(s, 200);
        assert!(started.elapsed() < in_time, "an honest {} bytes waited {:?}", body.len(), started.elapsed());
    }
    // 2. Four more addresses fill the rest of the budget: a small callback
    // still gets through (the reserve); memory stays within the budget and
    // its reserve (a sixteenth).
    for src in ["127.0.0.3", "127.0.0.4", "127.0.0.5", "127.0.0.6"] {
        attack.push(stalled_body_from(src, relay.ingress, MIB).await);
    }
    relay.wait_metrics("the budget fills", |m| held(m) >= 4.0 * MIB as f64).await;
    let started = tokio::time::Instant::now();
    let (s, _, _) = post(&relay.url("/in"), "application/json", sample.clone()).await;
    assert_eq!(s, 200, "a small callback has a reserve");
    assert!(started.elapsed() < in_time, "the small callback waited {:?}", started.elapsed());
    let (_, _, m) = get(&admin).await;
    let now = held(&String::from_utf8_lossy(&m));
    assert!(now <= (4 * MIB + MIB / 4) as f64, "held {now}");
    let got = r.wait_for(3, WAIT).await;
    assert!(got.iter().filter(|g| g.body == sample).count() == 2, "both small callbacks delivered");
    drop(attack);
}

/// Frames of an HTTP/2 "rapid reset" flood over one connection: the
/// preface, empty SETTINGS, then `n` streams each opened (HEADERS of a
/// POST to /in) and at once reset (RST_STREAM, CANCEL).
fn rapid_reset_flood(n: u32) -> Vec<u8> {
    fn frame(out: &mut Vec<u8>, kind: u8, flags: u8, stream: u32, payload: &[u8]) {
        let len = payload.len() as u32;
        out.extend_from_slice(&len.to_be_bytes()[1..]);
        out.extend_from_slice(&[kind, flags]);
        out.extend_from_slice(&stream.to_be_bytes());
        out.extend_from_slice(payload);
    }
    let mut out = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    frame(&mut out, 0x4, 0, 0, &[]);
    // HPACK: :method POST (static 3), :scheme http (6), :path / (4),
    // :authority "x" (name from static 1, literal value, not indexed).
    let headers = [0x83, 0x86, 0x84, 0x01, 0x01, b'x'];
    for i in 0..n {
        let stream = 2 * i + 1;
        frame(&mut out, 0x1, 0x4, stream, &headers);
        frame(&mut out, 0x3, 0, stream, &8u32.to_be_bytes());
    }
    out
}

/// Issue 23, point 5: each HTTP/2 connection closed for a rapid-reset
/// flood wrote a WARN line (h2's own), so a flood wrote a line per
/// connection. They are counted, and logged once a second at most. The
/// real binary, with its default log filter.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rapid_reset_floods_are_counted_and_logged_once_a_second() {
    let r = TestReceiver::ok().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let relay = RelayProcess::start(&write(dir.path(), &binary_config(&r, ""))).await;
    const CONNECTIONS: usize = 8;
    for _ in 0..CONNECTIONS {
        let mut s = connect_from("127.0.0.2", relay.ingress).await;
        s.write_all(&rapid_reset_flood(500)).await.expect("write flood");
        // The server answers with GOAWAY and closes.
        let _ = read_all(&mut s, WAIT).await;
    }
    let series = "switchboard_connections_refused_total{listener=\"ingress\",reason=\"h2_resets\"}";
    relay.wait_metrics("every flood counted", |m| metric(m, series) == CONNECTIONS as f64).await;
    let logs = relay.logs();
    let lines = logs.lines().filter(|l| l.contains("reset too many streams")).count();
    assert!((1..CONNECTIONS).contains(&lines), "{lines} lines for {CONNECTIONS} connections:\n{logs}");
    assert!(!logs.contains("remotely-reset pending-accept"), "h2's own line per connection:\n{logs}");
    // The listener still serves.
    assert_eq!(post(&relay.url("/in"), "application/json", "{}").await.0, 200);
}

/// Issue 23, point 9: at the default level a recovery was invisible (only
/// failures were logged). The first attempt that succeeds after failures
/// logs one line with how many failed and how many wait; a retry's delay
/// is logged without a space (`retry_in=1s500ms`, not `1s 500ms`).
#[tokio::test]
async fn a_destination_answering_again_is_logged_once() {
    // The script's index counts requests: the first three fail.
    let r = TestReceiver::scripted(|n, _| Reply::Status(if n < 3 { 503 } else { 200 })).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let toml =
        config(&[("flaky", &r.url("/f"), "[destinations.flaky.retry]\ninitial = \"20ms\"\nmax_interval = \"50ms\"")]);
    let relay = RelayProcess::start(&write(dir.path(), &toml)).await;
    assert_eq!(post(&relay.url("/in"), "application/json", "{}").await.0, 200);
    r.wait_for(4, WAIT).await;
    let logs = relay.wait_log("destination answers again").await;
    let line = logs.lines().find(|l| l.contains("destination answers again")).unwrap_or_default();
    let v: serde_json::Value = serde_json::from_str(line).expect("json log line");
    assert_eq!(v["failed_attempts"], 3, "{line}");
    assert_eq!(v["destination"], "flaky", "{line}");
    assert_eq!(logs.matches("destination answers again").count(), 1, "{logs}");
    let retry = logs.lines().find(|l| l.contains("will retry")).unwrap_or_default();
    let v: serde_json::Value = serde_json::from_str(retry).expect("json log line");
    assert!(v["retry_in"].as_str().is_some_and(|s| !s.contains(' ') && s.ends_with("ms")), "{retry}");
}
