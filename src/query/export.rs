//! `sensorgate export`: readings as CSV or NDJSON, streamed page by page so memory stays flat
//! and no read transaction is held for long (a long one would keep the WAL from being
//! checkpointed while the gateway writes). A progress line goes to a terminal.

use std::io::{IsTerminal as _, Write};
use std::path::Path;
use std::time::{Duration, Instant};

use super::rows::{CSV_HEADER, RowFormat, RowWriter, TimeFormat};
use crate::reading::Millis;
use crate::storage::StorageError;
use crate::storage::read::{Cursor, Range, ReadStore, SeriesQuery, visit_readings};

/// Rows per read transaction.
const PAGE: u32 = 50_000;

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum ExportFormat {
    /// `device,metric,unit,time,time_ms,value,received_at_ms,flags` with a header.
    Csv,
    /// One JSON object per line.
    Ndjson,
}

/// What to export.
#[derive(Clone, Debug, PartialEq)]
pub struct Export {
    pub devices: Vec<String>,
    pub metric: Option<String>,
    pub from: Millis,
    pub to: Millis,
    pub format: ExportFormat,
}

#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    #[error(transparent)]
    Storage(#[from] StorageError),
    #[error("cannot write {target}: {source}")]
    Write {
        target: String,
        #[source]
        source: std::io::Error,
    },
}

type Sink = Box<dyn Write + Send>;

/// Writes every selected reading to `output` (standard output when `None`); returns how many.
///
/// # Errors
/// When a device does not exist, a query fails, or the output cannot be written.
pub async fn export(
    store: &ReadStore,
    export: Export,
    output: Option<&Path>,
) -> Result<u64, ExportError> {
    let target = output.map_or_else(
        || "standard output".to_string(),
        |p| p.display().to_string(),
    );
    let write_error = |source| ExportError::Write {
        target: target.clone(),
        source,
    };
    let mut sink: Sink = match output {
        Some(path) => Box::new(std::io::BufWriter::new(
            std::fs::File::create(path).map_err(write_error)?,
        )),
        None => Box::new(std::io::BufWriter::new(std::io::stdout())),
    };
    if export.format == ExportFormat::Csv {
        sink.write_all(CSV_HEADER.as_bytes()).map_err(write_error)?;
    }
    let mut progress = Progress::new(output.is_some() || !std::io::stdout().is_terminal());
    let mut total = 0u64;
    for (index, device) in export.devices.iter().enumerate() {
        let mut after: Option<Cursor> = None;
        loop {
            let query = SeriesQuery {
                device: device.clone(),
                metric: export.metric.clone(),
                range: Range {
                    from: export.from,
                    to: export.to,
                    limit: PAGE,
                },
                after,
            };
            let format = export.format;
            let (written, next, last_time, back) = store
                .run(move |conn| write_page(conn, &query, format, sink))
                .await?;
            sink = back.map_err(write_error)?;
            total += written;
            progress.show(device, index, export.devices.len(), total, || {
                (last_time - export.from) as f64 / (export.to - export.from).max(1) as f64
            });
            match next {
                Some(cursor) => after = Some(cursor),
                None => break,
            }
        }
    }
    sink.flush().map_err(write_error)?;
    progress.finish(total);
    Ok(total)
}

/// One page into `sink`: the rows written, where to continue, the last time seen, and the
/// sink back (or the write error that stopped it).
fn write_page(
    conn: &rusqlite::Connection,
    query: &SeriesQuery,
    format: ExportFormat,
    sink: Sink,
) -> Result<(u64, Option<Cursor>, Millis, std::io::Result<Sink>), StorageError> {
    let mut rows = RowWriter::new(sink, format.into(), TimeFormat::Millis, &query.device);
    let mut last_time = query.range.from;
    let next = visit_readings(conn, query, |series, point| {
        last_time = point.time;
        rows.row(series, point)
    })?;
    let written = rows.written;
    let sink = rows.finish();
    let next = if sink.is_ok() { next } else { None };
    Ok((written, next, last_time, sink))
}

impl From<ExportFormat> for RowFormat {
    fn from(format: ExportFormat) -> Self {
        match format {
            ExportFormat::Csv => Self::Csv,
            ExportFormat::Ndjson => Self::Ndjson,
        }
    }
}

/// A one-line progress display on stderr, only when stderr is a terminal and the data goes
/// elsewhere.
struct Progress {
    enabled: bool,
    last: Option<Instant>,
}

impl Progress {
    fn new(data_elsewhere: bool) -> Self {
        Self {
            enabled: data_elsewhere && std::io::stderr().is_terminal(),
            last: None,
        }
    }

    fn show(
        &mut self,
        device: &str,
        index: usize,
        devices: usize,
        rows: u64,
        done: impl Fn() -> f64,
    ) {
        if !self.enabled
            || self
                .last
                .is_some_and(|t| t.elapsed() < Duration::from_millis(100))
        {
            return;
        }
        self.last = Some(Instant::now());
        let overall = (index as f64 + done().clamp(0.0, 1.0)) / devices.max(1) as f64;
        let width = 30;
        let filled = (overall * width as f64) as usize;
        eprint!(
            "\r[{}{}] {:>3.0}%  {rows} readings  {device}\x1b[K",
            "#".repeat(filled),
            " ".repeat(width - filled.min(width)),
            overall * 100.0
        );
    }

    fn finish(&self, rows: u64) {
        if self.enabled {
            eprintln!("\r{rows} readings exported\x1b[K");
        }
    }
}
