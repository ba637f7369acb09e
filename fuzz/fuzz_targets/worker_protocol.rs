//! The framed protocol between the daemon and its decoder worker, read as either side reads
//! it: a worker that went wrong must not be able to crash the daemon with its answer.
#![no_main]

use libfuzzer_sys::fuzz_target;
use octd::isolation::protocol;

fuzz_target!(|data: &[u8]| {
    let mut input = data;
    for _ in 0..4 {
        match protocol::read_frame(&mut input, 1 << 20) {
            Ok(Some(_)) => {}
            _ => break,
        }
    }
});
