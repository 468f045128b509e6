//! The virtio-mmio transport under a hostile driver: any sequence of
//! register reads and writes (any offset in the window, any access size)
//! on a device with two queues. The device model checks what the transport
//! hands it: it is activated only with acked features it offered (plus the
//! transport's own), with sizes no larger than its queues', and reset
//! before it is activated again.
#![no_main]

use arbitrary::Arbitrary;
use devices::virtio::{ActivateError, QueueLayout, VirtioDevice};
use devices::virtio::{MmioTransport, MMIO_WINDOW_SIZE};
use devices::BusDevice;
use libfuzzer_sys::fuzz_target;

const QUEUE_SIZES: [u16; 2] = [256, 64];
/// VIRTIO_F_VERSION_1 and a few device bits.
const FEATURES: u64 = (1 << 32) | (1 << 9) | (1 << 1) | (1 << 29);

#[derive(Default)]
struct CheckedDevice {
    active: bool,
    config: [u8; 16],
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

    fn read_config(&mut self, offset: u64, data: &mut [u8]) {
        let at = offset as usize;
        for (i, byte) in data.iter_mut().enumerate() {
            *byte = self.config.get(at + i).copied().unwrap_or(0);
        }
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        let at = offset as usize;
        for (i, byte) in data.iter().enumerate() {
            if let Some(slot) = self.config.get_mut(at + i) {
                *slot = *byte;
            }
        }
    }

    fn activate(&mut self, acked: u64, queues: &[QueueLayout]) -> Result<(), ActivateError> {
        assert!(!self.active, "activated twice without a reset");
        assert_eq!(acked & !FEATURES, 0, "acked {acked:#x} beyond the offer");
        assert!(queues.len() <= QUEUE_SIZES.len());
        for (layout, max) in queues.iter().zip(QUEUE_SIZES) {
            assert!(layout.size <= max, "queue of {} > {max}", layout.size);
        }
        self.active = true;
        Ok(())
    }

    fn reset(&mut self) {
        self.active = false;
    }
}

#[derive(Arbitrary, Debug)]
struct Access {
    offset: u16,
    size: u8,
    write: Option<u64>,
}

fuzz_target!(|accesses: Vec<Access>| {
    let mut transport = MmioTransport::new(CheckedDevice::default());
    for access in accesses.iter().take(512) {
        let offset = u64::from(access.offset) % (MMIO_WINDOW_SIZE + 8);
        let len = [1, 2, 4, 8][usize::from(access.size % 4)];
        match access.write {
            Some(value) => transport.write(offset, &value.to_le_bytes()[..len]),
            None => {
                let mut data = [0u8; 8];
                transport.read(offset, &mut data[..len]);
            }
        }
    }
});
