//! `octd label` and `octd reviewer …`: the field engineer's and the tests' way to give a
//! verdict and to manage the reviewers this device knows (docs/mqtt.md, the labels topic).

use std::io::Read;
use std::time::Duration;

use serde_json::{json, Value};

use crate::config::Config;
use crate::feedback::reviewers::Reviewers;
use crate::feedback::{request_label, LabelRequest, VerdictMessage};
use crate::scan::{now_ms, rfc3339_ms, LABEL_SCHEMA};

pub type CommandResult = Result<Value, String>;

/// Give a verdict through the running daemon (it checks and answers it as an MQTT verdict).
pub fn label(
    config: &Config,
    scan_id: &str,
    label: &str,
    reviewer: &str,
    comment: Option<String>,
    wait: Duration,
) -> CommandResult {
    let request = LabelRequest {
        scan_id: scan_id.to_string(),
        verdict: VerdictMessage {
            schema: LABEL_SCHEMA.into(),
            label: label.into(),
            reviewer: reviewer.into(),
            reviewed_at: rfc3339_ms(now_ms()),
            comment,
        },
    };
    let answer = request_label(&config.device.state_dir, &request, wait)?;
    match answer.accepted {
        true => serde_json::to_value(&answer).map_err(|e| e.to_string()),
        false => Err(format!("octd refused the verdict ({}): {}", answer.code, answer.detail)),
    }
}

/// Add a reviewer (or set a known one's password, read from stdin with `password_stdin`).
pub fn reviewer_add(config: &Config, id: &str, password_stdin: bool) -> CommandResult {
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
    match Reviewers::remove(&config.device.state_dir, id).map_err(|e| e.to_string())? {
        true => Ok(json!({"removed": id, "detail": "their earlier verdicts stay"})),
        false => Err(format!("{id} is not a reviewer of this device")),
    }
}
