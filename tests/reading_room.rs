//! The reading room in a real Chromium (playwright-core from npm, Debian's chromium) against
//! the real daemon and a real Mosquitto with a websockets listener: tests/browser/reading_room.mjs
//! drives the page; this side sets everything up and checks what the page did where it
//! matters: the verdicts in the store and on the events topic, attributed to the reviewer, and
//! no identity in any MQTT message.
//!
//! Skipped with a message where chromium, node or `tests/browser/node_modules` is missing,
//! unless OCTD_REQUIRE_BROWSER=1 (`scripts/test.sh` sets it after installing them).

mod common;

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use common::dicom as fixture;
use common::{
    assert_no_phi, events, free_port, mosquitto_available, repo, results, shared_oct_images, Mosquitto, Octd,
    OctdOptions, Subscriber,
};
use serde_json::Value;

const PASSWORD: &str = "correct horse battery staple";

fn browser_ready() -> Option<(PathBuf, PathBuf)> {
    let chromium =
        ["/usr/bin/chromium", "/usr/bin/chromium-browser"].into_iter().map(PathBuf::from).find(|p| p.exists());
    let node = Command::new("node").arg("--version").output().ok().filter(|o| o.status.success());
    let modules = repo().join("tests/browser/node_modules/playwright-core");
    match (chromium, node, modules.is_dir()) {
        (Some(chromium), Some(_), true) => Some((chromium, repo().join("tests/browser/reading_room.mjs"))),
        _ => {
            let why = "needs chromium, node and `npm ci --prefix tests/browser` (scripts/test.sh installs them)";
            assert!(std::env::var("OCTD_REQUIRE_BROWSER").is_err(), "browser test {why}");
            eprintln!("skipping the browser test: it {why}");
            None
        }
    }
}

#[test]
fn a_reviewer_works_through_the_worklist_by_keyboard_in_chromium() {
    let Some(images) = shared_oct_images() else { return };
    if !mosquitto_available() {
        return;
    }
    let Some((chromium, script)) = browser_ready() else { return };
    let dir = tempfile::tempdir().unwrap();
    let ws_port = free_port();
    // Displays subscribe over WebSockets; the page gets the address from octd's API.
    let broker = Mosquitto::start_with(
        &dir.path().join("broker"),
        &format!("listener {ws_port} 127.0.0.1\nprotocol websockets\nallow_anonymous true\n"),
    );
    let sub = Subscriber::connect(broker.port, "oct/#");
    let mut octd = Octd::new(
        &dir.path().join("octd"),
        OctdOptions { broker_url: broker.url(), workers: 1, extra: String::new(), channel: None },
    );
    octd.enable_display();
    // The shipped model gives activation maps (its manifest says so): the page must draw them.
    let shipped = common::shipped_manifest();
    let has_heatmap = shipped.get("heatmap").is_some();
    assert!(has_heatmap, "the shipped model gives activation maps (docs/model-manifest.md)");
    octd.env.push(("OCTD_DISPLAY__MQTT_WEBSOCKET".into(), format!("ws://127.0.0.1:{ws_port}")));
    common::add_reviewer(&octd.config, "dr-grey", PASSWORD);
    octd.start();
    octd.wait_ready();

    // One scan of each class, named as a scanner would name them (identity in the name).
    let mut scans = Vec::new();
    for class in ["NORMAL", "CNV", "DRUSEN", "DME", "NORMAL", "CNV"] {
        let (path, _) = images.iter().filter(|(_, l)| l == class).nth(scans.len() / 4).unwrap();
        scans.push(serde_json::json!({"path": path, "name": format!("DOE_JANE_MRN4417_{}.jpeg", scans.len())}));
    }
    // A volume: NORMAL B-scans and one CNV slice, which it must open at.
    let volume = dir.path().join("volume.dcm");
    std::fs::write(&volume, fixture::volume_with_cnv_at(&images, 7, 12, 512, 496)).unwrap();
    let shots = std::env::var("OCTD_SCREENSHOTS").unwrap_or_default();
    // The page's shell answers without a session (it holds no data); its data does not.
    let (status, page) = octd.http_get_display("/").expect("the page is served");
    assert_eq!(status, 200);
    assert!(page.contains("octd reading room"));
    for path in ["/api/v1/display", "/api/v1/scans", "/api/v1/scans/01a24e28-ee09-75bf-83bc-20d7d4905fa1/frame?n=0"] {
        assert_eq!(octd.http_get_display(path).map(|r| r.0), Some(401), "{path} without a session");
    }

    let uploads: Vec<&PathBuf> = images.iter().filter(|(_, l)| l == "DME").map(|(p, _)| p).take(2).collect();
    let outage_scan = &images.iter().filter(|(_, l)| l == "DRUSEN").nth(1).unwrap().0;
    let signals = dir.path().join("signals");
    std::fs::create_dir_all(&signals).unwrap();

    let mut broker = broker;
    let mut node = Command::new("node")
        .arg(&script)
        .current_dir(repo().join("tests/browser"))
        .env("CHROMIUM", &chromium)
        .env("OCTD_URL", format!("http://127.0.0.1:{}/", octd.display_port))
        .env("OCTD_REVIEWER", "dr-grey")
        .env("OCTD_PASSWORD", PASSWORD)
        .env("OCTD_INBOX", &octd.inbox)
        .env("OCTD_SCANS", Value::Array(scans.clone()).to_string())
        .env("OCTD_VOLUME", &volume)
        .env("OCTD_SHOTS", &shots)
        .env("OCTD_UPLOADS", serde_json::json!(uploads).to_string())
        .env("OCTD_SIGNALS", &signals)
        .env("OCTD_OUTAGE_SCAN", outage_scan)
        .env("OCTD_HEATMAP", if has_heatmap { "1" } else { "0" })
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("node runs");
    // The page asks for the broker to go away and come back (files in `signals`).
    let (mut stopped, mut started) = (false, false);
    while node.try_wait().unwrap().is_none() {
        if !stopped && signals.join("stop-broker").exists() {
            broker.stop();
            stopped = true;
            std::fs::write(signals.join("broker-stopped"), "").unwrap();
        }
        if stopped && !started && signals.join("start-broker").exists() {
            broker.restart();
            started = true;
            std::fs::write(signals.join("broker-started"), "").unwrap();
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let run = node.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&run.stdout);
    assert!(
        run.status.success(),
        "the browser run failed:\n{stdout}\n{}\n--- octd log ---\n{}",
        String::from_utf8_lossy(&run.stderr),
        octd.plain_log()
    );
    let done: Value = serde_json::from_str(stdout.lines().last().unwrap_or("{}")).unwrap();
    assert!(done["refused"].as_str().unwrap().contains("password"), "{done}");
    assert!(done["priorities"].as_array().unwrap().len() >= 2, "more than one priority to order: {done}");
    assert_eq!(done["volume"]["opened_at"], 7, "the volume opened at its CNV slice: {done}");
    assert_eq!(done["volume"]["frame_size"], serde_json::json!([512, 496]));
    if has_heatmap {
        assert_eq!(done["heatmap_size"], serde_json::json!([512, 496]), "drawn at the B-scan's size: {done}");
    }

    assert!(done["revealed"]["shown"].as_str().unwrap().contains("DOE_JANE_MRN4417"), "{done}");
    assert_eq!(done["uploaded"], 2, "{done}");
    assert!(done["upload_refused"].as_str().unwrap().contains("1 refused: not a JPEG"), "{done}");
    assert!(done["caught_up"].is_string(), "{done}");
    assert_eq!(
        done["stale_answer_ignored"], true,
        "the second display ignored an answer older than the verdicts: {done}"
    );
    // Each reveal is logged with who and which scan, never the identity itself.
    let revealed = done["revealed"]["scan_id"].as_str().unwrap();
    let log = octd.plain_log();
    let line = log.lines().find(|l| l.contains("identity revealed")).expect("the reveal is logged");
    assert!(line.contains(revealed) && line.contains("dr-grey"), "{line}");
    assert!(!log.contains("MRN4417"), "no identity in the log");

    // The verdicts are stored and announced, in the reviewer's name, as given by keyboard.
    let messages = sub.wait_until(
        Duration::from_secs(30),
        |m| events(m).iter().filter(|e| e["kind"] == "label_accepted").count() >= 4,
        "the verdicts, the undo and the confirmation announced",
    );
    let accepted: Vec<Value> = events(&messages).into_iter().filter(|e| e["kind"] == "label_accepted").collect();
    let confirmed = accepted.iter().find(|e| e["scan_id"] == done["confirmed"]["scan_id"]).expect("confirmation");
    assert_eq!(confirmed["code"], "confirmed");
    assert_eq!(confirmed["label"], done["confirmed"]["label"]);
    let second: Vec<&Value> = accepted.iter().filter(|e| e["scan_id"] == done["corrected"]["scan_id"]).collect();
    let codes: Vec<&str> = second.iter().map(|e| e["code"].as_str().unwrap()).collect();
    assert_eq!(codes, ["corrected", "withdrawn", "confirmed"], "correct, undo, confirm: {second:?}");
    assert_eq!(second[0]["label"], done["corrected"]["label"]);
    assert_ne!(done["corrected"]["label"], done["corrected"]["predicted"]);
    assert_eq!(second[2]["revision"], 3);
    // As the API read them back from the store after the page had given them.
    for (which, revision) in [("confirmed", 1), ("reconfirmed", 3)] {
        let id = done[which]["scan_id"].as_str().unwrap();
        let stored = &done["stored"][id];
        assert_eq!(stored["label"], done[which]["label"], "{done}");
        assert_eq!(stored["reviewer"], "dr-grey");
        assert_eq!(stored["confirmed"], true);
        assert_eq!(stored["revision"], revision);
    }
    let messages = sub.wait_until(
        Duration::from_secs(60),
        |m| results(m).len() == scans.len() + 4,
        "every result, the uploads' and the outage's included",
    );
    for m in &messages {
        assert_no_phi(m.payload.as_bytes(), &m.topic);
        assert!(!m.payload.contains("DOE_JANE") && !m.payload.contains("MRN4417"), "{}", m.payload);
    }
    assert!(octd.stop().success());
}
