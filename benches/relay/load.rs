//! The load generator: closed and open loops over hyper connections; only
//! 2xx answers count.

use super::*;

#[derive(Default)]
pub(crate) struct LoadResult {
    pub(crate) ok: u64,
    pub(crate) errors: u64,
    pub(crate) elapsed: Duration,
    pub(crate) latencies_us: Vec<u32>,
}

impl LoadResult {
    /// Adds another run's counts and latencies (kept sorted).
    pub(crate) fn absorb(&mut self, other: LoadResult) {
        self.ok += other.ok;
        self.errors += other.errors;
        self.elapsed += other.elapsed;
        self.latencies_us.extend(other.latencies_us);
        self.latencies_us.sort_unstable();
    }

    pub(crate) fn rps(&self) -> f64 {
        self.ok as f64 / self.elapsed.as_secs_f64()
    }
    /// Percentile in ms; latencies are sorted when the run ends.
    pub(crate) fn pct(&self, p: f64) -> f64 {
        sorted_percentile(&self.latencies_us, p)
    }
}

pub(crate) fn percentile(v: &mut [u32], p: f64) -> f64 {
    v.sort_unstable();
    sorted_percentile(v, p)
}

pub(crate) fn sorted_percentile(v: &[u32], p: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    let i = ((v.len() as f64 - 1.0) * p).round() as usize;
    v[i] as f64 / 1000.0
}

pub(crate) type Sender = hyper::client::conn::http1::SendRequest<Full<Bytes>>;

pub(crate) async fn connect(addr: SocketAddr) -> AnyResult<Sender> {
    let stream = TcpStream::connect(addr).await?;
    stream.set_nodelay(true)?;
    let (send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(conn);
    Ok(send)
}

pub(crate) async fn send(send: &mut Sender, addr: SocketAddr, path: &str, body: Bytes) -> AnyResult<bool> {
    send.ready().await?;
    let req = http::Request::post(path)
        .header("host", addr.to_string())
        .header("content-type", "application/json")
        .header("user-agent", "Verizon's callback service")
        .body(Full::new(body))?;
    let resp = send.send_request(req).await?;
    let ok = resp.status().is_success();
    let _ = resp.into_body().collect().await;
    Ok(ok)
}

/// Closed loop: `conns` connections, each sending back to back for `dur`
/// (or until `max` requests in all).
pub(crate) async fn closed_loop(
    addr: SocketAddr,
    path: &str,
    conns: usize,
    dur: Duration,
    max: u64,
    epoch: Instant,
) -> LoadResult {
    let started = Instant::now();
    let deadline = started + dur;
    let sent = Arc::new(AtomicU64::new(0));
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..conns {
        let (path, sent) = (path.to_string(), sent.clone());
        tasks.spawn(async move {
            let mut r = LoadResult::default();
            let mut conn = None;
            while Instant::now() < deadline && sent.fetch_add(1, Ordering::Relaxed) < max {
                if conn.is_none() {
                    conn = connect(addr).await.ok();
                }
                let Some(c) = conn.as_mut() else {
                    r.errors += 1;
                    continue;
                };
                let t = Instant::now();
                match send(c, addr, &path, body(epoch)).await {
                    Ok(true) => {
                        r.ok += 1;
                        r.latencies_us.push(t.elapsed().as_micros() as u32);
                    }
                    Ok(false) => r.errors += 1,
                    Err(_) => {
                        r.errors += 1;
                        conn = None;
                    }
                }
            }
            r
        });
    }
    let mut total = LoadResult::default();
    while let Some(Ok(r)) = tasks.join_next().await {
        total.ok += r.ok;
        total.errors += r.errors;
        total.latencies_us.extend(r.latencies_us);
    }
    total.elapsed = started.elapsed();
    total.latencies_us.sort_unstable();
    total
}

/// Open loop: one request every 1/`rate` s for `dur`, on a pool of
/// connections; latency counts from the scheduled send time, so a stall
/// shows up in the tail (no coordinated omission).
pub(crate) async fn open_loop(addr: SocketAddr, path: &str, rate: u64, dur: Duration, epoch: Instant) -> LoadResult {
    // At most this many requests in flight (and connections open): a stall
    // shows as latency (measured from the scheduled send time) and, past the
    // timeout, as failures, instead of an ever-growing number of connections.
    const MAX_IN_FLIGHT: usize = 512;
    const TIMEOUT: Duration = Duration::from_secs(10);
    let pool: Arc<tokio::sync::Mutex<Vec<Sender>>> = Arc::default();
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_IN_FLIGHT));
    let started = tokio::time::Instant::now();
    let total = (rate as f64 * dur.as_secs_f64()) as u64;
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..total {
        let at = started + Duration::from_secs_f64(i as f64 / rate as f64);
        tokio::time::sleep_until(at).await;
        let (pool, path, slots) = (pool.clone(), path.to_string(), slots.clone());
        tasks.spawn(async move {
            let attempt = async {
                let Ok(_slot) = slots.acquire().await else { return false };
                let mut conn = match pool.lock().await.pop() {
                    Some(c) => c,
                    None => match connect(addr).await {
                        Ok(c) => c,
                        Err(_) => return false,
                    },
                };
                let ok = matches!(send(&mut conn, addr, &path, body(epoch)).await, Ok(true));
                if ok {
                    pool.lock().await.push(conn);
                }
                ok
            };
            let ok = matches!(tokio::time::timeout(TIMEOUT, attempt).await, Ok(true));
            (ok, at.elapsed().as_micros() as u32)
        });
    }
    let mut r = LoadResult::default();
    while let Some(Ok((ok, lat))) = tasks.join_next().await {
        if ok {
            r.ok += 1;
            r.latencies_us.push(lat);
        } else {
            r.errors += 1;
        }
    }
    r.elapsed = started.elapsed();
    r.latencies_us.sort_unstable();
    r
}
