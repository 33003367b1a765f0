//! OpenTelemetry traces over OTLP/HTTP (`[telemetry.otlp]`): one span per
//! callback at ingress (receive → durable or refused) and one per delivery
//! attempt, in the trace the sender started (W3C `traceparent`, `trace.rs`)
//! and with the span ids the destinations receive.
//!
//! [`Tracer`] is the handle the stages hold (through
//! [`crate::wake::Wakers`]); [`Tracer::record`] never waits: a span goes
//! into a bounded queue or is dropped and counted
//! (`switchboard_otlp_dropped_spans_total`). One exporter task batches the
//! queue and POSTs `ExportTraceServiceRequest`s (protobuf, encoded here:
//! the few messages OTLP needs do not justify a code generator), one
//! attempt per batch with a timeout; a batch the collector does not take is
//! dropped and counted. A collector that is down costs the counter and one
//! failed connection per batch, nothing on the delivery path.
//!
//! Sampling is by trace id (the ratio of the id space, as OpenTelemetry's
//! `TraceIdRatioBased`): the callback's span and all its attempts are kept
//! or dropped together, on every relay alike.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// `[telemetry.otlp]`, validated.
#[derive(Debug, Clone)]
pub struct OtlpSettings {
    /// Where spans are POSTed (`.../v1/traces`).
    pub url: http::Uri,
    pub headers: Vec<(http::HeaderName, http::HeaderValue)>,
    pub sample_ratio: f64,
    pub service_name: String,
    /// Spans held for export at most; beyond, dropped and counted.
    pub queue: usize,
    /// Spans per export request at most.
    pub batch: usize,
    /// How often a partial batch is sent.
    pub interval: Duration,
    /// One export request's deadline.
    pub timeout: Duration,
}

/// An attribute's value.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    Str(String),
    Int(i64),
}

impl From<&str> for Value {
    fn from(s: &str) -> Value {
        Value::Str(s.to_string())
    }
}

impl From<String> for Value {
    fn from(s: String) -> Value {
        Value::Str(s)
    }
}

impl From<i64> for Value {
    fn from(n: i64) -> Value {
        Value::Int(n)
    }
}

/// OTLP's `SpanKind`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Kind {
    Server = 2,
    Client = 3,
}

/// One finished span.
#[derive(Debug, Clone)]
pub struct Span {
    pub trace_id: [u8; 16],
    pub span_id: [u8; 8],
    pub parent: Option<[u8; 8]>,
    pub name: Arc<str>,
    pub kind: Kind,
    pub start: SystemTime,
    pub end: SystemTime,
    pub attributes: Vec<(&'static str, Value)>,
    /// `Some(message)`: the span failed (status ERROR).
    pub error: Option<String>,
}

struct On {
    tx: mpsc::Sender<Span>,
    /// Sampled: trace ids whose top 8 bytes are below this.
    threshold: u64,
    dropped: prometheus::IntCounter,
}

/// The stages' handle; off (every call a no-op) unless configured.
#[derive(Clone, Default)]
pub struct Tracer(Option<Arc<On>>);

impl Tracer {
    /// A tracer and its exporter task (to spawn); `dropped` counts spans
    /// dropped (queue full, export failed).
    pub fn new(
        settings: OtlpSettings,
        dropped: prometheus::IntCounter,
        shutdown: CancellationToken,
    ) -> anyhow::Result<(Tracer, impl std::future::Future<Output = ()>)> {
        let (tx, rx) = mpsc::channel(settings.queue.max(1));
        let threshold =
            if settings.sample_ratio >= 1.0 { u64::MAX } else { (settings.sample_ratio * 2f64.powi(64)) as u64 };
        let exporter = Exporter::new(settings, dropped.clone())?;
        let tracer = Tracer(Some(Arc::new(On { tx, threshold, dropped })));
        Ok((tracer, exporter.run(rx, shutdown)))
    }

    pub fn enabled(&self) -> bool {
        self.0.is_some()
    }

    /// Whether spans of this trace are recorded.
    pub fn sampled(&self, trace_id: &[u8; 16]) -> bool {
        let Some(on) = &self.0 else { return false };
        let mut top = [0u8; 8];
        top.copy_from_slice(&trace_id[..8]);
        on.threshold == u64::MAX || u64::from_be_bytes(top) < on.threshold
    }

    /// Queues `span` for export if its trace is sampled; never waits.
    pub fn record(&self, span: Span) {
        let Some(on) = &self.0 else { return };
        if !self.sampled(&span.trace_id) {
            return;
        }
        if on.tx.try_send(span).is_err() {
            on.dropped.inc();
        }
    }
}

/// The ids in a `traceparent` value: trace id, parent (span) id, sampled
/// flag.
pub fn ids(traceparent: &[u8]) -> Option<([u8; 16], [u8; 8])> {
    let (trace, _) = crate::trace::parse(traceparent)?;
    let s = std::str::from_utf8(traceparent).ok()?.trim();
    let parent = s.split('-').nth(2)?;
    Some((u128::from_str_radix(trace, 16).ok()?.to_be_bytes(), u64::from_str_radix(parent, 16).ok()?.to_be_bytes()))
}

/// A new span id (never zero).
pub fn new_span_id() -> [u8; 8] {
    use rand::Rng;
    rand::thread_rng().gen_range(1..=u64::MAX).to_be_bytes()
}

struct Exporter {
    settings: OtlpSettings,
    client: hyper_util::client::legacy::Client<
        hyper_rustls::HttpsConnector<hyper_util::client::legacy::connect::HttpConnector>,
        http_body_util::Full<Bytes>,
    >,
    dropped: prometheus::IntCounter,
    failures_logged: crate::throttle::LogThrottle,
}

impl Exporter {
    fn new(settings: OtlpSettings, dropped: prometheus::IntCounter) -> anyhow::Result<Exporter> {
        let tls = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()?
            .with_root_certificates(rustls::RootCertStore { roots: webpki_roots::TLS_SERVER_ROOTS.to_vec() })
            .with_no_client_auth();
        let https =
            hyper_rustls::HttpsConnectorBuilder::new().with_tls_config(tls).https_or_http().enable_http1().build();
        let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new()).build(https);
        Ok(Exporter { settings, client, dropped, failures_logged: Default::default() })
    }

    async fn run(self, mut rx: mpsc::Receiver<Span>, shutdown: CancellationToken) {
        let mut batch = Vec::with_capacity(self.settings.batch);
        let mut tick = tokio::time::interval(self.settings.interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => break,
                span = rx.recv() => match span {
                    Some(span) => {
                        batch.push(span);
                        if batch.len() >= self.settings.batch {
                            self.export(std::mem::take(&mut batch)).await;
                        }
                    }
                    None => break,
                },
                _ = tick.tick() => {
                    if !batch.is_empty() {
                        self.export(std::mem::take(&mut batch)).await;
                    }
                }
            }
        }
        // What is queued at shutdown goes in one last export.
        while let Ok(span) = rx.try_recv() {
            batch.push(span);
        }
        if !batch.is_empty() {
            self.export(batch).await;
        }
    }

    async fn export(&self, spans: Vec<Span>) {
        let n = spans.len() as u64;
        let body = encode(&self.settings.service_name, &spans);
        let mut req = http::Request::post(self.settings.url.clone())
            .header(http::header::CONTENT_TYPE, "application/x-protobuf")
            .body(http_body_util::Full::new(Bytes::from(body)));
        if let Ok(r) = req.as_mut() {
            for (name, value) in &self.settings.headers {
                r.headers_mut().insert(name.clone(), value.clone());
            }
        }
        let why = match req {
            Err(e) => e.to_string(),
            Ok(req) => match tokio::time::timeout(self.settings.timeout, self.client.request(req)).await {
                Ok(Ok(resp)) if resp.status().is_success() => return,
                Ok(Ok(resp)) => format!("the collector answered {}", resp.status()),
                Ok(Err(e)) => crate::text::error_chain(&e),
                Err(_) => format!("no answer within {}", crate::text::duration(self.settings.timeout)),
            },
        };
        self.dropped.inc_by(n);
        if let Some(also) = self.failures_logged.admit() {
            tracing::warn!(error = %why, spans = n, also_failed_since_last_line = also, "OTLP export failed; these spans are dropped");
        }
    }
}

// ---------------------------------------------------------------------------
// Protobuf, the OTLP trace messages only (opentelemetry-proto's
// trace/v1/trace.proto, common/v1/common.proto, resource/v1/resource.proto).
// ---------------------------------------------------------------------------

fn varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn tag(out: &mut Vec<u8>, field: u32, wire: u8) {
    varint(out, (u64::from(field) << 3) | u64::from(wire));
}

fn bytes_field(out: &mut Vec<u8>, field: u32, b: &[u8]) {
    tag(out, field, 2);
    varint(out, b.len() as u64);
    out.extend_from_slice(b);
}

/// A nested message, encoded in place: one byte is kept for its length
/// and, if it turns out longer than 127 bytes, the rest of the varint is
/// inserted (a move of the message's bytes instead of a buffer per
/// message: most of ours, the attributes, are short).
fn message(out: &mut Vec<u8>, field: u32, build: impl FnOnce(&mut Vec<u8>)) {
    tag(out, field, 2);
    let at = out.len();
    out.push(0);
    build(out);
    let len = out.len() - at - 1;
    if len < 0x80 {
        out[at] = len as u8;
        return;
    }
    let mut prefix = Vec::with_capacity(10);
    varint(&mut prefix, len as u64);
    out[at] = prefix[0];
    out.splice(at + 1..at + 1, prefix[1..].iter().copied());
}

fn fixed64(out: &mut Vec<u8>, field: u32, v: u64) {
    tag(out, field, 1);
    out.extend_from_slice(&v.to_le_bytes());
}

/// `KeyValue { key = 1; AnyValue value = 2 }`, `AnyValue { string_value = 1; int_value = 3 }`.
fn key_value(out: &mut Vec<u8>, field: u32, key: &str, value: &Value) {
    message(out, field, |kv| {
        bytes_field(kv, 1, key.as_bytes());
        message(kv, 2, |any| match value {
            Value::Str(s) => bytes_field(any, 1, s.as_bytes()),
            Value::Int(n) => {
                tag(any, 3, 0);
                varint(any, *n as u64);
            }
        });
    });
}

fn unix_nanos(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64)
}

/// `ExportTraceServiceRequest { repeated ResourceSpans resource_spans = 1 }`.
pub fn encode(service_name: &str, spans: &[Span]) -> Vec<u8> {
    let mut out = Vec::with_capacity(64 + spans.len() * 160);
    message(&mut out, 1, |rs| {
        // ResourceSpans { Resource resource = 1; repeated ScopeSpans scope_spans = 2 }
        message(rs, 1, |res| key_value(res, 1, "service.name", &Value::Str(service_name.to_string())));
        message(rs, 2, |ss| {
            // ScopeSpans { InstrumentationScope scope = 1; repeated Span spans = 2 }
            message(ss, 1, |scope| {
                bytes_field(scope, 1, b"switchboard");
                bytes_field(scope, 2, env!("CARGO_PKG_VERSION").as_bytes());
            });
            for s in spans {
                message(ss, 2, |out| encode_span(out, s));
            }
        });
    });
    out
}

fn encode_span(out: &mut Vec<u8>, s: &Span) {
    bytes_field(out, 1, &s.trace_id);
    bytes_field(out, 2, &s.span_id);
    if let Some(parent) = &s.parent {
        bytes_field(out, 4, parent);
    }
    bytes_field(out, 5, s.name.as_bytes());
    tag(out, 6, 0);
    varint(out, s.kind as u64);
    fixed64(out, 7, unix_nanos(s.start));
    fixed64(out, 8, unix_nanos(s.end));
    for (k, v) in &s.attributes {
        key_value(out, 9, k, v);
    }
    // Status { string message = 2; StatusCode code = 3 } (UNSET 0, OK 1, ERROR 2)
    message(out, 15, |st| {
        if let Some(m) = &s.error {
            bytes_field(st, 2, m.as_bytes());
        }
        tag(st, 3, 0);
        varint(st, if s.error.is_some() { 2 } else { 0 });
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn varints_and_ids() {
        let mut v = Vec::new();
        varint(&mut v, 300);
        assert_eq!(v, [0xac, 0x02]);
        let tp = b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let (trace, parent) = ids(tp).expect("ids");
        assert_eq!(trace[0], 0x4b);
        assert_eq!(parent, [0x00, 0xf0, 0x67, 0xaa, 0x0b, 0xa9, 0x02, 0xb7]);
        assert_eq!(ids(b"nonsense"), None);
    }

    #[test]
    fn nested_lengths_past_one_byte_are_varints() {
        for n in [0usize, 127, 128, 300, 20_000] {
            let mut out = Vec::new();
            message(&mut out, 1, |m| m.extend(std::iter::repeat_n(7u8, n)));
            let mut expected = vec![0x0a];
            varint(&mut expected, n as u64);
            expected.extend(std::iter::repeat_n(7u8, n));
            assert_eq!(out, expected, "{n}");
        }
    }

    #[test]
    fn sampling_is_by_trace_id_and_all_or_nothing_per_trace() {
        let (dropped, _) = (prometheus::IntCounter::new("d", "d").expect("counter"), ());
        let (tx, _rx) = mpsc::channel(1);
        let half = Tracer(Some(Arc::new(On { tx, threshold: u64::MAX / 2, dropped })));
        let low = [0x10u8; 16];
        let high = [0xf0u8; 16];
        assert!(half.sampled(&low) && !half.sampled(&high));
        assert!(!Tracer::default().sampled(&low));
    }
}
