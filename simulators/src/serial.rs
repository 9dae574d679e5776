//! Serial text-line sensors: a deterministic plan of lines in four formats with faults, each
//! saying what the gateway should store, and a [`LineSensor`] that writes a plan to a
//! [`Pty`] at a pace or in answer to polls, and can be paused, unplugged and replugged
//! mid-plan.
//!
//! A line sensor writes only while a reader has the port open (see [`crate::pty`]): lines
//! are never queued for a gateway that is not there, so every line in
//! [`LineReport::written`] went to a connected reader. A line the gateway had not read yet
//! when the port is unplugged is lost with the pty, as on a real cable pull; tests that
//! unplug wait until the gateway has stored the lines before it.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::{CancellationToken, DropGuard};

use crate::plan::{Expect, humidity, temperature};
use crate::pty::{Pty, PtyError};
use crate::publish::Pace;

/// The regex that parses [`LineFormat::Regex`] lines (without their line ending), with
/// named captures `ts` (epoch ms), `temp` (°C, always signed) and `hum` (% RH):
/// `T:+21.5C H:40.2% @1700000000000`.
pub const REGEX_LINE: &str = r"^T:(?P<temp>[+-]\d+\.\d)C H:(?P<hum>\d+\.\d)% @(?P<ts>\d+)$";

/// Line formats of serial text sensors. Every line carries a timestamp (epoch ms, field or
/// column `ts`), a temperature (`temp`) and a relative humidity (`hum`), stored as the
/// metrics `temperature` and `humidity`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum LineFormat {
    /// `{"ts":1700000000000,"temp":21.5,"hum":40.2}`
    Json,
    /// `ts=1700000000000 temp=21.5 hum=40.2`
    #[value(name = "key_value")]
    KeyValue,
    /// `1700000000000,21.5,40.2`: columns ts, temp, hum; no header.
    Csv,
    /// `T:+21.5C H:40.2% @1700000000000`, parsed by the regex `REGEX_LINE`.
    Regex,
}

/// How lines end.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum LineEnding {
    #[default]
    Lf,
    CrLf,
}

impl LineEnding {
    pub fn as_bytes(self) -> &'static [u8] {
        match self {
            Self::Lf => b"\n",
            Self::CrLf => b"\r\n",
        }
    }
}

/// Faults a line sensor injects, cycled through in this order when `fault_every` is set.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum LineFault {
    /// Humidity 150 %: the temperature is stored, the humidity rejected `out_of_range`.
    OutOfRange,
    /// A NaN temperature (`"NaN"` as a JSON string, `NaN` in key_value and csv): rejected
    /// `not_finite`, the humidity stored. The regex format cannot carry one and gets
    /// [`LineFault::OutOfRange`] instead.
    NotANumber,
    /// The line cut short, so it does not parse as a whole: rejected `malformed`, nothing
    /// stored. json: its first half; key_value: up to `hum` without `=value`; csv: the ts
    /// and temp columns only; regex: up to `H:`.
    Malformed,
    /// 16 to 47 bytes that are not UTF-8 (the first is 0xFF, none is CR or LF) and a line
    /// ending, then the planned line: one `malformed` rejection, then both readings, as the
    /// gateway resyncs at the line ending.
    Noise,
    /// The planned line written in two writes with a pause between: one line, both
    /// readings stored.
    Split,
    /// `long_line_len` bytes of printable ASCII without a line ending, then a line ending,
    /// then the planned line: one `too_large` rejection, then both readings.
    TooLong,
}

const LINE_FAULTS: [LineFault; 6] = [
    LineFault::OutOfRange,
    LineFault::NotANumber,
    LineFault::Malformed,
    LineFault::Noise,
    LineFault::Split,
    LineFault::TooLong,
];

/// A deterministic sequence of lines from one serial sensor.
#[derive(Clone, Debug, PartialEq)]
pub struct LineScenario {
    pub format: LineFormat,
    /// How many lines.
    pub lines: u64,
    /// The first line's timestamp (epoch ms).
    pub start_ms: i64,
    /// Milliseconds between consecutive timestamps.
    pub period_ms: i64,
    /// Every n-th line carries a fault; 0 for none.
    pub fault_every: u64,
    pub line_ending: LineEnding,
    /// The length of a [`LineFault::TooLong`] line without its ending.
    pub long_line_len: usize,
    /// Picks the value series ([`temperature`], [`humidity`] of this device index).
    pub device: usize,
}

impl LineScenario {
    /// `lines` lines in `format`, from 1700000000000 ms one second apart, without faults,
    /// ending in LF, over-long lines of 8 KiB.
    ///
    /// ```
    /// use sensorgate_sim::serial::{LineFormat, LineScenario};
    /// let s = LineScenario::new(LineFormat::Csv, 3);
    /// let first = s.line(0);
    /// assert_eq!(first.bytes, b"1700000000000,15,30\n");
    /// assert_eq!(
    ///     first.expect.readings,
    ///     [("temperature", Some(1_700_000_000_000), 15.0), ("humidity", Some(1_700_000_000_000), 30.0)]
    /// );
    /// assert_eq!(s.lines().count(), 3);
    /// ```
    pub fn new(format: LineFormat, lines: u64) -> Self {
        Self {
            format,
            lines,
            start_ms: 1_700_000_000_000,
            period_ms: 1000,
            fault_every: 0,
            line_ending: LineEnding::Lf,
            long_line_len: 8 * 1024,
            device: 0,
        }
    }

    /// Every planned line in order.
    pub fn lines(&self) -> impl Iterator<Item = PlannedLine> + Send + 'static {
        let scenario = self.clone();
        (0..self.lines).map(move |seq| scenario.line(seq))
    }

    /// The fault line `seq` carries, if any.
    pub fn fault(&self, seq: u64) -> Option<LineFault> {
        let every = self.fault_every;
        let fault = (every > 0 && seq % every == every - 1)
            .then(|| LINE_FAULTS[((seq / every) % LINE_FAULTS.len() as u64) as usize]);
        match (fault, self.format) {
            (Some(LineFault::NotANumber), LineFormat::Regex) => Some(LineFault::OutOfRange),
            (fault, _) => fault,
        }
    }

    /// Line `seq` and what it should become.
    pub fn line(&self, seq: u64) -> PlannedLine {
        let fault = self.fault(seq);
        let time = self.start_ms + seq as i64 * self.period_ms;
        let temp = temperature(self.device, seq);
        let hum = if fault == Some(LineFault::OutOfRange) {
            150.0
        } else {
            humidity(self.device, seq)
        };
        let nan = fault == Some(LineFault::NotANumber);
        let text = self.render(time, temp, nan, hum);
        let end = self.line_ending.as_bytes();
        let line = [text.as_bytes(), end].concat();
        let mut expect = Expect::default();
        let both = |expect: &mut Expect| {
            expect.readings.push(("temperature", Some(time), temp));
            expect.readings.push(("humidity", Some(time), hum));
        };
        let mut split_at = None;
        let bytes = match fault {
            None | Some(LineFault::Split) => {
                if fault.is_some() {
                    split_at = Some(line.len() / 2);
                }
                both(&mut expect);
                line
            }
            Some(LineFault::OutOfRange) => {
                expect.readings.push(("temperature", Some(time), temp));
                expect.rejections.push("out_of_range");
                line
            }
            Some(LineFault::NotANumber) => {
                expect.rejections.push("not_finite");
                expect.readings.push(("humidity", Some(time), hum));
                line
            }
            Some(LineFault::Malformed) => {
                expect.rejections.push("malformed");
                [self.cut(&text).as_bytes(), end].concat()
            }
            Some(LineFault::Noise) => {
                expect.rejections.push("malformed");
                both(&mut expect);
                [&noise(self.device, seq)[..], end, &line].concat()
            }
            Some(LineFault::TooLong) => {
                expect.rejections.push("too_large");
                both(&mut expect);
                let filler = b"0123456789abcdefghijklmnopqrstuvwxyz "
                    .iter()
                    .copied()
                    .cycle()
                    .take(self.long_line_len);
                filler.chain(end.iter().copied()).chain(line).collect()
            }
        };
        PlannedLine {
            seq,
            bytes,
            split_at,
            fault,
            expect,
        }
    }

    fn render(&self, time: i64, temp: f64, nan: bool, hum: f64) -> String {
        match self.format {
            LineFormat::Json => {
                let temp = if nan {
                    "\"NaN\"".to_string()
                } else {
                    temp.to_string()
                };
                format!(r#"{{"ts":{time},"temp":{temp},"hum":{hum}}}"#)
            }
            LineFormat::KeyValue => {
                let temp = if nan { "NaN".into() } else { temp.to_string() };
                format!("ts={time} temp={temp} hum={hum}")
            }
            LineFormat::Csv => {
                let temp = if nan { "NaN".into() } else { temp.to_string() };
                format!("{time},{temp},{hum}")
            }
            LineFormat::Regex => format!("T:{temp:+.1}C H:{hum:.1}% @{time}"),
        }
    }

    /// The line cut so that it no longer parses; see [`LineFault::Malformed`].
    fn cut<'a>(&self, text: &'a str) -> &'a str {
        match self.format {
            LineFormat::Json => &text[..text.len() / 2],
            LineFormat::KeyValue => text.find(" hum=").map_or(text, |at| &text[..at + 4]),
            LineFormat::Csv => text.rsplit_once(',').map_or(text, |(head, _)| head),
            LineFormat::Regex => text.find("H:").map_or(text, |at| &text[..at + 2]),
        }
    }
}

/// Deterministic bytes that are not UTF-8 and hold no CR or LF.
fn noise(device: usize, seq: u64) -> Vec<u8> {
    let mut state = (device as u64) << 32 ^ seq ^ 0x9E37_79B9_7F4A_7C15;
    let mut next = move || {
        state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    };
    let len = 16 + (next() % 32) as usize;
    let mut bytes = vec![0xFF];
    bytes.extend((1..len).map(|_| 0x80 | (next() as u8)));
    bytes
}

/// One line (or, for some faults, lines) to write and what the gateway should make of it.
#[derive(Clone, Debug, PartialEq)]
pub struct PlannedLine {
    pub seq: u64,
    /// Everything to write, line endings included.
    pub bytes: Vec<u8>,
    /// Write `bytes[..at]`, pause, then the rest.
    pub split_at: Option<usize>,
    pub fault: Option<LineFault>,
    pub expect: Expect,
}

#[derive(Debug, thiserror::Error)]
pub enum SerialError {
    #[error(transparent)]
    Pty(#[from] PtyError),
    #[error("the sensor at {0} has stopped")]
    Stopped(PathBuf),
}

/// How a [`LineSensor`] writes its plan.
#[derive(Clone, Debug, PartialEq)]
pub struct LineOptions {
    /// Lines per second while streaming; ignored in poll mode.
    pub pace: Pace,
    /// Poll mode: stay silent until these bytes arrive (for example `READ\r\n`), then answer
    /// each with the next line. Polls that cannot be answered (the plan is finished or
    /// paused, the port unplugged, the poller gone) are counted and dropped, as a busy
    /// device would.
    pub poll: Option<Vec<u8>>,
    /// The pause inside a [`LineFault::Split`] line.
    pub split_pause: Duration,
    /// Start paused before the line with this index (see [`LineSensor::pause_at`]).
    pub pause_at: Option<u64>,
}

impl Default for LineOptions {
    fn default() -> Self {
        Self {
            pace: Pace::Unlimited,
            poll: None,
            split_pause: Duration::from_millis(50),
            pause_at: None,
        }
    }
}

/// What a line sensor has done so far.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct LineReport {
    /// Planned lines written completely, all to a connected reader: the plan's first
    /// `written` lines, since none is ever skipped.
    pub written: u64,
    pub bytes_written: u64,
    /// Faults among the written lines, by kind.
    pub faults: BTreeMap<LineFault, u64>,
    /// Polls received, and those dropped unanswered.
    pub polls: u64,
    pub polls_unanswered: u64,
    /// Bytes the reader wrote to the sensor.
    pub bytes_received: u64,
    pub unplugs: u64,
    /// Every planned line has been written.
    pub plan_done: bool,
}

enum Command {
    PauseAt(Option<u64>),
    Unplug(oneshot::Sender<()>),
    Replug(oneshot::Sender<Result<(), PtyError>>),
}

/// A serial sensor writing a plan of lines to a [`Pty`] from its own task. It keeps the
/// port plugged after the plan ends, until [`LineSensor::stop`], so the gateway can read the
/// last lines; dropping the handle stops it too.
pub struct LineSensor {
    path: PathBuf,
    commands: mpsc::Sender<Command>,
    progress: watch::Receiver<LineReport>,
    cancel: CancellationToken,
    task: JoinHandle<Result<LineReport, SerialError>>,
    _stop_on_drop: DropGuard,
}

impl LineSensor {
    /// Starts writing `plan` to `pty`. It ends at `cancel`, [`LineSensor::stop`] or when
    /// the handle is dropped.
    ///
    /// # Panics
    /// Outside a tokio runtime.
    pub fn start(
        pty: Pty,
        plan: impl IntoIterator<Item = PlannedLine, IntoIter: Send + 'static>,
        options: LineOptions,
        cancel: CancellationToken,
    ) -> Self {
        let path = pty.path().to_path_buf();
        let (commands, command_rx) = mpsc::channel(8);
        let (progress_tx, progress) = watch::channel(LineReport::default());
        let cancel = cancel.child_token();
        let task = tokio::spawn(run(
            pty,
            Box::new(plan.into_iter()),
            options,
            command_rx,
            progress_tx,
            cancel.clone(),
        ));
        Self {
            path,
            commands,
            progress,
            _stop_on_drop: cancel.clone().drop_guard(),
            cancel,
            task,
        }
    }

    /// The path the gateway opens.
    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn report(&self) -> LineReport {
        self.progress.borrow().clone()
    }

    /// Waits until at least `lines` planned lines are written (or the plan has ended).
    ///
    /// # Errors
    /// When the sensor stopped first.
    pub async fn wait_written(&self, lines: u64) -> Result<LineReport, SerialError> {
        let mut progress = self.progress.clone();
        progress
            .wait_for(|r| r.written >= lines || r.plan_done)
            .await
            .map(|r| r.clone())
            .map_err(|_| self.stopped())
    }

    /// Waits until every planned line is written.
    ///
    /// # Errors
    /// When the sensor stopped first.
    pub async fn done(&self) -> Result<LineReport, SerialError> {
        let mut progress = self.progress.clone();
        progress
            .wait_for(|r| r.plan_done)
            .await
            .map(|r| r.clone())
            .map_err(|_| self.stopped())
    }

    /// Writes no line with index `seq` or later until told otherwise; `None` resumes.
    ///
    /// # Errors
    /// When the sensor has stopped.
    pub async fn pause_at(&self, seq: Option<u64>) -> Result<(), SerialError> {
        self.send(Command::PauseAt(seq)).await
    }

    /// Stops writing after the line in progress.
    ///
    /// # Errors
    /// When the sensor has stopped.
    pub async fn pause(&self) -> Result<(), SerialError> {
        self.pause_at(Some(0)).await
    }

    /// # Errors
    /// When the sensor has stopped.
    pub async fn resume(&self) -> Result<(), SerialError> {
        self.pause_at(None).await
    }

    /// Writes until `lines` planned lines are written, then pauses there.
    ///
    /// # Errors
    /// When the sensor has stopped.
    pub async fn run_until(&self, lines: u64) -> Result<LineReport, SerialError> {
        self.pause_at(Some(lines)).await?;
        self.wait_written(lines).await
    }

    /// Pulls the cable (see [`Pty::unplug`]); the sensor writes nothing until replugged.
    ///
    /// # Errors
    /// When the sensor has stopped.
    pub async fn unplug(&self) -> Result<(), SerialError> {
        let (tx, rx) = oneshot::channel();
        self.send(Command::Unplug(tx)).await?;
        rx.await.map_err(|_| self.stopped())
    }

    /// Plugs in a fresh pty at the same path; writing goes on with the next planned line.
    ///
    /// # Errors
    /// When the sensor has stopped or the pty cannot be made.
    pub async fn replug(&self) -> Result<(), SerialError> {
        let (tx, rx) = oneshot::channel();
        self.send(Command::Replug(tx)).await?;
        Ok(rx.await.map_err(|_| self.stopped())??)
    }

    /// Stops the sensor, unplugs its port, and returns what it did.
    ///
    /// # Errors
    /// When the sensor had failed.
    pub async fn stop(self) -> Result<LineReport, SerialError> {
        self.cancel.cancel();
        match self.task.await {
            Ok(result) => result,
            Err(_) => Err(SerialError::Stopped(self.path.clone())),
        }
    }

    async fn send(&self, command: Command) -> Result<(), SerialError> {
        self.commands
            .send(command)
            .await
            .map_err(|_| self.stopped())
    }

    fn stopped(&self) -> SerialError {
        SerialError::Stopped(self.path.clone())
    }
}

enum Event {
    Stop,
    Command(Command),
    Read(Result<usize, PtyError>),
    Write(Result<(), PtyError>),
}

async fn run(
    mut pty: Pty,
    plan: Box<dyn Iterator<Item = PlannedLine> + Send>,
    options: LineOptions,
    mut commands: mpsc::Receiver<Command>,
    progress: watch::Sender<LineReport>,
    cancel: CancellationToken,
) -> Result<LineReport, SerialError> {
    let mut report = LineReport::default();
    let mut plan = plan.peekable();
    let mut pause_at = options.pause_at;
    let mut polls = options
        .poll
        .as_deref()
        .filter(|p| !p.is_empty())
        .map(PollMatcher::new);
    let mut pending_polls = 0u64;
    let mut pacer = Pacer::new(options.pace);
    let mut buf = [0u8; 512];
    tracing::info!(path = %pty.path().display(), poll = polls.is_some(), "Line sensor started");
    loop {
        let Some(next) = plan.peek() else {
            if !report.plan_done {
                report.plan_done = true;
                tracing::debug!(path = %pty.path().display(), written = report.written, "Line plan done");
            }
            report.polls_unanswered += std::mem::take(&mut pending_polls);
            progress.send_replace(report.clone());
            // Keep the port up (and keep reading polls) until told to stop.
            match tokio::select! {
                () = cancel.cancelled() => Event::Stop,
                cmd = commands.recv() => cmd.map_or(Event::Stop, Event::Command),
                read = pty.read(&mut buf), if pty.is_plugged() => Event::Read(read),
            } {
                Event::Stop => break,
                Event::Command(cmd) => command(&mut pty, cmd, &mut pause_at, &mut report),
                Event::Read(read) => {
                    received(read?, &buf, &mut polls, &mut pending_polls, &mut report)
                }
                Event::Write(_) => {}
            }
            continue;
        };
        let may_write = pty.is_plugged() && pause_at.is_none_or(|p| next.seq < p);
        // A poll from a reader that has gone is not answered to the next one.
        if !may_write || (pending_polls > 0 && !pty.peer_connected()) {
            report.polls_unanswered += std::mem::take(&mut pending_polls);
        }
        let polled = polls.is_some();
        let want_write = may_write && (!polled || pending_polls > 0);
        let due = pacer.due();
        progress.send_replace(report.clone());
        let event = tokio::select! {
            biased;
            () = cancel.cancelled() => Event::Stop,
            cmd = commands.recv() => cmd.map_or(Event::Stop, Event::Command),
            read = pty.read(&mut buf), if pty.is_plugged() => Event::Read(read),
            ready = ready_to_write(&pty, due, polled), if want_write => Event::Write(ready),
        };
        match event {
            Event::Stop => break,
            Event::Command(cmd) => command(&mut pty, cmd, &mut pause_at, &mut report),
            Event::Read(read) => received(read?, &buf, &mut polls, &mut pending_polls, &mut report),
            Event::Write(ready) => {
                ready?;
                let Some(line) = plan.next() else { continue };
                write_line(&pty, &line, options.split_pause).await?;
                report.written += 1;
                report.bytes_written += line.bytes.len() as u64;
                if let Some(fault) = line.fault {
                    *report.faults.entry(fault).or_default() += 1;
                }
                if polled {
                    pending_polls -= 1;
                } else {
                    pacer.wrote();
                }
            }
        }
    }
    progress.send_replace(report.clone());
    tracing::info!(path = %pty.path().display(), written = report.written, "Line sensor stopped");
    Ok(report)
}

fn command(pty: &mut Pty, command: Command, pause_at: &mut Option<u64>, report: &mut LineReport) {
    match command {
        Command::PauseAt(seq) => *pause_at = seq,
        Command::Unplug(done) => {
            pty.unplug();
            report.unplugs += 1;
            let _ = done.send(());
        }
        Command::Replug(done) => {
            let _ = done.send(pty.replug());
        }
    }
}

fn received(
    n: usize,
    buf: &[u8],
    polls: &mut Option<PollMatcher>,
    pending: &mut u64,
    report: &mut LineReport,
) {
    report.bytes_received += n as u64;
    if let Some(matcher) = polls {
        let count = matcher.feed(&buf[..n]);
        report.polls += count;
        *pending += count;
    }
}

async fn ready_to_write(pty: &Pty, due: Instant, polled: bool) -> Result<(), PtyError> {
    if !polled {
        tokio::time::sleep_until(due).await;
    }
    pty.wait_for_peer().await
}

async fn write_line(pty: &Pty, line: &PlannedLine, pause: Duration) -> Result<(), PtyError> {
    match line.split_at {
        Some(at) if at < line.bytes.len() => {
            pty.write_all(&line.bytes[..at]).await?;
            tokio::time::sleep(pause).await;
            pty.write_all(&line.bytes[at..]).await
        }
        _ => pty.write_all(&line.bytes).await,
    }
}

/// When the next line is due. It never catches up on time lost while paused, unplugged
/// or without a reader: the first line after that goes out at once, the rest at the pace.
struct Pacer {
    period: Duration,
    burst: u32,
    in_burst: u32,
    due: Instant,
}

impl Pacer {
    fn new(pace: Pace) -> Self {
        let (period, burst) = match pace {
            Pace::Unlimited => (Duration::ZERO, 1),
            Pace::Steady(rate) if rate > 0.0 => (Duration::from_secs_f64(1.0 / rate), 1),
            Pace::Bursts { rate, size } if rate > 0.0 => (
                Duration::from_secs_f64(f64::from(size.max(1)) / rate),
                size.max(1),
            ),
            Pace::Steady(_) | Pace::Bursts { .. } => (Duration::ZERO, 1),
        };
        Self {
            period,
            burst,
            in_burst: 0,
            due: Instant::now(),
        }
    }

    fn due(&self) -> Instant {
        self.due
    }

    fn wrote(&mut self) {
        self.in_burst += 1;
        if self.in_burst >= self.burst {
            self.in_burst = 0;
            self.due = (self.due + self.period).max(Instant::now());
        }
    }
}

/// Counts poll commands in a byte stream that may split them across reads.
struct PollMatcher {
    command: Vec<u8>,
    window: Vec<u8>,
}

impl PollMatcher {
    fn new(command: &[u8]) -> Self {
        Self {
            command: command.to_vec(),
            window: Vec::new(),
        }
    }

    /// How many complete commands `bytes` finishes. Keeps at most the command's length
    /// minus one byte for the next read.
    fn feed(&mut self, bytes: &[u8]) -> u64 {
        self.window.extend_from_slice(bytes);
        let len = self.command.len();
        let (mut at, mut count) = (0, 0);
        while at + len <= self.window.len() {
            if self.window[at..at + len] == self.command[..] {
                count += 1;
                at += len;
            } else {
                at += 1;
            }
        }
        let keep_from = at.max(self.window.len().saturating_sub(len - 1));
        self.window.drain(..keep_from);
        count
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio_serial::{SerialPortBuilderExt, SerialStream};

    const STEP: Duration = Duration::from_secs(5);

    fn scenario(format: LineFormat) -> LineScenario {
        LineScenario {
            fault_every: 2,
            ..LineScenario::new(format, 24)
        }
    }

    const FORMATS: [LineFormat; 4] = [
        LineFormat::Json,
        LineFormat::KeyValue,
        LineFormat::Csv,
        LineFormat::Regex,
    ];

    /// The text of the planned line itself (the last line in `bytes`), without its ending.
    fn last_line(bytes: &[u8]) -> &str {
        let body = bytes.strip_suffix(b"\n").unwrap();
        let body = body.strip_suffix(b"\r").unwrap_or(body);
        let start = body.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1);
        std::str::from_utf8(&body[start..]).unwrap()
    }

    /// A reference decoder, to show the lines mean what `expect` says.
    fn decode(format: LineFormat, line: &str) -> Option<(i64, String, String)> {
        match format {
            LineFormat::Json => {
                let v: serde_json::Value = serde_json::from_str(line).ok()?;
                let field = |k: &str| match &v[k] {
                    serde_json::Value::String(s) => Some(s.clone()),
                    other => other.as_f64().map(|f| f.to_string()),
                };
                Some((v["ts"].as_i64()?, field("temp")?, field("hum")?))
            }
            LineFormat::KeyValue => {
                let mut fields = BTreeMap::new();
                for token in line.split(' ') {
                    let (k, v) = token.split_once('=')?;
                    fields.insert(k, v);
                }
                Some((
                    fields.get("ts")?.parse().ok()?,
                    fields.get("temp")?.to_string(),
                    fields.get("hum")?.to_string(),
                ))
            }
            LineFormat::Csv => {
                let cols: Vec<_> = line.split(',').collect();
                let [ts, temp, hum] = cols[..] else {
                    return None;
                };
                Some((ts.parse().ok()?, temp.into(), hum.into()))
            }
            LineFormat::Regex => {
                let caps = regex::Regex::new(REGEX_LINE).unwrap().captures(line)?;
                Some((
                    caps["ts"].parse().ok()?,
                    caps["temp"].into(),
                    caps["hum"].into(),
                ))
            }
        }
    }

    #[test]
    fn the_same_scenario_yields_the_same_lines() {
        for format in FORMATS {
            let a: Vec<_> = scenario(format).lines().collect();
            let b: Vec<_> = scenario(format).lines().collect();
            assert_eq!(a, b);
            assert_eq!(a.len(), 24);
        }
    }

    #[test]
    fn every_fault_appears_and_the_regex_format_swaps_nan_for_out_of_range() {
        for format in FORMATS {
            let faults: std::collections::HashSet<_> =
                scenario(format).lines().filter_map(|l| l.fault).collect();
            let expected = if format == LineFormat::Regex { 5 } else { 6 };
            assert_eq!(faults.len(), expected, "{format:?}: {faults:?}");
        }
    }

    #[test]
    fn each_line_decodes_to_what_it_expects() {
        for format in FORMATS {
            for line in scenario(format).lines() {
                let text = last_line(&line.bytes);
                let decoded = decode(format, text);
                let want = &line.expect;
                match line.fault {
                    Some(LineFault::Malformed) => {
                        assert_eq!(decoded, None, "{format:?} {text}");
                        assert_eq!(want.rejections, ["malformed"]);
                        assert!(want.readings.is_empty());
                        continue;
                    }
                    Some(LineFault::NotANumber) => {
                        let (_, temp, _) = decoded.unwrap();
                        assert!(temp.parse::<f64>().unwrap().is_nan());
                        assert_eq!(want.rejections, ["not_finite"]);
                        assert_eq!(want.readings.len(), 1);
                        assert_eq!(want.readings[0].0, "humidity");
                        continue;
                    }
                    Some(LineFault::OutOfRange) => {
                        assert_eq!(want.rejections, ["out_of_range"]);
                        assert_eq!(want.readings.len(), 1);
                    }
                    Some(LineFault::Noise) => {
                        assert_eq!(want.rejections, ["malformed"]);
                        assert!(std::str::from_utf8(&line.bytes).is_err());
                        assert_eq!(line.bytes.iter().filter(|&&b| b == b'\n').count(), 2);
                    }
                    Some(LineFault::TooLong) => {
                        assert_eq!(want.rejections, ["too_large"]);
                        let first = line.bytes.iter().position(|&b| b == b'\n').unwrap();
                        assert_eq!(first, 8 * 1024);
                    }
                    Some(LineFault::Split) => {
                        let at = line.split_at.unwrap();
                        assert!(at > 0 && at < line.bytes.len());
                    }
                    None => assert!(want.rejections.is_empty()),
                }
                let (ts, temp, hum) = decoded.unwrap_or_else(|| panic!("{format:?} {text}"));
                let time = 1_700_000_000_000 + line.seq as i64 * 1000;
                assert_eq!(ts, time);
                let temp: f64 = temp.parse().unwrap();
                let hum: f64 = hum.parse().unwrap();
                let mut readings = vec![("temperature", Some(time), temp)];
                if line.fault == Some(LineFault::OutOfRange) {
                    assert_eq!(hum, 150.0);
                } else {
                    readings.push(("humidity", Some(time), hum));
                }
                assert_eq!(want.readings, readings, "{format:?} {text}");
            }
        }
    }

    #[test]
    fn regex_lines_look_like_the_documented_example() {
        let line = LineScenario::new(LineFormat::Regex, 1).line(0);
        assert_eq!(line.bytes, b"T:+15.0C H:30.0% @1700000000000\n");
        let re = regex::Regex::new(REGEX_LINE).unwrap();
        assert!(re.is_match("T:+21.5C H:40.2% @1700000000000"));
        assert!(re.is_match("T:-3.0C H:150.0% @1"));
    }

    #[test]
    fn crlf_endings_end_every_line() {
        let s = LineScenario {
            line_ending: LineEnding::CrLf,
            ..scenario(LineFormat::Csv)
        };
        for line in s.lines() {
            let lf = line.bytes.iter().filter(|&&b| b == b'\n').count();
            let crlf = line.bytes.windows(2).filter(|w| w == b"\r\n").count();
            assert_eq!(lf, crlf);
            assert!(line.bytes.ends_with(b"\r\n"));
        }
    }

    #[test]
    fn poll_commands_are_found_across_reads() {
        let mut m = PollMatcher::new(b"READ\r\n");
        assert_eq!(m.feed(b"xxRE"), 0);
        assert_eq!(m.feed(b"AD\r"), 0);
        assert_eq!(m.feed(b"\nREAD\r\nREAD\r\nRE"), 3);
        assert_eq!(m.feed(b"READ\r\n"), 1);
        assert!(m.window.len() < 6);
    }

    fn open(path: &Path) -> SerialStream {
        tokio_serial::new(path.to_string_lossy(), 9600)
            .open_native_async()
            .expect("open the sensor's port")
    }

    async fn read_n(port: &mut SerialStream, n: usize) -> Vec<u8> {
        let mut got = vec![0; n];
        tokio::time::timeout(STEP, port.read_exact(&mut got))
            .await
            .expect("bytes in time")
            .expect("read");
        got
    }

    async fn silent(port: &mut SerialStream) -> bool {
        let mut buf = [0; 64];
        tokio::time::timeout(Duration::from_millis(150), port.read(&mut buf))
            .await
            .is_err()
    }

    fn concat(lines: &[PlannedLine]) -> Vec<u8> {
        lines.iter().flat_map(|l| l.bytes.clone()).collect()
    }

    #[tokio::test]
    async fn a_reader_gets_every_planned_byte_including_faults() {
        let dir = tempfile::tempdir().unwrap();
        let pty = Pty::open(dir.path().join("ttySIM0")).unwrap();
        let plan: Vec<_> = scenario(LineFormat::Csv).lines().collect();
        let sensor = LineSensor::start(
            pty,
            plan.clone(),
            LineOptions::default(),
            CancellationToken::new(),
        );
        let mut port = open(sensor.path());
        let want = concat(&plan);
        assert_eq!(read_n(&mut port, want.len()).await, want);
        let report = tokio::time::timeout(STEP, sensor.done())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(report.written, 24);
        assert_eq!(report.bytes_written, want.len() as u64);
        assert_eq!(report.faults.values().sum::<u64>(), 12);
        assert_eq!(report.faults[&LineFault::TooLong], 2);
        let stopped = sensor.stop().await.unwrap();
        assert!(stopped.plan_done);
        assert!(!dir.path().join("ttySIM0").exists(), "unplugged on stop");
    }

    #[tokio::test]
    async fn nothing_is_written_before_a_reader_opens_the_port() {
        let dir = tempfile::tempdir().unwrap();
        let pty = Pty::open(dir.path().join("tty")).unwrap();
        let plan: Vec<_> = LineScenario::new(LineFormat::Json, 3).lines().collect();
        let sensor = LineSensor::start(
            pty,
            plan.clone(),
            LineOptions::default(),
            CancellationToken::new(),
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(sensor.report().written, 0);
        let mut port = open(sensor.path());
        let want = concat(&plan);
        assert_eq!(read_n(&mut port, want.len()).await, want, "line 0 first");
    }

    #[tokio::test]
    async fn a_split_line_arrives_in_two_parts() {
        let dir = tempfile::tempdir().unwrap();
        let pty = Pty::open(dir.path().join("tty")).unwrap();
        let s = LineScenario {
            fault_every: 1,
            ..LineScenario::new(LineFormat::KeyValue, 6)
        };
        let split: Vec<_> = s
            .lines()
            .filter(|l| l.fault == Some(LineFault::Split))
            .collect();
        assert_eq!(split.len(), 1);
        let at = split[0].split_at.unwrap();
        let options = LineOptions {
            split_pause: Duration::from_secs(1),
            ..LineOptions::default()
        };
        let sensor = LineSensor::start(pty, split.clone(), options, CancellationToken::new());
        let mut port = open(sensor.path());
        assert_eq!(read_n(&mut port, at).await, split[0].bytes[..at]);
        assert!(silent(&mut port).await, "the pause between the two writes");
        let rest = read_n(&mut port, split[0].bytes.len() - at).await;
        assert_eq!(rest, split[0].bytes[at..]);
        drop(sensor);
    }

    #[tokio::test]
    async fn unplugging_mid_plan_ends_the_old_port_and_the_plan_resumes_after_replug() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ttyUSB0");
        let pty = Pty::open(&path).unwrap();
        let plan: Vec<_> = LineScenario::new(LineFormat::Regex, 8).lines().collect();
        let options = LineOptions {
            pace: Pace::Steady(200.0),
            pause_at: Some(3),
            ..LineOptions::default()
        };
        let sensor = LineSensor::start(pty, plan.clone(), options, CancellationToken::new());
        let mut port = open(&path);
        let first = concat(&plan[..3]);
        assert_eq!(read_n(&mut port, first.len()).await, first);
        assert_eq!(sensor.wait_written(3).await.unwrap().written, 3);
        assert!(silent(&mut port).await, "paused at line 3");

        sensor.unplug().await.unwrap();
        let mut buf = [0; 16];
        let ended = tokio::time::timeout(STEP, port.read(&mut buf))
            .await
            .unwrap();
        assert!(matches!(ended, Ok(0) | Err(_)), "{ended:?}");
        assert!(!path.exists());
        sensor.resume().await.unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(
            sensor.report().written,
            3,
            "nothing written while unplugged"
        );

        sensor.replug().await.unwrap();
        drop(port);
        let mut port = open(&path);
        let rest = concat(&plan[3..]);
        assert_eq!(read_n(&mut port, rest.len()).await, rest);
        let report = sensor.done().await.unwrap();
        assert_eq!((report.written, report.unplugs), (8, 1));
    }

    #[tokio::test]
    async fn a_polled_sensor_answers_each_poll_with_the_next_line() {
        let dir = tempfile::tempdir().unwrap();
        let pty = Pty::open(dir.path().join("tty")).unwrap();
        let plan: Vec<_> = LineScenario::new(LineFormat::Csv, 4).lines().collect();
        let options = LineOptions {
            poll: Some(b"READ\r\n".to_vec()),
            ..LineOptions::default()
        };
        let sensor = LineSensor::start(pty, plan.clone(), options, CancellationToken::new());
        let mut port = open(sensor.path());
        assert!(silent(&mut port).await, "silent until polled");
        port.write_all(b"READ\r\n").await.unwrap();
        assert_eq!(read_n(&mut port, plan[0].bytes.len()).await, plan[0].bytes);
        port.write_all(b"READ\r\nREAD\r\n").await.unwrap();
        let two = concat(&plan[1..3]);
        assert_eq!(read_n(&mut port, two.len()).await, two);
        port.write_all(b"RE").await.unwrap();
        assert!(silent(&mut port).await, "half a poll is no poll");
        port.write_all(b"AD\r\n").await.unwrap();
        assert_eq!(read_n(&mut port, plan[3].bytes.len()).await, plan[3].bytes);
        // The plan is over: a further poll goes unanswered.
        port.write_all(b"READ\r\n").await.unwrap();
        assert!(silent(&mut port).await);
        let report = sensor.stop().await.unwrap();
        assert_eq!(report.written, 4);
        assert_eq!(report.polls, 5);
        assert_eq!(report.polls_unanswered, 1);
        assert_eq!(report.bytes_received, 6 + 12 + 6 + 6);
    }

    #[tokio::test]
    async fn a_steady_pace_spreads_lines_out() {
        let dir = tempfile::tempdir().unwrap();
        let pty = Pty::open(dir.path().join("tty")).unwrap();
        let options = LineOptions {
            pace: Pace::Steady(10.0),
            ..LineOptions::default()
        };
        let plan = LineScenario::new(LineFormat::Json, 100).lines();
        let sensor = LineSensor::start(pty, plan, options, CancellationToken::new());
        let _port = open(sensor.path());
        sensor.wait_written(1).await.unwrap();
        tokio::time::sleep(Duration::from_millis(250)).await;
        // At 10 lines/s: about 3 by now; a slow machine writes fewer, never more.
        assert!(sensor.report().written <= 4, "{:?}", sensor.report());
    }
}
