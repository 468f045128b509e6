//! MSI routing on KVM, for PCI devices (`--enable-pci`): [`GsiRouting`]
//! implements [`devices::pci::MsiRouter`].
//!
//! `KVM_SET_GSI_ROUTING` replaces KVM's whole routing table, so the VMM
//! keeps the whole table: KVM's default routes of the in-kernel interrupt
//! controllers (GSIs 0 to 23 on IOAPIC pins, 0 to 15 on the PICs too, 40
//! entries as Linux's `default_routing[]`) followed by every MSI route the
//! devices asked for. Each change commits the whole table again, under a
//! lock, so that concurrent changes (MSI-X table writes come from vCPU
//! threads) never lose one another's routes.
//!
//! A VM that never has an MSI route never commits a table: without
//! `--enable-pci` KVM keeps the default it made with the irqchip, and the
//! VMM makes no `KVM_SET_GSI_ROUTING` at all. Once MSI routes were
//! committed, removing the last one commits the defaults alone, so that no
//! stale route stays in KVM.
//!
//! Irqfds (`KVM_IRQFD`) bind an eventfd to a GSI: a write to the eventfd
//! raises the GSI's route in the kernel, without the VMM.

use std::collections::BTreeMap;
use std::io;
use std::ops::Range;
use std::sync::{Arc, Mutex, MutexGuard};

use devices::pci::{MsiMessage, MsiRouter, MSI_GSI_BASE};
use kvm_bindings::{
    kvm_irq_routing_entry, kvm_irq_routing_entry__bindgen_ty_1, kvm_irq_routing_irqchip,
    kvm_irq_routing_msi, KvmIrqRouting, KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER,
    KVM_IRQCHIP_PIC_SLAVE, KVM_IRQ_ROUTING_IRQCHIP, KVM_IRQ_ROUTING_MSI, KVM_MAX_IRQ_ROUTES,
};
use kvm_ioctls::VmFd;
use vmm_sys_util::eventfd::EventFd;

/// The IOAPIC's pins, GSIs 0 to 23.
pub const IOAPIC_PINS: u32 = 24;
/// The GSIs the two 8259 PICs serve as well, 0 to 15.
pub const PIC_PINS: u32 = 16;
/// The most entries KVM takes in a routing table, and one past the
/// highest GSI it routes.
pub const MAX_ROUTES: usize = KVM_MAX_IRQ_ROUTES;

/// Errors changing the routing table or binding an irqfd. Each becomes an
/// [`io::Error`] at the [`MsiRouter`] interface, with this as its message.
#[derive(Debug, thiserror::Error)]
pub enum RoutingError {
    #[error("the MSI route of GSI {gsi} is outside GSIs {start}..{end}, the range being replaced")]
    OutsideRange { gsi: u32, start: u32, end: u32 },
    #[error(
        "GSI {gsi} cannot take an MSI route: GSIs below {MSI_GSI_BASE} are the interrupt \
         controllers' pins"
    )]
    IrqchipGsi { gsi: u32 },
    #[error("GSI {gsi} cannot take an MSI route: KVM routes GSIs below {MAX_ROUTES} only")]
    GsiTooLarge { gsi: u32 },
    #[error("GSI {gsi} is given more than one MSI route")]
    DuplicateGsi { gsi: u32 },
    #[error("the routing table would have {entries} entries; KVM takes at most {MAX_ROUTES}")]
    TooManyRoutes { entries: usize },
    #[error("KVM refused the routing table of {entries} entries (KVM_SET_GSI_ROUTING): {source}")]
    Commit {
        entries: usize,
        source: kvm_ioctls::Error,
    },
    #[error("cannot bind an irqfd to GSI {gsi} (KVM_IRQFD): {source}")]
    RegisterIrqfd { gsi: u32, source: kvm_ioctls::Error },
    #[error("cannot unbind an irqfd from GSI {gsi} (KVM_IRQFD deassign): {source}")]
    UnregisterIrqfd { gsi: u32, source: kvm_ioctls::Error },
}

impl From<RoutingError> for io::Error {
    /// KVM's errors keep the kind of their errno (a second irqfd of the same
    /// eventfd is `ResourceBusy`, from EBUSY); a bad request is
    /// `InvalidInput`.
    fn from(err: RoutingError) -> Self {
        let kind = match &err {
            RoutingError::Commit { source, .. }
            | RoutingError::RegisterIrqfd { source, .. }
            | RoutingError::UnregisterIrqfd { source, .. } => {
                io::Error::from_raw_os_error(source.errno()).kind()
            }
            _ => io::ErrorKind::InvalidInput,
        };
        io::Error::new(kind, err)
    }
}

/// One entry of a GSI routing table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route {
    /// Pin `pin` of in-kernel interrupt controller `chip`
    /// (`KVM_IRQCHIP_PIC_MASTER`, `_PIC_SLAVE` or `_IOAPIC`).
    Irqchip { gsi: u32, chip: u32, pin: u32 },
    /// An MSI message, as a device's MSI-X table entry holds it.
    Msi { gsi: u32, msg: MsiMessage },
}

impl Route {
    /// The GSI this entry routes.
    pub fn gsi(&self) -> u32 {
        match *self {
            Route::Irqchip { gsi, .. } | Route::Msi { gsi, .. } => gsi,
        }
    }

    /// The entry as KVM takes it. MSI entries carry no flags: the device id
    /// (`KVM_MSI_VALID_DEVID`) is for ARM's ITS, not for x86.
    fn to_kvm(self) -> kvm_irq_routing_entry {
        match self {
            Route::Irqchip { gsi, chip, pin } => kvm_irq_routing_entry {
                gsi,
                type_: KVM_IRQ_ROUTING_IRQCHIP,
                u: kvm_irq_routing_entry__bindgen_ty_1 {
                    irqchip: kvm_irq_routing_irqchip { irqchip: chip, pin },
                },
                ..Default::default()
            },
            Route::Msi { gsi, msg } => kvm_irq_routing_entry {
                gsi,
                type_: KVM_IRQ_ROUTING_MSI,
                flags: 0,
                u: kvm_irq_routing_entry__bindgen_ty_1 {
                    msi: kvm_irq_routing_msi {
                        address_lo: msg.addr_lo,
                        address_hi: msg.addr_hi,
                        data: msg.data,
                        ..Default::default()
                    },
                },
                ..Default::default()
            },
        }
    }
}

/// The routes KVM sets up with the in-kernel irqchip, in its order: for
/// each GSI 0 to 15 the IOAPIC pin then the PIC pin (master for 0 to 7,
/// slave for 8 to 15, pin = GSI % 8), then IOAPIC pins 16 to 23. This is
/// Linux's `default_routing[]` (virt/kvm/irqchip.c of old,
/// arch/x86/kvm/irq_comm.c later), 40 entries.
pub fn default_routes() -> Vec<Route> {
    let mut routes = Vec::with_capacity((IOAPIC_PINS + PIC_PINS) as usize);
    for gsi in 0..IOAPIC_PINS {
        routes.push(Route::Irqchip {
            gsi,
            chip: KVM_IRQCHIP_IOAPIC,
            pin: gsi,
        });
        if gsi < PIC_PINS {
            let chip = if gsi < 8 {
                KVM_IRQCHIP_PIC_MASTER
            } else {
                KVM_IRQCHIP_PIC_SLAVE
            };
            routes.push(Route::Irqchip {
                gsi,
                chip,
                pin: gsi % 8,
            });
        }
    }
    routes
}

/// The MSI routes of a VM, by GSI; with [`default_routes`] they make the
/// whole table. Changing it makes a new value, so that a table KVM refuses
/// leaves the old one in place.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MsiRoutes {
    by_gsi: BTreeMap<u32, MsiMessage>,
}

impl MsiRoutes {
    /// These routes with every one in `gsis` replaced by `routes` (which
    /// must lie in `gsis`, above the irqchip's GSIs and below KVM's limit,
    /// one per GSI).
    pub fn replaced(
        &self,
        gsis: Range<u32>,
        routes: &[(u32, MsiMessage)],
    ) -> Result<MsiRoutes, RoutingError> {
        let mut by_gsi = self.by_gsi.clone();
        by_gsi.retain(|gsi, _| !gsis.contains(gsi));
        for &(gsi, msg) in routes {
            if gsi < MSI_GSI_BASE {
                return Err(RoutingError::IrqchipGsi { gsi });
            }
            if gsi as usize >= MAX_ROUTES {
                return Err(RoutingError::GsiTooLarge { gsi });
            }
            if !gsis.contains(&gsi) {
                return Err(RoutingError::OutsideRange {
                    gsi,
                    start: gsis.start,
                    end: gsis.end,
                });
            }
            if by_gsi.insert(gsi, msg).is_some() {
                return Err(RoutingError::DuplicateGsi { gsi });
            }
        }
        let entries = default_routes().len() + by_gsi.len();
        if entries > MAX_ROUTES {
            return Err(RoutingError::TooManyRoutes { entries });
        }
        Ok(MsiRoutes { by_gsi })
    }

    /// Whether there is no MSI route.
    pub fn is_empty(&self) -> bool {
        self.by_gsi.is_empty()
    }

    /// The MSI routes, by GSI.
    pub fn routes(&self) -> Vec<(u32, MsiMessage)> {
        self.by_gsi.iter().map(|(gsi, msg)| (*gsi, *msg)).collect()
    }

    /// The whole table: the default routes, then the MSI routes by GSI.
    pub fn table(&self) -> Vec<Route> {
        let mut table = default_routes();
        table.extend(
            self.by_gsi
                .iter()
                .map(|(&gsi, &msg)| Route::Msi { gsi, msg }),
        );
        table
    }

    /// The whole table as `KVM_SET_GSI_ROUTING` takes it.
    fn to_kvm(&self) -> Result<KvmIrqRouting, RoutingError> {
        let entries: Vec<kvm_irq_routing_entry> =
            self.table().into_iter().map(Route::to_kvm).collect();
        KvmIrqRouting::from_entries(&entries).map_err(|_| RoutingError::TooManyRoutes {
            entries: entries.len(),
        })
    }
}

/// What KVM holds, under [`GsiRouting`]'s lock.
#[derive(Debug, Default)]
struct Committed {
    /// The MSI routes of the last table KVM took.
    routes: MsiRoutes,
    /// Whether KVM holds a table of the VMM's (after the first commit), not
    /// the default it made with the irqchip.
    ours: bool,
    /// How many tables were committed.
    commits: u64,
}

/// The VM's GSI routing table in KVM and its irqfds, shared by the devices
/// (on the VMM and vCPU threads) through [`Vm::msi_router`].
///
/// [`Vm::msi_router`]: crate::vstate::vm::Vm::msi_router
#[derive(Debug)]
pub struct GsiRouting {
    vm: Arc<VmFd>,
    committed: Mutex<Committed>,
}

impl GsiRouting {
    /// The routing of the VM `vm`, whose in-kernel irqchip exists (KVM
    /// holds its default routes).
    pub fn new(vm: Arc<VmFd>) -> Self {
        Self {
            vm,
            committed: Mutex::default(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Committed> {
        // A panic under the lock leaves the last committed state, which is
        // still what KVM holds.
        self.committed.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Replaces the MSI routes in `gsis` by `routes` and commits the whole
    /// table, unless KVM holds its default table and there is still no MSI
    /// route. On an error nothing changes.
    pub fn replace_msi_routes(
        &self,
        gsis: Range<u32>,
        routes: &[(u32, MsiMessage)],
    ) -> Result<(), RoutingError> {
        let mut committed = self.lock();
        let next = committed.routes.replaced(gsis, routes)?;
        if next.is_empty() && !committed.ours {
            return Ok(());
        }
        let table = next.to_kvm()?;
        self.vm
            .set_gsi_routing(&table)
            .map_err(|source| RoutingError::Commit {
                entries: table.as_slice().len(),
                source,
            })?;
        committed.routes = next;
        committed.ours = true;
        committed.commits += 1;
        Ok(())
    }

    /// The MSI routes KVM holds, by GSI.
    pub fn msi_routes(&self) -> Vec<(u32, MsiMessage)> {
        self.lock().routes.routes()
    }

    /// How many tables were committed to KVM (none for a VM that never had
    /// an MSI route).
    pub fn commits(&self) -> u64 {
        self.lock().commits
    }

    /// Makes a write to `fd` raise `gsi` (`KVM_IRQFD`).
    pub fn bind_irqfd(&self, fd: &EventFd, gsi: u32) -> Result<(), RoutingError> {
        self.vm
            .register_irqfd(fd, gsi)
            .map_err(|source| RoutingError::RegisterIrqfd { gsi, source })
    }

    /// Undoes [`GsiRouting::bind_irqfd`].
    pub fn unbind_irqfd(&self, fd: &EventFd, gsi: u32) -> Result<(), RoutingError> {
        self.vm
            .unregister_irqfd(fd, gsi)
            .map_err(|source| RoutingError::UnregisterIrqfd { gsi, source })
    }
}

impl MsiRouter for GsiRouting {
    fn set_msi_routes(&self, gsis: Range<u32>, routes: &[(u32, MsiMessage)]) -> io::Result<()> {
        Ok(self.replace_msi_routes(gsis, routes)?)
    }

    fn register_irqfd(&self, fd: &EventFd, gsi: u32) -> io::Result<()> {
        Ok(self.bind_irqfd(fd, gsi)?)
    }

    fn unregister_irqfd(&self, fd: &EventFd, gsi: u32) -> io::Result<()> {
        Ok(self.unbind_irqfd(fd, gsi)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use devices::pci::{msi_gsi, slot_gsis, DEVICE_SLOTS};

    fn msg(data: u32) -> MsiMessage {
        MsiMessage {
            addr_lo: 0xfee0_0000,
            addr_hi: 0,
            data,
        }
    }

    #[test]
    fn the_defaults_are_kvms_40_irqchip_routes() {
        let routes = default_routes();
        assert_eq!(routes.len(), 40);
        let chip = |gsi: u32, chip: u32, pin: u32| Route::Irqchip { gsi, chip, pin };
        // KVM's order: IOAPIC then PIC for 0-15, IOAPIC alone for 16-23.
        assert_eq!(routes[0], chip(0, KVM_IRQCHIP_IOAPIC, 0));
        assert_eq!(routes[1], chip(0, KVM_IRQCHIP_PIC_MASTER, 0));
        assert_eq!(routes[14], chip(7, KVM_IRQCHIP_IOAPIC, 7));
        assert_eq!(routes[15], chip(7, KVM_IRQCHIP_PIC_MASTER, 7));
        assert_eq!(routes[16], chip(8, KVM_IRQCHIP_IOAPIC, 8));
        assert_eq!(routes[17], chip(8, KVM_IRQCHIP_PIC_SLAVE, 0));
        assert_eq!(routes[31], chip(15, KVM_IRQCHIP_PIC_SLAVE, 7));
        assert_eq!(routes[32], chip(16, KVM_IRQCHIP_IOAPIC, 16));
        assert_eq!(routes[39], chip(23, KVM_IRQCHIP_IOAPIC, 23));
        for gsi in 0..24 {
            let mut expected = vec![chip(gsi, KVM_IRQCHIP_IOAPIC, gsi)];
            if gsi < 16 {
                let pic = [KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE][gsi as usize / 8];
                expected.push(chip(gsi, pic, gsi % 8));
            }
            let got: Vec<Route> = routes.iter().filter(|r| r.gsi() == gsi).copied().collect();
            assert_eq!(got, expected, "GSI {gsi}");
        }
    }

    #[test]
    fn the_table_is_the_defaults_then_the_msi_routes_by_gsi() {
        let routes = MsiRoutes::default()
            .replaced(
                slot_gsis(2),
                &[(msi_gsi(2, 1), msg(2)), (msi_gsi(2, 0), msg(1))],
            )
            .unwrap();
        let table = routes.table();
        assert_eq!(&table[..40], default_routes().as_slice());
        assert_eq!(
            &table[40..],
            [
                Route::Msi {
                    gsi: msi_gsi(2, 0),
                    msg: msg(1)
                },
                Route::Msi {
                    gsi: msi_gsi(2, 1),
                    msg: msg(2)
                },
            ]
        );
        let kvm = routes.to_kvm().unwrap();
        assert_eq!(kvm.as_fam_struct_ref().nr, 42);
        let entries = kvm.as_slice();
        assert_eq!(
            (entries[0].gsi, entries[0].type_),
            (0, KVM_IRQ_ROUTING_IRQCHIP)
        );
        let last = entries[41];
        assert_eq!(
            (last.gsi, last.type_, last.flags),
            (msi_gsi(2, 1), KVM_IRQ_ROUTING_MSI, 0)
        );
        // SAFETY: the entry was built as an MSI route (its type says so),
        // and every member of the union is plain integers.
        let msi = unsafe { last.u.msi };
        assert_eq!(
            (msi.address_lo, msi.address_hi, msi.data),
            (0xfee0_0000, 0, 2)
        );
        // SAFETY: as above, an irqchip route.
        let irqchip = unsafe { entries[1].u.irqchip };
        assert_eq!((irqchip.irqchip, irqchip.pin), (KVM_IRQCHIP_PIC_MASTER, 0));
    }

    #[test]
    fn replacing_a_slots_range_leaves_the_other_slots() {
        let routes = MsiRoutes::default()
            .replaced(
                slot_gsis(1),
                &[(msi_gsi(1, 0), msg(10)), (msi_gsi(1, 3), msg(13))],
            )
            .unwrap()
            .replaced(slot_gsis(2), &[(msi_gsi(2, 0), msg(20))])
            .unwrap();
        // Slot 1 again: vector 3 goes, vector 0 changes, vector 1 comes.
        let routes = routes
            .replaced(
                slot_gsis(1),
                &[(msi_gsi(1, 0), msg(11)), (msi_gsi(1, 1), msg(12))],
            )
            .unwrap();
        assert_eq!(
            routes.routes(),
            [
                (msi_gsi(1, 0), msg(11)),
                (msi_gsi(1, 1), msg(12)),
                (msi_gsi(2, 0), msg(20)),
            ]
        );
        // Emptying slot 1 leaves slot 2; emptying slot 2 leaves nothing.
        let routes = routes.replaced(slot_gsis(1), &[]).unwrap();
        assert_eq!(routes.routes(), [(msi_gsi(2, 0), msg(20))]);
        assert!(routes.replaced(slot_gsis(2), &[]).unwrap().is_empty());
    }

    #[test]
    fn a_bad_route_is_refused_and_changes_nothing() {
        let routes = MsiRoutes::default()
            .replaced(slot_gsis(1), &[(msi_gsi(1, 0), msg(1))])
            .unwrap();
        let err = routes
            .replaced(slot_gsis(1), &[(msi_gsi(2, 0), msg(1))])
            .unwrap_err();
        assert!(
            matches!(err, RoutingError::OutsideRange { gsi: 88, .. }),
            "{err}"
        );
        assert!(err.to_string().contains("GSI 88"), "{err}");
        let err = routes.replaced(0..100, &[(23, msg(1))]).unwrap_err();
        assert!(matches!(err, RoutingError::IrqchipGsi { gsi: 23 }), "{err}");
        let err = routes.replaced(0..5000, &[(4096, msg(1))]).unwrap_err();
        assert!(
            matches!(err, RoutingError::GsiTooLarge { gsi: 4096 }),
            "{err}"
        );
        let twice = [(msi_gsi(1, 2), msg(1)), (msi_gsi(1, 2), msg(2))];
        let err = routes.replaced(slot_gsis(1), &twice).unwrap_err();
        assert!(
            matches!(err, RoutingError::DuplicateGsi { gsi: 58 }),
            "{err}"
        );
        assert_eq!(routes.routes(), [(msi_gsi(1, 0), msg(1))]);
        // As an io::Error, the message stays.
        let io: io::Error = err.into();
        assert_eq!(io.kind(), io::ErrorKind::InvalidInput);
        assert!(io.to_string().contains("GSI 58"), "{io}");
    }

    #[test]
    fn every_slot_fits_and_kvms_limit_holds() {
        // Every vector of every slot: 31 × 32 MSI routes and the defaults.
        let mut routes = MsiRoutes::default();
        for slot in DEVICE_SLOTS {
            let all: Vec<(u32, MsiMessage)> = slot_gsis(slot).map(|gsi| (gsi, msg(gsi))).collect();
            routes = routes.replaced(slot_gsis(slot), &all).unwrap();
        }
        assert_eq!(routes.table().len(), 40 + 31 * 32);
        assert!(slot_gsis(DEVICE_SLOTS.end - 1).end as usize <= MAX_ROUTES);
        assert_eq!(routes.to_kvm().unwrap().as_slice().len(), 40 + 31 * 32);
        // Every GSI KVM routes, from 24 on, is 40 entries too many.
        let all: Vec<(u32, MsiMessage)> = (MSI_GSI_BASE..MAX_ROUTES as u32)
            .map(|gsi| (gsi, msg(gsi)))
            .collect();
        let err = MsiRoutes::default()
            .replaced(0..MAX_ROUTES as u32, &all)
            .unwrap_err();
        assert!(
            matches!(err, RoutingError::TooManyRoutes { entries: 4112 }),
            "{err}"
        );
    }

    /// The ioctl number of `_IOW(KVMIO, nr, T)`.
    fn kvm_iow<T>(nr: u32) -> u64 {
        (1 << 30) | ((std::mem::size_of::<T>() as u64) << 16) | (0xae << 8) | u64::from(nr)
    }

    /// The VMM's seccomp filters, which the binary embeds compiled.
    const SECCOMP_JSON: &str = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../resources/seccomp/tessera.json"
    );

    /// The ioctl numbers the filter of thread kind `kind` allows.
    fn allowed_ioctls(kind: &str) -> Vec<u64> {
        let json: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(SECCOMP_JSON).unwrap()).unwrap();
        json[kind]["filter"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|rule| rule["syscall"] == "ioctl")
            .flat_map(|rule| rule["args"].as_array().unwrap())
            .filter(|arg| arg["index"] == 1 && arg["op"] == "eq")
            .map(|arg| arg["val"].as_u64().unwrap())
            .collect()
    }

    #[test]
    fn the_seccomp_filters_let_vcpu_and_vmm_threads_route_msis() {
        let irqfd = kvm_iow::<kvm_bindings::kvm_irqfd>(0x76);
        let routing = kvm_iow::<kvm_bindings::kvm_irq_routing>(0x6a);
        let ioeventfd = kvm_iow::<kvm_bindings::kvm_ioeventfd>(0x79);
        assert_eq!(
            (irqfd, routing, ioeventfd),
            (0x4020_ae76, 0x4008_ae6a, 0x4040_ae79)
        );
        let vcpu = allowed_ioctls("vcpu");
        assert!(
            vcpu.contains(&irqfd) && vcpu.contains(&routing),
            "{vcpu:x?}"
        );
        let vmm = allowed_ioctls("vmm");
        for ioctl in [irqfd, routing, ioeventfd] {
            assert!(vmm.contains(&ioctl), "{ioctl:#x} not in {vmm:x?}");
        }
    }

    /// KVM, if this host has it (it must under TESSERA_STRICT).
    fn kvm() -> Option<kvm_ioctls::Kvm> {
        if !std::path::Path::new("/dev/kvm").exists() {
            assert!(
                std::env::var_os("TESSERA_STRICT").is_none(),
                "/dev/kvm is needed under TESSERA_STRICT"
            );
            eprintln!("no /dev/kvm: skipped");
            return None;
        }
        Some(kvm_ioctls::Kvm::new().expect("open /dev/kvm"))
    }

    #[test]
    fn kvm_takes_a_table_with_an_msi_route_and_an_irqfd_on_it() {
        let Some(kvm) = kvm() else { return };
        let vm = crate::vstate::vm::Vm::new(&kvm).unwrap();
        let router = vm.msi_router();
        // Nothing to route: nothing committed.
        router.set_msi_routes(slot_gsis(1), &[]).unwrap();
        assert_eq!(router.commits(), 0);

        let gsi = msi_gsi(1, 0);
        router
            .set_msi_routes(slot_gsis(1), &[(gsi, msg(0x41))])
            .unwrap();
        assert_eq!(router.commits(), 1);
        assert_eq!(router.msi_routes(), [(gsi, msg(0x41))]);

        let evt = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let dyn_router: Arc<dyn MsiRouter> = router.clone();
        dyn_router.register_irqfd(&evt, gsi).unwrap();
        // The same eventfd twice: KVM says EBUSY, and the message names the GSI.
        let err = dyn_router.register_irqfd(&evt, gsi).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::ResourceBusy, "{err}");
        assert!(err.to_string().contains("GSI 56"), "{err}");
        evt.write(1).unwrap();
        dyn_router.unregister_irqfd(&evt, gsi).unwrap();

        // The last MSI route going commits the defaults alone.
        router.set_msi_routes(slot_gsis(1), &[]).unwrap();
        assert_eq!(router.commits(), 2);
        assert!(router.msi_routes().is_empty());
        // A refused request commits nothing.
        assert!(router.set_msi_routes(slot_gsis(1), &[(5, msg(1))]).is_err());
        assert_eq!(router.commits(), 2);
    }

    #[test]
    fn confined_vcpu_and_vmm_threads_may_route_msis() {
        let Some(kvm) = kvm() else { return };
        let vm = crate::vstate::vm::Vm::new(&kvm).unwrap();
        let router = vm.msi_router();
        let filters =
            tessera_seccomp::Filters::from_json_file(std::path::Path::new(SECCOMP_JSON)).unwrap();
        // Made before the filters: a vCPU thread creates no eventfd.
        let evt = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let gsi = msi_gsi(3, 1);
        // A call the filter does not allow kills the whole test process.
        std::thread::scope(|scope| {
            scope
                .spawn(|| {
                    filters.apply("vcpu").unwrap();
                    router
                        .set_msi_routes(slot_gsis(3), &[(gsi, msg(0x42))])
                        .unwrap();
                    router.register_irqfd(&evt, gsi).unwrap();
                    router.unregister_irqfd(&evt, gsi).unwrap();
                })
                .join()
                .unwrap();
            scope
                .spawn(|| {
                    filters.apply("vmm").unwrap();
                    router.set_msi_routes(slot_gsis(3), &[]).unwrap();
                    router.register_irqfd(&evt, gsi).unwrap();
                    router.unregister_irqfd(&evt, gsi).unwrap();
                    let notify = kvm_ioctls::IoEventAddress::Mmio(0xd800_6000);
                    vm.fd()
                        .register_ioevent(&evt, &notify, kvm_ioctls::NoDatamatch)
                        .unwrap();
                    vm.fd()
                        .unregister_ioevent(&evt, &notify, kvm_ioctls::NoDatamatch)
                        .unwrap();
                })
                .join()
                .unwrap();
        });
        assert_eq!(router.commits(), 2);
    }
}
