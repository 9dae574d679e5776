//! JSON objects (or arrays of objects): metrics are fields or dotted paths.

use std::sync::Arc;

use serde_json::Value;

use super::flat_json::{self, Scalar};
use super::{Decoder, epoch_to_millis, parse_rfc3339, truncate};
use crate::reading::{DecodeError, Decoded, Millis, RawReading};

pub(super) fn decode(decoder: &Decoder, payload: &[u8]) -> Decoded {
    decode_flat(decoder, payload).unwrap_or_else(|| decode_document(decoder, payload))
}

/// Any payload: parsed whole, then searched.
fn decode_document(decoder: &Decoder, payload: &[u8]) -> Decoded {
    let value: Value = serde_json::from_slice(payload)
        .map_err(|err| DecodeError(format!("invalid JSON: {err}")))?;
    match value {
        Value::Object(_) => decode_object(decoder, &value),
        Value::Array(items) if !items.is_empty() => {
            let mut readings = Vec::new();
            for (i, item) in items.iter().enumerate() {
                if !item.is_object() {
                    return Err(DecodeError(format!(
                        "array item {i} is {}, expected an object",
                        kind(item)
                    )));
                }
                readings.extend(
                    decode_object(decoder, item)
                        .map_err(|err| DecodeError(format!("array item {i}: {err}")))?,
                );
            }
            Ok(readings)
        }
        other => Err(DecodeError(format!(
            "expected a JSON object, found {}",
            kind(&other)
        ))),
    }
}

/// The common case without building the document: one flat object ([`flat_json`]) holding
/// the configured fields and timestamp as top-level keys. `None` leaves the payload to the
/// general path, which also words every error (this path gives up on any).
fn decode_flat(decoder: &Decoder, payload: &[u8]) -> Option<Decoded> {
    let keys = decoder.flat_keys.as_deref()?;
    let picked = flat_json::scan(payload, keys)?;
    let find = |path: &str| picked[keys.iter().position(|k| **k == *path)?];
    let source_time = match &decoder.timestamp_field {
        Some(path) => match find(path) {
            Some(value) => Some(flat_timestamp(value)?),
            None => None,
        },
        None => None,
    };
    let mut readings = Vec::with_capacity(decoder.fields.len());
    for field in &decoder.fields {
        if let Some(value) = find(field) {
            readings.push(RawReading {
                field: field.clone(),
                value: flat_number(value)?,
                unit: None,
                source_time,
            });
        }
    }
    (!readings.is_empty()).then_some(Ok(readings))
}

/// What [`number`] makes of the same value in a parsed document.
fn flat_number(value: Scalar<'_>) -> Option<f64> {
    match value {
        Scalar::Number(n) => Some(n),
        Scalar::Bool(b) => Some(f64::from(u8::from(b))),
        Scalar::Str(s) => s.trim().parse().ok(),
        Scalar::Null => None,
    }
}

/// What [`timestamp`] makes of the same value in a parsed document.
fn flat_timestamp(value: Scalar<'_>) -> Option<Millis> {
    match value {
        Scalar::Number(n) => epoch_to_millis(n),
        Scalar::Str(s) => parse_rfc3339(s).or_else(|| s.parse().ok().and_then(epoch_to_millis)),
        Scalar::Bool(_) | Scalar::Null => None,
    }
}

/// What [`decode_flat`] looks for: the configured fields and the timestamp field, each
/// once, when there are fields, none is a dotted path and they are at most
/// [`flat_json::MAX_KEYS`].
pub(super) fn flat_keys(
    fields: &[Arc<str>],
    timestamp_field: Option<&str>,
) -> Option<Vec<Arc<str>>> {
    if fields.is_empty() {
        return None;
    }
    let mut keys: Vec<Arc<str>> = Vec::with_capacity(fields.len() + 1);
    let timestamp = timestamp_field.map(Arc::from);
    for key in fields.iter().chain(&timestamp) {
        if key.contains('.') {
            return None;
        }
        if !keys.contains(key) {
            keys.push(key.clone());
        }
    }
    (keys.len() <= flat_json::MAX_KEYS).then_some(keys)
}

fn decode_object(decoder: &Decoder, object: &Value) -> Decoded {
    if decoder.fields.is_empty() {
        let source_time = source_time(decoder, |path| lookup(object, path))?;
        let mut readings = Vec::new();
        collect_leaves(
            object,
            &mut String::new(),
            decoder,
            source_time,
            &mut readings,
        );
        if readings.is_empty() {
            return Err(DecodeError("the object has no numeric field".into()));
        }
        return Ok(readings);
    }
    configured(decoder, |path| lookup(object, path))
}

/// The source's time, if the decoder names a timestamp field and `find` finds it.
fn source_time<'v>(
    decoder: &Decoder,
    find: impl Fn(&str) -> Option<&'v Value>,
) -> Result<Option<Millis>, DecodeError> {
    match &decoder.timestamp_field {
        Some(path) => match find(path) {
            Some(ts) => Ok(Some(timestamp(path, ts)?)),
            None => Ok(None),
        },
        None => Ok(None),
    }
}

/// The readings of the configured fields, found by `find`.
fn configured<'v>(decoder: &Decoder, find: impl Fn(&str) -> Option<&'v Value>) -> Decoded {
    let source_time = source_time(decoder, &find)?;
    let mut readings = Vec::new();
    for field in &decoder.fields {
        let Some(value) = find(field) else {
            continue;
        };
        let value = number(value).ok_or_else(|| {
            DecodeError(format!(
                "field `{field}` is {}, expected a number",
                kind(value)
            ))
        })?;
        readings.push(RawReading {
            field: field.clone(),
            value,
            unit: None,
            source_time,
        });
    }
    if readings.is_empty() {
        return Err(DecodeError(format!(
            "none of the configured fields ({}) is present",
            decoder.fields.join(", ")
        )));
    }
    Ok(readings)
}

/// Every numeric or boolean leaf, named by its dotted path, the timestamp field excepted.
fn collect_leaves(
    value: &Value,
    path: &mut String,
    decoder: &Decoder,
    source_time: Option<Millis>,
    out: &mut Vec<RawReading>,
) {
    match value {
        Value::Object(map) => {
            // A key without a name names no metric (`{"": 7}`, `{"env": {"": 7}}`).
            for (key, child) in map.iter().filter(|(key, _)| !key.is_empty()) {
                let len = path.len();
                if !path.is_empty() {
                    path.push('.');
                }
                path.push_str(key);
                collect_leaves(child, path, decoder, source_time, out);
                path.truncate(len);
            }
        }
        Value::Number(_) | Value::Bool(_) => {
            if decoder.timestamp_field.as_deref() == Some(path.as_str()) {
                return;
            }
            if let Some(value) = number(value) {
                out.push(RawReading {
                    field: Arc::from(path.as_str()),
                    value,
                    unit: None,
                    source_time,
                });
            }
        }
        Value::String(_) | Value::Array(_) | Value::Null => {}
    }
}

/// Follows a dotted path (`env.temp`); a key that itself contains dots is found too.
fn lookup<'a>(value: &'a Value, path: &str) -> Option<&'a Value> {
    if let Some(found) = value.get(path) {
        return Some(found);
    }
    let (head, rest) = path.split_once('.')?;
    lookup(value.get(head)?, rest)
}

fn number(value: &Value) -> Option<f64> {
    match value {
        Value::Number(n) => n.as_f64(),
        Value::Bool(b) => Some(f64::from(u8::from(*b))),
        Value::String(s) => s.trim().parse().ok(),
        _ => None,
    }
}

fn timestamp(path: &str, value: &Value) -> Result<Millis, DecodeError> {
    let parsed = match value {
        Value::Number(n) => n.as_f64().and_then(epoch_to_millis),
        Value::String(s) => parse_rfc3339(s).or_else(|| s.parse().ok().and_then(epoch_to_millis)),
        _ => None,
    };
    parsed.ok_or_else(|| {
        DecodeError(format!(
            "timestamp field `{path}` is `{}`, expected epoch seconds or milliseconds or RFC 3339",
            truncate(&value.to_string())
        ))
    })
}

fn kind(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;
    use crate::config::{FormatOptions, PayloadFormat};

    fn decoder(fields: &[&str], timestamp_field: Option<&str>) -> Decoder {
        let options = FormatOptions {
            format: PayloadFormat::Json,
            timestamp_field,
            columns: &[],
            delimiter: None,
            pattern: None,
        };
        Decoder::new(&options, fields.iter().map(|f| f.to_string()).collect()).unwrap()
    }

    /// JSON text for a value: numbers, numeric and other strings, booleans, null, arrays,
    /// nested objects.
    fn value() -> impl Strategy<Value = String> {
        let leaf = prop_oneof![
            any::<i32>().prop_map(|n| n.to_string()),
            (-1e6..1e6f64).prop_map(|f| f.to_string()),
            Just("1700000000123".to_string()),
            Just("\" 21.5 \"".to_string()),
            Just("\"2026-12-02T10:00:00Z\"".to_string()),
            Just("\"warm\"".to_string()),
            Just("true".to_string()),
            Just("null".to_string()),
            Just("[1, 2]".to_string()),
        ];
        leaf.prop_recursive(2, 8, 3, |inner| {
            prop::collection::vec((key(), inner), 0..3).prop_map(|members| object(&members))
        })
    }

    /// Keys the decoders below ask for, spelled plainly or with escapes, and others.
    fn key() -> impl Strategy<Value = String> {
        prop::sample::select(vec![
            "t",
            "temp",
            "hum",
            "ts",
            "t\\u0065mp",
            "x",
            "",
            "a.b",
            "a",
        ])
        .prop_map(str::to_string)
    }

    fn object(members: &[(String, String)]) -> String {
        let members: Vec<String> = members
            .iter()
            .map(|(k, v)| format!("\"{k}\": {v}"))
            .collect();
        format!("{{{}}}", members.join(", "))
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]

        /// The shortcut gives what parsing the whole document gives, or leaves the payload
        /// to it.
        #[test]
        fn the_flat_shortcut_agrees_with_the_whole_document(
            members in prop::collection::vec((key(), value()), 0..6),
            config in 0..4usize,
            garbage in prop::option::of(prop::sample::select(vec!["", " x", "}", "]"])),
        ) {
            let (fields, ts): (&[&str], Option<&str>) = match config {
                0 => (&["temp", "hum"], Some("ts")),
                1 => (&["t"], None),
                2 => (&["temp", "ts"], Some("ts")),
                _ => (&["hum"], Some("x")),
            };
            let decoder = decoder(fields, ts);
            let mut payload = object(&members);
            payload.push_str(garbage.unwrap_or(""));
            if let Some(flat) = decode_flat(&decoder, payload.as_bytes()) {
                prop_assert_eq!(flat, decode_document(&decoder, payload.as_bytes()), "{}", payload);
            }
        }
    }

    #[test]
    fn the_flat_shortcut_takes_the_common_payload() {
        let decoder = decoder(&["temp", "hum"], Some("ts"));
        let payload = br#"{"ts": 1700000000123, "temp": 21.5, "hum": 40, "rssi": -70}"#;
        let readings = decode_flat(&decoder, payload).unwrap().unwrap();
        assert_eq!(readings, decode_document(&decoder, payload).unwrap());
        assert_eq!(readings.len(), 2);
        assert_eq!(readings[0].source_time, Some(1_700_000_000_123));
    }
}
