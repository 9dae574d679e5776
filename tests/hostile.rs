//! Hostile input, bounded, through the `sensorgate run` process: a message whose every value
//! is refused, a publish larger than any limit on a persistent session, a device inventing
//! metrics across crashes, HTTP clients that stall, trickle or flood, and what the API lists
//! of rejected payloads. Each would have cost memory, disk or a jammed session in
//! proportion to the attacker's effort, not to the input's size.

mod support;

use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use sqlx::Row;
use support::http::get;
use support::process::{BIN, Gateway, write_config};
use support::*;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

/// Capacities as in the overload test of `tests/faults.rs`, with its memory bound.
const CAPACITY: usize = 512;
const QUEUE: usize = 64;
const UNACKED: usize = 500;
const BATCH: usize = 2000;

/// A gateway on the broker at `port` with two devices: `probe`, whose `temperature` may not
/// exceed 85, and `neighbour`; both JSON with a `ts` timestamp.
fn config(port: u16, db: &Path, prefix: &str, extra: &str) -> String {
    format!(
        "[storage]\npath = \"{db}\"\nbatch_size = {BATCH}\ncache_mib = 4\n\n\
         [pipeline]\nchannel_capacity = {CAPACITY}\ndevice_queue = {QUEUE}\n\n\
         {extra}\n\
         [[brokers]]\nid = \"test\"\nurl = \"mqtt://127.0.0.1:{port}\"\nclient_id = \"{client}\"\n\
         max_unacked = {UNACKED}\n\n\
         [[devices]]\nkind = \"mqtt\"\nid = \"probe\"\ntopic = \"{prefix}/probe\"\nformat = \"json\"\n\
         timestamp_field = \"ts\"\n[[devices.metrics]]\nname = \"temperature\"\nfield = \"temp\"\nmax = 85.0\n\n\
         [[devices]]\nkind = \"mqtt\"\nid = \"neighbour\"\ntopic = \"{prefix}/neighbour\"\nformat = \"json\"\n\
         timestamp_field = \"ts\"\n",
        db = db.display(),
        client = unique("gw"),
    )
}

/// What the overload test allows the gateway beyond its idle size, in KiB: messages in the
/// channels, inboxes and the unacknowledged window (under 1 KiB each with their readings),
/// three batches of readings (under 256 bytes each) and the SQLite page cache (4 MiB).
fn capacity_bound_kib(devices: usize) -> u64 {
    let messages = 2 * CAPACITY + QUEUE * devices + UNACKED;
    (messages as u64 * 1024 + 3 * BATCH as u64 * 256) / 1024 + 4 * 1024
}

/// Publishes `payload` on `topic` at QoS 1 and returns once the broker has it.
async fn publish_raw(port: u16, topic: &str, payload: Vec<u8>) {
    let mut options = MqttOptions::new(unique("raw"), "127.0.0.1", port);
    options.set_max_packet_size(1 << 20, 64 << 20);
    let (client, mut events) = AsyncClient::new(options, 4);
    client
        .publish(topic, QoS::AtLeastOnce, false, payload)
        .await
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let event = tokio::time::timeout_at(deadline.into(), events.poll())
            .await
            .expect("the broker acknowledges the publish")
            .expect("the publish goes out");
        if matches!(event, Event::Incoming(Packet::PubAck(_))) {
            break;
        }
    }
    client.disconnect().await.unwrap();
    while let Ok(Ok(event)) = tokio::time::timeout(Duration::from_secs(2), events.poll()).await {
        if matches!(event, Event::Outgoing(rumqttc::Outgoing::Disconnect)) {
            break;
        }
    }
}

fn reading(ts: i64, temp: f64) -> Vec<u8> {
    format!(r#"{{"ts": {ts}, "temp": {temp}}}"#).into_bytes()
}

async fn scalar(db: &Path, sql: &'static str) -> i64 {
    let pool = read_pool(db).await;
    let value = sqlx::query_scalar(sql).fetch_one(&pool).await.unwrap();
    pool.close().await;
    value
}

async fn wait_for_scalar(db: &Path, what: &str, sql: &'static str, want: i64, timeout: Duration) {
    wait_for(what, timeout, || async { scalar(db, sql).await == want }).await;
}

fn stop(mut gateway: Gateway) {
    gateway.sigterm();
    assert!(gateway.wait_exit(Duration::from_secs(15)).success());
}

/// The database's size on disk: the file and its write-ahead log.
fn size_on_disk(db: &Path) -> u64 {
    let len = |p: &Path| std::fs::metadata(p).map_or(0, |m| m.len());
    len(db) + len(&db.with_extension("db-wal"))
}

/// A 1 MiB message of 10,000 values, every one above the device's max: one rejection
/// holding the message once, not 10,000 holding it each (10 GB), and memory within what
/// the capacities allow.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_whose_every_value_is_refused_costs_about_its_own_size() {
    let mosquitto = Mosquitto::start();
    let dir = tempfile::tempdir().unwrap();
    let db = db_path(dir.path());
    let prefix = unique("flood");
    let path = write_config(dir.path(), &config(mosquitto.port, &db, &prefix, ""));

    // The database with its devices and a reading, as the message will find it.
    let gateway = Gateway::start(&path);
    gateway.wait_for_log("Subscribed", Duration::from_secs(10));
    let now = sensorgate::reading::now_millis();
    publish_raw(
        mosquitto.port,
        &format!("{prefix}/neighbour"),
        reading(now, 20.0),
    )
    .await;
    wait_for_scalar(
        &db,
        "a reading",
        "SELECT count(*) FROM readings",
        1,
        Duration::from_secs(10),
    )
    .await;
    stop(gateway);
    let before = size_on_disk(&db);

    let gateway = Gateway::start(&path);
    gateway.wait_for_log("Subscribed", Duration::from_secs(10));
    let idle_kib = gateway.peak_rss_kib();
    let values = 10_000;
    let mut payload = String::from("[");
    for i in 0..values {
        let pad = "x".repeat(55);
        payload.push_str(&format!(
            r#"{{"ts": {}, "temp": {}, "pad": "{pad}"}},"#,
            now + i,
            1000 + i
        ));
    }
    payload.pop();
    payload.push(']');
    let payload = payload.into_bytes();
    assert!(
        payload.len() > 1_000_000 && payload.len() <= 1 << 20,
        "{}",
        payload.len()
    );
    publish_raw(mosquitto.port, &format!("{prefix}/probe"), payload.clone()).await;
    publish_raw(
        mosquitto.port,
        &format!("{prefix}/neighbour"),
        reading(now + 1, 21.0),
    )
    .await;
    wait_for_scalar(
        &db,
        "the neighbour's reading",
        "SELECT count(*) FROM readings",
        2,
        Duration::from_secs(30),
    )
    .await;
    let peak_kib = gateway.peak_rss_kib();
    stop(gateway);
    let grown = size_on_disk(&db) - before;

    let pool = read_pool(&db).await;
    let rows = sqlx::query("SELECT reason, value_count, length(raw), size, detail FROM rejections")
        .fetch_all(&pool)
        .await
        .unwrap();
    pool.close().await;
    assert_eq!(rows.len(), 1, "one rejection for the message");
    let (reason, count, stored, size, detail): (String, i64, i64, i64, String) = (
        rows[0].get(0),
        rows[0].get(1),
        rows[0].get(2),
        rows[0].get(3),
        rows[0].get(4),
    );
    let bound_kib = idle_kib + capacity_bound_kib(2);
    println!(
        "{} bytes, {values} values refused: database grew {grown} bytes; peak RSS {peak_kib} KiB \
         (idle {idle_kib} KiB, bound {bound_kib} KiB); detail: {detail}",
        payload.len()
    );
    assert_eq!(reason, "out_of_range");
    assert_eq!(
        (count, stored, size),
        (values, payload.len() as i64, payload.len() as i64)
    );
    assert!(
        detail.starts_with("10000 of 10000 values not stored"),
        "{detail}"
    );
    assert!(
        grown <= 2 * payload.len() as u64 + 64 * 1024,
        "the database grew by {grown} bytes for a {}-byte message",
        payload.len()
    );
    assert!(
        peak_kib <= bound_kib,
        "peak {peak_kib} KiB over the bound {bound_kib} KiB"
    );
}

/// A 1.5 MiB publish on a persistent session: rumqttc alone refuses it by closing the
/// connection, and the broker sends it again on every reconnect, so nothing else from that
/// broker is ever stored.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_publish_over_max_payload_is_a_rejection_and_jams_nothing() {
    let mosquitto = Mosquitto::start();
    let dir = tempfile::tempdir().unwrap();
    let db = db_path(dir.path());
    let prefix = unique("big");
    let path = write_config(dir.path(), &config(mosquitto.port, &db, &prefix, ""));
    let gateway = Gateway::start(&path);
    gateway.wait_for_log("Subscribed", Duration::from_secs(10));

    let big: Vec<u8> = (0..1_572_864u32).map(|i| b'a' + (i % 26) as u8).collect();
    publish_raw(mosquitto.port, &format!("{prefix}/probe"), big.clone()).await;
    let now = sensorgate::reading::now_millis();
    publish_raw(
        mosquitto.port,
        &format!("{prefix}/neighbour"),
        reading(now, 20.0),
    )
    .await;
    let published = Instant::now();
    wait_for_scalar(
        &db,
        "the neighbour's reading",
        "SELECT count(*) FROM readings",
        1,
        Duration::from_secs(5),
    )
    .await;
    println!(
        "the neighbour's reading stored {:?} after its publish",
        published.elapsed()
    );

    let pool = read_pool(&db).await;
    let row = sqlx::query(
        "SELECT d.name, j.reason, j.raw, j.size, j.detail FROM rejections j \
         JOIN devices d ON d.id = j.device_id",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    pool.close().await;
    let (device, reason, raw, size, detail): (String, String, Vec<u8>, i64, String) =
        (row.get(0), row.get(1), row.get(2), row.get(3), row.get(4));
    assert_eq!((device.as_str(), reason.as_str()), ("probe", "too_large"));
    assert_eq!(raw, big[..4096]);
    assert_eq!(size, big.len() as i64);
    assert!(detail.contains("max_payload"), "{detail}");

    // Acknowledged: a restart gets neither again.
    stop(gateway);
    let gateway = Gateway::start(&path);
    gateway.wait_for_log("Subscribed", Duration::from_secs(10));
    publish_raw(
        mosquitto.port,
        &format!("{prefix}/neighbour"),
        reading(now + 1, 21.0),
    )
    .await;
    wait_for_scalar(
        &db,
        "the marker",
        "SELECT count(*) FROM readings",
        2,
        Duration::from_secs(10),
    )
    .await;
    stop(gateway);
    assert_eq!(scalar(&db, "SELECT count(*) FROM rejections").await, 1);
    assert_eq!(scalar(&db, "SELECT sum(duplicates) FROM devices").await, 0);
}

/// `max_metrics_per_device` holds across crashes: each start used to allow another batch of
/// invented metrics, each a permanent series.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invented_metrics_stay_capped_across_crashes() {
    let mosquitto = Mosquitto::start();
    let dir = tempfile::tempdir().unwrap();
    let db = db_path(dir.path());
    let prefix = unique("inventor");
    let text = config(
        mosquitto.port,
        &db,
        &prefix,
        "[validation]\nmax_metrics_per_device = 3\n",
    );
    let path = write_config(dir.path(), &text);
    let series = "SELECT count(*) FROM series s JOIN devices d ON d.id = s.device_id \
                  WHERE d.name = 'neighbour'";
    let now = sensorgate::reading::now_millis();
    let topic = format!("{prefix}/neighbour");
    for (round, names) in [["a1", "a2", "a3", "a4"], ["b1", "b2", "b3", "a1"]]
        .iter()
        .enumerate()
    {
        let mut gateway = Gateway::start(&path);
        gateway.wait_for_log("Subscribed", Duration::from_secs(10));
        let fields: Vec<String> = names.iter().map(|n| format!(r#""{n}": 1"#)).collect();
        let payload = format!(r#"{{"ts": {}, {}}}"#, now + round as i64, fields.join(", "));
        publish_raw(mosquitto.port, &topic, payload.into_bytes()).await;
        wait_for_scalar(
            &db,
            "the rejection",
            "SELECT count(*) FROM rejections",
            round as i64 + 1,
            Duration::from_secs(10),
        )
        .await;
        // A crash: no clean stop.
        gateway.child.kill().unwrap();
        gateway.wait_exit(Duration::from_secs(5));
    }
    assert_eq!(scalar(&db, series).await, 3, "series of the device");
    let pool = read_pool(&db).await;
    let reasons: Vec<(String, i64)> =
        sqlx::query_as("SELECT reason, value_count FROM rejections ORDER BY id")
            .fetch_all(&pool)
            .await
            .unwrap();
    pool.close().await;
    assert_eq!(
        reasons,
        [
            ("too_many_metrics".to_string(), 1),
            ("too_many_metrics".to_string(), 3)
        ]
    );
}

/// A gateway serving HTTP on a free port, with `http` settings.
fn with_http(port: u16, db: &Path, prefix: &str, http: &str) -> (String, SocketAddr) {
    let listen: SocketAddr = ([127, 0, 0, 1], free_port()).into();
    let text = config(
        port,
        db,
        prefix,
        &format!("[http]\nenabled = true\nlisten = \"{listen}\"\n{http}\n"),
    );
    (text, listen)
}

/// The sockets the gateway holds: its listener, broker connections, HTTP connections.
fn open_sockets(gateway: &Gateway) -> usize {
    std::fs::read_dir(format!("/proc/{}/fd", gateway.child.id()))
        .unwrap()
        .filter_map(|fd| std::fs::read_link(fd.ok()?.path()).ok())
        .filter(|target| target.to_string_lossy().starts_with("socket:"))
        .count()
}

/// Clients that ask for a large page and never read it: each held a read connection and
/// its snapshot for ever, so four of them hung every endpoint that reads the database, and
/// one kept the write-ahead log from being reset.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readers_that_stall_are_cut_off_and_release_their_snapshots() {
    let mosquitto = Mosquitto::start();
    let dir = tempfile::tempdir().unwrap();
    let db = db_path(dir.path());
    let prefix = unique("stall");
    let (text, addr) = with_http(mosquitto.port, &db, &prefix, "send_timeout = \"1s\"\n");
    let path = write_config(dir.path(), &text);
    let gateway = Gateway::start(&path);
    gateway.wait_for_log("Subscribed", Duration::from_secs(10));
    let now = sensorgate::reading::now_millis();
    publish_raw(
        mosquitto.port,
        &format!("{prefix}/neighbour"),
        reading(now, 20.0),
    )
    .await;
    wait_for_scalar(
        &db,
        "a reading",
        "SELECT count(*) FROM readings",
        1,
        Duration::from_secs(10),
    )
    .await;
    stop(gateway);
    // 200,000 readings a millisecond apart: a page of 100,000 is megabytes of JSON.
    {
        let options = sqlx::sqlite::SqliteConnectOptions::new().filename(&db);
        let pool = sqlx::SqlitePool::connect_with(options).await.unwrap();
        sqlx::query(
            "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 200000) \
             INSERT INTO readings_archive (series_id, ts, received_at, value, flags) \
             SELECT (SELECT id FROM series), ?1 - 300000 + i, ?1, i, 0 FROM n",
        )
        .bind(now)
        .execute(&pool)
        .await
        .unwrap();
        pool.close().await;
    }
    let gateway = Gateway::start(&path);
    gateway.wait_for_log("HTTP API listening", Duration::from_secs(10));

    let page = "/api/v1/devices/neighbour/readings?since=1h&limit=100000";
    let mut stalled = Vec::new();
    for _ in 0..6 {
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.set_recv_buffer_size(4096).unwrap();
        stalled.push(support::http::open(addr, page, socket).await);
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    // Every endpoint that reads the database answers while they stall.
    let started = Instant::now();
    let devices = tokio::time::timeout(Duration::from_secs(5), get(addr, "/api/v1/devices", &[]))
        .await
        .expect("/api/v1/devices answers while six readers stall");
    assert_eq!(devices.status, 200, "{}", devices.text());
    println!(
        "/api/v1/devices answered in {:?} beside six stalled readers",
        started.elapsed()
    );

    // Their snapshots are gone: a checkpoint resets the write-ahead log.
    let options = sqlx::sqlite::SqliteConnectOptions::new().filename(&db);
    let pool = sqlx::SqlitePool::connect_with(options).await.unwrap();
    wait_for(
        "the write-ahead log to reset",
        Duration::from_secs(10),
        || async {
            let busy: i64 = sqlx::query("PRAGMA wal_checkpoint(TRUNCATE)")
                .fetch_one(&pool)
                .await
                .unwrap()
                .get(0);
            busy == 0
        },
    )
    .await;
    pool.close().await;

    // Each stalled response was cut off, not ended as if whole.
    for mut stream in stalled {
        let mut raw = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut raw)).await;
        assert!(raw.starts_with(b"HTTP/1.1 200"), "a response began");
        assert!(
            !raw.ends_with(b"0\r\n\r\n"),
            "a cut page must not end as a whole one"
        );
    }
    stop(gateway);
}

/// Connections that send half a request, or nothing: each held a file descriptor for ever,
/// and enough of them used up the process's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trickling_and_idle_connections_are_capped_and_closed() {
    let mosquitto = Mosquitto::start();
    let dir = tempfile::tempdir().unwrap();
    let db = db_path(dir.path());
    let prefix = unique("loris");
    let (text, addr) = with_http(
        mosquitto.port,
        &db,
        &prefix,
        "max_connections = 8\nheader_timeout = \"1s\"\n",
    );
    let path = write_config(dir.path(), &text);
    let gateway = Gateway::start(&path);
    gateway.wait_for_logs(
        &["HTTP API listening", "Subscribed"],
        Duration::from_secs(10),
    );
    let baseline = open_sockets(&gateway);

    let mut lorises = Vec::new();
    for i in 0..40 {
        let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
        if i % 2 == 0 {
            stream
                .write_all(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\nX-Slow: ")
                .await
                .unwrap();
        }
        lorises.push(stream);
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let held = open_sockets(&gateway) - baseline;
    println!("40 slow connections hold {held} sockets of the gateway");
    assert!(held <= 8, "{held} sockets for 8 connections at most");

    // Each is closed once it has been served its header timeout.
    let started = Instant::now();
    for mut stream in lorises {
        let mut buf = [0; 256];
        let closed = tokio::time::timeout(Duration::from_secs(15), async {
            loop {
                match stream.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(_) => {}
                }
            }
        })
        .await;
        assert!(closed.is_ok(), "a slow connection still open after 15 s");
    }
    println!("all 40 closed within {:?}", started.elapsed());
    let health = tokio::time::timeout(Duration::from_secs(5), get(addr, "/healthz", &[]))
        .await
        .expect("the API answers again");
    assert_eq!(health.status, 200);
    stop(gateway);
}

/// `/api/v1/rejections` loaded every listed payload whole (up to 1,000 of 1 MiB) and copied
/// it twice; now it lists a preview of each and serves one payload per request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rejections_are_listed_with_a_bounded_preview() {
    let mosquitto = Mosquitto::start();
    let dir = tempfile::tempdir().unwrap();
    let db = db_path(dir.path());
    let prefix = unique("list");
    let (text, addr) = with_http(mosquitto.port, &db, &prefix, "");
    let path = write_config(dir.path(), &text);
    let gateway = Gateway::start(&path);
    gateway.wait_for_log("Subscribed", Duration::from_secs(10));
    let malformed = |i: u8| {
        let mut payload = vec![b'{'; 1 << 20];
        payload[1] = b'0' + i % 10;
        payload
    };
    for i in 0..30 {
        publish_raw(mosquitto.port, &format!("{prefix}/probe"), malformed(i)).await;
    }
    wait_for_scalar(
        &db,
        "30 rejections",
        "SELECT count(*) FROM rejections",
        30,
        Duration::from_secs(30),
    )
    .await;

    let before_kib = gateway.peak_rss_kib();
    let listed = get(addr, "/api/v1/rejections?limit=1000", &[]).await;
    assert_eq!(listed.status, 200, "{}", listed.text());
    let after_kib = gateway.peak_rss_kib();
    println!(
        "listing 30 rejections of 1 MiB: {} bytes, peak RSS {before_kib} -> {after_kib} KiB",
        listed.body.len()
    );
    assert!(listed.body.len() < 64 * 1024, "{} bytes", listed.body.len());
    assert!(
        after_kib - before_kib < 8 * 1024,
        "the listing cost {} KiB",
        after_kib - before_kib
    );
    let rows = listed.json()["rejections"].as_array().unwrap().clone();
    assert_eq!(rows.len(), 30);
    for row in &rows {
        assert_eq!(row["reason"], "malformed");
        assert_eq!(row["size"], 1 << 20);
        assert_eq!(row["stored"], 1 << 20);
        assert_eq!(row["preview_truncated"], true);
        assert!(row["raw_preview"].as_str().unwrap().len() <= 256);
    }
    let id = rows[0]["id"].as_i64().unwrap();
    let raw = get(addr, &format!("/api/v1/rejections/{id}/raw"), &[]).await;
    assert_eq!(raw.status, 200);
    assert_eq!(raw.header("content-type"), Some("application/octet-stream"));
    assert_eq!(raw.body.len(), 1 << 20);
    assert_eq!(
        raw.body[..2],
        rows[0]["raw_preview"].as_str().unwrap().as_bytes()[..2]
    );
    assert_eq!(
        get(addr, "/api/v1/rejections/999999/raw", &[]).await.status,
        404
    );
    let unknown = get(addr, "/api/v1/rejections?reason=nosuch", &[]).await;
    assert_eq!(unknown.status, 400);
    stop(gateway);
}

/// Without a token the API listens on loopback; a page the operator's browser opens could
/// still reach it through a name of its own resolving to 127.0.0.1 (DNS rebinding). Such a
/// request carries that name in `Host`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_token_only_loopback_hosts_are_answered_and_with_one_any_scheme_case() {
    let mosquitto = Mosquitto::start();
    let dir = tempfile::tempdir().unwrap();
    let db = db_path(dir.path());
    let prefix = unique("host");
    let (text, addr) = with_http(mosquitto.port, &db, &prefix, "");
    let path = write_config(dir.path(), &text);
    let gateway = Gateway::start(&path);
    gateway.wait_for_log("HTTP API listening", Duration::from_secs(10));
    let with_host = |host: &'static str| async move {
        let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
        let request =
            format!("GET /api/v1/devices HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n");
        stream.write_all(request.as_bytes()).await.unwrap();
        let mut raw = Vec::new();
        stream.read_to_end(&mut raw).await.unwrap();
        String::from_utf8_lossy(&raw).into_owned()
    };
    let rebound = with_host("evil.example:8080").await;
    assert!(rebound.starts_with("HTTP/1.1 403"), "{rebound}");
    assert!(rebound.contains("not a loopback name"), "{rebound}");
    assert!(with_host("localhost").await.starts_with("HTTP/1.1 200"));
    assert!(with_host("[::1]:8080").await.starts_with("HTTP/1.1 200"));
    stop(gateway);

    // With a token, its scheme is matched without regard to case (RFC 9110).
    let token = "a-token-of-sixteen-or-more";
    let text = text.replace("[http]\n", &format!("[http]\ntoken = \"{token}\"\n"));
    let path = write_config(dir.path(), &text);
    let gateway = Gateway::start(&path);
    gateway.wait_for_log("HTTP API listening", Duration::from_secs(10));
    for scheme in ["Bearer", "bearer", "BEARER"] {
        let auth = format!("{scheme} {token}");
        let response = get(addr, "/api/v1/devices", &[("Authorization", &auth)]).await;
        assert_eq!(response.status, 200, "{scheme}");
    }
    let basic = get(addr, "/api/v1/devices", &[("Authorization", "Basic eDp5")]).await;
    assert_eq!(basic.status, 401);
    stop(gateway);
}

/// A secrets file every user can read is reported; an empty one is refused (it meant an
/// empty password).
#[test]
fn check_config_warns_of_readable_secrets_and_refuses_empty_ones() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let secret = dir.path().join("password");
    let check = |password: &str, mode: u32| {
        std::fs::write(&secret, password).unwrap();
        std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(mode)).unwrap();
        let text = format!(
            "[storage]\npath = \"{}\"\n[[brokers]]\nurl = \"mqtt://127.0.0.1:1\"\n\
             username = \"gw\"\npassword_file = \"{}\"\n",
            db_path(dir.path()).display(),
            secret.display()
        );
        let path = write_config(dir.path(), &text);
        std::process::Command::new(BIN)
            .args(["check-config", "--config"])
            .arg(&path)
            .output()
            .unwrap()
    };
    let private = check("s3cret\n", 0o640);
    assert!(private.status.success());
    assert!(String::from_utf8_lossy(&private.stderr).is_empty());

    let open = check("s3cret\n", 0o644);
    let stderr = String::from_utf8_lossy(&open.stderr);
    assert!(open.status.success());
    assert!(
        stderr.contains("warning:") && stderr.contains("can be read by every user"),
        "{stderr}"
    );

    let empty = check("\n", 0o600);
    let stderr = String::from_utf8_lossy(&empty.stderr);
    assert_eq!(empty.status.code(), Some(78), "{stderr}");
    assert!(
        stderr.contains("password_file") && stderr.contains("empty"),
        "{stderr}"
    );
}

/// A flood of large messages while commits wait: the gateway used to take in up to
/// `max_unacked` of them (1,000 messages of 1 MiB is a gigabyte) before it stopped reading.
/// `max_unacked_bytes` bounds them in bytes; the rest wait at the broker.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_messages_beyond_max_unacked_bytes_wait_at_the_broker() {
    use sqlx::Connection as _;
    let mosquitto = Mosquitto::start();
    let dir = tempfile::tempdir().unwrap();
    let db = db_path(dir.path());
    let prefix = unique("large");
    let text = config(mosquitto.port, &db, &prefix, "")
        .replace(
            "max_unacked = ",
            "max_unacked_bytes = 8388608\nmax_unacked = ",
        )
        .replace("[storage]\n", "[storage]\nbusy_timeout = \"60s\"\n");
    let path = write_config(dir.path(), &text);
    let gateway = Gateway::start(&path);
    gateway.wait_for_log("Subscribed", Duration::from_secs(10));
    let before_kib = gateway.peak_rss_kib();

    // Another connection holds the write lock: no commit, no acknowledgement.
    let mut locker = sqlx::SqliteConnection::connect(&format!("sqlite://{}", db.display()))
        .await
        .unwrap();
    sqlx::query("BEGIN IMMEDIATE")
        .execute(&mut locker)
        .await
        .unwrap();
    let messages = 60;
    for _ in 0..messages {
        publish_raw(
            mosquitto.port,
            &format!("{prefix}/probe"),
            vec![b'{'; 1_000_000],
        )
        .await;
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    let held_kib = gateway.peak_rss_kib() - before_kib;
    sqlx::query("ROLLBACK").execute(&mut locker).await.unwrap();
    drop(locker);
    println!("{messages} messages of 1 MB waiting for a commit: peak RSS grew {held_kib} KiB");
    wait_for_scalar(
        &db,
        "every message stored",
        "SELECT count(*) FROM rejections",
        messages,
        Duration::from_secs(60),
    )
    .await;
    // 8 MiB in the window, what rumqttc had parsed ahead (up to ten packets) and the buffers
    // of the connection: well under the 60 MB taken in before.
    assert!(held_kib < 28 * 1024, "{held_kib} KiB held");
    stop(gateway);
}
