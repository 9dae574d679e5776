//! Readings into SQLite through its own API, on the writer's sqlx connection.
//!
//! Inserting readings is most of what SQLite does for a batch. Through sqlx each value is
//! first collected into an argument list on the writer's task, then bound on sqlx's worker
//! thread (which looks up every parameter's name and clears every binding twice per
//! statement), and each query is a round trip between the two threads. Here the writer
//! locks the handle out of sqlx's worker and binds each value straight into a prepared
//! statement, inside the transaction sqlx opened: QoS 0 ingest +10 % and 7 % less gateway
//! CPU per message (`cargo bench --bench ingest` with `BENCH_BASELINE`, both orders).

use std::collections::HashSet;

use sqlx::SqliteConnection;

use super::StorageError;
use super::multirow::{MultiRow, statement_chunks};
use crate::reading::{Millis, Reading};

/// A reading with its series' database id, as the insert statements bind it.
pub type SeriesRow<'b> = (i64, &'b Reading);

/// Inserts `rows` with `statement`, whose values are `(ts, series_id, received_at, value,
/// flags)` per row, in the transaction open on `conn`; returns how many rows it inserted.
/// With `keys`, the statement returns `(series_id, ts)` of each row it inserted, and they
/// go there.
///
/// This runs on the caller's thread: a batch of 50,000 readings holds it for about 20 ms.
pub async fn insert_readings(
    conn: &mut SqliteConnection,
    statement: &MultiRow,
    rows: &[SeriesRow<'_>],
    mut keys: Option<&mut HashSet<(i64, Millis)>>,
) -> Result<u64, StorageError> {
    if rows.is_empty() {
        return Ok(0);
    }
    let mut locked = conn.lock_handle().await?;
    // SAFETY: sqlx's worker does not touch the handle while `locked` lives; `direct` is
    // declared after it, so it is dropped first, and dropping it finalizes its statements
    // without closing the handle, which stays sqlx's.
    let direct = unsafe { rusqlite::Connection::from_handle(locked.as_raw_handle().as_ptr()) }
        .map_err(StorageError::Write)?;
    let mut inserted = 0u64;
    for chunk in statement_chunks(rows) {
        // Prepared once per batch and shape: the cache goes with `direct`.
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
    Ok(inserted)
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
