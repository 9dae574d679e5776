//! Query benchmark: `cargo bench --bench query`.
//!
//! One device-day at 1 Hz (86,400 readings, the last 500 not yet archived, beside a full
//! table of recent readings of other series) and a month of 1-minute rollups (43,200 rows),
//! each read through the query layer the CLI uses (`sensorgate query`), through the CLI
//! process itself (CSV to /dev/null), and through the HTTP API of the `sensorgate run`
//! process (the whole JSON body received). Each is measured `REPS` times; the table shows
//! medians against the budget. `BENCH_BASELINE=path/to/another/sensorgate` runs that binary's
//! API and CLI on a copy of the same database, alternating with this build's in every
//! repetition.

#[path = "support/gateway_process.rs"]
mod gateway_process;
#[path = "support/proc_stat.rs"]
mod proc_stat;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use gateway_process::Gateway;
use rusqlite::params;
use sensorgate::storage::read::{Range, ReadStore, SeriesQuery};
use sensorgate::storage::writer::ARCHIVE_AT_ROWS;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

const REPS: usize = 11;
const DAY_MS: i64 = 86_400_000;
const START: i64 = 1_764_000_000_000;
/// The queried series' readings still in `readings_recent`; other series fill it up to the
/// size at which the writer archives it, the most a query has to scan there.
const RECENT_OF_SERIES: i64 = 500;

fn main() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(run());
}

/// The `sensorgate run` process under test: a binary, its database and where its API listens.
struct Build {
    name: &'static str,
    exe: PathBuf,
    db: PathBuf,
    addr: SocketAddr,
    gateway: Option<Gateway>,
}

impl Build {
    fn new(name: &'static str, exe: PathBuf, dir: &Path) -> Self {
        let db = dir.join(format!("{name}.db"));
        // Port 0 would leave the port to find out; a port just free is good enough here.
        let addr = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("free port");
        Self {
            name,
            exe,
            db,
            addr,
            gateway: None,
        }
    }

    fn start(&mut self) {
        let config = self.db.with_extension("toml");
        std::fs::write(
            &config,
            format!(
                // START is a fixed day in the past: keep retention from deleting it.
                "[storage]\npath = \"{}\"\n[storage.retention]\nreadings = \"forever\"\n\
                 rollups = \"forever\"\n[http]\nenabled = true\nlisten = \"{}\"\n",
                self.db.display(),
                self.addr
            ),
        )
        .expect("bench config");
        let mut gateway = Gateway::start(&self.exe, &config);
        gateway.wait_ready();
        self.gateway = Some(gateway);
    }

    /// CPU time of the running gateway so far.
    fn cpu_time(&self) -> Duration {
        self.gateway.as_ref().map_or(Duration::ZERO, |g| {
            proc_stat::cpu_time(&g.pid().to_string())
        })
    }

    fn stop(&mut self) {
        if let Some(gateway) = self.gateway.take() {
            gateway.stop();
        }
    }
}

async fn run() {
    let dir = tempfile::tempdir().expect("temp dir");
    let mut builds = vec![Build::new(
        "this build",
        PathBuf::from(env!("CARGO_BIN_EXE_sensorgate")),
        dir.path(),
    )];
    if let Some(exe) = std::env::var_os("BENCH_BASELINE") {
        builds.push(Build::new("baseline", PathBuf::from(exe), dir.path()));
    }
    // This build creates the schema; the filled file is copied for the baseline, which
    // reads the same rows.
    builds[0].start();
    builds[0].stop();
    let db = builds[0].db.clone();
    fill(&db);
    for build in &mut builds[1..] {
        std::fs::copy(&db, &build.db).expect("copy of the filled database");
        forget_unknown_migrations(&build.exe, &build.db);
    }
    for build in &mut builds {
        build.start();
    }
    let store = ReadStore::open(&db).expect("read store");
    let day = SeriesQuery {
        device: "meter".into(),
        metric: Some("power".into()),
        range: Range {
            from: START,
            to: START + DAY_MS,
            limit: 100_000,
        },
        after: None,
    };
    let month = SeriesQuery {
        range: Range {
            from: START - 29 * DAY_MS,
            to: START + DAY_MS,
            limit: 100_000,
        },
        ..day.clone()
    };
    let mut rows: Vec<(&str, String, Duration, Option<Duration>, u32)> = Vec::new();
    let label = |through: &str, build: &Build| {
        if builds.len() > 1 {
            format!("{through}, {}", build.name)
        } else {
            through.to_string()
        }
    };
    let day_label = "device-day, 86,400 readings";
    let month_label = "month of 1-minute rollups, 43,200 rows";

    let mut t = Vec::new();
    for _ in 0..REPS {
        let started = Instant::now();
        let got = store.readings(day.clone()).await.expect("readings");
        t.push(started.elapsed());
        assert_eq!(got.len(), 86_400);
    }
    rows.push((
        day_label,
        "query layer (what `query` runs)".into(),
        median(&mut t),
        None,
        50,
    ));

    let path = format!(
        "/api/v1/devices/meter/readings?metric=power&from={}&to={}&limit=100000",
        day.range.from, day.range.to
    );
    let times = http_times(&builds, &path, "\"value\"", 86_400).await;
    for (build, (mut t, cpu)) in builds.iter().zip(times) {
        rows.push((
            day_label,
            label("HTTP API, whole JSON body", build),
            median(&mut t),
            Some(cpu),
            50,
        ));
    }

    let from = day.range.from.to_string();
    let to = day.range.to.to_string();
    let mut times = vec![Vec::new(); builds.len()];
    for _ in 0..REPS {
        for (build, t) in builds.iter().zip(&mut times) {
            let started = Instant::now();
            cli(
                &build.exe,
                &[
                    "query".as_ref(),
                    "--db".as_ref(),
                    build.db.as_os_str(),
                    "meter".as_ref(),
                    "power".as_ref(),
                    "--from".as_ref(),
                    from.as_ref(),
                    "--to".as_ref(),
                    to.as_ref(),
                    "--limit".as_ref(),
                    "100000".as_ref(),
                    "--format".as_ref(),
                    "csv".as_ref(),
                ],
            );
            t.push(started.elapsed());
        }
    }
    for (build, mut t) in builds.iter().zip(times) {
        rows.push((
            day_label,
            label("`sensorgate query --format csv` process", build),
            median(&mut t),
            None,
            50,
        ));
    }

    let mut t = Vec::new();
    for _ in 0..REPS {
        let started = Instant::now();
        let got = store.rollups(month.clone(), 60_000).await.expect("rollups");
        t.push(started.elapsed());
        assert_eq!(got.len(), 43_200);
    }
    rows.push((month_label, "query layer".into(), median(&mut t), None, 20));

    let path = format!(
        "/api/v1/devices/meter/rollups?metric=power&window=1m&from={}&to={}&limit=100000",
        month.range.from, month.range.to
    );
    let times = http_times(&builds, &path, "\"count\"", 43_200).await;
    for (build, (mut t, cpu)) in builds.iter().zip(times) {
        rows.push((
            month_label,
            label("HTTP API, whole JSON body", build),
            median(&mut t),
            Some(cpu),
            20,
        ));
    }

    println!("query benchmark: median of {REPS}");
    println!();
    println!("| data | read through | median (ms) | gateway CPU per request (ms) | budget (ms) |");
    println!("|---|---|---:|---:|---:|");
    let ms = |d: Duration| format!("{:.1}", d.as_secs_f64() * 1000.0);
    for (data, through, took, cpu, budget) in rows {
        println!(
            "| {data} | {through} | {} | {} | {budget} |",
            ms(took),
            cpu.map_or("–".into(), ms)
        );
    }
    for build in &mut builds {
        build.stop();
    }
}

/// `REPS` GETs of `path` from each build in turn, each checked to hold `count` rows (by
/// counting `key`). For each build, in the order of `builds`: the times, and the gateway's
/// CPU time per request.
async fn http_times(
    builds: &[Build],
    path: &str,
    key: &str,
    count: usize,
) -> Vec<(Vec<Duration>, Duration)> {
    let mut times = vec![Vec::new(); builds.len()];
    let mut cpu = vec![Duration::ZERO; builds.len()];
    let mut body = Vec::new();
    for _ in 0..REPS {
        for (i, build) in builds.iter().enumerate() {
            let before = build.cpu_time();
            times[i].push(http_get(build.addr, path, &mut body).await);
            cpu[i] += build.cpu_time() - before;
            let text = std::str::from_utf8(&body).expect("UTF-8");
            assert_eq!(text.matches(key).count(), count, "{}", build.name);
        }
    }
    times
        .into_iter()
        .zip(cpu)
        .map(|(t, cpu)| (t, cpu / REPS as u32))
        .collect()
}

/// One device with a day of 1 Hz readings and a month of 1-minute rollups.
fn fill(db: &Path) {
    let mut conn = rusqlite::Connection::open(db).expect("bench db");
    let tx = conn.transaction().expect("transaction");
    tx.execute(
        "INSERT INTO devices (name, kind, state) VALUES ('meter', 'modbus', 'stopped')",
        [],
    )
    .expect("device");
    let device = tx.last_insert_rowid();
    tx.execute(
        "INSERT INTO series (device_id, metric, unit) VALUES (?1, 'power', 'W')",
        params![device],
    )
    .expect("series");
    let series = tx.last_insert_rowid();
    {
        let mut insert = tx
            .prepare("INSERT INTO readings_archive (series_id, ts, received_at, value, flags) VALUES (?1, ?2, ?3, ?4, 0)")
            .expect("insert");
        let mut recent = tx
            .prepare("INSERT INTO readings_recent (ts, series_id, received_at, value, flags) VALUES (?1, ?2, ?3, ?4, 0)")
            .expect("insert");
        for i in 0..86_400i64 {
            let ts = START + i * 1000;
            let value = 1000.0 + (i % 600) as f64 * 0.25;
            // The day's last readings are not archived yet.
            if i < 86_400 - RECENT_OF_SERIES {
                insert.execute(params![series, ts, ts + 7, value])
            } else {
                recent.execute(params![ts, series, ts + 7, value])
            }
            .expect("reading");
        }
        // The rest of a full recent table: readings of other series in the same hours.
        let others = ARCHIVE_AT_ROWS as i64 - RECENT_OF_SERIES;
        for i in 0..others {
            let ts = START + DAY_MS - others * 10 + i * 10;
            recent
                .execute(params![ts, series + 1 + i % 99, ts, 1.0])
                .expect("other reading");
        }
        let mut rollup = tx
            .prepare(
                "INSERT INTO rollups (series_id, width_ms, bucket, n, min_v, max_v, sum_v, first_ts, first_v, last_ts, last_v) \
                 VALUES (?1, 60000, ?2, 60, 1000.0, 1150.0, 64000.0, ?2, 1000.0, ?3, 1150.0)",
            )
            .expect("rollup");
        for i in 0..43_200i64 {
            let bucket = START - 29 * DAY_MS + i * 60_000;
            rollup
                .execute(params![series, bucket, bucket + 59_000])
                .expect("rollup row");
        }
    }
    tx.commit().expect("commit");
}

/// Removes from `db` the record of migrations that `exe` does not have, so an older build
/// opens a database this build made (it refuses a database migrated beyond what it knows).
/// Their tables and columns stay: migrations only add them, and the older build's queries
/// name the columns they use.
fn forget_unknown_migrations(exe: &Path, db: &Path) {
    let dir = tempfile::tempdir().expect("temp dir");
    let empty = dir.path().join("empty.db");
    let config = dir.path().join("empty.toml");
    std::fs::write(
        &config,
        format!("[storage]\npath = \"{}\"\n", empty.display()),
    )
    .expect("config");
    cli(
        exe,
        &["migrate".as_ref(), "--config".as_ref(), config.as_os_str()],
    );
    let known: Vec<i64> = rusqlite::Connection::open(&empty)
        .expect("empty db")
        .prepare("SELECT version FROM _sqlx_migrations")
        .and_then(|mut s| s.query_map([], |r| r.get(0))?.collect())
        .expect("versions");
    let conn = rusqlite::Connection::open(db).expect("copy");
    let stored: Vec<i64> = conn
        .prepare("SELECT version FROM _sqlx_migrations")
        .and_then(|mut s| s.query_map([], |r| r.get(0))?.collect())
        .expect("versions");
    for version in stored.iter().filter(|v| !known.contains(v)) {
        conn.execute(
            "DELETE FROM _sqlx_migrations WHERE version = ?1",
            params![version],
        )
        .expect("forget a migration");
    }
}

/// GETs `path` into `body` (cleared first, its capacity kept from one request to the next,
/// as a client reading into a buffer would); returns the time from connecting to the last
/// byte received.
async fn http_get(addr: SocketAddr, path: &str, body: &mut Vec<u8>) -> Duration {
    body.clear();
    let started = Instant::now();
    let mut stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.expect("request");
    stream.read_to_end(body).await.expect("response");
    let took = started.elapsed();
    assert!(
        body.starts_with(b"HTTP/1.1 200"),
        "{}",
        String::from_utf8_lossy(&body[..body.len().min(300)])
    );
    took
}

#[allow(
    clippy::disallowed_methods,
    reason = "timing a child process end to end"
)]
fn cli(exe: &Path, args: &[&std::ffi::OsStr]) {
    let status = Command::new(exe)
        .args(args)
        .stdout(std::process::Stdio::null())
        .status()
        .expect("sensorgate runs");
    assert!(status.success());
}

fn median(values: &mut [Duration]) -> Duration {
    values.sort();
    values[values.len() / 2]
}
