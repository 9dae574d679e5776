//! SenML JSON (RFC 8428): a pack of records; base name, base time and base unit carry over to
//! the records that follow.
//!
//! The pack is read one record at a time and never held whole: what a pack costs is its
//! readings, within the [`Output`] limits, whatever its records look like.

use std::fmt;
use std::sync::Arc;

use serde::Deserialize;
use serde::de::{self, DeserializeSeed, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};

use super::{Decoder, Output};
use crate::reading::{DecodeError, Millis, RawReading};

/// Times at or below 2^28 seconds are relative to now (RFC 8428 §4.5.3).
const RELATIVE_LIMIT: f64 = 268_435_456.0;

/// The SenML version this reads (RFC 8428's); a pack that needs a later one is refused.
const VERSION: f64 = 10.0;

/// One record's fields; a string or data value only by its presence, never copied.
#[derive(Default)]
struct Record {
    bn: Option<String>,
    bt: Option<f64>,
    bu: Option<String>,
    bv: Option<f64>,
    bver: Option<f64>,
    n: Option<String>,
    u: Option<String>,
    v: Option<f64>,
    vb: Option<bool>,
    /// A `vs` or `vd`.
    text_value: bool,
    /// How many of `v`, `vs`, `vb` and `vd` the record has; RFC 8428 allows one.
    values: u8,
    s: Option<f64>,
    t: Option<f64>,
    /// The first field whose name ends in `_`: one the reader must understand (RFC 8428
    /// §4.4), and none is defined that this reads.
    must_understand: Option<String>,
}

impl<'de> Deserialize<'de> for Record {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_map(RecordVisitor)
    }
}

struct RecordVisitor;

impl<'de> Visitor<'de> for RecordVisitor {
    type Value = Record;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a SenML record (an object)")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Record, A::Error> {
        let mut record = Record::default();
        while let Some(key) = map.next_key::<std::borrow::Cow<'de, str>>()? {
            match &*key {
                "bn" => record.bn = Some(map.next_value()?),
                "bt" => record.bt = Some(map.next_value()?),
                "bu" => record.bu = Some(map.next_value()?),
                "bv" => record.bv = Some(map.next_value()?),
                "bver" => record.bver = Some(map.next_value()?),
                "n" => record.n = Some(map.next_value()?),
                "u" => record.u = Some(map.next_value()?),
                "v" => {
                    record.v = Some(map.next_value()?);
                    record.values += 1;
                }
                "vb" => {
                    record.vb = Some(map.next_value()?);
                    record.values += 1;
                }
                "vs" | "vd" => {
                    map.next_value::<IgnoredAny>()?;
                    record.text_value = true;
                    record.values += 1;
                }
                "s" => record.s = Some(map.next_value()?),
                "t" => record.t = Some(map.next_value()?),
                _ => {
                    if key.ends_with('_') && record.must_understand.is_none() {
                        record.must_understand = Some(super::truncate(&key));
                    }
                    map.next_value::<IgnoredAny>()?;
                }
            }
        }
        Ok(record)
    }
}

pub(super) fn decode(
    decoder: &Decoder,
    payload: &[u8],
    now: Millis,
    out: &mut Output,
) -> Result<(), DecodeError> {
    let mut pack = Pack {
        decoder,
        now,
        out,
        base_name: Arc::from(""),
        base_time: 0.0,
        base_unit: None,
        base_value: 0.0,
        records: 0,
        error: None,
    };
    let mut json = serde_json::Deserializer::from_slice(payload);
    let parsed = (&mut pack).deserialize(&mut json).and_then(|()| json.end());
    if let Some(err) = pack.error {
        return Err(err);
    }
    parsed.map_err(|err| DecodeError::malformed(format!("invalid SenML JSON: {err}")))?;
    if pack.records == 0 {
        return Err(DecodeError::malformed("the SenML pack has no records"));
    }
    if pack.out.len() == 0 && !pack.out.skipped_any() {
        return Err(DecodeError::malformed(format!(
            "no record matches the configured fields ({})",
            decoder.fields.join(", ")
        )));
    }
    Ok(())
}

/// The state carried from record to record.
struct Pack<'d, 'o> {
    decoder: &'d Decoder,
    now: Millis,
    out: &'o mut Output,
    base_name: Arc<str>,
    base_time: f64,
    base_unit: Option<Arc<str>>,
    base_value: f64,
    records: usize,
    /// Why the pack was refused, where that was not the JSON itself.
    error: Option<DecodeError>,
}

impl<'de> DeserializeSeed<'de> for &mut Pack<'_, '_> {
    type Value = ();

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<(), D::Error> {
        deserializer.deserialize_seq(self)
    }
}

impl<'de> Visitor<'de> for &mut Pack<'_, '_> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a sequence")
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        while let Some(record) = seq.next_element::<Record>()? {
            let i = self.records;
            self.records += 1;
            if let Err(err) = self.record(i, record) {
                self.error = Some(err);
                return Err(de::Error::custom("refused"));
            }
        }
        Ok(())
    }
}

impl Pack<'_, '_> {
    fn record(&mut self, i: usize, record: Record) -> Result<(), DecodeError> {
        if let Some(field) = &record.must_understand {
            return Err(DecodeError::malformed(format!(
                "record {i} has `{field}`, a field that must be understood (its name ends in \
                 `_`, RFC 8428 §4.4) and is not"
            )));
        }
        if let Some(version) = record.bver.filter(|v| *v > VERSION) {
            return Err(DecodeError::malformed(format!(
                "record {i} needs SenML version {version} (bver); this reads version {VERSION}"
            )));
        }
        if record.values > 1 {
            return Err(DecodeError::malformed(format!(
                "record {i} has {} of the value fields v, vs, vb and vd; RFC 8428 allows one",
                record.values
            )));
        }
        if let Some(bn) = record.bn {
            if let Some(c) = bn.chars().find(|c| !name_char(*c)) {
                return Err(DecodeError::malformed(format!(
                    "record {i}: the base name `{}` has {c:?}, which SenML names may not hold \
                     (RFC 8428 §4.5.1: letters, digits and - : . / _)",
                    super::truncate(&bn)
                )));
            }
            self.base_name = self.out.name(&bn, "metric name")?;
        }
        if let Some(bt) = record.bt {
            self.base_time = bt;
        }
        if let Some(bu) = record.bu {
            self.base_unit = Some(self.out.name(&bu, "unit")?);
        }
        if let Some(bv) = record.bv {
            self.base_value = bv;
        }
        let tail = record.n.as_deref().unwrap_or("");
        if self.base_name.is_empty() && tail.is_empty() {
            return Err(DecodeError::malformed(format!(
                "record {i} has no name (n or bn)"
            )));
        }
        // The base name's characters were checked when it came: a long one is not read again
        // for every record.
        check_name(i, &self.base_name, tail)?;
        let value = match (record.v, record.vb, record.s) {
            (Some(v), _, _) => self.base_value + v,
            (None, Some(vb), _) => f64::from(u8::from(vb)),
            (None, None, Some(sum)) => sum,
            // Counted in the message's rejection; the pack's numbers are stored.
            (None, None, None) if record.text_value => {
                if self.decoder.fields.is_empty()
                    || self.decoder.reads_unmapped()
                    || self.configured(tail).is_some()
                {
                    let base = &self.base_name;
                    self.out.skip(|| {
                        format!(
                            "record {i} (`{}`) has a string or data value; only numbers are stored",
                            super::truncate(&format!("{base}{tail}"))
                        )
                    })?;
                }
                return Ok(());
            }
            (None, None, None) => return Ok(()),
        };
        // With fields configured, the name is one of them (no allocation); else the joined
        // name, allocated once per pack.
        let field = if self.decoder.fields.is_empty() {
            self.out.joined_name(&self.base_name, tail)?
        } else {
            match self.configured(tail) {
                Some(field) => field.clone(),
                None if self.decoder.reads_unmapped() => {
                    self.out.joined_name(&self.base_name, tail)?
                }
                None => return Ok(()),
            }
        };
        let time = self.base_time + record.t.unwrap_or(0.0);
        let source_time = if time == 0.0 {
            None
        } else if time.abs() <= RELATIVE_LIMIT {
            Some(self.now + (time * 1000.0).round() as Millis)
        } else {
            Some(seconds_to_millis(time).ok_or_else(|| {
                DecodeError::malformed(format!(
                    "record {i} (`{}`) has an invalid time {time}",
                    super::truncate(&field)
                ))
            })?)
        };
        let unit = match record.u {
            Some(u) => Some(self.out.name(&u, "unit")?),
            None => self.base_unit.clone(),
        };
        self.out.push(RawReading {
            field,
            value,
            unit,
            source_time,
        })
    }
}

impl Pack<'_, '_> {
    /// The configured field the record named `tail` (after the base name) is.
    fn configured(&self, tail: &str) -> Option<&Arc<str>> {
        let base = &*self.base_name;
        self.decoder.fields.iter().find(|f| {
            f.len() == base.len() + tail.len() && f.starts_with(base) && f.ends_with(tail)
        })
    }
}

/// RFC 8428 §4.5.1: a name (base name and name joined) is made of `A-Z a-z 0-9 - : . / _`
/// and starts with a letter or digit.
fn check_name(i: usize, base: &str, tail: &str) -> Result<(), DecodeError> {
    let first = base.chars().chain(tail.chars()).next();
    let bad = tail
        .chars()
        .find(|c| !name_char(*c))
        .or(first.filter(|c| !c.is_ascii_alphanumeric()));
    match bad {
        Some(c) => Err(DecodeError::malformed(format!(
            "record {i}: the name `{}` has {c:?}, which SenML names may not hold (RFC 8428 \
             §4.5.1: letters, digits and - : . / _, starting with a letter or digit)",
            super::truncate(&format!("{base}{tail}"))
        ))),
        None => Ok(()),
    }
}

fn name_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '-' | ':' | '.' | '/' | '_')
}

/// SenML times are always seconds.
fn seconds_to_millis(seconds: f64) -> Option<Millis> {
    let millis = (seconds * 1000.0).round();
    (0.0..1e16).contains(&millis).then_some(millis as Millis)
}
