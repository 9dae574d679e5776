//! The HTTP API against a gateway fed by simulated sensors: every endpoint, bad parameters,
//! the token rule, the OpenAPI document against real responses, and a slow live-stream client
//! that must not slow ingest.

mod support;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use sensorgate::app::{AppError, Gateway};
use sensorgate_sim::{EmbeddedBroker, Format, Pace, Scenario, publish};
use serde_json::Value;
use support::http::{Response, get};
use support::*;
use tokio::io::AsyncReadExt as _;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

const TOKEN: &str = "s3cret-token-for-tests";

struct Running {
    addr: SocketAddr,
    shutdown: CancellationToken,
    handle: JoinHandle<Result<(), AppError>>,
    telemetry: std::sync::Arc<sensorgate::telemetry::Telemetry>,
}

async fn start(text: &str) -> Running {
    init_logging();
    let config = sensorgate::config::parse(text, Path::new("test.toml")).expect("test config");
    let gateway = Gateway::build(config).await.expect("gateway builds");
    let addr = gateway.http_address().expect("http enabled");
    let telemetry = gateway.telemetry();
    let shutdown = CancellationToken::new();
    let handle = tokio::spawn(gateway.run_until_stopped(shutdown.clone()));
    Running {
        addr,
        shutdown,
        handle,
        telemetry,
    }
}

impl Running {
    async fn stop(self) {
        self.shutdown.cancel();
        self.handle.await.unwrap().unwrap();
    }
}

fn config(port: u16, db: &Path, http: &str, scenario: &Scenario) -> String {
    gateway_config(
        port,
        db,
        &unique("gw"),
        &format!("[http]\nenabled = true\nlisten = \"127.0.0.1:0\"\n{http}\n"),
        &[(scenario, "dev")],
    )
}

async fn publish_all(port: u16, scenario: &Scenario) {
    publish(
        "127.0.0.1",
        port,
        &unique("pub"),
        scenario.messages(),
        Pace::Unlimited,
        1,
        CancellationToken::new(),
    )
    .await
    .expect("publisher");
}

/// The property names of a schema in the OpenAPI document.
fn schema_fields(doc: &Value, schema: &str) -> Vec<String> {
    let mut fields: Vec<String> = doc["components"]["schemas"][schema]["properties"]
        .as_object()
        .unwrap_or_else(|| panic!("schema {schema}"))
        .keys()
        .cloned()
        .collect();
    fields.sort();
    fields
}

fn fields(object: &Value) -> Vec<String> {
    let mut fields: Vec<String> = object
        .as_object()
        .expect("an object")
        .keys()
        .cloned()
        .collect();
    fields.sort();
    fields
}

fn assert_error(response: &Response, status: u16, parameter: Option<&str>) {
    assert_eq!(response.status, status, "{}", response.text());
    let body = response.json();
    assert!(
        body["error"].as_str().is_some_and(|e| !e.is_empty()),
        "{body}"
    );
    assert_eq!(body["parameter"].as_str(), parameter, "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_endpoint_answers_and_matches_the_openapi_document() {
    let broker = EmbeddedBroker::start().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let db = db_path(dir.path());
    let scenario = support::scenario(Format::Json, 3, 40, 7, &unique("api"));
    let gw = start(&config(broker.port, &db, "max_rows = 50", &scenario)).await;
    let pool = read_pool(&db).await;
    wait_for_devices_in(&pool, "connected", 3).await;
    publish_all(broker.port, &scenario).await;
    let want = expected(&[(&scenario, "dev")]);
    let rejected: i64 = want.rejections.values().sum();
    wait_for("everything stored", Duration::from_secs(30), || async {
        count(&pool, "SELECT count(*) FROM readings").await == want.readings.len() as i64
            && count(&pool, "SELECT count(*) FROM rejections").await == rejected
    })
    .await;
    let addr = gw.addr;
    let doc = get(addr, "/api/v1/openapi.json", &[]).await.json();

    let health = get(addr, "/healthz", &[]).await;
    assert_eq!((health.status, health.text().as_str()), (200, "ok\n"));
    wait_for("ready", Duration::from_secs(10), || async {
        get(addr, "/readyz", &[]).await.status == 200
    })
    .await;
    assert_eq!(get(addr, "/readyz", &[]).await.json()["ready"], true);

    let devices = get(addr, "/api/v1/devices", &[]).await.json();
    let list = devices["devices"].as_array().unwrap();
    assert_eq!(list.len(), 3);
    assert_eq!(fields(&list[0]), schema_fields(&doc, "Device"));
    assert_eq!(
        fields(&list[0]["last_values"][0]),
        schema_fields(&doc, "Value")
    );
    let one = get(addr, "/api/v1/devices/dev-1", &[]).await.json();
    assert_eq!(one["name"], "dev-1");
    assert_eq!(one["state"], "connected");
    assert_eq!(one["last_values"].as_array().unwrap().len(), 2);
    assert_error(&get(addr, "/api/v1/devices/nope", &[]).await, 404, None);

    // Page through every reading of dev-0, 50 at a time (max_rows), and compare.
    let stored = stored_readings(&pool).await;
    let mut got = BTreeMap::new();
    let mut cursor: Option<String> = None;
    let mut pages = 0;
    loop {
        let path = format!(
            "/api/v1/devices/dev-0/readings?since=2h&limit=50{}",
            cursor
                .as_ref()
                .map(|c| format!("&cursor={c}"))
                .unwrap_or_default()
        );
        let page = get(addr, &path, &[]).await;
        assert_eq!(page.status, 200, "{}", page.text());
        let page = page.json();
        pages += 1;
        for row in page["rows"].as_array().unwrap() {
            assert_eq!(fields(row), schema_fields(&doc, "Reading"));
            let key = (
                "dev-0".to_string(),
                row["metric"].as_str().unwrap().to_string(),
                row["time"].as_i64().unwrap(),
            );
            assert!(
                got.insert(key, row["value"].as_f64().unwrap()).is_none(),
                "a row came twice"
            );
        }
        assert_eq!(fields(&page), schema_fields(&doc, "Readings"));
        match page["next_cursor"].as_str() {
            Some(next) => cursor = Some(next.to_string()),
            None => break,
        }
    }
    let want_dev0: BTreeMap<_, _> = stored
        .into_iter()
        .filter(|((d, _, _), _)| d == "dev-0")
        .collect();
    assert_eq!(got, want_dev0);
    assert!(pages >= 2, "{pages} pages");
    let rfc = get(
        addr,
        "/api/v1/devices/dev-0/readings?metric=humidity&limit=1&time_format=rfc3339",
        &[],
    )
    .await
    .json();
    assert!(
        rfc["rows"][0]["time"]
            .as_str()
            .is_some_and(|t| t.ends_with('Z')),
        "{rfc}"
    );

    let rollups = get(
        addr,
        "/api/v1/devices/dev-0/rollups?window=1m&since=3h&metric=temperature",
        &[],
    )
    .await
    .json();
    let rows = rollups["rows"].as_array().unwrap();
    assert!(!rows.is_empty());
    assert_eq!(fields(&rows[0]), schema_fields(&doc, "Rollup"));
    assert_eq!(fields(&rollups), schema_fields(&doc, "Rollups"));
    let total: i64 = rows.iter().map(|r| r["count"].as_i64().unwrap()).sum();
    assert_eq!(total, count(&pool, "SELECT count(*) FROM readings r JOIN series s ON s.id = r.series_id JOIN devices d ON d.id = s.device_id WHERE d.name = 'dev-0' AND s.metric = 'temperature'").await);

    let rejections = get(addr, "/api/v1/rejections?since=1d", &[]).await.json();
    let list = rejections["rejections"].as_array().unwrap();
    assert_eq!(list.len() as i64, rejected);
    assert_eq!(fields(&list[0]), schema_fields(&doc, "Rejection"));
    assert_eq!(fields(&rejections), schema_fields(&doc, "Rejections"));
    let malformed = get(
        addr,
        "/api/v1/rejections?reason=malformed&device=dev-2",
        &[],
    )
    .await
    .json();
    assert!(
        malformed["rejections"]
            .as_array()
            .unwrap()
            .iter()
            .all(|r| r["reason"] == "malformed" && r["device"] == "dev-2")
    );

    let metrics = get(addr, "/metrics", &[]).await.text();
    let dev0 = count(&pool, "SELECT readings FROM devices WHERE name = 'dev-0'").await;
    assert!(
        metrics.contains(&format!(
            "sensorgate_readings_stored_total{{device=\"dev-0\"}} {dev0}"
        )),
        "{metrics}"
    );
    assert!(metrics.contains("sensorgate_broker_connected{broker=\"test\"} 1"));
    assert!(metrics.contains("sensorgate_queue_capacity{queue=\"sources_to_validate\"}"));
    assert!(metrics.contains("sensorgate_device_state{device=\"dev-1\",state=\"connected\"} 1"));

    let page = get(addr, "/", &[]).await;
    assert_eq!(page.status, 200);
    assert!(page.text().contains("<title>sensorgate</title>"));
    assert_error(&get(addr, "/api/v1/nothing", &[]).await, 404, None);

    // Bad parameters name themselves.
    for (path, parameter) in [
        ("/api/v1/devices/dev-0/readings?color=red", "color"),
        ("/api/v1/devices/dev-0/readings?from=yesterday", "from"),
        (
            "/api/v1/devices/dev-0/readings?to=1700000000000&from=1800000000000",
            "from",
        ),
        ("/api/v1/devices/dev-0/readings?since=ages", "since"),
        ("/api/v1/devices/dev-0/readings?limit=0", "limit"),
        ("/api/v1/devices/dev-0/readings?limit=51", "limit"),
        ("/api/v1/devices/dev-0/readings?limit=1&limit=2", "limit"),
        ("/api/v1/devices/dev-0/readings?cursor=zzz", "cursor"),
        (
            "/api/v1/devices/dev-0/readings?time_format=iso",
            "time_format",
        ),
        ("/api/v1/devices/dev-0/rollups?window=90ms", "window"),
        ("/api/v1/rejections?since=1h&from=1700000000000", "since"),
        ("/api/v1/stream?color=red", "color"),
    ] {
        assert_error(&get(addr, path, &[]).await, 400, Some(parameter));
    }
    assert_error(
        &get(addr, "/api/v1/devices/nope/readings", &[]).await,
        404,
        None,
    );
    assert_error(
        &get(addr, "/api/v1/stream?device=nope", &[]).await,
        404,
        None,
    );

    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_guards_every_endpoint_with_data() {
    let broker = EmbeddedBroker::start().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let db = db_path(dir.path());
    let scenario = support::scenario(Format::Json, 1, 5, 0, &unique("tok"));
    let text = config(broker.port, &db, &format!("token = \"{TOKEN}\""), &scenario)
        .replace("127.0.0.1:0", "0.0.0.0:0");
    let gw = start(&text).await;
    let addr = SocketAddr::from(([127, 0, 0, 1], gw.addr.port()));
    let bearer = format!("Bearer {TOKEN}");
    for path in [
        "/readyz",
        "/metrics",
        "/api/v1/devices",
        "/api/v1/devices/dev-0",
        "/api/v1/devices/dev-0/readings",
        "/api/v1/devices/dev-0/rollups",
        "/api/v1/rejections",
        "/api/v1/stream",
    ] {
        let none = get(addr, path, &[]).await;
        assert_error(&none, 401, None);
        assert_eq!(none.header("www-authenticate"), Some("Bearer"));
        let wrong = get(
            addr,
            path,
            &[("Authorization", "Bearer s3cret-token-for-test")],
        )
        .await;
        assert_eq!(wrong.status, 401, "{path}");
    }
    for path in ["/api/v1/devices", "/api/v1/devices/dev-0/readings"] {
        assert_eq!(
            get(addr, path, &[("Authorization", &bearer)]).await.status,
            200,
            "{path}"
        );
    }
    for path in ["/healthz", "/", "/api/v1/openapi.json"] {
        assert_eq!(get(addr, path, &[]).await.status, 200, "{path}");
    }
    gw.stop().await;

    let open = "[http]\nenabled = true\nlisten = \"0.0.0.0:8080\"\n";
    let err = sensorgate::config::parse(open, Path::new("x.toml"))
        .unwrap_err()
        .to_string();
    assert!(err.contains("set http.token"), "{err}");
}

/// Publishes `scenario` and returns messages per second until every reading is committed.
async fn ingest_rate(port: u16, db: &Path, scenario: &Scenario) -> f64 {
    let pool = read_pool(db).await;
    let before = count(&pool, "SELECT count(*) FROM readings").await;
    let want = before + scenario.total_messages() as i64 * 2;
    let started = Instant::now();
    publish_all(port, scenario).await;
    wait_for("the run stored", Duration::from_secs(120), || async {
        count(&pool, "SELECT count(*) FROM readings").await >= want
    })
    .await;
    scenario.total_messages() as f64 / started.elapsed().as_secs_f64()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_stream_client_skips_batches_and_never_slows_ingest() {
    let broker = EmbeddedBroker::start().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let db = db_path(dir.path());
    let prefix = unique("slow");
    // The second run sends more than the kernel buffers of a stalled connection hold
    // (about 4 MiB), so the client has to fall behind.
    let run = |n: u64, messages: u64| Scenario {
        start_ms: sensorgate::reading::now_millis() - 3_600_000 + n as i64 * 1_000_000,
        ..support::scenario(Format::Json, 20, messages, 0, &prefix)
    };
    // The client stalls for the whole second run: longer than the default send_timeout,
    // which would cut it off (tests/hostile.rs), where here it is to catch up and skip.
    let gw = start(&config(
        broker.port,
        &db,
        "stream_buffer = 4\nsend_timeout = \"1h\"",
        &run(0, 1000),
    ))
    .await;
    let pool = read_pool(&db).await;
    wait_for_devices_in(&pool, "connected", 20).await;
    let alone = ingest_rate(broker.port, &db, &run(0, 1000)).await;

    // A client that subscribes and then reads nothing, through a tiny receive buffer.
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let mut slow = support::http::open(gw.addr, "/api/v1/stream", socket).await;
    let mut head = [0u8; 64];
    let n = slow.read(&mut head).await.unwrap();
    assert!(
        head[..n].starts_with(b"HTTP/1.1 200"),
        "{}",
        String::from_utf8_lossy(&head[..n])
    );
    wait_for("the client counted", Duration::from_secs(5), || async {
        gw.telemetry
            .stream_clients
            .load(std::sync::atomic::Ordering::Relaxed)
            == 1
    })
    .await;
    let with_slow = ingest_rate(broker.port, &db, &run(1, 3000)).await;
    // Reading again, the client learns what it missed.
    let mut seen = Vec::new();
    let mut buf = vec![0u8; 64 * 1024];
    tokio::time::timeout(Duration::from_secs(30), async {
        loop {
            let n = slow.read(&mut buf).await.unwrap();
            assert!(n > 0, "stream ended");
            seen.extend_from_slice(&buf[..n]);
            if seen.windows(14).any(|w| w == b"event: skipped") {
                break;
            }
            let keep = seen.len().saturating_sub(64);
            seen.drain(..keep);
        }
    })
    .await
    .expect("an `event: skipped` after the client fell behind");
    let skipped = gw
        .telemetry
        .stream_skipped
        .load(std::sync::atomic::Ordering::Relaxed);
    let metrics = get(gw.addr, "/metrics", &[]).await.text();
    eprintln!(
        "ingest alone {alone:.0} msg/s, with a stalled stream client {with_slow:.0} msg/s; the client skipped {skipped} batches"
    );
    // A writer that waited for the client would stall outright; allow for machine noise.
    assert!(
        with_slow >= alone * 0.5,
        "{with_slow:.0} vs {alone:.0} msg/s"
    );
    assert!(metrics.contains("sensorgate_stream_clients 1"), "{metrics}");
    drop(slow);
    assert_eq!(
        count(&pool, "SELECT count(*) FROM readings").await,
        2 * 20 * (1000 + 3000),
        "every reading of both runs stored"
    );
    assert!(
        skipped > 0,
        "the stalled client should have skipped batches"
    );
    gw.stop().await;
}

/// Pages far larger than the batches in which rows pass from the reading thread to the
/// formatting one, over several series, come back whole, in order and exact; a page cut
/// mid-batch by `limit` continues exactly where it stopped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_pages_over_several_series_are_exact_and_continue_at_their_cursor() {
    let dir = tempfile::tempdir().unwrap();
    let db = db_path(dir.path());
    let text = format!(
        "[storage]\npath = \"{}\"\n[storage.retention]\nreadings = \"forever\"\nrollups = \"forever\"\n\
         [http]\nenabled = true\nlisten = \"127.0.0.1:0\"\nmax_rows = 100000\n",
        db.display()
    );
    let running = start(&text).await;
    // Readings every second and 1-minute rollups, for two metrics of one device.
    let (start_ms, readings, buckets) = (1_700_000_000_000i64, 2_500i64, 1_500i64);
    {
        let mut conn = rusqlite::Connection::open(&db).unwrap();
        let tx = conn.transaction().unwrap();
        tx.execute(
            "INSERT INTO devices (name, kind, state) VALUES ('big', 'mqtt', 'stopped')",
            [],
        )
        .unwrap();
        let device = tx.last_insert_rowid();
        for metric in ["a", "b"] {
            tx.execute(
                "INSERT INTO series (device_id, metric, unit) VALUES (?1, ?2, 'u')",
                rusqlite::params![device, metric],
            )
            .unwrap();
            let series = tx.last_insert_rowid();
            for i in 0..readings {
                tx.execute(
                    "INSERT INTO readings_archive (series_id, ts, received_at, value, flags) \
                     VALUES (?1, ?2, ?2, ?3, 0)",
                    rusqlite::params![series, start_ms + i * 1000, i as f64 / 7.0],
                )
                .unwrap();
            }
            for i in 0..buckets {
                let bucket = start_ms + i * 60_000;
                tx.execute(
                    "INSERT INTO rollups VALUES (?1, 60000, ?2, 60, ?3, ?3 + 1, ?3 * 60, ?2, ?3, ?2 + 59000, ?3 + 0.5)",
                    rusqlite::params![series, bucket, i as f64 / 3.0],
                )
                .unwrap();
            }
        }
        tx.commit().unwrap();
    }
    let range = format!("from={start_ms}&to={}", start_ms + buckets * 60_000);

    let page = get(
        running.addr,
        &format!("/api/v1/devices/big/readings?{range}&limit=100000"),
        &[],
    )
    .await
    .json();
    let rows = page["rows"].as_array().unwrap();
    assert_eq!(rows.len() as i64, 2 * readings);
    assert!(page["next_cursor"].is_null());
    for (n, row) in rows.iter().enumerate() {
        let (metric, i) = (
            if (n as i64) < readings { "a" } else { "b" },
            n as i64 % readings,
        );
        assert_eq!(row["metric"], metric, "row {n}");
        assert_eq!(row["time"].as_i64(), Some(start_ms + i * 1000), "row {n}");
        assert_eq!(row["value"].as_f64(), Some(i as f64 / 7.0), "row {n}");
    }

    let page = get(
        running.addr,
        &format!("/api/v1/devices/big/rollups?{range}&limit=100000"),
        &[],
    )
    .await
    .json();
    let rows = page["rows"].as_array().unwrap();
    assert_eq!(rows.len() as i64, 2 * buckets);
    for (n, row) in rows.iter().enumerate() {
        let (metric, i) = (
            if (n as i64) < buckets { "a" } else { "b" },
            n as i64 % buckets,
        );
        let v = i as f64 / 3.0;
        assert_eq!(row["metric"], metric, "row {n}");
        assert_eq!(row["time"].as_i64(), Some(start_ms + i * 60_000), "row {n}");
        assert_eq!(row["count"], 60, "row {n}");
        assert_eq!(row["min"].as_f64(), Some(v), "row {n}");
        assert_eq!(row["sum"].as_f64(), Some(v * 60.0), "row {n}");
        assert_eq!(row["mean"].as_f64(), Some(v * 60.0 / 60.0), "row {n}");
        assert_eq!(row["last"].as_f64(), Some(v + 0.5), "row {n}");
    }

    // Cut inside the second series and inside a batch: the next page starts right after.
    let mut times = Vec::new();
    let mut cursor = String::new();
    loop {
        let page = get(
            running.addr,
            &format!("/api/v1/devices/big/readings?{range}&limit=3001{cursor}"),
            &[],
        )
        .await
        .json();
        times.extend(page["rows"].as_array().unwrap().iter().map(|r| {
            (
                r["metric"].as_str().unwrap().to_string(),
                r["time"].as_i64().unwrap(),
            )
        }));
        match page["next_cursor"].as_str() {
            Some(next) => cursor = format!("&cursor={next}"),
            None => break,
        }
    }
    let want: Vec<(String, i64)> = ["a", "b"]
        .iter()
        .flat_map(|m| (0..readings).map(move |i| (m.to_string(), start_ms + i * 1000)))
        .collect();
    assert_eq!(times, want);
    running.stop().await;
}
