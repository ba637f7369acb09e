//! A bounded, iterative walk over a DICOM file's element headers, before the toolkit parses
//! it. dicom-rs builds sequences recursively and reserves what a length declares, so a
//! hostile file could nest sequences until the stack overflows, or declare gigabytes it does
//! not hold. Here nesting depth, element and item counts and every declared length (against
//! the bytes actually left) are checked with a fixed amount of memory and no recursion, so
//! such a file is refused with a reason instead of costing a worker.

use dicom_core::dictionary::{DataDictionary, DataDictionaryEntry, VirtualVr};
use dicom_core::VR;
use dicom_dictionary_std::StandardDataDictionary;

use super::DeidError;

/// Sequences inside sequences. Real OCT objects nest 3 to 5 deep.
pub const MAX_DEPTH: usize = 16;
/// Data elements in the whole file, at every depth.
pub const MAX_ELEMENTS: usize = 1 << 20;
/// Items in one sequence (or fragments in encapsulated pixel data).
pub const MAX_ITEMS: usize = 1 << 17;

const IMPLICIT_VR_LE: &str = "1.2.840.10008.1.2";
const EXPLICIT_VR_BE: &str = "1.2.840.10008.1.2.2";
const DEFLATED_EXPLICIT_VR_LE: &str = "1.2.840.10008.1.2.1.99";
const UNDEFINED: u32 = 0xFFFF_FFFF;

#[derive(Debug, Clone, Copy, PartialEq)]
enum Frame {
    /// A sequence: its items follow.
    Sequence { end: Option<usize>, items: usize, implicit: bool },
    /// An item of a sequence: data elements follow.
    Item { end: Option<usize>, implicit: bool },
    /// Encapsulated pixel data: fragments (items whose bytes are skipped) follow.
    Fragments { items: usize },
}

struct Reader<'a> {
    bytes: &'a [u8],
    pos: usize,
    big_endian: bool,
}

impl Reader<'_> {
    fn take<const N: usize>(&mut self, what: &str) -> Result<[u8; N], DeidError> {
        let end = self.pos.checked_add(N).filter(|&e| e <= self.bytes.len());
        let Some(end) = end else {
            return Err(DeidError::Truncated(format!("DICOM {what} cut short at byte {}", self.pos)));
        };
        let mut out = [0u8; N];
        out.copy_from_slice(&self.bytes[self.pos..end]);
        self.pos = end;
        Ok(out)
    }

    fn u16(&mut self, what: &str) -> Result<u16, DeidError> {
        let b = self.take::<2>(what)?;
        Ok(if self.big_endian { u16::from_be_bytes(b) } else { u16::from_le_bytes(b) })
    }

    fn u32(&mut self, what: &str) -> Result<u32, DeidError> {
        let b = self.take::<4>(what)?;
        Ok(if self.big_endian { u32::from_be_bytes(b) } else { u32::from_le_bytes(b) })
    }

    fn remaining(&self) -> usize {
        self.bytes.len().saturating_sub(self.pos)
    }

    /// Move past `len` value bytes, which must be there.
    fn skip(&mut self, len: u32, group: u16, element: u16) -> Result<(), DeidError> {
        let len = len as usize;
        if len > self.remaining() {
            return Err(DeidError::Truncated(format!(
                "element ({group:04X},{element:04X}) declares {len} bytes, {} remain",
                self.remaining()
            )));
        }
        self.pos += len;
        Ok(())
    }

    /// The end offset of a defined length starting here, checked against the file.
    fn end_of(&self, len: u32, group: u16, element: u16) -> Result<Option<usize>, DeidError> {
        if len == UNDEFINED {
            return Ok(None);
        }
        if len as usize > self.remaining() {
            return Err(DeidError::Truncated(format!(
                "({group:04X},{element:04X}) declares {len} bytes, {} remain",
                self.remaining()
            )));
        }
        Ok(Some(self.pos + len as usize))
    }
}

/// VRs whose length is 16 bits in explicit VR (PS3.5 7.1.2). Every other VR, and any code
/// that is no VR at all, has a 32-bit length: that is how the toolkit reads them, and the walk
/// must read what the toolkit will (found by fuzzing).
fn short_form(vr: &[u8; 2]) -> bool {
    matches!(
        vr,
        b"AE"
            | b"AS"
            | b"AT"
            | b"CS"
            | b"DA"
            | b"DS"
            | b"DT"
            | b"FL"
            | b"FD"
            | b"IS"
            | b"LO"
            | b"LT"
            | b"PN"
            | b"SH"
            | b"SL"
            | b"SS"
            | b"ST"
            | b"TM"
            | b"UI"
            | b"UL"
            | b"US"
    )
}

fn long_form(vr: &[u8; 2]) -> bool {
    !short_form(vr)
}

/// A code the toolkit reads as UN: UN itself, or no VR it knows.
fn read_as_unknown(vr: &[u8; 2]) -> bool {
    let known = short_form(vr)
        || matches!(vr, b"OB" | b"OD" | b"OF" | b"OL" | b"OV" | b"OW" | b"SQ" | b"SV" | b"UC" | b"UR" | b"UT" | b"UV");
    !known || vr == b"UN"
}

/// The VR and value length of an explicit-VR element header (the tag already read).
fn explicit_vr_and_length(r: &mut Reader<'_>) -> Result<([u8; 2], u32), DeidError> {
    let vr = r.take::<2>("VR")?;
    let len = if long_form(&vr) {
        r.take::<2>("header")?;
        r.u32("length")?
    } else {
        u32::from(r.u16("length")?)
    };
    Ok((vr, len))
}

fn is_sequence_in_dictionary(group: u16, element: u16) -> bool {
    StandardDataDictionary.by_tag(dicom_core::Tag(group, element)).is_some_and(|e| e.vr() == VirtualVr::Exact(VR::SQ))
}

/// Check the file meta group alone (it is read before the transfer syntax is known); returns
/// where the data set starts. The toolkit reads meta elements, of any group, for as many bytes
/// as the group length (0002,0000) declares, so that is what is walked (found by fuzzing).
pub fn check_meta(file: &[u8]) -> Result<usize, DeidError> {
    let mut r = Reader { bytes: file, pos: 132, big_endian: false };
    // The meta group is always explicit VR little endian.
    let element_header = |r: &mut Reader<'_>| -> Result<(u16, u16, u32), DeidError> {
        let group = r.u16("meta group tag")?;
        let element = r.u16("meta group tag")?;
        let (_, len) = explicit_vr_and_length(r)?;
        if len == UNDEFINED {
            return Err(DeidError::Corrupt("undefined length in the file meta group".into()));
        }
        Ok((group, element, len))
    };
    let (group, element, len) = element_header(&mut r)?;
    if (group, element, len) != (0x0002, 0x0000, 4) {
        // No group length (the toolkit refuses such a file itself): the meta group is the
        // run of group 0002 elements.
        r.pos = 132;
        while r.remaining() >= 2 && u16::from_le_bytes([file[r.pos], file[r.pos + 1]]) == 0x0002 {
            let (group, element, len) = element_header(&mut r)?;
            r.skip(len, group, element)?;
        }
        return Ok(r.pos);
    }
    let declared = u32::from_le_bytes(r.take::<4>("meta group length")?);
    let end = r.end_of(declared, 0x0002, 0x0000)?.unwrap_or(r.pos);
    while r.pos < end {
        let (group, element, len) = element_header(&mut r)?;
        r.skip(len, group, element)?;
    }
    Ok(r.pos)
}

/// Check `file` (preamble, `DICM`, meta group, data set) encoded with transfer syntax `ts`.
/// A deflated data set is inflated (to at most `max_inflated` bytes) and walked too.
pub fn check(file: &[u8], ts: &str, max_inflated: u64) -> Result<(), DeidError> {
    let mut r = Reader { bytes: file, pos: check_meta(file)?, big_endian: false };
    if ts == DEFLATED_EXPLICIT_VR_LE {
        use std::io::Read;
        let mut inflated = Vec::new();
        flate2::read::DeflateDecoder::new(&file[r.pos..])
            .take(max_inflated.saturating_add(1))
            .read_to_end(&mut inflated)
            .map_err(|e| DeidError::Corrupt(format!("deflated data set: {e}")))?;
        if inflated.len() as u64 > max_inflated {
            return Err(DeidError::OverLimits(format!("the deflated data set inflates past {max_inflated} bytes")));
        }
        return walk(&mut Reader { bytes: &inflated, pos: 0, big_endian: false }, false);
    }
    let implicit = ts == IMPLICIT_VR_LE;
    r.big_endian = ts == EXPLICIT_VR_BE;
    walk(&mut r, implicit)
}

fn walk(r: &mut Reader<'_>, implicit_data_set: bool) -> Result<(), DeidError> {
    let mut stack: Vec<Frame> = Vec::new();
    let mut elements = 0usize;
    loop {
        // Close the items and sequences whose defined length ends here.
        while let Some(frame) = stack.last() {
            let end = match *frame {
                Frame::Sequence { end, .. } | Frame::Item { end, .. } => end,
                Frame::Fragments { .. } => None,
            };
            match end {
                Some(end) if r.pos == end => {
                    stack.pop();
                }
                Some(end) if r.pos > end => {
                    return Err(DeidError::Corrupt(format!("an element crosses the end of its item at byte {end}")));
                }
                _ => break,
            }
        }
        if r.remaining() == 0 {
            // Unclosed undefined-length sequences at the end are the toolkit's to judge.
            return Ok(());
        }
        let group = r.u16("tag")?;
        let element = r.u16("tag")?;
        elements += 1;
        if elements > MAX_ELEMENTS {
            return Err(DeidError::OverLimits(format!("more than {MAX_ELEMENTS} data elements")));
        }
        if group == 0xFFFE {
            let len = r.u32("item length")?;
            match (element, stack.last_mut()) {
                (0xE000, Some(Frame::Fragments { items })) => {
                    *items += 1;
                    if *items > MAX_ITEMS {
                        return Err(DeidError::OverLimits(format!("more than {MAX_ITEMS} pixel data fragments")));
                    }
                    if len == UNDEFINED {
                        return Err(DeidError::Corrupt("pixel data fragment of undefined length".into()));
                    }
                    r.skip(len, group, element)?;
                }
                (0xE000, Some(Frame::Sequence { items, implicit, .. })) => {
                    *items += 1;
                    if *items > MAX_ITEMS {
                        return Err(DeidError::OverLimits(format!("more than {MAX_ITEMS} items in one sequence")));
                    }
                    let implicit = *implicit;
                    let end = r.end_of(len, group, element)?;
                    stack.push(Frame::Item { end, implicit });
                }
                (0xE00D, Some(Frame::Item { end: None, .. })) => {
                    stack.pop();
                }
                (0xE0DD, Some(Frame::Sequence { end: None, .. } | Frame::Fragments { .. })) => {
                    stack.pop();
                }
                // A delimiter where none belongs: padding some writers leave; skip its bytes.
                (0xE00D | 0xE0DD, _) if len == 0 => {}
                _ => {
                    return Err(DeidError::Corrupt(format!(
                        "item tag (FFFE,{element:04X}) out of place at byte {}",
                        r.pos - 8
                    )))
                }
            }
            continue;
        }
        let implicit = match stack.last() {
            Some(Frame::Item { implicit, .. }) => *implicit,
            _ => implicit_data_set,
        };
        let (sequence, un, len) = if implicit {
            let len = r.u32("length")?;
            (len == UNDEFINED || is_sequence_in_dictionary(group, element), false, len)
        } else {
            let (vr, len) = explicit_vr_and_length(r)?;
            let un = read_as_unknown(&vr);
            (&vr == b"SQ" || (un && len == UNDEFINED), un, len)
        };
        if (group, element) == (0x7FE0, 0x0010) && len == UNDEFINED {
            stack.push(Frame::Fragments { items: 0 });
            continue;
        }
        if sequence {
            let depth = stack.iter().filter(|f| matches!(f, Frame::Sequence { .. })).count();
            if depth >= MAX_DEPTH {
                return Err(DeidError::OverLimits(format!("sequences nested deeper than {MAX_DEPTH}")));
            }
            let end = r.end_of(len, group, element)?;
            // An undefined-length UN holds an implicit VR little endian sequence (PS3.5 6.2.2).
            stack.push(Frame::Sequence { end, items: 0, implicit: implicit || un });
            continue;
        }
        if len == UNDEFINED {
            return Err(DeidError::Corrupt(format!("({group:04X},{element:04X}) has an undefined length")));
        }
        r.skip(len, group, element)?;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const EXPLICIT_LE: &str = "1.2.840.10008.1.2.1";

    fn file(data_set: &[u8]) -> Vec<u8> {
        let mut out = vec![0u8; 128];
        out.extend_from_slice(b"DICM");
        // (0002,0010) UI transfer syntax
        let ts = b"1.2.840.10008.1.2.1\0";
        out.extend_from_slice(&[0x02, 0x00, 0x10, 0x00, b'U', b'I']);
        out.extend_from_slice(&(ts.len() as u16).to_le_bytes());
        out.extend_from_slice(ts);
        out.extend_from_slice(data_set);
        out
    }

    fn element(group: u16, elem: u16, vr: &[u8; 2], value: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        out.extend_from_slice(&group.to_le_bytes());
        out.extend_from_slice(&elem.to_le_bytes());
        out.extend_from_slice(vr);
        if long_form(vr) {
            out.extend_from_slice(&[0, 0]);
            out.extend_from_slice(&(value.len() as u32).to_le_bytes());
        } else {
            out.extend_from_slice(&(value.len() as u16).to_le_bytes());
        }
        out.extend_from_slice(value);
        out
    }

    /// `depth` sequences, each holding one undefined-length item holding the next.
    fn nested(depth: usize) -> Vec<u8> {
        let mut out = Vec::new();
        for _ in 0..depth {
            out.extend_from_slice(&[0x08, 0x00, 0x15, 0x11, b'S', b'Q', 0, 0, 0xFF, 0xFF, 0xFF, 0xFF]);
            out.extend_from_slice(&[0xFE, 0xFF, 0x00, 0xE0, 0xFF, 0xFF, 0xFF, 0xFF]);
        }
        out.extend(element(0x0008, 0x1150, b"UI", b"1.2\0"));
        for _ in 0..depth {
            out.extend_from_slice(&[0xFE, 0xFF, 0x0D, 0xE0, 0, 0, 0, 0]);
            out.extend_from_slice(&[0xFE, 0xFF, 0xDD, 0xE0, 0, 0, 0, 0]);
        }
        out
    }

    #[test]
    fn ordinary_nesting_passes() {
        let mut ds = element(0x0010, 0x0010, b"PN", b"DOE^JANE");
        ds.extend(nested(5));
        ds.extend(element(0x7FE0, 0x0010, b"OB", &[0u8; 64]));
        assert!(check(&file(&ds), EXPLICIT_LE, 1 << 20).is_ok());
    }

    #[test]
    fn deep_nesting_is_refused_without_recursion() {
        let ds = nested(100_000);
        match check(&file(&ds), EXPLICIT_LE, 1 << 20) {
            Err(DeidError::OverLimits(why)) => assert!(why.contains("nested"), "{why}"),
            other => panic!("expected a depth refusal, got {other:?}"),
        }
    }

    #[test]
    fn lengths_beyond_the_file_are_refused() {
        let mut ds = element(0x0010, 0x0010, b"PN", b"DOE^JANE");
        ds.extend_from_slice(&[0xE0, 0x7F, 0x10, 0x00, b'O', b'B', 0, 0]);
        ds.extend_from_slice(&0xF000_0000u32.to_le_bytes());
        ds.extend_from_slice(&[0u8; 16]);
        assert!(matches!(check(&file(&ds), EXPLICIT_LE, 1 << 20), Err(DeidError::Truncated(_))));
    }

    #[test]
    fn too_many_items_are_refused() {
        let mut ds = vec![0x08, 0x00, 0x15, 0x11, b'S', b'Q', 0, 0, 0xFF, 0xFF, 0xFF, 0xFF];
        for _ in 0..=MAX_ITEMS {
            ds.extend_from_slice(&[0xFE, 0xFF, 0x00, 0xE0, 0, 0, 0, 0]);
        }
        assert!(matches!(check(&file(&ds), EXPLICIT_LE, 1 << 20), Err(DeidError::OverLimits(_))));
    }

    #[test]
    fn a_deflated_data_set_is_walked_after_inflating_within_the_limit() {
        use std::io::Write;
        let deflate = |ds: &[u8]| {
            let mut z = flate2::write::DeflateEncoder::new(Vec::new(), flate2::Compression::default());
            z.write_all(ds).unwrap();
            z.finish().unwrap()
        };
        // Found by fuzzing: a length beyond the inflated bytes, which the toolkit would reserve.
        let mut ds = element(0x0010, 0x0010, b"PN", b"DOE^JANE");
        ds.extend_from_slice(&[0xE0, 0x7F, 0x10, 0x00, b'O', b'B', 0, 0]);
        ds.extend_from_slice(&0x9091_0000u32.to_le_bytes());
        let deflated = file(&deflate(&ds));
        assert!(matches!(check(&deflated, DEFLATED_EXPLICIT_VR_LE, 1 << 20), Err(DeidError::Truncated(_))));
        // A deflate bomb stops at the limit.
        let bomb = file(&deflate(&vec![0u8; 4 << 20]));
        assert!(matches!(check(&bomb, DEFLATED_EXPLICIT_VR_LE, 1 << 20), Err(DeidError::OverLimits(_))));
        let fine = file(&deflate(&element(0x0010, 0x0010, b"PN", b"DOE^JANE")));
        assert!(check(&fine, DEFLATED_EXPLICIT_VR_LE, 1 << 20).is_ok());
    }

    #[test]
    fn a_meta_element_longer_than_the_file_is_refused_before_the_meta_is_read() {
        // Found by fuzzing: the toolkit's meta reader reserved a declared 3.3 GB string, and
        // reads elements of any group for as long as the group length says.
        let meta = |elements: &[u8], group_length: u32| {
            let mut f = vec![0u8; 128];
            f.extend_from_slice(b"DICM");
            f.extend_from_slice(&[0x02, 0x00, 0x00, 0x00, b'U', b'L', 4, 0]);
            f.extend_from_slice(&group_length.to_le_bytes());
            f.extend_from_slice(elements);
            f
        };
        let mut huge = vec![0x02, 0x00, 0x10, 0x00, b'U', b'C', 0, 0];
        huge.extend_from_slice(&0xC7CC_0000u32.to_le_bytes());
        huge.extend_from_slice(b"1.2.840");
        assert!(matches!(check_meta(&meta(&huge, huge.len() as u32)), Err(DeidError::Truncated(_))));
        let mut other_group = vec![0xC5, 0x00, 0x01, 0x01, b'O', b'B', 0, 0, 2, 0, 0, 0, 0, 1];
        other_group.extend_from_slice(&huge);
        let total = other_group.len() as u32;
        assert!(matches!(check_meta(&meta(&other_group, total)), Err(DeidError::Truncated(_))));
        assert!(matches!(check_meta(&meta(&[], 0xFF00_00B4)), Err(DeidError::Truncated(_))));
        let ts = element(0x0002, 0x0010, b"UI", b"1.2.840.10008.1.2.1\0");
        assert_eq!(check_meta(&meta(&ts, ts.len() as u32)).unwrap(), 132 + 12 + ts.len());
    }

    #[test]
    fn an_unknown_vr_is_read_with_a_long_length_as_the_toolkit_does() {
        // Found by fuzzing: "xx" with what looks like a short length, which the toolkit reads
        // as UN with a 32-bit length of gigabytes.
        let mut ds = vec![0x08, 0x00, 0x16, 0x00, b'x', b'x', 0x10, 0x00];
        ds.extend_from_slice(&0xE000_0000u32.to_le_bytes());
        ds.extend_from_slice(&[0u8; 32]);
        assert!(matches!(check(&file(&ds), EXPLICIT_LE, 1 << 20), Err(DeidError::Truncated(_))));
    }

    #[test]
    fn truncated_headers_are_truncated() {
        let ds = element(0x0010, 0x0010, b"PN", b"DOE^JANE");
        let f = file(&ds);
        assert!(matches!(check(&f[..f.len() - 12], EXPLICIT_LE, 1 << 20), Err(DeidError::Truncated(_))));
    }
}
