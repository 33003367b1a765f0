//! Signals: SIGTERM / SIGINT cancel the shutdown token; SIGHUP asks for a
//! reload (certificates).
//!
//! Shutdown is a value ([`CancellationToken`]) passed to [`crate::run`], never
//! a global, so tests stop a relay by cancelling its token. A second signal
//! while draining exits at once (the store is crash-safe; pending work resumes
//! on the next start).

use std::sync::Arc;

use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

/// Cancels `token` on the first SIGTERM or SIGINT; exits the process with
/// status 130 on the second. Every SIGHUP wakes `reload`.
pub fn on_signals(token: CancellationToken, reload: Arc<Notify>) -> std::io::Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let mut hup = signal(SignalKind::hangup())?;
    tokio::spawn(async move {
        while hup.recv().await.is_some() {
            tracing::info!(signal = "SIGHUP", "reload requested");
            reload.notify_one();
        }
    });
    tokio::spawn(async move {
        let mut first = true;
        loop {
            let name = tokio::select! {
                _ = term.recv() => "SIGTERM",
                _ = int.recv() => "SIGINT",
            };
            if first {
                tracing::info!(signal = name, "received signal; draining");
                token.cancel();
                first = false;
            } else {
                tracing::warn!(signal = name, "second signal; exiting without draining");
                std::process::exit(130);
            }
        }
    });
    Ok(())
}
