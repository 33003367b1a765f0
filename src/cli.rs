//! Command-line interface: `switchboard run`, `check`, `repair` and `keygen`.

use std::path::PathBuf;

use clap::{Parser, Subcommand};

use crate::config::LogFormat;

/// Store-and-forward webhook fan-out relay: one callback URL in, durable
/// at-least-once delivery to every configured destination out.
#[derive(Debug, Parser)]
#[command(name = "switchboard", version, about, propagate_version = true)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the relay until SIGTERM or SIGINT.
    Run {
        /// Configuration file (TOML); `SWITCHBOARD_*` variables override it.
        #[arg(short, long, env = "SWITCHBOARD_CONFIG", value_name = "PATH")]
        config: PathBuf,
        /// Log format; overrides `log.format` from the file.
        #[arg(long, value_enum)]
        log_format: Option<CliLogFormat>,
    },
    /// Validate a configuration and print it resolved (defaults filled in,
    /// secrets masked). Exits non-zero if it is invalid.
    Check {
        /// Configuration file (TOML); `SWITCHBOARD_*` variables override it.
        #[arg(short, long, env = "SWITCHBOARD_CONFIG", value_name = "PATH")]
        config: PathBuf,
    },
    /// With the relay stopped: open a store that `run` refused as damaged by
    /// cutting each damaged segment of its message log at the damage. The
    /// messages from there to the end of that segment are LOST (each cut is
    /// logged with its size); everything else is kept. Prints what is
    /// pending per destination afterwards.
    Repair {
        /// Configuration file (TOML); `SWITCHBOARD_*` variables override it.
        #[arg(short, long, env = "SWITCHBOARD_CONFIG", value_name = "PATH")]
        config: PathBuf,
    },
    /// Print a new Standard Webhooks signing key for
    /// `[destinations.NAME.signing] secrets`: a `whsec_` secret (HMAC, v1;
    /// the receiver needs the same secret), or with `--ed25519` a `whsk_`
    /// key for the relay and the `whpk_` public key for the receiver (v1a).
    Keygen {
        /// An Ed25519 key pair instead of an HMAC secret.
        #[arg(long)]
        ed25519: bool,
    },
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum CliLogFormat {
    Human,
    Json,
}

impl From<CliLogFormat> for LogFormat {
    fn from(f: CliLogFormat) -> Self {
        match f {
            CliLogFormat::Human => LogFormat::Human,
            CliLogFormat::Json => LogFormat::Json,
        }
    }
}
