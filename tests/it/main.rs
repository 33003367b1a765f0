//! Integration tests: one binary, real sockets, real sled, real HTTP.

mod binary;
mod cli;
mod config;
mod deploy;
mod encryption;
mod exposure;
mod filter;
mod flow;
mod ha;
mod hostile;
mod jetstream;
mod mtls;
mod nats;
mod order;
mod policy;
mod promises;
mod relay;
mod security;
mod signing;
mod support;
mod tls;
