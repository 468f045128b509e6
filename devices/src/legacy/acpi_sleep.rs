//! The ACPI sleep control register of a hardware-reduced platform (an I/O
//! port the FADT names): a guest that writes `SLP_EN` with the sleep type
//! of `_S5_` has powered off, which ends the VM as a reset does. Other
//! sleep states are not offered; reads return 0 (never "woken").

use vm_superio::Trigger;

use super::EventFdTrigger;
use crate::BusDevice;

/// `SLP_EN`.
const SLEEP_ENABLE: u8 = 1 << 5;
/// `SLP_TYP`'s bits.
const SLEEP_TYPE_SHIFT: u8 = 2;
const SLEEP_TYPE_MASK: u8 = 0b111;

/// The sleep control (and status) register.
pub struct AcpiSleep {
    /// The sleep type `_S5_` names.
    s5: u8,
    power_off: EventFdTrigger,
}

impl AcpiSleep {
    /// A register that fires `power_off` on a write of `SLP_EN` with sleep
    /// type `s5`.
    pub fn new(s5: u8, power_off: EventFdTrigger) -> Self {
        Self { s5, power_off }
    }
}

impl BusDevice for AcpiSleep {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let (0, [value]) = (offset, data) else {
            return;
        };
        let sleep_type = (value >> SLEEP_TYPE_SHIFT) & SLEEP_TYPE_MASK;
        if value & SLEEP_ENABLE != 0 && sleep_type == self.s5 {
            log::info!("the guest powered off through ACPI");
            if let Err(err) = self.power_off.trigger() {
                log::error!("ACPI power-off: {err}");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

    #[test]
    fn only_slp_en_with_the_s5_type_powers_off() {
        let evt = EventFd::new(EFD_NONBLOCK).unwrap();
        let mut sleep = AcpiSleep::new(5, EventFdTrigger::new(evt.try_clone().unwrap()));
        sleep.write(0, &[5 << 2]);
        sleep.write(0, &[(3 << 2) | SLEEP_ENABLE]);
        sleep.write(1, &[(5 << 2) | SLEEP_ENABLE]);
        sleep.write(0, &[(5 << 2) | SLEEP_ENABLE, 0]);
        assert!(evt.read().is_err(), "fired early");
        sleep.write(0, &[(5 << 2) | SLEEP_ENABLE]);
        assert_eq!(evt.read().unwrap(), 1);
        let mut data = [0xff; 2];
        sleep.read(0, &mut data);
        assert_eq!(data, [0, 0]);
    }
}
