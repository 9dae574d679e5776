//! Sources: one supervised task per device, feeding the pipeline through one bounded channel.
//!
//! MQTT devices share one session per broker ([`mqtt`]); the session routes each publish to
//! its device's task, which decodes it. Sources are the only part that sees the shutdown
//! signal: when they end, their senders drop and the pipeline drains behind them.

pub mod ack;
pub mod backoff;
pub mod framing;
mod modbus;
pub mod mqtt;
mod serial;
mod supervise;

use std::sync::Arc;

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::{Config, FormatOptions, MetricConfig, Overflow};
use crate::decode::Decoder;
use crate::reading::{DeviceId, Message, SourceEvent};
use crate::telemetry::{SourceCounters, Telemetry};

/// How a device task hands messages to the pipeline: waits for room (`block`) or drops and
/// counts (`drop_newest`). A dropped message is settled at once: it was handled by policy.
#[derive(Clone)]
pub struct Outlet {
    events: mpsc::Sender<SourceEvent>,
    overflow: Overflow,
    counters: Arc<SourceCounters>,
}

impl Outlet {
    pub fn new(
        events: mpsc::Sender<SourceEvent>,
        overflow: Overflow,
        counters: Arc<SourceCounters>,
    ) -> Self {
        Self {
            events,
            overflow,
            counters,
        }
    }

    /// Sends one message; false when the pipeline is gone.
    pub async fn send(&self, mut message: Message) -> bool {
        self.counters.received();
        match self.overflow {
            Overflow::Block => self
                .events
                .send(SourceEvent::Message(message))
                .await
                .is_ok(),
            Overflow::DropNewest => match self.events.try_send(SourceEvent::Message(message)) {
                Ok(()) => true,
                Err(mpsc::error::TrySendError::Full(SourceEvent::Message(m))) => {
                    message = m;
                    self.counters.dropped();
                    if let Some(ticket) = message.ticket.take() {
                        ticket.settle();
                    }
                    true
                }
                Err(_) => false,
            },
        }
    }

    /// Sends a state change; these are rare and never dropped.
    pub async fn send_event(&self, event: SourceEvent) -> bool {
        self.events.send(event).await.is_ok()
    }
}

/// Starts one task per device (and one session per broker) on `tracker`. Returns at once.
pub fn spawn_all(
    config: &Config,
    events: mpsc::Sender<SourceEvent>,
    telemetry: &Arc<Telemetry>,
    tracker: &TaskTracker,
    cancel: &CancellationToken,
) {
    for broker in &config.brokers {
        let devices: Vec<_> = config
            .devices
            .iter()
            .filter_map(|d| match d {
                crate::config::DeviceConfig::Mqtt(m) if m.broker.as_deref() == Some(&broker.id) => {
                    Some(m.clone())
                }
                _ => None,
            })
            .collect();
        if devices.is_empty() {
            continue;
        }
        mqtt::spawn_broker(
            broker.clone(),
            devices,
            &config.pipeline,
            events.clone(),
            telemetry,
            tracker,
            cancel.clone(),
        );
    }
    for device in &config.devices {
        let crate::config::DeviceConfig::Serial(line) = device else {
            continue;
        };
        let id = DeviceId::new(&line.id);
        let Some(port) = config.serial_port(&line.port) else {
            tracing::error!(device = %id, port = %line.port, "Serial port not defined; device not started");
            continue;
        };
        let Some(decoder) = decoder_for(&id, &line.format_options(), &line.metrics) else {
            continue;
        };
        let outlet = Outlet::new(
            events.clone(),
            config.pipeline.overflow,
            telemetry.source(&id),
        );
        let status = supervise::Status::new(id, "serial", outlet);
        let task = serial::LineDevice::new(port.clone(), line.clone(), decoder, cancel.clone());
        tracker.spawn(task.run(status));
    }
    spawn_modbus(config, &events, telemetry, tracker, cancel);
}

/// One bus task per serial port with Modbus devices, and one task per slave on it.
fn spawn_modbus(
    config: &Config,
    events: &mpsc::Sender<SourceEvent>,
    telemetry: &Arc<Telemetry>,
    tracker: &TaskTracker,
    cancel: &CancellationToken,
) {
    for port in &config.serial_ports {
        let slaves: Vec<_> = config
            .devices
            .iter()
            .filter_map(|d| match d {
                crate::config::DeviceConfig::Modbus(m) if m.port == port.id => Some(m),
                _ => None,
            })
            .collect();
        if slaves.is_empty() {
            continue;
        }
        // Each slave has at most one request waiting.
        let (requests, inbox) = mpsc::channel(slaves.len());
        tracker.spawn(modbus::Bus::new(port.clone()).run(inbox));
        for slave in slaves {
            let id = DeviceId::new(&slave.id);
            let outlet = Outlet::new(
                events.clone(),
                config.pipeline.overflow,
                telemetry.source(&id),
            );
            let status = supervise::Status::new(id, "modbus", outlet);
            let task = modbus::SlaveDevice::new(slave.clone(), port, requests.clone());
            tracker.spawn(task.run(status, cancel.clone()));
        }
    }
}

/// Sleeps until `at`, or forever when there is no deadline.
async fn sleep_until(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// A device's decoder; `None` (logged) when its pattern does not compile, which loading the
/// config rules out, so the device is left out rather than the gateway stopped.
fn decoder_for(
    device: &DeviceId,
    options: &FormatOptions<'_>,
    metrics: &[MetricConfig],
) -> Option<Decoder> {
    let fields = metrics.iter().map(|m| m.field().to_string()).collect();
    match Decoder::new(options, fields) {
        Ok(decoder) => Some(decoder),
        Err(err) => {
            tracing::error!(device = %device, error = %err, "Device pattern unusable; device not started");
            None
        }
    }
}
