//! The virtio-mmio transport (version 2, virtio 1.x): the register window a
//! guest driver programs to discover the device, negotiate features, and lay
//! out its queues. Queue notifications never reach it: each queue's
//! QueueNotify write is an ioeventfd that goes straight to the backend.
//! Accesses a driver should not make are counted
//! ([`VirtioCore::invalid_accesses`]) and their log lines rate-limited.

use super::common::{VirtioCore, VirtioState};
use super::VirtioDevice;
use crate::bus::BusDevice;
use crate::guest_log;
use vmm_sys_util::eventfd::EventFd;

/// Bytes of guest-physical address space one device takes.
pub const MMIO_WINDOW_SIZE: u64 = 0x1000;
/// Offset of QueueNotify, where ioeventfds are registered.
pub const NOTIFY_REG_OFFSET: u64 = 0x50;

const MAGIC_VALUE: u32 = 0x7472_6976; // "virt"
const MMIO_VERSION: u32 = 2;
const VENDOR_ID: u32 = 0x5353_4554; // "TESS"
const CONFIG_SPACE_OFFSET: u64 = 0x100;

/// A virtio device on the MMIO bus.
pub struct MmioTransport<D: VirtioDevice> {
    core: VirtioCore<D>,
    /// What raises the slot's IRQ for a configuration change.
    config_irq: Option<EventFd>,
}

impl<D: VirtioDevice> MmioTransport<D> {
    /// Wraps `device`.
    pub fn new(device: D) -> Self {
        Self {
            core: VirtioCore::new(device, "virtio-mmio"),
            config_irq: None,
        }
    }

    /// Raises configuration changes through `irq` (an eventfd the slot's
    /// IRQ is wired to).
    pub fn with_config_irq(mut self, irq: EventFd) -> Self {
        self.config_irq = Some(irq);
        self
    }

    /// The transport-independent state.
    pub fn core(&self) -> &VirtioCore<D> {
        &self.core
    }

    /// The transport-independent state, to change it.
    pub fn core_mut(&mut self) -> &mut VirtioCore<D> {
        &mut self.core
    }

    /// The device's configuration changed: the next InterruptStatus read
    /// says so, the generation moves on and the slot's IRQ is raised.
    pub fn notify_config_change(&mut self) {
        self.core.config_changed();
        if let Some(irq) = &self.config_irq {
            if let Err(err) = irq.write(1) {
                log::error!("virtio-mmio: cannot raise a configuration change: {err}");
            }
        }
    }

    /// The registers, for a snapshot.
    pub fn state(&self) -> VirtioState {
        self.core.state()
    }

    fn read_register(&mut self, offset: u64) -> u32 {
        let core = &mut self.core;
        match offset {
            0x00 => MAGIC_VALUE,
            0x04 => MMIO_VERSION,
            0x08 => core.device().device_type(),
            0x0c => VENDOR_ID,
            0x10 => core.device_features_window(),
            0x34 => u32::from(core.selected_queue_max()),
            0x44 => core.selected_queue().map_or(0, |q| u32::from(q.ready)),
            0x60 => core.interrupt_status(),
            0x70 => core.status(),
            0xfc => core.config_generation(),
            _ => {
                core.count_invalid();
                guest_log!(
                    core.log_limiter,
                    log::Level::Debug,
                    "virtio-mmio: read of unknown register {offset:#x}"
                );
                0
            }
        }
    }

    fn write_register(&mut self, offset: u64, value: u32) {
        let core = &mut self.core;
        match offset {
            0x14 => core.select_device_features(value),
            0x20 => core.write_driver_features(value),
            0x24 => core.select_driver_features(value),
            0x30 => core.select_queue(value),
            0x38 => {
                if let Some(q) = core.selected_queue_mut() {
                    q.size = value as u16;
                }
            }
            0x44 => {
                if let Some(q) = core.selected_queue_mut() {
                    q.ready = value == 1;
                }
            }
            // A notification that reached the VMM: the ioeventfd is not
            // registered (or the access was not 4 bytes); the backend still
            // polls the queue on its next kick.
            0x50 => guest_log!(
                core.log_limiter,
                log::Level::Debug,
                "virtio-mmio: queue notify {value} reached the VMM"
            ),
            0x64 => core.acknowledge_interrupt(value),
            0x70 => core.write_status(value),
            0x80 | 0x84 => {
                if let Some(q) = core.selected_queue_mut() {
                    super::common::set_half(&mut q.desc, offset == 0x84, value)
                }
            }
            0x90 | 0x94 => {
                if let Some(q) = core.selected_queue_mut() {
                    super::common::set_half(&mut q.avail, offset == 0x94, value)
                }
            }
            0xa0 | 0xa4 => {
                if let Some(q) = core.selected_queue_mut() {
                    super::common::set_half(&mut q.used, offset == 0xa4, value)
                }
            }
            _ => {
                core.count_invalid();
                guest_log!(
                    core.log_limiter,
                    log::Level::Debug,
                    "virtio-mmio: write of unknown register {offset:#x}"
                );
            }
        }
    }
}

impl<D: VirtioDevice> BusDevice for MmioTransport<D> {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if offset >= CONFIG_SPACE_OFFSET {
            self.core.read_config(offset - CONFIG_SPACE_OFFSET, data);
            return;
        }
        if data.len() != 4 || !offset.is_multiple_of(4) {
            self.core.count_invalid();
            data.fill(0);
            return;
        }
        let value = self.read_register(offset);
        data.copy_from_slice(&value.to_le_bytes());
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset >= CONFIG_SPACE_OFFSET {
            self.core.write_config(offset - CONFIG_SPACE_OFFSET, data);
            return;
        }
        match <[u8; 4]>::try_from(data) {
            Ok(bytes) if offset.is_multiple_of(4) => {
                self.write_register(offset, u32::from_le_bytes(bytes))
            }
            _ => self.core.count_invalid(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::common::{INT_CONFIG, INT_VRING};
    use super::super::{status, QueueLayout};
    use super::*;
    use std::sync::{Arc, Mutex};
    use vm_memory::GuestAddress;

    #[derive(Default)]
    struct Record {
        activated: Option<(u64, Vec<QueueLayout>)>,
        resets: usize,
    }

    struct FakeDevice(Arc<Mutex<Record>>);

    impl VirtioDevice for FakeDevice {
        fn device_type(&self) -> u32 {
            2
        }
        fn queue_max_sizes(&self) -> &[u16] {
            &[256, 256]
        }
        fn features(&self) -> u64 {
            1 << 32 | 1 << 9
        }
        fn read_config(&mut self, offset: u64, data: &mut [u8]) {
            data.fill(offset as u8);
        }
        fn write_config(&mut self, _offset: u64, _data: &[u8]) {}
        fn activate(
            &mut self,
            acked: u64,
            queues: &[QueueLayout],
        ) -> Result<(), super::super::ActivateError> {
            self.0.lock().unwrap().activated = Some((acked, queues.to_vec()));
            Ok(())
        }
        fn reset(&mut self) {
            self.0.lock().unwrap().resets += 1;
        }
    }

    fn rd(t: &mut MmioTransport<FakeDevice>, off: u64) -> u32 {
        let mut b = [0u8; 4];
        t.read(off, &mut b);
        u32::from_le_bytes(b)
    }

    fn wr(t: &mut MmioTransport<FakeDevice>, off: u64, v: u32) {
        t.write(off, &v.to_le_bytes());
    }

    #[test]
    fn a_config_change_is_reported_until_the_driver_acknowledges_it() {
        let record = Arc::new(Mutex::new(Record::default()));
        let mut t = MmioTransport::new(FakeDevice(record));
        let generation = rd(&mut t, 0xfc);
        assert_eq!(rd(&mut t, 0x60), 0);
        t.notify_config_change();
        assert_eq!(rd(&mut t, 0x60), INT_CONFIG);
        assert_ne!(rd(&mut t, 0xfc), generation);
        wr(&mut t, 0x64, INT_VRING);
        assert_eq!(rd(&mut t, 0x60), INT_CONFIG, "only its own bit clears it");
        wr(&mut t, 0x64, INT_CONFIG);
        assert_eq!(rd(&mut t, 0x60), 0);
    }

    #[test]
    fn driver_handshake_activates_with_the_ready_queues() {
        let record = Arc::new(Mutex::new(Record::default()));
        let mut t = MmioTransport::new(FakeDevice(record.clone()));
        assert_eq!(rd(&mut t, 0x00), MAGIC_VALUE);
        assert_eq!(rd(&mut t, 0x04), 2);
        assert_eq!(rd(&mut t, 0x08), 2);
        wr(&mut t, 0x70, status::ACKNOWLEDGE | status::DRIVER);
        wr(&mut t, 0x14, 1);
        assert_eq!(rd(&mut t, 0x10), 1);
        wr(&mut t, 0x24, 1);
        wr(&mut t, 0x20, 1);
        wr(&mut t, 0x24, 0);
        wr(&mut t, 0x20, 1 << 9);
        wr(
            &mut t,
            0x70,
            status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK,
        );
        assert_ne!(rd(&mut t, 0x70) & status::FEATURES_OK, 0);
        wr(&mut t, 0x30, 0);
        assert_eq!(rd(&mut t, 0x34), 256);
        wr(&mut t, 0x38, 128);
        wr(&mut t, 0x80, 0x1000);
        wr(&mut t, 0x90, 0x2000);
        wr(&mut t, 0xa0, 0x3000);
        wr(&mut t, 0xa4, 0x1);
        wr(&mut t, 0x44, 1);
        wr(&mut t, 0x70, 0xf);
        let (acked, queues) = record.lock().unwrap().activated.clone().unwrap();
        assert_eq!(acked, 1 << 32 | 1 << 9);
        assert_eq!(queues.len(), 1, "only the ready queue");
        assert_eq!(queues[0].used_ring, GuestAddress(0x1_0000_3000));
        assert_eq!(rd(&mut t, 0x60), INT_VRING);

        // Reset stops the device and clears the layout.
        wr(&mut t, 0x70, 0);
        assert_eq!(record.lock().unwrap().resets, 1);
        assert_eq!(rd(&mut t, 0x70), 0);
        assert_eq!(rd(&mut t, 0x44), 0);
    }

    #[test]
    fn unoffered_features_and_bad_queue_sizes_are_refused() {
        let record = Arc::new(Mutex::new(Record::default()));
        let mut t = MmioTransport::new(FakeDevice(record.clone()));
        wr(&mut t, 0x20, 1 << 5); // not offered
        wr(&mut t, 0x70, status::FEATURES_OK);
        assert_eq!(rd(&mut t, 0x70) & status::FEATURES_OK, 0);

        wr(&mut t, 0x70, 0);
        wr(&mut t, 0x38, 300); // above the maximum
        wr(&mut t, 0x44, 1);
        wr(&mut t, 0x70, 0xf);
        assert!(record.lock().unwrap().activated.is_none());
        assert_ne!(rd(&mut t, 0x70) & status::DEVICE_NEEDS_RESET, 0);

        // Odd accesses are ignored, config reads go to the device.
        let mut odd = [0u8; 2];
        t.read(0x00, &mut odd);
        assert_eq!(odd, [0, 0]);
        let mut cfg = [0u8; 1];
        t.read(0x108, &mut cfg);
        assert_eq!(cfg, [8]);
    }

    #[test]
    fn driver_ok_without_accepted_features_does_not_start_the_device() {
        // Found by the virtio_mmio fuzz target: unoffered features acked,
        // FEATURES_OK skipped, DRIVER_OK set.
        let record = Arc::new(Mutex::new(Record::default()));
        let mut t = MmioTransport::new(FakeDevice(record.clone()));
        wr(&mut t, 0x20, 1 << 5); // not offered
        wr(&mut t, 0x44, 1);
        let no_features_ok = status::ACKNOWLEDGE | status::DRIVER | status::DRIVER_OK;
        wr(&mut t, 0x70, no_features_ok);
        assert!(record.lock().unwrap().activated.is_none());
        assert_eq!(rd(&mut t, 0x70) & status::DRIVER_OK, 0);
    }

    /// Keeps the lines logged about one register offset.
    struct CapturingLogger(Mutex<Vec<String>>);

    impl log::Log for CapturingLogger {
        fn enabled(&self, _: &log::Metadata) -> bool {
            true
        }
        fn log(&self, record: &log::Record) {
            let line = record.args().to_string();
            if line.contains("unknown register 0xc4") {
                self.0.lock().unwrap().push(line);
            }
        }
        fn flush(&self) {}
    }

    static LOGGER: CapturingLogger = CapturingLogger(Mutex::new(Vec::new()));

    #[test]
    fn a_flood_of_bad_writes_is_counted_and_logs_a_bounded_number_of_lines() {
        log::set_logger(&LOGGER).unwrap();
        log::set_max_level(log::LevelFilter::Trace);
        let mut t = MmioTransport::new(FakeDevice(Arc::default()));
        for _ in 0..100_000 {
            wr(&mut t, 0xc4, 1);
        }
        assert_eq!(t.core().invalid_accesses(), 100_000);
        let lines = LOGGER.0.lock().unwrap();
        // The burst, and at most one more line should the test straddle an
        // interval.
        assert!(
            (10..=12).contains(&lines.len()),
            "{} lines: {:?}",
            lines.len(),
            &lines[..lines.len().min(20)]
        );
    }
}
