//! One-shot commands: `octd classify`, `octd deidentify`, `octd config check`.
//! Each prints one JSON object per input and reports on every input, good or bad.

pub mod bundle;
pub mod feedback;
pub mod provision;
pub mod quarantine;
pub mod status;

use std::path::{Path, PathBuf};

use serde_json::{json, Value};

use crate::config::Config;
use crate::deid::{Deidentifier, InputLimits, Scope};
use crate::infer::Classifier;
use crate::scan::ScanId;
use crate::secret::DeviceSecret;

/// The model `octd classify` uses when neither `--model` nor `model.dir` names one.
pub const DEFAULT_MODEL_DIR: &str = "models/default";

/// Classify each input: de-identify into a private temporary folder, then run the model on
/// the de-identified pixels, exactly as the daemon does.
pub fn classify(config: &Config, inputs: &[PathBuf]) -> Result<Vec<Value>, String> {
    let dir = config.model.dir.clone().unwrap_or_else(|| PathBuf::from(DEFAULT_MODEL_DIR));
    let classifier = Classifier::load(&dir, &config.model, &config.triage).map_err(|e| e.to_string())?;
    let deid = Deidentifier::new(
        DeviceSecret::ephemeral(),
        config.deid.burned_in_masks.clone(),
        InputLimits::from(&config.ingest),
    );
    let scratch = tempfile::tempdir().map_err(|e| format!("temporary folder: {e}"))?;
    let mut out = Vec::with_capacity(inputs.len());
    for input in inputs {
        let scan_id = ScanId::new();
        let started = std::time::Instant::now();
        let report =
            deid.deidentify(input, scratch.path(), scan_id).map_err(|e| (e.code(), e.to_string())).and_then(|d| {
                let deid_ms = started.elapsed().as_millis() as u64;
                let c = classifier.classify_artifact(&d.artifact).map_err(|e| ("inference_failed", e.to_string()));
                let _ = std::fs::remove_file(&d.artifact);
                c.map(|c| (c, deid_ms, d.kind))
            });
        out.push(match report {
            Ok((c, deid_ms, kind)) => {
                let mut v = json!({"input": input, "scan_id": scan_id, "input_kind": kind});
                if let (Value::Object(map), Ok(Value::Object(extra))) = (&mut v, serde_json::to_value(&c)) {
                    map.extend(extra);
                    map.insert("model".into(), json!(classifier.stamp()));
                    map.insert(
                        "timings_ms".into(),
                        json!({"deid": deid_ms, "total": started.elapsed().as_millis() as u64}),
                    );
                }
                v
            }
            Err((code, error)) => json!({"input": input, "error": error, "code": code}),
        });
    }
    Ok(out)
}

/// De-identify each input into `out_dir`, named by scan_id. Uses the device's key so that
/// pseudonymous UIDs match those the daemon produces on this device.
pub fn deidentify(config: &Config, inputs: &[PathBuf], out_dir: &Path) -> Result<Vec<Value>, String> {
    let secret = DeviceSecret::load_or_create(&config.device.state_dir)
        .map_err(|e| format!("device secret in {}: {e}", config.device.state_dir.display()))?;
    std::fs::create_dir_all(out_dir).map_err(|e| format!("cannot create {}: {e}", out_dir.display()))?;
    // Research exports of whole studies: every object the toolkit parses, not only OCT images.
    let deid = Deidentifier::new(secret, config.deid.burned_in_masks.clone(), InputLimits::from(&config.ingest))
        .with_scope(Scope::AnyObject);
    Ok(inputs
        .iter()
        .map(|input| {
            let scan_id = ScanId::new();
            match deid.deidentify(input, out_dir, scan_id) {
                Ok(d) => json!({"input": input, "output": d.artifact, "scan_id": scan_id, "frames": d.frames}),
                Err(e) => json!({"input": input, "error": e.to_string(), "code": e.code()}),
            }
        })
        .collect())
}

/// The model state and history recorded in the store.
pub fn models(config: &Config) -> Result<Value, String> {
    let state_dir = &config.device.state_dir;
    let store_path = state_dir.join(crate::store::STORE_FILE);
    if !store_path.exists() {
        return Err(format!("no store at {}", store_path.display()));
    }
    let secret = DeviceSecret::load_or_create(state_dir).map_err(|e| format!("device secret: {e}"))?;
    let store = crate::store::Store::open(&store_path, &secret).map_err(|e| e.to_string())?;
    let state: Option<crate::update::ModelState> = store.model_state().map_err(|e| e.to_string())?;
    let events: Vec<crate::scan::EventMessage> = store.model_events().map_err(|e| e.to_string())?;
    Ok(json!({"state": state, "events": events}))
}
