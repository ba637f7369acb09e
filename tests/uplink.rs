//! Confirmed verdicts reach the real `octd-trainer` through octd's durable uplink: signed with
//! the device identity key, delivered once each across a trainer outage and a kill -9 of the
//! daemon, a correction as the next revision, patients grouped by a keyed pseudonym of the
//! DICOM PatientID under the site key, and not a byte of identity in what the trainer holds.

mod common;

use std::time::Duration;

use common::dicom::{self as fixture, Pixels};
use common::trainer::{all_bytes, device_identity, sqlite_service};
use common::{assert_no_phi, drop_file, events, publish, results, Rig};
use serde_json::{json, Value};

const MINUTE: Duration = Duration::from_secs(60);

fn verdict(label: &str) -> Vec<u8> {
    let now = humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string();
    serde_json::to_vec(&json!({"schema": "octd.label/1", "label": label, "reviewer": "rv-1", "reviewed_at": now,
                                "comment": "call DOE^JOHN at 742 Evergreen"}))
    .unwrap()
}

fn wait_trainer(trainer: &common::trainer::Service, done: impl Fn(&Value) -> bool, what: &str) -> Value {
    let deadline = std::time::Instant::now() + MINUTE;
    loop {
        let s = trainer.status();
        if done(&s) {
            return s;
        }
        assert!(std::time::Instant::now() < deadline, "timed out waiting: {what}; trainer status {s}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn verdicts_reach_the_trainer_once_each_across_outages_and_kills_without_identity() {
    let Some(mut rig) = Rig::new(1, "oct/#") else { return };
    let root = rig.dir.path().to_path_buf();
    let Some(mut trainer) = sqlite_service(&root.join("trainer"), "[intake]\nholdout_fraction = 0.5\n") else { return };
    let (key, public_json, _) = device_identity(&root.join("octd-etc"), "test-site", "test-device");
    trainer.cli_json(&trainer.config.clone(), &["device", "add", public_json.to_str().unwrap()]);
    let site_key = root.join("octd-etc/site.key");
    std::fs::write(&site_key, [42u8; 32]).unwrap();
    let mut config = std::fs::read_to_string(&rig.octd.config).unwrap();
    config.push_str(&format!(
        "\n[uplink]\nurl = \"http://127.0.0.1:{}\"\nidentity_key = \"{}\"\nsite_key_file = \"{}\"\nretry_min = \"200ms\"\nretry_max = \"1s\"\n\
         patient_from_name = \"_(MRN[0-9]+)_\"\n",
        trainer.port,
        key.display(),
        site_key.display()
    ));
    std::fs::write(&rig.octd.config, config).unwrap();
    let octd_cli = |args: &[&str]| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_octd"))
            .arg("--config")
            .arg(&rig.octd.config)
            .args(args)
            .output()
            .unwrap();
        assert!(out.status.success(), "octd {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    };
    octd_cli(&["reviewer", "add", "rv-1"]);
    rig.octd.start();
    rig.octd.wait_ready();

    // Two B-scans of one patient as DICOM (PatientID MRN8675309), and one JPEG of the same
    // patient whose export name carries the identifier the site's pattern takes.
    for i in 0..2 {
        let dims = image::image_dimensions(&rig.images[i].0).unwrap();
        let dicom = fixture::build(fixture::Spec::plain(
            fixture::OPT_SOP_CLASS,
            Pixels::Jpeg { width: dims.0, height: dims.1, jpeg: rig.image(i) },
        ));
        drop_file(&rig.octd.inbox, &format!("DOE_JOHN_MRN8675309_{i}.dcm"), &dicom);
    }
    drop_file(&rig.octd.inbox, "DOE_JOHN_MRN8675309_19450704.jpeg", &rig.image(5));
    let messages = rig.sub.wait_until(MINUTE, |m| results(m).len() == 3, "three results");
    let mut scans: Vec<(String, String)> =
        results(&messages).into_iter().map(|(id, r)| (id, r["label"].as_str().unwrap().to_string())).collect();
    scans.sort();
    let topic = |id: &str| format!("oct/test-site/test-device/labels/{id}");

    // The trainer is down while the first two verdicts are given: they wait and are retried.
    publish(rig.broker.port, &topic(&scans[0].0), verdict(&scans[0].1), false);
    publish(rig.broker.port, &topic(&scans[1].0), verdict(&scans[1].1), false);
    rig.sub.wait_until(
        MINUTE,
        |m| events(m).iter().filter(|e| e["kind"] == "label_accepted").count() == 2,
        "two verdicts stored",
    );
    std::thread::sleep(Duration::from_millis(1500));
    assert!(rig.octd.log().contains("verdict not delivered; retrying"), "the outage was retried");
    let doctor = |config: &std::path::Path| -> Value {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_octd"))
            .arg("--config")
            .arg(config)
            .args(["doctor", "--json"])
            .output()
            .unwrap();
        let report: Value = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
        let checks = report["checks"].as_array().cloned().unwrap_or_default();
        checks.into_iter().find(|c| c["check"] == "uplink").unwrap_or_else(|| panic!("no uplink check: {report}"))
    };
    let down = doctor(&rig.octd.config);
    assert_eq!(down["status"], "fail", "{down}");
    trainer.start();
    // Doctor proves the device is enrolled with a signed request, not only that the URL answers.
    let up = doctor(&rig.octd.config);
    assert_eq!(up["status"], "ok", "{up}");
    assert!(up["summary"].as_str().unwrap().contains("test-site/test-device"), "{up}");
    wait_trainer(&trainer, |s| s["labels"]["scans"] == 2, "two labels after the outage");

    // A third verdict while the trainer is down again, and the daemon killed: the queue
    // survives, and the verdict arrives once both are back.
    trainer.kill();
    publish(rig.broker.port, &topic(&scans[2].0), verdict(&scans[2].1), false);
    rig.sub.wait_until(
        MINUTE,
        |m| events(m).iter().filter(|e| e["kind"] == "label_accepted").count() == 3,
        "the third verdict stored",
    );
    std::thread::sleep(Duration::from_millis(500));
    rig.octd.kill9();
    rig.octd.start();
    rig.octd.wait_ready();
    trainer.start();
    wait_trainer(&trainer, |s| s["labels"]["scans"] == 3, "three labels after the kill");

    // A correction is the next revision; the image is not sent twice.
    let other = if scans[0].1 == "NORMAL" { "CNV" } else { "NORMAL" };
    publish(rig.broker.port, &topic(&scans[0].0), verdict(other), false);
    let s = wait_trainer(&trainer, |s| s["labels"]["revisions"] == 4, "the correction");
    assert_eq!(s["labels"]["scans"], 3, "{s}");
    // All three scans are one patient: the DICOM PatientID and the identifier in the JPEG's
    // name give the same pseudonym under the site key.
    let splits = &s["labels"]["patients_by_split"];
    let patients: u64 = splits.as_object().unwrap().values().map(|v| v.as_u64().unwrap_or(0)).sum();
    assert_eq!(patients, 1, "one patient for the two DICOM scans and the named JPEG: {s}");
    // An undone first verdict reaches the trainer as a withdrawal: that scan has no label there.
    let now = humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string();
    let undo = json!({"schema": "octd.label/1", "undo": true, "reviewer": "rv-1", "reviewed_at": now});
    publish(rig.broker.port, &topic(&scans[1].0), serde_json::to_vec(&undo).unwrap(), false);
    let s = wait_trainer(&trainer, |s| s["labels"]["revisions"] == 5, "the withdrawal");
    assert_eq!(s["labels"]["scans"], 2, "the withdrawn scan counts nowhere: {s}");
    // A revoked device is refused: doctor says so with the fix, and its next verdict waits.
    trainer.cli_json(&trainer.config.clone(), &["device", "revoke", "test-site/test-device"]);
    let revoked = doctor(&rig.octd.config);
    assert_eq!(revoked["status"], "fail", "{revoked}");
    assert!(revoked["summary"].as_str().unwrap().contains("revoked"), "{revoked}");
    publish(rig.broker.port, &topic(&scans[1].0), verdict(other), false);
    std::thread::sleep(Duration::from_millis(1500));
    let s = trainer.status();
    assert_eq!(s["labels"]["revisions"], 5, "nothing from a revoked device is stored: {s}");
    let alarms: Vec<Value> = events(&rig.sub.messages())
        .into_iter()
        .filter(|e| e["code"].as_str().unwrap_or("").starts_with("uplink_"))
        .collect();
    assert!(alarms.is_empty(), "nothing was refused, stalled or misconfigured: {alarms:?}");
    assert!(rig.octd.stop().success());
    trainer.kill();

    // What the trainer holds: no name, ID, birth date, address, file name or comment.
    let held = all_bytes(&trainer.dir.join("blobs"));
    let db = all_bytes(&trainer.dir);
    assert_no_phi(&held, "the trainer's images");
    assert_no_phi(&db, "the trainer's files");
    // Nor the scans' ids, which hold their arrival times.
    for needle in ["MRN8675309", "DOE_JOHN", "Evergreen", scans[0].0.as_str(), scans[2].0.as_str()] {
        assert!(!db.windows(needle.len()).any(|w| w == needle.as_bytes()), "the trainer holds {needle}");
    }
}
