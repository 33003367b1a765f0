//! The `switchboard` binary: parse the command line, load the configuration,
//! set up logging and signals, and hand over to [`switchboard::run`].

use std::process::ExitCode;

use clap::Parser;
use switchboard::cli::{AdminArgs, Cli, Command, DestinationAction, DlqAction, MessagesAction};
use switchboard::client::ctl::{AdminClient, CtlError, Op, Target};
use switchboard::config::{Config, LogFormat};
use tokio_util::sync::CancellationToken;

/// mimalloc instead of the system allocator: under load, glibc malloc's
/// bookkeeping (arena locks, consolidation) took about 10 % of the relay's
/// CPU in profiles; see README, Benchmark.
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Makes every file and directory the relay creates from here on private
/// to its user (0600, 0700), whatever umask it was started with: the store
/// holds callback bodies and the credentials in them. A stricter umask the
/// operator chose is kept (077 is only added).
fn private_files() {
    use nix::sys::stat::{umask, Mode};
    let old = umask(Mode::from_bits_truncate(0o077));
    umask(old | Mode::from_bits_truncate(0o077));
}

/// Exit status for an invalid configuration (sysexits' EX_CONFIG).
const EXIT_CONFIG: u8 = 78;

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Check { config } => match Config::load_raw(&config).and_then(|raw| {
            let printed = format!(
                "# store encryption: {}\n# delivered messages: {}\n{}",
                raw.encryption_summary(),
                raw.retention_summary(),
                raw.to_masked_toml()
            );
            let mut warnings = raw.warnings();
            warnings.extend(switchboard::config::permission_warnings(&raw, &config));
            raw.validate(&config).map(|_| (printed, warnings))
        }) {
            Ok((printed, warnings)) => {
                for w in &warnings {
                    eprintln!("warning: {w}");
                }
                println!("# {}: valid", config.display());
                print!("{printed}");
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("error: {e}");
                ExitCode::from(EXIT_CONFIG)
            }
        },
        Command::Keygen { ed25519: false } => {
            println!("{}", switchboard::delivery::signing::new_hmac_secret());
            ExitCode::SUCCESS
        }
        Command::Keygen { ed25519: true } => {
            let (secret, public) = switchboard::delivery::signing::new_ed25519_pair();
            println!("# for the relay ([destinations.NAME.signing] secrets):\n{secret}");
            println!("# for the receiver (verifies v1a signatures):\n{public}");
            ExitCode::SUCCESS
        }
        Command::Repair { config } => {
            let config = match Config::load(&config) {
                Ok(c) => c,
                Err(e) => {
                    eprintln!("error: {e}");
                    return ExitCode::from(EXIT_CONFIG);
                }
            };
            private_files();
            init_logging(LogFormat::Human, "info");
            let done = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()
                .map_err(anyhow::Error::from)
                .and_then(|rt| rt.block_on(switchboard::repair(&config)));
            match done {
                Ok(lines) => {
                    println!("# store {}: opens", config.store.path.display());
                    for l in lines {
                        println!("{l}");
                    }
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("error: {e:#}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::Status { target } => ctl(
            &target,
            |c| async move { c.status().await },
            |v| print!("{}", switchboard::client::ctl::status_table(&v)),
        ),
        Command::Dlq { action: DlqAction::List { destination, limit, target } } => ctl(
            &target,
            |c| async move { c.dead_letters(&destination, limit).await },
            |v| print!("{}", switchboard::client::ctl::dead_letter_table(&v)),
        ),
        Command::Dlq { action: DlqAction::Replay { destination, select, target } } => ctl(
            &target,
            |c| async move { with_progress(&c, &destination, Op::ReplayDead, &select).await },
            |v| println!("replayed {} dead letter(s); they are queued again", v["replayed"]),
        ),
        Command::Dlq { action: DlqAction::Purge { destination, select, yes, target } } => {
            if select.is_all() && !yes {
                eprintln!("error: purging every dead letter of {destination} needs --yes (or --id, --since, --until)");
                return ExitCode::from(2);
            }
            ctl(
                &target,
                |c| async move { with_progress(&c, &destination, Op::PurgeDead, &select).await },
                |v| println!("deleted {} dead letter(s)", v["purged"]),
            )
        }
        Command::Messages { action: MessagesAction::Replay { destination, select, target } } => ctl(
            &target,
            |c| async move { with_progress(&c, &destination, Op::ReplayDelivered, &select).await },
            |v| println!("sending {} message(s) again; they are queued", v["replayed"]),
        ),
        Command::Messages { action: MessagesAction::Find { field, value, target } } => ctl(
            &target,
            |c| async move { c.find(&field, &value).await },
            |v| print!("{}", switchboard::client::ctl::message_list_text(&v)),
        ),
        Command::Messages { action: MessagesAction::Show { id, body, target } } => ctl(
            &target,
            |c| async move { c.message(&id, body).await },
            |v| print!("{}", switchboard::client::ctl::message_text(&v)),
        ),
        Command::Messages {
            action: MessagesAction::List { destination, state, since, until, limit, cursor, target },
        } => {
            let query = [
                ("state", Some(state)),
                ("since", since),
                ("until", until),
                ("limit", Some(limit.to_string())),
                ("cursor", cursor),
            ];
            ctl(
                &target,
                |c| async move { c.messages(&destination, &query).await },
                |v| print!("{}", switchboard::client::ctl::message_list_text(&v)),
            )
        }
        Command::Destinations { action } => {
            let (name, verb, target) = match action {
                DestinationAction::Pause { name, target } => (name, "pause", target),
                DestinationAction::Resume { name, target } => (name, "resume", target),
                DestinationAction::RetryNow { name, target } => (name, "retry-now", target),
            };
            ctl(
                &target,
                |c| async move { c.destination(&name, verb).await },
                |v| {
                    let name = v["destination"].as_str().unwrap_or_default();
                    match v["brought_forward"].as_u64() {
                        Some(n) => println!("{name}: {n} waiting retries due now"),
                        None => println!("{name}: {}", v["state"].as_str().unwrap_or_default()),
                    }
                },
            )
        }
        Command::Sink { addr, status, delay, fail_ratio, fail_status } => {
            if !(0.0..=1.0).contains(&fail_ratio) {
                eprintln!("error: --fail-ratio is a share between 0.0 and 1.0");
                return ExitCode::from(2);
            }
            let opts = switchboard::client::tryout::SinkOptions { status, delay, fail_ratio, fail_status };
            let done =
                tokio::runtime::Builder::new_multi_thread().enable_all().build().map_err(anyhow::Error::from).and_then(
                    |rt| {
                        rt.block_on(async {
                            let listener = tokio::net::TcpListener::bind(addr)
                                .await
                                .map_err(|e| anyhow::anyhow!("cannot listen on {addr}: {e}"))?;
                            eprintln!("sink listening on {}", listener.local_addr()?);
                            let shutdown = CancellationToken::new();
                            let stop = shutdown.clone();
                            tokio::spawn(async move {
                                let _ = tokio::signal::ctrl_c().await;
                                stop.cancel();
                            });
                            switchboard::client::tryout::sink(listener, opts, shutdown).await
                        })
                    },
                );
            match done {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("error: {e:#}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::SendTest { config, route, sample, wait } => {
            let config = match Config::load(&config) {
                Ok(c) => c,
                Err(e) => {
                    eprintln!("error: {e}");
                    return ExitCode::from(EXIT_CONFIG);
                }
            };
            let done = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(anyhow::Error::from)
                .and_then(|rt| {
                    rt.block_on(switchboard::client::tryout::send_test(&config, route.as_deref(), &sample, wait))
                });
            match done {
                Ok(report) => {
                    for l in &report.lines {
                        println!("{l}");
                    }
                    if report.delivered {
                        ExitCode::SUCCESS
                    } else {
                        ExitCode::FAILURE
                    }
                }
                Err(e) => {
                    eprintln!("error: {e:#}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::Run { config: path, log_format } => {
            let loaded = Config::load_raw(&path).and_then(|raw| {
                let warnings = switchboard::config::permission_warnings(&raw, &path);
                raw.validate(&path).map(|c| (c, warnings))
            });
            let (config, warnings) = match loaded {
                Ok(c) => c,
                Err(e) => {
                    eprintln!("error: {e}");
                    return ExitCode::from(EXIT_CONFIG);
                }
            };
            private_files();
            init_logging(log_format.map(Into::into).unwrap_or(config.log.format), &config.log.level);
            for w in warnings {
                tracing::warn!(problem = %w, "file permissions");
            }
            match run(config) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    // Logging is set up (to stderr): one line, not two. The
                    // error is the message itself, so the human format
                    // prints it as written (a field's value would be quoted
                    // and escaped).
                    tracing::error!("switchboard stopped: {e:#}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}

/// Runs one admin API command: `call` with a client for `target`, then
/// `human` (or the JSON with `--json`) on success, one error line and its
/// exit code on failure.
fn ctl<F, Fut>(target: &AdminArgs, call: F, human: impl FnOnce(serde_json::Value)) -> ExitCode
where
    F: FnOnce(AdminClient) -> Fut,
    Fut: std::future::Future<Output = Result<serde_json::Value, CtlError>>,
{
    let t = Target { admin: target.admin.clone(), token: target.token.clone(), config: target.config.clone() };
    let done = AdminClient::new(&t).and_then(|client| {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| CtlError::Failed(format!("cannot start: {e}")))?;
        rt.block_on(call(client))
    });
    match done {
        Ok(v) if target.json => {
            println!("{v}");
            ExitCode::SUCCESS
        }
        Ok(v) => {
            human(v);
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(e.exit_code())
        }
    }
}

/// A replay or purge followed to its end, with a progress bar on a
/// terminal (indicatif hides it elsewhere) once it takes more than a moment.
async fn with_progress(
    client: &AdminClient,
    dest: &str,
    op: Op,
    select: &switchboard::cli::DeadSelect,
) -> Result<serde_json::Value, CtlError> {
    let started = std::time::Instant::now();
    let bar = indicatif::ProgressBar::hidden();
    bar.set_message(match op {
        Op::PurgeDead => format!("deleting dead letters of {dest}"),
        Op::ReplayDead => format!("replaying dead letters of {dest}"),
        Op::ReplayDelivered => format!("sending messages again to {dest}"),
    });
    let shown = std::cell::Cell::new(false);
    let done = client
        .operation(dest, op, &select.query(), |done, total| {
            if !shown.get() && started.elapsed() > std::time::Duration::from_millis(500) {
                bar.set_draw_target(indicatif::ProgressDrawTarget::stderr());
                shown.set(true);
            }
            bar.set_length(total);
            bar.set_position(done);
        })
        .await;
    bar.finish_and_clear();
    done
}

fn init_logging(format: LogFormat, level: &str) {
    let mut filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .or_else(|_| tracing_subscriber::EnvFilter::try_new(level))
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    // h2 warns once per connection it closes for a rapid-reset flood; the
    // server counts those and logs them once a second (`server/mod.rs`).
    // A filter that names h2 itself is left as written.
    let named = std::env::var("RUST_LOG").map_or_else(|_| level.contains("h2"), |v| v.contains("h2"));
    if !named {
        if let Ok(d) = "h2=error".parse() {
            filter = filter.add_directive(d);
        }
    }
    // Colour only for a person at a terminal: never in files or journals,
    // and never when NO_COLOR is set (https://no-color.org).
    use std::io::IsTerminal;
    let colour = std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty());
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_ansi(colour).with_writer(std::io::stderr);
    match format {
        LogFormat::Human => builder.init(),
        LogFormat::Json => builder.json().flatten_event(true).init(),
    }
}

fn run(config: Config) -> anyhow::Result<()> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    runtime.block_on(async {
        let listeners = switchboard::Listeners::bind(&config).await?;
        let shutdown = CancellationToken::new();
        let reload = std::sync::Arc::new(tokio::sync::Notify::new());
        switchboard::relay::shutdown::on_signals(shutdown.clone(), reload.clone())?;
        switchboard::run_with_reload(config, listeners, shutdown, reload).await
    })
}
