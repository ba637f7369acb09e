//! `octd provision` into a throwaway root: files, modes, a configuration the daemon accepts,
//! idempotence, refusal without --force (and what --force keeps), interactive answers.

mod common;

use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Stdio};

use common::repo;

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path).unwrap().permissions().mode() & 0o777
}

fn provision(root: &Path, extra: &[&str]) -> std::process::Output {
    let s = |p: &str| root.join(p).display().to_string();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_octd"));
    cmd.arg("provision")
        .args(["--config", &s("etc/octd/octd.toml")])
        .args(["--state-dir", &s("var/lib/octd")])
        .args(["--watch", &s("srv/scanner/export")])
        .args(["--systemd-dropin-dir", &s("etc/systemd/system/octd.service.d")])
        .args(["--repository", &repo().join("models/channel").display().to_string()])
        .args(["--trusted-root", &repo().join("models/channel/metadata/1.root.json").display().to_string()])
        .args(["--owner", "root"])
        .args(extra);
    cmd.output().unwrap()
}

/// A clinic's full set of answers, given twice to show idempotence.
const CLINIC_7: &[&str] = &[
    "--site",
    "clinic-7",
    "--device-id",
    "oct-2",
    "--broker-url",
    "mqtts://broker.clinic:8883",
    "--broker-username",
    "oct-2",
    "--uplink-url",
    "https://trainer.example/labels",
    "--ca-file",
    "/etc/octd/ca.pem",
];

#[test]
fn provisioning_writes_a_working_device_and_is_idempotent() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let out = provision(root, CLINIC_7);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(report["changed"].as_array().unwrap().len() >= 6, "{report}");

    let config_path = root.join("etc/octd/octd.toml");
    let config = octd::config::Config::load(Some(&config_path)).expect("the daemon accepts the written configuration");
    assert_eq!(config.device.site, "clinic-7");
    assert_eq!(config.device.id, "oct-2");
    assert_eq!(config.mqtt.url, "mqtts://broker.clinic:8883");
    assert_eq!(config.mqtt.username.as_deref(), Some("oct-2"));
    assert_eq!(config.uplink.url, "https://trainer.example/labels");
    assert_eq!(config.update.trusted_root, root.join("etc/octd/root.json"));
    assert_eq!(config.ingest.watch, vec![root.join("srv/scanner/export")]);
    assert_eq!(mode(&config_path), 0o640, "the configuration may hold the broker password");
    assert_eq!(mode(&root.join("var/lib/octd")), 0o750);
    assert_eq!(mode(&root.join("var/lib/octd/device.key")), 0o600);
    assert_eq!(mode(&root.join("etc/octd/device-identity.pk8")), 0o600);
    assert_eq!(std::fs::read(root.join("var/lib/octd/device.key")).unwrap().len(), 32);
    let public: serde_json::Value =
        serde_json::from_slice(&std::fs::read(root.join("etc/octd/device-identity.pub.json")).unwrap()).unwrap();
    assert_eq!(public["keyid"], report["identity_key_id"]);
    assert_eq!(public["device"], "oct-2");
    assert_eq!(
        std::fs::read(root.join("etc/octd/root.json")).unwrap(),
        std::fs::read(repo().join("models/channel/metadata/1.root.json")).unwrap()
    );
    assert!(root.join("srv/scanner/export").is_dir());
    let dropin = std::fs::read_to_string(root.join("etc/systemd/system/octd.service.d/10-provisioned.conf")).unwrap();
    assert!(dropin.contains(&format!("ReadWritePaths={}", root.join("srv/scanner/export").display())), "{dropin}");

    // Same answers again: nothing changes.
    let secret = std::fs::read(root.join("var/lib/octd/device.key")).unwrap();
    let identity = std::fs::read(root.join("etc/octd/device-identity.pk8")).unwrap();
    let again = provision(root, CLINIC_7);
    assert!(again.status.success());
    let again: serde_json::Value = serde_json::from_slice(&again.stdout).unwrap();
    assert_eq!(again["changed"].as_array().unwrap().len(), 0, "{again}");
    assert_eq!(again["next"], "nothing changed");

    // Other answers: refused without --force, and nothing was touched.
    let before = std::fs::read_to_string(&config_path).unwrap();
    let refused = provision(root, &["--site", "clinic-8", "--device-id", "oct-2"]);
    assert!(!refused.status.success());
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("--force"),
        "{}",
        String::from_utf8_lossy(&refused.stderr)
    );
    assert_eq!(std::fs::read_to_string(&config_path).unwrap(), before);

    // With --force: new settings, same secret and identity.
    let forced = provision(root, &["--site", "clinic-8", "--device-id", "oct-2", "--force"]);
    assert!(forced.status.success(), "{}", String::from_utf8_lossy(&forced.stderr));
    assert_eq!(octd::config::Config::load(Some(&config_path)).unwrap().device.site, "clinic-8");
    assert_eq!(
        std::fs::read(root.join("var/lib/octd/device.key")).unwrap(),
        secret,
        "the device secret is never replaced"
    );
    assert_eq!(std::fs::read(root.join("etc/octd/device-identity.pk8")).unwrap(), identity);

    // The provisioned device passes doctor's configuration, model channel and folder checks.
    let doctor = Command::new(env!("CARGO_BIN_EXE_octd"))
        .args(["doctor", "--json", "--config"])
        .arg(&config_path)
        .output()
        .unwrap();
    let report: serde_json::Value = serde_json::from_slice(&doctor.stdout).unwrap();
    for check in ["config", "watch_folders", "repository"] {
        let f = report["checks"].as_array().unwrap().iter().find(|c| c["check"] == check).unwrap();
        assert_eq!(f["status"], "ok", "{f}");
    }
}

#[test]
fn interactive_provisioning_takes_answers_and_defaults() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let s = |p: &str| root.join(p).display().to_string();
    let mut child = Command::new(env!("CARGO_BIN_EXE_octd"))
        .args(["provision", "--interactive", "--config", &s("etc/octd/octd.toml"), "--state-dir", &s("state")])
        .args(["--no-systemd-dropin", "--owner", "root"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // site, device id, folders, broker URL (empty: embedded), channel, root, uplink (empty).
    let answers = format!(
        "eye-clinic\nscanner-room-1\n{}\n\n{}\n{}\n\n",
        s("export"),
        repo().join("models/channel").display(),
        repo().join("models/channel/metadata/1.root.json").display()
    );
    child.stdin.take().unwrap().write_all(answers.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let prompts = String::from_utf8_lossy(&out.stderr);
    assert!(prompts.contains("Clinic site id") && prompts.contains("MQTT broker URL"), "{prompts}");
    let config = octd::config::Config::load(Some(&root.join("etc/octd/octd.toml"))).unwrap();
    assert_eq!(config.device.site, "eye-clinic");
    assert_eq!(config.device.id, "scanner-room-1");
    assert!(config.mqtt.url.is_empty(), "empty answer: the embedded broker");
    assert!(config.uplink.url.is_empty());
    assert!(root.join("state/device.key").exists());
}

#[test]
fn unattended_provisioning_without_required_answers_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let out = provision(dir.path(), &["--device-id", "x"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--site is required"));
    assert!(!dir.path().join("etc/octd/octd.toml").exists());
}
