//! DICOM PS3.15 Annex E, Table E.1-1: the Basic Application Level Confidentiality Profile.
//!
//! Compound actions are resolved to the one that keeps an object valid and removes the
//! most: X/Z -> Z for Type 2 attributes of the image IODs, X otherwise; X/D, Z/D and X/Z/D
//! -> D for attributes that are Type 1 (or 1C) in an IOD octd meets (Content Date and Time,
//! Acquisition DateTime, Device Serial Number, the frame date-times, ...), since an empty or
//! missing Type 1 attribute makes the object invalid for every PACS that checks; otherwise
//! X (or Z). A D replaces only an attribute the input has, so nothing is invented. Beyond the table, octd applies rules that cover attributes the table does not
//! name (new attributes, vendor misuse), see [`action_for`].

use std::collections::HashMap;
use std::sync::LazyLock;

use dicom_core::{Tag, VR};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// X: remove the attribute.
    Remove,
    /// Z: replace with a zero-length value.
    Empty,
    /// U: replace the UID with a keyed-hash pseudonym (same input -> same output).
    Uid,
    /// Replace with a keyed-hash pseudonym of the value (PatientID).
    Pseudonym,
    /// D: replace with a fixed dummy value of the attribute's VR (see [`dummy`]). Used where
    /// the table allows D and the attribute is Type 1 (or 1C) in an IOD octd meets: a present
    /// attribute keeps the object valid, and the dummy carries nothing of the input.
    Dummy,
    /// K: keep (sequences are still cleaned item by item).
    Keep,
}

use Action::*;

#[rustfmt::skip]
const TABLE: &[(u16, u16, Action)] = &[
    (0x0002, 0x0003, Uid),    // Media Storage SOP Instance UID
    (0x0004, 0x1511, Uid),    // Referenced SOP Instance UID in File
    (0x0008, 0x0012, Remove), // Instance Creation Date
    (0x0008, 0x0013, Remove), // Instance Creation Time
    (0x0008, 0x0014, Uid),    // Instance Creator UID
    (0x0008, 0x0015, Remove), // Instance Coercion DateTime
    (0x0008, 0x0018, Uid),    // SOP Instance UID
    (0x0008, 0x0020, Empty),  // Study Date
    (0x0008, 0x0021, Remove), // Series Date
    (0x0008, 0x0022, Remove), // Acquisition Date
    (0x0008, 0x0023, Dummy),  // Content Date (Z/D; Type 1 in OPT, OP and every multi-frame functional-group IOD)
    (0x0008, 0x0024, Remove), // Overlay Date
    (0x0008, 0x0025, Remove), // Curve Date
    (0x0008, 0x002A, Dummy),  // Acquisition DateTime (X/D; Type 1 in OPT and OP)
    (0x0008, 0x0030, Empty),  // Study Time
    (0x0008, 0x0031, Remove), // Series Time
    (0x0008, 0x0032, Remove), // Acquisition Time
    (0x0008, 0x0033, Dummy),  // Content Time (Z/D; paired with Content Date)
    (0x0008, 0x0034, Remove), // Overlay Time
    (0x0008, 0x0035, Remove), // Curve Time
    (0x0008, 0x0050, Empty),  // Accession Number
    (0x0008, 0x0058, Uid),    // Failed SOP Instance UID List
    (0x0008, 0x0080, Remove), // Institution Name
    (0x0008, 0x0081, Remove), // Institution Address
    (0x0008, 0x0082, Remove), // Institution Code Sequence
    (0x0008, 0x0090, Empty),  // Referring Physician's Name
    (0x0008, 0x0092, Remove), // Referring Physician's Address
    (0x0008, 0x0094, Remove), // Referring Physician's Telephone Numbers
    (0x0008, 0x0096, Remove), // Referring Physician Identification Sequence
    (0x0008, 0x009C, Empty),  // Consulting Physician's Name
    (0x0008, 0x009D, Remove), // Consulting Physician Identification Sequence
    (0x0008, 0x0201, Remove), // Timezone Offset From UTC
    (0x0008, 0x010D, Uid),    // Context Group Extension Creator UID
    (0x0008, 0x1010, Remove), // Station Name
    (0x0008, 0x1030, Remove), // Study Description
    (0x0008, 0x103E, Remove), // Series Description
    (0x0008, 0x1040, Remove), // Institutional Department Name
    (0x0008, 0x1041, Remove), // Institutional Department Type Code Sequence
    (0x0008, 0x1048, Remove), // Physician(s) of Record
    (0x0008, 0x1049, Remove), // Physician(s) of Record Identification Sequence
    (0x0008, 0x1050, Remove), // Performing Physician's Name
    (0x0008, 0x1052, Remove), // Performing Physician Identification Sequence
    (0x0008, 0x1060, Remove), // Name of Physician(s) Reading Study
    (0x0008, 0x1062, Remove), // Physician(s) Reading Study Identification Sequence
    (0x0008, 0x1070, Remove), // Operators' Name
    (0x0008, 0x1072, Remove), // Operator Identification Sequence
    (0x0008, 0x1080, Remove), // Admitting Diagnoses Description
    (0x0008, 0x1084, Remove), // Admitting Diagnoses Code Sequence
    (0x0008, 0x1110, Remove), // Referenced Study Sequence
    (0x0008, 0x1111, Remove), // Referenced Performed Procedure Step Sequence
    (0x0008, 0x1120, Remove), // Referenced Patient Sequence
    (0x0008, 0x1155, Uid),    // Referenced SOP Instance UID
    (0x0008, 0x1195, Uid),    // Transaction UID
    (0x0008, 0x2111, Remove), // Derivation Description
    (0x0008, 0x3010, Uid),    // Irradiation Event UID
    (0x0008, 0x4000, Remove), // Identifying Comments
    (0x0008, 0x9123, Uid),    // Creator-Version UID
    (0x0010, 0x0010, Empty),  // Patient's Name
    (0x0010, 0x0020, Pseudonym), // Patient ID (Z in the table; a keyed pseudonym is a valid dummy)
    (0x0010, 0x0021, Remove), // Issuer of Patient ID
    (0x0010, 0x0030, Empty),  // Patient's Birth Date
    (0x0010, 0x0032, Remove), // Patient's Birth Time
    (0x0010, 0x0040, Empty),  // Patient's Sex
    (0x0010, 0x0050, Remove), // Patient's Insurance Plan Code Sequence
    (0x0010, 0x0101, Remove), // Patient's Primary Language Code Sequence
    (0x0010, 0x0102, Remove), // Patient's Primary Language Modifier Code Sequence
    (0x0010, 0x1000, Remove), // Other Patient IDs
    (0x0010, 0x1001, Remove), // Other Patient Names
    (0x0010, 0x1002, Remove), // Other Patient IDs Sequence
    (0x0010, 0x1005, Remove), // Patient's Birth Name
    (0x0010, 0x1010, Remove), // Patient's Age
    (0x0010, 0x1020, Remove), // Patient's Size
    (0x0010, 0x1030, Remove), // Patient's Weight
    (0x0010, 0x1040, Remove), // Patient's Address
    (0x0010, 0x1050, Remove), // Insurance Plan Identification
    (0x0010, 0x1060, Remove), // Patient's Mother's Birth Name
    (0x0010, 0x1080, Remove), // Military Rank
    (0x0010, 0x1081, Remove), // Branch of Service
    (0x0010, 0x1090, Remove), // Medical Record Locator
    (0x0010, 0x1100, Remove), // Referenced Patient Photo Sequence
    (0x0010, 0x2000, Remove), // Medical Alerts
    (0x0010, 0x2110, Remove), // Allergies
    (0x0010, 0x2150, Remove), // Country of Residence
    (0x0010, 0x2152, Remove), // Region of Residence
    (0x0010, 0x2154, Remove), // Patient's Telephone Numbers
    (0x0010, 0x2155, Remove), // Patient's Telecom Information
    (0x0010, 0x2160, Remove), // Ethnic Group
    (0x0010, 0x2180, Remove), // Occupation
    (0x0010, 0x21A0, Remove), // Smoking Status
    (0x0010, 0x21B0, Remove), // Additional Patient History
    (0x0010, 0x21C0, Remove), // Pregnancy Status
    (0x0010, 0x21D0, Remove), // Last Menstrual Date
    (0x0010, 0x21F0, Remove), // Patient's Religious Preference
    (0x0010, 0x2203, Remove), // Patient's Sex Neutered
    (0x0010, 0x2297, Remove), // Responsible Person
    (0x0010, 0x2299, Remove), // Responsible Organization
    (0x0010, 0x4000, Remove), // Patient Comments
    (0x0012, 0x0010, Remove), // Clinical Trial Sponsor Name (no trial context on the device)
    (0x0012, 0x0020, Remove), // Clinical Trial Protocol ID
    (0x0012, 0x0030, Remove), // Clinical Trial Site ID
    (0x0012, 0x0031, Remove), // Clinical Trial Site Name
    (0x0012, 0x0040, Remove), // Clinical Trial Subject ID
    (0x0012, 0x0042, Remove), // Clinical Trial Subject Reading ID
    (0x0012, 0x0050, Remove), // Clinical Trial Time Point ID
    (0x0012, 0x0051, Remove), // Clinical Trial Time Point Description
    (0x0012, 0x0060, Remove), // Clinical Trial Coordinating Center Name
    (0x0012, 0x0071, Remove), // Clinical Trial Series ID
    (0x0012, 0x0072, Remove), // Clinical Trial Series Description
    (0x0012, 0x0081, Remove), // Clinical Trial Protocol Ethics Committee Name
    (0x0012, 0x0082, Remove), // Clinical Trial Protocol Ethics Committee Approval Number
    (0x0018, 0x0010, Empty),  // Contrast/Bolus Agent
    (0x0018, 0x1000, Dummy),  // Device Serial Number (X/Z/D; Type 1 in Enhanced General Equipment)
    (0x0018, 0x1002, Uid),    // Device UID
    (0x0018, 0x1004, Remove), // Plate ID
    (0x0018, 0x1005, Remove), // Generator ID
    (0x0018, 0x1007, Remove), // Cassette ID
    (0x0018, 0x1008, Remove), // Gantry ID
    (0x0018, 0x100A, Remove), // UDI Sequence
    (0x0018, 0x1010, Remove), // Secondary Capture Device ID
    (0x0018, 0x1011, Remove), // Hardcopy Creation Device ID
    (0x0018, 0x1030, Remove), // Protocol Name
    (0x0018, 0x1200, Remove), // Date of Last Calibration
    (0x0018, 0x1201, Remove), // Time of Last Calibration
    (0x0018, 0x1400, Remove), // Acquisition Device Processing Description
    (0x0018, 0x4000, Remove), // Acquisition Comments
    (0x0018, 0x700A, Remove), // Detector ID
    (0x0018, 0x9185, Remove), // Respiratory Motion Compensation Technique Description
    (0x0018, 0x9074, Dummy),  // Frame Acquisition DateTime (X/D; Type 1C in the Frame Content macro)
    (0x0018, 0x9151, Dummy),  // Frame Reference DateTime (X/D; Type 1C in the Frame Content macro)
    (0x0018, 0x9424, Remove), // Acquisition Protocol Description
    (0x0018, 0x9516, Dummy),  // Start Acquisition DateTime (X/D; Type 1C)
    (0x0018, 0x9517, Dummy),  // End Acquisition DateTime (X/D; Type 1C)
    (0x0018, 0xA003, Remove), // Contribution Description
    (0x0020, 0x000D, Uid),    // Study Instance UID
    (0x0020, 0x000E, Uid),    // Series Instance UID
    (0x0020, 0x0010, Empty),  // Study ID
    (0x0020, 0x0052, Uid),    // Frame of Reference UID
    (0x0020, 0x0200, Uid),    // Synchronization Frame of Reference UID
    (0x0020, 0x3401, Remove), // Modifying Device ID
    (0x0020, 0x3406, Remove), // Modified Image Description
    (0x0020, 0x4000, Remove), // Image Comments
    (0x0020, 0x9158, Remove), // Frame Comments
    (0x0020, 0x9161, Uid),    // Concatenation UID
    (0x0028, 0x1199, Uid),    // Palette Color Lookup Table UID
    (0x0028, 0x1214, Uid),    // Large Palette Color Lookup Table UID
    (0x0028, 0x4000, Remove), // Image Presentation Comments
    (0x0032, 0x0012, Remove), // Study ID Issuer
    (0x0032, 0x1020, Remove), // Scheduled Study Location
    (0x0032, 0x1021, Remove), // Scheduled Study Location AE Title
    (0x0032, 0x1030, Remove), // Reason for Study
    (0x0032, 0x1032, Remove), // Requesting Physician
    (0x0032, 0x1033, Remove), // Requesting Service
    (0x0032, 0x1034, Remove), // Requesting Service Code Sequence
    (0x0032, 0x1060, Remove), // Requested Procedure Description
    (0x0032, 0x1070, Remove), // Requested Contrast Agent
    (0x0032, 0x4000, Remove), // Study Comments
    (0x0038, 0x0004, Remove), // Referenced Patient Alias Sequence
    (0x0038, 0x0010, Remove), // Admission ID
    (0x0038, 0x0011, Remove), // Issuer of Admission ID
    (0x0038, 0x0014, Remove), // Issuer of Admission ID Sequence
    (0x0038, 0x001E, Remove), // Scheduled Patient Institution Residence
    (0x0038, 0x0020, Remove), // Admitting Date
    (0x0038, 0x0021, Remove), // Admitting Time
    (0x0038, 0x0040, Remove), // Discharge Diagnosis Description
    (0x0038, 0x0050, Remove), // Special Needs
    (0x0038, 0x0060, Remove), // Service Episode ID
    (0x0038, 0x0061, Remove), // Issuer of Service Episode ID
    (0x0038, 0x0062, Remove), // Service Episode Description
    (0x0038, 0x0300, Remove), // Current Patient Location
    (0x0038, 0x0400, Remove), // Patient's Institution Residence
    (0x0038, 0x0500, Remove), // Patient State
    (0x0038, 0x4000, Remove), // Visit Comments
    (0x0040, 0x0001, Remove), // Scheduled Station AE Title
    (0x0040, 0x0002, Remove), // Scheduled Procedure Step Start Date
    (0x0040, 0x0003, Remove), // Scheduled Procedure Step Start Time
    (0x0040, 0x0004, Remove), // Scheduled Procedure Step End Date
    (0x0040, 0x0005, Remove), // Scheduled Procedure Step End Time
    (0x0040, 0x0006, Remove), // Scheduled Performing Physician's Name
    (0x0040, 0x0007, Remove), // Scheduled Procedure Step Description
    (0x0040, 0x000B, Remove), // Scheduled Performing Physician Identification Sequence
    (0x0040, 0x0010, Remove), // Scheduled Station Name
    (0x0040, 0x0011, Remove), // Scheduled Procedure Step Location
    (0x0040, 0x0012, Remove), // Pre-Medication
    (0x0040, 0x0241, Remove), // Performed Station AE Title
    (0x0040, 0x0242, Remove), // Performed Station Name
    (0x0040, 0x0243, Remove), // Performed Location
    (0x0040, 0x0244, Remove), // Performed Procedure Step Start Date
    (0x0040, 0x0245, Remove), // Performed Procedure Step Start Time
    (0x0040, 0x0248, Remove), // Performed Station Name Code Sequence
    (0x0040, 0x0250, Remove), // Performed Procedure Step End Date
    (0x0040, 0x0251, Remove), // Performed Procedure Step End Time
    (0x0040, 0x0253, Remove), // Performed Procedure Step ID
    (0x0040, 0x0254, Remove), // Performed Procedure Step Description
    (0x0040, 0x0275, Remove), // Request Attributes Sequence
    (0x0040, 0x0280, Remove), // Comments on the Performed Procedure Step
    (0x0040, 0x0310, Remove), // Comments on Radiation Dose
    (0x0040, 0x0555, Empty),  // Acquisition Context Sequence (X, but Type 2 in OPT and OP: emptied, which removes as much)
    (0x0040, 0x1001, Remove), // Requested Procedure ID
    (0x0040, 0x1004, Remove), // Patient Transport Arrangements
    (0x0040, 0x1005, Remove), // Requested Procedure Location
    (0x0040, 0x1011, Remove), // Intended Recipients of Results Identification Sequence
    (0x0040, 0x1101, Remove), // Person Identification Code Sequence
    (0x0040, 0x1102, Remove), // Person's Address
    (0x0040, 0x1103, Remove), // Person's Telephone Numbers
    (0x0040, 0x1104, Remove), // Person's Telecom Information
    (0x0040, 0x1400, Remove), // Requested Procedure Comments
    (0x0040, 0x2001, Remove), // Reason for the Imaging Service Request
    (0x0040, 0x2008, Remove), // Order Entered By
    (0x0040, 0x2009, Remove), // Order Enterer's Location
    (0x0040, 0x2010, Remove), // Order Callback Phone Number
    (0x0040, 0x2016, Empty),  // Placer Order Number / Imaging Service Request
    (0x0040, 0x2017, Empty),  // Filler Order Number / Imaging Service Request
    (0x0040, 0x2400, Remove), // Imaging Service Request Comments
    (0x0040, 0x3001, Remove), // Confidentiality Constraint on Patient Data Description
    (0x0040, 0x4023, Uid),    // Referenced General Purpose Scheduled Procedure Step Transaction UID
    (0x0040, 0x4025, Remove), // Scheduled Station Name Code Sequence
    (0x0040, 0x4027, Remove), // Scheduled Station Geographic Location Code Sequence
    (0x0040, 0x4030, Remove), // Performed Station Geographic Location Code Sequence
    (0x0040, 0x4034, Remove), // Scheduled Human Performers Sequence
    (0x0040, 0x4035, Remove), // Actual Human Performers Sequence
    (0x0040, 0x4036, Remove), // Human Performer's Organization
    (0x0040, 0x4037, Remove), // Human Performer's Name
    (0x0040, 0xA027, Remove), // Verifying Organization
    (0x0040, 0xA073, Remove), // Verifying Observer Sequence
    (0x0040, 0xA075, Dummy),  // Verifying Observer Name (D)
    (0x0040, 0xA078, Remove), // Author Observer Sequence
    (0x0040, 0xA07C, Remove), // Custodial Organization Sequence
    (0x0040, 0xA088, Empty),  // Verifying Observer Identification Code Sequence
    (0x0040, 0xA123, Dummy),  // Person Name (D)
    (0x0040, 0xA124, Uid),    // UID
    (0x0040, 0xA730, Remove), // Content Sequence
    (0x0040, 0xDB0C, Uid),    // Template Extension Organization UID
    (0x0040, 0xDB0D, Uid),    // Template Extension Creator UID
    (0x0070, 0x0001, Remove), // Graphic Annotation Sequence
    (0x0070, 0x0084, Empty),  // Content Creator's Name
    (0x0070, 0x0086, Remove), // Content Creator's Identification Code Sequence
    (0x0070, 0x031A, Uid),    // Fiducial UID
    (0x0088, 0x0140, Uid),    // Storage Media File-set UID
    (0x0088, 0x0200, Remove), // Icon Image Sequence
    (0x0088, 0x0904, Remove), // Topic Title
    (0x0088, 0x0906, Remove), // Topic Subject
    (0x0088, 0x0910, Remove), // Topic Author
    (0x0088, 0x0912, Remove), // Topic Keywords
    (0x0400, 0x0100, Remove), // Digital Signature UID
    (0x0400, 0x0402, Remove), // Referenced Digital Signature Sequence
    (0x0400, 0x0403, Remove), // Referenced SOP Instance MAC Sequence
    (0x0400, 0x0404, Remove), // MAC
    (0x0400, 0x0550, Remove), // Modified Attributes Sequence
    (0x0400, 0x0561, Remove), // Original Attributes Sequence
    (0x2030, 0x0020, Remove), // Text String
    (0x3006, 0x0024, Uid),    // Referenced Frame of Reference UID
    (0x3006, 0x00C2, Uid),    // Related Frame of Reference UID
    (0x300A, 0x0013, Uid),    // Dose Reference UID
    (0x300A, 0x0016, Remove), // Dose Reference Description
    (0x300E, 0x0008, Remove), // Reviewer Name
    (0x3010, 0x006E, Uid),    // Dosimetric Objective UID
    (0x4000, 0x0010, Remove), // Arbitrary
    (0x4000, 0x4000, Remove), // Text Comments
    (0x4008, 0x0042, Remove), // Results ID Issuer
    (0x4008, 0x0102, Remove), // Interpretation Recorder
    (0x4008, 0x010A, Remove), // Interpretation Transcriber
    (0x4008, 0x010B, Remove), // Interpretation Text
    (0x4008, 0x010C, Remove), // Interpretation Author
    (0x4008, 0x0111, Remove), // Interpretation Approver Sequence
    (0x4008, 0x0114, Remove), // Physician Approving Interpretation
    (0x4008, 0x0115, Remove), // Interpretation Diagnosis Description
    (0x4008, 0x0118, Remove), // Results Distribution List Sequence
    (0x4008, 0x0119, Remove), // Distribution Name
    (0x4008, 0x011A, Remove), // Distribution Address
    (0x4008, 0x0202, Remove), // Interpretation ID Issuer
    (0x4008, 0x0300, Remove), // Impressions
    (0x4008, 0x4000, Remove), // Results Comments
    (0xFFFA, 0xFFFA, Remove), // Digital Signatures Sequence
];

static PROFILE: LazyLock<HashMap<Tag, Action>> =
    LazyLock::new(|| TABLE.iter().map(|&(g, e, a)| (Tag(g, e), a)).collect());

/// Number of attributes the table names (for the docs and the tests).
pub fn table_len() -> usize {
    TABLE.len()
}

/// What to do with one attribute at any depth. Private attributes are dropped before
/// this is asked.
///
/// Beyond the table: curves (50xx) and overlays (60xx) go, since both can carry text;
/// any other Patient-group (0010) attribute goes; person names are emptied; dates and
/// date-times and times are emptied (this profile does not retain longitudinal information); and
/// any UID outside the DICOM standard's own root is pseudonymised.
pub fn action_for(tag: Tag, vr: VR) -> Action {
    if let Some(&action) = PROFILE.get(&tag) {
        return action;
    }
    let group = tag.group();
    if (0x5000..=0x50FF).contains(&group) || (0x6000..=0x60FF).contains(&group) {
        return Remove;
    }
    if group == 0x0010 {
        return Remove;
    }
    match vr {
        VR::PN | VR::DA | VR::DT | VR::TM => Empty,
        VR::UI => Uid,
        _ => Keep,
    }
}

/// The dummy value of a D action, by VR: a date, time or date-time that says "no date"
/// (1 January 1900, midnight), and a fixed word for text.
pub fn dummy(vr: VR) -> &'static str {
    match vr {
        VR::DA => "19000101",
        VR::TM => "000000",
        VR::DT => "19000101000000",
        VR::PN => "ANONYMOUS",
        _ => "REMOVED",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_has_no_duplicates_and_covers_key_identifiers() {
        assert_eq!(PROFILE.len(), TABLE.len(), "duplicate tag in the profile table");
        assert_eq!(action_for(Tag(0x0010, 0x0010), VR::PN), Empty);
        assert_eq!(action_for(Tag(0x0010, 0x1040), VR::LO), Remove);
        assert_eq!(action_for(Tag(0x0020, 0x000D), VR::UI), Uid);
        assert_eq!(action_for(Tag(0x0002, 0x0003), VR::UI), Uid);
        // rules beyond the table
        assert_eq!(action_for(Tag(0x0010, 0x9431), VR::FL), Remove);
        assert_eq!(action_for(Tag(0x6000, 0x3000), VR::OW), Remove);
        assert_eq!(action_for(Tag(0x0018, 0x9074), VR::DT), Dummy);
        assert_eq!(action_for(Tag(0x0018, 0x9999), VR::DT), Empty);
        assert_eq!(action_for(Tag(0x0018, 0x9998), VR::TM), Empty);
        assert_eq!(action_for(Tag(0x0008, 0x0023), VR::DA), Dummy);
        assert_eq!(action_for(Tag(0x0008, 0x002A), VR::DT), Dummy);
        assert_eq!(action_for(Tag(0x0009, 0x0010), VR::PN), Empty);
        // geometry and laterality are kept
        assert_eq!(action_for(Tag(0x0028, 0x0010), VR::US), Keep);
        assert_eq!(action_for(Tag(0x0020, 0x0062), VR::CS), Keep);
        assert_eq!(action_for(Tag(0x0028, 0x0030), VR::DS), Keep);
    }
}
