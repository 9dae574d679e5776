//! End-to-end ingest benchmark: `cargo bench --bench ingest`.
//!
//! In one run, against one private Mosquitto, for QoS 0 and QoS 1:
//! - the broker's ceiling: a subscriber that only counts, fed by the same publisher;
//! - the gateway: every message decoded, validated, committed to SQLite (synchronous=FULL,
//!   WAL) with rollups, and at QoS 1 acknowledged after commit.
//!
//! Each is measured `REPS` times, alternating, and the median is reported with the ratio.
//! Set `BENCH_MESSAGES` to change the message count per run.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use sensorgate::app::Gateway;
use sensorgate_sim::{Format, Mosquitto, Pace, Planned, Scenario, publish};
use sqlx::sqlite::{SqliteConnectOptions, SqlitePoolOptions};
use tokio_util::sync::CancellationToken;

const REPS: usize = 5;
const DEVICES: usize = 100;

fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn,rumqttc=off")),
        )
        .with_writer(std::io::stderr)
        .init();
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
        .unwrap_or(100_000);
    let only: Option<u8> = std::env::var("BENCH_QOS").ok().and_then(|v| v.parse().ok());
    let mosquitto = Mosquitto::start();
    println!(
        "ingest benchmark: {messages} JSON messages per run from {DEVICES} devices, median of {REPS}, Mosquitto on 127.0.0.1:{}",
        mosquitto.port
    );
    let mut rows = Vec::new();
    for qos in [0u8, 1]
        .into_iter()
        .filter(|q| only.is_none_or(|o| o == *q))
    {
        let mut ceiling = Vec::new();
        let mut gateway = Vec::new();
        for rep in 0..REPS {
            let prefix = format!("bench{qos}r{rep}");
            let plan = plan(&prefix, messages);
            ceiling.push(broker_ceiling(mosquitto.port, &prefix, &plan, qos).await);
            let prefix = format!("bench{qos}g{rep}");
            let plan = plan_for(&prefix, messages);
            gateway.push(gateway_rate(mosquitto.port, &prefix, plan, qos).await);
            eprintln!(
                "  qos {qos} rep {rep}: broker {:.0}/s, gateway {:.0}/s",
                ceiling[rep], gateway[rep]
            );
        }
        let (c, g) = (median(&mut ceiling), median(&mut gateway));
        rows.push((qos, c, g));
    }
    println!();
    println!("| QoS | broker ceiling (msg/s) | gateway into SQLite (msg/s) | ratio |");
    println!("|----:|-----------------------:|----------------------------:|------:|");
    for (qos, c, g) in rows {
        println!("| {qos} | {c:.0} | {g:.0} | {:.2} |", g / c);
    }
}

fn scenario(prefix: &str, messages: u64) -> Scenario {
    Scenario {
        devices: DEVICES,
        messages_per_device: messages / DEVICES as u64,
        format: Format::Json,
        topic_prefix: prefix.to_string(),
        fault_every: 0,
        start_ms: sensorgate::reading::now_millis() - 86_400_000,
        period_ms: 10,
    }
}

fn plan(prefix: &str, messages: u64) -> Vec<Planned> {
    scenario(prefix, messages).messages().collect()
}

fn plan_for(prefix: &str, messages: u64) -> (Scenario, Vec<Planned>) {
    let s = scenario(prefix, messages);
    let plan = s.messages().collect();
    (s, plan)
}

/// Messages per second from the first publish to the last delivery to a counting subscriber.
async fn broker_ceiling(port: u16, prefix: &str, plan: &[Planned], qos: u8) -> f64 {
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
    let want = plan.len() as u64;
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
    publish(
        "127.0.0.1",
        port,
        &format!("{prefix}-pub"),
        plan.iter().cloned(),
        Pace::Unlimited,
        qos,
        CancellationToken::new(),
    )
    .await
    .expect("publisher");
    let end = tokio::time::timeout(Duration::from_secs(120), counting)
        .await
        .expect("every message delivered within 120 s")
        .expect("counter");
    want as f64 / (end - start).as_secs_f64()
}

/// Messages per second from the first publish until every reading is committed.
async fn gateway_rate(
    port: u16,
    prefix: &str,
    (scenario, plan): (Scenario, Vec<Planned>),
    qos: u8,
) -> f64 {
    let dir = tempfile::tempdir().expect("temp dir");
    let db = dir.path().join("bench.db");
    let mut text = format!(
        "[storage]\npath = \"{}\"\n[storage.retention]\ninterval = \"1h\"\n\
         [[brokers]]\nid = \"bench\"\nurl = \"mqtt://127.0.0.1:{port}\"\nclient_id = \"{prefix}-gateway\"\n\n",
        db.display()
    );
    text.push_str(&sensorgate::demo::device_config(&scenario, "dev", "bench"));
    let text = text.replace(
        "format = \"json\"",
        &format!("format = \"json\"\nqos = {qos}"),
    );
    let config = sensorgate::config::parse(&text, Path::new("<bench>")).expect("bench config");
    let gateway = Gateway::build(config).await.expect("gateway");
    let shutdown = CancellationToken::new();
    let running = tokio::spawn(gateway.run_until_stopped(shutdown.clone()));
    let pool = SqlitePoolOptions::new()
        .max_connections(1)
        .connect_with(SqliteConnectOptions::new().filename(&db).read_only(true))
        .await
        .expect("read pool");
    wait(|| async {
        sqlx::query_scalar::<_, i64>("SELECT count(*) FROM devices WHERE state = 'connected'")
            .fetch_one(&pool)
            .await
            .unwrap_or(0)
            == DEVICES as i64
    })
    .await;
    let want = plan.len() as i64 * 2;
    let start = Instant::now();
    publish(
        "127.0.0.1",
        port,
        &format!("{prefix}-pub"),
        plan.into_iter(),
        Pace::Unlimited,
        qos,
        CancellationToken::new(),
    )
    .await
    .expect("publisher");
    wait(|| async {
        sqlx::query_scalar::<_, i64>("SELECT coalesce(sum(readings), 0) FROM devices")
            .fetch_one(&pool)
            .await
            .unwrap_or(0)
            >= want
    })
    .await;
    let elapsed = start.elapsed();
    shutdown.cancel();
    running
        .await
        .expect("gateway task")
        .expect("gateway drains");
    (want / 2) as f64 / elapsed.as_secs_f64()
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

fn median(values: &mut [f64]) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}
