//! The command line: `sensorgate run | check-config | print-config | migrate | devices |
//! query | demo`.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context as _;
use clap::{Parser, Subcommand};

use crate::app::Gateway;
use crate::config::{self, Config, ConfigError, LoggingConfig};
use crate::query::{Format, params, render, rows};
use crate::reading::{Millis, now_millis};
use crate::service::{self, notify::Notifier};
use crate::storage;
use crate::storage::read::{Range, ReadStore, SeriesQuery};

/// sysexits.h EX_CONFIG: systemd and scripts can tell a bad config from a crash.
const EXIT_CONFIG: u8 = 78;

#[derive(Parser, Debug)]
#[command(
    name = "sensorgate",
    version,
    about = "IoT sensor gateway: MQTT sensors into a local SQLite historian"
)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(clap::Args, Debug, Clone)]
struct ConfigArg {
    /// The config file.
    #[arg(long, short, default_value = config::DEFAULT_PATH)]
    config: PathBuf,
}

#[derive(clap::Args, Debug, Clone)]
struct DbArg {
    /// The config file whose storage.path names the database.
    #[arg(long, short, default_value = config::DEFAULT_PATH)]
    config: PathBuf,
    /// The database file; overrides the config's storage.path.
    #[arg(long)]
    db: Option<PathBuf>,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run the gateway until SIGTERM or Ctrl-C.
    Run(ConfigArg),
    /// Check the config file and exit: 0 when valid, 78 with the reason when not.
    CheckConfig(ConfigArg),
    /// Print the fully commented example config.
    PrintConfig,
    /// Create or upgrade the database, then exit.
    Migrate(ConfigArg),
    /// List devices with their state, last seen time and counters.
    Devices {
        #[command(flatten)]
        db: DbArg,
        #[arg(long, value_enum, default_value = "table")]
        format: Format,
    },
    /// Print stored readings (or rollups with --every) of one device.
    Query {
        #[command(flatten)]
        db: DbArg,
        /// The device id.
        device: String,
        /// One metric; all of the device's metrics when left out.
        metric: Option<String>,
        /// How far back from now, e.g. 15m, 1h, 7d. Ignored when --from is given.
        #[arg(long, default_value = "1h")]
        since: String,
        /// Start (RFC 3339 or epoch ms).
        #[arg(long)]
        from: Option<String>,
        /// End, exclusive (RFC 3339 or epoch ms); default now.
        #[arg(long)]
        to: Option<String>,
        /// Read rollups of this window width (e.g. 1m, 1h) instead of raw readings.
        #[arg(long)]
        every: Option<String>,
        #[arg(long, value_enum, default_value = "table")]
        format: Format,
        #[arg(long, default_value_t = 1000)]
        limit: u32,
    },
    /// Write stored readings as CSV or NDJSON, streaming, for a device (or all) and a range.
    Export {
        #[command(flatten)]
        db: DbArg,
        /// The device id; every device when left out.
        device: Option<String>,
        /// One metric; all of the device's metrics when left out.
        metric: Option<String>,
        /// How far back from now, e.g. 15m, 1h, 7d. Ignored when --from is given.
        #[arg(long, default_value = "24h")]
        since: String,
        /// Start (RFC 3339 or epoch ms).
        #[arg(long)]
        from: Option<String>,
        /// End, exclusive (RFC 3339 or epoch ms); default now.
        #[arg(long)]
        to: Option<String>,
        #[arg(long, value_enum, default_value = "csv")]
        format: crate::query::export::ExportFormat,
        /// Write here instead of standard output.
        #[arg(long, short)]
        output: Option<PathBuf>,
    },
    /// Embedded broker, simulated sensors and a gateway writing to a local file, then queries.
    Demo {
        /// The database file the demo writes.
        #[arg(long, default_value = "sensorgate-demo.db")]
        db: PathBuf,
        /// How long the sensors publish.
        #[arg(long, default_value = "20s")]
        duration: String,
    },
}

/// Parses the command line, runs the command and maps errors to exit codes.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    // `run` logs as its config says, once the config is loaded.
    if !matches!(cli.command, Command::Run(_)) {
        service::logging::init(&LoggingConfig::default());
    }
    // One thread runs every task: the gateway's work is I/O and short steps between
    // channels; the writer's transactions run on sqlx's own thread but for the readings'
    // inserts (storage/direct.rs), and queries on blocking threads. Spread
    // over several threads, each hand-off between stages had to wake another thread
    // (a syscall per message), for 9 % more CPU per message (measured at 100k msg/s); and
    // on a small box the other core belongs to the broker.
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("error: cannot start the async runtime: {err}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(execute(cli.command)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            if let Some(config_err) = err.downcast_ref::<ConfigError>() {
                eprintln!("error: {config_err}");
                return ExitCode::from(EXIT_CONFIG);
            }
            eprintln!("error: {err:#}");
            ExitCode::FAILURE
        }
    }
}

/// `sensorgate run`: the gateway under signals and systemd notifications until stopped.
/// SIGHUP reloads the config file: a valid one is applied, an invalid one is logged and the
/// gateway runs on unchanged.
async fn run(path: &Path) -> anyhow::Result<()> {
    let config = config::load(path)?;
    service::logging::init(&config.logging);
    let config = config.with_warnings_logged(path);
    let mut signals = service::signals::listen();
    let gateway = Gateway::build(config).await?;
    let telemetry = gateway.telemetry();
    let reloader = gateway.reloader();
    let notifier = Notifier::from_env();
    let stop = signals.stop.clone();
    let mut running = tokio::spawn(gateway.run_until_stopped(stop.clone()));
    tokio::select! {
        () = telemetry.wait_running() => notifier.ready(),
        result = &mut running => return Ok(result??),
    }
    tokio::spawn(service::notify::supervise(
        notifier,
        telemetry,
        stop.clone(),
    ));
    loop {
        tokio::select! {
            () = stop.cancelled() => {
                notifier.stopping();
                break;
            }
            Some(()) = signals.reloads.recv() => {
                notifier.reloading();
                match config::load(path) {
                    Ok(config) => match reloader.reload(config.with_warnings_logged(path)).await {
                        Ok(report) if !report.needs_restart.is_empty() => tracing::warn!(
                            sections = ?report.needs_restart,
                            "Config reloaded; changes to these sections take effect on a restart"
                        ),
                        Ok(_) => {}
                        Err(err) => tracing::error!(error = %err, "Config not reloaded"),
                    },
                    Err(err) => tracing::error!(error = %err, "Config not reloaded; the gateway runs on with the previous one"),
                }
                notifier.ready();
            }
            result = &mut running => return Ok(result??),
        }
    }
    Ok(running.await??)
}

async fn execute(command: Command) -> anyhow::Result<()> {
    match command {
        Command::Run(arg) => run(&arg.config).await?,
        Command::CheckConfig(arg) => {
            let config = config::load(&arg.config)?;
            for warning in &config.warnings {
                eprintln!("warning: {}: {warning}", arg.config.display());
            }
            println!(
                "{}: ok ({} brokers, {} devices, database {})",
                arg.config.display(),
                config.brokers.len(),
                config.devices.len(),
                config.storage.path.display()
            );
        }
        Command::PrintConfig => print!("{}", config::EXAMPLE),
        Command::Migrate(arg) => {
            let config = config::load(&arg.config)?;
            storage::open_for_writing(&config.storage).await?;
            println!("{}: migrated", config.storage.path.display());
        }
        Command::Devices { db, format } => {
            let store = read_store(&db)?;
            print!("{}", render(&store.devices().await?, format));
        }
        Command::Query {
            db,
            device,
            metric,
            since,
            from,
            to,
            every,
            format,
            limit,
        } => {
            let (from, to) = time_range(&since, from.as_deref(), to.as_deref())?;
            let query = SeriesQuery {
                device,
                metric,
                range: Range { from, to, limit },
                after: None,
            };
            let store = read_store(&db)?;
            match (every, format) {
                (Some(every), _) => {
                    let width = params::window(&every).with_context(|| {
                        format!(
                            "--every `{every}` is not a window; write whole seconds like 1m or 1h"
                        )
                    })?;
                    print!("{}", render(&store.rollups(query, width).await?, format));
                }
                (None, Format::Table) => {
                    print!("{}", render(&store.readings(query).await?, format))
                }
                (None, Format::Csv | Format::Json) => print_readings(&store, query, format).await?,
            }
        }
        Command::Export {
            db,
            device,
            metric,
            since,
            from,
            to,
            format,
            output,
        } => {
            let (from, to) = time_range(&since, from.as_deref(), to.as_deref())?;
            let store = read_store(&db)?;
            let devices = match device {
                Some(device) => vec![device],
                None => store.devices().await?.into_iter().map(|d| d.name).collect(),
            };
            let rows = crate::query::export::export(
                &store,
                crate::query::export::Export {
                    devices,
                    metric,
                    from,
                    to,
                    format,
                },
                output.as_deref(),
            )
            .await?;
            if let Some(path) = output {
                eprintln!("{rows} readings written to {}", path.display());
            }
        }
        Command::Demo { db, duration } => {
            let duration = parse_duration("--duration", &duration)?;
            crate::demo::run(&db, duration).await?;
        }
    }
    Ok(())
}

/// Readings as CSV (the `export` columns) or a JSON array, streamed to stdout as they are
/// read.
async fn print_readings(
    store: &ReadStore,
    query: SeriesQuery,
    format: Format,
) -> anyhow::Result<()> {
    use std::io::Write as _;
    let written = store
        .run(move |conn| {
            let mut stdout = std::io::stdout().lock();
            let row_format = if format == Format::Csv {
                if let Err(err) = stdout.write_all(rows::CSV_HEADER.as_bytes()) {
                    return Ok(Err(err));
                }
                rows::RowFormat::Csv
            } else {
                rows::RowFormat::JsonArray
            };
            let mut out =
                rows::RowWriter::new(stdout, row_format, rows::TimeFormat::Millis, &query.device);
            storage::read::visit_readings(conn, &query, |series, point| out.row(series, point))?;
            Ok(out.finish().and_then(|mut stdout| {
                if format == Format::Json {
                    stdout.write_all(b"\n")?;
                }
                stdout.flush()
            }))
        })
        .await?;
    written.context("writing to standard output")
}

fn read_store(arg: &DbArg) -> anyhow::Result<ReadStore> {
    let path = match &arg.db {
        Some(path) => path.clone(),
        None => db_path_from(&arg.config)?,
    };
    if !path.exists() {
        anyhow::bail!(
            "database {} does not exist; run the gateway first or pass --db",
            path.display()
        );
    }
    Ok(ReadStore::open(&path)?)
}

fn db_path_from(config_path: &Path) -> Result<PathBuf, ConfigError> {
    let config: Config = config::load(config_path)?;
    Ok(config.storage.path)
}

/// `[from, to)` from `--since` or `--from`, and `--to` (default: now).
fn time_range(
    since: &str,
    from: Option<&str>,
    to: Option<&str>,
) -> anyhow::Result<(Millis, Millis)> {
    let now = now_millis();
    let to = to
        .map(|t| parse_time("--to", t))
        .transpose()?
        .unwrap_or(now + 1);
    let from = match from {
        Some(from) => parse_time("--from", from)?,
        None => now - parse_duration("--since", since)?.as_millis() as Millis,
    };
    Ok((from, to))
}

fn parse_duration(flag: &str, text: &str) -> anyhow::Result<Duration> {
    params::duration(text)
        .with_context(|| format!("{flag} `{text}` is not a duration; write it like 15m, 1h or 7d"))
}

fn parse_time(flag: &str, text: &str) -> anyhow::Result<Millis> {
    params::time(text).with_context(|| {
        format!("{flag} `{text}` is not a time; use RFC 3339 (2026-11-25T10:00:00Z) or epoch ms")
    })
}
