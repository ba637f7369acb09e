//! `octd doctor` on real devices: a healthy running one passes every check; each broken
//! thing (broker credentials, watch folder, store file, installed model, expired channel,
//! bad configuration) fails its own check with a fix, and the exit status says so.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::{free_port, mosquitto_available, repo, Mosquitto, Octd, OctdOptions};
use serde_json::Value;

fn octd(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_octd")).current_dir(repo()).args(args).output().unwrap()
}

/// (exit code, report)
fn doctor(config: &Path) -> (i32, Value) {
    let out =
        Command::new(env!("CARGO_BIN_EXE_octd")).args(["doctor", "--json", "--config"]).arg(config).output().unwrap();
    let report = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("doctor --json: {e}: {}", String::from_utf8_lossy(&out.stdout)));
    (out.status.code().unwrap_or(-1), report)
}

fn finding<'a>(report: &'a Value, check: &str) -> &'a Value {
    report["checks"].as_array().unwrap().iter().find(|c| c["check"] == check).unwrap_or_else(|| panic!("no {check}"))
}

fn assert_fails_with_fix(report: &Value, check: &str, summary_has: &str) {
    let f = finding(report, check);
    assert_eq!(f["status"], "fail", "{check}: {f}");
    assert!(f["summary"].as_str().unwrap().contains(summary_has), "{check}: {f}");
    assert!(f["hint"].as_str().is_some_and(|h| !h.is_empty()), "{check} has no fix: {f}");
}

/// A channel of its own (keys, root, the default model packed and published).
fn channel(dir: &Path, timestamp_expires: &str) -> (PathBuf, PathBuf) {
    let keys: Vec<PathBuf> = ["root", "targets", "snapshot", "timestamp"]
        .iter()
        .map(|role| {
            let p = dir.join(format!("{role}.pk8"));
            assert!(octd(&["bundle", "keygen", p.to_str().unwrap()]).status.success());
            p
        })
        .collect();
    let k = |i: usize| keys[i].to_str().unwrap().to_string();
    let repo_dir = dir.join("channel");
    let r = repo_dir.to_str().unwrap().to_string();
    let init = octd(&[
        "bundle",
        "init",
        "--repo",
        &r,
        "--root-key",
        &k(0),
        "--targets-key",
        &k(1),
        "--snapshot-key",
        &k(2),
        "--timestamp-key",
        &k(3),
    ]);
    assert!(init.status.success(), "{}", String::from_utf8_lossy(&init.stderr));
    let bundle = dir.join("bundle.tar.gz");
    let model = repo().join("models/default");
    assert!(octd(&["bundle", "pack", "--model", model.to_str().unwrap(), "--out", bundle.to_str().unwrap()])
        .status
        .success());
    let publish = octd(&[
        "bundle",
        "publish",
        "--repo",
        &r,
        "--add",
        bundle.to_str().unwrap(),
        "--key",
        &k(0),
        "--key",
        &k(1),
        "--key",
        &k(2),
        "--key",
        &k(3),
        "--timestamp-expires",
        timestamp_expires,
    ]);
    assert!(publish.status.success(), "{}", String::from_utf8_lossy(&publish.stderr));
    let root = repo_dir.join("metadata/1.root.json");
    (repo_dir, root)
}

#[test]
fn a_healthy_running_device_passes_and_a_broken_one_fails_check_by_check() {
    if !mosquitto_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let broker = Mosquitto::start(&dir.path().join("broker"));
    let (repository, root) = channel(dir.path(), "7d");
    let mut device = Octd::new(
        &dir.path().join("octd"),
        OctdOptions {
            broker_url: broker.url(),
            workers: 1,
            extra: String::new(),
            channel: Some((repository.display().to_string(), root)),
        },
    );
    device.start();
    device.wait_ready();
    // Healthy means ready (model installed, broker connected), not only started: on a loaded
    // runner the first /readyz can still be 503, which the check after doctor would blame on it.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while device.http_get("/readyz").map(|(c, _)| c) != Some(200) {
        assert!(
            std::time::Instant::now() < deadline,
            "the device never became ready: {:?}",
            device.http_get("/readyz")
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }

    let (code, report) = doctor(&device.config);
    let failed: Vec<&Value> = report["checks"].as_array().unwrap().iter().filter(|c| c["status"] == "fail").collect();
    assert!(failed.is_empty(), "a healthy device fails: {failed:?}");
    assert_eq!(code, 0);
    assert_eq!(report["ok"], true);
    for check in ["config", "clock", "spool", "disk", "store", "model", "broker", "repository"] {
        assert_eq!(finding(&report, check)["status"], "ok", "{check}: {}", finding(&report, check));
    }
    // `auto` without ONNX Runtime runs tract: doctor warns that it is much slower.
    let backend = if common::default_backend() == "tract" { "warn" } else { "ok" };
    assert_eq!(finding(&report, "backend")["status"], backend, "{}", finding(&report, "backend"));
    {}
    assert!(finding(&report, "store")["summary"].as_str().unwrap().contains("running daemon"));
    assert!(finding(&report, "model")["summary"].as_str().unwrap().contains("passes its self-test"));
    assert!(finding(&report, "watch_folders")["summary"].as_str().unwrap().contains(device.inbox.to_str().unwrap()));
    // Human output: one line per check, exit 0.
    let human =
        Command::new(env!("CARGO_BIN_EXE_octd")).args(["doctor", "--config"]).arg(&device.config).output().unwrap();
    assert!(human.status.success());
    assert!(String::from_utf8_lossy(&human.stdout).contains("0 check(s) failed"));
    // The daemon was not disturbed by the broker probe (own client id, no will).
    assert_eq!(device.http_get("/readyz").map(|(c, _)| c), Some(200));
    assert!(device.stop().success());

    // Now break things, one per check, on the stopped device.
    let config = std::fs::read_to_string(&device.config).unwrap();
    let dead_port = free_port();
    let broken = config
        .replace(&broker.url(), &format!("mqtt://127.0.0.1:{dead_port}"))
        .replace(device.inbox.to_str().unwrap(), dir.path().join("not-a-folder").to_str().unwrap());
    std::fs::write(dir.path().join("not-a-folder"), b"a file").unwrap();
    let broken_path = dir.path().join("broken.toml");
    std::fs::write(&broken_path, broken).unwrap();
    // Damage the installed model's weights and the store file.
    let model_file = std::fs::read_dir(device.state.join("models"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.join("model.onnx").exists())
        .unwrap()
        .join("model.onnx");
    let mut weights = std::fs::read(&model_file).unwrap();
    let middle = weights.len() / 2;
    weights[middle] ^= 0xff;
    std::fs::write(&model_file, weights).unwrap();
    std::fs::write(device.state.join("octd.redb"), b"this is not a redb file at all, just bytes").unwrap();

    let (code, report) = doctor(&broken_path);
    assert_eq!(code, 1, "{report}");
    assert_eq!(report["ok"], false);
    assert_fails_with_fix(&report, "broker", &dead_port.to_string());
    assert_fails_with_fix(&report, "watch_folders", "not a folder");
    assert_fails_with_fix(&report, "store", "octd.redb");
    assert_fails_with_fix(&report, "model", "sha256");
    assert_eq!(finding(&report, "repository")["status"], "ok", "the channel itself is still fine");
}

#[test]
fn wrong_broker_password_and_expired_channel_fail_with_their_reasons() {
    if !mosquitto_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let passwd = dir.path().join("passwd");
    let made = Command::new("mosquitto_passwd").args(["-c", "-b"]).arg(&passwd).args(["octd", "right-pass"]).output();
    if !made.is_ok_and(|o| o.status.success()) {
        eprintln!("SKIP: mosquitto_passwd not available");
        return;
    }
    let port = free_port();
    let _broker = Mosquitto::start_with(
        &dir.path().join("broker"),
        &format!("listener {port} 127.0.0.1\nallow_anonymous false\npassword_file {}\n", passwd.display()),
    );
    let (repository, root) = channel(dir.path(), "1s");
    std::thread::sleep(Duration::from_millis(1500));
    let device = Octd::new(
        &dir.path().join("octd"),
        OctdOptions {
            broker_url: format!("mqtt://127.0.0.1:{port}"),
            workers: 1,
            extra: "username = \"octd\"\npassword = \"wrong-pass\"\n".into(),
            channel: Some((repository.display().to_string(), root)),
        },
    );
    let (code, report) = doctor(&device.config);
    assert_eq!(code, 1);
    assert_fails_with_fix(&report, "broker", "refused");
    let broker = finding(&report, "broker");
    assert!(broker["hint"].as_str().unwrap().contains("password"), "{broker}");
    assert_fails_with_fix(&report, "repository", "metadata_expired");
    // Nothing was created by looking: no state folder, no secret.
    assert!(!device.state.join("device.key").exists());
}

#[test]
fn an_invalid_configuration_fails_first_and_skips_the_rest() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("octd.toml");
    std::fs::write(&config, "[mqtt]\nurl = \"http://not-mqtt\"\n").unwrap();
    let (code, report) = doctor(&config);
    assert_eq!(code, 1);
    assert_fails_with_fix(&report, "config", "mqtt.url");
    let skipped = report["checks"].as_array().unwrap().iter().filter(|c| c["status"] == "skip").count();
    assert_eq!(skipped, report["checks"].as_array().unwrap().len() - 1);
}
