//! Modbus RTU: one bus task per serial port serialises every request on it; one task per
//! slave polls its register map at its own interval through the bus.
//!
//! ```text
//! slave task (×N) ──Request──► bus task ──► tokio-modbus RTU client ──► port
//!                 ◄──Answer or BusError──
//! ```
//!
//! A request that times out, or whose answer is garbled, costs the bus one `timeout`; the
//! client is then rebuilt on a freshly opened and flushed port, because tokio-modbus would
//! otherwise take the stale answer for the next one. A slave that keeps failing is probed
//! at a growing interval (a circuit breaker), so a dead meter delays the others by at most
//! one timeout per probe. An unplugged port is reopened with capped backoff.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;
use tokio_modbus::client::{self, Reader as _};
use tokio_modbus::prelude::SlaveContext as _;
use tokio_serial::{ClearBuffer, SerialPort as _, SerialStream};
use tokio_util::sync::CancellationToken;

use super::backoff::Backoff;
use super::supervise::{Status, Stopped};
use crate::config::{ModbusDeviceConfig, RegisterTable, SerialPortConfig};
use crate::decode::registers::{Answer, ReadBlock, answer_bytes, decode_block, plan_reads};
use crate::reading::{Bytes, DecodeError, DeviceState, FaultCounts, Message, now_millis};

/// Consecutive failed polls after which a slave is probed at a growing interval.
const BREAKER_AFTER: u32 = 3;
/// The first wait before reopening a port that failed.
const REOPEN_MIN: Duration = Duration::from_millis(100);

/// Why a request got no usable answer.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub(super) enum BusError {
    #[error("port {0}")]
    PortDown(String),
    #[error("no answer within {0:?}")]
    Timeout(Duration),
    #[error("garbled answer ({0})")]
    Garbled(String),
    #[error("exception: {0}")]
    Exception(String),
}

impl BusError {
    fn count(&self) -> FaultCounts {
        let mut counts = FaultCounts::default();
        match self {
            Self::PortDown(_) => {}
            Self::Timeout(_) => counts.timeouts = 1,
            Self::Garbled(_) => counts.crc_errors = 1,
            Self::Exception(_) => counts.exceptions = 1,
        }
        counts
    }
}

/// One read for one slave, answered on `reply`.
pub(super) struct Request {
    slave: u8,
    table: RegisterTable,
    start: u16,
    count: u16,
    reply: oneshot::Sender<Result<Answer, BusError>>,
}

/// The task that owns one serial port as a Modbus bus.
pub(super) struct Bus {
    port: SerialPortConfig,
    link: Option<Link>,
    reopen: Backoff,
    reopen_at: Instant,
    last_error: String,
}

/// An open port with its client.
struct Link {
    client: client::Context,
    /// Bytes the port delivered, so a timeout can tell silence from a garbled answer.
    received: Arc<AtomicU64>,
}

impl Bus {
    pub fn new(port: SerialPortConfig) -> Self {
        Self {
            reopen: Backoff::new(REOPEN_MIN, port.reconnect_max),
            port,
            link: None,
            reopen_at: Instant::now(),
            last_error: String::new(),
        }
    }

    /// Serves requests in arrival order until every slave task has hung up.
    pub async fn run(mut self, mut requests: mpsc::Receiver<Request>) {
        while let Some(request) = requests.recv().await {
            let answer = self.serve(&request).await;
            // A slave task that stopped waiting no longer needs the answer.
            let _ = request.reply.send(answer);
        }
        tracing::debug!(port = %self.port.path.display(), "Modbus bus closed");
    }

    async fn serve(&mut self, request: &Request) -> Result<Answer, BusError> {
        let timeout = self.port.timeout;
        let link = self.link()?;
        link.client.set_slave(tokio_modbus::Slave(request.slave));
        let before = link.received.load(Ordering::Relaxed);
        let (start, count) = (request.start, request.count);
        let call = async {
            match request.table {
                RegisterTable::Holding => link
                    .client
                    .read_holding_registers(start, count)
                    .await
                    .map(|r| r.map(Answer::Words)),
                RegisterTable::Input => link
                    .client
                    .read_input_registers(start, count)
                    .await
                    .map(|r| r.map(Answer::Words)),
                RegisterTable::Coil => link
                    .client
                    .read_coils(start, count)
                    .await
                    .map(|r| r.map(Answer::Bits)),
                RegisterTable::Discrete => link
                    .client
                    .read_discrete_inputs(start, count)
                    .await
                    .map(|r| r.map(Answer::Bits)),
            }
        };
        let result = tokio::time::timeout(timeout, call).await;
        let heard = link.received.load(Ordering::Relaxed) > before;
        match result {
            Ok(Ok(Ok(answer))) => Ok(answer),
            Ok(Ok(Err(code))) => Err(BusError::Exception(format!(
                "{code} (0x{:02x})",
                u8::from(code)
            ))),
            Ok(Err(tokio_modbus::Error::Protocol(err))) => {
                self.link = None;
                Err(BusError::Garbled(err.to_string()))
            }
            Ok(Err(tokio_modbus::Error::Transport(err)))
                if err.kind() == std::io::ErrorKind::InvalidData =>
            {
                self.link = None;
                Err(BusError::Garbled(err.to_string()))
            }
            Ok(Err(tokio_modbus::Error::Transport(err))) => {
                self.fail(format!("{}: {err}", self.port.path.display()));
                Err(BusError::PortDown(self.last_error.clone()))
            }
            Err(_) => {
                // The client may hold half an answer, or one may still arrive: rebuild it on
                // a flushed port before the next request.
                self.link = None;
                if heard {
                    Err(BusError::Garbled("bad CRC or framing".into()))
                } else {
                    Err(BusError::Timeout(timeout))
                }
            }
        }
    }

    /// The open link, opening the port when it is closed and its backoff has passed.
    fn link(&mut self) -> Result<&mut Link, BusError> {
        if self.link.is_none() {
            if Instant::now() < self.reopen_at {
                return Err(BusError::PortDown(self.last_error.clone()));
            }
            match open_link(&self.port) {
                Ok(link) => {
                    if !self.last_error.is_empty() {
                        tracing::info!(port = %self.port.path.display(), "Modbus port open again");
                        self.last_error.clear();
                    }
                    self.reopen.reset();
                    self.link = Some(link);
                }
                Err(err) => {
                    self.fail(err);
                    return Err(BusError::PortDown(self.last_error.clone()));
                }
            }
        }
        self.link
            .as_mut()
            .ok_or_else(|| BusError::PortDown(self.last_error.clone()))
    }

    /// Closes the port after an I/O error; it is reopened after a backoff.
    fn fail(&mut self, error: String) {
        let delay = self.reopen.next_delay();
        tracing::warn!(port = %self.port.path.display(), error = %error, retry_in = ?delay, "Modbus port failed");
        self.link = None;
        self.reopen_at = Instant::now() + delay;
        self.last_error = error;
    }
}

/// Opens the port, drops whatever bytes wait in it (a stale answer), and attaches a client.
fn open_link(port: &SerialPortConfig) -> Result<Link, String> {
    let stream = super::serial::open(port).map_err(|fault| fault.to_string())?;
    stream
        .clear(ClearBuffer::Input)
        .map_err(|err| format!("{}: cannot flush: {err}", port.path.display()))?;
    let received = Arc::new(AtomicU64::new(0));
    let counted = Counted {
        inner: stream,
        received: received.clone(),
    };
    Ok(Link {
        client: client::rtu::attach(counted),
        received,
    })
}

/// A port that counts the bytes it delivers.
struct Counted {
    inner: SerialStream,
    received: Arc<AtomicU64>,
}

impl AsyncRead for Counted {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.inner).poll_read(cx, buf);
        let got = buf.filled().len() - before;
        self.received.fetch_add(got as u64, Ordering::Relaxed);
        polled
    }
}

impl AsyncWrite for Counted {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// One slave: polls its register map through the bus and reports what came back.
pub(super) struct SlaveDevice {
    config: ModbusDeviceConfig,
    blocks: Vec<ReadBlock>,
    bus: mpsc::Sender<Request>,
    /// Where readings came from: the port and the slave address.
    source: Arc<str>,
    probe_max: Duration,
}

impl SlaveDevice {
    pub fn new(
        config: ModbusDeviceConfig,
        port: &SerialPortConfig,
        bus: mpsc::Sender<Request>,
    ) -> Self {
        Self {
            blocks: plan_reads(&config.registers),
            source: format!("{}#{}", port.path.display(), config.slave).into(),
            probe_max: port.reconnect_max.max(config.poll_interval),
            config,
            bus,
        }
    }

    /// Polls until cancelled.
    pub async fn run(self, mut status: Status, cancel: CancellationToken) -> Stopped {
        let interval = self.config.poll_interval;
        let mut breaker = Backoff::new(interval * 2, self.probe_max);
        let mut failures = 0u32;
        let mut next = Instant::now();
        loop {
            tokio::select! {
                () = cancel.cancelled() => return Stopped::Cancelled,
                () = tokio::time::sleep_until(next) => {}
            }
            let scheduled = next;
            let outcome = match self.poll(&status).await {
                Ok(outcome) => outcome,
                Err(stopped) => return stopped,
            };
            let reported = match &outcome.error {
                Some(error) if !outcome.answered => {
                    failures += 1;
                    if failures == 1 {
                        tracing::warn!(device = %status.device(), slave = self.config.slave, %error, "Modbus slave not answering");
                    }
                    status
                        .set(
                            DeviceState::Failing,
                            Some(format!("slave {}: {error}", self.config.slave)),
                        )
                        .await
                }
                _ => {
                    if failures > 0 {
                        tracing::info!(device = %status.device(), slave = self.config.slave, failed_polls = failures, "Modbus slave answering again");
                    }
                    failures = 0;
                    breaker.reset();
                    status.set(DeviceState::Connected, None).await
                }
            };
            if let Err(stopped) = reported {
                return stopped;
            }
            if let Err(stopped) = status.count(outcome.counts).await {
                return stopped;
            }
            next = if failures >= BREAKER_AFTER {
                Instant::now() + breaker.next_delay()
            } else {
                // Keep the cadence; after a late poll, start it over rather than catch up.
                let due = scheduled + interval;
                if due > Instant::now() {
                    due
                } else {
                    Instant::now() + interval
                }
            };
        }
    }

    /// Reads every block once and sends what came back to the pipeline.
    async fn poll(&self, status: &Status) -> Result<PollOutcome, Stopped> {
        let mut outcome = PollOutcome::default();
        for block in &self.blocks {
            let (reply, answer) = oneshot::channel();
            let request = Request {
                slave: self.config.slave,
                table: block.table,
                start: block.start,
                count: block.count,
                reply,
            };
            if self.bus.send(request).await.is_err() {
                return Err(Stopped::PipelineClosed);
            }
            let answer = match answer.await {
                Ok(Ok(answer)) => answer,
                Ok(Err(error)) => {
                    outcome.counts.add(&error.count());
                    // An exception concerns this block only; silence, garbage or a dead
                    // port concern the slave, and asking again now would hold the bus for
                    // another timeout.
                    let unreachable = !matches!(error, BusError::Exception(_));
                    outcome.error = Some(error);
                    if unreachable {
                        break;
                    }
                    continue;
                }
                Err(_) => return Err(Stopped::PipelineClosed),
            };
            outcome.answered = true;
            let received_at = now_millis();
            let decoded = decode_block(&self.config.registers, block, &answer)
                .map(Into::into)
                .map_err(DecodeError::malformed);
            let message = Message {
                device: status.device().clone(),
                source: self.source.clone(),
                received_at,
                raw: Bytes::from(answer_bytes(&answer)),
                decoded,
                ticket: None,
            };
            if !status.outlet().send(message).await {
                return Err(Stopped::PipelineClosed);
            }
        }
        Ok(outcome)
    }
}

#[derive(Default)]
struct PollOutcome {
    /// At least one block was answered.
    answered: bool,
    /// The last failure, if any block failed.
    error: Option<BusError>,
    counts: FaultCounts,
}
