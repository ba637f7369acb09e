//! Real DICOM bytes for tests, built with dicom-rs: identity planted everywhere the profile
//! must reach, pixels taken from the real shared OCT images.

use dicom_core::value::{PixelFragmentSequence, PrimitiveValue, Value};
use dicom_core::{DataElement, Length, Tag, VR};
use dicom_dictionary_std::tags;
use dicom_object::meta::FileMetaTableBuilder;
use dicom_object::InMemDicomObject;

pub const OPT_SOP_CLASS: &str = "1.2.840.10008.5.1.4.1.1.77.1.5.4";
pub const SC_SOP_CLASS: &str = "1.2.840.10008.5.1.4.1.1.7";
pub const EXPLICIT_LE: &str = "1.2.840.10008.1.2.1";
pub const JPEG_BASELINE: &str = "1.2.840.10008.1.2.4.50";
pub const RLE: &str = "1.2.840.10008.1.2.5";
pub const DEFLATED: &str = "1.2.840.10008.1.2.1.99";
pub const STUDY_UID: &str = "1.2.826.0.1.3680043.8.498.10101";
pub const SOP_UID: &str = "1.2.826.0.1.3680043.8.498.20202";

pub enum Pixels {
    /// Native 8-bit frames, all `width` x `height`.
    Native { width: u32, height: u32, frames: Vec<Vec<u8>> },
    /// One JPEG baseline stream as a single fragment.
    Jpeg { width: u32, height: u32, jpeg: Vec<u8> },
    /// Native 8-bit frames in a deflated data set.
    Deflated { width: u32, height: u32, frames: Vec<Vec<u8>> },
    /// 8-bit frames, RLE Lossless encoded.
    Rle { width: u32, height: u32, frames: Vec<Vec<u8>> },
    /// RLE Lossless fragments exactly as given (hand-made hostile headers and segments).
    RleFragments { width: u32, height: u32, fragments: Vec<Vec<u8>> },
}

pub struct Spec {
    pub sop_class: &'static str,
    pub pixels: Pixels,
    pub burned_in: bool,
    pub manufacturer: &'static str,
}

impl Spec {
    /// No burned-in annotation, an ordinary manufacturer.
    pub fn plain(sop_class: &'static str, pixels: Pixels) -> Spec {
        Spec { sop_class, pixels, burned_in: false, manufacturer: "ExampleVendor" }
    }
}

fn el(tag: Tag, vr: VR, v: &str) -> DataElement<InMemDicomObject> {
    DataElement::new(tag, vr, PrimitiveValue::from(v))
}

fn seq(tag: Tag, items: Vec<InMemDicomObject>) -> DataElement<InMemDicomObject> {
    DataElement::new(tag, VR::SQ, Value::new_sequence(items, Length::UNDEFINED))
}

/// PackBits with literal runs only: valid DICOM RLE, simple to get right.
pub fn rle_frame(pixels: &[u8]) -> Vec<u8> {
    let mut segment = Vec::new();
    for chunk in pixels.chunks(128) {
        segment.push((chunk.len() - 1) as u8);
        segment.extend_from_slice(chunk);
    }
    if segment.len() % 2 == 1 {
        segment.push(0x80); // no-op byte keeps the segment even
    }
    let mut frame = Vec::with_capacity(64 + segment.len());
    frame.extend_from_slice(&1u32.to_le_bytes());
    frame.extend_from_slice(&64u32.to_le_bytes());
    frame.extend_from_slice(&[0u8; 56]);
    frame.extend_from_slice(&segment);
    frame
}

pub fn build(spec: Spec) -> Vec<u8> {
    let (width, height, frames, ts, pixel_element) = match spec.pixels {
        Pixels::Native { width, height, frames } => {
            let n = frames.len();
            let data: Vec<u8> = frames.concat();
            (width, height, n, EXPLICIT_LE, DataElement::new(tags::PIXEL_DATA, VR::OB, PrimitiveValue::U8(data.into())))
        }
        Pixels::Deflated { width, height, frames } => {
            let n = frames.len();
            let data: Vec<u8> = frames.concat();
            (width, height, n, DEFLATED, DataElement::new(tags::PIXEL_DATA, VR::OB, PrimitiveValue::U8(data.into())))
        }
        Pixels::Jpeg { width, height, mut jpeg } => {
            if jpeg.len() % 2 == 1 {
                jpeg.push(0);
            }
            let seq = PixelFragmentSequence::new(Vec::<u32>::new(), vec![jpeg]);
            (width, height, 1, JPEG_BASELINE, DataElement::new(tags::PIXEL_DATA, VR::OB, Value::PixelSequence(seq)))
        }
        Pixels::Rle { width, height, frames } => {
            let n = frames.len();
            let fragments: Vec<Vec<u8>> = frames.iter().map(|f| rle_frame(f)).collect();
            let seq = PixelFragmentSequence::new(Vec::<u32>::new(), fragments);
            (width, height, n, RLE, DataElement::new(tags::PIXEL_DATA, VR::OB, Value::PixelSequence(seq)))
        }
        Pixels::RleFragments { width, height, fragments } => {
            let n = fragments.len();
            let seq = PixelFragmentSequence::new(Vec::<u32>::new(), fragments);
            (width, height, n, RLE, DataElement::new(tags::PIXEL_DATA, VR::OB, Value::PixelSequence(seq)))
        }
    };
    let nested_person = InMemDicomObject::from_element_iter([
        el(tags::PERSON_NAME, VR::PN, "DOE^JOHN"),
        el(Tag(0x0011, 0x0010), VR::LO, "ACME"),
        el(Tag(0x0011, 0x1001), VR::LO, "SECRET-PRIVATE"),
        el(tags::OBSERVATION_DATE_TIME, VR::DT, "19450704120000"),
    ]);
    let source_image = InMemDicomObject::from_element_iter([
        el(tags::REFERENCED_SOP_CLASS_UID, VR::UI, spec.sop_class),
        el(tags::REFERENCED_SOP_INSTANCE_UID, VR::UI, "1.2.826.0.1.3680043.8.498.30303"),
        seq(tags::PURPOSE_OF_REFERENCE_CODE_SEQUENCE, vec![nested_person]),
    ]);
    let referenced_study = InMemDicomObject::from_element_iter([
        el(tags::REFERENCED_SOP_INSTANCE_UID, VR::UI, STUDY_UID),
        el(tags::PATIENT_NAME, VR::PN, "DOE^JOHN"),
    ]);
    let mut elements = vec![
        el(tags::SPECIFIC_CHARACTER_SET, VR::CS, "ISO_IR 100"),
        el(tags::SOP_CLASS_UID, VR::UI, spec.sop_class),
        el(tags::SOP_INSTANCE_UID, VR::UI, SOP_UID),
        el(tags::STUDY_DATE, VR::DA, "20240101"),
        el(tags::ACQUISITION_DATE_TIME, VR::DT, "20240101101010"),
        el(tags::ACCESSION_NUMBER, VR::SH, "ACC-99887766"),
        el(tags::MODALITY, VR::CS, "OPT"),
        el(tags::MANUFACTURER, VR::LO, spec.manufacturer),
        el(tags::MANUFACTURER_MODEL_NAME, VR::LO, "OCT-1000"),
        el(tags::INSTITUTION_NAME, VR::LO, "St. Elsewhere"),
        el(tags::INSTITUTION_ADDRESS, VR::ST, "742 Evergreen Terrace, Springfield"),
        el(tags::REFERRING_PHYSICIAN_NAME, VR::PN, "Dr^Quincy"),
        el(tags::STATION_NAME, VR::SH, "DOE_JOHN_PC"),
        seq(tags::REFERENCED_STUDY_SEQUENCE, vec![referenced_study]),
        seq(tags::SOURCE_IMAGE_SEQUENCE, vec![source_image]),
        el(tags::PATIENT_NAME, VR::PN, "DOE^JOHN"),
        el(tags::PATIENT_ID, VR::LO, "MRN8675309"),
        el(tags::PATIENT_BIRTH_DATE, VR::DA, "19450704"),
        el(tags::PATIENT_SEX, VR::CS, "M"),
        el(Tag(0x0010, 0x1000), VR::LO, "OTHERID-4242"), // Other Patient IDs (retired, still seen)
        el(tags::PATIENT_ADDRESS, VR::LO, "742 Evergreen Terrace, Springfield"),
        el(tags::PATIENT_TELEPHONE_NUMBERS, VR::SH, "555-0100"),
        el(Tag(0x0009, 0x0010), VR::LO, "ACME"),
        el(Tag(0x0009, 0x1001), VR::LO, "SECRET-PRIVATE DOE^JOHN"),
        el(tags::STUDY_INSTANCE_UID, VR::UI, STUDY_UID),
        el(tags::SERIES_INSTANCE_UID, VR::UI, "1.2.826.0.1.3680043.8.498.40404"),
        el(tags::STUDY_ID, VR::SH, "MRN8675309"),
        el(tags::IMAGE_LATERALITY, VR::CS, "R"),
        DataElement::new(tags::SAMPLES_PER_PIXEL, VR::US, PrimitiveValue::from(1u16)),
        el(tags::PHOTOMETRIC_INTERPRETATION, VR::CS, "MONOCHROME2"),
        el(tags::NUMBER_OF_FRAMES, VR::IS, &frames.to_string()),
        DataElement::new(tags::ROWS, VR::US, PrimitiveValue::from(height as u16)),
        DataElement::new(tags::COLUMNS, VR::US, PrimitiveValue::from(width as u16)),
        DataElement::new(tags::BITS_ALLOCATED, VR::US, PrimitiveValue::from(8u16)),
        DataElement::new(tags::BITS_STORED, VR::US, PrimitiveValue::from(8u16)),
        DataElement::new(tags::HIGH_BIT, VR::US, PrimitiveValue::from(7u16)),
        DataElement::new(tags::PIXEL_REPRESENTATION, VR::US, PrimitiveValue::from(0u16)),
        el(tags::BURNED_IN_ANNOTATION, VR::CS, if spec.burned_in { "YES" } else { "NO" }),
        el(Tag(0x6000, 0x4000), VR::LT, "overlay comment DOE^JOHN"),
        pixel_element,
    ];
    if ts == JPEG_BASELINE {
        elements.push(el(tags::LOSSY_IMAGE_COMPRESSION, VR::CS, "01"));
    }
    let obj = InMemDicomObject::from_element_iter(elements);
    let meta = FileMetaTableBuilder::new()
        .media_storage_sop_class_uid(spec.sop_class)
        .media_storage_sop_instance_uid(SOP_UID)
        .transfer_syntax(ts)
        .implementation_class_uid("1.2.826.0.1.3680043.8.498.1")
        .source_application_entity_title("DOE_JOHN_AE")
        .build()
        .unwrap();
    let file = obj.with_exact_meta(meta);
    let mut out = Vec::new();
    file.write_all(&mut out).unwrap();
    out
}

/// A native OPT volume of `frames` real B-scans of `width` x `height`: the shared NORMAL
/// scans in turn, and a CNV one at `cnv_at` (the slice a reader must be led to).
pub fn volume_with_cnv_at(
    images: &[(std::path::PathBuf, String)],
    cnv_at: usize,
    frames: usize,
    width: u32,
    height: u32,
) -> Vec<u8> {
    let normals: Vec<&std::path::PathBuf> = images.iter().filter(|(_, l)| l == "NORMAL").map(|(p, _)| p).collect();
    let cnv = &images.iter().find(|(_, l)| l == "CNV").expect("a shared CNV scan").0;
    let frames: Vec<Vec<u8>> = (0..frames)
        .map(|i| grey_frame(if i == cnv_at { cnv } else { normals[i % normals.len()] }, width, height))
        .collect();
    build(Spec::plain(OPT_SOP_CLASS, Pixels::Native { width, height, frames }))
}

/// Grey 8-bit pixels of a real image, resized to `width` x `height`.
pub fn grey_frame(path: &std::path::Path, width: u32, height: u32) -> Vec<u8> {
    let img = image::open(path).unwrap().to_luma8();
    image::imageops::resize(&img, width, height, image::imageops::FilterType::Triangle).into_raw()
}

/// An Ophthalmic Tomography object with every module of its IOD (PS3.3 A.52.4): what a
/// real scanner exports, so that a validator judges the de-identified copy against a valid
/// original. Identity is planted in the same places as [`build`], plus the Type 1
/// attributes that the profile may only replace with a dummy (Content Date and Time,
/// Acquisition DateTime, Device Serial Number, the per-frame acquisition date-times).
pub fn opt_object(width: u32, height: u32, frames: &[Vec<u8>]) -> Vec<u8> {
    let n = frames.len();
    let code = |value: &str, scheme: &str, meaning: &str| {
        InMemDicomObject::from_element_iter([
            el(tags::CODE_VALUE, VR::SH, value),
            el(tags::CODING_SCHEME_DESIGNATOR, VR::SH, scheme),
            el(tags::CODE_MEANING, VR::LO, meaning),
        ])
    };
    let per_frame: Vec<InMemDicomObject> = (0..n)
        .map(|i| {
            let content = InMemDicomObject::from_element_iter([
                el(tags::FRAME_ACQUISITION_DATE_TIME, VR::DT, "20240101101010"),
                el(tags::FRAME_REFERENCE_DATE_TIME, VR::DT, "20240101101010"),
                DataElement::new(tags::FRAME_ACQUISITION_DURATION, VR::FD, PrimitiveValue::F64(vec![10.0].into())),
                DataElement::new(tags::DIMENSION_INDEX_VALUES, VR::UL, PrimitiveValue::from(i as u32 + 1)),
            ]);
            let position = InMemDicomObject::from_element_iter([el(
                tags::IMAGE_POSITION_PATIENT,
                VR::DS,
                &format!("0\\{}\\0", i),
            )]);
            InMemDicomObject::from_element_iter([
                seq(tags::FRAME_CONTENT_SEQUENCE, vec![content]),
                seq(tags::PLANE_POSITION_SEQUENCE, vec![position]),
            ])
        })
        .collect();
    let frame_anatomy = InMemDicomObject::from_element_iter([
        seq(tags::ANATOMIC_REGION_SEQUENCE, vec![code("81745001", "SCT", "Eye")]),
        el(tags::FRAME_LATERALITY, VR::CS, "R"),
    ]);
    let shared = InMemDicomObject::from_element_iter([
        seq(tags::FRAME_ANATOMY_SEQUENCE, vec![frame_anatomy]),
        seq(
            tags::PIXEL_MEASURES_SEQUENCE,
            vec![InMemDicomObject::from_element_iter([
                el(tags::PIXEL_SPACING, VR::DS, "0.01\\0.01"),
                el(tags::SLICE_THICKNESS, VR::DS, "0.1"),
            ])],
        ),
        seq(
            tags::PLANE_ORIENTATION_SEQUENCE,
            vec![InMemDicomObject::from_element_iter([el(
                tags::IMAGE_ORIENTATION_PATIENT,
                VR::DS,
                "1\\0\\0\\0\\1\\0",
            )])],
        ),
    ]);
    let dimension_uid = "1.2.826.0.1.3680043.8.498.50505";
    let mut index = InMemDicomObject::from_element_iter([el(tags::DIMENSION_ORGANIZATION_UID, VR::UI, dimension_uid)]);
    index.put(DataElement::new(
        tags::DIMENSION_INDEX_POINTER,
        VR::AT,
        PrimitiveValue::Tags(vec![tags::IMAGE_POSITION_PATIENT].into()),
    ));
    index.put(DataElement::new(
        tags::FUNCTIONAL_GROUP_POINTER,
        VR::AT,
        PrimitiveValue::Tags(vec![tags::PLANE_POSITION_SEQUENCE].into()),
    ));
    let nested_person = InMemDicomObject::from_element_iter([
        el(tags::PERSON_NAME, VR::PN, "DOE^JOHN"),
        el(Tag(0x0011, 0x0010), VR::LO, "ACME"),
        el(Tag(0x0011, 0x1001), VR::LO, "SECRET-PRIVATE"),
    ]);
    let mut anatomy = code("81745001", "SCT", "Eye");
    anatomy.put(seq(tags::PURPOSE_OF_REFERENCE_CODE_SEQUENCE, vec![nested_person]));
    let data: Vec<u8> = frames.concat();
    let elements = vec![
        el(tags::SPECIFIC_CHARACTER_SET, VR::CS, "ISO_IR 100"),
        el(tags::IMAGE_TYPE, VR::CS, "ORIGINAL\\PRIMARY"),
        el(tags::INSTANCE_CREATION_DATE, VR::DA, "20240101"),
        el(tags::INSTANCE_CREATION_TIME, VR::TM, "101010"),
        el(tags::SOP_CLASS_UID, VR::UI, OPT_SOP_CLASS),
        el(tags::SOP_INSTANCE_UID, VR::UI, SOP_UID),
        el(tags::STUDY_DATE, VR::DA, "20240101"),
        el(tags::SERIES_DATE, VR::DA, "20240101"),
        el(tags::CONTENT_DATE, VR::DA, "20240101"),
        el(tags::ACQUISITION_DATE_TIME, VR::DT, "20240101101010"),
        el(tags::STUDY_TIME, VR::TM, "101010"),
        el(tags::SERIES_TIME, VR::TM, "101010"),
        el(tags::CONTENT_TIME, VR::TM, "101010"),
        el(tags::ACCESSION_NUMBER, VR::SH, "ACC-99887766"),
        el(tags::MODALITY, VR::CS, "OPT"),
        el(tags::MANUFACTURER, VR::LO, "ExampleVendor"),
        el(tags::INSTITUTION_NAME, VR::LO, "St. Elsewhere"),
        el(tags::INSTITUTION_ADDRESS, VR::ST, "742 Evergreen Terrace, Springfield"),
        el(tags::REFERRING_PHYSICIAN_NAME, VR::PN, "Dr^Quincy"),
        el(tags::STATION_NAME, VR::SH, "DOE_JOHN_PC"),
        el(tags::OPERATORS_NAME, VR::PN, "Operator^Olive"),
        el(tags::MANUFACTURER_MODEL_NAME, VR::LO, "OCT-1000"),
        el(tags::PATIENT_NAME, VR::PN, "DOE^JOHN"),
        el(tags::PATIENT_ID, VR::LO, "MRN8675309"),
        el(tags::PATIENT_BIRTH_DATE, VR::DA, "19450704"),
        el(tags::PATIENT_SEX, VR::CS, "M"),
        el(tags::PATIENT_ADDRESS, VR::LO, "742 Evergreen Terrace, Springfield"),
        el(Tag(0x0009, 0x0010), VR::LO, "ACME"),
        el(Tag(0x0009, 0x1001), VR::LO, "SECRET-PRIVATE DOE^JOHN"),
        el(tags::DEVICE_SERIAL_NUMBER, VR::LO, "SN-DOE-JOHN-42"),
        el(tags::SOFTWARE_VERSIONS, VR::LO, "1.0"),
        DataElement::new(tags::ACQUISITION_DURATION, VR::FD, PrimitiveValue::F64(vec![1.5].into())),
        el(tags::ACQUISITION_NUMBER, VR::IS, "1"),
        DataElement::new(tags::CONCATENATION_FRAME_OFFSET_NUMBER, VR::UL, PrimitiveValue::from(0u32)),
        DataElement::new(tags::IN_CONCATENATION_NUMBER, VR::US, PrimitiveValue::from(1u16)),
        DataElement::new(tags::IN_CONCATENATION_TOTAL_NUMBER, VR::US, PrimitiveValue::from(1u16)),
        DataElement::empty(tags::AXIAL_LENGTH_OF_THE_EYE, VR::FL),
        DataElement::empty(tags::HORIZONTAL_FIELD_OF_VIEW, VR::FL),
        seq(tags::REFRACTIVE_STATE_SEQUENCE, vec![]),
        DataElement::empty(tags::EMMETROPIC_MAGNIFICATION, VR::FL),
        DataElement::empty(tags::INTRA_OCULAR_PRESSURE, VR::FL),
        DataElement::empty(tags::PUPIL_DILATED, VR::CS),
        seq(
            tags::ACQUISITION_DEVICE_TYPE_CODE_SEQUENCE,
            vec![code("392012008", "SCT", "Optical Coherence Tomography Scanner")],
        ),
        seq(tags::LIGHT_PATH_FILTER_TYPE_STACK_CODE_SEQUENCE, vec![]),
        el(tags::DETECTOR_TYPE, VR::CS, "CCD"),
        el(tags::STUDY_INSTANCE_UID, VR::UI, STUDY_UID),
        el(tags::SERIES_INSTANCE_UID, VR::UI, "1.2.826.0.1.3680043.8.498.40404"),
        el(tags::STUDY_ID, VR::SH, "MRN8675309"),
        el(tags::SERIES_NUMBER, VR::IS, "1"),
        el(tags::INSTANCE_NUMBER, VR::IS, "1"),
        el(tags::PATIENT_ORIENTATION, VR::CS, ""),
        el(tags::FRAME_OF_REFERENCE_UID, VR::UI, "1.2.826.0.1.3680043.8.498.60606"),
        el(tags::POSITION_REFERENCE_INDICATOR, VR::LO, ""),
        el(tags::IMAGE_LATERALITY, VR::CS, "R"),
        seq(
            tags::DIMENSION_ORGANIZATION_SEQUENCE,
            vec![InMemDicomObject::from_element_iter([el(tags::DIMENSION_ORGANIZATION_UID, VR::UI, dimension_uid)])],
        ),
        seq(tags::DIMENSION_INDEX_SEQUENCE, vec![index]),
        DataElement::new(tags::SAMPLES_PER_PIXEL, VR::US, PrimitiveValue::from(1u16)),
        el(tags::PHOTOMETRIC_INTERPRETATION, VR::CS, "MONOCHROME2"),
        el(tags::NUMBER_OF_FRAMES, VR::IS, &n.to_string()),
        DataElement::new(tags::ROWS, VR::US, PrimitiveValue::from(height as u16)),
        DataElement::new(tags::COLUMNS, VR::US, PrimitiveValue::from(width as u16)),
        DataElement::new(tags::BITS_ALLOCATED, VR::US, PrimitiveValue::from(8u16)),
        DataElement::new(tags::BITS_STORED, VR::US, PrimitiveValue::from(8u16)),
        DataElement::new(tags::HIGH_BIT, VR::US, PrimitiveValue::from(7u16)),
        DataElement::new(tags::PIXEL_REPRESENTATION, VR::US, PrimitiveValue::from(0u16)),
        el(tags::BURNED_IN_ANNOTATION, VR::CS, "NO"),
        el(tags::PRESENTATION_LUT_SHAPE, VR::CS, "IDENTITY"),
        el(tags::LOSSY_IMAGE_COMPRESSION, VR::CS, "00"),
        seq(tags::ANATOMIC_REGION_SEQUENCE, vec![anatomy]),
        seq(tags::ACQUISITION_CONTEXT_SEQUENCE, vec![]),
        seq(tags::SHARED_FUNCTIONAL_GROUPS_SEQUENCE, vec![shared]),
        seq(tags::PER_FRAME_FUNCTIONAL_GROUPS_SEQUENCE, per_frame),
        DataElement::new(tags::PIXEL_DATA, VR::OB, PrimitiveValue::U8(data.into())),
    ];
    let obj = InMemDicomObject::from_element_iter(elements);
    let meta = FileMetaTableBuilder::new()
        .media_storage_sop_class_uid(OPT_SOP_CLASS)
        .media_storage_sop_instance_uid(SOP_UID)
        .transfer_syntax(EXPLICIT_LE)
        .implementation_class_uid("1.2.826.0.1.3680043.8.498.1")
        .build()
        .unwrap();
    let mut out = Vec::new();
    obj.with_exact_meta(meta).write_all(&mut out).unwrap();
    out
}

/// A non-OCT object of another modality with identity planted: a 16-bit CT slice, an MR
/// slice, or an RT Structure Set (no pixels at all).
pub fn other_modality(sop_class: &str, modality: &str) -> Vec<u8> {
    let mut elements = vec![
        el(tags::SPECIFIC_CHARACTER_SET, VR::CS, "ISO_IR 100"),
        el(tags::SOP_CLASS_UID, VR::UI, sop_class),
        el(tags::SOP_INSTANCE_UID, VR::UI, SOP_UID),
        el(tags::STUDY_DATE, VR::DA, "20240101"),
        el(tags::STUDY_TIME, VR::TM, "101010"),
        el(tags::ACCESSION_NUMBER, VR::SH, "ACC-99887766"),
        el(tags::MODALITY, VR::CS, modality),
        el(tags::MANUFACTURER, VR::LO, "ExampleVendor"),
        el(tags::INSTITUTION_NAME, VR::LO, "St. Elsewhere"),
        el(tags::REFERRING_PHYSICIAN_NAME, VR::PN, "Dr^Quincy"),
        el(tags::PATIENT_NAME, VR::PN, "DOE^JOHN"),
        el(tags::PATIENT_ID, VR::LO, "MRN8675309"),
        el(tags::PATIENT_BIRTH_DATE, VR::DA, "19450704"),
        el(tags::PATIENT_SEX, VR::CS, "M"),
        el(tags::PATIENT_ADDRESS, VR::LO, "742 Evergreen Terrace, Springfield"),
        el(tags::STUDY_INSTANCE_UID, VR::UI, STUDY_UID),
        el(tags::SERIES_INSTANCE_UID, VR::UI, "1.2.826.0.1.3680043.8.498.40404"),
        el(tags::STUDY_ID, VR::SH, "MRN8675309"),
        el(tags::SERIES_NUMBER, VR::IS, "1"),
        el(tags::INSTANCE_NUMBER, VR::IS, "1"),
    ];
    if modality == "RTSTRUCT" {
        let roi = InMemDicomObject::from_element_iter([
            el(tags::ROI_NUMBER, VR::IS, "1"),
            el(tags::REFERENCED_FRAME_OF_REFERENCE_UID, VR::UI, "1.2.826.0.1.3680043.8.498.60606"),
            el(tags::ROI_NAME, VR::LO, "GTV"),
            el(tags::ROI_GENERATION_ALGORITHM, VR::CS, "MANUAL"),
        ]);
        elements.push(el(tags::STRUCTURE_SET_LABEL, VR::SH, "PLAN"));
        elements.push(el(tags::STRUCTURE_SET_DATE, VR::DA, "20240101"));
        elements.push(el(tags::STRUCTURE_SET_TIME, VR::TM, "101010"));
        elements.push(seq(tags::STRUCTURE_SET_ROI_SEQUENCE, vec![roi]));
        elements.push(el(tags::OPERATORS_NAME, VR::PN, "DOE^JOHN"));
    } else {
        let (w, h) = (16u16, 16u16);
        elements.extend([
            el(tags::IMAGE_TYPE, VR::CS, "ORIGINAL\\PRIMARY\\AXIAL"),
            DataElement::new(tags::SAMPLES_PER_PIXEL, VR::US, PrimitiveValue::from(1u16)),
            el(tags::PHOTOMETRIC_INTERPRETATION, VR::CS, "MONOCHROME2"),
            DataElement::new(tags::ROWS, VR::US, PrimitiveValue::from(h)),
            DataElement::new(tags::COLUMNS, VR::US, PrimitiveValue::from(w)),
            DataElement::new(tags::BITS_ALLOCATED, VR::US, PrimitiveValue::from(16u16)),
            DataElement::new(tags::BITS_STORED, VR::US, PrimitiveValue::from(12u16)),
            DataElement::new(tags::HIGH_BIT, VR::US, PrimitiveValue::from(11u16)),
            DataElement::new(tags::PIXEL_REPRESENTATION, VR::US, PrimitiveValue::from(0u16)),
            DataElement::new(
                tags::PIXEL_DATA,
                VR::OW,
                PrimitiveValue::U16((0..(w as u32 * h as u32)).map(|v| (v * 13 % 4096) as u16).collect()),
            ),
        ]);
    }
    let obj = InMemDicomObject::from_element_iter(elements);
    let meta = FileMetaTableBuilder::new()
        .media_storage_sop_class_uid(sop_class)
        .media_storage_sop_instance_uid(SOP_UID)
        .transfer_syntax(EXPLICIT_LE)
        .implementation_class_uid("1.2.826.0.1.3680043.8.498.1")
        .build()
        .unwrap();
    let mut out = Vec::new();
    obj.with_exact_meta(meta).write_all(&mut out).unwrap();
    out
}
