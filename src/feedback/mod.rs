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
use crate::store::{Store, StoreError};
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
/// A reviewed_at further in the future than this is refused (clocks differ a little).
const FUTURE_SKEW_MS: i64 = 5 * 60 * 1000;

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

/// The `octd.label/1` payload.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct VerdictMessage {
    pub schema: String,
    pub label: String,
    pub reviewer: String,
    /// RFC 3339.
    pub reviewed_at: String,
    /// Free text for the clinic's own use: kept on the device, sealed; never published or
    /// uploaded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub comment: Option<String>,
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
}

impl Feedback {
    pub fn new(
        config: Config,
        store: Arc<Store>,
        updater: Arc<Updater>,
        telemetry: Arc<Telemetry>,
        wake: Arc<tokio::sync::Notify>,
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
        }
    }

    /// Check and store one verdict; answer it on the events topic either way.
    pub fn handle(&self, incoming: Incoming) -> Answer {
        let source = incoming.source;
        let claimed = incoming.scan_id.clone();
        let answer = match self.accept(incoming) {
            Ok(record) => {
                let code = if record.label == record.predicted { "confirmed" } else { "corrected" };
                tracing::info!(scan_id = %record.scan_id, revision = record.revision, code, source = source.as_str(),
                    reviewer = %record.reviewer, "verdict stored");
                self.follow_accuracy();
                Answer {
                    accepted: true,
                    code: code.into(),
                    detail: format!("revision {} stored", record.revision),
                    scan_id: Some(record.scan_id.to_string()),
                    revision: Some(record.revision),
                }
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

    fn accept(&self, incoming: Incoming) -> Result<LabelRecord, FeedbackError> {
        let limits = &self.config.feedback;
        if self.limiter.check().is_err() {
            return Err(FeedbackError::refused(
                codes::RATE_LIMITED,
                format!("more than {} verdicts per second (feedback.labels_per_second)", limits.labels_per_second),
            ));
        }
        if incoming.payload.len() > limits.max_payload_bytes {
            return Err(FeedbackError::refused(
                codes::TOO_LARGE,
                format!("{} bytes; feedback.max_payload_bytes is {}", incoming.payload.len(), limits.max_payload_bytes),
            ));
        }
        let verdict: VerdictMessage = serde_json::from_slice(&incoming.payload)
            .map_err(|e| FeedbackError::refused(codes::MALFORMED, format!("not an {LABEL_SCHEMA} message: {e}")))?;
        if verdict.schema != LABEL_SCHEMA {
            return Err(FeedbackError::refused(codes::MALFORMED, format!("schema must be {LABEL_SCHEMA}")));
        }
        let scan_id = ScanId::parse(&incoming.scan_id)
            .ok_or_else(|| FeedbackError::refused(codes::UNKNOWN_SCAN, "the scan id is not one octd gives"))?;
        let record = self
            .store
            .get(scan_id)?
            .ok_or_else(|| FeedbackError::refused(codes::UNKNOWN_SCAN, format!("scan {scan_id} is not known here")))?;
        let predicted = match (&record.state, &record.label) {
            (ScanState::Classified | ScanState::Published, Some(label)) => label.clone(),
            _ => {
                return Err(FeedbackError::refused(
                    codes::NO_RESULT,
                    format!("scan {scan_id} has no result to confirm (it is {:?})", record.state),
                ))
            }
        };
        let model = self
            .updater
            .current()
            .ok_or_else(|| FeedbackError::refused(codes::NO_MODEL, "no model is loaded to check the class against"))?;
        if !model.classifier.classes().contains(&verdict.label) {
            return Err(FeedbackError::refused(
                codes::UNKNOWN_CLASS,
                format!("{:?} is not one of the model's classes {:?}", verdict.label, model.classifier.classes()),
            ));
        }
        if verdict.reviewer.is_empty() {
            return Err(FeedbackError::refused(codes::REVIEWER_MISSING, "a verdict needs the reviewer's id"));
        }
        let known =
            Reviewers::load(&self.state).map_err(|e| FeedbackError::refused(codes::UNKNOWN_REVIEWER, e.to_string()))?;
        if !known.knows(&verdict.reviewer) {
            return Err(FeedbackError::refused(
                codes::UNKNOWN_REVIEWER,
                "the reviewer is not one this device knows (octd reviewer add)",
            ));
        }
        let reviewed = verdict
            .reviewed_at
            .parse::<jiff::Timestamp>()
            .map_err(|e| FeedbackError::refused(codes::MALFORMED, format!("reviewed_at is not RFC 3339: {e}")))?;
        if reviewed.as_millisecond() > now_ms() as i64 + FUTURE_SKEW_MS {
            return Err(FeedbackError::refused(codes::MALFORMED, "reviewed_at is in the future"));
        }
        let comment = verdict.comment.as_deref().filter(|c| !c.trim().is_empty());
        if let Some(c) = comment {
            if c.chars().count() > limits.max_comment_chars {
                return Err(FeedbackError::refused(
                    codes::TOO_LARGE,
                    format!("the comment is longer than feedback.max_comment_chars ({})", limits.max_comment_chars),
                ));
            }
        }
        let label = LabelRecord {
            seq: 0,
            scan_id,
            revision: 0,
            label: verdict.label.clone(),
            predicted,
            model_version: record.model_version.clone().unwrap_or_else(|| "unknown".into()),
            reviewer: verdict.reviewer.clone(),
            reviewed_at: reviewed.to_string(),
            received_at_ms: now_ms(),
            source: incoming.source.as_str().into(),
            has_comment: false,
        };
        let topics = &self.topics;
        let stored = self.store.record_label(label, comment, |r| {
            let code = if r.label == r.predicted { "confirmed" } else { "corrected" };
            let detail = format!("revision {}: {} (the model said {})", r.revision, r.label, r.predicted);
            let event = EventMessage {
                scan_id: Some(r.scan_id),
                label: Some(r.label.clone()),
                revision: Some(r.revision),
                reviewer: Some(r.reviewer.clone()),
                model_version: Some(r.model_version.clone()),
                ..topics.event(EventKind::LabelAccepted, code, &detail)
            };
            vec![mqtt::event_outbox(topics, &event)]
        })?;
        self.wake.notify_one();
        Ok(stored)
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
            }
        }
    }

    /// Answer the `octd label` requests waiting in `dir`, oldest first.
    fn answer_requests(&self, dir: &Path) {
        let Ok(entries) = std::fs::read_dir(dir) else { return };
        let mut found: Vec<(std::time::SystemTime, PathBuf)> = entries
            .filter_map(|e| e.ok())
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|x| x == "request"))
            .filter_map(|p| Some((p.metadata().ok()?.modified().ok()?, p)))
            .collect();
        found.sort();
        for (_, path) in found.into_iter().take(REQUESTS_PER_TURN) {
            let answer = match std::fs::read(&path).ok().and_then(|b| serde_json::from_slice::<LabelRequest>(&b).ok()) {
                Some(request) => self.handle(Incoming {
                    scan_id: request.scan_id,
                    payload: serde_json::to_vec(&request.verdict).unwrap_or_default(),
                    source: Source::Cli,
                }),
                None => Answer {
                    accepted: false,
                    code: codes::MALFORMED.into(),
                    detail: "the request file is not readable".into(),
                    scan_id: None,
                    revision: None,
                },
            };
            let answer_path = path.with_extension("answer");
            let bytes = serde_json::to_vec(&answer).unwrap_or_default();
            if let Err(e) = crate::fsutil::write_atomic(&answer_path, &bytes) {
                tracing::error!(error = %e, "cannot write the answer to an octd label request");
            }
            let _ = std::fs::remove_file(&path);
        }
    }
}

/// What `octd label` leaves for the daemon.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LabelRequest {
    pub scan_id: String,
    pub verdict: VerdictMessage,
}

/// `octd label`: leave the request, wait up to `wait` for the daemon's answer. Without an
/// answer the request stays and is answered when the daemon next runs.
pub fn request_label(state: &Path, request: &LabelRequest, wait: Duration) -> Result<Answer, String> {
    let dir = state.join(REQUESTS_DIR);
    std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let name = uuid::Uuid::now_v7().simple().to_string();
    let path = dir.join(format!("{name}.request"));
    let bytes = serde_json::to_vec(request).map_err(|e| e.to_string())?;
    crate::fsutil::write_atomic(&path, &bytes).map_err(|e| format!("{}: {e}", path.display()))?;
    let answer_path = path.with_extension("answer");
    let deadline = std::time::Instant::now() + wait;
    while std::time::Instant::now() < deadline {
        if let Ok(bytes) = std::fs::read(&answer_path) {
            let _ = std::fs::remove_file(&answer_path);
            return serde_json::from_slice(&bytes).map_err(|e| format!("octd's answer is not readable: {e}"));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    Err(format!(
        "octd has not answered within {} s; the verdict waits in {} and is applied when the daemon runs",
        wait.as_secs(),
        dir.display()
    ))
}
