//! Query benchmark: `cargo bench --bench query`.
//!
//! One device-day at 1 Hz (86,400 readings, the last 500 not yet archived, beside a full
//! table of recent readings of other series) and a month of 1-minute rollups (43,200 rows),
//! each read through the query layer the CLI uses (`sensorgate query`), through the CLI
//! process itself (CSV to /dev/null), and through the HTTP API (the whole JSON body received).
//! Each is measured `REPS` times; the table shows medians against the budget.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use rusqlite::params;
use sensorgate::app::Gateway;
use sensorgate::storage::read::{Range, ReadStore, SeriesQuery};
use sensorgate::storage::writer::ARCHIVE_AT_ROWS;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio_util::sync::CancellationToken;

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

async fn run() {
    let dir = tempfile::tempdir().expect("temp dir");
    let db = dir.path().join("query.db");
    let text = format!(
        // START is a fixed day in the past: keep retention from deleting it mid-run.
        "[storage]\npath = \"{}\"\n[storage.retention]\nreadings = \"forever\"\nrollups = \"forever\"\n\
         [http]\nenabled = true\nlisten = \"127.0.0.1:0\"\n",
        db.display()
    );
    let config = sensorgate::config::parse(&text, Path::new("<bench>")).expect("bench config");
    let gateway = Gateway::build(config).await.expect("gateway");
    fill(&db);
    let addr = gateway.http_address().expect("http");
    let shutdown = CancellationToken::new();
    let running = tokio::spawn(gateway.run_until_stopped(shutdown.clone()));
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
    let exe = env!("CARGO_BIN_EXE_sensorgate");
    let db_arg = db.display().to_string();
    let mut rows = Vec::new();

    let mut t = Vec::new();
    for _ in 0..REPS {
        let started = Instant::now();
        let got = store.readings(day.clone()).await.expect("readings");
        t.push(started.elapsed());
        assert_eq!(got.len(), 86_400);
    }
    rows.push((
        "device-day, 86,400 readings",
        "query layer (what `query` runs)",
        median(&mut t),
        50,
    ));

    let mut t = Vec::new();
    for _ in 0..REPS {
        let started = Instant::now();
        let body = http_get(
            addr,
            &format!(
                "/api/v1/devices/meter/readings?metric=power&from={}&to={}&limit=100000",
                day.range.from, day.range.to
            ),
        )
        .await;
        t.push(started.elapsed());
        assert_eq!(body.matches("\"value\"").count(), 86_400);
    }
    rows.push((
        "device-day, 86,400 readings",
        "HTTP API, whole JSON body",
        median(&mut t),
        50,
    ));

    let mut t = Vec::new();
    for _ in 0..REPS {
        let started = Instant::now();
        cli(
            exe,
            &[
                "query",
                "--db",
                &db_arg,
                "meter",
                "power",
                "--from",
                &day.range.from.to_string(),
                "--to",
                &day.range.to.to_string(),
                "--limit",
                "100000",
                "--format",
                "csv",
            ],
        );
        t.push(started.elapsed());
    }
    rows.push((
        "device-day, 86,400 readings",
        "`sensorgate query --format csv` process",
        median(&mut t),
        50,
    ));

    let mut t = Vec::new();
    for _ in 0..REPS {
        let started = Instant::now();
        let got = store.rollups(month.clone(), 60_000).await.expect("rollups");
        t.push(started.elapsed());
        assert_eq!(got.len(), 43_200);
    }
    rows.push((
        "month of 1-minute rollups, 43,200 rows",
        "query layer",
        median(&mut t),
        20,
    ));

    let mut t = Vec::new();
    for _ in 0..REPS {
        let started = Instant::now();
        let body = http_get(
            addr,
            &format!(
                "/api/v1/devices/meter/rollups?metric=power&window=1m&from={}&to={}&limit=100000",
                month.range.from, month.range.to
            ),
        )
        .await;
        t.push(started.elapsed());
        assert_eq!(body.matches("\"count\"").count(), 43_200);
    }
    rows.push((
        "month of 1-minute rollups, 43,200 rows",
        "HTTP API, whole JSON body",
        median(&mut t),
        20,
    ));

    println!("query benchmark: median of {REPS}");
    println!();
    println!("| data | read through | median (ms) | budget (ms) |");
    println!("|---|---|---:|---:|");
    for (data, path, took, budget) in rows {
        println!(
            "| {data} | {path} | {:.1} | {budget} |",
            took.as_secs_f64() * 1000.0
        );
    }
    shutdown.cancel();
    running.await.expect("gateway").expect("drains");
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

async fn http_get(addr: std::net::SocketAddr, path: &str) -> String {
    let mut stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.expect("request");
    let mut raw = Vec::with_capacity(16 << 20);
    stream.read_to_end(&mut raw).await.expect("response");
    assert!(
        raw.starts_with(b"HTTP/1.1 200"),
        "{}",
        String::from_utf8_lossy(&raw[..raw.len().min(300)])
    );
    String::from_utf8(raw).expect("UTF-8")
}

#[allow(
    clippy::disallowed_methods,
    reason = "timing a child process end to end"
)]
fn cli(exe: &str, args: &[&str]) {
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
