//! The commands that talk to a running relay's admin API (`status`,
//! `messages`, `dlq`, `destinations`) and the tools for trying a setup
//! (`sink`, `send-test`): one error line and a documented exit code each.

use std::path::PathBuf;
use std::process::ExitCode;

use tokio_util::sync::CancellationToken;

use super::{AdminArgs, Command, DestinationAction, DlqAction, MessagesAction};
use crate::client::ctl::{AdminClient, CtlError, Op, Target};

/// One of the admin API's commands (the caller matched the others).
pub fn admin(command: Command) -> ExitCode {
    match command {
        Command::Status { target } => {
            ctl(&target, |c| async move { c.status().await }, |v| print!("{}", crate::client::ctl::status_table(&v)))
        }
        Command::Dlq { action: DlqAction::List { destination, limit, target } } => ctl(
            &target,
            |c| async move { c.dead_letters(&destination, limit).await },
            |v| print!("{}", crate::client::ctl::dead_letter_table(&v)),
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
            |v| print!("{}", crate::client::ctl::message_list_text(&v)),
        ),
        Command::Messages { action: MessagesAction::Show { id, body, target } } => ctl(
            &target,
            |c| async move { c.message(&id, body).await },
            |v| print!("{}", crate::client::ctl::message_text(&v)),
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
                |v| print!("{}", crate::client::ctl::message_list_text(&v)),
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
        _ => unreachable!("the caller passes admin commands only"),
    }
}

/// `switchboard sink`.
pub fn sink(
    addr: std::net::SocketAddr,
    status: u16,
    delay: std::time::Duration,
    fail_ratio: f64,
    fail_status: u16,
) -> ExitCode {
    if !(0.0..=1.0).contains(&fail_ratio) {
        eprintln!("error: --fail-ratio is a share between 0.0 and 1.0");
        return ExitCode::from(2);
    }
    let opts = crate::client::tryout::SinkOptions { status, delay, fail_ratio, fail_status };
    let done = super::block_on(true, async {
        let listener =
            tokio::net::TcpListener::bind(addr).await.map_err(|e| anyhow::anyhow!("cannot listen on {addr}: {e}"))?;
        eprintln!("sink listening on {}", listener.local_addr()?);
        let shutdown = CancellationToken::new();
        let stop = shutdown.clone();
        tokio::spawn(async move {
            let _ = tokio::signal::ctrl_c().await;
            stop.cancel();
        });
        crate::client::tryout::sink(listener, opts, shutdown).await
    });
    match done {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// `switchboard send-test`.
pub fn send_test(config: PathBuf, route: Option<String>, sample: String, wait: std::time::Duration) -> ExitCode {
    let config = match super::load(&config) {
        Ok(c) => c,
        Err(code) => return code,
    };
    let done = super::block_on(false, crate::client::tryout::send_test(&config, route.as_deref(), &sample, wait));
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
    select: &crate::cli::DeadSelect,
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
