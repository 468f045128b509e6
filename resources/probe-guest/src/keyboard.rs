//! Watches the i8042 keyboard for Ctrl+Alt+Del, which the VMM sends with
//! `PUT /actions {"action_type": "SendCtrlAltDel"}`: the key presses in
//! scancode set 2, as Linux's atkbd reads them without translation.

use crate::io::inb;

const DATA_PORT: u16 = 0x60;
const STATUS_PORT: u16 = 0x64;
const STATUS_OUTPUT_FULL: u8 = 0x01;
const CTRL_ALT_DEL: [u8; 4] = [0x14, 0x11, 0xe0, 0x71];

/// Matches the Ctrl+Alt+Del byte sequence across polls.
pub struct CtrlAltDelWatch {
    matched: usize,
}

impl CtrlAltDelWatch {
    pub const fn new() -> Self {
        Self { matched: 0 }
    }

    /// Reads every waiting keyboard byte; true once the whole sequence came.
    pub fn poll(&mut self) -> bool {
        // SAFETY: reading the i8042 status port has no side effect.
        while unsafe { inb(STATUS_PORT) } & STATUS_OUTPUT_FULL != 0 {
            // SAFETY: reading the data port pops one byte from the
            // controller's buffer; nothing else in the probe reads it.
            let byte = unsafe { inb(DATA_PORT) };
            self.matched = if byte == CTRL_ALT_DEL[self.matched] {
                self.matched + 1
            } else {
                usize::from(byte == CTRL_ALT_DEL[0])
            };
            if self.matched == CTRL_ALT_DEL.len() {
                return true;
            }
        }
        false
    }
}
