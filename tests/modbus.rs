//! Modbus RTU end to end: simulated energy meters on one pseudo-terminal bus, the gateway
//! polling them through tokio-modbus, and every stored value checked against what the
//! meters served.

mod support;

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use sensorgate::app::{AppError, Gateway};
use sensorgate_sim::modbus::{MeterConfig, ModbusBus, SlaveFault, WordOrder};
use sensorgate_sim::pty::Pty;
use sqlx::Row as _;
use sqlx::sqlite::SqlitePool;
use support::*;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

const POLL_MS: u64 = 200;
const TIMEOUT_MS: u64 = 100;

/// The meter's whole map: six registers, a coil and a discrete input.
fn meter_device(slave: u8, little_endian_words: bool) -> String {
    let order = if little_endian_words { "little" } else { "big" };
    let mut out = format!(
        "[[devices]]\nkind = \"modbus\"\nid = \"meter-{slave}\"\nport = \"bus\"\nslave = {slave}\n\
         poll_interval = \"{POLL_MS}ms\"\n"
    );
    for (name, address, data_type, scale, unit) in [
        ("voltage", 0, "f32", 1.0, "V"),
        ("current", 2, "f32", 1.0, "A"),
        ("active_power", 4, "f32", 1.0, "W"),
        ("energy", 6, "u32", 1.0, "Wh"),
        ("frequency", 8, "u16", 0.01, "Hz"),
        ("temperature", 9, "i16", 0.1, "°C"),
    ] {
        out.push_str(&format!(
            "[[devices.registers]]\nname = \"{name}\"\ntable = \"input\"\naddress = {address}\n\
             type = \"{data_type}\"\nword_order = \"{order}\"\nscale = {scale}\nunit = \"{unit}\"\n"
        ));
    }
    out.push_str(
        "[[devices.registers]]\nname = \"relay\"\ntable = \"coil\"\naddress = 0\n\
         [[devices.registers]]\nname = \"alarm\"\ntable = \"discrete\"\naddress = 0\n\n",
    );
    out
}

async fn start(
    db: &Path,
    bus_path: &Path,
    meters: &str,
) -> (CancellationToken, JoinHandle<Result<(), AppError>>) {
    init_logging();
    let text = format!(
        "[storage]\npath = \"{}\"\n\n[[serial_ports]]\nid = \"bus\"\npath = \"{}\"\nbaud = 19200\n\
         parity = \"even\"\ntimeout = \"{TIMEOUT_MS}ms\"\nreconnect_max = \"1s\"\n\n{meters}",
        db.display(),
        bus_path.display()
    );
    let config = sensorgate::config::parse(&text, Path::new("test.toml")).expect("test config");
    let gateway = Gateway::build(config).await.expect("gateway builds");
    let shutdown = CancellationToken::new();
    let handle = tokio::spawn(gateway.run_until_stopped(shutdown.clone()));
    (shutdown, handle)
}

/// Per (slave, metric): the values in the order they were served, or stored.
type Series = BTreeMap<(u8, String), Vec<f64>>;

fn served_series(bus: &ModbusBus) -> Series {
    let mut out = Series::new();
    for served in bus.served() {
        out.entry((served.slave, served.name.to_string()))
            .or_default()
            .push(served.value);
    }
    out
}

async fn stored_series(pool: &SqlitePool) -> Series {
    let rows = sqlx::query(
        "SELECT d.name, s.metric, r.value FROM readings r JOIN series s ON s.id = r.series_id \
         JOIN devices d ON d.id = s.device_id ORDER BY d.name, s.metric, r.ts",
    )
    .fetch_all(pool)
    .await
    .unwrap();
    let mut out = Series::new();
    for row in rows {
        let device: String = row.get(0);
        let slave: u8 = device.trim_start_matches("meter-").parse().unwrap();
        out.entry((slave, row.get(1))).or_default().push(row.get(2));
    }
    out
}

async fn device(pool: &SqlitePool, id: &str) -> (String, Option<String>, i64, i64, i64) {
    sqlx::query_as(
        "SELECT state, last_error, timeouts, crc_errors, exceptions FROM devices WHERE name = ?1",
    )
    .bind(id)
    .fetch_one(pool)
    .await
    .unwrap()
}

async fn wait_for_state(pool: &SqlitePool, id: &str, state: &str) {
    wait_for(
        &format!("{id} {state}"),
        Duration::from_secs(15),
        || async { device(pool, id).await.0 == state },
    )
    .await;
}

async fn wait_for_polls(pool: &SqlitePool, id: &str, polls: i64) {
    wait_for(
        &format!("{polls} polls of {id}"),
        Duration::from_secs(20),
        || async {
            sqlx::query_scalar::<_, i64>(
                "SELECT count(*) FROM readings r JOIN series s ON s.id = r.series_id \
             JOIN devices d ON d.id = s.device_id WHERE d.name = ?1 AND s.metric = 'voltage'",
            )
            .bind(id)
            .fetch_one(pool)
            .await
            .unwrap()
                >= polls
        },
    )
    .await;
}

/// Stops the gateway (which finishes its polls and commits them), then the bus.
async fn stop(
    shutdown: CancellationToken,
    gateway: JoinHandle<Result<(), AppError>>,
    bus: &ModbusBus,
) -> Series {
    shutdown.cancel();
    gateway.await.unwrap().unwrap();
    served_series(bus)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_meters_on_one_bus_are_stored_exactly_in_both_word_orders() {
    let _beside_others = LOG_CAPTURE.read().await;
    let dir = tempfile::tempdir().unwrap();
    let db = db_path(dir.path());
    let path = dir.path().join("tty-bus");
    let bus = ModbusBus::start(
        Pty::open(&path).unwrap(),
        &[
            MeterConfig::new(1),
            MeterConfig {
                word_order: WordOrder::Cdab,
                ..MeterConfig::new(2)
            },
        ],
        CancellationToken::new(),
    )
    .unwrap();
    let meters = meter_device(1, false) + &meter_device(2, true);
    let (shutdown, gateway) = start(&db, &path, &meters).await;
    let pool = read_pool(&db).await;
    wait_for_polls(&pool, "meter-1", 10).await;
    wait_for_polls(&pool, "meter-2", 10).await;
    assert_eq!(
        device(&pool, "meter-1").await,
        ("connected".into(), None, 0, 0, 0)
    );

    let served = stop(shutdown, gateway, &bus).await;
    let stored = stored_series(&pool).await;
    assert_eq!(served.len(), 16, "eight values of two meters");
    assert_eq!(stored, served);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_slave_delays_the_others_by_at_most_one_timeout() {
    let _beside_others = LOG_CAPTURE.read().await;
    let dir = tempfile::tempdir().unwrap();
    let db = db_path(dir.path());
    let path = dir.path().join("tty-bus");
    let bus = ModbusBus::start(
        Pty::open(&path).unwrap(),
        &[
            MeterConfig::new(1),
            MeterConfig {
                fault: Some(SlaveFault::Dead),
                ..MeterConfig::new(2)
            },
        ],
        CancellationToken::new(),
    )
    .unwrap();
    let meters = meter_device(1, false) + &meter_device(2, false);
    let (shutdown, gateway) = start(&db, &path, &meters).await;
    let pool = read_pool(&db).await;
    wait_for_state(&pool, "meter-2", "failing").await;
    wait_for_polls(&pool, "meter-1", 20).await;

    let times: Vec<i64> = sqlx::query_scalar(
        "SELECT r.received_at FROM readings r JOIN series s ON s.id = r.series_id \
         JOIN devices d ON d.id = s.device_id WHERE d.name = 'meter-1' AND s.metric = 'voltage' \
         ORDER BY r.ts",
    )
    .fetch_all(&pool)
    .await
    .unwrap();
    let gaps: Vec<i64> = times.windows(2).map(|w| w[1] - w[0]).collect();
    let worst = *gaps.iter().max().unwrap();
    eprintln!("meter-1 poll gaps with a dead neighbour: worst {worst} ms of {gaps:?}");
    // The interval plus one timeout, and a little for a loaded machine.
    assert!(worst <= (POLL_MS + TIMEOUT_MS + 60) as i64, "{gaps:?}");

    // What `sensorgate devices` prints.
    let store = sensorgate::storage::ReadStore::open(&db).unwrap();
    let table = sensorgate::query::render(
        &store.devices().await.unwrap(),
        sensorgate::query::Format::Table,
    );
    let line = table.lines().find(|l| l.starts_with("meter-2")).unwrap();
    assert!(
        line.contains("modbus")
            && line.contains("failing")
            && line.contains("timeouts")
            && line.ends_with("slave 2: no answer within 100ms"),
        "{table}"
    );

    let (state, error, timeouts, _, _) = device(&pool, "meter-2").await;
    assert_eq!(state, "failing");
    assert_eq!(error.as_deref(), Some("slave 2: no answer within 100ms"));
    assert!(timeouts >= 3, "{timeouts}");
    // The circuit breaker: after three silent polls the dead slave is probed ever more
    // rarely, not every 200 ms.
    let elapsed_polls = (times.last().unwrap() - times[0]) / POLL_MS as i64;
    let probes = bus.report().dead;
    eprintln!("dead slave probed {probes} times in {elapsed_polls} poll intervals");
    assert!(
        elapsed_polls >= 18 && probes <= 8,
        "{probes} probes in {elapsed_polls} intervals"
    );
    assert_eq!(
        device(&pool, "meter-1").await.2,
        0,
        "meter-1 had no timeouts"
    );

    let served = stop(shutdown, gateway, &bus).await;
    assert_eq!(stored_series(&pool).await, served);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbled_answers_and_exceptions_are_counted_and_the_slave_recovers() {
    let _beside_others = LOG_CAPTURE.read().await;
    let dir = tempfile::tempdir().unwrap();
    let db = db_path(dir.path());
    let path = dir.path().join("tty-bus");
    let bus = ModbusBus::start(
        Pty::open(&path).unwrap(),
        &[MeterConfig::new(1), MeterConfig::new(2)],
        CancellationToken::new(),
    )
    .unwrap();
    let meters = meter_device(1, false) + &meter_device(2, false);
    let (shutdown, gateway) = start(&db, &path, &meters).await;
    let pool = read_pool(&db).await;
    wait_for_polls(&pool, "meter-2", 3).await;

    let counters = async |pool: &SqlitePool| {
        let (_, _, timeouts, crc_errors, exceptions) = device(pool, "meter-2").await;
        [timeouts, crc_errors, exceptions]
    };
    for (fault, counter) in [
        (SlaveFault::BadCrc, 1),
        (SlaveFault::Garbled, 1),
        (SlaveFault::Exception(0x04), 2),
    ] {
        let before = counters(&pool).await;
        bus.set_fault(2, Some(fault));
        wait_for_state(&pool, "meter-2", "failing").await;
        wait_for(
            &format!("{fault:?} counted"),
            Duration::from_secs(10),
            || async { counters(&pool).await[counter] >= before[counter] + 2 },
        )
        .await;
        let polls = count(&pool, "SELECT count(*) FROM readings").await;
        bus.set_fault(2, None);
        wait_for_state(&pool, "meter-2", "connected").await;
        wait_for(
            &format!("readings after {fault:?}"),
            Duration::from_secs(10),
            || async { count(&pool, "SELECT count(*) FROM readings").await > polls },
        )
        .await;
    }
    let [timeouts, crc_errors, exceptions] = counters(&pool).await;
    eprintln!(
        "meter-2: {timeouts} timeouts, {crc_errors} garbled answers, {exceptions} exceptions"
    );
    assert!(
        crc_errors >= 4 && exceptions >= 2,
        "{crc_errors} {exceptions}"
    );
    let (_, _, t, c, e) = device(&pool, "meter-1").await;
    assert_eq!((t, c, e), (0, 0, 0), "the healthy meter saw no faults");

    let served = stop(shutdown, gateway, &bus).await;
    assert_eq!(stored_series(&pool).await, served);
}

/// What the log says of a slave that garbles its answers and then recovers: one line each
/// way, naming device and slave, and none of tokio-modbus' own (about 14 per garbled answer
/// before, naming no device). On this thread only, so other tests' logs stay out.
#[tokio::test(flavor = "current_thread")]
async fn a_slave_that_stops_answering_and_comes_back_is_logged_once_each_way() {
    let _alone = LOG_CAPTURE.write().await;
    // tokio-modbus logs through the `log` crate.
    let _ = tracing_log::LogTracer::init();
    let captured = Captured::default();
    let subscriber = tracing_subscriber::fmt()
        .with_env_filter(sensorgate::service::logging::filter("info"))
        .with_writer(captured.clone())
        .with_ansi(false)
        .finish();
    let _guard = tracing::subscriber::set_default(subscriber);

    let dir = tempfile::tempdir().unwrap();
    let db = db_path(dir.path());
    let path = dir.path().join("tty-bus");
    let bus = ModbusBus::start(
        Pty::open(&path).unwrap(),
        &[MeterConfig::new(1), MeterConfig::new(2)],
        CancellationToken::new(),
    )
    .unwrap();
    let meters = meter_device(1, false) + &meter_device(2, false);
    let (shutdown, gateway) = start(&db, &path, &meters).await;
    let pool = read_pool(&db).await;
    wait_for_polls(&pool, "meter-2", 3).await;
    bus.set_fault(2, Some(SlaveFault::Garbled));
    wait_for_state(&pool, "meter-2", "failing").await;
    wait_for(
        "garbled answers counted",
        Duration::from_secs(10),
        || async { device(&pool, "meter-2").await.3 >= 3 },
    )
    .await;
    bus.set_fault(2, None);
    wait_for_state(&pool, "meter-2", "connected").await;
    stop(shutdown, gateway, &bus).await;

    let log = captured.text();
    let lines = |what: &str| -> Vec<&str> { log.lines().filter(|l| l.contains(what)).collect() };
    let down = lines("Modbus slave not answering");
    let up = lines("Modbus slave answering again");
    assert_eq!((down.len(), up.len()), (1, 1), "{log}");
    for line in down.iter().chain(&up) {
        assert!(
            line.contains("device=meter-2") && line.contains("slave=2"),
            "{line}"
        );
    }
    assert!(
        lines("tokio_modbus").is_empty(),
        "tokio-modbus' own lines: {:?}",
        lines("tokio_modbus")
    );
}

/// Taken alone by the test that captures this thread's log, shared by the others: tracing
/// works out which subscribers want an event site across threads, and a test on another
/// thread reaching the same site at that moment left the capturing subscriber out (seen
/// here: the slave's first warning went missing whenever the other tests ran beside it).
static LOG_CAPTURE: tokio::sync::RwLock<()> = tokio::sync::RwLock::const_new(());

/// Log output gathered in memory.
#[derive(Clone, Default)]
struct Captured(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

impl Captured {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }
}

impl std::io::Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for Captured {
    type Writer = Captured;
    fn make_writer(&'a self) -> Captured {
        self.clone()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unplugged_bus_is_reopened_and_polling_resumes() {
    let _beside_others = LOG_CAPTURE.read().await;
    let dir = tempfile::tempdir().unwrap();
    let db = db_path(dir.path());
    let path = dir.path().join("tty-bus");
    let bus = ModbusBus::start(
        Pty::open(&path).unwrap(),
        &[MeterConfig::new(1), MeterConfig::new(7)],
        CancellationToken::new(),
    )
    .unwrap();
    let meters = meter_device(1, false) + &meter_device(7, false);
    let (shutdown, gateway) = start(&db, &path, &meters).await;
    let pool = read_pool(&db).await;
    wait_for_polls(&pool, "meter-7", 3).await;

    bus.unplug().await.unwrap();
    wait_for_state(&pool, "meter-1", "failing").await;
    wait_for_state(&pool, "meter-7", "failing").await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    bus.replug().await.unwrap();
    wait_for_state(&pool, "meter-1", "connected").await;
    wait_for_state(&pool, "meter-7", "connected").await;
    let before = count(&pool, "SELECT count(*) FROM readings").await;
    wait_for(
        "polls after the replug",
        Duration::from_secs(10),
        || async { count(&pool, "SELECT count(*) FROM readings").await >= before + 16 },
    )
    .await;

    let served = stop(shutdown, gateway, &bus).await;
    assert_eq!(stored_series(&pool).await, served);
}
