//! systemd's notification protocol: `READY=1` once the gateway runs, `STATUS=` with a one-line
//! summary, `RELOADING=1` … `READY=1` around a reload, `STOPPING=1` on shutdown, and
//! `WATCHDOG=1` pings only while heartbeats pass the whole pipeline: a stuck writer (a locked
//! or full disk, a jammed channel) stops them, and systemd restarts the service. Without
//! `NOTIFY_SOCKET` every call is a no-op.

use std::sync::Arc;
use std::time::Duration;

use sd_notify::NotifyState;
use tokio_util::sync::CancellationToken;

use crate::reading::now_millis;
use crate::telemetry::Telemetry;

/// How often STATUS is refreshed when no watchdog asks for more.
const STATUS_EVERY: Duration = Duration::from_secs(5);

/// Sends notifications when started by systemd with `Type=notify`.
#[derive(Clone, Copy, Debug)]
pub struct Notifier {
    enabled: bool,
}

impl Notifier {
    pub fn from_env() -> Self {
        Self {
            enabled: std::env::var_os("NOTIFY_SOCKET").is_some(),
        }
    }

    pub fn ready(self) {
        self.send(&[NotifyState::Ready]);
    }

    pub fn reloading(self) {
        match NotifyState::monotonic_usec_now() {
            Ok(now) => self.send(&[NotifyState::Reloading, now]),
            Err(_) => self.send(&[NotifyState::Reloading]),
        }
    }

    pub fn stopping(self) {
        self.send(&[
            NotifyState::Stopping,
            NotifyState::Status("stopping: draining the pipeline"),
        ]);
    }

    pub fn status(self, text: &str) {
        self.send(&[NotifyState::Status(text)]);
    }

    fn send(self, states: &[NotifyState<'_>]) {
        if !self.enabled {
            return;
        }
        if let Err(err) = sd_notify::notify(states) {
            tracing::warn!(error = %err, "Cannot notify systemd");
        }
    }
}

/// Until `cancel`: refreshes STATUS and, when systemd set a watchdog, pings it at a third of
/// its period while the pipeline moves.
pub async fn supervise(notifier: Notifier, telemetry: Arc<Telemetry>, cancel: CancellationToken) {
    let watchdog = sd_notify::watchdog_enabled();
    let every = watchdog.map_or(STATUS_EVERY, |w| (w / 3).min(STATUS_EVERY));
    let mut tick = tokio::time::interval(every);
    let mut last_stored = telemetry.readings_stored();
    let mut last_tick = tokio::time::Instant::now();
    let mut stuck = false;
    let started = tokio::time::Instant::now();
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            () = cancel.cancelled() => return,
        }
        let stored = telemetry.readings_stored();
        let rate = (stored - last_stored) as f64 / last_tick.elapsed().as_secs_f64().max(0.001);
        (last_stored, last_tick) = (stored, tokio::time::Instant::now());
        notifier.status(&summary(&telemetry, rate));
        let Some(period) = watchdog else { continue };
        match telemetry.moving(now_millis(), period / 2) {
            Ok(()) => {
                if std::mem::take(&mut stuck) {
                    tracing::warn!("Pipeline moving again; watchdog pings resume");
                }
                notifier.send(&[NotifyState::Watchdog]);
            }
            // The first heartbeat passes within seconds of READY: until then the gateway is
            // starting, not stuck, unless that takes half the watchdog period.
            Err(_) if telemetry.last_heartbeat() == 0 && started.elapsed() < period / 2 => {
                notifier.send(&[NotifyState::Watchdog]);
            }
            Err(reason) => {
                if !std::mem::replace(&mut stuck, true) {
                    tracing::error!(reason = %reason, "Pipeline stuck; withholding watchdog pings so systemd restarts the gateway");
                }
            }
        }
    }
}

/// `12 of 14 devices connected, 2 failing; 230 readings/s stored`.
fn summary(telemetry: &Telemetry, rate: f64) -> String {
    let states = telemetry.device_states();
    let connected = states
        .iter()
        .filter(|s| **s == crate::reading::DeviceState::Connected)
        .count();
    let failing = states
        .iter()
        .filter(|s| **s == crate::reading::DeviceState::Failing)
        .count();
    let mut text = format!("{connected} of {} devices connected", states.len());
    if failing > 0 {
        text.push_str(&format!(", {failing} failing"));
    }
    text.push_str(&format!("; {rate:.0} readings/s stored"));
    text
}
