//! Shutdown: turns SIGTERM / SIGINT into a cancelled token.
//!
//! Shutdown is a value ([`CancellationToken`]) passed to [`crate::run`], never
//! a global, so tests stop a relay by cancelling its token. A second signal
//! while draining exits at once (the store is crash-safe; pending work resumes
//! on the next start).

use tokio_util::sync::CancellationToken;

/// Cancels `token` on the first SIGTERM or SIGINT; exits the process with
/// status 130 on the second.
pub fn on_signals(token: CancellationToken) -> std::io::Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
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
