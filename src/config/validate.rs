//! Validation: [`RawConfig`] into the typed [`Config`], collecting every
//! problem with its key; plus the warnings `switchboard check` prints.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;

use super::*;

mod destination;
use self::destination::{validate_destination, IngressRules};
mod store;
mod telemetry;
pub(super) use self::store::store_kind;

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
        store::validate_capabilities(&mut p, &self);
        self.check_ingress(&mut p);
        let listeners = self.validate_listeners(&mut p);
        let admin = self.validate_admin(&mut p, &listeners);
        if self.shutdown.grace_period.is_zero() {
            p.add("shutdown.grace_period", "must be greater than 0");
        }
        if tracing_subscriber::EnvFilter::try_new(&self.log.level).is_err() {
            p.add("log.level", format!("invalid log filter {:?}", self.log.level));
        }
        let (destinations, rules) = self.validate_destinations(&mut p);
        let routes = self.validate_routes(&mut p, &rules);
        let notifications = telemetry::validate_notifications(&mut p, &self);
        let otlp = telemetry::validate_otlp(&mut p, &self);
        if let Some(j) = jetstream.as_mut() {
            let mut windows: Vec<Duration> =
                routes.iter().filter_map(|r| r.dedupe.as_ref().map(|d| d.window)).collect();
            windows.sort();
            windows.dedup();
            j.dedupe_windows = windows;
            store::validate_jet_ordering(&mut p, j, &rules);
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
                retain_delivered: match self.store.retain_delivered {
                    Some(d) => (!d.is_zero()).then_some(d),
                    // The default applies to the local store; on JetStream
                    // keeping is opt-in (it doubles what NATS stores).
                    None if store::store_kind(&self) == crate::store::StoreKind::Local => {
                        Some(super::DEFAULT_RETAIN_DELIVERED)
                    }
                    None => None,
                },
                retain_max_bytes: match self.store.retain_max_bytes {
                    None => super::RetainBytes::ShareOfDisk,
                    Some(0) => super::RetainBytes::Unbounded,
                    Some(n) => super::RetainBytes::Limit(n),
                },
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
            notifications,
            otlp,
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

    fn validate_destinations(&self, p: &mut Problems) -> (Vec<Arc<Destination>>, HashMap<String, IngressRules>) {
        let mut destinations = Vec::new();
        let mut rules = HashMap::new();
        for (name, d) in &self.destinations {
            let key = format!("destinations.{name}");
            if !valid_name(name) {
                p.add(&key, "destination names use only letters, digits, '-' and '_' (at most 64)");
                continue;
            }
            if let Some((dest, r)) = validate_destination(p, &key, name, d) {
                destinations.push(Arc::new(dest));
                rules.insert(name.clone(), r);
            }
        }
        if self.destinations.is_empty() {
            p.add("destinations", "no destinations defined");
        }
        (destinations, rules)
    }

    fn validate_routes(&self, p: &mut Problems, rules: &HashMap<String, IngressRules>) -> Vec<Route> {
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
            routes.push(self.validate_route(p, i, r, &known, rules));
        }
        routes
    }

    fn validate_route(
        &self,
        p: &mut Problems,
        i: usize,
        r: &RawRoute,
        known: &HashSet<&str>,
        rules: &HashMap<String, IngressRules>,
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
            dedupe: validate_dedupe(p, &key, r),
            filters: r.destinations.iter().map(|d| rules.get(d).and_then(|x| x.filter.clone())).collect(),
            orders: r.destinations.iter().map(|d| rules.get(d).and_then(|x| x.ordering.clone())).collect(),
        }
    }
}

/// A route's `dedupe` (or the older `dedupe_window`).
fn validate_dedupe(p: &mut Problems, key: &str, r: &RawRoute) -> Option<crate::ingress::dedupe::DedupeRule> {
    match (&r.dedupe, r.dedupe_window) {
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
        (Some(d), None)
            if d.ignore.is_empty() && d.fields.is_empty() && d.headers.is_empty() && sender_id(r).is_some() =>
        {
            // A named sender's own delivery id is the key, unless the route
            // names one (`ingress/providers.rs`).
            let mut rule = crate::ingress::dedupe::DedupeRule { window: d.window, ..Default::default() };
            match sender_id(r) {
                Some(crate::ingress::providers::DeliveryId::Header(h)) => {
                    rule.headers.push(http::HeaderName::from_static(h))
                }
                Some(crate::ingress::providers::DeliveryId::Field(f)) => {
                    if let Ok(steps) = crate::ingress::filter::parse_path(f) {
                        rule.fields.push((f.to_string(), steps));
                    }
                }
                None => {}
            }
            Some(rule)
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
            Some(crate::ingress::dedupe::DedupeRule { window: d.window, ignore: d.ignore.clone(), fields, headers })
        }
        (None, Some(w)) if !w.is_zero() => Some(crate::ingress::dedupe::DedupeRule { window: w, ..Default::default() }),
        (None, _) => None,
    }
}

/// The delivery id of the named sender a route verifies, if any.
fn sender_id(r: &RawRoute) -> Option<crate::ingress::providers::DeliveryId> {
    let auth = r.auth.as_ref()?;
    let providers = auth.providers();
    let (_, provider, _) = providers.first()?;
    provider.delivery_id()
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

fn validate_tls(p: &mut Problems, key: &str, t: &RawTls) -> Option<crate::tls::TlsFiles> {
    let files = crate::tls::TlsFiles { cert: t.cert.clone(), key: t.key.clone() };
    match crate::tls::load(&files) {
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
    let providers = a.providers();
    if set.iter().filter(|x| **x).count() + providers.len() != 1 {
        p.add(
            key,
            "set exactly one of body_fields, basic, header, hmac, github, stripe, shopify, slack, twilio, standard-webhooks, svix",
        );
        return None;
    }
    let before = p.0.len();
    let auth = if let Some((name, provider, raw)) = providers.first() {
        validate_provider(p, key, name, *provider, raw)?
    } else if let Some(b) = &a.body_fields {
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
            HmacScheme::Slack | HmacScheme::Twilio => None,
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
            id_header: None,
            public_url: None,
        })
    } else {
        return None;
    };
    (p.0.len() == before).then_some(auth)
}

/// `[routes.auth.<sender>]` (`ingress/providers.rs`).
fn validate_provider(
    p: &mut Problems,
    key: &str,
    name: &str,
    provider: crate::ingress::providers::Provider,
    raw: &crate::config::raw::RawProvider,
) -> Option<crate::ingress::auth::Auth> {
    let k = format!("{key}.{name}");
    if raw.secrets.is_empty() {
        p.add(format!("{k}.secrets"), "at least one secret");
    }
    if raw.tolerance.is_some() && !provider.signs_time() {
        p.add(format!("{k}.tolerance"), format!("{name} signs no timestamp"));
    }
    let public_url = match (&raw.public_url, provider) {
        (Some(u), crate::ingress::providers::Provider::Twilio) => match url::Url::parse(u) {
            Ok(parsed) if parsed.query().is_none() && matches!(parsed.scheme(), "http" | "https") => Some(u.clone()),
            _ => {
                p.add(format!("{k}.public_url"), "the http(s) URL Twilio calls for this route, without a query");
                None
            }
        },
        (None, crate::ingress::providers::Provider::Twilio) => {
            p.add(format!("{k}.public_url"), "twilio signs the URL it calls: give it (the relay sits behind proxies)");
            None
        }
        (Some(_), _) => {
            p.add(format!("{k}.public_url"), "only used by twilio");
            None
        }
        (None, _) => None,
    };
    let mut secrets = Vec::new();
    for (i, s) in resolve_all(p, &format!("{k}.secrets"), &raw.secrets).into_iter().enumerate() {
        let text = s.expose();
        if provider.base64_keys() {
            use base64::Engine;
            match base64::engine::general_purpose::STANDARD.decode(text.strip_prefix("whsec_").unwrap_or(text)) {
                Ok(b) => secrets.push(b),
                Err(_) => p.add(format!("{k}.secrets[{i}]"), "not a base64 webhook secret (whsec_...)"),
            }
        } else {
            secrets.push(text.as_bytes().to_vec());
        }
    }
    Some(crate::ingress::auth::Auth::Hmac(provider.auth(secrets, raw.tolerance, public_url)))
}

fn percent_decode(s: &str) -> String {
    percent_encoding::percent_decode_str(s).decode_utf8_lossy().into_owned()
}
