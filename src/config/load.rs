//! Reading the TOML file and checking what the types alone cannot.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use toml::Spanned;

use super::{
    BrokerConfig, Config, DeviceConfig, FormatOptions, HttpConfig, LoggingConfig, PayloadFormat,
    PipelineConfig, RollupConfig, Secret, SerialPortConfig, StorageConfig, ValidationConfig,
    serial,
};

/// A config that cannot be used, with where and why.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}:{line}: {message}")]
    Invalid {
        path: PathBuf,
        line: usize,
        message: String,
    },
}

/// The file as written, with the spans of its devices and brokers kept for error messages.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ConfigFile {
    #[serde(default)]
    storage: StorageConfig,
    #[serde(default)]
    pipeline: PipelineConfig,
    #[serde(default)]
    validation: ValidationConfig,
    #[serde(default)]
    rollups: RollupConfig,
    #[serde(default)]
    http: HttpConfig,
    #[serde(default)]
    logging: LoggingConfig,
    #[serde(default)]
    brokers: Vec<Spanned<BrokerConfig>>,
    #[serde(default)]
    serial_ports: Vec<Spanned<SerialPortConfig>>,
    #[serde(default)]
    devices: Vec<Spanned<DeviceConfig>>,
}

/// Reads and checks the config file at `path`.
///
/// # Errors
/// When the file cannot be read, is not valid TOML, has unknown keys or bad values, or refers
/// to things that do not exist.
pub fn load(path: &Path) -> Result<Config, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    parse(&text, path)
}

/// Parses and checks config text; `path` only names the file in errors.
///
/// # Errors
/// As [`load`], less the reading.
pub fn parse(text: &str, path: &Path) -> Result<Config, ConfigError> {
    let invalid = |offset: usize, message: String| ConfigError::Invalid {
        path: path.to_path_buf(),
        line: line_of(text, offset),
        message,
    };
    let file: ConfigFile = toml::from_str(text).map_err(|err| {
        let offset = err.span().map_or(0, |span| span.start);
        invalid(offset, with_hint(err.message()))
    })?;

    let mut warnings = Vec::new();
    let mut brokers = Vec::new();
    for spanned in file.brokers {
        let offset = spanned.span().start;
        let mut broker = spanned.into_inner();
        broker.line = line_of(text, offset);
        let Some(endpoint) = broker.address() else {
            return Err(invalid(
                offset,
                format!(
                    "broker `{}`: url `{}` must look like mqtt://host:1883 or mqtts://host:8883",
                    broker.id, broker.url
                ),
            ));
        };
        check_tls_files(&broker, endpoint.tls).map_err(|message| invalid(offset, message))?;
        resolve_password(&mut broker, &mut warnings).map_err(|message| invalid(offset, message))?;
        if !(1..=MAX_PAYLOAD).contains(&broker.max_payload) {
            return Err(invalid(
                offset,
                format!(
                    "broker `{}`: max_payload must be between 1 and {MAX_PAYLOAD} bytes (MQTT's largest packet)",
                    broker.id
                ),
            ));
        }
        if broker.max_unacked_bytes == 0 {
            return Err(invalid(
                offset,
                format!(
                    "broker `{}`: max_unacked_bytes must be at least 1",
                    broker.id
                ),
            ));
        }
        if broker.max_unacked == 0 {
            return Err(invalid(
                offset,
                format!("broker `{}`: max_unacked must be at least 1", broker.id),
            ));
        }
        // MQTT carries keep-alive as 16-bit seconds: rumqttc would cut 65536 s to 0 (off),
        // and below a second it cannot be written at all.
        if !(Duration::from_secs(1)..=Duration::from_secs(u64::from(u16::MAX)))
            .contains(&broker.keep_alive)
        {
            return Err(invalid(
                offset,
                format!(
                    "broker `{}`: keep_alive must be between 1s and 65535s (about 18h)",
                    broker.id
                ),
            ));
        }
        if brokers.iter().any(|b: &BrokerConfig| b.id == broker.id) {
            return Err(invalid(
                offset,
                format!(
                    "broker id `{}` is used twice; give each broker its own id",
                    broker.id
                ),
            ));
        }
        brokers.push(broker);
    }

    let mut serial_ports: Vec<SerialPortConfig> = Vec::new();
    for spanned in file.serial_ports {
        let offset = spanned.span().start;
        let mut port = spanned.into_inner();
        port.line = line_of(text, offset);
        serial::check_port(&port).map_err(|message| invalid(offset, message))?;
        if serial_ports.iter().any(|p| p.id == port.id) {
            return Err(invalid(
                offset,
                format!(
                    "serial port id `{}` is used twice; give each port its own id",
                    port.id
                ),
            ));
        }
        serial_ports.push(port);
    }

    let mut devices: Vec<DeviceConfig> = Vec::new();
    let mut ids = HashSet::new();
    for spanned in file.devices {
        let offset = spanned.span().start;
        let mut device = spanned.into_inner();
        device.set_line(line_of(text, offset));
        check_device(&mut device, &brokers, &serial_ports, &devices)
            .map_err(|message| invalid(offset, message))?;
        if !ids.insert(device.id().to_string()) {
            return Err(invalid(
                offset,
                format!(
                    "device id `{}` is used twice; device ids must be unique",
                    device.id()
                ),
            ));
        }
        devices.push(device);
    }

    let mut http = file.http;
    check_http(&mut http, &mut warnings)
        .map_err(|message| invalid(offset_of(text, "[http]"), message))?;
    let config = Config {
        storage: file.storage,
        pipeline: file.pipeline,
        validation: file.validation,
        rollups: file.rollups,
        http,
        logging: file.logging,
        brokers,
        serial_ports,
        devices,
        warnings,
    };
    check_limits(&config).map_err(|(key, message)| invalid(offset_of(text, key), message))?;
    Ok(config)
}

fn check_device(
    device: &mut DeviceConfig,
    brokers: &[BrokerConfig],
    ports: &[SerialPortConfig],
    earlier: &[DeviceConfig],
) -> Result<(), String> {
    let id = device.id().to_string();
    if id.is_empty() || id.chars().any(|c| c.is_control() || c.is_whitespace()) {
        return Err(format!("device id `{id}` must be non-empty without spaces"));
    }
    match device {
        DeviceConfig::Mqtt(_) => {}
        DeviceConfig::Serial(line) => serial::check_line_device(line, ports, earlier)?,
        DeviceConfig::Modbus(modbus) => serial::check_modbus_device(modbus, ports, earlier)?,
    }
    let mut names = HashSet::new();
    for metric in device.metrics() {
        if !names.insert(metric.name.as_str()) {
            return Err(format!(
                "device `{id}`: metric `{}` is listed twice",
                metric.name
            ));
        }
        if let (Some(min), Some(max)) = (metric.min, metric.max)
            && min > max
        {
            return Err(format!(
                "device `{id}`: metric `{}` has min {min} above max {max}",
                metric.name
            ));
        }
    }
    match device {
        DeviceConfig::Mqtt(mqtt) => {
            let broker = match (&mqtt.broker, brokers) {
                (Some(name), _) => brokers.iter().find(|b| &b.id == name).ok_or_else(|| {
                    format!("device `{id}`: broker `{name}` is not defined in [[brokers]]")
                })?,
                (None, [only]) => only,
                (None, []) => return Err(format!("device `{id}`: no [[brokers]] defined")),
                (None, _) => {
                    return Err(format!(
                        "device `{id}`: several brokers are defined; set `broker = \"...\"`"
                    ));
                }
            };
            mqtt.broker = Some(broker.id.clone());
            if !valid_filter(&mqtt.topic) {
                return Err(format!(
                    "device `{id}`: topic `{}` is not a valid MQTT topic filter",
                    mqtt.topic
                ));
            }
            if mqtt.qos > 2 {
                return Err(format!("device `{id}`: qos must be 0, 1 or 2"));
            }
        }
        DeviceConfig::Serial(_) | DeviceConfig::Modbus(_) => {}
    }
    if let Some(options) = device.format_options() {
        check_format(&id, &options, device.metrics())?;
    }
    Ok(())
}

/// The options a payload format needs are there, the ones it ignores are not, and every
/// configured field can be found in what the format yields.
fn check_format(
    id: &str,
    options: &FormatOptions<'_>,
    metrics: &[super::MetricConfig],
) -> Result<(), String> {
    let format = options.format;
    if options.timestamp_field.is_none()
        && (options.timezone.is_some()
            || options.timestamp_fallback != super::TimestampFallback::Reject)
    {
        return Err(format!(
            "device `{id}`: `timezone` and `timestamp_fallback` say how the `timestamp_field` is read; set it too"
        ));
    }
    if let Some(zone) = options.timezone {
        crate::decode::time_zone(zone).map_err(|err| format!("device `{id}`: {err}"))?;
    }
    if format != PayloadFormat::Csv && (!options.columns.is_empty() || options.delimiter.is_some())
    {
        return Err(format!(
            "device `{id}`: `columns` and `delimiter` are for format \"csv\""
        ));
    }
    if format != PayloadFormat::Regex && options.pattern.is_some() {
        return Err(format!("device `{id}`: `pattern` is for format \"regex\""));
    }
    // The names the format can yield; None when any name may appear.
    let names: Option<Vec<String>> = match format {
        PayloadFormat::Value => {
            if metrics.len() > 1 {
                return Err(format!(
                    "device `{id}`: format \"value\" carries one metric, {} are listed",
                    metrics.len()
                ));
            }
            None
        }
        PayloadFormat::Csv => {
            if options.columns.is_empty() {
                return Err(format!(
                    "device `{id}`: format \"csv\" needs `columns`, e.g. columns = [\"ts\", \"temp\", \"hum\"]"
                ));
            }
            Some(options.columns.to_vec())
        }
        PayloadFormat::Regex => {
            let Some(pattern) = options.pattern else {
                return Err(format!(
                    "device `{id}`: format \"regex\" needs `pattern` with named captures, e.g. 'T:(?P<temp>[-+0-9.]+)'"
                ));
            };
            let compiled = regex::Regex::new(pattern)
                .map_err(|err| format!("device `{id}`: pattern does not compile: {err}"))?;
            let captures: Vec<String> = compiled
                .capture_names()
                .flatten()
                .map(str::to_string)
                .collect();
            if captures.is_empty() {
                return Err(format!(
                    "device `{id}`: pattern has no named capture such as (?P<temp>...); each one is a field"
                ));
            }
            Some(captures)
        }
        PayloadFormat::Json => {
            let paths = metrics
                .iter()
                .map(|m| ("field", m.field()))
                .chain(options.timestamp_field.map(|t| ("timestamp_field", t)));
            for (key, path) in paths {
                crate::decode::check_path(path)
                    .map_err(|err| format!("device `{id}`: {key} `{path}`: {err}"))?;
            }
            None
        }
        PayloadFormat::Senml | PayloadFormat::KeyValue => None,
    };
    if let Some(names) = names {
        let wanted = metrics
            .iter()
            .map(|m| m.field())
            .chain(options.timestamp_field);
        for field in wanted {
            if !names.iter().any(|n| n == field) {
                return Err(format!(
                    "device `{id}`: field `{field}` is not among {} ({})",
                    if format == PayloadFormat::Csv {
                        "the columns"
                    } else {
                        "the pattern's named captures"
                    },
                    names.join(", ")
                ));
            }
        }
    }
    Ok(())
}

/// The first line of a secrets file (`key` names it in errors), which must not be empty;
/// a warning in `warnings` when users other than the file's owner and group may read it.
fn read_secret(key: &str, path: &Path, warnings: &mut Vec<String>) -> Result<Secret, String> {
    let text =
        std::fs::read_to_string(path).map_err(|err| format!("{key} {}: {err}", path.display()))?;
    let secret = text.lines().next().unwrap_or_default().trim();
    if secret.is_empty() {
        return Err(format!(
            "{key} {}: the first line is empty; put the secret on it",
            path.display()
        ));
    }
    if let Ok(meta) = std::fs::metadata(path) {
        use std::os::unix::fs::PermissionsExt;
        let mode = meta.permissions().mode() & 0o777;
        if mode & 0o007 != 0 {
            warnings.push(format!(
                "{key} {} can be read by every user of this machine (mode {mode:04o}); \
                 chmod 0640 it, owned by root and the gateway's group",
                path.display()
            ));
        }
    }
    Ok(Secret::new(secret.to_string()))
}

/// Reads the password from `password_file` or `password_env` into `password`; at most one
/// of the three may be set, and a password needs a username.
fn resolve_password(broker: &mut BrokerConfig, warnings: &mut Vec<String>) -> Result<(), String> {
    let id = &broker.id;
    let sources = [
        broker.password.is_some(),
        broker.password_file.is_some(),
        broker.password_env.is_some(),
    ];
    if sources.iter().filter(|set| **set).count() > 1 {
        return Err(format!(
            "broker `{id}`: set one of password, password_file and password_env"
        ));
    }
    if let Some(path) = &broker.password_file {
        let key = format!("broker `{id}`: password_file");
        broker.password = Some(read_secret(&key, path, warnings)?);
    }
    if let Some(var) = &broker.password_env {
        let value = std::env::var(var)
            .map_err(|_| format!("broker `{id}`: password_env names `{var}`, which is not set"))?;
        broker.password = Some(Secret::new(value));
    }
    if broker.password.is_some() && broker.username.is_none() {
        return Err(format!("broker `{id}`: a password needs a username"));
    }
    Ok(())
}

/// A listen address that parses, a token where one is needed (read from `token_file` into
/// `token`), and sane limits.
fn check_http(http: &mut HttpConfig, warnings: &mut Vec<String>) -> Result<(), String> {
    let address: std::net::SocketAddr = http.listen.parse().map_err(|_| {
        format!(
            "http.listen `{}` is not an address:port such as 127.0.0.1:8080",
            http.listen
        )
    })?;
    if let Some(path) = &http.token_file {
        if http.token.is_some() {
            return Err("http: set token or token_file, not both".into());
        }
        http.token = Some(read_secret("http.token_file", path, warnings)?);
    }
    if let Some(token) = &http.token
        && token.expose().chars().count() < 16
    {
        return Err("http token must be at least 16 characters".into());
    }
    if http.enabled && !address.ip().is_loopback() && http.token.is_none() {
        return Err(format!(
            "http.listen {address} is reachable from other machines: set http.token or \
             http.token_file (clients then send `Authorization: Bearer <token>`), or listen on \
             127.0.0.1"
        ));
    }
    if http.max_rows == 0 || http.stream_buffer == 0 || http.max_connections == 0 {
        return Err(
            "http.max_rows, http.stream_buffer and http.max_connections must be at least 1".into(),
        );
    }
    if http.max_connections > MAX_CONNECTIONS {
        return Err(format!(
            "http.max_connections must be at most {MAX_CONNECTIONS}"
        ));
    }
    for (key, value) in [
        ("header_timeout", http.header_timeout),
        ("send_timeout", http.send_timeout),
    ] {
        if !(Duration::from_millis(100)..=Duration::from_secs(3600)).contains(&value) {
            return Err(format!("http.{key} must be between 100ms and 1h"));
        }
    }
    // The live stream's buffer is allocated whole at start.
    if http.stream_buffer > MAX_STREAM_BUFFER {
        return Err(format!(
            "http.stream_buffer must be at most {MAX_STREAM_BUFFER} batches"
        ));
    }
    Ok(())
}

fn check_tls_files(broker: &BrokerConfig, tls: bool) -> Result<(), String> {
    let id = &broker.id;
    let files = [&broker.ca_file, &broker.client_cert, &broker.client_key];
    if !tls {
        if files.iter().any(|f| f.is_some()) {
            return Err(format!(
                "broker `{id}`: ca_file, client_cert and client_key need an mqtts:// url"
            ));
        }
        return Ok(());
    }
    if broker.client_cert.is_some() != broker.client_key.is_some() {
        return Err(format!(
            "broker `{id}`: client_cert and client_key go together; set both or neither"
        ));
    }
    let needed = std::iter::once(broker.ca_file())
        .chain(broker.client_cert.as_deref())
        .chain(broker.client_key.as_deref());
    for file in needed {
        if let Err(err) = std::fs::File::open(file) {
            return Err(format!(
                "broker `{id}`: cannot read {}: {err}",
                file.display()
            ));
        }
    }
    Ok(())
}

/// The most messages a channel between stages (or a device's inbox) may hold: memory is
/// bounded by configuration, and the channels refuse far larger capacities with a panic.
const MAX_CAPACITY: usize = 1 << 20;
/// Ceilings on the per-message and per-device limits, so that no setting lets one message
/// or one device cost without bound.
const MAX_METRICS_PER_DEVICE: usize = 100_000;
/// MQTT's largest packet, 256 MiB less one byte.
const MAX_PAYLOAD: usize = 268_435_455;
const MAX_VALUES: usize = 1_000_000;
const MAX_NAME_BYTES: usize = 65_536;
/// The most HTTP connections served at once: well below the 1,024 file descriptors the
/// unit allows, which brokers, serial ports and the database share.
const MAX_CONNECTIONS: usize = 512;
/// The most commits a live-stream client may fall behind.
const MAX_STREAM_BUFFER: usize = 1 << 16;

fn check_limits(config: &Config) -> Result<(), (&'static str, String)> {
    let positive = [
        ("batch_size", config.storage.batch_size),
        ("channel_capacity", config.pipeline.channel_capacity),
        ("device_queue", config.pipeline.device_queue),
    ];
    for (key, value) in positive {
        if value == 0 {
            return Err((key, format!("{key} must be at least 1")));
        }
    }
    for (key, value) in &positive[1..] {
        if *value > MAX_CAPACITY {
            return Err((
                key,
                format!("{key} must be at most {MAX_CAPACITY} messages"),
            ));
        }
    }
    let retention = &config.storage.retention;
    if retention.step_rows == 0 {
        return Err(("step_rows", "step_rows must be at least 1".into()));
    }
    if retention.interval < Duration::from_secs(1) {
        return Err(("interval", "retention interval must be at least 1s".into()));
    }
    let max_past = config.validation.max_past;
    for (key, kept) in [
        ("readings", retention.readings),
        ("rollups", retention.rollups),
    ] {
        if let Some(kept) = kept.filter(|kept| *kept < max_past) {
            return Err((
                key,
                format!(
                    "retention.{key} ({}) is shorter than validation.max_past ({}): a late reading could \
                     be stored again after its rows expired and count twice in a rollup; keep {key} longer \
                     or lower max_past",
                    humantime::format_duration(kept),
                    humantime::format_duration(max_past)
                ),
            ));
        }
    }
    let validation = &config.validation;
    for (key, value, max) in [
        (
            "max_metrics_per_device",
            validation.max_metrics_per_device,
            MAX_METRICS_PER_DEVICE,
        ),
        ("max_values", validation.max_values, MAX_VALUES),
        ("max_name_bytes", validation.max_name_bytes, MAX_NAME_BYTES),
    ] {
        if !(1..=max).contains(&value) {
            return Err((key, format!("{key} must be between 1 and {max}")));
        }
    }
    for window in &config.rollups.windows {
        if window.as_millis() < 1000 || window.subsec_millis() != 0 {
            return Err((
                "windows",
                format!("rollup window {window:?} must be whole seconds, at least 1s"),
            ));
        }
    }
    Ok(())
}

/// MQTT topic filter rules: `#` only last and alone in its level, `+` alone in its level.
fn valid_filter(filter: &str) -> bool {
    if filter.is_empty() || filter.contains('\0') {
        return false;
    }
    let levels: Vec<&str> = filter.split('/').collect();
    levels.iter().enumerate().all(|(i, level)| {
        (!level.contains('#') || (*level == "#" && i == levels.len() - 1))
            && (!level.contains('+') || *level == "+")
    })
}

fn line_of(text: &str, offset: usize) -> usize {
    text[..offset.min(text.len())].matches('\n').count() + 1
}

/// Where `key = ` first appears, so a limit error points at its line.
fn offset_of(text: &str, key: &str) -> usize {
    text.lines()
        .scan(0, |pos, line| {
            let start = *pos;
            *pos += line.len() + 1;
            Some((start, line))
        })
        .find(|(_, line)| line.trim_start().starts_with(key))
        .map_or(0, |(start, _)| start)
}

/// Adds a "did you mean" to serde's unknown-field message when a known key is one typo away.
fn with_hint(message: &str) -> String {
    let message = message.trim_end().to_string();
    let Some(rest) = message.strip_prefix("unknown field `") else {
        return message;
    };
    let Some((unknown, expected)) = rest.split_once('`') else {
        return message;
    };
    let best = expected
        .split('`')
        .skip(1)
        .step_by(2)
        .map(|known| (edit_distance(unknown, known), known))
        .min();
    match best {
        Some((distance, known)) if distance <= 2 => format!("{message}; did you mean `{known}`?"),
        _ => message,
    }
}

fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut prev = row[0];
        row[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let cur = row[j + 1];
            row[j + 1] = if ca == *cb {
                prev
            } else {
                1 + prev.min(row[j]).min(row[j + 1])
            };
            prev = cur;
        }
    }
    row[b.len()]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_str(text: &str) -> Result<Config, ConfigError> {
        parse(text, Path::new("test.toml"))
    }

    const BROKER: &str = "[[brokers]]\nurl = \"mqtt://127.0.0.1:1883\"\n";

    #[test]
    fn the_committed_example_is_valid() {
        let config = parse_str(crate::config::EXAMPLE).expect("example parses");
        assert!(!config.devices.is_empty());
        assert!(!config.brokers.is_empty());
    }

    #[test]
    fn an_empty_file_gives_defaults() {
        let config = parse_str("").unwrap();
        assert_eq!(config, Config::default());
    }

    #[test]
    fn unknown_key_names_line_and_suggests_the_right_one() {
        let err = parse_str("[storage]\nbatch_sise = 10\n")
            .unwrap_err()
            .to_string();
        assert!(err.starts_with("test.toml:2:"), "{err}");
        assert!(err.contains("did you mean `batch_size`?"), "{err}");
    }

    #[test]
    fn unknown_key_in_a_device_names_its_line() {
        let text = format!(
            "{BROKER}\n[[devices]]\nkind = \"mqtt\"\nid = \"a\"\ntopic = \"x\"\nformat = \"json\"\ntopik = \"y\"\n"
        );
        let err = parse_str(&text).unwrap_err().to_string();
        assert!(err.contains("topik"), "{err}");
        assert!(
            err.starts_with("test.toml:4:") || err.starts_with("test.toml:9:"),
            "{err}"
        );
    }

    #[test]
    fn bad_duration_explains_the_format() {
        let err = parse_str("[pipeline]\ndrain_timeout = \"ten seconds\"\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("test.toml:2:"), "{err}");
        assert!(err.contains("\"30s\""), "{err}");
    }

    #[test]
    fn duplicate_device_ids_are_refused_at_the_second() {
        let device = "[[devices]]\nkind = \"mqtt\"\nid = \"a\"\ntopic = \"x\"\nformat = \"json\"\n";
        let text = format!("{BROKER}{device}{device}");
        let err = parse_str(&text).unwrap_err().to_string();
        assert!(err.starts_with("test.toml:8:"), "{err}");
        assert!(err.contains("used twice"), "{err}");
    }

    #[test]
    fn device_naming_a_missing_broker_is_refused() {
        let text = format!(
            "{BROKER}[[devices]]\nkind = \"mqtt\"\nid = \"a\"\nbroker = \"nope\"\ntopic = \"x\"\nformat = \"json\"\n"
        );
        let err = parse_str(&text).unwrap_err().to_string();
        assert!(err.contains("broker `nope` is not defined"), "{err}");
    }

    #[test]
    fn min_above_max_is_refused() {
        let text = format!(
            "{BROKER}[[devices]]\nkind = \"mqtt\"\nid = \"a\"\ntopic = \"x\"\nformat = \"json\"\n[[devices.metrics]]\nname = \"t\"\nmin = 5.0\nmax = 1.0\n"
        );
        let err = parse_str(&text).unwrap_err().to_string();
        assert!(err.contains("min 5 above max 1"), "{err}");
    }

    #[test]
    fn invalid_topic_filters_are_refused() {
        for topic in ["a/#/b", "a+/b", ""] {
            let text = format!(
                "{BROKER}[[devices]]\nkind = \"mqtt\"\nid = \"a\"\ntopic = \"{topic}\"\nformat = \"json\"\n"
            );
            let err = parse_str(&text).unwrap_err().to_string();
            assert!(
                err.contains("not a valid MQTT topic filter"),
                "{topic}: {err}"
            );
        }
    }

    #[test]
    fn broker_url_must_be_mqtt() {
        let err = parse_str("[[brokers]]\nurl = \"http://x\"\n")
            .unwrap_err()
            .to_string();
        assert!(err.starts_with("test.toml:1:"), "{err}");
        assert!(err.contains("mqtt://host:1883"), "{err}");
    }

    #[test]
    fn tls_settings_are_checked_against_the_url_and_the_files() {
        let plain = "[[brokers]]\nurl = \"mqtt://x\"\nca_file = \"/etc/hostname\"\n";
        let err = parse_str(plain).unwrap_err().to_string();
        assert!(err.contains("need an mqtts:// url"), "{err}");
        let missing = "[[brokers]]\nurl = \"mqtts://x\"\nca_file = \"/nonexistent/ca.pem\"\n";
        let err = parse_str(missing).unwrap_err().to_string();
        assert!(err.contains("cannot read /nonexistent/ca.pem"), "{err}");
        let half = "[[brokers]]\nurl = \"mqtts://x\"\nca_file = \"/etc/hostname\"\nclient_cert = \"/etc/hostname\"\n";
        let err = parse_str(half).unwrap_err().to_string();
        assert!(err.contains("set both or neither"), "{err}");
        let ok =
            parse_str("[[brokers]]\nurl = \"mqtts://x\"\nca_file = \"/etc/hostname\"\n").unwrap();
        let endpoint = ok.brokers[0].address().unwrap();
        assert_eq!(
            (endpoint.host, endpoint.port, endpoint.tls),
            ("x", 8883, true)
        );
    }

    #[test]
    fn zero_batch_size_is_refused_at_its_line() {
        let err = parse_str("[storage]\nbatch_size = 0\n")
            .unwrap_err()
            .to_string();
        assert_eq!(err, "test.toml:2: batch_size must be at least 1");
    }

    #[test]
    fn retention_shorter_than_max_past_is_refused() {
        let err = parse_str("[storage.retention]\nreadings = \"1d\"\n")
            .unwrap_err()
            .to_string();
        assert!(err.starts_with("test.toml:2:"), "{err}");
        assert!(
            err.contains("shorter than validation.max_past (7days)"),
            "{err}"
        );
        parse_str("[validation]\nmax_past = \"1h\"\n[storage.retention]\nreadings = \"1d\"\n")
            .unwrap();
    }

    #[test]
    fn a_retention_interval_below_a_second_is_refused() {
        let err = parse_str("[storage.retention]\ninterval = \"0s\"\n")
            .unwrap_err()
            .to_string();
        assert_eq!(err, "test.toml:2: retention interval must be at least 1s");
    }

    #[test]
    fn values_the_gateway_cannot_start_with_are_refused_at_their_line() {
        // Each passed the check, then wrapped (a rollup width in milliseconds turned
        // negative) or panicked or aborted when the gateway made its channels; the start-up
        // property of fuzz/fuzz_targets/config.rs fails on each (fuzz/corpus/config/startup_*).
        for (text, error) in [
            (
                "[rollups]\nwindows = [\"10000000000000000s\"]\n",
                "test.toml:2: `10000000000000000s` is longer than 100 years",
            ),
            (
                "[pipeline]\nchannel_capacity = 4000000000000000000\n",
                "test.toml:2: channel_capacity must be at most 1048576 messages",
            ),
            (
                "[pipeline]\ndevice_queue = 2000000\n",
                "test.toml:2: device_queue must be at most 1048576 messages",
            ),
            (
                "[http]\nstream_buffer = 100000000000\n",
                "test.toml:1: http.stream_buffer must be at most 65536 batches",
            ),
            (
                "[[brokers]]\nid = \"b\"\nurl = \"mqtt://h:1883\"\nclient_id = \"c\"\nkeep_alive = \"65536s\"\n",
                "test.toml:1: broker `b`: keep_alive must be between 1s and 65535s",
            ),
            (
                "[[brokers]]\nid = \"b\"\nurl = \"mqtt://h:1883\"\nclient_id = \"c\"\nkeep_alive = \"500ms\"\n",
                "test.toml:1: broker `b`: keep_alive must be between 1s and 65535s",
            ),
        ] {
            let err = parse_str(text).unwrap_err().to_string();
            assert!(err.starts_with(error), "{err}");
        }
        parse_str("[storage.retention]\nrollups = \"100y\"\n[rollups]\nwindows = [\"30days\"]\n")
            .unwrap();
    }

    #[test]
    fn unknown_device_kind_is_refused() {
        let text = format!("{BROKER}[[devices]]\nkind = \"zigbee\"\nid = \"a\"\n");
        let err = parse_str(&text).unwrap_err().to_string();
        assert!(err.contains("zigbee"), "{err}");
    }

    const PORT: &str = "[[serial_ports]]\nid = \"p\"\npath = \"/dev/ttyUSB0\"\n";

    fn line_device(extra: &str) -> String {
        format!("{PORT}[[devices]]\nkind = \"serial\"\nid = \"s\"\nport = \"p\"\n{extra}\n")
    }

    fn modbus_device(id: &str, slave: u8, extra: &str) -> String {
        format!(
            "[[devices]]\nkind = \"modbus\"\nid = \"{id}\"\nport = \"p\"\nslave = {slave}\n{extra}\n\
             [[devices.registers]]\nname = \"v\"\ntable = \"input\"\naddress = 0\ntype = \"f32\"\n"
        )
    }

    #[test]
    fn serial_line_settings_are_checked() {
        let err = parse_str(&format!("{PORT}parity = \"mark\"\n"))
            .unwrap_err()
            .to_string();
        assert!(
            err.starts_with("test.toml:4:") && err.contains("mark"),
            "{err}"
        );
        let err = parse_str(&format!("{PORT}data_bits = 9\n"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("data_bits must be 5, 6, 7 or 8"), "{err}");
        let err = parse_str(&format!("{PORT}stop_bits = 3\n"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("stop_bits must be 1 or 2"), "{err}");
    }

    #[test]
    fn line_formats_need_their_options() {
        let err = parse_str(&line_device("format = \"csv\""))
            .unwrap_err()
            .to_string();
        assert!(err.contains("format \"csv\" needs `columns`"), "{err}");
        let err = parse_str(&line_device("format = \"regex\"\npattern = '(unclosed'"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("pattern does not compile"), "{err}");
        let err = parse_str(&line_device("format = \"regex\"\npattern = 'T:([0-9]+)'"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("no named capture"), "{err}");
        let err = parse_str(&line_device(
            "format = \"csv\"\ncolumns = [\"a\"]\n[[devices.metrics]]\nname = \"t\"\nfield = \"temp\"",
        ))
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("field `temp` is not among the columns (a)"),
            "{err}"
        );
        let err = parse_str(&line_device("format = \"json\"\ncolumns = [\"a\"]"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("are for format \"csv\""), "{err}");
        let err = parse_str(&line_device("format = \"json\"\npoll_command = \"R\""))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("poll_command and poll_interval go together"),
            "{err}"
        );
        parse_str(&line_device(
            "format = \"regex\"\npattern = 'T:(?P<temp>[0-9.]+)'\n[[devices.metrics]]\nname = \"t\"\nfield = \"temp\"",
        ))
        .unwrap();
    }

    /// `ENERGY.Power[1]` once passed and matched nothing.
    #[test]
    fn a_json_path_that_does_not_parse_is_refused() {
        let metric = |field: &str| {
            format!("format = \"json\"\n[[devices.metrics]]\nname = \"p\"\nfield = '{field}'")
        };
        parse_str(&line_device(&metric("ENERGY.Power[1]"))).unwrap();
        parse_str(&line_device(&metric(r#"s["temp.c"]"#))).unwrap();
        let err = parse_str(&line_device(&metric("ENERGY.Power[one]")))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("field `ENERGY.Power[one]`: `[one]` is not an array index"),
            "{err}"
        );
        let err = parse_str(&line_device(
            "format = \"json\"\ntimestamp_field = \"meta.\"",
        ))
        .unwrap_err()
        .to_string();
        assert!(err.contains("timestamp_field `meta.`"), "{err}");
    }

    #[test]
    fn a_port_is_owned_by_one_line_device_or_shared_by_modbus_slaves() {
        let two_lines = format!(
            "{}[[devices]]\nkind = \"serial\"\nid = \"s2\"\nport = \"p\"\nformat = \"json\"\n",
            line_device("format = \"json\"")
        );
        let err = parse_str(&two_lines).unwrap_err().to_string();
        assert!(err.contains("already used by device `s`"), "{err}");
        let bus = format!(
            "{PORT}{}{}",
            modbus_device("m1", 1, ""),
            modbus_device("m2", 2, "")
        );
        let config = parse_str(&bus).unwrap();
        assert_eq!(config.devices[1].metrics()[0].name, "v");
        let same_slave = format!(
            "{PORT}{}{}",
            modbus_device("m1", 1, ""),
            modbus_device("m2", 1, "")
        );
        let err = parse_str(&same_slave).unwrap_err().to_string();
        assert!(
            err.contains("slave 1 on port `p` is already device `m1`"),
            "{err}"
        );
        let err = parse_str(&format!("{PORT}{}", modbus_device("m", 0, "")))
            .unwrap_err()
            .to_string();
        assert!(err.contains("slave must be 1 to 247"), "{err}");
        let missing = modbus_device("m", 1, "").replace("port = \"p\"", "port = \"q\"");
        let err = parse_str(&format!("{PORT}{missing}"))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("serial port `q` is not defined in [[serial_ports]]"),
            "{err}"
        );
    }

    #[test]
    fn coils_hold_one_bit() {
        let coil = modbus_device("m", 1, "").replace(
            "table = \"input\"\naddress = 0\ntype = \"f32\"",
            "table = \"coil\"\naddress = 0\ntype = \"f32\"",
        );
        let err = parse_str(&format!("{PORT}{coil}")).unwrap_err().to_string();
        assert!(err.contains("holds one bit"), "{err}");
    }

    #[test]
    fn broker_passwords_come_from_one_place_and_stay_secret() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("pw");
        std::fs::write(&file, "from-file\nignored\n").unwrap();
        let text = format!(
            "[[brokers]]\nurl = \"mqtt://x\"\nusername = \"u\"\npassword_file = \"{}\"\n",
            file.display()
        );
        let config = parse_str(&text).unwrap();
        assert_eq!(
            config.brokers[0].password.as_ref().unwrap().expose(),
            "from-file"
        );
        assert!(!format!("{config:?}").contains("from-file"));
        let both = format!("{text}password = \"x\"\n");
        let err = parse_str(&both).unwrap_err().to_string();
        assert!(
            err.contains("set one of password, password_file and password_env"),
            "{err}"
        );
        let unset = "[[brokers]]\nurl = \"mqtt://x\"\nusername = \"u\"\npassword_env = \"SENSORGATE_TEST_UNSET_VAR\"\n";
        let err = parse_str(unset).unwrap_err().to_string();
        assert!(
            err.contains("`SENSORGATE_TEST_UNSET_VAR`, which is not set"),
            "{err}"
        );
        let lonely = "[[brokers]]\nurl = \"mqtt://x\"\npassword = \"x\"\n";
        assert!(
            parse_str(lonely)
                .unwrap_err()
                .to_string()
                .contains("needs a username")
        );
    }

    #[test]
    fn http_beyond_loopback_needs_a_token() {
        let err = parse_str("[http]\nenabled = true\nlisten = \"0.0.0.0:8080\"\n")
            .unwrap_err()
            .to_string();
        assert!(err.starts_with("test.toml:1:"), "{err}");
        assert!(err.contains("set http.token or http.token_file"), "{err}");
        let err = parse_str("[http]\nlisten = \"0.0.0.0:8080\"\ntoken = \"short\"\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("at least 16 characters"), "{err}");
        let ok = parse_str(
            "[http]\nenabled = true\nlisten = \"0.0.0.0:8080\"\ntoken = \"0123456789abcdef\"\n",
        )
        .unwrap();
        assert_eq!(ok.http.token.unwrap().expose(), "0123456789abcdef");
        assert!(
            !format!(
                "{:?}",
                parse_str("[http]\ntoken = \"0123456789abcdef\"\n").unwrap()
            )
            .contains("0123456789abcdef"),
            "secrets stay out of Debug output"
        );
        parse_str("[http]\nenabled = true\nlisten = \"127.0.0.1:0\"\n").unwrap();
        let err = parse_str("[http]\nlisten = \"localhost\"\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("not an address:port"), "{err}");
    }

    #[test]
    fn filters_follow_mqtt_rules() {
        assert!(valid_filter("a/+/c"));
        assert!(valid_filter("a/#"));
        assert!(valid_filter("#"));
        assert!(!valid_filter("a/#/c"));
        assert!(!valid_filter("a/b+"));
    }
}
