//! Hostile and malformed input against the ingress, over raw TCP: each case
//! gets its expected status (or a closed connection), never a panic, and the
//! relay keeps serving afterwards.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::support::*;

/// A relay with short timeouts and small limits, and its one destination.
pub async fn relay(extra_ingress: &str) -> (TestRelay, TestReceiver) {
    let r = TestReceiver::ok().await;
    let toml = config(&[("a", &r.url("/a"), "")]).replace(
        "[[routes]]",
        &format!(
            "[ingress]\nmax_body = 1000\nheader_read_timeout = \"500ms\"\nbody_read_timeout = \"500ms\"\nmax_headers = 20\n{extra_ingress}\n[[routes]]"
        ),
    );
    (TestRelay::start(&toml).await, r)
}

/// Sends `bytes`, then reads until the server closes or `within` passes.
pub async fn raw(addr: SocketAddr, bytes: &[u8], within: Duration) -> String {
    let mut s = TcpStream::connect(addr).await.expect("connect");
    s.write_all(bytes).await.expect("write");
    read_all(&mut s, within).await
}

pub async fn read_all(s: &mut TcpStream, within: Duration) -> String {
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    let deadline = tokio::time::Instant::now() + within;
    loop {
        match tokio::time::timeout_at(deadline, s.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) | Err(_) => break,
            Ok(Ok(n)) => out.extend_from_slice(&buf[..n]),
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

pub fn status_of(resp: &str) -> Option<u16> {
    resp.strip_prefix("HTTP/1.1 ")?.get(..3)?.parse().ok()
}

async fn still_serving(relay: &TestRelay) {
    assert_eq!(post(&relay.url("/in"), "application/json", "{}").await.0, 200, "relay still serves");
}

#[tokio::test]
async fn oversized_bodies_declared_and_chunked_get_413() {
    let (relay, r) = relay("").await;
    let declared = format!("POST /in HTTP/1.1\r\nHost: x\r\nContent-Length: 5000000\r\n\r\n{}", "a".repeat(100));
    let resp = raw(relay.ingress, declared.as_bytes(), WAIT).await;
    assert_eq!(status_of(&resp), Some(413), "{resp}");

    let mut chunked = b"POST /in HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n".to_vec();
    for _ in 0..4 {
        chunked.extend_from_slice(b"1f4\r\n");
        chunked.extend_from_slice(&[b'b'; 500]);
        chunked.extend_from_slice(b"\r\n");
    }
    chunked.extend_from_slice(b"0\r\n\r\n");
    let resp = raw(relay.ingress, &chunked, WAIT).await;
    assert_eq!(status_of(&resp), Some(413), "{resp}");
    still_serving(&relay).await;
    assert_eq!(r.wait_for(1, WAIT).await.len(), 1, "nothing oversized was stored");
}

#[tokio::test]
async fn malformed_chunked_encoding_gets_400() {
    let (relay, _r) = relay("").await;
    let bad = b"POST /in HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nhello\r\n0\r\n\r\n";
    let resp = raw(relay.ingress, bad, WAIT).await;
    assert_eq!(status_of(&resp), Some(400), "{resp}");
    still_serving(&relay).await;
}

#[tokio::test]
async fn slowloris_headers_are_cut_off() {
    let (relay, _r) = relay("").await;
    let mut s = TcpStream::connect(relay.ingress).await.expect("connect");
    let started = Instant::now();
    let head = b"POST /in HTTP/1.1\r\nHost: x\r\nX-Slow: ";
    let mut closed = false;
    // One byte every 100 ms; the 500 ms header timeout must end it long
    // before the (bounded) loop does.
    for i in 0..200 {
        let b = head.get(i).copied().unwrap_or(b'a');
        if s.write_all(&[b]).await.is_err() {
            closed = true;
            break;
        }
        let mut buf = [0u8; 256];
        match tokio::time::timeout(Duration::from_millis(100), s.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => {
                closed = true;
                break;
            }
            Ok(Ok(n)) => {
                let text = String::from_utf8_lossy(&buf[..n]);
                assert!(!text.starts_with("HTTP/1.1 2"), "a trickled request was accepted: {text}");
                closed = true;
                break;
            }
            Err(_) => {}
        }
    }
    assert!(closed, "connection still open after {:?}", started.elapsed());
    assert!(started.elapsed() < Duration::from_secs(10));
    still_serving(&relay).await;
}

#[tokio::test]
async fn body_trickled_too_slowly_gets_408() {
    let (relay, r) = relay("").await;
    let mut s = TcpStream::connect(relay.ingress).await.expect("connect");
    s.write_all(b"POST /in HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\nabc").await.expect("write");
    // Send nothing more: the body read timeout (500 ms) answers.
    let resp = read_all(&mut s, WAIT).await;
    assert_eq!(status_of(&resp), Some(408), "{resp}");
    still_serving(&relay).await;
    assert_eq!(r.wait_for(1, WAIT).await.len(), 1);
}

#[tokio::test]
async fn too_many_or_too_large_headers_get_431() {
    let (relay, _r) = relay("").await;
    let mut many = String::from("POST /in HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n");
    for i in 0..50 {
        many.push_str(&format!("X-H{i}: v\r\n"));
    }
    many.push_str("\r\n{}");
    let resp = raw(relay.ingress, many.as_bytes(), WAIT).await;
    assert_eq!(status_of(&resp), Some(431), "{resp}");

    let large =
        format!("POST /in HTTP/1.1\r\nHost: x\r\nX-Big: {}\r\nContent-Length: 2\r\n\r\n{{}}", "v".repeat(100_000));
    let resp = raw(relay.ingress, large.as_bytes(), WAIT).await;
    assert_eq!(status_of(&resp), Some(431), "{resp}");
    still_serving(&relay).await;
}

#[tokio::test]
async fn connection_flood_beyond_the_limit_is_queued_and_existing_ones_served() {
    let (relay, _r) = relay("max_connections = 4").await;
    let relay = std::sync::Arc::new(relay);
    // Four connections hold every slot (well inside the header timeout they are idle).
    let mut held = Vec::new();
    for _ in 0..4 {
        let mut s = TcpStream::connect(relay.ingress).await.expect("connect");
        s.write_all(b"POST /in HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n{}").await.expect("write");
        let resp = read_until_response(&mut s).await;
        assert_eq!(status_of(&resp), Some(200), "{resp}");
        held.push(s);
    }
    // A fifth connection is accepted by the kernel but not served yet.
    let mut extra = TcpStream::connect(relay.ingress).await.expect("connect (queued)");
    extra.write_all(b"POST /in HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n{}").await.expect("write");
    let mut buf = [0u8; 64];
    assert!(
        tokio::time::timeout(Duration::from_millis(300), extra.read(&mut buf)).await.is_err(),
        "the fifth connection was served while four held every slot"
    );
    // The existing connections are still served (keep-alive).
    held[0].write_all(b"POST /in HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n{}").await.expect("write");
    assert_eq!(status_of(&read_until_response(&mut held[0]).await), Some(200));
    // Freeing a slot lets the queued connection through.
    drop(held.pop());
    assert_eq!(status_of(&read_until_response(&mut extra).await), Some(200));
}

async fn read_until_response(s: &mut TcpStream) -> String {
    let mut out = Vec::new();
    let mut buf = [0u8; 1024];
    let deadline = tokio::time::Instant::now() + WAIT;
    while !String::from_utf8_lossy(&out).contains("\r\n\r\n{") {
        match tokio::time::timeout_at(deadline, s.read(&mut buf)).await {
            Ok(Ok(n)) if n > 0 => out.extend_from_slice(&buf[..n]),
            _ => break,
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[tokio::test]
async fn http2_prior_knowledge_is_served() {
    let (relay, r) = relay("").await;
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .http2_only(true)
        .build_http::<http_body_util::Full<bytes::Bytes>>();
    let req = http::Request::post(relay.url("/in"))
        .header("content-type", "application/json")
        .body(http_body_util::Full::new(bytes::Bytes::from_static(b"{\"h2\":true}")))
        .expect("request");
    let resp = tokio::time::timeout(WAIT, client.request(req)).await.expect("in time").expect("h2 response");
    assert_eq!(resp.version(), http::Version::HTTP_2);
    assert_eq!(resp.status(), 200);
    let got = r.wait_for(1, WAIT).await;
    assert_eq!(&got[0].body[..], b"{\"h2\":true}");
}

#[tokio::test]
async fn garbage_instead_of_http_gets_400() {
    let (relay, _r) = relay("").await;
    let resp = raw(relay.ingress, b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03garbage\r\n\r\n", WAIT).await;
    assert!(resp.is_empty() || status_of(&resp) == Some(400), "{resp}");
    let resp = raw(relay.ingress, b"HELLO THERE\r\n\r\n", WAIT).await;
    assert_eq!(status_of(&resp), Some(400), "{resp}");
    still_serving(&relay).await;
}

/// Sends `POST <target>` with a 2-byte JSON body over a raw connection and
/// returns the raw response.
async fn post_raw_target(relay: &TestRelay, target: &str) -> String {
    let req = format!("POST {target} HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n{{}}");
    raw(relay.ingress, req.as_bytes(), WAIT).await
}

#[tokio::test]
async fn odd_paths_and_long_uris() {
    let (relay, _r) = relay("").await;
    for path in ["/in/../in", "/../in", "/in%00", "/in/%2e%2e/in", "/in/"] {
        let resp = post_raw_target(&relay, path).await;
        assert_eq!(status_of(&resp), Some(404), "{path}: {resp}");
    }
    let resp = post_raw_target(&relay, &format!("/{}", "a".repeat(10_000))).await;
    assert_eq!(status_of(&resp), Some(404), "{resp}");
    // A query string does not change the route.
    let resp = post_raw_target(&relay, &format!("/in?{}", "q=1&".repeat(2_000))).await;
    assert_eq!(status_of(&resp), Some(200), "{resp}");
    // Beyond the 64 KiB head limit: refused outright.
    let resp = post_raw_target(&relay, &format!("/in?{}", "q".repeat(70_000))).await;
    assert_eq!(status_of(&resp), Some(431), "{}", &resp[..resp.len().min(200)]);
    still_serving(&relay).await;
}

#[tokio::test]
async fn non_utf8_header_values_are_forwarded_byte_for_byte() {
    let (relay, r) = relay("").await;
    let mut req = b"POST /in HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\nX-Latin1: caf\xe9\r\n\r\n{}".to_vec();
    let resp = raw(relay.ingress, &req, WAIT).await;
    assert_eq!(status_of(&resp), Some(200), "{resp}");
    let got = r.wait_for(1, WAIT).await;
    assert_eq!(got[0].headers.get("x-latin1").map(|v| v.as_bytes()), Some(&b"caf\xe9"[..]));
    req.clear();
}

#[tokio::test]
async fn empty_body_is_accepted_and_forwarded_empty() {
    let (relay, r) = relay("").await;
    let resp = raw(relay.ingress, b"POST /in HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n", WAIT).await;
    assert_eq!(status_of(&resp), Some(200), "{resp}");
    let got = r.wait_for(1, WAIT).await;
    assert!(got[0].body.is_empty());
}

#[tokio::test]
async fn expect_100_continue_gets_100_then_200() {
    let (relay, r) = relay("").await;
    let mut s = TcpStream::connect(relay.ingress).await.expect("connect");
    s.write_all(b"POST /in HTTP/1.1\r\nHost: x\r\nContent-Length: 7\r\nExpect: 100-continue\r\n\r\n")
        .await
        .expect("write");
    let mut buf = [0u8; 256];
    let n = tokio::time::timeout(WAIT, s.read(&mut buf)).await.expect("100 in time").expect("read");
    assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 100"), "{}", String::from_utf8_lossy(&buf[..n]));
    s.write_all(b"{\"a\":1}").await.expect("body");
    let resp = read_until_response(&mut s).await;
    assert_eq!(status_of(&resp), Some(200), "{resp}");
    assert_eq!(&r.wait_for(1, WAIT).await[0].body[..], b"{\"a\":1}");

    // Over the limit: 413 without waiting for the body (no 100).
    let mut s = TcpStream::connect(relay.ingress).await.expect("connect");
    s.write_all(b"POST /in HTTP/1.1\r\nHost: x\r\nContent-Length: 99999\r\nExpect: 100-continue\r\n\r\n")
        .await
        .expect("write");
    let resp = read_all(&mut s, WAIT).await;
    assert_eq!(status_of(&resp), Some(413), "{resp}");
}
