//! The learning loop end to end, with every part real: confirmed labels of the shared scans
//! go through octd-trainer's signed intake, a training job's candidate meets the evaluation
//! gate on the fixed holdout against the model the devices run, and an accepted one is
//! packed, signed, published to the channel and announced on a real Mosquitto, whereupon a
//! running octd pointed at the trainer's channel installs it and classifies with it.
//!
//! The worse candidate is a real training run of zero epochs (an untrained network). The
//! accepted one is the shipped model under a new version: a training run that beats it on
//! this data needs more CPU than CI has, and the gate still scores both models on every
//! holdout image (a tie, which the rule accepts).

mod common;

use std::path::Path;
use std::time::Duration;

use common::trainer::{device_identity, trainer_binary, venv_python, Service};
use common::{
    drop_file, events, free_port, repo, results, shared_oct_images, Mosquitto, Octd, OctdOptions, Subscriber,
};
use octd_uplink::{sha256_hex, ImageKind, LabelUpload, ModelStamp, Prediction, LABEL_SCHEMA};
use serde_json::Value;

/// A scan de-identified by octd's own code, as the uplink sends it: a JPEG artefact (kept
/// byte for byte without its metadata) goes up as its pixels in PNG.
fn deidentified_png(path: &Path) -> Vec<u8> {
    let limits = octd::deid::InputLimits::from(&octd::config::IngestConfig::default());
    let deid = octd::deid::Deidentifier::new(octd::secret::DeviceSecret::ephemeral(), Vec::new(), limits);
    let out = deid.deidentify_bytes(std::fs::read(path).unwrap()).expect("de-identifies");
    assert_eq!(out.extension, "jpg");
    octd::deid::png_of_jpeg(&out.artifact).unwrap()
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap().flatten() {
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), target).unwrap();
        }
    }
}

/// `version` with its patch number raised by `n` (the trainer's next versions).
fn patch_above(version: &str, n: u64) -> String {
    let v = semver::Version::parse(version).unwrap();
    format!("{}.{}.{}", v.major, v.minor, v.patch + n)
}

/// A job command template that hands back the shipped model under the version the job is
/// given (see the tests' comments on why).
fn reversion_command() -> String {
    "[\"{python}\", \"-c\", \"import json, shutil, sys; src, out, version = sys.argv[1:]; \
     shutil.copytree(src, out, ignore=shutil.ignore_patterns('*.png', 'README.md', 'evaluation.json')); \
     m = json.load(open(out + '/manifest.json')); m['version'] = version; \
     json.dump(m, open(out + '/manifest.json', 'w'))\", \"MODEL\", \"{out}\", \"{version}\"]"
        .replace("MODEL", &repo().join("models/default").display().to_string())
}

/// The channel the devices already trust (the development channel, listing the shipped
/// default model) with its online keys, for the service to adopt: (channel, keys).
fn development_channel(root: &Path) -> (std::path::PathBuf, std::path::PathBuf) {
    let channel = root.join("channel");
    copy_dir(&repo().join("models/channel"), &channel);
    let keys = root.join("keys");
    std::fs::create_dir_all(&keys).unwrap();
    for role in ["targets", "snapshot", "timestamp"] {
        std::fs::copy(repo().join(format!("keys/development/{role}.pk8")), keys.join(format!("{role}.pk8"))).unwrap();
    }
    (channel, keys)
}

#[test]
fn a_gated_candidate_is_published_announced_and_installed_and_a_worse_one_is_rejected() {
    if !common::mosquitto_available() {
        return;
    }
    let Some(images) = shared_oct_images() else { return };
    let Some(bin) = trainer_binary() else { return };
    let Some(python) = venv_python() else { return };
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let broker = Mosquitto::start(&root.join("broker"));
    let sub = Subscriber::connect(broker.port, "oct/#");

    // The channel the devices already trust (the development channel, listing the shipped
    // default model), adopted by the service with its online keys.
    let (channel, keys) = development_channel(root);
    let port = free_port();
    let jobs = root.join("jobs");
    let base = format!(
        "[server]\nlisten = \"127.0.0.1:{port}\"\n\n\
         [storage]\ndatabase = \"sqlite://{db}\"\nblobs = \"{blobs}\"\n\n\
         [intake]\nholdout_fraction = 0.5\n\n\
         [channel]\ndir = \"{channel}\"\nkeys = \"{keys}\"\n\n\
         [policy]\nretrain_every_labels = 100000\nmin_labels_for_accuracy = 100000\n\n\
         [gate]\nmin_holdout = 10\nselftest_cases = 4\n\n\
         [announce]\nbroker = \"{broker}\"\n\n",
        db = root.join("trainer.db").display(),
        blobs = root.join("blobs").display(),
        channel = channel.display(),
        keys = keys.display(),
        broker = broker.url(),
    );
    let jobs_section = |command: &str| {
        format!(
            "[jobs]\npython = \"{}\"\nworkdir = \"{}\"\nroot = \"{}\"\narchitecture = \"compact\"\ncheck_interval = \"1h\"\n\
             model_name = \"{}\"\ncommand = {command}\n",
            python.display(),
            repo().join("trainer").display(),
            jobs.display(),
            common::shipped_model().0
        )
    };
    let config = root.join("octd-trainer.toml");
    std::fs::write(&config, format!("{base}{}", jobs_section("[\"true\"]"))).unwrap();
    let mut service = Service { bin, dir: root.to_path_buf(), config: config.clone(), port, child: None };
    let adopted = service.cli_json(&config, &["init"]);
    assert_eq!(adopted["adopted"], true, "{adopted}");

    // The device as `octd provision` makes its identity.
    let (_, public_json, key) = device_identity(&root.join("device"), "test-site", "test-device");
    service.cli_json(&config, &["device", "add", public_json.to_str().unwrap()]);
    service.start();

    // Every shared scan, confirmed by a reviewer, through the signed intake.
    let mut holdout = 0;
    for (i, (path, label)) in images.iter().enumerate() {
        let png = deidentified_png(path);
        let sha = sha256_hex(&png);
        let (status, answer) = service.signed(&key, "PUT", &format!("/api/v1/images/{sha}"), "image/png", &png);
        assert!(status == 201 || status == 200, "{status} {answer}");
        let stem = path.file_stem().unwrap().to_string_lossy().to_string();
        let patient = stem.split('-').nth(1).unwrap_or(&stem).to_string();
        let upload = LabelUpload {
            schema: LABEL_SCHEMA.into(),
            label: label.clone(),
            prediction: Prediction { label: label.clone(), probabilities: Default::default() },
            model: ModelStamp { name: "octd-compact".into(), version: "0.2.0".into(), sha256: String::new() },
            reviewer: "rv-1".into(),
            reviewed_at: "2026-12-06T10:00:00Z".into(),
            laterality: String::new(),
            patient,
            image_sha256: sha,
            image_kind: ImageKind::Png,
            withdrawn: false,
        };
        let body = serde_json::to_vec(&upload).unwrap();
        let (status, answer) =
            service.signed(&key, "PUT", &format!("/api/v1/labels/scan-{i}/1"), "application/json", &body);
        assert_eq!(status, 201, "{answer}");
        holdout += usize::from(answer["split"] == "holdout");
    }
    assert!(holdout >= 10, "the holdout holds {holdout} images");

    // A running device on the trainer's channel: it installs what the channel lists (the shipped model)
    // and afterwards checks only on a notice (the hourly check is far away).
    let mut octd = Octd::new(
        &root.join("octd"),
        OctdOptions {
            broker_url: broker.url(),
            workers: 1,
            extra: String::new(),
            channel: Some((format!("http://127.0.0.1:{port}/channel/"), channel.join("metadata/1.root.json"))),
        },
    );
    let text = std::fs::read_to_string(&octd.config).unwrap();
    let paced = "[update]\ninterval = \"1h\"\nnotice_min_interval = \"0s\"\nnotice_jitter = \"0s\"\n";
    std::fs::write(&octd.config, text.replace("[update]\n", paced)).unwrap();
    octd.start();
    octd.wait_ready();
    let installed = |m: &[common::Message], version: &str| {
        events(m).into_iter().any(|e| e["code"] == "installed" && e["model_version"] == version)
    };
    let shipped = common::shipped_model().1;
    sub.wait_until(Duration::from_secs(60), |m| installed(m, &shipped), "the device installs the shipped model");

    // A worse candidate: the real training job, zero epochs.
    let worse = root.join("worse.toml");
    let untrained = "[\"{python}\", \"-m\", \"octtrain\", \"--data\", \"{manifest}\", \"--out\", \"{out}\", \"--arch\", \
                     \"{arch}\", \"--singan\", \"off\", \"--name\", \"{name}\", \"--version\", \"{version}\", \"--epochs\", \
                     \"0\", \"--bootstrap\", \"10\"]";
    std::fs::write(&worse, format!("{base}{}", jobs_section(untrained))).unwrap();
    let job = service.cli_json(&worse, &["retrain", "--now"]);
    assert_eq!(job["state"], "rejected", "{job}");
    let outcome: Value = serde_json::from_str(job["outcome"].as_str().unwrap()).unwrap();
    let evaluation = &outcome["outcome"]["evaluation"];
    assert_eq!(evaluation["holdout_images"], holdout as u64, "{evaluation}");
    assert_eq!(evaluation["current"]["version"], shipped.as_str(), "compared with the model in use: {evaluation}");
    let (cur, cand) =
        (evaluation["current_only_right"].as_u64().unwrap(), evaluation["candidate_only_right"].as_u64().unwrap());
    assert!(cur > cand, "the untrained model loses on the holdout: {evaluation}");
    assert!(evaluation["reason"].as_str().unwrap().starts_with("worse"), "{evaluation}");
    let report = jobs.join(job["id"].as_str().unwrap()).join("evaluation.json");
    assert!(report.is_file(), "the evaluation report is kept");
    let listed = service.cli_json(&config, &["status"]);
    assert_eq!(listed["jobs"][0]["state"], "rejected", "{listed}");

    // The accepted candidate: the shipped model, re-versioned by the job (see the top).
    let same = root.join("same.toml");
    let reversion = reversion_command();
    std::fs::write(&same, format!("{base}{}", jobs_section(&reversion))).unwrap();
    let job = service.cli_json(&same, &["retrain", "--now"]);
    assert_eq!(job["state"], "published", "{job}");
    let version = job["version"].as_str().unwrap().to_string();
    assert_eq!(version, patch_above(&shipped, 2), "above the channel's newest and the rejected job's");
    let outcome: Value = serde_json::from_str(job["outcome"].as_str().unwrap()).unwrap();
    assert_eq!(outcome["outcome"]["evaluation"]["accepted"], true);
    assert_eq!(outcome["outcome"]["announced"], true, "{outcome}");
    let notice = sub.wait_until(
        Duration::from_secs(10),
        |m| m.iter().any(|m| m.topic == "oct/fleet/models"),
        "the publication is announced",
    );
    let notice = notice.iter().find(|m| m.topic == "oct/fleet/models").unwrap();
    let notice: Value = serde_json::from_str(&notice.payload).unwrap();
    assert_eq!(notice["version"], version.as_str());

    // The device verifies, self-tests and installs it on the notice, and classifies with it.
    sub.wait_until(Duration::from_secs(60), |m| installed(m, &version), "the device installs the new model");
    let image = std::fs::read(&images[0].0).unwrap();
    drop_file(&octd.inbox, "after.jpeg", &image);
    let messages = sub.wait_until(Duration::from_secs(60), |m| !results(m).is_empty(), "a result");
    let result = results(&messages).into_values().next().unwrap();
    assert_eq!(result["model"]["version"], version.as_str(), "{result}");
    assert!(octd.stop().success());
}

/// The loop closed from the device's side: scans dropped into octd, confirmed by a reviewer
/// on MQTT, carried by octd's uplink to the trainer, whose policy (the label-count trigger,
/// lowered) starts a job; the gated, signed result is announced, and the same octd installs
/// it and classifies with it. The job here is an operator's command template that hands back
/// the shipped model under the version it is given (the real training job runs in the test
/// above and in the trainer's own tests): what this test proves is the loop around it.
#[test]
fn the_loop_closes_verdicts_on_a_device_retrain_and_the_new_model_comes_back() {
    if !common::mosquitto_available() {
        return;
    }
    let Some(images) = shared_oct_images() else { return };
    let Some(bin) = trainer_binary() else { return };
    let Some(python) = venv_python() else { return };
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let broker = Mosquitto::start(&root.join("broker"));
    let sub = Subscriber::connect(broker.port, "oct/#");
    let (channel, keys) = development_channel(root);
    let port = free_port();
    let labels = 12;
    let reversion = reversion_command();
    let config = root.join("octd-trainer.toml");
    std::fs::write(
        &config,
        format!(
            "[server]\nlisten = \"127.0.0.1:{port}\"\n\n\
             [storage]\ndatabase = \"sqlite://{db}\"\nblobs = \"{blobs}\"\n\n\
             [intake]\nholdout_fraction = 0.5\n\n\
             [channel]\ndir = \"{channel}\"\nkeys = \"{keys}\"\n\n\
             [policy]\nretrain_every_labels = {labels}\nmin_labels_for_accuracy = 100000\ncooldown = \"1h\"\n\n\
             [gate]\nmin_holdout = 2\nselftest_cases = 2\n\n\
             [announce]\nbroker = \"{broker}\"\n\n\
             [jobs]\npython = \"{python}\"\nworkdir = \"{workdir}\"\nroot = \"{jobs}\"\ncheck_interval = \"300ms\"\n\
             heartbeat = \"100ms\"\nabandon_after = \"5s\"\nmodel_name = \"{name}\"\ncommand = {reversion}\n",
            db = root.join("trainer.db").display(),
            blobs = root.join("blobs").display(),
            channel = channel.display(),
            keys = keys.display(),
            broker = broker.url(),
            python = python.display(),
            workdir = repo().join("trainer").display(),
            jobs = root.join("jobs").display(),
            name = common::shipped_model().0,
        ),
    )
    .unwrap();
    let mut service = Service { bin, dir: root.to_path_buf(), config: config.clone(), port, child: None };
    service.cli_json(&config, &["init"]);
    let (identity, public_json, _) = device_identity(&root.join("octd-etc"), "test-site", "test-device");
    service.cli_json(&config, &["device", "add", public_json.to_str().unwrap()]);
    service.start();

    let mut octd = Octd::new(
        &root.join("octd"),
        OctdOptions {
            broker_url: broker.url(),
            workers: 1,
            extra: format!(
                "\n[uplink]\nurl = \"http://127.0.0.1:{port}\"\nidentity_key = \"{}\"\nretry_min = \"200ms\"\nretry_max = \"1s\"\n",
                identity.display()
            ),
            channel: Some((format!("http://127.0.0.1:{port}/channel/"), channel.join("metadata/1.root.json"))),
        },
    );
    let text = std::fs::read_to_string(&octd.config).unwrap();
    let paced = "[update]\ninterval = \"1h\"\nnotice_min_interval = \"0s\"\nnotice_jitter = \"0s\"\n";
    std::fs::write(&octd.config, text.replace("[update]\n", paced)).unwrap();
    let reviewer = std::process::Command::new(env!("CARGO_BIN_EXE_octd"))
        .arg("--config")
        .arg(&octd.config)
        .args(["reviewer", "add", "rv-1"])
        .output()
        .unwrap();
    assert!(reviewer.status.success(), "{}", String::from_utf8_lossy(&reviewer.stderr));
    octd.start();
    octd.wait_ready();
    let installed = |m: &[common::Message], version: &str| {
        events(m).into_iter().any(|e| e["code"] == "installed" && e["model_version"] == version)
    };
    let shipped = common::shipped_model().1;
    let retrained = patch_above(&shipped, 1);
    sub.wait_until(Duration::from_secs(60), |m| installed(m, &shipped), "the device runs the shipped model");

    // The reviewer confirms every result.
    for (i, (path, _)) in images.iter().take(labels).enumerate() {
        drop_file(&octd.inbox, &format!("scan-{i}.jpeg"), &std::fs::read(path).unwrap());
    }
    let messages = sub.wait_until(Duration::from_secs(60), |m| results(m).len() == labels, "the results");
    let now = humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string();
    for (scan_id, result) in results(&messages) {
        let verdict = serde_json::json!({"schema": "octd.label/1", "label": result["label"], "reviewer": "rv-1", "reviewed_at": now});
        let topic = format!("oct/test-site/test-device/labels/{scan_id}");
        common::publish(broker.port, &topic, serde_json::to_vec(&verdict).unwrap(), false);
    }

    // The trainer's policy trains on the labels the uplink delivered; the gate accepts, the
    // channel lists the next patch version, the announcement reaches the device, which installs it.
    sub.wait_until(Duration::from_secs(120), |m| installed(m, &retrained), "the device installs the retrained model");
    let status = service.cli_json(&config, &["status"]);
    let job = &status["jobs"][0];
    assert_eq!(job["state"], "published", "{status}");
    let trigger: Value = serde_json::from_str(job["trigger"].as_str().unwrap()).unwrap();
    assert_eq!(trigger["trigger"], "new_labels", "the designed policy started it: {trigger}");
    assert_eq!(status["labels"]["scans"], labels as u64, "every verdict reached the trainer: {status}");
    let before = results(&sub.messages()).len();
    drop_file(&octd.inbox, "after.jpeg", &std::fs::read(&images[0].0).unwrap());
    let messages = sub.wait_until(Duration::from_secs(60), |m| results(m).len() > before, "a result after the update");
    let versions: Vec<String> =
        results(&messages).values().map(|r| r["model"]["version"].as_str().unwrap_or_default().to_string()).collect();
    assert!(versions.contains(&retrained), "later results carry the new model: {versions:?}");
    assert!(octd.stop().success());
}
