//! Reviewers' verdicts through the real daemon and a real Mosquitto: confirmations and
//! corrections over MQTT and `octd label`, every refusal answered with its reason and nothing
//! stored, revisions, the live accuracy (retained `octd.quality/1`) and its alarm, comments
//! kept sealed on the device, and all of it surviving a restart.

mod common;

use std::process::Command;
use std::time::Duration;

use common::{drop_file, events, publish, results, Rig};
use serde_json::{json, Value};

const MINUTE: Duration = Duration::from_secs(60);
const COMMENT: &str = "Mrs Evelyn Marchetti, follow-up in 2 weeks";

fn octd_cli(config: &std::path::Path, args: &[&str]) -> (bool, Value, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_octd")).arg("--config").arg(config).args(args).output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    (out.status.success(), serde_json::from_str(&stdout).unwrap_or(Value::Null), stderr)
}

fn now() -> String {
    humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string()
}

fn verdict(label: &str, reviewer: &str) -> Vec<u8> {
    serde_json::to_vec(&json!({"schema": "octd.label/1", "label": label, "reviewer": reviewer, "reviewed_at": now()}))
        .unwrap()
}

fn label_events(messages: &[common::Message], kind: &str) -> Vec<Value> {
    events(messages).into_iter().filter(|e| e["kind"] == kind).collect()
}

/// A class other than `label` among the model's.
fn other_than(label: &str) -> &'static str {
    if label == "NORMAL" {
        "CNV"
    } else {
        "NORMAL"
    }
}

#[test]
fn verdicts_are_checked_stored_as_revisions_and_drive_live_accuracy_and_its_alarm() {
    let Some(mut rig) = Rig::new(1, "oct/#") else { return };
    // Three verdicts suffice to judge, and 0.9 is the floor.
    rig.octd.env.push(("OCTD_FEEDBACK__MIN_LABELS".into(), "3".into()));
    rig.octd.env.push(("OCTD_FEEDBACK__ACCURACY_FLOOR".into(), "0.9".into()));
    let config = rig.octd.config.clone();
    let (ok, added, err) = octd_cli(&config, &["reviewer", "add", "rv-1"]);
    assert!(ok, "{err}");
    assert_eq!(added["reviewer"], "rv-1");
    let (ok, _, err) = octd_cli(&config, &["reviewer", "add", "Dr Jane Smith"]);
    assert!(!ok && err.contains("pseudonym"), "a name is not a reviewer id: {err}");
    rig.octd.start();
    rig.octd.wait_ready();
    for i in 0..3 {
        drop_file(&rig.octd.inbox, &format!("scan-{i}.jpeg"), &rig.image(i * 7));
    }
    let messages = rig.sub.wait_until(MINUTE, |m| results(m).len() == 3, "three results");
    let mut scans: Vec<(String, String)> =
        results(&messages).into_iter().map(|(id, r)| (id, r["label"].as_str().unwrap().to_string())).collect();
    scans.sort();
    let topic = |id: &str| format!("oct/test-site/test-device/labels/{id}");
    let port = rig.broker.port;

    // Refusals: each answered with its reason, none stored.
    let unknown = "01900000-0000-7000-8000-000000000000";
    publish(port, &topic(unknown), verdict("CNV", "rv-1"), false);
    publish(port, &topic(&scans[0].0), verdict("GLAUCOMA", "rv-1"), false);
    publish(port, &topic(&scans[0].0), b"{not json".to_vec(), false);
    publish(port, &topic(&scans[0].0), verdict("CNV", "rv-9"), false);
    publish(port, &topic(&scans[0].0), verdict("CNV", ""), false);
    let long = json!({"schema": "octd.label/1", "label": "CNV", "reviewer": "rv-1",
                      "reviewed_at": now(), "comment": "x".repeat(9000)});
    publish(port, &topic(&scans[0].0), serde_json::to_vec(&long).unwrap(), false);
    let messages = rig.sub.wait_until(MINUTE, |m| label_events(m, "label_rejected").len() == 6, "six refusals");
    let codes: Vec<String> =
        label_events(&messages, "label_rejected").iter().map(|e| e["code"].as_str().unwrap().to_string()).collect();
    assert_eq!(
        codes,
        ["unknown_scan", "unknown_class", "malformed", "unknown_reviewer", "reviewer_missing", "too_large"],
        "in the order sent"
    );
    assert!(label_events(&messages, "label_accepted").is_empty(), "nothing refused is stored");

    // A confirmation over MQTT, a correction over MQTT, a confirmation with a comment from the CLI.
    let (a, a_said) = &scans[0];
    let (b, b_said) = &scans[1];
    let (c, c_said) = &scans[2];
    publish(port, &topic(a), verdict(a_said, "rv-1"), false);
    publish(port, &topic(b), verdict(other_than(b_said), "rv-1"), false);
    // With a comment and a verdict id, sent twice (as a display does without an answer).
    let with_comment = json!({"schema": "octd.label/1", "label": c_said, "reviewer": "rv-1", "verdict_id": "d1-0042",
                              "reviewed_at": now(), "comment": COMMENT});
    publish(port, &topic(c), serde_json::to_vec(&with_comment).unwrap(), false);
    publish(port, &topic(c), serde_json::to_vec(&with_comment).unwrap(), false);
    let messages = rig.sub.wait_until(MINUTE, |m| label_events(m, "label_accepted").len() >= 3, "three verdicts");
    assert_eq!(label_events(&messages, "label_accepted")[0]["revision"], 1, "the refusals stored nothing");
    std::thread::sleep(Duration::from_secs(1));
    let messages = rig.sub.messages();
    let accepted = label_events(&messages, "label_accepted");
    assert_eq!(accepted.len(), 3, "the verdict sent again is no new revision: {accepted:?}");
    let by_scan = |id: &str| accepted.iter().find(|e| e["scan_id"] == id).cloned().unwrap();
    assert_eq!(by_scan(a)["code"], "confirmed");
    assert_eq!(by_scan(b)["code"], "corrected");
    assert_eq!(by_scan(b)["label"], other_than(b_said));
    assert_eq!(by_scan(c)["reviewer"], "rv-1");
    // 2 of 3 confirmed: 0.67 < 0.9 over 3 verdicts raises the alarm, once.
    let messages = rig.sub.wait_until(
        MINUTE,
        |m| events(m).iter().any(|e| e["kind"] == "alarm" && e["code"] == "accuracy_below_floor"),
        "the accuracy alarm",
    );
    let quality: Vec<Value> = messages
        .iter()
        .filter(|m| m.topic == "oct/test-site/test-device/quality")
        .map(|m| serde_json::from_str(&m.payload).unwrap())
        .collect();
    let last = quality.last().unwrap();
    assert_eq!(last["schema"], "octd.quality/1");
    assert_eq!(last["overall"]["labels"], 3);
    assert_eq!(last["overall"]["correct"], 2);
    assert_eq!(last["below_floor"], true);

    // A correction of a correction: revision 2 counts, and accuracy recovers to 3/3.
    let (ok, answer, err) = octd_cli(&config, &["label", b, b_said, "--reviewer", "rv-1"]);
    assert!(ok, "{err}");
    assert_eq!(answer["revision"], 2);
    assert_eq!(answer["code"], "confirmed");
    let messages = rig.sub.wait_until(
        MINUTE,
        |m| events(m).iter().any(|e| e["kind"] == "alarm_cleared" && e["code"] == "accuracy_below_floor"),
        "the alarm cleared",
    );
    let alarms =
        events(&messages).iter().filter(|e| e["kind"] == "alarm" && e["code"] == "accuracy_below_floor").count();
    assert_eq!(alarms, 1, "raised once");
    // The comment never left the device, nor is it kept in plain text.
    for m in messages.iter().filter(|m| !m.topic.contains("/labels/")) {
        assert!(!m.payload.contains("Marchetti"), "octd's {} carries the comment", m.topic);
    }
    let status = rig.octd.http_get("/status").unwrap().1;
    let status: Value = serde_json::from_str(&status).unwrap();
    assert_eq!(status["live_accuracy"]["overall"]["correct"], 3, "{status}");
    let metrics = rig.octd.http_get("/metrics").unwrap().1;
    assert!(metrics.contains("octd_labels_total{outcome=\"rejected\"} 6"), "{metrics}");
    assert!(metrics.contains("octd_live_accuracy 1"), "{metrics}");
    // A display that wrongly retains its verdict: it counts once, live; the broker's replay of
    // it at the next subscription is no new verdict.
    publish(port, &topic(a), verdict(a_said, "rv-1"), true);
    rig.sub.wait_until(
        MINUTE,
        |m| label_events(m, "label_accepted").iter().any(|e| e["scan_id"] == a.as_str() && e["revision"] == 2),
        "the retained verdict, live",
    );
    assert!(rig.octd.stop().success());
    let store = std::fs::read(rig.octd.state.join("octd.redb")).unwrap();
    assert!(!store.windows(9).any(|w| w == b"Marchetti"), "the comment is sealed at rest");

    // Verdicts survive a restart: the next revision of b is 3, and the report is republished.
    rig.octd.start();
    rig.octd.wait_ready();
    let (ok, answer, err) = octd_cli(&config, &["label", b, b_said, "--reviewer", "rv-1"]);
    assert!(ok, "{err}");
    assert_eq!(answer["revision"], 3);
    let replays =
        label_events(&rig.sub.messages(), "label_accepted").iter().filter(|e| e["scan_id"] == a.as_str()).count();
    assert_eq!(replays, 2, "the retained verdict's replay after the restart was ignored");
    // Removing a reviewer refuses their next verdict.
    let (ok, _, err) = octd_cli(&config, &["reviewer", "remove", "rv-1"]);
    assert!(ok, "{err}");
    let (ok, _, err) = octd_cli(&config, &["label", a, a_said, "--reviewer", "rv-1"]);
    assert!(!ok && err.contains("unknown_reviewer"), "{err}");
    assert!(rig.octd.stop().success());
    // With the daemon stopped, a verdict is refused at once and nothing is left waiting.
    octd_cli(&config, &["reviewer", "add", "rv-1"]);
    let (ok, _, err) = octd_cli(&config, &["label", a, a_said, "--reviewer", "rv-1", "--wait", "2s"]);
    assert!(!ok && err.contains("not running"), "{err}");
    let waiting = std::fs::read_dir(rig.octd.state.join("requests/labels")).map(|d| d.count()).unwrap_or(0);
    assert_eq!(waiting, 0, "no request left behind");
    assert!(!rig.octd.log().contains("Marchetti"), "the comment is not logged");
}
