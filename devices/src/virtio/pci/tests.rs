use std::sync::{Arc, Mutex};

use vm_memory::GuestAddress;
use vmm_sys_util::eventfd::EventFd;

use super::*;
use crate::pci::msix::tests::FakeRouter;
use crate::virtio::{status, QueueLayout};

#[derive(Default)]
struct Record {
    activated: Option<(u64, Vec<QueueLayout>)>,
    resets: usize,
}

struct FakeBlock(Arc<Mutex<Record>>);

impl VirtioDevice for FakeBlock {
    fn device_type(&self) -> u32 {
        2
    }
    fn queue_max_sizes(&self) -> &[u16] {
        &[256, 128]
    }
    fn features(&self) -> u64 {
        1 << 32 | 1 << 9
    }
    fn read_config(&mut self, offset: u64, data: &mut [u8]) {
        data.fill(offset as u8);
    }
    fn write_config(&mut self, _offset: u64, _data: &[u8]) {}
    fn activate(&mut self, acked: u64, queues: &[QueueLayout]) -> Result<(), ActivateError> {
        self.0.lock().unwrap().activated = Some((acked, queues.to_vec()));
        Ok(())
    }
    fn reset(&mut self) {
        self.0.lock().unwrap().resets += 1;
    }
}

struct Bench {
    t: PciTransport<FakeBlock>,
    record: Arc<Mutex<Record>>,
    router: Arc<FakeRouter>,
    kicks: Vec<EventFd>,
}

fn eventfds(n: usize) -> Vec<EventFd> {
    (0..n)
        .map(|_| EventFd::new(libc::EFD_NONBLOCK).unwrap())
        .collect()
}

fn bench() -> Bench {
    let record = Arc::new(Mutex::new(Record::default()));
    let router = Arc::new(FakeRouter::default());
    let kicks = eventfds(2);
    let t = PciTransport::new(
        FakeBlock(record.clone()),
        3,
        0xd810_0000,
        PciEventfds {
            kicks: kicks.iter().map(|k| k.try_clone().unwrap()).collect(),
            calls: eventfds(2),
        },
        router.clone(),
    )
    .unwrap();
    Bench {
        t,
        record,
        router,
        kicks,
    }
}

fn cfg(t: &mut PciTransport<FakeBlock>, offset: usize, len: usize) -> u32 {
    let mut data = [0u8; 4];
    t.config_read(offset, &mut data[..len]);
    u32::from_le_bytes(data)
}

fn bar(t: &mut PciTransport<FakeBlock>, offset: u64, len: usize) -> u64 {
    let mut data = [0u8; 8];
    t.bar_read(offset, &mut data[..len]);
    u64::from_le_bytes(data)
}

fn bar_w(t: &mut PciTransport<FakeBlock>, offset: u64, len: usize, value: u64) {
    t.bar_write(offset, &value.to_le_bytes()[..len]);
}

/// (offset, cfg_type, bar offset, length) of a virtio capability.
type VirtioCap = (usize, u8, u32, u32);

/// Each virtio capability, and the MSI-X capability's offset.
fn walk(t: &mut PciTransport<FakeBlock>) -> (Vec<VirtioCap>, Option<usize>) {
    let mut caps = Vec::new();
    let mut msix = None;
    let mut at = cfg(t, 0x34, 1) as usize;
    while at != 0 {
        match cfg(t, at, 1) as u8 {
            CAP_VENDOR => caps.push((
                at,
                cfg(t, at + 3, 1) as u8,
                cfg(t, at + 8, 4),
                cfg(t, at + 12, 4),
            )),
            CAP_MSIX => msix = Some(at),
            other => panic!("capability {other:#x} at {at:#x}"),
        }
        at = cfg(t, at + 1, 1) as usize;
    }
    (caps, msix)
}

#[test]
fn the_header_and_capabilities_are_those_of_a_modern_virtio_device() {
    let mut t = bench().t;
    assert_eq!(cfg(&mut t, 0, 4), 0x1042_1af4);
    assert_eq!(cfg(&mut t, 8, 4), 0x0180_0001, "mass storage, revision 1");
    assert_eq!(cfg(&mut t, 0x10, 4), 0xd810_0000);
    assert_eq!(cfg(&mut t, 0x2c, 4), 0x1042_1af4);
    assert_eq!(cfg(&mut t, 0x3d, 1), 0, "no INTx pin");
    let (caps, msix) = walk(&mut t);
    assert_eq!(
        caps,
        vec![
            (0x40, CFG_COMMON, 0, 0x38),
            (0x50, CFG_ISR, 0x2000, 1),
            (0x60, CFG_DEVICE, 0x4000, 0x1000),
            (0x70, CFG_NOTIFY, 0x6000, 0x1000),
            (0x84, CFG_PCI, 0, 0),
        ]
    );
    assert_eq!(cfg(&mut t, 0x80, 4), NOTIFY_MULTIPLIER);
    assert_eq!(msix, Some(0x98));
    assert_eq!(
        cfg(&mut t, 0x9a, 2),
        2,
        "three vectors: two queues and config"
    );
    assert_eq!(cfg(&mut t, 0x9c, 4), 0x8000);
    assert_eq!(cfg(&mut t, 0xa0, 4), 0x4_8000);
}

/// What Linux's virtio_pci_modern does, up to DRIVER_OK.
fn linux_probe(t: &mut PciTransport<FakeBlock>) {
    bar_w(t, 0x14, 1, 0);
    bar_w(t, 0x14, 1, u64::from(status::ACKNOWLEDGE | status::DRIVER));
    bar_w(t, 0x00, 4, 1);
    assert_eq!(bar(t, 0x04, 4), 1);
    bar_w(t, 0x08, 4, 0);
    bar_w(t, 0x0c, 4, 1 << 9);
    bar_w(t, 0x08, 4, 1);
    bar_w(t, 0x0c, 4, 1);
    bar_w(
        t,
        0x14,
        1,
        u64::from(status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK),
    );
    assert_ne!(bar(t, 0x14, 1) as u32 & status::FEATURES_OK, 0);
    // MSI-X on with the function masked, entries programmed, then unmasked.
    t.config_write(0x9a, &0xc000_u16.to_le_bytes());
    for v in 0..3u64 {
        bar_w(t, MSIX_TABLE + 16 * v, 4, 0xfee0_0000);
        bar_w(t, MSIX_TABLE + 16 * v + 4, 4, 0);
        bar_w(t, MSIX_TABLE + 16 * v + 8, 4, 0x40 + v);
        bar_w(t, MSIX_TABLE + 16 * v + 12, 4, 0);
    }
    t.config_write(0x9a, &0x8000_u16.to_le_bytes());
    bar_w(t, 0x10, 2, 0);
    assert_eq!(bar(t, 0x10, 2), 0);
    assert_eq!(bar(t, 0x12, 2), 2);
    for q in 0..2u64 {
        bar_w(t, 0x16, 2, q);
        assert_eq!(bar(t, 0x18, 2), [256, 128][q as usize]);
        bar_w(t, 0x18, 2, 64);
        bar_w(t, 0x1a, 2, q + 1);
        assert_eq!(bar(t, 0x1a, 2), q + 1);
        assert_eq!(bar(t, 0x1e, 2), q);
        bar_w(t, 0x20, 4, 0x1000 * (q + 1));
        bar_w(t, 0x24, 4, 0);
        bar_w(t, 0x28, 8, 0x2_0000_0000 + q);
        bar_w(t, 0x30, 4, 0x3000);
        bar_w(t, 0x1c, 2, 1);
    }
    bar_w(t, 0x14, 1, 0xf);
}

#[test]
fn a_linux_style_probe_starts_the_device_with_every_source_bound() {
    let Bench {
        mut t,
        record,
        router,
        ..
    } = bench();
    linux_probe(&mut t);
    let (acked, queues) = record.lock().unwrap().activated.clone().unwrap();
    assert_eq!(acked, 1 << 32 | 1 << 9);
    assert_eq!(queues.len(), 2);
    assert_eq!(queues[1].desc_table, GuestAddress(0x2000));
    assert_eq!(queues[1].avail_ring, GuestAddress(0x2_0000_0001));
    assert_eq!(queues[0].size, 64);
    assert_eq!(t.bound_interrupts(), 3);
    let routes = router.routes.lock().unwrap().clone();
    assert_eq!(routes.len(), 3);
    assert_eq!(routes[&crate::pci::msi_gsi(3, 2)].data, 0x42);
    // The layout is frozen while the device runs.
    bar_w(&mut t, 0x16, 2, 0);
    bar_w(&mut t, 0x18, 2, 8);
    assert_eq!(bar(&mut t, 0x18, 2), 64);
    // A reset stops it and unbinds the queues (vectors go back to none).
    bar_w(&mut t, 0x14, 1, 0);
    assert_eq!(record.lock().unwrap().resets, 1);
    assert_eq!(bar(&mut t, 0x14, 1), 0);
    assert_eq!(bar(&mut t, 0x1a, 2), u64::from(NO_VECTOR));
    assert_eq!(t.bound_interrupts(), 0);
}

#[test]
fn bad_vectors_selectors_and_accesses_are_refused_and_counted() {
    let mut t = bench().t;
    bar_w(&mut t, 0x10, 2, 3);
    assert_eq!(bar(&mut t, 0x10, 2), u64::from(NO_VECTOR), "past the table");
    bar_w(&mut t, 0x16, 2, 0xffff);
    assert_eq!(bar(&mut t, 0x18, 2), 0);
    assert_eq!(bar(&mut t, 0x1a, 2), u64::from(NO_VECTOR));
    assert_eq!(bar(&mut t, 0x1e, 2), 0);
    let before = t.core().invalid_accesses();
    bar_w(&mut t, 0x18, 2, 64); // no such queue
    bar_w(&mut t, 0x14, 2, 0xf); // wrong size
    bar_w(&mut t, 0x6000 + 4 * 1000, 2, 0); // no such queue
    bar_w(&mut t, 0x6002, 2, 0); // unaligned notify
    bar_w(&mut t, MSIX_TABLE + 3 * 16, 4, 0); // past the table
    bar_w(&mut t, MSIX_PBA, 4, 1);
    bar_w(&mut t, BAR0_SIZE - 4, 4, 1);
    assert_eq!(t.core().invalid_accesses(), before + 7);
    assert_eq!(bar(&mut t, 0x14, 1), 0, "status untouched");
    // DRIVER_OK without FEATURES_OK starts nothing.
    bar_w(
        &mut t,
        0x14,
        1,
        u64::from(status::ACKNOWLEDGE | status::DRIVER | status::DRIVER_OK),
    );
    assert!(!t.core().is_active());
}

#[test]
fn notifications_that_reach_the_vmm_are_passed_on() {
    let Bench { mut t, kicks, .. } = bench();
    bar_w(&mut t, notify_address(0, 1), 2, 1);
    assert_eq!(kicks[1].read().unwrap(), 1);
    assert!(kicks[0].read().is_err(), "only queue 1's");
    assert_eq!(notify_address(0xd800_0000, 3), 0xd800_600c);
}

#[test]
fn the_cfg_capability_reaches_bar0() {
    let Bench { mut t, kicks, .. } = bench();
    // Read num_queues (common cfg 0x12, 2 bytes) through configuration space.
    t.config_write(0x84 + 4, &[0]);
    t.config_write(0x84 + 8, &0x12u32.to_le_bytes());
    t.config_write(0x84 + 12, &2u32.to_le_bytes());
    assert_eq!(cfg(&mut t, 0x84 + 16, 4), 2);
    // Notify queue 0.
    t.config_write(0x84 + 8, &(NOTIFY as u32).to_le_bytes());
    t.config_write(0x84 + 16, &[0, 0, 0, 0]);
    assert_eq!(kicks[0].read().unwrap(), 1);
    // A length of 3, or a window past BAR0, reads zero.
    t.config_write(0x84 + 12, &3u32.to_le_bytes());
    assert_eq!(cfg(&mut t, 0x84 + 16, 4), 0);
    t.config_write(0x84 + 8, &(BAR0_SIZE as u32).to_le_bytes());
    t.config_write(0x84 + 12, &4u32.to_le_bytes());
    assert_eq!(cfg(&mut t, 0x84 + 16, 4), 0);
}

#[test]
fn a_config_change_fires_the_config_vector_and_the_isr() {
    let Bench { mut t, router, .. } = bench();
    linux_probe(&mut t);
    let generation = bar(&mut t, 0x15, 1);
    t.notify_config_change();
    assert_ne!(bar(&mut t, 0x15, 1), generation);
    assert_eq!(bar(&mut t, ISR, 1), 3);
    assert_eq!(bar(&mut t, ISR, 1), 1, "read to clear");
    assert_eq!(router.irqfds.lock().unwrap().len(), 3);
    assert_eq!(bar(&mut t, DEVICE_CFG + 8, 1), 8);
}

#[test]
fn writes_to_read_only_fields_and_bar0_do_not_stick() {
    let mut t = bench().t;
    t.config_write(0, &[0; 4]);
    t.config_write(0x10, &0xdead_bee0_u32.to_le_bytes());
    t.config_write(0x9c, &[0; 4]);
    t.config_write(0x9a, &[0xff, 0x3f]);
    assert_eq!(cfg(&mut t, 0, 4), 0x1042_1af4);
    assert_eq!(cfg(&mut t, 0x10, 4), 0xd810_0000);
    assert_eq!(cfg(&mut t, 0x9c, 4), 0x8000);
    assert_eq!(cfg(&mut t, 0x9a, 2), 2, "table size is not the guest's");
    assert_eq!(t.core().invalid_accesses(), 4);
}

#[test]
fn a_snapshot_restores_vectors_and_bindings() {
    let Bench { mut t, .. } = bench();
    linux_probe(&mut t);
    let virtio = t.core().state();
    let pci = t.pci_state();
    let Bench {
        t: mut fresh,
        record,
        router,
        ..
    } = bench();
    fresh.restore(&virtio, &pci).unwrap();
    assert_eq!(fresh.bound_interrupts(), 3);
    assert_eq!(router.routes.lock().unwrap().len(), 3);
    assert!(record.lock().unwrap().activated.is_some());
    assert_eq!(cfg(&mut fresh, 0x9a, 2), 0x8002);
    bar_w(&mut fresh, 0x16, 2, 1);
    assert_eq!(bar(&mut fresh, 0x1a, 2), 2);

    let mut moved = pci.clone();
    moved.slot = 4;
    assert!(bench().t.restore(&virtio, &moved).is_err());
    let mut hostile = pci;
    hostile.vectors = vec![0x1234; 3];
    let mut other = bench().t;
    other.restore(&virtio, &hostile).unwrap();
    assert_eq!(bar(&mut other, 0x10, 2), u64::from(NO_VECTOR));
}

#[test]
fn a_device_with_too_many_queues_or_a_bad_slot_is_refused() {
    let router: Arc<dyn MsiRouter> = Arc::new(FakeRouter::default());
    let make = |slot, kicks| {
        PciTransport::new(
            FakeBlock(Arc::default()),
            slot,
            0xd800_0000,
            PciEventfds {
                kicks: eventfds(kicks),
                calls: eventfds(2),
            },
            router.clone(),
        )
    };
    assert!(matches!(make(0, 2), Err(PciTransportError::Slot(0))));
    assert!(matches!(make(32, 2), Err(PciTransportError::Slot(32))));
    assert!(matches!(
        make(1, 1),
        Err(PciTransportError::Eventfds { .. })
    ));
    assert!(make(31, 2).is_ok());
}
