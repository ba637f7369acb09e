//! Dump the edge's model input for one image, as little-endian f32 (CxHxW), for the
//! cross-language golden test (trainer/tests/test_golden_preprocess.py); or, with `--png`,
//! the image's pixels as the edge decodes them, losslessly as PNG (a de-identified JPEG
//! artefact's pixels are the edge decoder's, which PIL's may differ from by a grey level).
//!
//! usage: preprocess_dump IMAGE MODEL_DIR OUT.bin
//!        preprocess_dump --png IMAGE OUT.png

use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<PathBuf> = std::env::args_os().skip(1).map(PathBuf::from).collect();
    if let [flag, image, out] = args.as_slice() {
        if flag.as_os_str() == "--png" {
            image::open(image)?.save_with_format(out, image::ImageFormat::Png)?;
            return Ok(());
        }
    }
    let [image, model_dir, out] = args.as_slice() else {
        return Err("usage: preprocess_dump IMAGE MODEL_DIR OUT.bin | preprocess_dump --png IMAGE OUT.png".into());
    };
    let manifest = octd::infer::Manifest::load(model_dir)?;
    let frames = octd::infer::frames::load(image)?;
    let mut tensor = Vec::new();
    octd::infer::preprocess::preprocess_into(&frames[0], &manifest.input, &mut tensor);
    let bytes: Vec<u8> = tensor.iter().flat_map(|v| v.to_le_bytes()).collect();
    std::fs::write(out, bytes)?;
    Ok(())
}
