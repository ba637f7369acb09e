//! `cargo run --example fuzz_seeds`: seed the fuzzing corpora (git-ignored, under
//! fuzz/corpus/) from the test fixtures: the
//! shared OCT scans (read from ../shared/data, never copied into the repository), each
//! re-encoded as PNG, TIFF and BMP, real DICOM objects built by the tests' own builder
//! (native, multi-frame, JPEG, RLE, deflated), the shipped model bundle and worker frames.

#[allow(dead_code)]
#[path = "../tests/common/dicom.rs"]
mod dicom;

use std::io::Cursor;
use std::path::{Path, PathBuf};

use dicom::{Pixels, Spec};

fn write(dir: &Path, name: &str, bytes: &[u8]) {
    std::fs::create_dir_all(dir).expect("corpus folder");
    std::fs::write(dir.join(name), bytes).expect("seed");
}

fn main() {
    let repo = Path::new(env!("CARGO_MANIFEST_DIR"));
    let corpus = repo.join("fuzz/corpus");
    let shared = repo.parent().expect("workspace").join("shared/data/oct");
    let mut scans: Vec<PathBuf> = Vec::new();
    for label in ["CNV", "DME", "DRUSEN", "NORMAL"] {
        let mut files: Vec<PathBuf> =
            std::fs::read_dir(shared.join(label)).into_iter().flatten().flatten().map(|e| e.path()).collect();
        files.sort();
        scans.extend(files.into_iter().take(2));
    }
    assert!(!scans.is_empty(), "no shared scans under {}", shared.display());
    let deid = corpus.join("deidentify");
    let walk = corpus.join("dicom_walk");
    for (i, path) in scans.iter().enumerate() {
        let jpeg = std::fs::read(path).expect("scan");
        write(&deid, &format!("scan-{i}.jpeg"), &jpeg);
        let img = image::load_from_memory(&jpeg).expect("decodes").to_luma8();
        let small = image::imageops::resize(&img, 128, 124, image::imageops::FilterType::Triangle);
        for (ext, format) in
            [("png", image::ImageFormat::Png), ("tiff", image::ImageFormat::Tiff), ("bmp", image::ImageFormat::Bmp)]
        {
            let mut out = Vec::new();
            small.write_to(&mut Cursor::new(&mut out), format).expect("encode");
            write(&deid, &format!("scan-{i}.{ext}"), &out);
        }
    }
    let frames = |n: usize, w: u32, h: u32| -> Vec<Vec<u8>> {
        (0..n).map(|i| dicom::grey_frame(&scans[i % scans.len()], w, h)).collect()
    };
    let (w, h) = image::image_dimensions(&scans[0]).expect("dimensions");
    let objects = [
        (
            "native.dcm",
            Spec::plain(dicom::OPT_SOP_CLASS, Pixels::Native { width: 64, height: 62, frames: frames(1, 64, 62) }),
        ),
        (
            "volume.dcm",
            Spec::plain(dicom::OPT_SOP_CLASS, Pixels::Native { width: 64, height: 62, frames: frames(4, 64, 62) }),
        ),
        (
            "jpeg.dcm",
            Spec::plain(
                dicom::SC_SOP_CLASS,
                Pixels::Jpeg { width: w, height: h, jpeg: std::fs::read(&scans[0]).expect("scan") },
            ),
        ),
        (
            "rle.dcm",
            Spec::plain(dicom::OPT_SOP_CLASS, Pixels::Rle { width: 64, height: 62, frames: frames(2, 64, 62) }),
        ),
        (
            "deflated.dcm",
            Spec::plain(dicom::OPT_SOP_CLASS, Pixels::Deflated { width: 64, height: 62, frames: frames(1, 64, 62) }),
        ),
    ];
    for (name, spec) in objects {
        let bytes = dicom::build(spec);
        write(&deid, name, &bytes);
        let mut with_syntax = vec![1u8];
        with_syntax.extend_from_slice(&bytes);
        write(&walk, name, &with_syntax);
    }
    let bundles = repo.join("models/channel/targets");
    for entry in std::fs::read_dir(&bundles).expect("shipped channel").flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.ends_with(".tar.gz") {
            write(&corpus.join("bundle_archive"), "shipped.tar.gz", &std::fs::read(entry.path()).expect("bundle"));
        }
    }
    let mut frame = Vec::new();
    let hello = octd::isolation::protocol::Header::Hello { pid: 1, sandbox: "seccomp".into() };
    octd::isolation::protocol::write_frame(&mut frame, &hello, b"").expect("frame");
    let job = octd::isolation::protocol::Header::Job { cpu_seconds: 60 };
    octd::isolation::protocol::write_frame(&mut frame, &job, b"pixels").expect("frame");
    write(&corpus.join("worker_protocol"), "hello-job", &frame);
    println!("seeded {}", corpus.display());
}
