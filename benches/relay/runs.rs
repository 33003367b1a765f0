//! The runs that need more than a few lines: fan-out, fixed-rate fan-out,
//! backlog and recovery, large bodies.

use super::*;
use baseline::Better::{Higher, Lower};

pub(crate) struct FanOut {
    pub(crate) ingest_rate: f64,
    pub(crate) healthy_rate: f64,
    /// Deliveries per second to all three during the run.
    pub(crate) all_rate: f64,
    /// Lag p99 (ms) of the two destinations that are healthy in every run.
    pub(crate) healthy_lag_p99: f64,
}

/// The third destination of a fan-out run.
#[derive(Clone, Copy, PartialEq)]
pub(crate) enum Third {
    /// Healthy like the other two (run 4).
    Healthy,
    /// Never answers (run 5).
    BlackHole,
    /// Answers in 5 ms, 503 to 30 % of requests; every destination with
    /// the breaker and ordering per key on (run 5b).
    Flaky,
    /// Healthy, and the relay keeps delivered messages for an hour
    /// (`store.retain_delivered`, run 4r).
    Retaining,
    /// Healthy, with a trivial transform on every destination (run 4t).
    Transforming,
    /// Healthy, every span exported over OTLP/HTTP at sample ratio 1.0 to
    /// a collector that answers 200 (run 4o).
    Traced,
}

/// Run 4t's transform: adds a header, leaves the body.
const TRIVIAL_TRANSFORM: &str =
    "[destinations.NAME.transform]\nsource = \"function transform(req) { return { headers: { 'x-shaped': '1' } }; }\"";

/// What run 5b turns on for every destination.
const FLOW_CONTROL: &str =
    "ordering = \"per_key\"\norder_key = \"deviceIds.0.id\"\nbreaker = { failures = 5, cool_down = \"5s\" }";

pub(crate) async fn fan_out(s: &Settings, dir: &Path, third: Third, epoch: Instant) -> AnyResult<(FanOut, f64)> {
    let a = Receiver::start(Mode::Ok, epoch).await?;
    let b = Receiver::start(Mode::Ok, epoch).await?;
    let c_mode = match third {
        Third::Healthy | Third::Retaining | Third::Transforming | Third::Traced => Mode::Ok,
        Third::BlackHole => Mode::BlackHole,
        Third::Flaky => Mode::Flaky,
    };
    let c = Receiver::start(c_mode, epoch).await?;
    let extra = match third {
        Third::Flaky => format!("concurrency = 32\n{FLOW_CONTROL}"),
        _ => "concurrency = 32".to_string(),
    };
    let c_extra =
        if third == Third::BlackHole { "concurrency = 32\ntimeout = \"5s\"".to_string() } else { extra.clone() };
    let collector = Receiver::start(Mode::Ok, epoch).await?;
    let store_extra = match third {
        Third::Retaining => "retain_delivered = \"1h\"".to_string(),
        Third::Traced => format!("[telemetry.otlp]\nendpoint = \"{}\"\nsample_ratio = 1.0", collector.url()),
        _ => String::new(),
    };
    let shaped = |name: &str, extra: &str| {
        if third == Third::Transforming {
            format!("{extra}\n{}", TRIVIAL_TRANSFORM.replace("NAME", name))
        } else {
            extra.to_string()
        }
    };
    let (ea, eb, ec) = (shaped("a", &extra), shaped("b", &extra), shaped("c", &c_extra));
    let relay = Relay::start_with_store(
        s,
        dir,
        &[("a", a.url(), ea.as_str()), ("b", b.url(), eb.as_str()), ("c", c.url(), ec.as_str())],
        &store_extra,
    )
    .await?;
    let cpu0 = relay.cpu_secs();
    let load = closed_loop(relay.ingress, "/in", s.connections, s.run, u64::MAX, epoch).await;
    let cpu = relay.cpu_secs() - cpu0;
    let delivered_during = a.count.load(Ordering::Relaxed) + b.count.load(Ordering::Relaxed);
    let depth_a = relay.metric("switchboard_queue_depth{destination=\"a\"}").await;
    // Let the healthy destinations catch up (bounded), to see the backlog drain.
    let catch_up = wait_until(Duration::from_secs(60), || {
        a.count.load(Ordering::Relaxed) >= load.ok && b.count.load(Ordering::Relaxed) >= load.ok
    })
    .await;
    let secs = load.elapsed.as_secs_f64();
    let mut lags: Vec<u32> = a.lags_us.lock().map(|v| v.clone()).unwrap_or_default();
    lags.extend(b.lags_us.lock().map(|v| v.clone()).unwrap_or_default());
    let healthy_lag_p99 = percentile(&mut lags.clone(), 0.99);
    if matches!(third, Third::Healthy | Third::Retaining | Third::Transforming | Third::Traced) {
        lags.extend(c.lags_us.lock().map(|v| v.clone()).unwrap_or_default());
    }
    let all_delivered = delivered_during + if third == Third::BlackHole { 0 } else { c.count.load(Ordering::Relaxed) };
    let result = FanOut {
        ingest_rate: load.rps(),
        healthy_rate: delivered_during as f64 / secs,
        all_rate: all_delivered as f64 / secs,
        healthy_lag_p99,
    };
    let caught_up =
        catch_up.map(|d| format!("{:.1} s after", d.as_secs_f64())).unwrap_or_else(|| "not within 60 s".into());
    let retained = relay.metric("switchboard_store_retained_messages").await;
    // Relay CPU during the run per request handled (an ingest or a delivery).
    let cpu_us = cpu * 1e6 / (load.ok + all_delivered).max(1) as f64;
    match third {
        Third::Retaining => {
            s.figure("4r deliveries/s", result.all_rate, Higher);
            s.figure("4r ingest msg/s", result.ingest_rate, Higher);
            row(
                "4r. fan-out x3, retain_delivered 1h",
                &format!(
                    "ingest {:.0} msg/s, deliveries {:.0}/s during the run, caught up {}, lag p99 {:.1} ms, retained at end {:.0}, relay CPU {cpu_us:.1} us per request",
                    load.rps(),
                    all_delivered as f64 / secs,
                    caught_up,
                    percentile(&mut lags, 0.99),
                    retained,
                ),
            )
        }
        Third::Traced => {
            s.figure("4o deliveries/s", result.all_rate, Higher);
            s.figure("4o relay CPU us/request", cpu_us, Lower);
            let dropped = relay.metric("switchboard_otlp_dropped_spans_total").await;
            row(
                "4o. fan-out x3, every span exported (OTLP, ratio 1.0)",
                &format!(
                    "ingest {:.0} msg/s, deliveries {:.0}/s during the run, caught up {}, lag p99 {:.1} ms, relay CPU {cpu_us:.1} us per request, {} exports taken by the collector, {dropped:.0} spans dropped",
                    load.rps(),
                    all_delivered as f64 / secs,
                    caught_up,
                    percentile(&mut lags, 0.99),
                    collector.count.load(Ordering::Relaxed),
                ),
            )
        }
        Third::Transforming => {
            s.figure("4t deliveries/s", result.all_rate, Higher);
            s.figure("4t relay CPU us/request", cpu_us, Lower);
            row(
                "4t. fan-out x3, a trivial transform on each",
                &format!(
                    "ingest {:.0} msg/s, deliveries {:.0}/s during the run, caught up {}, lag p99 {:.1} ms, relay CPU {cpu_us:.1} us per request",
                    load.rps(),
                    all_delivered as f64 / secs,
                    caught_up,
                    percentile(&mut lags, 0.99),
                ),
            )
        }
        Third::Healthy => {
            s.figure("4 deliveries/s", result.all_rate, Higher);
            s.figure("4 ingest msg/s", result.ingest_rate, Higher);
            s.figure("4 relay CPU us/request", cpu_us, Lower);
            row(
                "4. fan-out x3",
                &format!(
                    "ingest {:.0} msg/s, deliveries {:.0}/s during the run, queue depth (a) at end {:.0}, caught up {}, lag p50 {:.1} ms, p99 {:.1} ms (a+b only: p99 {:.1} ms), relay CPU {cpu_us:.1} us per request (ingest or delivery)",
                    load.rps(),
                    all_delivered as f64 / secs,
                    depth_a,
                    caught_up,
                    percentile(&mut lags.clone(), 0.5),
                    percentile(&mut lags, 0.99),
                    healthy_lag_p99,
                ),
            )
        }
        Third::Flaky => {
            s.figure("5b healthy deliveries/s", result.healthy_rate, Higher);
            s.figure("5b lag p99 ms (a+b)", healthy_lag_p99, Lower);
            let flaky_ok = c.count.load(Ordering::Relaxed);
            let refused = c.refused.load(Ordering::Relaxed);
            let opened = relay.metric("switchboard_breaker_state{destination=\"c\",state=\"open\"}").await;
            row(
                "5b. flaky third (30 % 503, 5 ms)",
                &format!(
                    "ingest {:.0} msg/s; healthy deliveries {:.0}/s, lag p99 {:.1} ms, caught up {}; flaky: {} delivered, {} refused during the run, breaker open at end {:.0}",
                    load.rps(),
                    result.healthy_rate,
                    healthy_lag_p99,
                    caught_up,
                    flaky_ok,
                    refused,
                    opened
                ),
            )
        }
        Third::BlackHole => s.figure("5 healthy deliveries/s", result.healthy_rate, Higher),
    }
    let peak = relay.peak_mb();
    relay.stop();
    Ok((result, peak))
}

/// Fan-out ×3 with ingest held at `rate` msg/s (open loop): do deliveries
/// keep up, and with what lag? With [`Third::Flaky`] (run 5c), the third
/// destination is flaky and every destination has the breaker and ordering
/// per key on; the figures that count are those of `a` and `b`.
pub(crate) async fn fan_out_fixed(
    s: &Settings,
    dir: &Path,
    rate: u64,
    third: Third,
    epoch: Instant,
) -> AnyResult<FanOut> {
    let c_mode = if third == Third::Flaky { Mode::Flaky } else { Mode::Ok };
    let rs = [
        Receiver::start(Mode::Ok, epoch).await?,
        Receiver::start(Mode::Ok, epoch).await?,
        Receiver::start(c_mode, epoch).await?,
    ];
    let extra = match third {
        Third::Flaky => format!("concurrency = 32\n{FLOW_CONTROL}"),
        _ => "concurrency = 32".to_string(),
    };
    let extra = extra.as_str();
    let relay =
        Relay::start(s, dir, &[("a", rs[0].url(), extra), ("b", rs[1].url(), extra), ("c", rs[2].url(), extra)])
            .await?;
    let cpu0 = relay.cpu_secs();
    let load = open_loop(relay.ingress, "/in", rate, s.run, epoch).await;
    let secs = load.elapsed.as_secs_f64();
    let cpu = (relay.cpu_secs() - cpu0) / secs;
    let delivered: u64 = rs.iter().map(|r| r.count.load(Ordering::Relaxed)).sum();
    let healthy_delivered = rs[0].count.load(Ordering::Relaxed) + rs[1].count.load(Ordering::Relaxed);
    let depth = relay.metric("switchboard_queue_depth{destination=\"a\"}").await;
    let caught =
        wait_until(Duration::from_secs(60), || rs[..2].iter().all(|r| r.count.load(Ordering::Relaxed) >= load.ok))
            .await;
    let mut lags: Vec<u32> = Vec::new();
    for r in &rs[..2] {
        lags.extend(r.lags_us.lock().map(|v| v.clone()).unwrap_or_default());
    }
    let healthy_lag_p99 = percentile(&mut lags.clone(), 0.99);
    if third != Third::Flaky {
        lags.extend(rs[2].lags_us.lock().map(|v| v.clone()).unwrap_or_default());
    }
    let tag = match third {
        Third::Flaky => "5c flaky".to_string(),
        _ if rate == 6000 => "4b".to_string(),
        _ => "5c healthy".to_string(),
    };
    s.figure(&format!("{tag} deliveries/s"), delivered as f64 / secs, Higher);
    s.figure(&format!("{tag} lag p99 ms (a+b)"), healthy_lag_p99, Lower);
    s.figure(&format!("{tag} relay CPU % of a core"), cpu * 100.0, Lower);
    let name = match third {
        Third::Flaky => format!("5c. {rate} msg/s, flaky third, flow ctl"),
        _ if rate == 6000 => format!("4b. fan-out x3 at {rate} msg/s (open)"),
        _ => format!("5c. {rate} msg/s, three healthy"),
    };
    row(
        &name,
        &format!(
            "ingest {:.0} msg/s ({} failed), deliveries {:.0}/s (a+b {:.0}/s), queue depth (a) at end {:.0}, caught up {}, lag p50 {:.1} ms, p99 {:.1} ms (a+b p99 {:.1} ms), ack p99 {:.2} ms, relay CPU {:.0} % of one core",
            load.ok as f64 / secs,
            load.errors,
            delivered as f64 / secs,
            healthy_delivered as f64 / secs,
            depth,
            caught.map(|d| format!("{:.2} s after", d.as_secs_f64())).unwrap_or_else(|| "not within 60 s".into()),
            percentile(&mut lags.clone(), 0.5),
            percentile(&mut lags, 0.99),
            healthy_lag_p99,
            load.pct(0.99),
            cpu * 100.0
        ),
    );
    relay.stop();
    Ok(FanOut {
        ingest_rate: load.ok as f64 / secs,
        healthy_rate: healthy_delivered as f64 / secs,
        all_rate: delivered as f64 / secs,
        healthy_lag_p99,
    })
}

pub(crate) async fn backlog(s: &Settings, dir: &Path, epoch: Instant) -> AnyResult<()> {
    // Fill: the destination is paused, so everything stays pending.
    let relay = Relay::start(s, dir, &[("down", "http://127.0.0.1:1/".into(), "paused = true")]).await?;
    let fill = closed_loop(relay.ingress, "/in", s.connections, Duration::from_secs(600), s.backlog, epoch).await;
    relay.stop();
    // Restart with the destination up.
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let url = format!("http://{}/cb", listener.local_addr()?);
    let receiver = Receiver::on(listener, Mode::Ok, epoch)?;
    let started = Instant::now();
    let relay = Relay::start(s, dir, &[("down", url, "concurrency = 32")]).await?;
    let up = started.elapsed();
    let first = wait_until(Duration::from_secs(120), || receiver.count.load(Ordering::Relaxed) > 0).await;
    let rss_backlog = relay.rss_mb();
    let drain_start = Instant::now();
    let drained = wait_until(Duration::from_secs(600), || receiver.count.load(Ordering::Relaxed) >= fill.ok).await;
    let drain_rate = receiver.count.load(Ordering::Relaxed) as f64 / drain_start.elapsed().as_secs_f64();
    s.figure("7 drain msg/s", drain_rate, Higher);
    s.figure("7 first delivery s after start", first.map_or(f64::NAN, |d| (d + up).as_secs_f64()), Lower);
    s.figure("7 RSS with backlog MB", rss_backlog, Lower);
    row(
        "7. backlog and recovery",
        &format!(
            "{} pending; restart: listening after {:.2} s, first delivery {} after start; RSS with backlog {:.1} MB (peak {:.1}); drain {:.0} msg/s{}",
            fill.ok,
            up.as_secs_f64(),
            first.map(|d| format!("{:.2} s", (d + up).as_secs_f64())).unwrap_or_else(|| "never".into()),
            rss_backlog,
            relay.peak_mb(),
            drain_rate,
            if drained.is_some() { "" } else { " (not drained within 600 s)" }
        ),
    );
    relay.stop();
    Ok(())
}

/// Run 8: `n` concurrent POSTs of 1 MiB each (600 in full mode), every one
/// on its own connection, against the defaults (`max_body` 1 MiB,
/// `max_buffered_bytes` 64 MiB). Reports the relay's peak RSS and checks
/// that every acknowledged body reached the destination whole.
pub(crate) async fn large_bodies(s: &Settings, dir: &Path, epoch: Instant) -> AnyResult<()> {
    let n = if s.quick { 50 } else { 600 };
    let receiver = Receiver::start(Mode::Ok, epoch).await?;
    let relay = Relay::start(s, dir, &[("a", receiver.url(), "")]).await?;
    let idle = relay.peak_mb();
    let started = Instant::now();
    let mut posts = tokio::task::JoinSet::new();
    for i in 0..n {
        let addr = relay.ingress;
        posts.spawn(async move {
            let mut c = connect(addr).await?;
            send(&mut c, addr, "/in", large_body(i)).await
        });
    }
    let (mut acked, mut refused) = (0u64, 0u64);
    while let Some(done) = posts.join_next().await {
        match done {
            Ok(Ok(true)) => acked += 1,
            _ => refused += 1,
        }
    }
    let took = started.elapsed();
    let delivered = wait_until(Duration::from_secs(120), || receiver.intact.load(Ordering::Relaxed) >= acked).await;
    s.figure("8 peak RSS MB", relay.peak_mb(), Lower);
    s.figure("8 acknowledged", acked as f64, Higher);
    s.figure("8 delivered intact", receiver.intact.load(Ordering::Relaxed) as f64, Higher);
    row(
        &format!("8. {n} concurrent 1 MiB POSTs"),
        &format!(
            "{acked} acknowledged, {refused} refused, in {:.1} s; relay peak RSS {:.1} MB (idle {idle:.1}); {} of the acknowledged delivered intact{}",
            took.as_secs_f64(),
            relay.peak_mb(),
            receiver.intact.load(Ordering::Relaxed),
            if delivered.is_some() { "" } else { " (not all within 120 s)" }
        ),
    );
    relay.stop();
    Ok(())
}

/// Run 2f: what filters cost on durable ingest. Two relays, each with three
/// paused destinations, one without filters and one where each destination
/// filters on a body field (`username`, which every bench body has, so all
/// three are queued: the body is parsed and three conditions evaluated per
/// request); closed-loop slices alternate between them.
pub(crate) async fn filtered_ingest(
    s: &Settings,
    plain_dir: &Path,
    filtered_dir: &Path,
    epoch: Instant,
) -> AnyResult<()> {
    let paused = |f: &str| format!("paused = true\n{f}");
    let none = paused("");
    let by_body = paused("filter = { path = \"username\", equals = \"\" }");
    fn three(extra: &str) -> Vec<(&'static str, String, &str)> {
        ["a", "b", "c"].iter().map(|n| (*n, "http://127.0.0.1:1/".to_string(), extra)).collect()
    }
    let plain = Relay::start(s, plain_dir, &three(&none)).await?;
    let filtered = Relay::start(s, filtered_dir, &three(&by_body)).await?;
    let [(p, p_us), (f, f_us)] = alternate(s, [&plain, &filtered], epoch).await;
    s.figure("2f no filters req/s", p.rps(), Higher);
    s.figure("2f 3 body filters req/s", f.rps(), Higher);
    row(
        "2f. durable ingest, 3 destinations, with and without body filters",
        &format!(
            "no filters {:.0} req/s ({:.1} us CPU per request); 3 body filters {:.0} req/s ({:.1} us): {:+.0} % req/s",
            p.rps(),
            p_us,
            f.rps(),
            f_us,
            100.0 * (f.rps() - p.rps()) / p.rps().max(1.0)
        ),
    );
    plain.stop();
    filtered.stop();
    Ok(())
}

/// Run 2e: what encryption at rest costs on durable ingest: a relay with
/// `[store.encryption]` against one without, one paused destination each,
/// closed-loop slices alternating between them.
pub(crate) async fn encrypted_ingest(
    s: &Settings,
    plain_dir: &Path,
    sealed_dir: &Path,
    epoch: Instant,
) -> AnyResult<()> {
    let one = |extra: &'static str| vec![("paused", "http://127.0.0.1:1/".to_string(), extra)];
    let plain = Relay::start(s, plain_dir, &one("paused = true")).await?;
    // 32 bytes of 0x07, base64.
    let key = "BwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwc=";
    let sealed = Relay::start_with_store(
        s,
        sealed_dir,
        &one("paused = true"),
        &format!("[store.encryption]\nkeys = [{{ id = \"k1\", key = \"{key}\" }}]"),
    )
    .await?;
    let [(p, p_us), (e, e_us)] = alternate(s, [&plain, &sealed], epoch).await;
    s.figure("2e plain req/s", p.rps(), Higher);
    s.figure("2e sealed req/s", e.rps(), Higher);
    row(
        "2e. durable ingest with and without encryption at rest",
        &format!(
            "plain {:.0} req/s ({:.1} us CPU per request); AES-256-GCM {:.0} req/s ({:.1} us): {:+.0} % req/s",
            p.rps(),
            p_us,
            e.rps(),
            e_us,
            100.0 * (e.rps() - p.rps()) / p.rps().max(1.0)
        ),
    );
    plain.stop();
    sealed.stop();
    Ok(())
}

/// Closed-loop slices alternating between two relays (so a change in the
/// machine's speed weighs on both alike): each one's load result and relay
/// CPU microseconds per acknowledged request.
async fn alternate(s: &Settings, relays: [&Relay; 2], epoch: Instant) -> [(LoadResult, f64); 2] {
    let rounds = if s.quick { 2 } else { 5 };
    let slice = s.run / rounds;
    let mut out = [(LoadResult::default(), 0.0), (LoadResult::default(), 0.0)];
    for _ in 0..rounds {
        for (relay, (load, cpu)) in relays.iter().zip(out.iter_mut()) {
            let c0 = relay.cpu_secs();
            load.absorb(closed_loop(relay.ingress, "/in", s.connections, slice, u64::MAX, epoch).await);
            *cpu += relay.cpu_secs() - c0;
        }
    }
    out.map(|(load, cpu)| {
        let us = cpu * 1e6 / (load.ok.max(1) as f64);
        (load, us)
    })
}
