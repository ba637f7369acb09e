//! De-identified artefact -> grey B-scans in [0, 1].

use std::path::Path;

use dicom_dictionary_std::tags;
use dicom_object::OpenFileOptions;
use dicom_pixeldata::{PixelDecoder, PlanarConfiguration};
use image::DynamicImage;

use super::preprocess::{GreyFrame, LUMA};
use super::InferError;

/// Every B-scan of the artefact at once (self-tests, tools: small inputs).
pub fn load(artifact: &Path) -> Result<Vec<GreyFrame>, InferError> {
    let mut all = Vec::new();
    for_each_batch(artifact, usize::MAX, |batch| {
        all.extend_from_slice(batch);
        Ok(())
    })?;
    Ok(all)
}

/// The artefact's B-scans, `batch` at a time, in order: a volume is never held as f32 whole,
/// only its decoded pixels and one batch of converted frames.
pub fn for_each_batch(
    artifact: &Path,
    batch: usize,
    mut f: impl FnMut(&[GreyFrame]) -> Result<(), InferError>,
) -> Result<(), InferError> {
    let is_dicom = artifact.extension().is_some_and(|e| e == "dcm");
    if is_dicom {
        dicom_batches(artifact, batch.max(1), f)
    } else {
        let image = image::open(artifact).map_err(|e| InferError::Input(format!("artefact does not decode: {e}")))?;
        f(&[from_image(&image)])
    }
}

/// Same conversions as octtrain.preprocess.to_grey01.
pub fn from_image(image: &DynamicImage) -> GreyFrame {
    let (width, height) = (image.width() as usize, image.height() as usize);
    let pixels = match image {
        DynamicImage::ImageLuma8(g) => g.as_raw().iter().map(|&v| f32::from(v) / 255.0).collect(),
        DynamicImage::ImageLuma16(g) => g.as_raw().iter().map(|&v| f32::from(v) / 65535.0).collect(),
        DynamicImage::ImageRgb16(rgb) => rgb
            .as_raw()
            .chunks_exact(3)
            .map(|p| luma(f32::from(p[0]) / 65535.0, f32::from(p[1]) / 65535.0, f32::from(p[2]) / 65535.0))
            .collect(),
        other => other
            .to_rgb8()
            .as_raw()
            .chunks_exact(3)
            .map(|p| luma(f32::from(p[0]) / 255.0, f32::from(p[1]) / 255.0, f32::from(p[2]) / 255.0))
            .collect(),
    };
    GreyFrame { width, height, pixels }
}

fn luma(r: f32, g: f32, b: f32) -> f32 {
    r * LUMA[0] + g * LUMA[1] + b * LUMA[2]
}

fn dicom_batches(
    path: &Path,
    batch: usize,
    mut f: impl FnMut(&[GreyFrame]) -> Result<(), InferError>,
) -> Result<(), InferError> {
    let obj = OpenFileOptions::new()
        .open_file(path)
        .map_err(|e| InferError::Input(format!("artefact is not readable DICOM: {e}")))?;
    let decoded = obj.decode_pixel_data().map_err(|e| InferError::Input(format!("pixel data does not decode: {e}")))?;
    let (rows, cols) = (decoded.rows() as usize, decoded.columns() as usize);
    let samples = decoded.samples_per_pixel() as usize;
    let bits_allocated = decoded.bits_allocated();
    let bits_stored = decoded.bits_stored().clamp(1, 16);
    let signed = decoded.pixel_representation() == dicom_pixeldata::PixelRepresentation::Signed;
    let planar = decoded.planar_configuration() == PlanarConfiguration::PixelFirst;
    let invert = obj
        .get(tags::PHOTOMETRIC_INTERPRETATION)
        .and_then(|e| e.to_str().ok())
        .is_some_and(|p| p.trim() == "MONOCHROME1");
    let max = ((1u32 << bits_stored) - 1) as f32;
    let offset = if signed { f32::from(1u16 << (bits_stored - 1)) } else { 0.0 };
    let count = decoded.number_of_frames();
    if count == 0 {
        return Err(InferError::Input("no frames".into()));
    }
    let mut frames = Vec::with_capacity(batch.min(count as usize));
    for i in 0..count {
        let data = decoded.frame_data(i).map_err(|e| InferError::Input(format!("frame {i}: {e}")))?;
        let values: Vec<f32> = match bits_allocated {
            8 if signed => data.iter().map(|&b| (f32::from(b as i8) + offset) / max).collect(),
            8 => data.iter().map(|&b| f32::from(b) / max).collect(),
            16 => data
                .chunks_exact(2)
                .map(|c| {
                    let raw = u16::from_le_bytes([c[0], c[1]]);
                    let v = if signed { f32::from(raw as i16) + offset } else { f32::from(raw) };
                    v / max
                })
                .collect(),
            other => return Err(InferError::Input(format!("{other}-bit pixels are not supported"))),
        };
        let n = rows * cols;
        if values.len() < n * samples {
            return Err(InferError::Input(format!("frame {i} is short")));
        }
        let mut pixels: Vec<f32> = if samples == 1 {
            values[..n].iter().map(|v| v.clamp(0.0, 1.0)).collect()
        } else if planar {
            (0..n).map(|i| luma(values[i], values[n + i], values[2 * n + i])).collect()
        } else {
            values.chunks_exact(samples).take(n).map(|p| luma(p[0], p[1], p[2])).collect()
        };
        if invert {
            pixels.iter_mut().for_each(|v| *v = 1.0 - *v);
        }
        frames.push(GreyFrame { width: cols, height: rows, pixels });
        if frames.len() == batch || i + 1 == count {
            f(&frames)?;
            frames.clear();
        }
    }
    Ok(())
}
