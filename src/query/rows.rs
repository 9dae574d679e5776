//! Rows written as text, one way for every reader: readings as CSV or NDJSON for `sensorgate
//! export` and `query`, readings and rollup buckets as the JSON rows of the HTTP API.
//! Formatted by hand into a buffer (a device-day is 86,400 rows, a month of 1-minute rollups
//! 43,200) and written in large pieces.

use std::io::Write;
use std::ops::ControlFlow;

use crate::decode::write_rfc3339;
use crate::reading::Millis;
use crate::storage::read::{Bucket, Point, SeriesRow};

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

/// A text buffer written to `sink` in large pieces; the first failed write is kept.
struct Out<W: Write> {
    sink: W,
    buf: String,
    failed: Option<std::io::Error>,
}

/// Buffered text is written once it reaches this size.
const WRITE_AT: usize = 64 * 1024;

impl<W: Write> Out<W> {
    fn new(sink: W, opening: &str) -> Self {
        let mut buf = String::with_capacity(WRITE_AT + 1024);
        buf.push_str(opening);
        Self {
            sink,
            buf,
            failed: None,
        }
    }

    /// Writes the buffer once it is full; breaks when the sink failed.
    fn row_done(&mut self) -> ControlFlow<()> {
        if self.buf.len() < WRITE_AT {
            return ControlFlow::Continue(());
        }
        if let Err(err) = self.sink.write_all(self.buf.as_bytes()) {
            self.failed = Some(err);
            return ControlFlow::Break(());
        }
        self.buf.clear();
        ControlFlow::Continue(())
    }

    /// Writes what is buffered and `closing`; the sink back, or why writing failed.
    fn finish(mut self, closing: &str) -> std::io::Result<W> {
        if let Some(err) = self.failed.take() {
            return Err(err);
        }
        self.buf.push_str(closing);
        self.sink.write_all(self.buf.as_bytes())?;
        Ok(self.sink)
    }
}

/// Readings of one device written to `sink` in a [`RowFormat`].
pub struct RowWriter<W: Write> {
    out: Out<W>,
    format: RowFormat,
    times: TimeFormat,
    device: String,
    /// The start of each row of the current series.
    prefix: (Option<i64>, String),
    pub written: u64,
}

impl<W: Write> RowWriter<W> {
    pub fn new(sink: W, format: RowFormat, times: TimeFormat, device: &str) -> Self {
        let opening = if format == RowFormat::JsonArray {
            "["
        } else {
            ""
        };
        Self {
            out: Out::new(sink, opening),
            format,
            times,
            device: device.to_string(),
            prefix: (None, String::new()),
            written: 0,
        }
    }

    /// Writes one reading; breaks when the sink failed.
    pub fn row(&mut self, series: &SeriesRow, point: &Point) -> ControlFlow<()> {
        if self.prefix.0 != Some(series.id) {
            self.prefix = (Some(series.id), self.start_of_row(series));
        }
        let mut ints = itoa::Buffer::new();
        let mut floats = zmij::Buffer::new();
        let value = floats.format_finite(point.value);
        let buf = &mut self.out.buf;
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
        self.out.row_done()
    }

    fn start_of_row(&self, series: &SeriesRow) -> String {
        match self.format {
            RowFormat::Csv => format!(
                "{},{},{},",
                csv_field(&self.device),
                csv_field(&series.metric),
                csv_field(series.unit.as_deref().unwrap_or(""))
            ),
            RowFormat::Ndjson | RowFormat::JsonArray => json_start_of_row(&self.device, series),
        }
    }

    /// Writes what is buffered (and closes a JSON array); the sink back, or why it failed.
    pub fn finish(self) -> std::io::Result<W> {
        let closing = if self.format == RowFormat::JsonArray {
            "]"
        } else {
            ""
        };
        self.out.finish(closing)
    }
}

/// Rollup buckets of one device, all of one window, as the JSON array of the API's rows.
pub struct BucketWriter<W: Write> {
    out: Out<W>,
    times: TimeFormat,
    device: String,
    width_ms: Millis,
    prefix: (Option<i64>, String),
    written: u64,
}

impl<W: Write> BucketWriter<W> {
    pub fn new(sink: W, times: TimeFormat, device: &str, width_ms: Millis) -> Self {
        Self {
            out: Out::new(sink, "["),
            times,
            device: device.to_string(),
            width_ms,
            prefix: (None, String::new()),
            written: 0,
        }
    }

    /// Writes one bucket; breaks when the sink failed.
    pub fn row(&mut self, series: &SeriesRow, b: &Bucket) -> ControlFlow<()> {
        if self.prefix.0 != Some(series.id) {
            self.prefix = (Some(series.id), json_start_of_row(&self.device, series));
        }
        let mut ints = itoa::Buffer::new();
        let mut floats = zmij::Buffer::new();
        let buf = &mut self.out.buf;
        if self.written > 0 {
            buf.push(',');
        }
        buf.push_str(&self.prefix.1);
        self.times.write(buf, b.bucket);
        // Pushed piece by piece: `write!` would go through the formatting machinery for
        // each of 43,200 rows in a month of minutes.
        buf.push_str(",\"window_ms\":");
        buf.push_str(ints.format(self.width_ms));
        buf.push_str(",\"count\":");
        buf.push_str(ints.format(b.count));
        for (name, value) in [
            (",\"min\":", b.min),
            (",\"max\":", b.max),
            (",\"mean\":", b.mean),
            (",\"sum\":", b.sum),
            (",\"first\":", b.first),
            (",\"last\":", b.last),
        ] {
            buf.push_str(name);
            // A sum can overflow to infinity; JSON has no such number, and serde_json
            // writes null for it elsewhere in the API.
            buf.push_str(if value.is_finite() {
                floats.format_finite(value)
            } else {
                "null"
            });
        }
        buf.push('}');
        self.written += 1;
        self.out.row_done()
    }

    /// Writes what is buffered and closes the array; the sink back, or why it failed.
    pub fn finish(self) -> std::io::Result<W> {
        self.out.finish("]")
    }
}

/// `{"device":..,"metric":..,"unit":..,"time":`, the start of each JSON row of a series.
fn json_start_of_row(device: &str, series: &SeriesRow) -> String {
    format!(
        "{{\"device\":{},\"metric\":{},\"unit\":{},\"time\":",
        json_string(device),
        json_string(&series.metric),
        series.unit.as_deref().map_or("null".into(), json_string)
    )
}

/// `text` as a JSON string, quoted and escaped.
pub(super) fn json_string(text: &str) -> String {
    serde_json::to_string(text).unwrap_or_else(|_| "\"\"".into())
}

fn csv_field(text: &str) -> std::borrow::Cow<'_, str> {
    if text.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", text.replace('"', "\"\"")).into()
    } else {
        text.into()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    type TestResult = Result<(), Box<dyn std::error::Error>>;

    fn series(id: i64, metric: &str, unit: Option<&str>) -> SeriesRow {
        SeriesRow {
            id,
            metric: metric.into(),
            unit: unit.map(Into::into),
        }
    }

    fn bucket(at: Millis, count: i64, value: f64) -> Bucket {
        Bucket {
            bucket: at,
            count,
            min: value - 1.0,
            max: value + 1.0,
            mean: value,
            sum: value * count as f64,
            first: value - 0.5,
            last: value + 0.25,
        }
    }

    /// Accepts `room` bytes, then fails every write.
    #[derive(Debug)]
    struct Full {
        room: usize,
    }

    impl Write for Full {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            if buf.len() > self.room {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::BrokenPipe,
                    "client went away",
                ));
            }
            self.room -= buf.len();
            Ok(buf.len())
        }

        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn buckets_of_several_series_are_one_json_array_with_exact_values() -> TestResult {
        let temp = series(1, "temperature", Some("°C"));
        let odd = series(2, "a \"quoted\" metric", None);
        let mut rows = BucketWriter::new(Vec::new(), TimeFormat::Millis, "bay-3", 60_000);
        let written = [
            (&temp, bucket(60_000, 60, 21.37)),
            (&temp, bucket(120_000, 59, -0.1)),
            (&odd, bucket(60_000, 1, 1e21)),
        ];
        for (s, b) in &written {
            assert!(rows.row(s, b).is_continue());
        }
        let text = rows.finish()?;
        let parsed: Vec<serde_json::Value> = serde_json::from_slice(&text)?;
        assert_eq!(parsed.len(), written.len());
        for (row, (s, b)) in parsed.iter().zip(&written) {
            assert_eq!(row["device"], "bay-3");
            assert_eq!(row["metric"], s.metric.as_str());
            assert_eq!(row["unit"].as_str(), s.unit.as_deref());
            assert_eq!(row["time"], b.bucket);
            assert_eq!(row["window_ms"], 60_000);
            assert_eq!(row["count"], b.count);
            for (name, value) in [
                ("min", b.min),
                ("max", b.max),
                ("mean", b.mean),
                ("sum", b.sum),
                ("first", b.first),
                ("last", b.last),
            ] {
                assert_eq!(row[name].as_f64(), Some(value), "{name} of {row}");
            }
        }
        Ok(())
    }

    #[test]
    fn a_sum_that_overflowed_is_null() -> TestResult {
        let mut rows = BucketWriter::new(Vec::new(), TimeFormat::Millis, "d", 60_000);
        let mut huge = bucket(0, 2, f64::MAX);
        huge.sum = f64::INFINITY;
        assert!(rows.row(&series(1, "m", None), &huge).is_continue());
        let parsed: Vec<serde_json::Value> = serde_json::from_slice(&rows.finish()?)?;
        assert!(parsed[0]["sum"].is_null(), "{}", parsed[0]);
        assert_eq!(parsed[0]["mean"].as_f64(), Some(f64::MAX));
        Ok(())
    }

    #[test]
    fn an_empty_page_is_an_empty_array() -> TestResult {
        let rows = BucketWriter::new(Vec::new(), TimeFormat::Rfc3339, "d", 60_000);
        assert_eq!(rows.finish()?, b"[]");
        let rows = RowWriter::new(Vec::new(), RowFormat::JsonArray, TimeFormat::Millis, "d");
        assert_eq!(rows.finish()?, b"[]");
        Ok(())
    }

    #[test]
    fn a_failed_write_stops_the_rows_and_is_returned() {
        let s = series(1, "power", Some("W"));
        let mut rows = BucketWriter::new(Full { room: 1000 }, TimeFormat::Millis, "m", 60_000);
        let mut taken = 0;
        while rows.row(&s, &bucket(taken * 60_000, 60, 1.5)).is_continue() {
            taken += 1;
            assert!(taken < 10_000, "the writer never noticed the failure");
        }
        let failed = rows.finish().map(|_| ()).map_err(|err| err.kind());
        assert_eq!(failed, Err(std::io::ErrorKind::BrokenPipe));

        let point = Point {
            time: 1,
            value: 2.5,
            received_at: 3,
            flags: 0,
        };
        let mut rows = RowWriter::new(
            Full { room: 1000 },
            RowFormat::Ndjson,
            TimeFormat::Millis,
            "m",
        );
        let mut taken = 0;
        while rows.row(&s, &point).is_continue() {
            taken += 1;
            assert!(taken < 10_000, "the writer never noticed the failure");
        }
        assert!(rows.finish().is_err());
    }
}
