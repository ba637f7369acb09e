//! Start-up: resume the scans a crash interrupted, unless one of them is what keeps killing
//! the daemon. A scan taken in hand (`ScanRecord::attempts`, committed before any work) each
//! time the daemon died, `pipeline.max_attempts` times, is quarantined as `poison_scan`
//! instead of resumed, so no single input can hold the device in a restart loop.

use std::sync::Arc;

use super::quarantine::codes;
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
