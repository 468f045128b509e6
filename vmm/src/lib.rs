//! The Tessera virtual machine monitor.
//!
//! One process owns the KVM VM, guest memory (a memfd) and the vCPUs; each
//! vCPU runs on its own thread, and the main thread runs an event loop
//! (event-manager) for the console, reset and vCPU-stop events. Block and
//! network devices run in separate vhost-user backend processes.
//!
//! [`builder::build_microvm`] turns [`resources::VmResources`] into a running
//! [`Vmm`]; [`Vmm::run`] drives the event loop until the guest ends.

pub mod arch;
pub mod balloon;
pub mod builder;
pub mod device_manager;
mod exit_handler;
pub mod hotplug;
pub mod logger;
pub mod memory;
pub mod metrics;
pub mod migration;
pub mod mmds;
pub mod output_file;
pub mod resources;
pub mod rpc_interface;
pub mod runtime;
pub mod snapshot;
pub mod vstate;

pub use builder::{build_microvm, BootOptions, StartMicrovmError};
pub use runtime::{RuntimeError, Vmm};

/// Process exit codes, the same values Firecracker uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum ExitCode {
    /// The guest shut down or reset.
    Ok = 0,
    /// The VMM failed while the guest ran.
    GenericError = 1,
    /// The VMM could not be started.
    UnexpectedError = 2,
    /// The configuration was rejected.
    BadConfiguration = 152,
    /// The command line was rejected.
    ArgParsing = 153,
}
