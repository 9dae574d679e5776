//! Text layouts a serial sensor (or a plain-text MQTT payload) writes on one line:
//! `key=value` pairs, CSV with a column-to-field mapping, and a regular expression with named
//! captures for devices that fit neither.

use std::sync::Arc;

use regex::Regex;

use super::{Decoder, epoch_to_millis, parse_rfc3339, truncate};
use crate::reading::{DecodeError, Decoded, Millis, RawReading};

/// The payload as trimmed UTF-8 text.
pub(super) fn text(payload: &[u8]) -> Result<&str, DecodeError> {
    let text = std::str::from_utf8(payload)
        .map_err(|err| DecodeError(format!("not UTF-8 text: {err}")))?;
    Ok(text.trim_matches(|c: char| c.is_whitespace() || c == '\0'))
}

/// `ts=1700000000000 temp=21.5 hum=40.2`: pairs separated by spaces, `,` or `;`; key and value
/// by the first `=` (or `:` when there is no `=`).
pub(super) fn key_value(decoder: &Decoder, payload: &[u8]) -> Decoded {
    let line = text(payload)?;
    let mut pairs = Vec::new();
    for token in line
        .split(|c: char| c.is_whitespace() || c == ',' || c == ';')
        .filter(|t| !t.is_empty())
    {
        // A pair needs a key: `=5` would be a metric without a name.
        let split = token.find('=').or_else(|| token.find(':'));
        let Some(at) = split.filter(|&at| at > 0) else {
            return Err(DecodeError(format!(
                "`{}` is not a key=value pair",
                truncate(token)
            )));
        };
        pairs.push((&token[..at], &token[at + 1..]));
    }
    from_pairs(decoder, pairs)
}

/// `1700000000000,21.5,40.2` with `columns = ["ts", "temp", "hum"]`; a column named `_` (or
/// left empty) is skipped.
pub(super) fn csv(
    decoder: &Decoder,
    delimiter: char,
    columns: &[String],
    payload: &[u8],
) -> Decoded {
    let line = text(payload)?;
    let cells: Vec<&str> = line
        .split(delimiter)
        .map(|cell| cell.trim().trim_matches('"'))
        .collect();
    if cells.len() != columns.len() {
        return Err(DecodeError(format!(
            "line has {} fields, expected {} ({})",
            cells.len(),
            columns.len(),
            columns.join(", ")
        )));
    }
    let pairs = columns
        .iter()
        .zip(cells)
        .filter(|(column, _)| !column.is_empty() && column.as_str() != "_")
        .map(|(column, cell)| (column.as_str(), cell));
    from_pairs(decoder, pairs)
}

/// A line matched against `pattern`; each named capture is a field.
pub(super) fn regex(decoder: &Decoder, pattern: &Regex, payload: &[u8]) -> Decoded {
    let line = text(payload)?;
    let captures = pattern.captures(line).ok_or_else(|| {
        DecodeError(format!(
            "`{}` does not match the pattern `{}`",
            truncate(line),
            truncate(pattern.as_str())
        ))
    })?;
    let pairs = pattern
        .capture_names()
        .flatten()
        .filter_map(|name| captures.name(name).map(|matched| (name, matched.as_str())));
    from_pairs(decoder, pairs)
}

/// Readings from `(field, text)` pairs: the timestamp field gives the source time, the
/// configured fields (or every numeric one when none is configured) the values.
fn from_pairs<'a>(
    decoder: &Decoder,
    pairs: impl IntoIterator<Item = (&'a str, &'a str)>,
) -> Decoded {
    let mut source_time = None;
    let mut readings = Vec::new();
    for (field, text) in pairs {
        if decoder.timestamp_field.as_deref() == Some(field) {
            source_time = Some(timestamp(field, text)?);
            continue;
        }
        let configured = decoder.fields.iter().any(|f| **f == *field);
        if !decoder.fields.is_empty() && !configured {
            continue;
        }
        match text.trim().parse::<f64>() {
            Ok(value) => readings.push(RawReading {
                field: Arc::from(field),
                value,
                unit: None,
                source_time: None,
            }),
            Err(_) if configured => {
                return Err(DecodeError(format!(
                    "field `{field}` is `{}`, expected a number",
                    truncate(text)
                )));
            }
            Err(_) => {}
        }
    }
    if readings.is_empty() {
        return Err(DecodeError(if decoder.fields.is_empty() {
            "the line has no numeric field".into()
        } else {
            format!(
                "none of the configured fields ({}) is present",
                decoder.fields.join(", ")
            )
        }));
    }
    for reading in &mut readings {
        reading.source_time = source_time;
    }
    Ok(readings)
}

fn timestamp(field: &str, text: &str) -> Result<Millis, DecodeError> {
    let text = text.trim();
    text.parse::<f64>()
        .ok()
        .and_then(epoch_to_millis)
        .or_else(|| parse_rfc3339(text))
        .ok_or_else(|| {
            DecodeError(format!(
                "timestamp field `{field}` is `{}`, expected epoch seconds or milliseconds or RFC 3339",
                truncate(text)
            ))
        })
}
