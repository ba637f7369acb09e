//! A JPEG de-identified without decoding or re-encoding it. Its metadata lives in marker
//! segments beside the image (APPn: EXIF, XMP, IPTC, ICC, JFIF thumbnails; COM: comments)
//! and in bytes after the end-of-image marker; the image itself is the frame and scan headers,
//! the quantisation and Huffman tables and the entropy-coded data. So the artefact is written
//! from a whitelist: those segments are copied byte for byte, everything else is left out,
//! and the only segments octd adds are fixed ones it writes itself (JFIF, Adobe colour
//! transform) that keep the colours decoding as the original's did. Tables no frame or scan
//! refers to are left out too (see [`strip_metadata`]). Pixels are identical to
//! the original's, the file is the original's size or less, and nothing is encoded.
//!
//! What the whitelist cannot carry byte for byte (lossless, hierarchical or arithmetic-coded
//! JPEG, CMYK, markers octd does not know, a table defined twice, any structure the walk does
//! not expect) is reported as such, and the caller falls back to decoding the pixels and
//! writing them as PNG.

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

/// A table-defining segment's tables, each with its identity: an unused table is free bytes
/// (up to 256 in a Huffman table), so only tables the frame or a scan refers to are kept.
type Tables = Vec<(TableId, std::ops::Range<usize>)>;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum TableId {
    Quantisation(u8),
    /// Class (0: DC, 1: AC) and destination.
    Huffman(u8, u8),
}

/// What the artefact is made of, in the input's order.
enum Part {
    /// Bytes of the input copied as they are: frame and scan headers, restart interval,
    /// entropy-coded data.
    Copied(std::ops::Range<usize>),
    /// A DQT (0xDB) or DHT (0xC4) segment, written again with the used tables only.
    Tables(u8, Tables),
}

fn quantisation_tables(payload: &[u8], at: usize) -> Option<Tables> {
    let mut tables = Vec::new();
    let mut i = 0;
    while i < payload.len() {
        let (precision, id) = (payload[i] >> 4, payload[i] & 0x0F);
        let size = match precision {
            0 => 64,
            1 => 128,
            _ => return None,
        };
        if id > 3 || i + 1 + size > payload.len() {
            return None;
        }
        tables.push((TableId::Quantisation(id), at + i..at + i + 1 + size));
        i += 1 + size;
    }
    Some(tables)
}

fn huffman_tables(payload: &[u8], at: usize) -> Option<Tables> {
    let mut tables = Vec::new();
    let mut i = 0;
    while i < payload.len() {
        let (class, id) = (payload[i] >> 4, payload[i] & 0x0F);
        let counts = payload.get(i + 1..i + 17)?;
        let symbols: usize = counts.iter().map(|&c| usize::from(c)).sum();
        if class > 1 || id > 3 || symbols > 256 || i + 17 + symbols > payload.len() {
            return None;
        }
        tables.push((TableId::Huffman(class, id), at + i..at + i + 17 + symbols));
        i += 17 + symbols;
    }
    Some(tables)
}

/// The JPEG with only its image segments, or None when it holds something the whitelist does
/// not carry or a structure this walk does not expect (the caller then decodes the input and
/// re-encodes its pixels, and the decoder's own checks decide).
///
/// What is kept: the frame header (baseline, extended or progressive Huffman; one or three
/// components), the quantisation and Huffman tables the frame or a scan refers to (each
/// defined once), the restart interval, the scan headers and their entropy-coded data, each
/// header of exactly its fields' length. What remains is the kind of channel pixels
/// themselves are: a file crafted to hide bytes in the symbol values of a used Huffman table,
/// in the quantisation entries of coefficients that are always zero, or in padding after a
/// scan's last block keeps them, as a pixel-preserving de-identification keeps whatever the
/// pixels show.
pub(crate) fn strip_metadata(bytes: &[u8]) -> Option<Vec<u8>> {
    if bytes.len() < 4 || bytes[0] != 0xFF || bytes[1] != SOI {
        return None;
    }
    let mut parts = Vec::new();
    let mut used = std::collections::BTreeSet::new();
    let mut defined = std::collections::BTreeSet::new();
    let (mut jfif, mut adobe_transform, mut frame, mut scans) = (false, None::<u8>, false, 0usize);
    let mut progressive = false;
    let mut i = 2;
    loop {
        // A marker: 0xFF, any number of fill bytes 0xFF, then its code.
        if *bytes.get(i)? != 0xFF {
            return None;
        }
        while bytes.get(i) == Some(&0xFF) {
            i += 1;
        }
        let marker = *bytes.get(i)?;
        i += 1;
        if marker == EOI {
            if !frame || scans == 0 {
                return None;
            }
            break; // whatever follows the end of the image is left out
        }
        let length = usize::from(u16::from_be_bytes([*bytes.get(i)?, *bytes.get(i + 1)?]));
        if length < 2 {
            return None;
        }
        let end = i + length;
        let payload = bytes.get(i + 2..end)?;
        match marker {
            SOS => {
                let components = usize::from(*payload.first()?);
                if !frame || !(1..=4).contains(&components) || payload.len() != 4 + 2 * components {
                    return None;
                }
                // A progressive scan codes DC (Ss = 0) or AC coefficients, never both: only
                // the tables it consults count as used, and each must be defined by now.
                let first_coefficient = *payload.get(1 + 2 * components)?;
                let (dc, ac) = match progressive {
                    true => (first_coefficient == 0, first_coefficient > 0),
                    false => (true, true),
                };
                for c in 0..components {
                    let tables = *payload.get(2 + 2 * c)?;
                    let consulted = [(dc, TableId::Huffman(0, tables >> 4)), (ac, TableId::Huffman(1, tables & 0x0F))];
                    for (_, id) in consulted.into_iter().filter(|(consults, _)| *consults) {
                        if !defined.contains(&id) {
                            return None;
                        }
                        used.insert(id);
                    }
                }
                let data_end = entropy_coded_end(bytes, end)?;
                parts.push(Part::Copied(i - 2..data_end));
                scans += 1;
                i = data_end;
                continue;
            }
            0xC0..=0xC2 => {
                let components = usize::from(*payload.get(5)?);
                if frame || !matches!(components, 1 | 3) || payload.len() != 6 + 3 * components {
                    return None;
                }
                progressive = marker == 0xC2;
                for c in 0..components {
                    used.insert(TableId::Quantisation(*payload.get(6 + 3 * c + 2)?));
                }
                frame = true;
                parts.push(Part::Copied(i - 2..end));
            }
            0xDB | 0xC4 => {
                let tables = match marker {
                    0xDB => quantisation_tables(payload, i + 2)?,
                    _ => huffman_tables(payload, i + 2)?,
                };
                // A table defined again would leave its first definition unused.
                if !tables.iter().all(|(id, _)| defined.insert(*id)) {
                    return None;
                }
                parts.push(Part::Tables(marker, tables));
            }
            0xDD if payload.len() == 2 => parts.push(Part::Copied(i - 2..end)),
            APP0 => jfif |= payload.starts_with(b"JFIF\0"),
            APP14 => {
                if payload.len() >= 12 && payload.starts_with(b"Adobe") {
                    adobe_transform = Some(payload[11]);
                }
            }
            0xE1..=0xED | 0xEF | COM => {}
            _ => return None,
        }
        i = end;
    }
    let mut out = Vec::with_capacity(bytes.len().min(i) + JFIF.len() + 16);
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
    for part in parts {
        match part {
            Part::Copied(range) => out.extend_from_slice(bytes.get(range)?),
            Part::Tables(marker, tables) => {
                let kept: Vec<_> = tables.into_iter().filter(|(id, _)| used.contains(id)).collect();
                if kept.is_empty() {
                    continue;
                }
                let length: usize = 2 + kept.iter().map(|(_, r)| r.len()).sum::<usize>();
                out.extend_from_slice(&[0xFF, marker]);
                out.extend_from_slice(&u16::try_from(length).ok()?.to_be_bytes());
                for (_, range) in kept {
                    out.extend_from_slice(bytes.get(range)?);
                }
            }
        }
    }
    out.extend_from_slice(&[0xFF, EOI]);
    Some(out)
}

/// The frame header's width and height, read by walking the segments before the first scan
/// (every one: the walk is linear).
pub(crate) fn frame_size(jpeg: &[u8]) -> Option<(u32, u32)> {
    if jpeg.get(..2) != Some(&[0xFF, SOI][..]) {
        return None;
    }
    let mut i = 2;
    while i < jpeg.len() {
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
/// (0xFF 0x00 is a stuffed data byte). None when no marker follows.
fn entropy_coded_end(bytes: &[u8], start: usize) -> Option<usize> {
    let mut j = start;
    loop {
        j += bytes.get(j..)?.iter().position(|&b| b == 0xFF)?;
        match bytes.get(j + 1)? {
            0x00 | 0xD0..=0xD7 => j += 2,
            _ => return Some(j),
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

    /// `plain` with `extra` inserted right after its start-of-image marker.
    fn with_after_soi(plain: &[u8], extra: &[u8]) -> Vec<u8> {
        let mut out = plain[..2].to_vec();
        out.extend_from_slice(extra);
        out.extend_from_slice(&plain[2..]);
        out
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

    fn same_pixels(a: &[u8], b: &[u8]) {
        let a = image::load_from_memory(a).unwrap().to_luma8();
        let b = image::load_from_memory(b).unwrap().to_luma8();
        assert_eq!(a.as_raw(), b.as_raw());
    }

    #[test]
    fn metadata_anywhere_is_left_out_and_pixels_are_the_same() {
        let plain = grey_jpeg();
        let mut extra = segment(0xE1, b"Exif\0\0MM DOE^JOHN");
        extra.extend(segment(0xE2, b"ICC_PROFILE\0 Springfield"));
        extra.extend(segment(COM, b"MRN 8675309"));
        let mut tagged = with_after_soi(&plain, &extra);
        // Between image segments too, and after the end.
        let sof = tagged.windows(2).position(|w| w == [0xFF, 0xC0]).unwrap();
        tagged.splice(sof..sof, segment(0xED, b"Photoshop 3.0\0 born 19450704"));
        tagged.extend_from_slice(b"trailing DOE^JOHN after the end");
        let stripped = strip_metadata(&tagged).expect("a baseline JPEG is carried");
        for phi in [&b"DOE^JOHN"[..], b"Springfield", b"8675309", b"19450704"] {
            assert!(!stripped.windows(phi.len()).any(|w| w == phi), "{}", String::from_utf8_lossy(phi));
        }
        let allowed = [SOI, EOI, SOS, 0xC0, 0xC1, 0xC2, 0xC4, 0xDB, 0xDD, APP0, APP14];
        assert!(markers(&stripped).iter().all(|m| allowed.contains(m)), "{:x?}", markers(&stripped));
        same_pixels(&plain, &stripped);
        assert_eq!(frame_size(&stripped), Some((40, 24)));
        assert_eq!(frame_size(&stripped[..12]), None);
    }

    #[test]
    fn tables_no_frame_or_scan_uses_are_left_out() {
        let plain = grey_jpeg();
        // A greyscale image uses quantisation table 0 and Huffman tables 0: table 3 of each
        // kind is free space, here holding identity.
        let mut unused_q = vec![0x03];
        unused_q.extend(b"DOE^JOHN 19450704".iter().cycle().take(64));
        let mut unused_h = vec![0x13];
        let mut counts = [0u8; 16];
        counts[7] = 17;
        unused_h.extend_from_slice(&counts);
        unused_h.extend_from_slice(b"DOE^JOHN 19450704");
        let mut extra = segment(0xDB, &unused_q);
        extra.extend(segment(0xC4, &unused_h));
        let tagged = with_after_soi(&plain, &extra);
        image::load_from_memory(&tagged).expect("the decoder accepts the unused tables");
        let stripped = strip_metadata(&tagged).expect("carried");
        assert!(!stripped.windows(8).any(|w| w == b"DOE^JOHN"));
        same_pixels(&plain, &stripped);
        // An unused table inside the image's own DQT segment: the segment is written again,
        // shorter, with the used table alone.
        let q0 = plain.windows(2).position(|w| w == [0xFF, 0xDB]).unwrap();
        let q0_len = usize::from(u16::from_be_bytes([plain[q0 + 2], plain[q0 + 3]]));
        let mut shared = plain[q0 + 4..q0 + 2 + q0_len].to_vec();
        shared.extend_from_slice(&unused_q);
        let mut one_segment = plain[..q0].to_vec();
        one_segment.extend(segment(0xDB, &shared));
        one_segment.extend_from_slice(&plain[q0 + 2 + q0_len..]);
        let stripped = strip_metadata(&one_segment).expect("carried");
        assert!(!stripped.windows(8).any(|w| w == b"DOE^JOHN"));
        same_pixels(&plain, &stripped);
        // A used table defined twice: its first definition would be unused, so it falls back.
        let twice = with_after_soi(&plain, &plain[q0..q0 + 2 + q0_len]);
        assert_eq!(strip_metadata(&twice), None);
    }

    #[test]
    fn jfif_and_adobe_are_rewritten_from_nothing_of_the_input() {
        let plain = grey_jpeg();
        let mut extra = segment(APP0, b"JFIF\0\x01\x02\x01\x00\x48\x00\x48\x00\x00DOE^JOHN");
        extra.extend(segment(APP14, b"Adobe\0\x64\x80\x00\x00\x00\x02DOE^JOHN"));
        let tagged = with_after_soi(&plain, &extra);
        let stripped = strip_metadata(&tagged).unwrap();
        assert!(!stripped.windows(8).any(|w| w == b"DOE^JOHN"));
        assert_eq!(&stripped[2..20], &JFIF);
        assert_eq!(stripped[20..36].last(), Some(&2), "the colour transform is kept");
    }

    #[test]
    fn what_the_walk_cannot_carry_falls_back() {
        let plain = grey_jpeg();
        // A lossless (SOF3) frame header instead of the baseline one.
        let mut lossless = plain.clone();
        let sof = lossless.windows(2).position(|w| w == [0xFF, 0xC0]).unwrap();
        lossless[sof + 1] = 0xC3;
        assert_eq!(strip_metadata(&lossless), None);
        // An unknown marker segment, bytes between segments, broken lengths, cut short.
        assert_eq!(strip_metadata(&with_after_soi(&plain, &segment(0xF1, b"vendor"))), None);
        assert_eq!(strip_metadata(&with_after_soi(&plain, b"\x00\x00")), None);
        assert_eq!(strip_metadata(&with_after_soi(&plain, &[0xFF, 0xE1, 0x00, 0x01])), None);
        for cut in [3, 4, 10, plain.len() / 2, plain.len() - 2] {
            assert_eq!(strip_metadata(&plain[..cut]), None, "cut at {cut}");
        }
        assert_eq!(strip_metadata(b"\xFF\xD8\xFF\xD9"), None);
        // A scan consulting a Huffman table nothing defined (as Motion-JPEG frames do, relying
        // on a decoder's defaults): the decoder, not this walk, decides.
        let dht = plain.windows(2).position(|w| w == [0xFF, 0xC4]).unwrap();
        let mut no_tables = plain[..dht].to_vec();
        let sos = plain.windows(2).position(|w| w == [0xFF, SOS]).unwrap();
        no_tables.extend_from_slice(&plain[sos..]);
        assert_eq!(strip_metadata(&no_tables), None);
        // Bytes riding after a header's fields.
        let dri = segment(0xDD, b"\x00\x00DOE^JOHN");
        assert_eq!(strip_metadata(&with_after_soi(&plain, &dri)), None);
    }
}
