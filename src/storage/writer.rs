//! The one writer: each [`Batch`] becomes one transaction, and its tickets are settled only
//! after that transaction commits.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use sqlx::pool::PoolConnection;
use sqlx::sqlite::SqlitePool;
use sqlx::{Connection, Sqlite, SqliteConnection};
use tokio::sync::{broadcast, mpsc};

use super::direct::{DirectInserts, SeriesRow};
use super::multirow::{MultiRow, chunks};
use super::{Batch, StorageError};
use crate::config::{Config, RetentionConfig};
use crate::reading::{
    DeviceId, DeviceState, FastMap, FaultCounts, LiveBatch, LiveReading, Millis, Reading, Rollups,
    SeriesKey, now_millis,
};
use crate::telemetry::{SourceCounters, Telemetry};

/// Rows `readings_recent` gathers before the writer moves them into `readings_archive`. A
/// move rewrites the last pages of every series once, so the more rows per series it
/// carries the less it writes per reading; queries scan what is recent by time, so this
/// also bounds what they read there.
pub const ARCHIVE_AT_ROWS: u64 = 32_768;
/// Readings of one series in one batch that go straight into the archive: about half a
/// page of them, so writing the series' last pages costs little per reading, and moving
/// them later would cost more.
const ARCHIVE_DIRECTLY_AT: usize = 32;
/// New readings into `readings_recent`, unless either table holds their key. Values come
/// as `(ts, series_id, received_at, value, flags)`, as [`DirectInserts`] binds them.
static INSERT_RECENT: MultiRow = MultiRow::new(
    "INSERT INTO readings_recent (ts, series_id, received_at, value, flags) \
     SELECT column1, column2, column3, column4, column5 FROM (",
    5,
    ") AS v WHERE NOT EXISTS (SELECT 1 FROM readings_archive a \
     WHERE a.series_id = v.column2 AND a.ts = v.column1) ON CONFLICT DO NOTHING",
);
/// As [`INSERT_RECENT`], naming the rows it inserted.
static INSERT_RECENT_RETURNING: MultiRow = MultiRow::new(
    "INSERT INTO readings_recent (ts, series_id, received_at, value, flags) \
     SELECT column1, column2, column3, column4, column5 FROM (",
    5,
    ") AS v WHERE NOT EXISTS (SELECT 1 FROM readings_archive a \
     WHERE a.series_id = v.column2 AND a.ts = v.column1) ON CONFLICT DO NOTHING \
     RETURNING series_id, ts",
);
/// New readings straight into `readings_archive`, unless either table holds their key;
/// values as for [`INSERT_RECENT`].
static INSERT_ARCHIVE: MultiRow = MultiRow::new(
    "INSERT INTO readings_archive (series_id, ts, received_at, value, flags) \
     SELECT column2, column1, column3, column4, column5 FROM (",
    5,
    ") AS v WHERE NOT EXISTS (SELECT 1 FROM readings_recent r \
     WHERE r.ts = v.column1 AND r.series_id = v.column2) ON CONFLICT DO NOTHING",
);
/// As [`INSERT_ARCHIVE`] when `readings_recent` is empty: no key to look up there.
static INSERT_ARCHIVE_ONLY: MultiRow = MultiRow::new(
    "INSERT INTO readings_archive (ts, series_id, received_at, value, flags)",
    5,
    " ON CONFLICT DO NOTHING",
);
/// As [`INSERT_ARCHIVE`], naming the rows it inserted.
static INSERT_ARCHIVE_RETURNING: MultiRow = MultiRow::new(
    "INSERT INTO readings_archive (series_id, ts, received_at, value, flags) \
     SELECT column2, column1, column3, column4, column5 FROM (",
    5,
    ") AS v WHERE NOT EXISTS (SELECT 1 FROM readings_recent r \
     WHERE r.ts = v.column1 AND r.series_id = v.column2) ON CONFLICT DO NOTHING \
     RETURNING series_id, ts",
);
static INSERT_REJECTIONS: MultiRow = MultiRow::new(
    "INSERT INTO rejections (received_at, device_id, source, reason, detail, raw, size, \
     value_count)",
    8,
    "",
);
/// Merges a batch's rollup cells into the stored ones: what `RollupCell::merge` does.
static UPSERT_ROLLUPS: MultiRow = MultiRow::new(
    "INSERT INTO rollups (series_id, width_ms, bucket, n, min_v, max_v, sum_v, \
     first_ts, first_v, last_ts, last_v)",
    11,
    " ON CONFLICT (series_id, width_ms, bucket) DO UPDATE SET \
     n = n + excluded.n, \
     min_v = min(min_v, excluded.min_v), \
     max_v = max(max_v, excluded.max_v), \
     sum_v = sum_v + excluded.sum_v, \
     first_ts = CASE WHEN excluded.first_ts < first_ts THEN excluded.first_ts ELSE first_ts END, \
     first_v = CASE WHEN excluded.first_ts < first_ts THEN excluded.first_v ELSE first_v END, \
     last_ts = CASE WHEN excluded.last_ts > last_ts THEN excluded.last_ts ELSE last_ts END, \
     last_v = CASE WHEN excluded.last_ts > last_ts THEN excluded.last_v ELSE last_v END",
);
/// Adds a batch's per-device counters to `devices`.
static UPDATE_DEVICES: MultiRow = MultiRow::new(
    "UPDATE devices SET \
     last_seen = CASE WHEN d.column2 > 0 THEN max(coalesce(devices.last_seen, 0), d.column2) \
                 ELSE devices.last_seen END, \
     readings = readings + d.column3, rejections = rejections + d.column4, \
     duplicates = duplicates + d.column5, dropped = dropped + d.column6, \
     reconnects = reconnects + d.column7, timeouts = timeouts + d.column8, \
     crc_errors = crc_errors + d.column9, exceptions = exceptions + d.column10 FROM (",
    10,
    ") AS d WHERE devices.id = d.column1",
);
/// Between retries of a batch whose transaction failed (disk full, database locked).
const RETRY_MIN: Duration = Duration::from_millis(100);
const RETRY_MAX: Duration = Duration::from_secs(5);

/// A configured device as the writer registers it.
#[derive(Clone)]
pub struct DeviceEntry {
    pub id: DeviceId,
    pub kind: &'static str,
    /// Its source's counters: messages dropped under the `drop_newest` policy are folded
    /// into each commit.
    pub counters: Arc<SourceCounters>,
}

/// The keys a commit inserted; `None` when it inserted every reading of its batch.
type NewKeys = Option<HashSet<(i64, Millis)>>;

/// The database ids behind a series key.
#[derive(Clone, Copy)]
struct SeriesIds {
    series: i64,
    device: i64,
}

pub struct Writer {
    pool: SqlitePool,
    /// Readings' insert statements on the pool's connection.
    direct: DirectInserts,
    /// Every device this run has written for, removed ones included (their late rejections
    /// still name them).
    devices: FastMap<DeviceId, i64>,
    /// The configured devices and their kinds.
    kinds: FastMap<DeviceId, &'static str>,
    /// By [`SeriesKey`]; filled as series first appear in a batch.
    series: Vec<Option<SeriesIds>>,
    drop_counters: Vec<(i64, Arc<SourceCounters>)>,
    retention: RetentionConfig,
    retention_cursor: i64,
    /// Rows in `readings_recent`, as of the last commit.
    recent_rows: u64,
    /// Move `readings_recent` into the archive once it holds this many rows.
    archive_at_rows: u64,
    telemetry: Arc<Telemetry>,
    /// Readings just committed, for live-stream clients; a slow client skips, the writer
    /// never waits.
    live: broadcast::Sender<LiveBatch>,
}

impl Writer {
    /// Registers the configured devices (state `starting`).
    ///
    /// # Errors
    /// When the database cannot be written.
    pub async fn new(
        pool: SqlitePool,
        entries: Vec<DeviceEntry>,
        retention: RetentionConfig,
        telemetry: Arc<Telemetry>,
        live: broadcast::Sender<LiveBatch>,
    ) -> Result<Self, StorageError> {
        let mut writer = Self {
            direct: DirectInserts::new(pool.clone()),
            pool,
            devices: FastMap::default(),
            kinds: FastMap::default(),
            series: Vec::new(),
            drop_counters: Vec::new(),
            retention,
            retention_cursor: 0,
            recent_rows: 0,
            archive_at_rows: ARCHIVE_AT_ROWS,
            telemetry,
            live,
        };
        let recent: i64 = sqlx::query_scalar("SELECT count(*) FROM readings_recent")
            .fetch_one(&writer.pool)
            .await?;
        writer.recent_rows = recent as u64;
        writer.register(entries).await?;
        Ok(writer)
    }

    /// Every series the database holds, as (device, metric).
    ///
    /// # Errors
    /// When the database cannot be read.
    pub async fn stored_series(&self) -> Result<Vec<(String, String)>, StorageError> {
        let rows = sqlx::query_as(
            "SELECT d.name, s.metric FROM series s JOIN devices d ON d.id = s.device_id",
        )
        .fetch_all(&self.pool)
        .await?;
        Ok(rows)
    }

    /// Moves recent readings into the archive once `rows` of them gather, instead of
    /// [`ARCHIVE_AT_ROWS`]: for tests that want moves between small batches.
    pub fn archive_at_rows(mut self, rows: u64) -> Self {
        self.archive_at_rows = rows.max(1);
        self
    }

    /// Registers devices (state `starting`) in one transaction; a known one gets its new
    /// kind. Nothing is cached unless the transaction commits.
    async fn register(&mut self, entries: Vec<DeviceEntry>) -> Result<(), StorageError> {
        if entries.is_empty() {
            return Ok(());
        }
        let now = now_millis();
        let mut conn = self.pool.acquire().await?;
        let ids = match register_rows(&mut conn, &entries, now).await {
            Ok(ids) => ids,
            Err(err) => {
                self.discard(conn).await;
                return Err(err);
            }
        };
        drop(conn);
        for (entry, id) in entries.into_iter().zip(ids) {
            self.telemetry
                .set_device_state(&entry.id, DeviceState::Starting);
            self.kinds.insert(entry.id.clone(), entry.kind);
            self.devices.insert(entry.id, id);
            self.drop_counters.retain(|(known, _)| *known != id);
            self.drop_counters.push((id, entry.counters));
        }
        Ok(())
    }

    /// Marks devices a reload removed as stopped. Their rows and readings stay.
    async fn retire(&mut self, removed: &[DeviceId]) -> Result<(), StorageError> {
        let now = now_millis();
        let mut conn = self.pool.acquire().await?;
        if let Err(err) = retire_rows(&mut conn, removed, now).await {
            self.discard(conn).await;
            return Err(err);
        }
        drop(conn);
        for device in removed {
            if let Some(id) = self.devices.get(device) {
                self.drop_counters.retain(|(known, _)| known != id);
            }
            self.kinds.remove(device);
            self.telemetry.remove_device(device);
        }
        Ok(())
    }

    /// The devices of a reloaded config that are new (or changed kind), and the known ones
    /// it no longer lists.
    fn changes(&self, config: &Config) -> (Vec<DeviceEntry>, Vec<DeviceId>) {
        let listed: HashSet<&str> = config.devices.iter().map(|d| d.id()).collect();
        let added = config
            .devices
            .iter()
            .filter(|d| {
                self.kinds
                    .get(&DeviceId::new(d.id()))
                    .is_none_or(|kind| *kind != d.kind())
            })
            .map(|d| {
                let id = DeviceId::new(d.id());
                DeviceEntry {
                    counters: self.telemetry.source(&id),
                    id,
                    kind: d.kind(),
                }
            })
            .collect();
        let removed = self
            .kinds
            .keys()
            .filter(|id| !listed.contains(id.as_str()))
            .cloned()
            .collect();
        (added, removed)
    }

    /// Writes batches until the channel closes, then marks devices stopped. A batch whose
    /// transaction fails is retried with backoff, never skipped: nothing is acknowledged
    /// until it is stored.
    pub async fn run(mut self, mut input: mpsc::Receiver<Batch>) {
        let mut retention_tick = tokio::time::interval(self.retention.interval);
        retention_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                batch = input.recv() => match batch {
                    Some(batch) => {
                        self.commit_with_retry(batch).await;
                        if self.recent_rows >= self.archive_at_rows {
                            self.archive_recent().await;
                        }
                    }
                    None => break,
                },
                _ = retention_tick.tick() => {
                    if let Err(err) = self.retention_step().await {
                        tracing::warn!(error = %err, "Retention step failed; retrying at the next tick");
                    }
                }
            }
        }
        if let Err(err) = self.mark_stopped().await {
            tracing::warn!(error = %err, "Could not mark devices stopped");
        }
        if let Ok(mut conn) = self.pool.acquire().await {
            self.direct.release(&mut conn).await;
        }
        self.pool.close().await;
    }

    /// Moves every row of `readings_recent` into `readings_archive` in one transaction. A
    /// failure (a full disk) leaves both as they were: the rows stay recent and the move is
    /// tried again after the next commit.
    async fn archive_recent(&mut self) {
        let started = std::time::Instant::now();
        let mut conn = match self.pool.acquire().await {
            Ok(conn) => conn,
            Err(err) => {
                tracing::warn!(error = %err, "Cannot archive recent readings; retrying after the next commit");
                return;
            }
        };
        match move_recent_rows(&mut conn).await {
            Ok(moved) => {
                tracing::debug!(
                    rows = moved,
                    micros = started.elapsed().as_micros() as u64,
                    "Recent readings archived"
                );
                self.recent_rows = 0;
            }
            Err(err) => {
                tracing::warn!(error = %err, "Cannot archive recent readings; retrying after the next commit");
                self.discard(conn).await;
            }
        }
    }

    /// Closes a connection whose transaction failed instead of returning it to the pool. After
    /// some errors (a full disk) SQLite rolls the transaction back by itself; sqlx then fails its
    /// own ROLLBACK and from there on believes a transaction is open, so later "commits" only
    /// release a savepoint and never reach the disk. A fresh connection knows no such history.
    async fn discard(&mut self, mut conn: PoolConnection<Sqlite>) {
        self.direct.release(&mut conn).await;
        if let Err(err) = conn.close().await {
            tracing::debug!(error = %err, "Closing a failed connection");
        }
    }

    /// Commits `batch`, retrying with backoff until it succeeds, then settles its tickets
    /// and passes its heartbeat on. A batch with nothing to store costs no transaction.
    async fn commit_with_retry(&mut self, batch: Batch) {
        let (added, removed) = match &batch.reconfigure {
            Some(config) => self.changes(config),
            None => (Vec::new(), Vec::new()),
        };
        // New devices get their rows before any of their readings.
        let mut delay = RETRY_MIN;
        while let Err(err) = self.register(added.clone()).await {
            tracing::error!(error = %err, "Cannot register the devices a reload added; retrying");
            tokio::time::sleep(delay).await;
            delay = (delay * 2).min(RETRY_MAX);
        }
        if !batch.has_no_data() {
            let mut delay = RETRY_MIN;
            let mut failures = 0u32;
            loop {
                let started = std::time::Instant::now();
                match self.write(&batch).await {
                    Ok((new_keys, recent)) => {
                        let took = started.elapsed();
                        let stored = self.publish(&batch, new_keys.as_ref());
                        self.recent_rows += recent;
                        self.telemetry.writer.record_commit(
                            took,
                            stored,
                            batch.rejections.len() as u64,
                        );
                        tracing::debug!(
                            readings = stored,
                            rejections = batch.rejections.len(),
                            messages = batch.messages,
                            micros = took.as_micros() as u64,
                            "Batch committed"
                        );
                        break;
                    }
                    Err(err) => {
                        failures += 1;
                        if failures == 1 {
                            tracing::error!(error = %err, readings = batch.readings.len(), "Commit failed; holding acknowledgements and retrying");
                        } else {
                            tracing::debug!(error = %err, failures, "Commit retry failed");
                        }
                        self.telemetry.writer.record_failure(err.to_string());
                        tokio::time::sleep(delay).await;
                        delay = (delay * 2).min(RETRY_MAX);
                    }
                }
            }
            if failures > 0 {
                tracing::warn!(failures, "Commit succeeded after retries");
            }
        }
        for status in &batch.statuses {
            self.telemetry
                .set_device_state(&status.device, status.state);
        }
        let mut delay = RETRY_MIN;
        while !removed.is_empty()
            && let Err(err) = self.retire(&removed).await
        {
            tracing::error!(error = %err, "Cannot mark the devices a reload removed; retrying");
            tokio::time::sleep(delay).await;
            delay = (delay * 2).min(RETRY_MAX);
        }
        for ticket in batch.tickets {
            ticket.settle();
        }
        if let Some(at) = batch.heartbeat {
            self.telemetry.heartbeat_done(at);
        }
    }

    /// Hands the readings a commit stored to live-stream clients, if there are any; returns
    /// how many were stored.
    fn publish(&self, batch: &Batch, new_keys: Option<&HashSet<(i64, Millis)>>) -> u64 {
        let stored =
            |r: &&Reading| new_keys.is_none_or(|keys| keys.contains(&(self.ids(r).series, r.time)));
        if self.live.receiver_count() == 0 {
            return batch.readings.iter().filter(stored).count() as u64;
        }
        let live: LiveBatch = batch
            .readings
            .iter()
            .filter(stored)
            .map(|r| LiveReading {
                series: r.series.clone(),
                time: r.time,
                value: r.value,
            })
            .collect();
        let stored = live.len() as u64;
        // No receiver left since the check: nobody to tell.
        let _ = self.live.send(live);
        stored
    }

    /// One transaction for `batch`; returns the inserted keys (`None`: all of the batch) and
    /// how many rows went into `readings_recent`. On failure the caches and counters are as
    /// before, so the batch can be written again.
    async fn write(&mut self, batch: &Batch) -> Result<(NewKeys, u64), StorageError> {
        let drops: Vec<(i64, Arc<SourceCounters>, u64)> = self
            .drop_counters
            .iter()
            .map(|(id, counter)| (*id, counter.clone(), counter.take_unstored_drops()))
            .collect();
        let mut added = Vec::new();
        let mut exact = false;
        let mut conn = match self.pool.acquire().await {
            Ok(conn) => Some(conn),
            Err(err) => {
                for (_, counter, n) in drops {
                    counter.restore_unstored_drops(n);
                }
                return Err(err.into());
            }
        };
        let result = loop {
            let Some(connection) = conn.as_mut() else {
                break Err(StorageError::Closed);
            };
            match self
                .try_write(connection, batch, &drops, &mut added, exact)
                .await
            {
                Ok(Written::Committed { new_keys, recent }) => break Ok((new_keys, recent)),
                // Rolled back: write it again, naming the rows actually inserted. An exact
                // write never answers this, so this loops at most twice.
                Ok(Written::HadDuplicates) => {
                    self.forget(&mut added);
                    exact = true;
                }
                Err(err) => break Err(err),
            }
        };
        if result.is_err() {
            self.forget(&mut added);
            for (_, counter, n) in drops {
                counter.restore_unstored_drops(n);
            }
            if let Some(conn) = conn.take() {
                self.discard(conn).await;
            }
        }
        result
    }

    /// Drops series ids cached by a transaction that did not commit.
    fn forget(&mut self, added: &mut Vec<SeriesKey>) {
        for key in added.drain(..) {
            self.series[key.0 as usize] = None;
        }
    }

    /// One attempt. The common case stores every reading, so the first attempt inserts
    /// without RETURNING; when some keys already existed (a redelivery) it rolls back and the
    /// caller retries with `exact`, which names the inserted rows so rollups and counters
    /// cover exactly what was stored. (A savepoint would avoid the second attempt but makes
    /// SQLite journal every page the inserts touch, on every batch.)
    async fn try_write(
        &mut self,
        conn: &mut PoolConnection<Sqlite>,
        batch: &Batch,
        drops: &[(i64, Arc<SourceCounters>, u64)],
        added: &mut Vec<SeriesKey>,
        exact: bool,
    ) -> Result<Written, StorageError> {
        // IMMEDIATE: the write lock is taken here, on sqlx's worker, where waiting for it
        // (another process writing) blocks no task; the readings' inserts run on the
        // runtime thread (`DirectInserts`).
        let mut tx = Connection::begin_with(&mut **conn, "BEGIN IMMEDIATE").await?;
        let mut per_device: FastMap<i64, DeviceDelta> = FastMap::default();
        self.ensure_series(&mut tx, &batch.readings, added).await?;

        let (archive, recent) = self.place(&batch.readings);
        let mut new_keys = exact.then(HashSet::new);
        // Rows inserted into the archive and into the recent table.
        let mut stored = [0u64; 2];
        let into_archive = if self.recent_rows == 0 {
            &INSERT_ARCHIVE_ONLY
        } else {
            &INSERT_ARCHIVE
        };
        let targets = [
            (&archive, into_archive, &INSERT_ARCHIVE_RETURNING),
            (&recent, &INSERT_RECENT, &INSERT_RECENT_RETURNING),
        ];
        for (i, (rows, plain, returning)) in targets.into_iter().enumerate() {
            let statement = if new_keys.is_some() { returning } else { plain };
            stored[i] += self
                .direct
                .insert_readings(&mut tx, statement, rows, new_keys.as_mut())
                .await?;
        }
        if new_keys.is_none() && stored[0] + stored[1] != batch.readings.len() as u64 {
            tx.rollback().await?;
            return Ok(Written::HadDuplicates);
        }

        let mut fresh = new_keys
            .as_ref()
            .map(|_| Rollups::new(batch.rollups.widths().to_vec()));
        // Counted per series key first, an index per reading rather than a hash.
        let mut per_series = vec![DeviceDelta::default(); self.series.len()];
        for reading in &batch.readings {
            let delta = &mut per_series[reading.series.key().0 as usize];
            delta.last_seen = delta.last_seen.max(reading.received_at);
            let is_new = new_keys
                .as_ref()
                .is_none_or(|keys| keys.contains(&(self.ids(reading).series, reading.time)));
            if is_new {
                delta.readings += 1;
                if let Some(fresh) = &mut fresh {
                    fresh.add(reading);
                }
            } else {
                delta.duplicates += 1;
            }
        }
        for (ids, counted) in self.series.iter().zip(&per_series) {
            if let Some(ids) = ids
                && counted.readings + counted.duplicates > 0
            {
                let delta = per_device.entry(ids.device).or_default();
                delta.last_seen = delta.last_seen.max(counted.last_seen);
                delta.readings += counted.readings;
                delta.duplicates += counted.duplicates;
            }
        }
        for (device, n) in &batch.duplicates {
            if let Some(id) = self.devices.get(device) {
                per_device.entry(*id).or_default().duplicates += n;
            }
        }
        self.upsert_rollups(&mut tx, fresh.as_ref().unwrap_or(&batch.rollups))
            .await?;

        for chunk in chunks(&batch.rejections) {
            INSERT_REJECTIONS
                .query(chunk, |row, r| {
                    row.bind(r.received_at)
                        .bind(r.device.as_ref().and_then(|d| self.devices.get(d)).copied())
                        .bind(&*r.source)
                        .bind(r.reason.as_str())
                        .bind(r.detail.as_str())
                        .bind(&*r.raw)
                        .bind(r.size as i64)
                        .bind(i64::from(r.values));
                })?
                .execute(&mut *tx)
                .await?;
        }
        for rejection in &batch.rejections {
            if let Some(id) = rejection.device.as_ref().and_then(|d| self.devices.get(d)) {
                let delta = per_device.entry(*id).or_default();
                delta.rejections += u64::from(rejection.values);
                delta.last_seen = delta.last_seen.max(rejection.received_at);
            }
        }

        for status in &batch.statuses {
            let Some(id) = self.devices.get(&status.device) else {
                continue;
            };
            sqlx::query(
                "UPDATE devices SET state = ?1, last_error = ?2, state_since = ?3 WHERE id = ?4",
            )
            .bind(status.state.as_str())
            .bind(status.error.as_deref())
            .bind(status.at)
            .bind(id)
            .execute(&mut *tx)
            .await?;
        }

        for (device, counts) in &batch.faults {
            if let Some(id) = self.devices.get(device) {
                per_device.entry(*id).or_default().faults.add(counts);
            }
        }
        for (id, _, dropped) in drops {
            if *dropped > 0 {
                per_device.entry(*id).or_default().dropped += dropped;
            }
        }
        update_devices(&mut tx, &per_device).await?;
        tx.commit().await?;
        Ok(Written::Committed {
            new_keys,
            recent: stored[1],
        })
    }

    /// Splits a batch's readings by where they go: see [`place`].
    fn place<'b>(&self, readings: &'b [Reading]) -> (Vec<SeriesRow<'b>>, Vec<SeriesRow<'b>>) {
        place(readings, self.series.len(), |r| self.ids(r).series)
    }

    /// The ids of a reading's series. Every reading of a batch has them: `ensure_series`
    /// runs first in the batch's transaction.
    fn ids(&self, reading: &Reading) -> SeriesIds {
        self.series[reading.series.key().0 as usize].expect("ensure_series ran for this batch")
    }

    /// Gives every series in `readings` an id, inserting the new ones, and records in `added`
    /// what it cached, so a failed transaction can forget them.
    async fn ensure_series(
        &mut self,
        tx: &mut SqliteConnection,
        readings: &[Reading],
        added: &mut Vec<SeriesKey>,
    ) -> Result<(), StorageError> {
        for reading in readings {
            let key = reading.series.key();
            let slot = key.0 as usize;
            if self.series.get(slot).is_some_and(Option::is_some) {
                continue;
            }
            let device = *self
                .devices
                .get(reading.series.device())
                .ok_or_else(|| StorageError::UnknownDevice(reading.series.device().to_string()))?;
            let id: i64 = sqlx::query_scalar(
                "INSERT INTO series (device_id, metric, unit) VALUES (?1, ?2, ?3) \
                 ON CONFLICT (device_id, metric) DO UPDATE SET unit = coalesce(excluded.unit, unit) \
                 RETURNING id",
            )
            .bind(device)
            .bind(reading.series.metric())
            .bind(reading.series.unit())
            .fetch_one(&mut *tx)
            .await?;
            if self.series.len() <= slot {
                self.series.resize(slot + 1, None);
            }
            self.series[slot] = Some(SeriesIds { series: id, device });
            added.push(key);
        }
        Ok(())
    }

    async fn upsert_rollups(
        &self,
        tx: &mut SqliteConnection,
        rollups: &Rollups,
    ) -> Result<(), StorageError> {
        let cells: Vec<_> = rollups
            .iter()
            .filter_map(|((key, width, bucket), cell)| {
                let ids = self.series.get(key.0 as usize).copied().flatten()?;
                Some(((ids.series, *width, *bucket), cell))
            })
            .collect();
        for chunk in chunks(&cells) {
            UPSERT_ROLLUPS
                .query(chunk, |row, ((series, width, bucket), cell)| {
                    row.bind(*series)
                        .bind(*width)
                        .bind(*bucket)
                        .bind(cell.count)
                        .bind(cell.min)
                        .bind(cell.max)
                        .bind(cell.sum)
                        .bind(cell.first_time)
                        .bind(cell.first)
                        .bind(cell.last_time)
                        .bind(cell.last);
                })?
                .execute(&mut *tx)
                .await?;
        }
        Ok(())
    }

    /// Deletes at most `step_rows` expired rows per table, a series at a time, so no step
    /// holds the write lock for long.
    async fn retention_step(&mut self) -> Result<(), StorageError> {
        let now = now_millis();
        let cutoff = |d: Option<Duration>| d.map(|d| now - d.as_millis() as Millis);
        let limit = i64::from(self.retention.step_rows);
        let series: Vec<i64> = {
            let mut ids: Vec<i64> = sqlx::query_scalar("SELECT id FROM series ORDER BY id")
                .fetch_all(&self.pool)
                .await?;
            let start = ids.partition_point(|id| *id <= self.retention_cursor);
            ids.rotate_left(start);
            ids
        };
        let mut budget = limit;
        if let Some(cutoff) = cutoff(self.retention.readings) {
            for id in &series {
                if budget <= 0 {
                    break;
                }
                let done = sqlx::query(
                    "DELETE FROM readings_archive WHERE series_id = ?1 AND ts IN \
                     (SELECT ts FROM readings_archive WHERE series_id = ?1 AND ts < ?2 ORDER BY ts LIMIT ?3)",
                )
                .bind(id)
                .bind(cutoff)
                .bind(budget)
                .execute(&self.pool)
                .await?;
                budget -= done.rows_affected() as i64;
                self.retention_cursor = *id;
            }
            if budget > 0 {
                let done = sqlx::query(
                    "DELETE FROM readings_recent WHERE (ts, series_id) IN \
                     (SELECT ts, series_id FROM readings_recent WHERE ts < ?1 ORDER BY ts LIMIT ?2)",
                )
                .bind(cutoff)
                .bind(budget)
                .execute(&self.pool)
                .await?;
                self.recent_rows = self.recent_rows.saturating_sub(done.rows_affected());
            }
        }
        if let Some(cutoff) = cutoff(self.retention.rollups) {
            let mut budget = limit;
            for id in &series {
                if budget <= 0 {
                    break;
                }
                let done = sqlx::query(
                    "DELETE FROM rollups WHERE series_id = ?1 AND bucket < ?2 AND (width_ms, bucket) IN \
                     (SELECT width_ms, bucket FROM rollups WHERE series_id = ?1 AND bucket < ?2 LIMIT ?3)",
                )
                .bind(id)
                .bind(cutoff)
                .bind(budget)
                .execute(&self.pool)
                .await?;
                budget -= done.rows_affected() as i64;
            }
        }
        if let Some(cutoff) = cutoff(self.retention.rejections) {
            sqlx::query(
                "DELETE FROM rejections WHERE id IN \
                 (SELECT id FROM rejections WHERE received_at < ?1 ORDER BY received_at LIMIT ?2)",
            )
            .bind(cutoff)
            .bind(limit)
            .execute(&self.pool)
            .await?;
        }
        Ok(())
    }

    async fn mark_stopped(&self) -> Result<(), StorageError> {
        sqlx::query("UPDATE devices SET state = ?1, state_since = ?2 WHERE state != ?1")
            .bind(DeviceState::Stopped.as_str())
            .bind(now_millis())
            .execute(&self.pool)
            .await?;
        Ok(())
    }
}

enum Written {
    /// With the number of rows inserted into `readings_recent`.
    Committed { new_keys: NewKeys, recent: u64 },
    /// Some readings were stored before; the transaction was rolled back.
    HadDuplicates,
}

#[derive(Clone, Default)]
struct DeviceDelta {
    last_seen: Millis,
    readings: u64,
    rejections: u64,
    duplicates: u64,
    dropped: u64,
    faults: FaultCounts,
}

/// Splits a batch's readings by where they go: the series with at least
/// [`ARCHIVE_DIRECTLY_AT`] readings in it straight into the archive, in (series id, time)
/// order, and the others into `readings_recent`, in (time, series id) order. In key order,
/// consecutive rows land on the same B-tree page. `slots` bounds the readings' series keys;
/// `series_id` gives a reading's database id.
fn place(
    readings: &[Reading],
    slots: usize,
    series_id: impl Fn(&Reading) -> i64,
) -> (Vec<SeriesRow<'_>>, Vec<SeriesRow<'_>>) {
    // By series key: an index per reading rather than a hash.
    let mut per_series = vec![0usize; slots];
    let mut ids = vec![0i64; slots];
    for r in readings {
        let slot = r.series.key().0 as usize;
        per_series[slot] += 1;
        ids[slot] = series_id(r);
    }
    let archived = |r: &Reading| per_series[r.series.key().0 as usize] >= ARCHIVE_DIRECTLY_AT;
    let mut recent: Vec<SeriesRow<'_>> = readings
        .iter()
        .filter(|r| !archived(r))
        .map(|r| (series_id(r), r))
        .collect();
    recent.sort_unstable_by_key(|(series, r)| (r.time, *series));
    let Some(first) = readings.iter().find(|r| archived(r)) else {
        return (Vec::new(), recent);
    };
    // A counting sort by series: each archived series key gets a range, in the order of
    // their database ids, and its readings keep their arrival order there, which is time
    // order unless some came late.
    let mut archived_slots: Vec<usize> = (0..slots)
        .filter(|&slot| per_series[slot] >= ARCHIVE_DIRECTLY_AT)
        .collect();
    archived_slots.sort_unstable_by_key(|&slot| ids[slot]);
    let mut next = vec![0usize; slots];
    let mut end = 0;
    for slot in archived_slots {
        next[slot] = end;
        end += per_series[slot];
    }
    let mut archive = vec![(0, first); end];
    for r in readings.iter().filter(|r| archived(r)) {
        let at = &mut next[r.series.key().0 as usize];
        archive[*at] = (series_id(r), r);
        *at += 1;
    }
    // Late readings, or two series keys sharing a database id (interned with and without a
    // unit), leave it out of order: then a full sort.
    if !archive.is_sorted_by_key(|(series, r)| (*series, r.time)) {
        archive.sort_unstable_by_key(|(series, r)| (*series, r.time));
    }
    (archive, recent)
}

/// Moves `readings_recent` into `readings_archive`, in series order so each series' rows
/// are appended together; returns how many rows moved. No key can be in both tables (the
/// insert into `readings_recent` checks the archive), so nothing conflicts.
async fn move_recent_rows(conn: &mut SqliteConnection) -> Result<u64, StorageError> {
    let mut tx = conn.begin().await?;
    let moved = sqlx::query(
        "INSERT INTO readings_archive (series_id, ts, received_at, value, flags) \
         SELECT series_id, ts, received_at, value, flags FROM readings_recent \
         ORDER BY series_id, ts",
    )
    .execute(&mut *tx)
    .await?
    .rows_affected();
    sqlx::query("DELETE FROM readings_recent")
        .execute(&mut *tx)
        .await?;
    tx.commit().await?;
    Ok(moved)
}

/// Upserts device rows; their ids in order.
async fn register_rows(
    conn: &mut SqliteConnection,
    entries: &[DeviceEntry],
    now: Millis,
) -> Result<Vec<i64>, StorageError> {
    let mut tx = conn.begin().await?;
    let mut ids = Vec::with_capacity(entries.len());
    for entry in entries {
        let id: i64 = sqlx::query_scalar(
            "INSERT INTO devices (name, kind, state, state_since, last_error) \
             VALUES (?1, ?2, 'starting', ?3, NULL) \
             ON CONFLICT (name) DO UPDATE SET kind = excluded.kind, state = 'starting', \
             state_since = excluded.state_since, last_error = NULL RETURNING id",
        )
        .bind(entry.id.as_str())
        .bind(entry.kind)
        .bind(now)
        .fetch_one(&mut *tx)
        .await?;
        ids.push(id);
    }
    tx.commit().await?;
    Ok(ids)
}

async fn retire_rows(
    conn: &mut SqliteConnection,
    removed: &[DeviceId],
    now: Millis,
) -> Result<(), StorageError> {
    let mut tx = conn.begin().await?;
    for device in removed {
        sqlx::query(
            "UPDATE devices SET state = 'stopped', state_since = ?1, \
             last_error = 'removed from the config' WHERE name = ?2",
        )
        .bind(now)
        .bind(device.as_str())
        .execute(&mut *tx)
        .await?;
    }
    tx.commit().await?;
    Ok(())
}

/// Folds the batch's per-device counters into `devices` with one statement.
async fn update_devices(
    tx: &mut SqliteConnection,
    deltas: &FastMap<i64, DeviceDelta>,
) -> Result<(), StorageError> {
    let deltas: Vec<_> = deltas.iter().collect();
    for chunk in chunks(&deltas) {
        UPDATE_DEVICES
            .query(chunk, |row, (id, delta)| {
                row.bind(**id)
                    .bind(delta.last_seen)
                    .bind(delta.readings as i64)
                    .bind(delta.rejections as i64)
                    .bind(delta.duplicates as i64)
                    .bind(delta.dropped as i64)
                    .bind(delta.faults.reconnects as i64)
                    .bind(delta.faults.timeouts as i64)
                    .bind(delta.faults.crc_errors as i64)
                    .bind(delta.faults.exceptions as i64);
            })?
            .execute(&mut *tx)
            .await?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::reading::{ReadingFlags, Series, SeriesInfo, SeriesKey};

    fn series(key: u32) -> Series {
        Series::new(SeriesInfo {
            key: SeriesKey(key),
            device: DeviceId::new("d"),
            metric: Arc::from("m"),
            unit: None,
        })
    }

    fn reading(series: &Series, time: Millis) -> Reading {
        Reading {
            series: series.clone(),
            value: 1.0,
            time,
            received_at: time,
            flags: ReadingFlags::default(),
        }
    }

    #[test]
    fn busy_series_go_to_the_archive_in_key_order_and_the_rest_to_recent_in_time_order() {
        // Keys 0 and 2 share database id 7 (a metric interned with and without a unit);
        // key 1 is id 3; key 3 is quiet. Readings arrive interleaved, some late.
        let all: Vec<Series> = (0..4).map(series).collect();
        let id = |r: &Reading| [7, 3, 7, 9][r.series.key().0 as usize];
        let mut readings = Vec::new();
        for t in 0..40 {
            readings.push(reading(&all[0], 1000 + 2 * t));
            readings.push(reading(&all[1], 1000 + t));
            readings.push(reading(&all[2], 1001 + 2 * t));
        }
        readings.push(reading(&all[1], 10));
        readings.push(reading(&all[3], 5000));
        readings.push(reading(&all[3], 4000));
        let (archive, recent) = place(&readings, 4, id);
        let keys: Vec<(i64, Millis)> = archive.iter().map(|(s, r)| (*s, r.time)).collect();
        let mut expected: Vec<(i64, Millis)> = readings
            .iter()
            .filter(|r| r.series.key().0 != 3)
            .map(|r| (id(r), r.time))
            .collect();
        expected.sort_unstable();
        assert_eq!(keys, expected);
        let recent: Vec<(Millis, i64)> = recent.iter().map(|(s, r)| (r.time, *s)).collect();
        assert_eq!(recent, vec![(4000, 9), (5000, 9)]);
    }
}
