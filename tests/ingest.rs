//! End to end in one process: simulated sensors → broker → gateway → SQLite, checked row by
//! row against what the simulator planned.

mod support;

use std::path::Path;
use std::time::Duration;

use sensorgate::app::{AppError, Gateway};
use sensorgate_sim::{EmbeddedBroker, Format, Pace, Scenario, publish};
use support::*;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// Starts a gateway and waits until every device is subscribed (state `connected`).
async fn start_gateway(text: &str) -> (CancellationToken, JoinHandle<Result<(), AppError>>) {
    init_logging();
    let config = sensorgate::config::parse(text, Path::new("test.toml")).expect("test config");
    let db = config.storage.path.clone();
    let devices = config.devices.len() as i64;
    let gateway = Gateway::build(config).await.expect("gateway builds");
    let shutdown = CancellationToken::new();
    let handle = tokio::spawn(gateway.run_until_stopped(shutdown.clone()));
    let pool = read_pool(&db).await;
    wait_for_devices_in(&pool, "connected", devices).await;
    (shutdown, handle)
}

async fn start_gateway_for(
    port: u16,
    db: &Path,
    scenarios: &[(&Scenario, &str)],
) -> (CancellationToken, JoinHandle<Result<(), AppError>>) {
    start_gateway(&gateway_config(port, db, &unique("gw"), "", scenarios)).await
}

async fn publish_all(port: u16, scenario: &Scenario, qos: u8) {
    let report = publish(
        "127.0.0.1",
        port,
        &unique("pub"),
        scenario.messages(),
        Pace::Unlimited,
        qos,
        CancellationToken::new(),
    )
    .await
    .expect("publisher");
    assert_eq!(report.published, scenario.total_messages());
}

/// Waits until the database holds as many readings and rejections as expected.
async fn wait_until_stored(db: &Path, expected: &Expected) {
    let pool = read_pool(db).await;
    let want_readings = (expected.readings.len() + expected.untimed_readings) as i64;
    let want_rejections: i64 = expected.rejections.values().sum();
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let readings = count(&pool, "SELECT count(*) FROM readings").await;
        let rejections = count(&pool, "SELECT count(*) FROM rejections").await;
        if readings >= want_readings && rejections >= want_rejections {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "stored {readings}/{want_readings} readings, {rejections}/{want_rejections} rejections; by reason {:?}, expected {:?}",
            rejections_by_reason(&pool).await,
            expected.rejections
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn assert_exact(db: &Path, expected: &Expected) {
    let pool = read_pool(db).await;
    let stored = stored_readings(&pool).await;
    let timed: std::collections::BTreeMap<_, _> = stored
        .iter()
        .filter(|(k, _)| expected.readings.contains_key(*k))
        .map(|(k, v)| (k.clone(), *v))
        .collect();
    assert_eq!(
        timed.len(),
        expected.readings.len(),
        "timed readings missing"
    );
    for (key, value) in &expected.readings {
        assert_eq!(stored.get(key), Some(value), "reading {key:?}");
    }
    assert_eq!(
        stored.len(),
        expected.readings.len() + expected.untimed_readings,
        "total readings"
    );
    assert_eq!(rejections_by_reason(&pool).await, expected.rejections);
    assert_eq!(rollup_mismatches(&pool).await, Vec::<String>::new());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stores_every_simulated_reading_with_exact_values_through_the_embedded_broker() {
    let broker = EmbeddedBroker::start().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let db = db_path(dir.path());
    let s = scenario(Format::Json, 5, 200, 7, &unique("emb"));
    let scenarios = [(&s, "climate")];
    let (shutdown, gateway) = start_gateway_for(broker.port, &db, &scenarios).await;
    publish_all(broker.port, &s, 1).await;
    let expected = expected(&scenarios);
    wait_until_stored(&db, &expected).await;
    shutdown.cancel();
    gateway.await.unwrap().expect("clean drain");
    assert_exact(&db, &expected).await;

    // A malformed payload is kept byte for byte with its reason.
    let pool = read_pool(&db).await;
    let (raw, detail): (Vec<u8>, String) =
        sqlx::query_as("SELECT raw, detail FROM rejections WHERE reason = 'malformed' LIMIT 1")
            .fetch_one(&pool)
            .await
            .unwrap();
    let planned = s
        .messages()
        .find(|m| m.payload == raw)
        .expect("raw payload is a planned one");
    assert_eq!(planned.fault, Some(sensorgate_sim::Fault::Malformed));
    assert!(detail.starts_with("invalid JSON"), "{detail}");
    let out_of_range: String =
        sqlx::query_scalar("SELECT detail FROM rejections WHERE reason = 'out_of_range' LIMIT 1")
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!(out_of_range, "humidity = 150 is above max 100");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stores_json_senml_and_plain_values_exactly_through_mosquitto() {
    let mosquitto = Mosquitto::start();
    let dir = tempfile::tempdir().unwrap();
    let db = db_path(dir.path());
    let json = scenario(Format::Json, 3, 150, 6, &unique("json"));
    let senml = scenario(Format::Senml, 3, 150, 6, &unique("senml"));
    let value = scenario(Format::Value, 2, 150, 6, &unique("value"));
    let scenarios = [(&json, "climate"), (&senml, "weather"), (&value, "probe")];
    let (shutdown, gateway) = start_gateway_for(mosquitto.port, &db, &scenarios).await;
    for (s, _) in &scenarios {
        publish_all(mosquitto.port, s, 1).await;
    }
    let expected = expected(&scenarios);
    wait_until_stored(&db, &expected).await;
    shutdown.cancel();
    gateway.await.unwrap().expect("clean drain");
    assert_exact(&db, &expected).await;

    let pool = read_pool(&db).await;
    let units: Vec<(String, Option<String>)> =
        sqlx::query_as("SELECT DISTINCT metric, unit FROM series ORDER BY metric")
            .fetch_all(&pool)
            .await
            .unwrap();
    assert_eq!(
        units,
        vec![
            ("humidity".into(), Some("%".into())),
            ("temperature".into(), Some("°C".into()))
        ]
    );
    let states: Vec<String> = sqlx::query_scalar("SELECT DISTINCT state FROM devices")
        .fetch_all(&pool)
        .await
        .unwrap();
    assert_eq!(states, vec!["stopped".to_string()]);
}

/// QoS 2 end to end: PUBREC after the commit, the broker's PUBREL answered, every reading
/// stored once with its value.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qos_2_stores_every_reading_exactly_once_through_mosquitto() {
    let mosquitto = Mosquitto::start();
    let dir = tempfile::tempdir().unwrap();
    let db = db_path(dir.path());
    let s = scenario(Format::Json, 4, 1_000, 0, &unique("qos2"));
    let text = gateway_config(mosquitto.port, &db, &unique("gw"), "", &[(&s, "meter")])
        .replace("format = \"json\"", "format = \"json\"\nqos = 2");
    assert!(text.contains("qos = 2"));
    let (shutdown, gateway) = start_gateway(&text).await;
    publish_all(mosquitto.port, &s, 2).await;
    let expected = expected(&[(&s, "meter")]);
    wait_until_stored(&db, &expected).await;
    shutdown.cancel();
    gateway.await.unwrap().expect("clean drain");
    assert_exact(&db, &expected).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rollups_equal_raw_readings_with_late_and_redelivered_readings() {
    let mosquitto = Mosquitto::start();
    let dir = tempfile::tempdir().unwrap();
    let db = db_path(dir.path());
    let prefix = unique("late");
    let on_time = scenario(Format::Json, 4, 300, 0, &prefix);
    // Late readings: older timestamps for the same devices, falling into buckets that
    // already have rollups. Offset by half a period so no timestamp repeats an on-time one.
    let late = Scenario {
        start_ms: on_time.start_ms - 45_125,
        ..on_time.clone()
    };
    let scenarios = [(&on_time, "bay")];
    let (shutdown, gateway) = start_gateway_for(mosquitto.port, &db, &scenarios).await;
    publish_all(mosquitto.port, &on_time, 1).await;
    publish_all(mosquitto.port, &late, 1).await;
    // Redelivery: the first half again.
    let again = Scenario {
        messages_per_device: 150,
        ..on_time.clone()
    };
    publish_all(mosquitto.port, &again, 1).await;

    let mut expected = expected(&[(&on_time, "bay"), (&late, "bay")]);
    expected.rejections.clear();
    wait_until_stored(&db, &expected).await;
    let pool = read_pool(&db).await;
    let all_messages =
        (on_time.total_messages() + late.total_messages() + again.total_messages()) as i64;
    wait_for(
        "redelivered messages counted",
        Duration::from_secs(30),
        || {
            let pool = pool.clone();
            async move {
                count(&pool, "SELECT sum(readings) + sum(duplicates) FROM devices").await
                    >= 2 * all_messages - count(&pool, "SELECT count(*) FROM rejections").await
            }
        },
    )
    .await;
    shutdown.cancel();
    gateway.await.unwrap().expect("clean drain");

    let stored = stored_readings(&pool).await;
    assert_eq!(stored, expected.readings);
    assert_eq!(
        count(&pool, "SELECT sum(duplicates) FROM devices").await,
        2 * again.total_messages() as i64
    );
    assert_eq!(rollup_mismatches(&pool).await, Vec::<String>::new());
    let minute_total = count(&pool, "SELECT sum(n) FROM rollups WHERE width_ms = 60000").await;
    assert_eq!(minute_total as usize, expected.readings.len());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_restart_mid_stream_reconnects_resubscribes_and_loses_nothing() {
    let mut mosquitto = Mosquitto::start();
    let dir = tempfile::tempdir().unwrap();
    let db = db_path(dir.path());
    let s = scenario(Format::Json, 10, 400, 0, &unique("restart"));
    let scenarios = [(&s, "line")];
    let config = gateway_config(mosquitto.port, &db, &unique("gw"), "", &scenarios)
        .replace("client_id", "reconnect_max = \"1s\"\nclient_id");
    let (shutdown, gateway) = start_gateway(&config).await;
    let half = s.total_messages() as usize / 2;
    let first: Vec<_> = s.messages().take(half).collect();
    let rest: Vec<_> = s.messages().skip(half).collect();
    let report = publish(
        "127.0.0.1",
        mosquitto.port,
        &unique("pub"),
        first.into_iter(),
        Pace::Unlimited,
        1,
        CancellationToken::new(),
    )
    .await
    .unwrap();
    assert_eq!(report.published as usize, half);

    // A crash of the broker: everything it accepted is in its persistence file.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    mosquitto.kill();
    let pool = read_pool(&db).await;
    wait_for_devices_in(&pool, "failing", 10).await;
    let error: String = sqlx::query_scalar("SELECT last_error FROM devices LIMIT 1")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert!(error.starts_with("broker test:"), "{error}");
    mosquitto.restart();
    wait_for_devices_in(&pool, "connected", 10).await;
    // Published after the restart: only a resubscribed session receives these.
    publish(
        "127.0.0.1",
        mosquitto.port,
        &unique("pub"),
        rest.into_iter(),
        Pace::Unlimited,
        1,
        CancellationToken::new(),
    )
    .await
    .unwrap();
    let expected = expected(&scenarios);
    wait_until_stored(&db, &expected).await;
    shutdown.cancel();
    gateway.await.unwrap().expect("clean drain");
    assert_exact(&db, &expected).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_device_turns_stale_and_recovers_when_it_speaks() {
    let broker = EmbeddedBroker::start().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let db = db_path(dir.path());
    let s = scenario(Format::Json, 1, 1, 0, &unique("stale"));
    let scenarios = [(&s, "quiet")];
    let config = gateway_config(broker.port, &db, &unique("gw"), "", &scenarios).replace(
        "timestamp_field",
        "expected_interval = \"300ms\"\ntimestamp_field",
    );
    let (shutdown, gateway) = start_gateway(&config).await;
    let pool = read_pool(&db).await;
    let state = |pool: sqlx::SqlitePool| async move {
        sqlx::query_scalar::<_, String>(
            "SELECT state || ':' || coalesce(last_error, '') FROM devices",
        )
        .fetch_one(&pool)
        .await
        .unwrap()
    };
    wait_for(
        "stale after 300ms of silence",
        Duration::from_secs(5),
        || {
            let pool = pool.clone();
            async move { state(pool).await == "stale:no message for 300ms" }
        },
    )
    .await;
    publish_all(broker.port, &s, 1).await;
    wait_for("connected after a message", Duration::from_secs(5), || {
        let pool = pool.clone();
        async move { state(pool).await == "connected:" }
    })
    .await;
    shutdown.cancel();
    gateway.await.unwrap().expect("clean drain");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drop_newest_counts_exactly_what_it_dropped() {
    let broker = EmbeddedBroker::start().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let db = db_path(dir.path());
    let s = scenario(Format::Json, 4, 2000, 0, &unique("drop"));
    let scenarios = [(&s, "burst")];
    // A tiny pipeline and a slow commit cadence force the policy to act.
    let extra = "[pipeline]\noverflow = \"drop_newest\"\nchannel_capacity = 4\ndevice_queue = 4\n";
    let config = gateway_config(broker.port, &db, &unique("gw"), extra, &scenarios).replace(
        "[storage]\n",
        "[storage]\nflush_interval = \"50ms\"\nbatch_size = 50\n",
    );
    let (shutdown, gateway) = start_gateway(&config).await;
    publish_all(broker.port, &s, 1).await;
    let pool = read_pool(&db).await;
    let total = s.total_messages() as i64;
    wait_for(
        "every message stored or dropped",
        Duration::from_secs(30),
        || {
            let pool = pool.clone();
            async move {
                let stored = count(&pool, "SELECT count(*) FROM readings").await / 2;
                stored + count(&pool, "SELECT sum(dropped) FROM devices").await == total
            }
        },
    )
    .await;
    shutdown.cancel();
    gateway.await.unwrap().expect("clean drain");
    let dropped = count(&pool, "SELECT sum(dropped) FROM devices").await;
    let stored_messages = count(&pool, "SELECT count(*) FROM readings").await / 2;
    println!("published {total}, stored {stored_messages}, dropped {dropped}");
    assert!(
        dropped > 0,
        "the policy never dropped; the test did not overload the pipeline"
    );
    assert_eq!(stored_messages + dropped, total);
    assert_eq!(rollup_mismatches(&pool).await, Vec::<String>::new());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retention_deletes_expired_rows_in_small_steps_and_keeps_the_rest() {
    let broker = EmbeddedBroker::start().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let db = db_path(dir.path());
    let now = sensorgate::reading::now_millis();
    // 3 devices, one message every 18 s over the last 3 hours.
    let s = Scenario {
        start_ms: now - 3 * 3_600_000,
        period_ms: 18_000,
        ..scenario(Format::Json, 3, 600, 0, &unique("ret"))
    };
    let scenarios = [(&s, "old")];
    let keep_all = gateway_config(broker.port, &db, &unique("gw"), "", &scenarios);
    let (shutdown, gateway) = start_gateway(&keep_all).await;
    publish_all(broker.port, &s, 1).await;
    let pool = read_pool(&db).await;
    let total = (s.total_messages() * 2) as i64;
    wait_for(
        "three hours of readings stored",
        Duration::from_secs(20),
        || {
            let pool = pool.clone();
            async move { count(&pool, "SELECT count(*) FROM readings").await == total }
        },
    )
    .await;
    shutdown.cancel();
    gateway.await.unwrap().expect("clean drain");

    // The operator shortens retention (and max_past with it, as the config check demands).
    let retention = "[validation]\nmax_past = \"30m\"\n[storage.retention]\nreadings = \"1h\"\n\
                     rollups = \"2h\"\ninterval = \"1s\"\nstep_rows = 500\n[storage]\n";
    let short = keep_all.replace("[storage]\n", retention);
    let (shutdown, gateway) = start_gateway(&short).await;
    let hour_ago = now - 3_600_000;
    let two_hours_ago = now - 2 * 3_600_000;
    let older = |sql: &'static str, cutoff: i64| {
        let pool = pool.clone();
        async move {
            sqlx::query_scalar::<_, i64>(sql)
                .bind(cutoff)
                .fetch_one(&pool)
                .await
                .unwrap()
        }
    };
    wait_for(
        "expired readings and rollups deleted",
        Duration::from_secs(20),
        || async {
            older("SELECT count(*) FROM readings WHERE ts < ?1", hour_ago).await == 0
                && older(
                    "SELECT count(*) FROM rollups WHERE bucket < ?1",
                    two_hours_ago,
                )
                .await
                    == 0
        },
    )
    .await;
    shutdown.cancel();
    gateway.await.unwrap().expect("clean drain");
    // The cutoff moves with the clock while the test runs: rows a minute clear of it stay.
    let safe = hour_ago + 60_000;
    let want = expected(&scenarios)
        .readings
        .keys()
        .filter(|(_, _, t)| *t >= safe)
        .count() as i64;
    let kept = older("SELECT count(*) FROM readings WHERE ts >= ?1", safe).await;
    assert_eq!(
        kept, want,
        "readings inside the retention window were deleted"
    );
    let kept_rollups = older("SELECT count(*) FROM rollups WHERE bucket < ?1", hour_ago).await;
    assert!(
        kept_rollups > 0,
        "rollups must outlive the raw readings they summarise"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publishes_for_a_removed_device_are_stored_as_rejections() {
    let mosquitto = Mosquitto::start();
    let dir = tempfile::tempdir().unwrap();
    let db = db_path(dir.path());
    let client_id = unique("gw");
    let s = scenario(Format::Json, 2, 20, 0, &unique("removed"));
    let both = gateway_config(mosquitto.port, &db, &client_id, "", &[(&s, "unit")]);
    let (shutdown, gateway) = start_gateway(&both).await;
    shutdown.cancel();
    gateway.await.unwrap().expect("clean drain");

    // Same client id, one device fewer: the broker still holds the old subscription.
    let one = Scenario {
        devices: 1,
        ..s.clone()
    };
    let (shutdown, gateway) = start_gateway(&gateway_config(
        mosquitto.port,
        &db,
        &client_id,
        "",
        &[(&one, "unit")],
    ))
    .await;
    publish_all(mosquitto.port, &s, 1).await;
    let pool = read_pool(&db).await;
    wait_for(
        "readings and rejections stored",
        Duration::from_secs(20),
        || {
            let pool = pool.clone();
            async move {
                count(&pool, "SELECT count(*) FROM readings").await == 40
                    && count(&pool, "SELECT count(*) FROM rejections").await == 20
            }
        },
    )
    .await;
    shutdown.cancel();
    gateway.await.unwrap().expect("clean drain");
    let (reason, source, device): (String, String, Option<i64>) =
        sqlx::query_as("SELECT reason, source, device_id FROM rejections LIMIT 1")
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!(reason, "unknown_device");
    assert_eq!(source, s.topic(1));
    assert_eq!(device, None);
}
