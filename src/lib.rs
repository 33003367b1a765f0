//! Switchboard: a store-and-forward webhook fan-out relay.
//!
//! One callback URL in; every callback persisted (fsync'd) before it is
//! acknowledged, then delivered at least once to every configured destination,
//! each with its own queue, retries and dead letters.
//!
//! The layout, in three sides:
//! - **The relay** ([`relay`]: the composition root, reload, signals) and
//!   its stages, peers that import none of each other: [`ingress`] (routes,
//!   allowlists, sender authentication, de-duplication and ordering keys,
//!   the body budget, persist-then-ack), [`delivery`] (a worker per
//!   destination: retries, signing, rate limit, breaker), [`admin`]
//!   (health, metrics, the operator API, the status page), all over
//!   [`store`] (the durable store: one interface, a local and a JetStream
//!   backend) and [`server`] (the HTTP scaffold of ingress and admin).
//! - **Leaves** the stages share, importing no stage: [`metrics`] (the
//!   registry; stages register their own series), [`wake`] (per-destination
//!   signals, breaker state and [`recent`] figures), [`headers`] (header
//!   policy), [`fieldpath`] (a JSON body field by path), [`tls`]
//!   (certificates, hot reload), [`trace`]
//!   (`traceparent`), [`secret`] (values never printed), [`text`] (times,
//!   durations, error chains), [`throttle`] (rate-limited logs).
//! - **Configuration** ([`config`]: the file's shape, loading, validation
//!   into the stages' own types; it imports the stages, they never import
//!   it) and **the operator's client** ([`client`]: the admin API's client
//!   and `sink`/`send-test`), with [`cli`] (the command line) for the binary.
//!
//! `tests/it/layout.rs` holds these rules: no import circles between these
//! modules, stages import neither each other nor `config` nor `relay`.

#![forbid(unsafe_code)]

pub mod admin;
pub mod cli;
pub mod client;
pub mod config;
pub mod delivery;
pub mod events;
pub mod fieldpath;
pub mod headers;
pub mod ingress;
pub mod metrics;
pub mod otel;
pub mod recent;
pub mod relay;
pub mod secret;
pub mod server;
pub mod store;
pub mod text;
pub mod throttle;
pub mod tls;
pub mod trace;
pub mod wake;

pub use relay::{repair, run, run_with_reload, Listeners};
