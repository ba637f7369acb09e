//! DICOM de-identification with dicom-rs: header checks and limits before any pixel is
//! decoded, the Annex E profile at every sequence depth, keyed-hash UIDs, burned-in masks.

use std::collections::BTreeMap;
use std::io::Read;

use dicom_core::header::Header;
use dicom_core::value::{PrimitiveValue, Value};
use dicom_core::{DataElement, Length, Tag, VR};
use dicom_dictionary_std::tags;
use dicom_object::file::ReadPreamble;
use dicom_object::meta::FileMetaTableBuilder;
use dicom_object::{FileDicomObject, FileMetaTable, InMemDicomObject, OpenFileOptions};
use dicom_pixeldata::PixelDecoder;
use dicom_transfer_syntax_registry::{TransferSyntaxIndex, TransferSyntaxRegistry};

use super::profile::{self, Action};
use super::{check_frame_limits, DeidError, InputLimits, Scope};
use crate::config::BurnedInMask;
use crate::secret::DeviceSecret;

const EXPLICIT_VR_LE: &str = "1.2.840.10008.1.2.1";
const DEFLATED_EXPLICIT_VR_LE: &str = "1.2.840.10008.1.2.1.99";
/// octd's implementation class UID (under the UUID-derived 2.25 arc).
const IMPLEMENTATION_CLASS_UID: &str = "2.25.214148914328734529126339407264358741283";
const STANDARD_UID_ROOT: &str = "1.2.840.10008.";

/// Attributes copied into the sealed linkage before they are removed.
const LINKAGE_ATTRIBUTES: &[(Tag, &str)] = &[
    (tags::PATIENT_NAME, "PatientName"),
    (tags::PATIENT_ID, "PatientID"),
    (tags::PATIENT_BIRTH_DATE, "PatientBirthDate"),
    (Tag(0x0010, 0x1000), "OtherPatientIDs"),
    (tags::ACCESSION_NUMBER, "AccessionNumber"),
    (tags::STUDY_INSTANCE_UID, "StudyInstanceUID"),
    (tags::SERIES_INSTANCE_UID, "SeriesInstanceUID"),
    (tags::SOP_INSTANCE_UID, "SOPInstanceUID"),
    (tags::STUDY_DATE, "StudyDate"),
    (tags::INSTITUTION_NAME, "InstitutionName"),
];

pub(super) struct DicomOutput {
    pub artifact: Vec<u8>,
    pub frames: u32,
    pub identifiers: BTreeMap<String, String>,
    pub study_uid: Option<String>,
    pub laterality: Option<String>,
}

type Obj = FileDicomObject<InMemDicomObject>;

fn text(obj: &InMemDicomObject, tag: Tag) -> Option<String> {
    obj.get(tag)
        .and_then(|e| e.to_str().ok())
        .map(|s| s.trim_end_matches(['\0', ' ']).trim().to_string())
        .filter(|s| !s.is_empty())
}

fn int(obj: &InMemDicomObject, tag: Tag) -> Option<u64> {
    obj.get(tag).and_then(|e| e.to_int::<i64>().ok()).and_then(|v| u64::try_from(v).ok())
}

const RLE_LOSSLESS: &str = "1.2.840.10008.1.2.5";

/// Read the file meta group alone, to refuse an unknown transfer syntax with a clear reason
/// before parsing the data set.
fn read_transfer_syntax(input: &[u8]) -> Result<String, DeidError> {
    // Its lengths are checked first: the toolkit reserves what they declare.
    super::walk::check_meta(input)?;
    let after_preamble = input.get(128..).ok_or_else(|| DeidError::Truncated("DICOM preamble".into()))?;
    let meta = FileMetaTable::from_reader(after_preamble.take(1 << 20))
        .map_err(|e| DeidError::Corrupt(format!("DICOM file meta: {}", super::toolkit_words(e))))?;
    Ok(meta.transfer_syntax().trim_end_matches(['\0', ' ']).to_string())
}

/// Read a DICOM object with every bound checked before the toolkit builds anything: the
/// transfer syntax, the meta group and data-set walk (nesting, counts, lengths), then the
/// pixel geometry against `limits` and the RLE headers. Returns the transfer syntax, the
/// object and its frame count (0 for an object without pixels in `AnyObject` scope).
fn open_checked(input: Vec<u8>, limits: &InputLimits, scope: Scope) -> Result<(String, Obj, u32), DeidError> {
    let ts_uid = read_transfer_syntax(&input)?;
    let ts = TransferSyntaxRegistry
        .get(&ts_uid)
        .filter(|ts| !ts.is_unsupported() && !ts.is_unsupported_pixel_encapsulation() && ts.can_decode_all())
        .ok_or_else(|| DeidError::UnsupportedTransferSyntax(super::uid_words(&ts_uid)))?;
    let encapsulated = ts.is_encapsulated_pixel_data();
    let rle = ts_uid == RLE_LOSSLESS;
    // Nesting, counts and lengths are bounded before the toolkit builds anything (its
    // reader recurses into sequences and reserves what lengths declare).
    super::walk::check(&input, &ts_uid, limits.max_decoded_bytes.saturating_add(limits.max_file_bytes))?;

    let obj: Obj =
        OpenFileOptions::new().read_preamble(ReadPreamble::Never).from_reader(&input[128..]).map_err(|e| {
            let msg = super::toolkit_words(e);
            if msg.contains("end of file")
                || msg.contains("UnexpectedEof")
                || msg.contains("failed to fill whole buffer")
            {
                DeidError::Truncated(format!("DICOM data set: {msg}"))
            } else {
                DeidError::Corrupt(format!("DICOM data set: {msg}"))
            }
        })?;
    drop(input);

    let has_pixels = obj.get(tags::PIXEL_DATA).is_some();
    let frames = match scope {
        Scope::OctImages => check_pixel_data(&obj, encapsulated, rle, limits, true)?,
        Scope::AnyObject if has_pixels => check_pixel_data(&obj, encapsulated, rle, limits, false)?,
        Scope::AnyObject => 0,
    };
    Ok((ts_uid, obj, frames))
}

/// A DICOM image from elsewhere (the trainer's intake), read as the device reads scanner
/// bytes — every bound of [`open_checked`] — and its pixels decoded to prove them whole:
/// the object, its frames, rows and columns.
pub fn read_checked(
    input: Vec<u8>,
    limits: &InputLimits,
) -> Result<(FileDicomObject<InMemDicomObject>, u32, u32, u32), DeidError> {
    let (_, obj, frames) = open_checked(input, limits, Scope::OctImages)?;
    prove_pixels(&obj, frames)?;
    let rows = int(&obj, tags::ROWS).and_then(|v| u32::try_from(v).ok()).unwrap_or(0);
    let columns = int(&obj, tags::COLUMNS).and_then(|v| u32::try_from(v).ok()).unwrap_or(0);
    Ok((obj, frames, rows, columns))
}

/// Proof that the pixels are whole. Native pixels are already checked against their
/// geometry, so their first frame proves the attributes a reader needs, without a copy of the
/// volume. Compressed pixels are decoded whole, exactly as inference decodes them (a per-frame
/// decode would follow a hostile offset table to fragments never proven, and re-copy every
/// fragment for each frame), and must decode to every frame's full size.
fn prove_pixels(obj: &Obj, frames: u32) -> Result<(), DeidError> {
    let encapsulated = obj.get(tags::PIXEL_DATA).is_some_and(|e| matches!(e.value(), Value::PixelSequence(_)));
    if !encapsulated {
        let first = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| obj.decode_pixel_data_frame(0)))
            .map_err(|_| DeidError::Corrupt("pixel data does not decode: the decoder failed on it".into()))?
            .map_err(|e| DeidError::Corrupt(format!("pixel data does not decode: {}", super::toolkit_words(e))))?;
        return match first.data().is_empty() {
            true => Err(DeidError::Corrupt("pixel data decodes to nothing".into())),
            false => Ok(()),
        };
    }
    let decoded = decode_whole(obj)?;
    let frame = decoded.rows() as u64
        * decoded.columns() as u64
        * u64::from(decoded.samples_per_pixel())
        * u64::from(decoded.bits_allocated()).div_ceil(8);
    let expected = frame.saturating_mul(u64::from(frames));
    let found = decoded.data().len() as u64;
    if found < expected {
        return Err(DeidError::PixelDataShort { declared: expected, found });
    }
    Ok(())
}

/// Every frame decoded: proof that the pixels are whole before anything relies on them
/// (truncated JPEG / JPEG 2000 streams fail here). A decoder that panics on hostile pixel
/// data (found by fuzzing: an index out of bounds in the toolkit's RLE adapter) refuses the
/// input like any other corrupt stream.
fn decode_whole(obj: &Obj) -> Result<dicom_pixeldata::DecodedPixelData<'_>, DeidError> {
    let decoded = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| obj.decode_pixel_data()))
        .map_err(|_| DeidError::Corrupt("pixel data does not decode: the decoder failed on it".into()))?
        .map_err(|e| DeidError::Corrupt(format!("pixel data does not decode: {}", super::toolkit_words(e))))?;
    if decoded.data().is_empty() {
        return Err(DeidError::Corrupt("pixel data decodes to nothing".into()));
    }
    Ok(decoded)
}

/// De-identify one DICOM file held in `input`. The input is dropped once parsed and the
/// pixel data moved (not copied) into the cleaned object, so one volume's pixels are held at
/// most twice at once: in the object, and in the written artefact (or the decoded frames).
pub(super) fn deidentify(
    input: Vec<u8>,
    secret: &DeviceSecret,
    masks: &[BurnedInMask],
    limits: &InputLimits,
    scope: Scope,
) -> Result<DicomOutput, DeidError> {
    let (ts_uid, obj, frames) = open_checked(input, limits, scope)?;
    let burned_in = text(&obj, tags::BURNED_IN_ANNOTATION).is_some_and(|v| v.eq_ignore_ascii_case("YES"));
    let has_pixels = obj.get(tags::PIXEL_DATA).is_some();

    // Pixels are decoded whole only to be masked; otherwise one frame at a time.
    let decoded = match has_pixels && burned_in {
        true => Some(decode_whole(&obj)?),
        false => None,
    };
    if scope == Scope::OctImages && decoded.is_none() {
        prove_pixels(&obj, frames)?;
    }

    let mut identifiers = BTreeMap::new();
    for (tag, keyword) in LINKAGE_ATTRIBUTES {
        if let Some(v) = text(&obj, *tag) {
            identifiers.insert((*keyword).to_string(), v);
        }
    }
    let laterality = text(&obj, tags::IMAGE_LATERALITY).or_else(|| text(&obj, tags::LATERALITY));
    let mut out_ts = if ts_uid == DEFLATED_EXPLICIT_VR_LE { EXPLICIT_VR_LE.to_string() } else { ts_uid.clone() };

    let masked = if let (true, Some(decoded)) = (burned_in, decoded.as_ref()) {
        let manufacturer = text(&obj, tags::MANUFACTURER).unwrap_or_default();
        let model = text(&obj, tags::MANUFACTURER_MODEL_NAME).unwrap_or_default();
        let mask = masks
            .iter()
            .find(|m| {
                m.manufacturer.eq_ignore_ascii_case(&manufacturer)
                    && (m.model.is_empty() || m.model.eq_ignore_ascii_case(&model))
            })
            .ok_or(DeidError::BurnedInAnnotation)?;
        out_ts = EXPLICIT_VR_LE.to_string();
        Some(masked_pixels(decoded, &mask.rects)?)
    } else if burned_in {
        // A non-image object that says it has burned-in text: there is nothing to mask.
        return Err(DeidError::BurnedInAnnotation);
    } else {
        None
    };
    drop(decoded);

    let cleaner = Cleaner { secret };
    let sop_class = obj.meta().media_storage_sop_class_uid().trim_end_matches(['\0', ' ']).to_string();
    let sop_instance = cleaner.uid(obj.meta().media_storage_sop_instance_uid().trim_end_matches(['\0', ' ']));
    let mut cleaned = cleaner.clean(obj.into_inner());
    for element in masked.into_iter().flatten() {
        cleaned.put(element);
    }

    cleaned.put(DataElement::new(tags::PATIENT_IDENTITY_REMOVED, VR::CS, PrimitiveValue::from("YES")));
    cleaned.put(DataElement::new(
        tags::DEIDENTIFICATION_METHOD,
        VR::LO,
        PrimitiveValue::from("PS3.15 Annex E Basic Profile; keyed-hash UIDs; octd"),
    ));
    let code = InMemDicomObject::from_element_iter([
        DataElement::new(tags::CODE_VALUE, VR::SH, PrimitiveValue::from("113100")),
        DataElement::new(tags::CODING_SCHEME_DESIGNATOR, VR::SH, PrimitiveValue::from("DCM")),
        DataElement::new(tags::CODE_MEANING, VR::LO, PrimitiveValue::from("Basic Application Confidentiality Profile")),
    ]);
    cleaned.put(DataElement::new(
        tags::DEIDENTIFICATION_METHOD_CODE_SEQUENCE,
        VR::SQ,
        Value::new_sequence(vec![code], Length::UNDEFINED),
    ));
    cleaned.put(DataElement::new(
        tags::LONGITUDINAL_TEMPORAL_INFORMATION_MODIFIED,
        VR::CS,
        PrimitiveValue::from("REMOVED"),
    ));

    let meta = FileMetaTableBuilder::new()
        .media_storage_sop_class_uid(sop_class)
        .media_storage_sop_instance_uid(sop_instance)
        .transfer_syntax(out_ts)
        .implementation_class_uid(IMPLEMENTATION_CLASS_UID)
        .implementation_version_name(format!("OCTD_{}", env!("CARGO_PKG_VERSION").replace('.', "_")))
        .build()
        .map_err(|e| DeidError::Corrupt(format!("file meta: {}", super::toolkit_words(e))))?;
    let study_uid = text(&cleaned, tags::STUDY_INSTANCE_UID);
    let artifact = write_object(cleaned, meta)?;

    Ok(DicomOutput { artifact, frames, identifiers, study_uid, laterality })
}

/// The object as a DICOM file in memory, its pixel data written from where it lies: the
/// toolkit's writer clones every value it writes, which held a volume's pixels three times
/// at once (the object, the clone and the file). Elements after the pixel data (trailing
/// padding, digital signatures, which Annex E removes anyway) are dropped: the pixel data is
/// written last.
fn write_object(mut object: InMemDicomObject, meta: FileMetaTable) -> Result<Vec<u8>, DeidError> {
    let failed = |e: &dyn std::fmt::Display| DeidError::Corrupt(format!("writing de-identified DICOM: {e}"));
    let ts = TransferSyntaxRegistry
        .get(meta.transfer_syntax())
        .ok_or_else(|| failed(&"the transfer syntax has no writer"))?;
    if matches!(ts.codec(), dicom_encoding::Codec::Dataset(_)) {
        // Pixel data appended after a compressed data set would not be part of it.
        return Err(DeidError::UnsupportedTransferSyntax(super::uid_words(meta.transfer_syntax())));
    }
    let pixel_data = object.take(tags::PIXEL_DATA);
    let after: Vec<Tag> = object.iter().map(|e| e.tag()).filter(|t| *t > tags::PIXEL_DATA).collect();
    for tag in after {
        object.remove_element(tag);
    }
    let pixel_bytes = pixel_data.as_ref().map_or(0, |e| match e.value() {
        Value::Primitive(p) => p.calculate_byte_len(),
        Value::PixelSequence(seq) => seq.fragments().iter().map(|f| f.len() + 9).sum(),
        Value::Sequence(_) => 0,
    });
    // Reserved up front: a growing buffer would hold up to twice the volume while it doubles.
    let mut out = Vec::with_capacity(pixel_bytes.saturating_add(1 << 20));
    object.with_exact_meta(meta).write_all(&mut out).map_err(|e| failed(&super::toolkit_words(e)))?;
    if let Some(pixel_data) = pixel_data {
        let encoder = ts.encoder_for::<Vec<u8>>().ok_or_else(|| failed(&"the transfer syntax has no encoder"))?;
        let length = |n: usize| u32::try_from(n).map(Length).map_err(|_| failed(&"pixel data over 4 GiB"));
        let encoding = |e: dicom_encoding::encode::Error| failed(&super::toolkit_words(e));
        match pixel_data.value() {
            Value::Primitive(p) => {
                let n = p.calculate_byte_len();
                let header = dicom_core::DataElementHeader::new(tags::PIXEL_DATA, pixel_data.vr(), length(n + n % 2)?);
                encoder.encode_element_header(&mut out, header).map_err(encoding)?;
                let written = encoder.encode_primitive(&mut out, p).map_err(encoding)?;
                if written % 2 == 1 {
                    out.push(0);
                }
            }
            Value::PixelSequence(seq) => {
                let header = dicom_core::DataElementHeader::new(tags::PIXEL_DATA, VR::OB, Length::UNDEFINED);
                encoder.encode_element_header(&mut out, header).map_err(encoding)?;
                let table = seq.offset_table();
                encoder.encode_item_header(&mut out, length(table.len() * 4)?.0).map_err(encoding)?;
                encoder.encode_offset_table(&mut out, table).map_err(encoding)?;
                for fragment in seq.fragments() {
                    let n = fragment.len();
                    encoder.encode_item_header(&mut out, length(n + n % 2)?.0).map_err(encoding)?;
                    out.extend_from_slice(fragment);
                    if n % 2 == 1 {
                        out.push(0);
                    }
                }
                encoder.encode_sequence_delimiter(&mut out).map_err(encoding)?;
            }
            Value::Sequence(_) => return Err(failed(&"pixel data is a sequence")),
        }
    }
    Ok(out)
}

/// Declared geometry against the limits and against the bytes actually present.
/// `oct_only`: only the pixel layouts the classifier reads (8/16-bit, 1 or 3 samples).
fn check_pixel_data(
    obj: &InMemDicomObject,
    encapsulated: bool,
    rle: bool,
    limits: &InputLimits,
    oct_only: bool,
) -> Result<u32, DeidError> {
    let rows = int(obj, tags::ROWS).ok_or_else(|| DeidError::NoPixelData("Rows missing".into()))?;
    let cols = int(obj, tags::COLUMNS).ok_or_else(|| DeidError::NoPixelData("Columns missing".into()))?;
    let frames = int(obj, tags::NUMBER_OF_FRAMES).unwrap_or(1).max(1);
    let samples = int(obj, tags::SAMPLES_PER_PIXEL).unwrap_or(1).max(1);
    let bits = int(obj, tags::BITS_ALLOCATED).unwrap_or(8);
    if oct_only && (!matches!(bits, 8 | 16) || !matches!(samples, 1 | 3)) {
        return Err(DeidError::Corrupt(format!("{bits}-bit, {samples}-sample pixels are not an OCT image")));
    }
    if !matches!(bits, 1 | 8 | 16 | 32 | 64) || !(1..=4).contains(&samples) {
        return Err(DeidError::Corrupt(format!("{bits}-bit, {samples}-sample pixels")));
    }
    // Single-bit pixels (segmentations) pack eight to a byte.
    let bytes_per_pixel = (samples * bits).div_ceil(8).max(1);
    check_frame_limits(cols, rows, frames, bytes_per_pixel, limits)?;
    let pixel_data = obj.get(tags::PIXEL_DATA).ok_or_else(|| DeidError::NoPixelData("PixelData missing".into()))?;
    match pixel_data.value() {
        Value::PixelSequence(seq) => {
            if seq.fragments().is_empty() {
                return Err(DeidError::Truncated("encapsulated pixel data has no fragments".into()));
            }
            // Item lengths are even (PS3.5 A.4); padding one afterwards would change the
            // bytes that were proven.
            if seq.fragments().iter().any(|f| f.len() % 2 == 1) {
                return Err(DeidError::Corrupt("an encapsulated pixel data fragment has an odd length".into()));
            }
            if rle {
                // The toolkit takes one fragment per frame.
                if seq.fragments().len() as u64 != frames {
                    return Err(DeidError::Corrupt(format!(
                        "{} RLE fragments for {frames} frames",
                        seq.fragments().len()
                    )));
                }
                let segments = samples * bits.div_ceil(8);
                for (i, fragment) in seq.fragments().iter().enumerate() {
                    check_rle_header(fragment, segments)
                        .map_err(|why| DeidError::Corrupt(format!("RLE frame {i}: {why}")))?;
                }
            }
        }
        Value::Primitive(p) if !encapsulated => {
            let declared = match bits {
                1 => (rows * cols * frames * samples).div_ceil(8),
                _ => rows * cols * frames * bytes_per_pixel,
            };
            let found = p.calculate_byte_len() as u64;
            if found < declared {
                return Err(DeidError::PixelDataShort { declared, found });
            }
        }
        _ => return Err(DeidError::Corrupt("pixel data encoding does not match the transfer syntax".into())),
    }
    u32::try_from(frames).map_err(|_| DeidError::OverLimits(format!("{frames} frames")))
}

/// PS3.5 Annex G: a 64-byte header of a segment count and fifteen offsets. The toolkit reads
/// it unchecked (it reserves four bytes per declared segment and indexes past a short
/// fragment, found by fuzzing), so it is checked here first: one segment per sample byte,
/// the first right after the header, each within the fragment and none before the last.
fn check_rle_header(fragment: &[u8], expected_segments: u64) -> Result<(), String> {
    const HEADER: usize = 64;
    let header = fragment.get(..HEADER).ok_or_else(|| format!("{} bytes, shorter than its header", fragment.len()))?;
    let word = |i: usize| header.get(4 * i..4 * i + 4).map_or(0, |b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]));
    let segments = u64::from(word(0));
    if segments > 15 || segments != expected_segments {
        return Err(format!("{segments} segments where the pixel layout needs {expected_segments}"));
    }
    let mut previous = HEADER as u64;
    for n in 1..=segments as usize {
        let offset = u64::from(word(n));
        if (n == 1 && offset != HEADER as u64) || (n > 1 && offset <= previous) || offset >= fragment.len() as u64 {
            return Err(format!("segment {n} starts at {offset}, outside the fragment"));
        }
        previous = offset;
    }
    Ok(())
}

/// The decoded pixels with the mask's rectangles blacked out, as the elements that replace
/// the object's pixel data (uncompressed, so the transfer syntax becomes explicit VR LE).
fn masked_pixels(
    decoded: &dicom_pixeldata::DecodedPixelData<'_>,
    rects: &[crate::config::Rect],
) -> Result<Vec<DataElement<InMemDicomObject>>, DeidError> {
    let rows = decoded.rows() as usize;
    let cols = decoded.columns() as usize;
    let samples = decoded.samples_per_pixel() as usize;
    let bytes = (decoded.bits_allocated() as usize).div_ceil(8);
    if samples == 3 && decoded.planar_configuration() != dicom_pixeldata::PlanarConfiguration::Standard {
        return Err(DeidError::Corrupt("pixel masks need interleaved colour samples".into()));
    }
    let mut data = decoded.data().to_vec();
    let pixel = samples * bytes;
    let frame_len = rows * cols * pixel;
    for frame in data.chunks_mut(frame_len) {
        for &[x, y, w, h] in rects {
            let (x, y, w, h) = (x as usize, y as usize, w as usize, h as usize);
            for row in y.min(rows)..(y + h).min(rows) {
                let start = (row * cols + x.min(cols)) * pixel;
                let end = (row * cols + (x + w).min(cols)) * pixel;
                if let Some(span) = frame.get_mut(start..end) {
                    span.fill(0);
                }
            }
        }
    }
    let value = if bytes == 1 {
        PrimitiveValue::U8(data.into())
    } else {
        PrimitiveValue::U16(data.chunks_exact(2).map(|c| u16::from_le_bytes([c[0], c[1]])).collect())
    };
    let mut out = vec![DataElement::new(tags::PIXEL_DATA, if bytes == 1 { VR::OB } else { VR::OW }, value)];
    if samples == 3 {
        out.push(DataElement::new(tags::PHOTOMETRIC_INTERPRETATION, VR::CS, PrimitiveValue::from("RGB")));
        out.push(DataElement::new(tags::PLANAR_CONFIGURATION, VR::US, PrimitiveValue::from(0u16)));
    }
    out.push(DataElement::new(tags::BURNED_IN_ANNOTATION, VR::CS, PrimitiveValue::from("NO")));
    Ok(out)
}

struct Cleaner<'a> {
    secret: &'a DeviceSecret,
}

impl Cleaner<'_> {
    /// Keyed hash into the 2.25 (UUID-derived) arc: the same UID on this device always gives
    /// the same pseudonym, and nobody without the device key can go back.
    fn uid(&self, uid: &str) -> String {
        if uid.is_empty() || uid.starts_with(STANDARD_UID_ROOT) {
            return uid.to_string();
        }
        let mac = self.secret.mac("uid", uid.as_bytes());
        let mut first = [0u8; 16];
        first.copy_from_slice(&mac[..16]);
        format!("2.25.{}", u128::from_be_bytes(first))
    }

    fn pseudonym(&self, value: &str) -> String {
        let mac = self.secret.mac("patient-id", value.as_bytes());
        format!("OCTD-{}", hex::encode(&mac[..8]))
    }

    /// The profile applied to `dataset`, which is consumed: kept values (the pixel data
    /// above all) move into the result instead of being copied.
    fn clean(&self, dataset: InMemDicomObject) -> InMemDicomObject {
        let mut out = InMemDicomObject::new_empty();
        for element in dataset {
            let tag = element.tag();
            if tag.group() % 2 == 1 {
                continue; // private attributes and their creators, at any depth
            }
            let vr = element.vr();
            match profile::action_for(tag, vr) {
                Action::Remove => {}
                Action::Empty if vr == VR::SQ => {
                    out.put(DataElement::new(
                        tag,
                        VR::SQ,
                        Value::new_sequence(Vec::<InMemDicomObject>::new(), Length::UNDEFINED),
                    ));
                }
                Action::Empty => {
                    out.put(DataElement::empty(tag, vr));
                }
                Action::Dummy if vr == VR::SQ => {} // no sequence takes a D here: removed
                Action::Dummy => {
                    out.put(DataElement::new(tag, vr, PrimitiveValue::from(profile::dummy(vr))));
                }
                Action::Uid => {
                    let value = element.to_str().map(|s| s.into_owned()).unwrap_or_default();
                    let mapped: Vec<String> =
                        value.split('\\').map(|u| self.uid(u.trim_end_matches(['\0', ' ']).trim())).collect();
                    out.put(DataElement::new(tag, VR::UI, PrimitiveValue::Strs(mapped.into())));
                }
                Action::Pseudonym => {
                    let value = element.to_str().map(|s| s.trim().to_string()).unwrap_or_default();
                    let replaced = if value.is_empty() { String::new() } else { self.pseudonym(&value) };
                    out.put(DataElement::new(tag, vr, PrimitiveValue::from(replaced)));
                }
                Action::Keep => match element.into_value() {
                    Value::Sequence(seq) => {
                        let items: Vec<InMemDicomObject> =
                            seq.into_items().into_iter().map(|item| self.clean(item)).collect();
                        out.put(DataElement::new(tag, VR::SQ, Value::new_sequence(items, Length::UNDEFINED)));
                    }
                    value => {
                        out.put(DataElement::new(tag, vr, value));
                    }
                },
            }
        }
        out
    }
}
