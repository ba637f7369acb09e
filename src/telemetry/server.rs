//! The local HTTP endpoint: `/metrics` (Prometheus), `/healthz`, `/readyz`, `/status` (JSON).
//! It binds a configured address (loopback by default): it carries no PHI, but it is not
//! meant for the clinic network. Whoever can reach it cannot slow the pipeline: connections
//! are capped (more are closed at once), headers must arrive within a few seconds, each
//! request has a deadline, and the handlers that read the store (`/metrics`, `/status`) run
//! a few at a time, answering 503 with the reason beyond that. They read counters the store
//! keeps incrementally, never the scans table.

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use tokio::sync::{watch, Semaphore};

use super::{Sources, TelemetryError};

/// Bind now, so that a taken port is a start-up error.
pub async fn bind(addr: SocketAddr) -> Result<tokio::net::TcpListener, TelemetryError> {
    tokio::net::TcpListener::bind(addr).await.map_err(|source| TelemetryError::Listen { addr, source })
}

/// Connections served at once (descriptors are finite); one more is closed on accept. Idle
/// ones go after [`HEADER_READ_TIMEOUT`], so only a flood beyond this many at once can
/// make the endpoint refuse, never the pipeline slow down.
pub const MAX_CONNECTIONS: usize = 256;
/// Store-reading requests (`/metrics`, `/status`) in progress at once.
pub const MAX_STORE_READS: usize = 4;
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(3);
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// A connection's whole life, keep-alive included.
const CONNECTION_LIFETIME: Duration = Duration::from_secs(60);

#[derive(Clone)]
struct Endpoint {
    sources: Arc<Sources>,
    store_reads: Arc<Semaphore>,
}

/// Serve on `listener` until `shutdown`.
pub async fn serve(
    listener: tokio::net::TcpListener,
    sources: Arc<Sources>,
    mut shutdown: watch::Receiver<bool>,
) -> Result<(), std::io::Error> {
    let endpoint = Endpoint { sources, store_reads: Arc::new(Semaphore::new(MAX_STORE_READS)) };
    let app = Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/status", get(status))
        .layer(axum::middleware::from_fn(deadline))
        .with_state(endpoint);
    let connections = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    loop {
        let (stream, _) = tokio::select! {
            _ = crate::shutdown::requested(&mut shutdown) => return Ok(()),
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                // Out of descriptors and the like: the endpoint waits, the daemon goes on.
                Err(e) => {
                    tracing::debug!(error = %e, "telemetry endpoint: accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let Ok(permit) = connections.clone().try_acquire_owned() else {
            tracing::debug!("telemetry endpoint: connection limit reached; closing one");
            drop(stream);
            continue;
        };
        let service = hyper_util::service::TowerToHyperService::new(app.clone());
        tokio::spawn(async move {
            let _permit = permit;
            let connection = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(HEADER_READ_TIMEOUT)
                .serve_connection(hyper_util::rt::TokioIo::new(stream), service);
            let _ = tokio::time::timeout(CONNECTION_LIFETIME, connection).await;
        });
    }
}

/// Every request ends within [`REQUEST_TIMEOUT`], with a reason when it runs out.
async fn deadline(request: axum::extract::Request, next: axum::middleware::Next) -> Response {
    match tokio::time::timeout(REQUEST_TIMEOUT, next.run(request)).await {
        Ok(response) => response,
        Err(_) => (StatusCode::SERVICE_UNAVAILABLE, "timed out: the daemon is busy; retry\n").into_response(),
    }
}

async fn off_runtime<T: Send + 'static>(
    endpoint: Endpoint,
    f: fn(&Sources) -> Result<T, TelemetryError>,
) -> Result<T, Response> {
    let Ok(permit) = endpoint.store_reads.clone().try_acquire_owned() else {
        let busy = format!("busy: {MAX_STORE_READS} status or metrics requests are in progress; retry\n");
        return Err((StatusCode::SERVICE_UNAVAILABLE, [(header::RETRY_AFTER, "1")], busy).into_response());
    };
    let sources = endpoint.sources;
    match tokio::task::spawn_blocking(move || {
        let _permit = permit;
        f(&sources)
    })
    .await
    {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err((StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response()),
        Err(e) => Err((StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response()),
    }
}

async fn metrics(State(endpoint): State<Endpoint>) -> Response {
    match off_runtime(endpoint, Sources::metrics_text).await {
        Ok(text) => ([(header::CONTENT_TYPE, "application/openmetrics-text; version=1.0.0; charset=utf-8")], text)
            .into_response(),
        Err(r) => r,
    }
}

async fn status(State(endpoint): State<Endpoint>) -> Response {
    match off_runtime(endpoint, Sources::snapshot).await {
        Ok(report) => Json(report).into_response(),
        Err(r) => r,
    }
}

/// Alive and making progress: what the systemd watchdog is fed on.
async fn healthz(State(Endpoint { sources, .. }): State<Endpoint>) -> Response {
    match sources.telemetry.current_problem() {
        None => (StatusCode::OK, "ok\n").into_response(),
        Some(problem) => (StatusCode::SERVICE_UNAVAILABLE, format!("unhealthy: {problem}\n")).into_response(),
    }
}

/// Able to take scans and deliver results now.
async fn readyz(State(Endpoint { sources, .. }): State<Endpoint>) -> Response {
    let t = &sources.telemetry;
    let mut missing = Vec::new();
    if !t.is_ready() {
        missing.push("starting");
    }
    if sources.updater.current().is_none() {
        missing.push("no model loaded");
    }
    if !t.watcher_up() {
        missing.push("folder watcher not running");
    }
    if !t.broker_connected.load(Ordering::Relaxed) {
        missing.push("not connected to the MQTT broker (results are buffered)");
    }
    if let Some(problem) = t.current_problem() {
        return (StatusCode::SERVICE_UNAVAILABLE, format!("not ready: {problem}\n")).into_response();
    }
    if missing.is_empty() {
        (StatusCode::OK, "ready\n").into_response()
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, format!("not ready: {}\n", missing.join("; "))).into_response()
    }
}
