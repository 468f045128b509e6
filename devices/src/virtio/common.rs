//! What every virtio transport shares: the device status handshake, feature
//! negotiation and queue layout a driver programs, whichever register map
//! (virtio-mmio or virtio-pci) it goes through. Both transports map their
//! offsets onto [`VirtioCore`], so its hardening holds for both:
//! FEATURES_OK is refused for features the device does not offer, DRIVER_OK
//! before FEATURES_OK does not start the device, and the queue layout is
//! frozen once the device runs.

use super::{status, ActivateError, QueueLayout, VirtioDevice};
use crate::guest_log;
use crate::guest_log::LogLimiter;
use vm_memory::GuestAddress;

/// InterruptStatus (MMIO) and ISR (PCI): used-buffer notification.
pub const INT_VRING: u32 = 1;
/// InterruptStatus (MMIO) and ISR (PCI): configuration change notification.
pub const INT_CONFIG: u32 = 2;

/// One queue's layout registers.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct QueueRegs {
    pub(crate) size: u16,
    pub(crate) ready: bool,
    pub(crate) desc: u64,
    pub(crate) avail: u64,
    pub(crate) used: u64,
}

/// What the guest's driver negotiated and laid out, for a snapshot; the
/// same for both transports.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct VirtioState {
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

impl VirtioState {
    /// Whether the driver had started the device.
    pub fn is_active(&self) -> bool {
        self.active
    }

    /// How many queues the state lays out.
    pub fn queue_count(&self) -> usize {
        self.queues.len()
    }
}

/// Sets the low or high half of a 64-bit register.
pub(crate) fn set_half(value: &mut u64, high: bool, half: u32) {
    if high {
        *value = (*value & 0xffff_ffff) | (u64::from(half) << 32);
    } else {
        *value = (*value & !0xffff_ffff) | u64::from(half);
    }
}

/// A virtio device with the transport-independent state its driver sets.
pub struct VirtioCore<D: VirtioDevice> {
    device: D,
    regs: VirtioState,
    invalid_accesses: u64,
    pub(crate) log_limiter: LogLimiter,
    /// "virtio-mmio" or "virtio-pci", for log lines.
    pub(crate) transport: &'static str,
}

impl<D: VirtioDevice> VirtioCore<D> {
    /// Wraps `device` for the transport named `transport`.
    pub fn new(device: D, transport: &'static str) -> Self {
        let queues = vec![QueueRegs::default(); device.queue_max_sizes().len()];
        Self {
            device,
            regs: VirtioState {
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
            transport,
        }
    }

    /// The negotiated state, for a snapshot.
    pub fn state(&self) -> VirtioState {
        self.regs.clone()
    }

    /// Takes a snapshot's state; a device the driver had started is
    /// started again with what it negotiated. A state for more queues than
    /// the device has, or features the device does not offer, is refused.
    pub fn restore(&mut self, state: &VirtioState) -> Result<(), ActivateError> {
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
        self.regs = VirtioState {
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

    /// Accesses the guest made that a driver should not: unknown registers,
    /// wrong sizes or alignment, features not offered, invalid queue sizes.
    pub fn invalid_accesses(&self) -> u64 {
        self.invalid_accesses
    }

    pub(crate) fn count_invalid(&mut self) {
        self.invalid_accesses += 1;
    }

    /// The device's configuration changed (a drive's capacity, after its
    /// backing file was replaced): the interrupt status says so and the
    /// generation moves on. The transport raises the interrupt.
    pub fn config_changed(&mut self) {
        self.regs.config_changed = true;
        self.regs.config_generation = self.regs.config_generation.wrapping_add(1);
    }

    /// The wrapped device.
    pub fn device(&self) -> &D {
        &self.device
    }

    /// The wrapped device, to act on it outside guest accesses.
    pub fn device_mut(&mut self) -> &mut D {
        &mut self.device
    }

    /// Whether the device runs (the driver set DRIVER_OK and it started).
    pub fn is_active(&self) -> bool {
        self.regs.active
    }

    /// The device status the driver wrote (0: reset, no driver).
    pub fn status(&self) -> u32 {
        self.regs.status
    }

    pub(crate) fn config_generation(&self) -> u32 {
        self.regs.config_generation
    }

    /// The 32 feature bits the device-feature selector points at.
    pub(crate) fn device_features_window(&self) -> u32 {
        match self.regs.device_features_sel {
            0 => self.device.features() as u32,
            1 => (self.device.features() >> 32) as u32,
            _ => 0,
        }
    }

    pub(crate) fn device_features_sel(&self) -> u32 {
        self.regs.device_features_sel
    }

    pub(crate) fn select_device_features(&mut self, sel: u32) {
        self.regs.device_features_sel = sel;
    }

    pub(crate) fn driver_features_sel(&self) -> u32 {
        self.regs.driver_features_sel
    }

    pub(crate) fn select_driver_features(&mut self, sel: u32) {
        self.regs.driver_features_sel = sel;
    }

    /// The 32 acknowledged feature bits the driver-feature selector points at.
    pub(crate) fn driver_features_window(&self) -> u32 {
        match self.regs.driver_features_sel {
            0 => self.regs.acked_features as u32,
            1 => (self.regs.acked_features >> 32) as u32,
            _ => 0,
        }
    }

    /// Acknowledges the 32 feature bits the selector points at; features
    /// are fixed once FEATURES_OK is set.
    pub(crate) fn write_driver_features(&mut self, value: u32) {
        if self.regs.status & status::FEATURES_OK != 0 {
            self.count_invalid();
            return;
        }
        match self.regs.driver_features_sel {
            0 => set_half(&mut self.regs.acked_features, false, value),
            1 => set_half(&mut self.regs.acked_features, true, value),
            _ => {}
        }
    }

    pub(crate) fn queue_sel(&self) -> u32 {
        self.regs.queue_sel
    }

    pub(crate) fn select_queue(&mut self, sel: u32) {
        self.regs.queue_sel = sel;
    }

    pub(crate) fn queue_count(&self) -> usize {
        self.regs.queues.len()
    }

    /// The largest size of the selected queue (0 for no queue).
    pub(crate) fn selected_queue_max(&self) -> u16 {
        self.device
            .queue_max_sizes()
            .get(self.regs.queue_sel as usize)
            .copied()
            .unwrap_or(0)
    }

    /// The selected queue's registers, to read.
    pub(crate) fn selected_queue(&self) -> Option<&QueueRegs> {
        self.regs.queues.get(self.regs.queue_sel as usize)
    }

    /// The selected queue's registers, to write: `None` for no queue, or
    /// while the device runs (the layout is frozen then).
    pub(crate) fn selected_queue_mut(&mut self) -> Option<&mut QueueRegs> {
        if self.regs.status & status::DRIVER_OK != 0 {
            self.count_invalid();
            return None;
        }
        match self.regs.queues.get_mut(self.regs.queue_sel as usize) {
            Some(queue) => Some(queue),
            None => {
                self.invalid_accesses += 1;
                None
            }
        }
    }

    /// InterruptStatus / ISR: the backend raises queue interrupts through
    /// an irqfd, so the transport cannot know whether a used buffer is the
    /// cause: while the device runs it always says so, and the driver
    /// checks its queues.
    pub(crate) fn interrupt_status(&self) -> u32 {
        let vring = if self.regs.active { INT_VRING } else { 0 };
        vring
            | if self.regs.config_changed {
                INT_CONFIG
            } else {
                0
            }
    }

    /// The driver acknowledged the interrupt causes in `bits`.
    pub(crate) fn acknowledge_interrupt(&mut self, bits: u32) {
        if bits & INT_CONFIG != 0 {
            self.regs.config_changed = false;
        }
    }

    pub(crate) fn read_config(&mut self, offset: u64, data: &mut [u8]) {
        self.device.read_config(offset, data);
    }

    pub(crate) fn write_config(&mut self, offset: u64, data: &[u8]) {
        self.device.write_config(offset, data);
        self.regs.config_generation = self.regs.config_generation.wrapping_add(1);
    }

    /// Sets every queue's size to its largest, as a virtio-pci device
    /// presents it after a reset (the driver may write a smaller one).
    pub(crate) fn preset_queue_sizes(&mut self) {
        let max_sizes = self.device.queue_max_sizes();
        for (queue, max) in self.regs.queues.iter_mut().zip(max_sizes) {
            queue.size = *max;
        }
    }

    /// Stops the device and forgets what the driver set up.
    pub(crate) fn reset(&mut self) {
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

    /// A driver's write to the device status.
    pub(crate) fn write_status(&mut self, value: u32) {
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
                "{}: the driver acked features {:#x} the device does not offer",
                self.transport,
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
                "{}: the driver set DRIVER_OK before FEATURES_OK was accepted",
                self.transport
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
                    "{}: queue {index} has an invalid size {size}",
                    self.transport
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
                    "{}: cannot activate the device: {err}",
                    self.transport
                );
                self.regs.status |= status::DEVICE_NEEDS_RESET;
            }
        }
    }
}
