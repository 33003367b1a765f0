//! Integration tests: one binary, real sockets, real sled, real HTTP.

mod binary;
mod config;
mod relay;
mod support;
