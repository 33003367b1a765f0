//! `[notifications]` and `[telemetry.otlp]`: what the relay tells about
//! itself, and where.

use super::*;

pub(super) fn validate_notifications(p: &mut Problems, raw: &RawConfig) -> Option<crate::events::Settings> {
    let n = raw.notifications.as_ref()?;
    if !raw.destinations.contains_key(&n.destination) {
        p.add("notifications.destination", format!("no destination named {:?} in [destinations]", n.destination));
    }
    let events = match &n.events {
        None => crate::events::TYPES.iter().map(|t| t.to_string()).collect(),
        Some(list) => {
            for e in list.iter().filter(|e| !crate::events::TYPES.contains(&e.as_str())) {
                p.add(
                    "notifications.events",
                    format!("unknown event type {e:?}; known: {}", crate::events::TYPES.join(", ")),
                );
            }
            list.clone()
        }
    };
    if n.failing_after == 0 {
        p.add("notifications.failing_after", "must be greater than 0");
    }
    if n.dead_letter_window.is_zero() {
        p.add("notifications.dead_letter_window", "must be greater than 0");
    }
    Some(crate::events::Settings {
        destination: n.destination.as_str().into(),
        events,
        failing_after: n.failing_after,
        dead_letter_window: n.dead_letter_window,
    })
}

/// `[telemetry.otlp]`: the collector's URL (`/v1/traces` appended unless
/// the path already ends so, as OTLP/HTTP's `OTEL_EXPORTER_OTLP_ENDPOINT`),
/// its headers (secrets by `env:`/`file:`), sampling and queue bounds.
pub(super) fn validate_otlp(p: &mut Problems, raw: &RawConfig) -> Option<crate::otel::OtlpSettings> {
    let o = raw.telemetry.otlp.as_ref()?;
    let key = "telemetry.otlp";
    if o.protocol != "http/protobuf" {
        p.add(
            format!("{key}.protocol"),
            format!("{:?} is not supported: only \"http/protobuf\" (OTLP/HTTP, a collector's port 4318)", o.protocol),
        );
    }
    let url = match o.endpoint.parse::<http::Uri>() {
        Ok(u) if matches!(u.scheme_str(), Some("http" | "https")) && u.host().is_some() => {
            let path = u.path().trim_end_matches('/');
            let path = if path.ends_with("/v1/traces") { path.to_string() } else { format!("{path}/v1/traces") };
            let authority = u.authority().map(|a| a.as_str()).unwrap_or_default();
            format!("{}://{authority}{path}", u.scheme_str().unwrap_or("http")).parse::<http::Uri>().ok()
        }
        _ => None,
    };
    if url.is_none() {
        p.add(format!("{key}.endpoint"), "must be an http:// or https:// URL (e.g. \"http://collector:4318\")");
    }
    if !(0.0..=1.0).contains(&o.sample_ratio) {
        p.add(format!("{key}.sample_ratio"), "must be between 0.0 and 1.0");
    }
    for (k, v) in [("queue", o.queue), ("batch", o.batch)] {
        if v == 0 {
            p.add(format!("{key}.{k}"), "must be greater than 0");
        }
    }
    for (k, d) in [("interval", o.interval), ("timeout", o.timeout)] {
        if d.is_zero() {
            p.add(format!("{key}.{k}"), "must be greater than 0");
        }
    }
    let mut headers = Vec::new();
    for (name, raw) in &o.headers {
        let k = format!("{key}.headers.{name}");
        let Some(n) = header_name(p, &k, name) else { continue };
        let Some(value) = resolve(p, &k, raw) else { continue };
        match http::HeaderValue::from_str(value.expose()) {
            Ok(mut v) => {
                v.set_sensitive(true);
                headers.push((n, v));
            }
            Err(_) => p.add(&k, "is not a valid header value"),
        }
    }
    Some(crate::otel::OtlpSettings {
        url: url?,
        headers,
        sample_ratio: o.sample_ratio,
        service_name: o.service_name.clone(),
        queue: o.queue,
        batch: o.batch,
        interval: o.interval,
        timeout: o.timeout,
    })
}
