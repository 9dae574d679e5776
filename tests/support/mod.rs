//! Test worlds: a private Mosquitto on a free port, gateway configs for simulator scenarios,
//! database inspection, and waiting for conditions instead of sleeping.

#![allow(dead_code)]

use std::collections::{BTreeMap, HashMap};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

#[allow(unused_imports, reason = "not every test binary starts Mosquitto")]
pub use sensorgate_sim::Mosquitto;

pub mod http;
pub mod process;
pub mod proxy;
use sensorgate_sim::{Scenario, plan::Expect};
use sqlx::Row;
use sqlx::sqlite::{SqliteConnectOptions, SqlitePool, SqlitePoolOptions};

/// Logs to the test output when RUST_LOG is set.
pub fn init_logging() {
    if std::env::var_os("RUST_LOG").is_some() {
        let _ = tracing_subscriber::fmt().with_test_writer().try_init();
    }
}

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Polls `condition` until it holds or `timeout` passes; panics with `what` on timeout.
pub async fn wait_for<F, Fut>(what: &str, timeout: Duration, mut condition: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + timeout;
    while !condition().await {
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A gateway config for `scenarios` (each with its device id prefix) on the broker at
/// `port`, writing to `db`.
pub fn gateway_config(
    port: u16,
    db: &Path,
    client_id: &str,
    extra: &str,
    scenarios: &[(&Scenario, &str)],
) -> String {
    let mut text = format!(
        "{extra}\n[storage]\npath = \"{}\"\n\n[[brokers]]\nid = \"test\"\nurl = \"mqtt://127.0.0.1:{port}\"\n\
         client_id = \"{client_id}\"\n\n",
        db.display()
    );
    for (scenario, prefix) in scenarios {
        text.push_str(&sensorgate::demo::device_config(scenario, prefix, "test"));
    }
    text
}

/// Publishes every message of `scenario` at `pace` and QoS 1 on a task of its own.
pub fn spawn_publisher(
    port: u16,
    scenario: &Scenario,
    pace: sensorgate_sim::Pace,
) -> tokio::task::JoinHandle<
    Result<sensorgate_sim::PublishReport, sensorgate_sim::publish::PublishError>,
> {
    let scenario = scenario.clone();
    tokio::spawn(async move {
        sensorgate_sim::publish(
            "127.0.0.1",
            port,
            &unique("pub"),
            scenario.messages(),
            pace,
            1,
            tokio_util::sync::CancellationToken::new(),
        )
        .await
    })
}

pub fn unique(name: &str) -> String {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    format!(
        "{name}-{}-{}-{n}",
        std::process::id(),
        sensorgate::reading::now_millis() % 1_000_000
    )
}

pub async fn read_pool(db: &Path) -> SqlitePool {
    let options = SqliteConnectOptions::new().filename(db).read_only(true);
    SqlitePoolOptions::new()
        .max_connections(2)
        .connect_with(options)
        .await
        .unwrap()
}

/// `(device, metric, time) -> value` for every stored reading.
pub async fn stored_readings(pool: &SqlitePool) -> BTreeMap<(String, String, i64), f64> {
    sqlx::query(
        "SELECT d.name, s.metric, r.ts, r.value FROM readings r JOIN series s ON s.id = r.series_id \
         JOIN devices d ON d.id = s.device_id",
    )
    .fetch_all(pool)
    .await
    .unwrap()
    .into_iter()
    .map(|r| ((r.get(0), r.get(1), r.get(2)), r.get(3)))
    .collect()
}

/// Waits until exactly `n` devices are in `state` (`connected`, `failing`, ...).
pub async fn wait_for_devices_in(pool: &SqlitePool, state: &str, n: i64) {
    wait_for(
        &format!("{n} devices {state}"),
        Duration::from_secs(10),
        || async {
            sqlx::query_scalar::<_, i64>("SELECT count(*) FROM devices WHERE state = ?1")
                .bind(state)
                .fetch_one(pool)
                .await
                .unwrap()
                == n
        },
    )
    .await;
}

pub async fn count(pool: &SqlitePool, sql: &'static str) -> i64 {
    sqlx::query_scalar(sql).fetch_one(pool).await.unwrap()
}

/// What the database must hold after `scenarios` were published: the readings (only those
/// with source times; receive-time readings are counted) and rejections by reason: one per
/// message with a refused value, with the reason of its first.
#[derive(Debug, Default)]
pub struct Expected {
    pub readings: BTreeMap<(String, String, i64), f64>,
    pub untimed_readings: usize,
    pub rejections: HashMap<String, i64>,
}

pub fn expected(scenarios: &[(&Scenario, &str)]) -> Expected {
    let mut out = Expected::default();
    for (scenario, prefix) in scenarios {
        for message in scenario.messages() {
            let Expect {
                readings,
                rejections,
            } = message.expect;
            for (metric, time, value) in readings {
                let device = format!("{prefix}-{}", message.device);
                match time {
                    Some(time) => {
                        out.readings
                            .insert((device, metric.to_string(), time), value);
                    }
                    None => out.untimed_readings += 1,
                }
            }
            if let Some(reason) = rejections.first() {
                *out.rejections.entry(reason.to_string()).or_default() += 1;
            }
        }
    }
    out
}

pub async fn rejections_by_reason(pool: &SqlitePool) -> HashMap<String, i64> {
    sqlx::query("SELECT reason, count(*) FROM rejections GROUP BY reason")
        .fetch_all(pool)
        .await
        .unwrap()
        .into_iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect()
}

/// Rollup rows that differ from a recomputation from raw readings, as descriptions.
/// Sums are compared with a relative tolerance: float addition order differs.
pub async fn rollup_mismatches(pool: &SqlitePool) -> Vec<String> {
    let rows = sqlx::query(
        "WITH widths AS (SELECT DISTINCT width_ms FROM rollups), \
         raw AS ( \
           SELECT r.series_id, w.width_ms, r.ts - (r.ts % w.width_ms) AS bucket, \
                  count(*) AS n, min(r.value) AS min_v, max(r.value) AS max_v, sum(r.value) AS sum_v, \
                  min(r.ts) AS first_ts, max(r.ts) AS last_ts \
           FROM readings r CROSS JOIN widths w GROUP BY r.series_id, w.width_ms, bucket) \
         SELECT raw.series_id, raw.width_ms, raw.bucket, raw.n, ro.n, raw.min_v, ro.min_v, raw.max_v, ro.max_v, \
                raw.sum_v, ro.sum_v, raw.first_ts, ro.first_ts, raw.last_ts, ro.last_ts, \
                (SELECT value FROM readings WHERE series_id = raw.series_id AND ts = raw.first_ts), ro.first_v, \
                (SELECT value FROM readings WHERE series_id = raw.series_id AND ts = raw.last_ts), ro.last_v \
         FROM raw LEFT JOIN rollups ro ON ro.series_id = raw.series_id AND ro.width_ms = raw.width_ms \
              AND ro.bucket = raw.bucket",
    )
    .fetch_all(pool)
    .await
    .unwrap();
    let mut bad = Vec::new();
    for r in &rows {
        let n: i64 = r.get(3);
        let ro_n: Option<i64> = r.get(4);
        let f = |i: usize| -> Option<f64> { r.get(i) };
        let t = |i: usize| -> Option<i64> { r.get(i) };
        let sum_ok = match (f(9), f(10)) {
            (Some(a), Some(b)) => (a - b).abs() <= 1e-9 * a.abs().max(1.0),
            _ => false,
        };
        if Some(n) != ro_n
            || f(5) != f(6)
            || f(7) != f(8)
            || !sum_ok
            || t(11) != t(12)
            || t(13) != t(14)
            || f(15) != f(16)
            || f(17) != f(18)
        {
            bad.push(format!(
                "series {} width {} bucket {}: raw n={n} rollup n={ro_n:?}",
                r.get::<i64, _>(0),
                r.get::<i64, _>(1),
                r.get::<i64, _>(2)
            ));
        }
    }
    let orphans = count(
        pool,
        "SELECT count(*) FROM rollups ro WHERE NOT EXISTS (SELECT 1 FROM readings r WHERE r.series_id = ro.series_id \
         AND r.ts >= ro.bucket AND r.ts < ro.bucket + ro.width_ms)",
    )
    .await;
    if orphans > 0 {
        bad.push(format!("{orphans} rollup rows without raw readings"));
    }
    bad
}

pub fn db_path(dir: &Path) -> PathBuf {
    dir.join("gateway.db")
}

/// The scenario's messages starting `now`-ish, one timestamp per `period_ms`.
pub fn scenario(
    format: sensorgate_sim::Format,
    devices: usize,
    messages: u64,
    fault_every: u64,
    prefix: &str,
) -> Scenario {
    Scenario {
        devices,
        messages_per_device: messages,
        format,
        topic_prefix: prefix.to_string(),
        fault_every,
        start_ms: sensorgate::reading::now_millis() - 3_600_000,
        period_ms: 250,
    }
}
