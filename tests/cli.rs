//! The one-shot commands and the daemon's other behaviours a user relies on: the embedded
//! broker, DICOM volumes, the disk alarm and configuration errors.

mod common;

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use common::dicom as fixture;
use common::{drop_file, events, free_port, results, shared_oct_images, Octd, OctdOptions, Rig, Subscriber};
use serde_json::Value;

fn octd() -> Command {
    Command::new(env!("CARGO_BIN_EXE_octd"))
}

#[test]
fn classify_reports_on_every_input_and_exits_zero() {
    let Some(images) = shared_oct_images() else { return };
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.jpeg");
    std::fs::write(&bad, b"garbage").unwrap();
    let inputs: Vec<PathBuf> = vec![images[0].0.clone(), bad.clone(), images[40].0.clone()];
    let out = octd().current_dir(common::repo()).arg("classify").args(&inputs).arg("--json").output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let lines: Vec<Value> =
        String::from_utf8(out.stdout).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(lines.len(), 3, "one object per input, in order");
    for (line, input) in lines.iter().zip(&inputs) {
        assert_eq!(line["input"], input.to_str().unwrap(), "input echoed as given");
    }
    assert!(lines[1]["error"].as_str().unwrap().contains("not an image"));
    for good in [&lines[0], &lines[2]] {
        assert!(good.get("error").is_none(), "{good}");
        assert!(good["scan_id"].as_str().is_some());
        assert!(["CNV", "DME", "DRUSEN", "NORMAL"].contains(&good["label"].as_str().unwrap()));
        assert_eq!(good["probabilities"].as_object().unwrap().len(), 4);
        assert!(good["needs_review"].is_boolean());
    }
}

#[test]
fn classify_with_a_broken_model_folder_is_a_configuration_error() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("model");
    std::fs::create_dir_all(&model).unwrap();
    std::fs::copy(common::repo().join("models/default/manifest.json"), model.join("manifest.json")).unwrap();
    std::fs::write(model.join("model.onnx"), b"tampered").unwrap();
    let out = octd().arg("classify").arg("x.jpeg").arg("--model").arg(&model).output().unwrap();
    assert_eq!(out.status.code(), Some(78));
    assert!(String::from_utf8_lossy(&out.stderr).contains("sha256"), "{}", String::from_utf8_lossy(&out.stderr));
}

#[test]
fn config_check_accepts_the_shipped_file_and_rejects_typos_with_exit_78() {
    let ok = octd()
        .arg("config")
        .arg("check")
        .arg("--config")
        .arg(common::repo().join("config/octd.toml"))
        .output()
        .unwrap();
    assert!(ok.status.success());
    let printed: toml::Value = toml::from_str(&String::from_utf8(ok.stdout).unwrap()).unwrap();
    assert_eq!(printed["ingest"]["settle"].as_str(), Some("2s"));
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.toml");
    std::fs::write(&bad, "[mqtt]\nurll = \"mqtt://x\"\n").unwrap();
    let out = octd().arg("config").arg("check").arg("--config").arg(&bad).output().unwrap();
    assert_eq!(out.status.code(), Some(78));
    assert!(String::from_utf8_lossy(&out.stderr).contains("urll"));
    let env = octd().arg("config").arg("check").env("OCTD_MQTT__URL", "ftp://nope").output().unwrap();
    assert_eq!(env.status.code(), Some(78), "environment overrides are validated too");
}

#[test]
fn embedded_broker_serves_results_when_no_broker_is_configured() {
    let Some(images) = shared_oct_images() else { return };
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let mut octd = Octd::new(
        dir.path(),
        OctdOptions {
            broker_url: String::new(),
            workers: 1,
            extra: format!("embedded_listen = \"127.0.0.1:{port}\"\n"),
            // The shipped development channel, as `cargo run -- run` uses it.
            channel: Some((
                common::repo().join("models/channel").display().to_string(),
                common::repo().join("models/channel/metadata/1.root.json"),
            )),
        },
    );
    octd.start();
    octd.wait_ready();
    let sub = Subscriber::connect(port, "oct/#");
    drop_file(&octd.inbox, "scan.jpeg", &std::fs::read(&images[3].0).unwrap());
    let messages =
        sub.wait_until(Duration::from_secs(60), |m| results(m).len() == 1, "a result via the embedded broker");
    let result = results(&messages).into_values().next().unwrap();
    // Installed from the development-signed bundle, not loaded from models/default.
    let (_, version) = common::shipped_model();
    assert_eq!(result["model"]["version"], version.as_str());
    assert!(octd.state.join(format!("models/{version}/selftest.json")).is_file());
    let status = messages.iter().rev().find(|m| m.topic.ends_with("/status")).unwrap();
    assert!(status.payload.contains(&format!("\"version\":\"{version}\"")), "{}", status.payload);
    assert!(octd.stop().success());
}

#[test]
fn dicom_volume_gives_one_result_with_the_most_suspicious_bscan() {
    let Some(Rig { images, sub, mut octd, broker: _broker, dir: _dir }) = Rig::new(1, "oct/#") else { return };
    // 64 B-scans: NORMAL everywhere but one CNV slice in the middle.
    let volume = fixture::volume_with_cnv_at(&images, 37, 64, 512, 496);
    octd.start();
    drop_file(&octd.inbox, "DOE_JOHN_volume.dcm", &volume);
    let messages = sub.wait_until(Duration::from_secs(120), |m| results(m).len() == 1, "the volume's result");
    let result = results(&messages).into_values().next().unwrap();
    assert_eq!(result["frames"], 64);
    assert_eq!(result["input_kind"], "dicom");
    assert_eq!(result["laterality"], "R");
    assert!(result["study_uid"].as_str().unwrap().starts_with("2.25."));
    let suspicious = result["most_suspicious_frame"].as_u64().unwrap();
    assert!(suspicious < 64);
    // Per-class maxima over 64 slices: at least as large as any single slice's value.
    let probabilities = result["probabilities"].as_object().unwrap();
    assert!(probabilities.values().all(|p| (0.0..=1.0).contains(&p.as_f64().unwrap())));
    assert!(
        result["confidence"].as_f64().unwrap()
            <= probabilities[result["label"].as_str().unwrap()].as_f64().unwrap() + 1e-6
    );
    common::assert_no_phi(result.to_string().as_bytes(), "volume result");
    assert!(octd.stop().success());
    // The daemon classified the volume from its bytes in memory while it wrote them: the
    // artefact it committed gives the same answer when read back from disk.
    let artefact = octd.state.join(format!("deid/{}.dcm", result["scan_id"].as_str().unwrap()));
    assert!(artefact.is_file(), "the artefact was committed with the result");
    let out = Command::new(env!("CARGO_BIN_EXE_octd"))
        .arg("--config")
        .arg(&octd.config)
        .args(["classify", "--json"])
        .arg(&artefact)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let from_disk: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(from_disk["label"], result["label"]);
    assert_eq!(from_disk["most_suspicious_frame"], result["most_suspicious_frame"]);
    for (class, p) in probabilities {
        let again = from_disk["probabilities"][class].as_f64().unwrap();
        assert!((again - p.as_f64().unwrap()).abs() < 1e-5, "{class}: {again} against {p}");
    }
}

#[test]
fn low_disk_stops_intake_and_raises_an_alarm() {
    let Some(Rig { images, sub, mut octd, broker: _broker, dir: _dir }) = Rig::new(1, "oct/#") else { return };
    // No disk has this much free space, so intake must stop.
    let config = std::fs::read_to_string(&octd.config).unwrap();
    std::fs::write(&octd.config, config.replace("[ingest]\n", "[ingest]\nmin_free_bytes = 9223372036854775807\n"))
        .unwrap();
    // One file present at start-up (found by the rescan, taken by polling), one renamed in
    // while running (the fast path): neither may be taken.
    drop_file(&octd.inbox, "before.jpeg", &std::fs::read(&images[0].0).unwrap());
    octd.start();
    octd.wait_ready();
    drop_file(&octd.inbox, "after.jpeg", &std::fs::read(&images[1].0).unwrap());
    let messages = sub.wait_until(
        Duration::from_secs(30),
        |m| events(m).iter().any(|e| e["kind"] == "alarm" && e["code"] == "disk_low"),
        "a disk alarm",
    );
    std::thread::sleep(Duration::from_secs(2));
    for name in ["before.jpeg", "after.jpeg"] {
        assert!(octd.inbox.join(name).exists(), "{name} stays in the export folder");
    }
    assert_eq!(results(&sub.messages()).len(), 0);
    assert_eq!(events(&messages).iter().filter(|e| e["kind"] == "alarm").count(), 1, "one alarm, not one per poll");
    assert!(octd.stop().success());
}

#[test]
fn the_default_model_is_not_degenerate_on_the_shared_scans() {
    let Some(images) = shared_oct_images() else { return };
    let paths: Vec<&PathBuf> = images.iter().map(|(p, _)| p).collect();
    let out = octd().current_dir(common::repo()).arg("classify").args(&paths).arg("--json").output().unwrap();
    assert!(out.status.success());
    let lines: Vec<Value> =
        String::from_utf8(out.stdout).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    let labels: std::collections::BTreeSet<&str> = lines.iter().map(|l| l["label"].as_str().unwrap()).collect();
    assert!(labels.len() >= 2, "a model that gives one label to every scan is not shippable: {labels:?}");
    let flagged = lines.iter().filter(|l| l["needs_review"] == true).count();
    assert!(flagged > 0 && flagged < lines.len(), "review flags must discriminate: {flagged} of {}", lines.len());
}
