//! De-identified artefact -> grey B-scans in [0, 1].

use std::path::Path;

use dicom_dictionary_std::tags;
use dicom_dictionary_std::uids::{EXPLICIT_VR_LITTLE_ENDIAN, IMPLICIT_VR_LITTLE_ENDIAN};
use dicom_object::file::ReadPreamble;
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

/// Where a scan's B-scans are read from.
#[derive(Debug, Clone, Copy)]
pub enum Source<'a> {
    /// A written artefact; its extension says whether it is DICOM or an image.
    File(&'a Path),
    /// A de-identified DICOM object's bytes in memory (the decoder worker's answer, while it
    /// is being written): native pixel data is read in place, without a copy.
    Dicom(&'a [u8]),
}

/// The artefact's B-scans, `batch` at a time, in order: a volume is never held as f32 whole,
/// only its decoded pixels and one batch of converted frames.
pub fn for_each_batch(
    artifact: &Path,
    batch: usize,
    f: impl FnMut(&[GreyFrame]) -> Result<(), InferError>,
) -> Result<(), InferError> {
    for_each_batch_of(Source::File(artifact), batch, f)
}

/// As [`for_each_batch`], from either source.
pub fn for_each_batch_of(
    source: Source<'_>,
    batch: usize,
    mut f: impl FnMut(&[GreyFrame]) -> Result<(), InferError>,
) -> Result<(), InferError> {
    let batch = batch.max(1);
    match source {
        Source::Dicom(bytes) => match native_in_place(bytes) {
            Some((layout, pixels)) => frame_batches(&layout, Pixels::Native(Native::Bytes(pixels.into())), batch, f),
            None => {
                let obj = OpenFileOptions::new()
                    .read_preamble(ReadPreamble::Never)
                    .from_reader(without_preamble(bytes))
                    .map_err(|e| InferError::Input(format!("artefact is not readable DICOM: {e}")))?;
                object_batches(&obj, batch, f)
            }
        },
        Source::File(artifact) if artifact.extension().is_some_and(|e| e == "dcm") => {
            let obj = OpenFileOptions::new()
                .open_file(artifact)
                .map_err(|e| InferError::Input(format!("artefact is not readable DICOM: {e}")))?;
            object_batches(&obj, batch, f)
        }
        Source::File(artifact) => {
            let image =
                image::open(artifact).map_err(|e| InferError::Input(format!("artefact does not decode: {e}")))?;
            f(&[from_image(&image)])
        }
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

    /// None when the attributes multiply past what memory can address.
    fn frame_bytes(&self) -> Option<usize> {
        self.rows
            .checked_mul(self.cols)?
            .checked_mul(self.samples)?
            .checked_mul(usize::from(self.bits_allocated).div_ceil(8))
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

/// The layout and pixel bytes of a DICOM object whose last element is native, little-endian
/// pixel data of exactly the size its attributes give (what the decoder worker writes for
/// every native object): the frames are read where they lie. Anything else (compressed or
/// big-endian pixels, elements after them, a size that does not match) is None, and the
/// object is parsed whole instead, with that parse's own errors.
fn native_in_place(bytes: &[u8]) -> Option<(Layout, &[u8])> {
    let data = without_preamble(bytes);
    // The meta group and the data set before the pixel data, parsed without them.
    let head = OpenFileOptions::new()
        .read_preamble(ReadPreamble::Never)
        .read_until(tags::PIXEL_DATA)
        .from_reader(data)
        .ok()?;
    let explicit = match head.meta().transfer_syntax().trim_end_matches(['\0', ' ']) {
        EXPLICIT_VR_LITTLE_ENDIAN => true,
        IMPLICIT_VR_LITTLE_ENDIAN => false,
        _ => return None,
    };
    let layout = Layout::read(&head).ok()?;
    let size = layout.frame_bytes()?.checked_mul(layout.frames as usize)?;
    let stored = size.checked_add(size % 2)?;
    let value = data.len().checked_sub(stored)?;
    let header = value.checked_sub(if explicit { 12 } else { 8 })?;
    let h = data.get(header..value)?;
    let length = |at: usize| h.get(at..at + 4).map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as usize);
    let fits = h.get(..4) == Some([0xE0, 0x7F, 0x10, 0x00].as_slice())
        && match explicit {
            true => matches!(h.get(4..8), Some(b"OB\0\0" | b"OW\0\0")) && length(8) == Some(stored),
            false => length(4) == Some(stored),
        };
    if !fits {
        return None;
    }
    // The header found must be the next element after a whole data set, not bytes that look
    // like one inside some other element's value: everything before it parses to its end
    // and holds nothing at or after the pixel data's tag.
    let before = OpenFileOptions::new().read_preamble(ReadPreamble::Never).from_reader(data.get(..header)?).ok()?;
    if before.iter().any(|e| e.header().tag >= tags::PIXEL_DATA) {
        return None;
    }
    Some((layout, data.get(value..value + size)?))
}

/// A DICOM object's bytes from its "DICM" magic on: the 128-byte preamble the decoder worker
/// writes, when there is one, skipped.
fn without_preamble(bytes: &[u8]) -> &[u8] {
    match bytes.get(128..132) == Some(b"DICM".as_slice()) {
        true => &bytes[128..],
        false => bytes,
    }
}

/// Where a volume's frames come from.
enum Pixels<'a> {
    Native(Native<'a>),
    /// Compressed: decoded whole, as the decoder worker proved it (one copy of the pixels).
    Decoded(dicom_pixeldata::DecodedPixelData<'a>),
}

fn object_batches(
    obj: &DicomFile,
    batch: usize,
    f: impl FnMut(&[GreyFrame]) -> Result<(), InferError>,
) -> Result<(), InferError> {
    use dicom_core::value::{PrimitiveValue, Value};
    let layout = Layout::read(obj)?;
    let pixel_data = obj.get(tags::PIXEL_DATA).ok_or_else(|| InferError::Input("PixelData missing".into()))?;
    let pixels = match pixel_data.value() {
        Value::Primitive(PrimitiveValue::U8(b)) => Pixels::Native(Native::Bytes(std::borrow::Cow::Borrowed(&b[..]))),
        Value::Primitive(PrimitiveValue::U16(w)) => Pixels::Native(Native::Words(&w[..])),
        // Stored as another type (rare): converted once.
        Value::Primitive(p) => Pixels::Native(Native::Bytes(p.to_bytes())),
        Value::PixelSequence(_) => Pixels::Decoded(
            obj.decode_pixel_data().map_err(|e| InferError::Input(format!("pixel data does not decode: {e}")))?,
        ),
        Value::Sequence(_) => return Err(InferError::Input("PixelData is a sequence".into())),
    };
    frame_batches(&layout, pixels, batch, f)
}

fn frame_batches(
    layout: &Layout,
    pixels: Pixels<'_>,
    batch: usize,
    mut f: impl FnMut(&[GreyFrame]) -> Result<(), InferError>,
) -> Result<(), InferError> {
    let mut frames = Vec::with_capacity(batch.min(layout.frames as usize));
    let mut raw = Vec::new();
    for i in 0..layout.frames {
        let frame = match &pixels {
            Pixels::Native(native) => {
                let len = layout.frame_bytes().ok_or_else(|| InferError::Input("frames too large".into()))?;
                native
                    .frame(i as usize, len, &mut raw)
                    .ok_or_else(|| InferError::Input(format!("frame {i} is short")))?;
                convert(&raw, layout)?
            }
            Pixels::Decoded(decoded) => {
                let decoded_layout = Layout {
                    rows: decoded.rows() as usize,
                    cols: decoded.columns() as usize,
                    samples: decoded.samples_per_pixel() as usize,
                    bits_allocated: decoded.bits_allocated(),
                    bits_stored: decoded.bits_stored().clamp(1, 16),
                    signed: decoded.pixel_representation() == dicom_pixeldata::PixelRepresentation::Signed,
                    planar: decoded.planar_configuration() == PlanarConfiguration::PixelFirst,
                    ..*layout
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
    let len = layout.frame_bytes().ok_or_else(|| InferError::Input("frames too large".into()))?;
    let data = data.get(..len).ok_or_else(|| InferError::Input("a frame is short".into()))?;
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
        write_as(EXPLICIT_VR_LITTLE_ENDIAN, elements, pixel)
    }

    fn write_as(
        transfer_syntax: &str,
        elements: Vec<DataElement<InMemDicomObject>>,
        pixel: DataElement<InMemDicomObject>,
    ) -> tempfile::TempPath {
        let mut obj = InMemDicomObject::from_element_iter(elements);
        obj.put(pixel);
        let meta = FileMetaTableBuilder::new()
            .media_storage_sop_class_uid("1.2.840.10008.5.1.4.1.1.77.1.5.4")
            .media_storage_sop_instance_uid("2.25.1")
            .transfer_syntax(transfer_syntax)
            .build()
            .unwrap();
        let path = tempfile::Builder::new().suffix(".dcm").tempfile().unwrap().into_temp_path();
        obj.with_exact_meta(meta).write_to_file(&path).unwrap();
        path
    }

    /// Every frame from the file and from its bytes in memory, and whether the bytes were
    /// read in place.
    type Read = Result<Vec<GreyFrame>, String>;

    fn both_ways(path: &Path) -> (Read, Read, bool) {
        let bytes = std::fs::read(path).unwrap();
        let mut from_memory = Vec::new();
        let memory = for_each_batch_of(Source::Dicom(&bytes), 2, |batch| {
            from_memory.extend_from_slice(batch);
            Ok(())
        });
        let file = load(path).map_err(|e| e.to_string());
        (file, memory.map(|()| from_memory).map_err(|e| e.to_string()), native_in_place(&bytes).is_some())
    }

    fn padding(value: Vec<u8>) -> Vec<DataElement<InMemDicomObject>> {
        // Data Set Trailing Padding: the one element a writer puts after the pixel data.
        vec![DataElement::new(dicom_core::Tag(0xFFFC, 0xFFFC), VR::OB, PrimitiveValue::U8(value.into()))]
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

    #[test]
    fn a_volume_in_memory_is_read_in_place_as_the_file_would_be() {
        let bytes: Vec<u8> = (0..3 * 4 * 5).map(|i| (i * 4) as u8).collect();
        let words: Vec<u16> = (0..2 * 3 * 3).map(|i| i * 200).collect();
        for syntax in [EXPLICIT_VR_LITTLE_ENDIAN, IMPLICIT_VR_LITTLE_ENDIAN] {
            let eight = write_as(
                syntax,
                geometry(4, 5, "3", 8, 8),
                DataElement::new(tags::PIXEL_DATA, VR::OB, PrimitiveValue::U8(bytes.clone().into())),
            );
            let sixteen = write_as(
                syntax,
                geometry(3, 3, "2", 16, 12),
                DataElement::new(tags::PIXEL_DATA, VR::OW, PrimitiveValue::U16(words.clone().into())),
            );
            // 3 x 3 x 1 bytes: an odd length, stored with a pad byte.
            let odd = write_as(
                syntax,
                geometry(3, 3, "1", 8, 8),
                DataElement::new(tags::PIXEL_DATA, VR::OB, PrimitiveValue::U8(bytes[..9].to_vec().into())),
            );
            for path in [&eight, &sixteen, &odd] {
                let (file, memory, in_place) = both_ways(path);
                assert!(in_place, "{syntax}: native pixel data at the end is read where it lies");
                assert!(file.as_ref().is_ok_and(|f| !f.is_empty()), "{syntax}: {file:?}");
                assert_eq!(memory, file, "{syntax}: the same frames either way");
                // The same object without the 128-byte preamble.
                let whole = std::fs::read(path).unwrap();
                let bare = &whole[128..];
                assert!(native_in_place(bare).is_some(), "{syntax}: read in place without a preamble");
                let mut frames = Vec::new();
                for_each_batch_of(Source::Dicom(bare), 2, |batch| {
                    frames.extend_from_slice(batch);
                    Ok(())
                })
                .unwrap();
                assert_eq!(Ok(frames), file, "{syntax}: the same frames without a preamble");
            }
        }
    }

    #[test]
    fn a_volume_in_memory_that_is_not_plainly_laid_out_is_parsed_whole() {
        let bytes: Vec<u8> = (0..3 * 4 * 5).map(|i| (i * 4) as u8).collect();
        let pixels = || DataElement::new(tags::PIXEL_DATA, VR::OB, PrimitiveValue::U8(bytes.clone().into()));
        // Something after the pixel data.
        let mut elements = geometry(4, 5, "3", 8, 8);
        elements.extend(padding(vec![0; 8]));
        let trailing = write(elements, pixels());
        // Trailing bytes that look like pixel data of the right size, with a header of their
        // own: the real frames are the ones the object holds.
        let mut fake = vec![0xE0, 0x7F, 0x10, 0x00, b'O', b'B', 0, 0];
        fake.extend_from_slice(&60u32.to_le_bytes());
        fake.extend(std::iter::repeat_n(255u8, 60));
        let mut elements = geometry(4, 5, "3", 8, 8);
        elements.extend(padding(fake));
        let disguised = write(elements, pixels());
        // Fewer bytes than the geometry says.
        let short = write(
            geometry(4, 5, "4", 8, 8),
            DataElement::new(tags::PIXEL_DATA, VR::OB, PrimitiveValue::U8(bytes.clone().into())),
        );
        for (name, path) in [("trailing", &trailing), ("disguised", &disguised), ("short", &short)] {
            let (file, memory, in_place) = both_ways(path);
            assert!(!in_place, "{name}: not read in place");
            assert_eq!(memory, file, "{name}: the same frames or the same refusal either way");
        }
        let (file, _, _) = both_ways(&disguised);
        let first = file.unwrap().remove(0);
        assert!((first.pixels[1] - 4.0 / 255.0).abs() < 1e-6, "the object's own pixels, not the disguised ones");
        assert!(both_ways(&short).1.is_err_and(|e| e.contains("frame 3")));
    }
}
