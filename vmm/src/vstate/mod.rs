//! KVM state: the VM (memory slots, interrupt controllers, PIT, MSI
//! routing) and its vCPUs.

pub mod interrupts;
pub mod vcpu;
pub mod vcpu_state;
pub mod vm;
