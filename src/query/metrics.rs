//! `/metrics` in the Prometheus text format: per-device counters and states from the
//! database (so they survive restarts), and the live gauges the gateway keeps in memory:
//! queue depths, commit durations, broker sessions, live-stream clients, heartbeat age.

use std::fmt::Write as _;
use std::sync::atomic::Ordering;

use axum::extract::State;
use axum::http::header;
use axum::response::IntoResponse;

use super::http::{ApiError, Shared};
use crate::reading::now_millis;
use crate::storage::read::DeviceRow;
use crate::telemetry::{COMMIT_BUCKETS_MS, Telemetry};

pub(super) async fn metrics(State(api): Shared) -> Result<impl IntoResponse, ApiError> {
    let devices = api.store.devices().await?;
    let text = render(&devices, &api.telemetry, now_millis());
    Ok((
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        text,
    ))
}

/// The whole exposition.
pub fn render(devices: &[DeviceRow], telemetry: &Telemetry, now: i64) -> String {
    let mut text = Exposition(String::with_capacity(4096 + devices.len() * 1024));

    let sources: std::collections::HashMap<String, _> = telemetry
        .sources()
        .into_iter()
        .map(|(id, counters)| (id.to_string(), counters))
        .collect();
    text.family(
        "sensorgate_messages_received_total",
        "counter",
        "Messages (publishes, lines, Modbus answers) a device's source received since the gateway started.",
    );
    for d in devices {
        let received = sources.get(&d.name).map_or(0, |c| c.received_total());
        text.sample(
            "sensorgate_messages_received_total",
            &[("device", &d.name)],
            received as f64,
        );
    }
    let stored: [(&str, &str, Column); 4] = [
        (
            "sensorgate_readings_stored_total",
            "Readings committed to the database.",
            |d| d.readings,
        ),
        (
            "sensorgate_rejections_stored_total",
            "Values or payloads stored as rejections.",
            |d| d.rejections,
        ),
        (
            "sensorgate_duplicates_total",
            "Readings not stored again because their key was already stored.",
            |d| d.duplicates,
        ),
        (
            "sensorgate_dropped_total",
            "Messages dropped by the drop_newest overflow policy.",
            |d| d.dropped,
        ),
    ];
    for (name, help, value) in stored {
        text.family(name, "counter", help);
        for d in devices {
            text.sample(name, &[("device", &d.name)], value(d) as f64);
        }
    }
    text.family(
        "sensorgate_device_faults_total",
        "counter",
        "Transport and protocol faults per device: reconnects, timeouts, crc_errors, exceptions.",
    );
    for d in devices {
        for (kind, n) in [
            ("reconnects", d.reconnects),
            ("timeouts", d.timeouts),
            ("crc_errors", d.crc_errors),
            ("exceptions", d.exceptions),
        ] {
            text.sample(
                "sensorgate_device_faults_total",
                &[("device", &d.name), ("kind", kind)],
                n as f64,
            );
        }
    }
    text.family(
        "sensorgate_device_state",
        "gauge",
        "1 for the device's current state: starting, connected, stale, failing or stopped.",
    );
    for d in devices {
        for state in ["starting", "connected", "stale", "failing", "stopped"] {
            let on = if d.state == state { 1.0 } else { 0.0 };
            text.sample(
                "sensorgate_device_state",
                &[("device", &d.name), ("state", state)],
                on,
            );
        }
    }
    text.family(
        "sensorgate_device_last_seen_seconds",
        "gauge",
        "When the device last sent something, in Unix seconds.",
    );
    for d in devices {
        if let Some(seen) = d.last_seen {
            text.sample(
                "sensorgate_device_last_seen_seconds",
                &[("device", &d.name)],
                seen as f64 / 1000.0,
            );
        }
    }

    text.family(
        "sensorgate_queue_depth",
        "gauge",
        "Items waiting in a pipeline channel.",
    );
    let queues = telemetry.queues();
    for (queue, depth, _) in &queues {
        text.sample("sensorgate_queue_depth", &[("queue", queue)], *depth as f64);
    }
    text.family(
        "sensorgate_queue_capacity",
        "gauge",
        "A pipeline channel's capacity.",
    );
    for (queue, _, capacity) in &queues {
        text.sample(
            "sensorgate_queue_capacity",
            &[("queue", queue)],
            *capacity as f64,
        );
    }

    let writer = &telemetry.writer;
    text.family(
        "sensorgate_commit_duration_seconds",
        "histogram",
        "How long the writer took to commit one batch.",
    );
    let mut cumulative = 0;
    for (i, bound) in COMMIT_BUCKETS_MS.iter().enumerate() {
        cumulative += writer.commit_buckets[i].load(Ordering::Relaxed);
        let le = format!("{}", *bound as f64 / 1000.0);
        text.sample(
            "sensorgate_commit_duration_seconds_bucket",
            &[("le", &le)],
            cumulative as f64,
        );
    }
    let commits = writer.commits.load(Ordering::Relaxed);
    text.sample(
        "sensorgate_commit_duration_seconds_bucket",
        &[("le", "+Inf")],
        commits as f64,
    );
    let micros = writer.commit_micros.load(Ordering::Relaxed);
    text.sample(
        "sensorgate_commit_duration_seconds_sum",
        &[],
        micros as f64 / 1e6,
    );
    text.sample(
        "sensorgate_commit_duration_seconds_count",
        &[],
        commits as f64,
    );
    text.family(
        "sensorgate_writer_failing",
        "gauge",
        "1 while the last commit failed and is being retried (disk full, database locked).",
    );
    let failing = f64::from(u8::from(writer.failing.load(Ordering::Relaxed)));
    text.sample("sensorgate_writer_failing", &[], failing);

    text.family(
        "sensorgate_broker_connected",
        "gauge",
        "1 while the broker session is connected and subscribed.",
    );
    let brokers = telemetry.brokers();
    for (broker, gauges) in &brokers {
        let up = f64::from(u8::from(gauges.connected.load(Ordering::Relaxed)));
        text.sample("sensorgate_broker_connected", &[("broker", broker)], up);
    }
    text.family(
        "sensorgate_broker_unacked",
        "gauge",
        "Messages received from the broker and not yet acknowledged (in flight to the database).",
    );
    for (broker, gauges) in &brokers {
        let unacked = gauges.unacked.load(Ordering::Relaxed);
        text.sample(
            "sensorgate_broker_unacked",
            &[("broker", broker)],
            unacked as f64,
        );
    }

    text.family(
        "sensorgate_stream_clients",
        "gauge",
        "Open live-stream connections.",
    );
    let clients = telemetry.stream_clients.load(Ordering::Relaxed);
    text.sample("sensorgate_stream_clients", &[], clients as f64);
    text.family(
        "sensorgate_stream_skipped_batches_total",
        "counter",
        "Commits a slow live-stream client skipped instead of slowing the writer.",
    );
    let skipped = telemetry.stream_skipped.load(Ordering::Relaxed);
    text.sample(
        "sensorgate_stream_skipped_batches_total",
        &[],
        skipped as f64,
    );
    text.family(
        "sensorgate_heartbeat_age_seconds",
        "gauge",
        "Since the newest heartbeat that passed the whole pipeline was sent.",
    );
    let last = telemetry.last_heartbeat();
    if last > 0 {
        text.sample(
            "sensorgate_heartbeat_age_seconds",
            &[],
            (now - last) as f64 / 1000.0,
        );
    }
    text.family(
        "sensorgate_start_time_seconds",
        "gauge",
        "When the gateway started, in Unix seconds.",
    );
    text.sample(
        "sensorgate_start_time_seconds",
        &[],
        telemetry.started_at as f64 / 1000.0,
    );
    text.0
}

/// A stored per-device counter.
type Column = fn(&DeviceRow) -> i64;

/// The text being built, family by family.
struct Exposition(String);

impl Exposition {
    fn family(&mut self, name: &str, kind: &str, help: &str) {
        let _ = writeln!(self.0, "# HELP {name} {help}\n# TYPE {name} {kind}");
    }

    fn sample(&mut self, name: &str, labels: &[(&str, &str)], value: f64) {
        self.0.push_str(name);
        if !labels.is_empty() {
            self.0.push('{');
            for (i, (key, val)) in labels.iter().enumerate() {
                if i > 0 {
                    self.0.push(',');
                }
                let _ = write!(self.0, "{key}=\"{}\"", escape(val));
            }
            self.0.push('}');
        }
        let _ = writeln!(self.0, " {value}");
    }
}

/// A label value with `\`, `"` and newlines escaped.
fn escape(value: &str) -> std::borrow::Cow<'_, str> {
    if value.contains(['\\', '"', '\n']) {
        value
            .replace('\\', "\\\\")
            .replace('"', "\\\"")
            .replace('\n', "\\n")
            .into()
    } else {
        value.into()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn device(name: &str, state: &str) -> DeviceRow {
        DeviceRow {
            name: name.into(),
            kind: "mqtt".into(),
            state: state.into(),
            state_since: None,
            last_error: None,
            last_seen: Some(1_700_000_000_000),
            readings: 42,
            rejections: 1,
            duplicates: 0,
            dropped: 0,
            reconnects: 0,
            timeouts: 3,
            crc_errors: 0,
            exceptions: 0,
        }
    }

    #[test]
    fn every_sample_belongs_to_a_declared_family() {
        let telemetry = Telemetry::default();
        telemetry
            .writer
            .record_commit(std::time::Duration::from_millis(7), 10, 0);
        let text = render(
            &[device("a\"b", "connected")],
            &telemetry,
            1_700_000_000_000,
        );
        let mut declared = std::collections::HashSet::new();
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                declared.insert(rest.split(' ').next().unwrap().to_string());
            } else if !line.starts_with('#') {
                let name = line.split(['{', ' ']).next().unwrap();
                let family = name
                    .trim_end_matches("_bucket")
                    .trim_end_matches("_sum")
                    .trim_end_matches("_count");
                assert!(
                    declared.contains(family) || declared.contains(name),
                    "{line}"
                );
            }
        }
        assert!(
            text.contains("sensorgate_readings_stored_total{device=\"a\\\"b\"} 42"),
            "{text}"
        );
        assert!(text.contains("sensorgate_device_state{device=\"a\\\"b\",state=\"connected\"} 1"));
        assert!(
            text.contains("sensorgate_device_faults_total{device=\"a\\\"b\",kind=\"timeouts\"} 3")
        );
        assert!(text.contains("sensorgate_commit_duration_seconds_bucket{le=\"0.01\"} 1"));
        assert!(text.contains("sensorgate_commit_duration_seconds_count 1"));
    }
}
