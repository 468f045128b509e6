//! The i8042 keyboard controller, reduced to what a microVM uses it for:
//! the CPU reset command (0xfe on port 0x64) that ends the VM, and the
//! keyboard-controller presence checks Linux makes at boot.

use vm_superio::I8042Device;

use super::EventFdTrigger;
use crate::bus::BusDevice;

/// The i8042 controller on ports 0x60-0x64.
pub struct I8042 {
    inner: I8042Device<EventFdTrigger>,
}

impl I8042 {
    /// Creates the controller; `reset_evt` fires when the guest resets the CPU.
    pub fn new(reset_evt: EventFdTrigger) -> Self {
        Self {
            inner: I8042Device::new(reset_evt),
        }
    }
}

impl BusDevice for I8042 {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if let [byte] = data {
            *byte = self.inner.read(offset as u8);
        } else {
            data.fill(0);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if let [value] = data {
            if let Err(err) = self.inner.write(offset as u8, *value) {
                log::error!("i8042: cannot signal the CPU reset: {err}");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

    #[test]
    fn reset_command_fires_the_reset_event() {
        let evt = EventFd::new(EFD_NONBLOCK).unwrap();
        let mut dev = I8042::new(EventFdTrigger::new(evt.try_clone().unwrap()));
        dev.write(4, &[0x20]);
        assert!(evt.read().is_err(), "a non-reset command must not fire");
        dev.write(4, &[0xfe]);
        assert_eq!(evt.read().unwrap(), 1);
    }
}
