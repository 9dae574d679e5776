//! `sensorgate demo`: an embedded broker, simulated MQTT sensors in every payload format, a
//! serial weather station and a Modbus bus with two meters on pseudo-terminals (all with
//! faults), and a gateway writing to a local database file, with progress and a summary.

use std::fmt::Write as _;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use sensorgate_sim::modbus::{MeterConfig, ModbusBus, WordOrder};
use sensorgate_sim::pty::Pty;
use sensorgate_sim::serial::{LineFormat, LineOptions, LineScenario, LineSensor};
use sensorgate_sim::{EmbeddedBroker, Format, Pace, Scenario, publish};
use tokio_util::sync::CancellationToken;

use crate::app::Gateway;
use crate::reading::now_millis;
use crate::storage::ReadStore;

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
    let serial = SerialSensors::start(duration, start_ms)?;
    text.push_str(&serial.config());
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

    let store = ReadStore::open(db)?;
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
    let (lines, polls) = serial.stop().await?;

    let (stored, rejected) = totals(&store).await?;
    println!(
        "\nSummary: {published} MQTT messages published, {lines} serial lines written, {polls} Modbus \
         answers served; {stored} readings stored, {rejected} rejected (faults injected on purpose)."
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
    println!("  {exe} query --db {db} weather-station --since 1h --limit 10");
    println!("  {exe} query --db {db} meter-2 voltage --since 1h --format json --limit 3");
    Ok(())
}

/// The serial side of the demo, each on a pseudo-terminal the gateway opens like a real
/// port: a CSV weather station that injects line faults, and an RS-485 bus with two energy
/// meters (the second with low-word-first registers).
struct SerialSensors {
    dir: tempfile::TempDir,
    station: LineSensor,
    meters: ModbusBus,
}

impl SerialSensors {
    fn start(duration: Duration, start_ms: crate::reading::Millis) -> anyhow::Result<Self> {
        let dir = tempfile::Builder::new()
            .prefix("sensorgate-demo-")
            .tempdir()
            .context("a directory for the demo's serial ports")?;
        let station_pty = Pty::open(dir.path().join("weather-station"))?;
        let bus_pty = Pty::open(dir.path().join("rs485"))?;
        let lines = (duration.as_secs_f64() * 2.0).ceil() as u64;
        let plan = LineScenario {
            start_ms,
            period_ms: 500,
            fault_every: 8,
            ..LineScenario::new(LineFormat::Csv, lines)
        };
        let station = LineSensor::start(
            station_pty,
            plan.lines(),
            LineOptions {
                pace: Pace::Steady(2.0),
                ..LineOptions::default()
            },
            CancellationToken::new(),
        );
        let meters = ModbusBus::start(
            bus_pty,
            &[
                MeterConfig::new(1),
                MeterConfig {
                    word_order: WordOrder::Cdab,
                    ..MeterConfig::new(2)
                },
            ],
            CancellationToken::new(),
        )?;
        Ok(Self {
            dir,
            station,
            meters,
        })
    }

    fn config(&self) -> String {
        let path = |name: &str| self.dir.path().join(name).display().to_string();
        let mut out = format!(
            "[[serial_ports]]\nid = \"station\"\npath = \"{}\"\n\n\
             [[serial_ports]]\nid = \"rs485\"\npath = \"{}\"\nbaud = 19200\nparity = \"even\"\ntimeout = \"200ms\"\n\n\
             [[devices]]\nkind = \"serial\"\nid = \"weather-station\"\nport = \"station\"\nformat = \"csv\"\n\
             columns = [\"ts\", \"temp\", \"hum\"]\ntimestamp_field = \"ts\"\nexpected_interval = \"5s\"\n\
             [[devices.metrics]]\nname = \"temperature\"\nfield = \"temp\"\nunit = \"°C\"\nmin = -40.0\nmax = 60.0\n\
             [[devices.metrics]]\nname = \"humidity\"\nfield = \"hum\"\nunit = \"%\"\nmin = 0.0\nmax = 100.0\n\n",
            path("weather-station"),
            path("rs485")
        );
        for (slave, order) in [(1, "big"), (2, "little")] {
            let _ = write!(
                out,
                "[[devices]]\nkind = \"modbus\"\nid = \"meter-{slave}\"\nport = \"rs485\"\nslave = {slave}\npoll_interval = \"1s\"\n"
            );
            for (name, address, data_type, scale, unit) in [
                ("voltage", 0, "f32", 1.0, "V"),
                ("current", 2, "f32", 1.0, "A"),
                ("active_power", 4, "f32", 1.0, "W"),
                ("energy", 6, "u32", 1.0, "Wh"),
                ("frequency", 8, "u16", 0.01, "Hz"),
                ("temperature", 9, "i16", 0.1, "°C"),
            ] {
                let _ = write!(
                    out,
                    "[[devices.registers]]\nname = \"{name}\"\ntable = \"input\"\naddress = {address}\n\
                     type = \"{data_type}\"\nword_order = \"{order}\"\nscale = {scale}\nunit = \"{unit}\"\n"
                );
            }
            out.push_str(
                "[[devices.registers]]\nname = \"relay\"\ntable = \"coil\"\naddress = 0\n\n",
            );
        }
        out
    }

    /// Stops both; the lines written and the Modbus answers served.
    async fn stop(self) -> anyhow::Result<(u64, u64)> {
        let lines = self.station.stop().await?.written;
        let answers = self.meters.stop().await?.answered;
        Ok((lines, answers))
    }
}

async fn totals(store: &ReadStore) -> anyhow::Result<(i64, i64)> {
    let devices = store.devices().await?;
    Ok((
        devices.iter().map(|d| d.readings).sum(),
        devices.iter().map(|d| d.rejections).sum(),
    ))
}
