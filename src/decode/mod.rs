//! Pure payload decoders: bytes in, [`RawReading`]s or a [`DecodeError`] out. No I/O, no
//! clock: the receive time is passed in for formats with relative times.

mod flat_json;
mod json;
pub mod registers;
mod senml;
mod text;
mod time;

pub use time::{format_rfc3339, parse_rfc3339, write_rfc3339};

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use regex::Regex;

use crate::config::{FormatOptions, PayloadFormat, ValidationConfig};
use crate::reading::{
    DecodeError, Decoded, FastSet, MAX_NAME_AMPLIFICATION, Millis, RawReading, RejectReason,
};

/// What one payload may decode to, shared by every device's decoder so a reload changes it
/// for all of them at once.
#[derive(Debug)]
pub struct DecodeLimits {
    max_values: AtomicUsize,
    max_name_bytes: AtomicUsize,
}

impl DecodeLimits {
    pub fn new(validation: &ValidationConfig) -> Arc<Self> {
        Arc::new(Self {
            max_values: AtomicUsize::new(validation.max_values),
            max_name_bytes: AtomicUsize::new(validation.max_name_bytes),
        })
    }

    /// Takes a reloaded config's limits.
    pub fn update(&self, validation: &ValidationConfig) {
        self.max_values
            .store(validation.max_values, Ordering::Relaxed);
        self.max_name_bytes
            .store(validation.max_name_bytes, Ordering::Relaxed);
    }
}

/// The name bytes one payload may allocate: [`MAX_NAME_AMPLIFICATION`] times its size, and
/// sixteen names' worth besides, so that a small payload with a long path above a few
/// short keys (`{"site_north_building_3": {"floor_2": {"t1": 21.5, ...}}}`) is never
/// refused for it.
pub fn names_allowed(payload_len: usize, max_name_bytes: usize) -> usize {
    payload_len
        .saturating_mul(MAX_NAME_AMPLIFICATION)
        .saturating_add(max_name_bytes.saturating_mul(16))
}

/// The readings of one payload as a decoder finds them, kept within the limits: at most
/// `max_values` of them, names and units of at most `max_name_bytes` each, and names
/// allocated for this payload (each distinct one once) within [`names_allowed`]. A payload
/// past a limit is refused whole as soon as the decoder gets there, so what it costs stays
/// a small multiple of its size.
pub(crate) struct Output {
    readings: Vec<RawReading>,
    max_values: usize,
    max_name_bytes: usize,
    /// Name bytes this payload may still allocate.
    name_budget: usize,
    /// The names and units allocated so far, each once.
    names: FastSet<Arc<str>>,
}

impl Output {
    fn new(limits: &DecodeLimits, payload_len: usize) -> Self {
        let max_name_bytes = limits.max_name_bytes.load(Ordering::Relaxed);
        Self {
            readings: Vec::new(),
            max_values: limits.max_values.load(Ordering::Relaxed),
            max_name_bytes,
            name_budget: names_allowed(payload_len, max_name_bytes),
            names: FastSet::default(),
        }
    }

    /// Adds a reading.
    ///
    /// # Errors
    /// `too_many_values` past `max_values`.
    pub(crate) fn push(&mut self, reading: RawReading) -> Result<(), DecodeError> {
        if self.readings.len() >= self.max_values {
            return Err(DecodeError::limit(
                RejectReason::TooManyValues,
                format!(
                    "the payload holds more than {} values (validation.max_values)",
                    self.max_values
                ),
            ));
        }
        self.readings.push(reading);
        Ok(())
    }

    /// Adds readings a decoder gathered on its own (of configured fields, whose names are
    /// the config's): without copying them when they are the first.
    ///
    /// # Errors
    /// `too_many_values` past `max_values`.
    pub(crate) fn take(&mut self, readings: Vec<RawReading>) -> Result<(), DecodeError> {
        if self.readings.is_empty() && readings.len() <= self.max_values {
            self.readings = readings;
            return Ok(());
        }
        readings.into_iter().try_for_each(|r| self.push(r))
    }

    /// A name (`what`: "metric name", "unit") for this payload's readings: the one allocated
    /// before when it repeats.
    ///
    /// # Errors
    /// `name_too_long` past `max_name_bytes`, or when this payload's names would take more
    /// than [`MAX_NAME_AMPLIFICATION`] times its size.
    pub(crate) fn name(&mut self, name: &str, what: &str) -> Result<Arc<str>, DecodeError> {
        self.check_name_len(name.len(), what, name)?;
        if let Some(known) = self.names.get(name) {
            return Ok(known.clone());
        }
        self.charge(name.len())?;
        let name: Arc<str> = Arc::from(name);
        self.names.insert(name.clone());
        Ok(name)
    }

    /// As [`Output::name`] for a name made of two parts, checked before they are joined.
    pub(crate) fn joined_name(&mut self, head: &str, tail: &str) -> Result<Arc<str>, DecodeError> {
        if tail.is_empty() {
            return self.name(head, "metric name");
        }
        self.check_name_len(head.len() + tail.len(), "metric name", head)?;
        let mut joined = String::with_capacity(head.len() + tail.len());
        joined.push_str(head);
        joined.push_str(tail);
        self.name(&joined, "metric name")
    }

    fn check_name_len(&self, len: usize, what: &str, text: &str) -> Result<(), DecodeError> {
        if len > self.max_name_bytes {
            return Err(DecodeError::limit(
                RejectReason::NameTooLong,
                format!(
                    "{what} `{}` is {len} bytes, longer than {} (validation.max_name_bytes)",
                    truncate(text),
                    self.max_name_bytes
                ),
            ));
        }
        Ok(())
    }

    fn charge(&mut self, bytes: usize) -> Result<(), DecodeError> {
        match self.name_budget.checked_sub(bytes) {
            Some(left) => {
                self.name_budget = left;
                Ok(())
            }
            None => Err(DecodeError::limit(
                RejectReason::NameTooLong,
                format!(
                    "the payload's metric names would take more than {MAX_NAME_AMPLIFICATION} \
                     times its own size (and 16 names of validation.max_name_bytes)"
                ),
            )),
        }
    }

    fn len(&self) -> usize {
        self.readings.len()
    }

    /// Drops the readings in `dead` (ranges of indices at or after `from`), keeping the
    /// order of the others; empties `dead`.
    fn remove(&mut self, from: usize, dead: &mut Vec<std::ops::Range<usize>>) {
        if dead.is_empty() {
            return;
        }
        // Ranges nest or follow each other; sorted by start, one pass drops them all.
        dead.sort_unstable_by_key(|range| range.start);
        let mut ranges = dead.iter().peekable();
        let mut dead_until = 0;
        let mut kept = from;
        for index in from..self.readings.len() {
            while let Some(range) = ranges.next_if(|range| range.start <= index) {
                dead_until = dead_until.max(range.end);
            }
            if index >= dead_until {
                self.readings.swap(kept, index);
                kept += 1;
            }
        }
        self.readings.truncate(kept);
        dead.clear();
    }

    /// Stamps the readings from index `from` on with `time`.
    fn set_source_time(&mut self, from: usize, time: Option<Millis>) {
        for reading in &mut self.readings[from..] {
            reading.source_time = time;
        }
    }

    fn finish(self) -> Vec<RawReading> {
        self.readings
    }
}

/// How a payload or line is laid out, with what each layout needs to be read.
#[derive(Clone, Debug)]
pub enum Layout {
    Json,
    Senml,
    Value,
    KeyValue,
    Csv {
        delimiter: char,
        /// Each column's field name, shared by the readings it makes.
        columns: Vec<Arc<str>>,
    },
    /// The pattern, and its named captures (each a field name, shared by the readings).
    Regex(Regex, Vec<Arc<str>>),
}

/// A device's decoding rules, built once from its config.
#[derive(Clone, Debug)]
pub struct Decoder {
    pub layout: Layout,
    /// Where the source's timestamp is (JSON, key=value, CSV and regex).
    pub timestamp_field: Option<String>,
    /// The fields to read; empty reads every numeric field (JSON, text) or record (SenML).
    pub fields: Vec<Arc<str>>,
    /// For JSON: the configured fields and then the timestamp field, without repeats, when
    /// all of them are top-level keys; what the fast path looks for.
    flat_keys: Option<Vec<Arc<str>>>,
    limits: Arc<DecodeLimits>,
}

impl Decoder {
    /// The decoder for a device's format options and the payload fields of its metrics.
    ///
    /// # Errors
    /// When a `regex` pattern does not compile (loading the config checks this first).
    pub fn new(
        options: &FormatOptions<'_>,
        fields: Vec<String>,
        limits: Arc<DecodeLimits>,
    ) -> Result<Self, regex::Error> {
        let layout = match options.format {
            PayloadFormat::Json => Layout::Json,
            PayloadFormat::Senml => Layout::Senml,
            PayloadFormat::Value => Layout::Value,
            PayloadFormat::KeyValue => Layout::KeyValue,
            PayloadFormat::Csv => Layout::Csv {
                delimiter: options.delimiter.unwrap_or(','),
                columns: options
                    .columns
                    .iter()
                    .map(|c| Arc::from(c.as_str()))
                    .collect(),
            },
            PayloadFormat::Regex => {
                let pattern = Regex::new(options.pattern.unwrap_or_default())?;
                let names = pattern.capture_names().flatten().map(Arc::from).collect();
                Layout::Regex(pattern, names)
            }
        };
        let fields: Vec<Arc<str>> = fields.into_iter().map(Arc::from).collect();
        let timestamp_field = options.timestamp_field.map(str::to_string);
        let flat_keys = json::flat_keys(&fields, timestamp_field.as_deref());
        Ok(Self {
            layout,
            timestamp_field,
            fields,
            flat_keys,
            limits,
        })
    }

    /// Decodes one payload received at `now`.
    ///
    /// # Errors
    /// A [`DecodeError`] naming the offending field, record or byte when the payload does not
    /// fit the format.
    pub fn decode(&self, payload: &[u8], now: Millis) -> Decoded {
        let mut out = Output::new(&self.limits, payload.len());
        match &self.layout {
            Layout::Json => json::decode(self, payload, &mut out),
            Layout::Senml => senml::decode(self, payload, now, &mut out),
            Layout::Value => self.decode_value(payload, &mut out),
            Layout::KeyValue => text::key_value(self, payload, &mut out),
            Layout::Csv { delimiter, columns } => {
                text::csv(self, *delimiter, columns, payload, &mut out)
            }
            Layout::Regex(pattern, names) => text::regex(self, pattern, names, payload, &mut out),
        }?;
        Ok(out.finish())
    }

    fn decode_value(&self, payload: &[u8], out: &mut Output) -> Result<(), DecodeError> {
        let text = text::text(payload)?;
        let value: f64 = text
            .parse()
            .map_err(|_| DecodeError::malformed(format!("`{}` is not a number", truncate(text))))?;
        let field = self
            .fields
            .first()
            .cloned()
            .unwrap_or_else(|| Arc::from("value"));
        out.push(RawReading {
            field,
            value,
            unit: None,
            source_time: None,
        })
    }
}

/// Shortens untrusted text quoted in an error message.
fn truncate(text: &str) -> String {
    const MAX: usize = 40;
    match text.char_indices().nth(MAX) {
        Some((cut, _)) => format!("{}…", &text[..cut]),
        None => text.to_string(),
    }
}

/// Interprets an epoch number by its size: seconds, milliseconds, microseconds or nanoseconds.
fn epoch_to_millis(value: f64) -> Option<Millis> {
    if !value.is_finite() || value < 0.0 {
        return None;
    }
    let millis = if value < 1e11 {
        value * 1e3
    } else if value < 1e14 {
        value
    } else if value < 1e17 {
        value / 1e3
    } else {
        value / 1e6
    };
    Some(millis.round() as Millis)
}

#[cfg(test)]
mod golden {
    //! Golden cases: `src/decode/testcases/<case>/` holds `decoder.json` (format, timestamp
    //! field, fields), `input` (the payload) and `expected.json` (the readings, or
    //! `{"error": "<text the message contains>"}`).

    use std::path::Path;

    use serde::Deserialize;

    use super::*;

    const NOW: Millis = 1_700_000_000_000;

    #[derive(Deserialize)]
    struct Spec {
        format: PayloadFormat,
        #[serde(default)]
        timestamp_field: Option<String>,
        #[serde(default)]
        fields: Vec<String>,
        #[serde(default)]
        columns: Vec<String>,
        #[serde(default)]
        delimiter: Option<char>,
        #[serde(default)]
        pattern: Option<String>,
    }

    #[derive(Deserialize, Debug, PartialEq)]
    struct Expected {
        field: String,
        value: f64,
        #[serde(default)]
        unit: Option<String>,
        #[serde(default)]
        time: Option<Millis>,
    }

    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Outcome {
        Readings(Vec<Expected>),
        Error { error: String },
    }

    #[test]
    fn every_golden_case_decodes_as_expected() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("src/decode/testcases");
        let mut cases: Vec<_> = std::fs::read_dir(&root)
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        cases.sort();
        assert!(
            cases.len() >= 15,
            "golden cases missing in {}",
            root.display()
        );
        for case in cases {
            let name = case.file_name().unwrap().to_string_lossy().to_string();
            let spec: Spec =
                serde_json::from_slice(&std::fs::read(case.join("decoder.json")).unwrap())
                    .unwrap_or_else(|e| panic!("{name}: decoder.json: {e}"));
            let input = std::fs::read(case.join("input")).unwrap();
            let expected: Outcome =
                serde_json::from_slice(&std::fs::read(case.join("expected.json")).unwrap())
                    .unwrap_or_else(|e| panic!("{name}: expected.json: {e}"));
            let options = FormatOptions {
                format: spec.format,
                timestamp_field: spec.timestamp_field.as_deref(),
                columns: &spec.columns,
                delimiter: spec.delimiter,
                pattern: spec.pattern.as_deref(),
            };
            let limits = DecodeLimits::new(&ValidationConfig::default());
            let decoder = Decoder::new(&options, spec.fields.clone(), limits)
                .unwrap_or_else(|e| panic!("{name}: pattern: {e}"));
            let got = decoder.decode(&input, NOW);
            match (expected, got) {
                (Outcome::Readings(want), Ok(got)) => {
                    let got: Vec<Expected> = got
                        .into_iter()
                        .map(|r| Expected {
                            field: r.field.to_string(),
                            value: r.value,
                            unit: r.unit.map(|u| u.to_string()),
                            time: r.source_time,
                        })
                        .collect();
                    assert_eq!(got, want, "case {name}");
                }
                (Outcome::Error { error }, Err(got)) => {
                    assert!(
                        got.detail.contains(&error),
                        "case {name}: `{got}` lacks `{error}`"
                    );
                }
                (want, got) => panic!(
                    "case {name}: expected {}, got {got:?}",
                    match want {
                        Outcome::Readings(_) => "readings",
                        Outcome::Error { .. } => "an error",
                    }
                ),
            }
        }
    }

    fn decoder(format: PayloadFormat, fields: &[&str], columns: &[&str]) -> Decoder {
        let columns: Vec<String> = columns.iter().map(|c| c.to_string()).collect();
        let options = FormatOptions {
            format,
            timestamp_field: None,
            columns: &columns,
            delimiter: None,
            pattern: None,
        };
        let limits = DecodeLimits::new(&ValidationConfig::default());
        Decoder::new(
            &options,
            fields.iter().map(|f| f.to_string()).collect(),
            limits,
        )
        .unwrap()
    }

    /// A 900 kB base name and 12,000 records of `{"v":1}` once made 10 GB of names.
    #[test]
    fn a_senml_base_name_is_shared_not_copied_and_bounded() {
        let senml = decoder(PayloadFormat::Senml, &[], &[]);
        let mut pack = format!(r#"[{{"bn":"{}","v":1}}"#, "b".repeat(200));
        pack.push_str(&r#",{"v":1}"#.repeat(5000));
        pack.push(']');
        let readings = senml.decode(pack.as_bytes(), NOW).unwrap();
        assert_eq!(readings.len(), 5001);
        assert!(
            readings
                .iter()
                .all(|r| Arc::ptr_eq(&r.field, &readings[0].field))
        );

        let huge = format!(r#"[{{"bn":"{}","v":1}}]"#, "b".repeat(900_000));
        let err = senml.decode(huge.as_bytes(), NOW).unwrap_err();
        assert_eq!(err.reason, RejectReason::NameTooLong);

        let units = format!(r#"[{{"n":"t","bu":"{}","v":1}}]"#, "u".repeat(300));
        let err = senml.decode(units.as_bytes(), NOW).unwrap_err();
        assert_eq!(err.reason, RejectReason::NameTooLong);
        assert!(err.detail.starts_with("unit `uuu"), "{err}");

        let many = format!("[{}]", vec![r#"{"n":"t","v":1}"#; 10_001].join(","));
        let err = senml.decode(many.as_bytes(), NOW).unwrap_err();
        assert_eq!(err.reason, RejectReason::TooManyValues);
    }

    /// Nested objects join a long path to short keys; a real payload of that shape is
    /// stored, however its names compare to its size.
    #[test]
    fn a_small_payload_of_long_paths_is_not_refused() {
        let json = decoder(PayloadFormat::Json, &[], &[]);
        let leaves: Vec<String> = (0..40).map(|i| format!("\"t{i}\":1")).collect();
        let payload = format!(
            "{{\"site_north_building_3\":{{\"floor_2_room_214\":{{{}}}}}}}",
            leaves.join(",")
        );
        let readings = json.decode(payload.as_bytes(), NOW).unwrap();
        assert_eq!(readings.len(), 40);
        let names: usize = readings.iter().map(|r| r.field.len()).sum();
        assert!(
            names > 4 * payload.len(),
            "{names} bytes of names, {} of payload",
            payload.len()
        );
    }

    #[test]
    fn a_line_of_more_pairs_than_max_values_is_refused_whole() {
        let kv = decoder(PayloadFormat::KeyValue, &[], &[]);
        let line: Vec<String> = (0..10_001).map(|i| format!("k{i}=1")).collect();
        let err = kv.decode(line.join(" ").as_bytes(), NOW).unwrap_err();
        assert_eq!(err.reason, RejectReason::TooManyValues);
        let line = format!("{}=1", "k".repeat(257));
        assert_eq!(
            kv.decode(line.as_bytes(), NOW).unwrap_err().reason,
            RejectReason::NameTooLong
        );
    }

    /// Column names come from the config: however long, they cost a short line nothing.
    #[test]
    fn configured_column_names_do_not_count_against_a_short_line() {
        let csv = decoder(
            PayloadFormat::Csv,
            &[],
            &[
                "temperature_in_degrees_celsius",
                "relative_humidity_percent",
            ],
        );
        let readings = csv.decode(b"1,2", NOW).unwrap();
        assert_eq!(&*readings[1].field, "relative_humidity_percent");
    }

    #[test]
    fn epoch_numbers_are_read_by_magnitude() {
        assert_eq!(epoch_to_millis(1_700_000_000.0), Some(NOW));
        assert_eq!(epoch_to_millis(1_700_000_000.5), Some(NOW + 500));
        assert_eq!(epoch_to_millis(1.7e12), Some(NOW));
        assert_eq!(epoch_to_millis(1.7e15), Some(NOW));
        assert_eq!(epoch_to_millis(1.7e18), Some(NOW));
        assert_eq!(epoch_to_millis(-1.0), None);
        assert_eq!(epoch_to_millis(f64::NAN), None);
    }

    #[test]
    fn arbitrary_bytes_never_panic_any_decoder() {
        const ALPHABET: &[u8] = b"{}[]\":,;= 0123456789.eE-+ntrufalsbvt\xff";
        let mut seed: u64 = 0x9e37_79b9_7f4a_7c15;
        let columns = ["ts".to_string(), "a".into(), "b".into()];
        for format in [
            PayloadFormat::Json,
            PayloadFormat::Senml,
            PayloadFormat::Value,
            PayloadFormat::KeyValue,
            PayloadFormat::Csv,
            PayloadFormat::Regex,
        ] {
            let options = FormatOptions {
                format,
                timestamp_field: Some("ts"),
                columns: &columns,
                delimiter: None,
                pattern: Some(r"(?P<a>[-0-9.]+)\s*(?P<ts>\d+)?"),
            };
            let limits = DecodeLimits::new(&ValidationConfig::default());
            let decoder = Decoder::new(&options, vec![], limits).unwrap();
            for len in 0..400 {
                let bytes: Vec<u8> = (0..len % 64)
                    .map(|_| {
                        seed ^= seed << 13;
                        seed ^= seed >> 7;
                        seed ^= seed << 17;
                        ALPHABET[(seed % ALPHABET.len() as u64) as usize]
                    })
                    .collect();
                let _ = decoder.decode(&bytes, NOW);
            }
        }
    }
}
