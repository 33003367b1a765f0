//! Validation: [`RawConfig`] into the typed [`Config`], collecting every
//! problem with its key; plus the warnings `switchboard check` prints.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;

use super::*;

mod store;

/// Collects problems during validation.
struct Problems(Vec<Problem>);

impl Problems {
    fn add(&mut self, key: impl Into<String>, message: impl Into<String>) {
        self.0.push(Problem { key: key.into(), message: message.into() });
    }
}

fn parse_addr(p: &mut Problems, key: &str, addr: &str) -> Option<SocketAddr> {
    match addr.parse::<SocketAddr>() {
        Ok(a) => Some(a),
        Err(_) => {
            p.add(key, format!("invalid socket address {addr:?} (expected IP:PORT, e.g. \"127.0.0.1:9001\")"));
            None
        }
    }
}

fn valid_name(name: &str) -> bool {
    !name.is_empty() && name.len() <= 64 && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

impl RawConfig {
    /// Validates into the typed configuration, reporting every problem found.
    pub fn validate(self, file: &Path) -> Result<Config, ConfigError> {
        let mut p = Problems(Vec::new());
        if self.store.path.as_os_str().is_empty() {
            p.add("store.path", "must not be empty");
        }
        let encryption = validate_encryption(&mut p, self.store.encryption.as_ref());
        let mut jetstream = store::validate_store_kind(&mut p, &self);
        self.check_ingress(&mut p);
        let listeners = self.validate_listeners(&mut p);
        let admin = self.validate_admin(&mut p, &listeners);
        if self.shutdown.grace_period.is_zero() {
            p.add("shutdown.grace_period", "must be greater than 0");
        }
        if tracing_subscriber::EnvFilter::try_new(&self.log.level).is_err() {
            p.add("log.level", format!("invalid log filter {:?}", self.log.level));
        }
        let destinations = self.validate_destinations(&mut p);
        let routes = self.validate_routes(&mut p, &destinations);
        if let Some(j) = jetstream.as_mut() {
            j.dedupe_retention = routes.iter().filter_map(|r| r.dedupe.as_ref().map(|d| d.window)).max();
        }
        if !p.0.is_empty() {
            return Err(ConfigError { file: file.to_path_buf(), problems: p.0 });
        }
        // The admin address parsed, or a problem was recorded above.
        let Some(admin) = admin else { unreachable!("admin address problems are reported above") };
        Ok(Config {
            source: file.to_path_buf(),
            store: StoreConfig {
                encryption,
                dedupe_max_keys: self.store.dedupe_max_keys,
                retain_delivered: (!self.store.retain_delivered.is_zero()).then_some(self.store.retain_delivered),
                path: self.store.path,
                max_bytes: (self.store.max_bytes > 0).then_some(self.store.max_bytes),
                min_free_bytes: (self.store.min_free_bytes > 0).then_some(self.store.min_free_bytes),
                jetstream,
            },
            ingress: IngressConfig {
                max_body: self.ingress.max_body,
                header_read_timeout: self.ingress.header_read_timeout,
                body_read_timeout: self.ingress.body_read_timeout,
                max_connections: self.ingress.max_connections,
                max_connections_per_ip: (self.ingress.max_connections_per_ip > 0)
                    .then_some(self.ingress.max_connections_per_ip),
                max_buffered_bytes: self.ingress.max_buffered_bytes,
                max_headers: self.ingress.max_headers,
                retry_after: self.ingress.retry_after,
            },
            listeners,
            admin,
            log: self.log,
            grace_period: self.shutdown.grace_period,
            routes,
            destinations,
        })
    }

    fn check_ingress(&self, p: &mut Problems) {
        let ing = &self.ingress;
        if ing.max_body == 0 {
            p.add("ingress.max_body", "must be greater than 0");
        }
        if ing.max_body > crate::store::MAX_BODY {
            p.add("ingress.max_body", format!("must be at most {} bytes (512 MiB)", crate::store::MAX_BODY));
        }
        if ing.max_connections == 0 {
            p.add("ingress.max_connections", "must be greater than 0");
        }
        if ing.max_headers == 0 {
            p.add("ingress.max_headers", "must be greater than 0");
        }
        for (key, d) in [
            ("ingress.header_read_timeout", ing.header_read_timeout),
            ("ingress.body_read_timeout", ing.body_read_timeout),
        ] {
            if d.is_zero() {
                p.add(key, "must be greater than 0");
            }
        }
    }

    fn validate_listeners(&self, p: &mut Problems) -> Vec<Listener> {
        if self.listeners.is_empty() {
            p.add("listeners", "no listeners: add at least one [[listeners]] with an addr");
        }
        let mut listeners: Vec<Listener> = Vec::new();
        for (i, l) in self.listeners.iter().enumerate() {
            let tls = l.tls.as_ref().and_then(|t| validate_tls(p, &format!("listeners[{i}].tls"), t));
            if let Some(a) = parse_addr(p, &format!("listeners[{i}].addr"), &l.addr) {
                if a.port() != 0 && listeners.iter().any(|x| x.addr == a) {
                    p.add(format!("listeners[{i}].addr"), format!("duplicate listener address {a}"));
                }
                listeners.push(Listener {
                    addr: a,
                    tls,
                    trusted_proxies: l.trusted_proxies.clone(),
                    allow_ips: l.allow_ips.clone(),
                });
            }
        }
        listeners
    }

    /// The admin listener (`None` if its address is invalid: a problem).
    fn validate_admin(&self, p: &mut Problems, listeners: &[Listener]) -> Option<AdminConfig> {
        let admin_tls = self.admin.tls.as_ref().and_then(|t| validate_tls(p, "admin.tls", t));
        let admin_token = self.admin.token.as_ref().and_then(|t| resolve(p, "admin.token", t));
        let admin = parse_addr(p, "admin.addr", &self.admin.addr);
        if let Some(a) = admin {
            if a.port() != 0
                && listeners.iter().map(|l| l.addr).any(|l| {
                    l.port() == a.port() && (l.ip() == a.ip() || l.ip().is_unspecified() || a.ip().is_unspecified())
                })
            {
                p.add("admin.addr", format!("admin and ingress listener on the same address {a}"));
            }
        }
        let mut allowed_hosts = Vec::new();
        for (i, h) in self.admin.allowed_hosts.iter().enumerate() {
            let name = h.trim_end_matches('.').to_ascii_lowercase();
            let valid = !name.is_empty()
                && name.len() <= 253
                && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.' || b == b'_');
            if valid {
                allowed_hosts.push(name);
            } else {
                p.add(
                    format!("admin.allowed_hosts[{i}]"),
                    format!(
                        "{h:?} is not a host name (a name such as \"switchboard.internal\", without scheme or port)"
                    ),
                );
            }
        }
        Some(AdminConfig { addr: admin?, token: admin_token, tls: admin_tls, allowed_hosts })
    }

    fn validate_destinations(&self, p: &mut Problems) -> Vec<Arc<Destination>> {
        let mut destinations = Vec::new();
        for (name, d) in &self.destinations {
            let key = format!("destinations.{name}");
            if !valid_name(name) {
                p.add(&key, "destination names use only letters, digits, '-' and '_' (at most 64)");
                continue;
            }
            if let Some(dest) = validate_destination(p, &key, name, d) {
                destinations.push(Arc::new(dest));
            }
        }
        if self.destinations.is_empty() {
            p.add("destinations", "no destinations defined");
        }
        destinations
    }

    fn validate_routes(&self, p: &mut Problems, dests: &[Arc<Destination>]) -> Vec<Route> {
        let known: HashSet<&str> = self.destinations.keys().map(String::as_str).collect();
        let mut paths = HashSet::new();
        if self.routes.is_empty() {
            p.add("routes", "no routes: add at least one [[routes]] with a path");
        }
        let mut routes = Vec::new();
        for (i, r) in self.routes.iter().enumerate() {
            if !paths.insert(r.path.as_str()) {
                p.add(format!("routes[{i}].path"), format!("duplicate route path {:?}", r.path));
            }
            routes.push(self.validate_route(p, i, r, &known, dests));
        }
        routes
    }

    fn validate_route(
        &self,
        p: &mut Problems,
        i: usize,
        r: &RawRoute,
        known: &HashSet<&str>,
        dests: &[Arc<Destination>],
    ) -> Route {
        let key = format!("routes[{i}]");
        if !r.path.starts_with('/') {
            p.add(format!("{key}.path"), format!("route path {:?} must start with '/'", r.path));
        } else if r.path.parse::<http::uri::PathAndQuery>().is_err() || r.path.contains('?') {
            p.add(format!("{key}.path"), format!("route path {:?} is not a valid URL path", r.path));
        }
        if r.destinations.is_empty() {
            p.add(format!("{key}.destinations"), "a route needs at least one destination");
        }
        let mut seen = HashSet::new();
        for (j, d) in r.destinations.iter().enumerate() {
            if !known.contains(d.as_str()) {
                p.add(
                    format!("{key}.destinations[{j}]"),
                    format!("unknown destination {d:?} (not defined under [destinations])"),
                );
            } else if !seen.insert(d.as_str()) {
                p.add(format!("{key}.destinations[{j}]"), format!("destination {d:?} listed twice"));
            }
        }
        if r.max_body == Some(0) {
            p.add(format!("{key}.max_body"), "must be greater than 0");
        }
        let route_max = r.max_body.unwrap_or(self.ingress.max_body);
        if route_max > self.ingress.max_buffered_bytes {
            let k = if r.max_body.is_some() { format!("{key}.max_body") } else { "ingress.max_buffered_bytes".into() };
            p.add(
                k,
                format!(
                    "route {:?} accepts bodies of {route_max} bytes but ingress.max_buffered_bytes is {}: such a request could never be read",
                    r.path, self.ingress.max_buffered_bytes
                ),
            );
        }
        if r.max_body.is_some_and(|m| m > crate::store::MAX_BODY) {
            p.add(format!("{key}.max_body"), format!("must be at most {} bytes (512 MiB)", crate::store::MAX_BODY));
        }
        let auth = r.auth.as_ref().and_then(|a| validate_auth(p, &format!("{key}.auth"), a)).map(Arc::new);
        let credential_headers =
            auth.as_deref().map(crate::ingress::auth::Auth::credential_headers).unwrap_or_default();
        let store_credentials =
            r.destinations.iter().any(|d| self.destinations.get(d).is_some_and(|d| d.forward_sender_credentials));
        if r.destinations.len() > crate::store::MAX_DESTINATIONS {
            p.add(
                format!("{key}.destinations"),
                format!("a route may list at most {} destinations", crate::store::MAX_DESTINATIONS),
            );
        }
        let mut index = Vec::new();
        for (j, f) in r.index.iter().enumerate() {
            match crate::ingress::filter::parse_path(f) {
                Ok(steps) => index.push((f.clone(), steps)),
                Err(e) => p.add(format!("{key}.index[{j}]"), e),
            }
        }
        Route {
            index,
            path: r.path.clone(),
            credential_headers,
            store_credentials,
            destinations: r.destinations.iter().map(|d| Arc::from(d.as_str())).collect(),
            max_body: r.max_body.unwrap_or(self.ingress.max_body),
            allow_ips: r.allow_ips.clone(),
            auth,
            dedupe: match (&r.dedupe, r.dedupe_window) {
                (Some(_), Some(_)) => {
                    p.add(format!("{key}.dedupe"), "set dedupe or dedupe_window, not both");
                    None
                }
                (Some(d), None) if d.window.is_zero() => {
                    p.add(format!("{key}.dedupe.window"), "must be greater than 0");
                    None
                }
                (Some(d), None) if d.ignore.iter().any(String::is_empty) => {
                    p.add(format!("{key}.dedupe.ignore"), "an empty field name names nothing");
                    None
                }
                (Some(d), None) if !d.ignore.is_empty() && (!d.fields.is_empty() || !d.headers.is_empty()) => {
                    p.add(
                        format!("{key}.dedupe"),
                        "ignore (the body without some fields) or fields/headers (only those), not both",
                    );
                    None
                }
                (Some(d), None) => {
                    let mut fields = Vec::new();
                    for (i, f) in d.fields.iter().enumerate() {
                        match crate::ingress::filter::parse_path(f) {
                            Ok(steps) => fields.push((f.clone(), steps)),
                            Err(e) => p.add(format!("{key}.dedupe.fields[{i}]"), e),
                        }
                    }
                    let headers = d
                        .headers
                        .iter()
                        .enumerate()
                        .filter_map(|(i, h)| header_name(p, &format!("{key}.dedupe.headers[{i}]"), h))
                        .collect();
                    Some(crate::ingress::dedupe::DedupeRule {
                        window: d.window,
                        ignore: d.ignore.clone(),
                        fields,
                        headers,
                    })
                }
                (None, Some(w)) if !w.is_zero() => {
                    Some(crate::ingress::dedupe::DedupeRule { window: w, ..Default::default() })
                }
                (None, _) => None,
            },
            filters: r
                .destinations
                .iter()
                .map(|d| dests.iter().find(|x| &*x.name == d.as_str()).and_then(|x| x.filter.clone()))
                .collect(),
            orders: r
                .destinations
                .iter()
                .map(|d| dests.iter().find(|x| &*x.name == d.as_str()).and_then(|x| x.ordering.clone()))
                .collect(),
        }
    }

    /// Whether payloads are encrypted at rest, and with which key ids.
    pub fn encryption_summary(&self) -> String {
        match &self.store.encryption {
            Some(e) if !e.keys.is_empty() => {
                let ids: Vec<&str> = e.keys.iter().map(|k| k.id.as_str()).collect();
                format!("on (key {:?} encrypts; {} decrypt)", ids[0], ids.join(", "))
            }
            _ => "off".to_string(),
        }
    }

    /// The configuration as TOML, secrets masked (for `switchboard check`).
    pub fn to_masked_toml(&self) -> String {
        let mut masked = self.clone();
        for d in masked.destinations.values_mut() {
            d.url = mask_url(&d.url);
        }
        let mut value = match toml::Value::try_from(&masked) {
            Ok(v) => v,
            Err(e) => return format!("# cannot print config: {e}\n"),
        };
        // A local store does not use the JetStream keys: printing their
        // defaults would suggest it does.
        if masked.store.kind == RawStoreKind::Local {
            if let Some(store) = value.get_mut("store").and_then(toml::Value::as_table_mut) {
                for key in JETSTREAM_KEYS {
                    store.remove(*key);
                }
            }
        }
        toml::to_string_pretty(&value).unwrap_or_else(|e| format!("# cannot print config: {e}\n"))
    }
}

/// The `[store]` keys only a JetStream store reads.
const JETSTREAM_KEYS: &[&str] = &[
    "servers",
    "stream",
    "replicas",
    "user",
    "password",
    "token",
    "nkey",
    "creds_file",
    "ca_file",
    "client_cert",
    "client_key",
    "max_ack_pending",
    "ack_wait",
    "publish_timeout",
];

/// Masks what may be a secret in a URL: the user and password of
/// `user:password@` (a user name is half a credential) and every
/// query-string value (`?token=***`); names stay readable.
pub fn mask_url(url: &str) -> String {
    let Ok(mut u) = url::Url::parse(url) else { return url.to_string() };
    if !u.username().is_empty() {
        let _ = u.set_username("***");
    }
    if u.password().is_some() {
        let _ = u.set_password(Some("***"));
    }
    if u.query().is_some() {
        let names: Vec<String> = u.query_pairs().map(|(k, _)| k.into_owned()).collect();
        let mut q = u.query_pairs_mut();
        q.clear();
        for k in names {
            q.append_pair(&k, "***");
        }
        drop(q);
    }
    // The serializer percent-encodes the mask; show it as written.
    u.to_string().replace("%2A%2A%2A", "***")
}

fn validate_destination(p: &mut Problems, key: &str, name: &str, d: &RawDestination) -> Option<Destination> {
    let before = p.0.len();
    let parsed = match url::Url::parse(&d.url) {
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
    if d.concurrency == 0 {
        p.add(format!("{key}.concurrency"), "must be greater than 0");
    }
    if d.timeout.is_zero() {
        p.add(format!("{key}.timeout"), "must be greater than 0");
    }
    if d.connect_timeout.is_zero() {
        p.add(format!("{key}.connect_timeout"), "must be greater than 0");
    }
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
    let mut extra_roots = Vec::new();
    if let Some(ca) = &d.ca_file {
        use rustls::pki_types::pem::PemObject;
        match rustls::pki_types::CertificateDer::pem_file_iter(ca).and_then(|it| it.collect::<Result<Vec<_>, _>>()) {
            Ok(certs) if !certs.is_empty() => extra_roots = certs,
            Ok(_) => p.add(format!("{key}.ca_file"), format!("no PEM certificate in {}", ca.display())),
            Err(e) => p.add(format!("{key}.ca_file"), format!("cannot read {}: {e}", ca.display())),
        }
    }
    let headers = validate_header_policy(p, key, d);
    let rate_limit = d.rate_limit.as_ref().and_then(|r| {
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
    });
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
    Some(Destination {
        ordering,
        breaker,
        rate_limit,
        signing,
        headers,
        client_cert,
        tls13_only,
        filter,
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
    })
}

/// `[store.encryption]`: ids unique and short, keys 32 bytes of base64.
fn validate_encryption(p: &mut Problems, e: Option<&RawEncryption>) -> Vec<(String, Secret)> {
    let Some(e) = e else { return Vec::new() };
    if e.keys.is_empty() {
        p.add("store.encryption.keys", "at least one key is required (the first one encrypts)");
    }
    let mut seen = HashSet::new();
    let mut out = Vec::new();
    for (i, k) in e.keys.iter().enumerate() {
        let key = format!("store.encryption.keys[{i}]");
        if k.id.is_empty() || k.id.len() > 64 || !k.id.bytes().all(|b| b.is_ascii_graphic()) {
            p.add(format!("{key}.id"), "a key id is 1 to 64 printable ASCII characters");
        } else if !seen.insert(k.id.as_str()) {
            p.add(format!("{key}.id"), format!("key id {:?} used twice", k.id));
        }
        let Some(secret) = resolve(p, &format!("{key}.key"), &k.key) else { continue };
        use base64::Engine;
        match base64::engine::general_purpose::STANDARD.decode(secret.expose().trim()) {
            Ok(bytes) if bytes.len() == 32 => out.push((k.id.clone(), secret)),
            _ => p.add(
                format!("{key}.key"),
                "must be 32 bytes, base64 (make one with: head -c 32 /dev/urandom | base64)",
            ),
        }
    }
    out
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

fn resolve(p: &mut Problems, key: &str, raw: &SecretString) -> Option<Secret> {
    match crate::secret::resolve(&raw.0) {
        Ok(s) => Some(s),
        Err(e) => {
            p.add(key, e);
            None
        }
    }
}

fn resolve_all(p: &mut Problems, key: &str, raw: &[SecretString]) -> Vec<Secret> {
    if raw.is_empty() {
        p.add(key, "at least one value is required");
    }
    raw.iter().enumerate().filter_map(|(i, r)| resolve(p, &format!("{key}[{i}]"), r)).collect()
}

fn header_name(p: &mut Problems, key: &str, name: &str) -> Option<http::HeaderName> {
    match http::HeaderName::from_bytes(name.as_bytes()) {
        Ok(h) => Some(h),
        Err(_) => {
            p.add(key, format!("invalid header name {name:?}"));
            None
        }
    }
}

/// `[destinations.NAME.tls]`: the client certificate (loaded now, so a bad
/// one stops start-up) and whether TLS 1.2 is refused.
fn validate_destination_tls(
    p: &mut Problems,
    key: &str,
    t: Option<&RawDestinationTls>,
) -> (Option<crate::server::tls::TlsFiles>, bool) {
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

fn validate_tls(p: &mut Problems, key: &str, t: &RawTls) -> Option<crate::server::tls::TlsFiles> {
    let files = crate::server::tls::TlsFiles { cert: t.cert.clone(), key: t.key.clone() };
    match crate::server::tls::load(&files) {
        Ok(_) => Some(files),
        Err(e) => {
            p.add(key, e.to_string());
            None
        }
    }
}

fn validate_auth(p: &mut Problems, key: &str, a: &RawAuth) -> Option<crate::ingress::auth::Auth> {
    use crate::ingress::auth::{Auth, HmacAuth, HmacScheme};
    let set = [a.body_fields.is_some(), a.basic.is_some(), a.header.is_some(), a.hmac.is_some()];
    if set.iter().filter(|x| **x).count() != 1 {
        p.add(key, "set exactly one of body_fields, basic, header, hmac");
        return None;
    }
    let before = p.0.len();
    let auth = if let Some(b) = &a.body_fields {
        Auth::BodyFields {
            username_field: b.username_field.clone(),
            password_field: b.password_field.clone(),
            username: resolve(p, &format!("{key}.body_fields.username"), &b.username).unwrap_or_default(),
            passwords: resolve_all(p, &format!("{key}.body_fields.passwords"), &b.passwords),
        }
    } else if let Some(b) = &a.basic {
        Auth::Basic {
            username: resolve(p, &format!("{key}.basic.username"), &b.username).unwrap_or_default(),
            passwords: resolve_all(p, &format!("{key}.basic.passwords"), &b.passwords),
        }
    } else if let Some(h) = &a.header {
        let name = header_name(p, &format!("{key}.header.name"), &h.name);
        let values = resolve_all(p, &format!("{key}.header.values"), &h.values);
        Auth::Header { name: name?, values }
    } else if let Some(h) = &a.hmac {
        let k = format!("{key}.hmac");
        let default_header = match h.scheme {
            HmacScheme::Plain => None,
            HmacScheme::Stripe => Some("stripe-signature"),
            HmacScheme::StandardWebhooks => Some("webhook-signature"),
        };
        let Some(header) = h.header.as_deref().or(default_header) else {
            p.add(format!("{k}.header"), "the plain scheme needs the signature header name");
            return None;
        };
        let header = header_name(p, &format!("{k}.header"), header);
        let timestamp_header =
            h.timestamp_header.as_deref().and_then(|t| header_name(p, &format!("{k}.timestamp_header"), t));
        let mut secrets = Vec::new();
        for (i, s) in resolve_all(p, &format!("{k}.secrets"), &h.secrets).into_iter().enumerate() {
            let raw = s.expose();
            if h.scheme == HmacScheme::StandardWebhooks {
                use base64::Engine;
                match base64::engine::general_purpose::STANDARD.decode(raw.strip_prefix("whsec_").unwrap_or(raw)) {
                    Ok(k) => secrets.push(k),
                    Err(_) => p.add(format!("{k}.secrets[{i}]"), "not a base64 Standard Webhooks secret (whsec_...)"),
                }
            } else {
                secrets.push(raw.as_bytes().to_vec());
            }
        }
        Auth::Hmac(HmacAuth {
            scheme: h.scheme,
            header: header?,
            prefix: h.prefix.clone(),
            encoding: h.encoding,
            timestamp_header,
            tolerance: h.tolerance,
            secrets,
        })
    } else {
        return None;
    };
    (p.0.len() == before).then_some(auth)
}

/// Parses "80" or "9001-9006".
fn parse_port_range(s: &str) -> Option<(u16, u16)> {
    match s.split_once('-') {
        Some((a, b)) => Some((a.trim().parse().ok()?, b.trim().parse().ok()?)),
        None => {
            let p = s.trim().parse().ok()?;
            Some((p, p))
        }
    }
}

impl RawConfig {
    /// Things `check` warns about without failing: exposure risks.
    pub fn warnings(&self) -> Vec<String> {
        let mut w = Vec::new();
        let ranges: Vec<(u16, u16)> = self.check.public_ports.iter().filter_map(|r| parse_port_range(r)).collect();
        for (i, s) in self.check.public_ports.iter().enumerate() {
            if parse_port_range(s).is_none() {
                w.push(format!("check.public_ports[{i}]: {s:?} is not a port or a range like \"9001-9006\""));
            }
        }
        for (i, l) in self.listeners.iter().enumerate() {
            let Ok(addr) = l.addr.parse::<SocketAddr>() else { continue };
            let loopback = addr.ip().is_loopback();
            if !loopback && !ranges.iter().any(|(a, b)| (*a..=*b).contains(&addr.port())) {
                w.push(format!(
                    "listeners[{i}].addr: port {} is not one a sender can register (check.public_ports: {})",
                    addr.port(),
                    self.check.public_ports.join(", ")
                ));
            }
            if !loopback && l.tls.is_none() {
                w.push(format!("listeners[{i}]: plain HTTP on non-loopback address {addr}: credentials in callbacks travel in clear text"));
            }
        }
        if let Some(size) = filesystem_size(&self.store.path) {
            if self.store.min_free_bytes > 0 && size < self.store.min_free_bytes {
                w.push(format!(
                    "store.min_free_bytes: {} bytes is more than the whole filesystem of store.path ({size} bytes): every callback would be refused",
                    self.store.min_free_bytes
                ));
            }
        }
        if !self.store.retain_delivered.is_zero() && self.store.min_free_bytes == 0 {
            w.push("store.retain_delivered with store.min_free_bytes = 0: nothing stops retained messages from filling the disk (retention yields to new callbacks only below twice min_free_bytes)".to_string());
        }
        if self.store.kind == crate::config::raw::RawStoreKind::Jetstream {
            w.push("store.kind: with \"jetstream\", the admin API's message inspection and listing (GET /api/messages...) and replay of delivered messages answer 501; dead letters, pauses, replays and purges of dead letters work (the local store has both)".to_string());
        }
        if let Ok(addr) = self.admin.addr.parse::<SocketAddr>() {
            if !addr.ip().is_loopback() && self.admin.token.is_none() {
                w.push(format!("admin.addr: {addr} is not loopback and admin.token is not set: anyone who can reach it can read metrics and replay dead letters"));
            }
        }
        w
    }
}

/// Size of the filesystem that holds `path` (or, before the store exists,
/// its nearest existing ancestor).
fn filesystem_size(path: &Path) -> Option<u64> {
    let existing = path.ancestors().find(|p| p.exists() && !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let st = nix::sys::statvfs::statvfs(existing).ok()?;
    Some((st.blocks() as u64).saturating_mul(st.fragment_size() as u64))
}

fn percent_decode(s: &str) -> String {
    percent_encoding::percent_decode_str(s).decode_utf8_lossy().into_owned()
}
