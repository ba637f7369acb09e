//! Is an upload really a de-identified image of the kind it declares? It is decoded, and
//! everything that could carry identity is checked: PNG text and EXIF chunks, DICOM patient
//! attributes, private attributes and the PatientIdentityRemoved flag.

use std::io::Cursor;

use dicom_core::header::Header;
use dicom_dictionary_std::tags;
use dicom_object::InMemDicomObject;
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
/// (`iCCP` is not among them: a profile carries a free-text name.)
const PNG_CHUNKS: &[&[u8; 4]] =
    &[b"IHDR", b"PLTE", b"IDAT", b"IEND", b"tRNS", b"gAMA", b"cHRM", b"sRGB", b"sBIT", b"pHYs", b"bKGD"];

pub fn check(kind: ImageKind, bytes: &[u8], max_decoded_bytes: u64) -> Result<Facts, ContentError> {
    match kind {
        ImageKind::Png => check_png(bytes, max_decoded_bytes),
        ImageKind::Dicom => check_dicom(bytes, max_decoded_bytes),
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

fn check_dicom(bytes: &[u8], max_decoded_bytes: u64) -> Result<Facts, ContentError> {
    let undecodable = |why: String| ContentError::Undecodable("DICOM object", why);
    // Read as the device reads scanner bytes: every length, count, nesting depth and pixel
    // geometry bounded before the toolkit allocates, RLE headers checked, pixels decoded.
    let mut limits = octd::deid::InputLimits::from(&octd::config::IngestConfig::default());
    limits.max_file_bytes = bytes.len() as u64;
    limits.max_decoded_bytes = max_decoded_bytes;
    let (obj, frames, rows, columns) =
        octd::deid::read_checked(bytes.to_vec(), &limits).map_err(|e| undecodable(e.to_string()))?;
    if obj.meta().private_information.is_some() || obj.meta().private_information_creator_uid.is_some() {
        return Err(ContentError::Identified("the file meta carries private information".into()));
    }
    let flag = obj.get(tags::PATIENT_IDENTITY_REMOVED).and_then(|e| e.to_str().ok());
    if flag.as_deref().map(|v| v.trim_end_matches(['\0', ' '])) != Some("YES") {
        return Err(ContentError::Identified("PatientIdentityRemoved is not YES".into()));
    }
    // Every depth: no private attribute, and nothing of the patient's with a value, except
    // octd's keyed pseudonym in the top-level Patient ID. Nesting is bounded by the read.
    let mut stack: Vec<(&InMemDicomObject, bool)> = vec![(&*obj, true)];
    while let Some((item, top)) = stack.pop() {
        for element in item.iter() {
            let tag = element.tag();
            let at = format!("({:04X},{:04X})", tag.group(), tag.element());
            if tag.group() % 2 == 1 {
                return Err(ContentError::Identified(format!("private attribute {at}")));
            }
            let items = element.items();
            if tag.group() == 0x0010 {
                let value = match items {
                    Some([]) => String::new(),
                    Some(_) => return Err(ContentError::Identified(format!("patient sequence {at} has items"))),
                    None => element.to_str().map(|v| v.trim_end_matches(['\0', ' ']).to_string()).unwrap_or_default(),
                };
                let pseudonym = top
                    && tag == tags::PATIENT_ID
                    && value.len() == 21
                    && value.starts_with("OCTD-")
                    && value[5..].bytes().all(|b| b.is_ascii_hexdigit());
                if !value.is_empty() && !pseudonym {
                    return Err(ContentError::Identified(format!("patient attribute {at} has a value")));
                }
            }
            for nested in items.into_iter().flatten() {
                stack.push((nested, false));
            }
        }
    }
    Ok(Facts { width: columns, height: rows, frames })
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
