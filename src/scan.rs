//! Types that travel between stages. Nothing here may hold patient identity: these values
//! are stored, logged and published. Identity lives only in the sealed linkage table.

use std::collections::BTreeMap;
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// Identifies a scan everywhere (UUIDv7: time-ordered, carries no identity).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct ScanId(pub Uuid);

impl ScanId {
    pub fn new() -> Self {
        ScanId(Uuid::now_v7())
    }

    pub fn parse(s: &str) -> Option<Self> {
        Uuid::parse_str(s).ok().map(ScanId)
    }
}

impl Default for ScanId {
    fn default() -> Self {
        Self::new()
    }
}

impl std::fmt::Display for ScanId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.hyphenated().fmt(f)
    }
}

/// received -> deidentified -> classified -> published, or quarantined from any state
/// before classified. Each transition is one committed store transaction.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ScanState {
    Received,
    Deidentified,
    Classified,
    Published,
    Quarantined,
}

impl ScanState {
    pub const ALL: [ScanState; 5] = [
        ScanState::Received,
        ScanState::Deidentified,
        ScanState::Classified,
        ScanState::Published,
        ScanState::Quarantined,
    ];

    /// The state as the store, the status report and the metrics name it.
    pub fn as_str(self) -> &'static str {
        match self {
            ScanState::Received => "received",
            ScanState::Deidentified => "deidentified",
            ScanState::Classified => "classified",
            ScanState::Published => "published",
            ScanState::Quarantined => "quarantined",
        }
    }
}

/// What a file turned out to be, from its first bytes (never from its name).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum InputKind {
    Dicom,
    Jpeg,
    Png,
    Tiff,
    Bmp,
}

impl InputKind {
    pub fn sniff(head: &[u8]) -> Option<InputKind> {
        if head.len() >= 132 && &head[128..132] == b"DICM" {
            Some(InputKind::Dicom)
        } else if head.starts_with(&[0xFF, 0xD8, 0xFF]) {
            Some(InputKind::Jpeg)
        } else if head.starts_with(b"\x89PNG\r\n\x1a\n") {
            Some(InputKind::Png)
        } else if head.starts_with(b"II*\0") || head.starts_with(b"MM\0*") {
            Some(InputKind::Tiff)
        } else if head.starts_with(b"BM") {
            Some(InputKind::Bmp)
        } else {
            None
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Priority {
    Urgent,
    FollowUp,
    Routine,
}

impl Priority {
    /// 1 is seen first.
    pub fn rank(self) -> u8 {
        match self {
            Priority::Urgent => 1,
            Priority::FollowUp => 2,
            Priority::Routine => 3,
        }
    }
}

/// The store's record of one scan.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ScanRecord {
    pub scan_id: ScanId,
    pub state: ScanState,
    pub received_at_ms: u64,
    pub updated_at_ms: u64,
    pub kind: Option<InputKind>,
    /// File name of the de-identified artefact under `<state>/deid/`.
    pub artifact: Option<String>,
    pub frames: Option<u32>,
    /// Why it was quarantined (no PHI: reasons are written by octd, not copied from input).
    pub reason: Option<String>,
    pub label: Option<String>,
    pub priority: Option<Priority>,
    pub deid_ms: Option<u64>,
    /// Keyed-hash pseudonym of the DICOM StudyInstanceUID.
    pub study_uid: Option<String>,
    pub laterality: Option<String>,
    /// Times the daemon itself took this scan's data in hand (committed when the isolated
    /// decoder answers, or at a failed try): the poison-scan rule quarantines a scan in hand
    /// at `pipeline.max_attempts` daemon deaths.
    #[serde(default)]
    pub attempts: u32,
    /// The version of the model that classified the scan (live accuracy per version).
    #[serde(default)]
    pub model_version: Option<String>,
    /// The model that classified it and its probabilities, as the result said: what a
    /// verdict's upload reports as the prediction.
    #[serde(default)]
    pub model: Option<ModelStamp>,
    #[serde(default)]
    pub probabilities: Option<BTreeMap<String, f32>>,
    /// Why the result asks for a human look, as it said (empty: it does not).
    #[serde(default)]
    pub review_reasons: Vec<String>,
    #[serde(default)]
    pub needs_review: Option<bool>,
    #[serde(default)]
    pub confidence: Option<f32>,
    /// For a volume, the B-scan the reading room opens at.
    #[serde(default)]
    pub most_suspicious_frame: Option<u32>,
    /// Where the model looked (its activation map of the label), when the model gives one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub heatmap: Option<crate::infer::Heatmap>,
    /// The model's score of how unlike its training images the scan is, when it gives one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unlike_training_score: Option<f32>,
}

impl ScanRecord {
    pub fn received(scan_id: ScanId) -> Self {
        let now = now_ms();
        ScanRecord {
            scan_id,
            state: ScanState::Received,
            received_at_ms: now,
            updated_at_ms: now,
            kind: None,
            artifact: None,
            frames: None,
            reason: None,
            label: None,
            priority: None,
            deid_ms: None,
            study_uid: None,
            laterality: None,
            attempts: 0,
            model_version: None,
            model: None,
            probabilities: None,
            review_reasons: Vec::new(),
            needs_review: None,
            confidence: None,
            most_suspicious_frame: None,
            heatmap: None,
            unlike_training_score: None,
        }
    }
}

/// What the clinic may look up on the device, and nowhere else.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct Linkage {
    pub original_path: String,
    pub original_name: String,
    /// DICOM identifiers as found in the input (attribute keyword -> value).
    pub identifiers: BTreeMap<String, String>,
    pub claimed_at_ms: u64,
}

/// Per-class probabilities in manifest order, and what they mean for triage.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Classification {
    pub label: String,
    pub probabilities: BTreeMap<String, f32>,
    pub confidence: f32,
    pub needs_review: bool,
    pub review_reasons: Vec<String>,
    pub priority: Priority,
    pub priority_rank: u8,
    pub frames: u32,
    /// For volumes: the B-scan that looks least normal.
    pub most_suspicious_frame: u32,
    /// How unlike the model's training images the labelled B-scan is, by the model's own
    /// score (manifest `ood`); above its threshold the result says `input_unlike_training`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unlike_training_score: Option<f32>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ModelStamp {
    pub name: String,
    pub version: String,
    pub sha256: String,
    pub backend: String,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct StageTimings {
    pub queue_ms: u64,
    pub deid_ms: u64,
    pub infer_ms: u64,
    pub total_ms: u64,
}

/// The payload of `oct/{site}/{device}/results/{scan_id}`; see docs/mqtt.md.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ResultMessage {
    pub schema: String,
    pub scan_id: ScanId,
    pub site: String,
    pub device: String,
    pub received_at: String,
    pub classified_at: String,
    pub input_kind: InputKind,
    /// Pseudonymous (keyed-hash) study UID for DICOM inputs, to group scans of one visit.
    pub study_uid: Option<String>,
    pub laterality: Option<String>,
    #[serde(flatten)]
    pub classification: Classification,
    pub model: ModelStamp,
    pub timings_ms: StageTimings,
}

pub const RESULT_SCHEMA: &str = "octd.result/1";
pub const EVENT_SCHEMA: &str = "octd.event/1";
pub const STATUS_SCHEMA: &str = "octd.status/1";
pub const LABEL_SCHEMA: &str = "octd.label/1";
pub const QUALITY_SCHEMA: &str = "octd.quality/1";

/// Accuracy over a set of verdicts with its Wilson 95 % interval.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Accuracy {
    pub labels: u64,
    pub correct: u64,
    pub accuracy: f64,
    pub low: f64,
    pub high: f64,
}

/// The `octd.quality/1` report (docs/mqtt.md).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LiveAccuracy {
    pub schema: String,
    pub site: String,
    pub device: String,
    pub at: String,
    /// The most recent verdicts counted (`feedback.window`).
    pub window: usize,
    pub overall: Accuracy,
    /// By the confirmed class: of the scans reviewers called X, how many the model called X.
    pub per_class: BTreeMap<String, Accuracy>,
    pub per_model_version: BTreeMap<String, Accuracy>,
    /// Verdicts that corrected the model, in the window.
    pub corrected: u64,
    pub floor: f64,
    pub min_labels: u64,
    /// Below the floor over at least `min_labels` verdicts: the alarm condition.
    pub below_floor: bool,
}

/// One revision of a reviewer's verdict on a scan, as stored. The free-text comment is kept
/// apart, sealed (it may name a patient), and never leaves the device.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct LabelRecord {
    /// Arrival order across all scans: the live-accuracy window counts back along it.
    pub seq: u64,
    pub scan_id: ScanId,
    /// 1 for the first verdict on the scan; a correction is the next revision.
    pub revision: u32,
    /// The confirmed class.
    pub label: String,
    /// What the model said.
    pub predicted: String,
    /// The version of the model that said it.
    pub model_version: String,
    /// Pseudonymous reviewer id.
    pub reviewer: String,
    /// RFC 3339, as the reviewer's display gave it.
    pub reviewed_at: String,
    pub received_at_ms: u64,
    /// `mqtt`, `http` or `cli`.
    pub source: String,
    #[serde(default)]
    pub has_comment: bool,
    /// This revision takes back the reviewer's previous one (undo): its label is the one in
    /// force before that revision, or none (`withdrawn`).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub undo: bool,
    /// The scan has no verdict from this revision on (an undone first verdict): it counts
    /// nowhere, and `label` is empty.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub withdrawn: bool,
    /// The label in force before this revision (None: there was none).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replaced: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EventKind {
    /// The input could not be processed and went to quarantine.
    Rejected,
    /// The input was readable but policy kept it from processing (e.g. burned-in identity).
    Quarantined,
    Alarm,
    AlarmCleared,
    /// A verified, self-tested model bundle was swapped in.
    ModelInstalled,
    /// A model update was refused; `code` says why (signature, expiry, hash, self-test, ...).
    ModelRefused,
    /// The newly installed model passed its health gate and is kept.
    ModelCommitted,
    /// The active model was replaced by an earlier one (failure, crash loop, withdrawal).
    ModelRolledBack,
    /// A reviewer's verdict on a result was stored (`code`: `confirmed` or `corrected`).
    LabelAccepted,
    /// A verdict was refused and nothing was stored; `code` says why.
    LabelRejected,
}

/// The payload of `oct/{site}/{device}/events`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct EventMessage {
    pub schema: String,
    pub kind: EventKind,
    pub site: String,
    pub device: String,
    pub at: String,
    pub scan_id: Option<ScanId>,
    /// Machine-readable reason, e.g. `disk_low`, `unsupported_transfer_syntax`.
    pub code: String,
    pub detail: String,
    /// Model events: the version concerned and the version active afterwards.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model_version: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub active_version: Option<String>,
    /// Verdict events: the confirmed class, its revision and the reviewer's pseudonym.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub label: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revision: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reviewer: Option<String>,
}

impl EventMessage {
    /// An event of `device` at `site`, now; scan and model fields unset.
    pub fn new(site: &str, device: &str, kind: EventKind, code: &str, detail: &str) -> EventMessage {
        EventMessage {
            schema: EVENT_SCHEMA.into(),
            kind,
            site: site.into(),
            device: device.into(),
            at: rfc3339_ms(now_ms()),
            scan_id: None,
            code: code.into(),
            detail: detail.into(),
            model_version: None,
            active_version: None,
            label: None,
            revision: None,
            reviewer: None,
        }
    }
}

pub fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

pub fn rfc3339_ms(ms: u64) -> String {
    humantime::format_rfc3339_millis(UNIX_EPOCH + std::time::Duration::from_millis(ms)).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sniffs_by_content_not_name() {
        let mut dicom = vec![0u8; 128];
        dicom.extend_from_slice(b"DICM");
        assert_eq!(InputKind::sniff(&dicom), Some(InputKind::Dicom));
        assert_eq!(InputKind::sniff(&[0xFF, 0xD8, 0xFF, 0xE0]), Some(InputKind::Jpeg));
        assert_eq!(InputKind::sniff(b"\x89PNG\r\n\x1a\nxxxx"), Some(InputKind::Png));
        assert_eq!(InputKind::sniff(b"II*\0...."), Some(InputKind::Tiff));
        assert_eq!(InputKind::sniff(b"hello world"), None);
        assert_eq!(InputKind::sniff(b""), None);
    }

    #[test]
    fn scan_ids_are_time_ordered() {
        let a = ScanId::new();
        let b = ScanId::new();
        assert!(a < b);
        assert_eq!(a.0.get_version_num(), 7);
        assert_eq!(ScanId::parse(&a.to_string()), Some(a));
    }
}
