//! The invariants of DESIGN.md under faults, each test printing the figures it checks:
//! a crash loop, network faults and a broker restart, a full disk, a corrupt or foreign
//! database, overload under both overflow policies, and a power cut mid-commit.

mod support;

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use sensorgate_sim::{Format, Pace, Scenario, publish};
use support::process::{BIN, Gateway, write_config};
use support::proxy::{Mode, Proxy};
use support::*;
use tokio_util::sync::CancellationToken;

/// A deterministic xorshift sequence for fault schedules; its seed is printed.
struct Schedule(u64);

impl Schedule {
    fn between(&mut self, low: Duration, high: Duration) -> Duration {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        let span = (high - low).as_millis() as u64;
        low + Duration::from_millis(self.0 % span.max(1))
    }
}

fn seed() -> u64 {
    std::env::var("SENSORGATE_FAULT_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| sensorgate::reading::now_millis() as u64 | 1)
}

/// Readings stored against those planned: (missing, unexpected or altered).
fn compare(stored: &BTreeMap<(String, String, i64), f64>, want: &Expected) -> (usize, usize) {
    let missing = want
        .readings
        .iter()
        .filter(|(k, v)| stored.get(*k) != Some(*v))
        .count();
    let extra = stored
        .keys()
        .filter(|k| !want.readings.contains_key(*k))
        .count();
    (missing, extra)
}

async fn integrity(pool: &sqlx::SqlitePool) -> String {
    sqlx::query_scalar("PRAGMA integrity_check")
        .fetch_one(pool)
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_loop_loses_nothing_and_stores_nothing_twice() {
    let mosquitto = Mosquitto::start();
    let dir = tempfile::tempdir().unwrap();
    let db = db_path(dir.path());
    // 25,000 messages of two readings each: 50,000 readings.
    let s = scenario(Format::Json, 25, 1000, 0, &unique("crash"));
    let scenarios = [(&s, "meter")];
    let config = write_config(
        dir.path(),
        &gateway_config(mosquitto.port, &db, &unique("gw"), "", &scenarios),
    );
    let seed = seed();
    println!("crash loop: kill schedule seed {seed} (SENSORGATE_FAULT_SEED={seed} repeats it)");
    let mut schedule = Schedule(seed);
    let mut gateway = Gateway::start(&config);
    gateway.wait_for_log("Subscribed", Duration::from_secs(10));
    let publisher = spawn_publisher(mosquitto.port, &s, Pace::Steady(1500.0));
    let mut kills = 0;
    while !publisher.is_finished() {
        tokio::time::sleep(schedule.between(Duration::from_secs(1), Duration::from_secs(3))).await;
        gateway.child.kill().unwrap();
        #[allow(clippy::disallowed_methods, reason = "reaping a killed child")]
        gateway.child.wait().unwrap();
        kills += 1;
        gateway = Gateway::start(&config);
    }
    publisher.await.unwrap().expect("publisher");
    let want = expected(&scenarios);
    let pool = read_pool(&db).await;
    wait_for(
        "every reading after the last restart",
        Duration::from_secs(60),
        || async {
            count(&pool, "SELECT count(*) FROM readings").await >= want.readings.len() as i64
        },
    )
    .await;
    gateway.sigterm();
    assert!(gateway.wait_exit(Duration::from_secs(15)).success());

    let stored = stored_readings(&pool).await;
    let (missing, extra) = compare(&stored, &want);
    let duplicates = count(&pool, "SELECT coalesce(sum(duplicates), 0) FROM devices").await;
    let mismatches = rollup_mismatches(&pool).await;
    let check = integrity(&pool).await;
    println!(
        "crash loop: {} readings published, {} stored, {missing} lost, {extra} unexpected, {duplicates} redelivered and not stored twice, {kills} SIGKILLs, rollup mismatches {}, integrity {check}",
        want.readings.len(),
        stored.len(),
        mismatches.len()
    );
    assert!(kills >= 4, "only {kills} kills");
    assert_eq!((missing, extra), (0, 0));
    assert!(mismatches.is_empty(), "{mismatches:?}");
    assert_eq!(check, "ok");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn network_faults_and_a_broker_restart_lose_nothing_and_cost_little_cpu() {
    let mut mosquitto = Mosquitto::start();
    let proxy = Proxy::start(([127, 0, 0, 1], mosquitto.port).into()).await;
    let dir = tempfile::tempdir().unwrap();
    let db = db_path(dir.path());
    let s = scenario(Format::Json, 10, 600, 0, &unique("net"));
    let scenarios = [(&s, "pump")];
    let text = gateway_config(proxy.port, &db, &unique("gw"), "", &scenarios).replace(
        "client_id",
        "keep_alive = \"2s\"\nreconnect_max = \"2s\"\nclient_id",
    );
    let config = write_config(dir.path(), &text);
    let mut gateway = Gateway::start(&config);
    gateway.wait_for_log("Subscribed", Duration::from_secs(10));
    let half = s.total_messages() as usize / 2;
    let first: Vec<_> = s.messages().take(half).collect();
    let rest: Vec<_> = s.messages().skip(half).collect();
    let port = mosquitto.port;
    let publisher = tokio::spawn(async move {
        publish(
            "127.0.0.1",
            port,
            &unique("pub"),
            first.into_iter(),
            Pace::Steady(400.0),
            1,
            CancellationToken::new(),
        )
        .await
    });

    // Stall past the keep-alive: the gateway notices and reconnects.
    tokio::time::sleep(Duration::from_secs(1)).await;
    proxy.set(Mode::Stall);
    tokio::time::sleep(Duration::from_secs(4)).await;
    proxy.set(Mode::Pass);
    // Cut every connection.
    tokio::time::sleep(Duration::from_secs(1)).await;
    proxy.cut();
    // A slow link.
    tokio::time::sleep(Duration::from_secs(1)).await;
    proxy.set(Mode::Slow(Duration::from_millis(20)));
    tokio::time::sleep(Duration::from_secs(2)).await;
    // A black hole: connections are accepted and never answered.
    proxy.set(Mode::BlackHole);
    proxy.cut();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let cpu_before = gateway.cpu();
    tokio::time::sleep(Duration::from_secs(4)).await;
    let black_hole_cpu = gateway.cpu() - cpu_before;
    proxy.set(Mode::Pass);
    proxy.cut();
    publisher.await.unwrap().expect("first half published");

    // The broker crashes with a backlog for the gateway (slowed by the proxy) and comes
    // back from its persistence file.
    proxy.set(Mode::Slow(Duration::from_millis(50)));
    tokio::time::sleep(Duration::from_millis(1500)).await;
    mosquitto.kill();
    let cpu_before = gateway.cpu();
    tokio::time::sleep(Duration::from_secs(3)).await;
    let broker_away_cpu = gateway.cpu() - cpu_before;
    mosquitto.restart();
    proxy.set(Mode::Pass);
    publish(
        "127.0.0.1",
        mosquitto.port,
        &unique("pub"),
        rest.into_iter(),
        Pace::Steady(1000.0),
        1,
        CancellationToken::new(),
    )
    .await
    .expect("second half published");

    let want = expected(&scenarios);
    let pool = read_pool(&db).await;
    wait_for("every reading", Duration::from_secs(60), || async {
        count(&pool, "SELECT count(*) FROM readings").await >= want.readings.len() as i64
    })
    .await;
    gateway.sigterm();
    assert!(gateway.wait_exit(Duration::from_secs(15)).success());
    let stored = stored_readings(&pool).await;
    let (missing, extra) = compare(&stored, &want);
    let reconnects = gateway
        .lines
        .try_iter()
        .filter(|l| l.contains("Broker connected"))
        .count();
    println!(
        "network faults: {} readings published, {} stored, {missing} lost, {extra} unexpected; {reconnects} reconnects after the first; CPU {black_hole_cpu:?} during 4 s of black hole, {broker_away_cpu:?} during 3 s without a broker",
        want.readings.len(),
        stored.len()
    );
    assert_eq!((missing, extra), (0, 0));
    assert!(rollup_mismatches(&pool).await.is_empty());
    assert!(
        reconnects >= 3,
        "stall, cut and black hole each forced a reconnect"
    );
    assert!(
        black_hole_cpu < Duration::from_millis(400),
        "{black_hole_cpu:?}"
    );
    assert!(
        broker_away_cpu < Duration::from_millis(300),
        "{broker_away_cpu:?}"
    );
}

/// A tmpfs of `mib` MiB at `dir`, unmounted on drop.
struct SmallDisk {
    dir: std::path::PathBuf,
}

impl SmallDisk {
    fn mount(dir: &Path, mib: u32) -> Self {
        std::fs::create_dir_all(dir).unwrap();
        let status = Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={mib}m"),
                "sensorgate-test",
            ])
            .arg(dir)
            .status()
            .expect("mount runs");
        assert!(
            status.success(),
            "mounting a tmpfs needs root (CI runs as root)"
        );
        Self {
            dir: dir.to_path_buf(),
        }
    }

    fn resize(&self, mib: u32) {
        let status = Command::new("mount")
            .args(["-o", &format!("remount,size={mib}m")])
            .arg(&self.dir)
            .status()
            .unwrap();
        assert!(status.success());
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.dir).status();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_holds_acknowledgements_keeps_answering_and_resumes_without_loss() {
    let mosquitto = Mosquitto::start();
    let dir = tempfile::tempdir().unwrap();
    let disk = SmallDisk::mount(&dir.path().join("disk"), 2);
    let db = disk.dir.join("gateway.db");
    let s = scenario(Format::Json, 20, 1500, 0, &unique("full"));
    let scenarios = [(&s, "tank")];
    let text = gateway_config(mosquitto.port, &db, &unique("gw"), "", &scenarios)
        .replace("[storage]\n", "[storage]\ncache_mib = 1\n");
    let config = write_config(dir.path(), &text);
    let mut gateway = Gateway::start(&config);
    gateway.wait_for_log("Subscribed", Duration::from_secs(10));
    spawn_publisher(mosquitto.port, &s, Pace::Unlimited)
        .await
        .unwrap()
        .unwrap();
    let error = gateway.wait_for_log("ERROR", Duration::from_secs(30));
    assert!(error.contains("disk is full"), "{error}");
    let pool = read_pool(&db).await;
    let stored_while_full = count(&pool, "SELECT count(*) FROM readings").await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    // Queries still work while ingest waits.
    let devices = Command::new(BIN)
        .args(["devices", "--format", "csv", "--db"])
        .arg(&db)
        .output()
        .unwrap();
    assert!(
        devices.status.success(),
        "{}",
        String::from_utf8_lossy(&devices.stderr)
    );
    assert_eq!(
        count(&pool, "SELECT count(*) FROM readings").await,
        stored_while_full,
        "nothing commits while full"
    );
    let errors: Vec<String> = gateway
        .lines
        .try_iter()
        .filter(|l| l.contains("ERROR"))
        .collect();

    disk.resize(64);
    let want = expected(&scenarios);
    wait_for(
        "every reading once there is room",
        Duration::from_secs(60),
        || async {
            count(&pool, "SELECT count(*) FROM readings").await >= want.readings.len() as i64
        },
    )
    .await;
    gateway.sigterm();
    assert!(gateway.wait_exit(Duration::from_secs(15)).success());
    let stored = stored_readings(&pool).await;
    let (missing, extra) = compare(&stored, &want);
    let check = integrity(&pool).await;
    println!(
        "full disk: {} readings published, {stored_while_full} stored when the 2 MiB disk filled, {} after it grew, {missing} lost, {extra} unexpected, {} further ERROR lines while full, integrity {check}",
        want.readings.len(),
        stored.len(),
        errors.len()
    );
    assert_eq!((missing, extra), (0, 0));
    assert!(
        errors.is_empty(),
        "one ERROR for a full disk, not one per retry: {errors:?}"
    );
    assert_eq!(check, "ok");
}

#[test]
fn a_corrupt_or_foreign_database_is_refused_and_left_untouched() {
    let dir = tempfile::tempdir().unwrap();
    let garbage = dir.path().join("garbage.db");
    std::fs::write(
        &garbage,
        b"this is no database, just bytes an operator cares about\n".repeat(200),
    )
    .unwrap();
    let foreign = dir.path().join("foreign.db");
    {
        let conn = rusqlite::Connection::open(&foreign).unwrap();
        conn.execute_batch("CREATE TABLE invoices (id INTEGER PRIMARY KEY, total REAL); INSERT INTO invoices VALUES (1, 9.5);").unwrap();
    }
    for (db, expect) in [
        (&garbage, "is not a SQLite database"),
        (
            &foreign,
            "a SQLite database of something else (tables invoices)",
        ),
    ] {
        let before = std::fs::read(db).unwrap();
        let config = write_config(
            dir.path(),
            &format!("[storage]\npath = \"{}\"\n", db.display()),
        );
        let run = Command::new(BIN)
            .args(["run", "--config"])
            .arg(&config)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&run.stderr);
        println!(
            "{}: exit {:?}: {}",
            db.display(),
            run.status.code(),
            stderr.trim()
        );
        assert!(!run.status.success());
        assert!(stderr.contains(expect), "{stderr}");
        assert_eq!(
            std::fs::read(db).unwrap(),
            before,
            "{} was modified",
            db.display()
        );
        assert!(!db.with_extension("db-wal").exists());
    }
}

/// Peak memory under overload against a bound from the configured capacities.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overload_with_block_loses_nothing_and_memory_stays_within_the_capacities() {
    let mosquitto = Mosquitto::start();
    let dir = tempfile::tempdir().unwrap();
    let db = db_path(dir.path());
    let devices = 20;
    let prefix = unique("flood");
    let (capacity, queue, unacked, batch) = (512, 64, 500, 2000);
    let probe = scenario(Format::Json, devices, 250, 0, &prefix);
    let text = gateway_config(mosquitto.port, &db, &unique("gw"), "", &[(&probe, "flood")])
        .replace(
            "[storage]\n",
            &format!("[storage]\nbatch_size = {batch}\ncache_mib = 4\n"),
        )
        .replace("client_id", &format!("max_unacked = {unacked}\nclient_id"))
        + &format!("[pipeline]\nchannel_capacity = {capacity}\ndevice_queue = {queue}\n");
    let config = write_config(dir.path(), &text);
    let mut gateway = Gateway::start(&config);
    gateway.wait_for_log("Subscribed", Duration::from_secs(10));
    let pool = read_pool(&db).await;

    // What this machine sustains: 5,000 messages as fast as the broker takes them.
    let started = Instant::now();
    spawn_publisher(mosquitto.port, &probe, Pace::Unlimited)
        .await
        .unwrap()
        .unwrap();
    wait_for("the probe", Duration::from_secs(60), || async {
        count(&pool, "SELECT count(*) FROM readings").await >= 2 * probe.total_messages() as i64
    })
    .await;
    let sustainable = probe.total_messages() as f64 / started.elapsed().as_secs_f64();
    let idle_kib = gateway.peak_rss_kib();

    // Twice that for 30 s.
    let per_device = (sustainable * 2.0 * 30.0 / devices as f64) as u64;
    // Timestamps 10 ms apart, after the probe's: however fast this machine, they stay in
    // the past.
    let flood = Scenario {
        start_ms: probe.start_ms + 600_000,
        period_ms: 10,
        ..scenario(Format::Json, devices, per_device, 0, &prefix)
    };
    let started = Instant::now();
    spawn_publisher(mosquitto.port, &flood, Pace::Steady(sustainable * 2.0))
        .await
        .unwrap()
        .unwrap();
    let publishing = started.elapsed();
    let want = expected(&[(&probe, "flood"), (&flood, "flood")]);
    wait_for("the backlog", Duration::from_secs(180), || async {
        count(&pool, "SELECT count(*) FROM readings").await >= want.readings.len() as i64
    })
    .await;
    let peak_kib = gateway.peak_rss_kib();
    gateway.sigterm();
    assert!(gateway.wait_exit(Duration::from_secs(15)).success());
    // What the capacities let the gateway hold at most: messages in the channels, inboxes
    // and the unacknowledged window (each under 1 KiB with its decoded readings), three
    // batches of readings (under 256 bytes each with their keys and rollup cells), and the
    // SQLite page cache.
    let messages = 2 * capacity + queue * devices + unacked;
    let bound_kib = idle_kib + (messages as u64 * 1024 + 3 * batch as u64 * 256) / 1024 + 4 * 1024;
    let stored = stored_readings(&pool).await;
    let (missing, extra) = compare(&stored, &want);
    println!(
        "overload (block): sustainable {sustainable:.0} msg/s, then {} messages at {:.0} msg/s for {publishing:?}; {} readings stored, {missing} lost, {extra} unexpected; peak RSS {peak_kib} KiB (idle {idle_kib} KiB), bound from capacities {bound_kib} KiB",
        flood.total_messages(),
        sustainable * 2.0,
        stored.len()
    );
    assert_eq!((missing, extra), (0, 0));
    assert!(
        peak_kib <= bound_kib,
        "peak {peak_kib} KiB over the bound {bound_kib} KiB"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overload_with_drop_newest_counts_exactly_what_it_dropped() {
    let mosquitto = Mosquitto::start();
    let dir = tempfile::tempdir().unwrap();
    let db = db_path(dir.path());
    let s = scenario(Format::Json, 20, 1500, 0, &unique("drop"));
    let scenarios = [(&s, "spill")];
    let text = format!(
        "[http]\nenabled = true\nlisten = \"127.0.0.1:{}\"\n",
        free_port()
    ) + &gateway_config(mosquitto.port, &db, &unique("gw"), "", &scenarios)
        + "[pipeline]\nchannel_capacity = 16\ndevice_queue = 4\noverflow = \"drop_newest\"\n";
    let http_port: u16 = text
        .split("127.0.0.1:")
        .nth(1)
        .unwrap()
        .split('"')
        .next()
        .unwrap()
        .parse()
        .unwrap();
    let config = write_config(dir.path(), &text);
    let mut gateway = Gateway::start(&config);
    gateway.wait_for_log("Subscribed", Duration::from_secs(10));
    spawn_publisher(mosquitto.port, &s, Pace::Unlimited)
        .await
        .unwrap()
        .unwrap();
    let pool = read_pool(&db).await;
    let published = s.total_messages() as i64;
    // Stored messages (two readings each) plus dropped ones account for every message.
    wait_for(
        "every message stored or counted as dropped",
        Duration::from_secs(60),
        || async {
            let readings = count(&pool, "SELECT count(*) FROM readings").await;
            let dropped = count(&pool, "SELECT coalesce(sum(dropped), 0) FROM devices").await;
            readings / 2 + dropped == published
        },
    )
    .await;
    let metrics = support::http::get(([127, 0, 0, 1], http_port).into(), "/metrics", &[])
        .await
        .text();
    let dropped_metric: f64 = metrics
        .lines()
        .filter(|l| l.starts_with("sensorgate_dropped_total{"))
        .map(|l| l.rsplit(' ').next().unwrap().parse::<f64>().unwrap())
        .sum();
    gateway.sigterm();
    assert!(gateway.wait_exit(Duration::from_secs(15)).success());
    let stored_messages = count(&pool, "SELECT count(*) FROM readings").await / 2;
    let missing = published - stored_messages;
    println!(
        "overload (drop_newest): {published} messages published, {stored_messages} stored, {missing} missing, {dropped_metric} counted as dropped in /metrics"
    );
    assert!(
        missing > 0,
        "the pipeline never overflowed; make the flood bigger"
    );
    assert_eq!(dropped_metric as i64, missing);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_power_cut_mid_commit_leaves_a_consistent_prefix_of_commits() {
    let mosquitto = Mosquitto::start();
    let dir = tempfile::tempdir().unwrap();
    let db = db_path(dir.path());
    // One device, one message at a time: stored messages must be a prefix of the publish
    // order. Under 32 MiB of WAL, so no checkpoint rewrites the database file meanwhile and a
    // copy of the two files is what a disk would hold at one instant.
    let s = scenario(Format::Json, 1, 20_000, 0, &unique("power"));
    let scenarios = [(&s, "cell")];
    // Few commits a second keep the WAL small.
    let text = gateway_config(mosquitto.port, &db, &unique("gw"), "", &scenarios)
        .replace("[storage]\n", "[storage]\nflush_interval = \"200ms\"\n");
    let config = write_config(dir.path(), &text);
    let mut gateway = Gateway::start(&config);
    gateway.wait_for_log("Subscribed", Duration::from_secs(10));
    let publisher = spawn_publisher(mosquitto.port, &s, Pace::Steady(2000.0));
    let seed = seed();
    println!("power cut: copy schedule seed {seed}");
    let mut schedule = Schedule(seed);
    let wal = db.with_extension("db-wal");
    let mut cuts = Vec::new();
    while !publisher.is_finished() {
        tokio::time::sleep(
            schedule.between(Duration::from_millis(300), Duration::from_millis(1500)),
        )
        .await;
        let copy = dir.path().join(format!("cut-{}.db", cuts.len()));
        // The database file first, then the WAL as it is being appended to: its tail may be
        // a torn frame, as after a power cut.
        std::fs::copy(&db, &copy).unwrap();
        std::fs::copy(&wal, copy.with_extension("db-wal")).unwrap();
        cuts.push(copy);
    }
    publisher.await.unwrap().unwrap();
    gateway.sigterm();
    assert!(gateway.wait_exit(Duration::from_secs(15)).success());

    let order: Vec<i64> = s
        .messages()
        .map(|m| m.expect.readings[0].1.unwrap())
        .collect();
    for copy in &cuts {
        // Opening it read-write lets SQLite recover the WAL as it would after a reboot.
        let pool = sqlx::SqlitePool::connect(&format!("sqlite://{}", copy.display()))
            .await
            .unwrap();
        let check = integrity(&pool).await;
        let times: Vec<i64> = sqlx::query_scalar(
            "SELECT r.ts FROM readings r JOIN series s ON s.id = r.series_id WHERE s.metric = 'temperature' ORDER BY r.ts",
        )
        .fetch_all(&pool)
        .await
        .unwrap();
        let humidity = count(&pool, "SELECT count(*) FROM readings r JOIN series s ON s.id = r.series_id WHERE s.metric = 'humidity'").await;
        let mismatches = rollup_mismatches(&pool).await;
        println!(
            "power cut: copy {} holds the first {} of {} messages, integrity {check}, rollup mismatches {}",
            copy.file_name().unwrap().to_string_lossy(),
            times.len(),
            order.len(),
            mismatches.len()
        );
        assert_eq!(check, "ok");
        assert_eq!(
            times,
            order[..times.len()],
            "not a prefix of the publish order"
        );
        assert_eq!(
            humidity,
            times.len() as i64,
            "a message split across commits"
        );
        assert!(mismatches.is_empty(), "{mismatches:?}");
        pool.close().await;
    }
    assert!(cuts.len() >= 3, "only {} cuts", cuts.len());
}
