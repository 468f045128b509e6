//! KVM state: the VM (memory slots, interrupt controllers, PIT) and its vCPUs.

pub mod vcpu;
pub mod vcpu_state;
pub mod vm;
