//! Serial text-line sensors: one task per device owns its port, frames lines, decodes them
//! and hands them to the pipeline. An unplugged cable, a port that will not open or a sensor
//! that falls silent closes the port; it is reopened with capped backoff, forever.

use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::time::{Instant, MissedTickBehavior};
use tokio_serial::{SerialPortBuilderExt as _, SerialStream};
use tokio_util::sync::CancellationToken;

use super::framing::{Frame, LineFramer};
use super::sleep_until;
use super::supervise::{Connect, Fault, Status, Stopped, supervise};
use crate::config::{FlowControl, Parity, SerialDeviceConfig, SerialPortConfig};
use crate::decode::Decoder;
use crate::reading::{DeviceState, Message, RejectReason, Rejection, SourceEvent, now_millis};

/// The first wait before reopening a port.
const REOPEN_MIN: Duration = Duration::from_millis(100);
/// A poll command that cannot be written in this long means the port is stuck.
const WRITE_TIMEOUT: Duration = Duration::from_secs(2);

/// A text-line sensor on a serial port.
pub(super) struct LineDevice {
    port: SerialPortConfig,
    config: SerialDeviceConfig,
    decoder: Decoder,
    /// The port's path, naming where rejected lines came from.
    source: Arc<str>,
    framer: LineFramer,
    cancel: CancellationToken,
}

impl LineDevice {
    pub fn new(
        port: SerialPortConfig,
        config: SerialDeviceConfig,
        decoder: Decoder,
        cancel: CancellationToken,
    ) -> Self {
        Self {
            source: port.path.display().to_string().into(),
            framer: LineFramer::new(config.terminator.as_bytes(), config.max_line),
            port,
            config,
            decoder,
            cancel,
        }
    }

    /// Reads lines until cancelled, reopening the port after every failure.
    pub async fn run(mut self, status: Status) -> Stopped {
        let backoff = (REOPEN_MIN, self.port.reconnect_max);
        let cancel = self.cancel.clone();
        supervise(status, cancel, backoff, &mut self).await
    }

    /// One connection: reads until the port fails, the sensor falls silent, or `cancel`.
    async fn read_lines(
        &mut self,
        mut stream: SerialStream,
        status: &mut Status,
    ) -> Result<Stopped, Fault> {
        let source = self.source.clone();
        let mut buf = vec![0u8; 4096];
        let mut poll = self.config.poll_interval.map(|every| {
            let mut tick = tokio::time::interval(every);
            tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
            tick
        });
        let mut last_line = Instant::now();
        let mut frames = Vec::new();
        loop {
            let silent_at = self.config.expected_interval.map(|i| last_line + i);
            tokio::select! {
                () = self.cancel.cancelled() => return Ok(Stopped::Cancelled),
                read = stream.read(&mut buf) => {
                    let n = match read {
                        Ok(0) => return Err(Fault::Failed(format!("{source}: port closed (end of file)"))),
                        Ok(n) => n,
                        Err(err) => return Err(Fault::Failed(format!("{source}: read failed: {err}"))),
                    };
                    status.heard();
                    self.framer.push(&buf[..n], |frame| frames.push(frame));
                    for frame in frames.drain(..) {
                        last_line = Instant::now();
                        if !self.forward(frame, status).await {
                            return Ok(Stopped::PipelineClosed);
                        }
                    }
                    if status.set(DeviceState::Connected, None).await.is_err() {
                        return Ok(Stopped::PipelineClosed);
                    }
                }
                _ = tick(&mut poll) => {
                    let command = self.config.poll_command.as_deref().unwrap_or_default();
                    match tokio::time::timeout(WRITE_TIMEOUT, stream.write_all(command.as_bytes())).await {
                        Ok(Ok(())) => {}
                        Ok(Err(err)) => return Err(Fault::Failed(format!("{source}: writing the poll command failed: {err}"))),
                        Err(_) => return Err(Fault::Failed(format!("{source}: poll command not written within {WRITE_TIMEOUT:?}"))),
                    }
                }
                () = sleep_until(silent_at) => {
                    let silent = self.config.expected_interval.unwrap_or_default();
                    return Err(Fault::Silent(format!(
                        "no line for {}; reopening {source}",
                        humantime::format_duration(silent)
                    )));
                }
            }
        }
    }

    /// Decodes one frame and sends it on; false when the pipeline is gone.
    async fn forward(&self, frame: Frame, status: &Status) -> bool {
        let received_at = now_millis();
        let source = &self.source;
        match frame {
            Frame::Line(line) => {
                let decoded = self.decoder.decode(&line, received_at);
                let message = Message {
                    device: status.device().clone(),
                    source: source.clone(),
                    received_at,
                    raw: line,
                    decoded,
                    ticket: None,
                };
                status.outlet().send(message).await
            }
            Frame::TooLong(head) => {
                let rejection = Rejection::whole(
                    Some(status.device().clone()),
                    source.clone(),
                    received_at,
                    RejectReason::TooLarge,
                    format!(
                        "line longer than max_line ({} bytes); skipped to the next terminator",
                        self.config.max_line
                    ),
                    head,
                );
                status
                    .outlet()
                    .send_event(SourceEvent::Rejected {
                        rejection,
                        ticket: None,
                    })
                    .await
            }
        }
    }
}

impl Connect for LineDevice {
    async fn connect(&mut self, status: &mut Status) -> Result<Stopped, Fault> {
        self.framer.reset();
        let stream = open(&self.port)?;
        tracing::info!(device = %status.device(), port = %self.source, "Serial port open");
        if let Err(stopped) = status.set(DeviceState::Connected, None).await {
            return Ok(stopped);
        }
        self.read_lines(stream, status).await
    }
}

/// Opens a serial port with its configured line settings.
///
/// # Errors
/// [`Fault::Failed`] naming the path when the port cannot be opened.
pub(super) fn open(port: &SerialPortConfig) -> Result<SerialStream, Fault> {
    use tokio_serial::{DataBits, StopBits};
    let data_bits = match port.data_bits {
        5 => DataBits::Five,
        6 => DataBits::Six,
        7 => DataBits::Seven,
        _ => DataBits::Eight,
    };
    let parity = match port.parity {
        Parity::None => tokio_serial::Parity::None,
        Parity::Even => tokio_serial::Parity::Even,
        Parity::Odd => tokio_serial::Parity::Odd,
    };
    let flow_control = match port.flow_control {
        FlowControl::None => tokio_serial::FlowControl::None,
        FlowControl::Software => tokio_serial::FlowControl::Software,
        FlowControl::Hardware => tokio_serial::FlowControl::Hardware,
    };
    let stop_bits = if port.stop_bits == 2 {
        StopBits::Two
    } else {
        StopBits::One
    };
    let path = port.path.display().to_string();
    tokio_serial::new(&path, port.baud)
        .data_bits(data_bits)
        .parity(parity)
        .stop_bits(stop_bits)
        .flow_control(flow_control)
        .open_native_async()
        .map_err(|err| Fault::Failed(format!("cannot open {path}: {err}")))
}

async fn tick(poll: &mut Option<tokio::time::Interval>) -> Instant {
    match poll {
        Some(interval) => interval.tick().await,
        None => std::future::pending().await,
    }
}
