//! The shipped model's answers are safe to act on: scans of conditions it never learned and
//! inputs that are not OCT B-scans at all are flagged `input_unlike_training` with the
//! model's own score; both backends compute the same score; a manifest that names a score
//! the model lacks is refused at load.

mod common;

use std::path::PathBuf;

use serde_json::Value;

fn flagged(result: &Value) -> bool {
    result["review_reasons"].as_array().unwrap().iter().any(|r| r == "input_unlike_training")
}

fn shared_ood() -> Option<Vec<PathBuf>> {
    let dir = common::shared_data()?.join("ood");
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir).ok()?.map(|e| e.unwrap().path()).collect();
    files.sort();
    Some(files)
}

#[test]
fn scans_of_conditions_the_model_never_learned_are_flagged_with_the_score() {
    let Some(files) = shared_ood() else { return };
    let manifest = common::shipped_manifest();
    let threshold = manifest["ood"]["threshold"].as_f64().expect("the default model declares its ood score");
    let results = common::classify_shipped("tract", None, &files);
    let mut caught = 0;
    for r in &results {
        let score = r["unlike_training_score"].as_f64().expect("every result carries the score");
        if score > threshold {
            assert!(flagged(r) && r["needs_review"] == true, "{r}");
            caught += 1;
        }
    }
    assert!(caught * 6 >= files.len() * 5, "{caught} of {} OOD scans flagged by the score", files.len());
}

#[test]
fn inputs_that_are_not_oct_b_scans_are_flagged() {
    let dir = tempfile::tempdir().unwrap();
    let (w, h) = (512u32, 496u32);
    let blank = image::GrayImage::from_fn(w, h, |x, y| image::Luma([4 + ((x * 7 + y * 13) % 3) as u8]));
    let page = image::GrayImage::from_fn(w, h, |x, y| {
        let line = y >= 70 && (y - 70) % 22 < 9 && x >= 20 && x < 20 + 120 + (y * 37 % 340);
        image::Luma([if y < 40 {
            80
        } else if line {
            40
        } else {
            242
        }])
    });
    let fundus = image::RgbImage::from_fn(w, h, |x, y| {
        let r = ((x as f32 - 256.0).powi(2) + (y as f32 - 248.0).powi(2)).sqrt();
        let disc = ((x as f32 - 330.0).powi(2) + (y as f32 - 248.0).powi(2)).sqrt() < 35.0;
        let vessel = ((y as f32 - 248.0) - 0.6 * (x as f32 - 330.0)).abs() < 3.0;
        match (r < 230.0, disc, vessel) {
            (false, _, _) => image::Rgb([0, 0, 0]),
            (true, true, _) => image::Rgb([250, 220, 150]),
            (true, false, true) => image::Rgb([120, 20, 10]),
            (true, false, false) => image::Rgb([200, 90, 40]),
        }
    });
    let files = [
        ("blank.png", blank.save(dir.path().join("blank.png"))),
        ("screenshot.png", page.save(dir.path().join("screenshot.png"))),
        ("fundus.png", fundus.save(dir.path().join("fundus.png"))),
    ]
    .into_iter()
    .map(|(name, saved)| {
        saved.unwrap();
        dir.path().join(name)
    })
    .collect::<Vec<_>>();
    let threshold = common::shipped_manifest()["ood"]["threshold"].as_f64().unwrap();
    let results = common::classify_shipped("tract", None, &files);
    assert_eq!(results.len(), files.len());
    for r in results {
        assert!(flagged(&r) && r["needs_review"] == true, "not flagged: {r}");
        // By the model's own score, not only by the grey-level ranges.
        let score = r["unlike_training_score"].as_f64().unwrap();
        assert!(score > threshold, "{}: score {score} not above {threshold}", r["input"]);
    }
}

#[test]
fn the_threshold_was_chosen_for_the_stated_rate_on_unseen_patients() {
    let manifest = common::shipped_manifest();
    let ood = &manifest["ood"];
    let (target, measured) =
        (ood["target_in_distribution_rate"].as_f64().unwrap(), ood["in_distribution_flag_rate"].as_f64().unwrap());
    // Cross-fitted on unseen patients: near the target, never beyond the third.
    assert!((measured - target).abs() <= 0.1 && measured <= 1.0 / 3.0, "target {target}, measured {measured}");
    let Some(images) = common::shared_oct_images() else { return };
    let files: Vec<PathBuf> = images.into_iter().map(|(p, _)| p).collect();
    let threshold = ood["threshold"].as_f64().unwrap();
    let results = common::classify_shipped("tract", None, &files);
    assert_eq!(results.len(), files.len());
    let above = results.iter().filter(|r| r["unlike_training_score"].as_f64().unwrap() > threshold).count();
    // Its own training images score around 1 (the median is 1 by construction): few of them
    // may pass a threshold set on unseen patients.
    assert!(above * 4 < files.len(), "{above} of {} training scans above the threshold", files.len());
}

#[test]
fn onnxruntime_computes_the_same_score_as_tract() {
    let Some(mut files) = shared_ood() else { return };
    let Some(library) = octd::infer::ort_backend::find_library(None) else {
        eprintln!("SKIP: no libonnxruntime.so (run scripts/test.sh)");
        return;
    };
    if let Some(images) = common::shared_oct_images() {
        files.extend(images.into_iter().take(4).map(|(p, _)| p));
    }
    let tract = common::classify_shipped("tract", None, &files);
    let ort = common::classify_shipped("onnxruntime", Some(&library), &files);
    assert_eq!((tract.len(), ort.len()), (files.len(), files.len()));
    for (t, o) in tract.iter().zip(&ort) {
        assert_eq!(o["model"]["backend"], "onnxruntime-cpu");
        let (a, b) = (t["unlike_training_score"].as_f64().unwrap(), o["unlike_training_score"].as_f64().unwrap());
        assert!((a - b).abs() <= 1e-3 * a.abs().max(1.0), "{}: tract {a}, ONNX Runtime {b}", t["input"]);
        assert_eq!(flagged(t), flagged(o));
    }
}

#[test]
fn a_manifest_naming_a_score_the_model_lacks_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let src = common::repo().join("models/default");
    for name in ["model.onnx", "manifest.json"] {
        std::fs::copy(src.join(name), dir.path().join(name)).unwrap();
    }
    let config = octd::config::Config::default();
    let write = |manifest: &Value| std::fs::write(dir.path().join("manifest.json"), manifest.to_string()).unwrap();
    let mut manifest = common::shipped_manifest();
    manifest["ood"]["output"] = "distance".into();
    write(&manifest);
    let err = octd::infer::Classifier::load(dir.path(), &config.model, &config.triage).unwrap_err().to_string();
    assert!(err.contains("names output distance"), "{err}");
    manifest["ood"]["output"] = "logits".into();
    write(&manifest);
    let err = octd::infer::Classifier::load(dir.path(), &config.model, &config.triage).unwrap_err().to_string();
    assert!(err.contains("its own, named output"), "{err}");
    // Without the declaration the model is still valid: its extra output is not read.
    manifest.as_object_mut().unwrap().remove("ood");
    write(&manifest);
    let plain = octd::infer::Classifier::load(dir.path(), &config.model, &config.triage).unwrap();
    let scan = dir.path().join("blank.png");
    image::GrayImage::from_pixel(64, 64, image::Luma([128])).save(&scan).unwrap();
    assert_eq!(plain.classify_artifact(&scan).unwrap().unlike_training_score, None);
}
