//! Beside the pipeline: reviewers' verdicts on results. A verdict (`octd.label/1`) arrives on
//! MQTT (`{base}/labels/{scan_id}`, forwarded by the publisher) or from `octd label` (a
//! request file the daemon answers); it is checked (the scan has a result, the class is the
//! model's, the reviewer is known, the payload is sane and within the rate), stored as the
//! scan's next revision in one transaction with its `label_accepted` event, and the live
//! accuracy (`octd.quality/1`, retained) and its alarm follow. A refused verdict stores
//! nothing and is answered with `label_rejected` and the reason.

pub mod accuracy;
pub mod reviewers;

use std::num::NonZeroU32;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, watch};

use crate::config::Config;
use crate::mqtt::{self, Topics};
use crate::scan::{now_ms, EventKind, EventMessage, LabelRecord, ScanId, ScanState, LABEL_SCHEMA};
use crate::store::{Store, StoreError, Stored};
use crate::telemetry::Telemetry;
use crate::update::Updater;
use accuracy::{AlarmChange, LiveAccuracy};
use reviewers::Reviewers;

/// Verdicts waiting for the feedback task; a full queue refuses more (`busy`).
pub const QUEUE: usize = 64;
/// Where `octd label` leaves requests for the running daemon, and finds its answers.
pub const REQUESTS_DIR: &str = "requests/labels";
const REQUESTS_PER_TURN: usize = 32;
const REQUEST_POLL: Duration = Duration::from_millis(200);
/// Clocks differ a little: a reviewed_at this far in the future, or before the scan arrived,
/// is still accepted.
const SKEW_MS: i64 = 5 * 60 * 1000;
/// Largest `octd label` request file read.
const MAX_REQUEST_BYTES: u64 = 64 << 10;
/// Answers `octd label` never collected (it gave up waiting) are removed after this.
const ANSWER_TTL: Duration = Duration::from_secs(600);

/// Why a verdict was refused: the `code` of its `label_rejected` event.
pub mod codes {
    pub const MALFORMED: &str = "malformed";
    pub const TOO_LARGE: &str = "too_large";
    pub const UNKNOWN_SCAN: &str = "unknown_scan";
    pub const NO_RESULT: &str = "no_result";
    pub const UNKNOWN_CLASS: &str = "unknown_class";
    pub const REVIEWER_MISSING: &str = "reviewer_missing";
    pub const UNKNOWN_REVIEWER: &str = "unknown_reviewer";
    pub const RATE_LIMITED: &str = "rate_limited";
    pub const BUSY: &str = "busy";
    pub const NO_MODEL: &str = "no_model";
    pub const STORE: &str = "store_error";
    pub const UPLINK_FULL: &str = "uplink_full";
    /// An undo with nothing of the reviewer's to undo.
    pub const NO_VERDICT: &str = "no_verdict";
    pub const NOT_YOURS: &str = "not_yours";
}

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum FeedbackError {
    #[error("{detail}")]
    Refused { code: &'static str, detail: String },
    #[error("{0}")]
    Store(#[from] StoreError),
}

impl FeedbackError {
    fn refused(code: &'static str, detail: impl Into<String>) -> Self {
        FeedbackError::Refused { code, detail: detail.into() }
    }

    pub fn code(&self) -> &'static str {
        match self {
            FeedbackError::Refused { code, .. } => code,
            FeedbackError::Store(_) => codes::STORE,
        }
    }
}

/// What a stored revision did: `confirmed` / `corrected` the model, or `withdrawn` (an undone
/// first verdict).
fn outcome(r: &LabelRecord) -> &'static str {
    match (r.withdrawn, r.label == r.predicted) {
        (true, _) => "withdrawn",
        (false, true) => "confirmed",
        (false, false) => "corrected",
    }
}

/// The `octd.label/1` payload.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct VerdictMessage {
    pub schema: String,
    /// One of the model's classes; unused (may be left out) in an undo.
    #[serde(default)]
    pub label: String,
    /// Take back this reviewer's latest verdict on the scan: a new revision restores the
    /// label in force before it, or none.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub undo: bool,
    pub reviewer: String,
    /// RFC 3339.
    pub reviewed_at: String,
    /// Free text for the clinic's own use: kept on the device, sealed; never published or
    /// uploaded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub comment: Option<String>,
    /// The sender's id for this verdict: sent again (no answer came), it is answered with
    /// the revision already stored instead of becoming a new one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub verdict_id: Option<String>,
}

/// Where a verdict came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Source {
    Mqtt,
    Cli,
    Http,
}

impl Source {
    fn as_str(self) -> &'static str {
        match self {
            Source::Mqtt => "mqtt",
            Source::Cli => "cli",
            Source::Http => "http",
        }
    }
}

/// One verdict as received: the scan id from its topic or request, the raw payload.
#[derive(Debug, Clone)]
pub struct Incoming {
    pub scan_id: String,
    pub payload: Vec<u8>,
    pub source: Source,
}

/// The answer to one verdict, as `octd label` prints it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Answer {
    pub accepted: bool,
    pub code: String,
    pub detail: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scan_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revision: Option<u32>,
}

pub struct Feedback {
    config: Config,
    state: PathBuf,
    store: Arc<Store>,
    updater: Arc<Updater>,
    topics: Topics,
    telemetry: Arc<Telemetry>,
    limiter: DefaultDirectRateLimiter,
    wake: Arc<tokio::sync::Notify>,
    /// Verdicts refused for load (rate, full queue) since the last summary: a flood is
    /// answered with one event a second, not one durable message per verdict.
    refused_for_load: Arc<LoadRefusals>,
    /// Told when a verdict waits for delivery to the trainer.
    uplink: Arc<tokio::sync::Notify>,
}

/// Counts of verdicts refused for load, shared with the publisher (full queue).
#[derive(Debug, Default)]
pub struct LoadRefusals {
    pub rate_limited: std::sync::atomic::AtomicU64,
    pub busy: std::sync::atomic::AtomicU64,
}

impl Feedback {
    pub fn new(
        config: Config,
        store: Arc<Store>,
        updater: Arc<Updater>,
        telemetry: Arc<Telemetry>,
        wake: Arc<tokio::sync::Notify>,
        refused_for_load: Arc<LoadRefusals>,
        uplink: Arc<tokio::sync::Notify>,
    ) -> Feedback {
        let rate = NonZeroU32::new(config.feedback.labels_per_second).unwrap_or(NonZeroU32::MIN);
        let burst = NonZeroU32::new(config.feedback.burst).unwrap_or(NonZeroU32::MIN);
        let topics = config.topics();
        let state = config.device.state_dir.clone();
        Feedback {
            config,
            state,
            store,
            updater,
            topics,
            telemetry,
            limiter: RateLimiter::direct(Quota::per_second(rate).allow_burst(burst)),
            wake,
            refused_for_load,
            uplink,
        }
    }

    /// One `label_rejected` event per load reason with the count since the last one.
    fn summarise_load_refusals(&self) {
        use std::sync::atomic::Ordering;
        let counts = [
            (codes::RATE_LIMITED, self.refused_for_load.rate_limited.swap(0, Ordering::Relaxed)),
            (codes::BUSY, self.refused_for_load.busy.swap(0, Ordering::Relaxed)),
        ];
        for (code, n) in counts {
            if n == 0 {
                continue;
            }
            tracing::warn!(code, count = n, "verdicts refused for load");
            let detail = format!(
                "{n} verdicts refused: more than feedback.labels_per_second ({}) arrived, or too many were waiting; send them again",
                self.config.feedback.labels_per_second
            );
            let event = self.topics.event(EventKind::LabelRejected, code, &detail);
            if let Err(e) = self.store.enqueue(&mqtt::event_outbox(&self.topics, &event)) {
                tracing::error!(error = %e, "cannot queue the label_rejected summary");
            }
            self.wake.notify_one();
        }
    }

    /// Check and store one verdict; answer it on the events topic either way.
    /// The classes a verdict may name now (the loaded model's), in its order; None without one.
    pub fn classes(&self) -> Option<Vec<String>> {
        self.updater.current().map(|m| m.classifier.classes().to_vec())
    }

    /// The loaded model draws where it looked (activation maps).
    pub fn heatmap(&self) -> bool {
        self.updater.current().is_some_and(|m| m.classifier.has_heatmap())
    }

    pub fn handle(&self, incoming: Incoming) -> Answer {
        let source = incoming.source;
        let claimed = incoming.scan_id.clone();
        let answer = match self.accept(incoming) {
            Ok(stored) => {
                let (record, detail) = match stored {
                    (r, true) => {
                        self.uplink.notify_one();
                        let detail = format!("revision {} stored", r.revision);
                        tracing::info!(scan_id = %r.scan_id, revision = r.revision, source = source.as_str(),
                            reviewer = %r.reviewer, "verdict stored");
                        self.follow_accuracy();
                        (r, detail)
                    }
                    (r, false) => {
                        let detail = format!("this verdict was stored before, as revision {}", r.revision);
                        tracing::info!(scan_id = %r.scan_id, revision = r.revision, source = source.as_str(),
                            "verdict sent again: answered with the stored revision");
                        (r, detail)
                    }
                };
                let code = outcome(&record);
                Answer {
                    accepted: true,
                    code: code.into(),
                    detail,
                    scan_id: Some(record.scan_id.to_string()),
                    revision: Some(record.revision),
                }
            }
            Err(e) if e.code() == codes::RATE_LIMITED => {
                self.refused_for_load.rate_limited.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                Answer { accepted: false, code: e.code().into(), detail: e.to_string(), scan_id: None, revision: None }
            }
            Err(e) => {
                let scan_id = ScanId::parse(&claimed);
                tracing::warn!(scan_id = ?scan_id, code = e.code(), reason = %e, source = source.as_str(), "verdict refused");
                let event =
                    EventMessage { scan_id, ..self.topics.event(EventKind::LabelRejected, e.code(), &e.to_string()) };
                if let Err(store_error) = self.store.enqueue(&mqtt::event_outbox(&self.topics, &event)) {
                    tracing::error!(error = %store_error, "cannot queue the label_rejected event");
                }
                self.wake.notify_one();
                Answer {
                    accepted: false,
                    code: e.code().into(),
                    detail: e.to_string(),
                    scan_id: scan_id.map(|s| s.to_string()),
                    revision: None,
                }
            }
        };
        self.telemetry.label_answered(if answer.accepted { "accepted" } else { "rejected" });
        answer
    }

    /// The stored revision, and whether it is new (not a verdict sent again).
    fn accept(&self, incoming: Incoming) -> Result<(LabelRecord, bool), FeedbackError> {
        let limits = &self.config.feedback;
        // The CLI is the operator on this machine (file permissions admit it): no network limit.
        if incoming.source != Source::Cli && self.limiter.check().is_err() {
            return Err(FeedbackError::refused(codes::RATE_LIMITED, "too many verdicts per second"));
        }
        // Every detail below is written by octd: nothing from the payload is echoed.
        if incoming.payload.len() > limits.max_payload_bytes {
            return Err(FeedbackError::refused(
                codes::TOO_LARGE,
                format!("the verdict is larger than feedback.max_payload_bytes ({})", limits.max_payload_bytes),
            ));
        }
        let verdict: VerdictMessage = serde_json::from_slice(&incoming.payload).map_err(|e| {
            tracing::debug!(category = ?e.classify(), line = e.line(), column = e.column(), "verdict payload");
            FeedbackError::refused(codes::MALFORMED, format!("the payload is not an {LABEL_SCHEMA} object"))
        })?;
        if verdict.schema != LABEL_SCHEMA {
            return Err(FeedbackError::refused(codes::MALFORMED, format!("schema must be {LABEL_SCHEMA}")));
        }
        if let Some(id) = &verdict.verdict_id {
            if !reviewers::valid_id(id) {
                return Err(FeedbackError::refused(
                    codes::MALFORMED,
                    "verdict_id must be 1 to 64 letters, digits, '.', '_' or '-'",
                ));
            }
        }
        let scan_id = ScanId::parse(&incoming.scan_id)
            .ok_or_else(|| FeedbackError::refused(codes::UNKNOWN_SCAN, "the scan id is not one octd gives"))?;
        let record = self
            .store
            .get(scan_id)?
            .ok_or_else(|| FeedbackError::refused(codes::UNKNOWN_SCAN, "the scan is not known on this device"))?;
        let predicted = match (&record.state, &record.label) {
            (ScanState::Classified | ScanState::Published, Some(label)) => label.clone(),
            _ => return Err(FeedbackError::refused(codes::NO_RESULT, "the scan has no result to confirm")),
        };
        let model = self
            .updater
            .current()
            .ok_or_else(|| FeedbackError::refused(codes::NO_MODEL, "no model is loaded to check the class against"))?;
        if !verdict.undo && !model.classifier.classes().contains(&verdict.label) {
            return Err(FeedbackError::refused(
                codes::UNKNOWN_CLASS,
                format!("the label is not one of the model's classes ({})", model.classifier.classes().join(", ")),
            ));
        }
        if verdict.reviewer.is_empty() {
            return Err(FeedbackError::refused(codes::REVIEWER_MISSING, "a verdict needs the reviewer's id"));
        }
        let known = Reviewers::load(&self.state).map_err(|e| {
            tracing::error!(error = %e, "cannot read the reviewers");
            FeedbackError::refused(codes::STORE, "the reviewers of this device cannot be read")
        })?;
        if !known.knows(&verdict.reviewer) {
            return Err(FeedbackError::refused(
                codes::UNKNOWN_REVIEWER,
                "the reviewer is not one this device knows (octd reviewer add)",
            ));
        }
        let reviewed = verdict
            .reviewed_at
            .parse::<jiff::Timestamp>()
            .map_err(|_| FeedbackError::refused(codes::MALFORMED, "reviewed_at is not an RFC 3339 date and time"))?;
        if reviewed.as_millisecond() > now_ms() as i64 + SKEW_MS {
            return Err(FeedbackError::refused(codes::MALFORMED, "reviewed_at is in the future"));
        }
        if reviewed.as_millisecond() < record.received_at_ms as i64 - SKEW_MS {
            return Err(FeedbackError::refused(codes::MALFORMED, "reviewed_at is before the scan arrived"));
        }
        let comment = verdict.comment.as_deref().filter(|c| !c.trim().is_empty());
        if comment.is_some_and(|c| c.chars().count() > limits.max_comment_chars) {
            return Err(FeedbackError::refused(
                codes::TOO_LARGE,
                format!("the comment is longer than feedback.max_comment_chars ({})", limits.max_comment_chars),
            ));
        }
        let label = LabelRecord {
            seq: 0,
            scan_id,
            revision: 0,
            label: verdict.label.clone(),
            predicted,
            model_version: record.model_version.clone().unwrap_or_else(|| "unknown".into()),
            reviewer: verdict.reviewer.clone(),
            // In UTC, without any annotation the display may have added.
            reviewed_at: reviewed.to_string(),
            received_at_ms: now_ms(),
            source: incoming.source.as_str().into(),
            has_comment: false,
            undo: verdict.undo,
            withdrawn: false,
            replaced: None,
        };
        let topics = &self.topics;
        let upload = self.config.uplink.active();
        if upload && self.store.uplink_len()? >= self.config.uplink.max_queue {
            return Err(FeedbackError::refused(
                codes::UPLINK_FULL,
                "the queue of verdicts for the trainer is full (uplink.max_queue): nothing was stored",
            ));
        }
        let stored = self.store.record_label(label, verdict.verdict_id.as_deref(), comment, upload, |r| {
            let code = outcome(r);
            let detail = match r.withdrawn {
                true => format!("revision {}: the verdict was taken back; no verdict now", r.revision),
                false => format!("revision {}: {} (the model said {})", r.revision, r.label, r.predicted),
            };
            let event = EventMessage {
                scan_id: Some(r.scan_id),
                label: (!r.withdrawn).then(|| r.label.clone()),
                revision: Some(r.revision),
                reviewer: Some(r.reviewer.clone()),
                model_version: Some(r.model_version.clone()),
                ..topics.event(EventKind::LabelAccepted, code, &detail)
            };
            vec![mqtt::event_outbox(topics, &event)]
        })?;
        match stored {
            Stored::New(r) => {
                self.wake.notify_one();
                Ok((r, true))
            }
            Stored::Duplicate(r) => Ok((r, false)),
            Stored::NothingToUndo { code, detail } => Err(FeedbackError::refused(code, detail)),
        }
    }

    /// The live accuracy now.
    pub fn live_accuracy(&self) -> Result<LiveAccuracy, StoreError> {
        let f = &self.config.feedback;
        let labels = self.store.recent_labels(f.window)?;
        let settings = accuracy::Settings {
            site: &self.config.device.site,
            device: &self.config.device.id,
            window: f.window,
            floor: f.accuracy_floor,
            min_labels: f.min_labels,
        };
        Ok(accuracy::live_accuracy(&labels, &settings, now_ms()))
    }

    /// Publish the live accuracy (retained), and raise or clear its alarm.
    fn follow_accuracy(&self) {
        let result = (|| -> Result<(), StoreError> {
            let report = self.live_accuracy()?;
            self.telemetry.set_live_accuracy(&report);
            let payload = serde_json::to_string(&report).unwrap_or_default();
            self.store.enqueue(&mqtt::quality_message(&self.topics, payload))?;
            let raised = self.store.accuracy_alarm()?;
            let o = &report.overall;
            let (kind, detail) = match accuracy::alarm_change(raised, &report) {
                AlarmChange::Keep => return Ok(()),
                AlarmChange::Raise => (
                    EventKind::Alarm,
                    format!(
                        "live accuracy {:.3} (95 % CI {:.3}-{:.3}) over the last {} verdicts is below feedback.accuracy_floor {}",
                        o.accuracy, o.low, o.high, o.labels, report.floor
                    ),
                ),
                AlarmChange::Clear => (
                    EventKind::AlarmCleared,
                    format!("live accuracy {:.3} over the last {} verdicts is back at or above {}", o.accuracy, o.labels, report.floor),
                ),
            };
            let event = self.topics.event(kind, "accuracy_below_floor", &detail);
            tracing::warn!(
                accuracy = o.accuracy,
                labels = o.labels,
                floor = report.floor,
                raised = (kind == EventKind::Alarm),
                "live accuracy alarm"
            );
            self.store.set_accuracy_alarm(kind == EventKind::Alarm, &mqtt::event_outbox(&self.topics, &event))
        })();
        if let Err(e) = result {
            tracing::error!(error = %e, "cannot update the live accuracy");
        }
        self.wake.notify_one();
    }

    /// The feedback task: verdicts from MQTT, and `octd label` requests, until shutdown.
    pub async fn run(
        self: Arc<Self>,
        verdicts: Arc<tokio::sync::Mutex<mpsc::Receiver<Incoming>>>,
        mut shutdown: watch::Receiver<bool>,
    ) {
        let mut verdicts = verdicts.lock().await;
        // The retained report reflects the store at every start (a crash may have come
        // between a verdict's commit and its report).
        let me = self.clone();
        let _ = tokio::task::spawn_blocking(move || {
            if me.store.recent_labels(1).map(|l| !l.is_empty()).unwrap_or(false) {
                me.follow_accuracy();
            }
        })
        .await;
        let requests = self.state.join(REQUESTS_DIR);
        let mut poll = tokio::time::interval(REQUEST_POLL);
        poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut summary = tokio::time::interval(Duration::from_secs(1));
        summary.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = crate::shutdown::requested(&mut shutdown) => return,
                Some(incoming) = verdicts.recv() => {
                    let me = self.clone();
                    let _ = tokio::task::spawn_blocking(move || me.handle(incoming)).await;
                }
                _ = poll.tick() => {
                    let (me, dir) = (self.clone(), requests.clone());
                    let _ = tokio::task::spawn_blocking(move || me.answer_requests(&dir)).await;
                }
                _ = summary.tick() => {
                    let me = self.clone();
                    let _ = tokio::task::spawn_blocking(move || me.summarise_load_refusals()).await;
                }
            }
        }
    }

    /// Answer the `octd label` requests waiting in `dir`, oldest first. A request stays when
    /// the store could not take it (tried again next turn); answers nobody collected go.
    fn answer_requests(&self, dir: &Path) {
        let Ok(entries) = std::fs::read_dir(dir) else { return };
        let mut found = Vec::new();
        for path in entries.filter_map(|e| e.ok()).map(|e| e.path()) {
            let Ok(meta) = path.metadata() else { continue };
            let modified = meta.modified().unwrap_or(std::time::UNIX_EPOCH);
            match path.extension().and_then(|x| x.to_str()) {
                Some("request") => found.push((modified, meta.len(), path)),
                Some("answer") if modified.elapsed().is_ok_and(|age| age > ANSWER_TTL) => {
                    let _ = std::fs::remove_file(&path);
                }
                _ => {}
            }
        }
        found.sort();
        for (_, len, path) in found.into_iter().take(REQUESTS_PER_TURN) {
            let request = match len <= MAX_REQUEST_BYTES {
                true => std::fs::read(&path).ok().and_then(|b| serde_json::from_slice::<LabelRequest>(&b).ok()),
                false => None,
            };
            let answer = match request {
                Some(request) => self.handle(Incoming {
                    scan_id: request.scan_id,
                    payload: serde_json::to_vec(&request.verdict).unwrap_or_default(),
                    source: Source::Cli,
                }),
                None => Answer {
                    accepted: false,
                    code: codes::MALFORMED.into(),
                    detail: "the request file is not an octd label request".into(),
                    scan_id: None,
                    revision: None,
                },
            };
            if answer.code == codes::STORE {
                // The verdict id makes the next try safe: it is not stored twice.
                return;
            }
            let answer_path = path.with_extension("answer");
            let bytes = serde_json::to_vec(&answer).unwrap_or_default();
            if let Err(e) = crate::fsutil::write_atomic_private(&answer_path, &bytes) {
                tracing::error!(error = %e, "cannot write the answer to an octd label request");
            }
            if let Err(e) = std::fs::remove_file(&path) {
                // Answered again at every turn otherwise (harmless: the verdict id), but say so.
                tracing::error!(error = %e, "cannot remove an answered octd label request (owned by another user?)");
            }
        }
    }
}

/// What `octd label` leaves for the daemon.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LabelRequest {
    pub scan_id: String,
    pub verdict: VerdictMessage,
}

/// `octd label`: leave the request for the running daemon and wait up to `wait` for its
/// answer. The request's name is the verdict's id, so a request answered twice (a crash
/// between the commit and the answer) is stored once. Without an answer in time the request
/// is withdrawn if the daemon has not taken it yet.
pub fn request_label(
    state: &Path,
    scan_id: &str,
    mut verdict: VerdictMessage,
    wait: Duration,
) -> Result<Answer, String> {
    let dir = state.join(REQUESTS_DIR);
    std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let name = uuid::Uuid::now_v7().simple().to_string();
    verdict.verdict_id = Some(format!("cli-{name}"));
    let request = LabelRequest { scan_id: scan_id.to_string(), verdict };
    let path = dir.join(format!("{name}.request"));
    let bytes = serde_json::to_vec(&request).map_err(|e| e.to_string())?;
    crate::fsutil::write_atomic_private(&path, &bytes).map_err(|e| format!("{}: {e}", path.display()))?;
    let answer_path = path.with_extension("answer");
    let deadline = std::time::Instant::now() + wait;
    loop {
        if let Ok(bytes) = std::fs::read(&answer_path) {
            let _ = std::fs::remove_file(&answer_path);
            return serde_json::from_slice(&bytes).map_err(|e| format!("octd's answer is not readable: {e}"));
        }
        if std::time::Instant::now() >= deadline {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    match std::fs::remove_file(&path) {
        Ok(()) => Err(format!(
            "octd did not answer within {} s; the verdict was withdrawn, nothing was stored",
            wait.as_secs()
        )),
        // The daemon took it meanwhile: its answer follows.
        Err(_) => {
            std::thread::sleep(Duration::from_secs(2));
            match std::fs::read(&answer_path) {
                Ok(bytes) => {
                    let _ = std::fs::remove_file(&answer_path);
                    serde_json::from_slice(&bytes).map_err(|e| format!("octd's answer is not readable: {e}"))
                }
                Err(_) => Err("octd took the verdict but its answer is late: see the events topic".into()),
            }
        }
    }
}
