//! Guest-facing device models of the Tessera VMM.
//!
//! The VMM itself only emulates the few devices that a microVM cannot do
//! without: a 16550A serial console, an i8042 controller used as the reset
//! line, and the boot-timer pseudo device. Block and network devices live in
//! their own vhost-user backend processes; here they have only their
//! virtio-mmio transport and the vhost-user frontend that sets the backend
//! up and then stays out of the data path.
//!
//! Devices are attached to a [`Bus`] (one for port I/O, one for MMIO) that the
//! vCPU threads look up without taking a global lock.

pub mod bus;
pub mod guest_log;
pub mod legacy;
pub mod pci;
pub mod pseudo;
pub mod vhost_user;
pub mod virtio;

pub use bus::{Bus, BusDevice, BusError};
