//! The operator's side: a client of a running relay's admin API (`ctl.rs`:
//! requests, one-line errors with exit codes, tables) and the tools for
//! trying a setup (`tryout.rs`: `sink`, a printing receiver; `send-test`,
//! a sample callback followed through the admin API). It reads the
//! configuration file for the admin address and token; it runs no stage.

pub mod ctl;
pub mod tryout;
