//! JSON objects (or arrays of objects): metrics are fields or dotted paths.
//!
//! Two readers. The payload most sensors send, one flat object holding the configured
//! fields, is scanned in one pass ([`flat_json`]). Any other payload is walked while it is
//! parsed (serde's visitor), keeping only readings and the few values the device asks for:
//! no document is built, so a payload costs its readings, within the [`Output`] limits,
//! whatever its shape. A parsed `serde_json::Value` takes 30 to 50 times the bytes of a
//! payload of small objects.

use std::borrow::Cow;
use std::fmt;
use std::ops::Range;
use std::sync::Arc;

use serde::Deserialize;
use serde::de::{self, DeserializeSeed, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};

use super::flat_json::{self, Scalar};
use super::{Decoder, Output, epoch_to_millis, parse_rfc3339, truncate};
use crate::reading::{DecodeError, FastMap, Millis, RawReading};

pub(super) fn decode(
    decoder: &Decoder,
    payload: &[u8],
    out: &mut Output,
) -> Result<(), DecodeError> {
    match decode_flat(decoder, payload) {
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
    (!readings.is_empty()).then_some(readings)
}

/// What [`Found::number`] makes of the same value.
fn flat_number(value: Scalar<'_>) -> Option<f64> {
    match value {
        Scalar::Number(n) => Some(n),
        Scalar::Bool(b) => Some(f64::from(u8::from(b))),
        Scalar::Str(s) => s.trim().parse().ok(),
        Scalar::Null => None,
    }
}

/// What [`Found::timestamp`] makes of the same value.
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

/// Any payload, walked as it is parsed: an object, or an array of objects, each decoded on
/// its own. With no fields configured every numeric or boolean leaf is a reading named by
/// its dotted path; otherwise each configured path is looked up. A dotted path finds a key
/// that itself holds the dots first (`{"env.temp": 1}`), then the nested key
/// (`{"env": {"temp": 1}}`); where a key repeats, the last one counts.
fn decode_document(decoder: &Decoder, payload: &[u8], out: &mut Output) -> Result<(), DecodeError> {
    let mut walk = Walk {
        decoder,
        out,
        path: String::new(),
        dead: Vec::new(),
        error: None,
    };
    let mut json = serde_json::Deserializer::from_slice(payload);
    let parsed = Top(&mut walk)
        .deserialize(&mut json)
        .and_then(|()| json.end());
    if let Some(err) = walk.error {
        return Err(err);
    }
    parsed.map_err(|err| DecodeError::malformed(format!("invalid JSON: {err}")))
}

/// The state of one document's walk.
struct Walk<'d, 'o> {
    decoder: &'d Decoder,
    out: &'o mut Output,
    /// The dotted path of the value being read, while leaves are collected.
    path: String,
    /// Readings of a key that a later key of the same name replaced, to drop at the end of
    /// the top-level object.
    dead: Vec<Range<usize>>,
    /// Why the payload was refused, where that was not its JSON syntax. The parse is then
    /// stopped with a placeholder error.
    error: Option<DecodeError>,
}

impl Walk<'_, '_> {
    fn refuse<E: de::Error>(&mut self, err: DecodeError) -> E {
        self.error = Some(err);
        E::custom("refused")
    }

    /// The leaf at the current path, unless it is the timestamp.
    fn leaf(&mut self, value: f64) -> Result<(), DecodeError> {
        if self.decoder.timestamp_field.as_deref() == Some(self.path.as_str()) {
            return Ok(());
        }
        let field = self.out.name(&self.path, "metric name")?;
        self.out.push(RawReading {
            field,
            value,
            unit: None,
            source_time: None,
        })
    }

    /// Decodes one top-level object; `index` is its place in an array.
    fn object<'de, A: MapAccess<'de>>(
        &mut self,
        map: A,
        index: Option<usize>,
    ) -> Result<(), A::Error> {
        let decoder = self.decoder;
        let fields = &decoder.fields;
        let timestamp = decoder.timestamp_field.as_deref();
        let mut wants: Vec<Want<'_>> = fields
            .iter()
            .map(|f| &**f)
            .chain(timestamp)
            .enumerate()
            .map(|(slot, path)| Want { slot, path })
            .collect();
        let collect = fields.is_empty();
        if collect {
            // Only the timestamp is looked up.
            wants.retain(|w| w.slot == fields.len());
            if let Some(w) = wants.first_mut() {
                w.slot = 0;
            }
        }
        let start = self.out.len();
        let found = members(self, map, &wants, collect)?;
        let (time, values) = match timestamp {
            Some(_) if collect => found.split_at(1),
            Some(_) => {
                let (values, time) = found.split_at(fields.len());
                (time, values)
            }
            None => found.split_at(0),
        };
        let result = self.finish_object(start, time.first().and_then(Option::as_ref), values);
        result.map_err(|err| {
            let err = match index {
                Some(i) => DecodeError {
                    detail: format!("array item {i}: {}", err.detail),
                    ..err
                },
                None => err,
            };
            self.refuse(err)
        })
    }

    /// The readings of a top-level object read to its end: stamps them with its timestamp,
    /// or (with fields configured) takes the values found at the configured paths.
    fn finish_object(
        &mut self,
        start: usize,
        time: Option<&Found>,
        values: &[Option<Found>],
    ) -> Result<(), DecodeError> {
        let decoder = self.decoder;
        let source_time = match (time, &decoder.timestamp_field) {
            (Some(found), Some(path)) => Some(found.timestamp(path)?),
            _ => None,
        };
        if decoder.fields.is_empty() {
            self.out.remove(start, &mut self.dead);
            if self.out.len() == start {
                return Err(DecodeError::malformed("the object has no numeric field"));
            }
            self.out.set_source_time(start, source_time);
            return Ok(());
        }
        for (field, found) in decoder.fields.iter().zip(values) {
            let Some(found) = found else {
                continue;
            };
            let value = found.number().ok_or_else(|| {
                DecodeError::malformed(format!(
                    "field `{field}` is {}, expected a number",
                    found.kind()
                ))
            })?;
            self.out.push(RawReading {
                field: field.clone(),
                value,
                unit: None,
                source_time,
            })?;
        }
        if self.out.len() == start {
            return Err(DecodeError::malformed(format!(
                "none of the configured fields ({}) is present",
                decoder.fields.join(", ")
            )));
        }
        Ok(())
    }
}

/// A path the device asks for, relative to the object being read; `slot` is its place in
/// the parent's list of wants.
#[derive(Clone, Copy)]
struct Want<'p> {
    slot: usize,
    path: &'p str,
}

/// A value found at a wanted path: what a timestamp or a field needs of it.
#[derive(Clone, Debug)]
enum Found {
    Number(f64),
    Bool(bool),
    Str(String),
    /// `null`, an array or an object, by its kind.
    Other(&'static str),
}

impl Found {
    fn number(&self) -> Option<f64> {
        match self {
            Self::Number(n) => Some(*n),
            Self::Bool(b) => Some(f64::from(u8::from(*b))),
            Self::Str(s) => s.trim().parse().ok(),
            Self::Other(_) => None,
        }
    }

    fn kind(&self) -> &'static str {
        match self {
            Self::Number(_) => "a number",
            Self::Bool(_) => "a boolean",
            Self::Str(_) => "a string",
            Self::Other(kind) => kind,
        }
    }

    fn timestamp(&self, path: &str) -> Result<Millis, DecodeError> {
        let parsed = match self {
            Self::Number(n) => epoch_to_millis(*n),
            Self::Str(s) => parse_rfc3339(s).or_else(|| s.parse().ok().and_then(epoch_to_millis)),
            Self::Bool(_) | Self::Other(_) => None,
        };
        parsed.ok_or_else(|| {
            let shown = match self {
                Self::Number(n) => format!("`{n}`"),
                Self::Bool(b) => format!("`{b}`"),
                Self::Str(s) => format!(
                    "`{}`",
                    truncate(&serde_json::to_string(s).unwrap_or_default())
                ),
                Self::Other(kind) => (*kind).to_string(),
            };
            DecodeError::malformed(format!(
                "timestamp field `{path}` is {shown}, expected epoch seconds or milliseconds or RFC 3339"
            ))
        })
    }
}

/// Reads an object's members: collects its numeric leaves when `collect`, and returns, per
/// want, the value found by the lookup rules of [`decode_document`].
fn members<'de, A: MapAccess<'de>>(
    walk: &mut Walk<'_, '_>,
    mut map: A,
    wants: &[Want<'_>],
    collect: bool,
) -> Result<Vec<Option<Found>>, A::Error> {
    // Per want: the value of the last key equal to its path, and what the last key equal
    // to its first segment held at the rest of it.
    let mut exact: Vec<Option<Option<Found>>> = vec![None; wants.len()];
    let mut nested: Vec<Option<Option<Found>>> = vec![None; wants.len()];
    // Where each key's readings are, to drop them when the key comes again.
    let mut keys: FastMap<Cow<'de, str>, Range<usize>> = FastMap::default();
    let mut child: Vec<Want<'_>> = Vec::new();
    while let Some(Key(key)) = map.next_key::<Key<'de>>()? {
        child.clear();
        let mut capture = false;
        for (i, want) in wants.iter().enumerate() {
            if want.path == key {
                capture = true;
            } else if let Some((head, rest)) = want.path.split_once('.')
                && head == key
            {
                child.push(Want {
                    slot: i,
                    path: rest,
                });
            }
        }
        // A key without a name names no metric (`{"": 7}`, `{"env": {"": 7}}`).
        let leaves = collect && !key.is_empty();
        let parent_len = walk.path.len();
        if leaves {
            if !walk.path.is_empty() {
                walk.path.push('.');
            }
            walk.path.push_str(&key);
        }
        let start = walk.out.len();
        let value = map.next_value_seed(Member {
            walk: &mut *walk,
            wants: &child,
            capture,
            collect: leaves,
        })?;
        walk.path.truncate(parent_len);
        if let Some(found) = value.found {
            for (i, want) in wants.iter().enumerate() {
                if want.path == key {
                    exact[i] = Some(Some(found.clone()));
                }
            }
        }
        for (want, found) in child.iter().zip(value.nested) {
            nested[want.slot] = Some(found);
        }
        if leaves {
            let range = start..walk.out.len();
            // Only keys that gave readings are remembered: memory within max_values.
            if let Some(earlier) = keys.remove(&key) {
                walk.dead.push(earlier);
            }
            if !range.is_empty() {
                keys.insert(key, range);
            }
        }
    }
    Ok(exact
        .into_iter()
        .zip(nested)
        .map(|(exact, nested)| exact.or(nested).flatten())
        .collect())
}

/// An object key, borrowed from the payload unless it has escapes.
struct Key<'de>(Cow<'de, str>);

impl<'de> Deserialize<'de> for Key<'de> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct KeyVisitor;
        impl<'de> Visitor<'de> for KeyVisitor {
            type Value = Key<'de>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a key")
            }
            fn visit_borrowed_str<E: de::Error>(self, v: &'de str) -> Result<Key<'de>, E> {
                Ok(Key(Cow::Borrowed(v)))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Key<'de>, E> {
                Ok(Key(Cow::Owned(v.to_string())))
            }
        }
        deserializer.deserialize_str(KeyVisitor)
    }
}

/// What reading one member's value gave: the value itself when it was wanted, and per
/// wanted path below it what was found there.
struct Visited {
    found: Option<Found>,
    nested: Vec<Option<Found>>,
}

/// One member's value.
struct Member<'w, 'd, 'o, 'p> {
    walk: &'w mut Walk<'d, 'o>,
    /// Paths wanted inside the value, relative to it.
    wants: &'w [Want<'p>],
    /// The value itself is wanted.
    capture: bool,
    /// Numeric leaves are readings.
    collect: bool,
}

impl Member<'_, '_, '_, '_> {
    fn visited(&self, found: Found) -> Visited {
        Visited {
            found: self.capture.then_some(found),
            nested: vec![None; self.wants.len()],
        }
    }

    fn number<E: de::Error>(self, value: f64) -> Result<Visited, E> {
        if self.collect
            && let Err(err) = self.walk.leaf(value)
        {
            return Err(self.walk.refuse(err));
        }
        Ok(self.visited(Found::Number(value)))
    }
}

impl<'de> DeserializeSeed<'de> for Member<'_, '_, '_, '_> {
    type Value = Visited;

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<Visited, D::Error> {
        deserializer.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Member<'_, '_, '_, '_> {
    type Value = Visited;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any JSON value")
    }

    fn visit_bool<E: de::Error>(self, v: bool) -> Result<Visited, E> {
        if self.collect
            && let Err(err) = self.walk.leaf(f64::from(u8::from(v)))
        {
            return Err(self.walk.refuse(err));
        }
        Ok(self.visited(Found::Bool(v)))
    }

    fn visit_i64<E: de::Error>(self, v: i64) -> Result<Visited, E> {
        self.number(v as f64)
    }

    fn visit_u64<E: de::Error>(self, v: u64) -> Result<Visited, E> {
        self.number(v as f64)
    }

    fn visit_f64<E: de::Error>(self, v: f64) -> Result<Visited, E> {
        self.number(v)
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<Visited, E> {
        let found = if self.capture {
            Found::Str(v.to_string())
        } else {
            Found::Other("a string")
        };
        Ok(self.visited(found))
    }

    fn visit_unit<E: de::Error>(self) -> Result<Visited, E> {
        Ok(self.visited(Found::Other("null")))
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Visited, A::Error> {
        while seq.next_element::<IgnoredAny>()?.is_some() {}
        Ok(self.visited(Found::Other("an array")))
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Visited, A::Error> {
        let nested = if self.collect || !self.wants.is_empty() {
            members(self.walk, map, self.wants, self.collect)?
        } else {
            while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
            Vec::new()
        };
        Ok(Visited {
            found: self.capture.then_some(Found::Other("an object")),
            nested,
        })
    }
}

/// The document: an object, or a non-empty array of objects.
struct Top<'w, 'd, 'o>(&'w mut Walk<'d, 'o>);

impl Top<'_, '_, '_> {
    fn not_an_object<E: de::Error>(self, kind: &str) -> Result<(), E> {
        let err = DecodeError::malformed(format!("expected a JSON object, found {kind}"));
        Err(self.0.refuse(err))
    }
}

impl<'de> DeserializeSeed<'de> for Top<'_, '_, '_> {
    type Value = ();

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<(), D::Error> {
        deserializer.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Top<'_, '_, '_> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON object or an array of objects")
    }

    fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<(), A::Error> {
        self.0.object(map, None)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        let mut index = 0;
        while seq
            .next_element_seed(Item {
                walk: &mut *self.0,
                index,
            })?
            .is_some()
        {
            index += 1;
        }
        if index == 0 {
            return self.not_an_object("an array");
        }
        Ok(())
    }

    fn visit_bool<E: de::Error>(self, _: bool) -> Result<(), E> {
        self.not_an_object("a boolean")
    }
    fn visit_i64<E: de::Error>(self, _: i64) -> Result<(), E> {
        self.not_an_object("a number")
    }
    fn visit_u64<E: de::Error>(self, _: u64) -> Result<(), E> {
        self.not_an_object("a number")
    }
    fn visit_f64<E: de::Error>(self, _: f64) -> Result<(), E> {
        self.not_an_object("a number")
    }
    fn visit_str<E: de::Error>(self, _: &str) -> Result<(), E> {
        self.not_an_object("a string")
    }
    fn visit_unit<E: de::Error>(self) -> Result<(), E> {
        self.not_an_object("null")
    }
}

/// One item of a top-level array, which must be an object.
struct Item<'w, 'd, 'o> {
    walk: &'w mut Walk<'d, 'o>,
    index: usize,
}

impl Item<'_, '_, '_> {
    fn not_an_object<E: de::Error>(self, kind: &str) -> Result<(), E> {
        let err = DecodeError::malformed(format!(
            "array item {} is {kind}, expected an object",
            self.index
        ));
        Err(self.walk.refuse(err))
    }
}

impl<'de> DeserializeSeed<'de> for Item<'_, '_, '_> {
    type Value = ();

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<(), D::Error> {
        deserializer.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Item<'_, '_, '_> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("an object")
    }

    fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<(), A::Error> {
        self.walk.object(map, Some(self.index))
    }

    fn visit_seq<A: SeqAccess<'de>>(self, _: A) -> Result<(), A::Error> {
        self.not_an_object("an array")
    }
    fn visit_bool<E: de::Error>(self, _: bool) -> Result<(), E> {
        self.not_an_object("a boolean")
    }
    fn visit_i64<E: de::Error>(self, _: i64) -> Result<(), E> {
        self.not_an_object("a number")
    }
    fn visit_u64<E: de::Error>(self, _: u64) -> Result<(), E> {
        self.not_an_object("a number")
    }
    fn visit_f64<E: de::Error>(self, _: f64) -> Result<(), E> {
        self.not_an_object("a number")
    }
    fn visit_str<E: de::Error>(self, _: &str) -> Result<(), E> {
        self.not_an_object("a string")
    }
    fn visit_unit<E: de::Error>(self) -> Result<(), E> {
        self.not_an_object("null")
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;
    use serde_json::Value;

    use super::*;
    use crate::config::{FormatOptions, PayloadFormat, ValidationConfig};
    use crate::decode::DecodeLimits;

    fn decoder(fields: &[&str], timestamp_field: Option<&str>) -> Decoder {
        let options = FormatOptions {
            format: PayloadFormat::Json,
            timestamp_field,
            columns: &[],
            delimiter: None,
            pattern: None,
        };
        let limits = DecodeLimits::new(&ValidationConfig::default());
        Decoder::new(
            &options,
            fields.iter().map(|f| f.to_string()).collect(),
            limits,
        )
        .unwrap()
    }

    /// The walk alone, as `decode` runs it when the flat scanner gives up.
    fn document(decoder: &Decoder, payload: &[u8]) -> Result<Vec<RawReading>, DecodeError> {
        let mut out = Output::new(&decoder.limits, payload.len());
        decode_document(decoder, payload, &mut out)?;
        Ok(out.finish())
    }

    /// A model of the walk: the whole document parsed into a `serde_json::Value` (which
    /// keeps the last of repeated keys), then searched. Readings as (field, value, time),
    /// sorted, since a parsed map orders keys by name; `None` for an error.
    fn model(decoder: &Decoder, payload: &[u8]) -> Option<Vec<(String, u64, Option<Millis>)>> {
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
}
