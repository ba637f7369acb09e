//! The whole de-identification of one input, as the decoder worker runs it: content
//! sniffing, the DICOM header walk, dicom-rs parsing and pixel decoding (native, RLE, JPEG,
//! JPEG 2000, deflate), the Annex E profile and re-encoding; JPEG / PNG / TIFF / BMP decoding
//! and PNG re-encoding. Any panic, abort, leak past the limits or hang is a finding.
#![no_main]

use libfuzzer_sys::fuzz_target;
use octd::deid::{Deidentifier, InputLimits};
use octd::secret::DeviceSecret;

fuzz_target!(|data: &[u8]| {
    let limits = InputLimits {
        max_file_bytes: 8 << 20,
        max_frame_pixels: 2048 * 2048,
        max_frames: 256,
        max_decoded_bytes: 64 << 20,
    };
    let deid = Deidentifier::new(DeviceSecret::from_bytes([7; 32]), Vec::new(), limits);
    let _ = deid.deidentify_bytes(data.to_vec());
});
