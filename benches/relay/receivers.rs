//! Receivers: local destinations that answer 200 and count (checking large
//! bodies whole), or never answer.

use super::*;

#[derive(Clone, Copy, PartialEq)]
pub(crate) enum Mode {
    Ok,
    BlackHole,
    /// Answers after 5 ms; 3 requests in 10 get a 503 (not counted).
    Flaky,
}

/// A large body whose bytes all equal its first one (see [`intact`]).
pub(crate) fn large_body(i: usize) -> Bytes {
    Bytes::from(vec![b'A' + (i % 26) as u8; LARGE_BODY])
}

/// Size of the bodies of run 8: the default `max_body`.
pub(crate) const LARGE_BODY: usize = 1 << 20;

/// Whether a received body is a whole [`large_body`].
pub(crate) fn intact(body: &[u8]) -> bool {
    body.len() == LARGE_BODY && body.iter().all(|b| *b == body[0])
}

/// A local destination: answers 200 and counts, or never answers.
pub(crate) struct Receiver {
    pub(crate) addr: SocketAddr,
    pub(crate) count: Arc<AtomicU64>,
    /// Bodies that were whole large bodies (run 8).
    pub(crate) intact: Arc<AtomicU64>,
    pub(crate) lags_us: Arc<Mutex<Vec<u32>>>,
    /// Requests answered 503 ([`Mode::Flaky`]).
    pub(crate) refused: Arc<AtomicU64>,
    pub(crate) stop: Arc<AtomicBool>,
}

impl Receiver {
    pub(crate) async fn start(mode: Mode, epoch: Instant) -> AnyResult<Receiver> {
        Self::on(TcpListener::bind("127.0.0.1:0").await?, mode, epoch)
    }

    pub(crate) fn on(listener: TcpListener, mode: Mode, epoch: Instant) -> AnyResult<Receiver> {
        let addr = listener.local_addr()?;
        let count = Arc::new(AtomicU64::new(0));
        let whole = Arc::new(AtomicU64::new(0));
        let lags_us: Arc<Mutex<Vec<u32>>> = Arc::default();
        let stop = Arc::new(AtomicBool::new(false));
        let refused = Arc::new(AtomicU64::new(0));
        let requests = Arc::new(AtomicU64::new(0));
        let (c, w, l, s) = (count.clone(), whole.clone(), lags_us.clone(), stop.clone());
        let (rf, rq) = (refused.clone(), requests.clone());
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                if s.load(Ordering::Relaxed) {
                    return;
                }
                let (c, w, l, rf, rq) = (c.clone(), w.clone(), l.clone(), rf.clone(), rq.clone());
                tokio::spawn(async move {
                    let svc = service_fn(move |req: http::Request<hyper::body::Incoming>| {
                        let (c, w, l, rf, rq) = (c.clone(), w.clone(), l.clone(), rf.clone(), rq.clone());
                        async move {
                            if mode == Mode::BlackHole {
                                std::future::pending::<()>().await;
                            }
                            let body = req.into_body().collect().await.map(|b| b.to_bytes()).unwrap_or_default();
                            if mode == Mode::Flaky {
                                // The receiver's own processing time, not a synchronisation.
                                tokio::time::sleep(Duration::from_millis(5)).await;
                                if rq.fetch_add(1, Ordering::Relaxed) % 10 < 3 {
                                    rf.fetch_add(1, Ordering::Relaxed);
                                    let mut resp = http::Response::new(Full::new(Bytes::from_static(b"busy")));
                                    *resp.status_mut() = http::StatusCode::SERVICE_UNAVAILABLE;
                                    return Ok::<_, Infallible>(resp);
                                }
                            }
                            c.fetch_add(1, Ordering::Relaxed);
                            if body.len() == LARGE_BODY && intact(&body) {
                                w.fetch_add(1, Ordering::Relaxed);
                            }
                            if let Some(sent) = sent_at_us(&body) {
                                let now = epoch.elapsed().as_micros() as u64;
                                if let Ok(mut v) = l.lock() {
                                    v.push(now.saturating_sub(sent).min(u32::MAX as u64) as u32);
                                }
                            }
                            Ok::<_, Infallible>(http::Response::new(Full::new(Bytes::from_static(b"ok"))))
                        }
                    });
                    let _ =
                        hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(stream), svc).await;
                });
            }
        });
        Ok(Receiver { addr, count, intact: whole, lags_us, refused, stop })
    }

    pub(crate) fn url(&self) -> String {
        format!("http://{}/cb", self.addr)
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// Bodies carry `"t":<µs since epoch>` so receivers can measure lag.
pub(crate) fn sent_at_us(body: &[u8]) -> Option<u64> {
    let s = std::str::from_utf8(body.get(..40)?).ok()?;
    let rest = s.split("\"t\":").nth(1)?;
    rest.split(|c: char| !c.is_ascii_digit()).next()?.parse().ok()
}

/// A 1 KiB JSON body shaped like a ThingSpace callback (valid JSON: `t`
/// without leading zeros, which JSON numbers may not have), with one of
/// 1,000 device ids.
pub(crate) fn body(epoch: Instant) -> Bytes {
    let t = epoch.elapsed().as_micros();
    // A device id out of 1,000, for run 5b's ordering per key.
    let head = format!(
        "{{\"t\":{t},\"deviceIds\":[{{\"id\":\"dev-{}\"}}],\"username\":\"\",\"password\":\"\",\"requestId\":\"",
        t % 1000
    );
    let mut s = head;
    while s.len() < 1024 - 3 {
        s.push('x');
    }
    s.push_str("\"}");
    while s.len() < 1024 {
        s.push(' ');
    }
    Bytes::from(s)
}
