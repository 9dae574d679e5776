//! `sensorgate-sim`: simulated MQTT sensors, an embedded broker, and serial sensors (text
//! lines and Modbus RTU meters) on ptys, from the command line.

use std::process::ExitCode;

use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};
use sensorgate_sim::modbus::{MeterConfig, ModbusBus, REGISTERS, SlaveFault, WordOrder};
use sensorgate_sim::serial::{
    LineEnding, LineFormat, LineOptions, LineScenario, LineSensor, REGEX_LINE,
};
use sensorgate_sim::{EmbeddedBroker, Format, Pace, Pty, Scenario, publish};
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
    /// Run a serial text-line sensor on a pty at PATH until Ctrl-C.
    Serial {
        /// Where the port appears (a symlink to the pty, replaced if it exists).
        #[arg(long)]
        path: PathBuf,
        #[arg(long, value_enum, default_value = "csv")]
        format: LineFormat,
        /// Lines per second; 0 for as fast as the reader takes them.
        #[arg(long, default_value_t = 1.0)]
        rate: f64,
        /// Every n-th line is faulty (out of range, NaN, malformed, noise, split, too long,
        /// in turn); 0 for none.
        #[arg(long, default_value_t = 0)]
        fault_every: u64,
        /// Poll mode: answer each arrival of this command with one line (`\r`, `\n`
        /// allowed, e.g. 'READ\r\n').
        #[arg(long)]
        poll: Option<String>,
        /// Stop writing after this many lines (the port stays up until Ctrl-C).
        #[arg(long)]
        lines: Option<u64>,
        /// End lines with CR LF instead of LF.
        #[arg(long)]
        crlf: bool,
    },
    /// Run Modbus RTU energy meters on one pty (an RS-485 bus) at PATH until Ctrl-C.
    Modbus {
        /// Where the port appears (a symlink to the pty, replaced if it exists).
        #[arg(long)]
        path: PathBuf,
        /// Slave ids on the bus.
        #[arg(long, value_delimiter = ',', default_value = "1")]
        slaves: Vec<u8>,
        /// Slaves that never answer.
        #[arg(long, value_delimiter = ',')]
        dead: Vec<u8>,
        /// Slaves that send 32-bit values low word first (CDAB) instead of ABCD.
        #[arg(long, value_delimiter = ',')]
        cdab: Vec<u8>,
    },
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
        Command::Serial {
            path,
            format,
            rate,
            fault_every,
            poll,
            lines,
            crlf,
        } => {
            let scenario = LineScenario {
                start_ms: now_ms()?,
                period_ms: if rate > 0.0 {
                    (1000.0 / rate).max(1.0) as i64
                } else {
                    1
                },
                fault_every,
                line_ending: if crlf {
                    LineEnding::CrLf
                } else {
                    LineEnding::Lf
                },
                ..LineScenario::new(format, lines.unwrap_or(u64::MAX))
            };
            let options = LineOptions {
                pace: if rate > 0.0 {
                    Pace::Steady(rate)
                } else {
                    Pace::Unlimited
                },
                poll: poll.as_deref().map(unescape),
                ..LineOptions::default()
            };
            let pty = Pty::open(&path)
                .with_context(|| format!("exposing a pty at {}", path.display()))?;
            println!(
                "{format:?} line sensor at {} ({}): open that path; Ctrl-C stops",
                path.display(),
                pty.device()
                    .map(|d| d.display().to_string())
                    .unwrap_or_default()
            );
            if format == LineFormat::Regex {
                println!("lines match {REGEX_LINE}");
            }
            let sensor =
                LineSensor::start(pty, scenario.lines(), options, CancellationToken::new());
            tokio::signal::ctrl_c().await?;
            let report = sensor.stop().await?;
            println!(
                "wrote {} lines ({} bytes), faults {:?}, polls {} ({} unanswered)",
                report.written,
                report.bytes_written,
                report.faults,
                report.polls,
                report.polls_unanswered
            );
        }
        Command::Modbus {
            path,
            slaves,
            dead,
            cdab,
        } => {
            let meters: Vec<_> = slaves
                .iter()
                .map(|&slave| MeterConfig {
                    slave,
                    word_order: if cdab.contains(&slave) {
                        WordOrder::Cdab
                    } else {
                        WordOrder::Abcd
                    },
                    fault: dead.contains(&slave).then_some(SlaveFault::Dead),
                })
                .collect();
            let pty = Pty::open(&path)
                .with_context(|| format!("exposing a pty at {}", path.display()))?;
            let device = pty
                .device()
                .map(|d| d.display().to_string())
                .unwrap_or_default();
            let bus = ModbusBus::start(pty, &meters, CancellationToken::new())?;
            println!(
                "Modbus RTU bus at {} ({device}), slaves {slaves:?} (dead {dead:?}, CDAB {cdab:?}): open that path; Ctrl-C stops",
                path.display()
            );
            for r in REGISTERS {
                println!(
                    "  register {:>2} {:<12} {:?} / {} {}",
                    r.address, r.name, r.value_type, r.divisor, r.unit
                );
            }
            println!(
                "  coil 0 relay, discrete input 0 alarm; functions 0x03 and 0x04 read the same map"
            );
            tokio::signal::ctrl_c().await?;
            let report = bus.stop().await?;
            println!("{report:?}");
        }
    }
    Ok(())
}

fn now_ms() -> anyhow::Result<i64> {
    Ok(std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_millis() as i64)
}

/// `\r`, `\n` and `\\` in a command-line poll command.
fn unescape(text: &str) -> Vec<u8> {
    let mut out = Vec::new();
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        match (c, chars.clone().next()) {
            ('\\', Some('r')) => out.push(b'\r'),
            ('\\', Some('n')) => out.push(b'\n'),
            ('\\', Some('\\')) => out.push(b'\\'),
            _ => {
                let mut buf = [0; 4];
                out.extend_from_slice(c.encode_utf8(&mut buf).as_bytes());
                continue;
            }
        }
        chars.next();
    }
    out
}

#[cfg(test)]
mod tests {
    #[test]
    fn poll_commands_take_cr_and_lf_escapes() {
        assert_eq!(super::unescape(r"READ\r\n"), b"READ\r\n");
        assert_eq!(super::unescape(r"a\\b\x"), br"a\b\x");
    }
}
