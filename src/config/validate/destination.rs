//! One `[destinations.NAME]` table: URL and credentials, limits, retry,
//! signing, TLS, header policy, filter and ordering.

use super::*;

pub(super) fn validate_destination(
    p: &mut Problems,
    key: &str,
    name: &str,
    d: &RawDestination,
) -> Option<(Destination, IngressRules)> {
    let before = p.0.len();
    let nats = validate_nats(p, key, d);
    let (uri, basic_auth) = match &nats {
        // The server URL (no credentials): the HTTP side never uses it.
        Some(t) => match t.server.parse::<http::Uri>() {
            Ok(u) => (Some(u), None),
            Err(e) => {
                p.add(format!("{key}.url"), format!("invalid URL: {e}"));
                (None, None)
            }
        },
        None => validate_url(p, key, &d.url),
    };
    if d.concurrency == 0 {
        p.add(format!("{key}.concurrency"), "must be greater than 0");
    }
    if d.timeout.is_zero() {
        p.add(format!("{key}.timeout"), "must be greater than 0");
    }
    if d.connect_timeout.is_zero() {
        p.add(format!("{key}.connect_timeout"), "must be greater than 0");
    }
    check_retry(p, key, d);
    let r = &d.retry;
    let extra_roots = extra_roots(p, key, d);
    let headers = validate_header_policy(p, key, d);
    let rate_limit = validate_rate_limit(p, key, d);
    let (client_cert, tls13_only) = validate_destination_tls(p, &format!("{key}.tls"), d.tls.as_ref());
    let filter = d.filter.as_ref().and_then(|f| validate_filter(p, &format!("{key}.filter"), f)).map(Arc::new);
    let ordering = validate_ordering(p, key, d).map(Arc::new);
    let signing = d.signing.as_ref().and_then(|sg| {
        let k = format!("{key}.signing.secrets");
        let secrets = resolve_all(p, &k, &sg.secrets);
        if secrets.len() != sg.secrets.len() {
            return None;
        }
        match crate::delivery::signing::Signer::new(secrets.iter().map(Secret::expose)) {
            Ok(s) => Some(Arc::new(s)),
            Err((i, why)) => {
                p.add(format!("{k}[{i}]"), why);
                None
            }
        }
    });
    let transform = d.transform.as_ref().and_then(|t| validate_transform(p, &format!("{key}.transform"), t));
    if p.0.len() != before {
        return None;
    }
    let breaker = d.breaker.as_ref().and_then(|b| {
        if b.failures == 0 {
            p.add(format!("{key}.breaker.failures"), "must be at least 1");
        }
        if b.cool_down.is_zero() {
            p.add(format!("{key}.breaker.cool_down"), "must be greater than 0");
        }
        (b.failures > 0 && !b.cool_down.is_zero())
            .then_some(crate::delivery::breaker::BreakerConfig { failures: b.failures, cool_down: b.cool_down })
    });
    let rules = IngressRules { filter, ordering };
    let dest = Destination {
        nats,
        transform,
        breaker,
        rate_limit,
        signing,
        headers,
        client_cert,
        tls13_only,
        name: Arc::from(name),
        url: uri?,
        basic_auth,
        timeout: d.timeout,
        connect_timeout: d.connect_timeout,
        concurrency: d.concurrency,
        strip_body_fields: d.strip_body_fields.clone(),
        forward_sender_credentials: d.forward_sender_credentials,
        paused: d.paused,
        extra_roots,
        retry: crate::delivery::retry::RetryPolicy {
            initial: r.initial,
            max_interval: r.max_interval,
            multiplier: r.multiplier,
            jitter: r.jitter,
            max_attempts: (r.max_attempts > 0).then_some(r.max_attempts),
            max_age: r.max_age,
            retry_after_cap: r.retry_after_cap,
            retry_on: d.retry_on.clone(),
        },
    };
    Some((dest, rules))
}

/// The destination's URL without userinfo, and the userinfo as Basic
/// credentials (a secret from here on).
fn validate_url(p: &mut Problems, key: &str, url: &str) -> (Option<http::Uri>, Option<Secret>) {
    let parsed = match url::Url::parse(url) {
        Ok(u) => Some(u),
        Err(e) => {
            p.add(format!("{key}.url"), format!("invalid URL: {e}"));
            None
        }
    };
    let mut basic_auth = None;
    let mut uri = None;
    if let Some(mut u) = parsed {
        if u.scheme() != "http" && u.scheme() != "https" {
            p.add(format!("{key}.url"), format!("unsupported URL scheme {:?} (use http or https)", u.scheme()));
        } else if u.host_str().is_none_or(str::is_empty) {
            p.add(format!("{key}.url"), "URL has no host");
        } else {
            if !u.username().is_empty() || u.password().is_some() {
                let user = percent_decode(u.username());
                let pass = percent_decode(u.password().unwrap_or_default());
                basic_auth = Some(Secret::new(format!("{user}:{pass}")));
                let _ = u.set_username("");
                let _ = u.set_password(None);
            }
            match u.as_str().parse::<http::Uri>() {
                Ok(parsed) => uri = Some(parsed),
                Err(e) => p.add(format!("{key}.url"), format!("invalid URL: {e}")),
            }
        }
    }
    (uri, basic_auth)
}

/// `retry_on` and `[destinations.NAME.retry]`.
fn check_retry(p: &mut Problems, key: &str, d: &RawDestination) {
    for (i, s) in d.retry_on.iter().enumerate() {
        if !(400..500).contains(s) {
            p.add(format!("{key}.retry_on[{i}]"), format!("{s} is not a 4xx status (5xx are always retried)"));
        }
    }
    let r = &d.retry;
    if r.initial.is_zero() {
        p.add(format!("{key}.retry.initial"), "must be greater than 0");
    }
    if r.max_interval < r.initial {
        p.add(format!("{key}.retry.max_interval"), "must not be less than retry.initial");
    }
    if !(r.multiplier >= 1.0 && r.multiplier.is_finite()) {
        p.add(format!("{key}.retry.multiplier"), "must be a number >= 1.0");
    }
    if !(0.0..1.0).contains(&r.jitter) {
        p.add(format!("{key}.retry.jitter"), "must be in [0.0, 1.0)");
    }
    if r.max_age.is_zero() {
        p.add(format!("{key}.retry.max_age"), "must be greater than 0");
    }
}

/// `ca_file`: extra trusted roots, read now.
fn extra_roots(p: &mut Problems, key: &str, d: &RawDestination) -> Vec<rustls::pki_types::CertificateDer<'static>> {
    let mut extra_roots = Vec::new();
    if let Some(ca) = &d.ca_file {
        use rustls::pki_types::pem::PemObject;
        match rustls::pki_types::CertificateDer::pem_file_iter(ca).and_then(|it| it.collect::<Result<Vec<_>, _>>()) {
            Ok(certs) if !certs.is_empty() => extra_roots = certs,
            Ok(_) => p.add(format!("{key}.ca_file"), format!("no PEM certificate in {}", ca.display())),
            Err(e) => p.add(format!("{key}.ca_file"), format!("cannot read {}: {e}", ca.display())),
        }
    }
    extra_roots
}

/// What ingress applies for a destination (`filter`, `ordering`): kept out
/// of [`Destination`], which is what delivery runs on; each route gets its
/// destinations' rules.
#[derive(Clone, Default)]
pub(super) struct IngressRules {
    pub filter: Option<Arc<crate::ingress::filter::Filter>>,
    pub ordering: Option<Arc<crate::ingress::order::OrderKey>>,
}

/// A destination's `ordering` and `order_key`; `None` for "none" (or with
/// problems recorded).
fn validate_ordering(p: &mut Problems, key: &str, d: &RawDestination) -> Option<crate::ingress::order::OrderKey> {
    use super::raw::RawOrdering;
    use crate::ingress::order::OrderKey;
    match (d.ordering, d.order_key.as_deref()) {
        (RawOrdering::None, None) => None,
        (RawOrdering::PerKey, Some(k)) => match OrderKey::parse(k) {
            Ok(o) => Some(o),
            Err(e) => {
                p.add(format!("{key}.order_key"), e);
                None
            }
        },
        (RawOrdering::PerKey, None) => {
            p.add(format!("{key}.order_key"), "ordering = \"per_key\" needs an order_key (a JSON path or header:NAME)");
            None
        }
        (RawOrdering::Fifo, None) => Some(OrderKey::Fifo),
        (_, Some(_)) => {
            p.add(format!("{key}.order_key"), "only used with ordering = \"per_key\"");
            None
        }
    }
}

/// A destination's filter; `None` (with problems recorded) if it cannot be
/// evaluated.
fn validate_filter(p: &mut Problems, key: &str, f: &RawFilter) -> Option<crate::ingress::filter::Filter> {
    use crate::ingress::filter::{parse_path, Filter, Target, Test};
    let combos = [f.all.is_some(), f.any.is_some(), f.not.is_some()];
    let tests = [f.equals.is_some(), f.in_.is_some(), f.exists.is_some(), f.prefix.is_some()];
    let targets = [f.path.is_some(), f.header.is_some()];
    let n = |xs: &[bool]| xs.iter().filter(|x| **x).count();
    if n(&combos) > 0 {
        if n(&combos) > 1 || n(&tests) > 0 || n(&targets) > 0 || f.case_insensitive {
            p.add(key, "a filter is either one of all/any/not, or one condition (path or header with a test)");
            return None;
        }
        let list = |p: &mut Problems, k: &str, fs: &[RawFilter]| -> Option<Vec<Filter>> {
            if fs.is_empty() {
                p.add(k, "an empty list never decides anything");
                return None;
            }
            let out: Vec<Option<Filter>> =
                fs.iter().enumerate().map(|(i, f)| validate_filter(p, &format!("{k}[{i}]"), f)).collect();
            out.into_iter().collect()
        };
        return match (&f.all, &f.any, &f.not) {
            (Some(fs), _, _) => list(p, &format!("{key}.all"), fs).map(Filter::All),
            (_, Some(fs), _) => list(p, &format!("{key}.any"), fs).map(Filter::Any),
            (_, _, Some(f)) => validate_filter(p, &format!("{key}.not"), f).map(|f| Filter::Not(Box::new(f))),
            _ => None,
        };
    }
    if n(&targets) != 1 || n(&tests) != 1 {
        p.add(key, "a condition needs exactly one of path or header, and exactly one of equals, in, exists, prefix");
        return None;
    }
    let target = match (&f.path, &f.header) {
        (Some(path), _) => match parse_path(path) {
            Ok(steps) => Target::Body(steps),
            Err(e) => {
                p.add(format!("{key}.path"), e);
                return None;
            }
        },
        (_, Some(h)) => Target::Header(header_name(p, &format!("{key}.header"), h)?),
        _ => return None,
    };
    let test = match (&f.equals, &f.in_, f.exists, &f.prefix) {
        (Some(v), ..) => Test::Equals(v.clone()),
        (_, Some(vs), ..) if vs.is_empty() => {
            p.add(format!("{key}.in"), "an empty list never matches");
            return None;
        }
        (_, Some(vs), ..) => Test::In(vs.clone()),
        (_, _, Some(e), _) => Test::Exists(e),
        (_, _, _, Some(pre)) => Test::Prefix(pre.clone()),
        _ => return None,
    };
    Some(Filter::Cond { target, test, case_insensitive: f.case_insensitive })
}

/// `forward_headers`, `add_headers` and `forwarded` of one destination.
fn validate_header_policy(p: &mut Problems, key: &str, d: &RawDestination) -> crate::headers::Policy {
    use crate::headers::{is_hop_by_hop, Forward, Policy};
    let names = |p: &mut Problems, k: &str, list: &[String]| -> Vec<http::HeaderName> {
        list.iter().enumerate().filter_map(|(i, n)| header_name(p, &format!("{k}[{i}]"), n)).collect()
    };
    let k = format!("{key}.forward_headers");
    let forward = match &d.forward_headers {
        None => Forward::All,
        Some(RawForwardHeaders::All(mode)) if mode == "all" => Forward::All,
        Some(RawForwardHeaders::All(mode)) => {
            p.add(
                &k,
                format!("{mode:?} is not a header policy (use \"all\", {{ allow = [...] }} or {{ deny = [...] }})"),
            );
            Forward::All
        }
        Some(RawForwardHeaders::Lists(l)) => match (&l.allow, &l.deny) {
            (Some(a), None) => Forward::Allow(names(p, &format!("{k}.allow"), a)),
            (None, Some(d)) => Forward::Deny(names(p, &format!("{k}.deny"), d)),
            _ => {
                p.add(&k, "set exactly one of allow or deny");
                Forward::All
            }
        },
    };
    let mut add = Vec::new();
    for (name, raw) in &d.add_headers {
        let k = format!("{key}.add_headers.{name}");
        let Some(n) = header_name(p, &k, name) else { continue };
        if is_hop_by_hop(&n) {
            p.add(&k, format!("{name} describes the connection, not the message: it cannot be added"));
            continue;
        }
        let Some(value) = resolve(p, &k, raw) else { continue };
        match http::HeaderValue::from_str(value.expose()) {
            Ok(mut v) => {
                v.set_sensitive(true);
                add.push((n, v));
            }
            // The value may be a secret: the message does not repeat it.
            Err(_) => p.add(&k, "not a valid header value (control characters or non-ASCII bytes)"),
        }
    }
    Policy { forward, add, forwarded: d.forwarded }
}

/// `[destinations.NAME.tls]`: the client certificate (loaded now, so a bad
/// one stops start-up) and whether TLS 1.2 is refused.
fn validate_destination_tls(
    p: &mut Problems,
    key: &str,
    t: Option<&RawDestinationTls>,
) -> (Option<crate::tls::TlsFiles>, bool) {
    let Some(t) = t else { return (None, false) };
    let tls13_only = match t.min_version.as_deref() {
        None | Some("1.2") => false,
        Some("1.3") => true,
        Some(v) => {
            p.add(
                format!("{key}.min_version"),
                format!("{v:?} is not a TLS version this relay speaks (\"1.2\" or \"1.3\")"),
            );
            false
        }
    };
    let files = match (&t.client_cert, &t.client_key) {
        (None, None) => None,
        (Some(cert), Some(k)) => validate_tls(p, key, &RawTls { cert: cert.clone(), key: k.clone() }),
        _ => {
            p.add(key, "set both client_cert and client_key, or neither");
            None
        }
    };
    (files, tls13_only)
}

/// `[destinations.NAME.transform]`: the script read and compiled now, so
/// `check` names a syntax error's file and line.
fn validate_transform(
    p: &mut Problems,
    key: &str,
    t: &crate::config::raw::RawTransform,
) -> Option<Arc<crate::delivery::transform::Transform>> {
    let (origin, source) = match (&t.script, &t.source) {
        (Some(script), None) => {
            let Some(path) = script.strip_prefix("file:") else {
                p.add(format!("{key}.script"), "file:PATH (or put the script inline in source)");
                return None;
            };
            match std::fs::read_to_string(path) {
                Ok(text) => (path.to_string(), text),
                Err(e) => {
                    p.add(format!("{key}.script"), format!("cannot read {path}: {e}"));
                    return None;
                }
            }
        }
        (None, Some(source)) => ("inline".to_string(), source.clone()),
        _ => {
            p.add(key.to_string(), "set script (file:PATH) or source, one of them");
            return None;
        }
    };
    if t.timeout.is_zero() || t.timeout > Duration::from_secs(10) {
        p.add(format!("{key}.timeout"), "between 1ms and 10s");
        return None;
    }
    let memory = match t.memory.bytes() {
        Some(m) if (1 << 20..=1 << 30).contains(&m) => m as usize,
        _ => {
            p.add(format!("{key}.memory"), "between 1MiB and 1GiB (bytes, or with KiB/MiB/GiB)");
            return None;
        }
    };
    match crate::delivery::transform::Transform::new(origin.clone(), source, t.timeout, memory) {
        Ok(t) => Some(Arc::new(t)),
        Err(e) => {
            p.add(key.to_string(), format!("{origin}: {e}"));
            None
        }
    }
}

/// A `nats://` or `tls://` destination: its server, credentials (from the
/// URL), subject and mode; `None` for an HTTP one (whose `subject` and
/// `jetstream` must be unset).
fn validate_nats(p: &mut Problems, key: &str, d: &RawDestination) -> Option<Arc<crate::delivery::nats::NatsTarget>> {
    let parsed = url::Url::parse(&d.url).ok();
    let scheme = parsed.as_ref().map(|u| u.scheme().to_string()).unwrap_or_default();
    if scheme != "nats" && scheme != "tls" {
        if d.subject.is_some() {
            p.add(format!("{key}.subject"), "only for a nats:// destination");
        }
        if d.jetstream.is_some() {
            p.add(format!("{key}.jetstream"), "only for a nats:// destination");
        }
        if d.nats.is_some() {
            p.add(format!("{key}.nats"), "only for a nats:// destination");
        }
        return None;
    }
    let mut u = parsed?;
    if u.host_str().is_none_or(str::is_empty) {
        p.add(format!("{key}.url"), "URL has no host");
        return None;
    }
    let credentials = (!u.username().is_empty()).then(|| {
        let user = percent_decode(u.username());
        let pass = percent_decode(u.password().unwrap_or_default());
        (user, Secret::new(pass))
    });
    let _ = u.set_username("");
    let _ = u.set_password(None);
    let subject = match &d.subject {
        Some(s) if !s.is_empty() && !s.contains(|c: char| c.is_whitespace() || c == '*' || c == '>') => s.clone(),
        Some(_) => {
            p.add(format!("{key}.subject"), "a NATS subject without spaces or wildcards (* >)");
            return None;
        }
        None => {
            p.add(format!("{key}.subject"), "a nats:// destination needs the subject to publish to");
            return None;
        }
    };
    use crate::store::JetAuth;
    let n = d.nats.clone().unwrap_or_default();
    let auth = match (credentials, &n.token, &n.nkey, &n.creds_file) {
        (None, None, None, None) => JetAuth::None,
        (Some((user, password)), None, None, None) => JetAuth::UserPassword { user, password },
        (None, Some(t), None, None) => JetAuth::Token(resolve(p, &format!("{key}.nats.token"), t)?),
        (None, None, Some(k), None) => JetAuth::NKey(resolve(p, &format!("{key}.nats.nkey"), k)?),
        (None, None, None, Some(f)) => JetAuth::CredsFile(f.clone()),
        _ => {
            p.add(
                format!("{key}.nats"),
                "one way to authenticate: user:password in the URL, token, nkey or creds_file",
            );
            return None;
        }
    };
    let tls = d.tls.as_ref();
    let client_cert = match tls.map(|t| (&t.client_cert, &t.client_key)) {
        Some((Some(c), Some(k))) => Some((c.clone(), k.clone())),
        _ => None, // both or neither: validate_destination_tls says so
    };
    Some(Arc::new(crate::delivery::nats::NatsTarget::new(
        u.as_str().trim_end_matches('/').to_string(),
        crate::delivery::nats::NatsAccess { auth, ca_file: d.ca_file.clone(), client_cert },
        subject,
        d.jetstream.unwrap_or(true),
    )))
}

/// `[destinations.NAME.rate_limit]`.
fn validate_rate_limit(p: &mut Problems, key: &str, d: &RawDestination) -> Option<crate::delivery::rate::RateLimit> {
    let r = d.rate_limit.as_ref()?;
    let k = format!("{key}.rate_limit");
    if !(r.per_second.is_finite() && r.per_second > 0.0) {
        p.add(format!("{k}.per_second"), "must be a number greater than 0");
        return None;
    }
    let burst = r.burst.unwrap_or(r.per_second.ceil() as i64);
    if burst < 1 || burst > i64::from(u32::MAX) {
        p.add(format!("{k}.burst"), "must be at least 1");
        return None;
    }
    Some(crate::delivery::rate::RateLimit { per_second: r.per_second, burst: burst as u32 })
}
