//! Text layouts a serial sensor (or a plain-text MQTT payload) writes on one line:
//! `key=value` pairs, CSV with a column-to-field mapping, and a regular expression with named
//! captures for devices that fit neither.

use std::sync::Arc;

use regex::Regex;

use super::{Decoder, Output, epoch_to_millis, truncate};
use crate::reading::{DecodeError, FastSet, Millis, RawReading};

/// The payload as trimmed UTF-8 text.
pub(super) fn text(payload: &[u8]) -> Result<&str, DecodeError> {
    let text = std::str::from_utf8(payload)
        .map_err(|err| DecodeError::malformed(format!("not UTF-8 text: {err}")))?;
    Ok(text.trim_matches(|c: char| c.is_whitespace() || c == '\0'))
}

/// `ts=1700000000000 temp=21.5 hum=40.2`: pairs separated by spaces, `,` or `;`; key and value
/// by the first `=` (or `:` when there is no `=`).
pub(super) fn key_value(
    decoder: &Decoder,
    payload: &[u8],
    out: &mut Output,
) -> Result<(), DecodeError> {
    let line = text(payload)?;
    let pairs = line
        .split(|c: char| c.is_whitespace() || c == ',' || c == ';')
        .filter(|t| !t.is_empty())
        .map(|token| {
            // A pair needs a key: `=5` would be a metric without a name.
            let split = token.find('=').or_else(|| token.find(':'));
            match split.filter(|&at| at > 0) {
                Some(at) => Ok((Name::Payload(&token[..at]), &token[at + 1..])),
                None => Err(DecodeError::malformed(format!(
                    "`{}` is not a key=value pair",
                    truncate(token)
                ))),
            }
        });
    from_pairs(decoder, pairs, out)
}

/// `1700000000000,21.5,40.2` with `columns = ["ts", "temp", "hum"]`; a column named `_` (or
/// left empty) is skipped.
pub(super) fn csv(
    decoder: &Decoder,
    delimiter: char,
    columns: &[Arc<str>],
    payload: &[u8],
    out: &mut Output,
) -> Result<(), DecodeError> {
    let line = text(payload)?;
    // Counted before anything is kept: a line of a million delimiters costs nothing more.
    let cells = line.split(delimiter).count();
    if cells != columns.len() {
        return Err(DecodeError::malformed(format!(
            "line has {cells} fields, expected {} ({})",
            columns.len(),
            columns.join(", ")
        )));
    }
    let pairs = columns
        .iter()
        .zip(
            line.split(delimiter)
                .map(|cell| cell.trim().trim_matches('"')),
        )
        .filter(|(column, _)| !column.is_empty() && &***column != "_")
        .map(|(column, cell)| Ok((Name::Config(column), cell)));
    from_pairs(decoder, pairs, out)
}

/// A line matched against `pattern`; each named capture is a field.
pub(super) fn regex(
    decoder: &Decoder,
    pattern: &Regex,
    names: &[Arc<str>],
    payload: &[u8],
    out: &mut Output,
) -> Result<(), DecodeError> {
    let line = text(payload)?;
    let captures = pattern.captures(line).ok_or_else(|| {
        DecodeError::malformed(format!(
            "`{}` does not match the pattern `{}`",
            truncate(line),
            truncate(pattern.as_str())
        ))
    })?;
    let pairs = names.iter().filter_map(|name| {
        captures
            .name(name)
            .map(|matched| Ok((Name::Config(name), matched.as_str())))
    });
    from_pairs(decoder, pairs, out)
}

/// A field's name: from the config (a CSV column, a named capture), shared; or from the
/// payload (a key), allocated within the payload's limits.
enum Name<'a> {
    Config(&'a Arc<str>),
    Payload(&'a str),
}

/// Readings from `(field, text)` pairs: the timestamp field gives the source time, the
/// configured fields (or every numeric one when none is configured) the values. A pair
/// that is no pair ends the line with its error.
///
/// A line is one whole sample, so it is refused rather than half stored when it cannot be
/// one: a key twice (two lines run together after a device reset), or, with fields
/// configured, a key the config does not know or a configured field missing.
fn from_pairs<'a>(
    decoder: &Decoder,
    pairs: impl IntoIterator<Item = Result<(Name<'a>, &'a str), DecodeError>>,
    out: &mut Output,
) -> Result<(), DecodeError> {
    let mut source_time = None;
    // Which configured fields the line held, and the other keys it held.
    let mut present = vec![false; decoder.fields.len()];
    let mut seen: FastSet<&'a str> = FastSet::default();
    let mut timestamp_seen = false;
    for pair in pairs {
        let (name, text) = pair?;
        let field = match &name {
            Name::Config(name) => &***name,
            Name::Payload(name) => name,
        };
        let twice = || DecodeError::malformed(format!("key `{}` appears twice", truncate(field)));
        if decoder.timestamp_field.as_deref() == Some(field) {
            if std::mem::replace(&mut timestamp_seen, true) {
                return Err(twice());
            }
            source_time = decoder.source_time(timestamp(decoder, field, text))?;
            continue;
        }
        let configured = decoder.fields.iter().position(|f| **f == *field);
        match configured {
            Some(i) if std::mem::replace(&mut present[i], true) => return Err(twice()),
            Some(_) => {}
            None if !decoder.fields.is_empty() && !decoder.reads_unmapped() => match name {
                // A configured column or capture the metrics do not use.
                Name::Config(_) => continue,
                Name::Payload(key) => {
                    return Err(DecodeError::malformed(format!(
                        "key `{}` is not one of the configured fields ({})",
                        truncate(key),
                        decoder.fields.join(", ")
                    )));
                }
            },
            None => {
                if let Name::Payload(key) = name
                    && !seen.insert(key)
                {
                    return Err(twice());
                }
            }
        }
        match text.trim().parse::<f64>() {
            Ok(value) => {
                let field = match (configured, &name) {
                    (Some(i), _) => decoder.fields[i].clone(),
                    (None, Name::Config(name)) => Arc::clone(name),
                    (None, Name::Payload(name)) => out.name(name, "metric name")?,
                };
                out.push(RawReading {
                    field,
                    value,
                    unit: None,
                    source_time: None,
                })?;
            }
            Err(_) if configured.is_some() => {
                return Err(DecodeError::malformed(format!(
                    "field `{field}` is `{}`, expected a number",
                    truncate(text)
                )));
            }
            Err(_) => {}
        }
    }
    let missing: Vec<&str> = decoder
        .fields
        .iter()
        .zip(&present)
        .filter(|(_, present)| !**present)
        .map(|(field, _)| &**field)
        .collect();
    if !missing.is_empty() {
        let (noun, verb) = if missing.len() == 1 {
            ("field", "is")
        } else {
            ("fields", "are")
        };
        let names: Vec<String> = missing.iter().map(|f| format!("`{f}`")).collect();
        return Err(DecodeError::malformed(format!(
            "configured {noun} {} {verb} missing from the line",
            names.join(", ")
        )));
    }
    if out.len() == 0 {
        return Err(DecodeError::malformed("the line has no numeric field"));
    }
    out.set_source_time(0, source_time);
    Ok(())
}

fn timestamp(decoder: &Decoder, field: &str, text: &str) -> Result<Millis, DecodeError> {
    let text = text.trim();
    text.parse::<f64>()
        .ok()
        .and_then(epoch_to_millis)
        .or_else(|| decoder.text_time(text))
        .ok_or_else(|| decoder.bad_timestamp(field, &format!("`{}`", truncate(text)), Some(text)))
}
