//! The general JSON path: a document walked while serde parses it, keeping only readings
//! and the values at the paths a device asks for.

use std::borrow::Cow;
use std::fmt;
use std::ops::Range;

use serde::Deserialize;
use serde::de::{self, DeserializeSeed, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};

use super::super::{Decoder, Output, epoch_to_millis, truncate};
use super::path::{self, Head};
use crate::reading::{DecodeError, FastMap, Millis, RawReading};

/// Any payload, walked as it is parsed: an object, or an array of objects, each decoded on
/// its own. With no fields configured every numeric or boolean leaf is a reading named by
/// its path (`env.temp`, `power[1]`); otherwise each configured path ([`super::path`]) is
/// looked up. A plain dotted path finds a key that itself holds the dots first
/// (`{"env.temp": 1}`), then the nested key (`{"env": {"temp": 1}}`); where a key repeats,
/// the last one counts.
pub(super) fn decode_document(
    decoder: &Decoder,
    payload: &[u8],
    out: &mut Output,
) -> Result<(), DecodeError> {
    let mut walk = Walk {
        decoder,
        out,
        path: String::new(),
        dead: Vec::new(),
        error: None,
    };
    let mut json = serde_json::Deserializer::from_slice(payload);
    let top = Top {
        walk: &mut walk,
        index: None,
    };
    let parsed = top.deserialize(&mut json).and_then(|()| json.end());
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
        let wants: Vec<Want<'_>> = fields
            .iter()
            .map(|f| &**f)
            .chain(timestamp)
            .enumerate()
            .map(|(slot, path)| Want { slot, path })
            .collect();
        // Every leaf is a reading when no fields are configured, and besides them when
        // fields the config does not map are read too (`unknown_metrics`).
        let collect = fields.is_empty() || decoder.reads_unmapped();
        let start = self.out.len();
        let found = members(self, map, &wants, collect)?;
        let (values, time) = found.split_at(fields.len());
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
            (Some(found), Some(path)) => decoder.source_time(found.timestamp(decoder, path))?,
            _ => None,
        };
        // The leaves collected while walking, without those of keys that came again.
        self.out.remove(start, &mut self.dead);
        if decoder.fields.is_empty() {
            if self.out.len() == start {
                return Err(DecodeError::malformed("the object has no numeric field"));
            }
            self.out.set_source_time(start, source_time);
            return Ok(());
        }
        self.out.set_source_time(start, source_time);
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

    fn timestamp(&self, decoder: &Decoder, path: &str) -> Result<Millis, DecodeError> {
        let parsed = match self {
            Self::Number(n) => epoch_to_millis(*n),
            Self::Str(s) => decoder
                .text_time(s)
                .or_else(|| s.parse().ok().and_then(epoch_to_millis)),
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
            let text = match self {
                Self::Str(s) => Some(s.as_str()),
                _ => None,
            };
            decoder.bad_timestamp(path, &shown, text)
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
    // The wants this key's value is itself the value of.
    let mut captured: Vec<usize> = Vec::new();
    while let Some(Key(key)) = map.next_key::<Key<'de>>()? {
        let step = |head: &Head<'_>| matches!(head, Head::Key(k) if *k == key);
        route(wants, Some(&key), step, &mut captured, &mut child);
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
            capture: !captured.is_empty(),
            collect: leaves,
        })?;
        walk.path.truncate(parent_len);
        if let Some(found) = value.found {
            for &i in &captured {
                exact[i] = Some(Some(found.clone()));
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

/// Sorts the wants that reach one member or element, whose step `step` matches: those that
/// end there go to `captured`, those that go on inside it to `child` (relative to it). For
/// an object member, `key` also takes a plain path equal to the whole key, first.
fn route<'p>(
    wants: &[Want<'p>],
    key: Option<&str>,
    step: impl Fn(&Head<'_>) -> bool,
    captured: &mut Vec<usize>,
    child: &mut Vec<Want<'p>>,
) {
    captured.clear();
    child.clear();
    for (i, want) in wants.iter().enumerate() {
        if key == Some(want.path) && !want.path.contains('[') {
            captured.push(i);
        } else if let Some((head, rest)) = path::head(want.path)
            && step(&head)
        {
            if rest.is_empty() {
                captured.push(i);
            } else {
                child.push(Want {
                    slot: i,
                    path: rest,
                });
            }
        }
    }
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

    /// A leaf is collected unless a configured path or the timestamp takes it.
    fn number<E: de::Error>(self, value: f64) -> Result<Visited, E> {
        if self.collect
            && !self.capture
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
            && !self.capture
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

    /// An array's elements are read like an object's members, by index: `path[i]` names
    /// each numeric element when leaves are collected, and wanted paths reach in with
    /// `[i]`.
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Visited, A::Error> {
        let Member {
            walk,
            wants,
            capture,
            collect,
        } = self;
        let indexed = |want: &Want<'_>| matches!(path::head(want.path), Some((Head::Index(_), _)));
        let mut nested = vec![None; wants.len()];
        if !collect && !wants.iter().any(indexed) {
            while seq.next_element::<IgnoredAny>()?.is_some() {}
        } else {
            let mut child: Vec<Want<'_>> = Vec::new();
            let mut captured: Vec<usize> = Vec::new();
            for index in 0usize.. {
                let step = |head: &Head<'_>| matches!(head, Head::Index(i) if *i == index);
                route(wants, None, step, &mut captured, &mut child);
                let parent_len = walk.path.len();
                if collect {
                    walk.path.push('[');
                    walk.path.push_str(itoa::Buffer::new().format(index));
                    walk.path.push(']');
                }
                let element = seq.next_element_seed(Member {
                    walk: &mut *walk,
                    wants: &child,
                    capture: !captured.is_empty(),
                    collect,
                })?;
                walk.path.truncate(parent_len);
                let Some(value) = element else {
                    break;
                };
                if let Some(found) = value.found {
                    for &i in &captured {
                        nested[i] = Some(found.clone());
                    }
                }
                for (want, found) in child.iter().zip(value.nested) {
                    nested[want.slot] = found;
                }
            }
        }
        Ok(Visited {
            found: capture.then_some(Found::Other("an array")),
            nested,
        })
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

/// The document (`index` None): an object, or a non-empty array of objects; or one item of
/// that array (`index` its place), which must be an object.
struct Top<'w, 'd, 'o> {
    walk: &'w mut Walk<'d, 'o>,
    index: Option<usize>,
}

impl Top<'_, '_, '_> {
    fn not_an_object<E: de::Error>(self, kind: &str) -> Result<(), E> {
        let detail = match self.index {
            None => format!("expected a JSON object, found {kind}"),
            Some(i) => format!("array item {i} is {kind}, expected an object"),
        };
        Err(self.walk.refuse(DecodeError::malformed(detail)))
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
        self.walk.object(map, self.index)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        if self.index.is_some() {
            return self.not_an_object("an array");
        }
        let mut index = 0;
        while seq
            .next_element_seed(Top {
                walk: &mut *self.walk,
                index: Some(index),
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
