//! Serial text-line sensors end to end: a simulated sensor on a pseudo-terminal, the gateway
//! reading it like a real port, and the database checked line by line against the plan.

mod support;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use sensorgate::app::{AppError, Gateway};
use sensorgate_sim::pty::Pty;
use sensorgate_sim::serial::{LineFormat, LineOptions, LineScenario, LineSensor, REGEX_LINE};
use sensorgate_sim::{Expect, Pace};
use sqlx::sqlite::SqlitePool;
use support::*;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// The `[[serial_ports]]` and `[[devices]]` entries for a line sensor at `path`.
fn line_device(id: &str, path: &Path, format: LineFormat, extra: &str) -> String {
    let layout = match format {
        LineFormat::Json => "format = \"json\"".to_string(),
        LineFormat::KeyValue => "format = \"key_value\"".to_string(),
        LineFormat::Csv => "format = \"csv\"\ncolumns = [\"ts\", \"temp\", \"hum\"]".to_string(),
        LineFormat::Regex => format!("format = \"regex\"\npattern = '{REGEX_LINE}'"),
    };
    format!(
        "[[serial_ports]]\nid = \"{id}-port\"\npath = \"{}\"\nreconnect_max = \"1s\"\n\n\
         [[devices]]\nkind = \"serial\"\nid = \"{id}\"\nport = \"{id}-port\"\n{layout}\n\
         timestamp_field = \"ts\"\n{extra}\n\
         [[devices.metrics]]\nname = \"temperature\"\nfield = \"temp\"\nunit = \"°C\"\nmin = -40.0\nmax = 85.0\n\
         [[devices.metrics]]\nname = \"humidity\"\nfield = \"hum\"\nunit = \"%\"\nmin = 0.0\nmax = 100.0\n\n",
        path.display()
    )
}

async fn start_gateway(
    db: &Path,
    devices: &str,
) -> (CancellationToken, JoinHandle<Result<(), AppError>>) {
    init_logging();
    let text = format!("[storage]\npath = \"{}\"\n\n{devices}", db.display());
    let config = sensorgate::config::parse(&text, Path::new("test.toml")).expect("test config");
    let gateway = Gateway::build(config).await.expect("gateway builds");
    let shutdown = CancellationToken::new();
    let handle = tokio::spawn(gateway.run_until_stopped(shutdown.clone()));
    (shutdown, handle)
}

fn scenario(format: LineFormat, lines: u64, fault_every: u64) -> LineScenario {
    LineScenario {
        start_ms: sensorgate::reading::now_millis() - 3_600_000,
        fault_every,
        ..LineScenario::new(format, lines)
    }
}

/// `(device, metric, time) -> value`, as `stored_readings` returns it.
type Readings = BTreeMap<(String, String, i64), f64>;

/// What `plan` should leave in the database for device `id`.
fn expected_for(id: &str, plan: &LineScenario, lines: u64) -> (Readings, BTreeMap<String, i64>) {
    let mut readings = BTreeMap::new();
    let mut rejections = BTreeMap::new();
    for line in plan.lines().take(lines as usize) {
        let Expect {
            readings: r,
            rejections: j,
        } = line.expect;
        for (metric, time, value) in r {
            readings.insert(
                (
                    id.to_string(),
                    metric.to_string(),
                    time.expect("lines carry ts"),
                ),
                value,
            );
        }
        for reason in j {
            *rejections.entry(reason.to_string()).or_default() += 1;
        }
    }
    (readings, rejections)
}

async fn rejections_of(pool: &SqlitePool, id: &str) -> BTreeMap<String, i64> {
    use sqlx::Row as _;
    sqlx::query(
        "SELECT reason, count(*) FROM rejections r JOIN devices d ON d.id = r.device_id \
         WHERE d.name = ?1 GROUP BY reason",
    )
    .bind(id)
    .fetch_all(pool)
    .await
    .unwrap()
    .into_iter()
    .map(|r| (r.get(0), r.get(1)))
    .collect()
}

fn readings_of(all: &Readings, id: &str) -> Readings {
    all.iter()
        .filter(|((device, _, _), _)| device == id)
        .map(|(k, v)| (k.clone(), *v))
        .collect()
}

async fn wait_for_rows(pool: &SqlitePool, what: &str, readings: usize, rejections: i64) {
    wait_for(what, Duration::from_secs(30), || async {
        count(pool, "SELECT count(*) FROM readings").await >= readings as i64
            && count(pool, "SELECT count(*) FROM rejections").await >= rejections
    })
    .await;
}

async fn device_field(pool: &SqlitePool, id: &str, column: &str) -> i64 {
    let sql = format!("SELECT {column} FROM devices WHERE name = ?1");
    sqlx::query_scalar(sqlx::AssertSqlSafe(sql))
        .bind(id)
        .fetch_one(pool)
        .await
        .unwrap()
}

async fn device_state(pool: &SqlitePool, id: &str) -> (String, Option<String>) {
    sqlx::query_as("SELECT state, last_error FROM devices WHERE name = ?1")
        .bind(id)
        .fetch_one(pool)
        .await
        .unwrap()
}

async fn wait_for_state(pool: &SqlitePool, id: &str, state: &str) {
    wait_for(
        &format!("{id} {state}"),
        Duration::from_secs(15),
        || async { device_state(pool, id).await.0 == state },
    )
    .await;
}

fn pty_path(dir: &Path, name: &str) -> PathBuf {
    dir.join(format!("tty-{name}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_line_format_is_stored_exactly_with_its_faults_rejected() {
    let dir = tempfile::tempdir().unwrap();
    let db = db_path(dir.path());
    let formats = [
        (LineFormat::Json, "json"),
        (LineFormat::KeyValue, "kv"),
        (LineFormat::Csv, "csv"),
        (LineFormat::Regex, "regex"),
    ];
    const LINES: u64 = 60;
    let mut devices = String::new();
    let mut sensors = Vec::new();
    let mut want = BTreeMap::new();
    let mut want_rejections = BTreeMap::new();
    for (format, id) in formats {
        let path = pty_path(dir.path(), id);
        let pty = Pty::open(&path).unwrap();
        devices.push_str(&line_device(id, &path, format, ""));
        // Every fault kind twice: out of range, NaN, malformed, noise, split, too long.
        let plan = scenario(format, LINES, 5);
        let (readings, rejections) = expected_for(id, &plan, LINES);
        want.extend(readings);
        want_rejections.insert(id, rejections);
        sensors.push(LineSensor::start(
            pty,
            plan.lines(),
            LineOptions::default(),
            CancellationToken::new(),
        ));
    }
    let (shutdown, gateway) = start_gateway(&db, &devices).await;
    let pool = read_pool(&db).await;
    let rejections_total: i64 = want_rejections.values().flat_map(|m| m.values()).sum();
    wait_for_rows(&pool, "every line stored", want.len(), rejections_total).await;
    for sensor in &sensors {
        assert!(sensor.report().plan_done);
    }

    let stored = stored_readings(&pool).await;
    for (_, id) in formats {
        assert_eq!(
            readings_of(&stored, id),
            readings_of(&want, id),
            "readings of {id}"
        );
        assert_eq!(
            rejections_of(&pool, id).await,
            want_rejections[id],
            "rejections of {id}"
        );
        assert_eq!(device_state(&pool, id).await, ("connected".into(), None));
    }
    assert_eq!(stored.len(), want.len());
    assert!(rollup_mismatches(&pool).await.is_empty());
    let too_long: Vec<u8> =
        sqlx::query_scalar("SELECT raw FROM rejections WHERE reason = 'too_large' LIMIT 1")
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!(
        too_long.len(),
        1024,
        "a too-long line keeps its first max_line bytes"
    );

    shutdown.cancel();
    gateway.await.unwrap().unwrap();
}

/// CPU time of the calling thread: with a current-thread runtime that is the gateway's and
/// the simulator's together.
fn thread_cpu() -> Duration {
    let mut usage = std::mem::MaybeUninit::<libc::rusage>::zeroed();
    // SAFETY: getrusage writes a plain struct into the buffer it is given.
    let usage = unsafe {
        libc::getrusage(libc::RUSAGE_THREAD, usage.as_mut_ptr());
        usage.assume_init()
    };
    let micros = |t: libc::timeval| t.tv_sec as u64 * 1_000_000 + t.tv_usec as u64;
    Duration::from_micros(micros(usage.ru_utime) + micros(usage.ru_stime))
}

#[tokio::test(flavor = "current_thread")]
async fn an_unplugged_port_is_reopened_with_backoff_and_nothing_after_replug_is_lost() {
    let dir = tempfile::tempdir().unwrap();
    let db = db_path(dir.path());
    let path = pty_path(dir.path(), "unplug");
    let plan = scenario(LineFormat::Csv, 40, 0);
    let (want, _) = expected_for("station", &plan, 40);
    let sensor = LineSensor::start(
        Pty::open(&path).unwrap(),
        plan.lines(),
        LineOptions {
            pace: Pace::Steady(50.0),
            pause_at: Some(15),
            ..LineOptions::default()
        },
        CancellationToken::new(),
    );
    let (shutdown, gateway) =
        start_gateway(&db, &line_device("station", &path, LineFormat::Csv, "")).await;
    let pool = read_pool(&db).await;
    wait_for_rows(&pool, "the first 15 lines", 30, 0).await;

    sensor.unplug().await.unwrap();
    wait_for_state(&pool, "station", "failing").await;
    let (_, error) = device_state(&pool, "station").await;
    assert!(
        error
            .as_deref()
            .is_some_and(|e| e.contains(&path.display().to_string())),
        "{error:?}"
    );
    let reconnects_before = device_field(&pool, "station", "reconnects").await;
    let cpu_before = thread_cpu();
    tokio::time::sleep(Duration::from_secs(3)).await;
    let outage_cpu = thread_cpu() - cpu_before;
    let attempts = device_field(&pool, "station", "reconnects").await - reconnects_before;
    eprintln!("3 s unplugged: {attempts} reopen attempts, {outage_cpu:?} CPU");
    // Backoff from 100 ms doubling to the 1 s cap: about six attempts in 3 s, not thousands.
    assert!(
        (2..=8).contains(&attempts),
        "{attempts} reopen attempts in 3 s"
    );
    assert!(
        outage_cpu < Duration::from_millis(300),
        "{outage_cpu:?} of CPU in a 3 s outage"
    );

    sensor.replug().await.unwrap();
    sensor.resume().await.unwrap();
    wait_for_rows(&pool, "all 40 lines", 80, 0).await;
    wait_for_state(&pool, "station", "connected").await;
    assert_eq!(stored_readings(&pool).await, want);

    shutdown.cancel();
    gateway.await.unwrap().unwrap();
}

/// Four unplugs 3 s apart once grew the waits from 1.6 s to 12.8 s, so most lines written
/// while the port was plugged in were read late or not at all: a reopen that reads data now
/// starts the backoff over.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_port_pulled_for_a_moment_again_and_again_is_reopened_within_the_first_waits() {
    let dir = tempfile::tempdir().unwrap();
    let db = db_path(dir.path());
    let path = pty_path(dir.path(), "flaky");
    let plan = scenario(LineFormat::KeyValue, 5_000, 0);
    let sensor = LineSensor::start(
        Pty::open(&path).unwrap(),
        plan.lines(),
        LineOptions {
            pace: Pace::Steady(20.0),
            ..LineOptions::default()
        },
        CancellationToken::new(),
    );
    // A cap of 30 s: without the reset the waits double across unplugs, 0.8 s before the
    // second reopen, 1.6 s, 3.2 s, 6.4 s before the fifth.
    let device = line_device("flaky", &path, LineFormat::KeyValue, "")
        .replace("reconnect_max = \"1s\"", "reconnect_max = \"30s\"");
    let (shutdown, gateway) = start_gateway(&db, &device).await;
    sensor.wait_written(10).await.unwrap();
    let mut waits = Vec::new();
    for _ in 0..5 {
        sensor.unplug().await.unwrap();
        // Out long enough for the gateway to fail a reopen or two.
        tokio::time::sleep(Duration::from_millis(500)).await;
        sensor.replug().await.unwrap();
        let replugged = tokio::time::Instant::now();
        // The sensor writes only to a reader: its next line marks the reopen.
        let written = sensor.report().written;
        sensor.wait_written(written + 1).await.unwrap();
        waits.push(replugged.elapsed());
        sensor.wait_written(written + 10).await.unwrap();
    }
    eprintln!("reopened after each replug within {waits:?}");
    // Waits of 100, 200 and 400 ms cover a 500 ms pull; the reopen comes at most 400 ms
    // after the replug.
    assert!(
        waits.iter().all(|w| *w < Duration::from_secs(1)),
        "reopened {waits:?} after each replug"
    );
    let pool = read_pool(&db).await;
    wait_for_state(&pool, "flaky", "connected").await;
    shutdown.cancel();
    gateway.await.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sensor_that_answers_only_when_polled_is_polled_at_its_interval() {
    let dir = tempfile::tempdir().unwrap();
    let db = db_path(dir.path());
    let path = pty_path(dir.path(), "polled");
    let plan = scenario(LineFormat::KeyValue, 20, 0);
    let (want, _) = expected_for("polled", &plan, 20);
    let sensor = LineSensor::start(
        Pty::open(&path).unwrap(),
        plan.lines(),
        LineOptions {
            poll: Some(b"READ\r\n".to_vec()),
            ..LineOptions::default()
        },
        CancellationToken::new(),
    );
    let extra = "poll_command = \"READ\\r\\n\"\npoll_interval = \"50ms\"";
    let (shutdown, gateway) = start_gateway(
        &db,
        &line_device("polled", &path, LineFormat::KeyValue, extra),
    )
    .await;
    let pool = read_pool(&db).await;
    wait_for_rows(&pool, "20 polled lines", 40, 0).await;
    assert_eq!(stored_readings(&pool).await, want);
    assert!(sensor.report().polls >= 20);

    shutdown.cancel();
    gateway.await.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_sensor_turns_stale_and_recovers_when_it_speaks_again() {
    let dir = tempfile::tempdir().unwrap();
    let db = db_path(dir.path());
    let path = pty_path(dir.path(), "quiet");
    let plan = scenario(LineFormat::Json, 10, 0);
    let (want, _) = expected_for("quiet", &plan, 10);
    let sensor = LineSensor::start(
        Pty::open(&path).unwrap(),
        plan.lines(),
        LineOptions {
            pause_at: Some(5),
            ..LineOptions::default()
        },
        CancellationToken::new(),
    );
    let (shutdown, gateway) = start_gateway(
        &db,
        &line_device(
            "quiet",
            &path,
            LineFormat::Json,
            "expected_interval = \"300ms\"",
        ),
    )
    .await;
    let pool = read_pool(&db).await;
    wait_for_rows(&pool, "5 lines", 10, 0).await;
    wait_for_state(&pool, "quiet", "stale").await;
    let (_, error) = device_state(&pool, "quiet").await;
    assert!(
        error
            .as_deref()
            .is_some_and(|e| e.starts_with("no line for 300ms")),
        "{error:?}"
    );

    sensor.resume().await.unwrap();
    wait_for_rows(&pool, "10 lines", 20, 0).await;
    wait_for_state(&pool, "quiet", "connected").await;
    assert_eq!(stored_readings(&pool).await, want);

    shutdown.cancel();
    gateway.await.unwrap().unwrap();
}
