//! Legacy PC devices: the 16550A serial console, the i8042 reset line and
//! the ACPI sleep control register.

pub mod acpi_sleep;
pub mod i8042;
pub mod serial;

use std::io;
use std::ops::Deref;

use vmm_sys_util::eventfd::EventFd;

/// An [`EventFd`] used as a vm-superio interrupt or reset trigger.
///
/// When the eventfd is registered as a KVM irqfd, triggering it injects the
/// interrupt without a trip through the VMM.
#[derive(Debug)]
pub struct EventFdTrigger(EventFd);

impl EventFdTrigger {
    /// Wraps `evt`.
    pub fn new(evt: EventFd) -> Self {
        Self(evt)
    }

    /// Duplicates the underlying eventfd.
    pub fn try_clone(&self) -> io::Result<Self> {
        Ok(Self(self.0.try_clone()?))
    }
}

impl vm_superio::Trigger for EventFdTrigger {
    type E = io::Error;

    fn trigger(&self) -> io::Result<()> {
        self.0.write(1)
    }
}

impl Deref for EventFdTrigger {
    type Target = EventFd;

    fn deref(&self) -> &EventFd {
        &self.0
    }
}
