//! Running as a daemon: signals (stop, reload), systemd notifications and the watchdog, and
//! logging fit for a terminal or journald. Everything here is a no-op outside systemd.
//!
//! - [`signals`]: SIGTERM/SIGINT cancel a token; SIGHUP asks for a reload.
//! - [`notify`]: READY, STATUS, RELOADING, STOPPING and watchdog pings that stop when the
//!   pipeline stops moving.
//! - [`logging`]: `tracing` to stderr as text or JSON, with journald priorities.

pub mod logging;
pub mod notify;
pub mod signals;
