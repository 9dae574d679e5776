//! Readings written as text, one way for every reader: CSV or NDJSON for `sensorgate export`
//! and `query`, and the JSON rows of the HTTP API. Formatted by hand into a buffer (a
//! device-day is 86,400 rows) and written in large pieces.

use std::io::Write;
use std::ops::ControlFlow;

use crate::decode::write_rfc3339;
use crate::reading::Millis;
use crate::storage::read::{Point, SeriesRow};

/// How times are written in JSON rows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TimeFormat {
    /// Epoch milliseconds.
    Millis,
    /// RFC 3339 strings in UTC.
    Rfc3339,
}

impl TimeFormat {
    pub fn write(self, buf: &mut String, time: Millis) {
        match self {
            Self::Millis => buf.push_str(itoa::Buffer::new().format(time)),
            Self::Rfc3339 => {
                buf.push('"');
                write_rfc3339(buf, time);
                buf.push('"');
            }
        }
    }
}

/// How readings are written as text.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RowFormat {
    /// `device,metric,unit,time,time_ms,value,received_at_ms,flags`, without the header.
    Csv,
    /// One JSON object per line.
    Ndjson,
    /// The same objects in one JSON array, opened and closed by the writer.
    JsonArray,
}

/// The CSV header of [`RowFormat::Csv`].
pub const CSV_HEADER: &str = "device,metric,unit,time,time_ms,value,received_at_ms,flags\n";

/// Readings of one device written to `sink` in a [`RowFormat`], formatted by hand into a
/// buffer (a device-day is 86,400 rows) and flushed in large writes.
pub struct RowWriter<W: Write> {
    sink: W,
    format: RowFormat,
    times: TimeFormat,
    device: String,
    buf: String,
    /// The start of each row of the current series.
    prefix: (Option<i64>, String),
    pub written: u64,
    failed: Option<std::io::Error>,
}

impl<W: Write> RowWriter<W> {
    pub fn new(sink: W, format: RowFormat, times: TimeFormat, device: &str) -> Self {
        let mut buf = String::with_capacity(70_000);
        if format == RowFormat::JsonArray {
            buf.push('[');
        }
        Self {
            sink,
            format,
            times,
            device: device.to_string(),
            buf,
            prefix: (None, String::new()),
            written: 0,
            failed: None,
        }
    }

    /// Writes one reading; breaks when the sink failed.
    pub fn row(&mut self, series: &SeriesRow, point: &Point) -> ControlFlow<()> {
        if self.prefix.0 != Some(series.id) {
            self.prefix = (Some(series.id), self.start_of_row(series));
        }
        let mut ints = itoa::Buffer::new();
        let mut floats = ryu::Buffer::new();
        let value = floats.format_finite(point.value);
        let buf = &mut self.buf;
        match self.format {
            RowFormat::Csv => {
                buf.push_str(&self.prefix.1);
                crate::decode::write_rfc3339(buf, point.time);
                buf.push(',');
                buf.push_str(ints.format(point.time));
                buf.push(',');
                buf.push_str(value);
                buf.push(',');
                buf.push_str(ints.format(point.received_at));
                buf.push(',');
                buf.push_str(ints.format(point.flags));
                buf.push('\n');
            }
            RowFormat::Ndjson | RowFormat::JsonArray => {
                if self.format == RowFormat::JsonArray && self.written > 0 {
                    buf.push(',');
                }
                buf.push_str(&self.prefix.1);
                self.times.write(buf, point.time);
                buf.push_str(",\"value\":");
                buf.push_str(value);
                buf.push_str(",\"received_at\":");
                self.times.write(buf, point.received_at);
                buf.push_str(",\"flags\":");
                buf.push_str(ints.format(point.flags));
                buf.push('}');
                if self.format == RowFormat::Ndjson {
                    buf.push('\n');
                }
            }
        }
        self.written += 1;
        if self.buf.len() >= 64 * 1024 {
            return self.flush();
        }
        ControlFlow::Continue(())
    }

    fn start_of_row(&self, series: &SeriesRow) -> String {
        match self.format {
            RowFormat::Csv => format!(
                "{},{},{},",
                csv_field(&self.device),
                csv_field(&series.metric),
                csv_field(series.unit.as_deref().unwrap_or(""))
            ),
            RowFormat::Ndjson | RowFormat::JsonArray => format!(
                "{{\"device\":{},\"metric\":{},\"unit\":{},\"time\":",
                json_string(&self.device),
                json_string(&series.metric),
                series.unit.as_deref().map_or("null".into(), json_string)
            ),
        }
    }

    fn flush(&mut self) -> ControlFlow<()> {
        if let Err(err) = self.sink.write_all(self.buf.as_bytes()) {
            self.failed = Some(err);
            return ControlFlow::Break(());
        }
        self.buf.clear();
        ControlFlow::Continue(())
    }

    /// Writes what is buffered (and closes a JSON array); the sink back, or why it failed.
    pub fn finish(mut self) -> std::io::Result<W> {
        if let Some(err) = self.failed.take() {
            return Err(err);
        }
        if self.format == RowFormat::JsonArray {
            self.buf.push(']');
        }
        self.sink.write_all(self.buf.as_bytes())?;
        Ok(self.sink)
    }
}

fn json_string(text: &str) -> String {
    serde_json::to_string(text).unwrap_or_else(|_| "\"\"".into())
}

fn csv_field(text: &str) -> std::borrow::Cow<'_, str> {
    if text.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", text.replace('"', "\"\"")).into()
    } else {
        text.into()
    }
}
