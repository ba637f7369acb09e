//! `octd quarantine list | show | release | purge`: the field engineer's view of what waits
//! in quarantine. Listing and purging read and remove files only, so they work whether the
//! daemon runs or not; a release changes the scan's record, which the running daemon alone may
//! touch, so it is asked through a request file (see `pipeline::quarantine`), and performed
//! here only while the daemon is stopped.

use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::config::Config;
use crate::pipeline::quarantine::{self, Quarantine};
use crate::pipeline::Dirs;
use crate::scan::ScanId;
use crate::secret::DeviceSecret;
use crate::store::{Store, STORE_FILE};

fn open(config: &Config) -> Result<(Dirs, Quarantine), String> {
    let dirs = Dirs::new(&config.device.state_dir);
    let secret =
        DeviceSecret::load(&dirs.state).map_err(|e| format!("device secret in {}: {e}", dirs.state.display()))?;
    Ok((dirs.clone(), Quarantine::new(&dirs.quarantine, &secret)))
}

fn scan_id(text: &str) -> Result<ScanId, String> {
    ScanId::parse(text).ok_or_else(|| format!("{text:?} is not a scan id (see `octd quarantine list`)"))
}

/// Every quarantined scan, oldest first: id, reason, sealed size, age. No identity: the
/// originals stay sealed.
pub fn list(config: &Config) -> Result<Value, String> {
    let (_, q) = open(config)?;
    let entries = q.entries().map_err(|e| format!("quarantine folder {}: {e}", q.dir().display()))?;
    Ok(json!({ "quarantined": entries, "retention_s": config.store.quarantine_retention.as_secs() }))
}

pub fn show(config: &Config, id: &str) -> Result<Value, String> {
    let id = scan_id(id)?;
    let (_, q) = open(config)?;
    let entries = q.entries().map_err(|e| e.to_string())?;
    let entry =
        entries.into_iter().find(|e| e.scan_id == id).ok_or_else(|| format!("scan {id} is not in quarantine"))?;
    let expires_in_s = entry.age_s.map(|age| config.store.quarantine_retention.as_secs().saturating_sub(age));
    Ok(json!({ "entry": entry, "purged_in_s": expires_in_s, "release_pending": q.release_pending(id) }))
}

/// Remove the sealed originals (and reasons) of `ids`, for good.
pub fn purge(config: &Config, ids: &[String], all: bool) -> Result<Value, String> {
    let (_, q) = open(config)?;
    let targets: Vec<ScanId> = match all {
        true => q.entries().map_err(|e| e.to_string())?.into_iter().map(|e| e.scan_id).collect(),
        false => ids.iter().map(|s| scan_id(s)).collect::<Result<_, _>>()?,
    };
    if targets.is_empty() {
        return Err("name the scans to purge, or --all".into());
    }
    let mut purged = Vec::new();
    let mut missing = Vec::new();
    for id in targets {
        match q.discard(id).map_err(|e| format!("scan {id}: {e}"))? {
            true => purged.push(id),
            false => missing.push(id),
        }
    }
    if !missing.is_empty() && purged.is_empty() {
        return Err(format!(
            "not in quarantine: {}",
            missing.iter().map(|i| i.to_string()).collect::<Vec<_>>().join(", ")
        ));
    }
    Ok(json!({ "purged": purged, "not_in_quarantine": missing }))
}

/// Put a quarantined original back through the pipeline. While the daemon runs, it is asked
/// and its answer awaited for `wait`; while it is stopped, the release is recorded here and
/// the scan is processed at its next start.
pub fn release(config: &Config, id: &str, wait: Duration) -> Result<Value, String> {
    let id = scan_id(id)?;
    let (dirs, q) = open(config)?;
    if !q.has_original(id) {
        return Err(format!("scan {id} has no sealed original in quarantine (see `octd quarantine list`)"));
    }
    let secret = DeviceSecret::load(&dirs.state).map_err(|e| format!("device secret: {e}"))?;
    // The daemon holds the store locked while it runs: opening it tells which case this is.
    match Store::open(&dirs.state.join(STORE_FILE), &secret) {
        Ok(store) => {
            let answer = quarantine::release(&store, &q, &dirs.spool, id).map_err(|e| e.to_string())?;
            if !answer.released {
                return Err(answer.detail);
            }
            Ok(json!({ "scan_id": id, "released": true, "daemon": "stopped",
                       "detail": "released; octd processes it when it next starts" }))
        }
        Err(_) => {
            q.request_release(id).map_err(|e| format!("cannot write the release request: {e}"))?;
            let deadline = Instant::now() + wait;
            while Instant::now() < deadline {
                if let Some(answer) = q.take_release_answer(id) {
                    return match answer.released {
                        true => {
                            Ok(json!({ "scan_id": id, "released": true, "daemon": "running", "detail": answer.detail }))
                        }
                        false => Err(format!("octd refused the release: {}", answer.detail)),
                    };
                }
                std::thread::sleep(Duration::from_millis(200));
            }
            Err(format!(
                "octd has not answered within {}s; the request stays and is performed when it does (is the daemon running?)",
                wait.as_secs()
            ))
        }
    }
}
