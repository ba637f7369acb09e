//! Quarantine: where inputs that cannot or may not be processed wait for a person, each
//! with a reason file. The reason holds octd's own words (a code and a detail), never text
//! copied from the input.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::scan::{EventKind, ScanId};

/// Codes octd writes when a scan is quarantined by the pipeline itself (de-identification's
/// codes, such as `not_an_image` or `burned_in_annotation`, come from `DeidError::code`).
pub mod codes {
    pub use crate::isolation::codes::{MEMORY_LIMIT, PROCESSOR_CRASHED, TIMEOUT};
    /// The scan was in hand each time the daemon died, `pipeline.max_attempts` times.
    pub const POISON_SCAN: &str = "poison_scan";
    /// The claimed file vanished before it could be read.
    pub const SOURCE_MISSING: &str = "source_missing";
    /// The de-identified artefact could not be decoded for inference.
    pub const UNDECODABLE: &str = "undecodable";
    /// The model failed on this scan (and no rollback helped).
    pub const INFERENCE_FAILED: &str = "inference_failed";
}

/// The reason file beside a quarantined input. Holds no identity.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct QuarantineReason {
    pub scan_id: ScanId,
    pub code: String,
    pub detail: String,
    pub kind: EventKind,
    pub at: String,
}

#[derive(Debug, Clone)]
pub struct Quarantine {
    dir: PathBuf,
}

impl Quarantine {
    pub fn new(dir: &Path) -> Quarantine {
        Quarantine { dir: dir.to_path_buf() }
    }

    pub fn input_path(&self, id: ScanId) -> PathBuf {
        self.dir.join(id.to_string())
    }

    pub fn reason_path(&self, id: ScanId) -> PathBuf {
        self.dir.join(format!("{id}.reason.json"))
    }

    /// The reason written for `id`, if a crash left one behind before the store knew.
    pub fn reason(&self, id: ScanId) -> Option<QuarantineReason> {
        let bytes = std::fs::read(self.reason_path(id)).ok()?;
        serde_json::from_slice(&bytes).ok()
    }

    /// Move `spooled` (when it is still there) into quarantine and write the reason, both
    /// durably: the store records the quarantine only after this.
    pub fn admit(&self, spooled: &Path, reason: &QuarantineReason) -> std::io::Result<()> {
        if spooled.exists() {
            crate::fsutil::move_file(spooled, &self.input_path(reason.scan_id))?;
        }
        let json = serde_json::to_vec_pretty(reason).map_err(std::io::Error::other)?;
        crate::fsutil::write_atomic(&self.reason_path(reason.scan_id), &json)
    }
}
