//! `[destinations.NAME]` and its sub-tables: the shape and every default.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::*;

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawDestination {
    pub url: String,
    #[serde(default = "default_timeout", with = "crate::config::duration")]
    pub timeout: Duration,
    #[serde(default = "default_connect_timeout", with = "crate::config::duration")]
    pub connect_timeout: Duration,
    #[serde(default = "default_concurrency")]
    pub concurrency: usize,
    /// Extra 4xx statuses to treat as retryable (408 and 429 always are).
    #[serde(default)]
    pub retry_on: Vec<u16>,
    /// Top-level JSON fields removed from the body before forwarding here.
    #[serde(default)]
    pub strip_body_fields: Vec<String>,
    /// Forward the headers that authenticated the sender to us (the route's
    /// `basic` Authorization, `header` secret or `hmac` signature headers).
    /// Off by default: those secrets are ours, not the receiver's.
    #[serde(default)]
    pub forward_sender_credentials: bool,
    /// Accept and queue for this destination, but deliver nothing (maintenance).
    #[serde(default)]
    pub paused: bool,
    /// Extra CA certificates (PEM) trusted for this destination, on top of
    /// the public web roots: for internal CAs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_file: Option<PathBuf>,
    #[serde(default)]
    pub retry: RawRetry,
    /// At most `per_second` attempts a second, `burst` at once (replays and
    /// retries included). Unset: no limit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limit: Option<RawRateLimit>,
    /// Open after `failures` consecutive failed attempts: no attempts for
    /// `cool_down` (doubling while it stays down, up to 10 min), then one
    /// probe. Unset: no breaker.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub breaker: Option<RawBreaker>,
    /// Only callbacks that match are queued for this destination.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub filter: Option<RawFilter>,
    /// For a `nats://` (or `tls://`) URL: the subject to publish to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subject: Option<String>,
    /// For a NATS URL: publish to JetStream and wait for its ack (the
    /// default), or core NATS.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jetstream: Option<bool>,
    /// For a NATS URL: how to authenticate other than `user:password@` in
    /// the URL (TLS: `ca_file` and `tls.client_cert`/`client_key`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nats: Option<RawNatsAuth>,
    /// A script that reshapes what this destination gets
    /// (`delivery/transform.rs`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub transform: Option<RawTransform>,
    /// "none" (the default), "per_key" (with `order_key`: messages with the
    /// same key are attempted one at a time, in arrival order) or "fifo"
    /// (one key for all).
    #[serde(default)]
    pub ordering: RawOrdering,
    /// What `per_key` orders by: a dotted JSON path (`deviceIds.0.id`) or
    /// `header:NAME`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub order_key: Option<String>,
    /// Which of the sender's headers this destination gets: "all" (the
    /// default), `{ allow = [...] }` or `{ deny = [...] }`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub forward_headers: Option<RawForwardHeaders>,
    /// Headers added to every request (values inline, `env:` or `file:`).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub add_headers: BTreeMap<String, SecretString>,
    /// Also send `Forwarded: for=<sender>` (RFC 7239).
    #[serde(default)]
    pub forwarded: bool,
    /// Egress TLS: a client certificate (mTLS) and a minimum version.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<RawDestinationTls>,
    /// Standard Webhooks signing of every request to this destination.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signing: Option<RawSigning>,
}

/// A destination's `filter`: a condition (`path` or `header`, and one of
/// `equals`, `in`, `exists`, `prefix`), or `all`/`any`/`not` of filters.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawFilter {
    /// A JSON body field by dotted path with array indexes: `deviceIds[0].kind`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    /// A request header (by name).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub header: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub equals: Option<serde_json::Value>,
    #[serde(default, rename = "in", skip_serializing_if = "Option::is_none")]
    pub in_: Option<Vec<serde_json::Value>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exists: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prefix: Option<String>,
    /// Compare strings ignoring ASCII case.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub case_insensitive: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub all: Option<Vec<RawFilter>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub any: Option<Vec<RawFilter>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub not: Option<Box<RawFilter>>,
}

/// A route's `dedupe`.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawDedupe {
    #[serde(with = "crate::config::duration")]
    pub window: Duration,
    /// Top-level JSON fields left out of the key (e.g. ThingSpace's
    /// `callbackCount`, which a resend increments).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ignore: Vec<String>,
    /// Instead of the body, these JSON fields (dotted paths with indexes)...
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub fields: Vec<String>,
    /// ...and these headers make the key.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub headers: Vec<String>,
}

/// `forward_headers`: "all", or a list.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(untagged)]
pub enum RawForwardHeaders {
    All(String),
    Lists(RawHeaderLists),
}

/// `{ allow = [...] }` or `{ deny = [...] }` (exactly one).
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawHeaderLists {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub allow: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deny: Option<Vec<String>>,
}

/// A destination's `ordering`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum RawOrdering {
    #[default]
    None,
    PerKey,
    Fifo,
}

/// `breaker = { failures = N, cool_down = "5s" }`.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawBreaker {
    pub failures: u32,
    #[serde(default = "default_cool_down", with = "crate::config::duration")]
    pub cool_down: Duration,
}

fn default_cool_down() -> Duration {
    Duration::from_secs(5)
}

/// `rate_limit = { per_second = N, burst = M }`.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawRateLimit {
    pub per_second: f64,
    /// Attempts allowed at once after a quiet spell; default: one second's worth.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub burst: Option<i64>,
}

/// `[destinations.NAME.tls]`.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawDestinationTls {
    /// PEM chain (leaf first) presented to the destination; with `client_key`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_cert: Option<PathBuf>,
    /// PEM private key of `client_cert` (PKCS#8, PKCS#1 or SEC1).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_key: Option<PathBuf>,
    /// "1.2" (default) or "1.3".
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_version: Option<String>,
}

/// `[destinations.NAME.nats]`: one of a token, an NKey seed or a
/// `.creds` file, as `[store]` takes them for JetStream.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawNatsAuth {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token: Option<SecretString>,
    /// An NKey seed (`SU...`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nkey: Option<SecretString>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub creds_file: Option<PathBuf>,
}

/// `[destinations.NAME.signing]`.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawSigning {
    /// `whsec_...` (HMAC-SHA256, `v1`) or `whsk_...` (Ed25519, `v1a`), inline,
    /// `env:NAME` or `file:/path`; each signs every request (rotation).
    pub secrets: Vec<SecretString>,
}

fn default_timeout() -> Duration {
    Duration::from_secs(30)
}
fn default_connect_timeout() -> Duration {
    Duration::from_secs(10)
}
fn default_concurrency() -> usize {
    8
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawRetry {
    #[serde(default = "default_initial", with = "crate::config::duration")]
    pub initial: Duration,
    #[serde(default = "default_max_interval", with = "crate::config::duration")]
    pub max_interval: Duration,
    #[serde(default = "default_multiplier")]
    pub multiplier: f64,
    #[serde(default = "default_jitter")]
    pub jitter: f64,
    /// 0 means no limit on attempts (then `max_age` bounds retries).
    #[serde(default)]
    pub max_attempts: u32,
    #[serde(default = "default_max_age", with = "crate::config::duration")]
    pub max_age: Duration,
    #[serde(default = "default_retry_after_cap", with = "crate::config::duration")]
    pub retry_after_cap: Duration,
}

impl Default for RawRetry {
    fn default() -> Self {
        RawRetry {
            initial: default_initial(),
            max_interval: default_max_interval(),
            multiplier: default_multiplier(),
            jitter: default_jitter(),
            max_attempts: 0,
            max_age: default_max_age(),
            retry_after_cap: default_retry_after_cap(),
        }
    }
}

// The retry defaults are the policy's own (`RetryPolicy::default`), stated once.
fn retry_default() -> crate::delivery::retry::RetryPolicy {
    crate::delivery::retry::RetryPolicy::default()
}
fn default_initial() -> Duration {
    retry_default().initial
}
fn default_max_interval() -> Duration {
    retry_default().max_interval
}
fn default_multiplier() -> f64 {
    retry_default().multiplier
}
fn default_jitter() -> f64 {
    retry_default().jitter
}
fn default_max_age() -> Duration {
    retry_default().max_age
}
fn default_retry_after_cap() -> Duration {
    retry_default().retry_after_cap
}

/// `[destinations.NAME.transform]`: `script = "file:PATH"` or inline
/// `source`; `timeout` per call; `memory`: bytes, or with `KiB`/`MiB`.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawTransform {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub script: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<String>,
    #[serde(default = "default_transform_timeout", with = "crate::config::duration")]
    pub timeout: Duration,
    #[serde(default = "default_transform_memory")]
    pub memory: RawBytes,
}

fn default_transform_timeout() -> Duration {
    Duration::from_millis(100)
}

fn default_transform_memory() -> RawBytes {
    RawBytes::Text("16MiB".into())
}

/// A size: a number of bytes, or text with a `KiB`, `MiB` or `GiB` suffix.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(untagged)]
pub enum RawBytes {
    Number(u64),
    Text(String),
}

impl RawBytes {
    pub fn bytes(&self) -> Option<u64> {
        match self {
            RawBytes::Number(n) => Some(*n),
            RawBytes::Text(t) => {
                let t = t.trim();
                let (digits, unit) = t.split_at(t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len()));
                let n: u64 = digits.parse().ok()?;
                let mult = match unit.trim() {
                    "" | "B" => 1,
                    "KiB" | "KB" | "K" => 1 << 10,
                    "MiB" | "MB" | "M" => 1 << 20,
                    "GiB" | "GB" | "G" => 1 << 30,
                    _ => return None,
                };
                n.checked_mul(mult)
            }
        }
    }
}
