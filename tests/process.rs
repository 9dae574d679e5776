//! The gateway as a process: killed with SIGKILL mid-stream, stopped with SIGTERM, given a
//! bad config.

mod support;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use sensorgate_sim::{Format, Pace, publish};
use support::process::{BIN, Gateway, write_config};
use support::*;
use tokio_util::sync::CancellationToken;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_mid_stream_then_restart_loses_nothing_and_duplicates_nothing() {
    let mosquitto = Mosquitto::start();
    let dir = tempfile::tempdir().unwrap();
    let db = db_path(dir.path());
    let s = scenario(Format::Json, 20, 600, 0, &unique("kill"));
    let scenarios = [(&s, "meter")];
    let config = write_config(
        dir.path(),
        &gateway_config(mosquitto.port, &db, &unique("gw"), "", &scenarios),
    );

    let mut gateway = Gateway::start(&config);
    gateway.wait_for_log("Subscribed", Duration::from_secs(10));
    let publisher = spawn_publisher(mosquitto.port, &s, Pace::Steady(4000.0));
    let mut seed = std::process::id() as u64;
    println!("kill schedule seed {seed}");
    let mut kills = 0;
    while !publisher.is_finished() && kills < 3 {
        seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1);
        let pause = Duration::from_millis(700 + (seed >> 33) % 800);
        tokio::time::sleep(pause).await;
        gateway.child.kill().unwrap();
        gateway.child.wait().unwrap();
        kills += 1;
        gateway = Gateway::start(&config);
    }
    assert!(
        kills >= 2,
        "publisher finished before the gateway was killed twice"
    );
    publisher.await.unwrap().expect("publisher");

    let expected = expected(&scenarios);
    let pool = read_pool(&db).await;
    let want = expected.readings.len() as i64;
    wait_for(
        "every reading stored after restarts",
        Duration::from_secs(60),
        || {
            let pool = pool.clone();
            async move { count(&pool, "SELECT count(*) FROM readings").await >= want }
        },
    )
    .await;
    gateway.sigterm();
    assert!(gateway.wait_exit(Duration::from_secs(15)).success());

    let stored = stored_readings(&pool).await;
    println!(
        "published {} messages, killed {kills} times, stored {} readings, redelivered {}",
        s.total_messages(),
        stored.len(),
        count(&pool, "SELECT sum(duplicates) FROM devices").await
    );
    assert_eq!(stored, expected.readings, "lost or altered readings");
    assert_eq!(rollup_mismatches(&pool).await, Vec::<String>::new());
    let integrity: String = sqlx::query_scalar("PRAGMA integrity_check")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(integrity, "ok");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_commits_what_is_in_the_pipeline_and_acknowledges_it_before_exit() {
    let mosquitto = Mosquitto::start();
    let dir = tempfile::tempdir().unwrap();
    let db = db_path(dir.path());
    let s = scenario(Format::Json, 10, 50, 0, &unique("term"));
    let scenarios = [(&s, "pump")];
    let config = dir.path().join("gateway.toml");
    // A long flush interval holds everything in the pipeline: only the drain can commit it.
    // (Half of max_unacked waiting would also flush: keep that above the 500 messages.)
    let text = gateway_config(mosquitto.port, &db, &unique("gw"), "", &scenarios)
        .replace(
            "[storage]\n",
            "[storage]\nflush_interval = \"1h\"\nbatch_size = 100000\n",
        )
        .replace("[[brokers]]\n", "[[brokers]]\nmax_unacked = 2000\n");
    std::fs::write(&config, &text).unwrap();

    let mut gateway = Gateway::start(&config);
    gateway.wait_for_log("Subscribed", Duration::from_secs(10));
    publish(
        "127.0.0.1",
        mosquitto.port,
        &unique("pub"),
        s.messages(),
        Pace::Unlimited,
        1,
        CancellationToken::new(),
    )
    .await
    .unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let pool = read_pool(&db).await;
    assert_eq!(
        count(&pool, "SELECT count(*) FROM readings").await,
        0,
        "nothing committed before the stop"
    );
    gateway.sigterm();
    assert!(gateway.wait_exit(Duration::from_secs(15)).success());
    let expected = expected(&scenarios);
    assert_eq!(stored_readings(&pool).await, expected.readings);

    // Acknowledged before exit: a restarted gateway receives nothing again.
    let mut again = Gateway::start(&config);
    again.wait_for_log("Subscribed", Duration::from_secs(10));
    tokio::time::sleep(Duration::from_secs(2)).await;
    again.sigterm();
    assert!(again.wait_exit(Duration::from_secs(15)).success());
    assert_eq!(
        count(&pool, "SELECT sum(duplicates) FROM devices").await,
        0,
        "messages were redelivered"
    );
}

#[test]
fn a_bad_config_exits_78_naming_file_line_and_fix() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("bad.toml");
    std::fs::write(&config, "[pipeline]\ncapacity = 10\n").unwrap();
    for command in ["run", "check-config"] {
        let out = Command::new(BIN)
            .args([command, "--config"])
            .arg(&config)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(78), "{command}: {stderr}");
        assert!(
            stderr.contains(&format!("{}:2:", config.display())),
            "{stderr}"
        );
        assert!(stderr.contains("unknown field `capacity`"), "{stderr}");
    }
    let missing = Command::new(BIN)
        .args(["check-config", "--config", "/nonexistent/x.toml"])
        .output()
        .unwrap();
    assert_eq!(missing.status.code(), Some(78));
    assert!(String::from_utf8_lossy(&missing.stderr).contains("/nonexistent/x.toml"));
}

#[test]
fn print_config_prints_the_committed_example_and_it_checks_clean() {
    let out = Command::new(BIN).arg("print-config").output().unwrap();
    assert!(out.status.success());
    let committed = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("config/sensorgate.toml"),
    )
    .unwrap();
    assert_eq!(String::from_utf8(out.stdout).unwrap(), committed);
    let check = Command::new(BIN)
        .args(["check-config", "--config"])
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("config/sensorgate.toml"))
        .output()
        .unwrap();
    assert!(
        check.status.success(),
        "{}",
        String::from_utf8_lossy(&check.stderr)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn devices_and_query_read_the_database_while_run_writes_it() {
    let mosquitto = Mosquitto::start();
    let dir = tempfile::tempdir().unwrap();
    let db = db_path(dir.path());
    let s = scenario(Format::Json, 3, 3000, 0, &unique("live"));
    let scenarios = [(&s, "room")];
    let config = write_config(
        dir.path(),
        &gateway_config(mosquitto.port, &db, &unique("gw"), "", &scenarios),
    );
    let mut gateway = Gateway::start(&config);
    gateway.wait_for_log("Subscribed", Duration::from_secs(10));
    let publisher = spawn_publisher(mosquitto.port, &s, Pace::Steady(2000.0));
    let mut reads = 0;
    while !publisher.is_finished() {
        let devices = Command::new(BIN)
            .args(["devices", "--format", "csv", "--config"])
            .arg(&config)
            .output()
            .unwrap();
        assert!(
            devices.status.success(),
            "{}",
            String::from_utf8_lossy(&devices.stderr)
        );
        let text = String::from_utf8(devices.stdout).unwrap();
        assert!(text.starts_with("device,kind,state"), "{text}");
        assert_eq!(text.lines().count(), 4, "{text}");
        let query = Command::new(BIN)
            .args([
                "query", "--from", "0", "--limit", "5", "--format", "json", "--db",
            ])
            .arg(&db)
            .args(["room-1", "temperature"])
            .output()
            .unwrap();
        assert!(
            query.status.success(),
            "{}",
            String::from_utf8_lossy(&query.stderr)
        );
        let rows: serde_json::Value = serde_json::from_slice(&query.stdout).unwrap();
        assert!(rows.as_array().unwrap().len() <= 5);
        reads += 1;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    publisher.await.unwrap().unwrap();
    assert!(reads >= 3, "only {reads} reads overlapped the writes");
    let rollups = Command::new(BIN)
        .args([
            "query", "--from", "0", "--every", "1m", "--format", "csv", "--db",
        ])
        .arg(&db)
        .args(["room-0", "humidity"])
        .output()
        .unwrap();
    assert!(rollups.status.success());
    assert!(
        String::from_utf8(rollups.stdout)
            .unwrap()
            .starts_with("bucket,device,metric,count,min,max,mean")
    );
    gateway.sigterm();
    assert!(gateway.wait_exit(Duration::from_secs(15)).success());

    // Exports hold exactly what the database holds.
    let pool = read_pool(&db).await;
    let stored = stored_readings(&pool).await;
    let ndjson = Command::new(BIN)
        .args(["export", "--from", "0", "--format", "ndjson", "--db"])
        .arg(&db)
        .output()
        .unwrap();
    assert!(
        ndjson.status.success(),
        "{}",
        String::from_utf8_lossy(&ndjson.stderr)
    );
    let mut exported = std::collections::BTreeMap::new();
    for line in String::from_utf8(ndjson.stdout).unwrap().lines() {
        let row: serde_json::Value = serde_json::from_str(line).unwrap();
        let key = (
            row["device"].as_str().unwrap().to_string(),
            row["metric"].as_str().unwrap().to_string(),
            row["time"].as_i64().unwrap(),
        );
        exported.insert(key, row["value"].as_f64().unwrap());
    }
    assert_eq!(exported, stored);
    let csv_path = db.with_extension("csv");
    let csv = Command::new(BIN)
        .args(["export", "room-0", "humidity", "--from", "0", "--db"])
        .arg(&db)
        .arg("--output")
        .arg(&csv_path)
        .output()
        .unwrap();
    assert!(
        csv.status.success(),
        "{}",
        String::from_utf8_lossy(&csv.stderr)
    );
    let text = std::fs::read_to_string(&csv_path).unwrap();
    let mut lines = text.lines();
    assert_eq!(
        lines.next(),
        Some("device,metric,unit,time,time_ms,value,received_at_ms,flags")
    );
    let rows: Vec<(i64, f64)> = lines
        .map(|line| {
            let cells: Vec<&str> = line.split(',').collect();
            assert_eq!(&cells[..3], ["room-0", "humidity", "%"], "{line}");
            (cells[4].parse().unwrap(), cells[5].parse().unwrap())
        })
        .collect();
    let want: Vec<(i64, f64)> = stored
        .iter()
        .filter(|((d, m, _), _)| d == "room-0" && m == "humidity")
        .map(|((_, _, t), v)| (*t, *v))
        .collect();
    assert_eq!(rows, want);
}

/// While commits stall, the session holds at most `max_unacked` messages (below the
/// broker's in-flight limit of 1000, so the bound is the gateway's own), stops reading, and
/// keeps the connection alive with pings alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_writer_holds_acks_without_losing_the_broker_connection() {
    use sqlx::Connection as _;
    const MAX_UNACKED: usize = 100;
    let mosquitto = Mosquitto::start();
    let dir = tempfile::tempdir().unwrap();
    let db = db_path(dir.path());
    let s = scenario(Format::Json, 5, 300, 0, &unique("stall"));
    let scenarios = [(&s, "press")];
    let config = dir.path().join("gateway.toml");
    let http_port = free_port();
    // The broker drops a client silent for 1.5 × keep_alive = 3 s; the stall lasts 7 s.
    let text = format!("[http]\nenabled = true\nlisten = \"127.0.0.1:{http_port}\"\n")
        + &gateway_config(mosquitto.port, &db, &unique("gw"), "", &scenarios)
            .replace(
                "client_id",
                &format!("keep_alive = \"2s\"\nmax_unacked = {MAX_UNACKED}\nclient_id"),
            )
            .replace("[storage]\n", "[storage]\nbusy_timeout = \"20s\"\n");
    std::fs::write(&config, &text).unwrap();
    let gateway = Gateway::start(&config);
    gateway.wait_for_log("Subscribed", Duration::from_secs(10));

    // Another process holds the write lock: every commit waits.
    let mut locker = sqlx::SqliteConnection::connect(&format!("sqlite://{}", db.display()))
        .await
        .unwrap();
    sqlx::query("BEGIN IMMEDIATE")
        .execute(&mut locker)
        .await
        .unwrap();
    publish(
        "127.0.0.1",
        mosquitto.port,
        &unique("pub"),
        s.messages(),
        Pace::Unlimited,
        1,
        CancellationToken::new(),
    )
    .await
    .unwrap();
    // What the session holds unacknowledged, sampled through the stall.
    let mut peak_unacked = 0.0f64;
    let stall = std::time::Instant::now();
    while stall.elapsed() < Duration::from_secs(7) {
        let metrics = support::http::get(([127, 0, 0, 1], http_port).into(), "/metrics", &[])
            .await
            .text();
        let unacked = metrics
            .lines()
            .find(|l| l.starts_with("sensorgate_broker_unacked{"))
            .and_then(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .expect("the unacked gauge in /metrics");
        peak_unacked = peak_unacked.max(unacked);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    sqlx::query("COMMIT").execute(&mut locker).await.unwrap();
    drop(locker);
    assert_eq!(
        peak_unacked, MAX_UNACKED as f64,
        "the session must fill its window to max_unacked and take no more"
    );

    let pool = read_pool(&db).await;
    let expected = expected(&scenarios);
    let want = expected.readings.len() as i64;
    wait_for(
        "everything stored after the stall",
        Duration::from_secs(30),
        || {
            let pool = pool.clone();
            async move { count(&pool, "SELECT count(*) FROM readings").await >= want }
        },
    )
    .await;
    gateway.sigterm();
    let lines: Vec<String> = gateway.lines.try_iter().collect();
    assert!(
        !lines.iter().any(|l| l.contains("Broker connection failed")),
        "the broker dropped the gateway during the stall: {lines:?}"
    );
    assert_eq!(stored_readings(&pool).await, expected.readings);
    assert_eq!(
        count(&pool, "SELECT sum(duplicates) FROM devices").await,
        0,
        "messages were redelivered"
    );
}
