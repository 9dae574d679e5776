//! The JSON endpoints under `/api/v1/`, and `/readyz`.
//!
//! Every parameter is checked by name and value: an unknown, repeated or malformed one gets
//! a 400 that names it. Every range is bounded by `limit` (at most `http.max_rows`) and paged
//! with an opaque `cursor`; readings and rollups are streamed as they are read, so a large
//! page never sits in memory whole.

use std::time::Duration;

use axum::extract::{Path, RawQuery, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use base64::Engine as _;
use serde::Serialize;

use super::body::{for_each_row, stream_json};
use super::http::{ApiError, Shared};
use super::params;
use super::rows::{BucketWriter, RowFormat, RowWriter, TimeFormat};
use crate::reading::{Millis, REJECT_REASONS, now_millis};
use crate::storage::read::{self, Cursor, DeviceRow, LastValue, Range, RejectionRow, SeriesQuery};
use crate::telemetry::HEARTBEAT_INTERVAL;

/// Rows a query returns when it names no `limit`.
const DEFAULT_LIMIT: u32 = 1000;
/// The most rejections one answer lists; each carries a bounded preview of its bytes.
const MAX_REJECTIONS: u32 = 1000;

/// A request's query parameters, checked against the names an endpoint accepts.
pub(super) struct Params(Vec<(String, String)>);

impl Params {
    pub(super) fn parse(raw: Option<String>, allowed: &[&str]) -> Result<Self, ApiError> {
        let mut pairs: Vec<(String, String)> = Vec::new();
        for (name, value) in form_urlencoded::parse(raw.unwrap_or_default().as_bytes()) {
            if !allowed.contains(&name.as_ref()) {
                return Err(ApiError::bad(
                    &name,
                    format!(
                        "unknown parameter `{name}`; this endpoint takes {}",
                        allowed.join(", ")
                    ),
                ));
            }
            if pairs.iter().any(|(n, _)| *n == name) {
                return Err(ApiError::bad(
                    &name,
                    format!("parameter `{name}` is given twice"),
                ));
            }
            pairs.push((name.into_owned(), value.into_owned()));
        }
        Ok(Self(pairs))
    }

    pub(super) fn get(&self, name: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    fn time(&self, name: &str) -> Result<Option<Millis>, ApiError> {
        self.get(name)
            .map(|text| {
                params::time(text).ok_or_else(|| {
                    ApiError::bad(
                        name,
                        format!(
                            "`{name}` = `{text}` is not a time; use RFC 3339 (2026-11-25T10:00:00Z) or epoch milliseconds"
                        ),
                    )
                })
            })
            .transpose()
    }

    /// `from` (or `since`, else `default_since` ago), `to` (default now) and `limit`.
    fn range(&self, default_since: Duration, max_rows: u32) -> Result<Range, ApiError> {
        let now = now_millis();
        let to = self.time("to")?.unwrap_or(now + 1);
        let from = match (self.time("from")?, self.get("since")) {
            (Some(_), Some(_)) => {
                return Err(ApiError::bad("since", "give `from` or `since`, not both"));
            }
            (Some(from), None) => from,
            (None, Some(since)) => {
                let span = params::duration(since).ok_or_else(|| {
                    ApiError::bad(
                        "since",
                        format!(
                            "`since` = `{since}` is not a duration; write it like 15m, 1h or 7d"
                        ),
                    )
                })?;
                now - span.as_millis() as Millis
            }
            (None, None) => now - default_since.as_millis() as Millis,
        };
        if from >= to {
            return Err(ApiError::bad("from", "`from` must be before `to`"));
        }
        let limit = match self.get("limit") {
            None => DEFAULT_LIMIT.min(max_rows),
            Some(text) => text
                .parse::<u32>()
                .ok()
                .filter(|n| (1..=max_rows).contains(n))
                .ok_or_else(|| {
                    ApiError::bad(
                        "limit",
                        format!("`limit` = `{text}` must be a whole number from 1 to {max_rows}"),
                    )
                })?,
        };
        Ok(Range { from, to, limit })
    }

    fn cursor(&self) -> Result<Option<Cursor>, ApiError> {
        self.get("cursor")
            .map(|text| text.parse().map_err(ApiError::from))
            .transpose()
    }

    fn time_format(&self) -> Result<TimeFormat, ApiError> {
        match self.get("time_format") {
            None | Some("ms") => Ok(TimeFormat::Millis),
            Some("rfc3339") => Ok(TimeFormat::Rfc3339),
            Some(other) => Err(ApiError::bad(
                "time_format",
                format!("`time_format` = `{other}`: use ms or rfc3339"),
            )),
        }
    }
}

/// `/readyz`: 200 while the database takes writes and heartbeats pass the pipeline, 503
/// with the reason otherwise.
pub(super) async fn ready(State(api): Shared) -> Response {
    let now = now_millis();
    match api.telemetry.moving(now, HEARTBEAT_INTERVAL * 3) {
        Ok(()) => axum::Json(serde_json::json!({
            "ready": true,
            "last_heartbeat": api.telemetry.last_heartbeat(),
        }))
        .into_response(),
        Err(reason) => (
            StatusCode::SERVICE_UNAVAILABLE,
            axum::Json(serde_json::json!({ "ready": false, "reason": reason })),
        )
            .into_response(),
    }
}

#[derive(Serialize)]
struct DeviceJson {
    #[serde(flatten)]
    row: DeviceRow,
    last_values: Vec<ValueJson>,
}

#[derive(Serialize)]
struct ValueJson {
    metric: String,
    unit: Option<String>,
    time: Millis,
    value: f64,
}

fn with_values(rows: Vec<DeviceRow>, values: Vec<LastValue>) -> Vec<DeviceJson> {
    let mut values = values.into_iter().peekable();
    rows.into_iter()
        .map(|row| {
            let mut last_values = Vec::new();
            // Both are ordered by device name.
            while let Some(v) = values.next_if(|v| v.device <= row.name) {
                if v.device == row.name {
                    last_values.push(ValueJson {
                        metric: v.metric,
                        unit: v.unit,
                        time: v.time,
                        value: v.value,
                    });
                }
            }
            DeviceJson { row, last_values }
        })
        .collect()
}

/// `/api/v1/devices`: every device with its state, counters and newest values.
pub(super) async fn devices(
    State(api): Shared,
    RawQuery(raw): RawQuery,
) -> Result<Response, ApiError> {
    Params::parse(raw, &[])?;
    let rows = api.store.devices().await?;
    let values = api.store.last_values(None).await?;
    Ok(axum::Json(serde_json::json!({ "devices": with_values(rows, values) })).into_response())
}

/// `/api/v1/devices/{device}`.
pub(super) async fn device(
    State(api): Shared,
    Path(device): Path<String>,
    RawQuery(raw): RawQuery,
) -> Result<Response, ApiError> {
    Params::parse(raw, &[])?;
    let row = api.store.device(&device).await?;
    let values = api.store.last_values(Some(&device)).await?;
    let mut one = with_values(vec![row], values);
    Ok(axum::Json(one.pop()).into_response())
}

/// `/api/v1/devices/{device}/readings`: raw readings, metric by metric, oldest first.
pub(super) async fn readings(
    State(api): Shared,
    Path(device): Path<String>,
    RawQuery(raw): RawQuery,
) -> Result<Response, ApiError> {
    let params = Params::parse(
        raw,
        &[
            "metric",
            "from",
            "to",
            "since",
            "limit",
            "cursor",
            "time_format",
        ],
    )?;
    let query = SeriesQuery {
        device,
        metric: params.get("metric").map(str::to_string),
        range: params.range(Duration::from_secs(3600), api.max_rows)?,
        after: params.cursor()?,
    };
    let times = params.time_format()?;
    let device = query.device.clone();
    stream_json(
        &api,
        query,
        |conn, query, visit| read::visit_readings(conn, query, |series, p| visit(series, *p)),
        move |batches, sink| {
            let mut rows = RowWriter::new(sink, RowFormat::JsonArray, times, &device);
            for_each_row(batches, |series, point| rows.row(series, point));
            rows.finish()
        },
    )
    .await
}

/// `/api/v1/devices/{device}/rollups`: count, min, max, mean, sum, first and last per window.
pub(super) async fn rollups(
    State(api): Shared,
    Path(device): Path<String>,
    RawQuery(raw): RawQuery,
) -> Result<Response, ApiError> {
    let params = Params::parse(
        raw,
        &[
            "metric",
            "window",
            "from",
            "to",
            "since",
            "limit",
            "cursor",
            "time_format",
        ],
    )?;
    let window = params.get("window").unwrap_or("1m");
    let width = params::window(window).ok_or_else(|| {
        ApiError::bad(
            "window",
            format!("`window` = `{window}` is not a window; write whole seconds like 1m or 1h"),
        )
    })?;
    let query = SeriesQuery {
        device,
        metric: params.get("metric").map(str::to_string),
        range: params.range(Duration::from_secs(86_400), api.max_rows)?,
        after: params.cursor()?,
    };
    let times = params.time_format()?;
    let device = query.device.clone();
    stream_json(
        &api,
        query,
        move |conn, query, visit| {
            read::visit_rollups(conn, query, width, |series, b| visit(series, *b))
        },
        move |batches, sink| {
            let mut rows = BucketWriter::new(sink, times, &device, width);
            for_each_row(batches, |series, bucket| rows.row(series, bucket));
            rows.finish()
        },
    )
    .await
}

#[derive(Serialize)]
struct RejectionJson {
    id: i64,
    received_at: Millis,
    device: Option<String>,
    source: String,
    reason: String,
    detail: String,
    /// How many values the rejection stands for (1 for an input refused whole).
    values: i64,
    /// The input's size in bytes.
    size: i64,
    /// The bytes kept: the whole input, or its first bytes when it was too large.
    stored: i64,
    /// The first stored bytes as text when they are UTF-8, else base64; the rest at
    /// `/api/v1/rejections/{id}/raw`.
    raw_preview: String,
    raw_encoding: &'static str,
    /// The preview stops short of the stored bytes.
    preview_truncated: bool,
}

impl From<RejectionRow> for RejectionJson {
    fn from(r: RejectionRow) -> Self {
        let preview_truncated = (r.preview.len() as i64) < r.stored;
        let (raw_preview, raw_encoding) = match std::str::from_utf8(&r.preview) {
            Ok(text) => (text.to_string(), "utf8"),
            // Text cut short in the middle of a character is still text.
            Err(err) if err.error_len().is_none() && preview_truncated => (
                String::from_utf8_lossy(&r.preview[..err.valid_up_to()]).into_owned(),
                "utf8",
            ),
            Err(_) => (
                base64::engine::general_purpose::STANDARD.encode(&r.preview),
                "base64",
            ),
        };
        Self {
            id: r.id,
            received_at: r.received_at,
            device: r.device,
            source: r.source,
            reason: r.reason,
            detail: r.detail,
            values: r.values,
            size: r.size,
            stored: r.stored,
            raw_preview,
            raw_encoding,
            preview_truncated,
        }
    }
}

/// `/api/v1/rejections`: what was not stored as readings and why, newest first, each with
/// the first bytes of what was received.
pub(super) async fn rejections(
    State(api): Shared,
    RawQuery(raw): RawQuery,
) -> Result<Response, ApiError> {
    let params = Params::parse(raw, &["device", "reason", "from", "to", "since", "limit"])?;
    let range = params.range(
        Duration::from_secs(86_400),
        api.max_rows.min(MAX_REJECTIONS),
    )?;
    let device = params.get("device");
    if let Some(device) = device {
        api.store.device(device).await?;
    }
    let reason = params.get("reason");
    if let Some(reason) = reason
        && !REJECT_REASONS.iter().any(|r| r.as_str() == reason)
    {
        let known: Vec<&str> = REJECT_REASONS.iter().map(|r| r.as_str()).collect();
        return Err(ApiError::bad(
            "reason",
            format!("`reason` = `{reason}` is not one of {}", known.join(", ")),
        ));
    }
    let rows = api.store.rejections(device, reason, range).await?;
    let rows: Vec<RejectionJson> = rows.into_iter().map(RejectionJson::from).collect();
    Ok(axum::Json(serde_json::json!({ "rejections": rows })).into_response())
}

/// `/api/v1/rejections/{id}/raw`: the bytes a rejection kept, as received.
pub(super) async fn rejection_raw(
    State(api): Shared,
    Path(id): Path<String>,
    RawQuery(raw): RawQuery,
) -> Result<Response, ApiError> {
    Params::parse(raw, &[])?;
    let id: i64 = id
        .parse()
        .map_err(|_| ApiError::bad("id", format!("rejection id `{id}` is not a number")))?;
    match api.store.rejection_raw(id).await? {
        Some(bytes) => {
            Ok(([(header::CONTENT_TYPE, "application/octet-stream")], bytes).into_response())
        }
        None => Err(ApiError::NotFound(format!("no rejection {id}"))),
    }
}
