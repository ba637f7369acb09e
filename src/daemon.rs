//! `octd run`: wires the stages together and keeps them going.
//!
//! ingest --Job--> worker (deid -> infer -> store result + outbox) --wake--> publisher
//!
//! Every step of a worker first reads the scan's state from the store and does only what is
//! left, so a job re-sent after a crash resumes where the last commit left it.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, watch, Mutex, Notify};

use crate::config::Config;
use crate::deid::{DeidError, Deidentifier, InputLimits};
use crate::infer::InferError;
use crate::ingest::{self, DiskGuard, Ingest, Job};
use crate::publish::{self, Publisher, Topics};
use crate::scan::{
    now_ms, rfc3339_ms, EventKind, EventMessage, ResultMessage, ScanId, ScanRecord, ScanState, StageTimings,
    RESULT_SCHEMA,
};
use crate::secret::DeviceSecret;
use crate::store::{OutboxMessage, Store, StoreError, STORE_FILE};
use crate::telemetry::{self, systemd, Sources, Telemetry};
use crate::update::{UpdateError, Updater};

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DaemonError {
    /// Settings or files an operator must fix; a restart will not help.
    #[error("{0}")]
    Config(String),
    #[error("store: {0}")]
    Store(#[from] StoreError),
    #[error("{0}")]
    Runtime(String),
    #[error("{0}")]
    Model(#[from] UpdateError),
}

/// The folders under the state directory.
#[derive(Debug, Clone)]
pub struct Dirs {
    pub state: PathBuf,
    pub spool: PathBuf,
    pub deid: PathBuf,
    pub quarantine: PathBuf,
}

impl Dirs {
    pub fn new(state: &Path) -> Self {
        Dirs {
            state: state.to_path_buf(),
            spool: state.join("spool"),
            deid: state.join("deid"),
            quarantine: state.join("quarantine"),
        }
    }

    pub fn create(&self) -> std::io::Result<()> {
        for d in [&self.state, &self.spool, &self.deid, &self.quarantine] {
            std::fs::create_dir_all(d)?;
        }
        Ok(())
    }
}

/// The reason file beside a quarantined input. Holds no identity.
#[derive(Debug, Serialize, Deserialize)]
pub struct QuarantineReason {
    pub scan_id: ScanId,
    pub code: String,
    pub detail: String,
    pub kind: EventKind,
    pub at: String,
}

struct Context {
    config: Config,
    dirs: Dirs,
    store: Arc<Store>,
    deid: Deidentifier,
    updater: Arc<Updater>,
    topics: Topics,
    wake: Arc<Notify>,
    telemetry: Arc<Telemetry>,
}

/// Low-disk alarm: intake stops below `min_free_bytes` and an alarm goes out once.
struct Disk {
    dir: PathBuf,
    min_free: u64,
    low: AtomicBool,
    store: Arc<Store>,
    topics: Topics,
    config: Config,
    wake: Arc<Notify>,
}

impl DiskGuard for Disk {
    fn intake_allowed(&self) -> bool {
        let free = fs4::available_space(&self.dir).unwrap_or(u64::MAX);
        let low = free < self.min_free;
        if low != self.low.swap(low, Ordering::Relaxed) {
            let (kind, detail) = if low {
                tracing::error!(free, min = self.min_free, "disk almost full: intake stopped");
                (EventKind::Alarm, format!("{free} bytes free, below {}; intake stopped", self.min_free))
            } else {
                tracing::info!(free, "disk space back: intake resumed");
                (EventKind::AlarmCleared, format!("{free} bytes free; intake resumed"))
            };
            let message = event_message(&self.config, &self.topics, kind, None, "disk_low", &detail);
            if let Err(e) = self.store.enqueue(&message) {
                tracing::error!(error = %e, "cannot record the disk alarm");
            }
            self.wake.notify_one();
        }
        !low
    }
}

fn event_message(
    config: &Config,
    topics: &Topics,
    kind: EventKind,
    scan_id: Option<ScanId>,
    code: &str,
    detail: &str,
) -> OutboxMessage {
    publish::event_outbox(topics, &EventMessage { scan_id, ..EventMessage::new(config, kind, code, detail) })
}

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> Result<T, DaemonError> {
    tokio::task::spawn_blocking(f).await.map_err(|e| DaemonError::Runtime(format!("worker task: {e}")))
}

/// Run until SIGINT/SIGTERM (or, for embedding and tests, until `stop` turns true).
pub async fn run(config: Config, stop: Option<watch::Receiver<bool>>) -> Result<(), DaemonError> {
    // Listen for SIGTERM before anything slow (model loading, recovery), so a stop during
    // start-up is a clean stop rather than the default signal death.
    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    let stop_requested = {
        let shutdown_tx = shutdown_tx.clone();
        let signals = Signals::install().map_err(|e| DaemonError::Runtime(format!("signal handlers: {e}")))?;
        tokio::spawn(async move {
            match stop {
                Some(mut stop) => {
                    let _ = stop.wait_for(|s| *s).await;
                }
                None => signals.wait().await,
            }
            tracing::info!("shutting down");
            let _ = shutdown_tx.send(true);
        })
    };
    let result = run_until(config, shutdown_tx, shutdown_rx).await;
    stop_requested.abort();
    result
}

async fn run_until(
    mut config: Config,
    shutdown_tx: watch::Sender<bool>,
    shutdown_rx: watch::Receiver<bool>,
) -> Result<(), DaemonError> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let dirs = Dirs::new(&config.device.state_dir);
    if config.model.engine_cache_dir.is_none() {
        config.model.engine_cache_dir = Some(dirs.state.join("engine-cache"));
    }
    dirs.create().map_err(|e| DaemonError::Config(format!("cannot create {}: {e}", dirs.state.display())))?;
    systemd::status("opening the store");
    let secret = DeviceSecret::load_or_create(&dirs.state)
        .map_err(|e| DaemonError::Config(format!("device secret in {}: {e}", dirs.state.display())))?;
    let store = Arc::new(Store::open(&dirs.state.join(STORE_FILE), &secret)?);
    {
        let store = store.clone();
        let counts = blocking(move || store.counts()).await??;
        tracing::info!(scans = ?counts.by_state, outbox = counts.outbox, "store opened");
    }
    let wake = Arc::new(Notify::new());
    let topics = Topics::new(&config);
    let telemetry = Arc::new(Telemetry::new(config.pipeline.workers));
    // systemd's watchdog runs from the moment the process starts; until the supervisor judges
    // the pipeline, a live runtime is the evidence (start-up is bounded by TimeoutStartSec,
    // and a first model install or TensorRT engine build may outlast WatchdogSec).
    let startup_pings = StartupPings::start();
    systemd::status("loading the model");
    let updater = Updater::start(&config, &dirs.state, store.clone(), topics.clone(), wake.clone()).await?;

    if config.mqtt.url.is_empty() {
        publish::start_embedded_broker(config.mqtt.embedded_listen).map_err(|e| DaemonError::Config(e.to_string()))?;
    }
    let (notices_tx, notices_rx) = mpsc::channel(1);
    systemd::status("connecting to the MQTT broker");
    let publisher = Publisher::new(store.clone(), config.clone(), wake.clone(), updater.slot(), notices_tx)
        .with_connection_flag(telemetry.broker_connected.clone());
    let publisher = tokio::spawn(publisher.run(shutdown_rx.clone()));
    let update_loop = tokio::spawn(updater.clone().run(notices_rx, shutdown_rx.clone()));

    let ctx = Arc::new(Context {
        deid: Deidentifier::new(secret, config.deid.burned_in_masks.clone(), InputLimits::from(&config.ingest)),
        config: config.clone(),
        dirs: dirs.clone(),
        store: store.clone(),
        updater: updater.clone(),
        topics: topics.clone(),
        wake: wake.clone(),
        telemetry: telemetry.clone(),
    });

    let (jobs_tx, jobs_rx) = mpsc::channel::<Job>(config.pipeline.queue_capacity);
    let sources = Arc::new(Sources {
        telemetry: telemetry.clone(),
        store: store.clone(),
        updater: updater.clone(),
        jobs: jobs_tx.downgrade(),
        config: config.clone(),
    });
    let endpoint = match config.telemetry_address() {
        Some(addr) => {
            let (bound, task) = telemetry::server::start(addr, sources.clone(), shutdown_rx.clone())
                .await
                .map_err(|e| DaemonError::Runtime(e.to_string()))?;
            tracing::info!(address = %bound, "metrics and health endpoint listening");
            Some(task)
        }
        None => None,
    };
    let jobs_rx = Arc::new(Mutex::new(jobs_rx));
    let mut workers = Vec::new();
    for worker in 0..config.pipeline.workers {
        let ctx = ctx.clone();
        let rx = jobs_rx.clone();
        let mut shutdown = shutdown_rx.clone();
        workers.push(tokio::spawn(async move {
            loop {
                // Queued scans are already durable (state received); on shutdown they wait
                // for the next start rather than delaying this one.
                let job = tokio::select! {
                    biased;
                    _ = shutdown.wait_for(|s| *s) => None,
                    job = async { rx.lock().await.recv().await } => job,
                };
                let Some(job) = job else { break };
                ctx.telemetry.worker_busy(worker, true);
                if let Err(e) = process(&ctx, job).await {
                    tracing::error!(scan_id = %job.scan_id, error = %e, "scan left for retry at next start");
                }
                ctx.telemetry.worker_busy(worker, false);
            }
        }));
    }

    // Resume what a crash interrupted, before new files are looked at.
    let unfinished = {
        let store = store.clone();
        blocking(move || store.unfinished()).await??
    };
    if !unfinished.is_empty() {
        tracing::info!(count = unfinished.len(), "resuming interrupted scans");
    }
    for record in unfinished {
        if record.state == ScanState::Received {
            let (store, spool, id) = (store.clone(), dirs.spool.clone(), record.scan_id);
            blocking(move || ingest::recover_claim(&store, &spool, id)).await??;
        }
        if jobs_tx.send(Job { scan_id: record.scan_id, queued_at: Instant::now() }).await.is_err() {
            break;
        }
    }
    wake.notify_one();

    let disk = Arc::new(Disk {
        dir: dirs.state.clone(),
        min_free: config.ingest.min_free_bytes,
        low: AtomicBool::new(false),
        store: store.clone(),
        topics: topics.clone(),
        config: config.clone(),
        wake: wake.clone(),
    });
    let ingest = Ingest::new(config.ingest.clone(), store.clone(), dirs.spool.clone(), jobs_tx, disk)
        .with_heartbeat(telemetry.ingest_heartbeat.clone());
    let mut ingest = tokio::spawn(ingest.run(shutdown_rx.clone()));
    let pruner = tokio::spawn(prune_loop(ctx.clone(), shutdown_rx.clone()));
    drop(startup_pings);
    let supervisor = tokio::spawn(supervise(sources, shutdown_rx.clone()));
    tracing::info!(folders = config.ingest.watch.len(), "watching");

    let mut stopped = shutdown_rx.clone();
    tokio::select! {
        _ = stopped.wait_for(|s| *s) => {}
        result = &mut ingest => {
            let _ = shutdown_tx.send(true);
            return match result {
                Ok(Ok(())) => Ok(()),
                Ok(Err(e)) => Err(DaemonError::Config(e.to_string())),
                Err(e) => Err(DaemonError::Runtime(e.to_string())),
            };
        }
    }
    let _ = shutdown_tx.send(true);
    systemd::stopping();
    let _ = supervisor.await;
    let _ = ingest.await;
    // Workers finish the scan in hand, then stop.
    for w in workers {
        let _ = w.await;
    }
    let _ = pruner.await;
    let _ = update_loop.await;
    let _ = publisher.await;
    if let Some(endpoint) = endpoint {
        let _ = endpoint.await;
    }
    Ok(())
}

/// Watchdog pings while the daemon starts; stops when dropped.
struct StartupPings(Option<tokio::task::JoinHandle<()>>);

impl StartupPings {
    fn start() -> StartupPings {
        StartupPings(systemd::watchdog_interval().map(|w| {
            tokio::spawn(async move {
                let mut tick = tokio::time::interval((w / 3).max(Duration::from_millis(100)));
                loop {
                    tick.tick().await;
                    systemd::watchdog_ping();
                }
            })
        }))
    }
}

impl Drop for StartupPings {
    fn drop(&mut self) {
        if let Some(task) = self.0.take() {
            task.abort();
        }
    }
}

/// One line for `systemctl status`.
fn status_line(sources: &Sources) -> String {
    let t = &sources.telemetry;
    let model = sources
        .updater
        .current()
        .map(|m| format!("model {} on {}", m.classifier.stamp().version, m.classifier.stamp().backend))
        .unwrap_or_else(|| "no model".into());
    let broker = if t.broker_connected.load(Ordering::Relaxed) { "broker connected" } else { "broker DOWN, buffering" };
    let (depth, _) = sources.queue();
    format!("ready: {model}; {broker}; {depth} queued")
}

/// Declares readiness once watcher, store, model and broker are up (the broker for at most
/// `telemetry.ready_wait`), then judges the pipeline's progress every few seconds: the
/// systemd watchdog is pinged only while it is healthy, so a wedged pipeline is restarted.
async fn supervise(sources: Arc<Sources>, mut shutdown: watch::Receiver<bool>) {
    let config = &sources.config.telemetry;
    let t = sources.telemetry.clone();
    let watchdog = systemd::watchdog_interval();
    let period = watchdog.map(|w| w / 3).unwrap_or(Duration::from_secs(2)).max(Duration::from_millis(200));
    let ingest_period = sources.config.ingest.settle;
    let started = Instant::now();
    let mut tick = tokio::time::interval(period);
    let mut last_status = String::new();
    loop {
        tokio::select! {
            _ = shutdown.wait_for(|s| *s) => return,
            _ = tick.tick() => {}
        }
        if !t.is_ready() {
            let model = sources.updater.current().is_some();
            let broker = t.broker_connected.load(Ordering::Relaxed);
            let waited_enough = started.elapsed() >= config.ready_wait;
            if model && t.watcher_up() && (broker || waited_enough) {
                t.set_ready();
                let line = status_line(&sources);
                systemd::ready(&line);
                tracing::info!(status = %line, "ready");
                last_status = line;
            } else if !t.watcher_up() {
                systemd::status("starting the folder watcher");
            } else if !broker {
                systemd::status("waiting for the MQTT broker");
            }
        }
        // The store must answer too: a hung disk wedges every stage.
        let store = sources.store.clone();
        let probe = tokio::time::timeout(config.stuck_after, blocking(move || store.probe().map(|_| ()))).await;
        let problem = match probe {
            Err(_) => Some(format!("the store has not answered for {} s", config.stuck_after.as_secs())),
            Ok(Err(e)) => Some(format!("store probe: {e}")),
            Ok(Ok(Err(e))) => Some(format!("store: {e}")),
            Ok(Ok(Ok(()))) => t.problem(config.stuck_after, ingest_period),
        };
        let was = t.current_problem();
        match &problem {
            None => {
                if was.is_some() {
                    tracing::info!("pipeline healthy again");
                }
                if t.is_ready() {
                    let line = status_line(&sources);
                    if line != last_status {
                        systemd::status(&line);
                        last_status = line;
                    }
                }
                if watchdog.is_some() {
                    systemd::watchdog_ping();
                }
            }
            Some(p) => {
                if was.as_deref() != Some(p.as_str()) {
                    tracing::error!(problem = %p, "pipeline unhealthy: watchdog pings stopped");
                }
                let line = format!("UNHEALTHY: {p}");
                systemd::status(&line);
                last_status = line;
            }
        }
        t.set_problem(problem);
    }
}

/// SIGTERM (systemd stop) and SIGINT (Ctrl-C), registered at once.
struct Signals {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
}

impl Signals {
    fn install() -> std::io::Result<Signals> {
        use tokio::signal::unix::{signal, SignalKind};
        Ok(Signals { term: signal(SignalKind::terminate())?, int: signal(SignalKind::interrupt())? })
    }

    async fn wait(mut self) {
        tokio::select! {
            _ = self.term.recv() => {}
            _ = self.int.recv() => {}
        }
    }
}

async fn prune_loop(ctx: Arc<Context>, mut shutdown: watch::Receiver<bool>) {
    let mut tick = tokio::time::interval(ctx.config.store.prune_interval);
    loop {
        tokio::select! {
            _ = shutdown.changed() => return,
            _ = tick.tick() => {}
        }
        let now = now_ms();
        let cutoff = now.saturating_sub(ctx.config.store.retention.as_millis() as u64);
        let linkage_cutoff = now.saturating_sub(ctx.config.deid.linkage_retention.as_millis() as u64);
        let c = ctx.clone();
        match blocking(move || c.store.prune(cutoff, linkage_cutoff)).await {
            Ok(Ok(artefacts)) => {
                for name in &artefacts {
                    let _ = std::fs::remove_file(ctx.dirs.deid.join(name));
                }
                if !artefacts.is_empty() {
                    tracing::info!(count = artefacts.len(), "pruned published scans past retention");
                }
            }
            Ok(Err(e)) => tracing::error!(error = %e, "pruning failed"),
            Err(e) => tracing::error!(error = %e, "pruning task failed"),
        }
    }
}

/// Drive one scan from whatever state it is in to classified (or quarantined).
async fn process(ctx: &Arc<Context>, job: Job) -> Result<(), DaemonError> {
    let queue_ms = job.queued_at.elapsed().as_millis() as u64;
    let c = ctx.clone();
    let id = job.scan_id;
    let Some(mut record) = blocking(move || c.store.get(id)).await?? else {
        return Err(DaemonError::Store(StoreError::UnknownScan(id)));
    };
    if record.state == ScanState::Received {
        let c = ctx.clone();
        let r = record.clone();
        match blocking(move || deidentify_step(&c, r)).await?? {
            Some(next) => record = next,
            None => return Ok(()), // quarantined
        }
    }
    if record.state == ScanState::Deidentified {
        let c = ctx.clone();
        blocking(move || classify_step(&c, record, queue_ms)).await??;
        ctx.wake.notify_one();
    }
    Ok(())
}

/// Returns the de-identified record, or None when the scan went to quarantine.
fn deidentify_step(ctx: &Context, mut record: ScanRecord) -> Result<Option<ScanRecord>, DaemonError> {
    let id = record.scan_id;
    let spooled = ctx.dirs.spool.join(id.to_string());
    if !spooled.exists() {
        // Either a quarantine a crash interrupted, or a file that vanished before its claim.
        let reason_path = ctx.dirs.quarantine.join(format!("{id}.reason.json"));
        let reason = std::fs::read(&reason_path).ok().and_then(|b| serde_json::from_slice::<QuarantineReason>(&b).ok());
        match reason {
            Some(r) => quarantine(ctx, record, r.kind, &r.code, &r.detail)?,
            None => quarantine(
                ctx,
                record,
                EventKind::Rejected,
                "source_missing",
                "the claimed file disappeared before it could be read",
            )?,
        }
        return Ok(None);
    }
    let started = Instant::now();
    let mut attempt = 0;
    let outcome = loop {
        match ctx.deid.deidentify(&spooled, &ctx.dirs.deid, id) {
            Err(DeidError::Io(e)) if attempt < 3 => {
                attempt += 1;
                tracing::warn!(scan_id = %id, error = %e.kind(), attempt, "i/o error while de-identifying; retrying");
                std::thread::sleep(Duration::from_secs(1 << attempt));
            }
            other => break other,
        }
    };
    match outcome {
        Ok(out) => {
            if !out.identifiers.is_empty() {
                ctx.store.extend_linkage(id, out.identifiers)?;
            }
            record.state = ScanState::Deidentified;
            record.kind = Some(out.kind);
            record.frames = Some(out.frames);
            record.artifact = out.artifact.file_name().map(|n| n.to_string_lossy().into_owned());
            record.study_uid = out.study_uid;
            record.laterality = out.laterality;
            record.deid_ms = Some(started.elapsed().as_millis() as u64);
            ctx.store.transition(&record, None)?;
            // The de-identified artefact is committed; the identified original may go. Its
            // identity stays in the sealed linkage.
            let _ = std::fs::remove_file(&spooled);
            let _ = crate::fsutil::sync_dir(&ctx.dirs.spool);
            tracing::info!(scan_id = %id, frames = out.frames, "de-identified");
            Ok(Some(record))
        }
        Err(e) => {
            quarantine(ctx, record, e.event_kind(), e.code(), &e.to_string())?;
            Ok(None)
        }
    }
}

fn classify_step(ctx: &Context, mut record: ScanRecord, queue_ms: u64) -> Result<(), DaemonError> {
    let id = record.scan_id;
    let artifact = ctx.dirs.deid.join(record.artifact.clone().unwrap_or_default());
    let started = Instant::now();
    let mut retried = false;
    let (classification, model) = loop {
        // The scan keeps this model until its result is written, whatever is swapped in meanwhile.
        let model = ctx.updater.current().ok_or_else(|| DaemonError::Runtime("no model is loaded".into()))?;
        match model.classifier.classify_artifact(&artifact) {
            Ok(c) => break (c, model),
            Err(e @ InferError::Input(_)) => {
                tracing::error!(scan_id = %id, error = %e, "classification failed");
                return quarantine(ctx, record, EventKind::Rejected, "undecodable", &e.to_string());
            }
            Err(e) => {
                // A new model failing is the model's fault: roll it back and classify again.
                if !retried && ctx.updater.model_failed(&model, &e.to_string()) {
                    retried = true;
                    continue;
                }
                tracing::error!(scan_id = %id, error = %e, "classification failed");
                return quarantine(ctx, record, EventKind::Rejected, "inference_failed", &e.to_string());
            }
        }
    };
    let infer_ms = started.elapsed().as_millis() as u64;
    let now = now_ms();
    let kind = record.kind.ok_or_else(|| DaemonError::Runtime("de-identified scan without input kind".into()))?;
    let message = ResultMessage {
        schema: RESULT_SCHEMA.into(),
        scan_id: id,
        site: ctx.config.device.site.clone(),
        device: ctx.config.device.id.clone(),
        received_at: rfc3339_ms(record.received_at_ms),
        classified_at: rfc3339_ms(now),
        input_kind: kind,
        study_uid: record.study_uid.clone(),
        laterality: record.laterality.clone(),
        classification: classification.clone(),
        model: model.classifier.stamp().clone(),
        timings_ms: StageTimings {
            queue_ms,
            deid_ms: record.deid_ms.unwrap_or(0),
            infer_ms,
            total_ms: now.saturating_sub(record.received_at_ms),
        },
    };
    let outbox = OutboxMessage {
        topic: ctx.topics.result(id),
        payload: serde_json::to_string(&message).map_err(|e| DaemonError::Runtime(e.to_string()))?,
        retain: false,
        completes_scan: Some(id),
    };
    ctx.telemetry.scan_classified(&message.timings_ms);
    record.state = ScanState::Classified;
    record.label = Some(classification.label.clone());
    record.priority = Some(classification.priority);
    ctx.store.transition(&record, Some(&outbox))?;
    ctx.updater.scan_succeeded(&model);
    tracing::info!(scan_id = %id, model = %model.classifier.stamp().version, label = %classification.label, confidence = classification.confidence,
        needs_review = classification.needs_review, infer_ms, "classified");
    Ok(())
}

/// Move the input aside with a reason file, record it, and announce it — in that order, so
/// a crash in between is finished by the next start (see `deidentify_step`).
fn quarantine(
    ctx: &Context,
    mut record: ScanRecord,
    kind: EventKind,
    code: &str,
    detail: &str,
) -> Result<(), DaemonError> {
    let id = record.scan_id;
    let spooled = ctx.dirs.spool.join(id.to_string());
    let target = ctx.dirs.quarantine.join(id.to_string());
    if spooled.exists() {
        crate::fsutil::move_file(&spooled, &target)
            .map_err(|e| DaemonError::Runtime(format!("quarantine move: {e}")))?;
    }
    if let Some(artifact) = &record.artifact {
        let _ = std::fs::remove_file(ctx.dirs.deid.join(artifact));
    }
    let reason =
        QuarantineReason { scan_id: id, code: code.into(), detail: detail.into(), kind, at: rfc3339_ms(now_ms()) };
    let reason_json = serde_json::to_vec_pretty(&reason).map_err(|e| DaemonError::Runtime(e.to_string()))?;
    crate::fsutil::write_atomic(&ctx.dirs.quarantine.join(format!("{id}.reason.json")), &reason_json)
        .map_err(|e| DaemonError::Runtime(format!("quarantine reason: {e}")))?;
    record.state = ScanState::Quarantined;
    record.reason = Some(format!("{code}: {detail}"));
    let event = event_message(&ctx.config, &ctx.topics, kind, Some(id), code, detail);
    ctx.store.transition(&record, Some(&event))?;
    ctx.wake.notify_one();
    let outcome = serde_json::to_value(kind).ok().and_then(|v| v.as_str().map(str::to_owned));
    ctx.telemetry.scan_quarantined(outcome.as_deref().unwrap_or("quarantined"));
    tracing::warn!(scan_id = %id, code, "quarantined");
    Ok(())
}
