//! The read-only HTTP interface: a JSON API under `/api/v1/`, a live stream of new readings,
//! `/healthz`, `/readyz`, Prometheus `/metrics` and a dashboard page. Every query runs on the
//! read-only connections of [`ReadStore`] and the stream only listens to what the writer
//! broadcasts after each commit, so nothing here can slow ingest.
//!
//! Off by default and on loopback by default; any other address needs a bearer token, which
//! every endpoint but `/healthz`, the dashboard page and the OpenAPI document requires.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::Router;
use axum::extract::{Request, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{MethodRouter, get};
use serde::Serialize;
use tokio::sync::broadcast;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::serve::{self, Limits};
use super::{api, dashboard, metrics, stream};
use crate::config::{HttpConfig, Secret};
use crate::reading::LiveBatch;
use crate::storage::{ReadStore, StorageError};
use crate::telemetry::Telemetry;

/// The OpenAPI document of every route below; a test keeps the two in step.
pub const OPENAPI: &str = include_str!("openapi.json");

#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    #[error("cannot listen on {address} for the HTTP API: {source}")]
    Bind {
        address: String,
        #[source]
        source: std::io::Error,
    },
}

/// What every handler shares.
pub(super) struct Api {
    pub store: ReadStore,
    pub telemetry: Arc<Telemetry>,
    pub live: broadcast::Sender<LiveBatch>,
    pub max_rows: u32,
    /// Ends the live streams when the gateway stops.
    pub stop: CancellationToken,
    /// How long a client may take no bytes of a response.
    pub send_timeout: std::time::Duration,
    /// The queries feeding streamed responses.
    pub tasks: TaskTracker,
    token: Option<Secret>,
}

pub(super) type Shared = State<Arc<Api>>;

/// A bound listener with its router, served by [`HttpServer::serve`].
pub struct HttpServer {
    listener: tokio::net::TcpListener,
    address: SocketAddr,
    api: Arc<Api>,
    limits: Limits,
}

impl HttpServer {
    /// Binds `config.listen`.
    ///
    /// # Errors
    /// [`HttpError::Bind`] when the address is taken or not local.
    pub async fn bind(
        config: &HttpConfig,
        store: ReadStore,
        telemetry: Arc<Telemetry>,
        live: broadcast::Sender<LiveBatch>,
    ) -> Result<Self, HttpError> {
        let bind_error = |source| HttpError::Bind {
            address: config.listen.clone(),
            source,
        };
        let listener = tokio::net::TcpListener::bind(&config.listen)
            .await
            .map_err(bind_error)?;
        let address = listener.local_addr().map_err(bind_error)?;
        let api = Arc::new(Api {
            store,
            telemetry,
            live,
            max_rows: config.max_rows,
            stop: CancellationToken::new(),
            send_timeout: config.send_timeout,
            tasks: TaskTracker::new(),
            token: config.token.clone(),
        });
        Ok(Self {
            listener,
            address,
            api,
            limits: Limits {
                max_connections: config.max_connections,
                header_timeout: config.header_timeout,
                send_timeout: config.send_timeout,
            },
        })
    }

    pub fn address(&self) -> SocketAddr {
        self.address
    }

    /// Serves until `stop`; open live streams end then too, and requests in flight have
    /// two seconds to finish.
    pub async fn serve(self, stop: CancellationToken) {
        tracing::info!(address = %self.address, "HTTP API listening");
        let streams = self.api.stop.clone();
        let queries = self.api.tasks.clone();
        let router = router(self.api);
        let end_streams = {
            let stop = stop.clone();
            async move {
                stop.cancelled().await;
                streams.cancel();
            }
        };
        tokio::join!(
            end_streams,
            serve::serve(self.listener, router, self.limits, stop)
        );
        // Their connections are closed: each query stops at its next write.
        queries.close();
        queries.wait().await;
    }
}

/// Who may call a route.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Access {
    /// No data behind it: the dashboard page, liveness, the API document.
    Public,
    /// Needs the bearer token when one is configured.
    Token,
}

/// Every route, in one table: the router is built from it and a test checks the OpenAPI
/// document against it.
fn routes() -> Vec<(&'static str, Access, MethodRouter<Arc<Api>>)> {
    use Access::{Public, Token};
    vec![
        ("/", Public, get(dashboard::page)),
        ("/healthz", Public, get(|| async { "ok\n" })),
        ("/api/v1/openapi.json", Public, get(openapi)),
        ("/readyz", Token, get(api::ready)),
        ("/metrics", Token, get(metrics::metrics)),
        ("/api/v1/devices", Token, get(api::devices)),
        ("/api/v1/devices/{device}", Token, get(api::device)),
        (
            "/api/v1/devices/{device}/readings",
            Token,
            get(api::readings),
        ),
        ("/api/v1/devices/{device}/rollups", Token, get(api::rollups)),
        ("/api/v1/rejections", Token, get(api::rejections)),
        (
            "/api/v1/rejections/{id}/raw",
            Token,
            get(api::rejection_raw),
        ),
        ("/api/v1/stream", Token, get(stream::stream)),
    ]
}

/// The paths the API serves.
pub fn route_paths() -> Vec<&'static str> {
    routes().into_iter().map(|(path, _, _)| path).collect()
}

fn router(api: Arc<Api>) -> Router {
    let mut public = Router::new();
    let mut protected = Router::new();
    for (path, access, handler) in routes() {
        match access {
            Access::Public => public = public.route(path, handler),
            Access::Token => protected = protected.route(path, handler),
        }
    }
    let protected = protected.route_layer(middleware::from_fn_with_state(api.clone(), authorize));
    let open = api.token.is_none();
    let router = public
        .merge(protected)
        .fallback(|| async {
            ApiError::NotFound("no such endpoint; see /api/v1/openapi.json".into())
        })
        .with_state(api);
    // Without a token the API listens on loopback only, where a web page the operator's
    // browser opens could still reach it through a name of its own that resolves to
    // 127.0.0.1 (DNS rebinding): such requests carry that name as their Host.
    if open {
        router.layer(middleware::from_fn(loopback_host))
    } else {
        router
    }
}

/// Lets a request through when its `Host` names this machine's loopback (or is absent, as
/// from HTTP/1.0 clients, which no browser is).
async fn loopback_host(request: Request, next: Next) -> Response {
    let host = request
        .headers()
        .get(header::HOST)
        .map(|h| h.to_str().unwrap_or_default());
    match host {
        Some(host) if !is_loopback_host(host) => ApiError::Forbidden(format!(
            "Host `{}` is not a loopback name; without http.token the API answers only to \
             localhost, 127.0.0.1 and [::1]",
            host.chars().take(100).collect::<String>()
        ))
        .into_response(),
        _ => next.run(request).await,
    }
}

/// `localhost` (or a name under it), or a loopback address, with or without a port.
fn is_loopback_host(host: &str) -> bool {
    let name = match host.strip_prefix('[') {
        Some(v6) => match v6.split_once(']') {
            Some((address, port)) if port.is_empty() || port.starts_with(':') => address,
            _ => return false,
        },
        None => host.rsplit_once(':').map_or(host, |(name, _)| name),
    };
    let name = name.trim_end_matches('.').to_ascii_lowercase();
    name == "localhost"
        || name.ends_with(".localhost")
        || name
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

async fn openapi() -> impl IntoResponse {
    ([(header::CONTENT_TYPE, "application/json")], OPENAPI)
}

/// Lets a request through when no token is configured or it carries the token.
async fn authorize(State(api): Shared, request: Request, next: Next) -> Response {
    let Some(token) = &api.token else {
        return next.run(request).await;
    };
    // The scheme is case-insensitive (RFC 9110 §11.1).
    let presented = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().split_once(' '))
        .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
        .map_or("", |(_, token)| token.trim());
    if same(presented.as_bytes(), token.expose().as_bytes()) {
        next.run(request).await
    } else {
        ApiError::Unauthorized.into_response()
    }
}

/// Compares in time that depends only on the lengths, not on where the bytes differ.
fn same(a: &[u8], b: &[u8]) -> bool {
    let mut diff = a.len() ^ b.len();
    for i in 0..a.len().max(b.len()) {
        let x = a.get(i).copied().unwrap_or(0);
        let y = b.get(i).copied().unwrap_or(0);
        diff |= usize::from(std::hint::black_box(x ^ y));
    }
    diff == 0
}

/// An API error as JSON: `{"error": "...", "parameter": "..."}`.
#[derive(Debug)]
pub(super) enum ApiError {
    BadParameter {
        parameter: String,
        message: String,
    },
    NotFound(String),
    Unauthorized,
    Forbidden(String),
    /// A failure of the gateway's own; what failed is logged, never sent (database errors
    /// name files).
    Internal,
}

impl ApiError {
    pub fn bad(parameter: &str, message: impl Into<String>) -> Self {
        Self::BadParameter {
            parameter: parameter.to_string(),
            message: message.into(),
        }
    }
}

impl From<StorageError> for ApiError {
    fn from(err: StorageError) -> Self {
        match err {
            StorageError::UnknownDevice(_) => Self::NotFound(err.to_string()),
            StorageError::BadCursor(_) => Self::bad("cursor", err.to_string()),
            other => {
                tracing::warn!(error = %other, "API query failed");
                Self::Internal
            }
        }
    }
}

#[derive(Serialize)]
struct ErrorBody<'a> {
    error: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    parameter: Option<&'a str>,
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (status, error, parameter) = match &self {
            Self::BadParameter { parameter, message } => (
                StatusCode::BAD_REQUEST,
                message.as_str(),
                Some(parameter.as_str()),
            ),
            Self::NotFound(message) => (StatusCode::NOT_FOUND, message.as_str(), None),
            Self::Unauthorized => (
                StatusCode::UNAUTHORIZED,
                "missing or wrong bearer token: send `Authorization: Bearer <token>`",
                None,
            ),
            Self::Forbidden(message) => (StatusCode::FORBIDDEN, message.as_str(), None),
            Self::Internal => (
                StatusCode::INTERNAL_SERVER_ERROR,
                "the query failed; the gateway's log says why",
                None,
            ),
        };
        let mut response = (status, axum::Json(ErrorBody { error, parameter })).into_response();
        if matches!(self, Self::Unauthorized) {
            response
                .headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        response
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_compare_equal_only_when_identical() {
        assert!(same(b"0123456789abcdef", b"0123456789abcdef"));
        assert!(!same(b"0123456789abcdef", b"0123456789abcdeF"));
        assert!(!same(b"0123456789abcdef", b"0123456789abcde"));
        assert!(!same(b"", b"x"));
        assert!(same(b"", b""));
    }

    #[tokio::test]
    async fn an_internal_error_names_nothing_of_the_gateway() {
        let err = StorageError::NotSensorgate("/var/lib/sensorgate/secret-name.db".into());
        let response = ApiError::from(err).into_response();
        assert_eq!(response.status(), StatusCode::INTERNAL_SERVER_ERROR);
        let body = axum::body::to_bytes(response.into_body(), 1024)
            .await
            .expect("a small body");
        let text = String::from_utf8_lossy(&body);
        assert!(!text.contains("secret-name"), "{text}");
        assert!(text.contains("log"), "{text}");
    }

    #[test]
    fn only_loopback_names_pass_without_a_token() {
        for host in [
            "localhost",
            "localhost:8080",
            "LOCALHOST.",
            "dash.localhost:1",
            "127.0.0.1",
            "127.0.0.1:8080",
            "127.1.2.3:80",
            "[::1]",
            "[::1]:8080",
        ] {
            assert!(is_loopback_host(host), "{host}");
        }
        for host in [
            "evil.example",
            "evil.example:8080",
            "localhost.evil.example",
            "10.0.0.1:8080",
            "[::1]x",
            "[2001:db8::1]:80",
            "",
        ] {
            assert!(!is_loopback_host(host), "{host}");
        }
    }

    #[test]
    fn the_openapi_document_lists_exactly_the_routes() {
        let doc: serde_json::Value = serde_json::from_str(OPENAPI).expect("openapi.json parses");
        let mut documented: Vec<&str> = doc["paths"]
            .as_object()
            .expect("paths")
            .keys()
            .map(String::as_str)
            .collect();
        let mut routes = route_paths();
        documented.sort_unstable();
        routes.sort_unstable();
        assert_eq!(documented, routes);
    }
}
