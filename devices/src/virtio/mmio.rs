//! The virtio-mmio transport (version 2, virtio 1.x): the register window a
//! guest driver programs to discover the device, negotiate features, and lay
//! out its queues. Queue notifications never reach it: each queue's
//! QueueNotify write is an ioeventfd that goes straight to the backend.
//! Accesses a driver should not make are counted ([`MmioTransport::invalid_accesses`])
//! and their log lines rate-limited.

use super::{status, ActivateError, QueueLayout, VirtioDevice};
use crate::bus::BusDevice;
use crate::guest_log;
use crate::guest_log::LogLimiter;
use vm_memory::GuestAddress;

/// Bytes of guest-physical address space one device takes.
pub const MMIO_WINDOW_SIZE: u64 = 0x1000;
/// Offset of QueueNotify, where ioeventfds are registered.
pub const NOTIFY_REG_OFFSET: u64 = 0x50;

const MAGIC_VALUE: u32 = 0x7472_6976; // "virt"
const MMIO_VERSION: u32 = 2;
const VENDOR_ID: u32 = 0x5353_4554; // "TESS"
const CONFIG_SPACE_OFFSET: u64 = 0x100;
/// InterruptStatus: used-buffer notification.
const INT_VRING: u32 = 1;
/// InterruptStatus: configuration change notification.
const INT_CONFIG: u32 = 2;

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct QueueRegs {
    size: u16,
    ready: bool,
    desc: u64,
    avail: u64,
    used: u64,
}

/// The transport's registers, for a snapshot: what the guest's driver
/// negotiated and laid out.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct MmioTransportState {
    status: u32,
    device_features_sel: u32,
    driver_features_sel: u32,
    acked_features: u64,
    queue_sel: u32,
    queues: Vec<QueueRegs>,
    config_generation: u32,
    /// A configuration change the driver has not acknowledged yet.
    config_changed: bool,
    active: bool,
}

impl MmioTransportState {
    /// Whether the driver had started the device.
    pub fn is_active(&self) -> bool {
        self.active
    }
}

/// A virtio device on the MMIO bus.
pub struct MmioTransport<D: VirtioDevice> {
    device: D,
    /// What the driver negotiated and laid out (a snapshot saves it).
    regs: MmioTransportState,
    invalid_accesses: u64,
    log_limiter: LogLimiter,
}

fn set_half(value: &mut u64, high: bool, half: u32) {
    if high {
        *value = (*value & 0xffff_ffff) | (u64::from(half) << 32);
    } else {
        *value = (*value & !0xffff_ffff) | u64::from(half);
    }
}

impl<D: VirtioDevice> MmioTransport<D> {
    /// Wraps `device`.
    pub fn new(device: D) -> Self {
        let queues = vec![QueueRegs::default(); device.queue_max_sizes().len()];
        Self {
            device,
            regs: MmioTransportState {
                status: 0,
                device_features_sel: 0,
                driver_features_sel: 0,
                acked_features: 0,
                queue_sel: 0,
                queues,
                config_generation: 0,
                config_changed: false,
                active: false,
            },
            invalid_accesses: 0,
            log_limiter: LogLimiter::new(),
        }
    }

    /// The registers, for a snapshot.
    pub fn state(&self) -> MmioTransportState {
        self.regs.clone()
    }

    /// Takes a snapshot's registers; a device the driver had started is
    /// started again with what it negotiated. A state for another number
    /// of queues, or features the device does not offer, is refused.
    pub fn restore(&mut self, state: &MmioTransportState) -> Result<(), ActivateError> {
        // A snapshot from before a device grew a queue (a network device's
        // control queue) has fewer: the rest stay as a reset left them.
        if state.queues.len() > self.regs.queues.len() {
            return Err(ActivateError::Backend(format!(
                "the snapshot has {} queue(s) for a device with {}",
                state.queues.len(),
                self.regs.queues.len()
            )));
        }
        if state.acked_features & !self.device.features() != 0 {
            return Err(ActivateError::Backend(format!(
                "the snapshot's features {:#x} are not all offered ({:#x})",
                state.acked_features,
                self.device.features()
            )));
        }
        let mut queues = self.regs.queues.clone();
        queues[..state.queues.len()].copy_from_slice(&state.queues);
        self.regs = MmioTransportState {
            active: false,
            queues,
            ..state.clone()
        };
        if state.active {
            self.activate();
            if !self.regs.active {
                return Err(ActivateError::Backend(
                    "the device did not start again with the snapshot's queues".into(),
                ));
            }
        }
        Ok(())
    }

    /// Register accesses the guest made that a driver should not: unknown
    /// registers, wrong sizes or alignment, features not offered, invalid
    /// queue sizes.
    pub fn invalid_accesses(&self) -> u64 {
        self.invalid_accesses
    }

    fn count_invalid(&mut self) {
        self.invalid_accesses += 1;
    }

    /// The wrapped device.
    /// The device's configuration changed (a drive's capacity, after its
    /// backing file was replaced): the next InterruptStatus read says so
    /// and the generation moves on. The caller raises the interrupt.
    pub fn config_changed(&mut self) {
        self.regs.config_changed = true;
        self.regs.config_generation = self.regs.config_generation.wrapping_add(1);
    }

    pub fn device(&self) -> &D {
        &self.device
    }

    /// The wrapped device, to act on it outside guest accesses.
    pub fn device_mut(&mut self) -> &mut D {
        &mut self.device
    }

    fn selected_queue(&mut self) -> Option<&mut QueueRegs> {
        if self.regs.status & status::DRIVER_OK != 0 {
            // Queue layout is frozen while the device runs.
            return None;
        }
        self.regs.queues.get_mut(self.regs.queue_sel as usize)
    }

    fn reset(&mut self) {
        if self.regs.active {
            self.device.reset();
            self.regs.active = false;
        }
        self.regs.status = 0;
        self.regs.acked_features = 0;
        self.regs.device_features_sel = 0;
        self.regs.driver_features_sel = 0;
        self.regs.queue_sel = 0;
        for q in &mut self.regs.queues {
            *q = QueueRegs::default();
        }
    }

    fn write_status(&mut self, value: u32) {
        if value == 0 {
            self.reset();
            return;
        }
        let newly_set = value & !self.regs.status;
        if newly_set & status::FEATURES_OK != 0
            && self.regs.acked_features & !self.device.features() != 0
        {
            self.count_invalid();
            guest_log!(
                self.log_limiter,
                log::Level::Warn,
                "virtio-mmio: the driver acked features {:#x} the device does not offer",
                self.regs.acked_features & !self.device.features()
            );
            // Leave FEATURES_OK unset: the driver sees the refusal.
            self.regs.status = value & !status::FEATURES_OK;
            return;
        }
        if newly_set & status::DRIVER_OK != 0 && value & status::FEATURES_OK == 0 {
            self.count_invalid();
            guest_log!(
                self.log_limiter,
                log::Level::Warn,
                "virtio-mmio: the driver set DRIVER_OK before FEATURES_OK was accepted"
            );
            // Features were never agreed: the device does not start.
            self.regs.status = value & !status::DRIVER_OK;
            return;
        }
        self.regs.status = value;
        if newly_set & status::DRIVER_OK != 0 && !self.regs.active {
            self.activate();
        }
    }

    fn activate(&mut self) {
        let mut layouts = Vec::new();
        for (index, q) in self.regs.queues.iter().enumerate() {
            if !q.ready {
                break;
            }
            let max = self.device.queue_max_sizes()[index];
            if q.size == 0 || q.size > max || !q.size.is_power_of_two() {
                let size = q.size;
                self.count_invalid();
                guest_log!(
                    self.log_limiter,
                    log::Level::Warn,
                    "virtio-mmio: queue {index} has an invalid size {size}"
                );
                self.regs.status |= status::DEVICE_NEEDS_RESET;
                return;
            }
            layouts.push(QueueLayout {
                size: q.size,
                desc_table: GuestAddress(q.desc),
                avail_ring: GuestAddress(q.avail),
                used_ring: GuestAddress(q.used),
            });
        }
        match self.device.activate(self.regs.acked_features, &layouts) {
            Ok(()) => self.regs.active = true,
            Err(err) => {
                guest_log!(
                    self.log_limiter,
                    log::Level::Error,
                    "virtio-mmio: cannot activate the device: {err}"
                );
                self.regs.status |= status::DEVICE_NEEDS_RESET;
            }
        }
    }

    fn read_register(&mut self, offset: u64) -> u32 {
        match offset {
            0x00 => MAGIC_VALUE,
            0x04 => MMIO_VERSION,
            0x08 => self.device.device_type(),
            0x0c => VENDOR_ID,
            0x10 => match self.regs.device_features_sel {
                0 => self.device.features() as u32,
                1 => (self.device.features() >> 32) as u32,
                _ => 0,
            },
            0x34 => self
                .device
                .queue_max_sizes()
                .get(self.regs.queue_sel as usize)
                .map_or(0, |max| u32::from(*max)),
            0x44 => self
                .regs
                .queues
                .get(self.regs.queue_sel as usize)
                .map_or(0, |q| u32::from(q.ready)),
            // The backend raises the interrupt through an irqfd, so the
            // transport cannot know whether a used buffer is the cause: it
            // always says so, and the driver checks its queues.
            0x60 => {
                let vring = if self.regs.active { INT_VRING } else { 0 };
                vring
                    | if self.regs.config_changed {
                        INT_CONFIG
                    } else {
                        0
                    }
            }
            0x70 => self.regs.status,
            0xfc => self.regs.config_generation,
            _ => {
                self.count_invalid();
                guest_log!(
                    self.log_limiter,
                    log::Level::Debug,
                    "virtio-mmio: read of unknown register {offset:#x}"
                );
                0
            }
        }
    }

    fn write_register(&mut self, offset: u64, value: u32) {
        match offset {
            0x14 => self.regs.device_features_sel = value,
            0x20 => {
                // Features are fixed once FEATURES_OK is set.
                if self.regs.status & status::FEATURES_OK == 0 {
                    match self.regs.driver_features_sel {
                        0 => set_half(&mut self.regs.acked_features, false, value),
                        1 => set_half(&mut self.regs.acked_features, true, value),
                        _ => {}
                    }
                }
            }
            0x24 => self.regs.driver_features_sel = value,
            0x30 => self.regs.queue_sel = value,
            0x38 => {
                if let Some(q) = self.selected_queue() {
                    q.size = value as u16;
                }
            }
            0x44 => {
                if let Some(q) = self.selected_queue() {
                    q.ready = value == 1;
                }
            }
            // A notification that reached the VMM: the ioeventfd is not
            // registered (or the access was not 4 bytes); the backend still
            // polls the queue on its next kick.
            0x50 => guest_log!(
                self.log_limiter,
                log::Level::Debug,
                "virtio-mmio: queue notify {value} reached the VMM"
            ),
            0x64 => {
                if value & INT_CONFIG != 0 {
                    self.regs.config_changed = false;
                }
            }
            0x70 => self.write_status(value),
            0x80 | 0x84 => {
                if let Some(q) = self.selected_queue() {
                    set_half(&mut q.desc, offset == 0x84, value)
                }
            }
            0x90 | 0x94 => {
                if let Some(q) = self.selected_queue() {
                    set_half(&mut q.avail, offset == 0x94, value)
                }
            }
            0xa0 | 0xa4 => {
                if let Some(q) = self.selected_queue() {
                    set_half(&mut q.used, offset == 0xa4, value)
                }
            }
            _ => {
                self.count_invalid();
                guest_log!(
                    self.log_limiter,
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
            self.device.read_config(offset - CONFIG_SPACE_OFFSET, data);
            return;
        }
        if data.len() != 4 || !offset.is_multiple_of(4) {
            self.count_invalid();
            data.fill(0);
            return;
        }
        let value = self.read_register(offset);
        data.copy_from_slice(&value.to_le_bytes());
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset >= CONFIG_SPACE_OFFSET {
            self.device.write_config(offset - CONFIG_SPACE_OFFSET, data);
            self.regs.config_generation = self.regs.config_generation.wrapping_add(1);
            return;
        }
        match <[u8; 4]>::try_from(data) {
            Ok(bytes) if offset.is_multiple_of(4) => {
                self.write_register(offset, u32::from_le_bytes(bytes))
            }
            _ => self.count_invalid(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

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
        t.config_changed();
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
        assert_eq!(t.invalid_accesses(), 100_000);
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
