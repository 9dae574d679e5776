//! Logging through `tracing` to stderr: text with colours on a terminal, plain text with
//! journald priority prefixes under systemd (so `journalctl -p warning` works), or one JSON
//! object per line for log shippers. `RUST_LOG` overrides the configured filter.

use std::io::IsTerminal as _;

use tracing::{Event, Level, Subscriber};
use tracing_subscriber::EnvFilter;
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields};
use tracing_subscriber::registry::LookupSpan;

use crate::config::{LogFormat, LoggingConfig};

/// What the library crates log by default besides the configured filter: connection chatter
/// of the MQTT client and the embedded broker, slow-statement warnings of sqlx. tokio-modbus
/// logs every garbled answer (about 14 warnings and an error each) without naming the
/// device; each of its failures also comes back to the gateway as an error, which is
/// counted per device (`crc_errors`, `timeouts`), and a slave that stops answering or comes
/// back is logged once, by device and slave.
const QUIET: &str = "sqlx=warn,rumqttd=off,rumqttc=warn,tokio_modbus=off";

/// The configured filter with the library defaults in front of it.
pub fn filter(configured: &str) -> EnvFilter {
    EnvFilter::new(format!("{QUIET},{configured}"))
}

/// Installs the global subscriber; a second call is ignored.
pub fn init(config: &LoggingConfig) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| filter(&config.filter));
    // journald gives every line a timestamp and reads `<N>` priority prefixes.
    let journal = std::env::var_os("JOURNAL_STREAM").is_some();
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let result = match config.format {
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
        LogFormat::Text if journal => builder
            .with_ansi(false)
            .without_time()
            .event_format(Journald(tracing_subscriber::fmt::format().without_time()))
            .try_init(),
        LogFormat::Text => builder
            .with_ansi(std::io::stderr().is_terminal())
            .try_init(),
    };
    // A test or an earlier call set one up already.
    let _ = result;
}

/// Text lines prefixed with the syslog priority of their level.
struct Journald<F>(F);

impl<S, N, F> FormatEvent<S, N> for Journald<F>
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
    F: FormatEvent<S, N>,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> std::fmt::Result {
        let priority = match *event.metadata().level() {
            Level::ERROR => 3,
            Level::WARN => 4,
            Level::INFO => 6,
            Level::DEBUG | Level::TRACE => 7,
        };
        write!(writer, "<{priority}>")?;
        self.0.format_event(ctx, writer, event)
    }
}
