//! End-to-end ingest benchmark: `cargo bench --bench ingest`.
//!
//! Against one private Mosquitto, for QoS 0 and QoS 1, alternating 5 times (`BENCH_REPS`):
//! - the broker's ceiling: a subscriber that only counts, fed by the same publisher;
//! - the gateway: the `sensorgate run` binary as its own process, as systemd runs it, with
//!   the default config but for the devices; every message decoded, validated and committed
//!   to SQLite (synchronous=FULL, WAL) with rollups, and at QoS 1 acknowledged after commit.
//!
//! Rates run from the first publish to the last delivery (ceiling) or the last commit
//! (gateway); the table shows medians, the median of each run's ratio to the ceiling
//! measured just before it (and their range), the broker's CPU per message in the
//! ceiling runs, and the gateway process's CPU per message and peak resident memory (the
//! kernel's high-water mark, read once at the end, not sampled during the run). While
//! a flood is being published the harness reads nothing from the gateway's database, so
//! it takes no CPU from the gateway. Then the budgets at a steady pace, QoS 1, 10 s: at
//! 5,000 msg/s from 100 devices the gateway's share of one core and its peak RSS, the same
//! from 1,000 devices, and at 10,000 msg/s from 100 devices the latency from publish to
//! commit.
//!
//! `BENCH_MESSAGES` sets the messages per run (default 1,000,000: at QoS 0 a run lasts
//! about 3 s, so start-up and the last commit weigh little), `BENCH_REPS` the repetitions,
//! `BENCH_QOS` runs one level's floods (`0`, `1`) or only the steady loads (`steady`),
//! and `BENCH_BASELINE=path/to/another/sensorgate` runs that binary beside this build in
//! every repetition, against the same ceiling, and each steady load after this build's, to
//! compare two builds side by side.

#[path = "support/proc_stat.rs"]
mod proc_stat;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use sensorgate_sim::{Flood, Format, Mosquitto, Pace, Planned, Scenario, flood, publish};
use sqlx::SqlitePool;
use sqlx::sqlite::{SqliteConnectOptions, SqlitePoolOptions};
use tokio_util::sync::CancellationToken;

const DEVICES: usize = 100;
const BIN: &str = env!("CARGO_BIN_EXE_sensorgate");

fn main() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(run());
}

async fn run() {
    let messages: u64 = std::env::var("BENCH_MESSAGES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1_000_000);
    // A QoS level runs only that level's floods; `steady` only the steady loads.
    let only = std::env::var("BENCH_QOS").ok();
    let floods: Vec<u8> = match only.as_deref() {
        None => vec![0, 1],
        Some("steady") => vec![],
        Some(level) => level.parse().ok().into_iter().collect(),
    };
    let steady = only.as_deref().is_none_or(|o| o == "steady");
    let reps: usize = std::env::var("BENCH_REPS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(5);
    let baseline = std::env::var_os("BENCH_BASELINE").map(PathBuf::from);
    let mut builds = vec![("this build", PathBuf::from(BIN))];
    builds.extend(baseline.map(|bin| ("baseline", bin)));
    let mosquitto = Mosquitto::start();
    println!(
        "ingest benchmark: {messages} JSON messages (2 readings each) per run from {DEVICES} devices, \
         median of {reps}, Mosquitto on 127.0.0.1:{}",
        mosquitto.port
    );
    let mut rows = Vec::new();
    for qos in floods {
        let mut ceiling = Vec::new();
        let mut broker_cpu = Vec::new();
        let mut gateway: Vec<Vec<GatewayRun>> = builds.iter().map(|_| Vec::new()).collect();
        for rep in 0..reps {
            let prefix = format!("bench{qos}r{rep}");
            let load = Load::new(&scenario(&prefix, messages, DEVICES), Pace::Unlimited, qos);
            let before = cpu_time(mosquitto.pid());
            let rate = broker_ceiling(mosquitto.port, &prefix, load, qos).await;
            let cpu = per_message(cpu_time(mosquitto.pid()) - before, messages);
            eprintln!(
                "  qos {qos} rep {rep}: broker ceiling {rate:.0}/s, broker {cpu:.2} µs CPU/msg"
            );
            ceiling.push(rate);
            broker_cpu.push(cpu);
            for ((name, bin), runs) in builds.iter().zip(&mut gateway) {
                let prefix = format!("bench{qos}g{rep}{}", runs.len());
                let before = cpu_time(mosquitto.pid());
                let run = gateway_run(
                    bin,
                    mosquitto.port,
                    &scenario(&prefix, messages, DEVICES),
                    Pace::Unlimited,
                    qos,
                )
                .await;
                eprintln!(
                    "  qos {qos} rep {rep}: {name} {:.0}/s (published in {:.2} s, committed in {:.2} s), \
                     {:.2} µs CPU/msg, {:.1} MiB; broker {:.2} µs CPU/msg",
                    run.rate,
                    run.published.as_secs_f64(),
                    run.elapsed.as_secs_f64(),
                    run.cpu_per_message,
                    run.peak_rss_mib,
                    per_message(cpu_time(mosquitto.pid()) - before, messages),
                );
                runs.push(run);
            }
        }
        let c = median(ceiling.iter().copied());
        let broker_cpu = median(broker_cpu.into_iter());
        for ((name, _), runs) in builds.iter().zip(&gateway) {
            let g = median(runs.iter().map(|r| r.rate));
            // Each gateway run against the ceiling measured just before it: the box's speed
            // drifts between repetitions, and a pair shares it.
            let ratios: Vec<f64> = runs.iter().zip(&ceiling).map(|(r, c)| r.rate / c).collect();
            let ratio = median(ratios.iter().copied());
            let spread = (
                ratios.iter().copied().fold(f64::INFINITY, f64::min),
                ratios.iter().copied().fold(0.0, f64::max),
            );
            let cpu = median(runs.iter().map(|r| r.cpu_per_message));
            let rss = median(runs.iter().map(|r| r.peak_rss_mib));
            let label = if builds.len() > 1 {
                format!("{qos} ({name})")
            } else {
                qos.to_string()
            };
            rows.push((label, c, broker_cpu, g, ratio, spread, cpu, rss));
        }
    }
    if !rows.is_empty() {
        println!();
        println!(
            "| QoS | broker ceiling (msg/s) | broker CPU per message (µs) | gateway into SQLite (msg/s) | ratio (runs) | gateway CPU per message (µs) | gateway peak RSS (MiB) |"
        );
        println!("|----:|---:|---:|---:|---:|---:|---:|");
    }
    for (label, c, broker_cpu, g, ratio, (low, high), cpu, rss) in rows {
        println!(
            "| {label} | {c:.0} | {broker_cpu:.2} | {g:.0} | {ratio:.2} ({low:.2}–{high:.2}) | {cpu:.2} | {rss:.1} |"
        );
    }

    if steady {
        println!();
        println!(
            "| steady load, QoS 1, 10 s | gateway CPU (% of one core) | peak RSS (MiB) | publish to commit p50 / p99 (ms) |"
        );
        println!("|---|---:|---:|---:|");
        for (rate, devices, budget) in [
            (5_000.0, DEVICES, "CPU at most 8 %, RSS at most 12 MiB"),
            (5_000.0, 1_000, "RSS at most 30 MiB"),
            (10_000.0, DEVICES, "p99 under 250 ms"),
        ] {
            // Each build in turn, on a topic of its own, one after the other.
            for (name, bin) in &builds {
                let steady = scenario(
                    &format!("steady{rate}-{devices}-{}", name.replace(' ', "")),
                    (rate * 10.0) as u64,
                    devices,
                );
                let run = gateway_run(bin, mosquitto.port, &steady, Pace::Steady(rate), 1).await;
                let (p50, p99) = run.latency.unwrap_or_default();
                let label = if builds.len() > 1 {
                    format!(" ({name})")
                } else {
                    String::new()
                };
                println!(
                    "| {rate:.0} msg/s, {devices} devices{label} (budget: {budget}) | {:.1} | {:.1} | {:.0} / {:.0} |",
                    run.cpu_share * 100.0,
                    run.peak_rss_mib,
                    p50.as_secs_f64() * 1e3,
                    p99.as_secs_f64() * 1e3
                );
            }
        }
    }
}

/// `messages` JSON messages from `devices` devices, timestamped 10 ms apart per device
/// from a day ago, so none is too far in the future for validation however long it runs.
fn scenario(prefix: &str, messages: u64, devices: usize) -> Scenario {
    Scenario {
        devices,
        messages_per_device: messages / devices as u64,
        format: Format::Json,
        topic_prefix: prefix.to_string(),
        fault_every: 0,
        start_ms: sensorgate::reading::now_millis() - 86_400_000,
        period_ms: 10,
    }
}

/// Messages per second from the first publish to the last delivery to a counting subscriber.
async fn broker_ceiling(port: u16, prefix: &str, load: Load, qos: u8) -> f64 {
    let mut options = MqttOptions::new(format!("{prefix}-counter"), "127.0.0.1", port);
    options
        .set_keep_alive(Duration::from_secs(30))
        .set_clean_session(true);
    let (client, mut eventloop) = AsyncClient::new(options, 1000);
    let level = if qos == 0 {
        QoS::AtMostOnce
    } else {
        QoS::AtLeastOnce
    };
    client
        .subscribe(format!("{prefix}/#"), level)
        .await
        .expect("subscribe");
    loop {
        if let Ok(Event::Incoming(Packet::SubAck(_))) = eventloop.poll().await {
            break;
        }
    }
    let received = Arc::new(AtomicU64::new(0));
    let counter = received.clone();
    let want = load.messages();
    let counting = tokio::spawn(async move {
        while counter.load(Ordering::Relaxed) < want {
            match eventloop.poll().await {
                Ok(Event::Incoming(Packet::Publish(_))) => {
                    counter.fetch_add(1, Ordering::Relaxed);
                }
                Ok(_) => {}
                Err(err) => panic!("counting subscriber lost the broker: {err}"),
            }
        }
        Instant::now()
    });
    let start = Instant::now();
    load.publish(port, format!("{prefix}-pub")).await;
    let end = tokio::time::timeout(Duration::from_secs(120), counting)
        .await
        .expect("every message delivered within 120 s")
        .expect("counter");
    want as f64 / (end - start).as_secs_f64()
}

/// One run of the gateway process over `scenario`.
struct GatewayRun {
    /// Messages per second from the first publish until every reading was committed.
    rate: f64,
    cpu_per_message: f64,
    /// CPU time over wall time while the messages came in.
    cpu_share: f64,
    peak_rss_mib: f64,
    /// At a steady pace: the median and 99th percentile of publish-to-commit latency.
    latency: Option<(Duration, Duration)>,
    /// From the first publish until the publisher had sent the last message.
    published: Duration,
    /// From the first publish until every reading was committed.
    elapsed: Duration,
}

async fn gateway_run(
    bin: &Path,
    port: u16,
    scenario: &Scenario,
    pace: Pace,
    qos: u8,
) -> GatewayRun {
    let dir = tempfile::tempdir().expect("temp dir");
    let db = dir.path().join("bench.db");
    let mut text = format!(
        "[storage]\npath = \"{}\"\n\n[[brokers]]\nid = \"bench\"\nurl = \"mqtt://127.0.0.1:{port}\"\n\
         client_id = \"{}-gateway\"\n\n",
        db.display(),
        scenario.topic_prefix
    );
    text.push_str(&sensorgate::demo::device_config(scenario, "dev", "bench"));
    let text = text.replace(
        "format = \"json\"",
        &format!("format = \"json\"\nqos = {qos}"),
    );
    let config = dir.path().join("gateway.toml");
    std::fs::write(&config, text).expect("config");
    let mut gateway = Process::start(bin, &config, &dir.path().join("gateway.log"));
    let pool = read_pool(&db).await;
    wait(|| async {
        sqlx::query_scalar::<_, i64>("SELECT count(*) FROM devices WHERE state = 'connected'")
            .fetch_one(&pool)
            .await
            .unwrap_or(0)
            == scenario.devices as i64
    })
    .await;
    let want = scenario.total_messages() as i64 * 2;
    let client_id = format!("{}-pub", scenario.topic_prefix);
    let load = Load::new(scenario, pace, qos);
    let cpu_before = cpu_time(gateway.child.id());
    let start = Instant::now();
    let publishing = tokio::spawn(load.publish(port, client_id));
    // A flood's rate needs only the time of the last commit, which comes after the last
    // publish: until then the harness leaves the database (and the CPU it would spend
    // reading it) to the gateway.
    let mut publishing = Some(publishing);
    if matches!(pace, Pace::Unlimited) {
        finish(publishing.take()).await;
    }
    let published = start.elapsed();
    // When the stored count changed, and to what.
    let mut stored_at: Vec<(Duration, i64)> = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let stored = sqlx::query_scalar::<_, i64>("SELECT coalesce(sum(readings), 0) FROM devices")
            .fetch_one(&pool)
            .await
            .unwrap_or(0);
        if stored_at.last().is_none_or(|(_, last)| *last != stored) {
            stored_at.push((start.elapsed(), stored));
        }
        if stored >= want {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "not every reading was stored within 120 s"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let elapsed = start.elapsed();
    let cpu = cpu_time(gateway.child.id()) - cpu_before;
    let peak_rss = gateway.peak_rss_kib();
    finish(publishing).await;
    pool.close().await;
    gateway.stop();
    let messages = scenario.total_messages() as f64;
    GatewayRun {
        published,
        elapsed,
        rate: messages / elapsed.as_secs_f64(),
        cpu_per_message: per_message(cpu, scenario.total_messages()),
        cpu_share: cpu.as_secs_f64() / elapsed.as_secs_f64(),
        peak_rss_mib: peak_rss as f64 / 1024.0,
        latency: match pace {
            Pace::Steady(rate) => {
                let mut latencies = latencies(&stored_at, rate, scenario.total_messages());
                latencies.sort();
                let at = |q: f64| latencies[((latencies.len() - 1) as f64 * q) as usize];
                Some((at(0.5), at(0.99)))
            }
            _ => None,
        },
    }
}

/// What a run publishes, prepared before its clock starts.
enum Load {
    /// At QoS 0 with no pace, every packet encoded ahead: while the clock runs the
    /// publisher only writes (see [`Flood`]).
    Flood(Flood),
    Plan {
        messages: Vec<Planned>,
        pace: Pace,
        qos: u8,
    },
}

impl Load {
    fn new(scenario: &Scenario, pace: Pace, qos: u8) -> Self {
        if qos == 0 && pace == Pace::Unlimited {
            Self::Flood(Flood::encode(scenario.messages()).expect("plan encodes"))
        } else {
            Self::Plan {
                messages: scenario.messages().collect(),
                pace,
                qos,
            }
        }
    }

    fn messages(&self) -> u64 {
        match self {
            Self::Flood(flood) => flood.messages(),
            Self::Plan { messages, .. } => messages.len() as u64,
        }
    }

    async fn publish(self, port: u16, client_id: String) {
        let published = match self {
            Self::Flood(load) => flood("127.0.0.1", port, &client_id, &load).await,
            Self::Plan {
                messages,
                pace,
                qos,
            } => {
                publish(
                    "127.0.0.1",
                    port,
                    &client_id,
                    messages.into_iter(),
                    pace,
                    qos,
                    CancellationToken::new(),
                )
                .await
            }
        };
        published.expect("publisher");
    }
}

/// Waits for a publisher task, if it has not been waited for.
async fn finish(publishing: Option<tokio::task::JoinHandle<()>>) {
    if let Some(publishing) = publishing {
        publishing.await.expect("publisher task");
    }
}

/// Each message's time from its publish to the first poll that saw its two readings stored.
/// The steady publisher sends in 10 ms ticks: after tick `n` (the first at once), the first
/// `(n + 1) × rate / 100` messages are out. An upper bound of delivery-to-commit latency: it
/// includes the publisher's connect, the way through the broker and up to one 5 ms poll.
fn latencies(stored_at: &[(Duration, i64)], rate: f64, messages: u64) -> Vec<Duration> {
    let per_tick = rate / 100.0;
    let mut seen = stored_at.iter();
    let mut current = seen.next().copied().unwrap_or_default();
    (0..messages)
        .map(|i| {
            let needed = 2 * (i as i64 + 1);
            while current.1 < needed {
                current = seen
                    .next()
                    .copied()
                    .expect("the last poll saw every reading");
            }
            let tick = ((i + 1) as f64 / per_tick).ceil() - 1.0;
            current
                .0
                .saturating_sub(Duration::from_secs_f64(tick * 0.01))
        })
        .collect()
}

/// `sensorgate run` as a child process, logging to a file.
struct Process {
    child: Child,
}

impl Process {
    fn start(bin: &Path, config: &Path, log: &Path) -> Self {
        let log = std::fs::File::create(log).expect("log file");
        let child = Command::new(bin)
            .args(["run", "--config"])
            .arg(config)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("sensorgate runs");
        Self { child }
    }

    fn proc_file(&self, name: &str) -> String {
        let path = PathBuf::from(format!("/proc/{}/{name}", self.child.id()));
        std::fs::read_to_string(path).unwrap_or_default()
    }

    /// The kernel's high-water mark of the process's resident memory: its peak, with no
    /// sampling that would take CPU from the run it measures.
    fn peak_rss_kib(&self) -> u64 {
        self.proc_file("status")
            .lines()
            .find_map(|l| l.strip_prefix("VmHWM:"))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .unwrap_or(0)
    }

    /// SIGTERM, then waits for the drain.
    #[allow(
        clippy::disallowed_methods,
        reason = "a synchronous wait for the child to exit"
    )]
    fn stop(&mut self) {
        // SAFETY: kill(2) with a pid this process started and has not reaped.
        unsafe {
            libc::kill(self.child.id() as libc::pid_t, libc::SIGTERM);
        }
        let status = self.child.wait().expect("gateway exits");
        assert!(status.success(), "gateway exit status {status}");
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A read-only pool on the gateway's database, once the gateway has created it.
async fn read_pool(db: &Path) -> SqlitePool {
    wait(|| async { db.exists() }).await;
    let options = SqliteConnectOptions::new().filename(db).read_only(true);
    let mut tries = 0;
    loop {
        match SqlitePoolOptions::new()
            .max_connections(1)
            .connect_with(options.clone())
            .await
        {
            // The tables exist once the migrations ran.
            Ok(pool)
                if sqlx::query("SELECT 1 FROM devices LIMIT 1")
                    .fetch_optional(&pool)
                    .await
                    .is_ok() =>
            {
                return pool;
            }
            _ if tries < 500 => {
                tries += 1;
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            Ok(_) => panic!("the gateway did not create its tables"),
            Err(err) => panic!("cannot open the gateway's database: {err}"),
        }
    }
}

async fn wait<F, Fut>(mut condition: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + Duration::from_secs(120);
    while !condition().await {
        assert!(
            Instant::now() < deadline,
            "benchmark condition not met within 120 s"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// User and system CPU time of process `pid` so far.
fn cpu_time(pid: u32) -> Duration {
    proc_stat::cpu_time(&pid.to_string())
}

fn per_message(cpu: Duration, messages: u64) -> f64 {
    cpu.as_secs_f64() * 1e6 / messages as f64
}

fn median(values: impl Iterator<Item = f64>) -> f64 {
    let mut values: Vec<f64> = values.collect();
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}
