//! x86_64 specifics: the guest-physical memory layout, the e820 map, boot
//! structures (zero page, PVH start info, MP table) and initial vCPU state.

pub mod acpi;
pub mod boot;
pub mod cpu_features;
pub mod cpuid;
pub mod layout;
pub mod mptable;
pub mod msr;
pub mod regs;
