//! What a worker tells: its breaker's state (metric, admin API, log),
//! operational events (`destination.failing`, dead letters), the indexed
//! fields of a failed delivery's log line, store failures.

use super::{breaker, Worker};
use crate::events::Event;

impl Worker {
    /// `msg`'s route's indexed fields with their values (`requestId=r-1`),
    /// for the log line of a failed delivery; `None` when the route indexes
    /// nothing or the body is not JSON. Read only then: a delivered message
    /// is logged by its id alone.
    pub(super) fn indexed_fields(&self, msg: &crate::store::MessageRecord) -> Option<String> {
        let map = self.indexed.load();
        let fields = map.get(&msg.route).filter(|f| !f.is_empty())?;
        let body: serde_json::Value = serde_json::from_slice(&msg.body).ok()?;
        let parts: Vec<String> = fields
            .iter()
            .filter_map(|(name, steps)| {
                let text = match crate::fieldpath::lookup(&body, steps)? {
                    serde_json::Value::String(s) => s.clone(),
                    other => other.to_string(),
                };
                Some(format!("{name}={}", text.chars().take(128).collect::<String>()))
            })
            .collect();
        (!parts.is_empty()).then(|| parts.join(" "))
    }

    /// Publishes the breaker's state: the gauge and the admin API's view.
    pub(super) fn publish_breaker(&self, state: breaker::State) {
        let name: &str = &self.dest.name;
        for s in [breaker::State::Closed, breaker::State::Open, breaker::State::HalfOpen] {
            let v = if s == state { 1.0 } else { 0.0 };
            self.metrics.breaker_state.with_label_values(&[name, s.as_str()]).set(v);
        }
        self.breaker_state.set(state);
    }

    /// Publishes a change of the breaker's state and logs it once (a close
    /// with how many deliveries are waiting).
    pub(super) fn export_breaker(&self, state: breaker::State) {
        let name: &str = &self.dest.name;
        self.publish_breaker(state);
        match state {
            breaker::State::Open => {
                tracing::warn!(destination = name, "circuit breaker open: no attempts until the cool-down ends")
            }
            breaker::State::HalfOpen => tracing::info!(destination = name, "circuit breaker half-open: one probe"),
            breaker::State::Closed if self.dest.breaker.is_some() => {
                let waiting = self.store.stats(name).depth;
                tracing::info!(destination = name, waiting, "circuit breaker closed")
            }
            breaker::State::Closed => {}
        }
    }

    /// `destination.failing`, with the last attempt's error.
    pub(super) fn tell_failing(&self, breaker_opened: bool, failed_attempts: u64) {
        if !self.events.wants("destination.failing") {
            return;
        }
        let why = if breaker_opened { "circuit breaker opened" } else { "attempts failed in a row" };
        let last_error = self.last_error.lock().map(|e| e.clone()).unwrap_or_default();
        self.events.emit(Event::Failing {
            destination: self.dest.name.clone(),
            why: why.to_string(),
            failed_attempts,
            last_error,
        });
    }

    pub(super) fn tell_dead(&self, id: u64, reason: &str) {
        if self.events.wants("message.dead_lettered") {
            let destination = self.dest.name.clone();
            self.events.emit(Event::DeadLettered {
                destination,
                id: self.store.external_id(id),
                reason: reason.into(),
            });
        }
    }

    pub(super) fn store_failed(&self, e: &crate::store::StoreError) {
        self.metrics.store_errors.inc();
        tracing::error!(destination = %self.dest.name, error = %e, "store update after a delivery attempt failed; the delivery will be repeated");
    }

    /// The span of one attempt, a child of the stored `traceparent` (the
    /// ingress span), with the span id the destination received.
    pub(super) fn trace_attempt(
        &self,
        msg: &crate::store::MessageRecord,
        id: u64,
        attempt: u32,
        span_id: [u8; 8],
        start: std::time::SystemTime,
        outcome: &super::retry::Outcome,
    ) {
        use crate::otel::Value;
        let stored = msg.headers.iter().find(|(n, _)| n == crate::trace::HEADER);
        let Some((trace_id, parent)) = stored.and_then(|(_, v)| crate::otel::ids(v)) else { return };
        let delivered = matches!(outcome, super::retry::Outcome::Delivered { .. });
        let mut attributes: Vec<(&'static str, Value)> = vec![
            ("switchboard.destination", (*self.dest.name).into()),
            ("switchboard.attempt", i64::from(attempt).into()),
            ("switchboard.message_id", self.store.external_id(id).into()),
            ("switchboard.result", outcome.result_label().into()),
        ];
        if let Some(status) = outcome.status() {
            attributes.push(("http.response.status_code", i64::from(status).into()));
        }
        if !delivered {
            attributes.push(("error.type", outcome.result_label().into()));
        }
        self.tracer.record(crate::otel::Span {
            trace_id,
            span_id,
            parent: Some(parent),
            name: self.span_name.clone(),
            kind: crate::otel::Kind::Client,
            start,
            end: std::time::SystemTime::now(),
            attributes,
            error: (!delivered).then(|| outcome.reason().to_string()),
        });
    }
}
