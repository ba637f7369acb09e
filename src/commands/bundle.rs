//! `octd bundle …`: run a model channel by hand (docs/model-channel.md). Packing computes the
//! self-test's expected outputs with this build's inference, so a device reproduces them
//! exactly or refuses the model.

use std::path::{Path, PathBuf};
use std::time::Duration;

use octd_bundle::archive::{self, Limits, SelfTest, SelfTestCase, SELFTEST_DIR, SELFTEST_FILE};
use octd_bundle::client::{self, Channel};
use octd_bundle::repo::{self, Publication, RootSpec};
use octd_bundle::{keys, BundleError};
use serde_json::{json, Value};

use crate::config::Config;
use crate::infer::{frames, Classifier, Manifest};
use crate::update::selftest;

pub type CommandResult = Result<Value, String>;

fn runtime() -> Result<tokio::runtime::Runtime, String> {
    tokio::runtime::Builder::new_current_thread().enable_all().build().map_err(|e| format!("runtime: {e}"))
}

fn text(e: BundleError) -> String {
    e.to_string()
}

pub fn keygen(out: &Path) -> CommandResult {
    let id = runtime()?.block_on(keys::generate(out)).map_err(text)?;
    Ok(json!({"key": out, "key_id": id}))
}

/// When metadata signed now for `d` expires.
pub fn expires_in(d: Duration) -> Result<repo::Timestamp, String> {
    repo::expires_in(d).map_err(text)
}

/// Write the first root of a channel, or the next one (key rotation).
pub fn init(repo_dir: &Path, spec: &RootSpec, previous_root_keys: &[PathBuf]) -> CommandResult {
    let version = runtime()?.block_on(repo::write_root(repo_dir, spec, previous_root_keys)).map_err(text)?;
    Ok(json!({"repository": repo_dir, "root_version": version,
              "trusted_root": repo_dir.join("metadata").join(format!("{version}.root.json"))}))
}

/// Build a bundle from a model folder and self-test inputs (or generated ones).
pub fn pack(config: &Config, model: &Path, samples: Option<&Path>, tolerance: f32, out: &Path) -> CommandResult {
    let manifest = Manifest::load(model).map_err(|e| e.to_string())?;
    let scratch = tempfile::tempdir().map_err(|e| format!("temporary folder: {e}"))?;
    let dir = scratch.path();
    std::fs::create_dir(dir.join(SELFTEST_DIR)).map_err(|e| e.to_string())?;
    for name in ["manifest.json", manifest.model_file.as_str()] {
        std::fs::copy(model.join(name), dir.join(name)).map_err(|e| format!("{}: {e}", model.join(name).display()))?;
    }
    let inputs = match samples {
        Some(folder) => sample_inputs(folder, dir)?,
        None => synthetic_inputs(dir)?,
    };
    let classifier = Classifier::load(dir, &config.model, &config.triage).map_err(|e| e.to_string())?;
    let mut cases = Vec::new();
    for input in inputs {
        let frames = frames::load(&dir.join(&input)).map_err(|e| format!("{input}: {e}"))?;
        let got = classifier.classify_frames(&frames).map_err(|e| format!("{input}: {e}"))?;
        cases.push(SelfTestCase {
            input,
            label: got.label,
            probabilities: got.probabilities,
            unlike_training_score: got.unlike_training_score,
        });
    }
    let test = SelfTest { format_version: archive::SELFTEST_FORMAT, tolerance, cases };
    let bytes = serde_json::to_vec_pretty(&test).map_err(|e| e.to_string())?;
    std::fs::write(dir.join(SELFTEST_FILE), bytes).map_err(|e| e.to_string())?;
    let head = archive::pack_dir(dir, out).map_err(text)?;
    Ok(json!({"bundle": out, "target": head.target_name(), "name": head.name, "version": head.version,
              "sha256": archive::sha256_file(out).map_err(text)?, "selftest_cases": test.cases.len()}))
}

/// Up to 16 images from `folder`, re-encoded as metadata-free PNGs.
fn sample_inputs(folder: &Path, dir: &Path) -> Result<Vec<String>, String> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(folder)
        .map_err(|e| format!("{}: {e}", folder.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_file())
        .collect();
    files.sort();
    let mut out = Vec::new();
    for path in files.into_iter().take(16) {
        let image = image::open(&path).map_err(|e| format!("{}: {e}", path.display()))?;
        let grey = match image {
            image::DynamicImage::ImageLuma16(g) => image::DynamicImage::ImageLuma16(g),
            other => image::DynamicImage::ImageLuma8(other.to_luma8()),
        };
        let name = format!("{SELFTEST_DIR}/{}.png", out.len());
        grey.save(dir.join(&name)).map_err(|e| format!("{name}: {e}"))?;
        out.push(name);
    }
    if out.is_empty() {
        return Err(format!("{} holds no images", folder.display()));
    }
    Ok(out)
}

/// Four synthetic B-scan-like images (layered bands and speckle), deterministic, so a bundle
/// can be packed without any patient image.
fn synthetic_inputs(dir: &Path) -> Result<Vec<String>, String> {
    let (w, h) = (512u32, 496u32);
    let mut out = Vec::new();
    let mut seed: u32 = 0x9e37_79b9;
    let mut noise = move || {
        seed ^= seed << 13;
        seed ^= seed >> 17;
        seed ^= seed << 5;
        (seed % 1000) as f32 / 1000.0
    };
    for k in 0..4u32 {
        let image = image::GrayImage::from_fn(w, h, |x, y| {
            let surface = 180.0 + 25.0 * ((x as f32) / 70.0 + k as f32).sin() + 12.0 * k as f32;
            let depth = y as f32 - surface;
            let band = if (0.0..12.0).contains(&depth) {
                0.85
            } else if (12.0..90.0).contains(&depth) {
                0.35 + 0.15 * ((depth / 9.0).sin())
            } else if (90.0..110.0).contains(&depth) {
                0.75
            } else {
                0.06
            };
            let v = band * (0.6 + 0.8 * noise());
            image::Luma([(v.clamp(0.0, 1.0) * 255.0) as u8])
        });
        let name = format!("{SELFTEST_DIR}/synthetic-{k}.png");
        image.save(dir.join(&name)).map_err(|e| format!("{name}: {e}"))?;
        out.push(name);
    }
    Ok(out)
}

pub fn publish(repo_dir: &Path, publication: &Publication) -> CommandResult {
    let report = runtime()?.block_on(repo::publish(repo_dir, publication)).map_err(text)?;
    serde_json::to_value(report).map_err(|e| e.to_string())
}

/// Verify a channel as a device would: metadata against `root`, the newest bundle's hash,
/// its contents, compatibility and self-test on this machine.
pub fn verify(config: &Config, repository: &str, root: &Path) -> CommandResult {
    let channel = Channel::parse(repository)?;
    let trusted = std::fs::read(root).map_err(|e| format!("{}: {e}", root.display()))?;
    let scratch = tempfile::tempdir().map_err(|e| format!("temporary folder: {e}"))?;
    let rt = runtime()?;
    let refused = |r: client::Refusal| format!("refused ({}): {r}", r.code());
    let verified = rt.block_on(client::load(&trusted, &channel, &scratch.path().join("tuf"))).map_err(refused)?;
    let models = verified.models();
    let listed: Vec<Value> =
        models.iter().map(|m| json!({"target": m.target, "version": m.version.to_string()})).collect();
    let Some(newest) = models.last() else {
        return Ok(json!({"repository": repository, "root_version": verified.root_version(), "models": listed}));
    };
    let archive_path = scratch.path().join("bundle.tar.gz");
    rt.block_on(verified.fetch(newest, &archive_path)).map_err(refused)?;
    let dir = scratch.path().join("bundle");
    let (head, test) = archive::unpack(&archive_path, &dir, Limits::default()).map_err(text)?;
    if head.version != newest.version.to_string() || !head.sha256.eq_ignore_ascii_case(&newest.model_sha256) {
        return Err("refused (metadata_mismatch): the bundle does not hold the model its metadata names".into());
    }
    let classifier = Classifier::load(&dir, &config.model, &config.triage).map_err(|e| format!("refused: {e}"))?;
    selftest::run(&classifier, &dir, &test).map_err(|e| format!("refused (selftest_failed): {e}"))?;
    Ok(json!({
        "repository": repository,
        "root_version": verified.root_version(),
        "expires": verified.expires().to_string(),
        "models": listed,
        "verified": {"target": newest.target, "version": head.version, "model_sha256": head.sha256,
                     "selftest_cases": test.cases.len(), "backend": classifier.stamp().backend},
    }))
}
