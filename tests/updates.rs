//! Signed model updates through a running daemon: a real TUF channel built with the
//! operator's `octd bundle` commands, served from a folder or over HTTP on loopback; a
//! real Mosquitto; real scans. Each tampering case is refused with its reason while scans
//! keep flowing on the model that was verified.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use common::dicom::{self as fixture, Pixels};
use common::{
    drop_file, events, free_port, mosquitto_available, repo, results, Mosquitto, Octd, OctdOptions, Subscriber,
};
use sha2::{Digest, Sha256};

const MINUTE: Duration = Duration::from_secs(60);

fn octd(args: &[&str]) -> serde_json::Value {
    let out = Command::new(env!("CARGO_BIN_EXE_octd")).current_dir(repo()).args(args).output().unwrap();
    assert!(out.status.success(), "octd {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap_or(serde_json::Value::Null)
}

/// An operator's channel: keys, a root, and bundles published with the documented commands.
struct Channel {
    dir: PathBuf,
    repo: PathBuf,
    keys: Vec<PathBuf>,
}

impl Channel {
    fn new(dir: &Path) -> Channel {
        let keys_dir = dir.join("keys");
        std::fs::create_dir_all(&keys_dir).unwrap();
        let key = |role: &str| {
            let path = keys_dir.join(format!("{role}.pk8"));
            octd(&["bundle", "keygen", path.to_str().unwrap()]);
            path
        };
        let keys: Vec<PathBuf> = ["root", "targets", "snapshot", "timestamp"].iter().map(|r| key(r)).collect();
        let repo = dir.join("channel");
        let s = |p: &Path| p.to_str().unwrap().to_string();
        octd(&[
            "bundle",
            "init",
            "--repo",
            &s(&repo),
            "--root-key",
            &s(&keys[0]),
            "--targets-key",
            &s(&keys[1]),
            "--snapshot-key",
            &s(&keys[2]),
            "--timestamp-key",
            &s(&keys[3]),
        ]);
        Channel { dir: dir.to_path_buf(), repo, keys }
    }

    fn trusted_root(&self) -> PathBuf {
        self.repo.join("metadata/1.root.json")
    }

    fn pack(&self, model: &Path, version: &str) -> PathBuf {
        let out = self.dir.join(format!("bundle-{version}.tar.gz"));
        octd(&["bundle", "pack", "--model", model.to_str().unwrap(), "--out", out.to_str().unwrap()]);
        out
    }

    fn publish(&self, extra: &[&str]) {
        let mut args: Vec<String> =
            vec!["bundle".into(), "publish".into(), "--repo".into(), self.repo.display().to_string()];
        for k in &self.keys {
            args.push("--key".into());
            args.push(k.display().to_string());
        }
        args.extend(extra.iter().map(|s| s.to_string()));
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        octd(&refs);
    }

    fn add(&self, bundle: &Path) {
        self.publish(&["--add", bundle.to_str().unwrap()]);
    }

    /// The bundle file as the repository serves it (consistent snapshots: `<sha256>.<name>`).
    fn served_bundle(&self, version: &str) -> PathBuf {
        std::fs::read_dir(self.repo.join("targets"))
            .unwrap()
            .map(|e| e.unwrap().path())
            .find(|p| p.to_string_lossy().ends_with(&format!("-{version}.tar.gz")))
            .unwrap()
    }
}

/// A copy of the default model as another version: same network, different bytes (an
/// unknown protobuf field appended, which ONNX readers skip), manifest updated.
fn model_variant(dir: &Path, version: &str, edit: impl Fn(&mut serde_json::Value)) -> PathBuf {
    let out = dir.join(format!("model-{version}"));
    std::fs::create_dir_all(&out).unwrap();
    let mut onnx = std::fs::read(repo().join("models/default/model.onnx")).unwrap();
    let tag = format!("octd test variant {version}");
    onnx.extend_from_slice(&[0xfa, 0x06, tag.len() as u8]); // field 111, length-delimited
    onnx.extend_from_slice(tag.as_bytes());
    std::fs::write(out.join("model.onnx"), &onnx).unwrap();
    let mut manifest = common::shipped_manifest();
    manifest["version"] = version.into();
    manifest["sha256"] = hex::encode(Sha256::digest(&onnx)).into();
    edit(&mut manifest);
    std::fs::write(out.join("manifest.json"), serde_json::to_vec_pretty(&manifest).unwrap()).unwrap();
    out
}

/// The shipped model's own bytes under another version: the base these tests update from,
/// whatever version the repository ships.
fn shipped_as(dir: &Path, version: &str) -> PathBuf {
    let out = dir.join(format!("shipped-{version}"));
    std::fs::create_dir_all(&out).unwrap();
    std::fs::copy(repo().join("models/default/model.onnx"), out.join("model.onnx")).unwrap();
    let mut manifest = common::shipped_manifest();
    manifest["version"] = version.into();
    std::fs::write(out.join("manifest.json"), serde_json::to_vec_pretty(&manifest).unwrap()).unwrap();
    out
}

/// A static HTTP server (Python's) over a folder, on a loopback port.
struct HttpServer {
    child: Child,
    port: u16,
}

impl HttpServer {
    fn start(dir: &Path) -> Option<HttpServer> {
        let port = free_port();
        let child = Command::new("python3")
            .args(["-m", "http.server", "--bind", "127.0.0.1", &port.to_string(), "--directory"])
            .arg(dir)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .ok()?;
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "http server did not start");
            std::thread::sleep(Duration::from_millis(50));
        }
        Some(HttpServer { child, port })
    }
}

impl Drop for HttpServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Tell the device a new model is waiting, as the cloud would.
fn notice(port: u16, topic: &str) {
    common::publish(port, topic, b"{}".to_vec(), false);
}

struct Device {
    octd: Octd,
    sub: Subscriber,
    broker: Mosquitto,
    channel: Channel,
    images: Vec<Vec<u8>>,
    dropped: usize,
    _dir: tempfile::TempDir,
}

impl Device {
    /// A channel holding the shipped model as 0.2.0, and a device (not started) on it, with
    /// `update_settings` (TOML lines) added to its `[update]` table.
    fn new(workers: usize, update_settings: &str) -> Option<Device> {
        let images: Vec<Vec<u8>> =
            common::shared_oct_images()?.iter().map(|(p, _)| std::fs::read(p).unwrap()).collect();
        if !mosquitto_available() {
            return None;
        }
        let dir = tempfile::tempdir().unwrap();
        let channel = Channel::new(&dir.path().join("operator"));
        channel.add(&channel.pack(&shipped_as(&channel.dir, "0.2.0"), "0.2.0"));
        let broker = Mosquitto::start(&dir.path().join("broker"));
        let sub = Subscriber::connect(broker.port, "oct/#");
        let octd = Octd::new(
            &dir.path().join("device"),
            OctdOptions {
                broker_url: broker.url(),
                workers,
                extra: String::new(),
                channel: Some((channel.repo.display().to_string(), channel.trusted_root())),
            },
        );
        let config = std::fs::read_to_string(&octd.config).unwrap();
        // Notices act at once here, unless a test sets its own pace.
        let pace = match update_settings.contains("notice_min_interval") {
            true => String::new(),
            false => "notice_min_interval = \"0s\"\nnotice_jitter = \"0s\"\n".to_string(),
        };
        let settings = format!("[update]\n{pace}{update_settings}");
        std::fs::write(&octd.config, config.replace("[update]\n", &settings)).unwrap();
        Some(Device { octd, sub, broker, channel, images, dropped: 0, _dir: dir })
    }

    fn scan(&mut self) {
        let bytes = self.images[self.dropped % self.images.len()].clone();
        drop_file(&self.octd.inbox, &format!("scan-{}.jpeg", self.dropped), &bytes);
        self.dropped += 1;
    }

    fn notice(&self) {
        notice(self.broker.port, "oct/test-site/test-device/model");
    }

    fn wait_event(&self, kind: &str, code: &str) -> serde_json::Value {
        self.wait_model_event(kind, code, None)
    }

    /// The first event of this kind and code (about `version`, when given).
    fn wait_model_event(&self, kind: &str, code: &str, version: Option<&str>) -> serde_json::Value {
        let found = |m: &[common::Message]| {
            events(m)
                .into_iter()
                .find(|e| e["kind"] == kind && e["code"] == code && version.is_none_or(|v| e["model_version"] == v))
        };
        let messages = self.sub.wait_until(MINUTE, |m| found(m).is_some(), &format!("event {kind}/{code}"));
        found(&messages).unwrap()
    }

    /// Drop one scan and return the model version of its result.
    fn classify_one(&mut self) -> String {
        let before = results(&self.sub.messages()).len();
        self.scan();
        let messages = self.sub.wait_until(MINUTE, |m| results(m).len() > before, "a result");
        let mut all: Vec<serde_json::Value> = results(&messages).into_values().collect();
        all.sort_by_key(|r| r["classified_at"].as_str().unwrap().to_string());
        all.last().unwrap()["model"]["version"].as_str().unwrap().to_string()
    }

    fn model_versions(&self) -> Vec<String> {
        results(&self.sub.messages()).values().map(|r| r["model"]["version"].as_str().unwrap().to_string()).collect()
    }
}

#[test]
fn new_model_over_http_is_installed_on_notice_and_named_in_status_and_results() {
    let Some(mut d) = Device::new(1, "") else { return };
    let Some(http) = HttpServer::start(&d.channel.repo) else {
        eprintln!("SKIP: python3 is needed to serve the channel over HTTP");
        return;
    };
    // The device reads the channel over HTTP; the operator writes the folder behind it.
    let root = d.channel.trusted_root();
    d.octd = Octd::new(
        &d.octd.root.clone(),
        OctdOptions {
            broker_url: d.broker.url(),
            workers: 1,
            extra: String::new(),
            channel: Some((format!("http://127.0.0.1:{}/", http.port), root)),
        },
    );
    // As in Device::new: the notice acts at once, not after the 60 s (+ jitter) pace.
    let config = std::fs::read_to_string(&d.octd.config).unwrap();
    let paced = config.replace("[update]\n", "[update]\nnotice_min_interval = \"0s\"\nnotice_jitter = \"0s\"\n");
    std::fs::write(&d.octd.config, paced).unwrap();
    d.octd.start();
    d.octd.wait_ready();
    assert_eq!(d.wait_event("model_installed", "installed")["model_version"], "0.2.0");
    assert_eq!(d.classify_one(), "0.2.0");

    let variant = model_variant(&d.channel.dir, "0.3.0", |_| {});
    d.channel.add(&d.channel.pack(&variant, "0.3.0"));
    d.notice();
    let installed = d.wait_model_event("model_installed", "installed", Some("0.3.0"));
    assert_eq!(installed["active_version"], "0.3.0");
    assert_eq!(d.classify_one(), "0.3.0");
    let status = d.sub.messages().into_iter().rev().find(|m| m.topic.ends_with("/status")).unwrap();
    assert!(status.payload.contains("\"version\":\"0.3.0\""), "{}", status.payload);
    let sha = hex::encode(Sha256::digest(std::fs::read(variant.join("model.onnx")).unwrap()));
    assert!(results(&d.sub.messages()).values().any(|r| r["model"]["sha256"] == sha.as_str()));
    // Recorded in the store as well as announced.
    assert!(d.octd.stop().success());
    let out =
        Command::new(env!("CARGO_BIN_EXE_octd")).args(["models", "--config"]).arg(&d.octd.config).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success() && text.contains("0.3.0") && text.contains("installed"), "{text}");
}

/// Publish `bundle` and expect the device to refuse it with `code`, still classifying with 0.2.0.
fn assert_refused(d: &mut Device, kind: &str, code: &str) -> serde_json::Value {
    d.notice();
    let event = d.wait_event(kind, code);
    assert_eq!(d.classify_one(), "0.2.0");
    assert!(d.model_versions().iter().all(|v| v == "0.2.0"), "a scan was classified by a refused model");
    event
}

/// A device that has installed 0.2.0 from its channel.
fn started(workers: usize) -> Option<Device> {
    let mut d = Device::new(workers, "")?;
    d.octd.start();
    d.octd.wait_ready();
    d.wait_model_event("model_installed", "installed", Some("0.2.0"));
    Some(d)
}

#[test]
fn flipped_byte_in_the_served_bundle_is_refused() {
    let Some(mut d) = started(1) else { return };
    let variant = model_variant(&d.channel.dir, "0.3.0", |_| {});
    d.channel.add(&d.channel.pack(&variant, "0.3.0"));
    let served = d.channel.served_bundle("0.3.0");
    let mut bytes = std::fs::read(&served).unwrap();
    let i = bytes.len() / 3;
    bytes[i] ^= 0x10;
    std::fs::write(&served, bytes).unwrap();
    let event = assert_refused(&mut d, "model_refused", "hash_mismatch");
    assert_eq!(event["model_version"], "0.3.0");
}

#[test]
fn bundle_whose_self_test_fails_is_refused() {
    let Some(mut d) = started(1) else { return };
    let variant = model_variant(&d.channel.dir, "0.3.0", |_| {});
    let good = d.channel.pack(&variant, "0.3.0");
    // The trainer (or an attacker with the targets key) ships expectations this model does not meet.
    let unpacked = d.channel.dir.join("unpacked");
    octd_bundle::archive::unpack(&good, &unpacked, Default::default()).unwrap();
    let path = unpacked.join("selftest.json");
    let mut selftest: serde_json::Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    for case in selftest["cases"].as_array_mut().unwrap() {
        let p = case["probabilities"]["CNV"].as_f64().unwrap();
        case["probabilities"]["CNV"] = (1.0 - p).into();
    }
    std::fs::write(&path, serde_json::to_vec(&selftest).unwrap()).unwrap();
    let bad = d.channel.dir.join("bad-selftest.tar.gz");
    octd_bundle::archive::pack_dir(&unpacked, &bad).unwrap();
    d.channel.add(&bad);
    assert_refused(&mut d, "model_refused", "selftest_failed");
}

#[test]
fn manifest_incompatible_with_this_device_is_refused() {
    let Some(mut d) = started(1) else { return };
    let variant = model_variant(&d.channel.dir, "0.3.0", |m| m["classes"][3] = "HEALTHY".into());
    // Packing runs the model, so it needs a device that knows the class; pack it directly.
    let bundle = d.channel.dir.join("incompatible.tar.gz");
    let st = d.channel.dir.join("st");
    std::fs::create_dir_all(st.join("selftest")).unwrap();
    for f in ["model.onnx", "manifest.json"] {
        std::fs::copy(variant.join(f), st.join(f)).unwrap();
    }
    std::fs::write(st.join("selftest/0.png"), std::fs::read(repo().join("models/default/roc_cv.png")).unwrap())
        .unwrap();
    let selftest = serde_json::json!({"format_version": 1, "tolerance": 0.001,
        "cases": [{"input": "selftest/0.png", "label": "HEALTHY", "probabilities": {}}]});
    std::fs::write(st.join("selftest.json"), selftest.to_string()).unwrap();
    octd_bundle::archive::pack_dir(&st, &bundle).unwrap();
    d.channel.add(&bundle);
    let event = assert_refused(&mut d, "model_refused", "incompatible");
    assert!(event["detail"].as_str().unwrap().contains("HEALTHY"), "{event}");
}

#[test]
fn same_version_with_other_content_is_refused_as_not_newer() {
    let Some(mut d) = started(1) else { return };
    let variant = model_variant(&d.channel.dir, "0.2.0", |_| {});
    d.channel.add(&d.channel.pack(&variant, "0.2.0"));
    let event = assert_refused(&mut d, "model_refused", "not_newer");
    assert_eq!(event["model_version"], "0.2.0");
}

#[test]
fn expired_timestamp_raises_an_alarm_naming_the_device_clock() {
    let Some(mut d) = started(1) else { return };
    let variant = model_variant(&d.channel.dir, "0.3.0", |_| {});
    let bundle = d.channel.pack(&variant, "0.3.0");
    d.channel.publish(&["--add", bundle.to_str().unwrap(), "--timestamp-expires", "1s"]);
    std::thread::sleep(Duration::from_millis(1500));
    let event = assert_refused(&mut d, "alarm", "metadata_expired");
    assert!(event["detail"].as_str().unwrap().contains("device clock"), "{event}");
}

#[test]
fn metadata_signed_by_a_key_outside_the_root_is_refused() {
    let Some(mut d) = started(1) else { return };
    // Someone with the snapshot and timestamp keys but not the targets key signs a new listing.
    let stranger = d.channel.dir.join("keys/stranger.pk8");
    octd(&["bundle", "keygen", stranger.to_str().unwrap()]);
    let forged_repo = d.channel.dir.join("forged");
    let k = &d.channel.keys;
    let s = |p: &Path| p.to_str().unwrap().to_string();
    octd(&[
        "bundle",
        "init",
        "--repo",
        &s(&forged_repo),
        "--root-key",
        &s(&k[0]),
        "--targets-key",
        &s(&stranger),
        "--snapshot-key",
        &s(&k[2]),
        "--timestamp-key",
        &s(&k[3]),
    ]);
    let variant = model_variant(&d.channel.dir, "0.3.0", |_| {});
    let bundle = d.channel.pack(&variant, "0.3.0");
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let days = |n: u64| octd_bundle::repo::expires_in(Duration::from_secs(n * 86_400)).unwrap();
    rt.block_on(octd_bundle::repo::publish(
        &d.channel.repo,
        &octd_bundle::repo::Publication {
            add: vec![bundle],
            withdraw: vec![],
            keys: vec![stranger.clone(), k[2].clone(), k[3].clone()],
            signing_root: Some(forged_repo.join("metadata/root.json")),
            targets_expires: days(30),
            snapshot_expires: days(30),
            timestamp_expires: days(7),
        },
    ))
    .unwrap();
    assert_refused(&mut d, "model_refused", "signature_invalid");
}

#[test]
fn crash_loop_after_an_install_rolls_back_and_the_bad_model_stays_out() {
    let gate = "max_boot_attempts = 2\ncommit_after_scans = 1000\ncommit_after = \"1h\"\n";
    let Some(mut d) = Device::new(1, gate) else { return };
    d.octd.start();
    d.octd.wait_ready();
    d.wait_model_event("model_installed", "installed", Some("0.2.0"));
    let variant = model_variant(&d.channel.dir, "0.3.0", |_| {});
    d.channel.add(&d.channel.pack(&variant, "0.3.0"));
    d.notice();
    d.wait_model_event("model_installed", "installed", Some("0.3.0"));
    // Killed while idle: no evidence against the new model, however often.
    for _ in 0..3 {
        d.octd.kill9();
        d.octd.start();
        d.octd.wait_ready();
    }
    assert_eq!(d.classify_one(), "0.3.0", "kills while idle are not a crash loop");
    // The process dies while the new model classifies a volume, start after start: the
    // third start finds two such deaths behind it.
    let images = common::shared_oct_images().expect("shared scans");
    let frames: Vec<Vec<u8>> = (0..64).map(|i| fixture::grey_frame(&images[i % images.len()].0, 512, 496)).collect();
    let volume = fixture::build(fixture::Spec::plain(
        fixture::OPT_SOP_CLASS,
        Pixels::Native { width: 512, height: 496, frames },
    ));
    for round in 0..2 {
        let before = d.octd.plain_log().matches("frames=64").count();
        drop_file(&d.octd.inbox, &format!("volume-{round}.dcm"), &volume);
        d.octd.wait_log("the volume was not de-identified", |log| log.matches("frames=64").count() > before);
        // 64 B-scans take more than a second of inference: die in the middle of it.
        std::thread::sleep(Duration::from_millis(300));
        d.octd.kill9();
        d.octd.start();
        d.octd.wait_ready();
    }
    let event = d.wait_event("model_rolled_back", "crash_loop");
    assert_eq!(event["model_version"], "0.3.0");
    assert_eq!(event["active_version"], "0.2.0");
    assert_eq!(d.classify_one(), "0.2.0");
    // The channel still lists 0.3.0, but this device will not take it again.
    d.notice();
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(d.classify_one(), "0.2.0");
}

#[test]
fn new_model_is_committed_after_its_health_gate_and_old_versions_are_pruned() {
    let gate = "commit_after_scans = 2\nkeep_versions = 2\n";
    let Some(mut d) = Device::new(1, gate) else { return };
    d.octd.start();
    d.octd.wait_ready();
    d.wait_model_event("model_installed", "installed", Some("0.2.0"));
    for version in ["0.3.0", "0.4.0"] {
        let variant = model_variant(&d.channel.dir, version, |_| {});
        d.channel.add(&d.channel.pack(&variant, version));
        d.notice();
        d.wait_model_event("model_installed", "installed", Some(version));
    }
    // 0.4.0 is pending and 0.3.0 is what it would roll back to: 0.2.0 is beyond keep_versions.
    // (The staging folder may not be cleared yet when the install event arrives.)
    let on_disk = |d: &Device| {
        let mut v: Vec<String> = std::fs::read_dir(d.octd.state.join("models"))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|name| name != ".staging")
            .collect();
        v.sort();
        v
    };
    // Pruning follows the install event: a 14 MB model takes a moment to remove.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while on_disk(&d) != ["0.3.0", "0.4.0"] && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(on_disk(&d), ["0.3.0", "0.4.0"]);
    assert!(events(&d.sub.messages()).iter().all(|e| e["kind"] != "model_committed"));
    assert_eq!(d.classify_one(), "0.4.0");
    assert_eq!(d.classify_one(), "0.4.0");
    let committed = d.wait_model_event("model_committed", "health_gate_passed", Some("0.4.0"));
    assert_eq!(committed["active_version"], "0.4.0");
    // Committed: restarts no longer count towards a crash loop.
    for _ in 0..4 {
        d.octd.kill9();
        d.octd.start();
        d.octd.wait_ready();
    }
    assert_eq!(d.classify_one(), "0.4.0");
    assert!(events(&d.sub.messages()).iter().all(|e| e["kind"] != "model_rolled_back"));
}

#[test]
fn installed_model_damaged_on_disk_is_rolled_back_at_start() {
    let Some(mut d) = started(1) else { return };
    let variant = model_variant(&d.channel.dir, "0.3.0", |_| {});
    d.channel.add(&d.channel.pack(&variant, "0.3.0"));
    d.notice();
    d.wait_model_event("model_installed", "installed", Some("0.3.0"));
    assert!(d.octd.stop().success());
    let onnx = d.octd.state.join("models/0.3.0/model.onnx");
    let mut bytes = std::fs::read(&onnx).unwrap();
    bytes.truncate(bytes.len() / 2);
    std::fs::write(&onnx, bytes).unwrap();
    d.octd.start();
    d.octd.wait_ready();
    let event = d.wait_event("model_rolled_back", "load_failed");
    assert_eq!(event["active_version"], "0.2.0");
    assert_eq!(d.classify_one(), "0.2.0");
}

#[test]
fn swap_and_rollback_under_load_lose_no_scan_and_stamp_every_result() {
    let Some(mut d) = started(2) else { return };
    let variant = model_variant(&d.channel.dir, "0.3.0", |_| {});
    let bundle = d.channel.pack(&variant, "0.3.0");
    let feed = |d: &mut Device, n: usize| {
        for _ in 0..n {
            d.scan();
            std::thread::sleep(Duration::from_millis(60));
        }
    };
    feed(&mut d, 10);
    d.channel.add(&bundle);
    d.notice();
    feed(&mut d, 15);
    d.wait_model_event("model_installed", "installed", Some("0.3.0"));
    feed(&mut d, 10);
    // The operator withdraws 0.3.0: the device falls back to 0.2.0 while scans flow.
    d.channel.publish(&["--withdraw", "0.3.0"]);
    d.notice();
    feed(&mut d, 15);
    d.wait_event("model_rolled_back", "withdrawn");
    feed(&mut d, 10);
    let total = d.dropped;
    let messages = d.sub.wait_until(2 * MINUTE, |m| results(m).len() == total, "every scan's result");
    let all = results(&messages);
    assert_eq!(all.len(), total, "every scan exactly one result");
    assert!(d.octd.quarantine_reasons().is_empty(), "no scan failed during the swaps");
    let sha = |dir: &Path| hex::encode(Sha256::digest(std::fs::read(dir.join("model.onnx")).unwrap()));
    let (old, new) = (sha(&repo().join("models/default")), sha(&variant));
    let mut count_new = 0;
    for r in all.values() {
        match r["model"]["version"].as_str().unwrap() {
            "0.2.0" => assert_eq!(r["model"]["sha256"], old.as_str()),
            "0.3.0" => {
                assert_eq!(r["model"]["sha256"], new.as_str());
                count_new += 1;
            }
            other => panic!("unexpected model {other}"),
        }
    }
    assert!(count_new > 0, "some scans ran on the new model");
    let mut by_time: Vec<&serde_json::Value> = all.values().collect();
    by_time.sort_by_key(|r| r["classified_at"].as_str().unwrap().to_string());
    assert!(by_time.iter().rev().take(5).all(|r| r["model"]["version"] == "0.2.0"), "after the rollback: 0.2.0");
}

#[test]
fn power_flapping_before_the_first_health_gate_keeps_the_model_and_every_scan() {
    // A fresh device whose first model is pending its health gate all along, killed again
    // and again from its first second while a backlog is processed.
    let gate = "max_boot_attempts = 3\ncommit_after_scans = 100000\ncommit_after = \"1h\"\n";
    let Some(mut d) = Device::new(2, gate) else { return };
    let total = 200;
    for _ in 0..total {
        d.scan();
    }
    d.octd.start();
    let mut seed = 0x2545_f491_4f6c_dd1du64;
    for _ in 0..24 {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        std::thread::sleep(Duration::from_millis(150 + seed % 1200));
        d.octd.kill9();
        d.octd.start();
    }
    d.octd.wait_ready();
    let accounted = |m: &[common::Message]| {
        let rejected: std::collections::HashSet<String> = events(m)
            .into_iter()
            .filter(|e| e["kind"] == "rejected")
            .map(|e| e["scan_id"].as_str().unwrap_or_default().to_string())
            .collect();
        results(m).len() + rejected.len()
    };
    let messages = d.sub.wait_until(Duration::from_secs(300), |m| accounted(m) >= total, "every scan accounted for");
    assert_eq!(accounted(&messages), total, "each scan once: a result or a reason");
    let rejected: Vec<serde_json::Value> = events(&messages).into_iter().filter(|e| e["kind"] == "rejected").collect();
    assert!(rejected.iter().all(|e| e["code"] == "poison_scan"), "only scans in hand at repeated deaths: {rejected:?}");
    assert!(
        results(&messages).len() >= total - 4,
        "almost every scan classified: {} of {total}",
        results(&messages).len()
    );
    assert!(results(&messages).values().all(|r| r["model"]["version"] == "0.2.0"));
    assert!(
        !events(&messages).iter().any(|e| e["kind"] == "model_rolled_back" || e["kind"] == "model_refused"),
        "the only model is never refused"
    );
    assert_eq!(std::fs::read_dir(&d.octd.inbox).unwrap().count(), 0);
    assert_eq!(d.classify_one(), "0.2.0", "still classifying after the storm");
}

#[test]
fn the_only_model_cut_short_on_disk_is_installed_again_from_the_channel() {
    // A power cut left the only installed model's weights half written.
    let Some(mut d) = started(1) else { return };
    assert!(d.octd.stop().success());
    let onnx = d.octd.state.join("models/0.2.0/model.onnx");
    let mut bytes = std::fs::read(&onnx).unwrap();
    bytes.truncate(bytes.len() / 2);
    std::fs::write(&onnx, bytes).unwrap();
    d.octd.start();
    d.octd.wait_ready();
    assert_eq!(d.classify_one(), "0.2.0", "verified and installed again, not left without a model");
    let whole = std::fs::read(&onnx).unwrap();
    let expected = std::fs::read(repo().join("models/default/model.onnx")).unwrap();
    assert_eq!(whole, expected, "the weights on disk are whole again");
}

#[test]
fn a_flood_of_model_notices_makes_a_bounded_number_of_channel_checks() {
    let Some(mut d) = Device::new(1, "notice_min_interval = \"2s\"\nnotice_jitter = \"500ms\"\n") else { return };
    d.octd.start();
    d.octd.wait_ready();
    d.wait_model_event("model_installed", "installed", Some("0.2.0"));
    let mut options = rumqttc::MqttOptions::new(format!("flood-{}", free_port()), "127.0.0.1", d.broker.port);
    options.set_keep_alive(Duration::from_secs(5));
    let (client, mut connection) = rumqttc::Client::new(options, 1000);
    let started = std::time::Instant::now();
    let flood = std::thread::spawn(move || {
        for i in 0..400 {
            let topic = if i % 2 == 0 { "oct/fleet/models" } else { "oct/test-site/test-device/model" };
            client.publish(topic, rumqttc::QoS::AtMostOnce, false, b"{}".to_vec()).unwrap();
            std::thread::sleep(Duration::from_millis(10));
        }
        let _ = client.disconnect();
    });
    for event in connection.iter() {
        if event.is_err() {
            break;
        }
    }
    flood.join().unwrap();
    // Give the last scheduled check its time, then count.
    std::thread::sleep(Duration::from_secs(3));
    let elapsed = started.elapsed().as_secs_f64();
    let checks = d.octd.plain_log().matches("model notice: checking the channel").count();
    let bound = (elapsed / 2.0).ceil() as usize + 1;
    assert!(checks >= 1, "the notices must still lead to a check");
    assert!(checks <= bound, "{checks} channel checks for 400 notices in {elapsed:.1}s (at most {bound})");
    // And the device still works.
    assert_eq!(d.classify_one(), "0.2.0");
    assert!(d.octd.stop().success());
}
