//! Storage benchmark: `cargo bench --bench writer`.
//!
//! Batches as the aggregate stage cuts them (100 devices, two metrics each, readings 10 ms
//! apart per device) go through the real validator, batcher and [`Writer`] into a new SQLite
//! file (WAL, synchronous FULL). For each batch size it prints the readings stored per second,
//! the mean commit, and the bytes the process wrote per reading (WAL and checkpoints, from
//! `/proc/self/io`): what the disk, or an SD card, has to take.
//!
//! Set `BENCH_MESSAGES` to change the message count per run (default 200,000), and
//! `BENCH_BATCH` to run one batch size once (for a profiler or `valgrind --tool=callgrind`).

#[path = "support/proc_stat.rs"]
mod proc_stat;

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use sensorgate::pipeline::aggregate::Batcher;
use sensorgate::pipeline::validate::Validator;
use sensorgate::reading::{Bytes, DeviceId, Message, Millis, RawReading};
use sensorgate::storage::writer::DeviceEntry;
use sensorgate::storage::{Batch, Writer, open_for_writing};
use sensorgate::telemetry::Telemetry;

const DEVICES: usize = 100;
const BATCH_SIZES: [usize; 5] = [100, 500, 2_000, 10_000, 25_000];
const REPS: usize = 3;

fn main() {
    let messages: usize = std::env::var("BENCH_MESSAGES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(200_000);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    println!(
        "writer benchmark: {messages} messages of 2 readings from {DEVICES} devices per run, median of {REPS}"
    );
    println!();
    println!(
        "| messages per batch | readings/s | CPU per reading (µs) | mean commit (ms) | bytes written per reading |"
    );
    println!("|---:|---:|---:|---:|---:|");
    let only: Option<usize> = std::env::var("BENCH_BATCH")
        .ok()
        .and_then(|v| v.parse().ok());
    let reps = if only.is_some() { 1 } else { REPS };
    for batch_size in only.map_or(BATCH_SIZES.to_vec(), |b| vec![b]) {
        let mut runs: Vec<Run> = (0..reps)
            .map(|_| runtime.block_on(run(messages, batch_size)))
            .collect();
        runs.sort_by(|a, b| a.rate.total_cmp(&b.rate));
        let median = &runs[reps / 2];
        println!(
            "| {batch_size} | {:.0} | {:.2} | {:.2} | {:.0} |",
            median.rate,
            median.cpu_per_reading.as_secs_f64() * 1e6,
            median.commit.as_secs_f64() * 1e3,
            median.written_per_reading
        );
    }
}

struct Run {
    rate: f64,
    cpu_per_reading: Duration,
    commit: Duration,
    written_per_reading: f64,
}

fn config_text(db: &Path) -> String {
    let mut text = format!(
        "[storage]\npath = \"{}\"\n[storage.retention]\ninterval = \"1h\"\n\
         [[brokers]]\nurl = \"mqtt://127.0.0.1\"\n",
        db.display()
    );
    for d in 0..DEVICES {
        text.push_str(&format!(
            "[[devices]]\nkind = \"mqtt\"\nid = \"dev-{d}\"\ntopic = \"t/{d}\"\nformat = \"json\"\n\
             [[devices.metrics]]\nname = \"temperature\"\nfield = \"temp\"\n\
             [[devices.metrics]]\nname = \"humidity\"\nfield = \"hum\"\n"
        ));
    }
    text
}

/// The batches the aggregate stage would cut from `messages` messages, `batch_size` each.
fn batches(config: &sensorgate::config::Config, messages: usize, batch_size: usize) -> Vec<Batch> {
    let widths: Vec<Millis> = config
        .rollups
        .windows
        .iter()
        .map(|w| w.as_millis() as Millis)
        .collect();
    let mut validator = Validator::new(config, &[]);
    let mut batcher = Batcher::new(widths, usize::MAX, usize::MAX);
    let ids: Vec<DeviceId> = (0..DEVICES)
        .map(|d| DeviceId::new(&format!("dev-{d}")))
        .collect();
    let start = sensorgate::reading::now_millis() - 3_600_000;
    let mut out = Vec::new();
    for i in 0..messages {
        let device = i % DEVICES;
        let time = start + (i / DEVICES) as Millis * 10;
        let value = ((i / DEVICES) % 500) as f64 / 10.0;
        let raw = |field: &str, value: f64| RawReading {
            field: field.into(),
            value,
            unit: None,
            source_time: Some(time),
        };
        let message = Message {
            device: ids[device].clone(),
            source: Arc::from("t"),
            received_at: time,
            raw: Bytes::new(),
            decoded: Ok(vec![raw("temp", value), raw("hum", 50.0 + value / 2.0)].into()),
            ticket: None,
        };
        let checked = validator.check(&message);
        batcher.push(&ids[device], checked, None);
        if (i + 1) % batch_size == 0 {
            out.push(batcher.take());
        }
    }
    if !batcher.is_empty() {
        out.push(batcher.take());
    }
    out
}

async fn run(messages: usize, batch_size: usize) -> Run {
    let dir = tempfile::tempdir().expect("temp dir");
    let db = dir.path().join("writer.db");
    let config =
        sensorgate::config::parse(&config_text(&db), Path::new("<bench>")).expect("bench config");
    let batches = batches(&config, messages, batch_size);
    let readings: usize = batches.iter().map(|b| b.readings.len()).sum();
    let pool = open_for_writing(&config.storage).await.expect("database");
    let telemetry = Arc::new(Telemetry::default());
    let entries = config
        .devices
        .iter()
        .map(|d| {
            let id = DeviceId::new(d.id());
            DeviceEntry {
                counters: telemetry.source(&id),
                id,
                kind: d.kind(),
            }
        })
        .collect();
    let (live, _) = tokio::sync::broadcast::channel(4);
    let writer = Writer::new(
        pool,
        entries,
        config.storage.retention.clone(),
        telemetry.clone(),
        live,
    )
    .await
    .expect("writer");
    let (input, rx) = tokio::sync::mpsc::channel(1);
    let written_before = bytes_written();
    let cpu_before = cpu_time();
    let start = Instant::now();
    let writing = tokio::spawn(writer.run(rx));
    for batch in batches {
        input.send(batch).await.expect("writer running");
    }
    drop(input);
    writing.await.expect("writer task");
    let elapsed = start.elapsed();
    let written = bytes_written() - written_before;
    let cpu = cpu_time() - cpu_before;
    Run {
        rate: readings as f64 / elapsed.as_secs_f64(),
        cpu_per_reading: cpu / readings as u32,
        commit: Duration::from_micros(
            telemetry.writer.commit_micros.load(Ordering::Relaxed)
                / telemetry.writer.commits.load(Ordering::Relaxed).max(1),
        ),
        written_per_reading: written as f64 / readings as f64,
    }
}

/// CPU time (user and system) of this whole process so far: the writer task, sqlx's worker
/// thread and SQLite.
fn cpu_time() -> Duration {
    proc_stat::cpu_time("self")
}

/// Bytes this process has passed to `write` and its kin so far.
fn bytes_written() -> u64 {
    std::fs::read_to_string("/proc/self/io")
        .ok()
        .and_then(|io| {
            io.lines().find_map(|l| {
                l.strip_prefix("wchar: ")
                    .and_then(|v| v.trim().parse().ok())
            })
        })
        .unwrap_or(0)
}
