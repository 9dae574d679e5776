//! The walk against a model that parses the whole document, and the flat scanner against
//! the walk.

use proptest::prelude::*;
use serde_json::Value;

use super::walk::decode_document;
use super::*;
use crate::config::PayloadFormat;
use crate::decode::{Output, parse_rfc3339};

fn decoder(fields: &[&str], timestamp_field: Option<&str>) -> Decoder {
    crate::decode::test_decoder(PayloadFormat::Json, timestamp_field, fields, &[])
}

/// The walk alone, as `decode` runs it when the flat scanner gives up.
fn document(decoder: &Decoder, payload: &[u8]) -> Result<Vec<RawReading>, DecodeError> {
    let mut out = Output::new(&decoder.limits, payload.len());
    decode_document(decoder, payload, &mut out)?;
    Ok(out.finish().readings)
}

/// A model of the walk: the whole document parsed into a `serde_json::Value` (which
/// keeps the last of repeated keys), then searched. Readings as (field, value, time),
/// sorted, since a parsed map orders keys by name; `None` for an error.
fn model(decoder: &Decoder, payload: &[u8]) -> Option<Vec<(String, u64, Option<Millis>)>> {
    fn lookup<'a>(value: &'a Value, path: &str) -> Option<&'a Value> {
        if !path.contains('[')
            && let Some(found) = value.get(path)
        {
            return Some(found);
        }
        let (head, rest) = super::path::head(path)?;
        let child = match head {
            super::path::Head::Key(key) => value.as_object()?.get(&*key)?,
            super::path::Head::Index(i) => value.as_array()?.get(i)?,
        };
        if rest.is_empty() {
            Some(child)
        } else {
            lookup(child, rest)
        }
    }
    fn number(value: &Value) -> Option<f64> {
        match value {
            Value::Number(n) => n.as_f64(),
            Value::Bool(b) => Some(f64::from(u8::from(*b))),
            Value::String(s) => s.trim().parse().ok(),
            _ => None,
        }
    }
    fn time(value: &Value) -> Option<Millis> {
        match value {
            Value::Number(n) => n.as_f64().and_then(epoch_to_millis),
            Value::String(s) => {
                parse_rfc3339(s).or_else(|| s.parse().ok().and_then(epoch_to_millis))
            }
            _ => None,
        }
    }
    fn leaves(value: &Value, path: &str, skip: Option<&str>, out: &mut Vec<(String, f64)>) {
        match value {
            Value::Object(map) => {
                for (key, child) in map.iter().filter(|(key, _)| !key.is_empty()) {
                    let path = if path.is_empty() {
                        key.clone()
                    } else {
                        format!("{path}.{key}")
                    };
                    leaves(child, &path, skip, out);
                }
            }
            Value::Array(items) => {
                for (i, item) in items.iter().enumerate() {
                    leaves(item, &format!("{path}[{i}]"), skip, out);
                }
            }
            Value::Number(_) | Value::Bool(_) if skip != Some(path) => {
                out.extend(number(value).map(|v| (path.to_string(), v)));
            }
            _ => {}
        }
    }
    let object = |object: &Value| -> Option<Vec<(String, f64, Option<Millis>)>> {
        let ts = match &decoder.timestamp_field {
            Some(path) => match lookup(object, path) {
                Some(value) => Some(time(value)?),
                None => None,
            },
            None => None,
        };
        let mut found = Vec::new();
        if decoder.fields.is_empty() {
            leaves(object, "", decoder.timestamp_field.as_deref(), &mut found);
        } else {
            for field in &decoder.fields {
                if let Some(value) = lookup(object, field) {
                    found.push((field.to_string(), number(value)?));
                }
            }
        }
        (!found.is_empty()).then(|| found.into_iter().map(|(f, v)| (f, v, ts)).collect())
    };
    let value: Value = serde_json::from_slice(payload).ok()?;
    let mut readings = match &value {
        Value::Object(_) => object(&value)?,
        Value::Array(items) if !items.is_empty() => {
            let mut all = Vec::new();
            for item in items {
                all.extend(object(item.as_object().map(|_| item)?)?);
            }
            all
        }
        _ => return None,
    };
    let mut keyed: Vec<_> = readings
        .drain(..)
        .map(|(f, v, t)| (f, v.to_bits(), t))
        .collect();
    keyed.sort();
    Some(keyed)
}

fn keyed(readings: &[RawReading]) -> Vec<(String, u64, Option<Millis>)> {
    let mut keyed: Vec<_> = readings
        .iter()
        .map(|r| (r.field.to_string(), r.value.to_bits(), r.source_time))
        .collect();
    keyed.sort();
    keyed
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
        Just("[{\"temp\": 3, \"a.b\": [true]}, \"x\", [4, null]]".to_string()),
    ];
    leaf.prop_recursive(3, 12, 4, |inner| {
        prop::collection::vec((key(), inner), 0..4).prop_map(|members| object(&members))
    })
}

/// Keys the decoders below ask for, spelled plainly or with escapes, and others; they
/// repeat often, as keys may in a hostile payload.
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
        "b",
        "env",
        "env.temp",
        "meta",
        "at",
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

fn configs() -> impl Strategy<Value = (Vec<&'static str>, Option<&'static str>)> {
    prop::sample::select(vec![
        (vec![], None),
        (vec![], Some("ts")),
        (vec![], Some("meta.at")),
        (vec!["temp", "hum"], Some("ts")),
        (vec!["t"], None),
        (vec!["temp", "ts"], Some("ts")),
        (vec!["hum"], Some("x")),
        (vec!["env.temp", "a.b", "t"], Some("meta.at")),
        (vec!["a"], Some("a.b")),
        (vec!["a[1]", "t[0].temp", "hum[2][1]"], None),
        (
            vec![r#"["a.b"]"#, r#"env["a.b"][0]"#, "a.b[0]"],
            Some("t[0]"),
        ),
    ])
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(3000))]

    /// The walk stores what searching the parsed document gives, readings and errors
    /// alike, for objects and arrays of objects with nested, repeated and dotted keys.
    #[test]
    fn the_walk_finds_what_the_parsed_document_holds(
        members in prop::collection::vec((key(), value()), 0..6),
        array in prop::option::of(prop::collection::vec(prop::collection::vec((key(), value()), 0..3), 0..3)),
        (fields, ts) in configs(),
        garbage in prop::option::of(prop::sample::select(vec!["", " x", "}", "]"])),
    ) {
        let decoder = decoder(&fields, ts);
        let mut payload = match array {
            Some(items) => format!(
                "[{}]",
                items.iter().map(|m| object(m)).collect::<Vec<_>>().join(", ")
            ),
            None => object(&members),
        };
        payload.push_str(garbage.unwrap_or(""));
        let walked = document(&decoder, payload.as_bytes());
        prop_assert_eq!(
            walked.as_ref().ok().map(|r| keyed(r)),
            model(&decoder, payload.as_bytes()),
            "{} with fields {:?} and timestamp {:?}: {:?}", payload, fields, ts, walked
        );
    }

    /// The shortcut gives what walking the document gives, or leaves the payload to it.
    #[test]
    fn the_flat_shortcut_agrees_with_the_walk(
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
            prop_assert_eq!(Ok(flat), document(&decoder, payload.as_bytes()), "{}", payload);
        }
    }
}

#[test]
fn the_flat_shortcut_takes_the_common_payload() {
    let decoder = decoder(&["temp", "hum"], Some("ts"));
    let payload = br#"{"ts": 1700000000123, "temp": 21.5, "hum": 40, "rssi": -70}"#;
    let readings = decode_flat(&decoder, payload).unwrap();
    assert_eq!(readings, document(&decoder, payload).unwrap());
    assert_eq!(readings.len(), 2);
    assert_eq!(readings[0].source_time, Some(1_700_000_000_123));
}

#[test]
fn a_repeated_key_counts_once_with_its_last_value() {
    let decoder = decoder(&[], None);
    let readings = document(
        &decoder,
        br#"{"a": {"x": 1}, "b": 2, "a": {"y": 3}, "b": 4}"#,
    )
    .unwrap();
    assert_eq!(
        keyed(&readings),
        vec![
            ("a.y".to_string(), 3f64.to_bits(), None),
            ("b".to_string(), 4f64.to_bits(), None)
        ]
    );
}

#[test]
fn a_payload_of_many_small_objects_is_refused_at_max_values() {
    let decoder = decoder(&["temp"], None);
    let mut payload = String::from("[");
    for i in 0..70_000 {
        payload.push_str(&format!("{{\"temp\": {}}},", 1000 + i));
    }
    payload.push_str("{\"temp\": 1}]");
    let err = document(&decoder, payload.as_bytes()).unwrap_err();
    assert_eq!(err.reason, crate::reading::RejectReason::TooManyValues);
    assert!(err.detail.contains("validation.max_values"), "{err}");
}

#[test]
fn long_paths_are_refused_by_name_length_and_by_their_total() {
    let decoder = decoder(&[], None);
    let long = "k".repeat(300);
    let err = document(&decoder, format!("{{\"{long}\": 1}}").as_bytes()).unwrap_err();
    assert_eq!(err.reason, crate::reading::RejectReason::NameTooLong);
    // 200-byte prefix, 2,000 one-byte leaves: 400 kB of names from an 8 kB payload.
    let leaves: Vec<String> = (0..2000).map(|i| format!("\"{i:x}\":1")).collect();
    let payload = format!("{{\"{}\": {{{}}}}}", "p".repeat(200), leaves.join(","));
    let err = document(&decoder, payload.as_bytes()).unwrap_err();
    assert_eq!(err.reason, crate::reading::RejectReason::NameTooLong);
    assert!(err.detail.contains("times its own size"), "{err}");
}
