//! Training jobs under the designed policy, against the real service: a real (tiny) run of
//! the training job on labels uploaded through the intake, the training split only; the
//! label-count and the accuracy triggers firing at the right label and not before; the
//! cooldown; a job left running by a killed service failed at the next start.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::{deidentified, shared_oct_images, signed, DeviceIdentity, Trainer};
use octd_uplink::{sha256_hex, ImageKind, LabelUpload, ModelStamp, Prediction, LABEL_SCHEMA};
use serde_json::Value;

fn upload(
    t: &Trainer,
    d: &DeviceIdentity,
    scan: &str,
    image: &[u8],
    verdict: &str,
    predicted: &str,
    patient: &str,
) -> Value {
    let sha = sha256_hex(image);
    let r = signed(t.port, d, "PUT", &format!("/api/v1/images/{sha}"), "image/png", image);
    assert!(r.status == 201 || r.status == 200, "{r:?}");
    let body = LabelUpload {
        schema: LABEL_SCHEMA.into(),
        label: verdict.into(),
        prediction: Prediction { label: predicted.into(), probabilities: Default::default() },
        model: ModelStamp { name: "octd-compact".into(), version: "0.2.0".into(), sha256: String::new() },
        reviewer: "rv-1".into(),
        reviewed_at: "2026-12-02T10:00:00Z".into(),
        laterality: String::new(),
        patient: patient.into(),
        image_sha256: sha,
        image_kind: ImageKind::Png,
        withdrawn: false,
    };
    let bytes = serde_json::to_vec(&body).unwrap();
    let r = signed(t.port, d, "PUT", &format!("/api/v1/labels/{scan}/1"), "application/json", &bytes);
    assert_eq!(r.status, 201, "{r:?}");
    r.body
}

fn jobs(t: &Trainer) -> Vec<Value> {
    t.cli_json(&["status"])["jobs"].as_array().cloned().unwrap_or_default()
}

fn wait_jobs(t: &Trainer, n: usize, done: impl Fn(&[Value]) -> bool) -> Vec<Value> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let j = jobs(t);
        if j.len() >= n && done(&j) {
            return j;
        }
        assert!(Instant::now() < deadline, "waited for {n} jobs: {j:?}\n{}", t.log());
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Wait until the policy loop has looked `n` more times (its debug line), so "no job yet"
/// is asserted after real checks, however slow the machine.
fn wait_checks(t: &Trainer, n: usize) {
    let count = |log: &str| log.matches("policy checked").count();
    let target = count(&t.log()) + n;
    let deadline = Instant::now() + Duration::from_secs(30);
    while count(&t.log()) < target {
        assert!(Instant::now() < deadline, "the policy loop did not check:\n{}", t.log());
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn venv_python() -> Option<std::path::PathBuf> {
    let python = common::repo().join(".venv/bin/python");
    if python.exists() {
        return Some(python);
    }
    assert!(std::env::var("OCTD_REQUIRE_VENV").is_err(), "no .venv/bin/python, and OCTD_REQUIRE_VENV requires it");
    eprintln!("SKIPPED: no .venv (pip install -r trainer/requirements.txt): the training job cannot run");
    None
}

/// A service with an enrolled device, started.
fn service(root: &Path, config: &str) -> (Trainer, DeviceIdentity) {
    service_with(root, "holdout_fraction = 0.2", config)
}

fn service_with(root: &Path, intake: &str, config: &str) -> (Trainer, DeviceIdentity) {
    let mut t = Trainer::sqlite(&root.join("svc"), intake);
    t.configure(config);
    let d = DeviceIdentity::new(&root.join("device"), "clinic-a", "octd-1");
    t.cli_json(&["device", "add", d.public_json.to_str().unwrap()]);
    t.start();
    (t, d)
}

#[test]
fn retrain_now_runs_the_training_job_on_the_training_split_only() {
    let Some(images) = shared_oct_images() else { return };
    let Some(python) = venv_python() else { return };
    let dir = tempfile::tempdir().unwrap();
    let trainer_dir = common::repo().join("trainer");
    // The real job, as small as it goes: one epoch, SinGAN on (few labels) with two
    // iterations per scale.
    let config = format!(
        "[policy]\nsingan_until_real_labels = 1000\n\n[gate]\nbaseline = \"{}\"\n\n[jobs]\npython = \"{}\"\nworkdir = \"{}\"\nroot = \"{}\"\n\
         architecture = \"compact\"\ncheck_interval = \"1h\"\n\
         command = [\"{{python}}\", \"-m\", \"octtrain\", \"--data\", \"{{manifest}}\", \"--out\", \"{{out}}\", \
         \"--arch\", \"{{arch}}\", \"--singan\", \"{{singan}}\", \"--singan-iterations\", \"2\", \"--singan-images\", \"1\", \
         \"--name\", \"{{name}}\", \"--version\", \"{{version}}\", \"--epochs\", \"1\", \"--batch\", \"8\", \"--bootstrap\", \"20\"]\n",
        common::repo().join("models/default").display(),
        python.display(),
        trainer_dir.display(),
        dir.path().join("jobs").display(),
    );
    let (mut t, d) = service(dir.path(), &config);
    let mut train_patients = std::collections::BTreeSet::new();
    let mut train_labels = 0;
    for (i, (path, label)) in images.iter().enumerate() {
        // Kermany names are CLASS-PATIENT-N: the patient groups the split.
        let stem = path.file_stem().unwrap().to_string_lossy().to_string();
        let patient = stem.split('-').nth(1).unwrap_or(&stem).to_string();
        let (png, _) = deidentified(std::fs::read(path).unwrap());
        let answer = upload(&t, &d, &format!("scan-{i}"), &png, label, "CNV", &patient);
        if answer["split"] == "train" {
            train_patients.insert(patient);
            train_labels += 1;
        }
    }
    assert!(
        train_labels > 0 && train_labels < images.len(),
        "both splits are used ({train_labels} of {})",
        images.len()
    );

    let job = t.cli_json(&["retrain", "--now"]);
    // Trained, then gated: this holdout (a fifth of 46 images) is too small to compare on,
    // so nothing is published, and the report says why.
    assert_eq!(job["state"], "rejected", "{job}");
    let outcome: Value = serde_json::from_str(job["outcome"].as_str().unwrap()).unwrap();
    let evaluation = &outcome["outcome"]["evaluation"];
    assert!(evaluation["reason"].as_str().unwrap().contains("gate.min_holdout"), "{evaluation}");
    assert_eq!(evaluation["holdout_images"].as_u64().unwrap() as usize, images.len() - train_labels);
    assert_eq!(evaluation["candidate"]["name"], "octd");
    assert_eq!(job["labels_at_start"], images.len() as i64);
    assert_eq!(job["singan"], 1, "SinGAN is on below the real-label threshold");
    let folder = dir.path().join("jobs").join(job["id"].as_str().unwrap());
    let csv = std::fs::read_to_string(folder.join("manifest.csv")).unwrap();
    let rows: Vec<&str> = csv.lines().skip(1).collect();
    assert_eq!(rows.len(), train_labels, "every training-split label, and only those");
    for row in rows {
        let patient = row.rsplit(',').next().unwrap().rsplit('/').next().unwrap();
        assert!(train_patients.contains(patient), "{patient} is not a training patient");
    }
    let manifest: Value = serde_json::from_slice(&std::fs::read(folder.join("out/manifest.json")).unwrap()).unwrap();
    assert_eq!(manifest["version"], "1.0.0", "one above the newest in the (empty) channel");
    assert_eq!(manifest["name"], "octd");
    assert_eq!(manifest["training"]["singan"], true);
    assert!(folder.join("out/model.onnx").is_file());
    assert!(!std::fs::read_to_string(folder.join("job.log")).unwrap().is_empty(), "the job's log is kept");
    assert!(folder.join("evaluation.json").is_file(), "the evaluation report is kept");
    let listed = jobs(&t);
    assert_eq!(listed[0]["state"], "rejected");
    t.stop();
}

const NO_MODEL_JOB: &str = "[\"true\"]";

#[test]
fn the_label_count_trigger_fires_at_the_configured_label_and_the_cooldown_holds_the_next() {
    let Some(images) = shared_oct_images() else { return };
    let dir = tempfile::tempdir().unwrap();
    let config = format!(
        "[policy]\nretrain_every_labels = 5\nmin_labels_for_accuracy = 1000\ncooldown = \"1h\"\n\n\
         [jobs]\ncommand = {NO_MODEL_JOB}\ncheck_interval = \"200ms\"\nheartbeat = \"100ms\"\nroot = \"{}\"\nworkdir = \"{}\"\n",
        dir.path().join("jobs").display(),
        dir.path().display()
    );
    let (mut t, d) = service(dir.path(), &config);
    let (png, _) = deidentified(std::fs::read(&images[0].0).unwrap());
    for i in 0..4 {
        upload(&t, &d, &format!("s{i}"), &png, "CNV", "CNV", &format!("p{i}"));
    }
    wait_checks(&t, 2);
    assert!(jobs(&t).is_empty(), "four labels: no training yet");
    upload(&t, &d, "s4", &png, "CNV", "CNV", "p4");
    let j = wait_jobs(&t, 1, |_| true);
    let trigger: Value = serde_json::from_str(j[0]["trigger"].as_str().unwrap()).unwrap();
    assert_eq!(trigger["trigger"], "new_labels", "{trigger}");
    assert_eq!(trigger["since_last_training"], 5);
    assert_eq!(j[0]["labels_at_start"], 5);
    // This job writes no model: it fails with the reason, and frees the slot.
    let j = wait_jobs(&t, 1, |j| j[0]["state"] != "running");
    assert_eq!(j[0]["state"], "failed");
    assert!(j[0]["outcome"].as_str().unwrap().contains("model.onnx"), "{}", j[0]);
    // Five more labels within the cooldown: the trigger holds, no second job.
    for i in 5..10 {
        upload(&t, &d, &format!("s{i}"), &png, "CNV", "CNV", &format!("p{i}"));
    }
    wait_checks(&t, 2);
    assert_eq!(jobs(&t).len(), 1, "the cooldown holds the next training back");
    let status = t.cli_json(&["status"]);
    assert_eq!(status["next_training"]["trigger"], "cooling_down", "{status}");
    t.stop();
}

#[test]
fn the_accuracy_trigger_fires_below_the_floor_once_enough_labels_count() {
    let Some(images) = shared_oct_images() else { return };
    let dir = tempfile::tempdir().unwrap();
    let config = format!(
        "[policy]\nretrain_every_labels = 1000\nmin_labels_for_accuracy = 10\naccuracy_floor = 0.92\n\n\
         [jobs]\ncommand = {NO_MODEL_JOB}\ncheck_interval = \"200ms\"\nheartbeat = \"100ms\"\nroot = \"{}\"\nworkdir = \"{}\"\n",
        dir.path().join("jobs").display(),
        dir.path().display()
    );
    let (mut t, d) = service(dir.path(), &config);
    let (png, _) = deidentified(std::fs::read(&images[0].0).unwrap());
    // Nine labels, one of them a correction of the model: 8/9, but too few to judge.
    for i in 0..9 {
        let predicted = if i == 4 { "DME" } else { "CNV" };
        upload(&t, &d, &format!("s{i}"), &png, "CNV", predicted, &format!("p{i}"));
    }
    wait_checks(&t, 2);
    assert!(jobs(&t).is_empty(), "nine labels are fewer than min_labels_for_accuracy");
    // The tenth: 9/10 = 0.90, below 0.92.
    upload(&t, &d, "s9", &png, "CNV", "CNV", "p9");
    let j = wait_jobs(&t, 1, |_| true);
    let trigger: Value = serde_json::from_str(j[0]["trigger"].as_str().unwrap()).unwrap();
    assert_eq!(trigger["trigger"], "accuracy_below_floor", "{trigger}");
    assert_eq!(trigger["accuracy"]["labels"], 10);
    assert_eq!(trigger["accuracy"]["correct"], 9);
    t.stop();
}

#[test]
fn a_job_left_running_by_a_killed_service_is_failed_at_the_next_start() {
    let Some(images) = shared_oct_images() else { return };
    let dir = tempfile::tempdir().unwrap();
    let config = format!(
        "[policy]\nretrain_every_labels = 1\ncooldown = \"1h\"\n\n\
         [jobs]\ncommand = [\"sleep\", \"20\"]\ncheck_interval = \"200ms\"\nheartbeat = \"100ms\"\nabandon_after = \"500ms\"\nroot = \"{}\"\nworkdir = \"{}\"\n",
        dir.path().join("jobs").display(),
        dir.path().display()
    );
    // Every patient in training, so the one label makes a job with something to train on.
    let (mut t, d) = service_with(dir.path(), "holdout_fraction = 0.0", &config);
    let (png, _) = deidentified(std::fs::read(&images[0].0).unwrap());
    upload(&t, &d, "s0", &png, "CNV", "CNV", "p0");
    wait_jobs(&t, 1, |j| j[0]["state"] == "running");
    t.kill9();
    std::thread::sleep(Duration::from_millis(500));
    t.start();
    let j = wait_jobs(&t, 1, |j| j[0]["state"] != "running");
    assert_eq!(j[0]["state"], "failed");
    assert!(j[0]["outcome"].as_str().unwrap().contains("interrupted"), "{}", j[0]);
    t.stop();
}
