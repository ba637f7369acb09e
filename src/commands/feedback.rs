//! `octd label` and `octd reviewer …`: the field engineer's and the tests' way to give a
//! verdict and to manage the reviewers this device knows (docs/mqtt.md, the labels topic).

use std::io::Read;
use std::time::Duration;

use serde_json::{json, Value};

use crate::config::Config;
use crate::feedback::reviewers::Reviewers;
use crate::feedback::{request_label, VerdictMessage};
use crate::scan::{now_ms, rfc3339_ms, LABEL_SCHEMA};
use crate::secret::DeviceSecret;
use crate::store::{Store, STORE_FILE};

pub type CommandResult = Result<Value, String>;

/// Give a verdict through the running daemon (it checks and answers it as an MQTT verdict).
/// No comment: free text on a command line ends in shell histories and process lists.
/// `label` None: undo the reviewer's latest verdict on the scan.
pub fn label(config: &Config, scan_id: &str, label: Option<&str>, reviewer: &str, wait: Duration) -> CommandResult {
    let state = &config.device.state_dir;
    same_owner_as(state)?;
    // The daemon holds the store locked while it runs: opening it tells whether it does.
    let secret = DeviceSecret::load(state).map_err(|e| format!("device secret: {e}"))?;
    if Store::open(&state.join(STORE_FILE), &secret).is_ok() {
        return Err(
            "octd is not running: start it first (a verdict is checked against its result); nothing was stored".into(),
        );
    }
    let verdict = VerdictMessage {
        schema: LABEL_SCHEMA.into(),
        label: label.unwrap_or_default().into(),
        undo: label.is_none(),
        reviewer: reviewer.into(),
        reviewed_at: rfc3339_ms(now_ms()),
        comment: None,
        verdict_id: None,
    };
    let answer = request_label(state, scan_id, verdict, wait)?;
    match answer.accepted {
        true => serde_json::to_value(&answer).map_err(|e| e.to_string()),
        false => Err(format!("octd refused the verdict ({}): {}", answer.code, answer.detail)),
    }
}

/// Files this command writes must stay the daemon's to read and remove: refuse to run as
/// another user than the state folder's owner (e.g. `sudo octd label` on a device where octd
/// runs as `octd`: use `sudo -u octd`).
fn same_owner_as(state: &std::path::Path) -> Result<(), String> {
    use std::os::unix::fs::MetadataExt;
    let Ok(meta) = std::fs::metadata(state) else { return Ok(()) };
    let me = rustix::process::geteuid().as_raw();
    match meta.uid() == me {
        true => Ok(()),
        false => Err(format!(
            "{} belongs to user id {}, and this runs as {me}: run it as the daemon's user (sudo -u octd ...)",
            state.display(),
            meta.uid()
        )),
    }
}

/// Add a reviewer (or set a known one's password, read from stdin with `password_stdin`).
pub fn reviewer_add(config: &Config, id: &str, password_stdin: bool) -> CommandResult {
    same_owner_as(&config.device.state_dir)?;
    let password = match password_stdin {
        true => {
            let mut text = String::new();
            std::io::stdin().read_to_string(&mut text).map_err(|e| format!("reading the password: {e}"))?;
            Some(text.trim_end_matches(['\r', '\n']).to_string())
        }
        false => None,
    };
    let r = Reviewers::add(&config.device.state_dir, id, password.as_deref()).map_err(|e| e.to_string())?;
    Ok(json!({"reviewer": r.id, "added_at": r.added_at, "can_log_in": r.password_hash.is_some()}))
}

pub fn reviewer_list(config: &Config) -> CommandResult {
    let all = Reviewers::load(&config.device.state_dir).map_err(|e| e.to_string())?;
    Ok(json!({"reviewers": all.reviewers.iter().map(|r| json!({
        "reviewer": r.id, "added_at": r.added_at, "can_log_in": r.password_hash.is_some()
    })).collect::<Vec<_>>()}))
}

pub fn reviewer_remove(config: &Config, id: &str) -> CommandResult {
    same_owner_as(&config.device.state_dir)?;
    match Reviewers::remove(&config.device.state_dir, id).map_err(|e| e.to_string())? {
        true => Ok(json!({"removed": id, "detail": "their earlier verdicts stay"})),
        false => Err(format!("{id} is not a reviewer of this device")),
    }
}
