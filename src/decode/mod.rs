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

use regex::Regex;

use crate::config::{FormatOptions, PayloadFormat};
use crate::reading::{DecodeError, Decoded, Millis, RawReading};

/// How a payload or line is laid out, with what each layout needs to be read.
#[derive(Clone, Debug)]
pub enum Layout {
    Json,
    Senml,
    Value,
    KeyValue,
    Csv {
        delimiter: char,
        columns: Vec<String>,
    },
    Regex(Regex),
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
}

impl Decoder {
    /// The decoder for a device's format options and the payload fields of its metrics.
    ///
    /// # Errors
    /// When a `regex` pattern does not compile (loading the config checks this first).
    pub fn new(options: &FormatOptions<'_>, fields: Vec<String>) -> Result<Self, regex::Error> {
        let layout = match options.format {
            PayloadFormat::Json => Layout::Json,
            PayloadFormat::Senml => Layout::Senml,
            PayloadFormat::Value => Layout::Value,
            PayloadFormat::KeyValue => Layout::KeyValue,
            PayloadFormat::Csv => Layout::Csv {
                delimiter: options.delimiter.unwrap_or(','),
                columns: options.columns.to_vec(),
            },
            PayloadFormat::Regex => Layout::Regex(Regex::new(options.pattern.unwrap_or_default())?),
        };
        let fields: Vec<Arc<str>> = fields.into_iter().map(Arc::from).collect();
        let timestamp_field = options.timestamp_field.map(str::to_string);
        let flat_keys = json::flat_keys(&fields, timestamp_field.as_deref());
        Ok(Self {
            layout,
            timestamp_field,
            fields,
            flat_keys,
        })
    }

    /// Decodes one payload received at `now`.
    ///
    /// # Errors
    /// A [`DecodeError`] naming the offending field, record or byte when the payload does not
    /// fit the format.
    pub fn decode(&self, payload: &[u8], now: Millis) -> Decoded {
        match &self.layout {
            Layout::Json => json::decode(self, payload),
            Layout::Senml => senml::decode(self, payload, now),
            Layout::Value => self.decode_value(payload),
            Layout::KeyValue => text::key_value(self, payload),
            Layout::Csv { delimiter, columns } => text::csv(self, *delimiter, columns, payload),
            Layout::Regex(pattern) => text::regex(self, pattern, payload),
        }
    }

    fn decode_value(&self, payload: &[u8]) -> Decoded {
        let text = text::text(payload)?;
        let value: f64 = text
            .parse()
            .map_err(|_| DecodeError(format!("`{}` is not a number", truncate(text))))?;
        let field = self
            .fields
            .first()
            .cloned()
            .unwrap_or_else(|| Arc::from("value"));
        Ok(vec![RawReading {
            field,
            value,
            unit: None,
            source_time: None,
        }])
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
            let decoder = Decoder::new(&options, spec.fields.clone())
                .unwrap_or_else(|e| panic!("{name}: pattern: {e}"));
            let got = decoder.decode(&input, NOW);
            match (expected, got) {
                (Outcome::Readings(want), Ok(got)) => {
                    let got: Vec<Expected> = got
                        .into_iter()
                        .map(|r| Expected {
                            field: r.field.to_string(),
                            value: r.value,
                            unit: r.unit,
                            time: r.source_time,
                        })
                        .collect();
                    assert_eq!(got, want, "case {name}");
                }
                (Outcome::Error { error }, Err(got)) => {
                    assert!(
                        got.0.contains(&error),
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
            let decoder = Decoder::new(&options, vec![]).unwrap();
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
