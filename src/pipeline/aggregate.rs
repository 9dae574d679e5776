//! Aggregation: checked messages gather into one [`Batch`] per transaction, with the rollup
//! cells their readings imply. Pure; the async loop in `pipeline` decides when to flush.

use std::collections::HashMap;
use std::sync::Arc;

use crate::config::Config;
use crate::reading::{
    DeviceId, FastSet, FaultCounts, Millis, Rollups, SeriesKey, StatusChange, Ticket,
};
use crate::storage::Batch;

use super::validate::Checked;

/// Raw bytes of rejected payloads that fill a batch whatever its row count. A rejection
/// keeps its payload, up to its broker's `max_payload`: without this a flood of large
/// malformed payloads would hold `batch_size` of them in memory at once.
pub const MAX_REJECTED_BYTES: usize = 8 << 20;

pub struct Batcher {
    widths: Vec<Millis>,
    max_readings: usize,
    /// Unacknowledged messages that make a batch worth committing without waiting for the
    /// flush interval: see [`ack_threshold`].
    ack_threshold: usize,
    batch: Batch,
    /// By series key: the latest time among the batch's readings of that series. A reading
    /// after it repeats none of them, which is the common case (sensors count forward), and
    /// costs no lookup.
    latest: Vec<Millis>,
    /// Every key in the batch, once a reading came that was not after its series' latest:
    /// built from the batch then, and kept up until the batch is taken.
    keys: Option<FastSet<(SeriesKey, Millis)>>,
    /// Raw payload bytes of the batch's rejections.
    rejected_bytes: usize,
}

/// Half the smallest `max_unacked` of the config's brokers. A broker sends nothing more
/// once that many of its messages wait for their commit, so a batch holding half of them
/// goes to the writer at once, and the other half can arrive while it commits.
pub fn ack_threshold(config: &Config) -> usize {
    config
        .brokers
        .iter()
        .map(|b| usize::from(b.max_unacked) / 2)
        .min()
        .unwrap_or(usize::MAX)
        .max(1)
}

impl Batcher {
    pub fn new(widths: Vec<Millis>, max_readings: usize, ack_threshold: usize) -> Self {
        Self {
            batch: empty(&widths, 0),
            widths,
            max_readings,
            ack_threshold,
            latest: Vec::new(),
            keys: None,
            rejected_bytes: 0,
        }
    }

    /// Adds one message's outcome. A reading whose key is already in the batch is a
    /// redelivery: it is counted as a duplicate, not stored twice.
    pub fn push(&mut self, device: &DeviceId, checked: Checked, ticket: Option<Ticket>) {
        let batch = &mut self.batch;
        batch.messages += 1;
        for reading in checked.readings {
            let series = reading.series.key();
            let slot = series.0 as usize;
            if self.latest.len() <= slot {
                self.latest.resize(slot + 1, Millis::MIN);
            }
            let after_latest = reading.time > self.latest[slot];
            let keys = match &mut self.keys {
                Some(keys) => Some(keys),
                None if after_latest => None,
                None => Some(
                    self.keys.insert(
                        batch
                            .readings
                            .iter()
                            .map(|r| (r.series.key(), r.time))
                            .collect(),
                    ),
                ),
            };
            let fresh = keys.is_none_or(|keys| keys.insert((series, reading.time)));
            if fresh {
                self.latest[slot] = self.latest[slot].max(reading.time);
                batch.rollups.add(&reading);
                batch.readings.push(reading);
            } else {
                *batch.duplicates.entry(device.clone()).or_default() += 1;
            }
        }
        if let Some(rejection) = checked.rejection {
            self.rejected_bytes += rejection.raw.len();
            batch.rejections.push(rejection);
        }
        batch.tickets.extend(ticket);
    }

    pub fn push_status(&mut self, status: StatusChange) {
        self.batch.statuses.push(status);
    }

    pub fn push_faults(&mut self, device: DeviceId, counts: &FaultCounts) {
        self.batch.faults.entry(device).or_default().add(counts);
    }

    /// A reloaded config, applied by the writer before this batch's rows.
    pub fn push_reconfigure(&mut self, config: Arc<Config>) {
        self.ack_threshold = ack_threshold(&config);
        self.batch.reconfigure = Some(config);
    }

    pub fn push_heartbeat(&mut self, at: Millis) {
        self.batch.heartbeat = self.batch.heartbeat.max(Some(at));
    }

    pub fn is_empty(&self) -> bool {
        self.batch.messages == 0
            && self.batch.statuses.is_empty()
            && self.batch.faults.is_empty()
            && self.batch.heartbeat.is_none()
            && self.batch.reconfigure.is_none()
    }

    pub fn is_full(&self) -> bool {
        self.batch.readings.len() + self.batch.rejections.len() >= self.max_readings
            || self.batch.tickets.len() >= self.max_readings
            || self.rejected_bytes >= MAX_REJECTED_BYTES
    }

    /// Enough of its messages wait for acknowledgement that a broker may be holding back
    /// more until they are committed.
    pub fn holds_up_acks(&self) -> bool {
        self.batch.tickets.len() >= self.ack_threshold
    }

    pub fn take(&mut self) -> Batch {
        self.keys = None;
        self.latest.fill(Millis::MIN);
        self.rejected_bytes = 0;
        // The next batch is likely about as big: room for its readings up front, rather
        // than grown (and copied) by doubling. At most `max_readings` and a message more.
        let next = empty(&self.widths, self.batch.readings.len());
        std::mem::replace(&mut self.batch, next)
    }
}

fn empty(widths: &[Millis], readings: usize) -> Batch {
    Batch {
        readings: Vec::with_capacity(readings),
        rejections: Vec::new(),
        statuses: Vec::new(),
        rollups: Rollups::new(widths.to_vec()),
        tickets: Vec::new(),
        duplicates: HashMap::new(),
        faults: HashMap::new(),
        heartbeat: None,
        reconfigure: None,
        messages: 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::reading::{
        Bytes, Reading, ReadingFlags, RejectReason, Rejection, Series, SeriesInfo,
    };

    /// A message's outcome: `reading`, nothing rejected.
    fn only(reading: Reading) -> Checked {
        Checked {
            readings: vec![reading],
            rejection: None,
        }
    }

    fn reading(time: Millis, value: f64) -> Reading {
        Reading {
            series: Series::new(SeriesInfo {
                key: SeriesKey(0),
                device: DeviceId::new("d"),
                metric: Arc::from("t"),
                unit: None,
            }),
            value,
            time,
            received_at: time,
            flags: ReadingFlags(0),
        }
    }

    #[test]
    fn duplicate_keys_in_one_batch_are_counted_not_stored() {
        let mut b = Batcher::new(vec![60_000], 100, usize::MAX);
        let d = DeviceId::new("d");
        for _ in 0..2 {
            b.push(&d, only(reading(1000, 1.0)), None);
        }
        let batch = b.take();
        assert_eq!(batch.readings.len(), 1);
        assert_eq!(batch.duplicates[&d], 1);
        assert_eq!(batch.messages, 2);
        let cells: Vec<_> = batch.rollups.iter().collect();
        assert_eq!(cells.len(), 1);
        assert_eq!(cells[0].1.count, 1);
    }

    #[test]
    fn a_repeat_is_found_among_in_order_readings_late_ones_and_across_series() {
        let mut b = Batcher::new(vec![60_000], 100, usize::MAX);
        let d = DeviceId::new("d");
        let other = |time| {
            let mut r = reading(time, 0.0);
            r.series = Series::new(SeriesInfo {
                key: SeriesKey(3),
                device: d.clone(),
                metric: Arc::from("h"),
                unit: None,
            });
            r
        };
        let times = [1, 2, 3, 2, 0, 0, 4, 1, 5];
        let mut readings: Vec<Reading> = times.iter().map(|&t| reading(t, 1.0)).collect();
        // The same times in another series are no repeats.
        readings.extend([other(2), other(1), other(2)]);
        for r in readings {
            b.push(&d, only(r), None);
        }
        let batch = b.take();
        let kept: Vec<_> = batch
            .readings
            .iter()
            .map(|r| (r.series.key().0, r.time))
            .collect();
        assert_eq!(
            kept,
            [
                (0, 1),
                (0, 2),
                (0, 3),
                (0, 0),
                (0, 4),
                (0, 5),
                (3, 2),
                (3, 1)
            ]
        );
        assert_eq!(batch.duplicates[&d], 4);
        // A new batch starts with nothing seen.
        b.push(&d, only(reading(1, 1.0)), None);
        assert_eq!(b.take().readings.len(), 1);
    }

    #[test]
    fn rollup_cells_cover_each_window() {
        let mut b = Batcher::new(vec![60_000, 3_600_000], 100, usize::MAX);
        let d = DeviceId::new("d");
        let readings = vec![
            reading(59_000, 3.0),
            reading(61_000, 5.0),
            reading(1_000, 1.0),
        ];
        b.push(
            &d,
            Checked {
                readings,
                rejection: None,
            },
            None,
        );
        let batch = b.take();
        let mut cells: Vec<_> = batch.rollups.iter().map(|(k, c)| (k.1, k.2, *c)).collect();
        cells.sort_by_key(|c| (c.0, c.1));
        assert_eq!(cells.len(), 3);
        let (_, _, minute0) = cells[0];
        assert_eq!(
            (minute0.count, minute0.min, minute0.max, minute0.sum),
            (2, 1.0, 3.0, 4.0)
        );
        assert_eq!(
            (
                minute0.first_time,
                minute0.first,
                minute0.last_time,
                minute0.last
            ),
            (1_000, 1.0, 59_000, 3.0)
        );
        let (_, _, hour) = cells[2];
        assert_eq!((hour.count, hour.first, hour.last), (3, 1.0, 5.0));
    }

    #[test]
    fn the_ack_threshold_is_half_the_smallest_unacked_window() {
        let config = |windows: &[u16]| {
            let brokers: String = windows
                .iter()
                .enumerate()
                .map(|(i, w)| {
                    format!("[[brokers]]\nid = \"b{i}\"\nurl = \"mqtt://h\"\nclient_id = \"c{i}\"\nmax_unacked = {w}\n")
                })
                .collect();
            crate::config::parse(&brokers, std::path::Path::new("t.toml")).unwrap()
        };
        assert_eq!(ack_threshold(&config(&[1000, 300])), 150);
        assert_eq!(ack_threshold(&config(&[1])), 1);
        assert_eq!(ack_threshold(&config(&[])), usize::MAX);
    }

    #[test]
    fn is_full_at_the_configured_size() {
        let mut b = Batcher::new(vec![60_000], 2, usize::MAX);
        let d = DeviceId::new("d");
        b.push(&d, only(reading(1, 1.0)), None);
        assert!(!b.is_full());
        b.push(&d, only(reading(2, 1.0)), None);
        assert!(b.is_full());
        b.take();
        assert!(b.is_empty());
    }

    #[test]
    fn is_full_once_its_rejections_hold_max_rejected_bytes() {
        let mut b = Batcher::new(vec![60_000], 1_000_000, usize::MAX);
        let d = DeviceId::new("d");
        let big = Bytes::from(vec![b'x'; 1 << 20]);
        let rejected = || Checked {
            readings: vec![],
            rejection: Some(Rejection::whole(
                Some(DeviceId::new("d")),
                Arc::from("t"),
                0,
                RejectReason::Malformed,
                "invalid JSON".into(),
                big.clone(),
            )),
        };
        for _ in 0..(MAX_REJECTED_BYTES >> 20) - 1 {
            b.push(&d, rejected(), None);
        }
        assert!(!b.is_full());
        b.push(&d, rejected(), None);
        assert!(b.is_full());
        assert_eq!(b.take().rejections.len(), MAX_REJECTED_BYTES >> 20);
        b.push(&d, rejected(), None);
        assert!(!b.is_full(), "a new batch starts with no bytes");
    }
}
