//! Start-up: resume the scans a crash interrupted, unless one of them is what keeps killing
//! the daemon. A scan in the daemon's own hands (`ScanRecord::attempts`, committed before the
//! daemon runs inference on it: with a 2-D image's or a single frame's de-identified artefact,
//! on its own for a volume, or at the scan's first failed try) each time the daemon died,
//! `pipeline.max_attempts` times, is quarantined as `poison_scan` instead of resumed, so no
//! single input can hold the device in a restart loop. The parsing and de-identification of
//! scanner bytes before that run in an isolated decoder process and are not counted: a power
//! cut while a scan waits or is being decoded is not evidence against the scan.

use std::sync::Arc;

use super::quarantine::{codes, QuarantineReason};
use super::{Pipeline, PipelineError};
use crate::ingest;
use crate::scan::{EventKind, ScanId, ScanState};

/// The unfinished scans to process again, oldest first.
#[derive(Debug, Default)]
pub struct Resumable {
    /// Taken in hand before (`attempts > 0`): one of them may be what killed the daemon.
    pub in_hand: Vec<ScanId>,
    /// Claimed but never taken in hand.
    pub queued: Vec<ScanId>,
}

pub fn resumable(pipeline: &Arc<Pipeline>) -> Result<Resumable, PipelineError> {
    match pipeline.quarantine.seal_plaintext_leftovers() {
        Ok(0) => {}
        Ok(n) => tracing::info!(count = n, "sealed quarantined originals an earlier version kept in plaintext"),
        Err(e) => tracing::error!(error = %e, "cannot seal plaintext originals in quarantine"),
    }
    sweep(pipeline, true)?;
    let max = pipeline.config.pipeline.max_attempts;
    let mut out = Resumable::default();
    // In key order: scan ids are UUIDv7, so oldest first.
    for record in pipeline.store.unfinished()? {
        let id = record.scan_id;
        if record.attempts >= max {
            let detail = format!(
                "the daemon stopped unexpectedly {} times while this scan was being processed; it is set aside \
                 so that the others can go on",
                record.attempts
            );
            tracing::error!(scan_id = %id, attempts = record.attempts, "poison scan: quarantined instead of resumed");
            pipeline.quarantine(record, EventKind::Rejected, codes::POISON_SCAN, &detail)?;
            continue;
        }
        if record.state == ScanState::Received {
            ingest::recover_claim(&pipeline.store, &pipeline.dirs.spool, id)?;
        }
        if record.attempts > 0 {
            out.in_hand.push(id);
        } else {
            out.queued.push(id);
        }
    }
    Ok(out)
}

/// What a sweep found and put right.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Swept {
    /// Plaintext originals removed from the spool: their scan was past de-identification
    /// (a crash came between that commit and the removal), or no longer known.
    pub removed: usize,
    /// Plaintext originals of quarantined scans sealed now (sealing had failed, e.g. a full disk).
    pub sealed: usize,
    /// Sealed copies of scans a release had already put back.
    pub redundant: usize,
}

/// No plaintext original outlives its need: a spooled original of a scan past
/// de-identification goes, one of a quarantined scan is sealed. With `at_start` (nothing else
/// runs yet), sealed copies whose scan is back in the pipeline go too. Runs at start-up and in
/// the upkeep task, which also performs releases, so that the two never race.
pub fn sweep(pipeline: &Pipeline, at_start: bool) -> Result<Swept, PipelineError> {
    let mut swept = Swept::default();
    let entries = match std::fs::read_dir(&pipeline.dirs.spool) {
        Ok(entries) => entries,
        Err(e) => return Err(PipelineError::Transient(format!("reading the spool: {e}"))),
    };
    for entry in entries.flatten() {
        let Some(id) = entry.file_name().to_str().and_then(ScanId::parse) else { continue };
        let path = entry.path();
        let record = pipeline.store.get(id)?;
        match record.as_ref().map(|r| r.state) {
            Some(ScanState::Received) => {}
            Some(ScanState::Quarantined) => {
                let reason = pipeline.quarantine.reason(id).unwrap_or_else(|| QuarantineReason {
                    scan_id: id,
                    code: "quarantined".into(),
                    detail: record.and_then(|r| r.reason).unwrap_or_default(),
                    kind: EventKind::Rejected,
                    at: crate::scan::rfc3339_ms(crate::scan::now_ms()),
                });
                match pipeline.quarantine.admit(&path, &reason) {
                    Ok(()) => swept.sealed += 1,
                    Err(e) => tracing::error!(scan_id = %id, error = %e, "cannot seal a quarantined original yet"),
                }
            }
            _ => match std::fs::remove_file(&path) {
                Ok(()) => swept.removed += 1,
                Err(e) => tracing::error!(scan_id = %id, error = %e, "cannot remove a processed original"),
            },
        }
    }
    if swept.removed > 0 {
        let _ = crate::fsutil::sync_dir(&pipeline.dirs.spool);
    }
    if at_start {
        for entry in pipeline.quarantine.entries().map_err(|e| PipelineError::Transient(e.to_string()))? {
            let id = entry.scan_id;
            let back = pipeline.store.get(id)?.is_some_and(|r| r.state != ScanState::Quarantined);
            // Received with its original in the spool: a release that stopped short of
            // removing the sealed copy, or a quarantine a crash interrupted before the spool
            // copy went (it is processed again from the spool). Without a spooled original the
            // sealed copy is what finishes an interrupted quarantine: it stays.
            let spooled = pipeline.dirs.spool.join(id.to_string()).exists();
            if back && spooled && entry.sealed_bytes.is_some() && pipeline.quarantine.discard(id).is_ok() {
                swept.redundant += 1;
            }
        }
    }
    if swept != Swept::default() {
        tracing::info!(removed = swept.removed, sealed = swept.sealed, redundant = swept.redundant, "swept originals");
    }
    Ok(swept)
}
