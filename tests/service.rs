//! The gateway as a systemd service: SIGHUP reloads (added, removed and changed devices while
//! sensors publish at QoS 1; an invalid file), and the notification protocol seen from the
//! service manager's side (READY, STATUS, WATCHDOG, STOPPING), with watchdog pings that stop
//! while the writer is stuck.

mod support;

use std::collections::BTreeMap;
use std::os::unix::net::UnixDatagram;
use std::time::{Duration, Instant};

use sensorgate_sim::{Format, Pace, Scenario};
use support::process::{Gateway, write_config};
use support::*;

fn of_device(
    all: &BTreeMap<(String, String, i64), f64>,
    device: &str,
) -> BTreeMap<(String, String, i64), f64> {
    all.iter()
        .filter(|((d, _, _), _)| d == device)
        .map(|(k, v)| (k.clone(), *v))
        .collect()
}

/// Scenario messages for one device at 100 messages a second, timestamped from `offset_s`
/// seconds before now.
fn sensor(prefix: &str, name: &str, messages: u64, offset_s: i64) -> Scenario {
    Scenario {
        start_ms: sensorgate::reading::now_millis() - offset_s * 1000,
        period_ms: 100,
        ..scenario(Format::Json, 1, messages, 0, &format!("{prefix}/{name}"))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_adds_removes_and_changes_devices_without_loss_or_reconnecting() {
    let mosquitto = Mosquitto::start();
    let dir = tempfile::tempdir().unwrap();
    let db = db_path(dir.path());
    let client_id = unique("gw");
    let prefix = unique("hup");
    let keep = sensor(&prefix, "keep", 600, 3600);
    let gone = sensor(&prefix, "gone", 600, 3600);
    let change = sensor(&prefix, "change", 600, 3600);
    let added = sensor(&prefix, "new", 300, 1800);
    let later = sensor(&prefix, "keep", 100, 600);
    let port = mosquitto.port;
    let before = gateway_config(
        port,
        &db,
        &client_id,
        "",
        &[(&keep, "keep"), (&gone, "gone"), (&change, "change")],
    );
    let after = gateway_config(
        port,
        &db,
        &client_id,
        "",
        &[(&keep, "keep"), (&change, "change"), (&added, "new")],
    )
    .replace(
        "id = \"change-0\"\n",
        "id = \"change-0\"\nexpected_interval = \"1h\"\n",
    );
    assert_ne!(before, after);
    let config = write_config(dir.path(), &before);
    let mut gateway = Gateway::start(&config);
    gateway.wait_for_log("Subscribed", Duration::from_secs(10));
    let pool = read_pool(&db).await;
    wait_for_devices_in(&pool, "connected", 3).await;

    let publishers: Vec<_> = [&keep, &gone, &change]
        .into_iter()
        .map(|s| spawn_publisher(port, s, Pace::Steady(100.0)))
        .collect();
    tokio::time::sleep(Duration::from_secs(2)).await;
    write_config(dir.path(), &after);
    gateway.signal("HUP");
    // The added device's publisher starts once its topic is subscribed: what a broker gets
    // before that is for no one.
    let lines = gateway.wait_for_logs(&["Config reloaded", "Subscribed"], Duration::from_secs(10));
    let line = &lines[0];
    assert!(
        line.contains("change-0") && line.contains("new-0") && line.contains("gone-0"),
        "{line}"
    );
    let new_publisher = spawn_publisher(port, &added, Pace::Steady(100.0));
    for publisher in publishers {
        publisher.await.unwrap().unwrap();
    }
    new_publisher.await.unwrap().unwrap();

    // A broken file on SIGHUP changes nothing; the gateway runs on.
    write_config(
        dir.path(),
        &after.replace("[[brokers]]", "[[brokers]]\nnot_a_key = 1"),
    );
    gateway.signal("HUP");
    let line = gateway.wait_for_log("Config not reloaded", Duration::from_secs(10));
    assert!(line.contains("not_a_key"), "{line}");
    assert!(gateway.alive());
    spawn_publisher(port, &later, Pace::Steady(200.0))
        .await
        .unwrap()
        .unwrap();

    let want = expected(&[
        (&keep, "keep"),
        (&change, "change"),
        (&added, "new"),
        (&later, "keep"),
    ]);
    wait_for(
        "every reading of kept, changed and added devices",
        Duration::from_secs(30),
        || async {
            let stored = stored_readings(&pool).await;
            ["keep-0", "change-0", "new-0"]
                .iter()
                .all(|d| of_device(&stored, d).len() == of_device(&want.readings, d).len())
        },
    )
    .await;
    gateway.sigterm();
    assert!(gateway.wait_exit(Duration::from_secs(15)).success());

    let stored = stored_readings(&pool).await;
    for device in ["keep-0", "change-0", "new-0"] {
        assert_eq!(
            of_device(&stored, device),
            of_device(&want.readings, device),
            "{device}: lost, duplicated or altered"
        );
    }
    // The removed device: what arrived before the reload is stored, nothing twice, and its
    // row says why it stopped.
    let all_gone = expected(&[(&gone, "gone")]);
    let gone_stored = of_device(&stored, "gone-0");
    assert!(!gone_stored.is_empty());
    assert!(
        gone_stored
            .iter()
            .all(|(k, v)| all_gone.readings.get(k) == Some(v))
    );
    let (state, error): (String, Option<String>) =
        sqlx::query_as("SELECT state, last_error FROM devices WHERE name = 'gone-0'")
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!(
        (state.as_str(), error.as_deref()),
        ("stopped", Some("removed from the config"))
    );
    let log = std::fs::read_to_string(mosquitto.dir.path().join("mosquitto.log")).unwrap();
    let connects = log
        .lines()
        .filter(|l| l.contains("New client connected") && l.contains(&client_id))
        .count();
    eprintln!(
        "reload: keep {} / change {} / new {} readings stored exactly, gone {} of {} before removal, {connects} broker connection(s)",
        of_device(&stored, "keep-0").len(),
        of_device(&stored, "change-0").len(),
        of_device(&stored, "new-0").len(),
        gone_stored.len(),
        all_gone.readings.len()
    );
    assert_eq!(
        connects, 1,
        "the broker session must not reconnect on reload:\n{log}"
    );
}

/// A notification socket as systemd provides it.
struct Manager {
    socket: UnixDatagram,
    path: std::path::PathBuf,
}

impl Manager {
    fn new(dir: &std::path::Path) -> Self {
        let path = dir.join("notify.sock");
        let socket = UnixDatagram::bind(&path).unwrap();
        socket
            .set_read_timeout(Some(Duration::from_millis(200)))
            .unwrap();
        Self { socket, path }
    }

    /// The notifications received within `within`, one string per datagram.
    fn collect(&self, within: Duration) -> Vec<(Instant, String)> {
        let deadline = Instant::now() + within;
        let mut got = Vec::new();
        let mut buf = vec![0u8; 4096];
        while Instant::now() < deadline {
            if let Ok(n) = self.socket.recv(&mut buf) {
                got.push((
                    Instant::now(),
                    String::from_utf8_lossy(&buf[..n]).into_owned(),
                ));
            }
        }
        got
    }

    /// Waits for a datagram containing `text`.
    fn wait_for(&self, text: &str, within: Duration) -> String {
        let deadline = Instant::now() + within;
        let mut buf = vec![0u8; 4096];
        while Instant::now() < deadline {
            if let Ok(n) = self.socket.recv(&mut buf) {
                let message = String::from_utf8_lossy(&buf[..n]).into_owned();
                if message.contains(text) {
                    return message;
                }
            }
        }
        panic!("no notification with {text:?} within {within:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn systemd_sees_ready_status_watchdog_and_stopping_and_pings_stop_while_the_writer_is_stuck()
{
    use sqlx::Connection as _;
    let mosquitto = Mosquitto::start();
    let dir = tempfile::tempdir().unwrap();
    let db = db_path(dir.path());
    let s = sensor(&unique("sd"), "meter", 3000, 3600);
    let config = write_config(
        dir.path(),
        &gateway_config(mosquitto.port, &db, &unique("gw"), "", &[(&s, "meter")]).replacen(
            "[storage]\npath",
            "[storage]\nbusy_timeout = \"200ms\"\npath",
            1,
        ),
    );
    let manager = Manager::new(dir.path());
    let socket = manager.path.display().to_string();
    // Watchdog of 6 s: pings every 2 s; a heartbeat older than 3 s means stuck.
    let mut gateway = Gateway::start_with(
        &config,
        &[("NOTIFY_SOCKET", &socket), ("WATCHDOG_USEC", "6000000")],
    );
    manager.wait_for("READY=1", Duration::from_secs(10));
    let status = manager.wait_for("STATUS=", Duration::from_secs(10));
    assert!(
        status.contains("devices connected") && status.contains("readings/s stored"),
        "{status}"
    );
    let healthy = manager.collect(Duration::from_secs(5));
    let pings = healthy
        .iter()
        .filter(|(_, m)| m.contains("WATCHDOG=1"))
        .count();
    assert!(pings >= 2, "{pings} pings in 5 s: {healthy:?}");
    // Starting is not being stuck: no alarm before the first heartbeat.
    let early: Vec<String> = gateway.lines.try_iter().collect();
    assert!(
        !early.iter().any(|line| line.contains("Pipeline stuck")),
        "{early:#?}"
    );

    // Another process holds the write lock while messages arrive: the writer is stuck
    // retrying its commit, heartbeats stop passing, and so must the pings.
    let mut locker = sqlx::SqliteConnection::connect(&format!("sqlite://{}", db.display()))
        .await
        .unwrap();
    sqlx::query("BEGIN IMMEDIATE")
        .execute(&mut locker)
        .await
        .unwrap();
    let publisher = spawn_publisher(mosquitto.port, &s, Pace::Steady(300.0));
    let stuck = manager.collect(Duration::from_secs(7));
    let gap = stuck
        .iter()
        .filter(|(_, m)| m.contains("WATCHDOG=1"))
        .map(|(at, _)| *at)
        .collect::<Vec<_>>();
    let last_ping = gap.last().copied();
    sqlx::query("ROLLBACK").execute(&mut locker).await.unwrap();
    drop(locker);
    let silent_for = last_ping.map_or(Duration::from_secs(7), |at| at.elapsed());
    eprintln!(
        "watchdog: {pings} pings in 5 s healthy; {} pings during a 7 s stall, silent for the last {silent_for:?}",
        gap.len()
    );
    assert!(
        gap.len() <= 2,
        "pings went on while the writer was stuck: {stuck:?}"
    );
    assert!(silent_for >= Duration::from_secs(3), "{silent_for:?}");
    gateway.wait_for_log("Pipeline stuck", Duration::from_secs(5));
    manager.wait_for("WATCHDOG=1", Duration::from_secs(10));
    publisher.await.unwrap().unwrap();

    gateway.sigterm();
    manager.wait_for("STOPPING=1", Duration::from_secs(10));
    assert!(gateway.wait_exit(Duration::from_secs(15)).success());
    let pool = read_pool(&db).await;
    assert_eq!(
        count(&pool, "SELECT count(*) FROM readings").await,
        6000,
        "nothing lost to the stall"
    );
}
