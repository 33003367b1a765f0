//! The configuration file's shape: what TOML and `SWITCHBOARD_` variables may
//! say, with every default. `deny_unknown_fields` everywhere, so a typo is an
//! error naming the key. These structs are also what `switchboard check`
//! prints (secrets masked); validation into typed values is in the parent.
//!
//! The file format's one reference: a struct per table with its defaults
//! and a doc line per key. `destination.rs` holds `[destinations.NAME]`
//! and its sub-tables.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::SecretString;

mod destination;
pub use self::destination::*;

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
    /// Operational events sent to one of the destinations.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub notifications: Option<RawNotifications>,
    /// Where traces go (`[telemetry.otlp]`).
    #[serde(default)]
    pub telemetry: RawTelemetry,
}

/// `[telemetry]`.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawTelemetry {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub otlp: Option<RawOtlp>,
}

/// `[telemetry.otlp]`: OpenTelemetry spans over OTLP/HTTP (`otel.rs`).
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawOtlp {
    /// The collector, e.g. "http://collector:4318" (`/v1/traces` is added).
    pub endpoint: String,
    /// Only "http/protobuf".
    #[serde(default = "default_otlp_protocol")]
    pub protocol: String,
    /// The share of traces exported, 0.0 to 1.0 (by trace id).
    #[serde(default = "default_sample_ratio")]
    pub sample_ratio: f64,
    /// Sent with each export (e.g. an API key: "env:OTLP_TOKEN").
    #[serde(default)]
    pub headers: BTreeMap<String, SecretString>,
    #[serde(default = "default_service_name")]
    pub service_name: String,
    /// Spans held for export at most; beyond, dropped and counted.
    #[serde(default = "default_otlp_queue")]
    pub queue: usize,
    /// Spans per export request at most.
    #[serde(default = "default_otlp_batch")]
    pub batch: usize,
    /// How often a partial batch is sent.
    #[serde(default = "default_otlp_interval", with = "crate::config::duration")]
    pub interval: Duration,
    /// One export request's deadline.
    #[serde(default = "default_otlp_timeout", with = "crate::config::duration")]
    pub timeout: Duration,
}

fn default_otlp_protocol() -> String {
    "http/protobuf".into()
}
fn default_sample_ratio() -> f64 {
    1.0
}
fn default_service_name() -> String {
    "switchboard".into()
}
fn default_otlp_queue() -> usize {
    8192
}
fn default_otlp_batch() -> usize {
    512
}
fn default_otlp_interval() -> Duration {
    Duration::from_secs(1)
}
fn default_otlp_timeout() -> Duration {
    Duration::from_secs(10)
}

/// `[notifications]`: events about the relay itself (`events.rs`), sent
/// through its own queue to an ordinary destination.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawNotifications {
    /// The name of a `[destinations.NAME]` that receives the events.
    pub destination: String,
    /// The event types to send; all of them by default.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub events: Option<Vec<String>>,
    /// Attempts failed in a row that make a destination `failing` (its
    /// breaker opening does too).
    #[serde(default = "default_failing_after")]
    pub failing_after: u64,
    /// A destination's dead letters are sent as one event per window.
    #[serde(default = "default_dead_letter_window", with = "crate::config::duration")]
    pub dead_letter_window: Duration,
}

fn default_failing_after() -> u64 {
    10
}

fn default_dead_letter_window() -> Duration {
    Duration::from_secs(60)
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
    // Named senders (`ingress/providers.rs`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub github: Option<RawProvider>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stripe: Option<RawProvider>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shopify: Option<RawProvider>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub slack: Option<RawProvider>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub twilio: Option<RawProvider>,
    #[serde(default, rename = "standard-webhooks", skip_serializing_if = "Option::is_none")]
    pub standard_webhooks: Option<RawProvider>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub svix: Option<RawProvider>,
}

impl RawAuth {
    /// The named senders set, with their keys.
    pub fn providers(&self) -> Vec<(&'static str, crate::ingress::providers::Provider, &RawProvider)> {
        use crate::ingress::providers::Provider;
        let slots =
            [&self.github, &self.stripe, &self.shopify, &self.slack, &self.twilio, &self.standard_webhooks, &self.svix];
        Provider::ALL
            .iter()
            .zip(slots)
            .filter_map(|((name, p), slot)| slot.as_ref().map(|raw| (*name, *p, raw)))
            .collect()
    }
}

/// `[routes.auth.<sender>]`: secrets (several while rotating), the
/// tolerance for senders that sign a timestamp, Twilio's public URL.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawProvider {
    pub secrets: Vec<SecretString>,
    #[serde(default, with = "crate::config::duration::option", skip_serializing_if = "Option::is_none")]
    pub tolerance: Option<Duration>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub public_url: Option<String>,
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
    pub scheme: crate::ingress::auth::HmacScheme,
    /// Signature header (defaults: plain none, stripe `Stripe-Signature`,
    /// standard-webhooks `webhook-signature`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub header: Option<String>,
    #[serde(default)]
    pub prefix: String,
    #[serde(default = "default_hmac_encoding")]
    pub encoding: crate::ingress::auth::Encoding,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timestamp_header: Option<String>,
    #[serde(default = "default_tolerance", with = "crate::config::duration")]
    pub tolerance: Duration,
    pub secrets: Vec<SecretString>,
}

fn default_hmac_scheme() -> crate::ingress::auth::HmacScheme {
    crate::ingress::auth::HmacScheme::Plain
}
fn default_hmac_encoding() -> crate::ingress::auth::Encoding {
    crate::ingress::auth::Encoding::Hex
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
    /// Most de-duplication keys remembered (about 64 bytes each); at the
    /// cap the oldest are forgotten first (counted).
    #[serde(default = "default_dedupe_max_keys")]
    pub dedupe_max_keys: usize,
    /// Payloads encrypted at rest (off unless present).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub encryption: Option<RawEncryption>,
    /// How long a message is kept (with its attempts) once every
    /// destination is done with it; 0s: deleted at once. Absent: 24h with
    /// the local store, off with JetStream.
    #[serde(default, with = "crate::config::duration::option", skip_serializing_if = "Option::is_none")]
    pub retain_delivered: Option<Duration>,
    /// At most this many bytes of messages kept after delivery (the
    /// oldest are forgotten first); 0: no bound but time and free space.
    /// Absent: a tenth of the store's filesystem.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retain_max_bytes: Option<u64>,
    /// "local" (the default: `path`) or "jetstream" (the keys below).
    #[serde(default)]
    pub kind: RawStoreKind,
    /// JetStream: the NATS servers (`nats://host:port`, `tls://...`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub servers: Vec<String>,
    /// JetStream: the stream's name (and prefix of its subjects and buckets).
    #[serde(default = "default_stream")]
    pub stream: String,
    /// JetStream: 1, or 3 (a quorum of three servers stores each message).
    #[serde(default = "default_replicas")]
    pub replicas: usize,
    /// JetStream credentials: `user` and `password`, or `token`, or `nkey`
    /// (a seed), or `creds_file`; secrets inline, `env:` or `file:`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub password: Option<SecretString>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token: Option<SecretString>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nkey: Option<SecretString>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub creds_file: Option<PathBuf>,
    /// JetStream TLS: CA of the servers, client certificate and key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_file: Option<PathBuf>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_cert: Option<PathBuf>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_key: Option<PathBuf>,
    /// JetStream: leased and retrying messages per destination, all relays together.
    #[serde(default = "default_max_ack_pending")]
    pub max_ack_pending: usize,
    /// JetStream: how long a lease lasts without renewal (a killed relay's
    /// messages go to another after this).
    #[serde(default = "default_ack_wait", with = "crate::config::duration")]
    pub ack_wait: Duration,
    /// JetStream: how long ingress waits for the stream's acknowledgement
    /// before answering 503.
    #[serde(default = "default_publish_timeout", with = "crate::config::duration")]
    pub publish_timeout: Duration,
    /// JetStream: how many partitions the keys of ordered destinations
    /// hash into (each partition delivered one message at a time, in
    /// order, by whichever relay holds it); default 16.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub order_partitions: Option<usize>,
}

/// `store.kind`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum RawStoreKind {
    #[default]
    Local,
    Jetstream,
}

fn default_stream() -> String {
    "switchboard".into()
}

fn default_replicas() -> usize {
    1
}

fn default_max_ack_pending() -> usize {
    20_000
}

fn default_ack_wait() -> Duration {
    Duration::from_secs(30)
}

fn default_publish_timeout() -> Duration {
    Duration::from_secs(5)
}

/// `[store.encryption]`.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawEncryption {
    /// The first key encrypts; all of them decrypt (rotation).
    pub keys: Vec<RawKey>,
}

/// One encryption key: an id stored with each record it seals, and 32
/// bytes, base64 (inline, `env:` or `file:`).
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawKey {
    pub id: String,
    pub key: SecretString,
}

fn default_min_free_bytes() -> u64 {
    64 * 1024 * 1024
}

impl Default for RawStore {
    fn default() -> Self {
        RawStore {
            path: default_store_path(),
            max_bytes: 0,
            min_free_bytes: default_min_free_bytes(),
            dedupe_max_keys: default_dedupe_max_keys(),
            encryption: None,
            retain_delivered: None,
            retain_max_bytes: None,
            kind: RawStoreKind::Local,
            servers: Vec::new(),
            stream: default_stream(),
            replicas: default_replicas(),
            user: None,
            password: None,
            token: None,
            nkey: None,
            creds_file: None,
            ca_file: None,
            client_cert: None,
            client_key: None,
            max_ack_pending: default_max_ack_pending(),
            ack_wait: default_ack_wait(),
            publish_timeout: default_publish_timeout(),
            order_partitions: None,
        }
    }
}

/// A million keys: a day of callbacks at more than 10 a second, about
/// 64 MB at the cap.
fn default_dedupe_max_keys() -> usize {
    1_000_000
}

fn default_store_path() -> PathBuf {
    PathBuf::from("./data")
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawIngress {
    #[serde(default = "default_max_body")]
    pub max_body: u64,
    #[serde(default = "default_header_read_timeout", with = "crate::config::duration")]
    pub header_read_timeout: Duration,
    #[serde(default = "default_body_read_timeout", with = "crate::config::duration")]
    pub body_read_timeout: Duration,
    #[serde(default = "default_max_connections")]
    pub max_connections: usize,
    /// Connections one client address may hold open at once, across all
    /// listeners; 0 (the default) is no per-address limit. Leave it off
    /// behind a load balancer: every connection then has the balancer's address.
    #[serde(default)]
    pub max_connections_per_ip: usize,
    /// Request body bytes all requests together may hold in memory. A
    /// request that does not fit waits for room within `body_read_timeout`,
    /// then gets 503 with `Retry-After`. Must be at least every route's `max_body`.
    #[serde(default = "default_max_buffered_bytes")]
    pub max_buffered_bytes: u64,
    #[serde(default = "default_max_headers")]
    pub max_headers: usize,
    #[serde(default = "default_retry_after", with = "crate::config::duration")]
    pub retry_after: Duration,
}

impl Default for RawIngress {
    fn default() -> Self {
        RawIngress {
            max_body: default_max_body(),
            header_read_timeout: default_header_read_timeout(),
            body_read_timeout: default_body_read_timeout(),
            max_connections: default_max_connections(),
            max_connections_per_ip: 0,
            max_buffered_bytes: default_max_buffered_bytes(),
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
/// 64 MiB: 64 maximal (1 MiB) callbacks at once, far more than a sender
/// such as ThingSpace has in flight, and small next to the memory of the
/// smallest machine the relay is meant for.
fn default_max_buffered_bytes() -> u64 {
    64 * 1024 * 1024
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
    /// Host names the admin API answers to besides IP addresses and
    /// `localhost` (a request naming another host is refused: DNS rebinding).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub allowed_hosts: Vec<String>,
}

impl Default for RawAdmin {
    fn default() -> Self {
        RawAdmin { addr: default_admin_addr(), token: None, tls: None, allowed_hosts: Vec::new() }
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
    #[serde(default = "default_grace", with = "crate::config::duration")]
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
    /// Answer a request whose body equals one accepted on this route within
    /// this window with the first one's id, storing nothing (senders such as
    /// ThingSpace resend callbacks they think were slow). Unset: off.
    #[serde(default, with = "crate::config::duration::option", skip_serializing_if = "Option::is_none")]
    pub dedupe_window: Option<Duration>,
    /// Resent callbacks answered with the first one's id, remembered across
    /// restarts: `{ window = "24h", ignore = ["callbackCount"] }`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dedupe: Option<RawDedupe>,
    /// Body fields (dotted JSON paths) stored messages can be looked up by
    /// in the admin API, e.g. `["requestId"]`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub index: Vec<String>,
}
