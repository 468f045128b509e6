//! The 16550A serial console: guest output to stdout or a file, guest input
//! from the VMM's stdin.

mod device;
mod event_handler;

pub use device::{SerialDevice, SerialDeviceState, SerialOutput};
pub use event_handler::SerialInput;
