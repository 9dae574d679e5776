//! Properties of the state the ingest path keeps, over random inputs (proptest):
//!
//! - Rollups: random readings, with duplicates, redeliveries and late readings, cut into
//!   batches at random, go through the real validator, batcher and writer into SQLite
//!   (which moves recent readings into the archive table after a random number of rows);
//!   the stored rollups then equal a recomputation from the stored raw readings, and the raw
//!   readings are the first arrival of each key. Merging rollup cells in any grouping and
//!   order equals computing the cell of all their readings.
//! - Acknowledgements: random interleavings of arrivals, device tasks forwarding, batches
//!   committing in any order, dropped messages and reconnects, through the real
//!   acknowledgement window and tickets: acknowledgements come out in arrival order, each
//!   once, never before the commit, and the window stays within its bound.
//!
//! Values are whole numbers, so sums are exact whatever order they are added in.

use std::collections::{BTreeMap, HashSet, VecDeque};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use proptest::prelude::*;
use sensorgate::config::Config;
use sensorgate::pipeline::aggregate::Batcher;
use sensorgate::pipeline::validate::Validator;
use sensorgate::reading::{
    Bytes, DeviceId, Message, Millis, RawReading, RollupCell, Settle, Ticket,
};
use sensorgate::sources::ack::AckWindow;
use sensorgate::storage::writer::DeviceEntry;
use sensorgate::storage::{Writer, open_for_writing};
use sensorgate::telemetry::Telemetry;

const NOW: Millis = 1_700_000_000_000;
const DEVICES: [&str; 2] = ["a", "b"];
const METRICS: [&str; 2] = ["t", "h"];
/// Window widths: one that holds one or two slots, one that holds many.
const WIDTHS: [Millis; 2] = [1_000, 60_000];

// ---------------------------------------------------------------------------------------
// Rollups through the writer
// ---------------------------------------------------------------------------------------

/// One reading of a message: metric, time slot, value.
#[derive(Clone, Debug)]
struct Value {
    metric: usize,
    slot: u16,
    value: i16,
}

#[derive(Clone, Debug)]
enum Event {
    /// A message from a device with one or more readings.
    Message { device: usize, values: Vec<Value> },
    /// The broker delivers an earlier message again (the index wraps around).
    Redeliver(usize),
    /// The aggregate stage hands its batch to the writer here.
    Cut,
}

/// A slot's time: 40 slots over about two minutes, so 1 s buckets hold one or two
/// readings and 1 min buckets many; few slots, so keys repeat.
fn time_of(slot: u16) -> Millis {
    NOW - 120_000 + Millis::from(slot) * 2_900
}

fn value_strategy() -> impl Strategy<Value = Value> {
    (0..METRICS.len(), 0..40u16, -50..50i16).prop_map(|(metric, slot, value)| Value {
        metric,
        slot,
        value,
    })
}

fn events() -> impl Strategy<Value = Vec<Event>> {
    let event = prop_oneof![
        6 => (0..DEVICES.len(), prop::collection::vec(value_strategy(), 1..4))
            .prop_map(|(device, values)| Event::Message { device, values }),
        1 => any::<usize>().prop_map(Event::Redeliver),
        2 => Just(Event::Cut),
    ];
    prop::collection::vec(event, 1..80)
}

fn config(db: &Path) -> Config {
    let devices: String = DEVICES
        .iter()
        .map(|id| {
            format!(
                "[[devices]]\nkind = \"mqtt\"\nid = \"{id}\"\ntopic = \"{id}\"\nformat = \"json\"\n"
            )
        })
        .collect();
    let text = format!(
        "[storage]\npath = \"{}\"\nsynchronous = \"normal\"\n\
         [storage.retention]\nreadings = \"forever\"\nrollups = \"forever\"\nrejections = \"forever\"\n\
         [rollups]\nwindows = [\"1s\", \"1m\"]\n\
         [[brokers]]\nurl = \"mqtt://127.0.0.1\"\n{devices}",
        db.display()
    );
    sensorgate::config::parse(&text, Path::new("properties.toml")).expect("the config is valid")
}

type Key = (String, String, Millis);
/// `(device, metric, width, bucket)`.
type CellKey = (String, String, Millis, Millis);

/// What the database holds after the run: raw readings, rollups, and the devices'
/// reading and duplicate counters.
struct Stored {
    readings: BTreeMap<Key, f64>,
    rollups: BTreeMap<CellKey, RollupCell>,
    counted_readings: i64,
    counted_duplicates: i64,
}

fn read_back(db: &Path) -> Stored {
    let conn = rusqlite::Connection::open(db).unwrap();
    let mut readings = BTreeMap::new();
    let mut stmt = conn
        .prepare(
            "SELECT d.name, s.metric, r.ts, r.value FROM readings r \
             JOIN series s ON s.id = r.series_id JOIN devices d ON d.id = s.device_id",
        )
        .unwrap();
    let rows = stmt
        .query_map([], |r| Ok(((r.get(0)?, r.get(1)?, r.get(2)?), r.get(3)?)))
        .unwrap();
    for row in rows {
        let (key, value) = row.unwrap();
        readings.insert(key, value);
    }
    let mut rollups = BTreeMap::new();
    let mut stmt = conn
        .prepare(
            "SELECT d.name, s.metric, width_ms, bucket, n, min_v, max_v, sum_v, first_ts, \
             first_v, last_ts, last_v FROM rollups r \
             JOIN series s ON s.id = r.series_id JOIN devices d ON d.id = s.device_id",
        )
        .unwrap();
    let rows = stmt
        .query_map([], |r| {
            let key: CellKey = (r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?);
            let cell = RollupCell {
                count: r.get(4)?,
                min: r.get(5)?,
                max: r.get(6)?,
                sum: r.get(7)?,
                first_time: r.get(8)?,
                first: r.get(9)?,
                last_time: r.get(10)?,
                last: r.get(11)?,
            };
            Ok((key, cell))
        })
        .unwrap();
    for row in rows {
        let (key, cell) = row.unwrap();
        rollups.insert(key, cell);
    }
    let (counted_readings, counted_duplicates) = conn
        .query_row(
            "SELECT sum(readings), sum(duplicates) FROM devices",
            [],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .unwrap();
    Stored {
        readings,
        rollups,
        counted_readings,
        counted_duplicates,
    }
}

/// The rollup cells the raw readings imply, computed from scratch: count, min, max, sum,
/// and first and last by time.
fn recompute(readings: &BTreeMap<Key, f64>) -> BTreeMap<CellKey, RollupCell> {
    let mut cells: BTreeMap<CellKey, RollupCell> = BTreeMap::new();
    // In key order, so time order within each series: first is the first seen, last the
    // last.
    for ((device, metric, time), &value) in readings {
        for width in WIDTHS {
            let bucket = time - time.rem_euclid(width);
            let key = (device.clone(), metric.clone(), width, bucket);
            match cells.get_mut(&key) {
                None => {
                    cells.insert(key, RollupCell::of(*time, value));
                }
                Some(cell) => {
                    cell.count += 1;
                    cell.min = cell.min.min(value);
                    cell.max = cell.max.max(value);
                    cell.sum += value;
                    cell.last_time = *time;
                    cell.last = value;
                }
            }
        }
    }
    cells
}

/// Sends `events` through validation, aggregation and the writer into a new database.
/// Returns what went in, in arrival order.
fn ingest(db: &Path, events: &[Event], archive_at_rows: u64) -> Vec<(Key, f64)> {
    let config = config(db);
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let pool = open_for_writing(&config.storage).await.unwrap();
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
            telemetry,
            live,
        )
        .await
        .unwrap()
        .archive_at_rows(archive_at_rows);
        let (batches, input) = tokio::sync::mpsc::channel(1);
        let writing = tokio::spawn(writer.run(input));

        let mut validator = Validator::new(&config, &[]);
        let mut batcher = Batcher::new(WIDTHS.to_vec(), config.storage.batch_size, usize::MAX);
        let mut delivered: Vec<(usize, Vec<Value>)> = Vec::new();
        let mut sent = Vec::new();
        for event in events {
            let (device, values) = match event {
                Event::Cut => {
                    if !batcher.is_empty() {
                        batches.send(batcher.take()).await.unwrap();
                    }
                    continue;
                }
                Event::Message { device, values } => (*device, values.clone()),
                Event::Redeliver(i) if !delivered.is_empty() => {
                    delivered[i % delivered.len()].clone()
                }
                Event::Redeliver(_) => continue,
            };
            delivered.push((device, values.clone()));
            let id = DeviceId::new(DEVICES[device]);
            let raw: Vec<RawReading> = values
                .iter()
                .map(|v| RawReading {
                    field: METRICS[v.metric].into(),
                    value: f64::from(v.value),
                    unit: None,
                    source_time: Some(time_of(v.slot)),
                })
                .collect();
            let message = Message {
                device: id.clone(),
                source: Arc::from(DEVICES[device]),
                received_at: NOW,
                raw: Bytes::new(),
                decoded: Ok(raw.into()),
                ticket: None,
            };
            let checked = validator.check(&message);
            assert_eq!(checked.rejection, None, "every reading here is valid");
            batcher.push(&id, checked, None);
            for v in &values {
                let key = (
                    DEVICES[device].to_string(),
                    METRICS[v.metric].to_string(),
                    time_of(v.slot),
                );
                sent.push((key, f64::from(v.value)));
            }
        }
        if !batcher.is_empty() {
            batches.send(batcher.take()).await.unwrap();
        }
        drop(batches);
        writing.await.unwrap();
        sent
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(96))]

    /// Invariant 3 of DESIGN.md, for any batching of any arrival order.
    #[test]
    fn stored_rollups_equal_a_recomputation_from_the_stored_readings(
        events in events(),
        archive_at_rows in 1..40u64,
    ) {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("properties.db");
        let sent = ingest(&db, &events, archive_at_rows);
        let stored = read_back(&db);

        // Storage is idempotent: the first arrival of each key is what is kept.
        let mut first: BTreeMap<Key, f64> = BTreeMap::new();
        for (key, value) in &sent {
            first.entry(key.clone()).or_insert(*value);
        }
        prop_assert_eq!(&stored.readings, &first);
        prop_assert_eq!(stored.rollups, recompute(&stored.readings));
        // Nothing lost silently: every reading is stored or counted as a duplicate.
        prop_assert_eq!(stored.counted_readings, first.len() as i64);
        prop_assert_eq!(
            stored.counted_duplicates,
            (sent.len() - first.len()) as i64
        );
    }

    /// `RollupCell::merge` is what the writer's upsert does in SQL and what a batch does
    /// in memory: any grouping of readings, merged in any order, gives the cell of all.
    #[test]
    fn merging_cells_in_any_grouping_and_order_equals_the_cell_of_all(
        readings in prop::collection::btree_map(-5_000..5_000i64, -100..100i16, 1..40),
        groups in prop::collection::vec(0..6usize, 40),
        order in Just((0..6usize).collect::<Vec<_>>()).prop_shuffle(),
    ) {
        let mut cells: Vec<Option<RollupCell>> = vec![None; 6];
        for (i, (&time, &value)) in readings.iter().enumerate() {
            let cell = RollupCell::of(time, f64::from(value));
            match &mut cells[groups[i]] {
                Some(c) => c.merge(&cell),
                slot @ None => *slot = Some(cell),
            }
        }
        let mut merged: Option<RollupCell> = None;
        for i in order {
            if let Some(cell) = &cells[i] {
                match &mut merged {
                    Some(m) => m.merge(cell),
                    None => merged = Some(*cell),
                }
            }
        }
        let (first_time, last_time) = (
            *readings.keys().next().unwrap(),
            *readings.keys().last().unwrap(),
        );
        let merged = merged.unwrap();
        prop_assert_eq!(merged.count, readings.len() as i64);
        prop_assert_eq!((merged.first_time, merged.last_time), (first_time, last_time));
        prop_assert_eq!(merged.first, f64::from(readings[&first_time]));
        prop_assert_eq!(merged.last, f64::from(readings[&last_time]));
        prop_assert_eq!(merged.sum, readings.values().map(|v| f64::from(*v)).sum::<f64>());
        prop_assert_eq!(merged.min, readings.values().map(|v| f64::from(*v)).fold(f64::INFINITY, f64::min));
        prop_assert_eq!(merged.max, readings.values().map(|v| f64::from(*v)).fold(f64::NEG_INFINITY, f64::max));
    }
}

// ---------------------------------------------------------------------------------------
// Acknowledgement order
// ---------------------------------------------------------------------------------------

/// The session's side of the window, as `sources::mqtt` keeps it: tickets settle into the
/// window; an abandoned ticket makes the session reconnect.
#[derive(Default)]
struct Board {
    window: Mutex<AckWindow<u64>>,
    abandoned: AtomicBool,
}

impl Settle for Board {
    fn settle(&self, generation: u64, seq: u64) {
        self.window.lock().unwrap().settle(generation, seq);
    }

    fn abandon(&self, generation: u64, _seq: u64) {
        if self.window.lock().unwrap().generation() == generation {
            self.abandoned.store(true, Ordering::Relaxed);
        }
    }
}

/// `max_unacked`: the session stops reading while this many messages wait.
const BOUND: usize = 8;
const ACK_DEVICES: usize = 3;

#[derive(Clone, Debug)]
enum Step {
    /// A publish arrives for a device (when the session reads: the window has room).
    Arrive(usize),
    /// A device task hands its oldest message to the pipeline's open batch.
    Forward(usize),
    /// The open batch goes to a writer.
    Cut,
    /// A batch commits: any of those waiting, not necessarily the oldest.
    Commit(usize),
    /// A device task drops its oldest message unsettled (the ticket is dropped).
    Drop(usize),
    /// The session acknowledges what is due.
    Acknowledge,
    /// The connection breaks.
    Reconnect,
}

fn steps() -> impl Strategy<Value = Vec<Step>> {
    let step = prop_oneof![
        6 => (0..ACK_DEVICES).prop_map(Step::Arrive),
        5 => (0..ACK_DEVICES).prop_map(Step::Forward),
        2 => Just(Step::Cut),
        3 => any::<usize>().prop_map(Step::Commit),
        3 => Just(Step::Acknowledge),
        1 => Just(Step::Reconnect),
        1 => (0..ACK_DEVICES).prop_map(Step::Drop),
    ];
    prop::collection::vec(step, 1..200)
}

/// The gateway around the window: device inboxes, the open batch, batches waiting to
/// commit, and what the test saw.
struct Ack {
    board: Arc<Board>,
    inboxes: Vec<VecDeque<(u64, Ticket)>>,
    open: Vec<(u64, Ticket)>,
    batches: Vec<Vec<(u64, Ticket)>>,
    /// Per generation, the messages in arrival order.
    arrivals: BTreeMap<u64, Vec<u64>>,
    acked: BTreeMap<u64, Vec<u64>>,
    committed: HashSet<u64>,
    next: u64,
}

impl Ack {
    fn new() -> Self {
        Self {
            board: Arc::new(Board::default()),
            inboxes: (0..ACK_DEVICES).map(|_| VecDeque::new()).collect(),
            open: Vec::new(),
            batches: Vec::new(),
            arrivals: BTreeMap::new(),
            acked: BTreeMap::new(),
            committed: HashSet::new(),
            next: 0,
        }
    }

    fn window(&self) -> std::sync::MutexGuard<'_, AckWindow<u64>> {
        self.board.window.lock().unwrap()
    }

    fn step(&mut self, step: &Step) -> Result<(), TestCaseError> {
        match *step {
            Step::Arrive(device) => {
                if self.window().len() < BOUND {
                    let id = self.next;
                    self.next += 1;
                    let (generation, seq) = self.window().push(id);
                    self.arrivals.entry(generation).or_default().push(id);
                    let ticket = Ticket::new(self.board.clone(), generation, seq);
                    self.inboxes[device].push_back((id, ticket));
                }
            }
            Step::Forward(device) => {
                if let Some(message) = self.inboxes[device].pop_front() {
                    self.open.push(message);
                }
            }
            Step::Cut => {
                if !self.open.is_empty() {
                    self.batches.push(std::mem::take(&mut self.open));
                }
            }
            Step::Commit(i) => {
                if !self.batches.is_empty() {
                    let batch = self.batches.remove(i % self.batches.len());
                    for (id, ticket) in batch {
                        self.committed.insert(id);
                        ticket.settle();
                    }
                }
            }
            Step::Drop(device) => {
                self.inboxes[device].pop_front();
            }
            Step::Acknowledge => {
                if self.board.abandoned.swap(false, Ordering::Relaxed) {
                    self.window().reset();
                }
                let generation = self.window().generation();
                loop {
                    let Some(id) = self.window().pop_ready() else {
                        break;
                    };
                    prop_assert!(
                        self.committed.contains(&id),
                        "{id} acknowledged before its commit"
                    );
                    self.acked.entry(generation).or_default().push(id);
                }
            }
            Step::Reconnect => self.window().reset(),
        }
        let held = self.window().len();
        prop_assert!(held <= BOUND, "window {held} over {BOUND}");
        // In every connection, what was acknowledged is the arrivals' prefix, in order,
        // each once.
        for (generation, acked) in &self.acked {
            let arrived = &self.arrivals[generation];
            prop_assert!(acked.len() <= arrived.len());
            prop_assert_eq!(acked.as_slice(), &arrived[..acked.len()]);
        }
        Ok(())
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(1024))]

    #[test]
    fn acknowledgements_follow_arrival_order_and_never_precede_the_commit(steps in steps()) {
        let mut ack = Ack::new();
        for step in &steps {
            ack.step(step)?;
        }
        // Drain: every device forwards everything, every batch commits.
        for device in 0..ACK_DEVICES {
            while !ack.inboxes[device].is_empty() {
                ack.step(&Step::Forward(device))?;
            }
        }
        ack.step(&Step::Cut)?;
        while !ack.batches.is_empty() {
            ack.step(&Step::Commit(0))?;
        }
        let abandoned = ack.board.abandoned.load(Ordering::Relaxed);
        ack.step(&Step::Acknowledge)?;
        // Unless a message was dropped (the session then reconnects and the broker delivers
        // again), everything of the current connection is acknowledged.
        let generation = ack.window().generation();
        if !abandoned {
            prop_assert!(ack.window().is_empty());
            prop_assert_eq!(
                ack.acked.get(&generation).map_or(0, Vec::len),
                ack.arrivals.get(&generation).map_or(0, Vec::len)
            );
        }
    }
}
