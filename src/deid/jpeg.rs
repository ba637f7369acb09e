//! A JPEG de-identified without decoding or re-encoding it. Its metadata lives in marker
//! segments beside the image (APPn: EXIF, XMP, IPTC, ICC, JFIF thumbnails; COM: comments)
//! and in bytes after the end-of-image marker; the image itself is the frame and scan headers,
//! the quantisation and Huffman tables and the entropy-coded data. So the artefact is written
//! from a whitelist: those segments are copied byte for byte, everything else is left out,
//! and the only segments octd adds are fixed ones it writes itself (JFIF, Adobe colour
//! transform) that keep the colours decoding as the original's did. Pixels are identical to
//! the original's, the file is the original's size or less, and nothing is encoded.
//!
//! What the whitelist cannot carry byte for byte (lossless, hierarchical or arithmetic-coded
//! JPEG, CMYK, markers octd does not know) is reported as such, and the caller falls back to
//! decoding the pixels and writing them as PNG.

use super::DeidError;

const SOI: u8 = 0xD8;
const EOI: u8 = 0xD9;
const SOS: u8 = 0xDA;
const APP0: u8 = 0xE0;
const APP14: u8 = 0xEE;
const COM: u8 = 0xFE;

/// The JFIF header octd writes when the input had one: version 1.01, no units, 1:1 pixel
/// aspect, no thumbnail. None of the input's own bytes.
const JFIF: [u8; 18] =
    [0xFF, APP0, 0x00, 0x10, b'J', b'F', b'I', b'F', 0x00, 0x01, 0x01, 0x00, 0x00, 0x01, 0x00, 0x01, 0x00, 0x00];

/// Whether a marker's segment is part of the image (copied) or metadata (left out).
enum Segment {
    /// Frame headers (baseline, extended and progressive Huffman), Huffman and quantisation
    /// tables, restart interval.
    Image,
    /// APPn and COM.
    Metadata,
}

fn classify(marker: u8) -> Option<Segment> {
    match marker {
        0xC0 | 0xC1 | 0xC2 | 0xC4 | 0xDB | 0xDD => Some(Segment::Image),
        0xE0..=0xEF | COM => Some(Segment::Metadata),
        _ => None,
    }
}

/// The JPEG with only its image segments, or `Ok(None)` when it holds something the
/// whitelist does not carry (the caller then decodes and re-encodes). A structure that is
/// cut short or malformed is an error.
pub(crate) fn strip_metadata(bytes: &[u8]) -> Result<Option<Vec<u8>>, DeidError> {
    if bytes.len() < 4 || bytes[0] != 0xFF || bytes[1] != SOI {
        return Err(DeidError::Corrupt("JPEG does not start with a start-of-image marker".into()));
    }
    let mut image = Vec::with_capacity(bytes.len());
    let (mut jfif, mut adobe_transform, mut frame, mut scans) = (false, None::<u8>, false, 0usize);
    let mut i = 2;
    loop {
        // A marker: 0xFF, any number of fill bytes 0xFF, then its code.
        if i >= bytes.len() {
            return Err(DeidError::Truncated("JPEG has no end-of-image marker".into()));
        }
        if bytes[i] != 0xFF {
            return Err(DeidError::Corrupt(format!("JPEG: a marker was expected at byte {i}")));
        }
        while i < bytes.len() && bytes[i] == 0xFF {
            i += 1;
        }
        let Some(&marker) = bytes.get(i) else {
            return Err(DeidError::Truncated("JPEG has no end-of-image marker".into()));
        };
        i += 1;
        if marker == EOI {
            if !frame || scans == 0 {
                return Err(DeidError::Corrupt("JPEG ends before its image".into()));
            }
            image.extend_from_slice(&[0xFF, EOI]);
            break; // whatever follows the end of the image is left out
        }
        let Some(length) = bytes.get(i..i + 2).map(|l| usize::from(u16::from_be_bytes([l[0], l[1]]))) else {
            return Err(DeidError::Truncated("JPEG segment header cut short".into()));
        };
        if length < 2 {
            return Err(DeidError::Corrupt(format!("JPEG segment of length {length}")));
        }
        let end = i + length;
        let Some(payload) = bytes.get(i + 2..end) else {
            return Err(DeidError::Truncated("JPEG segment cut short".into()));
        };
        let whole = &bytes[i - 2..end];
        match (marker, classify(marker)) {
            (SOS, _) => {
                if !frame {
                    return Err(DeidError::Corrupt("JPEG scan before its frame header".into()));
                }
                image.extend_from_slice(whole);
                let data_end = entropy_coded_end(bytes, end)?;
                image.extend_from_slice(&bytes[end..data_end]);
                scans += 1;
                i = data_end;
                continue;
            }
            (0xC0..=0xC2, _) => {
                // Carried byte for byte only for greyscale and 3-component colour.
                if frame || !matches!(payload.get(5), Some(1 | 3)) {
                    return Ok(None);
                }
                frame = true;
                image.extend_from_slice(whole);
            }
            (_, Some(Segment::Image)) => image.extend_from_slice(whole),
            (APP0, Some(Segment::Metadata)) => jfif |= payload.starts_with(b"JFIF\0"),
            (APP14, Some(Segment::Metadata)) => {
                if payload.len() >= 12 && payload.starts_with(b"Adobe") {
                    adobe_transform = Some(payload[11]);
                }
            }
            (_, Some(Segment::Metadata)) => {}
            (_, None) => return Ok(None),
        }
        i = end;
    }
    let mut out = Vec::with_capacity(image.len() + 2 + JFIF.len() + 16);
    out.extend_from_slice(&[0xFF, SOI]);
    if jfif {
        out.extend_from_slice(&JFIF);
    }
    if let Some(transform) = adobe_transform {
        // Adobe DCTEncode version 100, no flags, and the input's colour transform (0: none,
        // 1: YCbCr, 2: YCCK): it decides how 3-component data is turned into RGB.
        out.extend_from_slice(&[0xFF, APP14, 0x00, 0x0E, b'A', b'd', b'o', b'b', b'e', 0x00, 0x64, 0, 0, 0, 0]);
        out.push(transform.min(2));
    }
    out.extend_from_slice(&image);
    Ok(Some(out))
}

/// The frame header's width and height, read by walking the segments before the first scan
/// (at most 64 of them).
pub(crate) fn frame_size(jpeg: &[u8]) -> Option<(u32, u32)> {
    if jpeg.get(..2) != Some(&[0xFF, SOI][..]) {
        return None;
    }
    let mut i = 2;
    for _ in 0..64 {
        let (&0xFF, &marker) = (jpeg.get(i)?, jpeg.get(i + 1)?) else { return None };
        let length = usize::from(u16::from_be_bytes([*jpeg.get(i + 2)?, *jpeg.get(i + 3)?]));
        if (0xC0..=0xC2).contains(&marker) {
            let sof = jpeg.get(i + 4..i + 2 + length)?;
            let height = u32::from(u16::from_be_bytes([*sof.get(1)?, *sof.get(2)?]));
            let width = u32::from(u16::from_be_bytes([*sof.get(3)?, *sof.get(4)?]));
            return Some((width, height));
        }
        if marker == SOS || length < 2 {
            return None;
        }
        i += 2 + length;
    }
    None
}

/// Where a scan's entropy-coded data ends: at the first marker that is not a restart marker
/// (0xFF 0x00 is a stuffed data byte).
fn entropy_coded_end(bytes: &[u8], start: usize) -> Result<usize, DeidError> {
    let mut j = start;
    loop {
        let Some(at) = bytes.get(j..).and_then(|rest| rest.iter().position(|&b| b == 0xFF)) else {
            return Err(DeidError::Truncated("JPEG has no end-of-image marker".into()));
        };
        j += at;
        match bytes.get(j + 1) {
            None => return Err(DeidError::Truncated("JPEG has no end-of-image marker".into())),
            Some(0x00 | 0xD0..=0xD7) => j += 2,
            Some(_) => return Ok(j),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn grey_jpeg() -> Vec<u8> {
        let img = image::GrayImage::from_fn(40, 24, |x, y| image::Luma([((x * 5 + y * 3) % 256) as u8]));
        let mut out = Vec::new();
        image::codecs::jpeg::JpegEncoder::new_with_quality(&mut out, 90).encode_image(&img).unwrap();
        out
    }

    fn segment(marker: u8, body: &[u8]) -> Vec<u8> {
        let mut s = vec![0xFF, marker];
        s.extend_from_slice(&((body.len() + 2) as u16).to_be_bytes());
        s.extend_from_slice(body);
        s
    }

    /// Every marker of a stripped file, in order (entropy-coded data skipped).
    fn markers(bytes: &[u8]) -> Vec<u8> {
        let mut found = vec![SOI];
        let mut i = 2;
        while i < bytes.len() {
            assert_eq!(bytes[i], 0xFF, "a marker at {i}");
            let marker = bytes[i + 1];
            found.push(marker);
            if marker == EOI {
                assert_eq!(i + 2, bytes.len(), "nothing after the end of the image");
                break;
            }
            let end = i + 2 + usize::from(u16::from_be_bytes([bytes[i + 2], bytes[i + 3]]));
            i = if marker == SOS { entropy_coded_end(bytes, end).unwrap() } else { end };
        }
        found
    }

    #[test]
    fn metadata_anywhere_is_left_out_and_pixels_are_the_same() {
        let plain = grey_jpeg();
        let mut tagged = plain[..2].to_vec();
        tagged.extend(segment(0xE1, b"Exif\0\0MM DOE^JOHN"));
        tagged.extend(segment(0xE2, b"ICC_PROFILE\0 Springfield"));
        tagged.extend(segment(COM, b"MRN 8675309"));
        // After the first table, between image segments.
        let first_table_end = 2 + 2 + usize::from(u16::from_be_bytes([plain[4], plain[5]]));
        tagged.extend_from_slice(&plain[2..first_table_end]);
        tagged.extend(segment(0xED, b"Photoshop 3.0\0 born 19450704"));
        tagged.extend_from_slice(&plain[first_table_end..]);
        tagged.extend_from_slice(b"trailing DOE^JOHN after the end");
        let stripped = strip_metadata(&tagged).unwrap().expect("a baseline JPEG is carried");
        for phi in [&b"DOE^JOHN"[..], b"Springfield", b"8675309", b"19450704"] {
            assert!(!stripped.windows(phi.len()).any(|w| w == phi), "{}", String::from_utf8_lossy(phi));
        }
        assert!(markers(&stripped).iter().all(|&m| m == SOI || m == EOI || m == SOS || classify(m).is_some()));
        assert!(!markers(&stripped).iter().any(|&m| (0xE1..=0xEF).contains(&m) || m == COM));
        let before = image::load_from_memory(&plain).unwrap().to_luma8();
        let after = image::load_from_memory(&stripped).unwrap().to_luma8();
        assert_eq!(before.as_raw(), after.as_raw());
        assert_eq!(frame_size(&stripped), Some((40, 24)));
        assert_eq!(frame_size(&stripped[..12]), None);
    }

    #[test]
    fn jfif_and_adobe_are_rewritten_from_nothing_of_the_input() {
        let plain = grey_jpeg();
        let mut tagged = plain[..2].to_vec();
        // A JFIF header with a thumbnail-sized tail and an Adobe segment with extra bytes.
        tagged.extend(segment(APP0, b"JFIF\0\x01\x02\x01\x00\x48\x00\x48\x00\x00DOE^JOHN"));
        tagged.extend(segment(APP14, b"Adobe\0\x64\x80\x00\x00\x00\x01DOE^JOHN"));
        tagged.extend_from_slice(&plain[2..]);
        let stripped = strip_metadata(&tagged).unwrap().unwrap();
        assert!(!stripped.windows(8).any(|w| w == b"DOE^JOHN"));
        assert_eq!(&stripped[2..20], &JFIF);
        assert_eq!(stripped[20..36].last(), Some(&1), "the colour transform is kept");
    }

    #[test]
    fn what_the_whitelist_cannot_carry_falls_back() {
        let plain = grey_jpeg();
        // A lossless (SOF3) frame header instead of the baseline one.
        let mut lossless = plain.clone();
        let sof = lossless.windows(2).position(|w| w == [0xFF, 0xC0]).unwrap();
        lossless[sof + 1] = 0xC3;
        assert_eq!(strip_metadata(&lossless).unwrap(), None);
        // An unknown marker segment.
        let mut unknown = plain[..2].to_vec();
        unknown.extend(segment(0xF1, b"vendor"));
        unknown.extend_from_slice(&plain[2..]);
        assert_eq!(strip_metadata(&unknown).unwrap(), None);
    }

    #[test]
    fn broken_structures_are_refused() {
        let plain = grey_jpeg();
        for cut in [4, 10, plain.len() / 2, plain.len() - 2] {
            let e = strip_metadata(&plain[..cut]).unwrap_err();
            assert!(matches!(e, DeidError::Truncated(_)), "cut at {cut}: {e}");
        }
        assert!(matches!(strip_metadata(b"\xFF\xD8\xFF\xD9"), Err(DeidError::Corrupt(_))));
        assert!(matches!(strip_metadata(b"\xFF\xD8\x00\x00\x00"), Err(DeidError::Corrupt(_))));
        let mut zero_length = plain[..2].to_vec();
        zero_length.extend_from_slice(&[0xFF, 0xE1, 0x00, 0x01]);
        zero_length.extend_from_slice(&plain[2..]);
        assert!(matches!(strip_metadata(&zero_length), Err(DeidError::Corrupt(_))));
    }
}
