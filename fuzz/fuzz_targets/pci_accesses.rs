//! The PCI root bus and a virtio-pci function under a hostile guest: any
//! sequence of accesses (any size from 1 to 8 bytes, any offset) to the
//! 0xCF8 ports, ECAM and the BAR window. The routing fake checks what KVM
//! would be asked: routes and irqfds only in the slot's GSIs, never more
//! irqfds than the function has sources, never one bound twice. The
//! function's identity and BAR must survive every input.
#![no_main]

use std::collections::BTreeMap;
use std::io;
use std::ops::Range;
use std::os::fd::AsRawFd;
use std::sync::{Arc, Mutex};

use arbitrary::Arbitrary;
use devices::pci::{
    bar0_address, slot_gsis, MsiMessage, MsiRouter, PciBarWindow, PciConfigIo, PciEcam,
    PciSlots,
};
use devices::virtio::{
    ActivateError, PciEventfds, PciTransport, QueueLayout, VirtioDevice, VirtioTransport,
};
use devices::BusDevice;
use libfuzzer_sys::fuzz_target;
use vmm_sys_util::eventfd::EventFd;

const QUEUE_SIZES: [u16; 2] = [256, 64];
const FEATURES: u64 = (1 << 32) | (1 << 9);
const SLOT: u8 = 1;
const WINDOW: u64 = 0xd800_0000;

#[derive(Default)]
struct CheckedDevice {
    active: bool,
}

impl VirtioDevice for CheckedDevice {
    fn device_type(&self) -> u32 {
        2
    }
    fn queue_max_sizes(&self) -> &[u16] {
        &QUEUE_SIZES
    }
    fn features(&self) -> u64 {
        FEATURES
    }
    fn read_config(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0x5a);
    }
    fn write_config(&mut self, _offset: u64, _data: &[u8]) {}
    fn activate(&mut self, acked: u64, queues: &[QueueLayout]) -> Result<(), ActivateError> {
        assert!(!self.active, "activated twice without a reset");
        assert_eq!(acked & !FEATURES, 0);
        for (layout, max) in queues.iter().zip(QUEUE_SIZES) {
            assert!(layout.size <= max && layout.size.is_power_of_two());
        }
        self.active = true;
        Ok(())
    }
    fn reset(&mut self) {
        self.active = false;
    }
}

#[derive(Default)]
struct CheckedRouter {
    routes: Mutex<BTreeMap<u32, MsiMessage>>,
    irqfds: Mutex<BTreeMap<i32, u32>>,
}

impl MsiRouter for CheckedRouter {
    fn set_msi_routes(&self, gsis: Range<u32>, routes: &[(u32, MsiMessage)]) -> io::Result<()> {
        assert_eq!(gsis, slot_gsis(SLOT));
        let mut table = self.routes.lock().unwrap();
        table.retain(|gsi, _| !gsis.contains(gsi));
        for (gsi, message) in routes {
            assert!(gsis.contains(gsi));
            assert_eq!(message.addr_lo & 0xfff0_0000, 0xfee0_0000);
            table.insert(*gsi, *message);
        }
        Ok(())
    }
    fn register_irqfd(&self, fd: &EventFd, gsi: u32) -> io::Result<()> {
        assert!(slot_gsis(SLOT).contains(&gsi));
        assert!(self.routes.lock().unwrap().contains_key(&gsi), "irqfd before its route");
        let previous = self.irqfds.lock().unwrap().insert(fd.as_raw_fd(), gsi);
        assert!(previous.is_none(), "eventfd bound twice");
        assert!(self.irqfds.lock().unwrap().len() <= QUEUE_SIZES.len() + 1);
        Ok(())
    }
    fn unregister_irqfd(&self, fd: &EventFd, gsi: u32) -> io::Result<()> {
        assert_eq!(self.irqfds.lock().unwrap().remove(&fd.as_raw_fd()), Some(gsi));
        Ok(())
    }
}

#[derive(Arbitrary, Debug)]
enum Space {
    Ports,
    Ecam,
    Bars,
}

#[derive(Arbitrary, Debug)]
struct Access {
    space: Space,
    offset: u32,
    size: u8,
    write: Option<u64>,
}

fn eventfds() -> Vec<EventFd> {
    (0..QUEUE_SIZES.len())
        .map(|_| EventFd::new(libc::EFD_NONBLOCK).unwrap())
        .collect()
}

fuzz_target!(|accesses: Vec<Access>| {
    let slots = Arc::new(PciSlots::new());
    let router = Arc::new(CheckedRouter::default());
    let transport = PciTransport::new(
        CheckedDevice::default(),
        SLOT,
        bar0_address(WINDOW, SLOT) as u32,
        PciEventfds {
            kicks: eventfds(),
            calls: eventfds(),
        },
        router.clone(),
    )
    .unwrap();
    slots
        .insert(SLOT, Arc::new(Mutex::new(VirtioTransport::from(transport))))
        .unwrap();
    let mut ports = PciConfigIo::new(slots.clone());
    let mut ecam = PciEcam::new(slots.clone());
    let mut window = PciBarWindow::new(slots.clone());
    for access in accesses.iter().take(512) {
        let len = usize::from(access.size % 8) + 1;
        let (device, offset): (&mut dyn BusDevice, u64) = match access.space {
            Space::Ports => (&mut ports, u64::from(access.offset % 8)),
            Space::Ecam => (&mut ecam, u64::from(access.offset % (1 << 20))),
            Space::Bars => (&mut window, u64::from(access.offset) % (2 * 0x8_0000)),
        };
        match access.write {
            Some(value) => device.write(offset, &value.to_le_bytes()[..len]),
            None => {
                let mut data = [0u8; 8];
                device.read(offset, &mut data[..len]);
            }
        }
    }
    let mut id = [0u8; 4];
    ecam.read(u64::from(SLOT) << 15, &mut id);
    assert_eq!(u32::from_le_bytes(id), 0x1042_1af4);
    // A sizing probe the input left armed ends, as a driver ends it.
    let bar = (u64::from(SLOT) << 15) + 0x10;
    ecam.write(bar, &(bar0_address(WINDOW, SLOT) as u32).to_le_bytes());
    ecam.read(bar, &mut id);
    assert_eq!(u32::from_le_bytes(id) & !0xf, bar0_address(WINDOW, SLOT) as u32);
});
