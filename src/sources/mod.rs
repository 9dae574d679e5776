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

use std::collections::HashMap;
use std::sync::Arc;

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::{
    BrokerConfig, Config, DeviceConfig, FormatOptions, MetricConfig, ModbusDeviceConfig,
    MqttDeviceConfig, Overflow, PipelineConfig, SerialDeviceConfig, SerialPortConfig,
};
use crate::decode::{DecodeLimits, Decoder};
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
            Overflow::Block => {
                crate::pipeline::send(&self.events, SourceEvent::Message(message)).await
            }
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

/// What every source task needs from the gateway.
#[derive(Clone)]
pub struct SourceContext {
    pub events: mpsc::Sender<SourceEvent>,
    pub pipeline: PipelineConfig,
    pub telemetry: Arc<Telemetry>,
    /// Every source task, so a stop can wait for all of them.
    pub tracker: TaskTracker,
    /// The gateway's stop; each unit's own cancellation is a child of it.
    pub shutdown: CancellationToken,
    /// What one payload or line may decode to; a reload changes it for every decoder.
    pub limits: Arc<DecodeLimits>,
}

/// A device task (or group of tasks) that can be stopped on its own.
struct Unit {
    cancel: CancellationToken,
    done: TaskTracker,
}

impl Unit {
    fn new(ctx: &SourceContext) -> Self {
        Self {
            cancel: ctx.shutdown.child_token(),
            done: TaskTracker::new(),
        }
    }

    fn spawn<F>(&self, ctx: &SourceContext, task: F)
    where
        F: std::future::Future + Send + 'static,
        F::Output: Send + 'static,
    {
        ctx.tracker.spawn(self.done.track_future(task));
    }

    async fn stop(self) {
        self.cancel.cancel();
        self.done.close();
        self.done.wait().await;
    }
}

/// The running sources: one session per broker with its device tasks, one task per serial
/// line device, one bus task per Modbus port with a task per slave. A reload changes what
/// changed and leaves the rest running.
pub struct Sources {
    ctx: SourceContext,
    brokers: HashMap<String, mqtt::BrokerUnit>,
    lines: HashMap<String, (SerialDeviceConfig, SerialPortConfig, Unit)>,
    buses: HashMap<String, BusUnit>,
}

/// A Modbus port: its bus task and its slaves.
struct BusUnit {
    port: SerialPortConfig,
    requests: mpsc::Sender<modbus::Request>,
    done: TaskTracker,
    slaves: HashMap<String, (ModbusDeviceConfig, Unit)>,
}

/// What a reload did to the sources.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct SourceChanges {
    pub started: Vec<String>,
    pub stopped: Vec<String>,
    /// Broker sessions reconnected because their settings changed.
    pub reconnected: Vec<String>,
}

impl Sources {
    /// Starts every source of `config`; returns at once.
    pub fn start(config: &Config, ctx: SourceContext) -> Self {
        let mut sources = Self {
            ctx,
            brokers: HashMap::new(),
            lines: HashMap::new(),
            buses: HashMap::new(),
        };
        let empty = Config {
            brokers: Vec::new(),
            serial_ports: Vec::new(),
            devices: Vec::new(),
            ..config.clone()
        };
        sources.start_new(&empty, config);
        sources
    }

    /// Moves from `old` to `new`: stops what was removed or changed (waiting for its port or
    /// session to be released), then starts what was added or changed. Unchanged devices and
    /// broker sessions keep running untouched.
    pub async fn apply(&mut self, old: &Config, new: &Config) -> SourceChanges {
        let mut changes = SourceChanges::default();
        self.ctx.limits.update(&new.validation);

        // Brokers: removed or changed sessions stop with their devices; the others only
        // learn their new device list.
        let broker_ids: Vec<String> = self.brokers.keys().cloned().collect();
        for id in broker_ids {
            let kept = new
                .broker(&id)
                .filter(|b| same_broker(b, &self.brokers[&id].config));
            match kept {
                Some(_) => {
                    let devices = mqtt_devices(new, &id);
                    if let Some(unit) = self.brokers.get_mut(&id) {
                        let before: Vec<String> =
                            unit.devices.iter().map(|d| d.id.clone()).collect();
                        let started = unit.update(devices, &self.ctx).await;
                        changes
                            .started
                            .extend(started.iter().map(|d| d.to_string()));
                        changes.stopped.extend(before.into_iter().filter(|d| {
                            !unit.devices.iter().any(|n| &n.id == d)
                                || started.iter().any(|s| s.as_str() == d)
                        }));
                    }
                }
                None => {
                    if let Some(unit) = self.brokers.remove(&id) {
                        changes
                            .stopped
                            .extend(unit.devices.iter().map(|d| d.id.clone()));
                        if new.broker(&id).is_some() {
                            changes.reconnected.push(id.clone());
                        }
                        unit.stop().await;
                    }
                }
            }
        }

        // Serial line devices own their ports: stop before the new task opens the port.
        let line_ids: Vec<String> = self.lines.keys().cloned().collect();
        for id in line_ids {
            let keep = match new.devices.iter().find(|d| d.id() == id) {
                Some(DeviceConfig::Serial(line)) => {
                    let (old_line, old_port, _) = &self.lines[&id];
                    same_line(line, old_line)
                        && new
                            .serial_port(&line.port)
                            .is_some_and(|p| same_port(p, old_port))
                }
                _ => false,
            };
            if !keep && let Some((_, _, unit)) = self.lines.remove(&id) {
                unit.stop().await;
                changes.stopped.push(id);
            }
        }

        // Modbus: a changed port restarts its bus and slaves; otherwise only changed slaves.
        let ports: Vec<String> = self.buses.keys().cloned().collect();
        for port_id in ports {
            let port_kept = new
                .serial_port(&port_id)
                .is_some_and(|p| same_port(p, &self.buses[&port_id].port));
            if !port_kept {
                if let Some(bus) = self.buses.remove(&port_id) {
                    changes.stopped.extend(bus.slaves.keys().cloned());
                    bus.stop().await;
                }
                continue;
            }
            let Some(bus) = self.buses.get_mut(&port_id) else {
                continue;
            };
            let slave_ids: Vec<String> = bus.slaves.keys().cloned().collect();
            for id in slave_ids {
                let keep = matches!(
                    new.devices.iter().find(|d| d.id() == id),
                    Some(DeviceConfig::Modbus(m)) if m.port == port_id && same_modbus(m, &bus.slaves[&id].0)
                );
                if !keep && let Some((_, unit)) = bus.slaves.remove(&id) {
                    unit.stop().await;
                    changes.stopped.push(id);
                }
            }
            let unused = !new
                .devices
                .iter()
                .any(|d| matches!(d, DeviceConfig::Modbus(m) if m.port == port_id));
            if bus.slaves.is_empty()
                && unused
                && let Some(bus) = self.buses.remove(&port_id)
            {
                bus.stop().await;
            }
        }

        changes.started.extend(self.start_new(old, new));
        changes.started.sort();
        changes.started.dedup();
        changes.stopped.sort();
        changes.stopped.dedup();
        changes
    }

    /// Starts whatever `new` lists that is not running; returns the device ids started.
    fn start_new(&mut self, old: &Config, new: &Config) -> Vec<String> {
        let _ = old;
        let mut started = Vec::new();
        for broker in &new.brokers {
            if self.brokers.contains_key(&broker.id) {
                continue;
            }
            let devices = mqtt_devices(new, &broker.id);
            if devices.is_empty() {
                continue;
            }
            started.extend(devices.iter().map(|d| d.id.clone()));
            let unit = mqtt::BrokerUnit::start(broker.clone(), devices, &self.ctx);
            self.brokers.insert(broker.id.clone(), unit);
        }
        for device in &new.devices {
            match device {
                DeviceConfig::Mqtt(_) => {}
                DeviceConfig::Serial(line) => {
                    if self.lines.contains_key(&line.id) {
                        continue;
                    }
                    if let Some(unit) = self.start_line(new, line) {
                        started.push(line.id.clone());
                        self.lines.insert(line.id.clone(), unit);
                    }
                }
                DeviceConfig::Modbus(slave) => {
                    let Some(port) = new.serial_port(&slave.port) else {
                        tracing::error!(device = %slave.id, port = %slave.port, "Serial port not defined; device not started");
                        continue;
                    };
                    let ctx = self.ctx.clone();
                    let bus = self
                        .buses
                        .entry(port.id.clone())
                        .or_insert_with(|| BusUnit::start(port, &ctx));
                    if bus.slaves.contains_key(&slave.id) {
                        continue;
                    }
                    bus.add_slave(slave, &ctx);
                    started.push(slave.id.clone());
                }
            }
        }
        started
    }

    fn start_line(
        &self,
        config: &Config,
        line: &SerialDeviceConfig,
    ) -> Option<(SerialDeviceConfig, SerialPortConfig, Unit)> {
        let id = DeviceId::new(&line.id);
        let Some(port) = config.serial_port(&line.port) else {
            tracing::error!(device = %id, port = %line.port, "Serial port not defined; device not started");
            return None;
        };
        let decoder = decoder_for(&id, &line.format_options(), &line.metrics, &self.ctx.limits)?;
        let ctx = &self.ctx;
        let outlet = Outlet::new(
            ctx.events.clone(),
            ctx.pipeline.overflow,
            ctx.telemetry.source(&id),
        );
        let status = supervise::Status::new(id, "serial", outlet);
        let unit = Unit::new(ctx);
        let task =
            serial::LineDevice::new(port.clone(), line.clone(), decoder, unit.cancel.clone());
        unit.spawn(ctx, task.run(status));
        Some((line.clone(), port.clone(), unit))
    }
}

impl BusUnit {
    fn start(port: &SerialPortConfig, ctx: &SourceContext) -> Self {
        // Each slave has at most one request waiting; more slaves only wait their turn.
        let (requests, inbox) = mpsc::channel(8);
        let done = TaskTracker::new();
        ctx.tracker
            .spawn(done.track_future(modbus::Bus::new(port.clone()).run(inbox)));
        Self {
            port: port.clone(),
            requests,
            done,
            slaves: HashMap::new(),
        }
    }

    fn add_slave(&mut self, slave: &ModbusDeviceConfig, ctx: &SourceContext) {
        let id = DeviceId::new(&slave.id);
        let outlet = Outlet::new(
            ctx.events.clone(),
            ctx.pipeline.overflow,
            ctx.telemetry.source(&id),
        );
        let status = supervise::Status::new(id, "modbus", outlet);
        let unit = Unit::new(ctx);
        let task = modbus::SlaveDevice::new(slave.clone(), &self.port, self.requests.clone());
        unit.spawn(ctx, task.run(status, unit.cancel.clone()));
        self.slaves.insert(slave.id.clone(), (slave.clone(), unit));
    }

    /// Stops the slaves, then the bus (it ends when the last request sender is gone).
    async fn stop(self) {
        for (_, (_, unit)) in self.slaves {
            unit.stop().await;
        }
        drop(self.requests);
        self.done.close();
        self.done.wait().await;
    }
}

/// The MQTT devices of one broker, in config order.
fn mqtt_devices(config: &Config, broker: &str) -> Vec<MqttDeviceConfig> {
    config
        .devices
        .iter()
        .filter_map(|d| match d {
            DeviceConfig::Mqtt(m) if m.broker.as_deref() == Some(broker) => Some(m.clone()),
            _ => None,
        })
        .collect()
}

/// Equal but for where they stand in the file.
fn same_broker(a: &BrokerConfig, b: &BrokerConfig) -> bool {
    BrokerConfig {
        line: 0,
        ..a.clone()
    } == BrokerConfig {
        line: 0,
        ..b.clone()
    }
}

fn same_port(a: &SerialPortConfig, b: &SerialPortConfig) -> bool {
    SerialPortConfig {
        line: 0,
        ..a.clone()
    } == SerialPortConfig {
        line: 0,
        ..b.clone()
    }
}

fn same_mqtt(a: &MqttDeviceConfig, b: &MqttDeviceConfig) -> bool {
    MqttDeviceConfig {
        line: 0,
        ..a.clone()
    } == MqttDeviceConfig {
        line: 0,
        ..b.clone()
    }
}

fn same_line(a: &SerialDeviceConfig, b: &SerialDeviceConfig) -> bool {
    SerialDeviceConfig {
        line: 0,
        ..a.clone()
    } == SerialDeviceConfig {
        line: 0,
        ..b.clone()
    }
}

fn same_modbus(a: &ModbusDeviceConfig, b: &ModbusDeviceConfig) -> bool {
    ModbusDeviceConfig {
        line: 0,
        ..a.clone()
    } == ModbusDeviceConfig {
        line: 0,
        ..b.clone()
    }
}

/// Sleeps until `at`, or forever when there is no deadline.
async fn sleep_until(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// A device's decoder; `None` (logged) when its pattern does not compile or its time zone is
/// unknown, which loading the config rules out, so the device is left out rather than the
/// gateway stopped.
fn decoder_for(
    device: &DeviceId,
    options: &FormatOptions<'_>,
    metrics: &[MetricConfig],
    limits: &Arc<DecodeLimits>,
) -> Option<Decoder> {
    let fields = metrics.iter().map(|m| m.field().to_string()).collect();
    match Decoder::new(options, fields, limits.clone()) {
        Ok(decoder) => Some(decoder),
        Err(err) => {
            tracing::error!(device = %device, error = %err, "Device decoder unusable; device not started");
            None
        }
    }
}
