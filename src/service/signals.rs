//! Signals, turned into a cancellation (stop) and a stream of reload requests.

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// What the signals ask for.
pub struct Signals {
    /// Cancelled on the first SIGTERM or SIGINT (Ctrl-C).
    pub stop: CancellationToken,
    /// One item per SIGHUP; several quick ones may arrive as one.
    pub reloads: mpsc::Receiver<()>,
}

/// Starts listening for SIGTERM, SIGINT and SIGHUP.
pub fn listen() -> Signals {
    let stop = CancellationToken::new();
    let cancel = stop.clone();
    tokio::spawn(async move {
        wait_for_stop_signal().await;
        cancel.cancel();
    });
    let (tx, reloads) = mpsc::channel(1);
    tokio::spawn(forward_hangups(tx, stop.clone()));
    Signals { stop, reloads }
}

async fn forward_hangups(tx: mpsc::Sender<()>, stop: CancellationToken) {
    use tokio::signal::unix::{SignalKind, signal};
    let mut hangups = match signal(SignalKind::hangup()) {
        Ok(hangups) => hangups,
        Err(err) => {
            tracing::warn!(error = %err, "Cannot listen for SIGHUP; reload by restarting");
            return;
        }
    };
    loop {
        tokio::select! {
            received = hangups.recv() => {
                if received.is_none() {
                    return;
                }
                tracing::info!(signal = "SIGHUP", "Reload requested");
                // A reload already waiting covers this one too.
                let _ = tx.try_send(());
            }
            () = stop.cancelled() => return,
        }
    }
}

async fn wait_for_stop_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = term.recv() => tracing::info!(signal = "SIGTERM", "Stop requested"),
                _ = tokio::signal::ctrl_c() => tracing::info!(signal = "SIGINT", "Stop requested"),
            }
        }
        Err(err) => {
            tracing::warn!(error = %err, "Cannot listen for SIGTERM; only Ctrl-C stops the gateway");
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}
