//! Answers about the stored readings, never on the ingest path: text output for the CLI,
//! streaming exports, and the HTTP API with its live stream, metrics and dashboard. The CLI
//! and the API ask the same read layer ([`crate::storage::read`]) the same questions.
//!
//! - [`table`]: tables, CSV and JSON for `sensorgate devices | query`.
//! - [`rows`]: readings as CSV, NDJSON or JSON rows, for the CLI, exports and the API.
//! - [`export`]: `sensorgate export`, CSV or NDJSON, page by page.
//! - [`http`]: the axum router: routes, bearer token, loopback `Host`, errors; [`serve`]
//!   (connections: a cap, header and send timeouts); [`api`] (JSON endpoints, their
//!   pages of rows streamed by [`body`]),
//!   [`stream`] (Server-Sent Events), [`metrics`] (Prometheus), [`dashboard`] (the page).
//! - [`params`]: times, durations and windows as the CLI and the API both accept them.

mod api;
mod body;
mod dashboard;
pub mod export;
pub mod http;
pub mod metrics;
pub mod params;
pub mod rows;
mod serve;
mod stream;
mod table;

pub use table::{Format, Tabular, render};
