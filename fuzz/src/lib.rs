//! Helpers shared by the fuzz targets in `fuzz_targets/`: building decoders the way a
//! device's config does, and the properties every decoder's output must have.
//!
//! Each target asserts properties, not only "does not crash"; a failed assertion is a crash
//! to libFuzzer, which saves the input under `artifacts/<target>/`.

use sensorgate::config::{FormatOptions, PayloadFormat};
use sensorgate::decode::Decoder;
use sensorgate::reading::{Decoded, Millis};

/// The receive time the targets pass to decoders.
pub const NOW: Millis = 1_700_000_000_000;

/// Relative SenML times are at most 2^28 s away from the receive time (RFC 8428 §4.5.3).
pub const SENML_RELATIVE_MS: Millis = 268_435_456_000;

/// A decoder for `format` with the options a device's config would give it.
///
/// # Panics
/// When `pattern` does not compile; callers pass patterns that do.
pub fn decoder(
    format: PayloadFormat,
    timestamp_field: Option<&str>,
    fields: &[&str],
    columns: &[&str],
    delimiter: Option<char>,
    pattern: Option<&str>,
) -> Decoder {
    let columns: Vec<String> = columns.iter().map(|c| c.to_string()).collect();
    let options = FormatOptions {
        format,
        timestamp_field,
        columns: &columns,
        delimiter,
        pattern,
    };
    Decoder::new(&options, fields.iter().map(|f| f.to_string()).collect())
        .expect("the targets pass patterns that compile")
}

/// What every decoder promises: readings or an error that says something; never an empty
/// list of readings; only configured fields when fields are configured; the timestamp field
/// is never a reading; no source time when no timestamp field is configured (SenML carries
/// its own and is checked by its target).
pub fn check_decoded(decoder: &Decoder, decoded: &Decoded) {
    let readings = match decoded {
        Ok(readings) => readings,
        Err(err) => {
            assert!(!err.0.is_empty(), "an error without a message");
            return;
        }
    };
    assert!(!readings.is_empty(), "Ok with no readings");
    for reading in readings {
        assert!(!reading.field.is_empty(), "a reading without a field name");
        if !decoder.fields.is_empty() {
            assert!(
                decoder.fields.contains(&reading.field),
                "field `{}` is not configured ({:?})",
                reading.field,
                decoder.fields
            );
        }
        if let Some(ts) = &decoder.timestamp_field {
            assert_ne!(
                &*reading.field,
                ts.as_str(),
                "the timestamp field became a reading"
            );
        }
    }
    let senml = matches!(decoder.layout, sensorgate::decode::Layout::Senml);
    if decoder.timestamp_field.is_none() && !senml {
        assert!(
            readings.iter().all(|r| r.source_time.is_none()),
            "a source time without a timestamp field: {readings:?}"
        );
    }
}

/// Text layouts stamp every reading of a line with the line's one timestamp.
pub fn check_one_time_per_line(decoded: &Decoded) {
    if let Ok(readings) = decoded {
        let first = readings[0].source_time;
        assert!(
            readings.iter().all(|r| r.source_time == first),
            "one line, several times: {readings:?}"
        );
    }
}
