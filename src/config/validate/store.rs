//! `[store]` with `kind = "jetstream"`, and what that kind cannot do.

use super::*;
use crate::config::raw::RawStoreKind;
use crate::store::{Capability, JetAuth, JetConfig, StoreKind};

/// `store.order_partitions` unless set: a failing head holds one
/// sixteenth of the keys; sixteen lanes per ordered destination.
const DEFAULT_ORDER_PARTITIONS: usize = 16;
/// Each partition is a consumer per ordered destination on the server.
const MAX_ORDER_PARTITIONS: usize = 256;

/// The kind of store the file asks for.
pub(in crate::config) fn store_kind(raw: &RawConfig) -> StoreKind {
    match raw.store.kind {
        RawStoreKind::Local => StoreKind::Local,
        RawStoreKind::Jetstream => StoreKind::JetStream,
    }
}

/// Keys that ask for something the store kind cannot do, each refused
/// with the capability table's reason (`store/capabilities.rs`).
pub(super) fn validate_capabilities(p: &mut Problems, raw: &RawConfig) {
    let caps = store_kind(raw).capabilities();
    let mut refuse = |key: String, c: Capability| {
        if let Some(why) = caps.refusal(c) {
            p.add(key, why);
        }
    };
    if raw.store.retain_delivered.is_some_and(|d| !d.is_zero()) {
        refuse("store.retain_delivered".into(), Capability::Retention);
    }
    if raw.store.encryption.is_some() {
        refuse("store.encryption".into(), Capability::EncryptionAtRest);
    }
    for (i, r) in raw.routes.iter().enumerate() {
        if !r.index.is_empty() {
            refuse(format!("routes[{i}].index"), Capability::Lookup);
        }
    }
    for (name, d) in &raw.destinations {
        if d.ordering != crate::config::raw::RawOrdering::None {
            refuse(format!("destinations.{name}.ordering"), Capability::Ordering);
        }
    }
}

/// Ordering on JetStream (`jetstream/lanes.rs`): a callback's partition is
/// in the subject it is published to, so every `per_key` destination
/// orders by the same `order_key` (one subject per callback); `fifo` ones
/// take every partition.
pub(super) fn validate_jet_ordering(p: &mut Problems, j: &mut JetConfig, rules: &HashMap<String, IngressRules>) {
    use crate::ingress::order::OrderKey;
    use crate::store::JetOrder;
    let mut names: Vec<&String> = rules.keys().collect();
    names.sort();
    let mut shared: Option<(&str, &OrderKey)> = None;
    for name in names {
        let Some(key) = rules[name].ordering.as_deref() else { continue };
        if *key == OrderKey::Fifo {
            j.ordered.insert(name.clone(), JetOrder::Fifo);
            continue;
        }
        match shared {
            Some((first, k)) if k != key => p.add(
                format!("destinations.{name}.order_key"),
                format!(
                    "with store.kind = \"jetstream\" every per_key destination orders by the same order_key as destinations.{first} (a callback's partition is in the subject it is published to)"
                ),
            ),
            Some(_) => {}
            None => shared = Some((name, key)),
        }
        j.ordered.insert(name.clone(), JetOrder::PerKey);
    }
}

/// The JetStream settings, `None` for the local store (or with problems
/// recorded). Keys of the other kind are refused, so a file never says
/// something the relay ignores.
pub(super) fn validate_store_kind(p: &mut Problems, raw: &RawConfig) -> Option<JetConfig> {
    let s = &raw.store;
    let jet_keys = [
        ("servers", !s.servers.is_empty()),
        ("user", s.user.is_some()),
        ("password", s.password.is_some()),
        ("token", s.token.is_some()),
        ("nkey", s.nkey.is_some()),
        ("creds_file", s.creds_file.is_some()),
        ("ca_file", s.ca_file.is_some()),
        ("client_cert", s.client_cert.is_some()),
        ("client_key", s.client_key.is_some()),
        ("order_partitions", s.order_partitions.is_some()),
    ];
    if s.kind == RawStoreKind::Local {
        for (key, set) in jet_keys {
            if set {
                p.add(format!("store.{key}"), "only used with store.kind = \"jetstream\"");
            }
        }
        return None;
    }
    if s.servers.is_empty() {
        p.add("store.servers", "kind = \"jetstream\" needs at least one server (nats://host:port)");
    }
    for (i, server) in s.servers.iter().enumerate() {
        if server.parse::<async_nats::ServerAddr>().is_err() {
            p.add(format!("store.servers[{i}]"), format!("{server:?} is not a NATS server address (nats://host:port)"));
        }
    }
    if !valid_name(&s.stream) {
        p.add("store.stream", "1-64 characters of A-Z, a-z, 0-9, '-' and '_'");
    }
    if ![1, 3].contains(&s.replicas) {
        p.add("store.replicas", "must be 1 or 3");
    }
    if s.ack_wait < Duration::from_secs(3) {
        p.add("store.ack_wait", "must be at least 3s (leases are renewed every third of it)");
    }
    if s.publish_timeout.is_zero() {
        p.add("store.publish_timeout", "must be greater than 0");
    }
    if s.order_partitions.is_some_and(|n| !(1..=MAX_ORDER_PARTITIONS).contains(&n)) {
        p.add("store.order_partitions", format!("must be 1 to {MAX_ORDER_PARTITIONS}"));
    }
    if s.max_ack_pending == 0 {
        p.add("store.max_ack_pending", "must be greater than 0");
    }
    let auth = match (&s.user, &s.password, &s.token, &s.nkey, &s.creds_file) {
        (None, None, None, None, None) => JetAuth::None,
        (Some(user), Some(pw), None, None, None) => {
            JetAuth::UserPassword { user: user.clone(), password: resolve(p, "store.password", pw)? }
        }
        (None, None, Some(t), None, None) => JetAuth::Token(resolve(p, "store.token", t)?),
        (None, None, None, Some(k), None) => JetAuth::NKey(resolve(p, "store.nkey", k)?),
        (None, None, None, None, Some(f)) => JetAuth::CredsFile(f.clone()),
        (Some(_), None, ..) | (None, Some(_), ..) => {
            p.add("store.password", "user and password go together");
            return None;
        }
        _ => {
            p.add("store", "one way to authenticate: user/password, token, nkey or creds_file");
            return None;
        }
    };
    let client_cert = match (&s.client_cert, &s.client_key) {
        (Some(c), Some(k)) => Some((c.clone(), k.clone())),
        (None, None) => None,
        _ => {
            p.add("store.client_key", "client_cert and client_key go together");
            None
        }
    };
    Some(JetConfig {
        servers: s.servers.clone(),
        stream: s.stream.clone(),
        replicas: s.replicas,
        auth,
        ca_file: s.ca_file.clone(),
        client_cert,
        max_bytes: (s.max_bytes > 0).then_some(s.max_bytes),
        dedupe_windows: Vec::new(),
        max_ack_pending: s.max_ack_pending,
        ack_wait: s.ack_wait,
        publish_timeout: s.publish_timeout,
        order_partitions: s.order_partitions.unwrap_or(DEFAULT_ORDER_PARTITIONS) as u64,
        ordered: HashMap::new(),
        // Off unless set: the copy doubles what NATS stores (kept.rs).
        retain: s.retain_delivered.filter(|d| !d.is_zero()).map(|d| (d, s.retain_max_bytes.filter(|b| *b > 0))),
        sealer: None,
    })
}
