//! The span of one callback at ingress (`[telemetry.otlp]`, `otel.rs`):
//! from the request to the answer, a child of the sender's `traceparent`
//! (or the root of a trace started here). The `traceparent` stored with the
//! message names this span as its parent, so every delivery attempt is a
//! child of it.

use std::time::SystemTime;

use crate::otel::{Kind, Span, Tracer, Value};

pub(super) struct IngressSpan {
    trace_id: [u8; 16],
    span_id: [u8; 8],
    parent: Option<[u8; 8]>,
    flags: String,
    start: SystemTime,
    pub(super) size: Option<u64>,
    pub(super) message_id: Option<String>,
    /// What became of it when the status alone does not say (a
    /// duplicate, filtered, a sender's handshake).
    pub(super) outcome: Option<&'static str>,
}

impl IngressSpan {
    /// Started now, in the sender's trace (its `traceparent` header) or a
    /// new one.
    pub(super) fn start(headers: &http::HeaderMap) -> IngressSpan {
        let sender = headers.get(crate::trace::HEADER).map(|v| v.as_bytes());
        let from_sender = sender.and_then(|v| Some((crate::otel::ids(v)?, crate::trace::parse(v)?.1.to_string())));
        let ((trace_id, parent), flags) = match from_sender {
            Some(((trace, parent), flags)) => ((trace, Some(parent)), flags),
            None => {
                let fresh = crate::trace::new_traceparent();
                let (trace, _) = crate::otel::ids(fresh.as_bytes()).unwrap_or(([1; 16], [1; 8]));
                ((trace, None), "01".to_string())
            }
        };
        IngressSpan {
            trace_id,
            span_id: crate::otel::new_span_id(),
            parent,
            flags,
            start: SystemTime::now(),
            size: None,
            message_id: None,
            outcome: None,
        }
    }

    /// The `traceparent` to store: this trace, this span as the parent.
    pub(super) fn traceparent(&self) -> String {
        format!("00-{}-{}-{}", hex(&self.trace_id), hex(&self.span_id), self.flags)
    }

    pub(super) fn finish(self, tracer: &Tracer, route: &str, status: http::StatusCode) {
        let outcome = self.outcome.unwrap_or(if status.is_success() { "durable" } else { "refused" });
        let mut attributes: Vec<(&'static str, Value)> = vec![
            ("http.request.method", "POST".into()),
            ("url.path", route.into()),
            ("http.route", route.into()),
            ("http.response.status_code", i64::from(status.as_u16()).into()),
            ("switchboard.outcome", outcome.into()),
        ];
        if let Some(n) = self.size {
            attributes.push(("http.request.body.size", (n as i64).into()));
        }
        if let Some(id) = self.message_id {
            attributes.push(("switchboard.message_id", id.into()));
        }
        let error = (status.is_server_error() || status.is_client_error()).then(|| format!("answered {status}"));
        tracer.record(Span {
            trace_id: self.trace_id,
            span_id: self.span_id,
            parent: self.parent,
            name: format!("POST {route}").into(),
            kind: Kind::Server,
            start: self.start,
            end: SystemTime::now(),
            attributes,
            error,
        });
    }
}

pub(crate) fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}
