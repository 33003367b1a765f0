//! What `switchboard check` says besides problems: the configuration as
//! TOML with secrets masked, and warnings that do not fail it (exposure
//! risks, ports ThingSpace cannot reach). Permissions of the files are in
//! `files.rs`.

use std::net::SocketAddr;
use std::path::Path;

use super::*;

impl RawConfig {
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

    /// How long and how much of delivered messages is kept, defaults
    /// included (for `switchboard check`: a default of 24 h is not in the
    /// file, and "did it reach billing?" depends on it).
    pub fn retention_summary(&self) -> String {
        let caps = super::validate::store_kind(self).capabilities();
        let time = match self.store.retain_delivered {
            Some(d) if d.is_zero() => return "not kept (store.retain_delivered = \"0s\")".to_string(),
            Some(d) => format!("kept {} (store.retain_delivered)", crate::config::duration::format(d)),
            None if !caps.has(crate::store::Capability::Retention) => {
                return format!("not kept ({})", caps.refusal(crate::store::Capability::Retention).unwrap_or_default())
            }
            None if caps.kind() != crate::store::StoreKind::Local => {
                return format!(
                "not kept (the default on JetStream: set store.retain_delivered to keep them in the stream {}-kept)",
                self.store.stream
            )
            }
            None => format!(
                "kept {} (store.retain_delivered, the default)",
                crate::config::duration::format(super::DEFAULT_RETAIN_DELIVERED)
            ),
        };
        if caps.kind() != crate::store::StoreKind::Local {
            let bytes = match self.store.retain_max_bytes {
                Some(n) if n > 0 => format!("at most {n} bytes (store.retain_max_bytes)"),
                _ => "no byte bound".to_string(),
            };
            return format!("{time} in the stream {}-kept, {bytes}; NATS expires the oldest first", self.store.stream);
        }
        let bytes = match self.store.retain_max_bytes {
            Some(0) => "no byte bound (store.retain_max_bytes = 0)".to_string(),
            Some(n) => format!("at most {n} bytes (store.retain_max_bytes)"),
            None => match retain_share_of_disk(&self.store.path) {
                Some(n) => format!(
                    "at most {n} bytes, a tenth of the store's filesystem (store.retain_max_bytes, the default)"
                ),
                None => "at most a tenth of the store's filesystem (store.retain_max_bytes, the default)".to_string(),
            },
        };
        format!("{time}, {bytes}; the oldest go first when the disk runs low")
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
        if self.store.retain_delivered.is_some_and(|d| !d.is_zero())
            && self.store.min_free_bytes == 0
            && super::validate::store_kind(self) == crate::store::StoreKind::Local
        {
            w.push("store.retain_delivered with store.min_free_bytes = 0: nothing stops retained messages from filling the disk (retention yields to new callbacks only below twice min_free_bytes)".to_string());
        }
        let caps = super::validate::store_kind(self).capabilities();
        let lacking: Vec<&str> =
            crate::store::Capability::ALL.iter().filter(|c| !caps.has(**c)).map(|c| c.what()).collect();
        if !lacking.is_empty() {
            w.push(format!(
                "store.kind: \"{}\" does not provide {} (the admin API answers 501 for them; the local store has them)",
                caps.kind(),
                lacking.join(", ")
            ));
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
/// The default `store.retain_max_bytes` for a store at `path`: a tenth of
/// its filesystem (`None` if it cannot be measured).
pub fn retain_share_of_disk(path: &Path) -> Option<u64> {
    filesystem_size(path).map(|size| (size as f64 * super::DEFAULT_RETAIN_SHARE_OF_DISK) as u64)
}

fn filesystem_size(path: &Path) -> Option<u64> {
    let existing = path.ancestors().find(|p| p.exists() && !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let st = nix::sys::statvfs::statvfs(existing).ok()?;
    Some((st.blocks() as u64).saturating_mul(st.fragment_size() as u64))
}
