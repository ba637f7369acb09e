//! One file or one power cut must not stop the device: decoders that crash, hang or exhaust
//! memory in the sandboxed worker cost only their scan; a scan in hand at repeated daemon
//! deaths is set aside; a full disk stops intake without stopping the daemon. Real daemon,
//! real Mosquitto, real scans (the faults are injected into real JPEGs through the
//! `OCTD_FAULT_INJECTION` switch, since no known input crashes the decoders).

mod common;

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::dicom::{self as fixture, Pixels};
use common::{drop_file, events, results, Rig};

/// A real JPEG with a comment segment right after SOI.
fn with_comment(jpeg: &[u8], comment: &str) -> Vec<u8> {
    assert_eq!(&jpeg[..2], &[0xFF, 0xD8]);
    let mut out = jpeg[..2].to_vec();
    out.extend_from_slice(&[0xFF, 0xFE]);
    out.extend_from_slice(&((comment.len() + 2) as u16).to_be_bytes());
    out.extend_from_slice(comment.as_bytes());
    out.extend_from_slice(&jpeg[2..]);
    out
}

fn rejected(messages: &[common::Message]) -> Vec<serde_json::Value> {
    events(messages).into_iter().filter(|e| e["kind"] == "rejected").collect()
}

fn volume(images: &[(PathBuf, String)], frames: usize) -> Vec<u8> {
    let frames: Vec<Vec<u8>> =
        (0..frames).map(|i| fixture::grey_frame(&images[i % images.len()].0, 512, 496)).collect();
    fixture::build(fixture::Spec::plain(fixture::OPT_SOP_CLASS, Pixels::Native { width: 512, height: 496, frames }))
}

#[test]
fn a_crashing_hanging_or_exhausted_decoder_costs_only_its_scan() {
    let Some(mut rig) = Rig::new(1, "oct/#") else { return };
    for (k, v) in [
        ("OCTD_FAULT_INJECTION", "1"),
        ("OCTD_PIPELINE__DECODER_CPU_TIME", "2s"),
        ("OCTD_PIPELINE__DECODER_TIMEOUT", "5s"),
        ("OCTD_PIPELINE__DECODER_MEMORY_BYTES", "536870912"),
        ("OCTD_INGEST__MAX_FILE_BYTES", "67108864"),
        ("OCTD_INGEST__MAX_DECODED_BYTES", "134217728"),
    ] {
        rig.octd.env.push((k.into(), v.into()));
    }
    rig.octd.start();
    rig.octd.wait_ready();
    let faults = ["abort", "hang", "sleep", "oom", "stack", "panic"];
    let expected =
        ["processor_crashed", "timeout", "timeout", "memory_limit", "processor_crashed", "processor_crashed"];
    let mut good = 0;
    let drop_good = |rig: &Rig, n: &mut usize| {
        drop_file(&rig.octd.inbox, &format!("good-{n}.jpeg"), &rig.image(*n));
        *n += 1;
        std::thread::sleep(Duration::from_millis(400));
    };
    drop_good(&rig, &mut good);
    for fault in faults {
        let bytes = with_comment(&rig.image(good), &format!("OCTD-FAULT:{fault}"));
        drop_file(&rig.octd.inbox, &format!("fault-{fault}.jpeg"), &bytes);
        std::thread::sleep(Duration::from_millis(400));
        drop_good(&rig, &mut good);
    }
    // A decoder that tries to open a file or a socket is refused by the sandbox, and its
    // (valid) scan is still classified.
    let escape = with_comment(&rig.image(0), "OCTD-FAULT:escape");
    drop_file(&rig.octd.inbox, "fault-escape.jpeg", &escape);
    let messages = rig.sub.wait_until(
        Duration::from_secs(180),
        |m| results(m).len() > good && rejected(m).len() >= faults.len(),
        "a result per good scan and a rejection per fault",
    );
    let codes: Vec<String> = rejected(&messages).iter().map(|e| e["code"].as_str().unwrap().to_string()).collect();
    assert_eq!(codes, expected, "each fault quarantined with its reason, in order");
    let details: Vec<String> = rejected(&messages).iter().map(|e| e["detail"].as_str().unwrap().to_string()).collect();
    assert!(details[4].contains("stack overflow"), "the stack overflow is named: {}", details[4]);
    assert!(details[1].contains("CPU"), "the busy hang meets the CPU limit: {}", details[1]);
    assert!(details[2].contains("longer than"), "the blocked hang meets the wall clock: {}", details[2]);
    assert_eq!(results(&messages).len(), good + 1, "every good scan and the sandboxed one classified");
    assert!(rig.octd.is_running(), "the daemon itself never died");
    let reasons = rig.octd.quarantine_reasons();
    assert_eq!(reasons.len(), faults.len());
    assert!(rig.octd.stop().success());
}

#[test]
fn a_scan_in_hand_at_repeated_daemon_deaths_is_set_aside_as_poison() {
    let Some(mut rig) = Rig::new(1, "oct/#") else { return };
    rig.octd.env.push(("OCTD_PIPELINE__MAX_ATTEMPTS".into(), "2".into()));
    rig.octd.start();
    rig.octd.wait_ready();
    drop_file(&rig.octd.inbox, "volume.dcm", &volume(&rig.images, 96));
    rig.octd.wait_log("the volume was not de-identified", |log| log.contains("frames=96"));
    // Dies while classifying it (96 B-scans take seconds), then again once it resumed.
    std::thread::sleep(Duration::from_millis(400));
    rig.octd.kill9();
    rig.octd.start();
    rig.octd.wait_log("the volume was not resumed", |log| log.contains("resuming interrupted scans in_hand=1"));
    std::thread::sleep(Duration::from_millis(600));
    rig.octd.kill9();
    rig.octd.start();
    rig.octd.wait_ready();
    drop_file(&rig.octd.inbox, "after.jpeg", &rig.image(0));
    let messages = rig.sub.wait_until(
        Duration::from_secs(120),
        |m| !results(m).is_empty() && rejected(m).iter().any(|e| e["code"] == "poison_scan"),
        "the poison scan set aside and the next scan classified",
    );
    let poison = rejected(&messages).into_iter().find(|e| e["code"] == "poison_scan").unwrap();
    assert!(poison["detail"].as_str().unwrap().contains("2 times"), "{poison}");
    let classified: Vec<String> = results(&messages).keys().cloned().collect();
    let poisoned = poison["scan_id"].as_str().unwrap().to_string();
    assert!(!classified.contains(&poisoned));
    // Its de-identified artefact (committed or not) goes with it.
    let left: Vec<_> = std::fs::read_dir(rig.octd.state.join("deid"))
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().contains(&poisoned))
        .collect();
    assert!(left.is_empty(), "the poison scan's artefact stayed: {left:?}");
    assert!(rig.octd.stop().success());
}

/// A small filesystem for the state folder (tmpfs), unmounted when dropped.
struct SmallDisk(PathBuf);

impl SmallDisk {
    fn mount(at: &Path, size_mib: u32) -> Option<SmallDisk> {
        std::fs::create_dir_all(at).unwrap();
        let ok = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size_mib}m"), "tmpfs"])
            .arg(at)
            .output()
            .map(|o| o.status.success())
            .unwrap_or(false);
        if !ok {
            eprintln!("SKIPPED: cannot mount a tmpfs here (needs root); the full-disk test did not run");
            return None;
        }
        Some(SmallDisk(at.to_path_buf()))
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

#[test]
fn a_full_disk_stops_intake_without_stopping_the_daemon_and_nothing_is_lost() {
    let Some(mut rig) = Rig::new(1, "oct/#") else { return };
    let Some(_disk) = SmallDisk::mount(&rig.octd.state, 24) else { return };
    rig.octd.env.push(("OCTD_INGEST__MIN_FREE_BYTES".into(), (4u64 << 20).to_string()));
    rig.octd.start();
    rig.octd.wait_ready();
    // Fill the state folder's filesystem to 2 MiB, below the intake floor.
    let filler = rig.octd.state.join("filler");
    let free = fs4::available_space(&rig.octd.state).unwrap();
    std::fs::write(&filler, vec![0u8; (free - (2 << 20)) as usize]).unwrap();
    for i in 0..5 {
        drop_file(&rig.octd.inbox, &format!("scan-{i}.jpeg"), &rig.image(i));
    }
    let messages = rig.sub.wait_until(
        Duration::from_secs(60),
        |m| events(m).iter().any(|e| e["kind"] == "alarm" && e["code"] == "disk_low"),
        "the disk alarm",
    );
    assert!(results(&messages).is_empty(), "nothing claimed onto a full disk");
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(std::fs::read_dir(&rig.octd.inbox).unwrap().count(), 5, "the scans wait in the export folder");
    assert!(rig.octd.is_running(), "the daemon is still running");
    std::fs::remove_file(&filler).unwrap();
    let messages =
        rig.sub.wait_until(Duration::from_secs(120), |m| results(m).len() >= 5, "every scan once space is back");
    assert!(events(&messages).iter().any(|e| e["kind"] == "alarm_cleared" && e["code"] == "disk_low"));
    let ids: HashSet<String> = results(&messages).keys().cloned().collect();
    assert_eq!(ids.len(), 5);
    assert!(rig.octd.stop().success());
}

/// An ext4 filesystem on a loop device for the state folder that can be made to fail as a
/// worn flash card or a failing disk does: an error turns it read-only under the daemon
/// (`errors=remount-ro`). Repaired as a field engineer would: unmount, fsck, mount.
struct FailingDisk {
    at: PathBuf,
    image: PathBuf,
}

impl FailingDisk {
    fn mount(at: &Path, image: &Path) -> Option<FailingDisk> {
        let skip = |why: &str| {
            eprintln!("SKIPPED: {why}; the test of a store that cannot write did not run");
            None
        };
        let run = |cmd: &mut Command| cmd.output().is_ok_and(|o| o.status.success());
        if !run(Command::new("truncate").args(["-s", "64M"]).arg(image))
            || !run(Command::new("mkfs.ext4").args(["-q", "-F"]).arg(image))
        {
            return skip("no mkfs.ext4");
        }
        std::fs::create_dir_all(at).unwrap();
        let disk = FailingDisk { at: at.to_path_buf(), image: image.to_path_buf() };
        if !disk.attach() {
            return skip("cannot loop-mount an ext4 image here (needs root and loop devices)");
        }
        if !disk.trigger().exists() {
            return skip("this kernel has no ext4 trigger_fs_error");
        }
        Some(disk)
    }

    fn attach(&self) -> bool {
        Command::new("mount")
            .args(["-o", "loop,errors=remount-ro"])
            .arg(&self.image)
            .arg(&self.at)
            .output()
            .is_ok_and(|o| o.status.success())
    }

    fn trigger(&self) -> PathBuf {
        let out = Command::new("findmnt").args(["-n", "-o", "SOURCE"]).arg(&self.at).output().unwrap();
        let source = String::from_utf8_lossy(&out.stdout).trim().to_string();
        let dev = Path::new(&source).file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        PathBuf::from(format!("/sys/fs/ext4/{dev}/trigger_fs_error"))
    }

    /// A filesystem error: the kernel turns it read-only at once.
    fn fail(&self) {
        std::fs::write(self.trigger(), "1").unwrap();
        assert!(std::fs::write(self.at.join("probe"), b"x").is_err(), "the state folder is read-only now");
    }

    fn repair(&self) {
        assert!(Command::new("umount").arg(&self.at).status().unwrap().success());
        // 0: clean, 1: errors corrected.
        let fsck = Command::new("e2fsck").args(["-f", "-y"]).arg(&self.image).output().unwrap();
        assert!(matches!(fsck.status.code(), Some(0 | 1)), "{}", String::from_utf8_lossy(&fsck.stdout));
        assert!(self.attach());
    }
}

impl Drop for FailingDisk {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.at).status();
    }
}

#[test]
fn a_store_that_can_no_longer_write_makes_the_daemon_unhealthy_and_loses_nothing() {
    let Some(mut rig) = Rig::new(1, "oct/#") else { return };
    let image = rig.dir.path().join("state.ext4");
    let Some(disk) = FailingDisk::mount(&rig.octd.state, &image) else { return };
    rig.octd.env.push(("OCTD_INGEST__MIN_FREE_BYTES".into(), (4u64 << 20).to_string()));
    rig.octd.start();
    rig.octd.wait_ready();
    for i in 0..2 {
        drop_file(&rig.octd.inbox, &format!("before-{i}.jpeg"), &rig.image(i));
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    while results(&rig.sub.messages()).len() < 2 {
        assert!(Instant::now() < deadline, "no results before the failure:\n{}", rig.octd.plain_log());
        std::thread::sleep(Duration::from_millis(100));
    }

    disk.fail();
    for i in 0..4 {
        drop_file(&rig.octd.inbox, &format!("after-{i}.jpeg"), &rig.image(i + 2));
    }
    // The supervisor's write probe sees it: the watchdog verdict turns unhealthy, naming the store.
    let deadline = Instant::now() + Duration::from_secs(60);
    let body = loop {
        if let Some((503, body)) = rig.octd.http_get("/healthz") {
            break body;
        }
        assert!(Instant::now() < deadline, "never unhealthy:\n{}", rig.octd.plain_log());
        std::thread::sleep(Duration::from_millis(200));
    };
    assert!(body.contains("store"), "the verdict names the store: {body}");
    std::thread::sleep(Duration::from_secs(3));
    assert!(rig.octd.is_running(), "the daemon has not exited on its own:\n{}", rig.octd.plain_log());
    assert_eq!(results(&rig.sub.messages()).len(), 2, "nothing is published that was not committed");
    assert_eq!(std::fs::read_dir(&rig.octd.inbox).unwrap().count(), 4, "the new scans wait in the export folder");

    // Under systemd the missing watchdog pings restart octd; it must not exit with the code
    // systemd will not restart on.
    let status = rig.octd.stop_within(Duration::from_secs(30)).expect("the daemon stops within 30 s");
    assert_ne!(status.code(), Some(78), "a disk failure is not a configuration error");
    disk.repair();
    rig.octd.start();
    let messages =
        rig.sub.wait_until(Duration::from_secs(120), |m| results(m).len() >= 6, "every scan after the repair");
    assert_eq!(results(&messages).len(), 6);
    assert_eq!(std::fs::read_dir(&rig.octd.inbox).unwrap().count(), 0);
    assert!(rig.octd.stop().success());
}

#[test]
fn compressed_dicom_decodes_inside_the_sandbox() {
    // JPEG Baseline DICOM: its decoder must not need threads the sandbox forbids.
    let Some(mut rig) = Rig::new(1, "oct/#") else { return };
    rig.octd.start();
    rig.octd.wait_ready();
    let dims = image::image_dimensions(&rig.images[0].0).unwrap();
    let jpeg_dicom = fixture::build(fixture::Spec::plain(
        fixture::OPT_SOP_CLASS,
        Pixels::Jpeg { width: dims.0, height: dims.1, jpeg: rig.image(0) },
    ));
    drop_file(&rig.octd.inbox, "jpeg.dcm", &jpeg_dicom);
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let messages = rig.sub.messages();
        if !results(&messages).is_empty() {
            break;
        }
        assert!(rejected(&messages).is_empty(), "refused: {:?}\n{}", rejected(&messages), rig.octd.plain_log());
        assert!(Instant::now() < deadline, "no result:\n{}", rig.octd.plain_log());
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(rig.octd.stop().success());
}

#[test]
fn only_the_scan_in_hand_at_each_death_is_blamed_not_its_neighbour() {
    // Two workers: two volumes in hand at the first death. They are resumed one at a time,
    // so the second death counts against the first volume alone.
    let Some(mut rig) = Rig::new(2, "oct/#") else { return };
    rig.octd.start();
    rig.octd.wait_ready();
    let bytes = volume(&rig.images, 96);
    drop_file(&rig.octd.inbox, "volume-a.dcm", &bytes);
    drop_file(&rig.octd.inbox, "volume-b.dcm", &bytes);
    rig.octd.wait_log("the volumes were not de-identified", |log| log.matches("frames=96").count() >= 2);
    std::thread::sleep(Duration::from_millis(400));
    rig.octd.kill9();
    rig.octd.start();
    rig.octd.wait_log("the volumes were not resumed", |log| log.contains("resuming interrupted scans in_hand=2"));
    std::thread::sleep(Duration::from_millis(600));
    rig.octd.kill9();
    rig.octd.start();
    rig.octd.wait_ready();
    let messages = rig.sub.wait_until(
        Duration::from_secs(120),
        |m| results(m).len() + rejected(m).len() >= 2,
        "both volumes accounted for",
    );
    let poison: Vec<_> = rejected(&messages).into_iter().filter(|e| e["code"] == "poison_scan").collect();
    assert_eq!(poison.len(), 1, "one volume was in hand at both deaths: {poison:?}");
    assert_eq!(results(&messages).len(), 1, "the other is classified");
    assert!(rig.octd.stop().success());
}
