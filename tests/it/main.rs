//! Integration tests: one binary, real sockets, real sled, real HTTP.

mod binary;
mod cli;
mod clock;
mod config;
mod deploy;
mod encryption;
mod exposure;
mod faults;
mod files;
mod filter;
mod flow;
mod ha;
mod hostile;
mod jet_order;
mod jetstream;
mod layout;
mod messages;
mod mtls;
mod nats;
mod nats_destination;
mod notifications;
mod openapi;
mod order;
mod policy;
mod promises;
mod recovery;
mod relay;
mod reload;
mod security;
mod signing;
mod status_page;
mod support;
mod telemetry;
mod tls;
mod transform;
mod tryout;
mod verifiers;

/// A time a minute from now, as unix milliseconds.
pub fn store_time_after_now() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
        + 60_000
}
