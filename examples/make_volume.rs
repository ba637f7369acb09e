//! `cargo run --example make_volume -- FRAMES OUT.dcm`: a multi-frame Ophthalmic Tomography
//! object of FRAMES 512x496 B-scans taken from the shared scans, built by the tests' own DICOM
//! builder (for the memory measurement in docs/benchmarks.md).

#[allow(dead_code)]
#[path = "../tests/common/dicom.rs"]
mod dicom;

use std::path::{Path, PathBuf};

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let (Some(frames), Some(out)) = (args.get(1).and_then(|n| n.parse::<usize>().ok()), args.get(2)) else {
        eprintln!("usage: make_volume FRAMES OUT.dcm");
        std::process::exit(2);
    };
    let shared = Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/data/oct");
    let mut scans: Vec<PathBuf> = Vec::new();
    for label in ["CNV", "DME", "DRUSEN", "NORMAL"] {
        scans.extend(std::fs::read_dir(shared.join(label)).into_iter().flatten().flatten().map(|e| e.path()));
    }
    scans.sort();
    assert!(!scans.is_empty(), "no shared scans under {}", shared.display());
    let pixels: Vec<Vec<u8>> = (0..frames).map(|i| dicom::grey_frame(&scans[i % scans.len()], 512, 496)).collect();
    let spec =
        dicom::Spec::plain(dicom::OPT_SOP_CLASS, dicom::Pixels::Native { width: 512, height: 496, frames: pixels });
    std::fs::write(out, dicom::build(spec)).expect("write the volume");
}
