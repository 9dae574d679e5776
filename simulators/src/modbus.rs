//! A Modbus RTU bus on one [`Pty`]: several simulated energy meters behind one serial port,
//! as on an RS-485 line. It answers the read functions like a real device (exceptions for
//! unmapped addresses and other functions, silence for other slave ids), serves values
//! that change deterministically with every answer, records every value it served, and
//! injects faults per slave at run time.
//!
//! Requests are framed by function code and length and checked by CRC, never by
//! inter-frame silence (a pty has no timing); garbage is skipped a byte at a time.
//!
//! # Register map of the energy meter
//!
//! Holding registers (0x03) and input registers (0x04) serve the same map, as many meters
//! do, so the gateway can use either function:
//!
//! | address | name           | type | words | value                      |
//! |--------:|----------------|------|------:|----------------------------|
//! | 0       | `voltage`      | f32  | 2     | V                          |
//! | 2       | `current`      | f32  | 2     | A                          |
//! | 4       | `active_power` | f32  | 2     | W                          |
//! | 6       | `energy`       | u32  | 2     | Wh, total                  |
//! | 8       | `frequency`    | u16  | 1     | raw / 100 = Hz             |
//! | 9       | `temperature`  | i16  | 1     | raw / 10 = °C (signed)     |
//!
//! 32-bit values use the meter's [`WordOrder`]: high word first ("ABCD", the default) or
//! low word first ("CDAB"); bytes within a word are always big-endian. A read must cover
//! whole values: one starting or ending inside a 32-bit value, or reaching past address 9,
//! gets exception 0x02. Coil 0 (0x01) is `relay` (1 = load connected); discrete input 0
//! (0x02) is `alarm` (1 = temperature at or above 40.0 °C).
//!
//! Every f32 value is a multiple of 1/64, so it converts to f64 and prints exactly.

use std::collections::{BTreeMap, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio_util::sync::{CancellationToken, DropGuard};

use crate::pty::{Pty, PtyError};

/// The longest RTU frame (Modbus over serial line, 2.5.1.1).
pub const MAX_ADU: usize = 256;

/// How many served values [`ModbusBus::served`] keeps; older ones are dropped and counted
/// in [`BusReport::served_dropped`], so a long run stays bounded.
pub const SERVED_CAPACITY: usize = 100_000;

pub const FN_READ_COILS: u8 = 0x01;
pub const FN_READ_DISCRETE_INPUTS: u8 = 0x02;
pub const FN_READ_HOLDING_REGISTERS: u8 = 0x03;
pub const FN_READ_INPUT_REGISTERS: u8 = 0x04;

pub const ILLEGAL_FUNCTION: u8 = 0x01;
pub const ILLEGAL_DATA_ADDRESS: u8 = 0x02;
pub const ILLEGAL_DATA_VALUE: u8 = 0x03;
pub const SERVER_DEVICE_FAILURE: u8 = 0x04;

/// The order of the two 16-bit words of a 32-bit value.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum WordOrder {
    /// High word first: bytes A B C D of a big-endian value arrive as `AB`, `CD`.
    #[default]
    Abcd,
    /// Low word first: `CD`, `AB`.
    Cdab,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ValueType {
    F32,
    U32,
    U16,
    I16,
}

impl ValueType {
    pub const fn words(self) -> u16 {
        match self {
            Self::F32 | Self::U32 => 2,
            Self::U16 | Self::I16 => 1,
        }
    }
}

/// One value in the meter's register map. Its value is `raw / divisor`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Register {
    pub name: &'static str,
    pub address: u16,
    pub value_type: ValueType,
    pub divisor: f64,
    pub unit: &'static str,
}

pub const VOLTAGE: Register = Register {
    name: "voltage",
    address: 0,
    value_type: ValueType::F32,
    divisor: 1.0,
    unit: "V",
};
pub const CURRENT: Register = Register {
    name: "current",
    address: 2,
    value_type: ValueType::F32,
    divisor: 1.0,
    unit: "A",
};
pub const ACTIVE_POWER: Register = Register {
    name: "active_power",
    address: 4,
    value_type: ValueType::F32,
    divisor: 1.0,
    unit: "W",
};
pub const ENERGY: Register = Register {
    name: "energy",
    address: 6,
    value_type: ValueType::U32,
    divisor: 1.0,
    unit: "Wh",
};
pub const FREQUENCY: Register = Register {
    name: "frequency",
    address: 8,
    value_type: ValueType::U16,
    divisor: 100.0,
    unit: "Hz",
};
pub const TEMPERATURE: Register = Register {
    name: "temperature",
    address: 9,
    value_type: ValueType::I16,
    divisor: 10.0,
    unit: "°C",
};

/// The meter's registers in address order, served by functions 0x03 and 0x04.
pub const REGISTERS: [Register; 6] = [
    VOLTAGE,
    CURRENT,
    ACTIVE_POWER,
    ENERGY,
    FREQUENCY,
    TEMPERATURE,
];

/// Registers 0 to `REGISTER_WORDS - 1` are mapped.
pub const REGISTER_WORDS: u16 = 10;

/// One bit in the meter's coil or discrete-input map.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Bit {
    pub name: &'static str,
    pub address: u16,
}

/// Coil 0: 1 while the meter's relay connects the load.
pub const RELAY: Bit = Bit {
    name: "relay",
    address: 0,
};
/// Discrete input 0: 1 while the temperature is at or above 40.0 °C.
pub const ALARM: Bit = Bit {
    name: "alarm",
    address: 0,
};
pub const COILS: [Bit; 1] = [RELAY];
pub const DISCRETE_INPUTS: [Bit; 1] = [ALARM];

/// What a meter measures at its `step`-th answer. Deterministic, so tests can compute
/// what any answer held.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct MeterReading {
    pub voltage: f32,
    pub current: f32,
    pub active_power: f32,
    pub energy_wh: u32,
    /// Hz × 100.
    pub frequency_raw: u16,
    /// °C × 10.
    pub temperature_raw: i16,
    pub relay: bool,
    pub alarm: bool,
}

impl MeterReading {
    /// The reading slave `slave` serves in its answer number `step` (from 0).
    ///
    /// ```
    /// use sensorgate_sim::modbus::{MeterReading, ENERGY, TEMPERATURE};
    /// let r = MeterReading::at(1, 0);
    /// assert_eq!(r.value(&TEMPERATURE), -19.3);
    /// assert!(r.value(&ENERGY) > 65_535.0, "the high word matters");
    /// ```
    pub fn at(slave: u8, step: u64) -> Self {
        let slave = u64::from(slave);
        // Multiples of 1/8 (voltage, current) and their product (1/64) are exact in f32.
        let voltage = 229.0 + ((step * 3 + slave * 5) % 17) as f32 * 0.125;
        let current = 0.5 + ((step * 7 + slave * 11) % 80) as f32 * 0.125;
        let temperature_raw = ((step * 11 + slave * 7) % 700) as i16 - 200;
        Self {
            voltage,
            current,
            active_power: voltage * current,
            energy_wh: (1_000_000 + slave * 100_000 + step * 13) as u32,
            frequency_raw: 4990 + ((step * 3 + slave) % 21) as u16,
            temperature_raw,
            relay: (step / 4 + slave).is_multiple_of(2),
            alarm: temperature_raw >= 400,
        }
    }

    /// The value of one of [`REGISTERS`] as the gateway should store it: `raw / divisor`,
    /// f32 widened exactly (NaN for a register not in the map).
    pub fn value(&self, register: &Register) -> f64 {
        match register.name {
            "voltage" => f64::from(self.voltage),
            "current" => f64::from(self.current),
            "active_power" => f64::from(self.active_power),
            "energy" => f64::from(self.energy_wh) / register.divisor,
            "frequency" => f64::from(self.frequency_raw) / register.divisor,
            "temperature" => f64::from(self.temperature_raw) / register.divisor,
            _ => f64::NAN,
        }
    }

    /// The ten mapped registers, 32-bit values in `order`.
    pub fn registers(&self, order: WordOrder) -> [u16; REGISTER_WORDS as usize] {
        let pair = |v: u32| {
            let (hi, lo) = ((v >> 16) as u16, v as u16);
            match order {
                WordOrder::Abcd => [hi, lo],
                WordOrder::Cdab => [lo, hi],
            }
        };
        let [v0, v1] = pair(self.voltage.to_bits());
        let [c0, c1] = pair(self.current.to_bits());
        let [p0, p1] = pair(self.active_power.to_bits());
        let [e0, e1] = pair(self.energy_wh);
        [
            v0,
            v1,
            c0,
            c1,
            p0,
            p1,
            e0,
            e1,
            self.frequency_raw,
            self.temperature_raw as u16,
        ]
    }
}

/// Decodes a register from words read at its address, as a gateway would.
///
/// ```
/// use sensorgate_sim::modbus::{decode, MeterReading, WordOrder, REGISTERS, VOLTAGE};
/// let r = MeterReading::at(2, 5);
/// let words = r.registers(WordOrder::Cdab);
/// assert_eq!(decode(&VOLTAGE, &words[0..2], WordOrder::Cdab), Some(r.value(&VOLTAGE)));
/// for reg in REGISTERS {
///     let at = reg.address as usize;
///     assert_eq!(decode(&reg, &words[at..], WordOrder::Cdab), Some(r.value(&reg)));
/// }
/// ```
pub fn decode(register: &Register, words: &[u16], order: WordOrder) -> Option<f64> {
    let word32 = || {
        let (a, b) = (u32::from(*words.first()?), u32::from(*words.get(1)?));
        Some(match order {
            WordOrder::Abcd => a << 16 | b,
            WordOrder::Cdab => b << 16 | a,
        })
    };
    let raw = match register.value_type {
        ValueType::F32 => f64::from(f32::from_bits(word32()?)),
        ValueType::U32 => f64::from(word32()?),
        ValueType::U16 => f64::from(*words.first()?),
        ValueType::I16 => f64::from(*words.first()? as i16),
    };
    Some(raw / register.divisor)
}

/// CRC-16/MODBUS (reflected polynomial 0xA001, initial 0xFFFF). Frames carry it low byte
/// first.
///
/// ```
/// assert_eq!(sensorgate_sim::modbus::crc16(&[0x01, 0x03, 0x00, 0x00, 0x00, 0x0A]), 0xCDC5);
/// ```
pub fn crc16(bytes: &[u8]) -> u16 {
    let mut crc = 0xFFFFu16;
    for &byte in bytes {
        crc ^= u16::from(byte);
        for _ in 0..8 {
            crc = if crc & 1 == 1 {
                (crc >> 1) ^ 0xA001
            } else {
                crc >> 1
            };
        }
    }
    crc
}

/// `body` followed by its CRC.
fn with_crc(mut body: Vec<u8>) -> Vec<u8> {
    let crc = crc16(&body);
    body.extend_from_slice(&crc.to_le_bytes());
    body
}

fn crc_ok(frame: &[u8]) -> bool {
    let (body, crc) = frame.split_at(frame.len() - 2);
    crc16(body).to_le_bytes() == crc
}

/// A fault a slave shows until cleared.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SlaveFault {
    /// Never answers, as a slave without power.
    Dead,
    /// Answers correctly but with the CRC's bits inverted.
    BadCrc,
    /// Answers with as many pseudo-random bytes as the right answer would have.
    Garbled,
    /// Answers every request with this exception code (e.g. 0x04, server device failure;
    /// 0x06, busy).
    Exception(u8),
}

/// One meter on the bus.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MeterConfig {
    /// 1 to 247.
    pub slave: u8,
    pub word_order: WordOrder,
    /// A fault from the start.
    pub fault: Option<SlaveFault>,
}

impl MeterConfig {
    pub fn new(slave: u8) -> Self {
        Self {
            slave,
            word_order: WordOrder::Abcd,
            fault: None,
        }
    }
}

/// One value served in a normal answer.
#[derive(Clone, Debug, PartialEq)]
pub struct Served {
    pub slave: u8,
    pub function: u8,
    /// A [`Register`] or [`Bit`] name.
    pub name: &'static str,
    /// As the gateway should store it (bits as 0.0 and 1.0).
    pub value: f64,
    /// The meter's answer number the value came from (see [`MeterReading::at`]).
    pub step: u64,
    pub at: SystemTime,
}

/// What the bus has seen and done.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct BusReport {
    /// Frames with a valid CRC.
    pub requests: u64,
    /// Normal answers (values served).
    pub answered: u64,
    /// Exception answers, injected ones included.
    pub exceptions: u64,
    /// Requests for slave ids not on the bus, and broadcasts: no answer.
    pub ignored: u64,
    /// Requests left unanswered by a dead slave.
    pub dead: u64,
    pub bad_crc: u64,
    pub garbled: u64,
    /// Bytes skipped while looking for a valid frame.
    pub discarded_bytes: u64,
    pub served_dropped: u64,
    pub unplugs: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum ModbusError {
    #[error(transparent)]
    Pty(#[from] PtyError),
    #[error("slave id {0} is not in 1..=247")]
    InvalidSlave(u8),
    #[error("slave id {0} is configured twice")]
    DuplicateSlave(u8),
    #[error("the Modbus bus at {0} has stopped")]
    Stopped(PathBuf),
}

/// Splits the master's byte stream into request frames.
#[derive(Debug, Default)]
struct Framer {
    buf: Vec<u8>,
    discarded: u64,
}

enum FrameLen {
    Known(usize),
    NeedMore,
    Unknown,
}

/// The length of a request frame starting at `buf[0]`, from its function code.
fn request_len(buf: &[u8]) -> FrameLen {
    let Some(&function) = buf.get(1) else {
        return FrameLen::NeedMore;
    };
    let counted = |at: usize, fixed: usize| {
        buf.get(at).map_or(FrameLen::NeedMore, |&n| {
            FrameLen::Known(fixed + usize::from(n))
        })
    };
    match function {
        0x01..=0x06 | 0x08 => FrameLen::Known(8),
        0x07 | 0x0B | 0x0C | 0x11 => FrameLen::Known(4),
        0x0F | 0x10 => counted(6, 9),
        0x14 | 0x15 => counted(2, 5),
        0x16 => FrameLen::Known(10),
        0x17 => counted(10, 13),
        0x18 => FrameLen::Known(6),
        0x2B => FrameLen::Known(7),
        _ => FrameLen::Unknown,
    }
}

impl Framer {
    fn push(&mut self, bytes: &[u8]) {
        self.buf.extend_from_slice(bytes);
        // Never hold more than two frames' worth of unparsable bytes.
        if self.buf.len() > 2 * MAX_ADU {
            let excess = self.buf.len() - 2 * MAX_ADU;
            self.buf.drain(..excess);
            self.discarded += excess as u64;
        }
    }

    /// The next complete frame with a valid CRC, skipping garbage a byte at a time.
    fn next_frame(&mut self) -> Option<Vec<u8>> {
        loop {
            if self.buf.len() < 4 {
                return None;
            }
            let discard = match request_len(&self.buf) {
                FrameLen::Known(len) if self.buf.len() >= len => {
                    if crc_ok(&self.buf[..len]) {
                        return Some(self.buf.drain(..len).collect());
                    }
                    true
                }
                FrameLen::Unknown => {
                    // An unsupported function of unknown length: the first length whose
                    // CRC matches ends it.
                    let max = self.buf.len().min(MAX_ADU);
                    if let Some(len) = (4..=max).find(|&len| crc_ok(&self.buf[..len])) {
                        return Some(self.buf.drain(..len).collect());
                    }
                    self.buf.len() >= MAX_ADU || self.valid_frame_later()
                }
                // Incomplete: wait, unless a valid frame starts further on, which means the
                // start is garbage that will never complete.
                FrameLen::Known(_) | FrameLen::NeedMore => self.valid_frame_later(),
            };
            if !discard {
                return None;
            }
            self.buf.remove(0);
            self.discarded += 1;
        }
    }

    /// Whether a complete frame with a valid CRC starts after the first byte.
    fn valid_frame_later(&self) -> bool {
        (1..self.buf.len()).any(|at| {
            let rest = &self.buf[at..];
            matches!(request_len(rest), FrameLen::Known(len) if len <= rest.len() && crc_ok(&rest[..len]))
        })
    }

    fn clear(&mut self) {
        self.buf.clear();
    }
}

/// The bus's state, shared between its task and its handle.
#[derive(Debug)]
struct Bus {
    meters: BTreeMap<u8, Meter>,
    served: VecDeque<Served>,
    report: BusReport,
    rng: u64,
}

#[derive(Debug)]
struct Meter {
    config: MeterConfig,
    fault: Option<SlaveFault>,
    step: u64,
}

impl Bus {
    fn new(meters: &[MeterConfig]) -> Result<Self, ModbusError> {
        let mut map = BTreeMap::new();
        for config in meters {
            if !(1..=247).contains(&config.slave) {
                return Err(ModbusError::InvalidSlave(config.slave));
            }
            let meter = Meter {
                config: *config,
                fault: config.fault,
                step: 0,
            };
            if map.insert(config.slave, meter).is_some() {
                return Err(ModbusError::DuplicateSlave(config.slave));
            }
        }
        Ok(Self {
            meters: map,
            served: VecDeque::new(),
            report: BusReport::default(),
            rng: 0x05EE_D0FB_05E5,
        })
    }

    /// The answer to one CRC-checked request frame, if any.
    fn handle(&mut self, frame: &[u8], now: SystemTime) -> Option<Vec<u8>> {
        self.report.requests += 1;
        let (slave, function) = (frame[0], frame[1]);
        let Some(meter) = self.meters.get_mut(&slave) else {
            self.report.ignored += 1;
            return None;
        };
        let answer = match meter.fault {
            Some(SlaveFault::Dead) => {
                self.report.dead += 1;
                return None;
            }
            Some(SlaveFault::Exception(code)) => Err(code),
            _ => answer(meter, function, &frame[2..frame.len() - 2]),
        };
        let (body, values) = match answer {
            Ok((data, values)) => {
                let mut body = vec![slave, function];
                body.extend(data);
                (body, values)
            }
            Err(code) => {
                self.report.exceptions += 1;
                (vec![slave, function | 0x80, code], Vec::new())
            }
        };
        let mut response = with_crc(body);
        match meter.fault {
            Some(SlaveFault::BadCrc) => {
                self.report.bad_crc += 1;
                let n = response.len();
                response[n - 2] ^= 0xFF;
                response[n - 1] ^= 0xFF;
                return Some(response);
            }
            Some(SlaveFault::Garbled) => {
                self.report.garbled += 1;
                for byte in &mut response {
                    *byte = next_random(&mut self.rng) as u8;
                }
                return Some(response);
            }
            _ => {}
        }
        if !values.is_empty() {
            let step = meter.step;
            meter.step += 1;
            self.report.answered += 1;
            for (name, value) in values {
                if self.served.len() >= SERVED_CAPACITY {
                    self.served.pop_front();
                    self.report.served_dropped += 1;
                }
                self.served.push_back(Served {
                    slave,
                    function,
                    name,
                    value,
                    step,
                    at: now,
                });
            }
        }
        Some(response)
    }
}

type Answer = Result<(Vec<u8>, Vec<(&'static str, f64)>), u8>;

/// A read's data (byte count first) and the values it carries, or an exception code.
/// Checks run in the specification's order: function, quantity, address.
fn answer(meter: &Meter, function: u8, pdu: &[u8]) -> Answer {
    let (address, quantity) = match (function, pdu) {
        (0x01..=0x04, [a0, a1, q0, q1]) => (
            u16::from_be_bytes([*a0, *a1]),
            u16::from_be_bytes([*q0, *q1]),
        ),
        _ => return Err(ILLEGAL_FUNCTION),
    };
    let reading = MeterReading::at(meter.config.slave, meter.step);
    let end = u32::from(address) + u32::from(quantity);
    match function {
        FN_READ_COILS | FN_READ_DISCRETE_INPUTS => {
            if !(1..=2000).contains(&quantity) {
                return Err(ILLEGAL_DATA_VALUE);
            }
            let (map, bits) = if function == FN_READ_COILS {
                (&COILS, [reading.relay])
            } else {
                (&DISCRETE_INPUTS, [reading.alarm])
            };
            if end > map.len() as u32 {
                return Err(ILLEGAL_DATA_ADDRESS);
            }
            let range = usize::from(address)..end as usize;
            let mut data = vec![0u8; usize::from(quantity).div_ceil(8)];
            let mut values = Vec::new();
            for (i, at) in range.enumerate() {
                if bits[at] {
                    data[i / 8] |= 1 << (i % 8);
                }
                values.push((map[at].name, if bits[at] { 1.0 } else { 0.0 }));
            }
            let mut out = vec![data.len() as u8];
            out.extend(data);
            Ok((out, values))
        }
        _ => {
            if !(1..=125).contains(&quantity) {
                return Err(ILLEGAL_DATA_VALUE);
            }
            let words_mapped = u32::from(REGISTER_WORDS);
            let starts = |a: u32| REGISTERS.iter().any(|r| u32::from(r.address) == a);
            let aligned = starts(u32::from(address)) && (end == words_mapped || starts(end));
            if end > words_mapped || !aligned {
                return Err(ILLEGAL_DATA_ADDRESS);
            }
            let words = reading.registers(meter.config.word_order);
            let mut out = vec![(quantity * 2) as u8];
            for word in &words[usize::from(address)..end as usize] {
                out.extend(word.to_be_bytes());
            }
            let values = REGISTERS
                .iter()
                .filter(|r| r.address >= address && u32::from(r.address) < end)
                .map(|r| (r.name, reading.value(r)))
                .collect();
            Ok((out, values))
        }
    }
}

/// splitmix64: deterministic bytes for garbled answers.
fn next_random(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

enum Command {
    Unplug(oneshot::Sender<()>),
    Replug(oneshot::Sender<Result<(), PtyError>>),
}

/// A running bus of meters on one pty, served from its own task until
/// [`ModbusBus::stop`], `cancel` or the handle is dropped.
pub struct ModbusBus {
    path: PathBuf,
    bus: Arc<Mutex<Bus>>,
    commands: mpsc::Sender<Command>,
    cancel: CancellationToken,
    task: JoinHandle<Result<(), ModbusError>>,
    _stop_on_drop: DropGuard,
}

impl ModbusBus {
    /// Starts serving `meters` on `pty`.
    ///
    /// # Errors
    /// When a slave id is outside 1..=247 or appears twice.
    ///
    /// # Panics
    /// Outside a tokio runtime.
    pub fn start(
        pty: Pty,
        meters: &[MeterConfig],
        cancel: CancellationToken,
    ) -> Result<Self, ModbusError> {
        let bus = Arc::new(Mutex::new(Bus::new(meters)?));
        let path = pty.path().to_path_buf();
        let (commands, command_rx) = mpsc::channel(8);
        let cancel = cancel.child_token();
        let task = tokio::spawn(serve(pty, bus.clone(), command_rx, cancel.clone()));
        Ok(Self {
            path,
            bus,
            commands,
            _stop_on_drop: cancel.clone().drop_guard(),
            cancel,
            task,
        })
    }

    /// The path the gateway opens.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Sets or clears (`None`) a slave's fault, from its next request on. Returns false
    /// when the slave is not on the bus.
    pub fn set_fault(&self, slave: u8, fault: Option<SlaveFault>) -> bool {
        let mut bus = lock(&self.bus);
        match bus.meters.get_mut(&slave) {
            Some(meter) => {
                meter.fault = fault;
                true
            }
            None => false,
        }
    }

    /// Every value served in a normal answer, oldest first (at most [`SERVED_CAPACITY`]).
    pub fn served(&self) -> Vec<Served> {
        lock(&self.bus).served.iter().cloned().collect()
    }

    pub fn report(&self) -> BusReport {
        lock(&self.bus).report.clone()
    }

    /// Pulls the bus cable (see [`Pty::unplug`]); nothing is answered until replugged.
    ///
    /// # Errors
    /// When the bus has stopped.
    pub async fn unplug(&self) -> Result<(), ModbusError> {
        let (tx, rx) = oneshot::channel();
        self.send(Command::Unplug(tx)).await?;
        rx.await.map_err(|_| self.stopped())
    }

    /// Plugs a fresh pty in at the same path. Meters keep their steps and faults.
    ///
    /// # Errors
    /// When the bus has stopped or the pty cannot be made.
    pub async fn replug(&self) -> Result<(), ModbusError> {
        let (tx, rx) = oneshot::channel();
        self.send(Command::Replug(tx)).await?;
        Ok(rx.await.map_err(|_| self.stopped())??)
    }

    /// Stops serving, unplugs, and returns the report.
    ///
    /// # Errors
    /// When the bus had failed.
    pub async fn stop(self) -> Result<BusReport, ModbusError> {
        self.cancel.cancel();
        match self.task.await {
            Ok(result) => result?,
            Err(_) => return Err(ModbusError::Stopped(self.path.clone())),
        }
        Ok(lock(&self.bus).report.clone())
    }

    async fn send(&self, command: Command) -> Result<(), ModbusError> {
        self.commands
            .send(command)
            .await
            .map_err(|_| self.stopped())
    }

    fn stopped(&self) -> ModbusError {
        ModbusError::Stopped(self.path.clone())
    }
}

fn lock(bus: &Mutex<Bus>) -> std::sync::MutexGuard<'_, Bus> {
    bus.lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

enum Event {
    Stop,
    Command(Command),
    Read(Result<usize, PtyError>),
}

async fn serve(
    mut pty: Pty,
    bus: Arc<Mutex<Bus>>,
    mut commands: mpsc::Receiver<Command>,
    cancel: CancellationToken,
) -> Result<(), ModbusError> {
    let mut framer = Framer::default();
    let mut buf = [0u8; MAX_ADU];
    tracing::info!(path = %pty.path().display(), "Modbus bus started");
    loop {
        let event = tokio::select! {
            biased;
            () = cancel.cancelled() => Event::Stop,
            cmd = commands.recv() => cmd.map_or(Event::Stop, Event::Command),
            read = pty.read(&mut buf), if pty.is_plugged() => Event::Read(read),
        };
        match event {
            Event::Stop => break,
            Event::Command(Command::Unplug(done)) => {
                pty.unplug();
                framer.clear();
                lock(&bus).report.unplugs += 1;
                let _ = done.send(());
            }
            Event::Command(Command::Replug(done)) => {
                let _ = done.send(pty.replug());
            }
            Event::Read(read) => {
                framer.push(&buf[..read?]);
                while let Some(frame) = framer.next_frame() {
                    let response = {
                        let mut bus = lock(&bus);
                        let response = bus.handle(&frame, SystemTime::now());
                        bus.report.discarded_bytes = framer.discarded;
                        response
                    };
                    if let Some(response) = response {
                        pty.write_all(&response).await?;
                    }
                }
                lock(&bus).report.discarded_bytes = framer.discarded;
            }
        }
    }
    tracing::info!(path = %pty.path().display(), "Modbus bus stopped");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;
    use tokio_modbus::prelude::*;
    use tokio_serial::{ClearBuffer, SerialPort, SerialPortBuilderExt};

    // ---- framing and answers, without I/O ----

    fn request(slave: u8, function: u8, address: u16, quantity: u16) -> Vec<u8> {
        let mut body = vec![slave, function];
        body.extend(address.to_be_bytes());
        body.extend(quantity.to_be_bytes());
        with_crc(body)
    }

    fn bus(meters: &[MeterConfig]) -> Bus {
        Bus::new(meters).unwrap()
    }

    #[test]
    fn crc_matches_the_specifications_example() {
        assert_eq!(
            request(1, 3, 0, 10),
            [0x01, 0x03, 0x00, 0x00, 0x00, 0x0A, 0xC5, 0xCD]
        );
    }

    #[test]
    fn the_framer_skips_garbage_and_joins_split_frames() {
        let mut framer = Framer::default();
        let frame = request(1, 4, 0, 2);
        framer.push(&[0xFF, 0x00, 0x13]);
        framer.push(&frame[..3]);
        assert_eq!(framer.next_frame(), None);
        framer.push(&frame[3..]);
        assert_eq!(framer.next_frame(), Some(frame.clone()));
        assert_eq!(framer.next_frame(), None);
        assert_eq!(framer.discarded, 3);

        // A truncated request never completes; the next valid one still gets through.
        framer.push(&frame[..5]);
        framer.push(&frame);
        assert_eq!(framer.next_frame(), Some(frame.clone()));

        // A corrupted CRC is skipped byte by byte.
        let mut bad = frame.clone();
        bad[7] ^= 1;
        framer.push(&bad);
        framer.push(&frame);
        assert_eq!(framer.next_frame(), Some(frame));
        assert_eq!(framer.next_frame(), None);
    }

    #[test]
    fn unknown_functions_are_framed_by_their_crc() {
        let mut framer = Framer::default();
        let custom = with_crc(vec![1, 0x41, 9, 9, 9]);
        framer.push(&custom);
        assert_eq!(framer.next_frame(), Some(custom.clone()));
        let mut b = bus(&[MeterConfig::new(1)]);
        let answer = b.handle(&custom, SystemTime::now()).unwrap();
        assert_eq!(answer, with_crc(vec![1, 0xC1, ILLEGAL_FUNCTION]));
    }

    #[test]
    fn answers_carry_the_registers_in_the_meters_word_order() {
        let cdab = MeterConfig {
            word_order: WordOrder::Cdab,
            ..MeterConfig::new(2)
        };
        let mut b = bus(&[MeterConfig::new(1), cdab]);
        let now = SystemTime::now();
        for (slave, order) in [(1, WordOrder::Abcd), (2, WordOrder::Cdab)] {
            let answer = b.handle(&request(slave, 4, 0, 10), now).unwrap();
            assert!(crc_ok(&answer));
            assert_eq!(&answer[..3], [slave, 4, 20]);
            let words: Vec<u16> = answer[3..23]
                .chunks(2)
                .map(|w| u16::from_be_bytes([w[0], w[1]]))
                .collect();
            let reading = MeterReading::at(slave, 0);
            assert_eq!(words, reading.registers(order));
            for reg in REGISTERS {
                let at = usize::from(reg.address);
                assert_eq!(decode(&reg, &words[at..], order), Some(reading.value(&reg)));
            }
        }
        let served = b.served.iter().filter(|s| s.slave == 2).count();
        assert_eq!(served, REGISTERS.len());
    }

    #[test]
    fn reads_outside_the_map_or_inside_a_value_are_illegal_addresses() {
        let mut b = bus(&[MeterConfig::new(1)]);
        let now = SystemTime::now();
        let exception = |code| Some(with_crc(vec![1, 0x83, code]));
        assert_eq!(b.handle(&request(1, 3, 10, 1), now), exception(2));
        assert_eq!(b.handle(&request(1, 3, 1, 1), now), exception(2));
        assert_eq!(b.handle(&request(1, 3, 0, 3), now), exception(2));
        assert_eq!(b.handle(&request(1, 3, 0, 126), now), exception(3));
        assert_eq!(b.handle(&request(1, 3, 0, 0), now), exception(3));
        assert_eq!(
            b.handle(&request(1, 1, 1, 1), now),
            Some(with_crc(vec![1, 0x81, 2]))
        );
        assert_eq!(
            b.handle(&request(1, 6, 0, 1), now),
            Some(with_crc(vec![1, 0x86, 1])),
            "writes are illegal functions"
        );
        assert_eq!(b.report.exceptions, 7);
        assert!(b.served.is_empty());
        assert_eq!(b.handle(&request(9, 3, 0, 2), now), None, "not on the bus");
        assert_eq!(b.handle(&request(0, 3, 0, 2), now), None, "broadcast");
        assert_eq!(b.report.ignored, 2);
    }

    #[test]
    fn meter_values_are_realistic_and_exact_in_f64() {
        for slave in [1, 2, 7] {
            for step in 0..500 {
                let r = MeterReading::at(slave, step);
                assert!((229.0..=231.0).contains(&r.voltage));
                assert!((0.5..11.0).contains(&r.current));
                assert_eq!(
                    f64::from(r.active_power),
                    f64::from(r.voltage) * f64::from(r.current)
                );
                assert!((49.9..=50.1).contains(&r.value(&FREQUENCY)));
                assert!((-20.0..50.0).contains(&r.value(&TEMPERATURE)));
                assert_eq!(r.alarm, r.value(&TEMPERATURE) >= 40.0);
                let next = MeterReading::at(slave, step + 1);
                assert!(next.energy_wh > r.energy_wh);
            }
        }
    }

    // ---- over a pty, with tokio-serial and tokio-modbus as the gateway uses them ----

    const NO_ANSWER: Duration = Duration::from_millis(300);

    fn open_port(path: &Path) -> tokio_serial::SerialStream {
        tokio_serial::new(path.to_string_lossy(), 9600)
            .open_native_async()
            .expect("open the bus")
    }

    fn client(path: &Path, slave: u8) -> tokio_modbus::client::Context {
        rtu::attach_slave(open_port(path), Slave(slave))
    }

    #[derive(Debug, PartialEq)]
    enum Outcome<T> {
        Value(T),
        Exception(ExceptionCode),
        Error(std::io::ErrorKind),
        Protocol,
        Timeout,
    }

    async fn call<T>(request: impl Future<Output = tokio_modbus::Result<T>>) -> Outcome<T> {
        match tokio::time::timeout(NO_ANSWER, request).await {
            Err(_) => Outcome::Timeout,
            Ok(Err(tokio_modbus::Error::Transport(err))) => Outcome::Error(err.kind()),
            Ok(Err(tokio_modbus::Error::Protocol(_))) => Outcome::Protocol,
            Ok(Ok(Err(code))) => Outcome::Exception(code),
            Ok(Ok(Ok(value))) => Outcome::Value(value),
        }
    }

    fn start(dir: &Path, meters: &[MeterConfig]) -> ModbusBus {
        let pty = Pty::open(dir.join("ttyMB0")).unwrap();
        ModbusBus::start(pty, meters, CancellationToken::new()).unwrap()
    }

    fn two_meters() -> [MeterConfig; 2] {
        [
            MeterConfig::new(1),
            MeterConfig {
                word_order: WordOrder::Cdab,
                ..MeterConfig::new(2)
            },
        ]
    }

    /// The values of the last normal answer, as `(name, value)`.
    fn last_answer(bus: &ModbusBus) -> Vec<(&'static str, f64)> {
        let served = bus.served();
        let Some(last) = served.last() else {
            return Vec::new();
        };
        served
            .iter()
            .filter(|s| s.slave == last.slave && s.step == last.step)
            .map(|s| (s.name, s.value))
            .collect()
    }

    fn decoded(words: &[u16], order: WordOrder) -> Vec<(&'static str, f64)> {
        REGISTERS
            .iter()
            .filter(|r| usize::from(r.address) < words.len())
            .map(|r| {
                let value = decode(r, &words[usize::from(r.address)..], order).unwrap();
                (r.name, value)
            })
            .collect()
    }

    #[tokio::test]
    async fn tokio_modbus_reads_what_the_meters_serve() {
        let dir = tempfile::tempdir().unwrap();
        let bus = start(dir.path(), &two_meters());
        let mut ctx = client(bus.path(), 1);

        let Outcome::Value(words) = call(ctx.read_input_registers(0, 10)).await else {
            panic!("input registers");
        };
        assert_eq!(words, MeterReading::at(1, 0).registers(WordOrder::Abcd));
        assert_eq!(decoded(&words, WordOrder::Abcd), last_answer(&bus));

        let Outcome::Value(words) = call(ctx.read_holding_registers(6, 4)).await else {
            panic!("holding registers");
        };
        let expected: Vec<_> = [ENERGY, FREQUENCY, TEMPERATURE]
            .iter()
            .map(|r| (r.name, MeterReading::at(1, 1).value(r)))
            .collect();
        let got: Vec<_> = [ENERGY, FREQUENCY, TEMPERATURE]
            .iter()
            .map(|r| {
                (
                    r.name,
                    decode(r, &words[usize::from(r.address - 6)..], WordOrder::Abcd).unwrap(),
                )
            })
            .collect();
        assert_eq!(got, expected);
        assert_eq!(last_answer(&bus), expected);

        let relay = MeterReading::at(1, 2).relay;
        assert_eq!(
            call(ctx.read_coils(0, 1)).await,
            Outcome::Value(vec![relay])
        );
        assert_eq!(
            last_answer(&bus),
            [("relay", if relay { 1.0 } else { 0.0 })]
        );
        let alarm = MeterReading::at(1, 3).alarm;
        assert_eq!(
            call(ctx.read_discrete_inputs(0, 1)).await,
            Outcome::Value(vec![alarm])
        );

        // The second meter sends its 32-bit values low word first.
        ctx.set_slave(Slave(2));
        let Outcome::Value(words) = call(ctx.read_input_registers(0, 8)).await else {
            panic!("slave 2");
        };
        assert_eq!(decoded(&words, WordOrder::Cdab), last_answer(&bus));
        assert_ne!(decoded(&words, WordOrder::Abcd), last_answer(&bus));
        let report = bus.report();
        assert_eq!((report.requests, report.answered), (5, 5));
    }

    #[tokio::test]
    async fn unmapped_addresses_and_writes_get_exceptions_over_the_wire() {
        let dir = tempfile::tempdir().unwrap();
        let bus = start(dir.path(), &two_meters());
        let mut ctx = client(bus.path(), 1);
        let illegal_address = Outcome::Exception(ExceptionCode::IllegalDataAddress);
        assert_eq!(
            call(ctx.read_holding_registers(10, 2)).await,
            illegal_address
        );
        assert_eq!(call(ctx.read_input_registers(1, 2)).await, illegal_address);
        assert_eq!(
            call(ctx.read_coils(0, 2)).await,
            Outcome::Exception(ExceptionCode::IllegalDataAddress)
        );
        assert_eq!(
            call(ctx.write_single_register(0, 1)).await,
            Outcome::Exception(ExceptionCode::IllegalFunction)
        );
        bus.set_fault(1, Some(SlaveFault::Exception(0x06)));
        assert_eq!(
            call(ctx.read_input_registers(0, 2)).await,
            Outcome::Exception(ExceptionCode::ServerDeviceBusy)
        );
        bus.set_fault(1, None);
        assert!(matches!(
            call(ctx.read_input_registers(0, 2)).await,
            Outcome::Value(_)
        ));
        assert_eq!(bus.report().exceptions, 5);
    }

    #[tokio::test]
    async fn silent_slaves_time_out_and_the_same_client_goes_on_with_healthy_ones() {
        let dir = tempfile::tempdir().unwrap();
        let mut meters = two_meters();
        meters[1].fault = Some(SlaveFault::Dead);
        let bus = start(dir.path(), &meters);
        let mut ctx = client(bus.path(), 2);
        assert_eq!(call(ctx.read_input_registers(0, 2)).await, Outcome::Timeout);
        ctx.set_slave(Slave(3));
        assert_eq!(
            call(ctx.read_input_registers(0, 2)).await,
            Outcome::Timeout,
            "not on the bus"
        );
        ctx.set_slave(Slave(1));
        let Outcome::Value(words) = call(ctx.read_input_registers(0, 10)).await else {
            panic!("the healthy slave answers");
        };
        assert_eq!(decoded(&words, WordOrder::Abcd), last_answer(&bus));
        // A slave brought back to life answers again.
        bus.set_fault(2, None);
        ctx.set_slave(Slave(2));
        let Outcome::Value(words) = call(ctx.read_input_registers(0, 10)).await else {
            panic!("slave 2 is back");
        };
        assert_eq!(decoded(&words, WordOrder::Cdab), last_answer(&bus));
        let report = bus.report();
        assert_eq!((report.dead, report.ignored, report.answered), (1, 1, 2));
    }

    /// What a gateway must do after a failed request, as tokio-modbus 0.17 cannot be
    /// trusted to resync by itself (see the bad CRC test below): close the port, reopen it,
    /// clear its input, and attach a new client.
    fn recover(
        path: &Path,
        ctx: tokio_modbus::client::Context,
        slave: u8,
    ) -> tokio_modbus::client::Context {
        drop(ctx);
        let port = open_port(path);
        port.clear(ClearBuffer::Input).unwrap();
        rtu::attach_slave(port, Slave(slave))
    }

    #[tokio::test]
    async fn garbled_answers_fail_and_the_next_request_to_a_healthy_slave_succeeds() {
        let dir = tempfile::tempdir().unwrap();
        let mut meters = two_meters();
        meters[1].fault = Some(SlaveFault::Garbled);
        let bus = start(dir.path(), &meters);
        let mut ctx = client(bus.path(), 2);
        for _ in 0..4 {
            ctx.set_slave(Slave(2));
            let garbled = call(ctx.read_input_registers(0, 10)).await;
            match garbled {
                // The decoder waited for more: the next call clears its buffer and is fine.
                Outcome::Timeout => ctx.set_slave(Slave(1)),
                // The decoder gave up: this client's next call would fail with BrokenPipe.
                Outcome::Error(std::io::ErrorKind::InvalidData) => {
                    ctx = recover(bus.path(), ctx, 1);
                }
                other => panic!("garbage must not decode: {other:?}"),
            }
            let Outcome::Value(words) = call(ctx.read_input_registers(0, 10)).await else {
                panic!("the healthy slave answers after garbage");
            };
            assert_eq!(decoded(&words, WordOrder::Abcd), last_answer(&bus));
        }
        assert_eq!(bus.report().garbled, 4);
    }

    /// How tokio-modbus 0.17 behaves after an answer with a bad CRC, and what a gateway
    /// must do about it. Its decoder drops a byte and tries again (up to 20 times) on a CRC
    /// error; it either gives up with `InvalidData` ("Too many retries") or waits for bytes
    /// that never come (a timeout), depending on the bytes. After the error, the client's
    /// next call fails at once with `BrokenPipe` although its request went out; that
    /// request's answer then waits in the port and is taken as the answer to the call after
    /// it: every later answer is one request late. Reopening the port does not drop the
    /// waiting bytes; clearing the input buffer does.
    #[tokio::test]
    async fn after_a_bad_crc_tokio_modbus_needs_a_fresh_port_with_its_input_cleared() {
        let dir = tempfile::tempdir().unwrap();
        let bus = start(dir.path(), &two_meters());
        let mut ctx = client(bus.path(), 1);
        bus.set_fault(1, Some(SlaveFault::BadCrc));
        assert_eq!(
            call(ctx.read_input_registers(0, 10)).await,
            Outcome::Error(std::io::ErrorKind::InvalidData)
        );
        bus.set_fault(1, None);
        assert_eq!(
            call(ctx.read_input_registers(0, 10)).await,
            Outcome::Error(std::io::ErrorKind::BrokenPipe)
        );
        // The BrokenPipe call's request was answered all the same.
        tokio::time::sleep(Duration::from_millis(50)).await;
        let unread = last_answer(&bus);
        let Outcome::Value(words) = call(ctx.read_input_registers(0, 10)).await else {
            panic!("an answer");
        };
        assert_eq!(
            decoded(&words, WordOrder::Abcd),
            unread,
            "the previous request's answer"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_ne!(unread, last_answer(&bus), "not this request's");

        // Reopened without clearing, the late answer is still there.
        drop(ctx);
        let mut ctx = client(bus.path(), 1);
        tokio::time::sleep(Duration::from_millis(50)).await;
        let unread = last_answer(&bus);
        let Outcome::Value(words) = call(ctx.read_input_registers(0, 10)).await else {
            panic!("an answer");
        };
        assert_eq!(decoded(&words, WordOrder::Abcd), unread, "still one behind");

        // Reopened with the input cleared, answers match their requests again.
        tokio::time::sleep(Duration::from_millis(50)).await;
        let mut ctx = recover(bus.path(), ctx, 1);
        for _ in 0..2 {
            let Outcome::Value(words) = call(ctx.read_input_registers(0, 10)).await else {
                panic!("an answer");
            };
            assert_eq!(decoded(&words, WordOrder::Abcd), last_answer(&bus));
        }
        assert_eq!(bus.report().bad_crc, 1);
    }

    #[tokio::test]
    async fn a_bad_crc_that_leaves_the_decoder_waiting_is_a_timeout_and_does_no_harm() {
        let dir = tempfile::tempdir().unwrap();
        let bus = start(dir.path(), &two_meters());
        let mut ctx = client(bus.path(), 1);
        bus.set_fault(1, Some(SlaveFault::BadCrc));
        // Two registers: after dropping the slave id, the decoder reads the voltage's
        // first byte as a byte count and waits for bytes that never come.
        assert_eq!(call(ctx.read_input_registers(8, 2)).await, Outcome::Timeout);
        bus.set_fault(1, None);
        for _ in 0..2 {
            let Outcome::Value(words) = call(ctx.read_input_registers(0, 10)).await else {
                panic!("an answer");
            };
            assert_eq!(decoded(&words, WordOrder::Abcd), last_answer(&bus));
        }
    }

    #[tokio::test]
    async fn unplugging_the_bus_fails_the_client_and_a_new_one_works_after_replug() {
        let dir = tempfile::tempdir().unwrap();
        let bus = start(dir.path(), &two_meters());
        let mut ctx = client(bus.path(), 1);
        assert!(matches!(
            call(ctx.read_input_registers(0, 2)).await,
            Outcome::Value(_)
        ));
        bus.unplug().await.unwrap();
        assert!(!bus.path().exists());
        let after = call(ctx.read_input_registers(0, 2)).await;
        // The request's write fails with EIO on the hung-up port.
        assert!(matches!(after, Outcome::Error(_)), "{after:?}");
        bus.replug().await.unwrap();
        drop(ctx);
        let mut ctx = client(bus.path(), 2);
        let Outcome::Value(words) = call(ctx.read_input_registers(0, 10)).await else {
            panic!("answers after replug");
        };
        assert_eq!(decoded(&words, WordOrder::Cdab), last_answer(&bus));
        let report = bus.stop().await.unwrap();
        assert_eq!((report.unplugs, report.answered), (1, 2));
        assert!(!dir.path().join("ttyMB0").exists());
    }
}
