//! The intake API as devices use it (docs/uplink.md), against the real service binary:
//! enrolment, signatures, replays, revocation, idempotent uploads, correction revisions,
//! refused uploads, and nothing lost across a restart — on SQLite and a local folder, and on
//! PostgreSQL and an S3-compatible server.

mod common;

#[path = "../../../tests/common/dicom.rs"]
#[allow(dead_code)]
mod dicom;

use std::path::Path;

use common::services::{Postgres, S3};
use common::{deidentified, http, now_s, shared_oct_images, signed, signed_with, DeviceIdentity, Trainer};
use octd_uplink::{sha256_hex, LabelUpload, ModelStamp, Prediction, LABEL_SCHEMA};
use serde_json::{json, Value};

const INTAKE: &str = "max_image_bytes = 1048576\nrequests_per_minute = 6000\nburst = 1000\nholdout_fraction = 0.5";

fn label(image: &str, kind: octd_uplink::ImageKind, verdict: &str, patient: &str) -> LabelUpload {
    LabelUpload {
        schema: LABEL_SCHEMA.into(),
        label: verdict.into(),
        prediction: Prediction {
            label: "CNV".into(),
            probabilities: [("CNV", 0.7), ("DME", 0.1), ("DRUSEN", 0.1), ("NORMAL", 0.1)]
                .into_iter()
                .map(|(k, v)| (k.to_string(), v))
                .collect(),
        },
        model: ModelStamp { name: "octd-compact".into(), version: "0.2.0".into(), sha256: "ab".repeat(32) },
        reviewer: "rv-7f3a".into(),
        reviewed_at: "2026-12-02T10:00:00Z".into(),
        laterality: "R".into(),
        patient: patient.into(),
        image_sha256: image.into(),
        image_kind: kind,
        withdrawn: false,
    }
}

fn put_label(t: &Trainer, d: &DeviceIdentity, scan: &str, rev: u32, body: &LabelUpload) -> common::Reply {
    let bytes = serde_json::to_vec(body).unwrap();
    signed(t.port, d, "PUT", &format!("/api/v1/labels/{scan}/{rev}"), "application/json", &bytes)
}

fn put_image(t: &Trainer, d: &DeviceIdentity, bytes: &[u8], content_type: &str) -> common::Reply {
    signed(t.port, d, "PUT", &format!("/api/v1/images/{}", sha256_hex(bytes)), content_type, bytes)
}

fn code(r: &common::Reply) -> &str {
    r.body["error"].as_str().unwrap_or_default()
}

/// An OCT DICOM object with identity planted everywhere, made from a real scan.
fn identified_dicom(scan: &Path) -> Vec<u8> {
    let frame = dicom::grey_frame(scan, 256, 248);
    dicom::build(dicom::Spec::plain(
        dicom::OPT_SOP_CLASS,
        dicom::Pixels::Native { width: 256, height: 248, frames: vec![frame] },
    ))
}

/// `dcm` with one more item in a sequence, holding `tag` = `value`.
fn with_nested(dcm: &[u8], tag: dicom_core::Tag, vr: dicom_core::VR, value: &str) -> Vec<u8> {
    use dicom_core::value::{DataSetSequence, Value as DicomValue};
    use dicom_core::{DataElement, Length};
    let mut obj = dicom_object::OpenFileOptions::new().from_reader(&dcm[128..]).unwrap();
    let item = dicom_object::InMemDicomObject::from_element_iter([DataElement::new(tag, vr, value)]);
    obj.put(DataElement::new(
        dicom_dictionary_std::tags::SOURCE_IMAGE_SEQUENCE,
        dicom_core::VR::SQ,
        DicomValue::from(DataSetSequence::new(vec![item], Length::UNDEFINED)),
    ));
    let mut out = Vec::new();
    obj.write_all(&mut out).unwrap();
    out
}

fn assert_no_identity_under(dir: &Path) {
    for entry in walk(dir) {
        let bytes = std::fs::read(&entry).unwrap_or_default();
        for planted in ["DOE^JOHN", "MRN8675309", "19450704", "Evergreen"] {
            assert!(
                !bytes.windows(planted.len()).any(|w| w == planted.as_bytes()),
                "{planted} found in {}",
                entry.display()
            );
        }
    }
}

fn walk(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else {
                out.push(p);
            }
        }
    }
    out
}

/// Everything a device does against the intake, and everything it must be refused.
fn exercise(t: &mut Trainer, root: &Path) {
    let Some(images) = shared_oct_images() else { return };
    let init = t.cli_json(&["init"]);
    assert_eq!(init["adopted"], false);
    assert!(Path::new(init["trusted_root"].as_str().unwrap()).exists());
    assert_eq!(t.cli_json(&["init"])["adopted"], true, "a second init adopts the channel");

    let a = DeviceIdentity::new(&root.join("device-a"), "clinic-a", "octd-1");
    let stranger = DeviceIdentity::new(&root.join("device-b"), "clinic-b", "octd-9");
    let enrolled = t.cli_json(&["device", "add", a.public_json.to_str().unwrap()]);
    assert_eq!(enrolled["enrolled"]["key_id"], a.key.key_id());
    let again = t.cli(&["device", "add", a.public_json.to_str().unwrap()]);
    assert!(!again.status.success(), "a key is enrolled once");
    t.start();

    let png = deidentified(std::fs::read(&images[0].0).unwrap());
    assert_eq!(png.1, "png");
    let png = png.0;
    let sha = sha256_hex(&png);

    // Authentication.
    let unsigned = http(t.port, "PUT", &format!("/api/v1/images/{sha}"), &[("content-type", "image/png".into())], &png);
    assert_eq!((unsigned.status, code(&unsigned)), (401, "unsigned"), "{unsigned:?}");
    let unknown = put_image(t, &stranger, &png, "image/png");
    assert_eq!((unknown.status, code(&unknown)), (401, "unknown_device"));
    let path = format!("/api/v1/images/{sha}");
    let stale = a.key.sign("PUT", &path, "image/png", &png, now_s() - 3600, &common::nonce());
    let r = signed_with(t.port, &stale, "PUT", &path, "image/png", &png);
    assert_eq!((r.status, code(&r)), (401, "stale"));
    let mut tampered = png.clone();
    tampered[100] ^= 1;
    let h = a.key.sign("PUT", &path, "image/png", &png, now_s(), &common::nonce());
    let r = signed_with(t.port, &h, "PUT", &path, "image/png", &tampered);
    assert_eq!((r.status, code(&r)), (401, "bad_signature"), "the body is not the one signed");
    let h = a.key.sign("PUT", &path, "image/png", &png, now_s(), &common::nonce());
    let other = format!("/api/v1/images/{}", sha256_hex(b"another image"));
    let r = signed_with(t.port, &h, "PUT", &other, "image/png", &png);
    assert_eq!((r.status, code(&r)), (401, "bad_signature"), "the signature covers the path");
    let r = signed_with(t.port, &h, "PUT", &path, "application/dicom", &png);
    assert_eq!((r.status, code(&r)), (401, "bad_signature"), "the signature covers the content type");
    let h = a.key.sign("PUT", &path, "image/png", &png, now_s(), &common::nonce());

    // The image, once; the same request again is a replay; a new one finds it present.
    let r = signed_with(t.port, &h, "PUT", &path, "image/png", &png);
    assert_eq!((r.status, r.body["status"].as_str()), (201, Some("stored")), "{r:?}");
    let r = signed_with(t.port, &h, "PUT", &path, "image/png", &png);
    assert_eq!((r.status, code(&r)), (401, "replayed"));
    let r = put_image(t, &a, &png, "image/png");
    assert_eq!((r.status, r.body["status"].as_str()), (200, Some("present")));

    // Refused uploads, each with its reason.
    let r = put_image(t, &a, &png, "image/jpeg");
    assert_eq!((r.status, code(&r)), (415, "unsupported_type"));
    let r = signed(t.port, &a, "PUT", &format!("/api/v1/images/{}", "0".repeat(64)), "image/png", &png);
    assert_eq!((r.status, code(&r)), (400, "digest_mismatch"));
    let big = vec![7u8; 2 << 20];
    let r = put_image(t, &a, &big, "image/png");
    assert_eq!((r.status, code(&r)), (413, "too_large"));
    let r = put_image(t, &a, b"not an image at all", "image/png");
    assert_eq!((r.status, code(&r)), (422, "undecodable"));
    let jpeg = std::fs::read(&images[1].0).unwrap();
    let r = put_image(t, &a, &jpeg, "image/png");
    assert_eq!((r.status, code(&r)), (422, "undecodable"), "a JPEG declared as PNG");
    let identified = identified_dicom(&images[2].0);
    let r = put_image(t, &a, &identified, "application/dicom");
    assert_eq!((r.status, code(&r)), (422, "identified"), "{r:?}");
    let mut named_png = png.clone();
    let mut chunk = 15u32.to_be_bytes().to_vec();
    chunk.extend_from_slice(b"tEXtAuthor\0DOE^JOHN");
    chunk.extend_from_slice(&[0; 4]);
    named_png.splice(33..33, chunk);
    let r = put_image(t, &a, &named_png, "image/png");
    assert_eq!((r.status, code(&r)), (422, "identified"));
    // The same object de-identified by the device is accepted; identity planted back at
    // depth (a patient's name in a nested item, a private tag in one) is not.
    let (dcm, ext) = deidentified(identified);
    assert_eq!(ext, "dcm");
    for (tag, vr, value) in [
        (dicom_dictionary_std::tags::PATIENT_NAME, dicom_core::VR::PN, "DOE^JOHN"),
        (dicom_core::Tag(0x0009, 0x1001), dicom_core::VR::LO, "SECRET-PRIVATE"),
    ] {
        let nested = with_nested(&dcm, tag, vr, value);
        let r = put_image(t, &a, &nested, "application/dicom");
        assert_eq!((r.status, code(&r)), (422, "identified"), "{r:?}");
    }
    let r = put_image(t, &a, &dcm, "application/dicom");
    assert_eq!(r.status, 201, "{r:?}");

    // Labels.
    let scan = "0193a1b2-c3d4-7e5f-8a9b-0c1d2e3f4a5b";
    let missing = label(&"1".repeat(64), octd_uplink::ImageKind::Png, "CNV", "P-1");
    let r = put_label(t, &a, scan, 1, &missing);
    assert_eq!((r.status, code(&r)), (409, "image_missing"));
    let first = label(&sha, octd_uplink::ImageKind::Png, "CNV", "P-1");
    let r = put_label(t, &a, scan, 1, &first);
    assert_eq!((r.status, r.body["status"].as_str()), (201, Some("stored")), "{r:?}");
    let split = r.body["split"].as_str().unwrap().to_string();
    assert!(split == "train" || split == "holdout");
    let r = put_label(t, &a, scan, 1, &first);
    assert_eq!((r.status, r.body["status"].as_str()), (200, Some("unchanged")), "a retried upload is idempotent");
    let corrected = label(&sha, octd_uplink::ImageKind::Png, "DME", "P-1");
    let r = put_label(t, &a, scan, 1, &corrected);
    assert_eq!((r.status, code(&r)), (409, "revision_conflict"));
    let r = put_label(t, &a, scan, 2, &corrected);
    assert_eq!(r.status, 201, "a correction is a new revision: {r:?}");
    assert_eq!(r.body["split"], split, "the patient keeps its split");
    let r = put_label(t, &a, scan, 3, &label(&sha, octd_uplink::ImageKind::Png, "GLAUCOMA", "P-1"));
    assert_eq!((r.status, code(&r)), (422, "invalid"));
    let r = put_label(t, &a, scan, 3, &label(&sha, octd_uplink::ImageKind::Dicom, "CNV", "P-1"));
    assert_eq!((r.status, code(&r)), (422, "invalid"), "the image kind must match");
    let mut with_comment = serde_json::to_value(&first).unwrap();
    with_comment["comment"] = json!("Mr Doe, seen today");
    let bytes = serde_json::to_vec(&with_comment).unwrap();
    let r = signed(t.port, &a, "PUT", &format!("/api/v1/labels/{scan}/3"), "application/json", &bytes);
    assert_eq!((r.status, code(&r)), (400, "malformed"), "free text never enters the store");
    let r = put_label(t, &a, "../etc", 1, &first);
    assert!(r.status == 400 || r.status == 404, "{r:?}");

    // Identical uploads at the same moment: one stores, the others find it unchanged.
    let same = label(&sha, octd_uplink::ImageKind::Png, "DRUSEN", "P-2");
    let statuses: Vec<u16> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..6).map(|_| s.spawn(|| put_label(t, &a, "scan-race", 1, &same).status)).collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert_eq!(statuses.iter().filter(|s| **s == 201).count(), 1, "{statuses:?}");
    assert_eq!(statuses.iter().filter(|s| **s == 200).count(), 5, "{statuses:?}");

    // Many patients: both splits are used, each patient keeps one.
    let mut splits = std::collections::BTreeMap::new();
    for i in 0..12 {
        let scan = format!("scan-{i}");
        let r =
            put_label(t, &a, &scan, 1, &label(&sha, octd_uplink::ImageKind::Png, "NORMAL", &format!("P-{}", i % 6)));
        assert_eq!(r.status, 201, "{r:?}");
        let s = r.body["split"].as_str().unwrap().to_string();
        if let Some(previous) = splits.insert(i % 6, s.clone()) {
            assert_eq!(previous, s, "patient P-{} changed split", i % 6);
        }
    }

    // Across a restart: nothing lost (the stored revisions answer as before).
    t.stop();
    t.start();
    let r = put_label(t, &a, scan, 2, &corrected);
    assert_eq!((r.status, r.body["status"].as_str()), (200, Some("unchanged")), "{r:?}");
    let r = put_label(t, &a, scan, 1, &corrected);
    assert_eq!(r.status, 409, "revision 1 is still the first verdict");
    let r = put_image(t, &a, &png, "image/png");
    assert_eq!(r.body["status"], "present");

    // The reviewer takes the correction back (undo of a first verdict's correction chain
    // ending in none): the scan has no label any more, though every revision is kept.
    let withdrawn = LabelUpload { label: String::new(), withdrawn: true, ..corrected.clone() };
    let r = put_label(t, &a, scan, 3, &LabelUpload { label: "DME".into(), ..withdrawn.clone() });
    assert_eq!((r.status, code(&r)), (422, "invalid"), "a withdrawal names no class");
    let r = put_label(t, &a, scan, 3, &withdrawn);
    assert_eq!(r.status, 201, "{r:?}");

    // What the operator sees: the highest revision counts, every revision is kept.
    let status = t.cli_json(&["status"]);
    assert_eq!(status["labels"]["scans"], 13, "{status}");
    assert_eq!(status["labels"]["revisions"], 16);
    let patients: i64 =
        status["labels"]["patients_by_split"].as_object().unwrap().values().map(|v| v.as_i64().unwrap()).sum();
    assert_eq!(patients, 6);
    // The raced DRUSEN and twelve NORMAL verdicts, all against CNV predictions (the withdrawn
    // scan counts nowhere).
    assert_eq!(status["accuracy"]["fleet"]["labels"], 13);
    assert_eq!(status["accuracy"]["fleet"]["correct"], 0);
    assert_eq!(status["accuracy"]["fleet"]["low"], 0.0);
    assert_eq!(status["accuracy"]["by_device"]["clinic-a/octd-1"]["labels"], 13);
    assert_eq!(status["singan"], true);
    // The same over HTTP for operators on this host, and as Prometheus metrics.
    let over_http = http(t.port, "GET", "/api/v1/status", &[], b"");
    assert_eq!(over_http.status, 200, "{over_http:?}");
    assert_eq!(over_http.body["labels"], status["labels"]);
    let metrics = http(t.port, "GET", "/metrics", &[], b"");
    let text = metrics.body.as_str().unwrap_or_default().to_string();
    assert!(text.contains("octd_trainer_labels{kind=\"scans\"} 13"), "{text}");
    assert!(text.contains("octd_trainer_live_accuracy_labels{scope=\"fleet\",name=\"\"} 13"), "{text}");
    assert!(text.contains("octd_trainer_requests_total{route=\"labels\",outcome=\"revision_conflict\"}"), "{text}");

    // Revocation.
    let revoked = t.cli_json(&["device", "revoke", "clinic-a/octd-1"]);
    assert_eq!(revoked["revoked"], "clinic-a/octd-1");
    let r = put_label(t, &a, "scan-after", 1, &first);
    assert_eq!((r.status, code(&r)), (403, "revoked"));
    let list = t.cli_json(&["device", "list"]);
    assert!(list["devices"][0]["revoked_at"].is_i64());
    t.stop();
    assert_no_identity_under(&t.dir);
}

#[test]
fn a_single_node_on_sqlite_and_a_folder() {
    let dir = tempfile::tempdir().unwrap();
    let mut t = Trainer::sqlite(&dir.path().join("svc"), INTAKE);
    exercise(&mut t, dir.path());
}

#[test]
fn a_fleet_on_postgresql_and_s3() {
    let dir = tempfile::tempdir().unwrap();
    let Some(pg) = Postgres::start(&dir.path().join("pg")) else { return };
    let Some(s3) = S3::start("octd-labels") else { return };
    let storage =
        format!("database = \"{}\"\nblobs = \"s3://octd-labels/fleet\"\ns3_endpoint = \"{}\"", pg.url(), s3.endpoint());
    let mut t = Trainer::new(&dir.path().join("svc"), &storage, INTAKE);
    for (k, v) in [("AWS_ACCESS_KEY_ID", "test"), ("AWS_SECRET_ACCESS_KEY", "test"), ("AWS_REGION", "us-east-1")] {
        t.env.push((k.into(), v.into()));
    }
    exercise(&mut t, dir.path());
    // The images went to the bucket, under the prefix.
    let listing = http(s3.port, "GET", "/octd-labels?list-type=2", &[], b"");
    let text = match &listing.body {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    };
    assert!(text.contains("fleet/images/"), "{text}");
    assert!(!t.dir.join("blobs").exists(), "nothing written to a local folder");
    // Nor did any planted identity reach the database's files.
    assert_no_identity_under(&dir.path().join("pg"));
}

#[test]
fn a_device_over_its_rate_is_told_to_wait() {
    let dir = tempfile::tempdir().unwrap();
    let mut t = Trainer::sqlite(&dir.path().join("svc"), "requests_per_minute = 1\nburst = 3");
    // With an operator token, status needs it even on this host.
    let text = std::fs::read_to_string(&t.config).unwrap();
    std::fs::write(&t.config, text.replace("[server]\n", "[server]\noperator_token = \"op-s3cret\"\n")).unwrap();
    let a = DeviceIdentity::new(&dir.path().join("device"), "clinic-a", "octd-1");
    t.cli_json(&["device", "add", a.public_json.to_str().unwrap()]);
    t.start();
    let body = serde_json::to_vec(&label(&"1".repeat(64), octd_uplink::ImageKind::Png, "CNV", "P-1")).unwrap();
    let statuses: Vec<u16> =
        (0..4).map(|_| signed(t.port, &a, "PUT", "/api/v1/labels/s/1", "application/json", &body).status).collect();
    assert_eq!(statuses, [409, 409, 409, 429]);
    let r = signed(t.port, &a, "PUT", "/api/v1/labels/s/1", "application/json", &body);
    assert_eq!(code(&r), "rate_limited");
    assert!(r.headers.contains("retry-after:"), "{}", r.headers);
    let r = http(t.port, "GET", "/api/v1/status", &[], b"");
    assert_eq!((r.status, code(&r)), (401, "operator_token"));
    let r = http(t.port, "GET", "/api/v1/status", &[("authorization", "Bearer wrong".into())], b"");
    assert_eq!(r.status, 401);
    let r = http(t.port, "GET", "/api/v1/status", &[("authorization", "Bearer op-s3cret".into())], b"");
    assert_eq!(r.status, 200, "{r:?}");
    let shown = t.cli_json(&["config-check"]);
    assert_eq!(shown["server"]["operator_token"], "***", "config-check prints no secret");
    t.stop();
}

#[test]
fn a_site_keyed_patient_has_one_split_on_every_device_of_the_site() {
    let Some(images) = shared_oct_images() else { return };
    let dir = tempfile::tempdir().unwrap();
    let mut t = Trainer::sqlite(&dir.path().join("svc"), INTAKE);
    let a = DeviceIdentity::new(&dir.path().join("a"), "clinic-a", "octd-1");
    let b = DeviceIdentity::new(&dir.path().join("b"), "clinic-a", "octd-2");
    for d in [&a, &b] {
        t.cli_json(&["device", "add", d.public_json.to_str().unwrap()]);
    }
    t.start();
    let (png, _) = deidentified(std::fs::read(&images[0].0).unwrap());
    for d in [&a, &b] {
        assert!(matches!(put_image(&t, d, &png, "image/png").status, 200 | 201));
    }
    let sha = sha256_hex(&png);
    let mut own_groups_differ = false;
    for i in 0..32 {
        // The same site-keyed patient seen on both devices: one side of the split.
        let patient = format!("p-{i:024x}");
        let on_a = put_label(&t, &a, &format!("s-a{i}"), 1, &label(&sha, octd_uplink::ImageKind::Png, "CNV", &patient));
        let on_b = put_label(&t, &b, &format!("s-b{i}"), 1, &label(&sha, octd_uplink::ImageKind::Png, "CNV", &patient));
        assert_eq!(on_a.status, 201, "{on_a:?}");
        assert_eq!(on_a.body["split"], on_b.body["split"], "patient {patient} straddles the split");
        // A device's own group (a scan without a patient identifier) is drawn per device.
        let group = format!("scan-s-{i:024x}");
        let on_a = put_label(&t, &a, &format!("g-a{i}"), 1, &label(&sha, octd_uplink::ImageKind::Png, "CNV", &group));
        let on_b = put_label(&t, &b, &format!("g-b{i}"), 1, &label(&sha, octd_uplink::ImageKind::Png, "CNV", &group));
        own_groups_differ |= on_a.body["split"] != on_b.body["split"];
    }
    assert!(own_groups_differ, "groups of one device are drawn per device (32 draws at 0.5 all equal: p = 2^-32)");
    t.stop();
}
