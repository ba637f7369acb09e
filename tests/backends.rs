//! The inference backends on real scans: ONNX Runtime (loaded at run time) agrees with tract,
//! each result names the backend that produced it, and a backend that cannot load here falls
//! down the chain instead of failing.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

/// The library the daemon would load from the repository root (`ORT_DYLIB_PATH`, the
/// system directories, the .venv onnxruntime wheel).
fn onnxruntime_library() -> Option<PathBuf> {
    let found = octd::infer::ort_backend::find_library(None);
    if found.is_none() {
        eprintln!("SKIP: no libonnxruntime.so found (run scripts/test.sh, which installs the onnxruntime wheel)");
    }
    found
}

/// The shipped model on ONNX Runtime's CPU, with `concurrency` callers and the settings
/// `adjust` makes.
fn shipped_on_onnxruntime(
    library: &Path,
    concurrency: usize,
    adjust: impl FnOnce(&mut octd::config::ModelConfig),
) -> octd::infer::Classifier {
    let config = octd::config::Config::default();
    let mut model = config.model.clone();
    model.backend = octd::config::BackendKind::Onnxruntime;
    model.onnxruntime_library = Some(library.to_path_buf());
    model.concurrency = concurrency;
    adjust(&mut model);
    octd::infer::Classifier::load(&common::repo().join("models/default"), &model, &config.triage).unwrap()
}

#[test]
fn onnxruntime_agrees_with_tract_on_the_shared_scans() {
    let Some(images) = common::shared_oct_images() else { return };
    let Some(library) = onnxruntime_library() else { return };
    let files: Vec<PathBuf> = images.into_iter().map(|(p, _)| p).collect();
    let tract = common::classify_shipped("tract", None, &files);
    let ort = common::classify_shipped("onnxruntime", Some(&library), &files);
    assert_eq!(tract.len(), files.len());
    assert_eq!(ort.len(), files.len());
    let mut worst = 0f64;
    for (t, o) in tract.iter().zip(&ort) {
        assert_eq!(t["model"]["backend"], "tract");
        assert_eq!(o["model"]["backend"], "onnxruntime-cpu", "the result names the backend that ran");
        assert_eq!(t["label"], o["label"], "{}", t["input"]);
        for (class, p) in t["probabilities"].as_object().unwrap() {
            let q = o["probabilities"][class].as_f64().unwrap();
            worst = worst.max((p.as_f64().unwrap() - q).abs());
        }
    }
    assert!(worst < 1e-4, "largest probability difference tract vs ONNX Runtime: {worst}");
}

#[test]
fn gpu_backends_fall_back_down_the_chain() {
    let Some(images) = common::shared_oct_images() else { return };
    let file = vec![images[0].0.clone()];
    // No library at all: every ONNX Runtime step fails, tract runs.
    let missing = Path::new("/nonexistent/libonnxruntime.so");
    let r = common::classify_shipped("tensorrt", Some(missing), &file);
    assert_eq!(r[0]["model"]["backend"], "tract");
    assert!(r[0]["label"].is_string());

    // With the CPU-only library: TensorRT and CUDA are not in it, CPU ONNX Runtime runs —
    // unless this machine really has them.
    let Some(library) = onnxruntime_library() else { return };
    let r = common::classify_shipped("tensorrt", Some(&library), &file);
    let backend = r[0]["model"]["backend"].as_str().unwrap().to_string();
    assert!(
        ["onnxruntime-tensorrt", "onnxruntime-cuda", "onnxruntime-cpu"].contains(&backend.as_str()),
        "unexpected backend {backend}"
    );
    let has_gpu = Path::new("/dev/nvidia0").exists() || Path::new("/dev/nvhost-ctrl").exists();
    if !has_gpu {
        assert_eq!(backend, "onnxruntime-cpu");
    }
}

#[test]
fn the_shipped_bundle_passes_its_self_test_on_onnxruntime() {
    let Some(library) = onnxruntime_library() else { return };
    let out = Command::new(env!("CARGO_BIN_EXE_octd"))
        .current_dir(common::repo())
        .args(["bundle", "verify", "--repository", "models/channel", "--root", "models/channel/metadata/1.root.json"])
        .env("OCTD_MODEL__BACKEND", "onnxruntime")
        .env("OCTD_MODEL__ONNXRUNTIME_LIBRARY", &library)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["verified"]["backend"], "onnxruntime-cpu", "{report}");
    assert_eq!(report["verified"]["selftest_cases"], 4, "{report}");
}

#[test]
fn activation_maps_agree_across_backends_and_draw_on_the_scan() {
    let Some(images) = common::shared_oct_images() else { return };
    // The shipped model, and the same model with a manifest that does not declare its maps.
    let model = common::repo().join("models/default");
    let dir = tempfile::tempdir().unwrap();
    for name in ["model.onnx", "manifest.json"] {
        std::fs::copy(model.join(name), dir.path().join(name)).unwrap();
    }
    let mut manifest = common::shipped_manifest();
    manifest.as_object_mut().unwrap().remove("heatmap");
    std::fs::write(dir.path().join("manifest.json"), manifest.to_string()).unwrap();
    let config = octd::config::Config::default();
    let load = |backend: octd::config::BackendKind, library: Option<PathBuf>| {
        let mut m = config.model.clone();
        m.backend = backend;
        m.onnxruntime_library = library;
        octd::infer::Classifier::load(&model, &m, &config.triage).unwrap()
    };
    let tract = load(octd::config::BackendKind::Tract, None);
    let mut tract_config = config.model.clone();
    tract_config.backend = octd::config::BackendKind::Tract;
    let plain = octd::infer::Classifier::load(dir.path(), &tract_config, &config.triage).unwrap();
    assert!(tract.has_heatmap() && !plain.has_heatmap());
    let cnv = images.iter().find(|(_, l)| l == "CNV").map(|(p, _)| p.clone()).unwrap();
    let (with, heatmap) = tract.classify_artifact_with_heatmap(&cnv).unwrap();
    let heatmap = heatmap.expect("a heatmap");
    // The second output changes nothing about the answer.
    let (without, none) = plain.classify_artifact_with_heatmap(&cnv).unwrap();
    assert!(none.is_none());
    assert_eq!(with.label, without.label);
    for (class, p) in &with.probabilities {
        assert!((p - without.probabilities[class]).abs() < 1e-5, "{class}");
    }
    let (width, height) = image::image_dimensions(&cnv).unwrap();
    assert_eq!((heatmap.grid_width, heatmap.grid_height), (7, 7), "224 / 32");
    assert_eq!((heatmap.frame_width, heatmap.frame_height), (width, height));
    let overlay = image::load_from_memory(&heatmap.overlay_png().unwrap()).unwrap().to_rgba8();
    assert_eq!(overlay.dimensions(), (width, height), "drawn at the scan's own size");
    let alphas: Vec<u8> = overlay.pixels().map(|p| p.0[3]).collect();
    assert!(alphas.contains(&0) && alphas.iter().any(|&a| a > 150), "transparent where it looked least");
    // ONNX Runtime computes the same map where its library is here.
    if let Some(library) = onnxruntime_library() {
        let ort = load(octd::config::BackendKind::Onnxruntime, Some(library));
        let (_, other) = ort.classify_artifact_with_heatmap(&cnv).unwrap();
        let other = other.expect("ONNX Runtime gives the map too");
        let worst = heatmap.values.iter().zip(&other.values).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
        assert!(worst < 1e-3, "tract vs ONNX Runtime activation maps differ by {worst}");
    }
}

#[test]
fn onnxruntime_serves_concurrent_callers_each_on_its_own_session() {
    let Some(images) = common::shared_oct_images() else { return };
    let Some(library) = onnxruntime_library() else { return };
    let classifier = shipped_on_onnxruntime(&library, 2, |model| model.threads = 1);
    let files: Vec<PathBuf> = images.iter().take(8).map(|(p, _)| p.clone()).collect();
    let alone: Vec<_> = files.iter().map(|f| classifier.classify_artifact(f).unwrap()).collect();
    // Two callers at once, as the pipeline's two workers: the same answers.
    let together: Vec<_> = std::thread::scope(|s| {
        let halves: Vec<_> = files
            .chunks(4)
            .map(|half| s.spawn(|| half.iter().map(|f| classifier.classify_artifact(f).unwrap()).collect::<Vec<_>>()))
            .collect();
        halves.into_iter().flat_map(|h| h.join().unwrap()).collect()
    });
    assert_eq!(alone, together);
}

/// Several CPU sessions run on one copy of the weights ONNX Runtime optimized once, and a
/// lone B-scan may run on the idle machine's session with every core: each answers as a
/// session that optimized the model for itself.
#[test]
fn sessions_on_one_copy_of_the_weights_answer_as_a_session_of_its_own() {
    let Some(images) = common::shared_oct_images() else { return };
    let Some(library) = onnxruntime_library() else { return };
    let own = shipped_on_onnxruntime(&library, 1, |_| ());
    let shared = shipped_on_onnxruntime(&library, 2, |_| ());
    assert!(!own.shares_weights(), "one session on every core has nothing to share");
    assert!(shared.shares_weights(), "two sessions (and the idle machine's) share the weights");
    let mut worst = 0f32;
    for (path, _) in images.iter().take(6) {
        let frame = octd::infer::frames::from_image(&image::open(path).unwrap());
        let expected = own.classify_frames_with_heatmap(std::slice::from_ref(&frame), false).unwrap();
        // On a shared session, then alone (the idle machine's session where there is one).
        for alone in [false, true] {
            let got = shared.classify_frames_with_heatmap(std::slice::from_ref(&frame), alone).unwrap();
            assert_eq!(got.0.label, expected.0.label, "{}", path.display());
            for (class, p) in &expected.0.probabilities {
                worst = worst.max((p - got.0.probabilities[class]).abs());
            }
            let (map, want) = (got.1.unwrap().values, expected.1.as_ref().unwrap().values.clone());
            worst = map.iter().zip(&want).fold(worst, |w, (a, b)| w.max((a - b).abs()));
        }
    }
    assert!(worst < 1e-5, "shared weights changed an answer by {worst}");
}

#[test]
fn a_volume_on_several_sessions_gives_the_answer_of_one() {
    let Some(images) = common::shared_oct_images() else { return };
    let Some(library) = onnxruntime_library() else { return };
    let dir = tempfile::tempdir().unwrap();
    // 20 B-scans, one of them CNV.
    let volume = dir.path().join("volume.dcm");
    std::fs::write(&volume, common::dicom::volume_with_cnv_at(&images, 13, 20, 256, 248)).unwrap();
    // One B-scan a batch: twenty batches over three lanes finish out of order.
    let load = |concurrency: usize| shipped_on_onnxruntime(&library, concurrency, |model| model.batch_size = 1);
    let one = load(1).classify_artifact(&volume).unwrap();
    let lanes = load(3).classify_artifact(&volume).unwrap();
    assert_eq!(one, lanes, "frame order, per-class maxima and the most suspicious B-scan are kept");
    assert_eq!(lanes.frames, 20);
}

/// ONNX Runtime builds with telemetry compiled in (Microsoft's wheel among them) keep a device
/// id and queue usage events for upload under ~/.cache/Microsoft unless told not to; a
/// clinic's device must leave nothing there, nor in its working folder. The environment is
/// cleared, so no CI variable silences the runtime on its behalf: this fails without octd's
/// own switch (checked by removing it).
#[test]
fn onnxruntime_keeps_and_queues_no_telemetry() {
    let Some(images) = common::shared_oct_images() else { return };
    let Some(library) = onnxruntime_library() else { return };
    let library = library.canonicalize().unwrap();
    let telemetry_folder: &[u8] = b"Microsoft/DeveloperTools/.onnxruntime";
    let compiled_in = std::fs::read(&library).unwrap().windows(telemetry_folder.len()).any(|w| w == telemetry_folder);
    if !compiled_in {
        eprintln!("SKIP: {} has no telemetry compiled in; nothing to keep off", library.display());
        return;
    }
    let (home, work) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_octd"));
    cmd.arg("classify").arg("--json").arg("--model").arg(common::repo().join("models/default"));
    cmd.arg(images[0].0.canonicalize().unwrap()).current_dir(work.path()).env_clear();
    // What a process needs to run at all; none of it silences the runtime.
    for needed in ["PATH", "TMPDIR", "LD_LIBRARY_PATH"] {
        if let Some(value) = std::env::var_os(needed) {
            cmd.env(needed, value);
        }
    }
    cmd.env("HOME", home.path())
        .env("OCTD_MODEL__BACKEND", "onnxruntime")
        .env("OCTD_MODEL__ONNXRUNTIME_LIBRARY", &library);
    let out = cmd.output().unwrap();
    assert!(out.status.success(), "classify failed: {}", String::from_utf8_lossy(&out.stderr));
    let result: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(result["model"]["backend"], "onnxruntime-cpu", "ONNX Runtime ran");
    for (folder, what) in [(home.path(), "home"), (work.path(), "working")] {
        let left: Vec<_> = std::fs::read_dir(folder).unwrap().flatten().map(|e| e.path()).collect();
        assert!(left.is_empty(), "ONNX Runtime left telemetry state in the {what} folder: {left:?}");
    }
}
