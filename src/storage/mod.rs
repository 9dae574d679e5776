//! SQLite storage: migrations, the one writer, and read queries on a separate read-only pool.
//!
//! Every write goes through [`writer::Writer`], one transaction per [`Batch`], on sqlx.
//! Readers ([`read::ReadStore`]) open the file read-only; WAL lets them run while the writer
//! commits.

mod direct;
mod multirow;
pub mod read;
pub mod writer;

use std::collections::HashMap;

use std::path::Path;

use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous,
};

use crate::config::{StorageConfig, Synchronous};
use crate::reading::{
    DeviceId, FaultCounts, Millis, Reading, Rejection, Rollups, StatusChange, Ticket,
};

pub use read::ReadStore;
pub use writer::Writer;

/// Everything one transaction writes.
#[derive(Debug, Default)]
pub struct Batch {
    pub readings: Vec<Reading>,
    pub rejections: Vec<Rejection>,
    pub statuses: Vec<StatusChange>,
    /// The rollup cells of `readings`, used as they are when none of them was stored before.
    pub rollups: Rollups,
    /// Settled after commit, in the order they were received.
    pub tickets: Vec<Ticket>,
    /// Readings dropped because the same key appeared earlier in this batch, per device.
    pub duplicates: HashMap<DeviceId, u64>,
    /// Transport and protocol faults the sources counted, per device.
    pub faults: HashMap<DeviceId, FaultCounts>,
    /// The newest heartbeat that entered the pipeline before this batch was cut.
    pub heartbeat: Option<Millis>,
    /// A reloaded config: its new devices are registered and its removed ones retired in
    /// this batch's transaction.
    pub reconfigure: Option<std::sync::Arc<crate::config::Config>>,
    pub messages: usize,
}

impl Batch {
    /// Nothing to write: at most a heartbeat to pass on.
    pub fn has_no_data(&self) -> bool {
        self.messages == 0
            && self.statuses.is_empty()
            && self.faults.is_empty()
            && self.tickets.is_empty()
            && self.reconfigure.is_none()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    #[error("cannot open database {path}: {source}")]
    Open {
        path: String,
        #[source]
        source: sqlx::Error,
    },
    #[error("cannot migrate database {path}: {source}")]
    Migrate {
        path: String,
        #[source]
        source: sqlx::migrate::MigrateError,
    },
    #[error("cannot open database {path} for reading: {source}")]
    OpenRead {
        path: String,
        #[source]
        source: rusqlite::Error,
    },
    #[error("{0} is not a sensorgate database (it has no devices and readings tables)")]
    NotSensorgate(String),
    #[error(
        "{path} is not a SQLite database ({reason}); refusing to start so it stays as it is: \
         move it away or set storage.path to another file"
    )]
    Corrupt { path: String, reason: String },
    #[error(
        "{path} is a SQLite database of something else (tables {tables}); refusing to write \
         into it: set storage.path to another file"
    )]
    Foreign { path: String, tables: String },
    #[error("no device `{0}` in the database; `sensorgate devices` lists them")]
    UnknownDevice(String),
    #[error("cursor `{0}` does not belong to this query; start again without it")]
    BadCursor(String),
    #[error("database query failed: {0}")]
    Query(#[from] sqlx::Error),
    #[error("database read failed: {0}")]
    Read(#[from] rusqlite::Error),
    #[error("database write failed: {0}")]
    Write(#[source] rusqlite::Error),
    #[error("the query was cancelled while the gateway stopped")]
    Closed,
}

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

/// Refuses a file that is not ours before anything writes to it (even switching a database
/// to WAL rewrites its header): one that is not a SQLite database, or a SQLite database with
/// tables but no sensorgate migrations.
fn check_existing(path: &Path) -> Result<(), StorageError> {
    let name = path.display().to_string();
    if std::fs::metadata(path).map_or(true, |m| m.len() == 0) {
        return Ok(());
    }
    let corrupt = |err: rusqlite::Error| StorageError::Corrupt {
        path: name.clone(),
        reason: err.to_string(),
    };
    let conn =
        rusqlite::Connection::open_with_flags(path, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
            .map_err(corrupt)?;
    let tables: Vec<String> = conn
        .prepare("SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%' ORDER BY name")
        .and_then(|mut stmt| stmt.query_map([], |r| r.get(0))?.collect())
        .map_err(corrupt)?;
    if !tables.is_empty() && !tables.iter().any(|t| t == "_sqlx_migrations") {
        return Err(StorageError::Foreign {
            path: name,
            tables: tables.join(", "),
        });
    }
    Ok(())
}

/// Opens (creating if needed) the database for writing and applies migrations. The pool has
/// one connection: there is one writer.
///
/// # Errors
/// When the file cannot be opened or created, or a migration fails.
pub async fn open_for_writing(config: &StorageConfig) -> Result<SqlitePool, StorageError> {
    let path = config.path.as_path();
    let name = path.display().to_string();
    check_existing(path)?;
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(|err| StorageError::Open {
            path: name.clone(),
            source: sqlx::Error::Io(err),
        })?;
    }
    let options = SqliteConnectOptions::new()
        .filename(path)
        .create_if_missing(true)
        .journal_mode(SqliteJournalMode::Wal)
        .synchronous(match config.synchronous {
            Synchronous::Full => SqliteSynchronous::Full,
            Synchronous::Normal => SqliteSynchronous::Normal,
        })
        .busy_timeout(config.busy_timeout)
        .foreign_keys(false)
        // Enough for every statement shape the writer runs through sqlx (three multi-row
        // statements in each of multirow::CHUNK_SIZES, and sixteen others), so none is
        // evicted and prepared again; the cache holds only shapes that ran. The readings'
        // inserts are prepared through SQLite's own API and kept by `direct::DirectInserts`.
        .statement_cache_capacity(64)
        // Negative: a size in KiB rather than in pages.
        .pragma(
            "cache_size",
            format!("-{}", u64::from(config.cache_mib) * 1024),
        )
        // Checkpoint every 32 MiB of WAL rather than 4: pages every batch touches (the last
        // leaf of each series, the current rollups) are copied back once, not once per 4 MiB.
        .pragma("wal_autocheckpoint", "8192")
        // Moving recent readings into the archive sorts them by series; in memory rather
        // than through a temporary file that would be written and read back each time.
        .pragma("temp_store", "memory");
    let pool = SqlitePoolOptions::new()
        .max_connections(1)
        .min_connections(1)
        .idle_timeout(None)
        .max_lifetime(None)
        .connect_with(options)
        .await
        .map_err(|source| StorageError::Open {
            path: name.clone(),
            source,
        })?;
    MIGRATOR
        .run(&pool)
        .await
        .map_err(|source| StorageError::Migrate { path: name, source })?;
    Ok(pool)
}
