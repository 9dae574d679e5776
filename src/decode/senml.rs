//! SenML JSON (RFC 8428): a pack of records; base name, base time and base unit carry over to
//! the records that follow.

use std::sync::Arc;

use serde::Deserialize;

use super::Decoder;
use crate::reading::{DecodeError, Decoded, Millis, RawReading};

/// Times at or below 2^28 seconds are relative to now (RFC 8428 §4.5.3).
const RELATIVE_LIMIT: f64 = 268_435_456.0;

#[derive(Deserialize)]
struct Record {
    bn: Option<String>,
    bt: Option<f64>,
    bu: Option<String>,
    bv: Option<f64>,
    n: Option<String>,
    u: Option<String>,
    v: Option<f64>,
    vb: Option<bool>,
    vs: Option<String>,
    vd: Option<String>,
    s: Option<f64>,
    t: Option<f64>,
}

pub(super) fn decode(decoder: &Decoder, payload: &[u8], now: Millis) -> Decoded {
    let records: Vec<Record> = serde_json::from_slice(payload)
        .map_err(|err| DecodeError(format!("invalid SenML JSON: {err}")))?;
    if records.is_empty() {
        return Err(DecodeError("the SenML pack has no records".into()));
    }
    let (mut base_name, mut base_time, mut base_unit, mut base_value) =
        (String::new(), 0.0, None::<String>, 0.0);
    let mut readings = Vec::with_capacity(records.len());
    for (i, record) in records.into_iter().enumerate() {
        if let Some(bn) = record.bn {
            base_name = bn;
        }
        if let Some(bt) = record.bt {
            base_time = bt;
        }
        if let Some(bu) = record.bu {
            base_unit = Some(bu);
        }
        if let Some(bv) = record.bv {
            base_value = bv;
        }
        let name = format!("{base_name}{}", record.n.as_deref().unwrap_or(""));
        if name.is_empty() {
            return Err(DecodeError(format!("record {i} has no name (n or bn)")));
        }
        let value = match (record.v, record.vb, record.s) {
            (Some(v), _, _) => base_value + v,
            (None, Some(vb), _) => f64::from(u8::from(vb)),
            (None, None, Some(sum)) => sum,
            (None, None, None) if record.vs.is_some() || record.vd.is_some() => {
                return Err(DecodeError(format!(
                    "record {i} (`{name}`) has a string or data value; only numbers are stored"
                )));
            }
            (None, None, None) => continue,
        };
        if !decoder.fields.is_empty() && !decoder.fields.iter().any(|f| **f == *name) {
            continue;
        }
        let time = base_time + record.t.unwrap_or(0.0);
        let source_time = if time == 0.0 {
            None
        } else if time.abs() <= RELATIVE_LIMIT {
            Some(now + (time * 1000.0).round() as Millis)
        } else {
            Some(seconds_to_millis(time).ok_or_else(|| {
                DecodeError(format!("record {i} (`{name}`) has an invalid time {time}"))
            })?)
        };
        readings.push(RawReading {
            field: Arc::from(name),
            value,
            unit: record.u.or_else(|| base_unit.clone()),
            source_time,
        });
    }
    if readings.is_empty() {
        return Err(DecodeError(format!(
            "no record matches the configured fields ({})",
            decoder.fields.join(", ")
        )));
    }
    Ok(readings)
}

/// SenML times are always seconds.
fn seconds_to_millis(seconds: f64) -> Option<Millis> {
    let millis = (seconds * 1000.0).round();
    (0.0..1e16).contains(&millis).then_some(millis as Millis)
}
