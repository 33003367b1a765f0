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

use std::collections::HashMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

mod check;
pub mod duration;
mod files;
mod raw;
mod validate;

pub use self::check::retain_share_of_disk;
pub use self::files::{permission_warnings, sha256_hex};
pub use self::raw::*;

use figment::providers::{Env, Format, Toml};
use figment::Figment;

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

pub use crate::delivery::Destination;
pub use crate::ingress::{IngressConfig, Route};
pub use crate::secret::{Secret, SecretString};

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
    /// `[notifications]`, if configured.
    pub notifications: Option<crate::events::Settings>,
    /// `[telemetry.otlp]`, if configured.
    pub otlp: Option<crate::otel::OtlpSettings>,
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
    /// `allowed_hosts`, lower case, without a trailing dot.
    pub allowed_hosts: Vec<String>,
}

#[derive(Debug, Clone)]
pub struct StoreConfig {
    pub path: PathBuf,
    pub max_bytes: Option<u64>,
    pub min_free_bytes: Option<u64>,
    pub dedupe_max_keys: usize,
    /// `retain_delivered`: how long messages are kept after delivery
    /// (`None`: not kept; the local store's default is 24 h).
    pub retain_delivered: Option<Duration>,
    /// `retain_max_bytes`: how many bytes of them at most.
    pub retain_max_bytes: RetainBytes,
    /// Encryption keys (id, base64 of 32 bytes), the first seals; empty: off.
    pub encryption: Vec<(String, Secret)>,
    /// `kind = "jetstream"`: the NATS JetStream store instead of the local one.
    pub jetstream: Option<crate::store::JetConfig>,
}

/// The bound on bytes kept after delivery (`store.retain_max_bytes`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RetainBytes {
    /// The default: a tenth of the store's filesystem, measured at open.
    ShareOfDisk,
    Limit(u64),
    /// `0`: bounded only by time and free space.
    Unbounded,
}

/// The default retention of delivered messages with the local store.
pub const DEFAULT_RETAIN_DELIVERED: Duration = Duration::from_secs(24 * 3600);
/// The default `retain_max_bytes`: this share of the store's filesystem.
pub const DEFAULT_RETAIN_SHARE_OF_DISK: f64 = 0.10;

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
                other => {
                    let mut m = other.to_string();
                    if m.contains("expected a duration") {
                        m.push_str(" such as \"30s\", \"500ms\", \"5m\", \"24h\" or \"1h 30m\"");
                    }
                    m
                }
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
        // Issue 23, point 11: the user name is masked too, a local store's
        // printout has no JetStream keys, and durations read as written.
        assert!(printed.contains("***:***@") && !printed.contains("bob"), "{printed}");
        assert!(!printed.contains("max_ack_pending") && !printed.contains("publish_timeout"), "{printed}");
        assert!(!printed.contains("day"), "{printed}");
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

    /// A record must fit in one frame of the message log (1 GiB); a larger
    /// body would be acknowledged and then make the log unreadable.
    #[test]
    fn max_body_beyond_what_the_store_takes_is_refused() {
        let toml = MINIMAL.replace(
            "[[routes]]",
            "[ingress]\nmax_body = 1073741824\nmax_buffered_bytes = 1073741824\n[[routes]]\nmax_body = 600000000",
        );
        let err = load_str(&toml).expect_err("invalid");
        let keys: Vec<_> = err.problems.iter().map(|p| p.key.as_str()).collect();
        assert_eq!(keys, ["ingress.max_body", "routes[0].max_body"], "{err}");
        assert!(err.to_string().contains("at most 536870912 bytes"), "{err}");
        let at_limit = MINIMAL
            .replace("[[routes]]", "[ingress]\nmax_body = 536870912\nmax_buffered_bytes = 536870912\n[[routes]]");
        assert_eq!(load_str(&at_limit).expect("valid").routes[0].max_body, crate::store::MAX_BODY);
    }
}
