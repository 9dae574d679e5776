//! `sensorgate-sim`: simulated MQTT sensors and an embedded broker, from the command line.

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use sensorgate_sim::{EmbeddedBroker, Format, Pace, Scenario, publish};
use tokio_util::sync::CancellationToken;

#[derive(Parser)]
#[command(name = "sensorgate-sim", about = "Sensor simulators for sensorgate")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Publish simulated readings for N devices to an MQTT broker.
    Mqtt {
        #[arg(long, default_value = "127.0.0.1")]
        host: String,
        #[arg(long, default_value_t = 1883)]
        port: u16,
        #[arg(long, default_value_t = 10)]
        devices: usize,
        /// Messages per device.
        #[arg(long, default_value_t = 100)]
        messages: u64,
        /// Total messages per second; 0 for as fast as the broker takes them.
        #[arg(long, default_value_t = 100.0)]
        rate: f64,
        /// Send in bursts of this many messages back to back (same average rate).
        #[arg(long, default_value_t = 1)]
        burst: u32,
        #[arg(long, value_enum, default_value = "json")]
        format: Format,
        #[arg(long, default_value_t = 1)]
        qos: u8,
        /// Every n-th message of a device is faulty (out of range, NaN, malformed, clock
        /// skew, duplicate, in turn); 0 for none.
        #[arg(long, default_value_t = 0)]
        fault_every: u64,
        #[arg(long, default_value = "sim")]
        topic_prefix: String,
    },
    /// Run an embedded MQTT broker on a free loopback port until Ctrl-C.
    Broker,
}

fn main() -> ExitCode {
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(err) => {
            eprintln!("error: {err}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(Cli::parse().command)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {err:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(command: Command) -> anyhow::Result<()> {
    match command {
        Command::Mqtt {
            host,
            port,
            devices,
            messages,
            rate,
            format,
            qos,
            fault_every,
            topic_prefix,
            burst,
        } => {
            let period_ms = if rate > 0.0 {
                ((devices as f64 * 1000.0) / rate).max(1.0) as i64
            } else {
                1
            };
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)?
                .as_millis() as i64;
            let scenario = Scenario {
                devices,
                messages_per_device: messages,
                format,
                topic_prefix,
                fault_every,
                start_ms: now,
                period_ms,
            };
            let cancel = CancellationToken::new();
            let stop = cancel.clone();
            tokio::spawn(async move {
                let _ = tokio::signal::ctrl_c().await;
                stop.cancel();
            });
            let pace = match (rate > 0.0, burst > 1) {
                (false, _) => Pace::Unlimited,
                (true, false) => Pace::Steady(rate),
                (true, true) => Pace::Bursts { rate, size: burst },
            };
            let report = publish(
                &host,
                port,
                "sensorgate-sim",
                scenario.messages(),
                pace,
                qos,
                cancel,
            )
            .await?;
            println!(
                "published {} messages in {:.1}s ({:.0}/s)",
                report.published,
                report.elapsed.as_secs_f64(),
                report.published as f64 / report.elapsed.as_secs_f64()
            );
        }
        Command::Broker => {
            let broker = EmbeddedBroker::start()?;
            println!("MQTT broker listening on 127.0.0.1:{}", broker.port);
            tokio::signal::ctrl_c().await?;
        }
    }
    Ok(())
}
