//! `/`: a small dashboard page served from the binary (no CDN, no build step). It lists the
//! devices with their state and newest values, draws each metric of the selected device from
//! its 1-minute rollups, and folds in new readings from the live stream.

use axum::http::header;
use axum::response::IntoResponse;

const PAGE: &str = include_str!("dashboard.html");

pub(super) async fn page() -> impl IntoResponse {
    (
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        PAGE,
    )
}
