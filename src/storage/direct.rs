//! Readings into SQLite through its own API, on the writer's sqlx connection.
//!
//! Inserting readings is most of what SQLite does for a batch. Through sqlx each value is
//! first collected into an argument list on the writer's task, then bound on sqlx's worker
//! thread (which looks up every parameter's name and clears every binding twice per
//! statement), and each query is a round trip between the two threads. Here the writer
//! locks the handle out of sqlx's worker and binds each value straight into a statement it
//! prepared there, inside the transaction sqlx opened (`cargo bench --bench ingest` with
//! `BENCH_BASELINE`: the README has the figures).
//!
//! The statements stay prepared across batches: preparing a 1,024-row statement costs about
//! 2 ms, more than running it. SQLite refuses to close a connection with statements still
//! prepared, and sqlx panics then, so [`DirectInserts::release`] finalizes them before the
//! writer closes its connection.

use std::collections::HashSet;
use std::sync::{Mutex, PoisonError};

use sqlx::{SqliteConnection, SqlitePool};

use super::StorageError;
use super::multirow::{MultiRow, statement_chunks};
use crate::reading::{Millis, Reading};

/// A reading with its series' database id, as the insert statements bind it.
pub type SeriesRow<'b> = (i64, &'b Reading);

/// The writer's insert statements, prepared through SQLite's own API.
pub struct DirectInserts {
    /// The statements, with the address of the handle they were prepared on. Only ever
    /// reached through `&mut self` (`get_mut`): the mutex only makes the writer `Sync`,
    /// which rusqlite's connection is not.
    prepared: Mutex<Option<(usize, rusqlite::Connection)>>,
    /// The writer's pool, kept open by an abnormal drop: see `Drop`.
    pool: SqlitePool,
}

impl DirectInserts {
    pub fn new(pool: SqlitePool) -> Self {
        Self {
            prepared: Mutex::new(None),
            pool,
        }
    }

    /// Inserts `rows` with `statement`, whose values are `(ts, series_id, received_at,
    /// value, flags)` per row, in the transaction open on `conn`; returns how many rows it
    /// inserted. With `keys`, the statement returns `(series_id, ts)` of each row it
    /// inserted, and they go there.
    ///
    /// This runs on the caller's thread, the runtime's: for a full batch of 50,000
    /// readings, most of the 40 ms its commit takes (`cargo bench --bench writer`).
    pub async fn insert_readings(
        &mut self,
        conn: &mut SqliteConnection,
        statement: &MultiRow,
        rows: &[SeriesRow<'_>],
        mut keys: Option<&mut HashSet<(i64, Millis)>>,
    ) -> Result<u64, StorageError> {
        if rows.is_empty() {
            return Ok(0);
        }
        let mut locked = conn.lock_handle().await?;
        let handle = locked.as_raw_handle().as_ptr();
        let prepared = self.prepared();
        if prepared
            .as_ref()
            .is_some_and(|(on, _)| *on != handle as usize)
        {
            // Prepared on a connection that is gone, which `release` rules out; never touch
            // a handle that may be freed.
            std::mem::forget(prepared.take());
        }
        if prepared.is_none() {
            // SAFETY: the connection made this way never closes the handle, which stays
            // sqlx's; its statements are finalized by `release` (or never, see `Drop`).
            let direct = unsafe { rusqlite::Connection::from_handle(handle) }
                .map_err(StorageError::Write)?;
            // Five statements (two tables, plain and returning, and the archive alone) in each
            // size of one statement.
            direct.set_prepared_statement_cache_capacity(5 * super::multirow::CHUNK_SIZES.len());
            *prepared = Some((handle as usize, direct));
        }
        let Some((_, direct)) = prepared.as_ref() else {
            unreachable!("prepared just above");
        };
        let mut inserted = 0u64;
        for chunk in statement_chunks(rows) {
            // Used only while `locked` keeps sqlx's worker off the handle.
            let mut insert = direct
                .prepare_cached(&statement.text(chunk.len()))
                .map_err(StorageError::Write)?;
            bind(&mut insert, chunk).map_err(StorageError::Write)?;
            match keys.as_deref_mut() {
                None => inserted += insert.raw_execute().map_err(StorageError::Write)? as u64,
                Some(keys) => {
                    let mut returned = insert.raw_query();
                    while let Some(row) = returned.next().map_err(StorageError::Write)? {
                        keys.insert((
                            row.get(0).map_err(StorageError::Write)?,
                            row.get(1).map_err(StorageError::Write)?,
                        ));
                        inserted += 1;
                    }
                }
            }
        }
        drop(locked);
        Ok(inserted)
    }

    /// Finalizes the statements prepared on `conn`; before it closes.
    pub async fn release(&mut self, conn: &mut SqliteConnection) {
        let Some((on, direct)) = self.prepared().take() else {
            return;
        };
        let Ok(mut locked) = conn.lock_handle().await else {
            // Its worker is gone: leave them.
            *self.prepared() = Some((on, direct));
            return;
        };
        if locked.as_raw_handle().as_ptr() as usize == on {
            drop(direct);
        } else {
            // Not the connection they were prepared on.
            *self.prepared() = Some((on, direct));
        }
        drop(locked);
    }

    fn prepared(&mut self) -> &mut Option<(usize, rusqlite::Connection)> {
        self.prepared
            .get_mut()
            .unwrap_or_else(PoisonError::into_inner)
    }
}

impl Drop for DirectInserts {
    /// With statements still prepared, the writer stopped without closing its connection:
    /// its task was dropped when the runtime shut down after a drain timeout, maybe in the
    /// middle of a query on sqlx's worker. Finalizing them then could race that query, and
    /// closing the connection with them would panic; so the statements and the connection
    /// stay as they are until the process exits, which is what follows. SQLite recovers an
    /// unclosed database as after a crash: what was committed stays.
    fn drop(&mut self) {
        if let Some(prepared) = self.prepared().take() {
            std::mem::forget(prepared);
            std::mem::forget(self.pool.clone());
        }
    }
}

fn bind(
    insert: &mut rusqlite::CachedStatement<'_>,
    rows: &[SeriesRow<'_>],
) -> rusqlite::Result<()> {
    for (n, (series, r)) in rows.iter().enumerate() {
        let at = n * 5;
        insert.raw_bind_parameter(at + 1, r.time)?;
        insert.raw_bind_parameter(at + 2, *series)?;
        insert.raw_bind_parameter(at + 3, r.received_at)?;
        insert.raw_bind_parameter(at + 4, r.value)?;
        insert.raw_bind_parameter(at + 5, i64::from(r.flags.0))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use sqlx::Connection as _;
    use sqlx::sqlite::SqlitePoolOptions;

    use super::*;
    use crate::reading::{DeviceId, ReadingFlags, Series, SeriesInfo, SeriesKey};

    static INSERT: MultiRow = MultiRow::new(
        "INSERT INTO t (ts, series_id, received_at, value, flags)",
        5,
        " ON CONFLICT DO NOTHING",
    );
    static INSERT_RETURNING: MultiRow = MultiRow::new(
        "INSERT INTO t (ts, series_id, received_at, value, flags)",
        5,
        " ON CONFLICT DO NOTHING RETURNING series_id, ts",
    );

    fn readings(times: std::ops::Range<Millis>) -> Vec<Reading> {
        let series = Series::new(SeriesInfo {
            key: SeriesKey(0),
            device: DeviceId::new("d"),
            metric: Arc::from("m"),
            unit: None,
        });
        times
            .map(|time| Reading {
                series: series.clone(),
                value: time as f64 / 2.0,
                time,
                received_at: time + 1,
                flags: ReadingFlags(2),
            })
            .collect()
    }

    /// Counts and names exactly the rows inserted, in the transaction sqlx opened, keeps its
    /// statements across transactions, and leaves the connection closable.
    #[tokio::test]
    async fn inserts_count_and_name_the_new_rows_and_the_connection_still_closes()
    -> Result<(), Box<dyn std::error::Error>> {
        let pool = SqlitePoolOptions::new()
            .max_connections(1)
            .connect("sqlite::memory:")
            .await?;
        let mut conn = pool.acquire().await?;
        sqlx::query(
            "CREATE TABLE t (series_id INTEGER NOT NULL, ts INTEGER NOT NULL, \
             received_at INTEGER NOT NULL, value REAL NOT NULL, flags INTEGER NOT NULL, \
             PRIMARY KEY (series_id, ts)) WITHOUT ROWID",
        )
        .execute(&mut *conn)
        .await?;
        let mut direct = DirectInserts::new(pool.clone());

        // 1,500 rows: statements of 1,024, 256, 128, 64, 16, 8 and 4 rows.
        let first = readings(0..1500);
        let rows: Vec<SeriesRow> = first.iter().map(|r| (7, r)).collect();
        let mut tx = conn.begin().await?;
        let inserted = direct.insert_readings(&mut tx, &INSERT, &rows, None);
        assert_eq!(inserted.await?, 1500);
        tx.commit().await?;

        // Half of these are stored already: only the others are counted and named.
        let second = readings(750..2250);
        let rows: Vec<SeriesRow> = second.iter().map(|r| (7, r)).collect();
        let mut keys = HashSet::new();
        let mut tx = conn.begin().await?;
        let inserted = direct.insert_readings(&mut tx, &INSERT_RETURNING, &rows, Some(&mut keys));
        assert_eq!(inserted.await?, 750);
        tx.commit().await?;
        assert_eq!(keys, (1500..2250).map(|t| (7, t)).collect());

        // A transaction rolled back takes its direct inserts with it.
        let third = readings(5000..5010);
        let rows: Vec<SeriesRow> = third.iter().map(|r| (7, r)).collect();
        let mut tx = conn.begin().await?;
        let inserted = direct.insert_readings(&mut tx, &INSERT, &rows, None);
        assert_eq!(inserted.await?, 10);
        tx.rollback().await?;

        let stored: Vec<(i64, i64, i64, f64, i64)> =
            sqlx::query_as("SELECT series_id, ts, received_at, value, flags FROM t ORDER BY ts")
                .fetch_all(&mut *conn)
                .await?;
        let want: Vec<(i64, i64, i64, f64, i64)> = (0..2250)
            .map(|t| (7, t, t + 1, t as f64 / 2.0, 2))
            .collect();
        assert_eq!(stored, want);

        // sqlx panics closing a connection that still has statements prepared.
        direct.release(&mut conn).await;
        conn.detach().close().await?;
        Ok(())
    }
}
