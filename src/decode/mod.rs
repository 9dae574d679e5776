//! Pure payload decoders: bytes in, [`RawReading`]s or a [`DecodeError`] out. No I/O, no
//! clock: the receive time is passed in for formats with relative times.

mod flat_json;
mod json;
mod output;
pub mod registers;
mod senml;
mod text;
mod time;

pub use json::path::check as check_path;
pub use output::names_allowed;
pub use time::{format_rfc3339, parse_rfc3339, time_zone, write_rfc3339};

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use regex::Regex;

use crate::config::{
    FormatOptions, PayloadFormat, TimestampFallback, UnknownMetrics, ValidationConfig,
};
use crate::reading::{DecodeError, Decoded, Millis, RawReading};
use output::Output;
use time::TimeText;

/// What one payload may decode to, shared by every device's decoder so a reload changes it
/// for all of them at once.
#[derive(Debug)]
pub struct DecodeLimits {
    pub(super) max_values: AtomicUsize,
    pub(super) max_name_bytes: AtomicUsize,
    /// `unknown_metrics` is not `ignore`: fields a device's metrics do not map are read too.
    read_unmapped: AtomicBool,
}

impl DecodeLimits {
    pub fn new(validation: &ValidationConfig) -> Arc<Self> {
        Arc::new(Self {
            max_values: AtomicUsize::new(validation.max_values),
            max_name_bytes: AtomicUsize::new(validation.max_name_bytes),
            read_unmapped: AtomicBool::new(validation.unknown_metrics != UnknownMetrics::Ignore),
        })
    }

    /// Takes a reloaded config's limits.
    pub fn update(&self, validation: &ValidationConfig) {
        self.max_values
            .store(validation.max_values, Ordering::Relaxed);
        self.max_name_bytes
            .store(validation.max_name_bytes, Ordering::Relaxed);
        self.read_unmapped.store(
            validation.unknown_metrics != UnknownMetrics::Ignore,
            Ordering::Relaxed,
        );
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
    /// How a timestamp written as text is read.
    times: TimeText,
    /// A timestamp that cannot be read leaves its readings to the receive time.
    receive_time_fallback: bool,
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
    /// When a `regex` pattern does not compile or the time zone is unknown (loading the
    /// config checks both first).
    pub fn new(
        options: &FormatOptions<'_>,
        fields: Vec<String>,
        limits: Arc<DecodeLimits>,
    ) -> Result<Self, String> {
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
                let pattern = Regex::new(options.pattern.unwrap_or_default())
                    .map_err(|err| format!("pattern does not compile: {err}"))?;
                let names = pattern.capture_names().flatten().map(Arc::from).collect();
                Layout::Regex(pattern, names)
            }
        };
        let fields: Vec<Arc<str>> = fields.into_iter().map(Arc::from).collect();
        let timestamp_field = options.timestamp_field.map(str::to_string);
        let flat_keys = json::flat_keys(&fields, timestamp_field.as_deref());
        let zone = options.timezone.map(time_zone).transpose()?;
        Ok(Self {
            layout,
            timestamp_field,
            times: TimeText { zone },
            receive_time_fallback: options.timestamp_fallback == TimestampFallback::ReceiveTime,
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

    /// Fields are configured, and those they do not map are read too (`unknown_metrics` is
    /// `store` or `reject`), for the validator to store or refuse.
    fn reads_unmapped(&self) -> bool {
        !self.fields.is_empty() && self.limits.read_unmapped.load(Ordering::Relaxed)
    }

    /// A source time written as text: RFC 3339, or a local time read in the device's zone.
    fn text_time(&self, text: &str) -> Option<Millis> {
        self.times.parse(text)
    }

    /// The error for a timestamp field whose value `shown` (quoted text, or what it is) is
    /// no time; `text` is the string it held, if it was one.
    fn bad_timestamp(&self, field: &str, shown: &str, text: Option<&str>) -> DecodeError {
        DecodeError::malformed(format!(
            "timestamp field `{field}` is {shown}, expected epoch seconds or milliseconds or RFC 3339{}",
            text.map_or("", |text| self.times.hint(text))
        ))
    }

    /// The source time a timestamp field gave: its time, or with `timestamp_fallback =
    /// "receive_time"` none when it could not be read.
    fn source_time(
        &self,
        read: Result<Millis, DecodeError>,
    ) -> Result<Option<Millis>, DecodeError> {
        match read {
            Ok(at) => Ok(Some(at)),
            Err(_) if self.receive_time_fallback => Ok(None),
            Err(err) => Err(err),
        }
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

/// A decoder as a device's config makes it, with the default limits.
#[cfg(test)]
pub(crate) fn test_decoder(
    format: PayloadFormat,
    timestamp_field: Option<&str>,
    fields: &[&str],
    columns: &[&str],
) -> Decoder {
    let columns: Vec<String> = columns.iter().map(|c| c.to_string()).collect();
    let options = FormatOptions {
        format,
        timestamp_field,
        timezone: None,
        timestamp_fallback: TimestampFallback::Reject,
        columns: &columns,
        delimiter: None,
        pattern: None,
    };
    let limits = DecodeLimits::new(&ValidationConfig::default());
    let fields = fields.iter().map(|f| f.to_string()).collect();
    Decoder::new(&options, fields, limits).expect("a test's pattern compiles")
}

#[cfg(test)]
mod golden {
    //! Golden cases: `src/decode/testcases/<case>/` holds `decoder.json` (format, timestamp
    //! field, fields), `input` (the payload) and `expected.json` (the readings, or
    //! `{"error": "<text the message contains>"}`).

    use std::path::Path;

    use serde::Deserialize;

    use super::*;
    use crate::reading::RejectReason;

    const NOW: Millis = 1_700_000_000_000;

    #[derive(Deserialize)]
    struct Spec {
        format: PayloadFormat,
        #[serde(default)]
        timestamp_field: Option<String>,
        #[serde(default)]
        timezone: Option<String>,
        #[serde(default)]
        timestamp_fallback: TimestampFallback,
        #[serde(default)]
        unknown_metrics: Option<UnknownMetrics>,
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
        Error {
            error: String,
        },
        /// Readings, and values counted as not readings (each detail containing its text).
        Mixed {
            readings: Vec<Expected>,
            skipped: Vec<String>,
        },
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
                timezone: spec.timezone.as_deref(),
                timestamp_fallback: spec.timestamp_fallback,
                columns: &spec.columns,
                delimiter: spec.delimiter,
                pattern: spec.pattern.as_deref(),
            };
            let limits = DecodeLimits::new(&ValidationConfig {
                unknown_metrics: spec.unknown_metrics.unwrap_or_default(),
                ..ValidationConfig::default()
            });
            let decoder = Decoder::new(&options, spec.fields.clone(), limits)
                .unwrap_or_else(|e| panic!("{name}: pattern: {e}"));
            let got = decoder.decode(&input, NOW);
            let (expected, want_skipped) = match expected {
                Outcome::Mixed { readings, skipped } => (Outcome::Readings(readings), skipped),
                other => (other, Vec::new()),
            };
            if let Ok(got) = &got {
                assert_eq!(
                    got.skipped.count as usize,
                    want_skipped.len(),
                    "case {name}: skipped {:?}",
                    got.skipped
                );
                for (got, want) in got.skipped.listed.iter().zip(&want_skipped) {
                    assert!(got.contains(want), "case {name}: `{got}` lacks `{want}`");
                }
            }
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
                        Outcome::Readings(_) | Outcome::Mixed { .. } => "readings",
                        Outcome::Error { .. } => "an error",
                    }
                ),
            }
        }
    }

    fn decoder(format: PayloadFormat, fields: &[&str], columns: &[&str]) -> Decoder {
        test_decoder(format, None, fields, columns)
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
                timezone: Some("Europe/Berlin"),
                timestamp_fallback: TimestampFallback::Reject,
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
