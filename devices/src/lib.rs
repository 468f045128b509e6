//! Guest-facing device models of the Tessera VMM.
//!
//! The VMM itself only emulates the few devices that a microVM cannot do
//! without: a 16550A serial console, an i8042 controller used as the reset
//! line, and the boot-timer pseudo device. Block and network devices live in
//! their own vhost-user backend processes.
//!
//! Devices are attached to a [`Bus`] (one for port I/O, one for MMIO) that the
//! vCPU threads look up without taking a global lock.

pub mod bus;
pub mod legacy;
pub mod pseudo;

pub use bus::{Bus, BusDevice, BusError};
