//! Supervision of device tasks whose transport can fail (a serial port, a bus): a failed
//! connection is reported in the device's stored state and retried with capped backoff,
//! forever, so no device task dies silently.

use std::time::Duration;

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::Outlet;
use super::backoff::Backoff;
use crate::reading::{DeviceId, DeviceState, FaultCounts, SourceEvent, StatusChange, now_millis};

/// Why one connection of a device ended.
#[derive(Debug, thiserror::Error)]
pub enum Fault {
    /// The transport failed: the port could not be opened, was unplugged, or errored.
    #[error("{0}")]
    Failed(String),
    /// The transport is up but the device fell silent; it is reconnected.
    #[error("{0}")]
    Silent(String),
}

/// Why a device task stopped for good.
#[derive(Debug, PartialEq, Eq)]
pub enum Stopped {
    /// The shutdown signal: the task ends and the pipeline drains behind it.
    Cancelled,
    /// The pipeline is gone (it only ends after the sources).
    PipelineClosed,
}

/// A device's state as it last told the pipeline; sends only changes.
pub struct Status {
    device: DeviceId,
    kind: &'static str,
    outlet: Outlet,
    state: Option<(DeviceState, Option<String>)>,
    /// The current connection has read something from the device.
    heard: bool,
}

impl Status {
    pub fn new(device: DeviceId, kind: &'static str, outlet: Outlet) -> Self {
        Self {
            device,
            kind,
            outlet,
            state: None,
            heard: false,
        }
    }

    /// The device sent data over the current connection: the connection works, so the
    /// next fault starts the reconnect backoff over.
    pub fn heard(&mut self) {
        self.heard = true;
    }

    pub fn device(&self) -> &DeviceId {
        &self.device
    }

    pub fn outlet(&self) -> &Outlet {
        &self.outlet
    }

    /// Records a state (and why) when it differs from the last one.
    ///
    /// # Errors
    /// [`Stopped::PipelineClosed`] when the pipeline is gone.
    pub async fn set(&mut self, state: DeviceState, error: Option<String>) -> Result<(), Stopped> {
        let next = Some((state, error));
        if self.state == next {
            return Ok(());
        }
        self.state = next;
        let error = self.state.as_ref().and_then(|(_, e)| e.clone());
        let change = StatusChange {
            device: self.device.clone(),
            kind: self.kind,
            state,
            error,
            at: now_millis(),
        };
        self.send(SourceEvent::Status(change)).await
    }

    /// Adds to the device's fault counters.
    ///
    /// # Errors
    /// [`Stopped::PipelineClosed`] when the pipeline is gone.
    pub async fn count(&mut self, counts: FaultCounts) -> Result<(), Stopped> {
        if counts.is_empty() {
            return Ok(());
        }
        let device = self.device.clone();
        self.send(SourceEvent::Faults { device, counts }).await
    }

    async fn send(&self, event: SourceEvent) -> Result<(), Stopped> {
        if self.outlet.send_event(event).await {
            Ok(())
        } else {
            Err(Stopped::PipelineClosed)
        }
    }
}

/// A device whose transport is opened, served until it fails, and opened again.
pub trait Connect {
    /// One connection: opens the transport and serves it until it fails ([`Fault`]) or the
    /// task should end ([`Stopped`]).
    fn connect(
        &mut self,
        status: &mut Status,
    ) -> impl Future<Output = Result<Stopped, Fault>> + Send;
}

/// Runs `device`'s connections until one stops: each [`Fault`] is stored as the device's
/// state (`failing` or `stale`) and counted, and the next connection starts after a capped
/// exponential backoff. A connection that read data from the device, or lasted longer than
/// the cap, starts the backoff over: a cable pulled for a moment, again and again, is
/// reopened within the first waits each time, not after ever longer ones.
pub async fn supervise(
    mut status: Status,
    cancel: CancellationToken,
    backoff: (Duration, Duration),
    device: &mut impl Connect,
) -> Stopped {
    let mut backoff = Backoff::new(backoff.0, backoff.1);
    loop {
        let started = Instant::now();
        status.heard = false;
        let fault = match device.connect(&mut status).await {
            Ok(stopped) => return stopped,
            Err(fault) => fault,
        };
        if status.heard || started.elapsed() > backoff.max() {
            backoff.reset();
        }
        let delay = backoff.next_delay();
        let (state, reconnect) = match &fault {
            Fault::Failed(_) => (DeviceState::Failing, 1),
            Fault::Silent(_) => (DeviceState::Stale, 0),
        };
        tracing::warn!(device = %status.device(), error = %fault, retry_in = ?delay, "Device connection ended");
        let reported = async {
            status.set(state, Some(fault.to_string())).await?;
            status
                .count(FaultCounts {
                    reconnects: reconnect,
                    ..FaultCounts::default()
                })
                .await
        };
        if let Err(stopped) = reported.await {
            return stopped;
        }
        tokio::select! {
            () = tokio::time::sleep(delay) => {}
            () = cancel.cancelled() => return Stopped::Cancelled,
        }
    }
}
