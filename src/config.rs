//! Configuration: loading, layering and validation.
//!
//! Loading happens in two stages, as STYLE.md asks:
//! 1. figment merges the built-in defaults, the TOML file and `SWITCHBOARD_`
//!    environment variables (`__` separates nesting levels, so
//!    `SWITCHBOARD_STORE__PATH=/data` sets `store.path`) into [`RawConfig`], whose
//!    structs deny unknown fields.
//! 2. [`RawConfig::validate`] turns that into the typed [`Config`] the relay runs
//!    on, collecting *every* problem it finds, each naming the file and the key.
//!
//! The raw structs double as the documented shape: `switchboard check` prints
//! them back (with defaults filled in and secrets masked).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use figment::providers::{Env, Format, Toml};
use figment::Figment;
use serde::{Deserialize, Serialize};

/// Top-level keys the environment may override. Other `SWITCHBOARD_*` variables
/// (e.g. `SWITCHBOARD_CONFIG`, used by the CLI) are not configuration keys.
const ENV_SECTIONS: &[&str] = &["store", "ingress", "admin", "log", "shutdown", "destinations"];

/// A configuration problem: the file, the key and what is wrong with it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    pub key: String,
    pub message: String,
}

/// Every problem found in one configuration file.
#[derive(Debug, thiserror::Error)]
pub struct ConfigError {
    pub file: PathBuf,
    pub problems: Vec<Problem>,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let file = self.file.display();
        match self.problems.as_slice() {
            [one] => write!(f, "invalid config {file}: {}: {}", one.key, one.message),
            many => {
                write!(f, "invalid config {file}: {} problems", many.len())?;
                for p in many {
                    write!(f, "\n  {}: {}", p.key, p.message)?;
                }
                Ok(())
            }
        }
    }
}

/// A string that must never be printed: `Debug`, `Display` and `Serialize` show a mask.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Secret(value.into())
    }
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("\"***\"")
    }
}

impl Serialize for Secret {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str("***")
    }
}

/// A secret as written in the file: a literal, `env:NAME` or `file:/path`.
/// Printing shows references as written and literals masked.
#[derive(Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(transparent)]
pub struct SecretString(pub String);

impl fmt::Debug for SecretString {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.is_reference() {
            write!(f, "{:?}", self.0)
        } else {
            f.write_str("\"***\"")
        }
    }
}

impl SecretString {
    fn is_reference(&self) -> bool {
        self.0.starts_with("env:") || self.0.starts_with("file:")
    }
}

impl Serialize for SecretString {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        if self.is_reference() {
            s.serialize_str(&self.0)
        } else {
            s.serialize_str("***")
        }
    }
}

// ---------------------------------------------------------------------------
// Raw configuration: exactly what the file says, with defaults filled in.
// ---------------------------------------------------------------------------

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawConfig {
    #[serde(default)]
    pub store: RawStore,
    #[serde(default)]
    pub ingress: RawIngress,
    #[serde(default)]
    pub listeners: Vec<RawListener>,
    #[serde(default)]
    pub admin: RawAdmin,
    #[serde(default)]
    pub log: RawLog,
    #[serde(default)]
    pub shutdown: RawShutdown,
    #[serde(default)]
    pub routes: Vec<RawRoute>,
    #[serde(default)]
    pub destinations: BTreeMap<String, RawDestination>,
    #[serde(default)]
    pub check: RawCheck,
}

/// Settings used only by `switchboard check`.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawCheck {
    /// Ports a sender can register (ThingSpace's by default): `check` warns
    /// about ingress listeners elsewhere. Single ports or "a-b" ranges.
    #[serde(default = "default_public_ports")]
    pub public_ports: Vec<String>,
}

impl Default for RawCheck {
    fn default() -> Self {
        RawCheck { public_ports: default_public_ports() }
    }
}

fn default_public_ports() -> Vec<String> {
    ["80", "443", "9001-9006", "50551-50559", "28200-28220"].map(String::from).to_vec()
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawTls {
    /// PEM certificate chain, leaf first.
    pub cert: PathBuf,
    /// PEM private key (PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
}

/// Exactly one of the members may be set.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawAuth {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub body_fields: Option<RawBodyFields>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub basic: Option<RawBasic>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub header: Option<RawHeaderAuth>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hmac: Option<RawHmac>,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawBodyFields {
    pub username: SecretString,
    pub passwords: Vec<SecretString>,
    #[serde(default = "default_username_field")]
    pub username_field: String,
    #[serde(default = "default_password_field")]
    pub password_field: String,
}

fn default_username_field() -> String {
    "username".into()
}
fn default_password_field() -> String {
    "password".into()
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawBasic {
    pub username: SecretString,
    pub passwords: Vec<SecretString>,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawHeaderAuth {
    pub name: String,
    pub values: Vec<SecretString>,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawHmac {
    #[serde(default = "default_hmac_scheme")]
    pub scheme: crate::auth::HmacScheme,
    /// Signature header (defaults: plain none, stripe `Stripe-Signature`,
    /// standard-webhooks `webhook-signature`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub header: Option<String>,
    #[serde(default)]
    pub prefix: String,
    #[serde(default = "default_hmac_encoding")]
    pub encoding: crate::auth::Encoding,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timestamp_header: Option<String>,
    #[serde(default = "default_tolerance", with = "humantime_serde")]
    pub tolerance: Duration,
    pub secrets: Vec<SecretString>,
}

fn default_hmac_scheme() -> crate::auth::HmacScheme {
    crate::auth::HmacScheme::Plain
}
fn default_hmac_encoding() -> crate::auth::Encoding {
    crate::auth::Encoding::Hex
}
fn default_tolerance() -> Duration {
    Duration::from_secs(300)
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawStore {
    #[serde(default = "default_store_path")]
    pub path: PathBuf,
    /// Upper bound on the bytes of stored messages; 0 means no limit.
    #[serde(default)]
    pub max_bytes: u64,
    /// Refuse callbacks while the store's filesystem has less free space; 0 disables.
    #[serde(default = "default_min_free_bytes")]
    pub min_free_bytes: u64,
}

fn default_min_free_bytes() -> u64 {
    64 * 1024 * 1024
}

impl Default for RawStore {
    fn default() -> Self {
        RawStore { path: default_store_path(), max_bytes: 0, min_free_bytes: default_min_free_bytes() }
    }
}

fn default_store_path() -> PathBuf {
    PathBuf::from("./data")
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawIngress {
    #[serde(default = "default_max_body")]
    pub max_body: u64,
    #[serde(default = "default_header_read_timeout", with = "humantime_serde")]
    pub header_read_timeout: Duration,
    #[serde(default = "default_body_read_timeout", with = "humantime_serde")]
    pub body_read_timeout: Duration,
    #[serde(default = "default_max_connections")]
    pub max_connections: usize,
    #[serde(default = "default_max_headers")]
    pub max_headers: usize,
    #[serde(default = "default_retry_after", with = "humantime_serde")]
    pub retry_after: Duration,
}

impl Default for RawIngress {
    fn default() -> Self {
        RawIngress {
            max_body: default_max_body(),
            header_read_timeout: default_header_read_timeout(),
            body_read_timeout: default_body_read_timeout(),
            max_connections: default_max_connections(),
            max_headers: default_max_headers(),
            retry_after: default_retry_after(),
        }
    }
}

fn default_max_body() -> u64 {
    1024 * 1024
}
fn default_header_read_timeout() -> Duration {
    Duration::from_secs(10)
}
fn default_body_read_timeout() -> Duration {
    Duration::from_secs(30)
}
fn default_max_connections() -> usize {
    1024
}
fn default_max_headers() -> usize {
    100
}
fn default_retry_after() -> Duration {
    Duration::from_secs(5)
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawListener {
    pub addr: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<RawTls>,
    /// Peers whose `X-Forwarded-For` / `Forwarded` headers are believed.
    #[serde(default)]
    pub trusted_proxies: Vec<ipnet::IpNet>,
    /// Client addresses this listener accepts (empty: all).
    #[serde(default)]
    pub allow_ips: Vec<ipnet::IpNet>,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawAdmin {
    #[serde(default = "default_admin_addr")]
    pub addr: String,
    /// Bearer token required for everything but /healthz and /readyz.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token: Option<SecretString>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<RawTls>,
}

impl Default for RawAdmin {
    fn default() -> Self {
        RawAdmin { addr: default_admin_addr(), token: None, tls: None }
    }
}

fn default_admin_addr() -> String {
    "127.0.0.1:9090".to_string()
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Human,
    Json,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawLog {
    #[serde(default)]
    pub format: LogFormat,
    #[serde(default = "default_log_level")]
    pub level: String,
}

impl Default for RawLog {
    fn default() -> Self {
        RawLog { format: LogFormat::Human, level: default_log_level() }
    }
}

fn default_log_level() -> String {
    "info".to_string()
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawShutdown {
    #[serde(default = "default_grace", with = "humantime_serde")]
    pub grace_period: Duration,
}

impl Default for RawShutdown {
    fn default() -> Self {
        RawShutdown { grace_period: default_grace() }
    }
}

fn default_grace() -> Duration {
    Duration::from_secs(20)
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawRoute {
    pub path: String,
    pub destinations: Vec<String>,
    /// Overrides `ingress.max_body` for this route.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_body: Option<u64>,
    /// Client addresses allowed on this route (empty: all).
    #[serde(default)]
    pub allow_ips: Vec<ipnet::IpNet>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub auth: Option<RawAuth>,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawDestination {
    pub url: String,
    #[serde(default = "default_timeout", with = "humantime_serde")]
    pub timeout: Duration,
    #[serde(default = "default_connect_timeout", with = "humantime_serde")]
    pub connect_timeout: Duration,
    #[serde(default = "default_concurrency")]
    pub concurrency: usize,
    /// Extra 4xx statuses to treat as retryable (408 and 429 always are).
    #[serde(default)]
    pub retry_on: Vec<u16>,
    /// Top-level JSON fields removed from the body before forwarding here.
    #[serde(default)]
    pub strip_body_fields: Vec<String>,
    /// Accept and queue for this destination, but deliver nothing (maintenance).
    #[serde(default)]
    pub paused: bool,
    /// Extra CA certificates (PEM) trusted for this destination, on top of
    /// the public web roots: for internal CAs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_file: Option<PathBuf>,
    #[serde(default)]
    pub retry: RawRetry,
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
    #[serde(default = "default_initial", with = "humantime_serde")]
    pub initial: Duration,
    #[serde(default = "default_max_interval", with = "humantime_serde")]
    pub max_interval: Duration,
    #[serde(default = "default_multiplier")]
    pub multiplier: f64,
    #[serde(default = "default_jitter")]
    pub jitter: f64,
    /// 0 means no limit on attempts (then `max_age` bounds retries).
    #[serde(default)]
    pub max_attempts: u32,
    #[serde(default = "default_max_age", with = "humantime_serde")]
    pub max_age: Duration,
    #[serde(default = "default_retry_after_cap", with = "humantime_serde")]
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

fn default_initial() -> Duration {
    Duration::from_secs(1)
}
fn default_max_interval() -> Duration {
    Duration::from_secs(600)
}
fn default_multiplier() -> f64 {
    2.0
}
fn default_jitter() -> f64 {
    0.2
}
fn default_max_age() -> Duration {
    Duration::from_secs(24 * 3600)
}
fn default_retry_after_cap() -> Duration {
    Duration::from_secs(3600)
}

// ---------------------------------------------------------------------------
// Validated configuration: what the relay runs on.
// ---------------------------------------------------------------------------

#[derive(Debug, Clone)]
pub struct Config {
    /// The file this configuration came from (for messages).
    pub source: PathBuf,
    pub store: StoreConfig,
    pub ingress: IngressConfig,
    pub listeners: Vec<Listener>,
    pub admin: AdminConfig,
    pub log: RawLog,
    pub grace_period: Duration,
    pub routes: Vec<Route>,
    pub destinations: Vec<Arc<Destination>>,
}

#[derive(Debug, Clone)]
pub struct Listener {
    pub addr: SocketAddr,
    pub tls: Option<crate::tls::TlsFiles>,
    pub trusted_proxies: Vec<ipnet::IpNet>,
    pub allow_ips: Vec<ipnet::IpNet>,
}

#[derive(Debug, Clone)]
pub struct AdminConfig {
    pub addr: SocketAddr,
    pub token: Option<Secret>,
    pub tls: Option<crate::tls::TlsFiles>,
}

#[derive(Debug, Clone)]
pub struct StoreConfig {
    pub path: PathBuf,
    pub max_bytes: Option<u64>,
    pub min_free_bytes: Option<u64>,
}

#[derive(Debug, Clone)]
pub struct IngressConfig {
    pub max_body: u64,
    pub header_read_timeout: Duration,
    pub body_read_timeout: Duration,
    pub max_connections: usize,
    pub max_headers: usize,
    pub retry_after: Duration,
}

#[derive(Debug, Clone)]
pub struct Route {
    pub path: String,
    pub destinations: Vec<Arc<str>>,
    pub max_body: u64,
    pub allow_ips: Vec<ipnet::IpNet>,
    pub auth: Option<Arc<crate::auth::Auth>>,
}

#[derive(Debug, Clone)]
pub struct Destination {
    pub name: Arc<str>,
    /// The target URL without any userinfo (that moves to `basic_auth`).
    pub url: http::Uri,
    /// `user:password` taken from the URL, sent as HTTP Basic credentials.
    pub basic_auth: Option<Secret>,
    pub timeout: Duration,
    pub connect_timeout: Duration,
    pub concurrency: usize,
    pub strip_body_fields: Vec<String>,
    pub paused: bool,
    /// Extra trusted CA certificates, already loaded.
    pub extra_roots: Vec<rustls::pki_types::CertificateDer<'static>>,
    pub retry: crate::retry::RetryPolicy,
}

impl Config {
    /// Loads and validates `path`, with `SWITCHBOARD_` environment overrides.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        Self::load_raw(path)?.validate(path)
    }

    /// Loads `path` with environment overrides into the raw (unvalidated) shape.
    pub fn load_raw(path: &Path) -> Result<RawConfig, ConfigError> {
        if !path.is_file() {
            return Err(ConfigError {
                file: path.to_path_buf(),
                problems: vec![Problem {
                    key: "(file)".into(),
                    message: "cannot read file: not found or not a regular file".into(),
                }],
            });
        }
        let env = Env::prefixed("SWITCHBOARD_").split("__").filter(|key| {
            let top = key.as_str().split('.').next().unwrap_or_default();
            ENV_SECTIONS.iter().any(|s| s.eq_ignore_ascii_case(top))
        });
        Figment::new()
            .merge(Toml::file_exact(path))
            .merge(env)
            .extract::<RawConfig>()
            .map_err(|e| from_figment(path, e))
    }

    pub fn destination(&self, name: &str) -> Option<&Arc<Destination>> {
        self.destinations.iter().find(|d| &*d.name == name)
    }
}

fn from_figment(path: &Path, err: figment::Error) -> ConfigError {
    let problems = err
        .into_iter()
        .map(|e| {
            let mut key = e.path.join(".");
            if key.is_empty() {
                key = "(top level)".into();
            }
            let mut message = match &e.kind {
                figment::error::Kind::UnknownField(field, expected) => {
                    if e.path.last() != Some(field) {
                        key = if key == "(top level)" { field.clone() } else { format!("{key}.{field}") };
                    }
                    format!("unknown key `{field}` (expected one of: {})", expected.join(", "))
                }
                figment::error::Kind::MissingField(field) if e.path.last().map(String::as_str) != Some(field) => {
                    key = if key == "(top level)" { field.to_string() } else { format!("{key}.{field}") };
                    "required key is missing".to_string()
                }
                figment::error::Kind::MissingField(_) => "required key is missing".to_string(),
                other => other.to_string(),
            };
            if let Some(figment::Source::Custom(s)) = e.metadata.as_ref().and_then(|m| m.source.as_ref()) {
                message.push_str(&format!(" (from {s})"));
            } else if e.metadata.as_ref().is_some_and(|m| m.name.contains("environment")) {
                message.push_str(" (from environment)");
            }
            Problem { key, message }
        })
        .collect();
    ConfigError { file: path.to_path_buf(), problems }
}

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

        let ing = &self.ingress;
        if ing.max_body == 0 {
            p.add("ingress.max_body", "must be greater than 0");
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

        if self.listeners.is_empty() {
            p.add("listeners", "no listeners: add at least one [[listeners]] with an addr");
        }
        let mut listeners: Vec<Listener> = Vec::new();
        for (i, l) in self.listeners.iter().enumerate() {
            let tls = l.tls.as_ref().and_then(|t| validate_tls(&mut p, &format!("listeners[{i}].tls"), t));
            if let Some(a) = parse_addr(&mut p, &format!("listeners[{i}].addr"), &l.addr) {
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
        let admin_tls = self.admin.tls.as_ref().and_then(|t| validate_tls(&mut p, "admin.tls", t));
        let admin_token = self.admin.token.as_ref().and_then(|t| resolve(&mut p, "admin.token", t));
        let admin = parse_addr(&mut p, "admin.addr", &self.admin.addr);
        if let Some(a) = admin {
            if a.port() != 0
                && listeners.iter().map(|l| l.addr).any(|l| {
                    l.port() == a.port() && (l.ip() == a.ip() || l.ip().is_unspecified() || a.ip().is_unspecified())
                })
            {
                p.add("admin.addr", format!("admin and ingress listener on the same address {a}"));
            }
        }

        if self.shutdown.grace_period.is_zero() {
            p.add("shutdown.grace_period", "must be greater than 0");
        }
        if tracing_subscriber::EnvFilter::try_new(&self.log.level).is_err() {
            p.add("log.level", format!("invalid log filter {:?}", self.log.level));
        }

        let mut destinations = Vec::new();
        for (name, d) in &self.destinations {
            let key = format!("destinations.{name}");
            if !valid_name(name) {
                p.add(&key, "destination names use only letters, digits, '-' and '_' (at most 64)");
                continue;
            }
            if let Some(dest) = validate_destination(&mut p, &key, name, d) {
                destinations.push(Arc::new(dest));
            }
        }
        if self.destinations.is_empty() {
            p.add("destinations", "no destinations defined");
        }

        let known: HashSet<&str> = self.destinations.keys().map(String::as_str).collect();
        let mut paths = HashSet::new();
        let mut routes = Vec::new();
        if self.routes.is_empty() {
            p.add("routes", "no routes: add at least one [[routes]] with a path");
        }
        for (i, r) in self.routes.iter().enumerate() {
            let key = format!("routes[{i}]");
            if !r.path.starts_with('/') {
                p.add(format!("{key}.path"), format!("route path {:?} must start with '/'", r.path));
            } else if r.path.parse::<http::uri::PathAndQuery>().is_err() || r.path.contains('?') {
                p.add(format!("{key}.path"), format!("route path {:?} is not a valid URL path", r.path));
            }
            if !paths.insert(r.path.as_str()) {
                p.add(format!("{key}.path"), format!("duplicate route path {:?}", r.path));
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
            let auth = r.auth.as_ref().and_then(|a| validate_auth(&mut p, &format!("{key}.auth"), a)).map(Arc::new);
            routes.push(Route {
                path: r.path.clone(),
                destinations: r.destinations.iter().map(|d| Arc::from(d.as_str())).collect(),
                max_body: r.max_body.unwrap_or(self.ingress.max_body),
                allow_ips: r.allow_ips.clone(),
                auth,
            });
        }

        if !p.0.is_empty() {
            return Err(ConfigError { file: file.to_path_buf(), problems: p.0 });
        }
        // Every `parse_addr` above succeeded, or a problem was recorded.
        let Some(admin) = admin else { unreachable!("admin address problems are reported above") };
        Ok(Config {
            source: file.to_path_buf(),
            store: StoreConfig {
                path: self.store.path,
                max_bytes: (self.store.max_bytes > 0).then_some(self.store.max_bytes),
                min_free_bytes: (self.store.min_free_bytes > 0).then_some(self.store.min_free_bytes),
            },
            ingress: IngressConfig {
                max_body: self.ingress.max_body,
                header_read_timeout: self.ingress.header_read_timeout,
                body_read_timeout: self.ingress.body_read_timeout,
                max_connections: self.ingress.max_connections,
                max_headers: self.ingress.max_headers,
                retry_after: self.ingress.retry_after,
            },
            listeners,
            admin: AdminConfig { addr: admin, token: admin_token, tls: admin_tls },
            log: self.log,
            grace_period: self.shutdown.grace_period,
            routes,
            destinations,
        })
    }

    /// The configuration as TOML, secrets masked (for `switchboard check`).
    pub fn to_masked_toml(&self) -> String {
        let mut masked = self.clone();
        for d in masked.destinations.values_mut() {
            d.url = mask_url_userinfo(&d.url);
        }
        toml::to_string_pretty(&masked).unwrap_or_else(|e| format!("# cannot print config: {e}\n"))
    }
}

/// Replaces the password in `user:password@` with `***`.
fn mask_url_userinfo(url: &str) -> String {
    match url::Url::parse(url) {
        Ok(mut u) if u.password().is_some() => {
            let _ = u.set_password(Some("***"));
            u.to_string()
        }
        _ => url.to_string(),
    }
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
    if p.0.len() != before {
        return None;
    }
    Some(Destination {
        name: Arc::from(name),
        url: uri?,
        basic_auth,
        timeout: d.timeout,
        connect_timeout: d.connect_timeout,
        concurrency: d.concurrency,
        strip_body_fields: d.strip_body_fields.clone(),
        paused: d.paused,
        extra_roots,
        retry: crate::retry::RetryPolicy {
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

fn resolve(p: &mut Problems, key: &str, raw: &SecretString) -> Option<Secret> {
    match crate::auth::resolve_secret(&raw.0) {
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

fn validate_auth(p: &mut Problems, key: &str, a: &RawAuth) -> Option<crate::auth::Auth> {
    use crate::auth::{Auth, HmacAuth, HmacScheme};
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
        if let Ok(addr) = self.admin.addr.parse::<SocketAddr>() {
            if !addr.ip().is_loopback() && self.admin.token.is_none() {
                w.push(format!("admin.addr: {addr} is not loopback and admin.token is not set: anyone who can reach it can read metrics and replay dead letters"));
            }
        }
        w
    }
}

fn percent_decode(s: &str) -> String {
    percent_encoding::percent_decode_str(s).decode_utf8_lossy().into_owned()
}

/// Lookup from route path to route, for ingress.
pub fn route_table(routes: &[Route]) -> HashMap<String, Arc<Route>> {
    routes.iter().map(|r| (r.path.clone(), Arc::new(r.clone()))).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load_str(toml: &str) -> Result<Config, ConfigError> {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("c.toml");
        std::fs::write(&path, toml).expect("write");
        Config::load(&path)
    }

    const MINIMAL: &str = r#"
[[listeners]]
addr = "127.0.0.1:0"
[[routes]]
path = "/in"
destinations = ["a"]
[destinations.a]
url = "http://127.0.0.1:1/x"
"#;

    #[test]
    fn minimal_config_gets_defaults() {
        let c = load_str(MINIMAL).expect("valid");
        assert_eq!(c.ingress.max_body, 1024 * 1024);
        assert_eq!(c.destinations[0].concurrency, 8);
        assert_eq!(c.destinations[0].timeout, Duration::from_secs(30));
        assert_eq!(c.routes[0].max_body, 1024 * 1024);
    }

    #[test]
    fn userinfo_moves_to_basic_auth_and_is_masked() {
        let toml = MINIMAL.replace("http://127.0.0.1:1/x", "http://bob:s3cr%40t@127.0.0.1:1/x");
        let c = load_str(&toml).expect("valid");
        let d = &c.destinations[0];
        assert_eq!(d.basic_auth.as_ref().map(Secret::expose), Some("bob:s3cr@t"));
        assert_eq!(d.url.to_string(), "http://127.0.0.1:1/x");
        assert!(!format!("{d:?}").contains("s3cr"));
        let raw: RawConfig = toml::from_str(&toml).expect("raw");
        let printed = raw.to_masked_toml();
        assert!(!printed.contains("s3cr"), "{printed}");
        assert!(printed.contains("bob:***@"), "{printed}");
    }

    #[test]
    fn all_problems_are_reported_with_keys() {
        let toml = r#"
[[routes]]
path = "/in"
destinations = ["nope"]
[destinations.a]
url = "ftp://x/y"
concurrency = 0
"#;
        let err = load_str(toml).expect_err("invalid");
        let keys: Vec<_> = err.problems.iter().map(|p| p.key.as_str()).collect();
        assert!(keys.contains(&"listeners"), "{err}");
        assert!(keys.contains(&"routes[0].destinations[0]"), "{err}");
        assert!(keys.contains(&"destinations.a.url"), "{err}");
        assert!(keys.contains(&"destinations.a.concurrency"), "{err}");
        assert!(err.to_string().contains("c.toml"), "{err}");
    }
}
