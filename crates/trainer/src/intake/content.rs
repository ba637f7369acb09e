//! Is an upload really a de-identified image of the kind it declares? It is decoded, and
//! everything that could carry identity is checked: PNG text and EXIF chunks, DICOM patient
//! attributes, private attributes and the PatientIdentityRemoved flag.

use std::io::Cursor;

use dicom_core::header::Header;
use dicom_dictionary_std::tags;
use dicom_object::file::ReadPreamble;
use dicom_object::OpenFileOptions;
use dicom_pixeldata::PixelDecoder;
use octd_uplink::ImageKind;

/// Why an upload is not accepted as a de-identified image.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum ContentError {
    #[error("not a decodable {0}: {1}")]
    Undecodable(&'static str, String),
    #[error("carries identity: {0}")]
    Identified(String),
}

impl ContentError {
    pub fn code(&self) -> &'static str {
        match self {
            ContentError::Undecodable(..) => "undecodable",
            ContentError::Identified(_) => "identified",
        }
    }
}

/// Geometry of an accepted image.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Facts {
    pub width: u32,
    pub height: u32,
    pub frames: u32,
}

/// PNG chunks a de-identified B-scan may carry: pixels and how to show them, no text,
/// no EXIF, no time stamp.
const PNG_CHUNKS: &[&[u8; 4]] =
    &[b"IHDR", b"PLTE", b"IDAT", b"IEND", b"tRNS", b"gAMA", b"cHRM", b"sRGB", b"iCCP", b"sBIT", b"pHYs", b"bKGD"];

pub fn check(kind: ImageKind, bytes: &[u8], max_decoded_bytes: u64) -> Result<Facts, ContentError> {
    match kind {
        ImageKind::Png => check_png(bytes, max_decoded_bytes),
        ImageKind::Dicom => check_dicom(bytes),
    }
}

fn check_png(bytes: &[u8], max_decoded_bytes: u64) -> Result<Facts, ContentError> {
    const SIGNATURE: &[u8] = b"\x89PNG\r\n\x1a\n";
    let undecodable = |why: String| ContentError::Undecodable("PNG", why);
    let mut rest = bytes.strip_prefix(SIGNATURE).ok_or_else(|| undecodable("no PNG signature".into()))?;
    while !rest.is_empty() {
        let (head, after) = rest.split_at_checked(8).ok_or_else(|| undecodable("a chunk header is cut".into()))?;
        let len = u32::from_be_bytes([head[0], head[1], head[2], head[3]]) as usize;
        let kind = [head[4], head[5], head[6], head[7]];
        if !PNG_CHUNKS.iter().any(|k| **k == kind) {
            return Err(ContentError::Identified(format!(
                "PNG chunk {:?} may hold text or metadata",
                String::from_utf8_lossy(&kind)
            )));
        }
        rest = after.get(len.saturating_add(4)..).ok_or_else(|| undecodable("a chunk runs past the file".into()))?;
    }
    let mut reader = image::ImageReader::with_format(Cursor::new(bytes), image::ImageFormat::Png);
    let mut limits = image::Limits::default();
    limits.max_alloc = Some(max_decoded_bytes);
    reader.limits(limits);
    let decoded = reader.decode().map_err(|e| undecodable(e.to_string()))?;
    Ok(Facts { width: decoded.width(), height: decoded.height(), frames: 1 })
}

fn check_dicom(bytes: &[u8]) -> Result<Facts, ContentError> {
    let undecodable = |why: String| ContentError::Undecodable("DICOM object", why);
    if bytes.get(128..132) != Some(b"DICM") {
        return Err(undecodable("no DICM preamble".into()));
    }
    let obj = OpenFileOptions::new()
        .read_preamble(ReadPreamble::Never)
        .from_reader(&bytes[128..])
        .map_err(|e| undecodable(e.to_string()))?;
    let text = |tag| obj.get(tag).and_then(|e| e.to_str().ok()).map(|v| v.trim_end_matches(['\0', ' ']).to_string());
    if text(tags::PATIENT_IDENTITY_REMOVED).as_deref() != Some("YES") {
        return Err(ContentError::Identified("PatientIdentityRemoved is not YES".into()));
    }
    for element in obj.iter() {
        let tag = element.tag();
        if tag.group() % 2 == 1 {
            return Err(ContentError::Identified(format!(
                "private attribute ({:04X},{:04X})",
                tag.group(),
                tag.element()
            )));
        }
        if tag.group() != 0x0010 {
            continue;
        }
        let value = element.to_str().map(|v| v.trim_end_matches(['\0', ' ']).to_string()).unwrap_or_default();
        if value.is_empty() {
            continue;
        }
        // octd replaces the Patient ID by a keyed pseudonym, OCTD-<16 hex>; nothing else
        // of the patient may carry a value.
        let pseudonym = tag == tags::PATIENT_ID
            && value.len() == 21
            && value.starts_with("OCTD-")
            && value[5..].bytes().all(|b| b.is_ascii_hexdigit());
        if !pseudonym {
            return Err(ContentError::Identified(format!(
                "patient attribute ({:04X},{:04X}) has a value",
                tag.group(),
                tag.element()
            )));
        }
    }
    // The toolkit's decoders can panic on hostile pixel data (octd's fuzzing found one).
    let decoded = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| obj.decode_pixel_data()))
        .map_err(|_| undecodable("the pixel decoder failed".into()))?
        .map_err(|e| undecodable(format!("pixel data: {e}")))?;
    if decoded.data().is_empty() {
        return Err(undecodable("no pixels".into()));
    }
    Ok(Facts { width: decoded.columns(), height: decoded.rows(), frames: decoded.number_of_frames() })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn png(extra: Option<(&[u8; 4], &[u8])>) -> Vec<u8> {
        let img = image::GrayImage::from_pixel(8, 8, image::Luma([100]));
        let mut out = Vec::new();
        img.write_to(&mut Cursor::new(&mut out), image::ImageFormat::Png).unwrap();
        if let Some((kind, data)) = extra {
            // After IHDR (8 signature + 25 IHDR bytes); the CRC is not checked by the walk.
            let mut chunk = (data.len() as u32).to_be_bytes().to_vec();
            chunk.extend_from_slice(kind);
            chunk.extend_from_slice(data);
            chunk.extend_from_slice(&[0, 0, 0, 0]);
            out.splice(33..33, chunk);
        }
        out
    }

    #[test]
    fn a_plain_png_passes_and_text_chunks_do_not() {
        assert_eq!(check(ImageKind::Png, &png(None), 1 << 20).unwrap(), Facts { width: 8, height: 8, frames: 1 });
        let named = png(Some((b"tEXt", b"Author\0DOE^JOHN")));
        assert_eq!(check(ImageKind::Png, &named, 1 << 20).unwrap_err().code(), "identified");
        let exif = png(Some((b"eXIf", b"MM\0*")));
        assert_eq!(check(ImageKind::Png, &exif, 1 << 20).unwrap_err().code(), "identified");
    }

    #[test]
    fn garbage_is_undecodable() {
        assert_eq!(check(ImageKind::Png, b"hello", 1 << 20).unwrap_err().code(), "undecodable");
        let mut cut = png(None);
        cut.truncate(40);
        assert_eq!(check(ImageKind::Png, &cut, 1 << 20).unwrap_err().code(), "undecodable");
        assert_eq!(check(ImageKind::Dicom, &png(None), 1 << 20).unwrap_err().code(), "undecodable");
    }

    #[test]
    fn a_png_larger_than_the_decode_limit_is_refused() {
        assert_eq!(check(ImageKind::Png, &png(None), 16).unwrap_err().code(), "undecodable");
    }
}
