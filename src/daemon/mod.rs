//! `octd run`: wires the stages together and keeps them going.
//!
//! ingest --Job--> pipeline workers (deid in the decoder worker -> infer -> store result +
//! outbox) --wake--> publisher; the updater and the telemetry endpoint beside them.
//!
//! Every long-lived task runs under [`tasks::supervised`]: one that returns or panics before
//! shutdown is logged with its error and restarted with backoff; one that keeps failing
//! turns the health verdict unhealthy, so systemd's watchdog restarts the daemon.

mod tasks;

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, watch, Mutex, Notify};

use self::tasks::{supervised, TaskHealth};
use crate::config::Config;
use crate::deid::InputLimits;
use crate::feedback::Feedback;
use crate::ingest::{Ingest, Job};
use crate::isolation::{Decoder, WorkerSettings};
use crate::pipeline::disk::Disk;
use crate::pipeline::quarantine::{codes, Quarantine};
use crate::pipeline::{recovery, retention, retry_delay, Dirs, Pipeline, PipelineError};
use crate::publish::{self, Publisher};
use crate::secret::DeviceSecret;
use crate::store::{Store, StoreError, STORE_FILE};
use crate::telemetry::{self, systemd, Sources, Telemetry};
use crate::update::{ModelSlot, UpdateError, Updater};

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DaemonError {
    /// Settings or files an operator must fix; a restart will not help (exit 78).
    #[error("{0}")]
    Config(String),
    /// Everything else: systemd restarts the daemon (exit 1).
    #[error("store: {0}")]
    Store(#[from] StoreError),
    #[error("{0}")]
    Runtime(String),
    #[error("{0}")]
    Model(#[from] UpdateError),
}

impl From<PipelineError> for DaemonError {
    fn from(e: PipelineError) -> Self {
        DaemonError::Runtime(e.to_string())
    }
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

/// How long an exit for want of a model waits for its alarms to reach the broker.
const ALARM_FLUSH: Duration = Duration::from_secs(10);

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
    // Up to one worker per core classifies at once (ONNX Runtime then keeps a session for
    // each, with its share of the cores; tract's one thread pool is shared by all). Workers
    // beyond the cores de-identify, commit and publish while others compute, and wait for a
    // free session rather than add one: a session costs memory, and more inference threads
    // than cores cost more in switching than they give.
    config.model.concurrency = config.pipeline.workers.clamp(1, crate::infer::cores());
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
    let topics = config.topics();
    let telemetry = Arc::new(Telemetry::new(config.pipeline.workers));
    let health = Arc::new(TaskHealth::default());
    // systemd's watchdog runs from the moment the process starts; until the supervisor judges
    // the pipeline, a live runtime is the evidence (start-up is bounded by TimeoutStartSec,
    // and a first model install or TensorRT engine build may outlast WatchdogSec).
    let startup_pings = StartupPings::start();

    // The publisher starts before the model, so that whatever the model's start-up has to
    // say (a refusal, a rollback, an alarm) reaches the clinic even if it ends in an exit.
    let embedded_broker = match config.mqtt.url.is_empty() {
        true => {
            let broker = publish::EmbeddedBroker {
                program: std::env::current_exe().map_err(|e| {
                    DaemonError::Config(format!("cannot find octd's own executable for its broker: {e}"))
                })?,
                listen: config.mqtt.embedded_listen,
                login: config.mqtt.username.clone().zip(config.mqtt.password.clone()),
                memory_bytes: config.mqtt.embedded_memory_bytes,
            };
            broker.check_listen().map_err(|e| DaemonError::Config(e.to_string()))?;
            Some(supervised("embedded broker", health.clone(), shutdown_rx.clone(), move |shutdown| {
                broker.clone().run(shutdown)
            }))
        }
        false => None,
    };
    let slot = Arc::new(ModelSlot::default());
    let (notices_tx, notices_rx) = mpsc::channel(1);
    let (verdicts_tx, verdicts_rx) = mpsc::channel(crate::feedback::QUEUE);
    let load_refusals = Arc::new(crate::feedback::LoadRefusals::default());
    let verdicts_tx = config.feedback.mqtt_labels.then_some((verdicts_tx, load_refusals.clone()));
    systemd::status("connecting to the MQTT broker");
    let publisher = {
        let (store, config, wake, slot, flag) =
            (store.clone(), config.clone(), wake.clone(), slot.clone(), telemetry.broker_connected.clone());
        supervised("publisher", health.clone(), shutdown_rx.clone(), move |shutdown| {
            let stamps: publish::ModelStampSource = {
                let slot = slot.clone();
                Arc::new(move || slot.stamp())
            };
            let publisher = Publisher::new(store.clone(), config.clone(), wake.clone(), stamps, notices_tx.clone())
                .with_connection_flag(flag.clone());
            match &verdicts_tx {
                Some((verdicts, refused)) => publisher.with_verdicts(verdicts.clone(), refused.clone()).run(shutdown),
                None => publisher.run(shutdown),
            }
        })
    };

    systemd::status("loading the model");
    let updater = match Updater::start(&config, &dirs.state, store.clone(), topics.clone(), wake.clone(), slot).await {
        Ok(u) => u,
        Err(e) => {
            tracing::error!(error = %e, "no model: publishing what start-up recorded, then exiting");
            drain_outbox(&store, ALARM_FLUSH).await;
            let _ = shutdown_tx.send(true);
            let _ = publisher.await;
            return Err(e.into());
        }
    };
    // The publisher said "online" before a model was loaded; now name it.
    store.enqueue(&crate::mqtt::status_message(&topics, updater.slot().stamp().as_ref()))?;
    wake.notify_one();
    let update_loop = {
        let updater = updater.clone();
        let notices_rx = Arc::new(Mutex::new(notices_rx));
        supervised("updater", health.clone(), shutdown_rx.clone(), move |shutdown| {
            let (updater, notices_rx) = (updater.clone(), notices_rx.clone());
            async move {
                updater.run(notices_rx, shutdown).await;
                Ok::<(), String>(())
            }
        })
    };

    // Verdicts to the trainer. A device whose uplink cannot start (identity key, CA, site key)
    // keeps classifying and queueing verdicts, with an alarm: triage must not stop for it.
    let uplink_pending = Arc::new(tokio::sync::Notify::new());
    let uplink = match config.uplink.active() {
        true => match crate::uplink::Uplink::new(&config, store.clone(), wake.clone(), secret.clone()) {
            Ok(uplink) => Some(Arc::new(uplink)),
            Err(e) => {
                tracing::error!(error = %e, "the uplink cannot start; verdicts are kept and queued until it can");
                raise_alarm(&store, &topics, &wake, "uplink_misconfigured", &e.to_string())?;
                None
            }
        },
        false => None,
    };
    let uplink_loop = uplink.map(|uplink| {
        let pending = uplink_pending.clone();
        supervised("uplink", health.clone(), shutdown_rx.clone(), move |shutdown| {
            let (uplink, pending) = (uplink.clone(), pending.clone());
            async move {
                uplink.run(shutdown, pending).await;
                Ok::<(), String>(())
            }
        })
    });
    let feedback = Arc::new(Feedback::new(
        config.clone(),
        store.clone(),
        updater.clone(),
        telemetry.clone(),
        wake.clone(),
        load_refusals,
        uplink_pending.clone(),
    ));
    let feedback_loop = {
        let feedback = feedback.clone();
        let verdicts_rx = Arc::new(Mutex::new(verdicts_rx));
        supervised("feedback", health.clone(), shutdown_rx.clone(), move |shutdown| {
            let (feedback, verdicts_rx) = (feedback.clone(), verdicts_rx.clone());
            async move {
                feedback.run(verdicts_rx, shutdown).await;
                Ok::<(), String>(())
            }
        })
    };

    let pipeline = Arc::new(Pipeline {
        config: config.clone(),
        dirs: dirs.clone(),
        store: store.clone(),
        updater: updater.clone(),
        topics: topics.clone(),
        wake: wake.clone(),
        telemetry: telemetry.clone(),
        quarantine: Quarantine::new(&dirs.quarantine, &secret),
        in_process: Default::default(),
    });
    let decoders = Arc::new(WorkerSettings {
        program: std::env::current_exe().map_err(|e| {
            DaemonError::Config(format!("cannot find octd's own executable for its decoder worker: {e}"))
        })?,
        memory_bytes: config.pipeline.decoder_memory_bytes,
        cpu_seconds: config.pipeline.decoder_cpu_time.as_secs().max(1),
        timeout: config.pipeline.decoder_timeout,
        secret: secret.clone(),
        masks: config.deid.burned_in_masks.clone(),
        limits: InputLimits::from(&config.ingest),
    });

    let (jobs_tx, jobs_rx) = mpsc::channel::<Job>(config.pipeline.queue_capacity);
    let sources = Arc::new(Sources {
        telemetry: telemetry.clone(),
        store: store.clone(),
        updater: updater.clone(),
        jobs: jobs_tx.downgrade(),
        config: config.clone(),
    });
    // The reading room's API: a taken port or an unreadable certificate is a start-up error.
    let display = match config.display.address().map_err(DaemonError::Config)? {
        Some(addr) => match crate::display::bind(&config, addr).await {
            Err(e @ crate::display::DisplayError::Tls(_)) => return Err(DaemonError::Config(e.to_string())),
            Err(e) => {
                // A taken port must not stop triage: the API waits for the next start, with an alarm.
                tracing::error!(error = %e, "the display API cannot listen; scans are classified without it");
                raise_alarm(&store, &topics, &wake, "display_unavailable", &e.to_string())?;
                None
            }
            Ok((listener, tls)) => {
                tracing::info!(address = %addr, tls = tls.is_some(), "display API listening");
                let listener = Arc::new(std::sync::Mutex::new(Some((listener, tls))));
                let (config, store, feedback) = (config.clone(), store.clone(), feedback.clone());
                Some(supervised("display API", health.clone(), shutdown_rx.clone(), move |shutdown| {
                    let (config, store, feedback, listener) =
                        (config.clone(), store.clone(), feedback.clone(), listener.clone());
                    async move {
                        let taken = listener.lock().unwrap_or_else(|p| p.into_inner()).take();
                        let Some((listener, tls)) = taken else {
                            return Err("the display API's listener was lost with its task".to_string());
                        };
                        crate::display::serve(config, store, feedback, listener, tls, shutdown).await;
                        Ok::<(), String>(())
                    }
                }))
            }
        },
        None => None,
    };
    let endpoint = match config.telemetry_address() {
        Some(addr) => {
            let listener = telemetry::server::bind(addr).await.map_err(|e| DaemonError::Runtime(e.to_string()))?;
            tracing::info!(address = %addr, "metrics and health endpoint listening");
            let listener = Arc::new(std::sync::Mutex::new(Some(listener)));
            let sources = sources.clone();
            Some(supervised("telemetry", health.clone(), shutdown_rx.clone(), move |shutdown| {
                let (sources, listener) = (sources.clone(), listener.clone());
                async move {
                    let taken = listener.lock().unwrap_or_else(|p| p.into_inner()).take();
                    let listener = match taken {
                        Some(l) => l,
                        None => telemetry::server::bind(addr).await.map_err(|e| e.to_string())?,
                    };
                    telemetry::server::serve(listener, sources, shutdown).await.map_err(|e| e.to_string())
                }
            }))
        }
        None => None,
    };
    let jobs_rx = Arc::new(Mutex::new(jobs_rx));
    let mut workers = Vec::new();
    for worker in 0..config.pipeline.workers {
        let (pipeline, rx, decoders) = (pipeline.clone(), jobs_rx.clone(), decoders.clone());
        let name = format!("pipeline worker {worker}");
        workers.push(supervised(&name, health.clone(), shutdown_rx.clone(), move |shutdown| {
            let (pipeline, rx, decoders) = (pipeline.clone(), rx.clone(), decoders.clone());
            work(pipeline, worker, rx, Decoder::new(decoders), shutdown)
        }));
    }

    // Resume what a crash interrupted, before new files are looked at.
    let resumable = {
        let pipeline = pipeline.clone();
        blocking(move || recovery::resumable(&pipeline)).await??
    };
    if !resumable.in_hand.is_empty() || !resumable.queued.is_empty() {
        tracing::info!(
            in_hand = resumable.in_hand.len(),
            queued = resumable.queued.len(),
            "resuming interrupted scans"
        );
    }
    // The scans that were in hand when the daemon died go first and one at a time, so that
    // a death now counts against the scan that caused it and no other.
    if !resumable.in_hand.is_empty() {
        let mut decoder = Decoder::new(decoders.clone());
        let mut stop = shutdown_rx.clone();
        for scan_id in resumable.in_hand {
            run_job(&pipeline, &mut decoder, Job { scan_id, queued_at: Instant::now() }, &mut stop).await;
        }
    }
    for scan_id in resumable.queued {
        if jobs_tx.send(Job { scan_id, queued_at: Instant::now() }).await.is_err() {
            break;
        }
    }
    wake.notify_one();

    let disk = Arc::new(Disk {
        dir: dirs.state.clone(),
        min_free: config.ingest.min_free_bytes,
        low: Default::default(),
        store: store.clone(),
        topics: topics.clone(),
        wake: wake.clone(),
    });
    let upkeep_jobs = jobs_tx.clone();
    let ingest = {
        let (config, store, spool, beat) =
            (config.ingest.clone(), store.clone(), dirs.spool.clone(), telemetry.ingest_heartbeat.clone());
        supervised("ingest", health.clone(), shutdown_rx.clone(), move |shutdown| {
            Ingest::new(config.clone(), store.clone(), spool.clone(), jobs_tx.clone(), disk.clone())
                .with_heartbeat(beat.clone())
                .run(shutdown)
        })
    };
    let pruner = {
        let pipeline = pipeline.clone();
        supervised("upkeep", health.clone(), shutdown_rx.clone(), move |shutdown| {
            let (pipeline, jobs) = (pipeline.clone(), upkeep_jobs.clone());
            async move {
                retention::upkeep_loop(pipeline, jobs, shutdown).await;
                Ok::<(), String>(())
            }
        })
    };
    drop(startup_pings);
    let supervisor = tokio::spawn(supervise(sources, health.clone(), shutdown_rx.clone()));
    tracing::info!(folders = config.ingest.watch.len(), "watching");

    let mut stopped = shutdown_rx.clone();
    let _ = stopped.wait_for(|s| *s).await;
    systemd::stopping();
    let _ = supervisor.await;
    let _ = ingest.await;
    // Workers finish the scan in hand, then stop.
    for w in workers {
        let _ = w.await;
    }
    let _ = pruner.await;
    let _ = update_loop.await;
    let _ = feedback_loop.await;
    if let Some(display) = display {
        let _ = display.await;
    }
    if let Some(uplink) = uplink_loop {
        let _ = uplink.await;
    }
    let _ = publisher.await;
    if let Some(broker) = embedded_broker {
        let _ = broker.await;
    }
    if let Some(endpoint) = endpoint {
        let _ = endpoint.await;
    }
    Ok(())
}

/// One pipeline worker: takes jobs until shutdown. A scan whose step fails through no fault
/// of its own (disk, store, decoder worker) is tried again with backoff; the watchdog sees a
/// worker stuck on one scan for too long.
async fn work(
    pipeline: Arc<Pipeline>,
    worker: usize,
    rx: Arc<Mutex<mpsc::Receiver<Job>>>,
    mut decoder: Decoder,
    mut shutdown: watch::Receiver<bool>,
) -> Result<(), String> {
    // A worker that cannot start now is tried again, and reported, by the first scan.
    tokio::select! {
        biased;
        _ = crate::shutdown::requested(&mut shutdown) => return Ok(()),
        started = decoder.warm_up() => {
            if let Err(e) = started {
                tracing::warn!(worker, error = %e, "the decoder worker did not start ahead of the first scan");
            }
        }
    }
    loop {
        // Queued scans are already durable (state received); on shutdown they wait for the
        // next start rather than delaying this one.
        let job = tokio::select! {
            biased;
            _ = crate::shutdown::requested(&mut shutdown) => None,
            job = async { rx.lock().await.recv().await } => job,
        };
        let Some(job) = job else { return Ok(()) };
        pipeline.telemetry.worker_busy(worker, true);
        run_job(&pipeline, &mut decoder, job, &mut shutdown).await;
        pipeline.telemetry.worker_busy(worker, false);
    }
}

/// One scan to its end: classified, quarantined, or (on shutdown) left for the next start.
/// A step that fails through no fault of the scan is tried again with backoff; one that
/// panics sets the scan aside.
async fn run_job(pipeline: &Arc<Pipeline>, decoder: &mut Decoder, job: Job, shutdown: &mut watch::Receiver<bool>) {
    let mut attempt = 0;
    let mut counted = false;
    loop {
        match pipeline.process(decoder, job, &mut counted).await {
            Ok(()) | Err(PipelineError::Store(StoreError::UnknownScan(_))) => return,
            Err(PipelineError::Panicked) => {
                tracing::error!(scan_id = %job.scan_id, "a processing step panicked on this scan; setting it aside");
                let detail = "a processing step panicked on this scan";
                if let Err(e) = pipeline.set_aside(job.scan_id, codes::PROCESSOR_CRASHED, detail).await {
                    tracing::error!(scan_id = %job.scan_id, error = %e, "cannot quarantine the scan; it is retried at the next start");
                }
                return;
            }
            Err(e) => {
                // A failure that keeps coming back on one scan (an unreadable spooled file)
                // must not hold a worker until the watchdog restarts the daemon forever
                // uncounted: it is an attempt for the poison-scan rule too.
                if !counted {
                    match pipeline.count_attempt(job.scan_id).await {
                        Ok(_) => counted = true,
                        Err(count_error) => {
                            tracing::error!(scan_id = %job.scan_id, error = %count_error, "cannot count the attempt")
                        }
                    }
                }
                let delay = retry_delay(attempt);
                attempt += 1;
                tracing::error!(scan_id = %job.scan_id, error = %e, retry_in_s = delay.as_secs(), "scan step failed; retrying");
                tokio::select! {
                    _ = tokio::time::sleep(delay) => {}
                    _ = crate::shutdown::requested(shutdown) => return,
                }
            }
        }
    }
}

/// An alarm about the device itself (no scan), queued for the publisher.
fn raise_alarm(
    store: &Store,
    topics: &crate::mqtt::Topics,
    wake: &tokio::sync::Notify,
    code: &str,
    detail: &str,
) -> Result<(), StoreError> {
    let event = topics.event(crate::scan::EventKind::Alarm, code, detail);
    store.enqueue(&crate::mqtt::event_outbox(topics, &event))?;
    wake.notify_one();
    Ok(())
}

/// Wait until the outbox is empty (the publisher delivered it) or `limit` has passed.
async fn drain_outbox(store: &Arc<Store>, limit: Duration) {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        let s = store.clone();
        match tokio::task::spawn_blocking(move || s.probe()).await {
            Ok(Ok(0)) => return,
            Ok(Ok(_)) => {}
            _ => return,
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
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
async fn supervise(sources: Arc<Sources>, tasks: Arc<TaskHealth>, mut shutdown: watch::Receiver<bool>) {
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
            _ = crate::shutdown::requested(&mut shutdown) => return,
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
        // The store must answer, and still commit: a hung or full disk wedges every stage.
        let store = sources.store.clone();
        let probe = tokio::time::timeout(config.stuck_after, blocking(move || store.probe_write().map(|_| ()))).await;
        let problem = match probe {
            Err(_) => Some(format!("the store has not answered for {} s", config.stuck_after.as_secs())),
            Ok(Err(e)) => Some(format!("store probe: {e}")),
            Ok(Ok(Err(e))) => Some(format!("store: {e}")),
            Ok(Ok(Ok(()))) => t.problem(config.stuck_after, ingest_period).or_else(|| tasks.problem()),
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
