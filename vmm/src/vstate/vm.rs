//! The KVM VM: guest memory slots and the in-kernel PIC, IOAPIC and PIT,
//! and their state for a snapshot; and its GSI routing table, which PCI
//! devices change for their MSI-X vectors ([`Vm::msi_router`]).

use kvm_bindings::{
    kvm_clock_data, kvm_irqchip, kvm_pit_config, kvm_pit_state2, kvm_userspace_memory_region,
    KVM_CLOCK_REALTIME, KVM_CLOCK_TSC_STABLE, KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER,
    KVM_IRQCHIP_PIC_SLAVE, KVM_MEM_LOG_DIRTY_PAGES, KVM_PIT_SPEAKER_DUMMY,
};
use std::sync::Arc;

use kvm_ioctls::{Kvm, VmFd};
use serde::{Deserialize, Serialize};
use vm_memory::{GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};
use vmm_sys_util::eventfd::EventFd;

use super::interrupts::GsiRouting;
use crate::arch::layout;

/// Errors setting up the VM.
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    #[error("cannot create the KVM VM: {0}")]
    Create(kvm_ioctls::Error),
    #[error("cannot {op}: {source}")]
    Setup {
        op: &'static str,
        source: kvm_ioctls::Error,
    },
    #[error("KVM has {available} memory slots, {needed} are needed")]
    NotEnoughSlots { needed: usize, available: usize },
    #[error("clock_realtime requested but not present in the snapshot state")]
    ClockRealtimeNotInState,
}

/// The VM-wide state KVM keeps: the PICs, the IOAPIC, the PIT and the
/// kvmclock.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct VmState {
    pub pic_master: kvm_irqchip,
    pub pic_slave: kvm_irqchip,
    pub ioapic: kvm_irqchip,
    pub pit: kvm_pit_state2,
    pub clock: kvm_clock_data,
}

/// A KVM VM with its interrupt controllers.
pub struct Vm {
    /// Shared with the routing, which vCPU threads use too.
    fd: Arc<VmFd>,
    routing: Arc<GsiRouting>,
}

fn setup_err(op: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VmError {
    move |source| VmError::Setup { op, source }
}

impl Vm {
    /// Creates the VM with an in-kernel PIC, IOAPIC, LAPICs and PIT.
    pub fn new(kvm: &Kvm) -> Result<Self, VmError> {
        let fd = kvm.create_vm().map_err(VmError::Create)?;
        fd.set_tss_address(layout::KVM_TSS_ADDRESS)
            .map_err(setup_err("set the TSS address"))?;
        fd.set_identity_map_address(layout::KVM_IDENTITY_MAP_ADDRESS)
            .map_err(setup_err("set the identity map address"))?;
        fd.create_irq_chip()
            .map_err(setup_err("create the interrupt controllers"))?;
        // The dummy speaker gives the guest port 0x61, which Linux and the
        // probe use to read the PIT channel 2 output while calibrating.
        let pit = kvm_pit_config {
            flags: KVM_PIT_SPEAKER_DUMMY,
            ..Default::default()
        };
        fd.create_pit2(pit).map_err(setup_err("create the PIT"))?;
        let fd = Arc::new(fd);
        let routing = Arc::new(GsiRouting::new(fd.clone()));
        Ok(Self { fd, routing })
    }

    /// Registers every guest memory region as a KVM memory slot.
    pub fn register_memory(
        &self,
        kvm: &Kvm,
        mem: &GuestMemoryMmap,
        track_dirty_pages: bool,
    ) -> Result<(), VmError> {
        let available = kvm.get_nr_memslots();
        if mem.num_regions() > available {
            return Err(VmError::NotEnoughSlots {
                needed: mem.num_regions(),
                available,
            });
        }
        let flags = if track_dirty_pages {
            KVM_MEM_LOG_DIRTY_PAGES
        } else {
            0
        };
        self.set_slots(mem, flags)
    }

    /// Starts KVM's dirty log on every memory slot of `mem` (registered
    /// before without it), for a live migration.
    pub fn track_dirty_pages(&self, mem: &GuestMemoryMmap) -> Result<(), VmError> {
        self.set_slots(mem, KVM_MEM_LOG_DIRTY_PAGES)
    }

    /// Sets slot `i` to region `i` of `mem`, with `flags`.
    fn set_slots(&self, mem: &GuestMemoryMmap, flags: u32) -> Result<(), VmError> {
        for (slot, region) in mem.iter().enumerate() {
            let host_addr =
                mem.get_host_address(region.start_addr())
                    .map_err(|_| VmError::Setup {
                        op: "find a memory region's host address",
                        source: kvm_ioctls::Error::new(libc::EFAULT),
                    })?;
            let memory_region = kvm_userspace_memory_region {
                slot: slot as u32,
                flags,
                guest_phys_addr: region.start_addr().0,
                memory_size: region.len(),
                userspace_addr: host_addr as u64,
            };
            // SAFETY: the region is a live mapping of `memory_size` bytes that
            // outlives the VM: the caller keeps the GuestMemoryMmap for the
            // VM's whole life, and slots never overlap (regions do not).
            unsafe { self.fd.set_user_memory_region(memory_region) }
                .map_err(setup_err("register guest memory"))?;
        }
        Ok(())
    }

    /// Routes `evt` to guest interrupt line `gsi`.
    pub fn register_irqfd(&self, evt: &EventFd, gsi: u32) -> Result<(), VmError> {
        self.fd
            .register_irqfd(evt, gsi)
            .map_err(setup_err("register an irqfd"))
    }

    /// Reads the interrupt controllers, the PIT and the clock.
    pub fn save_state(&self) -> Result<VmState, VmError> {
        let chip = |chip_id| {
            let mut chip = kvm_irqchip {
                chip_id,
                ..Default::default()
            };
            self.fd
                .get_irqchip(&mut chip)
                .map(|()| chip)
                .map_err(setup_err("read an interrupt controller"))
        };
        let mut clock = self
            .fd
            .get_clock()
            .map_err(setup_err("read the kvmclock"))?;
        // KVM_SET_CLOCK refuses this flag; KVM sets it again itself.
        clock.flags &= !KVM_CLOCK_TSC_STABLE;
        Ok(VmState {
            pic_master: chip(KVM_IRQCHIP_PIC_MASTER)?,
            pic_slave: chip(KVM_IRQCHIP_PIC_SLAVE)?,
            ioapic: chip(KVM_IRQCHIP_IOAPIC)?,
            pit: self.fd.get_pit2().map_err(setup_err("read the PIT"))?,
            clock,
        })
    }

    /// Puts saved state into this (new) VM before its vCPUs run. With
    /// `clock_realtime`, KVM moves the guest's clock on by the wall-clock
    /// time since the snapshot (KVM_CLOCK_REALTIME), as Firecracker does.
    pub fn restore_state(&self, state: &VmState, clock_realtime: bool) -> Result<(), VmError> {
        self.fd
            .set_pit2(&state.pit)
            .map_err(setup_err("set the PIT"))?;
        if clock_realtime && state.clock.flags & KVM_CLOCK_REALTIME == 0 {
            return Err(VmError::ClockRealtimeNotInState);
        }
        // The other flags describe the saving host's clock, not what to set.
        let clock = kvm_clock_data {
            flags: if clock_realtime {
                KVM_CLOCK_REALTIME
            } else {
                0
            },
            ..state.clock
        };
        self.fd
            .set_clock(&clock)
            .map_err(setup_err("set the kvmclock"))?;
        for chip in [&state.pic_master, &state.pic_slave, &state.ioapic] {
            self.fd
                .set_irqchip(chip)
                .map_err(setup_err("set an interrupt controller"))?;
        }
        Ok(())
    }

    /// The KVM VM file descriptor.
    pub fn fd(&self) -> &VmFd {
        &self.fd
    }

    /// The VM's GSI routing and irqfds, for PCI devices' MSI-X vectors
    /// (a `devices::pci::MsiRouter`). Every clone is the same table; it
    /// may be used from any thread.
    pub fn msi_router(&self) -> Arc<GsiRouting> {
        self.routing.clone()
    }
}
