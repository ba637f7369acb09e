//! `octd status`: the running daemon's own account (from its local endpoint), or — while it
//! is stopped — what its store holds.

use std::time::Duration;

use serde_json::{json, Value};

use crate::config::Config;
use crate::secret::DeviceSecret;
use crate::store::{Store, STORE_FILE};
use crate::telemetry::broker_target;

/// GET `path` from the daemon's telemetry endpoint. Err(None) when nothing listens there.
pub fn endpoint_get(config: &Config, path: &str) -> Result<(u16, String), Option<String>> {
    let Some(addr) = config.telemetry_address() else { return Err(None) };
    let url = format!("http://{addr}{path}");
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| Some(format!("runtime: {e}")))?;
    runtime.block_on(async {
        let client = reqwest::Client::builder()
            .timeout(Duration::from_secs(5))
            .no_proxy()
            .build()
            .map_err(|e| Some(e.to_string()))?;
        let response =
            client.get(&url).send().await.map_err(|e| if e.is_connect() { None } else { Some(e.to_string()) })?;
        let code = response.status().as_u16();
        let body = response.text().await.map_err(|e| Some(e.to_string()))?;
        Ok((code, body))
    })
}

/// The status report as JSON.
pub fn status(config: &Config) -> Result<Value, String> {
    match endpoint_get(config, "/status") {
        Ok((200, body)) => {
            let mut report: Value = serde_json::from_str(&body).map_err(|e| format!("daemon status: {e}"))?;
            report["running"] = json!(true);
            Ok(report)
        }
        Ok((code, body)) => Err(format!("the daemon's endpoint answered {code}: {}", body.trim())),
        Err(Some(e)) => Err(format!("the daemon's endpoint: {e}")),
        Err(None) => stopped_status(config),
    }
}

/// The daemon is not answering: report from the store (which it holds locked while running).
fn stopped_status(config: &Config) -> Result<Value, String> {
    let state_dir = &config.device.state_dir;
    let store_path = state_dir.join(STORE_FILE);
    if !store_path.exists() {
        return Err(format!(
            "octd is not running (nothing answers on telemetry.listen) and has no store at {}",
            store_path.display()
        ));
    }
    let secret = DeviceSecret::load(state_dir).map_err(|e| format!("device secret: {e}"))?;
    let store = Store::open(&store_path, &secret).map_err(|e| {
        format!("the store is in use ({e}) but the daemon's endpoint does not answer: is telemetry.listen off?")
    })?;
    let counts = store.counts().map_err(|e| e.to_string())?;
    let model: Option<crate::update::ModelState> = store.model_state().map_err(|e| e.to_string())?;
    let now = crate::scan::now_ms();
    Ok(json!({
        "running": false,
        "state": "stopped",
        "model": match &config.model.dir {
            Some(dir) => Some(json!({"pinned_dir": dir})),
            None => model.as_ref().and_then(|m| m.active.clone()).map(|v| json!({"version": v})),
        },
        "model_pending": model.as_ref().is_some_and(|m| m.pending.is_some()),
        "model_alarm": model.as_ref().and_then(|m| m.alarm.clone()),
        "backend": config.model.backend,
        "outbox": {
            "messages": counts.outbox,
            "oldest_age_s": counts.outbox_oldest_ms.map(|ms| now.saturating_sub(ms) as f64 / 1000.0),
        },
        "scans": counts.by_state,
        "broker": {"connected": false, "target": broker_target(config)},
    }))
}

/// A few lines for a person.
pub fn human(report: &Value) -> String {
    let s = |v: &Value| v.as_str().map(str::to_owned).unwrap_or_else(|| v.to_string());
    let mut out = Vec::new();
    out.push(format!(
        "octd {}: {}{}",
        report["version"].as_str().unwrap_or(""),
        s(&report["state"]),
        report["problem"].as_str().map(|p| format!(" — {p}")).unwrap_or_default()
    ));
    let model = &report["model"];
    out.push(format!(
        "model:    {} {}{} on {}",
        model["name"].as_str().unwrap_or(""),
        model["version"].as_str().unwrap_or("none"),
        if report["model_pending"].as_bool() == Some(true) { " (pending health gate)" } else { "" },
        s(&report["backend"])
    ));
    if let Some(alarm) = report["model_alarm"].as_str() {
        out.push(format!("model alarm: {alarm}"));
    }
    if report["queue"].is_object() {
        out.push(format!(
            "queue:    {}/{} waiting, {}/{} workers busy",
            report["queue"]["depth"],
            report["queue"]["capacity"],
            report["queue"]["workers_busy"],
            report["queue"]["workers"]
        ));
    }
    out.push(format!(
        "outbox:   {} message(s){}",
        report["outbox"]["messages"],
        report["outbox"]["oldest_age_s"].as_f64().map(|a| format!(", oldest {a:.0} s")).unwrap_or_default()
    ));
    out.push(format!("scans:    {}", report["scans"]));
    if let Some(last) = report["last_result_at"].as_str() {
        out.push(format!("last result: {last}"));
    }
    out.push(format!(
        "broker:   {} ({})",
        if report["broker"]["connected"].as_bool() == Some(true) { "connected" } else { "not connected" },
        s(&report["broker"]["target"])
    ));
    if let (Some(free), Some(total)) = (report["disk"]["free_bytes"].as_u64(), report["disk"]["total_bytes"].as_u64()) {
        out.push(format!("disk:     {} MiB free of {} MiB", free >> 20, total >> 20));
    }
    out.join("\n")
}
