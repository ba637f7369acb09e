//! The bounded DICOM header walk alone, under each transfer syntax (chosen by the first
//! byte): it must refuse or accept, never panic or recurse.
#![no_main]

use libfuzzer_sys::fuzz_target;

const SYNTAXES: [&str; 5] = [
    "1.2.840.10008.1.2",
    "1.2.840.10008.1.2.1",
    "1.2.840.10008.1.2.2",
    "1.2.840.10008.1.2.4.50",
    "1.2.840.10008.1.2.1.99",
];

fuzz_target!(|data: &[u8]| {
    let Some((&pick, file)) = data.split_first() else { return };
    let _ = octd::deid::walk::check(file, SYNTAXES[usize::from(pick) % SYNTAXES.len()], 1 << 24);
});
