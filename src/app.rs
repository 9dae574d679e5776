//! The gateway assembled: storage, pipeline and sources, and the order they stop in.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::Config;
use crate::pipeline::{self, aggregate::Batcher, validate::Validator};
use crate::reading::{DeviceId, DropCounter, Millis, SourceEvent};
use crate::sources;
use crate::storage::{self, StorageError, writer::DeviceEntry};

#[derive(Debug, thiserror::Error)]
pub enum AppError {
    #[error(transparent)]
    Storage(#[from] StorageError),
    #[error("drain did not finish within {0:?}; unacknowledged messages will be redelivered")]
    DrainTimeout(Duration),
}

/// A built gateway: the database is open and migrated, the pipeline runs, and sources start
/// in [`Gateway::run_until_stopped`].
pub struct Gateway {
    config: Config,
    events: mpsc::Sender<SourceEvent>,
    drop_counters: HashMap<DeviceId, Arc<DropCounter>>,
    pipeline: TaskTracker,
}

impl Gateway {
    /// Opens the database, registers the configured devices and starts the pipeline.
    ///
    /// # Errors
    /// When the database cannot be opened, migrated or written.
    pub async fn build(config: Config) -> Result<Self, AppError> {
        let storage_config = &config.storage;
        let pool = storage::open_for_writing(storage_config).await?;
        let drop_counters: HashMap<DeviceId, Arc<DropCounter>> = config
            .devices
            .iter()
            .map(|d| (DeviceId::new(d.id()), Arc::default()))
            .collect();
        let entries = config
            .devices
            .iter()
            .map(|d| {
                let id = DeviceId::new(d.id());
                DeviceEntry {
                    dropped: drop_counters[&id].clone(),
                    id,
                    kind: d.kind(),
                }
            })
            .collect();
        let writer = storage::Writer::new(pool, entries, storage_config.retention.clone()).await?;

        let capacity = config.pipeline.channel_capacity;
        let (events_tx, events_rx) = mpsc::channel(capacity);
        let (stage_tx, stage_rx) = mpsc::channel(capacity);
        // One batch waits while the writer commits the previous one.
        let (batch_tx, batch_rx) = mpsc::channel(1);
        let widths: Vec<Millis> = config
            .rollups
            .windows
            .iter()
            .map(|w| w.as_millis() as Millis)
            .collect();

        let pipeline = TaskTracker::new();
        pipeline.spawn(pipeline::validate(
            Validator::new(&config),
            events_rx,
            stage_tx,
        ));
        pipeline.spawn(pipeline::aggregate(
            Batcher::new(widths, storage_config.batch_size),
            storage_config.flush_interval,
            stage_rx,
            batch_tx,
        ));
        pipeline.spawn(writer.run(batch_rx));
        pipeline.close();
        Ok(Self {
            config,
            events: events_tx,
            drop_counters,
            pipeline,
        })
    }

    /// Starts the sources and runs until `shutdown` is cancelled, then drains: sources stop
    /// taking input, the pipeline empties, the writer commits its last batch and the sessions
    /// acknowledge what it held.
    ///
    /// # Errors
    /// [`AppError::DrainTimeout`] when the drain outlasts `pipeline.drain_timeout`.
    pub async fn run_until_stopped(self, shutdown: CancellationToken) -> Result<(), AppError> {
        let sources = TaskTracker::new();
        sources::spawn_all(
            &self.config,
            self.events.clone(),
            &self.drop_counters,
            &sources,
            &shutdown,
        );
        sources.close();
        drop(self.events);
        tracing::info!(
            devices = self.config.devices.len(),
            brokers = self.config.brokers.len(),
            database = %self.config.storage.path.display(),
            "Gateway running"
        );
        shutdown.cancelled().await;
        tracing::info!("Stopping: draining the pipeline");
        let deadline = self.config.pipeline.drain_timeout;
        let drained = tokio::time::timeout(deadline, async {
            sources.wait().await;
            self.pipeline.wait().await;
        })
        .await;
        match drained {
            Ok(()) => {
                tracing::info!("Stopped; everything received was committed");
                Ok(())
            }
            Err(_) => {
                tracing::error!(
                    sources_running = sources.len(),
                    pipeline_running = self.pipeline.len(),
                    "Drain deadline passed"
                );
                Err(AppError::DrainTimeout(deadline))
            }
        }
    }
}
