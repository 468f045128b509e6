//! The control messages a backend takes from its VMM (SET_CONFIG at the
//! control offset): any bytes are refused with a reason or read into a
//! message that writes back to the same bytes.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tessera_backend_control::ControlMessage;

fuzz_target!(|bytes: &[u8]| {
    if let Ok(message) = ControlMessage::decode(bytes) {
        let again = message.encode();
        assert_eq!(ControlMessage::decode(&again), Ok(message));
    }
});
