//! `sensorgate demo`: an embedded broker, simulated sensors in every payload format (with
//! faults), and a gateway writing to a local database file, with progress and a summary.

use std::fmt::Write as _;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use sensorgate_sim::{EmbeddedBroker, Format, Pace, Scenario, publish};
use tokio_util::sync::CancellationToken;

use crate::app::Gateway;
use crate::reading::now_millis;
use crate::storage::{self, ReadStore};

/// TOML `[[devices]]` entries for every device of a simulator scenario, named
/// `<id_prefix>-<n>`, with the validation limits the simulator's faults break.
pub fn device_config(scenario: &Scenario, id_prefix: &str, broker: &str) -> String {
    let mut out = String::new();
    for i in 0..scenario.devices {
        let name = Scenario::device_name(i);
        let (format, ts, temp_field, hum_field) = match scenario.format {
            Format::Json => (
                "json",
                "timestamp_field = \"ts\"\n",
                "temp".to_string(),
                Some("hum".to_string()),
            ),
            Format::Senml => (
                "senml",
                "",
                format!("{name}/temp"),
                Some(format!("{name}/hum")),
            ),
            Format::Value => ("value", "", "temperature".to_string(), None),
        };
        let _ = write!(
            out,
            "[[devices]]\nkind = \"mqtt\"\nid = \"{id_prefix}-{i}\"\nbroker = \"{broker}\"\n\
             topic = \"{}\"\nformat = \"{format}\"\n{ts}\n\
             [[devices.metrics]]\nname = \"temperature\"\nfield = \"{temp_field}\"\nunit = \"°C\"\nmin = -40.0\nmax = 85.0\n\n",
            scenario.topic(i)
        );
        if let Some(hum) = hum_field {
            let _ = write!(
                out,
                "[[devices.metrics]]\nname = \"humidity\"\nfield = \"{hum}\"\nunit = \"%\"\nmin = 0.0\nmax = 100.0\n\n"
            );
        }
    }
    out
}

/// Runs the demo for `duration`, writing to `db`.
///
/// # Errors
/// When the broker, the database or the gateway cannot start.
pub async fn run(db: &Path, duration: Duration) -> anyhow::Result<()> {
    let broker = EmbeddedBroker::start().context("starting the embedded MQTT broker")?;
    println!("Embedded MQTT broker on 127.0.0.1:{}", broker.port);
    let rate_per_device = 5.0;
    let messages = (duration.as_secs_f64() * rate_per_device).ceil() as u64;
    let start_ms = now_millis();
    let scenario = |format, prefix: &str, devices| Scenario {
        devices,
        messages_per_device: messages,
        format,
        topic_prefix: format!("demo/{prefix}"),
        fault_every: 25,
        start_ms,
        period_ms: (1000.0 / rate_per_device) as i64,
    };
    let scenarios = [
        (scenario(Format::Json, "greenhouse", 4), "greenhouse"),
        (scenario(Format::Senml, "weather", 2), "weather"),
        (scenario(Format::Value, "probe", 2), "probe"),
    ];
    let mut text = format!(
        "[storage]\npath = \"{}\"\n\n[[brokers]]\nid = \"demo\"\nurl = \"mqtt://127.0.0.1:{}\"\nclient_id = \"sensorgate-demo\"\n\n",
        db.display(),
        broker.port
    );
    for (s, prefix) in &scenarios {
        text.push_str(&device_config(s, prefix, "demo"));
    }
    let config = crate::config::parse(&text, Path::new("<demo>"))?;
    let devices = config.devices.len();

    let shutdown = CancellationToken::new();
    let gateway = Gateway::build(config).await?;
    let gateway = tokio::spawn(gateway.run_until_stopped(shutdown.clone()));
    let stop = CancellationToken::new();
    let ctrl_c = stop.clone();
    tokio::spawn(async move {
        let _ = tokio::signal::ctrl_c().await;
        ctrl_c.cancel();
    });

    let mut publishers = Vec::new();
    for (i, (s, _)) in scenarios.iter().enumerate() {
        let s = s.clone();
        let port = broker.port;
        let cancel = stop.clone();
        let rate = rate_per_device * s.devices as f64;
        // The weather station buffers and flushes ten messages at a time.
        let pace = match s.format {
            Format::Senml => Pace::Bursts { rate, size: 10 },
            _ => Pace::Steady(rate),
        };
        publishers.push(tokio::spawn(async move {
            publish(
                "127.0.0.1",
                port,
                &format!("demo-sim-{i}"),
                s.messages(),
                pace,
                1,
                cancel,
            )
            .await
        }));
    }
    println!(
        "{devices} simulated devices publishing for {duration:?} (Ctrl-C ends early); database {}",
        db.display()
    );

    let store = ReadStore::new(storage::open_read_only(db).await?);
    let started = Instant::now();
    let mut last = (0, Instant::now());
    let mut ticker = tokio::time::interval(Duration::from_secs(2));
    ticker.tick().await;
    while publishers.iter().any(|p| !p.is_finished()) && !stop.is_cancelled() {
        tokio::select! {
            _ = ticker.tick() => {}
            () = stop.cancelled() => break,
        }
        let (stored, rejected) = totals(&store).await?;
        let rate = (stored - last.0) as f64 / last.1.elapsed().as_secs_f64();
        last = (stored, Instant::now());
        println!(
            "  {:>4.0}s  stored {stored:>6}  ({rate:>5.0}/s)  rejected {rejected:>4}",
            started.elapsed().as_secs_f64()
        );
    }
    stop.cancel();
    let mut published = 0;
    for p in publishers {
        published += p.await?.context("simulated sensors")?.published;
    }
    // Let the last messages reach the gateway before asking it to drain.
    tokio::time::sleep(Duration::from_millis(500)).await;
    shutdown.cancel();
    gateway.await??;

    let (stored, rejected) = totals(&store).await?;
    println!(
        "\nSummary: {published} messages published, {stored} readings stored, {rejected} rejected (faults injected on purpose)."
    );
    println!("\nDevices:");
    print!(
        "{}",
        crate::query::render(&store.devices().await?, crate::query::Format::Table)
    );
    let db = db.display();
    // The binary that runs now, so the commands work before `sensorgate` is on the PATH.
    let exe = std::env::current_exe()
        .map(|p| p.display().to_string())
        .unwrap_or_else(|_| "sensorgate".into());
    println!("\nTry:");
    println!("  {exe} devices --db {db}");
    println!("  {exe} query --db {db} greenhouse-0 temperature --since 1h --limit 10");
    println!("  {exe} query --db {db} greenhouse-0 --every 1m --since 1h");
    println!("  {exe} query --db {db} weather-1 humidity --since 1h --format csv --limit 5");
    Ok(())
}

async fn totals(store: &ReadStore) -> anyhow::Result<(i64, i64)> {
    let devices = store.devices().await?;
    Ok((
        devices.iter().map(|d| d.readings).sum(),
        devices.iter().map(|d| d.rejections).sum(),
    ))
}
