//! `/api/v1/stream`: newly committed readings as Server-Sent Events, filtered by device and
//! metric. Each client reads the writer's broadcast at its own pace; one that falls more than
//! `http.stream_buffer` commits behind skips them (an `event: skipped` says how many, and
//! `/metrics` counts them), so a slow client never slows the writer.

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use axum::extract::{RawQuery, State};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use futures_util::StreamExt as _;
use serde::Serialize;
use tokio::sync::broadcast::{self, error::RecvError};
use tokio_util::sync::CancellationToken;

use super::api::Params;
use super::http::{ApiError, Shared};
use crate::reading::{LiveBatch, Millis};
use crate::telemetry::Telemetry;

#[derive(Serialize)]
struct LiveJson<'a> {
    device: &'a str,
    metric: &'a str,
    unit: Option<&'a str>,
    time: Millis,
    value: f64,
}

/// One client's subscription; counted in `/metrics` while it lives.
struct Client {
    live: broadcast::Receiver<LiveBatch>,
    device: Option<String>,
    metric: Option<String>,
    stop: CancellationToken,
    telemetry: Arc<Telemetry>,
}

impl Drop for Client {
    fn drop(&mut self) {
        self.telemetry
            .stream_clients
            .fetch_sub(1, Ordering::Relaxed);
    }
}

impl Client {
    /// The next event for this client, or `None` when the gateway stops.
    async fn next(&mut self) -> Option<Event> {
        loop {
            let received = tokio::select! {
                () = self.stop.cancelled() => return None,
                received = self.live.recv() => received,
            };
            match received {
                Ok(batch) => {
                    let rows: Vec<LiveJson<'_>> = batch
                        .iter()
                        .filter(|r| {
                            self.device
                                .as_deref()
                                .is_none_or(|d| d == r.series.device().as_str())
                        })
                        .filter(|r| {
                            self.metric
                                .as_deref()
                                .is_none_or(|m| m == r.series.metric())
                        })
                        .map(|r| LiveJson {
                            device: r.series.device().as_str(),
                            metric: r.series.metric(),
                            unit: r.series.unit(),
                            time: r.time,
                            value: r.value,
                        })
                        .collect();
                    if rows.is_empty() {
                        continue;
                    }
                    let data = serde_json::to_string(&rows).unwrap_or_else(|_| "[]".into());
                    return Some(Event::default().event("readings").data(data));
                }
                Err(RecvError::Lagged(missed)) => {
                    self.telemetry
                        .stream_skipped
                        .fetch_add(missed, Ordering::Relaxed);
                    let data = format!("{{\"batches\":{missed}}}");
                    return Some(Event::default().event("skipped").data(data));
                }
                Err(RecvError::Closed) => return None,
            }
        }
    }
}

pub(super) async fn stream(
    State(api): Shared,
    RawQuery(raw): RawQuery,
) -> Result<Response, ApiError> {
    let params = Params::parse(raw, &["device", "metric"])?;
    let device = params.get("device").map(str::to_string);
    if let Some(device) = &device {
        api.store.device(device).await?;
    }
    api.telemetry.stream_clients.fetch_add(1, Ordering::Relaxed);
    let client = Client {
        live: api.live.subscribe(),
        device,
        metric: params.get("metric").map(str::to_string),
        stop: api.stop.clone(),
        telemetry: api.telemetry.clone(),
    };
    let events = futures_util::stream::unfold(client, |mut client| async move {
        client.next().await.map(|event| (event, client))
    })
    .map(Ok::<_, Infallible>);
    Ok(Sse::new(events)
        .keep_alive(KeepAlive::new().interval(Duration::from_secs(15)))
        .into_response())
}
