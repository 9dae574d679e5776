//! The typed configuration: one TOML file, checked before anything starts.
//!
//! Every struct rejects unknown keys; durations are written like `30s` or `1h`. [`load`] turns
//! a file into a [`Config`] or a [`ConfigError`] that names the file, the line and what to
//! change.

mod load;
mod serial;

pub use load::{ConfigError, load, parse};
pub use serial::{
    DataType, FlowControl, ModbusDeviceConfig, Parity, RegisterConfig, RegisterTable,
    SerialDeviceConfig, SerialPortConfig, WordOrder,
};

use std::time::Duration;

use serde::Deserialize;

/// The committed, fully commented example configuration that `print-config` prints.
pub const EXAMPLE: &str = include_str!("../../config/sensorgate.toml");

/// The default config path under systemd.
pub const DEFAULT_PATH: &str = "/etc/sensorgate/sensorgate.toml";

#[derive(Clone, Debug, Default, PartialEq)]
pub struct Config {
    pub storage: StorageConfig,
    pub pipeline: PipelineConfig,
    pub validation: ValidationConfig,
    pub rollups: RollupConfig,
    pub http: HttpConfig,
    pub logging: LoggingConfig,
    pub brokers: Vec<BrokerConfig>,
    pub serial_ports: Vec<SerialPortConfig>,
    pub devices: Vec<DeviceConfig>,
    /// What is usable but unwise, for `check-config` to print and `run` to log: secrets
    /// files other users can read.
    pub warnings: Vec<String>,
}

impl Config {
    /// Logs each warning as WARN, naming the file.
    pub fn with_warnings_logged(self, path: &std::path::Path) -> Self {
        for warning in &self.warnings {
            tracing::warn!(config = %path.display(), warning = %warning, "Config warning");
        }
        self
    }

    pub fn broker(&self, id: &str) -> Option<&BrokerConfig> {
        self.brokers.iter().find(|b| b.id == id)
    }

    pub fn serial_port(&self, id: &str) -> Option<&SerialPortConfig> {
        self.serial_ports.iter().find(|p| p.id == id)
    }
}

#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct StorageConfig {
    /// The SQLite database file.
    pub path: std::path::PathBuf,
    /// The most readings one transaction holds.
    pub batch_size: usize,
    /// The least time between two commits, unless a batch is full or holds half of a
    /// broker's `max_unacked`; zero commits as soon as the writer is free.
    #[serde(with = "duration")]
    pub flush_interval: Duration,
    pub synchronous: Synchronous,
    #[serde(with = "duration")]
    pub busy_timeout: Duration,
    /// SQLite's page cache for the writer, in MiB. Inserts touch one page per series per
    /// batch, so it should hold a few pages per series.
    pub cache_mib: u32,
    pub retention: RetentionConfig,
}

impl Default for StorageConfig {
    fn default() -> Self {
        Self {
            path: "/var/lib/sensorgate/sensorgate.db".into(),
            batch_size: 50_000,
            flush_interval: Duration::from_millis(100),
            synchronous: Synchronous::Full,
            busy_timeout: Duration::from_secs(5),
            cache_mib: 16,
            retention: RetentionConfig::default(),
        }
    }
}

#[derive(Clone, Copy, Debug, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Synchronous {
    /// Every commit is on disk before the message is acknowledged.
    Full,
    /// A power cut may lose the last commits (never corrupts); faster on slow storage.
    Normal,
}

#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct RetentionConfig {
    /// Raw readings older than this are deleted; absent keeps them forever.
    #[serde(with = "duration::option")]
    pub readings: Option<Duration>,
    /// Rollups older than this are deleted; absent keeps them forever.
    #[serde(with = "duration::option")]
    pub rollups: Option<Duration>,
    /// Rejections older than this are deleted; absent keeps them forever.
    #[serde(with = "duration::option")]
    pub rejections: Option<Duration>,
    /// How often the writer runs one small deletion step.
    #[serde(with = "duration")]
    pub interval: Duration,
    /// The most rows one deletion step removes, so ingest never stalls behind it.
    pub step_rows: u32,
}

impl Default for RetentionConfig {
    fn default() -> Self {
        Self {
            readings: Some(Duration::from_secs(30 * 86_400)),
            rollups: Some(Duration::from_secs(730 * 86_400)),
            rejections: Some(Duration::from_secs(30 * 86_400)),
            interval: Duration::from_secs(10),
            step_rows: 5000,
        }
    }
}

#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct PipelineConfig {
    /// Capacity of each channel between stages, in messages.
    pub channel_capacity: usize,
    /// Capacity of each device task's inbox, in messages.
    pub device_queue: usize,
    /// What a source does when the pipeline is full.
    pub overflow: Overflow,
    /// How long a stop may take to drain and commit before it gives up.
    #[serde(with = "duration")]
    pub drain_timeout: Duration,
}

impl Default for PipelineConfig {
    fn default() -> Self {
        Self {
            channel_capacity: 4096,
            device_queue: 256,
            overflow: Overflow::Block,
            drain_timeout: Duration::from_secs(10),
        }
    }
}

#[derive(Clone, Copy, Debug, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Overflow {
    /// Wait for room: the broker holds further messages. Nothing is lost.
    Block,
    /// Drop the new message, count it per device and acknowledge it.
    DropNewest,
}

#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ValidationConfig {
    /// What to do with a field a device sends that its metrics do not map, when it lists
    /// metrics (a device that lists none stores every field).
    pub unknown_metrics: UnknownMetrics,
    /// Readings whose source time differs from the receive time by more are flagged.
    #[serde(with = "duration")]
    pub max_skew: Duration,
    /// Readings stamped further in the future are rejected.
    #[serde(with = "duration")]
    pub max_future: Duration,
    /// Readings stamped further in the past are rejected.
    #[serde(with = "duration")]
    pub max_past: Duration,
    /// The most metrics a device may have that its config does not list; beyond it new ones
    /// are rejected, so a misbehaving sensor cannot grow memory or the database without end.
    /// Counted from the database at start, so restarts do not add more.
    pub max_metrics_per_device: usize,
    /// The most values one payload or line may hold; a larger one is refused whole
    /// (`too_many_values`), as soon as decoding gets there.
    pub max_values: usize,
    /// The longest metric name or unit a payload may carry, in bytes (`name_too_long`).
    pub max_name_bytes: usize,
}

impl Default for ValidationConfig {
    fn default() -> Self {
        Self {
            unknown_metrics: UnknownMetrics::Ignore,
            max_skew: Duration::from_secs(30),
            max_future: Duration::from_secs(600),
            max_past: Duration::from_secs(7 * 86_400),
            max_metrics_per_device: 100,
            max_values: 10_000,
            max_name_bytes: 256,
        }
    }
}

#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum UnknownMetrics {
    /// Fields the metrics do not map are not read. A `key_value` line with a key the
    /// config does not know is still refused, as a line that is not one sample.
    #[default]
    Ignore,
    /// Store them like configured metrics, under their path or name, without limits and
    /// within `max_metrics_per_device`.
    Store,
    /// Count them in the message's rejection (`unknown_metric`), with the raw payload.
    Reject,
}

#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct RollupConfig {
    /// Window widths; every stored reading updates one bucket per width.
    #[serde(with = "duration::list")]
    pub windows: Vec<Duration>,
}

impl Default for RollupConfig {
    fn default() -> Self {
        Self {
            windows: vec![Duration::from_secs(60), Duration::from_secs(3600)],
        }
    }
}

/// Where log lines go and how much of them.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct LoggingConfig {
    pub format: LogFormat,
    /// A `RUST_LOG`-style filter, e.g. `info` or `info,sensorgate::sources=debug`; the
    /// `RUST_LOG` environment variable overrides it.
    pub filter: String,
}

impl Default for LoggingConfig {
    fn default() -> Self {
        Self {
            format: LogFormat::Text,
            filter: "info".into(),
        }
    }
}

#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum LogFormat {
    /// One line per event; under systemd with journald priorities, on a terminal in colour.
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

/// The read-only HTTP API, its live stream, metrics and dashboard.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct HttpConfig {
    pub enabled: bool,
    /// `address:port`. Any address but a loopback one needs a token.
    pub listen: String,
    /// Clients send `Authorization: Bearer <token>`; at least 16 characters.
    pub token: Option<Secret>,
    /// A file holding the token (its first line), instead of `token`.
    pub token_file: Option<std::path::PathBuf>,
    /// The most rows one request returns; larger ranges are paged with a cursor.
    pub max_rows: u32,
    /// Batches of new readings a live-stream client may fall behind before it skips them.
    pub stream_buffer: usize,
    /// The most connections served at once; further ones wait to be accepted.
    pub max_connections: usize,
    /// How long a client has to send a request's headers, and how long an idle
    /// connection stays open.
    #[serde(with = "duration")]
    pub header_timeout: Duration,
    /// How long a client may take no bytes of a response before it is cut off (and the
    /// query behind the response stops).
    #[serde(with = "duration")]
    pub send_timeout: Duration,
}

impl Default for HttpConfig {
    fn default() -> Self {
        Self {
            enabled: false,
            listen: "127.0.0.1:8080".into(),
            token: None,
            token_file: None,
            max_rows: 100_000,
            stream_buffer: 64,
            max_connections: 64,
            header_timeout: Duration::from_secs(10),
            send_timeout: Duration::from_secs(10),
        }
    }
}

/// A credential: never printed, logged or shown in `Debug` output.
#[derive(Clone, Deserialize, PartialEq, Eq)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: String) -> Self {
        Self(value)
    }

    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(…)")
    }
}

#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct BrokerConfig {
    #[serde(default = "default_broker_id")]
    pub id: String,
    /// `mqtt://host[:port]`.
    pub url: String,
    /// Fixed, so the broker keeps the session (and unacknowledged messages) across restarts.
    #[serde(default = "default_client_id")]
    pub client_id: String,
    #[serde(default)]
    pub username: Option<String>,
    /// The password itself; prefer `password_file` or `password_env`.
    #[serde(default)]
    pub password: Option<Secret>,
    /// A file holding the password (its first line), readable by the gateway's user only.
    #[serde(default)]
    pub password_file: Option<std::path::PathBuf>,
    /// An environment variable holding the password (e.g. set by systemd's
    /// `LoadCredential`/`Environment`).
    #[serde(default)]
    pub password_env: Option<String>,
    #[serde(default = "default_keep_alive", with = "duration")]
    pub keep_alive: Duration,
    /// The most messages received but not yet acknowledged. Keep it at or below the broker's
    /// own in-flight limit (Mosquitto: `max_inflight_messages`).
    #[serde(default = "default_max_unacked")]
    pub max_unacked: u16,
    /// The longest wait between reconnect attempts.
    #[serde(default = "default_reconnect_max", with = "duration")]
    pub reconnect_max: Duration,
    /// The largest payload stored, in bytes. A larger publish is cut as it arrives and stored
    /// as a `too_large` rejection holding its first 4 KiB, then acknowledged.
    #[serde(default = "default_max_payload")]
    pub max_payload: usize,
    /// The most payload bytes of messages received but not yet acknowledged (QoS 1 and 2):
    /// beside `max_unacked`, what bounds the memory a broker's messages take in the gateway
    /// when they are large.
    #[serde(default = "default_max_unacked_bytes")]
    pub max_unacked_bytes: usize,
    /// PEM file of the CAs that sign the broker's certificate (mqtts:// only); default the
    /// system bundle.
    #[serde(default)]
    pub ca_file: Option<std::path::PathBuf>,
    /// PEM certificate and key for client-certificate authentication (mqtts:// only).
    #[serde(default)]
    pub client_cert: Option<std::path::PathBuf>,
    #[serde(default)]
    pub client_key: Option<std::path::PathBuf>,
    #[serde(skip)]
    pub line: usize,
}

/// Where the system's CA bundle lives on Debian and its derivatives.
pub const SYSTEM_CA_FILE: &str = "/etc/ssl/certs/ca-certificates.crt";

/// A broker address parsed from its url.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Endpoint<'a> {
    pub host: &'a str,
    pub port: u16,
    pub tls: bool,
}

fn default_broker_id() -> String {
    "default".into()
}
fn default_client_id() -> String {
    "sensorgate".into()
}
fn default_keep_alive() -> Duration {
    Duration::from_secs(30)
}
fn default_max_unacked() -> u16 {
    1000
}
fn default_max_payload() -> usize {
    1 << 20
}
fn default_max_unacked_bytes() -> usize {
    64 << 20
}
fn default_reconnect_max() -> Duration {
    Duration::from_secs(30)
}

impl BrokerConfig {
    /// Host, port and TLS from `url`; `None` when it is not `mqtt://host[:port]` or
    /// `mqtts://host[:port]` (default ports 1883 and 8883).
    pub fn address(&self) -> Option<Endpoint<'_>> {
        let (rest, tls) = match self.url.strip_prefix("mqtts://") {
            Some(rest) => (rest, true),
            None => (self.url.strip_prefix("mqtt://")?, false),
        };
        let rest = rest.trim_end_matches('/');
        let (host, port) = match rest.rsplit_once(':') {
            Some((host, port)) => (host, port.parse::<u16>().ok()?),
            None => (rest, if tls { 8883 } else { 1883 }),
        };
        (!host.is_empty() && !host.contains('/')).then_some(Endpoint { host, port, tls })
    }

    /// The CA file to trust for mqtts://.
    pub fn ca_file(&self) -> &std::path::Path {
        self.ca_file
            .as_deref()
            .unwrap_or(std::path::Path::new(SYSTEM_CA_FILE))
    }
}

/// A configured device, tagged by `kind`.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum DeviceConfig {
    Mqtt(MqttDeviceConfig),
    Serial(SerialDeviceConfig),
    Modbus(ModbusDeviceConfig),
}

/// How a device's payloads or lines are laid out: what a decoder needs.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct FormatOptions<'a> {
    pub format: PayloadFormat,
    pub timestamp_field: Option<&'a str>,
    pub timezone: Option<&'a str>,
    pub timestamp_fallback: TimestampFallback,
    pub columns: &'a [String],
    pub delimiter: Option<char>,
    pub pattern: Option<&'a str>,
}

impl DeviceConfig {
    pub fn id(&self) -> &str {
        match self {
            Self::Mqtt(d) => &d.id,
            Self::Serial(d) => &d.id,
            Self::Modbus(d) => &d.id,
        }
    }
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Mqtt(_) => "mqtt",
            Self::Serial(_) => "serial",
            Self::Modbus(_) => "modbus",
        }
    }
    pub fn metrics(&self) -> &[MetricConfig] {
        match self {
            Self::Mqtt(d) => &d.metrics,
            Self::Serial(d) => &d.metrics,
            Self::Modbus(d) => &d.metrics,
        }
    }
    pub fn line(&self) -> usize {
        match self {
            Self::Mqtt(d) => d.line,
            Self::Serial(d) => d.line,
            Self::Modbus(d) => d.line,
        }
    }
    fn set_line(&mut self, line: usize) {
        match self {
            Self::Mqtt(d) => d.line = line,
            Self::Serial(d) => d.line = line,
            Self::Modbus(d) => d.line = line,
        }
    }
    /// The payload layout; `None` for Modbus, whose registers are typed by the map.
    pub fn format_options(&self) -> Option<FormatOptions<'_>> {
        match self {
            Self::Mqtt(d) => Some(d.format_options()),
            Self::Serial(d) => Some(d.format_options()),
            Self::Modbus(_) => None,
        }
    }
}

impl MqttDeviceConfig {
    pub fn format_options(&self) -> FormatOptions<'_> {
        FormatOptions {
            format: self.format,
            timestamp_field: self.timestamp_field.as_deref(),
            timezone: self.timezone.as_deref(),
            timestamp_fallback: self.timestamp_fallback,
            columns: &self.columns,
            delimiter: self.delimiter,
            pattern: self.pattern.as_deref(),
        }
    }
}

#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct MqttDeviceConfig {
    pub id: String,
    /// The broker's `id`; may be left out when there is one broker.
    #[serde(default)]
    pub broker: Option<String>,
    /// A topic filter; `+` and `#` wildcards allowed.
    pub topic: String,
    #[serde(default = "default_qos")]
    pub qos: u8,
    pub format: PayloadFormat,
    /// The field holding the source's timestamp (epoch s, ms or RFC 3339).
    #[serde(default)]
    pub timestamp_field: Option<String>,
    /// The IANA time zone (`Europe/Berlin`) a source time without an offset is read in;
    /// without one such a time cannot be read.
    #[serde(default)]
    pub timezone: Option<String>,
    /// A source time that cannot be read: `reject` the message, or store its readings at
    /// the receive time, flagged as receive-time readings (`receive_time`).
    #[serde(default)]
    pub timestamp_fallback: TimestampFallback,
    /// `csv`: the field each column holds, in order; `_` skips a column.
    #[serde(default)]
    pub columns: Vec<String>,
    /// `csv`: the character between columns.
    #[serde(default)]
    pub delimiter: Option<char>,
    /// `regex`: a pattern whose named captures are the fields.
    #[serde(default)]
    pub pattern: Option<String>,
    /// Silence longer than this marks the device stale.
    #[serde(default, with = "duration::option")]
    pub expected_interval: Option<Duration>,
    #[serde(default)]
    pub metrics: Vec<MetricConfig>,
    #[serde(skip)]
    pub line: usize,
}

fn default_qos() -> u8 {
    1
}

/// What a source time that cannot be read does to its message.
#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum TimestampFallback {
    /// The message becomes a `malformed` rejection naming the field.
    #[default]
    Reject,
    /// Its readings take the receive time and the receive-time flag.
    ReceiveTime,
}

#[derive(Clone, Copy, Debug, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum PayloadFormat {
    /// A JSON object (or an array of them): metrics are fields or dotted paths.
    Json,
    /// SenML JSON (RFC 8428): base name, base time, units.
    Senml,
    /// A plain number as text; the device's one metric.
    Value,
    /// `key=value` pairs separated by spaces, `,` or `;`.
    KeyValue,
    /// Delimited values; `columns` names the field of each.
    Csv,
    /// A regular expression (`pattern`) whose named captures are the fields.
    Regex,
}

#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct MetricConfig {
    /// The stored metric name.
    pub name: String,
    /// Where the value is in the payload (a JSON path like `env.temp`, a SenML name);
    /// defaults to `name`.
    #[serde(default)]
    pub field: Option<String>,
    #[serde(default)]
    pub unit: Option<String>,
    #[serde(default)]
    pub min: Option<f64>,
    #[serde(default)]
    pub max: Option<f64>,
}

impl MetricConfig {
    pub fn field(&self) -> &str {
        self.field.as_deref().unwrap_or(&self.name)
    }
}

/// Serde helpers for humantime durations (`30s`, `1h 30m`).
pub(crate) mod duration {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer};

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let text = String::deserialize(d)?;
        parse(&text).map_err(serde::de::Error::custom)
    }

    /// The longest duration a config may hold: 100 years as humantime counts them (`100y`).
    /// No setting means more, and the gateway turns durations into milliseconds (`i64`) and
    /// deadlines, which overflow somewhere beyond.
    pub const MAX: Duration = Duration::from_secs(100 * 31_557_600);

    pub fn parse(text: &str) -> Result<Duration, String> {
        let duration = humantime::parse_duration(text).map_err(|err| {
            format!(
                "`{text}` is not a duration ({err}); write it like \"500ms\", \"30s\" or \"1h\""
            )
        })?;
        if duration > MAX {
            return Err(format!(
                "`{text}` is longer than 100 years (where a key allows it, write \"forever\")"
            ));
        }
        Ok(duration)
    }

    pub mod option {
        use super::*;
        pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
            let text = String::deserialize(d)?;
            if text == "forever" || text == "off" {
                return Ok(None);
            }
            parse(&text).map(Some).map_err(serde::de::Error::custom)
        }
    }

    pub mod list {
        use super::*;
        pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<Duration>, D::Error> {
            Vec::<String>::deserialize(d)?
                .iter()
                .map(|text| parse(text).map_err(serde::de::Error::custom))
                .collect()
        }
    }
}
