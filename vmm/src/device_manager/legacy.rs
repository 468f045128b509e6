//! The legacy devices on the port I/O and MMIO buses: the
//! serial console (COM1, IRQ 4), the i8042 (IRQ 1; its reset line ends the
//! VM) and the boot timer.

use std::sync::{Arc, Mutex};

use devices::legacy::acpi_sleep::AcpiSleep;
use devices::legacy::i8042::I8042;
use devices::legacy::serial::{SerialDevice, SerialOutput};
use devices::legacy::EventFdTrigger;
use devices::pseudo::BootTimer;
use devices::{Bus, BusError};
use vmm_sys_util::eventfd::EventFd;

use crate::arch::{acpi, layout};
use crate::vstate::vm::{Vm, VmError};

/// Errors attaching devices.
#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    #[error("cannot create an eventfd for {what}: {source}")]
    EventFd {
        what: &'static str,
        source: std::io::Error,
    },
    #[error(transparent)]
    Bus(#[from] BusError),
    #[error(transparent)]
    Vm(#[from] VmError),
}

const COM1_PORT: u64 = 0x3f8;
const COM1_IRQ: u32 = 4;
const KEYBOARD_IRQ: u32 = 1;
/// The i8042's AUX (mouse) port interrupt.
const AUX_IRQ: u32 = 12;
const I8042_PORT: u64 = 0x60;
const I8042_PORT_LEN: u64 = 5;

/// The buses and the devices the main loop needs to reach.
pub struct LegacyDevices {
    pub pio_bus: Bus,
    pub mmio_bus: Bus,
    pub serial: Arc<Mutex<SerialDevice>>,
    pub i8042: Arc<Mutex<I8042>>,
    /// Fires when the guest resets the CPU through the i8042.
    pub reset_evt: EventFd,
}

fn eventfd(what: &'static str) -> Result<EventFd, DeviceError> {
    EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC)
        .map_err(|source| DeviceError::EventFd { what, source })
}

/// Creates the legacy devices and wires the serial interrupt through an irqfd.
pub fn attach_legacy_devices(
    vm: &Vm,
    serial_out: SerialOutput,
    boot_timer: Option<BootTimer>,
) -> Result<LegacyDevices, DeviceError> {
    let serial_irq = eventfd("the serial interrupt")?;
    vm.register_irqfd(&serial_irq, COM1_IRQ)?;
    let serial =
        SerialDevice::new(EventFdTrigger::new(serial_irq), serial_out).map_err(|source| {
            DeviceError::EventFd {
                what: "serial input",
                source,
            }
        })?;
    let serial = Arc::new(Mutex::new(serial));

    let reset_evt = eventfd("the i8042 reset")?;
    let reset_trigger = reset_evt
        .try_clone()
        .map_err(|source| DeviceError::EventFd {
            what: "the i8042 reset",
            source,
        })?;
    let kbd_irq = eventfd("the keyboard interrupt")?;
    vm.register_irqfd(&kbd_irq, KEYBOARD_IRQ)?;
    let aux_irq = eventfd("the AUX interrupt")?;
    vm.register_irqfd(&aux_irq, AUX_IRQ)?;
    let i8042 = Arc::new(Mutex::new(I8042::new(
        EventFdTrigger::new(reset_trigger),
        EventFdTrigger::new(kbd_irq),
        EventFdTrigger::new(aux_irq),
    )));

    let power_off = reset_evt
        .try_clone()
        .map_err(|source| DeviceError::EventFd {
            what: "the ACPI power-off",
            source,
        })?;
    let acpi_sleep = AcpiSleep::new(acpi::S5_SLEEP_TYPE, EventFdTrigger::new(power_off));

    let mut pio_bus = Bus::new();
    pio_bus.insert(serial.clone(), COM1_PORT, 8)?;
    pio_bus.insert(i8042.clone(), I8042_PORT, I8042_PORT_LEN)?;
    pio_bus.insert(Arc::new(Mutex::new(acpi_sleep)), layout::ACPI_SLEEP_PORT, 1)?;

    let mut mmio_bus = Bus::new();
    if let Some(timer) = boot_timer {
        mmio_bus.insert(
            Arc::new(Mutex::new(timer)),
            layout::BOOT_TIMER_START,
            layout::BOOT_TIMER_SIZE,
        )?;
    }
    Ok(LegacyDevices {
        pio_bus,
        mmio_bus,
        serial,
        i8042,
        reset_evt,
    })
}
