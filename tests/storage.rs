//! Storage across its two reading tables: each commit appends to `readings_recent`, and the
//! writer moves those rows into `readings_archive` in bulk. Queries, counters and
//! idempotency must not see the seam.

use std::path::Path;
use std::sync::Arc;

use sensorgate::config::Config;
use sensorgate::pipeline::aggregate::Batcher;
use sensorgate::pipeline::validate::Validator;
use sensorgate::reading::{Bytes, DeviceId, Message, Millis, RawReading};
use sensorgate::storage::read::{Range, SeriesQuery};
use sensorgate::storage::writer::DeviceEntry;
use sensorgate::storage::{ReadStore, Writer, open_for_writing};
use sensorgate::telemetry::Telemetry;

const NOW: Millis = 1_700_000_000_000;

fn config(db: &Path) -> Config {
    let text = format!(
        "[storage]\npath = \"{}\"\n[storage.retention]\nreadings = \"forever\"\nrollups = \"forever\"\n\
         [[brokers]]\nurl = \"mqtt://127.0.0.1\"\n\
         [[devices]]\nkind = \"mqtt\"\nid = \"pump\"\ntopic = \"pump\"\nformat = \"json\"\n\
         [[devices.metrics]]\nname = \"flow\"\n",
        db.display()
    );
    sensorgate::config::parse(&text, Path::new("storage.toml")).expect("the config is valid")
}

/// Writes each batch of `(time, value)` readings of `pump/flow` in its own transaction,
/// moving recent readings into the archive once `archive_at_rows` of them gather.
async fn write(config: &Config, batches: &[&[(Millis, f64)]], archive_at_rows: u64) {
    let pool = open_for_writing(&config.storage).await.unwrap();
    let telemetry = Arc::new(Telemetry::default());
    let id = DeviceId::new("pump");
    let entry = DeviceEntry {
        counters: telemetry.source(&id),
        id: id.clone(),
        kind: "mqtt",
    };
    let (live, _) = tokio::sync::broadcast::channel(4);
    let writer = Writer::new(
        pool,
        vec![entry],
        config.storage.retention.clone(),
        telemetry,
        live,
    )
    .await
    .unwrap()
    .archive_at_rows(archive_at_rows);
    let (input, rx) = tokio::sync::mpsc::channel(1);
    let writing = tokio::spawn(writer.run(rx));
    let mut validator = Validator::new(config, &[]);
    let mut batcher = Batcher::new(vec![60_000], 1000, usize::MAX);
    for batch in batches {
        for &(time, value) in *batch {
            let message = Message {
                device: id.clone(),
                source: Arc::from("pump"),
                received_at: NOW,
                raw: Bytes::new(),
                decoded: Ok(vec![RawReading {
                    field: "flow".into(),
                    value,
                    unit: None,
                    source_time: Some(time),
                }]
                .into()),
                ticket: None,
            };
            let checked = validator.check(&message);
            batcher.push(&id, checked, None);
        }
        input.send(batcher.take()).await.unwrap();
    }
    drop(input);
    writing.await.unwrap();
}

fn count(db: &Path, sql: &str) -> i64 {
    rusqlite::Connection::open(db)
        .unwrap()
        .query_row(sql, [], |r| r.get(0))
        .unwrap()
}

fn day() -> SeriesQuery {
    SeriesQuery {
        device: "pump".into(),
        metric: None,
        range: Range {
            from: NOW - 86_400_000,
            to: NOW + 1,
            limit: 1000,
        },
        after: None,
    }
}

#[tokio::test]
async fn readings_moved_into_the_archive_stay_queryable_once_and_in_order() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("gateway.db");
    let config = config(&db);
    let t = |i: i64| NOW - 10_000 + i * 1000;
    let first: Vec<(Millis, f64)> = (0..5).map(|i| (t(i), i as f64)).collect();
    // Two new readings, and the third of the first batch again (a redelivery) after the
    // first batch was archived.
    let second = [(t(6), 6.0), (t(2), 99.0), (t(5), 5.0)];
    write(&config, &[&first, &second], 3).await;

    assert_eq!(count(&db, "SELECT count(*) FROM readings_archive"), 5);
    assert_eq!(count(&db, "SELECT count(*) FROM readings_recent"), 2);
    let store = ReadStore::open(&db).unwrap();
    let rows = store.readings(day()).await.unwrap();
    let got: Vec<(Millis, f64)> = rows.iter().map(|r| (r.time, r.value)).collect();
    let mut want = first.clone();
    want.extend([(t(5), 5.0), (t(6), 6.0)]);
    assert_eq!(
        got, want,
        "each key once, the first arrival kept, oldest first"
    );

    let device = store.device("pump").await.unwrap();
    assert_eq!((device.readings, device.duplicates), (7, 1));
    let newest = store.last_values(Some("pump")).await.unwrap();
    assert_eq!(
        newest.iter().map(|v| (v.time, v.value)).collect::<Vec<_>>(),
        vec![(t(6), 6.0)]
    );
    assert_eq!(
        count(&db, "SELECT sum(n) FROM rollups"),
        7,
        "rollups count each stored reading once"
    );
}

#[tokio::test]
async fn the_newest_value_is_found_in_the_archive_when_nothing_is_recent() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("gateway.db");
    let config = config(&db);
    write(&config, &[&[(NOW - 2000, 1.0), (NOW - 1000, 2.0)]], 1).await;
    assert_eq!(count(&db, "SELECT count(*) FROM readings_recent"), 0);
    let newest = ReadStore::open(&db)
        .unwrap()
        .last_values(None)
        .await
        .unwrap();
    assert_eq!(
        newest
            .iter()
            .map(|v| (v.device.as_str(), v.time, v.value))
            .collect::<Vec<_>>(),
        vec![("pump", NOW - 1000, 2.0)]
    );
}

#[tokio::test]
async fn a_database_from_before_the_archive_keeps_its_readings_and_their_keys() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("gateway.db");
    // The schema as it was before migration 3, with a stored reading.
    let old = dir.path().join("migrations");
    std::fs::create_dir(&old).unwrap();
    let migrations = Path::new(env!("CARGO_MANIFEST_DIR")).join("migrations");
    for name in ["0001_initial.sql", "0002_device_faults.sql"] {
        std::fs::copy(migrations.join(name), old.join(name)).unwrap();
    }
    {
        let options = sqlx::sqlite::SqliteConnectOptions::new()
            .filename(&db)
            .create_if_missing(true);
        let pool = sqlx::SqlitePool::connect_with(options).await.unwrap();
        sqlx::migrate::Migrator::new(old.as_path())
            .await
            .unwrap()
            .run(&pool)
            .await
            .unwrap();
        for sql in [
            "INSERT INTO devices (id, name, kind) VALUES (1, 'pump', 'mqtt')",
            "INSERT INTO series (id, device_id, metric) VALUES (1, 1, 'flow')",
        ] {
            sqlx::query(sql).execute(&pool).await.unwrap();
        }
        sqlx::query(
            "INSERT INTO readings (series_id, ts, received_at, value) VALUES (1, ?1, ?1, 4.5)",
        )
        .bind(NOW - 5000)
        .execute(&pool)
        .await
        .unwrap();
        pool.close().await;
    }

    let config = config(&db);
    // The old reading again (a redelivery after the upgrade) and a new one.
    write(&config, &[&[(NOW - 5000, 7.0), (NOW - 4000, 8.0)]], 1000).await;
    assert_eq!(count(&db, "SELECT count(*) FROM readings_archive"), 1);
    let rows = ReadStore::open(&db).unwrap().readings(day()).await.unwrap();
    assert_eq!(
        rows.iter().map(|r| (r.time, r.value)).collect::<Vec<_>>(),
        vec![(NOW - 5000, 4.5), (NOW - 4000, 8.0)]
    );
}
