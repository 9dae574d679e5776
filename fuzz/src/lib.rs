//! Helpers shared by the fuzz targets in `fuzz_targets/`: building decoders the way a
//! device's config does, and the properties every decoder's output must have.
//!
//! Each target asserts properties, not only "does not crash"; a failed assertion is a crash
//! to libFuzzer, which saves the input under `artifacts/<target>/`.

use std::collections::HashSet;
use std::sync::Arc;

use sensorgate::config::{FormatOptions, PayloadFormat, TimestampFallback, ValidationConfig};
use sensorgate::decode::{DecodeLimits, Decoder, Layout};
use sensorgate::reading::{Decoded, Millis, RejectReason, Skipped};

/// The receive time the targets pass to decoders.
pub const NOW: Millis = 1_700_000_000_000;

/// Relative SenML times are at most 2^28 s away from the receive time (RFC 8428 §4.5.3).
pub const SENML_RELATIVE_MS: Millis = 268_435_456_000;

/// The limits the targets decode under: small, so that inputs reach them.
pub const MAX_VALUES: usize = 64;
pub const MAX_NAME_BYTES: usize = 32;

/// A decoder for `format` with the options a device's config would give it, and the
/// limits [`MAX_VALUES`] and [`MAX_NAME_BYTES`].
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
        // Local times in the payloads are read in a zone with daylight saving.
        timezone: timestamp_field.map(|_| "Europe/Berlin"),
        timestamp_fallback: TimestampFallback::Reject,
        columns: &columns,
        delimiter,
        pattern,
    };
    let limits = DecodeLimits::new(&ValidationConfig {
        max_values: MAX_VALUES,
        max_name_bytes: MAX_NAME_BYTES,
        ..ValidationConfig::default()
    });
    Decoder::new(
        &options,
        fields.iter().map(|f| f.to_string()).collect(),
        limits,
    )
    .expect("the targets pass patterns that compile")
}

/// What every decoder promises: readings or an error that says something; never an empty
/// list of readings; only configured fields when fields are configured; the timestamp field
/// is never a reading; no source time when no timestamp field is configured (SenML carries
/// its own and is checked by its target); and an output bounded by the input: at most
/// [`MAX_VALUES`] readings, names and units of at most [`MAX_NAME_BYTES`], and the
/// readings' values and times (16 bytes each) with the names and units the payload made
/// taking at most 8 times its bytes, plus sixteen names' worth and 64.
pub fn check_decoded(decoder: &Decoder, payload: &[u8], decoded: &Decoded) {
    let readings = match decoded {
        Ok(readings) => readings,
        Err(err) => {
            assert!(!err.detail.is_empty(), "an error without a message");
            assert!(
                matches!(
                    err.reason,
                    RejectReason::Malformed
                        | RejectReason::TooManyValues
                        | RejectReason::NameTooLong
                ),
                "a decoder refused with {:?}",
                err.reason
            );
            return;
        }
    };
    let skipped = &readings.skipped;
    assert!(
        !readings.is_empty() || skipped.count > 0,
        "Ok with no readings and nothing skipped"
    );
    assert!(
        readings.len() + skipped.count as usize <= MAX_VALUES,
        "{} readings and {} values skipped",
        readings.len(),
        skipped.count
    );
    assert!(skipped.listed.len() <= Skipped::LISTED, "{skipped:?}");
    assert!(
        matches!(decoder.layout, Layout::Senml) || skipped.count == 0,
        "only SenML skips values: {skipped:?}"
    );
    // Names the payload made, each allocation once; configured names are the config's.
    let mut made: HashSet<*const u8> = HashSet::new();
    let mut made_bytes = 0;
    for name in readings
        .iter()
        .flat_map(|r| std::iter::once(&r.field).chain(r.unit.as_ref()))
    {
        assert!(name.len() <= MAX_NAME_BYTES, "name `{name}` is too long");
        let configured = configured_names(decoder).any(|f| Arc::ptr_eq(f, name));
        if !configured && made.insert(name.as_ptr()) {
            made_bytes += name.len();
        }
    }
    let cost = 16 * readings.len() + made_bytes;
    assert!(
        cost <= 8 * payload.len() + 16 * MAX_NAME_BYTES + 64,
        "{} bytes of input made {} readings and {made_bytes} bytes of names",
        payload.len(),
        readings.len()
    );
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
    let senml = matches!(decoder.layout, Layout::Senml);
    if decoder.timestamp_field.is_none() && !senml {
        assert!(
            readings.iter().all(|r| r.source_time.is_none()),
            "a source time without a timestamp field: {readings:?}"
        );
    }
}

/// The names a decoder has from its config: fields, CSV columns, a pattern's captures.
fn configured_names(decoder: &Decoder) -> impl Iterator<Item = &Arc<str>> {
    let layout: &[Arc<str>] = match &decoder.layout {
        Layout::Csv { columns, .. } => columns,
        Layout::Regex(_, names) => names,
        _ => &[],
    };
    decoder.fields.iter().chain(layout)
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
