//! The inference backends side by side on the default model and the same input tensors:
//! tract and ONNX Runtime (CPU provider; TensorRT/CUDA where a GPU and JetPack's library are
//! present), batch 1 and batch 8. `cargo bench --bench backends`.
//!
//! Writes the exact input tensors to target/bench-inputs/ so that
//! `scripts/bench_onnxruntime.py` times onnxruntime called from Python on the same bytes.
//! Figures: docs/benchmarks.md.

use std::path::{Path, PathBuf};

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use octd::config::{BackendKind, ModelConfig, TriageConfig};
use octd::infer::preprocess::preprocess_into;
use octd::infer::{frames, Classifier};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Real B-scans when ../shared/data is here (first 8 files), else synthetic speckle.
fn input_frames() -> Vec<octd::infer::GreyFrame> {
    let shared = root().join("../shared/data/oct");
    let mut files: Vec<PathBuf> = ["CNV", "DME", "DRUSEN", "NORMAL"]
        .iter()
        .flat_map(|c| std::fs::read_dir(shared.join(c)).into_iter().flatten().flatten().map(|e| e.path()))
        .collect();
    files.sort();
    if files.is_empty() {
        eprintln!("note: ../shared/data absent; benchmarking synthetic frames");
        return (0..8)
            .map(|i| octd::infer::GreyFrame {
                width: 512,
                height: 496,
                pixels: (0..512 * 496).map(|p| ((p * 7 + i * 13) % 251) as f32 / 255.0).collect(),
            })
            .collect();
    }
    files
        .iter()
        .take(8)
        .map(|f| {
            let img = image::open(f).unwrap_or_else(|e| panic!("{}: {e}", f.display()));
            frames::from_image(&img)
        })
        .collect()
}

fn write_tensor(path: &Path, data: &[f32]) {
    let bytes: Vec<u8> = data.iter().flat_map(|v| v.to_le_bytes()).collect();
    std::fs::write(path, bytes).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
}

fn benches(c: &mut Criterion) {
    let model_dir = root().join("models/default");
    let triage = TriageConfig::default();
    let frames = input_frames();
    let out_dir = root().join("target/bench-inputs");
    std::fs::create_dir_all(&out_dir).unwrap_or_else(|e| panic!("{e}"));

    let mut group = c.benchmark_group("backend");
    group.sample_size(30);
    for kind in [BackendKind::Tract, BackendKind::Onnxruntime, BackendKind::Auto] {
        // Two intra-op threads on every backend: this machine has two cores.
        let config = ModelConfig { backend: kind, threads: 2, ..ModelConfig::default() };
        let classifier = match Classifier::load(&model_dir, &config, &triage) {
            Ok(c) => c,
            Err(e) => panic!("{kind:?}: {e}"),
        };
        let backend = classifier.stamp().backend.clone();
        if kind != BackendKind::Tract && backend == "tract" {
            eprintln!("note: {kind:?} fell back to tract here (no ONNX Runtime library); skipped");
            continue;
        }
        if kind == BackendKind::Auto && backend == "onnxruntime-cpu" {
            continue; // no GPU provider here: the same as the row above
        }
        let spec = classifier.input_spec().clone();
        for batch in [1usize, 8] {
            let mut input = Vec::new();
            for frame in frames.iter().cycle().take(batch) {
                preprocess_into(frame, &spec, &mut input);
            }
            write_tensor(&out_dir.join(format!("batch{batch}.f32")), &input);
            let shape = [batch, spec.channels, spec.height, spec.width];
            group.bench_with_input(BenchmarkId::new(backend.clone(), format!("batch{batch}")), &input, |b, input| {
                b.iter(|| classifier.run_tensor(input.clone(), shape).unwrap_or_else(|e| panic!("{e}")))
            });
        }
    }
    group.finish();
}

criterion_group!(backend_benches, benches);
criterion_main!(backend_benches);
