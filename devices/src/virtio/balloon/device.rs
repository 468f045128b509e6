//! The balloon device as the virtio-mmio transport sees it. Queues, in
//! the order virtio gives them to what the driver negotiated: inflate,
//! deflate, then statistics, free page hinting and free page reporting
//! where each was offered and accepted. Config space: `num_pages` (the
//! host's target, in 4 KiB pages), `actual` (the driver's, written back)
//! and the free page hinting command id.

use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_queue::Queue;
use vm_memory::{GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::timerfd::TimerFd;

use crate::vhost_user::DirtyLog;
use crate::virtio::{
    queue_from_layout, take_over_at_used_index, ActivateError, QueueEventfds, QueueLayout,
    VirtioDevice,
};

use super::queues::STATS_TAGS;

/// The virtio device id of balloon devices.
pub const VIRTIO_ID_BALLOON: u32 = 5;
/// Every queue's largest size (Firecracker's).
pub const BALLOON_QUEUE_SIZE: u16 = 256;
/// The hinting command id that ends a run (the guest may use its pages).
pub const HINT_CMD_STOP: u32 = 0;
/// The hinting command id the host sets once it is done with a run.
pub const HINT_CMD_DONE: u32 = 1;

pub(super) const F_STATS_VQ: u32 = 1;
const F_DEFLATE_ON_OOM: u32 = 2;
pub(super) const F_FREE_PAGE_HINT: u32 = 3;
pub(super) const F_PAGE_REPORTING: u32 = 5;
/// Config space: num_pages, actual, free_page_hint_cmd_id (u32 LE each).
const CONFIG_LEN: usize = 12;
const ACTUAL_OFFSET: u64 = 4;
/// The most queues: inflate, deflate, stats, hinting, reporting.
const MAX_QUEUES: usize = 5;

/// Gives guest pages back to the host: `len` bytes from a guest address.
pub type Discard = Box<dyn FnMut(GuestAddress, u64) -> Result<(), String> + Send>;

/// What the device offers, from `PUT /balloon`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BalloonOptions {
    pub deflate_on_oom: bool,
    /// Seconds between statistics requests; 0: no statistics queue.
    pub stats_polling_interval_s: u16,
    pub free_page_hinting: bool,
    pub free_page_reporting: bool,
}

/// What the device has done, for the metrics (Firecracker's names).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct BalloonCounters {
    pub inflate_count: u64,
    pub deflate_count: u64,
    pub stats_updates_count: u64,
    pub stats_update_fails: u64,
    pub event_fails: u64,
    pub free_page_hint_count: u64,
    pub free_page_hint_freed: u64,
    pub free_page_hint_fails: u64,
    pub free_page_report_count: u64,
    pub free_page_report_freed: u64,
    pub free_page_report_fails: u64,
    /// Bytes the inflate queue gave back (Tessera's).
    pub inflated_bytes: u64,
}

/// What a snapshot keeps of the device besides the transport's registers
/// (its options come with the configuration the load brings).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BalloonState {
    pub num_pages: u32,
    pub actual_pages: u32,
    pub stats_polling_interval_s: u16,
    pub hint_host_cmd: u32,
    pub hint_last_cmd_id: u32,
    pub hint_guest_cmd: Option<u32>,
    pub acknowledge_on_stop: bool,
}

/// Why a hinting command was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HintCommandError {
    /// Firecracker's text.
    #[error("Attempting to use hinting when not enabled")]
    NotEnabled,
    #[error("Device not activated yet.")]
    NotActive,
}

/// What each queue carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Role {
    Inflate,
    Deflate,
    Stats,
    FreePageHint,
    Reporting,
}

/// The free page hinting run.
#[derive(Debug, Clone, Copy, Default)]
pub(super) struct Hinting {
    /// The command id the host set (STOP when none ran).
    pub(super) host_cmd: u32,
    pub(super) last_cmd_id: u32,
    /// The last command id the guest sent.
    pub(super) guest_cmd: Option<u32>,
    pub(super) acknowledge_on_stop: bool,
}

/// A virtio-balloon device whose queues the VMM serves.
pub struct Balloon {
    pub(super) mem: GuestMemoryMmap,
    options: BalloonOptions,
    queue_sizes: Vec<u16>,
    pub(super) kicks: Vec<EventFd>,
    /// Each queue's interrupt.
    pub(super) calls: Vec<EventFd>,
    pub(super) stats_timer: TimerFd,
    /// Whether the timer was armed since the device was last activated.
    pub(super) stats_timer_armed: bool,
    pub(super) discard: Discard,
    pub(super) num_pages: u32,
    pub(super) actual_pages: u32,
    pub(super) stats_polling_interval_s: u16,
    /// From activation to reset: each queue with what it carries.
    pub(super) queues: Vec<(Role, Queue)>,
    /// The statistics buffer the device holds until it wants figures.
    pub(super) stats_head: Option<u16>,
    pub(super) latest_stats: [Option<u64>; STATS_TAGS],
    pub(super) hinting: Hinting,
    pub(super) dirty_log: Option<Arc<DirtyLog>>,
    /// The next activation takes over a loaded snapshot's queues.
    restoring: bool,
    /// The device changed its config space by itself (a hinting run it
    /// ended): the transport must tell the driver.
    pub(super) config_changed: bool,
    pub(super) counters: BalloonCounters,
}

impl Balloon {
    /// A device with `options` and a target of `num_pages`, discarding
    /// through `discard`; its kick eventfds and its call eventfd are for
    /// the caller to register as ioeventfds and an irqfd.
    pub fn new(
        mem: GuestMemoryMmap,
        options: BalloonOptions,
        num_pages: u32,
        discard: Discard,
    ) -> std::io::Result<Self> {
        let eventfd = || EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC);
        let queues = 2
            + usize::from(options.stats_polling_interval_s > 0)
            + usize::from(options.free_page_hinting)
            + usize::from(options.free_page_reporting);
        let stats_timer = TimerFd::new()?;
        Ok(Balloon {
            mem,
            options,
            queue_sizes: vec![BALLOON_QUEUE_SIZE; queues],
            kicks: (0..queues).map(|_| eventfd()).collect::<Result<_, _>>()?,
            calls: (0..queues).map(|_| eventfd()).collect::<Result<_, _>>()?,
            stats_timer,
            stats_timer_armed: false,
            discard,
            num_pages,
            actual_pages: 0,
            stats_polling_interval_s: options.stats_polling_interval_s,
            queues: Vec::new(),
            stats_head: None,
            latest_stats: [None; STATS_TAGS],
            hinting: Hinting::default(),
            dirty_log: None,
            restoring: false,
            config_changed: false,
            counters: BalloonCounters::default(),
        })
    }

    /// Each queue's notification: an ioeventfd on QueueNotify with the
    /// queue's index.
    pub fn kick_fds(&self) -> &[EventFd] {
        &self.kicks
    }

    /// The statistics timer: readable when the device asks for figures.
    pub fn stats_timer_fd(&self) -> std::os::fd::RawFd {
        std::os::fd::AsRawFd::as_raw_fd(&self.stats_timer)
    }

    /// Marks what the device writes into guest memory in `log`.
    pub fn set_dirty_log(&mut self, log: Arc<DirtyLog>) {
        self.dirty_log = Some(log);
    }

    /// The options the device was made with.
    pub fn options(&self) -> BalloonOptions {
        self.options
    }

    /// The host's target, in 4 KiB pages.
    pub fn target_pages(&self) -> u32 {
        self.num_pages
    }

    /// The pages the guest says the balloon holds.
    pub fn actual_pages(&self) -> u32 {
        self.actual_pages
    }

    /// The seconds between statistics requests (0: none).
    pub fn stats_polling_interval_s(&self) -> u16 {
        self.stats_polling_interval_s
    }

    /// The guest's latest figures, by statistics tag.
    pub fn latest_stats(&self) -> &[Option<u64>; STATS_TAGS] {
        &self.latest_stats
    }

    /// What the device has done so far.
    pub fn counters(&self) -> BalloonCounters {
        self.counters
    }

    /// Whether the device changed its config space since last asked (the
    /// caller then raises a configuration change).
    pub fn take_config_change(&mut self) -> bool {
        std::mem::take(&mut self.config_changed)
    }

    /// Whether the driver started the device.
    pub fn is_active(&self) -> bool {
        !self.queues.is_empty()
    }

    /// A new target; the caller raises a configuration change.
    pub fn set_target_pages(&mut self, num_pages: u32) {
        self.num_pages = num_pages;
    }

    /// A new statistics interval (statistics stay on): the device asks
    /// for figures now and then at the new interval.
    pub fn set_stats_polling_interval(&mut self, seconds: u16) {
        self.stats_polling_interval_s = seconds;
        self.arm_stats_timer();
        self.request_stats();
    }

    /// Starts a hinting run: a new command id (never STOP or DONE) for
    /// the guest to report its free pages under. The caller raises a
    /// configuration change.
    pub fn start_hinting(&mut self, acknowledge_on_stop: bool) -> Result<(), HintCommandError> {
        self.check_hinting()?;
        let mut cmd = self.hinting.last_cmd_id.wrapping_add(1);
        if cmd <= HINT_CMD_DONE {
            cmd = HINT_CMD_DONE + 1;
        }
        self.hinting.last_cmd_id = cmd;
        self.hinting.host_cmd = cmd;
        self.hinting.acknowledge_on_stop = acknowledge_on_stop;
        Ok(())
    }

    /// Ends a hinting run: the guest may use the pages it hinted again.
    /// The caller raises a configuration change.
    pub fn stop_hinting(&mut self) -> Result<(), HintCommandError> {
        self.check_hinting()?;
        self.hinting.host_cmd = HINT_CMD_DONE;
        Ok(())
    }

    /// The command ids of the run: the host's and the guest's last.
    pub fn hinting_status(&self) -> Result<(u32, Option<u32>), HintCommandError> {
        if !self.options.free_page_hinting {
            return Err(HintCommandError::NotEnabled);
        }
        Ok((self.hinting.host_cmd, self.hinting.guest_cmd))
    }

    fn check_hinting(&self) -> Result<(), HintCommandError> {
        if !self.options.free_page_hinting {
            return Err(HintCommandError::NotEnabled);
        }
        if !self.is_active() {
            return Err(HintCommandError::NotActive);
        }
        Ok(())
    }

    /// The state a snapshot keeps.
    pub fn state(&self) -> BalloonState {
        BalloonState {
            num_pages: self.num_pages,
            actual_pages: self.actual_pages,
            stats_polling_interval_s: self.stats_polling_interval_s,
            hint_host_cmd: self.hinting.host_cmd,
            hint_last_cmd_id: self.hinting.last_cmd_id,
            hint_guest_cmd: self.hinting.guest_cmd,
            acknowledge_on_stop: self.hinting.acknowledge_on_stop,
        }
    }

    /// Takes a snapshot's state; the next activation takes over the
    /// snapshot's queues.
    pub fn restore(&mut self, state: &BalloonState) {
        self.num_pages = state.num_pages;
        self.actual_pages = state.actual_pages;
        self.stats_polling_interval_s = state.stats_polling_interval_s;
        self.hinting = Hinting {
            host_cmd: state.hint_host_cmd,
            last_cmd_id: state.hint_last_cmd_id,
            guest_cmd: state.hint_guest_cmd,
            acknowledge_on_stop: state.acknowledge_on_stop,
        };
        self.restoring = true;
    }

    /// Arms the statistics timer once the device is active (on the event
    /// loop's thread).
    pub(super) fn ensure_stats_timer(&mut self) {
        if !self.stats_timer_armed && self.is_active() {
            self.arm_stats_timer();
            self.stats_timer_armed = true;
        }
    }

    /// Arms the statistics timer for the interval (disarmed without
    /// statistics).
    pub(super) fn arm_stats_timer(&mut self) {
        if self.stats_polling_interval_s == 0 || !self.has_queue(Role::Stats) {
            let _ = self.stats_timer.clear();
            return;
        }
        let interval = Duration::from_secs(u64::from(self.stats_polling_interval_s));
        if let Err(err) = self.stats_timer.reset(interval, Some(interval)) {
            crate::guest_log_here!(
                log::Level::Error,
                "balloon: cannot arm the statistics timer: {err}"
            );
        }
    }

    #[cfg(test)]
    pub(super) fn roles_of_queues(&self) -> Vec<Role> {
        self.queues.iter().map(|(r, _)| *r).collect()
    }

    pub(super) fn has_queue(&self, role: Role) -> bool {
        self.queues.iter().any(|(r, _)| *r == role)
    }

    fn config_space(&self) -> [u8; CONFIG_LEN] {
        let mut space = [0u8; CONFIG_LEN];
        space[0..4].copy_from_slice(&self.num_pages.to_le_bytes());
        space[4..8].copy_from_slice(&self.actual_pages.to_le_bytes());
        space[8..12].copy_from_slice(&self.hinting.host_cmd.to_le_bytes());
        space
    }

    /// The queues' roles for what the driver accepted, in virtio's order.
    fn roles(acked_features: u64) -> Vec<Role> {
        let has = |bit: u32| acked_features & (1 << bit) != 0;
        let mut roles = vec![Role::Inflate, Role::Deflate];
        if has(F_STATS_VQ) {
            roles.push(Role::Stats);
        }
        if has(F_FREE_PAGE_HINT) {
            roles.push(Role::FreePageHint);
        }
        if has(F_PAGE_REPORTING) {
            roles.push(Role::Reporting);
        }
        roles
    }
}

impl QueueEventfds for Balloon {
    fn queue_eventfds(&self) -> Vec<(&EventFd, &EventFd)> {
        self.kicks.iter().zip(&self.calls).collect()
    }
}

impl VirtioDevice for Balloon {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_BALLOON
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &self.queue_sizes
    }

    fn features(&self) -> u64 {
        let mut features = 1 << VIRTIO_F_VERSION_1;
        if self.options.deflate_on_oom {
            features |= 1 << F_DEFLATE_ON_OOM;
        }
        if self.options.stats_polling_interval_s > 0 {
            features |= 1 << F_STATS_VQ;
        }
        if self.options.free_page_hinting {
            features |= 1 << F_FREE_PAGE_HINT;
        }
        if self.options.free_page_reporting {
            features |= 1 << F_PAGE_REPORTING;
        }
        features
    }

    fn read_config(&mut self, offset: u64, data: &mut [u8]) {
        let space = self.config_space();
        for (i, byte) in data.iter_mut().enumerate() {
            let at = usize::try_from(offset).ok().and_then(|o| o.checked_add(i));
            *byte = at.and_then(|at| space.get(at)).copied().unwrap_or(0);
        }
    }

    /// Only `actual` is the driver's to write (a 4-byte write at its
    /// offset, as Linux makes).
    fn write_config(&mut self, offset: u64, data: &[u8]) {
        match (offset, <[u8; 4]>::try_from(data)) {
            (ACTUAL_OFFSET, Ok(actual)) => self.actual_pages = u32::from_le_bytes(actual),
            _ => crate::guest_log_here!(
                log::Level::Debug,
                "balloon: config write of {} bytes at {offset} ignored",
                data.len()
            ),
        }
    }

    fn activate(
        &mut self,
        acked_features: u64,
        layouts: &[QueueLayout],
    ) -> Result<(), ActivateError> {
        let roles = Self::roles(acked_features);
        if layouts.len() < roles.len() || roles.len() > MAX_QUEUES {
            return Err(ActivateError::BadQueue {
                index: layouts.len(),
                reason: format!(
                    "balloon: {} queue(s) ready for the {} the features need",
                    layouts.len(),
                    roles.len()
                ),
            });
        }
        let restoring = std::mem::take(&mut self.restoring);
        let mut queues = Vec::with_capacity(roles.len());
        for (index, (role, layout)) in roles.into_iter().zip(layouts).enumerate() {
            let mut queue = queue_from_layout(&self.mem, layout, BALLOON_QUEUE_SIZE, false)
                .map_err(|err| ActivateError::BadQueue {
                    index,
                    reason: format!("balloon: {err}"),
                })?;
            if restoring {
                // The statistics buffer the device held is taken again.
                take_over_at_used_index(&mut queue, &self.mem);
            }
            queues.push((role, queue));
        }
        self.queues = queues;
        self.stats_head = None;
        self.stats_timer_armed = false;
        crate::guest_log_here!(log::Level::Info, "balloon: active");
        // What the driver posted before it said DRIVER_OK is served on the
        // event loop, as every notification is: activation runs on a vCPU
        // thread, whose seccomp filter allows neither discarding pages nor
        // arming timers.
        for kick in &self.kicks[..self.queues.len()] {
            if let Err(err) = kick.write(1) {
                crate::guest_log_here!(log::Level::Error, "balloon: cannot notify itself: {err}");
            }
        }
        Ok(())
    }

    /// Runs on a vCPU thread too: no syscall but what its filter allows
    /// (the statistics timer stops asking once there is no queue).
    fn reset(&mut self) {
        self.queues.clear();
        self.stats_head = None;
        self.stats_timer_armed = false;
    }
}
