//! Read queries on the read-only pool. They never take the write lock, so they run while the
//! writer commits.

use serde::Serialize;
use sqlx::Row;
use sqlx::sqlite::SqlitePool;

use super::StorageError;
use crate::reading::Millis;

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

#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct ReadingRow {
    pub device: String,
    pub metric: String,
    pub unit: Option<String>,
    pub time: Millis,
    pub received_at: Millis,
    pub value: f64,
    pub flags: i64,
}

#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct RollupRow {
    pub device: String,
    pub metric: String,
    pub unit: Option<String>,
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
    pub received_at: Millis,
    pub device: Option<String>,
    pub source: String,
    pub reason: String,
    pub detail: String,
    pub raw: Vec<u8>,
}

/// A half-open time range `[from, to)` and a row limit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Range {
    pub from: Millis,
    pub to: Millis,
    pub limit: u32,
}

#[derive(Clone)]
pub struct ReadStore {
    pool: SqlitePool,
}

impl ReadStore {
    pub fn new(pool: SqlitePool) -> Self {
        Self { pool }
    }

    /// Every device with its state and counters, by name.
    ///
    /// # Errors
    /// When the query fails.
    pub async fn devices(&self) -> Result<Vec<DeviceRow>, StorageError> {
        let rows = sqlx::query(
            "SELECT name, kind, state, state_since, last_error, last_seen, readings, rejections, \
             duplicates, dropped, reconnects, timeouts, crc_errors, exceptions \
             FROM devices ORDER BY name",
        )
        .fetch_all(&self.pool)
        .await?;
        Ok(rows
            .into_iter()
            .map(|r| DeviceRow {
                name: r.get(0),
                kind: r.get(1),
                state: r.get(2),
                state_since: r.get(3),
                last_error: r.get(4),
                last_seen: r.get(5),
                readings: r.get(6),
                rejections: r.get(7),
                duplicates: r.get(8),
                dropped: r.get(9),
                reconnects: r.get(10),
                timeouts: r.get(11),
                crc_errors: r.get(12),
                exceptions: r.get(13),
            })
            .collect())
    }

    /// Raw readings of one device (one metric, or all), oldest first.
    ///
    /// # Errors
    /// [`StorageError::UnknownDevice`] when no such device was ever stored.
    pub async fn readings(
        &self,
        device: &str,
        metric: Option<&str>,
        range: Range,
    ) -> Result<Vec<ReadingRow>, StorageError> {
        self.check_device(device).await?;
        let rows = sqlx::query(
            "SELECT d.name, s.metric, s.unit, r.ts, r.received_at, r.value, r.flags \
             FROM devices d JOIN series s ON s.device_id = d.id \
             JOIN readings r ON r.series_id = s.id \
             WHERE d.name = ?1 AND (?2 IS NULL OR s.metric = ?2) AND r.ts >= ?3 AND r.ts < ?4 \
             ORDER BY r.ts, s.metric LIMIT ?5",
        )
        .bind(device)
        .bind(metric)
        .bind(range.from)
        .bind(range.to)
        .bind(range.limit)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows
            .into_iter()
            .map(|r| ReadingRow {
                device: r.get(0),
                metric: r.get(1),
                unit: r.get(2),
                time: r.get(3),
                received_at: r.get(4),
                value: r.get(5),
                flags: r.get(6),
            })
            .collect())
    }

    /// Rollups of one window width for one device (one metric, or all), oldest first.
    ///
    /// # Errors
    /// [`StorageError::UnknownDevice`] when no such device was ever stored.
    pub async fn rollups(
        &self,
        device: &str,
        metric: Option<&str>,
        width_ms: Millis,
        range: Range,
    ) -> Result<Vec<RollupRow>, StorageError> {
        self.check_device(device).await?;
        let rows = sqlx::query(
            "SELECT d.name, s.metric, s.unit, r.bucket, r.width_ms, r.n, r.min_v, r.max_v, \
             r.sum_v, r.first_v, r.last_v \
             FROM devices d JOIN series s ON s.device_id = d.id \
             JOIN rollups r ON r.series_id = s.id \
             WHERE d.name = ?1 AND (?2 IS NULL OR s.metric = ?2) AND r.width_ms = ?3 \
             AND r.bucket >= ?4 AND r.bucket < ?5 ORDER BY r.bucket, s.metric LIMIT ?6",
        )
        .bind(device)
        .bind(metric)
        .bind(width_ms)
        .bind(range.from)
        .bind(range.to)
        .bind(range.limit)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows
            .into_iter()
            .map(|r| {
                let count: i64 = r.get(5);
                let sum: f64 = r.get(8);
                RollupRow {
                    device: r.get(0),
                    metric: r.get(1),
                    unit: r.get(2),
                    bucket: r.get(3),
                    width_ms: r.get(4),
                    count,
                    min: r.get(6),
                    max: r.get(7),
                    mean: sum / count.max(1) as f64,
                    first: r.get(9),
                    last: r.get(10),
                }
            })
            .collect())
    }

    /// Rejections, newest first, of one device or all.
    ///
    /// # Errors
    /// When the query fails.
    pub async fn rejections(
        &self,
        device: Option<&str>,
        range: Range,
    ) -> Result<Vec<RejectionRow>, StorageError> {
        let rows = sqlx::query(
            "SELECT j.received_at, d.name, j.source, j.reason, j.detail, j.raw \
             FROM rejections j LEFT JOIN devices d ON d.id = j.device_id \
             WHERE (?1 IS NULL OR d.name = ?1) AND j.received_at >= ?2 AND j.received_at < ?3 \
             ORDER BY j.received_at DESC, j.id DESC LIMIT ?4",
        )
        .bind(device)
        .bind(range.from)
        .bind(range.to)
        .bind(range.limit)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows
            .into_iter()
            .map(|r| RejectionRow {
                received_at: r.get(0),
                device: r.get(1),
                source: r.get(2),
                reason: r.get(3),
                detail: r.get(4),
                raw: r.get(5),
            })
            .collect())
    }

    async fn check_device(&self, device: &str) -> Result<(), StorageError> {
        let found: Option<i64> = sqlx::query_scalar("SELECT id FROM devices WHERE name = ?1")
            .bind(device)
            .fetch_optional(&self.pool)
            .await?;
        match found {
            Some(_) => Ok(()),
            None => Err(StorageError::UnknownDevice(device.to_string())),
        }
    }
}
