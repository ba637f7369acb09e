//! The daemon end to end: real folders, real Mosquitto (stopped and restarted for outages),
//! real redb, the real binary killed with SIGKILL.

mod common;

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use common::{assert_no_phi, drop_file, events, results, Rig};
use serde_json::Value;

/// A name a scanner might really write: identity in the file name.
fn phi_name(i: usize, ext: &str) -> String {
    format!("DOE_JOHN_MRN8675309_19450704_{i:03}.{ext}")
}

fn check_result(result: &Value, manifest: &Value) {
    assert_eq!(result["schema"], "octd.result/1");
    assert_eq!(result["site"], "test-site");
    let classes: Vec<&str> = manifest["classes"].as_array().unwrap().iter().map(|c| c.as_str().unwrap()).collect();
    let label = result["label"].as_str().unwrap();
    assert!(classes.contains(&label), "label {label}");
    let probabilities = result["probabilities"].as_object().unwrap();
    assert_eq!(probabilities.len(), classes.len());
    let sum: f64 = probabilities.values().map(|v| v.as_f64().unwrap()).sum();
    assert!((sum - 1.0).abs() < 1e-3, "single B-scan probabilities sum to 1, got {sum}");
    let confidence = result["confidence"].as_f64().unwrap();
    assert!((confidence - probabilities[label].as_f64().unwrap()).abs() < 1e-6);
    assert!(result["needs_review"].is_boolean());
    let priority = result["priority"].as_str().unwrap();
    assert!(["urgent", "follow_up", "routine"].contains(&priority));
    assert_eq!(result["model"]["sha256"], manifest["sha256"]);
    assert_eq!(result["model"]["backend"], common::default_backend());
    assert!(result["timings_ms"]["infer_ms"].as_u64().is_some());
}

#[test]
fn shared_images_become_deidentified_results_on_mqtt() {
    let Some(Rig { images, sub, mut octd, broker: _broker, dir: _dir }) = Rig::new(2, "oct/#") else { return };
    octd.start();
    for (i, (path, _)) in images.iter().enumerate() {
        drop_file(&octd.inbox, &phi_name(i, "jpeg"), &std::fs::read(path).unwrap());
    }
    let messages = sub.wait_until(Duration::from_secs(180), |m| results(m).len() >= images.len(), "a result per image");
    let manifest = common::shipped_manifest();
    let found = results(&messages);
    assert_eq!(found.len(), images.len());
    for result in found.values() {
        check_result(result, &manifest);
    }
    // Status: retained, online, naming the model.
    let status: Vec<&common::Message> =
        messages.iter().filter(|m| m.topic == "oct/test-site/test-device/status").collect();
    let online: Value = serde_json::from_str(&status.last().expect("a status message").payload).unwrap();
    assert_eq!(online["state"], "online");
    assert_eq!(online["model"]["sha256"], manifest["sha256"]);

    // Nothing left in the inbox or the spool; identity nowhere outside the sealed linkage.
    assert_eq!(std::fs::read_dir(&octd.inbox).unwrap().count(), 0);
    assert!(octd.stop().success(), "clean exit on SIGTERM");
    assert_eq!(std::fs::read_dir(octd.state.join("spool")).unwrap().count(), 0);
    for m in &messages {
        assert_no_phi(m.payload.as_bytes(), "an MQTT payload");
        assert_no_phi(m.topic.as_bytes(), "an MQTT topic");
    }
    assert_no_phi(octd.log().as_bytes(), "the daemon log");
    for entry in std::fs::read_dir(octd.state.join("deid")).unwrap().flatten() {
        assert!(!entry.file_name().to_string_lossy().contains("DOE"));
        assert_no_phi(&std::fs::read(entry.path()).unwrap(), "a de-identified artefact");
    }
    let store = std::fs::read(octd.state.join("octd.redb")).unwrap();
    assert_no_phi(&store, "the store file (linkage is sealed)");
    // After a clean stop the retained status says offline.
    let after = sub.wait_until(
        Duration::from_secs(10),
        |m| m.iter().rev().find(|m| m.topic.ends_with("/status")).is_some_and(|m| m.payload.contains("\"offline\"")),
        "offline status",
    );
    assert!(after.iter().any(|m| m.topic.ends_with("/status") && m.payload.contains("offline")));
}

#[test]
fn results_survive_a_broker_outage_and_arrive_in_order() {
    // One worker: scans are classified in claim order, so the outbox order is known.
    let Some(Rig { images, mut broker, sub, mut octd, dir: _dir }) = Rig::new(1, "oct/+/+/results/#") else { return };
    octd.start();
    drop_file(&octd.inbox, "warmup.jpeg", &std::fs::read(&images[0].0).unwrap());
    sub.wait_until(Duration::from_secs(60), |m| results(m).len() == 1, "first result");

    broker.stop();
    let n = 12;
    for i in 0..n {
        drop_file(&octd.inbox, &phi_name(i, "jpeg"), &std::fs::read(&images[(i * 3) % images.len()].0).unwrap());
        std::thread::sleep(Duration::from_millis(40)); // distinct mtimes: claim order = drop order
    }
    // Everything is classified and waiting in the outbox while the broker is down.
    std::thread::sleep(Duration::from_secs(4));
    assert_eq!(results(&sub.messages()).len(), 1, "nothing can arrive while the broker is down");
    broker.restart();
    let messages =
        sub.wait_until(Duration::from_secs(120), |m| results(m).len() == n + 1, "all results after the outage");

    // In order: first arrivals of each scan id come in increasing (UUIDv7 = claim) order.
    let mut seen = HashSet::new();
    let order: Vec<String> = messages
        .iter()
        .filter_map(|m| serde_json::from_str::<Value>(&m.payload).ok())
        .map(|v| v["scan_id"].as_str().unwrap().to_string())
        .filter(|id| seen.insert(id.clone()))
        .collect();
    let mut sorted = order.clone();
    sorted.sort();
    assert_eq!(order, sorted, "results arrive in the order the scans were taken");
}

#[test]
fn kill_9_at_random_points_loses_nothing() {
    let Some(Rig { images, sub, mut octd, broker: _broker, dir: _dir }) = Rig::new(2, "oct/#") else { return };
    let good = 24;
    let bad = 4;
    let mut rng = 0x2545_F491_4F6C_DD1Du64;
    let mut next = move |n: u64| {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng % n
    };
    // Seven kills from outside: a good scan in hand at two of them is not a poison scan, which
    // `tests/hardening.rs` covers; this test is about losing nothing.
    octd.env.push(("OCTD_PIPELINE__MAX_ATTEMPTS".into(), "8".into()));
    octd.start();
    for i in 0..good + bad {
        if i % 7 == 3 {
            drop_file(&octd.inbox, &format!("broken_{i}.jpeg"), b"not an image at all");
        } else {
            drop_file(&octd.inbox, &phi_name(i, "jpeg"), &std::fs::read(&images[i % images.len()].0).unwrap());
        }
        if next(4) == 0 {
            std::thread::sleep(Duration::from_millis(100 + next(900)));
            octd.kill9();
            octd.start();
        }
    }
    for _ in 0..3 {
        std::thread::sleep(Duration::from_millis(300 + next(1500)));
        octd.kill9();
        octd.start();
    }
    let total = good + bad;
    let messages = sub.wait_until(
        Duration::from_secs(240),
        |m| {
            let q = events(m)
                .iter()
                .filter(|e| e["kind"] == "rejected")
                .map(|e| e["scan_id"].clone())
                .collect::<HashSet<_>>();
            results(m).len() + q.len() >= total
        },
        "every input accounted for",
    );
    let status = octd.stop();
    assert!(status.success(), "exit {status:?}; log tail:\n{}", tail(&octd.log(), 30));
    let found = results(&messages);
    let rejected: HashSet<String> = events(&messages)
        .iter()
        .filter(|e| e["kind"] == "rejected")
        .map(|e| e["scan_id"].as_str().unwrap().to_string())
        .collect();
    let codes: Vec<String> =
        events(&messages).iter().filter(|e| e["kind"] == "rejected").map(|e| e["code"].to_string()).collect();
    assert_eq!(found.len(), total - bad_count(total), "a result per good input; rejections: {codes:?}");
    assert_eq!(rejected.len(), bad_count(total), "a rejection per bad input");
    assert!(found.keys().all(|id| !rejected.contains(id)), "no scan both published and rejected");
    assert_eq!(std::fs::read_dir(&octd.inbox).unwrap().count(), 0, "every input was taken");
    assert_eq!(octd.quarantine_reasons().len(), bad_count(total));
    // Each input was claimed once: the store holds exactly one scan per input.
    let reasons: HashMap<String, Value> =
        octd.quarantine_reasons().into_iter().map(|r| (r["scan_id"].as_str().unwrap().to_string(), r)).collect();
    assert!(reasons.values().all(|r| r["code"] == "not_an_image"), "{reasons:?}\nlog tail:\n{}", tail(&octd.log(), 40));
    let _ = (good, bad);
}

fn tail(log: &str, lines: usize) -> String {
    let all: Vec<&str> = log.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

fn bad_count(total: usize) -> usize {
    (0..total).filter(|i| i % 7 == 3).count()
}

#[test]
fn bad_inputs_are_quarantined_and_the_daemon_keeps_going() {
    let Some(rig) = Rig::new(2, "oct/#") else { return };
    let jpeg = rig.image(0);
    let Rig { sub, mut octd, dir, broker: _broker, images: _ } = rig;
    octd.start();
    drop_file(&octd.inbox, "zero.jpeg", b"");
    drop_file(&octd.inbox, "readme.txt", b"hello");
    drop_file(&octd.inbox, "half.jpeg", &jpeg[..jpeg.len() / 2]);
    // Ignored: hidden, partial and temporary files stay where they are.
    std::fs::write(octd.inbox.join(".hidden.jpeg"), &jpeg).unwrap();
    std::fs::write(octd.inbox.join("export.jpeg.partial"), &jpeg).unwrap();
    std::fs::write(octd.inbox.join("export.tmp"), &jpeg).unwrap();
    // Never followed: a symlink to a file outside the folder.
    let outside = dir.path().join("outside.jpeg");
    std::fs::write(&outside, &jpeg).unwrap();
    std::os::unix::fs::symlink(&outside, octd.inbox.join("link.jpeg")).unwrap();
    drop_file(&octd.inbox, &phi_name(1, "jpeg"), &jpeg);

    let messages = sub.wait_until(
        Duration::from_secs(60),
        |m| results(m).len() == 1 && events(m).iter().filter(|e| e["kind"] == "rejected").count() == 3,
        "one result and three rejections",
    );
    let mut codes: Vec<String> = events(&messages)
        .iter()
        .filter(|e| e["kind"] == "rejected")
        .map(|e| e["code"].as_str().unwrap().to_string())
        .collect();
    codes.sort();
    assert_eq!(codes, ["empty", "not_an_image", "truncated"]);
    let reasons = octd.quarantine_reasons();
    assert_eq!(reasons.len(), 3);
    for r in &reasons {
        let id = r["scan_id"].as_str().unwrap();
        // Kept, but only sealed: the plaintext never stays under the state folder.
        let sealed = octd.state.join("quarantine").join(format!("{id}.sealed"));
        assert!(sealed.exists(), "the input is kept in quarantine, sealed");
        assert!(!octd.state.join("quarantine").join(id).exists(), "no plaintext copy beside the sealed one");
        assert!(!r["detail"].as_str().unwrap().is_empty());
    }
    std::thread::sleep(Duration::from_secs(2));
    for name in [".hidden.jpeg", "export.jpeg.partial", "export.tmp", "link.jpeg"] {
        assert!(octd.inbox.join(name).symlink_metadata().is_ok(), "{name} must not be taken");
    }
    assert!(outside.exists());
    assert!(octd.stop().success(), "the daemon is still running and exits cleanly");
}

/// Files renamed in together are claimed together, as many at a time as the queue has room
/// for: with room for two, a dozen renamed at once from their `.partial` names in the folder
/// itself (as scanners export, each rename reported twice) are each claimed and classified
/// exactly once, nothing is rejected, and none is left behind. The hourly rescan cannot
/// cover for a file the watcher's events lost.
#[test]
fn files_renamed_in_together_are_each_claimed_once_past_a_full_queue() {
    let Some(Rig { images, sub, mut octd, broker: _broker, dir: _dir }) = Rig::new(1, "oct/#") else {
        return;
    };
    octd.env.push(("OCTD_PIPELINE__QUEUE_CAPACITY".into(), "2".into()));
    octd.env.push(("OCTD_INGEST__RESCAN_INTERVAL".into(), "1h".into()));
    octd.start();
    octd.wait_ready();
    let n = 12;
    let partial = |i: usize| octd.inbox.join(format!(".{}.partial", phi_name(i, "jpeg")));
    for i in 0..n {
        std::fs::write(partial(i), std::fs::read(&images[i % images.len()].0).unwrap()).unwrap();
    }
    for i in 0..n {
        std::fs::rename(partial(i), octd.inbox.join(phi_name(i, "jpeg"))).unwrap();
    }
    sub.wait_until(Duration::from_secs(120), |m| results(m).len() == n, "a result for every file");
    // Anything claimed twice would publish a second result, or a rejection, under another id.
    std::thread::sleep(Duration::from_millis(1500));
    let messages = sub.messages();
    assert_eq!(results(&messages).len(), n);
    let refused: Vec<_> = events(&messages).into_iter().filter(|e| e["scan_id"].is_string()).collect();
    assert!(refused.is_empty(), "{refused:?}");
    assert_eq!(std::fs::read_dir(&octd.inbox).unwrap().count(), 0);
    assert_eq!(std::fs::read_dir(octd.state.join("spool")).unwrap().count(), 0);
    let log = octd.log();
    assert!(!log.contains("could not move claimed"), "{log}");
    assert_eq!(log.matches("claimed").count(), n, "{log}");
}

#[test]
fn a_stop_with_a_backlog_resumes_at_the_next_start() {
    let Some(Rig { images, sub, mut octd, broker: _broker, dir: _dir }) = Rig::new(1, "oct/+/+/results/#") else {
        return;
    };
    octd.start();
    octd.wait_ready();
    let n = 30;
    for i in 0..n {
        drop_file(&octd.inbox, &phi_name(i, "jpeg"), &std::fs::read(&images[i % images.len()].0).unwrap());
    }
    sub.wait_until(Duration::from_secs(60), |m| !results(m).is_empty(), "the first result");
    assert!(octd.stop().success());
    let log = octd.log();
    let after_stop = log.split("shutting down").nth(1).expect("a clean stop is logged");
    let finished_after_stop = after_stop.matches("classified").count();
    assert!(finished_after_stop <= 1, "one worker finishes its scan in hand, not the backlog ({finished_after_stop})");
    assert!(results(&sub.messages()).len() < n);
    octd.start();
    let messages = sub.wait_until(Duration::from_secs(120), |m| results(m).len() == n, "the backlog after a restart");
    assert_eq!(results(&messages).len(), n);
    assert_eq!(std::fs::read_dir(&octd.inbox).unwrap().count(), 0);
}
