//! Dump the edge's model input for one image, as little-endian f32 (CxHxW), for the
//! cross-language golden test (trainer/tests/test_golden_preprocess.py).
//!
//! usage: preprocess_dump IMAGE MODEL_DIR OUT.bin

use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<PathBuf> = std::env::args_os().skip(1).map(PathBuf::from).collect();
    let [image, model_dir, out] = args.as_slice() else {
        return Err("usage: preprocess_dump IMAGE MODEL_DIR OUT.bin".into());
    };
    let manifest = octd::infer::Manifest::load(model_dir)?;
    let frames = octd::infer::frames::load(image)?;
    let mut tensor = Vec::new();
    octd::infer::preprocess::preprocess_into(&frames[0], &manifest.input, &mut tensor);
    let bytes: Vec<u8> = tensor.iter().flat_map(|v| v.to_le_bytes()).collect();
    std::fs::write(out, bytes)?;
    Ok(())
}
