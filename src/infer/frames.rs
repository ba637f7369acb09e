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

/// An 8-bit grey B-scan as PNG (the reading room shows what inference saw).
pub fn encode_png(width: u32, height: u32, grey: Vec<u8>) -> Result<Vec<u8>, InferError> {
    let image = image::GrayImage::from_raw(width, height, grey)
        .ok_or_else(|| InferError::Input("a B-scan of inconsistent size".into()))?;
    let mut png = std::io::Cursor::new(Vec::new());
    image.write_to(&mut png, image::ImageFormat::Png).map_err(|e| InferError::Input(format!("PNG: {e}")))?;
    Ok(png.into_inner())
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

/// The pixel layout the conversion needs, read from the object's own attributes.
struct Layout {
    rows: usize,
    cols: usize,
    samples: usize,
    bits_allocated: u16,
    bits_stored: u16,
    signed: bool,
    planar: bool,
    invert: bool,
    frames: u32,
}

fn attribute(obj: &DicomFile, tag: dicom_core::Tag) -> Option<u32> {
    obj.get(tag).and_then(|e| e.to_int::<u32>().ok())
}

impl Layout {
    fn read(obj: &DicomFile) -> Result<Layout, InferError> {
        let need = |tag, name: &str| attribute(obj, tag).ok_or_else(|| InferError::Input(format!("{name} missing")));
        let rows = need(tags::ROWS, "Rows")? as usize;
        let cols = need(tags::COLUMNS, "Columns")? as usize;
        let bits_allocated = need(tags::BITS_ALLOCATED, "BitsAllocated")? as u16;
        Ok(Layout {
            rows,
            cols,
            samples: attribute(obj, tags::SAMPLES_PER_PIXEL).unwrap_or(1).max(1) as usize,
            bits_allocated,
            bits_stored: attribute(obj, tags::BITS_STORED).map_or(bits_allocated, |b| b as u16).clamp(1, 16),
            signed: attribute(obj, tags::PIXEL_REPRESENTATION) == Some(1),
            planar: attribute(obj, tags::PLANAR_CONFIGURATION) == Some(1),
            invert: obj
                .get(tags::PHOTOMETRIC_INTERPRETATION)
                .and_then(|e| e.to_str().ok())
                .is_some_and(|p| p.trim() == "MONOCHROME1"),
            frames: attribute(obj, tags::NUMBER_OF_FRAMES).unwrap_or(1).max(1),
        })
    }

    fn frame_bytes(&self) -> usize {
        self.rows * self.cols * self.samples * usize::from(self.bits_allocated).div_ceil(8)
    }
}

type DicomFile = dicom_object::FileDicomObject<dicom_object::InMemDicomObject>;

/// Native (uncompressed) pixel data as the parser stored it: read in place, one frame at a
/// time, so a volume is never copied whole (the toolkit's whole-volume decode copies it).
enum Native<'a> {
    Bytes(std::borrow::Cow<'a, [u8]>),
    Words(&'a [u16]),
}

impl Native<'_> {
    /// Frame `i`'s little-endian bytes into `out`.
    fn frame(&self, i: usize, len: usize, out: &mut Vec<u8>) -> Option<()> {
        out.clear();
        let start = i.checked_mul(len)?;
        match self {
            Native::Bytes(b) => out.extend_from_slice(b.get(start..start.checked_add(len)?)?),
            Native::Words(w) if start.is_multiple_of(2) && len.is_multiple_of(2) => {
                w.get(start / 2..(start + len) / 2)?.iter().for_each(|v| out.extend_from_slice(&v.to_le_bytes()))
            }
            Native::Words(w) => {
                for k in start..start.checked_add(len)? {
                    out.push(w.get(k / 2)?.to_le_bytes()[k % 2]);
                }
            }
        }
        Some(())
    }
}

fn dicom_batches(
    path: &Path,
    batch: usize,
    mut f: impl FnMut(&[GreyFrame]) -> Result<(), InferError>,
) -> Result<(), InferError> {
    use dicom_core::value::{PrimitiveValue, Value};
    let obj = OpenFileOptions::new()
        .open_file(path)
        .map_err(|e| InferError::Input(format!("artefact is not readable DICOM: {e}")))?;
    let layout = Layout::read(&obj)?;
    let pixel_data = obj.get(tags::PIXEL_DATA).ok_or_else(|| InferError::Input("PixelData missing".into()))?;
    let native = match pixel_data.value() {
        Value::Primitive(PrimitiveValue::U8(b)) => Some(Native::Bytes(std::borrow::Cow::Borrowed(&b[..]))),
        Value::Primitive(PrimitiveValue::U16(w)) => Some(Native::Words(&w[..])),
        // Stored as another type (rare): converted once.
        Value::Primitive(p) => Some(Native::Bytes(p.to_bytes())),
        Value::PixelSequence(_) => None,
        Value::Sequence(_) => return Err(InferError::Input("PixelData is a sequence".into())),
    };
    // Compressed: decoded whole, as the decoder worker proved it (one copy of the pixels).
    let decoded = match native {
        Some(_) => None,
        None => {
            Some(obj.decode_pixel_data().map_err(|e| InferError::Input(format!("pixel data does not decode: {e}")))?)
        }
    };
    let mut frames = Vec::with_capacity(batch.min(layout.frames as usize));
    let mut raw = Vec::new();
    for i in 0..layout.frames {
        let frame = match &native {
            Some(native) => {
                native
                    .frame(i as usize, layout.frame_bytes(), &mut raw)
                    .ok_or_else(|| InferError::Input(format!("frame {i} is short")))?;
                convert(&raw, &layout)?
            }
            None => {
                let Some(decoded) = &decoded else { return Err(InferError::Input("no pixel data".into())) };
                let decoded_layout = Layout {
                    rows: decoded.rows() as usize,
                    cols: decoded.columns() as usize,
                    samples: decoded.samples_per_pixel() as usize,
                    bits_allocated: decoded.bits_allocated(),
                    bits_stored: decoded.bits_stored().clamp(1, 16),
                    signed: decoded.pixel_representation() == dicom_pixeldata::PixelRepresentation::Signed,
                    planar: decoded.planar_configuration() == PlanarConfiguration::PixelFirst,
                    ..layout
                };
                let data = decoded.frame_data(i).map_err(|e| InferError::Input(format!("frame {i}: {e}")))?;
                convert(data, &decoded_layout)?
            }
        };
        frames.push(frame);
        if frames.len() == batch || i + 1 == layout.frames {
            f(&frames)?;
            frames.clear();
        }
    }
    Ok(())
}

/// One frame's native samples -> grey [0, 1] (same conversions as octtrain.preprocess).
/// Exactly one frame's bytes are read, whatever follows them.
fn convert(data: &[u8], layout: &Layout) -> Result<GreyFrame, InferError> {
    let data = data.get(..layout.frame_bytes()).ok_or_else(|| InferError::Input("a frame is short".into()))?;
    let max = ((1u32 << layout.bits_stored) - 1) as f32;
    let offset = if layout.signed { f32::from(1u16 << (layout.bits_stored - 1)) } else { 0.0 };
    let signed = layout.signed;
    let values: Vec<f32> = match layout.bits_allocated {
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
    let n = layout.rows * layout.cols;
    if values.len() < n * layout.samples {
        return Err(InferError::Input("a frame is short".into()));
    }
    let mut pixels: Vec<f32> = if layout.samples == 1 {
        values[..n].iter().map(|v| v.clamp(0.0, 1.0)).collect()
    } else if layout.planar {
        (0..n).map(|i| luma(values[i], values[n + i], values[2 * n + i])).collect()
    } else {
        values.chunks_exact(layout.samples).take(n).map(|p| luma(p[0], p[1], p[2])).collect()
    };
    if layout.invert {
        pixels.iter_mut().for_each(|v| *v = 1.0 - *v);
    }
    Ok(GreyFrame { width: layout.cols, height: layout.rows, pixels })
}

#[cfg(test)]
mod tests {
    use dicom_core::value::PrimitiveValue;
    use dicom_core::{DataElement, VR};
    use dicom_object::meta::FileMetaTableBuilder;
    use dicom_object::InMemDicomObject;

    use super::*;

    fn write(elements: Vec<DataElement<InMemDicomObject>>, pixel: DataElement<InMemDicomObject>) -> tempfile::TempPath {
        let mut obj = InMemDicomObject::from_element_iter(elements);
        obj.put(pixel);
        let meta = FileMetaTableBuilder::new()
            .media_storage_sop_class_uid("1.2.840.10008.5.1.4.1.1.77.1.5.4")
            .media_storage_sop_instance_uid("2.25.1")
            .transfer_syntax("1.2.840.10008.1.2.1")
            .build()
            .unwrap();
        let path = tempfile::Builder::new().suffix(".dcm").tempfile().unwrap().into_temp_path();
        obj.with_exact_meta(meta).write_to_file(&path).unwrap();
        path
    }

    fn us(tag: dicom_core::Tag, v: u16) -> DataElement<InMemDicomObject> {
        DataElement::new(tag, VR::US, PrimitiveValue::from(v))
    }

    fn geometry(rows: u16, cols: u16, frames: &str, bits: u16, stored: u16) -> Vec<DataElement<InMemDicomObject>> {
        vec![
            us(tags::ROWS, rows),
            us(tags::COLUMNS, cols),
            us(tags::SAMPLES_PER_PIXEL, 1),
            us(tags::BITS_ALLOCATED, bits),
            us(tags::BITS_STORED, stored),
            us(tags::HIGH_BIT, stored - 1),
            us(tags::PIXEL_REPRESENTATION, 0),
            DataElement::new(tags::NUMBER_OF_FRAMES, VR::IS, PrimitiveValue::from(frames)),
            DataElement::new(tags::PHOTOMETRIC_INTERPRETATION, VR::CS, PrimitiveValue::from("MONOCHROME2")),
        ]
    }

    #[test]
    fn native_volumes_are_read_frame_by_frame_in_batches() {
        // Three 8-bit frames read two at a time: every value lands in its frame, in order.
        let bytes: Vec<u8> = (0..3 * 4 * 5).map(|i| (i * 4) as u8).collect();
        let path = write(
            geometry(4, 5, "3", 8, 8),
            DataElement::new(tags::PIXEL_DATA, VR::OB, PrimitiveValue::U8(bytes.clone().into())),
        );
        let mut batches = Vec::new();
        for_each_batch(&path, 2, |batch| {
            batches.push(batch.to_vec());
            Ok(())
        })
        .unwrap();
        assert_eq!(batches.iter().map(Vec::len).collect::<Vec<_>>(), [2, 1]);
        let frames: Vec<GreyFrame> = batches.concat();
        for (f, frame) in frames.iter().enumerate() {
            assert_eq!((frame.width, frame.height), (5, 4));
            for (i, &v) in frame.pixels.iter().enumerate() {
                assert!((v - f32::from(bytes[f * 20 + i]) / 255.0).abs() < 1e-6);
            }
        }
    }

    #[test]
    fn sixteen_bit_volumes_are_scaled_by_their_stored_bits() {
        let words: Vec<u16> = (0..2 * 3 * 3).map(|i| i * 200).collect();
        let path = write(
            geometry(3, 3, "2", 16, 12),
            DataElement::new(tags::PIXEL_DATA, VR::OW, PrimitiveValue::U16(words.clone().into())),
        );
        let frames = load(&path).unwrap();
        assert_eq!(frames.len(), 2);
        for (f, frame) in frames.iter().enumerate() {
            for (i, &v) in frame.pixels.iter().enumerate() {
                assert!((v - (f32::from(words[f * 9 + i]) / 4095.0).min(1.0)).abs() < 1e-6);
            }
        }
        // A volume shorter than its geometry is refused, not read past its end.
        let short = write(
            geometry(3, 3, "3", 16, 12),
            DataElement::new(tags::PIXEL_DATA, VR::OW, PrimitiveValue::U16(words.into())),
        );
        assert!(matches!(load(&short), Err(InferError::Input(m)) if m.contains("frame 2")));
    }
}
