//! The model bundle reader a device runs on a downloaded archive (after its hash matched the
//! signed metadata, but a compromised signer must not be able to crash it either): bounded,
//! plain-file-only unpacking of the tar.gz and the manifest / self-test parsing.
#![no_main]

use libfuzzer_sys::fuzz_target;
use octd_bundle::archive::{self, Limits};

fuzz_target!(|data: &[u8]| {
    let Ok(dir) = tempfile::tempdir() else { return };
    let path = dir.path().join("bundle.tar.gz");
    if std::fs::write(&path, data).is_err() {
        return;
    }
    let limits = Limits { max_file_bytes: 4 << 20, max_total_bytes: 16 << 20, max_entries: 64 };
    let _ = archive::unpack(&path, &dir.path().join("out"), limits);
});
