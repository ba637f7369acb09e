//! Quarantine: where inputs that cannot or may not be processed wait for a person, each
//! with a reason file. An original still carries the patient's identity (metadata, burned-in
//! text), so it is kept only sealed: ChaCha20-Poly1305 in the STREAM construction under a key
//! derived from the device key, chunk by chunk so that a large volume is never whole in
//! memory. The reason holds octd's own words (a code and a detail), never text copied from
//! the input, and stays readable for `octd quarantine list`.
//!
//! A field engineer releases an original (`octd quarantine release`, e.g. after configuring
//! the mask it lacked) through a request file the daemon picks up, because the daemon holds
//! the store; while it is stopped the command releases directly.

use std::fs;
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};

use chacha20poly1305::aead::stream::{DecryptorBE32, EncryptorBE32};
use chacha20poly1305::aead::{KeyInit, Payload};
use chacha20poly1305::{ChaCha20Poly1305, Key};
use rand::RngCore;
use serde::{Deserialize, Serialize};

use crate::scan::{EventKind, ScanId, ScanState};
use crate::secret::DeviceSecret;
use crate::store::{Store, StoreError};

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

const MAGIC: &[u8; 8] = b"OCTDQ1\n\0";
/// Plaintext bytes per sealed chunk; each chunk carries a 16-byte tag.
const CHUNK: usize = 64 * 1024;
const TAG: usize = 16;
/// The STREAM nonce prefix for a 12-byte nonce with a 32-bit counter and last-block flag.
const NONCE_PREFIX: usize = 7;
const SEALED_EXT: &str = "sealed";
const REASON_EXT: &str = "reason.json";
/// Release requests and their answers (see [`Quarantine::request_release`]).
const REQUESTS: &str = "requests";

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum QuarantineError {
    #[error("scan {0} has no sealed original in quarantine")]
    NotFound(ScanId),
    #[error("the sealed original of scan {0} fails authentication (damaged, or sealed under another device key)")]
    Unsealable(ScanId),
    #[error("quarantine folder: {0}")]
    Io(#[from] io::Error),
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

/// One quarantined scan as `octd quarantine list` shows it.
#[derive(Debug, Clone, Serialize)]
pub struct QuarantineEntry {
    pub scan_id: ScanId,
    pub reason: Option<QuarantineReason>,
    /// Size of the sealed original; None when only the reason is left (the original was
    /// missing, or the disk was too full to seal it).
    pub sealed_bytes: Option<u64>,
    /// Seconds since the original was sealed (what retention counts).
    pub age_s: Option<u64>,
}

/// The daemon's answer to a release request.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ReleaseAnswer {
    pub scan_id: ScanId,
    pub released: bool,
    pub detail: String,
}

#[derive(Clone)]
pub struct Quarantine {
    dir: PathBuf,
    key: [u8; 32],
}

impl std::fmt::Debug for Quarantine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Quarantine").field("dir", &self.dir).finish_non_exhaustive()
    }
}

fn aad(id: ScanId) -> Vec<u8> {
    format!("octd quarantine v1 {id}").into_bytes()
}

/// Read until `buf` is full or the input ends; the count read.
fn fill(input: &mut impl Read, buf: &mut [u8]) -> io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match input.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

impl Quarantine {
    pub fn new(dir: &Path, secret: &DeviceSecret) -> Quarantine {
        Quarantine { dir: dir.to_path_buf(), key: secret.mac("octd quarantine seal v1", b"") }
    }

    fn cipher(&self) -> ChaCha20Poly1305 {
        ChaCha20Poly1305::new(Key::from_slice(&self.key))
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn sealed_path(&self, id: ScanId) -> PathBuf {
        self.dir.join(format!("{id}.{SEALED_EXT}"))
    }

    pub fn reason_path(&self, id: ScanId) -> PathBuf {
        self.dir.join(format!("{id}.{REASON_EXT}"))
    }

    /// The reason written for `id`, if a crash left one behind before the store knew.
    pub fn reason(&self, id: ScanId) -> Option<QuarantineReason> {
        let bytes = fs::read(self.reason_path(id)).ok()?;
        serde_json::from_slice(&bytes).ok()
    }

    pub fn has_original(&self, id: ScanId) -> bool {
        self.sealed_path(id).exists()
    }

    /// Seal `spooled` (when it is still there) into quarantine, write the reason, then remove
    /// the plaintext, all durably: the store records the quarantine only after this.
    pub fn admit(&self, spooled: &Path, reason: &QuarantineReason) -> io::Result<()> {
        // Serialised first: nothing returns early between the seal and the plaintext's removal.
        let json = serde_json::to_vec_pretty(reason).map_err(io::Error::other)?;
        let sealing = spooled.exists();
        if sealing {
            self.seal(spooled, reason.scan_id)?;
        }
        // The reason is down before the spooled original goes: a death in between otherwise
        // left a scan without its original and without a reason, finished at the next start
        // as "source_missing" instead of what was wrong with it (seen once in
        // tests/pipeline.rs's kill -9 test). A death before the removal leaves the original,
        // and start-up discards the sealed copy and its reason and processes it again.
        let reasoned = crate::fsutil::write_atomic(&self.reason_path(reason.scan_id), &json);
        // Sealed, the plaintext original goes even when its reason could not be written.
        if sealing {
            fs::remove_file(spooled)?;
            if let Some(dir) = spooled.parent() {
                crate::fsutil::sync_dir(dir)?;
            }
        }
        reasoned
    }

    /// Seal the file at `plain` as the original of `id` (temporary file, fsync, rename).
    pub fn seal(&self, plain: &Path, id: ScanId) -> io::Result<()> {
        let target = self.sealed_path(id);
        let tmp = self.dir.join(format!(".{id}.{SEALED_EXT}.tmp"));
        let result = (|| {
            let mut input = fs::File::open(plain)?;
            let mut out = io::BufWriter::new(fs::File::create(&tmp)?);
            let mut prefix = [0u8; NONCE_PREFIX];
            rand::rng().fill_bytes(&mut prefix);
            out.write_all(MAGIC)?;
            out.write_all(&prefix)?;
            let aad = aad(id);
            let mut stream = EncryptorBE32::from_aead(self.cipher(), prefix.as_slice().into());
            let mut buf = vec![0u8; CHUNK];
            let sealing = |_| io::Error::other("sealing failed");
            loop {
                let n = fill(&mut input, &mut buf)?;
                // A full chunk is never the last: the last is always shorter (possibly empty),
                // so a reader knows the end by its size and a truncation fails authentication.
                if n < CHUNK {
                    let sealed = stream.encrypt_last(Payload { msg: &buf[..n], aad: &aad }).map_err(sealing)?;
                    out.write_all(&sealed)?;
                    break;
                }
                let sealed = stream.encrypt_next(Payload { msg: &buf[..], aad: &aad }).map_err(sealing)?;
                out.write_all(&sealed)?;
            }
            let file = out.into_inner().map_err(|e| e.into_error())?;
            file.sync_all()?;
            fs::rename(&tmp, &target)?;
            crate::fsutil::sync_dir(&self.dir)
        })();
        if result.is_err() {
            let _ = fs::remove_file(&tmp);
        }
        result
    }

    /// Write the original of `id` to `dest` (temporary file beside it, fsync, rename); the
    /// plaintext exists only once authenticated in full.
    pub fn unseal_to(&self, id: ScanId, dest: &Path) -> Result<u64, QuarantineError> {
        let mut input = match fs::File::open(self.sealed_path(id)) {
            Ok(f) => io::BufReader::new(f),
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Err(QuarantineError::NotFound(id)),
            Err(e) => return Err(e.into()),
        };
        let mut header = [0u8; MAGIC.len() + NONCE_PREFIX];
        if fill(&mut input, &mut header)? != header.len() || &header[..MAGIC.len()] != MAGIC {
            return Err(QuarantineError::Unsealable(id));
        }
        let dir = dest.parent().unwrap_or(Path::new("."));
        let name = dest.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        let tmp = dir.join(format!(".{name}.unsealing"));
        let result = (|| -> Result<u64, QuarantineError> {
            let aad = aad(id);
            let mut stream = Some(DecryptorBE32::from_aead(self.cipher(), header[MAGIC.len()..].into()));
            let mut out = io::BufWriter::new(fs::File::create(&tmp)?);
            let mut buf = vec![0u8; CHUNK + TAG];
            let mut total = 0u64;
            loop {
                let n = fill(&mut input, &mut buf)?;
                let last = n < buf.len();
                let payload = Payload { msg: &buf[..n], aad: &aad };
                let plain = match (last, stream.as_mut()) {
                    (_, None) => return Err(QuarantineError::Unsealable(id)),
                    (false, Some(s)) => s.decrypt_next(payload),
                    (true, Some(_)) => {
                        stream.take().map_or(Err(chacha20poly1305::aead::Error), |s| s.decrypt_last(payload))
                    }
                }
                .map_err(|_| QuarantineError::Unsealable(id))?;
                out.write_all(&plain)?;
                total += plain.len() as u64;
                if last {
                    break;
                }
            }
            let file = out.into_inner().map_err(|e| e.into_error())?;
            file.sync_all()?;
            fs::rename(&tmp, dest)?;
            crate::fsutil::sync_dir(dir)?;
            Ok(total)
        })();
        if result.is_err() {
            let _ = fs::remove_file(&tmp);
        }
        result
    }

    /// Remove the sealed original and the reason of `id`. True when there was anything.
    pub fn discard(&self, id: ScanId) -> io::Result<bool> {
        let mut found = false;
        for path in [self.sealed_path(id), self.reason_path(id)] {
            match fs::remove_file(&path) {
                Ok(()) => found = true,
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(e),
            }
        }
        if found {
            crate::fsutil::sync_dir(&self.dir)?;
        }
        Ok(found)
    }

    /// Every scan with a sealed original or a reason here, oldest first.
    pub fn entries(&self) -> io::Result<Vec<QuarantineEntry>> {
        let mut ids = std::collections::BTreeSet::new();
        for entry in fs::read_dir(&self.dir)? {
            let name = entry?.file_name();
            let name = name.to_string_lossy();
            let stem =
                name.strip_suffix(&format!(".{SEALED_EXT}")).or_else(|| name.strip_suffix(&format!(".{REASON_EXT}")));
            if let Some(id) = stem.and_then(ScanId::parse) {
                ids.insert(id);
            }
        }
        let now = std::time::SystemTime::now();
        Ok(ids
            .into_iter()
            .map(|id| {
                let meta = fs::metadata(self.sealed_path(id)).ok();
                let age_s = meta
                    .clone()
                    .or_else(|| fs::metadata(self.reason_path(id)).ok())
                    .and_then(|m| m.modified().ok())
                    .and_then(|t| now.duration_since(t).ok())
                    .map(|d| d.as_secs());
                QuarantineEntry { scan_id: id, reason: self.reason(id), sealed_bytes: meta.map(|m| m.len()), age_s }
            })
            .collect())
    }

    /// Purge what has waited longer than `retention`; the scans purged.
    pub fn prune(&self, retention: std::time::Duration) -> io::Result<Vec<ScanId>> {
        let mut purged = Vec::new();
        for entry in self.entries()? {
            if entry.age_s.is_some_and(|age| age >= retention.as_secs()) && self.discard(entry.scan_id)? {
                purged.push(entry.scan_id);
            }
        }
        Ok(purged)
    }

    /// Originals a version before sealing left here in plaintext (`quarantine/<scan id>`):
    /// seal them now.
    pub fn seal_plaintext_leftovers(&self) -> io::Result<usize> {
        let mut sealed = 0;
        for entry in fs::read_dir(&self.dir)? {
            let entry = entry?;
            let Some(id) = entry.file_name().to_str().and_then(ScanId::parse) else { continue };
            if entry.file_type()?.is_file() {
                self.seal(&entry.path(), id)?;
                fs::remove_file(entry.path())?;
                sealed += 1;
            }
        }
        if sealed > 0 {
            crate::fsutil::sync_dir(&self.dir)?;
        }
        Ok(sealed)
    }

    fn requests(&self) -> PathBuf {
        self.dir.join(REQUESTS)
    }

    fn request_path(&self, id: ScanId) -> PathBuf {
        self.requests().join(format!("{id}.release"))
    }

    fn answer_path(&self, id: ScanId) -> PathBuf {
        self.requests().join(format!("{id}.answer.json"))
    }

    /// Ask the running daemon to release `id` (it holds the store). The folder is the
    /// daemon's own state folder, so whoever may write there may ask.
    pub fn request_release(&self, id: ScanId) -> io::Result<()> {
        fs::create_dir_all(self.requests())?;
        let _ = fs::remove_file(self.answer_path(id));
        crate::fsutil::write_atomic(&self.request_path(id), b"")
    }

    /// The scans whose release was requested, oldest request first, at most `limit`.
    pub fn release_requests(&self, limit: usize) -> Vec<ScanId> {
        let Ok(dir) = fs::read_dir(self.requests()) else { return Vec::new() };
        let mut found: Vec<(std::time::SystemTime, ScanId)> = dir
            .filter_map(|e| e.ok())
            .filter_map(|e| {
                let name = e.file_name();
                let id = name.to_str()?.strip_suffix(".release").and_then(ScanId::parse)?;
                Some((e.metadata().ok()?.modified().ok()?, id))
            })
            .collect();
        found.sort();
        found.into_iter().take(limit).map(|(_, id)| id).collect()
    }

    /// Answer a release request (and withdraw it).
    pub fn answer_release(&self, answer: &ReleaseAnswer) -> io::Result<()> {
        let json = serde_json::to_vec(answer).map_err(io::Error::other)?;
        crate::fsutil::write_atomic(&self.answer_path(answer.scan_id), &json)?;
        match fs::remove_file(self.request_path(answer.scan_id)) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        }
    }

    /// The daemon's answer to the release of `id`, once there is one (taken: read once).
    pub fn take_release_answer(&self, id: ScanId) -> Option<ReleaseAnswer> {
        let bytes = fs::read(self.answer_path(id)).ok()?;
        let answer = serde_json::from_slice(&bytes).ok()?;
        let _ = fs::remove_file(self.answer_path(id));
        Some(answer)
    }

    /// Whether a release request of `id` still waits for the daemon.
    pub fn release_pending(&self, id: ScanId) -> bool {
        self.request_path(id).exists()
    }
}

/// Put the quarantined original of `id` back through the pipeline: unsealed into the spool,
/// its record back to `received` with no attempts counted, then the sealed copy removed. The
/// caller queues the scan (the daemon) or leaves it for the next start (the command, while
/// the daemon is stopped). A crash before the sealed copy goes is finished by
/// `recovery::sweep`.
pub fn release(store: &Store, quarantine: &Quarantine, spool: &Path, id: ScanId) -> Result<ReleaseAnswer, StoreError> {
    let refuse = |detail: String| Ok(ReleaseAnswer { scan_id: id, released: false, detail });
    let Some(mut record) = store.get(id)? else { return refuse(format!("scan {id} is not in the store")) };
    if record.state != ScanState::Quarantined {
        return refuse(format!("scan {id} is {}, not quarantined", record.state.as_str()));
    }
    if !quarantine.has_original(id) {
        return refuse(format!("scan {id} has no sealed original left (purged, or it was never readable)"));
    }
    if let Err(e) = quarantine.unseal_to(id, &spool.join(id.to_string())) {
        return refuse(e.to_string());
    }
    record.state = ScanState::Received;
    record.attempts = 0;
    record.reason = None;
    record.artifact = None;
    store.transition(&record, None)?;
    if let Err(e) = quarantine.discard(id) {
        tracing::warn!(scan_id = %id, error = %e, "released, but the sealed copy stays until the next sweep");
    }
    tracing::info!(scan_id = %id, "released from quarantine");
    Ok(ReleaseAnswer { scan_id: id, released: true, detail: "back in the pipeline".into() })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reason(id: ScanId) -> QuarantineReason {
        QuarantineReason {
            scan_id: id,
            code: "x".into(),
            detail: "y".into(),
            kind: EventKind::Rejected,
            at: "t".into(),
        }
    }

    #[test]
    fn sealed_originals_round_trip_at_every_chunk_boundary_and_hold_no_plaintext() {
        let dir = tempfile::tempdir().unwrap();
        let q = Quarantine::new(dir.path(), &DeviceSecret::ephemeral());
        for len in [0, 1, CHUNK - 1, CHUNK, CHUNK + 1, 3 * CHUNK, 3 * CHUNK + 17] {
            let id = ScanId::new();
            let plain: Vec<u8> = b"DOE^JOHN MRN8675309 ".iter().copied().cycle().take(len).collect();
            let spooled = dir.path().join("spooled");
            fs::write(&spooled, &plain).unwrap();
            q.admit(&spooled, &reason(id)).unwrap();
            assert!(!spooled.exists(), "the plaintext goes once sealed");
            let sealed = fs::read(q.sealed_path(id)).unwrap();
            if len > 0 {
                assert!(!sealed.windows(8).any(|w| w == b"DOE^JOHN"), "len {len}: plaintext in the sealed file");
            }
            let out = dir.path().join("out");
            assert_eq!(q.unseal_to(id, &out).unwrap(), len as u64);
            assert_eq!(fs::read(&out).unwrap(), plain, "len {len}");
        }
    }

    #[test]
    fn damaged_truncated_or_foreign_sealed_files_are_refused_and_leave_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let q = Quarantine::new(dir.path(), &DeviceSecret::ephemeral());
        let id = ScanId::new();
        let spooled = dir.path().join("spooled");
        fs::write(&spooled, vec![7u8; 2 * CHUNK + 5]).unwrap();
        q.admit(&spooled, &reason(id)).unwrap();
        let good = fs::read(q.sealed_path(id)).unwrap();
        let out = dir.path().join("out");

        // Dropping the last chunk leaves whole chunks only: a truncation, not an end.
        fs::write(q.sealed_path(id), &good[..MAGIC.len() + NONCE_PREFIX + 2 * (CHUNK + TAG)]).unwrap();
        assert!(matches!(q.unseal_to(id, &out), Err(QuarantineError::Unsealable(_))));
        let mut flipped = good.clone();
        flipped[MAGIC.len() + NONCE_PREFIX + 100] ^= 1;
        fs::write(q.sealed_path(id), &flipped).unwrap();
        assert!(matches!(q.unseal_to(id, &out), Err(QuarantineError::Unsealable(_))));
        fs::write(q.sealed_path(id), &good).unwrap();
        let other = Quarantine::new(dir.path(), &DeviceSecret::ephemeral());
        assert!(matches!(other.unseal_to(id, &out), Err(QuarantineError::Unsealable(_))));
        // Sealed for another scan: the scan id is authenticated too.
        let moved = ScanId::new();
        fs::rename(q.sealed_path(id), q.sealed_path(moved)).unwrap();
        assert!(matches!(q.unseal_to(moved, &out), Err(QuarantineError::Unsealable(_))));
        assert!(!out.exists());
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 2, "only the sealed file and the reason are left");
        assert!(matches!(q.unseal_to(ScanId::new(), &out), Err(QuarantineError::NotFound(_))));
    }

    #[test]
    fn retention_purges_only_what_has_waited_long_enough() {
        let dir = tempfile::tempdir().unwrap();
        let q = Quarantine::new(dir.path(), &DeviceSecret::ephemeral());
        let (old, new) = (ScanId::new(), ScanId::new());
        for id in [old, new] {
            let spooled = dir.path().join("spooled");
            fs::write(&spooled, b"x").unwrap();
            q.admit(&spooled, &reason(id)).unwrap();
        }
        let past = std::time::SystemTime::now() - std::time::Duration::from_secs(3 * 86_400);
        fs::File::options().write(true).open(q.sealed_path(old)).unwrap().set_modified(past).unwrap();
        assert_eq!(q.prune(std::time::Duration::from_secs(2 * 86_400)).unwrap(), vec![old]);
        let left: Vec<ScanId> = q.entries().unwrap().into_iter().map(|e| e.scan_id).collect();
        assert_eq!(left, vec![new]);
        assert!(!q.reason_path(old).exists());
    }
}
