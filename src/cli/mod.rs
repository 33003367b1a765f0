//! Command-line interface: the clap definitions and [`dispatch`], which
//! runs each command: `relay.rs` (`run`, `check`, `repair`, `keygen`) and
//! `operate.rs` (against a running relay's admin API: `status`,
//! `messages`, `dlq`, `destinations`; `sink` and `send-test`).

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use crate::config::LogFormat;

mod operate;
mod relay;

/// Exit status for an invalid configuration (sysexits' EX_CONFIG).
pub const EXIT_CONFIG: u8 = 78;

/// The configuration at `path`, or the exit status after saying why not.
fn load(path: &std::path::Path) -> Result<crate::config::Config, ExitCode> {
    crate::config::Config::load(path).map_err(|e| {
        eprintln!("error: {e}");
        ExitCode::from(EXIT_CONFIG)
    })
}

/// Runs `f` to its end on a runtime of its own (`multi`: all cores, for
/// the relay and receivers; otherwise one thread, for a client).
fn block_on<T>(multi: bool, f: impl std::future::Future<Output = anyhow::Result<T>>) -> anyhow::Result<T> {
    let mut builder =
        if multi { tokio::runtime::Builder::new_multi_thread() } else { tokio::runtime::Builder::new_current_thread() };
    builder.enable_all().build()?.block_on(f)
}

/// Runs one command; its exit status.
pub fn dispatch(cli: Cli) -> ExitCode {
    match cli.command {
        Command::Check { config } => relay::check(config),
        Command::Keygen { ed25519 } => relay::keygen(ed25519),
        Command::Repair { config } => relay::repair(config),
        Command::Transform { config, destination, file, message, admin, token, content_type } => {
            let source = match (file, message) {
                (Some(file), _) => relay::Tried::File { file, content_type },
                (None, Some(id)) => relay::Tried::Message { id, admin, token },
                (None, None) => unreachable!("clap requires --file or --message"),
            };
            relay::transform(config, &destination, source)
        }
        Command::Run { config, log_format } => relay::run(config, log_format),
        Command::Sink { addr, status, delay, fail_ratio, fail_status } => {
            operate::sink(addr, status, delay, fail_ratio, fail_status)
        }
        Command::SendTest { config, route, sample, wait } => operate::send_test(config, route, sample, wait),
        admin => operate::admin(admin),
    }
}

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
    /// Print what a destination would receive for a body: its transform
    /// (`[destinations.NAME.transform]`) run on the file, or the error.
    /// Exits 1 if the transform fails, 78 for a configuration error.
    Transform {
        /// Configuration file (TOML); `SWITCHBOARD_*` variables override it.
        #[arg(short, long, env = "SWITCHBOARD_CONFIG", value_name = "PATH")]
        config: PathBuf,
        /// The destination whose transform runs.
        #[arg(short, long)]
        destination: String,
        /// The callback body.
        #[arg(short, long, value_name = "BODY", required_unless_present = "message", conflicts_with = "message")]
        file: Option<PathBuf>,
        /// A stored message instead (its body, headers, route and time),
        /// read from the running relay's admin API (`--admin`, or the
        /// configuration's admin address).
        #[arg(long, value_name = "ID")]
        message: Option<String>,
        /// The admin API, e.g. http://127.0.0.1:9090 (with `--message`).
        #[arg(long, env = "SWITCHBOARD_ADMIN", value_name = "URL")]
        admin: Option<String>,
        /// Bearer token (`admin.token`), with `--message`.
        #[arg(long, env = "SWITCHBOARD_ADMIN_TOKEN", hide_env_values = true)]
        token: Option<String>,
        /// The callback's Content-Type, as the script sees it in headers
        /// (with `--file`).
        #[arg(long, default_value = "application/json")]
        content_type: String,
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
    /// Show each destination of a running relay: state, breaker, pending,
    /// oldest pending age, deliveries per second (over one second), dead
    /// letters.
    Status {
        #[command(flatten)]
        target: AdminArgs,
    },
    /// List, replay or purge a destination's dead letters on a running relay.
    Dlq {
        #[command(subcommand)]
        action: DlqAction,
    },
    /// What happened to a callback, and what a destination has not got.
    Messages {
        #[command(subcommand)]
        action: MessagesAction,
    },
    /// Post a ThingSpace-shaped sample callback to the relay's own listener
    /// and follow it until every destination of the route has it, or say
    /// where it is stuck. Exits 0 when delivered everywhere, 1 if not.
    SendTest {
        /// The running relay's configuration file.
        #[arg(short, long, env = "SWITCHBOARD_CONFIG", value_name = "PATH")]
        config: PathBuf,
        /// Route path (default: the first route).
        #[arg(long)]
        route: Option<String>,
        /// customfields (a ChangeDeviceCustomFields result), fault or nidd.
        #[arg(long, default_value = "customfields")]
        sample: String,
        /// How long to follow it.
        #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
        wait: std::time::Duration,
    },
    /// A receiver for trying retries and deployments: prints each request
    /// (headers, body) and answers as told. Stops on Ctrl-C.
    Sink {
        /// Address to listen on (port 0: any; the address is printed).
        #[arg(long, default_value = "127.0.0.1:8081")]
        addr: std::net::SocketAddr,
        /// Status to answer with.
        #[arg(long, default_value_t = 200)]
        status: u16,
        /// Wait this long before answering.
        #[arg(long, default_value = "0s", value_parser = humantime::parse_duration)]
        delay: std::time::Duration,
        /// Answer this share of requests (0.0-1.0) with --fail-status instead.
        #[arg(long, default_value_t = 0.0)]
        fail_ratio: f64,
        /// Status for the --fail-ratio share of requests.
        #[arg(long, default_value_t = 503)]
        fail_status: u16,
    },
    /// Pause, resume or retry now the deliveries to a destination of a running relay.
    Destinations {
        #[command(subcommand)]
        action: DestinationAction,
    },
}

/// Where the running relay's admin API is, and how to talk to it.
#[derive(Debug, clap::Args)]
pub struct AdminArgs {
    /// The admin API, e.g. http://127.0.0.1:9090.
    #[arg(long, env = "SWITCHBOARD_ADMIN", value_name = "URL")]
    pub admin: Option<String>,
    /// Bearer token (`admin.token`).
    #[arg(long, env = "SWITCHBOARD_ADMIN_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// Take the admin address and token from this configuration file.
    #[arg(short, long, value_name = "PATH")]
    pub config: Option<PathBuf>,
    /// Print the API's JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Subcommand)]
pub enum DlqAction {
    /// Dead letters of DESTINATION, oldest first.
    List {
        destination: String,
        /// At most this many.
        #[arg(long, default_value_t = 100)]
        limit: usize,
        #[command(flatten)]
        target: AdminArgs,
    },
    /// Move dead letters of DESTINATION back into its queue (all, --id, or
    /// those received --since/--until); its rate limit applies.
    Replay {
        destination: String,
        #[command(flatten)]
        select: DeadSelect,
        #[command(flatten)]
        target: AdminArgs,
    },
    /// Delete dead letters of DESTINATION (--id, --since/--until; all needs --yes).
    Purge {
        destination: String,
        #[command(flatten)]
        select: DeadSelect,
        /// Delete them all (without --id).
        #[arg(long)]
        yes: bool,
        #[command(flatten)]
        target: AdminArgs,
    },
}

/// A `--since`/`--until` value, checked here (a usage error, exit 2)
/// rather than by the relay; passed on as written.
fn time_arg(s: &str) -> Result<String, String> {
    match crate::text::parse_time(s) {
        Some(_) => Ok(s.to_string()),
        None => Err("a time in RFC 3339 (2026-12-02T09:00:00Z) or unix milliseconds".to_string()),
    }
}

/// Which messages a replay or purge covers.
#[derive(Debug, Clone, clap::Args)]
pub struct DeadSelect {
    /// Only this message (msg_...).
    #[arg(long)]
    pub id: Option<String>,
    /// Received at or after (RFC 3339, e.g. 2026-12-02T09:00:00Z, or unix ms).
    #[arg(long, value_parser = time_arg)]
    pub since: Option<String>,
    /// Received at or before.
    #[arg(long, value_parser = time_arg)]
    pub until: Option<String>,
}

impl DeadSelect {
    pub fn is_all(&self) -> bool {
        self.id.is_none() && self.since.is_none() && self.until.is_none()
    }

    pub fn query(&self) -> [(&'static str, Option<String>); 3] {
        [("id", self.id.clone()), ("since", self.since.clone()), ("until", self.until.clone())]
    }
}

#[derive(Debug, Subcommand)]
pub enum MessagesAction {
    /// One message: its route, receive time and, per destination, its
    /// state and last attempts.
    Show {
        /// The message id (msg_...), as ingress answered it.
        id: String,
        /// Print the body too.
        #[arg(long)]
        body: bool,
        #[command(flatten)]
        target: AdminArgs,
    },
    /// Stored messages whose body has VALUE in FIELD (a field a route
    /// indexes: `index = ["requestId"]`).
    Find {
        field: String,
        value: String,
        #[command(flatten)]
        target: AdminArgs,
    },
    /// Send messages DESTINATION got to it again (all, --id, or those
    /// received --since/--until): those still stored, i.e. pending
    /// elsewhere or kept by store.retain_delivered; its rate limit applies.
    Replay {
        destination: String,
        #[command(flatten)]
        select: DeadSelect,
        #[command(flatten)]
        target: AdminArgs,
    },
    /// Messages of DESTINATION in a state, oldest first.
    List {
        destination: String,
        /// pending, dead or delivered.
        #[arg(long, default_value = "pending", value_parser = ["pending", "dead", "delivered"])]
        state: String,
        /// Received at or after (RFC 3339, e.g. 2026-12-02T09:00:00Z, or unix ms).
        #[arg(long, value_parser = time_arg)]
        since: Option<String>,
        /// Received at or before.
        #[arg(long, value_parser = time_arg)]
        until: Option<String>,
        /// At most this many (1-1000); the output says how to get the next page.
        #[arg(long, default_value_t = 100)]
        limit: usize,
        /// Where the previous page ended (its next cursor).
        #[arg(long)]
        cursor: Option<String>,
        #[command(flatten)]
        target: AdminArgs,
    },
}

#[derive(Debug, Subcommand)]
pub enum DestinationAction {
    /// Stop delivering to NAME (its queue is kept; persisted).
    Pause {
        name: String,
        #[command(flatten)]
        target: AdminArgs,
    },
    /// Deliver to NAME again (retries that waited are due at once).
    Resume {
        name: String,
        #[command(flatten)]
        target: AdminArgs,
    },
    /// Send NAME's deliveries that wait for a retry now, instead of at
    /// their retry times (the relay does this by itself when NAME answers
    /// again after failures).
    RetryNow {
        name: String,
        #[command(flatten)]
        target: AdminArgs,
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
