//! The domain types every stage shares: what a source hands to the pipeline and what the
//! pipeline hands to storage. Nothing here does I/O.

use std::fmt;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

pub use bytes::Bytes;

/// A hash map with a fast hasher, for the per-reading maps on the ingest path.
pub type FastMap<K, V> = std::collections::HashMap<K, V, foldhash::fast::RandomState>;
/// A hash set with a fast hasher, for the per-reading sets on the ingest path.
pub type FastSet<T> = std::collections::HashSet<T, foldhash::fast::RandomState>;

/// Milliseconds since the Unix epoch, UTC. The unit of every stored time.
pub type Millis = i64;

/// The gateway's wall clock in [`Millis`].
pub fn now_millis() -> Millis {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as Millis)
        .unwrap_or(0)
}

/// A configured device's id, cheap to clone.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct DeviceId(Arc<str>);

impl DeviceId {
    pub fn new(id: &str) -> Self {
        Self(Arc::from(id))
    }
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for DeviceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for DeviceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", &*self.0)
    }
}

/// One value as a decoder found it, before validation.
#[derive(Clone, Debug, PartialEq)]
pub struct RawReading {
    /// The metric's name as the payload calls it (a JSON path, a SenML name). Shared with
    /// the decoder when it is a configured field, so decoding copies no name.
    pub field: Arc<str>,
    pub value: f64,
    /// The unit the payload declared, if any; shared by the readings that declare it.
    pub unit: Option<Arc<str>>,
    /// The time the source attached, if any.
    pub source_time: Option<Millis>,
}

/// Identifies a series within one run of the gateway: a dense number validation hands out,
/// so later stages hash and compare an integer rather than two strings.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SeriesKey(pub u32);

/// One metric of one device, as validation interned it. Cheap to clone; equal when the keys
/// are.
#[derive(Clone, Debug)]
pub struct Series(Arc<SeriesInfo>);

#[derive(Debug)]
pub struct SeriesInfo {
    pub key: SeriesKey,
    pub device: DeviceId,
    pub metric: Arc<str>,
    pub unit: Option<Arc<str>>,
}

impl Series {
    pub fn new(info: SeriesInfo) -> Self {
        Self(Arc::new(info))
    }
    pub fn key(&self) -> SeriesKey {
        self.0.key
    }
    pub fn device(&self) -> &DeviceId {
        &self.0.device
    }
    pub fn metric(&self) -> &str {
        &self.0.metric
    }
    pub fn unit(&self) -> Option<&str> {
        self.0.unit.as_deref()
    }
}

impl PartialEq for Series {
    fn eq(&self, other: &Self) -> bool {
        self.key() == other.key()
    }
}

/// A validated reading, ready to store.
#[derive(Clone, Debug, PartialEq)]
pub struct Reading {
    pub series: Series,
    pub value: f64,
    /// The idempotency key: the source's time when it gave one, else the receive time.
    pub time: Millis,
    pub received_at: Millis,
    pub flags: ReadingFlags,
}

/// Provenance bits stored with each reading.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ReadingFlags(pub u8);

impl ReadingFlags {
    /// `time` is the gateway's receive time: the source sent none.
    pub const RECEIVE_TIME: u8 = 1;
    /// The source's time and the receive time disagree beyond the configured skew.
    pub const SKEWED: u8 = 2;

    pub fn has(self, bit: u8) -> bool {
        self.0 & bit != 0
    }
}

/// Why input was not stored as readings. A closed set so counters and queries can group by it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum RejectReason {
    /// The payload could not be decoded in the device's format.
    Malformed,
    /// The value is NaN or infinite.
    NotFinite,
    /// The value is outside the metric's configured min/max.
    OutOfRange,
    /// The source's timestamp is too far in the future or the past.
    BadTimestamp,
    /// The metric is not configured and the policy rejects unknown metrics.
    UnknownMetric,
    /// No configured device matches the topic or line.
    UnknownDevice,
    /// The payload or line is larger than its limit (`max_payload`, `max_line`); only a
    /// prefix of it is kept.
    TooLarge,
    /// The payload holds more values than `validation.max_values`.
    TooManyValues,
    /// A metric name or unit in the payload is longer than `validation.max_name_bytes`, or
    /// its names together would take more than [`MAX_NAME_AMPLIFICATION`] times its size
    /// (and a small allowance).
    NameTooLong,
    /// The device already has `validation.max_metrics_per_device` metrics its config does
    /// not list, and this value would add another.
    TooManyMetrics,
    /// A string or data value (SenML `vs`, `vd`): only numbers are stored.
    NotNumeric,
}

impl RejectReason {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Malformed => "malformed",
            Self::NotFinite => "not_finite",
            Self::OutOfRange => "out_of_range",
            Self::BadTimestamp => "bad_timestamp",
            Self::UnknownMetric => "unknown_metric",
            Self::UnknownDevice => "unknown_device",
            Self::TooLarge => "too_large",
            Self::TooManyValues => "too_many_values",
            Self::NameTooLong => "name_too_long",
            Self::TooManyMetrics => "too_many_metrics",
            Self::NotNumeric => "not_numeric",
        }
    }
}

/// Every reason, for documentation and for checking a query's `reason` parameter.
pub const REJECT_REASONS: [RejectReason; 11] = [
    RejectReason::Malformed,
    RejectReason::NotFinite,
    RejectReason::OutOfRange,
    RejectReason::BadTimestamp,
    RejectReason::UnknownMetric,
    RejectReason::UnknownDevice,
    RejectReason::TooLarge,
    RejectReason::TooManyValues,
    RejectReason::NameTooLong,
    RejectReason::TooManyMetrics,
    RejectReason::NotNumeric,
];

impl fmt::Display for RejectReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// How much of an input too large to keep whole a rejection keeps: enough to see what sent
/// it, bounded whatever the input's size.
pub const RAW_PREFIX: usize = 4096;

/// Decoded metric names (and units) may take at most this many times the bytes of the
/// payload they came from, plus a small allowance (`decode::names_allowed`). Names are
/// substrings of the payload except where a format joins them (JSON paths, SenML base
/// names); real devices stay well under 2, while a long base name shared by thousands of
/// short records would otherwise multiply.
pub const MAX_NAME_AMPLIFICATION: usize = 4;

/// One message (or line, or frame) kept with the reason it was not stored as readings,
/// whole or in part. A message costs at most one rejection, however many of its values
/// were refused: its raw bytes are stored once.
#[derive(Clone, Debug, PartialEq)]
pub struct Rejection {
    pub device: Option<DeviceId>,
    /// Where it came from: an MQTT topic, a serial port.
    pub source: Arc<str>,
    pub received_at: Millis,
    /// The reason of the first value refused (or of the whole input).
    pub reason: RejectReason,
    /// Sentences naming the fields and limits, for the operator; bounded in length.
    pub detail: String,
    /// The input as received, or its first [`RAW_PREFIX`] bytes when it was too large.
    pub raw: Bytes,
    /// The input's size in bytes: `raw.len()` unless only a prefix was kept. A serial line
    /// over `max_line` is skipped without being counted: its size is what was kept.
    pub size: usize,
    /// How many values were not stored; 1 for an input refused whole.
    pub values: u32,
}

impl Rejection {
    /// A whole input refused for `reason`; `raw` is kept whole unless it is larger than
    /// [`RAW_PREFIX`] and the reason is its size.
    pub fn whole(
        device: Option<DeviceId>,
        source: Arc<str>,
        received_at: Millis,
        reason: RejectReason,
        detail: String,
        raw: Bytes,
    ) -> Self {
        let size = raw.len();
        let raw = if reason == RejectReason::TooLarge {
            prefix(&raw)
        } else {
            raw
        };
        Self {
            device,
            source,
            received_at,
            reason,
            detail,
            raw,
            size,
            values: 1,
        }
    }
}

/// The first [`RAW_PREFIX`] bytes of `raw`, copied, so the rest can be freed.
pub fn prefix(raw: &[u8]) -> Bytes {
    Bytes::copy_from_slice(&raw[..raw.len().min(RAW_PREFIX)])
}

/// Something that wants to know when a delivery's data is durable (an MQTT session that
/// acknowledges in arrival order).
pub trait Settle: Send + Sync {
    /// The message's data is committed.
    fn settle(&self, generation: u64, seq: u64);
    /// The message was dropped inside the gateway without being stored; only the broker
    /// can deliver it again.
    fn abandon(&self, generation: u64, seq: u64);
}

/// Proof of one received message that still has to be acknowledged. The writer settles it
/// after the transaction holding the message's readings or rejections commits. A ticket
/// dropped unsettled tells its sink, which reconnects so the broker delivers the message
/// again: nothing is acknowledged that was not stored.
pub struct Ticket {
    sink: Option<Arc<dyn Settle>>,
    generation: u64,
    seq: u64,
}

impl Ticket {
    pub fn new(sink: Arc<dyn Settle>, generation: u64, seq: u64) -> Self {
        Self {
            sink: Some(sink),
            generation,
            seq,
        }
    }

    /// Marks the message as durably handled.
    pub fn settle(mut self) {
        if let Some(sink) = self.sink.take() {
            sink.settle(self.generation, self.seq);
        }
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        if let Some(sink) = self.sink.take() {
            sink.abandon(self.generation, self.seq);
        }
    }
}

impl fmt::Debug for Ticket {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Ticket({}/{})", self.generation, self.seq)
    }
}

/// Why a payload could not be decoded, in words that name the field or the byte.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
#[error("{detail}")]
pub struct DecodeError {
    /// `Malformed`, or the limit the payload broke.
    pub reason: RejectReason,
    pub detail: String,
}

impl DecodeError {
    /// The payload does not fit its format.
    pub fn malformed(detail: impl Into<String>) -> Self {
        Self {
            reason: RejectReason::Malformed,
            detail: detail.into(),
        }
    }

    /// The payload broke a limit on its values or names.
    pub fn limit(reason: RejectReason, detail: impl Into<String>) -> Self {
        Self {
            reason,
            detail: detail.into(),
        }
    }
}

/// What a payload decoded to: readings, or why it could not be decoded.
pub type Decoded = Result<Decoding, DecodeError>;

/// The readings of a payload, and the values it held that cannot be readings (SenML
/// records with a string or data value): those are counted in the message's rejection
/// while its numbers are stored.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Decoding {
    pub readings: Vec<RawReading>,
    pub skipped: Skipped,
}

/// Values of a payload that are not readings: how many, and sentences naming the first few.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Skipped {
    pub count: u32,
    /// At most [`Skipped::LISTED`].
    pub listed: Vec<String>,
}

impl Skipped {
    pub const LISTED: usize = 8;

    pub fn add(&mut self, detail: impl FnOnce() -> String) {
        self.count += 1;
        if self.listed.len() < Self::LISTED {
            self.listed.push(detail());
        }
    }
}

impl From<Vec<RawReading>> for Decoding {
    fn from(readings: Vec<RawReading>) -> Self {
        Self {
            readings,
            skipped: Skipped::default(),
        }
    }
}

/// A decoding reads as its readings.
impl std::ops::Deref for Decoding {
    type Target = Vec<RawReading>;

    fn deref(&self) -> &Vec<RawReading> {
        &self.readings
    }
}

impl<'a> IntoIterator for &'a Decoding {
    type Item = &'a RawReading;
    type IntoIter = std::slice::Iter<'a, RawReading>;

    fn into_iter(self) -> Self::IntoIter {
        self.readings.iter()
    }
}

impl IntoIterator for Decoding {
    type Item = RawReading;
    type IntoIter = std::vec::IntoIter<RawReading>;

    fn into_iter(self) -> Self::IntoIter {
        self.readings.into_iter()
    }
}

/// One message from one device, the unit of delivery through the pipeline.
#[derive(Debug)]
pub struct Message {
    pub device: DeviceId,
    pub source: Arc<str>,
    pub received_at: Millis,
    pub raw: Bytes,
    pub decoded: Decoded,
    pub ticket: Option<Ticket>,
}

/// The connection state of a device, as stored and shown by `sensorgate devices`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DeviceState {
    /// Configured, nothing heard yet.
    Starting,
    /// Its transport is up (broker connected, port open).
    Connected,
    /// Connected, but silent for longer than its expected interval.
    Stale,
    /// Its transport fails; `last_error` says why. Retried with backoff.
    Failing,
    /// Removed or shut down.
    Stopped,
}

impl DeviceState {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Starting => "starting",
            Self::Connected => "connected",
            Self::Stale => "stale",
            Self::Failing => "failing",
            Self::Stopped => "stopped",
        }
    }
}

/// A change of a device's state.
#[derive(Clone, Debug, PartialEq)]
pub struct StatusChange {
    pub device: DeviceId,
    pub kind: &'static str,
    pub state: DeviceState,
    pub error: Option<String>,
    pub at: Millis,
}

/// Transport and protocol trouble a device task counts, folded into the device's row so an
/// operator sees how often a port dropped or a slave failed to answer.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FaultCounts {
    /// Connections (port opens) that failed or broke.
    pub reconnects: u64,
    /// Requests that got no answer in time.
    pub timeouts: u64,
    /// Answers that arrived garbled: bad CRC or not a valid frame.
    pub crc_errors: u64,
    /// Modbus exception responses.
    pub exceptions: u64,
}

impl FaultCounts {
    pub fn is_empty(&self) -> bool {
        *self == Self::default()
    }

    pub fn add(&mut self, other: &Self) {
        self.reconnects += other.reconnects;
        self.timeouts += other.timeouts;
        self.crc_errors += other.crc_errors;
        self.exceptions += other.exceptions;
    }
}

/// Everything a source sends into the pipeline.
#[derive(Debug)]
pub enum SourceEvent {
    Message(Message),
    /// Input that is stored as a rejection without decoding: an MQTT topic no filter matches,
    /// a line longer than its limit.
    Rejected {
        rejection: Rejection,
        ticket: Option<Ticket>,
    },
    Status(StatusChange),
    Faults {
        device: DeviceId,
        counts: FaultCounts,
    },
    /// Sent into the pipeline at this time; when the writer has passed it, everything sent
    /// before it is committed.
    Heartbeat(Millis),
}

/// A reading just committed, for the live stream.
#[derive(Clone, Debug, PartialEq)]
pub struct LiveReading {
    pub series: Series,
    pub time: Millis,
    pub value: f64,
}

/// The readings one commit stored, shared by every live-stream client.
pub type LiveBatch = Arc<[LiveReading]>;

/// The start of the rollup bucket of width `width` that holds `time`.
///
/// ```
/// use sensorgate::reading::bucket_start;
/// assert_eq!(bucket_start(125_000, 60_000), 120_000);
/// assert_eq!(bucket_start(-1, 60_000), -60_000);
/// ```
pub fn bucket_start(time: Millis, width: Millis) -> Millis {
    time - time.rem_euclid(width)
}

/// Count, min, max, sum, first and last of the readings in one bucket. Merging two cells
/// gives the cell of the union of their readings, in any order.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct RollupCell {
    pub count: i64,
    pub min: f64,
    pub max: f64,
    pub sum: f64,
    pub first_time: Millis,
    pub first: f64,
    pub last_time: Millis,
    pub last: f64,
}

impl RollupCell {
    pub fn of(time: Millis, value: f64) -> Self {
        Self {
            count: 1,
            min: value,
            max: value,
            sum: value,
            first_time: time,
            first: value,
            last_time: time,
            last: value,
        }
    }

    pub fn merge(&mut self, other: &Self) {
        self.count += other.count;
        self.min = self.min.min(other.min);
        self.max = self.max.max(other.max);
        self.sum += other.sum;
        if other.first_time < self.first_time {
            self.first_time = other.first_time;
            self.first = other.first;
        }
        if other.last_time > self.last_time {
            self.last_time = other.last_time;
            self.last = other.last;
        }
    }
}

/// Rollup cells for a set of readings, one per series, window width and bucket.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Rollups {
    widths: Vec<Millis>,
    cells: FastMap<RollupKey, RollupCell>,
}

/// `(series, window width, bucket start)`.
pub type RollupKey = (SeriesKey, Millis, Millis);

impl Rollups {
    pub fn new(widths: Vec<Millis>) -> Self {
        Self {
            widths,
            cells: Default::default(),
        }
    }

    pub fn add(&mut self, reading: &Reading) {
        for &width in &self.widths {
            let key = (
                reading.series.key(),
                width,
                bucket_start(reading.time, width),
            );
            let cell = RollupCell::of(reading.time, reading.value);
            self.cells
                .entry(key)
                .and_modify(|c| c.merge(&cell))
                .or_insert(cell);
        }
    }

    pub fn widths(&self) -> &[Millis] {
        &self.widths
    }

    pub fn is_empty(&self) -> bool {
        self.cells.is_empty()
    }

    pub fn len(&self) -> usize {
        self.cells.len()
    }

    pub fn iter(&self) -> impl Iterator<Item = (&RollupKey, &RollupCell)> {
        self.cells.iter()
    }
}
