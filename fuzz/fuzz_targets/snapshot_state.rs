//! A snapshot state file, as `PUT /snapshot/load` reads it before anything
//! is built: the header, length and CRC checks, then the decoding of the
//! microVM's state. The first byte picks raw bytes (the checks) or a
//! payload the target frames with a valid header and CRC (the decoder).
#![no_main]

use libfuzzer_sys::fuzz_target;
use vmm::snapshot::file::{decode, frame};
use vmm::snapshot::MicrovmState;

fuzz_target!(|bytes: &[u8]| {
    let Some((&mode, rest)) = bytes.split_first() else {
        return;
    };
    let file = if mode & 1 == 0 {
        rest.to_vec()
    } else {
        frame(rest)
    };
    let _ = decode::<MicrovmState>(&file, "fuzz");
});
