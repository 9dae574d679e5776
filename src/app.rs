//! The gateway assembled: storage, pipeline, sources and the HTTP API, and the order they
//! stop in.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{broadcast, mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::Config;
use crate::decode::DecodeLimits;
use crate::pipeline::{self, aggregate::Batcher, validate::Validator};
use crate::query::http::{HttpError, HttpServer};
use crate::reading::{DeviceId, Millis, SourceEvent, now_millis};
use crate::sources::{SourceChanges, SourceContext, Sources};
use crate::storage::{self, ReadStore, StorageError, writer::DeviceEntry};
use crate::telemetry::{HEARTBEAT_INTERVAL, Telemetry};

#[derive(Debug, thiserror::Error)]
pub enum AppError {
    #[error(transparent)]
    Storage(#[from] StorageError),
    #[error(transparent)]
    Http(#[from] HttpError),
    #[error("drain did not finish within {0:?}; unacknowledged messages will be redelivered")]
    DrainTimeout(Duration),
    #[error("the gateway has stopped; nothing to reload")]
    Stopped,
}

/// A changed config and where to report what it changed.
type ReloadRequest = (Config, oneshot::Sender<ReloadReport>);

/// Asks a running gateway to take a changed config.
#[derive(Clone)]
pub struct Reloader(mpsc::Sender<ReloadRequest>);

impl Reloader {
    /// Applies `config` (already loaded and checked) to the running gateway: added devices
    /// start, removed ones drain and stop, changed ones restart, and the rest, broker
    /// sessions included, run on untouched.
    ///
    /// # Errors
    /// [`AppError::Stopped`] when the gateway is no longer running.
    pub async fn reload(&self, config: Config) -> Result<ReloadReport, AppError> {
        let (reply, report) = oneshot::channel();
        self.0
            .send((config, reply))
            .await
            .map_err(|_| AppError::Stopped)?;
        report.await.map_err(|_| AppError::Stopped)
    }
}

/// What a reload changed.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct ReloadReport {
    pub sources: SourceChanges,
    /// Config sections that changed but only take effect on a restart; their old values stay
    /// in force.
    pub needs_restart: Vec<&'static str>,
}

/// A built gateway: the database is open and migrated, the pipeline runs, the HTTP listener
/// (if enabled) is bound, and sources start in [`Gateway::run_until_stopped`].
pub struct Gateway {
    config: Config,
    telemetry: Arc<Telemetry>,
    events: mpsc::Sender<SourceEvent>,
    control: mpsc::Sender<pipeline::Reconfigure>,
    pipeline: TaskTracker,
    http: Option<HttpServer>,
    reloads: (mpsc::Sender<ReloadRequest>, mpsc::Receiver<ReloadRequest>),
}

impl Gateway {
    /// Opens the database, registers the configured devices, starts the pipeline and binds
    /// the HTTP listener.
    ///
    /// # Errors
    /// When the database cannot be opened, migrated or written, or the HTTP address cannot
    /// be bound.
    pub async fn build(config: Config) -> Result<Self, AppError> {
        let telemetry = Arc::new(Telemetry::default());
        let storage_config = &config.storage;
        let pool = storage::open_for_writing(storage_config).await?;
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
        let (live, _) = broadcast::channel(config.http.stream_buffer);
        let writer = storage::Writer::new(
            pool,
            entries,
            storage_config.retention.clone(),
            telemetry.clone(),
            live.clone(),
        )
        .await?;

        let stored_series = writer.stored_series().await?;
        let capacity = config.pipeline.channel_capacity;
        let (events_tx, events_rx) = mpsc::channel(capacity);
        let (control_tx, control_rx) = mpsc::channel(1);
        let (stage_tx, stage_rx) = mpsc::channel(capacity);
        // One batch waits while the writer commits the previous one.
        let (batch_tx, batch_rx) = mpsc::channel(1);
        watch_depth(&telemetry, "sources_to_validate", &events_tx);
        watch_depth(&telemetry, "validate_to_aggregate", &stage_tx);
        watch_depth(&telemetry, "aggregate_to_writer", &batch_tx);
        let widths: Vec<Millis> = config
            .rollups
            .windows
            .iter()
            .map(|w| w.as_millis() as Millis)
            .collect();

        let pipeline = TaskTracker::new();
        pipeline.spawn(pipeline::validate(
            Validator::new(&config, &stored_series),
            events_rx,
            control_rx,
            stage_tx,
        ));
        pipeline.spawn(pipeline::aggregate(
            Batcher::new(
                widths,
                storage_config.batch_size,
                pipeline::aggregate::ack_threshold(&config),
            ),
            storage_config.flush_interval,
            stage_rx,
            batch_tx,
        ));
        pipeline.spawn(writer.run(batch_rx));
        pipeline.close();

        let http = if config.http.enabled {
            let store = ReadStore::open(&storage_config.path)?;
            Some(HttpServer::bind(&config.http, store, telemetry.clone(), live).await?)
        } else {
            None
        };
        Ok(Self {
            config,
            telemetry,
            events: events_tx,
            control: control_tx,
            pipeline,
            http,
            reloads: mpsc::channel(1),
        })
    }

    /// Where the HTTP API listens, when it is enabled (useful with port 0).
    pub fn http_address(&self) -> Option<SocketAddr> {
        self.http.as_ref().map(HttpServer::address)
    }

    /// The gateway's live counters.
    pub fn telemetry(&self) -> Arc<Telemetry> {
        self.telemetry.clone()
    }

    /// A handle that applies changed configs once the gateway runs.
    pub fn reloader(&self) -> Reloader {
        Reloader(self.reloads.0.clone())
    }

    /// Starts the sources and runs until `shutdown` is cancelled, then drains: sources stop
    /// taking input, the pipeline empties, the writer commits its last batch and the sessions
    /// acknowledge what it held. The HTTP API answers until the drain is over.
    ///
    /// # Errors
    /// [`AppError::DrainTimeout`] when the drain outlasts `pipeline.drain_timeout`.
    pub async fn run_until_stopped(self, shutdown: CancellationToken) -> Result<(), AppError> {
        let Self {
            mut config,
            telemetry,
            events,
            control,
            pipeline,
            http,
            reloads: (reload_tx, mut reload_rx),
        } = self;
        drop(reload_tx);
        let tracker = TaskTracker::new();
        let ctx = SourceContext {
            events: events.clone(),
            pipeline: config.pipeline.clone(),
            telemetry: telemetry.clone(),
            tracker: tracker.clone(),
            shutdown: shutdown.clone(),
            limits: DecodeLimits::new(&config.validation),
        };
        let mut sources = Sources::start(&config, ctx);
        tracker.spawn(heartbeat(events, telemetry.clone(), shutdown.clone()));
        telemetry.mark_running();
        let http_stop = CancellationToken::new();
        let http = http.map(|server| tokio::spawn(server.serve(http_stop.clone())));
        tracing::info!(
            devices = config.devices.len(),
            brokers = config.brokers.len(),
            database = %config.storage.path.display(),
            "Gateway running"
        );
        loop {
            tokio::select! {
                () = shutdown.cancelled() => break,
                Some((new, reply)) = reload_rx.recv() => {
                    let report = reload(&mut config, new, &control, &mut sources).await;
                    // The asker may have given up; the reload stands either way.
                    let _ = reply.send(report);
                }
            }
        }
        tracing::info!("Stopping: draining the pipeline");
        // The sources' senders go with them, so the pipeline closes behind the last one.
        drop((sources, control));
        tracker.close();
        let deadline = config.pipeline.drain_timeout;
        let drained = tokio::time::timeout(deadline, async {
            tracker.wait().await;
            pipeline.wait().await;
        })
        .await;
        http_stop.cancel();
        if let Some(http) = http {
            // Open live streams end with the stop; a client that never reads gets cut off.
            let _ = tokio::time::timeout(Duration::from_secs(2), http).await;
        }
        match drained {
            Ok(()) => {
                tracing::info!("Stopped; everything received was committed");
                Ok(())
            }
            Err(_) => {
                tracing::error!(
                    sources_running = tracker.len(),
                    pipeline_running = pipeline.len(),
                    "Drain deadline passed"
                );
                Err(AppError::DrainTimeout(deadline))
            }
        }
    }
}

/// Applies a reloaded config: the pipeline learns the new devices first, then the sources
/// change. Sections that cannot change while running keep their old values.
async fn reload(
    config: &mut Config,
    mut new: Config,
    control: &mpsc::Sender<pipeline::Reconfigure>,
    sources: &mut Sources,
) -> ReloadReport {
    let mut needs_restart = Vec::new();
    if new.storage != config.storage {
        needs_restart.push("storage");
        new.storage = config.storage.clone();
    }
    if new.pipeline != config.pipeline {
        needs_restart.push("pipeline");
        new.pipeline = config.pipeline.clone();
    }
    if new.rollups != config.rollups {
        needs_restart.push("rollups");
        new.rollups = config.rollups.clone();
    }
    if new.http != config.http {
        needs_restart.push("http");
        new.http = config.http.clone();
    }
    if new.logging != config.logging {
        needs_restart.push("logging");
        new.logging = config.logging.clone();
    }
    let (applied, done) = oneshot::channel();
    let reconfigure = pipeline::Reconfigure {
        config: Arc::new(new.clone()),
        applied,
    };
    if control.send(reconfigure).await.is_ok() {
        // Validation answers once it knows the new devices; their sources start after.
        let _ = done.await;
    }
    let changes = sources.apply(config, &new).await;
    tracing::info!(
        started = ?changes.started,
        stopped = ?changes.stopped,
        reconnected = ?changes.reconnected,
        needs_restart = ?needs_restart,
        "Config reloaded"
    );
    *config = new;
    ReloadReport {
        sources: changes,
        needs_restart,
    }
}

/// Reports a channel's fill level through a weak handle, which does not keep it open.
fn watch_depth<T: Send + 'static>(
    telemetry: &Telemetry,
    name: &'static str,
    sender: &mpsc::Sender<T>,
) {
    let weak = sender.downgrade();
    telemetry.add_queue(
        name,
        Box::new(move || {
            let sender = weak.upgrade()?;
            Some((
                sender.max_capacity() - sender.capacity(),
                sender.max_capacity(),
            ))
        }),
    );
}

/// Sends a heartbeat into the pipeline every [`HEARTBEAT_INTERVAL`] until `cancel`; the
/// writer marks each one done after committing everything before it, which is how
/// `/readyz` (and the systemd watchdog) know the pipeline moves.
async fn heartbeat(
    events: mpsc::Sender<SourceEvent>,
    telemetry: Arc<Telemetry>,
    cancel: CancellationToken,
) {
    let mut tick = tokio::time::interval(HEARTBEAT_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            () = cancel.cancelled() => return,
        }
        let at = now_millis();
        telemetry.heartbeat_sent(at);
        tokio::select! {
            sent = events.send(SourceEvent::Heartbeat(at)) => if sent.is_err() { return },
            () = cancel.cancelled() => return,
        }
    }
}
