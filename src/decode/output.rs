//! What one payload may decode to: the readings a decoder finds, kept within the limits as
//! they are added.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use super::{DecodeLimits, truncate};
use crate::reading::{
    DecodeError, Decoding, FastSet, MAX_NAME_AMPLIFICATION, Millis, RawReading, RejectReason,
    Skipped,
};

/// The name bytes one payload may allocate: [`MAX_NAME_AMPLIFICATION`] times its size, and
/// sixteen names' worth besides, so that a small payload with a long path above a few
/// short keys (`{"site_north_building_3": {"floor_2": {"t1": 21.5, ...}}}`) is never
/// refused for it.
pub fn names_allowed(payload_len: usize, max_name_bytes: usize) -> usize {
    payload_len
        .saturating_mul(MAX_NAME_AMPLIFICATION)
        .saturating_add(max_name_bytes.saturating_mul(16))
}

/// The readings of one payload as a decoder finds them, kept within the limits: at most
/// `max_values` of them, names and units of at most `max_name_bytes` each, and names
/// allocated for this payload (each distinct one once) within [`names_allowed`]. A payload
/// past a limit is refused whole as soon as the decoder gets there, so what it costs stays
/// a small multiple of its size.
pub(crate) struct Output {
    readings: Vec<RawReading>,
    /// Values that are not readings, counted against `max_values` like readings.
    skipped: Skipped,
    max_values: usize,
    max_name_bytes: usize,
    /// Name bytes this payload may still allocate.
    name_budget: usize,
    /// The names and units allocated so far, each once.
    names: FastSet<Arc<str>>,
}

impl Output {
    pub(super) fn new(limits: &DecodeLimits, payload_len: usize) -> Self {
        let max_name_bytes = limits.max_name_bytes.load(Ordering::Relaxed);
        Self {
            readings: Vec::new(),
            skipped: Skipped::default(),
            max_values: limits.max_values.load(Ordering::Relaxed),
            max_name_bytes,
            name_budget: names_allowed(payload_len, max_name_bytes),
            names: FastSet::default(),
        }
    }

    /// Adds a reading.
    ///
    /// # Errors
    /// `too_many_values` past `max_values`.
    pub(crate) fn push(&mut self, reading: RawReading) -> Result<(), DecodeError> {
        self.room()?;
        self.readings.push(reading);
        Ok(())
    }

    /// Counts a value that cannot be a reading; `detail` names it.
    ///
    /// # Errors
    /// `too_many_values` past `max_values`.
    pub(crate) fn skip(&mut self, detail: impl FnOnce() -> String) -> Result<(), DecodeError> {
        self.room()?;
        self.skipped.add(detail);
        Ok(())
    }

    fn room(&self) -> Result<(), DecodeError> {
        if self.readings.len() + self.skipped.count as usize >= self.max_values {
            return Err(DecodeError::limit(
                RejectReason::TooManyValues,
                format!(
                    "the payload holds more than {} values (validation.max_values)",
                    self.max_values
                ),
            ));
        }
        Ok(())
    }

    /// Adds readings a decoder gathered on its own (of configured fields, whose names are
    /// the config's): without copying them when they are the first.
    ///
    /// # Errors
    /// `too_many_values` past `max_values`.
    pub(crate) fn take(&mut self, readings: Vec<RawReading>) -> Result<(), DecodeError> {
        if self.readings.is_empty() && readings.len() <= self.max_values {
            self.readings = readings;
            return Ok(());
        }
        readings.into_iter().try_for_each(|r| self.push(r))
    }

    /// A name (`what`: "metric name", "unit") for this payload's readings: the one allocated
    /// before when it repeats.
    ///
    /// # Errors
    /// `name_too_long` past `max_name_bytes`, or when this payload's names would take more
    /// than [`MAX_NAME_AMPLIFICATION`] times its size.
    pub(crate) fn name(&mut self, name: &str, what: &str) -> Result<Arc<str>, DecodeError> {
        self.check_name_len(name.len(), what, name)?;
        if let Some(known) = self.names.get(name) {
            return Ok(known.clone());
        }
        self.charge(name.len())?;
        let name: Arc<str> = Arc::from(name);
        self.names.insert(name.clone());
        Ok(name)
    }

    /// As [`Output::name`] for a name made of two parts, checked before they are joined.
    pub(crate) fn joined_name(&mut self, head: &str, tail: &str) -> Result<Arc<str>, DecodeError> {
        if tail.is_empty() {
            return self.name(head, "metric name");
        }
        self.check_name_len(head.len() + tail.len(), "metric name", head)?;
        let mut joined = String::with_capacity(head.len() + tail.len());
        joined.push_str(head);
        joined.push_str(tail);
        self.name(&joined, "metric name")
    }

    fn check_name_len(&self, len: usize, what: &str, text: &str) -> Result<(), DecodeError> {
        if len > self.max_name_bytes {
            return Err(DecodeError::limit(
                RejectReason::NameTooLong,
                format!(
                    "{what} `{}` is {len} bytes, longer than {} (validation.max_name_bytes)",
                    truncate(text),
                    self.max_name_bytes
                ),
            ));
        }
        Ok(())
    }

    fn charge(&mut self, bytes: usize) -> Result<(), DecodeError> {
        match self.name_budget.checked_sub(bytes) {
            Some(left) => {
                self.name_budget = left;
                Ok(())
            }
            None => Err(DecodeError::limit(
                RejectReason::NameTooLong,
                format!(
                    "the payload's metric names would take more than {MAX_NAME_AMPLIFICATION} \
                     times its own size (and 16 names of validation.max_name_bytes)"
                ),
            )),
        }
    }

    pub(super) fn len(&self) -> usize {
        self.readings.len()
    }

    /// Some value was counted as not a reading.
    pub(super) fn skipped_any(&self) -> bool {
        self.skipped.count > 0
    }

    /// Drops the readings in `dead` (ranges of indices at or after `from`), keeping the
    /// order of the others; empties `dead`.
    pub(super) fn remove(&mut self, from: usize, dead: &mut Vec<std::ops::Range<usize>>) {
        if dead.is_empty() {
            return;
        }
        // Ranges nest or follow each other; sorted by start, one pass drops them all.
        dead.sort_unstable_by_key(|range| range.start);
        let mut ranges = dead.iter().peekable();
        let mut dead_until = 0;
        let mut kept = from;
        for index in from..self.readings.len() {
            while let Some(range) = ranges.next_if(|range| range.start <= index) {
                dead_until = dead_until.max(range.end);
            }
            if index >= dead_until {
                self.readings.swap(kept, index);
                kept += 1;
            }
        }
        self.readings.truncate(kept);
        dead.clear();
    }

    /// Stamps the readings from index `from` on with `time`.
    pub(super) fn set_source_time(&mut self, from: usize, time: Option<Millis>) {
        for reading in &mut self.readings[from..] {
            reading.source_time = time;
        }
    }

    pub(super) fn finish(self) -> Decoding {
        Decoding {
            readings: self.readings,
            skipped: self.skipped,
        }
    }
}
