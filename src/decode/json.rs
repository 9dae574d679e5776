//! JSON objects (or arrays of objects): metrics are fields or dotted paths.

use serde_json::Value;

use super::{Decoder, epoch_to_millis, parse_rfc3339, truncate};
use crate::reading::{DecodeError, Decoded, Millis, RawReading};

pub(super) fn decode(decoder: &Decoder, payload: &[u8]) -> Decoded {
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

fn decode_object(decoder: &Decoder, object: &Value) -> Decoded {
    let source_time = match &decoder.timestamp_field {
        Some(path) => match lookup(object, path) {
            Some(ts) => Some(timestamp(path, ts)?),
            None => None,
        },
        None => None,
    };
    let mut readings = Vec::new();
    if decoder.fields.is_empty() {
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
    for field in &decoder.fields {
        let Some(value) = lookup(object, field) else {
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
                    field: path.clone(),
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
