//! Read queries for `sensorgate devices | query | export` and the HTTP API: one query layer
//! for both. Queries run on read-only connections of their own, on blocking threads, and
//! never take the write lock, so they never slow ingest; WAL lets them read while the writer
//! commits. Ranges are visited row by row, so a large one can be streamed instead of held.
//!
//! The read side uses rusqlite rather than sqlx: a range of 86,400 readings costs about
//! 2.5 times less through it (sqlx copies every value of every row into its own allocation
//! and sends each row across a channel), which is what keeps a device-day under the 50 ms
//! budget.

use std::fmt;
use std::ops::ControlFlow;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rusqlite::{Connection, OpenFlags, OptionalExtension as _, params};
use serde::Serialize;
use tokio::sync::Semaphore;

use super::StorageError;
use crate::reading::Millis;

/// Connections kept open for queries; more queries than this wait their turn.
const CONNECTIONS: usize = 4;
/// Page cache of each read connection, in KiB: at most `CONNECTIONS` times this in all.
const CACHE_KIB: u32 = 8 * 1024;

#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct DeviceRow {
    pub name: String,
    pub kind: String,
    pub state: String,
    pub state_since: Option<Millis>,
    pub last_error: Option<String>,
    pub last_seen: Option<Millis>,
    pub readings: i64,
    pub rejections: i64,
    pub duplicates: i64,
    pub dropped: i64,
    /// Connections (port opens) that failed or broke.
    pub reconnects: i64,
    /// Requests without an answer in time.
    pub timeouts: i64,
    /// Garbled answers: bad CRC or not a valid frame.
    pub crc_errors: i64,
    /// Modbus exception responses.
    pub exceptions: i64,
}

/// The newest reading of one series.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct LastValue {
    pub device: String,
    pub metric: String,
    pub unit: Option<String>,
    pub time: Millis,
    pub value: f64,
}

/// One metric of one device.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct SeriesRow {
    #[serde(skip)]
    pub id: i64,
    pub metric: String,
    pub unit: Option<String>,
}

/// One stored reading of a series.
#[derive(Clone, Copy, Debug, Serialize, PartialEq)]
pub struct Point {
    pub time: Millis,
    pub value: f64,
    pub received_at: Millis,
    /// 1: `time` is the receive time; 2: the source's clock was skewed.
    pub flags: i64,
}

/// One rollup bucket of a series.
#[derive(Clone, Copy, Debug, Serialize, PartialEq)]
pub struct Bucket {
    pub bucket: Millis,
    pub count: i64,
    pub min: f64,
    pub max: f64,
    pub mean: f64,
    pub sum: f64,
    pub first: f64,
    pub last: f64,
}

/// A reading with its device and metric, as the CLI prints it. The names are shared by every
/// row of a series.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct ReadingRow {
    pub device: Arc<str>,
    pub metric: Arc<str>,
    pub unit: Option<Arc<str>>,
    pub time: Millis,
    pub received_at: Millis,
    pub value: f64,
    pub flags: i64,
}

#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct RollupRow {
    pub device: Arc<str>,
    pub metric: Arc<str>,
    pub unit: Option<Arc<str>>,
    pub bucket: Millis,
    pub width_ms: Millis,
    pub count: i64,
    pub min: f64,
    pub max: f64,
    pub mean: f64,
    pub first: f64,
    pub last: f64,
}

#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct RejectionRow {
    pub id: i64,
    pub received_at: Millis,
    pub device: Option<String>,
    pub source: String,
    pub reason: String,
    pub detail: String,
    /// The first [`RAW_PREVIEW`] bytes of the stored raw bytes.
    pub preview: Vec<u8>,
    /// The bytes stored: the whole input, or its prefix when it was too large.
    pub stored: i64,
    /// The input's size.
    pub size: i64,
    /// How many values the row stands for.
    pub values: i64,
}

/// How much of a rejection's raw bytes a listing carries; the rest is one request away
/// ([`ReadStore::rejection_raw`]), so a listing costs about its rows, not their payloads.
pub const RAW_PREVIEW: usize = 256;

/// A half-open time range `[from, to)` and a row limit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Range {
    pub from: Millis,
    pub to: Millis,
    pub limit: u32,
}

/// Readings or rollups of one device (one metric, or all), metric by metric and oldest
/// first within each, continuing after `after`.
#[derive(Clone, Debug, PartialEq)]
pub struct SeriesQuery {
    pub device: String,
    pub metric: Option<String>,
    pub range: Range,
    pub after: Option<Cursor>,
}

/// Where a page ended: the last row's series and time. Opaque to API clients.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Cursor {
    series: i64,
    time: Millis,
}

impl fmt::Display for Cursor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}", self.series, self.time)
    }
}

impl FromStr for Cursor {
    type Err = StorageError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let bad = || StorageError::BadCursor(text.to_string());
        let (series, time) = text.split_once('.').ok_or_else(bad)?;
        Ok(Self {
            series: series.parse().map_err(|_| bad())?,
            time: time.parse().map_err(|_| bad())?,
        })
    }
}

/// Read-only access to a gateway database.
#[derive(Clone)]
pub struct ReadStore {
    inner: Arc<Pool>,
}

struct Pool {
    path: PathBuf,
    idle: Mutex<Vec<Connection>>,
    permits: Semaphore,
}

impl ReadStore {
    /// Opens an existing database read-only.
    ///
    /// # Errors
    /// When the file does not exist, cannot be read, or is not a sensorgate database.
    pub fn open(path: &Path) -> Result<Self, StorageError> {
        let first = connect(path)?;
        let tables: i64 = first
            .query_row(
                "SELECT count(*) FROM sqlite_master WHERE type IN ('table', 'view') AND name IN ('devices', 'readings')",
                [],
                |r| r.get(0),
            )
            .map_err(|source| open_error(path, source))?;
        if tables != 2 {
            return Err(StorageError::NotSensorgate(path.display().to_string()));
        }
        Ok(Self {
            inner: Arc::new(Pool {
                path: path.to_path_buf(),
                idle: Mutex::new(vec![first]),
                permits: Semaphore::new(CONNECTIONS),
            }),
        })
    }

    /// Runs `query` on a read-only connection on a blocking thread.
    ///
    /// # Errors
    /// Whatever `query` returns, or a failure to open a connection.
    pub async fn run<R, F>(&self, query: F) -> Result<R, StorageError>
    where
        R: Send + 'static,
        F: FnOnce(&Connection) -> Result<R, StorageError> + Send + 'static,
    {
        let _permit = self
            .inner
            .permits
            .acquire()
            .await
            .map_err(|_| StorageError::Closed)?;
        let pool = self.inner.clone();
        tokio::task::spawn_blocking(move || {
            let conn = match lock(&pool.idle).pop() {
                Some(conn) => conn,
                None => connect(&pool.path)?,
            };
            let result = query(&conn);
            lock(&pool.idle).push(conn);
            result
        })
        .await
        .map_err(|_| StorageError::Closed)?
    }

    /// Every device with its state and counters, by name.
    ///
    /// # Errors
    /// When the query fails.
    pub async fn devices(&self) -> Result<Vec<DeviceRow>, StorageError> {
        self.run(|conn| devices(conn, None)).await
    }

    /// One device.
    ///
    /// # Errors
    /// [`StorageError::UnknownDevice`] when there is no such device.
    pub async fn device(&self, name: &str) -> Result<DeviceRow, StorageError> {
        let name = name.to_string();
        self.run(move |conn| {
            devices(conn, Some(&name))?
                .pop()
                .ok_or(StorageError::UnknownDevice(name))
        })
        .await
    }

    /// The newest reading of every series (of one device, or all).
    ///
    /// # Errors
    /// When the query fails.
    pub async fn last_values(&self, device: Option<&str>) -> Result<Vec<LastValue>, StorageError> {
        let device = device.map(str::to_string);
        self.run(move |conn| last_values(conn, device.as_deref()))
            .await
    }

    /// Raw readings as rows, for the CLI.
    ///
    /// # Errors
    /// [`StorageError::UnknownDevice`] when no such device was ever stored.
    pub async fn readings(&self, query: SeriesQuery) -> Result<Vec<ReadingRow>, StorageError> {
        self.run(move |conn| {
            let mut rows = Vec::new();
            let device: Arc<str> = query.device.as_str().into();
            let mut names = Names::default();
            visit_readings(conn, &query, |series, point| {
                let (metric, unit) = names.of(series);
                rows.push(ReadingRow {
                    device: device.clone(),
                    metric,
                    unit,
                    time: point.time,
                    received_at: point.received_at,
                    value: point.value,
                    flags: point.flags,
                });
                ControlFlow::Continue(())
            })?;
            Ok(rows)
        })
        .await
    }

    /// Rollups of one window width as rows, for the CLI.
    ///
    /// # Errors
    /// [`StorageError::UnknownDevice`] when no such device was ever stored.
    pub async fn rollups(
        &self,
        query: SeriesQuery,
        width_ms: Millis,
    ) -> Result<Vec<RollupRow>, StorageError> {
        self.run(move |conn| {
            let mut rows = Vec::new();
            let device: Arc<str> = query.device.as_str().into();
            let mut names = Names::default();
            visit_rollups(conn, &query, width_ms, |series, b| {
                let (metric, unit) = names.of(series);
                rows.push(RollupRow {
                    device: device.clone(),
                    metric,
                    unit,
                    bucket: b.bucket,
                    width_ms,
                    count: b.count,
                    min: b.min,
                    max: b.max,
                    mean: b.mean,
                    first: b.first,
                    last: b.last,
                });
                ControlFlow::Continue(())
            })?;
            Ok(rows)
        })
        .await
    }

    /// Rejections, newest first, of one device or all, with one reason or any.
    ///
    /// # Errors
    /// When the query fails.
    pub async fn rejections(
        &self,
        device: Option<&str>,
        reason: Option<&str>,
        range: Range,
    ) -> Result<Vec<RejectionRow>, StorageError> {
        let device = device.map(str::to_string);
        let reason = reason.map(str::to_string);
        self.run(move |conn| rejections(conn, device.as_deref(), reason.as_deref(), range))
            .await
    }

    /// One rejection's stored raw bytes; `None` when there is no such rejection.
    ///
    /// # Errors
    /// When the query fails.
    pub async fn rejection_raw(&self, id: i64) -> Result<Option<Vec<u8>>, StorageError> {
        self.run(move |conn| {
            let raw = conn
                .prepare_cached("SELECT raw FROM rejections WHERE id = ?1")?
                .query_row(params![id], |r| r.get(0))
                .optional()?;
            Ok(raw)
        })
        .await
    }
}

/// A series' metric and unit as shared strings, made once per series.
#[derive(Default)]
struct Names {
    series: Option<i64>,
    metric: Option<Arc<str>>,
    unit: Option<Arc<str>>,
}

impl Names {
    fn of(&mut self, series: &SeriesRow) -> (Arc<str>, Option<Arc<str>>) {
        if self.series != Some(series.id) {
            self.series = Some(series.id);
            self.metric = Some(series.metric.as_str().into());
            self.unit = series.unit.as_deref().map(Arc::from);
        }
        let metric = self
            .metric
            .clone()
            .unwrap_or_else(|| series.metric.as_str().into());
        (metric, self.unit.clone())
    }
}

fn connect(path: &Path) -> Result<Connection, StorageError> {
    let conn = Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .map_err(|source| open_error(path, source))?;
    conn.busy_timeout(Duration::from_secs(5))
        .map_err(|source| open_error(path, source))?;
    // A month of one series' 1-minute rollups is about 4 MiB of pages; with SQLite's default
    // 2 MiB cache every such query would read them all from the file again.
    conn.pragma_update(None, "cache_size", -(CACHE_KIB as i64))
        .map_err(|source| open_error(path, source))?;
    Ok(conn)
}

fn open_error(path: &Path, source: rusqlite::Error) -> StorageError {
    StorageError::OpenRead {
        path: path.display().to_string(),
        source,
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // The idle list holds whole connections; a panic elsewhere cannot leave it half-updated.
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Devices by name; one when `name` is given.
///
/// # Errors
/// When the query fails.
pub fn devices(conn: &Connection, name: Option<&str>) -> Result<Vec<DeviceRow>, StorageError> {
    let mut stmt = conn.prepare_cached(
        "SELECT name, kind, state, state_since, last_error, last_seen, readings, rejections, \
         duplicates, dropped, reconnects, timeouts, crc_errors, exceptions \
         FROM devices WHERE ?1 IS NULL OR name = ?1 ORDER BY name",
    )?;
    let rows = stmt.query_map([name], |r| {
        Ok(DeviceRow {
            name: r.get(0)?,
            kind: r.get(1)?,
            state: r.get(2)?,
            state_since: r.get(3)?,
            last_error: r.get(4)?,
            last_seen: r.get(5)?,
            readings: r.get(6)?,
            rejections: r.get(7)?,
            duplicates: r.get(8)?,
            dropped: r.get(9)?,
            reconnects: r.get(10)?,
            timeouts: r.get(11)?,
            crc_errors: r.get(12)?,
            exceptions: r.get(13)?,
        })
    })?;
    Ok(rows.collect::<Result<_, _>>()?)
}

/// The newest reading of every series, of one device or all, by device and metric.
///
/// # Errors
/// When the query fails.
pub fn last_values(
    conn: &Connection,
    device: Option<&str>,
) -> Result<Vec<LastValue>, StorageError> {
    // The newest time per series: from the archive by key, from the few recent readings
    // by one scan (the recent table is keyed by time, so a lookup per series would scan it
    // once per series).
    let mut stmt = conn.prepare_cached(
        "WITH newest (series_id, ts) AS ( \
             SELECT series_id, max(ts) FROM ( \
                 SELECT s.id AS series_id, \
                        (SELECT max(ts) FROM readings_archive WHERE series_id = s.id) AS ts \
                 FROM series s \
                 UNION ALL \
                 SELECT series_id, max(ts) FROM readings_recent GROUP BY series_id) \
             WHERE ts IS NOT NULL GROUP BY series_id) \
         SELECT d.name, s.metric, s.unit, r.ts, r.value FROM newest n \
         JOIN series s ON s.id = n.series_id \
         JOIN devices d ON d.id = s.device_id \
         JOIN readings r ON r.series_id = n.series_id AND r.ts = n.ts \
         WHERE ?1 IS NULL OR d.name = ?1 ORDER BY d.name, s.metric",
    )?;
    let rows = stmt.query_map([device], |r| {
        Ok(LastValue {
            device: r.get(0)?,
            metric: r.get(1)?,
            unit: r.get(2)?,
            time: r.get(3)?,
            value: r.get(4)?,
        })
    })?;
    Ok(rows.collect::<Result<_, _>>()?)
}

/// The series of a device (one metric, or all), by metric name.
///
/// # Errors
/// [`StorageError::UnknownDevice`] when the device was never stored.
pub fn series_of(
    conn: &Connection,
    device: &str,
    metric: Option<&str>,
) -> Result<Vec<SeriesRow>, StorageError> {
    let found: Option<i64> = conn
        .prepare_cached("SELECT id FROM devices WHERE name = ?1")?
        .query_row([device], |r| r.get(0))
        .optional()?;
    let Some(device_id) = found else {
        return Err(StorageError::UnknownDevice(device.to_string()));
    };
    let mut stmt = conn.prepare_cached(
        "SELECT id, metric, unit FROM series WHERE device_id = ?1 AND (?2 IS NULL OR metric = ?2) \
         ORDER BY metric",
    )?;
    let rows = stmt.query_map(params![device_id, metric], |r| {
        Ok(SeriesRow {
            id: r.get(0)?,
            metric: r.get(1)?,
            unit: r.get(2)?,
        })
    })?;
    Ok(rows.collect::<Result<_, _>>()?)
}

/// Where each series' rows start: after the cursor in its own series, at `from` in the
/// series after it.
fn start_at<'s>(
    series: &'s [SeriesRow],
    query: &SeriesQuery,
) -> Result<impl Iterator<Item = (&'s SeriesRow, Millis)>, StorageError> {
    let first = match query.after {
        Some(cursor) => series
            .iter()
            .position(|s| s.id == cursor.series)
            .ok_or_else(|| StorageError::BadCursor(cursor.to_string()))?,
        None => 0,
    };
    let from = query.range.from;
    Ok(series[first..].iter().map(move |s| match query.after {
        Some(cursor) if cursor.series == s.id => (s, cursor.time.saturating_add(1).max(from)),
        _ => (s, from),
    }))
}

/// Calls `visit` with each reading `query` selects, metric by metric, oldest first, at most
/// `query.range.limit` of them (or until `visit` breaks).
///
/// # Errors
/// [`StorageError::UnknownDevice`], [`StorageError::BadCursor`], or a failed query.
///
/// Returns the cursor to continue from when more rows remain.
pub fn visit_readings(
    conn: &Connection,
    query: &SeriesQuery,
    mut visit: impl FnMut(&SeriesRow, &Point) -> ControlFlow<()>,
) -> Result<Option<Cursor>, StorageError> {
    let series = series_of(conn, &query.device, query.metric.as_deref())?;
    let mut stmt = conn.prepare_cached(
        "SELECT ts, received_at, value, flags FROM readings \
         WHERE series_id = ?1 AND ts >= ?2 AND ts < ?3 ORDER BY ts LIMIT ?4",
    )?;
    let mut left = i64::from(query.range.limit);
    let mut last: Option<Cursor> = None;
    for (s, from) in start_at(&series, query)? {
        // One more than is left: a row beyond the limit means another page.
        let mut rows = stmt.query(params![s.id, from, query.range.to, left + 1])?;
        while let Some(row) = rows.next()? {
            if left == 0 {
                return Ok(last);
            }
            let point = Point {
                time: row.get(0)?,
                received_at: row.get(1)?,
                value: row.get(2)?,
                flags: row.get(3)?,
            };
            left -= 1;
            last = Some(Cursor {
                series: s.id,
                time: point.time,
            });
            if visit(s, &point).is_break() {
                return Ok(last);
            }
        }
    }
    Ok(None)
}

/// Calls `visit` with each rollup bucket of width `width_ms` that `query` selects, like
/// [`visit_readings`].
///
/// # Errors
/// As [`visit_readings`].
pub fn visit_rollups(
    conn: &Connection,
    query: &SeriesQuery,
    width_ms: Millis,
    mut visit: impl FnMut(&SeriesRow, &Bucket) -> ControlFlow<()>,
) -> Result<Option<Cursor>, StorageError> {
    let series = series_of(conn, &query.device, query.metric.as_deref())?;
    let mut stmt = conn.prepare_cached(
        "SELECT bucket, n, min_v, max_v, sum_v, first_v, last_v FROM rollups \
         WHERE series_id = ?1 AND width_ms = ?2 AND bucket >= ?3 AND bucket < ?4 \
         ORDER BY bucket LIMIT ?5",
    )?;
    let mut left = i64::from(query.range.limit);
    let mut last: Option<Cursor> = None;
    for (s, from) in start_at(&series, query)? {
        let mut rows = stmt.query(params![s.id, width_ms, from, query.range.to, left + 1])?;
        while let Some(row) = rows.next()? {
            if left == 0 {
                return Ok(last);
            }
            let count: i64 = row.get(1)?;
            let sum: f64 = row.get(4)?;
            let bucket = Bucket {
                bucket: row.get(0)?,
                count,
                min: row.get(2)?,
                max: row.get(3)?,
                mean: sum / count.max(1) as f64,
                sum,
                first: row.get(5)?,
                last: row.get(6)?,
            };
            left -= 1;
            last = Some(Cursor {
                series: s.id,
                time: bucket.bucket,
            });
            if visit(s, &bucket).is_break() {
                return Ok(last);
            }
        }
    }
    Ok(None)
}

/// Rejections, newest first.
///
/// # Errors
/// When the query fails.
pub fn rejections(
    conn: &Connection,
    device: Option<&str>,
    reason: Option<&str>,
    range: Range,
) -> Result<Vec<RejectionRow>, StorageError> {
    let mut stmt = conn.prepare_cached(
        "SELECT j.id, j.received_at, d.name, j.source, j.reason, j.detail, \
         substr(j.raw, 1, ?6), length(j.raw), coalesce(j.size, length(j.raw)), j.value_count \
         FROM rejections j LEFT JOIN devices d ON d.id = j.device_id \
         WHERE (?1 IS NULL OR d.name = ?1) AND (?2 IS NULL OR j.reason = ?2) \
         AND j.received_at >= ?3 AND j.received_at < ?4 \
         ORDER BY j.received_at DESC, j.id DESC LIMIT ?5",
    )?;
    let rows = stmt.query_map(
        params![
            device,
            reason,
            range.from,
            range.to,
            range.limit,
            RAW_PREVIEW as i64
        ],
        |r| {
            Ok(RejectionRow {
                id: r.get(0)?,
                received_at: r.get(1)?,
                device: r.get(2)?,
                source: r.get(3)?,
                reason: r.get(4)?,
                detail: r.get(5)?,
                preview: r.get(6)?,
                stored: r.get(7)?,
                size: r.get(8)?,
                values: r.get(9)?,
            })
        },
    )?;
    Ok(rows.collect::<Result<_, _>>()?)
}
