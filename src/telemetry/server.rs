//! The local HTTP endpoint: `/metrics` (Prometheus), `/healthz`, `/readyz`, `/status` (JSON).
//! It binds a configured address (loopback by default): it carries no PHI, but it is not
//! meant for the clinic network.

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use tokio::sync::watch;

use super::{Sources, TelemetryError};

/// Bind now, so that a taken port is a start-up error.
pub async fn bind(addr: SocketAddr) -> Result<tokio::net::TcpListener, TelemetryError> {
    tokio::net::TcpListener::bind(addr).await.map_err(|source| TelemetryError::Listen { addr, source })
}

/// Serve on `listener` until `shutdown`.
pub async fn serve(
    listener: tokio::net::TcpListener,
    sources: Arc<Sources>,
    mut shutdown: watch::Receiver<bool>,
) -> Result<(), std::io::Error> {
    let app = Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/status", get(status))
        .with_state(sources);
    let stop = async move {
        let _ = shutdown.wait_for(|s| *s).await;
    };
    axum::serve(listener, app).with_graceful_shutdown(stop).await
}

async fn off_runtime<T: Send + 'static>(
    sources: Arc<Sources>,
    f: fn(&Sources) -> Result<T, TelemetryError>,
) -> Result<T, Response> {
    match tokio::task::spawn_blocking(move || f(&sources)).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err((StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response()),
        Err(e) => Err((StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response()),
    }
}

async fn metrics(State(sources): State<Arc<Sources>>) -> Response {
    match off_runtime(sources, Sources::metrics_text).await {
        Ok(text) => ([(header::CONTENT_TYPE, "application/openmetrics-text; version=1.0.0; charset=utf-8")], text)
            .into_response(),
        Err(r) => r,
    }
}

async fn status(State(sources): State<Arc<Sources>>) -> Response {
    match off_runtime(sources, Sources::snapshot).await {
        Ok(report) => Json(report).into_response(),
        Err(r) => r,
    }
}

/// Alive and making progress: what the systemd watchdog is fed on.
async fn healthz(State(sources): State<Arc<Sources>>) -> Response {
    match sources.telemetry.current_problem() {
        None => (StatusCode::OK, "ok\n").into_response(),
        Some(problem) => (StatusCode::SERVICE_UNAVAILABLE, format!("unhealthy: {problem}\n")).into_response(),
    }
}

/// Able to take scans and deliver results now.
async fn readyz(State(sources): State<Arc<Sources>>) -> Response {
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
