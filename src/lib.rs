//! sensorgate: an IoT sensor gateway. Sensors publish over MQTT; every reading is validated,
//! stored in a local SQLite historian with rollups, and acknowledged only after it commits.
//!
//! Module map, in data-flow order (imports only run down this list):
//!
//! - [`cli`]: subcommands (`run`, `check-config`, `query`, `demo`, ...).
//! - [`app`]: [`app::Gateway`] assembles storage, pipeline and sources and stops them in order.
//! - [`demo`]: embedded broker, simulated sensors and a gateway, for newcomers.
//! - [`service`]: signals to a cancellation token.
//! - [`sources`]: one task per device; MQTT sessions acknowledge in arrival order after commit.
//! - [`pipeline`]: validate, then aggregate into batches; bounded channels throughout.
//! - [`query`]: CLI output formats.
//! - [`storage`]: migrations, the one writer, read queries.
//! - [`config`]: the typed TOML config and its checks.
//! - [`decode`]: pure payload decoders (JSON, SenML, plain values).
//! - [`reading`]: the domain types every stage shares.
//!
//! See `ARCHITECTURE.md` for the tasks, channels and shutdown order.

pub mod app;
pub mod cli;
pub mod config;
pub mod decode;
pub mod demo;
pub mod pipeline;
pub mod query;
pub mod reading;
pub mod service;
pub mod sources;
pub mod storage;
pub mod telemetry;
