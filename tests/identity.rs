//! Identity at rest: unreadable and refused scans, with identity planted in their metadata
//! and file names, leave no plaintext of it anywhere under the state folder or in the log;
//! their originals wait sealed in quarantine, and `octd quarantine release` puts one back
//! through the pipeline once what it lacked is configured. Real daemon, real Mosquitto, real
//! DICOM, PNG and JPEG bytes.

mod common;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::dicom::{self as fixture, Pixels, Spec};
use common::{assert_no_phi, drop_file, events, results, Rig, PLANTED_PHI};
use serde_json::Value;

/// Every file under `dir` (names too) must be free of the planted identity.
fn assert_no_phi_under(dir: &Path) {
    let mut stack = vec![dir.to_path_buf()];
    let mut files = 0;
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).unwrap().flatten() {
            let path = entry.path();
            let name = entry.file_name().to_string_lossy().into_owned();
            for phi in PLANTED_PHI {
                assert!(!name.contains(phi), "a file name under the state folder holds {phi:?}: {}", path.display());
            }
            if entry.file_type().unwrap().is_dir() {
                stack.push(path);
            } else {
                files += 1;
                assert_no_phi(&std::fs::read(&path).unwrap(), &path.display().to_string());
            }
        }
    }
    assert!(files > 3, "the state folder should hold the store, key and quarantine");
}

fn octd_cli(config: &Path, args: &[&str]) -> (bool, Value, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_octd")).arg("--config").arg(config).args(args).output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_no_phi(stdout.as_bytes(), "octd quarantine output");
    (out.status.success(), serde_json::from_str(&stdout).unwrap_or(Value::Null), stderr)
}

/// A PNG whose text chunk holds identity and whose image data is garbage.
fn png_with_identity_and_bad_pixels(real: &[u8]) -> Vec<u8> {
    let img = image::load_from_memory(real).unwrap().to_luma8();
    let mut png = Vec::new();
    img.write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png).unwrap();
    let text = b"Comment\0Patient DOE^JOHN MRN8675309 born 19450704";
    let mut chunk = (text.len() as u32).to_be_bytes().to_vec();
    chunk.extend_from_slice(b"tEXt");
    chunk.extend_from_slice(text);
    chunk.extend_from_slice(&[0, 0, 0, 0]); // a bad CRC, too
    let mut out = png[..33].to_vec(); // signature + IHDR
    out.extend_from_slice(&chunk);
    out.extend_from_slice(&png[33..33 + 64]);
    out.extend(std::iter::repeat_n(0xA5u8, 4096));
    out
}

/// A JPEG with identity in a comment segment, cut short.
fn truncated_jpeg_with_identity(real: &[u8]) -> Vec<u8> {
    let comment = b"DOE^JOHN MRN8675309 742 Evergreen Terrace, Springfield";
    let mut out = real[..2].to_vec();
    out.extend_from_slice(&[0xFF, 0xFE]);
    out.extend_from_slice(&((comment.len() + 2) as u16).to_be_bytes());
    out.extend_from_slice(comment);
    out.extend_from_slice(&real[2..real.len() / 2]);
    out
}

fn quarantined_ids(messages: &[common::Message]) -> Vec<(String, String)> {
    events(messages)
        .into_iter()
        .filter(|e| e["kind"] == "rejected" || e["kind"] == "quarantined")
        .map(|e| {
            (e["scan_id"].as_str().unwrap_or_default().to_string(), e["code"].as_str().unwrap_or_default().to_string())
        })
        .collect()
}

#[test]
fn refused_scans_are_sealed_leave_no_identity_at_rest_and_come_back_on_release() {
    let Some(mut rig) = Rig::new(1, "oct/#") else { return };
    let frames: Vec<Vec<u8>> = (0..2).map(|i| fixture::grey_frame(&rig.images[i].0, 128, 128)).collect();
    let burned = fixture::build(Spec {
        sop_class: fixture::OPT_SOP_CLASS,
        pixels: Pixels::Native { width: 128, height: 128, frames: frames.clone() },
        burned_in: true,
        manufacturer: "BurnCo",
    });
    let whole = fixture::build(Spec::plain(fixture::OPT_SOP_CLASS, Pixels::Native { width: 128, height: 128, frames }));
    let cut = whole[..whole.len() * 7 / 10].to_vec();
    let jpeg = rig.image(0);

    rig.octd.start();
    rig.octd.wait_ready();
    drop_file(&rig.octd.inbox, "good.jpeg", &rig.image(1));
    rig.sub.wait_until(Duration::from_secs(60), |m| results(m).len() == 1, "the good scan's result");
    let inputs: [(&str, Vec<u8>); 4] = [
        ("DOE_JOHN_MRN8675309_burned.dcm", burned),
        ("DOE_JOHN_19450704_cut.dcm", cut),
        ("Springfield_DOE_JOHN.png", png_with_identity_and_bad_pixels(&jpeg)),
        ("MRN8675309.jpg", truncated_jpeg_with_identity(&jpeg)),
    ];
    for (name, bytes) in &inputs {
        drop_file(&rig.octd.inbox, name, bytes);
    }
    let messages = rig.sub.wait_until(Duration::from_secs(60), |m| quarantined_ids(m).len() == 4, "four refusals");
    let refused = quarantined_ids(&messages);
    let burned_id =
        refused.iter().find(|(_, code)| code == "burned_in_annotation").expect("burned-in refused").0.clone();
    let good_id = results(&messages).into_keys().next().unwrap();

    // Sealed, listed, and nothing in plaintext: not under the state folder, not in the log.
    let (ok, list, err) = octd_cli(&rig.octd.config, &["quarantine", "list"]);
    assert!(ok, "{err}");
    let entries = list["quarantined"].as_array().unwrap();
    assert_eq!(entries.len(), 4, "{list}");
    assert!(entries.iter().all(|e| e["sealed_bytes"].as_u64().is_some_and(|n| n > 0)), "{list}");
    assert_no_phi_under(&rig.octd.state);
    assert_no_phi(rig.octd.log().as_bytes(), "the daemon's log");

    // A crash between the de-identified commit and the removal of the original leaves it
    // in the spool: the next start removes it.
    assert!(rig.octd.stop().success());
    let leftover = rig.octd.state.join("spool").join(&good_id);
    std::fs::write(&leftover, rig.image(1)).unwrap();
    // Configure what the burned-in scan lacked, then release it through the running daemon.
    let mut config = std::fs::read_to_string(&rig.octd.config).unwrap();
    config.push_str("\n[[deid.burned_in_masks]]\nmanufacturer = \"burnco\"\nrects = [[0, 0, 128, 10]]\n");
    std::fs::write(&rig.octd.config, config).unwrap();
    rig.octd.start();
    rig.octd.wait_ready();
    assert!(!leftover.exists(), "the processed original left in the spool is removed at start");
    let (ok, answer, err) = octd_cli(&rig.octd.config, &["quarantine", "release", &burned_id]);
    assert!(ok, "release refused: {err}");
    assert_eq!(answer["daemon"], "running", "{answer}");
    let messages = rig.sub.wait_until(
        Duration::from_secs(60),
        |m| results(m).contains_key(&burned_id),
        "a result for the released scan",
    );
    assert_eq!(results(&messages)[&burned_id]["input_kind"], "dicom");
    // Released twice: refused, with the reason.
    let (ok, _, err) = octd_cli(&rig.octd.config, &["quarantine", "release", &burned_id]);
    assert!(!ok && err.contains("no sealed original"), "{err}");

    // Purged for good; one released while the daemon is stopped is processed at its start.
    let others: Vec<String> = refused.iter().map(|(id, _)| id.clone()).filter(|id| *id != burned_id).collect();
    let (ok, purged, err) = octd_cli(&rig.octd.config, &["quarantine", "purge", &others[0]]);
    assert!(ok, "{err}");
    assert_eq!(purged["purged"][0], others[0].as_str());
    assert!(rig.octd.stop().success());
    let (ok, answer, err) = octd_cli(&rig.octd.config, &["quarantine", "release", &others[1]]);
    assert!(ok, "{err}");
    assert_eq!(answer["daemon"], "stopped", "{answer}");
    let before = quarantined_ids(&rig.sub.messages()).len();
    rig.octd.start();
    rig.sub.wait_until(
        Duration::from_secs(60),
        |m| quarantined_ids(m).len() > before,
        "the released unreadable scan, refused again at start",
    );
    let (_, list, _) = octd_cli(&rig.octd.config, &["quarantine", "list"]);
    let left: Vec<&str> =
        list["quarantined"].as_array().unwrap().iter().map(|e| e["scan_id"].as_str().unwrap()).collect();
    assert_eq!(left.len(), 2, "{list}");
    assert!(left.contains(&others[1].as_str()) && left.contains(&others[2].as_str()), "{list}");
    assert!(rig.octd.stop().success());
    assert_no_phi_under(&rig.octd.state);
    assert_no_phi(rig.octd.log().as_bytes(), "the daemon's log");
}
