//! The live migration stream as a destination reads it from its source:
//! the preamble, then messages (each length and page count checked before
//! anything is allocated, a page message's pages taken next), the `Hello`
//! configuration's JSON and the state file. The first byte picks raw bytes
//! or a stream with a valid preamble (to reach the messages).
#![no_main]

use libfuzzer_sys::fuzz_target;
use vmm::migration::stream::{read_message, read_preamble, write_preamble, Message, PAGE};
use vmm::migration::Hello;
use vmm::snapshot::file::decode;
use vmm::snapshot::MicrovmState;

fuzz_target!(|bytes: &[u8]| {
    let Some((&mode, rest)) = bytes.split_first() else {
        return;
    };
    let mut stream = Vec::new();
    if mode & 1 == 1 {
        write_preamble(&mut stream).expect("a Vec takes it");
    }
    stream.extend_from_slice(rest);
    let mut reader = stream.as_slice();
    if read_preamble(&mut reader).is_err() {
        return;
    }
    for _ in 0..64 {
        match read_message(&mut reader) {
            Ok(Message::Pages { pages, .. }) => {
                let len = (u64::from(pages) * PAGE) as usize;
                let Some(rest) = reader.get(len..) else {
                    return;
                };
                reader = rest;
            }
            Ok(Message::Hello(json)) => {
                let _ = serde_json::from_slice::<Hello>(&json);
            }
            Ok(Message::State(state)) => {
                let _ = decode::<MicrovmState>(&state, "fuzz");
            }
            Ok(_) => {}
            Err(_) => return,
        }
    }
});
