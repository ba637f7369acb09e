//! Per-stage latency on real data: de-identification and classification of one B-scan and
//! of a 64-B-scan volume, a B-scan's conversion to the model's input, and one store commit.
//! `cargo bench --bench stages`.
//! Uses ../shared/data/oct when present, else a synthetic speckle image (figures in
//! docs/benchmarks.md come from the real data).

#[path = "../tests/common/dicom.rs"]
#[allow(dead_code)]
mod dicom;

use std::path::{Path, PathBuf};

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use octd::config::{Config, ModelConfig, TriageConfig};
use octd::deid::{Deidentifier, InputLimits};
use octd::infer::Classifier;
use octd::scan::{Linkage, ScanId, ScanRecord, ScanState};
use octd::secret::DeviceSecret;
use octd::store::{OutboxMessage, Store};

fn sample_bscan(dir: &Path) -> PathBuf {
    let shared = Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/data/oct/CNV/CNV-53018-1.jpeg");
    if shared.exists() {
        return shared;
    }
    eprintln!("note: ../shared/data absent; benchmarking a synthetic 512x496 image");
    let img = image::GrayImage::from_fn(512, 496, |x, y| image::Luma([((x * 7 + y * 13) % 251) as u8]));
    let path = dir.join("synthetic.jpeg");
    img.save(&path).unwrap_or_else(|e| panic!("cannot write {}: {e}", path.display()));
    path
}

fn volume(dir: &Path, bscan: &Path) -> PathBuf {
    let frame = dicom::grey_frame(bscan, 512, 496);
    let bytes = dicom::build(dicom::Spec::plain(
        dicom::OPT_SOP_CLASS,
        dicom::Pixels::Native { width: 512, height: 496, frames: vec![frame; 64] },
    ));
    let path = dir.join("volume.dcm");
    std::fs::write(&path, bytes).unwrap_or_else(|e| panic!("{e}"));
    path
}

fn benches(c: &mut Criterion) {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let bscan = sample_bscan(dir.path());
    let volume = volume(dir.path(), &bscan);
    let config = Config::default();
    let secret = DeviceSecret::load_or_create(&dir.path().join("state")).unwrap_or_else(|e| panic!("{e}"));
    let deid = Deidentifier::new(secret.clone(), Vec::new(), InputLimits::from(&config.ingest));
    let out = dir.path().join("out");

    let mut group = c.benchmark_group("deid");
    group.sample_size(20);
    for (name, input) in [("bscan_jpeg", &bscan), ("volume_64_dicom", &volume)] {
        group.bench_with_input(BenchmarkId::from_parameter(name), input, |b, input| {
            b.iter(|| deid.deidentify(input, &out, ScanId::new()).unwrap_or_else(|e| panic!("{e}")))
        });
    }
    group.finish();

    let model_dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("models/default");
    // The group says tract: pinned, not whatever `auto` finds here.
    let tract = ModelConfig { backend: octd::config::BackendKind::Tract, ..ModelConfig::default() };
    let classifier = Classifier::load(&model_dir, &tract, &TriageConfig::default()).unwrap_or_else(|e| panic!("{e}"));
    // What a 2-D scan costs besides inference: its decoded pixels to grey levels, their
    // statistics for the review's input ranges, and the model's input.
    let decoded = image::open(&bscan).unwrap_or_else(|e| panic!("{e}"));
    let frame = octd::infer::frames::from_image(&decoded);
    let spec = classifier.input_spec().clone();
    let mut group = c.benchmark_group("preprocess");
    group.bench_function("grey_levels", |b| b.iter(|| octd::infer::frames::from_image(&decoded)));
    group.bench_function("mean_std", |b| b.iter(|| frame.mean_std()));
    group.bench_function("model_input", |b| {
        let mut input = Vec::with_capacity(spec.channels * spec.height * spec.width);
        b.iter(|| {
            input.clear();
            octd::infer::preprocess::preprocess_into(&frame, &spec, &mut input);
            input.len()
        })
    });
    group.finish();

    let bscan_artifact = deid.deidentify(&bscan, &out, ScanId::new()).unwrap_or_else(|e| panic!("{e}")).artifact;
    let volume_artifact = deid.deidentify(&volume, &out, ScanId::new()).unwrap_or_else(|e| panic!("{e}")).artifact;
    let mut group = c.benchmark_group("infer_tract");
    group.sample_size(10);
    for (name, artifact) in [("bscan", &bscan_artifact), ("volume_64", &volume_artifact)] {
        group.bench_with_input(BenchmarkId::from_parameter(name), artifact, |b, artifact| {
            b.iter(|| classifier.classify_artifact(artifact).unwrap_or_else(|e| panic!("{e}")))
        });
    }
    group.finish();

    let store = Store::open(&dir.path().join("bench.redb"), &secret).unwrap_or_else(|e| panic!("{e}"));
    c.bench_function("store/claim_then_classified_with_outbox", |b| {
        b.iter(|| {
            let id = ScanId::new();
            let mut record = ScanRecord::received(id);
            store.record_claim(&record, &Linkage::default()).unwrap_or_else(|e| panic!("{e}"));
            record.state = ScanState::Classified;
            let message =
                OutboxMessage { topic: "t".into(), payload: "{}".into(), retain: false, completes_scan: Some(id) };
            store.transition(&record, Some(&message)).unwrap_or_else(|e| panic!("{e}"))
        })
    });
}

criterion_group!(stages, benches);
criterion_main!(stages);
