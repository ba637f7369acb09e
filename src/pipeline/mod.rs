//! The life of a scan: claimed (by `ingest`) → de-identified (in the decoder worker) →
//! classified → published (by `publish`), or quarantined with a reason. Every step first
//! reads the scan's state from the store and does only what is left, so a job re-sent after
//! a crash resumes where the last commit left it.
//!
//! One entry, [`Pipeline::process`]; `recovery` resumes what a crash interrupted (and
//! applies the poison-scan rule), `retention` prunes, `disk` guards free space, `quarantine`
//! keeps what could not be processed.

pub mod disk;
pub mod quarantine;
pub mod recovery;
pub mod retention;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::Notify;

use self::quarantine::{codes, Quarantine, QuarantineReason};
use crate::config::Config;
use crate::deid::{DeidError, InputLimits};
use crate::infer::InferError;
use crate::ingest::Job;
use crate::isolation::{Decoder, IsolationError};
use crate::mqtt::{self, Topics};
use crate::scan::{
    now_ms, rfc3339_ms, EventKind, EventMessage, InputKind, ResultMessage, ScanId, ScanRecord, ScanState, StageTimings,
    RESULT_SCHEMA,
};
use crate::store::{OutboxMessage, Store, StoreError};
use crate::telemetry::Telemetry;
use crate::update::Updater;

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PipelineError {
    #[error("store: {0}")]
    Store(#[from] StoreError),
    /// The device, not the scan, is at fault (disk, decoder worker, no model): try again.
    #[error("{0}")]
    Transient(String),
    /// A step panicked on this scan: retrying would panic again, so it is the scan's fault.
    #[error("a processing step panicked")]
    Panicked,
}

/// What de-identification hands to inference.
enum Handover {
    /// A 2-D image or a single frame: its artefact is written and committed (counting the
    /// attempt when `count`) on the same blocking thread that then classifies it, one hand-off
    /// fewer per scan; the decoded pixels come along when the decoder worker gave them.
    Write { pending: PendingArtefact, count: bool, pixels: Option<crate::deid::DecodedPixels> },
    /// A volume whose attempt is counted: inference reads its bytes while they are written.
    Writing(PendingArtefact),
}

/// A de-identified scan whose artefact is not yet on disk.
struct PendingArtefact {
    record: ScanRecord,
    out: crate::deid::DeidOutput,
    /// The identified original, deleted once the artefact is committed.
    spooled: PathBuf,
    /// When the spooled scan was first read.
    started: Instant,
    /// De-identification's time when it ended before the artefact's write (a volume); None:
    /// until the artefact's commit.
    deid_ms: Option<u64>,
}

/// A scan's spooled original as read for de-identification.
enum Spooled {
    /// Gone: a quarantine a crash interrupted, or a file that vanished before its claim.
    Missing,
    Read {
        bytes: Result<Vec<u8>, DeidError>,
        started: Instant,
    },
}

/// The B-scans inference reads.
#[derive(Clone, Copy)]
enum Frames<'a> {
    /// A 2-D image's frame, converted from the pixels the decoder worker handed over.
    Decoded(&'a [crate::infer::preprocess::GreyFrame]),
    Source(crate::infer::frames::Source<'a>),
}

/// What inference made of a scan.
enum Inferred<'a> {
    Classified {
        classification: crate::scan::Classification,
        heatmap: Option<crate::infer::Heatmap>,
        model: Arc<crate::update::ActiveModel>,
        /// A pending model's health gate counts the scan once its result is committed.
        busy: Option<crate::update::InferenceGuard<'a>>,
        infer_ms: u64,
    },
    /// The scan's fault (undecodable) or the model's (no fallback left): quarantined.
    Refused { code: &'static str, detail: String },
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

/// What every step of a scan needs.
pub struct Pipeline {
    pub config: Config,
    pub dirs: Dirs,
    pub store: Arc<Store>,
    pub updater: Arc<Updater>,
    pub topics: Topics,
    pub wake: Arc<Notify>,
    pub telemetry: Arc<Telemetry>,
    pub quarantine: Quarantine,
    /// Scans the workers are processing now: one alone may have every core for inference.
    pub in_process: std::sync::atomic::AtomicUsize,
}

/// Counts a scan in `Pipeline::in_process` while it lives.
struct InProcess<'a>(&'a std::sync::atomic::AtomicUsize);

impl<'a> InProcess<'a> {
    fn start(count: &'a std::sync::atomic::AtomicUsize) -> Self {
        count.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        InProcess(count)
    }
}

impl Drop for InProcess<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
    }
}

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> Result<T, PipelineError> {
    tokio::task::spawn_blocking(f).await.map_err(|e| match e.is_panic() {
        true => PipelineError::Panicked,
        false => PipelineError::Transient(format!("worker task: {e}")),
    })
}

impl Pipeline {
    /// Drive one scan from whatever state it is in to classified (or quarantined).
    /// `counted` says whether this job's attempt for the poison-scan rule is already counted:
    /// the same worker trying again after a transient failure is not another attempt.
    pub async fn process(
        self: &Arc<Self>,
        decoder: &mut Decoder,
        job: Job,
        counted: &mut bool,
    ) -> Result<(), PipelineError> {
        let queue_ms = job.queued_at.elapsed().as_millis() as u64;
        let _in_process = InProcess::start(&self.in_process);
        let me = self.clone();
        let id = job.scan_id;
        // A scan to de-identify has its spooled original read on the thread that looked it
        // up: one hand-off fewer per scan.
        let (taken, spooled) = blocking(move || -> Result<_, StoreError> {
            let record = me.store.get(id)?;
            let spooled = record.as_ref().filter(|r| r.state == ScanState::Received).map(|_| me.read_spooled(id));
            Ok((record, spooled))
        })
        .await??;
        let Some(record) = taken else {
            return Err(PipelineError::Store(StoreError::UnknownScan(id)));
        };
        if let Some(spooled) = spooled {
            match self.deidentify_step(decoder, record, spooled, counted).await? {
                Some(Handover::Write { pending, count, pixels }) => {
                    let me = self.clone();
                    let (classified, committed) = blocking(move || {
                        let mut pending = pending;
                        let artifact = std::mem::take(&mut pending.out.artifact);
                        match me.commit_artefact(pending, &artifact, count) {
                            Ok(record) => (me.classify_step(record, queue_ms, &mut true, pixels), true),
                            Err(e) => (Err(e), false),
                        }
                    })
                    .await?;
                    // The attempt is counted once the artefact's commit holds, whatever
                    // inference did after it.
                    *counted |= committed;
                    classified?;
                    self.wake.notify_one();
                    return Ok(());
                }
                Some(Handover::Writing(pending)) => {
                    let me = self.clone();
                    blocking(move || me.classify_while_writing(pending, queue_ms)).await??;
                    self.wake.notify_one();
                    return Ok(());
                }
                None => return Ok(()), // quarantined
            }
        }
        if record.state == ScanState::Deidentified {
            let me = self.clone();
            let mut now_counted = *counted;
            let (classified, now_counted) = blocking(move || {
                // Resumed from its written artefact (after a crash or a transient failure).
                let classified = me.classify_step(record, queue_ms, &mut now_counted, None);
                (classified, now_counted)
            })
            .await?;
            *counted = now_counted;
            classified?;
            self.wake.notify_one();
        }
        Ok(())
    }

    /// Count an attempt for the poison-scan rule, durably, before the daemon's own process
    /// works on the scan's data; not while the scan waits or is parsed by the isolated decoder,
    /// whose death costs a worker, not the daemon, so a power cut then blames no scan (see
    /// `recovery`). Returns the attempts counted so far.
    pub async fn count_attempt(self: &Arc<Self>, id: ScanId) -> Result<u32, PipelineError> {
        let me = self.clone();
        let taken = blocking(move || me.store.take_in_hand(id)).await??;
        Ok(taken.ok_or(PipelineError::Store(StoreError::UnknownScan(id)))?.attempts)
    }

    /// A scan's spooled original, within the input limits.
    fn read_spooled(&self, id: ScanId) -> Spooled {
        let path = self.dirs.spool.join(id.to_string());
        if !path.exists() {
            return Spooled::Missing;
        }
        let started = Instant::now();
        let bytes = crate::deid::read_input_within(&path, &InputLimits::from(&self.config.ingest));
        Spooled::Read { bytes, started }
    }

    /// Returns what inference goes on from, or None when the scan went to quarantine.
    async fn deidentify_step(
        self: &Arc<Self>,
        decoder: &mut Decoder,
        mut record: ScanRecord,
        spooled_original: Spooled,
        counted: &mut bool,
    ) -> Result<Option<Handover>, PipelineError> {
        let id = record.scan_id;
        let spooled = self.dirs.spool.join(id.to_string());
        let (read, started) = match spooled_original {
            Spooled::Read { bytes, started } => (bytes, started),
            // Either a quarantine a crash interrupted, or a file that vanished before its claim.
            Spooled::Missing => {
                return match self.quarantine.reason(id) {
                    Some(r) => self.quarantine_async(record, r.kind, &r.code, &r.detail).await,
                    None => {
                        let detail = "the claimed file disappeared before it could be read";
                        self.quarantine_async(record, EventKind::Rejected, codes::SOURCE_MISSING, detail).await
                    }
                }
            }
        };
        let bytes = match read {
            Ok(bytes) => bytes,
            Err(DeidError::Io(e)) => return Err(PipelineError::Transient(format!("reading the spooled scan: {e}"))),
            Err(e) => return self.quarantine_async(record, e.event_kind(), e.code(), &e.to_string()).await,
        };
        let mut out = match decoder.deidentify(bytes).await {
            Ok(out) => out,
            Err(IsolationError::Unavailable(why)) => return Err(PipelineError::Transient(why)),
            Err(e @ IsolationError::Killed { .. }) => {
                tracing::error!(scan_id = %id, code = e.code(), "decoder worker lost on this scan");
                let code = e.code().to_string();
                return self.quarantine_async(record, EventKind::Rejected, &code, &e.to_string()).await;
            }
            Err(IsolationError::Refused { code, detail, kind }) => {
                return self.quarantine_async(record, kind, &code, &detail).await
            }
        };
        // From here the daemon's own process works on the scan's data: inference follows, and
        // its attempt for the poison-scan rule must be durable first.
        let pixels = out.pixels.take();
        if out.kind == InputKind::Dicom && pixels.is_none() && out.frames > 1 {
            // A volume (up to hundreds of MiB of pixels) is classified from the bytes in
            // memory while they are written and fsynced, off inference's path; the attempt
            // takes a commit of its own (about a millisecond) so that it is counted before
            // inference starts, not with the artefact. A single frame is not worth that commit.
            if !*counted {
                record.attempts = self.count_attempt(id).await?;
                *counted = true;
            }
            // Its de-identification ends here: what follows overlaps inference.
            let deid_ms = Some(started.elapsed().as_millis() as u64);
            return Ok(Some(Handover::Writing(PendingArtefact { record, out, spooled, started, deid_ms })));
        }
        // A 2-D image is small: the attempt is counted in the same commit as its artefact
        // (one durable commit fewer per scan), so a death from then on counts; writing bytes
        // to a file before it is not something an input can make fail (and a scan re-decoded
        // after a death there is not blamed, as while the isolated decoder held it).
        let pending = PendingArtefact { record, out, spooled, started, deid_ms: None };
        Ok(Some(Handover::Write { pending, count: !*counted, pixels }))
    }

    /// Write the de-identified artefact, commit the scan as de-identified (counting the
    /// attempt in the same commit when `count`), then let the identified original go.
    fn commit_artefact(
        &self,
        pending: PendingArtefact,
        artifact: &[u8],
        count: bool,
    ) -> Result<ScanRecord, PipelineError> {
        let PendingArtefact { mut record, out, spooled, started, deid_ms } = pending;
        let id = record.scan_id;
        let frames = out.frames;
        let written =
            out.write_from(artifact, &self.dirs.deid, id).map_err(|e| PipelineError::Transient(e.to_string()))?;
        if !written.identifiers.is_empty() {
            self.store.extend_linkage(id, written.identifiers)?;
        }
        record.state = ScanState::Deidentified;
        record.kind = Some(written.kind);
        record.frames = Some(frames);
        record.artifact = written.artifact.file_name().map(|n| n.to_string_lossy().into_owned());
        record.study_uid = written.study_uid;
        record.laterality = written.laterality;
        record.deid_ms = Some(deid_ms.unwrap_or_else(|| started.elapsed().as_millis() as u64));
        if count {
            record.attempts = record.attempts.saturating_add(1);
        }
        self.store.transition(&record, None)?;
        // The de-identified artefact is committed; the identified original may go. Its
        // identity stays in the sealed linkage. The removal is not fsynced here (one I/O wait
        // fewer per scan): a power cut that undoes it leaves the original of a scan past
        // `Received`, which start-up recovery removes before anything else runs
        // (`recovery::sweep`); a quarantine fsyncs it first (`quarantine`), and any later
        // claim's fsync of the spool makes it durable too.
        let _ = std::fs::remove_file(&spooled);
        tracing::info!(scan_id = %id, frames, "de-identified");
        Ok(record)
    }

    /// A volume's inference from its bytes in memory while another thread writes and commits
    /// them. The result is committed only after the artefact: a scan is never
    /// classified without its de-identified record on disk. A failed write discards the
    /// inference; the scan is tried again from its spooled original.
    fn classify_while_writing(&self, mut pending: PendingArtefact, queue_ms: u64) -> Result<(), PipelineError> {
        let artifact = std::mem::take(&mut pending.out.artifact);
        let id = pending.record.scan_id;
        std::thread::scope(|s| {
            let writer = std::thread::Builder::new()
                .name("octd-artefact".into())
                .spawn_scoped(s, || self.commit_artefact(pending, &artifact, false))
                .map_err(|e| PipelineError::Transient(format!("starting the artefact's writer: {e}")))?;
            let inferred = self.infer(id, Frames::Source(crate::infer::frames::Source::Dicom(&artifact)));
            let record = match writer.join() {
                Ok(written) => written?,
                Err(panic) => std::panic::resume_unwind(panic),
            };
            self.record_inference(record, queue_ms, inferred?)
        })
    }

    fn classify_step(
        &self,
        mut record: ScanRecord,
        queue_ms: u64,
        counted: &mut bool,
        pixels: Option<crate::deid::DecodedPixels>,
    ) -> Result<(), PipelineError> {
        let id = record.scan_id;
        if !*counted {
            // Resumed after the artefact was written: count before inference.
            let taken = self.store.take_in_hand(id)?.ok_or(PipelineError::Store(StoreError::UnknownScan(id)))?;
            record.attempts = taken.attempts;
            *counted = true;
        }
        // The pixels the artefact holds, as the same conversion from its decoded image.
        let decoded = pixels.and_then(|p| p.into_image()).map(|image| vec![crate::infer::frames::from_image(&image)]);
        let artifact = self.dirs.deid.join(record.artifact.clone().unwrap_or_default());
        let frames = match &decoded {
            Some(frames) => Frames::Decoded(frames),
            None => Frames::Source(crate::infer::frames::Source::File(&artifact)),
        };
        let inferred = self.infer(id, frames)?;
        self.record_inference(record, queue_ms, inferred)
    }

    /// One inference of a scan, on the model current when it starts (rolled back and tried
    /// once more when a new model fails).
    fn infer(&self, id: ScanId, frames: Frames<'_>) -> Result<Inferred<'_>, PipelineError> {
        let started = Instant::now();
        let mut retried = false;
        loop {
            // The scan keeps this model until its result is written, whatever is swapped in meanwhile.
            let model = self.updater.current().ok_or_else(|| PipelineError::Transient("no model is loaded".into()))?;
            let busy = self.updater.inference_started(&model);
            let classified = match frames {
                Frames::Decoded(frames) => {
                    let alone = self.in_process.load(std::sync::atomic::Ordering::Relaxed) <= 1;
                    model.classifier.classify_frames_with_heatmap(frames, alone)
                }
                Frames::Source(source) => model.classifier.classify_source_with_heatmap(source),
            };
            match classified {
                Ok((classification, heatmap)) => {
                    let infer_ms = started.elapsed().as_millis() as u64;
                    return Ok(Inferred::Classified { classification, heatmap, model, busy, infer_ms });
                }
                Err(e @ InferError::Input(_)) => {
                    drop(busy);
                    tracing::error!(scan_id = %id, error = %e, "classification failed");
                    return Ok(Inferred::Refused { code: codes::UNDECODABLE, detail: e.to_string() });
                }
                Err(e) => {
                    drop(busy);
                    // A new model failing is the model's fault: roll it back and classify again.
                    if !retried && self.updater.model_failed(&model, &e.to_string()) {
                        retried = true;
                        continue;
                    }
                    tracing::error!(scan_id = %id, error = %e, "classification failed");
                    return Ok(Inferred::Refused { code: codes::INFERENCE_FAILED, detail: e.to_string() });
                }
            }
        }
    }

    /// Commit an inference's result (durable before it is published), or quarantine the scan
    /// when inference refused it.
    fn record_inference(
        &self,
        mut record: ScanRecord,
        queue_ms: u64,
        inferred: Inferred<'_>,
    ) -> Result<(), PipelineError> {
        let id = record.scan_id;
        let (classification, heatmap, model, busy, infer_ms) = match inferred {
            Inferred::Classified { classification, heatmap, model, busy, infer_ms } => {
                (classification, heatmap, model, busy, infer_ms)
            }
            Inferred::Refused { code, detail } => return self.quarantine(record, EventKind::Rejected, code, &detail),
        };
        record.heatmap = heatmap;

        let now = now_ms();
        let kind =
            record.kind.ok_or_else(|| PipelineError::Transient("de-identified scan without input kind".into()))?;
        let message = ResultMessage {
            schema: RESULT_SCHEMA.into(),
            scan_id: id,
            site: self.config.device.site.clone(),
            device: self.config.device.id.clone(),
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
            topic: self.topics.result(id),
            payload: serde_json::to_string(&message).map_err(|e| PipelineError::Transient(e.to_string()))?,
            retain: false,
            completes_scan: Some(id),
        };
        record.state = ScanState::Classified;
        record.label = Some(classification.label.clone());
        record.model_version = Some(model.classifier.stamp().version.clone());
        record.model = Some(model.classifier.stamp().clone());
        record.probabilities = Some(classification.probabilities.clone());
        record.priority = Some(classification.priority);
        record.needs_review = Some(classification.needs_review);
        record.review_reasons = classification.review_reasons.clone();
        record.confidence = Some(classification.confidence);
        record.most_suspicious_frame = Some(classification.most_suspicious_frame);
        record.unlike_training_score = classification.unlike_training_score;
        self.store.transition(&record, Some(&outbox))?;
        self.telemetry.scan_classified(&message.timings_ms);
        if let Some(busy) = busy {
            busy.succeeded();
        }
        tracing::info!(scan_id = %id, model = %model.classifier.stamp().version, label = %classification.label, confidence = classification.confidence,
            needs_review = classification.needs_review, infer_ms, "classified");
        Ok(())
    }

    /// Quarantine off the runtime; `Ok(None)`: the step ends here.
    async fn quarantine_async<T>(
        self: &Arc<Self>,
        record: ScanRecord,
        kind: EventKind,
        code: &str,
        detail: &str,
    ) -> Result<Option<T>, PipelineError> {
        let (me, code, detail) = (self.clone(), code.to_string(), detail.to_string());
        blocking(move || me.quarantine(record, kind, &code, &detail)).await??;
        Ok(None)
    }

    /// Move the input aside with a reason file, record it, and announce it — in that order,
    /// so a crash in between is finished by the next start (see `deidentify_step`).
    pub fn quarantine(
        &self,
        mut record: ScanRecord,
        kind: EventKind,
        code: &str,
        detail: &str,
    ) -> Result<(), PipelineError> {
        let id = record.scan_id;
        let spooled = self.dirs.spool.join(id.to_string());
        let reason =
            QuarantineReason { scan_id: id, code: code.into(), detail: detail.into(), kind, at: rfc3339_ms(now_ms()) };
        // The reason is recorded in the store even when the disk is too full for the file.
        if let Err(e) = self.quarantine.admit(&spooled, &reason) {
            tracing::error!(scan_id = %id, error = %e, "cannot write the quarantine folder; recording the reason in the store");
        }
        match &record.artifact {
            Some(artifact) => {
                let _ = std::fs::remove_file(self.dirs.deid.join(artifact));
            }
            // A volume's artefact is written while it is classified: a death then (a
            // poison scan's) leaves it, or its temp file, without a commit naming it.
            None => {
                for extension in ["dcm", "jpg", "png"] {
                    let _ = std::fs::remove_file(self.dirs.deid.join(format!("{id}.{extension}")));
                    let _ = std::fs::remove_file(self.dirs.deid.join(format!(".{id}.{extension}.tmp")));
                }
            }
        }
        if record.state != ScanState::Received {
            // Its spooled original went when its artefact was committed, unsynced (see
            // `commit_artefact`): a power cut after this commit must not bring the original
            // back, for recovery would keep it sealed as this quarantined scan's.
            let _ = crate::fsutil::sync_dir(&self.dirs.spool);
        }
        record.state = ScanState::Quarantined;
        record.reason = Some(format!("{code}: {detail}"));
        let event = self.event(kind, Some(id), code, detail);
        self.store.transition(&record, Some(&event))?;
        self.wake.notify_one();
        let outcome = serde_json::to_value(kind).ok().and_then(|v| v.as_str().map(str::to_owned));
        self.telemetry.scan_quarantined(outcome.as_deref().unwrap_or("quarantined"));
        tracing::warn!(scan_id = %id, code, "quarantined");
        Ok(())
    }

    /// Quarantine a scan known only by its id (a step panicked on it).
    pub async fn set_aside(self: &Arc<Self>, id: ScanId, code: &str, detail: &str) -> Result<(), PipelineError> {
        let me = self.clone();
        let Some(record) = blocking(move || me.store.get(id)).await?? else { return Ok(()) };
        self.quarantine_async::<()>(record, EventKind::Rejected, code, detail).await.map(|_| ())
    }

    pub fn event(&self, kind: EventKind, scan_id: Option<ScanId>, code: &str, detail: &str) -> OutboxMessage {
        event_message(&self.topics, kind, scan_id, code, detail)
    }
}

/// An event as the outbox message that announces it.
pub fn event_message(
    topics: &Topics,
    kind: EventKind,
    scan_id: Option<ScanId>,
    code: &str,
    detail: &str,
) -> OutboxMessage {
    mqtt::event_outbox(topics, &EventMessage { scan_id, ..topics.event(kind, code, detail) })
}

/// Backoff for a scan whose step failed through no fault of its own: 1 s, 2 s, 4 s … 60 s.
pub fn retry_delay(attempt: u32) -> Duration {
    Duration::from_secs(1u64 << attempt.min(6)).min(Duration::from_secs(60))
}
