//! What operators read over HTTP: `GET /api/v1/status` (the same report as `octd-trainer
//! status`) and `GET /metrics` (Prometheus). Read-only, no patient data; still not for
//! everyone: with `server.operator_token` set a bearer token is required, without one only
//! clients on this host are answered.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::{ConnectInfo, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use serde_json::{json, Value};
use tokio::sync::Mutex;

use crate::policy::PolicyConfig;
use crate::store::Store;

/// Status is computed from every label that counts: at most this often.
const STATUS_CACHE: Duration = Duration::from_secs(10);

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Outcome {
    pub route: String,
    pub outcome: String,
}

/// Intake outcomes, counted as they happen (one metric per fact).
#[derive(Clone, Default, Debug)]
pub struct IntakeMetrics {
    pub requests: Family<Outcome, Counter>,
}

impl IntakeMetrics {
    pub fn record(&self, route: &str, outcome: &str) {
        self.requests.get_or_create(&Outcome { route: route.into(), outcome: outcome.into() }).inc();
    }
}

pub struct Operator {
    store: Store,
    policy: PolicyConfig,
    token: String,
    metrics: IntakeMetrics,
    cached: Mutex<Option<(Instant, Value)>>,
}

impl Operator {
    pub fn new(store: Store, policy: PolicyConfig, token: String, metrics: IntakeMetrics) -> Operator {
        Operator { store, policy, token, metrics, cached: Mutex::new(None) }
    }

    /// Why this client may not read, as the answer it gets; None when it may.
    fn refusal(&self, peer: SocketAddr, headers: &HeaderMap) -> Option<Response> {
        let refuse = |status: StatusCode, code: &str, message: &str| {
            (status, Json(json!({"error": code, "message": message}))).into_response()
        };
        if self.token.is_empty() {
            // A proxy on this host makes every client look local: what it forwards is not.
            let forwarded = ["forwarded", "x-forwarded-for", "x-real-ip"].iter().any(|h| headers.contains_key(*h));
            if peer.ip().is_loopback() && !forwarded {
                return None;
            }
            return Some(refuse(
                StatusCode::FORBIDDEN,
                "operator_only",
                "status is served to this host only (not through a proxy); set server.operator_token to read it from elsewhere",
            ));
        }
        let given = headers
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .unwrap_or_default();
        // Compare whole hashes so the time taken says nothing about the token.
        let same = octd_uplink::sha256_hex(given.as_bytes()) == octd_uplink::sha256_hex(self.token.as_bytes());
        if same && !given.is_empty() {
            None
        } else {
            Some(refuse(
                StatusCode::UNAUTHORIZED,
                "operator_token",
                "Authorization: Bearer <server.operator_token> required",
            ))
        }
    }

    async fn status(&self) -> Result<Value, crate::store::StoreError> {
        let mut cached = self.cached.lock().await;
        if let Some((at, value)) = cached.as_ref() {
            if at.elapsed() < STATUS_CACHE {
                return Ok(value.clone());
            }
        }
        let value = crate::status::gather(&self.store, &self.policy, crate::now_ms()).await?;
        *cached = Some((Instant::now(), value.clone()));
        Ok(value)
    }

    fn render(&self, status: &Value) -> String {
        #[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
        struct Scope {
            scope: String,
            name: String,
        }
        #[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
        struct Kind {
            kind: String,
        }
        let mut registry = Registry::with_prefix("octd_trainer");
        registry.register("requests", "Intake requests by route and outcome", self.metrics.requests.clone());
        let labels = Family::<Kind, Gauge>::default();
        for kind in ["scans", "revisions"] {
            labels.get_or_create(&Kind { kind: kind.into() }).set(status["labels"][kind].as_i64().unwrap_or(0));
        }
        registry.register("labels", "Confirmed labels: scans (the latest revision counts) and every revision", labels);
        let patients = Family::<Kind, Gauge>::default();
        for (split, n) in status["labels"]["patients_by_split"].as_object().into_iter().flatten() {
            patients.get_or_create(&Kind { kind: split.clone() }).set(n.as_i64().unwrap_or(0));
        }
        registry.register("patients", "Patients by their fixed split", patients);
        let accuracy = Family::<Scope, Gauge<f64, std::sync::atomic::AtomicU64>>::default();
        let window = Family::<Scope, Gauge>::default();
        let put = |scope: &str, name: &str, a: &Value| {
            let key = Scope { scope: scope.into(), name: name.into() };
            accuracy.get_or_create(&key).set(a["accuracy"].as_f64().unwrap_or(0.0));
            window.get_or_create(&key).set(a["labels"].as_i64().unwrap_or(0));
        };
        put("fleet", "", &status["accuracy"]["fleet"]);
        for (scope, field) in [("model", "by_model"), ("site", "by_site"), ("device", "by_device")] {
            for (name, a) in status["accuracy"][field].as_object().into_iter().flatten() {
                put(scope, name, a);
            }
        }
        registry.register("live_accuracy", "Live accuracy over the policy's window", accuracy);
        registry.register("live_accuracy_labels", "Labels in the live-accuracy window", window);
        let jobs = Family::<Kind, Gauge>::default();
        for job in status["jobs"].as_array().into_iter().flatten() {
            jobs.get_or_create(&Kind { kind: job["state"].as_str().unwrap_or_default().into() }).inc();
        }
        registry.register("recent_jobs", "The last ten training jobs by state", jobs);
        let due = Gauge::<i64>::default();
        let trigger = status["next_training"]["trigger"].as_str().unwrap_or_default();
        due.set(i64::from(matches!(trigger, "accuracy_below_floor" | "new_labels")));
        registry.register("training_due", "1 when the policy would start a training now", due);
        let mut out = String::new();
        if prometheus_client::encoding::text::encode(&mut out, &registry).is_err() {
            out.clear();
        }
        out
    }
}

pub fn router(operator: Arc<Operator>) -> Router {
    Router::new().route("/api/v1/status", get(status)).route("/metrics", get(metrics)).with_state(operator)
}

/// The status for a client allowed to read it, or the answer it gets instead.
async fn readable_status(op: &Operator, peer: SocketAddr, headers: &HeaderMap) -> Result<Value, Response> {
    if let Some(refused) = op.refusal(peer, headers) {
        return Err(refused);
    }
    op.status().await.map_err(|e| {
        tracing::error!(error = %e, "status");
        (StatusCode::SERVICE_UNAVAILABLE, Json(json!({"error": "unavailable", "message": "the store did not answer"})))
            .into_response()
    })
}

async fn status(
    State(op): State<Arc<Operator>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
) -> Response {
    match readable_status(&op, peer, &headers).await {
        Ok(v) => Json(v).into_response(),
        Err(answer) => answer,
    }
}

async fn metrics(
    State(op): State<Arc<Operator>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
) -> Response {
    match readable_status(&op, peer, &headers).await {
        Ok(v) => ([("content-type", "application/openmetrics-text; version=1.0.0; charset=utf-8")], op.render(&v))
            .into_response(),
        Err(answer) => answer,
    }
}
