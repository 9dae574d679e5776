//! The command line: `sensorgate run | check-config | print-config | migrate | devices |
//! query | demo`.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context as _;
use clap::{Parser, Subcommand};

use crate::app::Gateway;
use crate::config::{self, Config, ConfigError};
use crate::decode::parse_rfc3339;
use crate::query::{Format, render};
use crate::reading::{Millis, now_millis};
use crate::storage;
use crate::storage::read::{Range, ReadStore};

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
    init_tracing();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
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

fn init_tracing() {
    use std::io::IsTerminal as _;
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| {
        tracing_subscriber::EnvFilter::new("info,sqlx=warn,rumqttd=off,rumqttc=warn")
    });
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr)
        .init();
}

async fn execute(command: Command) -> anyhow::Result<()> {
    match command {
        Command::Run(arg) => {
            let config = config::load(&arg.config)?;
            let shutdown = crate::service::cancel_on_signals();
            Gateway::build(config)
                .await?
                .run_until_stopped(shutdown)
                .await?;
        }
        Command::CheckConfig(arg) => {
            let config = config::load(&arg.config)?;
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
            let store = read_store(&db).await?;
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
            let now = now_millis();
            let to = to
                .as_deref()
                .map(|t| parse_time("--to", t))
                .transpose()?
                .unwrap_or(now + 1);
            let from = match from {
                Some(from) => parse_time("--from", &from)?,
                None => now - parse_duration("--since", &since)?.as_millis() as Millis,
            };
            let range = Range { from, to, limit };
            let store = read_store(&db).await?;
            let out = match every {
                Some(every) => {
                    let width = parse_duration("--every", &every)?.as_millis() as Millis;
                    render(
                        &store
                            .rollups(&device, metric.as_deref(), width, range)
                            .await?,
                        format,
                    )
                }
                None => render(
                    &store.readings(&device, metric.as_deref(), range).await?,
                    format,
                ),
            };
            print!("{out}");
        }
        Command::Demo { db, duration } => {
            let duration = parse_duration("--duration", &duration)?;
            crate::demo::run(&db, duration).await?;
        }
    }
    Ok(())
}

async fn read_store(arg: &DbArg) -> anyhow::Result<ReadStore> {
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
    let pool = storage::open_read_only(&path).await?;
    Ok(ReadStore::new(pool))
}

fn db_path_from(config_path: &Path) -> Result<PathBuf, ConfigError> {
    let config: Config = config::load(config_path)?;
    Ok(config.storage.path)
}

fn parse_duration(flag: &str, text: &str) -> anyhow::Result<Duration> {
    humantime::parse_duration(text)
        .with_context(|| format!("{flag} `{text}` is not a duration; write it like 15m, 1h or 7d"))
}

fn parse_time(flag: &str, text: &str) -> anyhow::Result<Millis> {
    parse_rfc3339(text)
        .or_else(|| text.parse::<Millis>().ok())
        .with_context(|| {
            format!(
                "{flag} `{text}` is not a time; use RFC 3339 (2026-11-25T10:00:00Z) or epoch ms"
            )
        })
}
