//! What `check` and `run` say about the permissions of the files the relay
//! trusts: its configuration file and its store directory.
//!
//! The store holds callback bodies (and ThingSpace's clear-text credentials
//! inside them, unless sealed at rest); the configuration says where
//! callbacks go and may hold secrets inline. Another local user who can
//! read the one or write either has them. The relay creates its own files
//! 0600 and directories 0700 (the binary adds 077 to its umask at start);
//! these warnings cover what it did not create.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use super::RawConfig;

/// Warnings about `config_file` (the file `raw` was read from) and the
/// store directory it names (when it exists already).
pub fn permission_warnings(raw: &RawConfig, config_file: &Path) -> Vec<String> {
    let mut w = Vec::new();
    if let Ok(meta) = std::fs::metadata(config_file) {
        let mode = meta.permissions().mode();
        if mode & 0o002 != 0 {
            w.push(format!(
                "{}: writable by every user on this machine: anyone can change where callbacks go (chmod o-w)",
                config_file.display()
            ));
        }
        let inline = inline_secrets(raw);
        if mode & 0o004 != 0 && !inline.is_empty() {
            w.push(format!(
                "{}: readable by every user and holds secrets inline ({}): chmod 600 it, or give them as env: or file:",
                config_file.display(),
                inline.join(", ")
            ));
        }
    }
    if raw.store.kind == super::RawStoreKind::Local {
        if let Ok(meta) = std::fs::metadata(&raw.store.path) {
            let mode = meta.permissions().mode();
            let dir = raw.store.path.display();
            if mode & 0o002 != 0 {
                w.push(format!(
                    "store.path: {dir} is writable by every user: anyone can plant or remove files of the store (chmod 700)"
                ));
            } else if mode & 0o077 != 0 {
                w.push(format!(
                    "store.path: {dir} is open to other users (mode {:o}): callback bodies and the credentials in them are readable unless sealed at rest (chmod 700)",
                    mode & 0o777
                ));
            }
        }
    }
    w
}

/// The keys of secrets written inline (not `env:` or `file:`): the masked
/// form of the configuration shows them as `***`.
fn inline_secrets(raw: &RawConfig) -> Vec<String> {
    let mut found = Vec::new();
    if let Ok(value) = toml::Value::try_from(raw) {
        walk(&value, String::new(), &mut found);
    }
    found
}

fn walk(v: &toml::Value, path: String, found: &mut Vec<String>) {
    match v {
        toml::Value::String(s) if s == "***" => found.push(path),
        toml::Value::Table(t) => {
            for (k, v) in t {
                let key = if path.is_empty() { k.clone() } else { format!("{path}.{k}") };
                walk(v, key, found);
            }
        }
        toml::Value::Array(a) => {
            for (i, v) in a.iter().enumerate() {
                walk(v, format!("{path}[{i}]"), found);
            }
        }
        _ => {}
    }
}

/// A file's SHA-256 in hex (empty if it cannot be read): what `/api/config`
/// shows and what a reload compares secret files by.
pub fn sha256_hex(path: &std::path::Path) -> String {
    use sha2::{Digest, Sha256};
    match std::fs::read(path) {
        Ok(bytes) => Sha256::digest(&bytes).iter().map(|b| format!("{b:02x}")).collect(),
        Err(_) => String::new(),
    }
}
