//! Beside the pipeline: what the daemon tells the outside about itself — Prometheus metrics,
//! `/healthz` `/readyz` `/status` on a local address, and systemd's notify protocol
//! (READY, STATUS, WATCHDOG). The stages only record facts here (`Telemetry`); whether the
//! pipeline is healthy is decided in one place (`Telemetry::problem`), which both the
//! watchdog and `/healthz` use.

pub mod server;
pub mod systemd;

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

use crate::config::Config;
use crate::ingest::Job;
use crate::scan::{now_ms, rfc3339_ms, LiveAccuracy, ModelStamp, StageTimings};
use crate::store::Store;
use crate::update::Updater;

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TelemetryError {
    #[error("metrics listener on {addr}: {source}")]
    Listen { addr: std::net::SocketAddr, source: std::io::Error },
    #[error("{0}")]
    Snapshot(String),
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabels {
    outcome: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StageLabels {
    stage: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StateLabels {
    state: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ModelLabels {
    name: String,
    version: String,
    sha256: String,
    backend: String,
    pending: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BuildLabels {
    version: &'static str,
}

/// Facts the stages record; shared by the pipeline, the watchdog and the metrics endpoint.
pub struct Telemetry {
    registry: Registry,
    scans: Family<OutcomeLabels, Counter>,
    stage_seconds: Family<StageLabels, Histogram>,
    scans_in_state: Family<StateLabels, Gauge>,
    queue_depth: Gauge,
    queue_capacity: Gauge,
    workers_busy: Gauge,
    outbox_messages: Gauge,
    outbox_oldest_age: Gauge<f64, AtomicU64>,
    model_info: Family<ModelLabels, Gauge>,
    broker_gauge: Gauge,
    disk_free: Gauge,
    disk_total: Gauge,
    ready_gauge: Gauge,
    healthy_gauge: Gauge,
    started: Instant,
    /// When each worker took its current scan (ms since the epoch), 0 while idle.
    workers: Vec<AtomicU64>,
    /// The ingest loop's last turn (ms since the epoch), 0 until its watches are registered.
    pub ingest_heartbeat: Arc<AtomicU64>,
    pub broker_connected: Arc<AtomicBool>,
    ready: AtomicBool,
    last_result_ms: AtomicU64,
    /// The last health verdict (None = healthy), for /healthz and STATUS.
    problem: Mutex<Option<String>>,
    labels: Family<OutcomeLabels, Counter>,
    live_accuracy_gauge: Gauge<f64, AtomicU64>,
    live_accuracy_labels: Gauge,
    /// The latest live-accuracy report, for /status.
    live_accuracy: Mutex<Option<LiveAccuracy>>,
}

/// Register `metric` under `name` and hand back the handle the stages update.
fn register<M: prometheus_client::registry::Metric + Clone>(
    registry: &mut Registry,
    name: &str,
    help: &str,
    metric: M,
) -> M {
    registry.register(name, help, metric.clone());
    metric
}

fn stage_buckets() -> impl Iterator<Item = f64> {
    // 5 ms .. ~80 s: a B-scan on a GPU up to a large volume on a CPU.
    prometheus_client::metrics::histogram::exponential_buckets(0.005, 2.0, 15)
}

impl Telemetry {
    pub fn new(workers: usize) -> Telemetry {
        let mut registry = Registry::with_prefix("octd");
        let r = &mut registry;
        let scans =
            register(r, "scans", "Scans finished, by outcome (classified, or the quarantine kind)", Family::default());
        let stage_seconds = register(
            r,
            "stage_duration_seconds",
            "Time per pipeline stage (queue, deid, infer) and in all (total), per classified scan",
            Family::<StageLabels, Histogram>::new_with_constructor(|| Histogram::new(stage_buckets()) as Histogram),
        );
        let scans_in_state = register(r, "scans_in_state", "Scans in the store, by state", Family::default());
        let queue_depth = register(r, "queue_depth", "Claimed scans waiting for a worker", Gauge::default());
        let queue_capacity = register(r, "queue_capacity", "Size of the worker queue", Gauge::default());
        let workers_busy = register(r, "workers_busy", "Workers processing a scan now", Gauge::default());
        let outbox_messages =
            register(r, "outbox_messages", "Messages waiting for the broker's PUBACK", Gauge::default());
        let outbox_oldest_age = register(
            r,
            "outbox_oldest_age_seconds",
            "Age of the oldest classified scan whose result is not yet acknowledged",
            Gauge::<f64, AtomicU64>::default(),
        );
        let model_info =
            register(r, "model_info", "The active model and the backend it runs on (value 1)", Family::default());
        let broker_gauge = register(r, "broker_connected", "1 while connected to the MQTT broker", Gauge::default());
        let disk_free =
            register(r, "disk_free_bytes", "Free space on the state directory's filesystem", Gauge::default());
        let disk_total = register(r, "disk_total_bytes", "Size of the state directory's filesystem", Gauge::default());
        let ready_gauge = register(r, "ready", "1 once watcher, store, model and broker are up", Gauge::default());
        let healthy_gauge =
            register(r, "healthy", "1 while the pipeline makes progress (the watchdog pings)", Gauge::default());
        let labels = register(r, "labels", "Reviewers' verdicts, by outcome (accepted, rejected)", Family::default());
        let live_accuracy_gauge = register(
            r,
            "live_accuracy",
            "Share of the most recent verdicts (feedback.window) that confirmed the model",
            Gauge::<f64, AtomicU64>::default(),
        );
        let live_accuracy_labels =
            register(r, "live_accuracy_labels", "Verdicts the live accuracy is computed over", Gauge::default());
        let build = register(r, "build_info", "octd version (value 1)", Family::<BuildLabels, Gauge>::default());
        build.get_or_create(&BuildLabels { version: env!("CARGO_PKG_VERSION") }).set(1);
        Telemetry {
            registry,
            scans,
            stage_seconds,
            scans_in_state,
            queue_depth,
            queue_capacity,
            workers_busy,
            outbox_messages,
            outbox_oldest_age,
            model_info,
            broker_gauge,
            disk_free,
            disk_total,
            ready_gauge,
            healthy_gauge,
            started: Instant::now(),
            workers: (0..workers).map(|_| AtomicU64::new(0)).collect(),
            ingest_heartbeat: Arc::new(AtomicU64::new(0)),
            broker_connected: Arc::new(AtomicBool::new(false)),
            ready: AtomicBool::new(false),
            last_result_ms: AtomicU64::new(0),
            problem: Mutex::new(None),
            labels,
            live_accuracy_gauge,
            live_accuracy_labels,
            live_accuracy: Mutex::new(None),
        }
    }

    /// A verdict was answered (`accepted` or `rejected`).
    pub fn label_answered(&self, outcome: &str) {
        self.labels.get_or_create(&OutcomeLabels { outcome: outcome.to_string() }).inc();
    }

    pub fn set_live_accuracy(&self, report: &LiveAccuracy) {
        self.live_accuracy_gauge.set(report.overall.accuracy);
        self.live_accuracy_labels.set(report.overall.labels as i64);
        *self.live_accuracy.lock().unwrap_or_else(|p| p.into_inner()) = Some(report.clone());
    }

    pub fn worker_busy(&self, worker: usize, busy: bool) {
        if let Some(w) = self.workers.get(worker) {
            w.store(if busy { now_ms().max(1) } else { 0 }, Ordering::Relaxed);
        }
    }

    pub fn scan_classified(&self, timings: &StageTimings) {
        self.scans.get_or_create(&OutcomeLabels { outcome: "classified".into() }).inc();
        for (stage, ms) in [
            ("queue", timings.queue_ms),
            ("deid", timings.deid_ms),
            ("infer", timings.infer_ms),
            ("total", timings.total_ms),
        ] {
            self.stage_seconds.get_or_create(&StageLabels { stage }).observe(ms as f64 / 1000.0);
        }
        self.last_result_ms.store(now_ms(), Ordering::Relaxed);
    }

    /// `outcome` is the quarantine's event kind (rejected, quarantined).
    pub fn scan_quarantined(&self, outcome: &str) {
        self.scans.get_or_create(&OutcomeLabels { outcome: outcome.to_string() }).inc();
    }

    pub fn set_ready(&self) {
        self.ready.store(true, Ordering::Relaxed);
        self.ready_gauge.set(1);
    }

    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Relaxed)
    }

    pub fn watcher_up(&self) -> bool {
        self.ingest_heartbeat.load(Ordering::Relaxed) > 0
    }

    /// Why the pipeline is not making progress, or None. A worker on one scan longer than
    /// `stuck_after`, or an ingest loop that stopped turning, is a wedged pipeline.
    pub fn problem(&self, stuck_after: Duration, ingest_period: Duration) -> Option<String> {
        let now = now_ms();
        for (i, w) in self.workers.iter().enumerate() {
            let since = w.load(Ordering::Relaxed);
            if since > 0 && now.saturating_sub(since) > stuck_after.as_millis() as u64 {
                return Some(format!("worker {i} has been on one scan for {} s", now.saturating_sub(since) / 1000));
            }
        }
        let beat = self.ingest_heartbeat.load(Ordering::Relaxed);
        // A few missed turns are scheduling noise; many are a hung watcher or filesystem.
        let limit = (ingest_period * 5).max(Duration::from_secs(30)).as_millis() as u64;
        if beat > 0 && now.saturating_sub(beat) > limit {
            return Some(format!("the folder watcher has not turned for {} s", now.saturating_sub(beat) / 1000));
        }
        None
    }

    pub fn set_problem(&self, problem: Option<String>) {
        self.healthy_gauge.set(i64::from(problem.is_none()));
        *self.problem.lock().unwrap_or_else(|p| p.into_inner()) = problem;
    }

    pub fn current_problem(&self) -> Option<String> {
        self.problem.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    fn busy_workers(&self) -> usize {
        self.workers.iter().filter(|w| w.load(Ordering::Relaxed) > 0).count()
    }
}

/// `octd status` and `/status`: what a field engineer asks first.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StatusReport {
    pub version: String,
    /// starting | ready | unhealthy
    pub state: String,
    pub problem: Option<String>,
    pub uptime_s: u64,
    pub model: Option<ModelStamp>,
    pub model_pending: bool,
    /// Why the active model runs although its health gate failed (nothing to roll back to).
    pub model_alarm: Option<String>,
    pub backend: Option<String>,
    pub queue: QueueReport,
    pub outbox: OutboxReport,
    pub scans: std::collections::BTreeMap<String, u64>,
    pub last_result_at: Option<String>,
    pub broker: BrokerReport,
    pub disk: DiskReport,
    /// Reviewers' verdicts against the model (absent before the first verdict since start).
    #[serde(default)]
    pub live_accuracy: Option<LiveAccuracy>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct QueueReport {
    pub depth: usize,
    pub capacity: usize,
    pub workers_busy: usize,
    pub workers: usize,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct OutboxReport {
    pub messages: u64,
    pub oldest_age_s: Option<f64>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BrokerReport {
    pub connected: bool,
    /// The configured URL (never credentials), or "embedded <address>".
    pub target: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DiskReport {
    pub path: PathBuf,
    pub free_bytes: u64,
    pub total_bytes: u64,
}

/// Everything a status snapshot reads.
pub struct Sources {
    pub telemetry: Arc<Telemetry>,
    pub store: Arc<Store>,
    pub updater: Arc<Updater>,
    pub jobs: mpsc::WeakSender<Job>,
    pub config: Config,
}

pub fn broker_target(config: &Config) -> String {
    if config.mqtt.url.is_empty() {
        format!("embedded {}", config.mqtt.embedded_listen)
    } else {
        config.mqtt.url.clone()
    }
}

impl Sources {
    /// (scans waiting for a worker, queue size).
    pub fn queue(&self) -> (usize, usize) {
        match self.jobs.upgrade() {
            Some(tx) => (tx.max_capacity() - tx.capacity(), tx.max_capacity()),
            None => (0, self.config.pipeline.queue_capacity),
        }
    }

    /// Reads the store: call off the async runtime. Also refreshes the gauges.
    pub fn snapshot(&self) -> Result<StatusReport, TelemetryError> {
        let t = &self.telemetry;
        let counts = self.store.counts().map_err(|e| TelemetryError::Snapshot(e.to_string()))?;
        let now = now_ms();
        let (depth, capacity) = self.queue();
        let oldest_age_s = counts.outbox_oldest_ms.map(|ms| now.saturating_sub(ms) as f64 / 1000.0);
        let state_dir = &self.config.device.state_dir;
        let disk = DiskReport {
            path: state_dir.clone(),
            free_bytes: fs4::available_space(state_dir).unwrap_or(0),
            total_bytes: fs4::total_space(state_dir).unwrap_or(0),
        };
        let model = self.updater.current().map(|m| m.classifier.stamp().clone());
        let model_pending = self.updater.state().pending.is_some();
        let connected = t.broker_connected.load(Ordering::Relaxed);
        let problem = t.current_problem();
        let state = if problem.is_some() {
            "unhealthy"
        } else if t.is_ready() {
            "ready"
        } else {
            "starting"
        };
        let last = t.last_result_ms.load(Ordering::Relaxed);

        t.queue_depth.set(depth as i64);
        t.queue_capacity.set(capacity as i64);
        t.workers_busy.set(t.busy_workers() as i64);
        t.outbox_messages.set(counts.outbox as i64);
        t.outbox_oldest_age.set(oldest_age_s.unwrap_or(0.0));
        t.scans_in_state.clear();
        for (state, n) in &counts.by_state {
            t.scans_in_state.get_or_create(&StateLabels { state: state.clone() }).set(*n as i64);
        }
        t.model_info.clear();
        if let Some(m) = &model {
            t.model_info
                .get_or_create(&ModelLabels {
                    name: m.name.clone(),
                    version: m.version.clone(),
                    sha256: m.sha256.clone(),
                    backend: m.backend.clone(),
                    pending: if model_pending { "true" } else { "false" },
                })
                .set(1);
        }
        t.broker_gauge.set(i64::from(connected));
        t.disk_free.set(disk.free_bytes as i64);
        t.disk_total.set(disk.total_bytes as i64);

        Ok(StatusReport {
            version: env!("CARGO_PKG_VERSION").into(),
            state: state.into(),
            problem,
            uptime_s: t.started.elapsed().as_secs(),
            backend: model.as_ref().map(|m| m.backend.clone()),
            model,
            model_pending,
            model_alarm: self.updater.state().alarm,
            queue: QueueReport { depth, capacity, workers_busy: t.busy_workers(), workers: t.workers.len() },
            outbox: OutboxReport { messages: counts.outbox, oldest_age_s },
            scans: counts.by_state,
            last_result_at: (last > 0).then(|| rfc3339_ms(last)),
            broker: BrokerReport { connected, target: broker_target(&self.config) },
            disk,
            live_accuracy: t.live_accuracy.lock().unwrap_or_else(|p| p.into_inner()).clone(),
        })
    }

    /// The Prometheus text exposition (after a fresh snapshot).
    pub fn metrics_text(&self) -> Result<String, TelemetryError> {
        self.snapshot()?;
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.telemetry.registry)
            .map_err(|e| TelemetryError::Snapshot(e.to_string()))?;
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_worker_on_one_scan_too_long_is_a_problem() {
        let t = Telemetry::new(2);
        let stuck = Duration::from_millis(50);
        assert_eq!(t.problem(stuck, Duration::from_secs(1)), None, "idle workers are healthy");
        t.worker_busy(1, true);
        assert_eq!(t.problem(stuck, Duration::from_secs(1)), None, "a fresh scan is healthy");
        std::thread::sleep(Duration::from_millis(120));
        let problem = t.problem(stuck, Duration::from_secs(1)).expect("wedged worker is reported");
        assert!(problem.contains("worker 1"), "{problem}");
        t.worker_busy(1, false);
        assert_eq!(t.problem(stuck, Duration::from_secs(1)), None);
    }

    #[test]
    fn a_stalled_watcher_is_a_problem() {
        let t = Telemetry::new(1);
        let period = Duration::from_secs(1);
        assert_eq!(t.problem(Duration::from_secs(60), period), None, "not started yet is not a stall");
        t.ingest_heartbeat.store(now_ms() - 31_000, Ordering::Relaxed);
        assert!(t.problem(Duration::from_secs(60), period).is_some_and(|p| p.contains("watcher")));
        t.ingest_heartbeat.store(now_ms(), Ordering::Relaxed);
        assert_eq!(t.problem(Duration::from_secs(60), period), None);
    }
}
