//! Live counters and gauges that the sources, the pipeline and the writer update and the
//! HTTP API reads for `/metrics` and `/readyz` (and the service for its watchdog). Plain
//! atomics behind shared handles: updating one never blocks or allocates.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::reading::{DeviceId, DeviceState, Millis, now_millis};

/// How often a heartbeat enters the pipeline; readiness and the watchdog look at when the
/// last one came out of the writer.
pub const HEARTBEAT_INTERVAL: Duration = Duration::from_secs(2);

/// Upper bounds (ms) of the commit-duration histogram's buckets.
pub const COMMIT_BUCKETS_MS: [u64; 12] = [1, 2, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000];

/// What a source counts for one device outside the pipeline.
#[derive(Debug, Default)]
pub struct SourceCounters {
    received: AtomicU64,
    dropped_total: AtomicU64,
    /// Dropped but not yet folded into the devices table.
    dropped_unstored: AtomicU64,
}

impl SourceCounters {
    /// A message (a publish, a line, a Modbus answer) arrived.
    pub fn received(&self) {
        self.received.fetch_add(1, Ordering::Relaxed);
    }

    /// A message was dropped by the `drop_newest` policy.
    pub fn dropped(&self) {
        self.dropped_total.fetch_add(1, Ordering::Relaxed);
        self.dropped_unstored.fetch_add(1, Ordering::Relaxed);
    }

    /// Drops not yet stored, for the writer to fold into the next commit.
    pub fn take_unstored_drops(&self) -> u64 {
        self.dropped_unstored.swap(0, Ordering::Relaxed)
    }

    /// Gives back drops the writer took for a commit that failed.
    pub fn restore_unstored_drops(&self, n: u64) {
        self.dropped_unstored.fetch_add(n, Ordering::Relaxed);
    }

    pub fn received_total(&self) -> u64 {
        self.received.load(Ordering::Relaxed)
    }

    pub fn dropped_total(&self) -> u64 {
        self.dropped_total.load(Ordering::Relaxed)
    }
}

/// One broker session's connection state and unacknowledged messages.
#[derive(Debug, Default)]
pub struct BrokerGauges {
    pub connected: AtomicBool,
    pub unacked: AtomicUsize,
}

/// The writer's commits.
#[derive(Debug, Default)]
pub struct WriterStats {
    pub commits: AtomicU64,
    pub commit_micros: AtomicU64,
    /// Per bucket of [`COMMIT_BUCKETS_MS`], then one for longer commits.
    pub commit_buckets: [AtomicU64; COMMIT_BUCKETS_MS.len() + 1],
    pub readings_stored: AtomicU64,
    pub rejections_stored: AtomicU64,
    /// The last commit failed and is being retried.
    pub failing: AtomicBool,
    pub last_error: Mutex<Option<String>>,
}

impl WriterStats {
    pub fn record_commit(&self, took: Duration, readings: u64, rejections: u64) {
        let ms = took.as_millis() as u64;
        let bucket = COMMIT_BUCKETS_MS
            .iter()
            .position(|bound| ms <= *bound)
            .unwrap_or(COMMIT_BUCKETS_MS.len());
        self.commit_buckets[bucket].fetch_add(1, Ordering::Relaxed);
        self.commits.fetch_add(1, Ordering::Relaxed);
        self.commit_micros
            .fetch_add(took.as_micros() as u64, Ordering::Relaxed);
        self.readings_stored.fetch_add(readings, Ordering::Relaxed);
        self.rejections_stored
            .fetch_add(rejections, Ordering::Relaxed);
        if self.failing.swap(false, Ordering::Relaxed) {
            *lock(&self.last_error) = None;
        }
    }

    pub fn record_failure(&self, error: String) {
        self.failing.store(true, Ordering::Relaxed);
        *lock(&self.last_error) = Some(error);
    }
}

/// A channel's fill level: `(queued, capacity)`, or `None` once it is closed.
pub type QueueDepth = Box<dyn Fn() -> Option<(usize, usize)> + Send + Sync>;

/// Everything the gateway reports about itself while it runs.
pub struct Telemetry {
    pub started_at: Millis,
    sources: Mutex<BTreeMap<DeviceId, Arc<SourceCounters>>>,
    /// Each device's state as last committed.
    states: Mutex<BTreeMap<DeviceId, DeviceState>>,
    /// Set once the sources run.
    running: tokio::sync::watch::Sender<bool>,
    brokers: Mutex<BTreeMap<String, Arc<BrokerGauges>>>,
    queues: Mutex<Vec<(&'static str, QueueDepth)>>,
    pub writer: WriterStats,
    /// When the newest heartbeat entered the pipeline and when the newest one left the
    /// writer (0: none yet).
    heartbeat_sent: AtomicI64,
    heartbeat_done: AtomicI64,
    pub stream_clients: AtomicI64,
    /// Batches of readings a slow live-stream client missed.
    pub stream_skipped: AtomicU64,
}

impl Default for Telemetry {
    fn default() -> Self {
        Self {
            started_at: now_millis(),
            sources: Mutex::default(),
            states: Mutex::default(),
            running: tokio::sync::watch::Sender::new(false),
            brokers: Mutex::default(),
            queues: Mutex::default(),
            writer: WriterStats::default(),
            heartbeat_sent: AtomicI64::new(0),
            heartbeat_done: AtomicI64::new(0),
            stream_clients: AtomicI64::new(0),
            stream_skipped: AtomicU64::new(0),
        }
    }
}

impl Telemetry {
    /// The counters of a device's source, created on first use.
    pub fn source(&self, device: &DeviceId) -> Arc<SourceCounters> {
        lock(&self.sources)
            .entry(device.clone())
            .or_default()
            .clone()
    }

    pub fn sources(&self) -> Vec<(DeviceId, Arc<SourceCounters>)> {
        lock(&self.sources)
            .iter()
            .map(|(d, c)| (d.clone(), c.clone()))
            .collect()
    }

    /// Records a device's state once it is committed.
    pub fn set_device_state(&self, device: &DeviceId, state: DeviceState) {
        lock(&self.states).insert(device.clone(), state);
    }

    /// Forgets a device that a reload removed.
    pub fn remove_device(&self, device: &DeviceId) {
        lock(&self.states).remove(device);
        lock(&self.sources).remove(device);
    }

    pub fn device_states(&self) -> Vec<DeviceState> {
        lock(&self.states).values().copied().collect()
    }

    pub fn readings_stored(&self) -> u64 {
        self.writer.readings_stored.load(Ordering::Relaxed)
    }

    /// The sources have started.
    pub fn mark_running(&self) {
        self.running.send_replace(true);
    }

    /// Waits until the sources have started.
    pub async fn wait_running(&self) {
        let mut running = self.running.subscribe();
        // The sender lives as long as `self`.
        let _ = running.wait_for(|r| *r).await;
    }

    /// The gauges of a broker session, created on first use.
    pub fn broker(&self, id: &str) -> Arc<BrokerGauges> {
        lock(&self.brokers)
            .entry(id.to_string())
            .or_default()
            .clone()
    }

    pub fn brokers(&self) -> Vec<(String, Arc<BrokerGauges>)> {
        lock(&self.brokers)
            .iter()
            .map(|(b, g)| (b.clone(), g.clone()))
            .collect()
    }

    /// Registers a channel whose fill level `/metrics` reports.
    pub fn add_queue(&self, name: &'static str, depth: QueueDepth) {
        lock(&self.queues).push((name, depth));
    }

    /// `(name, queued, capacity)` of every open channel.
    pub fn queues(&self) -> Vec<(&'static str, usize, usize)> {
        lock(&self.queues)
            .iter()
            .filter_map(|(name, depth)| depth().map(|(queued, cap)| (*name, queued, cap)))
            .collect()
    }

    pub fn heartbeat_sent(&self, at: Millis) {
        self.heartbeat_sent.store(at, Ordering::Relaxed);
    }

    /// A heartbeat sent at `at` came out of the writer: everything before it is committed.
    pub fn heartbeat_done(&self, at: Millis) {
        self.heartbeat_done.fetch_max(at, Ordering::Relaxed);
    }

    /// When the newest heartbeat that made it through the pipeline was sent; 0 before the
    /// first.
    pub fn last_heartbeat(&self) -> Millis {
        self.heartbeat_done.load(Ordering::Relaxed)
    }

    /// Whether the pipeline moves: the writer is not failing and a heartbeat made it through
    /// within `within` of `now`.
    ///
    /// # Errors
    /// Why not, in words for `/readyz` and the logs.
    pub fn moving(&self, now: Millis, within: Duration) -> Result<(), String> {
        if self.writer.failing.load(Ordering::Relaxed) {
            let error = lock(&self.writer.last_error).clone().unwrap_or_default();
            return Err(format!("the database is not writable: {error}"));
        }
        let done = self.last_heartbeat();
        if done == 0 {
            return Err("starting: no heartbeat has passed the pipeline yet".into());
        }
        let age = now - done;
        if age > within.as_millis() as Millis {
            return Err(format!(
                "the pipeline is stuck: the last heartbeat came through {age} ms ago"
            ));
        }
        Ok(())
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // Each update completes under the lock; a panic elsewhere leaves no half-written value.
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commits_land_in_their_histogram_bucket() {
        let stats = WriterStats::default();
        stats.record_commit(Duration::from_micros(800), 10, 1);
        stats.record_commit(Duration::from_millis(30), 5, 0);
        stats.record_commit(Duration::from_secs(9), 1, 0);
        let counts: Vec<u64> = stats
            .commit_buckets
            .iter()
            .map(|b| b.load(Ordering::Relaxed))
            .collect();
        assert_eq!(counts[0], 1);
        assert_eq!(counts[5], 1, "30 ms falls in the 50 ms bucket");
        assert_eq!(counts[COMMIT_BUCKETS_MS.len()], 1);
        assert_eq!(stats.readings_stored.load(Ordering::Relaxed), 16);
    }

    #[test]
    fn readiness_needs_a_recent_heartbeat_and_a_healthy_writer() {
        let t = Telemetry::default();
        assert!(t.moving(1_000, Duration::from_secs(5)).is_err());
        t.heartbeat_done(1_000);
        assert!(t.moving(3_000, Duration::from_secs(5)).is_ok());
        assert!(
            t.moving(9_000, Duration::from_secs(5))
                .unwrap_err()
                .contains("stuck")
        );
        t.writer.record_failure("disk full".into());
        assert!(
            t.moving(3_000, Duration::from_secs(5))
                .unwrap_err()
                .contains("disk full")
        );
        t.writer.record_commit(Duration::from_millis(1), 0, 0);
        assert!(t.moving(3_000, Duration::from_secs(5)).is_ok());
    }
}
