//! Serial ports and the devices on them: text-line sensors (one per port) and Modbus RTU
//! slaves (several per port, an RS-485 bus).

use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use super::{MetricConfig, PayloadFormat, duration};

/// A serial port and its line settings. A text-line device owns its port; Modbus devices on
/// the same port share it as one bus.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct SerialPortConfig {
    pub id: String,
    /// Prefer `/dev/serial/by-id/...`: it names the adapter, so it survives re-plugging and
    /// reboots, where `/dev/ttyUSB0` may become `/dev/ttyUSB1`.
    pub path: PathBuf,
    #[serde(default = "default_baud")]
    pub baud: u32,
    #[serde(default = "default_data_bits")]
    pub data_bits: u8,
    #[serde(default)]
    pub parity: Parity,
    #[serde(default = "default_stop_bits")]
    pub stop_bits: u8,
    #[serde(default)]
    pub flow_control: FlowControl,
    /// Modbus: how long a slave has to answer one request.
    #[serde(default = "default_timeout", with = "duration")]
    pub timeout: Duration,
    /// The longest wait between attempts to reopen the port, and between probes of a Modbus
    /// slave that stopped answering.
    #[serde(default = "default_reconnect_max", with = "duration")]
    pub reconnect_max: Duration,
    #[serde(skip)]
    pub line: usize,
}

fn default_baud() -> u32 {
    9600
}
fn default_data_bits() -> u8 {
    8
}
fn default_stop_bits() -> u8 {
    1
}
fn default_timeout() -> Duration {
    Duration::from_millis(500)
}
fn default_reconnect_max() -> Duration {
    Duration::from_secs(30)
}

#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Parity {
    #[default]
    None,
    Even,
    Odd,
}

#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum FlowControl {
    #[default]
    None,
    /// XON/XOFF.
    Software,
    /// RTS/CTS.
    Hardware,
}

/// A sensor that writes text lines on a serial port.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct SerialDeviceConfig {
    pub id: String,
    /// The `id` of a `[[serial_ports]]` entry.
    pub port: String,
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
    pub timestamp_fallback: super::TimestampFallback,
    /// `csv`: the field each column holds, in order; `_` skips a column.
    #[serde(default)]
    pub columns: Vec<String>,
    /// `csv`: the character between columns.
    #[serde(default)]
    pub delimiter: Option<char>,
    /// `regex`: a pattern whose named captures are the fields.
    #[serde(default)]
    pub pattern: Option<String>,
    /// What ends a line; a trailing `\r` is dropped either way.
    #[serde(default = "default_terminator")]
    pub terminator: String,
    /// Longer lines are stored as a `too_large` rejection; reading resumes at the next
    /// terminator.
    #[serde(default = "default_max_line")]
    pub max_line: usize,
    /// Written to the port every `poll_interval`, for sensors that answer only when asked.
    #[serde(default)]
    pub poll_command: Option<String>,
    #[serde(default, with = "duration::option")]
    pub poll_interval: Option<Duration>,
    /// Silence longer than this marks the device stale and reopens the port.
    #[serde(default, with = "duration::option")]
    pub expected_interval: Option<Duration>,
    #[serde(default)]
    pub metrics: Vec<MetricConfig>,
    #[serde(skip)]
    pub line: usize,
}

impl SerialDeviceConfig {
    pub fn format_options(&self) -> super::FormatOptions<'_> {
        super::FormatOptions {
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

fn default_terminator() -> String {
    "\n".into()
}
fn default_max_line() -> usize {
    1024
}

/// A Modbus RTU slave on a serial bus, polled at its own interval.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ModbusDeviceConfig {
    pub id: String,
    /// The `id` of a `[[serial_ports]]` entry: the bus.
    pub port: String,
    /// The slave address, 1 to 247.
    pub slave: u8,
    #[serde(default = "default_poll_interval", with = "duration")]
    pub poll_interval: Duration,
    pub registers: Vec<RegisterConfig>,
    /// The registers as metrics, for validation; filled when the config is loaded.
    #[serde(skip)]
    pub metrics: Vec<MetricConfig>,
    #[serde(skip)]
    pub line: usize,
}

fn default_poll_interval() -> Duration {
    Duration::from_secs(5)
}

/// One value in a slave's register map.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RegisterConfig {
    /// The stored metric name.
    pub name: String,
    pub table: RegisterTable,
    /// The protocol address (0-based, as on the wire).
    pub address: u16,
    #[serde(rename = "type", default)]
    pub data_type: DataType,
    /// For 32-bit types: which register holds the high word.
    #[serde(default)]
    pub word_order: WordOrder,
    /// The stored value is `raw * scale + offset`.
    #[serde(default = "default_scale")]
    pub scale: f64,
    #[serde(default)]
    pub offset: f64,
    #[serde(default)]
    pub unit: Option<String>,
    #[serde(default)]
    pub min: Option<f64>,
    #[serde(default)]
    pub max: Option<f64>,
}

fn default_scale() -> f64 {
    1.0
}

impl RegisterConfig {
    /// How many 16-bit registers (or bits, for coils and discrete inputs) it spans.
    pub fn width(&self) -> u16 {
        match self.table {
            RegisterTable::Coil | RegisterTable::Discrete => 1,
            RegisterTable::Holding | RegisterTable::Input => self.data_type.words(),
        }
    }

    pub fn as_metric(&self) -> MetricConfig {
        MetricConfig {
            name: self.name.clone(),
            field: None,
            unit: self.unit.clone(),
            min: self.min,
            max: self.max,
        }
    }
}

#[derive(Clone, Copy, Debug, Deserialize, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[serde(rename_all = "snake_case")]
pub enum RegisterTable {
    /// Read with function 0x03.
    Holding,
    /// Read with function 0x04.
    Input,
    /// Read with function 0x01; stored as 0 or 1.
    Coil,
    /// Read with function 0x02; stored as 0 or 1.
    Discrete,
}

#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum DataType {
    #[default]
    U16,
    I16,
    U32,
    I32,
    F32,
}

impl DataType {
    pub fn words(self) -> u16 {
        match self {
            Self::U16 | Self::I16 => 1,
            Self::U32 | Self::I32 | Self::F32 => 2,
        }
    }
}

#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum WordOrder {
    /// The first register holds the high word ("ABCD"), as the Modbus spec suggests.
    #[default]
    Big,
    /// The first register holds the low word ("CDAB"), as many meters do.
    Little,
}

/// Line settings a UART can do.
pub(super) fn check_port(port: &SerialPortConfig) -> Result<(), String> {
    let id = &port.id;
    if id.is_empty() {
        return Err("a serial port needs an `id`".into());
    }
    if port.path.as_os_str().is_empty() {
        return Err(format!("serial port `{id}`: `path` is empty"));
    }
    if port.baud == 0 {
        return Err(format!("serial port `{id}`: baud must be above 0"));
    }
    if !(5..=8).contains(&port.data_bits) {
        return Err(format!(
            "serial port `{id}`: data_bits must be 5, 6, 7 or 8"
        ));
    }
    if !(1..=2).contains(&port.stop_bits) {
        return Err(format!("serial port `{id}`: stop_bits must be 1 or 2"));
    }
    if port.timeout < Duration::from_millis(10) {
        return Err(format!("serial port `{id}`: timeout must be at least 10ms"));
    }
    if port.reconnect_max < Duration::from_millis(100) {
        return Err(format!(
            "serial port `{id}`: reconnect_max must be at least 100ms"
        ));
    }
    Ok(())
}

/// A line device names a defined port that no other device uses.
pub(super) fn check_line_device(
    device: &SerialDeviceConfig,
    ports: &[SerialPortConfig],
    earlier: &[super::DeviceConfig],
) -> Result<(), String> {
    let id = &device.id;
    find_port(id, &device.port, ports)?;
    if let Some(other) = earlier.iter().find(|d| port_of(d) == Some(&device.port)) {
        return Err(format!(
            "device `{id}`: serial port `{}` is already used by device `{}`; a line device needs a port of its own",
            device.port,
            other.id()
        ));
    }
    if device.terminator.is_empty() {
        return Err(format!("device `{id}`: terminator must not be empty"));
    }
    if device.max_line < 16 {
        return Err(format!("device `{id}`: max_line must be at least 16 bytes"));
    }
    match (&device.poll_command, device.poll_interval) {
        (Some(command), Some(interval)) => {
            if command.is_empty() {
                return Err(format!("device `{id}`: poll_command must not be empty"));
            }
            if interval < Duration::from_millis(10) {
                return Err(format!(
                    "device `{id}`: poll_interval must be at least 10ms"
                ));
            }
        }
        (None, None) => {}
        _ => {
            return Err(format!(
                "device `{id}`: poll_command and poll_interval go together; set both or neither"
            ));
        }
    }
    if device.format == PayloadFormat::Senml && device.timestamp_field.is_some() {
        return Err(format!(
            "device `{id}`: SenML carries its own times; remove timestamp_field"
        ));
    }
    Ok(())
}

/// A Modbus device names a defined port shared only with other Modbus devices, has a slave
/// address of its own on it, and a register map whose entries fit their tables.
pub(super) fn check_modbus_device(
    device: &mut ModbusDeviceConfig,
    ports: &[SerialPortConfig],
    earlier: &[super::DeviceConfig],
) -> Result<(), String> {
    let id = &device.id;
    find_port(id, &device.port, ports)?;
    for other in earlier {
        match other {
            super::DeviceConfig::Modbus(m) if m.port == device.port && m.slave == device.slave => {
                return Err(format!(
                    "device `{id}`: slave {} on port `{}` is already device `{}`",
                    device.slave, device.port, m.id
                ));
            }
            super::DeviceConfig::Serial(s) if s.port == device.port => {
                return Err(format!(
                    "device `{id}`: serial port `{}` is used by line device `{}`; a Modbus bus cannot share it",
                    device.port, s.id
                ));
            }
            _ => {}
        }
    }
    if !(1..=247).contains(&device.slave) {
        return Err(format!("device `{id}`: slave must be 1 to 247"));
    }
    if device.poll_interval < Duration::from_millis(10) {
        return Err(format!(
            "device `{id}`: poll_interval must be at least 10ms"
        ));
    }
    if device.registers.is_empty() {
        return Err(format!(
            "device `{id}`: list at least one [[devices.registers]] entry"
        ));
    }
    for register in &device.registers {
        let bits = matches!(
            register.table,
            RegisterTable::Coil | RegisterTable::Discrete
        );
        if bits && register.data_type != DataType::U16 {
            return Err(format!(
                "device `{id}`: register `{}` is a {:?}, which holds one bit; remove `type`",
                register.name, register.table
            ));
        }
        if u32::from(register.address) + u32::from(register.width()) > 0x1_0000 {
            return Err(format!(
                "device `{id}`: register `{}` at {} runs past address 65535",
                register.name, register.address
            ));
        }
        if !register.scale.is_finite() || register.scale == 0.0 || !register.offset.is_finite() {
            return Err(format!(
                "device `{id}`: register `{}` needs a finite, non-zero scale and a finite offset",
                register.name
            ));
        }
    }
    device.metrics = device
        .registers
        .iter()
        .map(RegisterConfig::as_metric)
        .collect();
    Ok(())
}

fn find_port<'a>(
    device: &str,
    port: &str,
    ports: &'a [SerialPortConfig],
) -> Result<&'a SerialPortConfig, String> {
    ports.iter().find(|p| p.id == port).ok_or_else(|| {
        format!("device `{device}`: serial port `{port}` is not defined in [[serial_ports]]")
    })
}

fn port_of(device: &super::DeviceConfig) -> Option<&String> {
    match device {
        super::DeviceConfig::Serial(d) => Some(&d.port),
        super::DeviceConfig::Modbus(d) => Some(&d.port),
        super::DeviceConfig::Mqtt(_) => None,
    }
}
