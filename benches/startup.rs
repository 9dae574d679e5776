//! Start-up benchmark: `cargo bench --bench startup`.
//!
//! DESIGN.md's budget: READY within 200 ms with an existing 1 GiB database. The bench fills a
//! database to `BENCH_DB_MIB` (default 1,024) of readings and rollups from 100 devices, then
//! starts the `sensorgate run` process `REPS` times and measures from spawn to systemd's
//! `READY=1` (a datagram socket named in `NOTIFY_SOCKET`, as under `Type=notify`), stopping it
//! with SIGTERM each time. READY comes once the database is open and migrated, the devices are
//! registered, the pipeline and the HTTP API run and the sources have started; it does not
//! wait for the broker. The cases:
//!
//! - an empty database: what the process costs before its data does;
//! - the full database after a clean stop, with the file in the page cache;
//! - the full database after SIGKILL, with a 32 MiB write-ahead log (the most the writer lets
//!   grow before it checkpoints) left for SQLite to recover;
//! - the full database after a clean stop with the page cache dropped (a reboot), when the
//!   bench runs as root.

#[path = "support/gateway_process.rs"]
mod gateway_process;

use std::io::{BufRead as _, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use gateway_process::Gateway;
use rusqlite::params;

const REPS: usize = 11;
const DEVICES: i64 = 100;
const METRICS: [&str; 2] = ["temperature", "humidity"];
/// One reading per series per second, the most recent ending now.
const STEP_MS: i64 = 1_000;
/// Readings written per fill statement: one series' block of time.
const BLOCK: i64 = 100_000;
/// The log the crashed writer leaves: 32 MiB, the size at which the gateway's
/// `wal_autocheckpoint` copies pages back into the database.
const CRASH_LOG_MIB: f64 = 32.0;
/// Readings the crashed writer commits at a time.
const CRASH_ROUND: i64 = 100_000;
/// Set in the child the bench starts and kills to leave a write-ahead log behind.
const CRASH_CHILD: &str = "BENCH_STARTUP_CRASH_DB";

fn main() {
    if let Some(db) = std::env::var_os(CRASH_CHILD) {
        write_then_wait(Path::new(&db));
        return;
    }
    let target_mib: u64 = std::env::var("BENCH_DB_MIB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1_024);
    let dir = tempfile::tempdir().expect("temp dir");
    let empty = dir.path().join("empty.db");
    let full = dir.path().join("full.db");
    let empty_config = write_config(dir.path(), "empty", &empty);
    let full_config = write_config(dir.path(), "full", &full);

    // The gateway creates and migrates both files; the full one is then filled.
    start_stop(&empty_config);
    start_stop(&full_config);
    let started = Instant::now();
    let readings = fill(&full, target_mib);
    let size = file_mib(&full);
    println!(
        "startup benchmark: {readings} readings from {DEVICES} devices, {size:.0} MiB database \
         (filled in {:.1} s), median of {REPS} starts to READY=1",
        started.elapsed().as_secs_f64()
    );
    println!();
    println!("| database | median (ms) | min–max (ms) | budget (ms) |");
    println!("|---|---:|---:|---:|");
    report("empty", &measure(REPS, || start_stop(&empty_config)));
    report(
        &format!("{size:.0} MiB, clean stop, in the page cache"),
        &measure(REPS, || start_stop(&full_config)),
    );
    report(
        &format!("{size:.0} MiB, killed, 32 MiB log to recover"),
        &measure(REPS, || {
            crash_writer(&full);
            start_stop(&full_config)
        }),
    );
    if drop_page_cache(&full) {
        report(
            &format!("{size:.0} MiB, clean stop, page cache dropped"),
            &measure(REPS, || {
                drop_page_cache(&full);
                start_stop(&full_config)
            }),
        );
    } else {
        println!();
        println!("(cold start not measured: dropping the page cache needs root)");
    }
}

fn measure(reps: usize, mut once: impl FnMut() -> Duration) -> Vec<Duration> {
    let mut times: Vec<Duration> = (0..reps).map(|_| once()).collect();
    times.sort();
    times
}

fn report(case: &str, times: &[Duration]) {
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    println!(
        "| {case} | {:.1} | {:.1}–{:.1} | 200 |",
        ms(times[times.len() / 2]),
        ms(times[0]),
        ms(times[times.len() - 1])
    );
}

fn write_config(dir: &Path, name: &str, db: &Path) -> PathBuf {
    // Port 9 (discard) on loopback refuses connections: the sources back off and retry,
    // which READY does not wait for.
    let mut text = format!(
        "[storage]\npath = \"{}\"\n[http]\nenabled = true\nlisten = \"127.0.0.1:0\"\n\
         [logging]\nfilter = \"warn\"\n[[brokers]]\nurl = \"mqtt://127.0.0.1:9\"\n\
         client_id = \"bench-{name}\"\n",
        db.display()
    );
    for d in 0..DEVICES {
        text.push_str(&format!(
            "[[devices]]\nkind = \"mqtt\"\nid = \"dev-{d}\"\ntopic = \"t/{d}\"\nformat = \"json\"\n\
             [[devices.metrics]]\nname = \"{}\"\nfield = \"temp\"\n\
             [[devices.metrics]]\nname = \"{}\"\nfield = \"hum\"\n",
            METRICS[0], METRICS[1]
        ));
    }
    let path = dir.join(format!("{name}.toml"));
    std::fs::write(&path, text).expect("bench config");
    path
}

/// Starts `sensorgate run`, waits for READY=1 and stops it with SIGTERM. Returns the time
/// from spawn to READY.
fn start_stop(config: &Path) -> Duration {
    let mut gateway = Gateway::start(Path::new(env!("CARGO_BIN_EXE_sensorgate")), config);
    let ready = gateway.wait_ready();
    gateway.stop();
    ready
}

/// Fills readings and their rollups, series by series, block by block, until the file holds
/// `target_mib`. Returns the readings written.
fn fill(db: &Path, target_mib: u64) -> i64 {
    let conn = rusqlite::Connection::open(db).expect("bench db");
    conn.pragma_update(None, "synchronous", "off")
        .expect("pragma");
    conn.pragma_update(None, "cache_size", -65_536)
        .expect("pragma");
    let series: Vec<i64> = {
        let mut ids = Vec::new();
        for d in 0..DEVICES {
            let device: i64 = conn
                .query_row(
                    "SELECT id FROM devices WHERE name = ?1",
                    params![format!("dev-{d}")],
                    |row| row.get(0),
                )
                .expect("device registered by the gateway");
            for metric in METRICS {
                ids.push(
                    conn.query_row(
                        "INSERT INTO series (device_id, metric, unit) VALUES (?1, ?2, NULL) \
                         ON CONFLICT (device_id, metric) DO UPDATE SET unit = unit RETURNING id",
                        params![device, metric],
                        |row| row.get(0),
                    )
                    .expect("series"),
                );
            }
        }
        ids
    };
    let now = sensorgate::reading::now_millis();
    let target = target_mib * 1024 * 1024;
    let mut blocks = 0i64;
    let mut readings = 0i64;
    // Blocks go back in time from now, one round over every series per step, so every
    // series spans the same days, as a gateway's database does.
    'fill: loop {
        let end = now - blocks * BLOCK * STEP_MS;
        let start = end - BLOCK * STEP_MS;
        for id in &series {
            conn.execute(
                "INSERT INTO readings_archive (series_id, ts, received_at, value, flags) \
                 WITH RECURSIVE t(i) AS (SELECT 0 UNION ALL SELECT i + 1 FROM t WHERE i + 1 < ?3) \
                 SELECT ?1, ?2 + i * ?4, ?2 + i * ?4 + 40, 20.0 + (i % 600) * 0.05, 0 FROM t",
                params![id, start, BLOCK, STEP_MS],
            )
            .expect("readings");
            for width in [60_000i64, 3_600_000] {
                conn.execute(
                    "INSERT INTO rollups (series_id, width_ms, bucket, n, min_v, max_v, sum_v, \
                     first_ts, first_v, last_ts, last_v) \
                     SELECT series_id, ?4, ts - ts % ?4, count(*), min(value), max(value), \
                     sum(value), min(ts), 0, max(ts), 0 FROM readings_archive \
                     WHERE series_id = ?1 AND ts >= ?2 AND ts < ?3 GROUP BY ts - ts % ?4 \
                     ON CONFLICT DO UPDATE SET n = n + excluded.n",
                    params![id, start, end, width],
                )
                .expect("rollups");
            }
            readings += BLOCK;
            if file_bytes(&conn) >= target {
                break 'fill;
            }
        }
        blocks += 1;
    }
    conn.execute(
        "UPDATE devices SET readings = ?1, last_seen = ?2",
        params![readings / DEVICES, now],
    )
    .expect("device counts");
    readings
}

fn file_bytes(conn: &rusqlite::Connection) -> u64 {
    let bytes: i64 = conn
        .query_row(
            "SELECT page_count * page_size FROM pragma_page_count, pragma_page_size",
            [],
            |row| row.get(0),
        )
        .expect("page count");
    bytes.unsigned_abs()
}

fn file_mib(db: &Path) -> f64 {
    std::fs::metadata(db).expect("db file").len() as f64 / (1024.0 * 1024.0)
}

/// Starts this bench again as a writer that commits readings into the log without
/// checkpointing them, then kills it with SIGKILL, as power loss or the OOM
/// killer would end a gateway between two checkpoints.
fn crash_writer(db: &Path) {
    let mut child = Command::new(std::env::current_exe().expect("bench binary"))
        .env(CRASH_CHILD, db)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("crash writer");
    let mut line = String::new();
    BufReader::new(child.stdout.take().expect("stdout"))
        .read_line(&mut line)
        .expect("crash writer output");
    assert_eq!(line.trim(), "committed", "crash writer");
    child.kill().expect("SIGKILL");
    let _ = child.wait();
    let wal = file_mib(&db.with_extension("db-wal"));
    assert!(wal >= CRASH_LOG_MIB, "the crash left {wal:.1} MiB of log");
}

/// The crash child: rewrites the oldest readings of a few series, commit by commit, until
/// the log holds `CRASH_LOG_MIB`; the database does not grow from one crash to the next.
fn write_then_wait(db: &Path) {
    let conn = rusqlite::Connection::open(db).expect("bench db");
    conn.pragma_update(None, "wal_autocheckpoint", 0)
        .expect("pragma");
    let (series, oldest): (i64, i64) = conn
        .query_row(
            "SELECT series_id, min(ts) FROM readings_archive \
             WHERE series_id = (SELECT min(id) FROM series)",
            [],
            |row| Ok((row.get(0)?, row.get(1)?)),
        )
        .expect("oldest readings");
    let wal = db.with_extension("db-wal");
    let mut round = 0i64;
    while file_mib(&wal) < CRASH_LOG_MIB {
        conn.execute(
            "INSERT INTO readings_archive (series_id, ts, received_at, value, flags) \
             WITH RECURSIVE t(i) AS (SELECT 0 UNION ALL SELECT i + 1 FROM t WHERE i + 1 < ?3) \
             SELECT ?1 + i % 50, ?2 + (i / 50) * 1000, ?2, ?4, 0 FROM t \
             WHERE true ON CONFLICT DO UPDATE SET value = excluded.value",
            params![series, oldest, CRASH_ROUND, round as f64],
        )
        .expect("crash writes");
        round += 1;
    }
    println!("committed");
    // Holds the connection open until the bench kills this process.
    let mut rest = String::new();
    let _ = std::io::stdin().read_line(&mut rest);
}

/// Writes back and evicts every cached page of the database. Needs root.
fn drop_page_cache(db: &Path) -> bool {
    let _ = std::fs::File::open(db).and_then(|f| f.sync_all());
    std::fs::write("/proc/sys/vm/drop_caches", "3").is_ok()
}
