//! JSON objects (or arrays of objects): metrics are fields or paths (`ENERGY.Power[1]`).
//!
//! Two readers. The payload most sensors send, one flat object holding the configured
//! fields, is scanned in one pass ([`flat_json`]). Any other payload is walked while it is
//! parsed (serde's visitor), keeping only readings and the few values the device asks for:
//! no document is built, so a payload costs its readings, within the [`Output`] limits,
//! whatever its shape. A parsed `serde_json::Value` takes 30 to 50 times the bytes of a
//! payload of small objects.

pub mod path;
#[cfg(test)]
mod tests;
mod walk;

use std::sync::Arc;

use super::flat_json::{self, Scalar};
use super::{Decoder, Output, epoch_to_millis};
use crate::reading::{DecodeError, Millis, RawReading};
use walk::decode_document;

pub(super) fn decode(
    decoder: &Decoder,
    payload: &[u8],
    out: &mut Output,
) -> Result<(), DecodeError> {
    let flat = if decoder.reads_unmapped() {
        None
    } else {
        decode_flat(decoder, payload)
    };
    match flat {
        Some(readings) => out.take(readings),
        None => decode_document(decoder, payload, out),
    }
}

/// The common case without walking the document: one flat object ([`flat_json`]) holding
/// the configured fields and timestamp as top-level keys. `None` leaves the payload to the
/// general path, which also words every error (this path gives up on any).
fn decode_flat(decoder: &Decoder, payload: &[u8]) -> Option<Vec<RawReading>> {
    let keys = decoder.flat_keys.as_deref()?;
    let picked = flat_json::scan(payload, keys)?;
    let find = |path: &str| picked[keys.iter().position(|k| **k == *path)?];
    let source_time = match &decoder.timestamp_field {
        Some(path) => match find(path) {
            Some(value) => Some(flat_timestamp(decoder, value)?),
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
    (!readings.is_empty()).then_some(readings)
}

/// What the walk makes of the same value (`Found::number`).
fn flat_number(value: Scalar<'_>) -> Option<f64> {
    match value {
        Scalar::Number(n) => Some(n),
        Scalar::Bool(b) => Some(f64::from(u8::from(b))),
        Scalar::Str(s) => s.trim().parse().ok(),
        Scalar::Null => None,
    }
}

/// What the walk makes of the same value (`Found::timestamp`).
fn flat_timestamp(decoder: &Decoder, value: Scalar<'_>) -> Option<Millis> {
    match value {
        Scalar::Number(n) => epoch_to_millis(n),
        Scalar::Str(s) => decoder
            .text_time(s)
            .or_else(|| s.parse().ok().and_then(epoch_to_millis)),
        Scalar::Bool(_) | Scalar::Null => None,
    }
}

/// What [`decode_flat`] looks for: the configured fields and the timestamp field, each
/// once, when there are fields, each is a plain top-level key and they are at most
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
        if key.contains(['.', '[', ']', '"']) {
            return None;
        }
        if !keys.contains(key) {
            keys.push(key.clone());
        }
    }
    (keys.len() <= flat_json::MAX_KEYS).then_some(keys)
}
