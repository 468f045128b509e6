//! The vhost-user net device: features, config space, and the two
//! directions of each queue pair on its own worker thread. TX takes every
//! frame the guest posted and writes it to the TAP. RX reads frames from
//! the TAP (an edge-triggered listener in the worker's epoll) into the
//! guest's RX buffers while it has some; when it has none the worker stops
//! reading (no spinning, no loss: the TAP queues the frames) until the guest
//! posts buffers and kicks.
//!
//! Frames the guest sends to the MMDS address go to the interface's
//! [`Mmds`] instead of the TAP, and its answers reach the guest ahead of
//! the TAP's frames (neither is charged to the limiters).
//!
//! Each direction has a rate limiter that the VMM sets over the control
//! channel, shared by the pairs. A frame goes while its limiter is not
//! blocked and is charged after; one that leaves a debt stops that
//! direction (TX frames wait in the ring, RX frames in the TAP) until the
//! limiter's timer, which every worker's epoll watches.

use std::collections::VecDeque;
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{fence, AtomicBool, AtomicUsize, Ordering};

use backend_stats::{NetCounter, Stats};
use tessera_backend_control::{ControlMessage, LimitTarget};
use tessera_rate_limiter::{Charged, SharedLimiter};
use vhost_user_backend::VringT;
use vhost_user_common::device::{Device, WorkerCommon, WorkerEvent};
use vhost_user_common::guest_log;
use vhost_user_common::ratelimit::{self, RateLimit};
use vhost_user_common::ring;
use vhost_user_common::worker::{self, BrokenQueues, Taken};
use vhost_user_common::{BackendMemory, BackendVring};
use virtio_bindings::virtio_net::{
    VIRTIO_NET_F_CSUM, VIRTIO_NET_F_GUEST_CSUM, VIRTIO_NET_F_GUEST_TSO4, VIRTIO_NET_F_GUEST_TSO6,
    VIRTIO_NET_F_HOST_TSO4, VIRTIO_NET_F_HOST_TSO6, VIRTIO_NET_F_MAC, VIRTIO_NET_F_MQ,
    VIRTIO_NET_F_MRG_RXBUF, VIRTIO_NET_F_MTU, VIRTIO_NET_F_STATUS, VIRTIO_NET_S_LINK_UP,
};
use virtio_bindings::virtio_ring::VRING_AVAIL_F_NO_INTERRUPT;
use virtio_queue::{QueueOwnedT, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestAddressSpace, GuestMemoryAtomic, GuestMemoryLoadGuard};
use vmm_sys_util::epoll::EventSet;

use crate::frame::{self, FrameError, Received, RxChain, MAX_FRAME_LEN, VNET_HDR_LEN};
use crate::mmds::{self, Mmds};
use crate::tap::{Tap, TUN_F_CSUM, TUN_F_TSO4, TUN_F_TSO6};
use crate::tap_watch::TapWatch;

const CONFIG_LEN: usize = 12;
/// Frames one `handle_event` sends before it lets the worker's event loop
/// look at its other events (its exit event among them) and kicks itself
/// to come back: a guest whose used ring overlaps its avail index (each
/// completion then posts a frame) must not keep a worker from stopping.
pub const MAX_TX_PER_EVENT: usize = 1024;
/// Frames one RX pass puts into the guest's buffers before the worker
/// looks at its other events (the pair's TX kicks, its exit event) and
/// kicks itself to come back: a flood into the TAP, while the guest keeps
/// posting buffers, must not starve the pair's TX or keep the worker from
/// stopping, and the guest hears of what it got at least this often.
#[cfg(not(test))]
pub const MAX_RX_PER_EVENT: usize = 1024;
#[cfg(test)]
pub const MAX_RX_PER_EVENT: usize = 8;

/// Settings of the device.
#[derive(Debug, Clone)]
pub struct NetConfig {
    /// Offered with VIRTIO_NET_F_MAC; without it the guest picks a random
    /// address, so that interfaces without one never share a MAC.
    pub mac: Option<[u8; 6]>,
    pub mtu: Option<u16>,
    pub queue_pairs: usize,
    pub queue_size: usize,
    /// The seccomp filters; each worker installs "worker" at its first event.
    pub seccomp: tessera_seccomp::Filters,
    /// The counters the VMM's metrics report.
    pub stats: Stats<NetCounter>,
}

pub use vhost_user_common::worker::QueueError;

/// The MTU a device has when none is configured (Ethernet's).
const DEFAULT_MTU: u16 = 1500;

/// Frames and buffers dropped, logged at debug level.
static DROPPED: RateLimit = RateLimit::new(ratelimit::BURST, ratelimit::INTERVAL);
/// Set-up steps repeated each time the guest resets its driver.
static SETUP: RateLimit = RateLimit::new(ratelimit::BURST, ratelimit::INTERVAL);

/// A virtio-net device served over vhost-user, on a TAP.
pub struct NetBackend {
    taps: Vec<Tap>,
    config: NetConfig,
    mem: GuestMemoryAtomic<BackendMemory>,
    common: WorkerCommon,
    mergeable: AtomicBool,
    /// How many bytes of RX buffers to hold before reading a frame: the
    /// largest frame the TAP may pass (see `acked_features`).
    rx_fill: AtomicUsize,
    /// Whether each pair's TAP queue is attached: pairs past the first
    /// join the TAP when the guest first kicks them (it uses that pair).
    attached: Vec<AtomicBool>,
    /// Per queue (RX of pair p is 2p, TX 2p + 1).
    broken: BrokenQueues,
    /// Per pair: whether its worker wakes for frames on its TAP.
    tap_watch: Vec<TapWatch>,
    /// Frames to the guest.
    rx_limiter: SharedLimiter,
    /// Frames from the guest.
    tx_limiter: SharedLimiter,
    /// The metadata service, when the VMM turned it on.
    mmds: Mmds,
}

impl NetBackend {
    pub fn new(
        taps: Vec<Tap>,
        config: NetConfig,
        mem: GuestMemoryAtomic<BackendMemory>,
    ) -> io::Result<Self> {
        let common = WorkerCommon::new(
            config.queue_size,
            config.queue_pairs,
            config.seccomp.clone(),
        )?;
        // A guest may use fewer pairs than it is offered (Linux uses one per
        // vCPU): the TAP would still steer flows to the unused pairs' queues
        // and they would be lost, so only pair 0 starts attached.
        for tap in taps.iter().skip(1) {
            tap.set_queue_attached(false).map_err(io::Error::other)?;
        }
        let attached = (0..taps.len())
            .map(|pair| AtomicBool::new(pair == 0))
            .collect();
        let broken = BrokenQueues::new(2 * config.queue_pairs);
        let tap_watch = taps
            .iter()
            .enumerate()
            .map(|(pair, tap)| TapWatch::new(tap.as_raw_fd(), tap_event(&config, pair)))
            .collect();
        Ok(Self {
            taps,
            mem,
            common,
            mergeable: AtomicBool::new(false),
            rx_fill: AtomicUsize::new(MAX_FRAME_LEN + VNET_HDR_LEN),
            attached,
            broken,
            tap_watch,
            rx_limiter: SharedLimiter::new()?,
            tx_limiter: SharedLimiter::new()?,
            mmds: Mmds::new(config.stats.clone()),
            config,
        })
    }

    /// The epoll value of a limiter's timer in every worker (after the
    /// queues, the exit event and the TAPs).
    pub fn limiter_event(&self, target: LimitTarget) -> u64 {
        let after_taps = (3 * self.config.queue_pairs + 1) as u64;
        match target {
            LimitTarget::Tx => after_taps + 1,
            _ => after_taps,
        }
    }

    fn limiter(&self, target: LimitTarget) -> &SharedLimiter {
        match target {
            LimitTarget::Tx => &self.tx_limiter,
            _ => &self.rx_limiter,
        }
    }

    /// The timerfds of the RX and TX limiters, with their epoll values.
    pub fn limiter_fds(&self) -> [(RawFd, u64); 2] {
        [
            (
                self.rx_limiter.as_raw_fd(),
                self.limiter_event(LimitTarget::Rx),
            ),
            (
                self.tx_limiter.as_raw_fd(),
                self.limiter_event(LimitTarget::Tx),
            ),
        ]
    }

    /// The counters the VMM's metrics report.
    pub fn stats(&self) -> &Stats<NetCounter> {
        &self.config.stats
    }

    /// Has pair `pair`'s worker, whose epoll set is `epoll`, wake for
    /// frames on the pair's TAP.
    pub fn watch_tap(&self, pair: usize, epoll: RawFd) -> io::Result<()> {
        let watch = self
            .tap_watch
            .get(pair)
            .ok_or_else(|| io::Error::other(format!("no TAP for pair {pair}")))?;
        watch.start(epoll)
    }

    /// The epoll data value of pair `pair`'s TAP listener.
    pub fn tap_event(&self, pair: usize) -> u64 {
        tap_event(&self.config, pair)
    }

    /// Wakes every worker thread so that it exits.
    pub fn stop_workers(&self) {
        self.common.stop_workers();
    }

    fn config_space(&self) -> [u8; CONFIG_LEN] {
        let mut c = [0u8; CONFIG_LEN];
        c[0..6].copy_from_slice(&self.config.mac.unwrap_or_default());
        c[6..8].copy_from_slice(&(VIRTIO_NET_S_LINK_UP as u16).to_le_bytes());
        c[8..10].copy_from_slice(&(self.config.queue_pairs as u16).to_le_bytes());
        c[10..12].copy_from_slice(&self.config.mtu.unwrap_or(DEFAULT_MTU).to_le_bytes());
        c
    }

    fn signal(&self, vring: &BackendVring) -> Result<(), QueueError> {
        let notify = if self.common.event_idx() {
            vring.needs_notification()?
        } else {
            !self.driver_polls(vring)
        };
        if notify {
            vring.signal_used_queue()?;
        }
        Ok(())
    }

    /// Without VIRTIO_RING_F_EVENT_IDX: whether the driver set
    /// VRING_AVAIL_F_NO_INTERRUPT (a polling driver such as DPDK's), so
    /// that the device should not interrupt it. A ring that cannot be read
    /// counts as "interrupt".
    /// Runs `process` for `queue` unless the guest broke that queue.
    fn serve(
        &self,
        queue: usize,
        process: impl FnOnce() -> Result<(), QueueError>,
    ) -> Result<(), QueueError> {
        if self.is_broken(queue) {
            return Ok(());
        }
        process()
    }

    /// Whether the guest broke `queue`, which is then not served.
    pub fn is_broken(&self, queue: usize) -> bool {
        self.broken.is_broken(queue)
    }

    /// Stops serving `queue`: what the guest wrote there cannot be served.
    /// The other queues go on; the frontend may reset this one.
    fn break_queue(&self, queue: usize, err: &QueueError) {
        self.stats().inc(NetCounter::EventFails);
        self.broken.mark(queue, err);
    }

    fn driver_polls(&self, vring: &BackendVring) -> bool {
        // The used entries must be visible before the flags are read.
        fence(Ordering::SeqCst);
        let flags = GuestAddress(vring.get_ref().get_queue().avail_ring());
        self.mem
            .memory()
            .load::<u16>(flags, Ordering::Acquire)
            .is_ok_and(|f| u16::from_le(f) & VRING_AVAIL_F_NO_INTERRUPT as u16 != 0)
    }

    /// Charges a frame of `len` bytes (its virtio-net header included, as
    /// Firecracker counts) to `limiter`; whether the next frame may go.
    fn charge(&self, limiter: &SharedLimiter, len: usize, throttled: NetCounter) -> bool {
        match limiter.charge(len as u64) {
            Charged::Free => true,
            Charged::Throttled => {
                self.stats().inc(throttled);
                false
            }
            Charged::Blocked => false,
        }
    }

    /// Guest to TAP: sends every posted frame; bad frames are dropped and
    /// counted, and each chain goes back to the guest.
    /// A frame the TX limiter holds back waits in the ring.
    fn process_tx(&self, vring: &BackendVring, tap: &Tap) -> Result<(), QueueError> {
        if self.tx_limiter.is_blocked() {
            return Ok(());
        }
        let transmit = |chain, mem: &GuestMemoryLoadGuard<BackendMemory>| {
            let descriptors = ring::descriptors_up_to(chain, frame::MAX_DESCRIPTORS);
            if self.take_for_mmds(&descriptors, mem) {
                return true;
            }
            match frame::transmit(&descriptors, mem, tap.as_raw_fd()) {
                Ok(len) => {
                    self.stats().inc(NetCounter::TxPacketsCount);
                    self.stats()
                        .add(NetCounter::TxBytesCount, payload_bytes(len));
                    self.charge(&self.tx_limiter, len, NetCounter::TxRateLimiterThrottled)
                }
                Err(err) => {
                    guest_log!(&DROPPED, log::Level::Debug, "TX frame dropped: {err}");
                    self.stats().inc(match err {
                        FrameError::Io(_) => NetCounter::TapWriteFails,
                        _ => NetCounter::TxMalformedFrames,
                    });
                    true
                }
            }
        };
        let memory = || self.mem.memory();
        let taken = worker::take_posted(vring, memory, MAX_TX_PER_EVENT, transmit, |vring| {
            self.signal(vring)
        })?;
        if taken == Taken::BudgetSpent {
            if let Some(kick) = vring.get_ref().get_kick() {
                ring::kick_again(kick);
            }
        }
        Ok(())
    }

    /// Gives a TX frame for the MMDS address to MMDS; false if it is for
    /// the TAP.
    fn take_for_mmds(
        &self,
        descriptors: &[virtio_queue::desc::split::Descriptor],
        mem: &BackendMemory,
    ) -> bool {
        let Some(ip) = self.mmds.address() else {
            return false;
        };
        let peek = VNET_HDR_LEN + mmds::PEEK_LEN;
        let for_mmds = frame::read_chain(descriptors, mem, peek).is_ok_and(|head| {
            head.len() > VNET_HDR_LEN && mmds::is_for_mmds(&head[VNET_HDR_LEN..], ip)
        });
        if !for_mmds {
            return false;
        }
        match frame::read_chain(descriptors, mem, MAX_FRAME_LEN + VNET_HDR_LEN) {
            Ok(frame) => self.mmds.receive(&frame[VNET_HDR_LEN..]),
            Err(err) => {
                guest_log!(&DROPPED, log::Level::Debug, "MMDS frame dropped: {err}");
                self.stats().inc(NetCounter::TxMalformedFrames);
            }
        }
        true
    }

    /// MMDS's next frame into the chains at the front of `ready`; false if
    /// it has none. One the chains cannot hold is dropped and counted.
    fn deliver_mmds(
        &self,
        vring: &BackendVring,
        ready: &mut VecDeque<RxChain>,
        capacity: &mut usize,
        mem: &BackendMemory,
        mergeable: bool,
    ) -> Result<bool, QueueError> {
        let mut out = Vec::new();
        if !self.mmds.next_frame(&mut out) {
            return Ok(false);
        }
        match frame::deliver_into(ready.make_contiguous(), &out, mem, mergeable) {
            Ok(Received::Frame { used, .. }) => {
                for len in used {
                    let chain = ready.pop_front().expect("used only ready chains");
                    *capacity -= chain.capacity;
                    vring.add_used(chain.head, len)?;
                }
            }
            Ok(Received::Empty) | Err(_) => self.stats().inc(NetCounter::MmdsTxErrors),
        }
        Ok(true)
    }

    /// TAP to guest: fills the guest's RX buffers while both have some.
    /// Chains are popped and checked once and kept across frames (a
    /// mergeable frame may need up to `rx_fill` bytes of them, most of
    /// which a small frame leaves for the next); those left at the end go
    /// back to the ring. Notifications of new buffers are off while buffers
    /// remain. Frames the RX limiter holds back wait in the TAP. A pass
    /// ends after MAX_RX_PER_EVENT frames and kicks the queue to go on.
    /// Frames stop waking the worker while none can move (`watch`).
    fn process_rx(
        &self,
        vring: &BackendVring,
        tap: &Tap,
        watch: &TapWatch,
    ) -> Result<(), QueueError> {
        if self.rx_limiter.is_blocked() {
            watch.want(false);
            return Ok(());
        }
        let mut mem = self.mem.memory();
        let mergeable = self.mergeable.load(Ordering::Relaxed);
        let mut fill = self.rx_fill.load(Ordering::Relaxed);
        let mut ready: VecDeque<RxChain> = VecDeque::new();
        let mut capacity = 0usize;
        let mut scratch = Vec::new();
        let mut delivered = 0;
        // A bad chain met behind good ones waits in the ring until those
        // are used, so that `ready` always ends at the ring's position and
        // can be given back by rewinding.
        let mut blocked = false;
        let mut out_of_buffers = false;
        // Ended with no buffers or with the limiter's budget spent.
        let mut starved = false;
        let mut budget_spent = false;
        vring.disable_notification()?;
        loop {
            if delivered >= MAX_RX_PER_EVENT {
                budget_spent = true;
                break;
            }
            if ready.is_empty() {
                blocked = false;
            }
            // Enough buffers for the largest frame (one without mergeable
            // buffers: each chain must hold a whole frame).
            while !blocked && capacity < fill && (mergeable || ready.is_empty()) {
                let Some(chain) = ring::next_chain(vring.get_mut().get_queue_mut(), mem.clone())?
                else {
                    break;
                };
                let head = chain.head_index();
                let descriptors = ring::descriptors_up_to(chain, frame::MAX_DESCRIPTORS);
                match frame::check_rx_chain(head, &descriptors, &mem) {
                    Ok(checked) => {
                        capacity += checked.capacity;
                        ready.push_back(checked);
                    }
                    Err(err) if ready.is_empty() => {
                        guest_log!(&DROPPED, log::Level::Debug, "RX buffer refused: {err}");
                        vring.add_used(head, 0)?;
                        self.stats().inc(NetCounter::RxFails);
                        delivered += 1;
                    }
                    Err(_) => {
                        vring.get_mut().get_queue_mut().go_to_previous_position();
                        blocked = true;
                    }
                }
            }
            if ready.is_empty() {
                // No buffers: stop until the guest posts some and kicks.
                out_of_buffers = true;
                if vring.enable_notification()? {
                    vring.disable_notification()?;
                    // Nothing read through the old table is held: read
                    // the ring again through the latest one (the view
                    // enable_notification had).
                    mem = self.mem.memory();
                    continue;
                }
                starved = true;
                break;
            }
            if self.deliver_mmds(vring, &mut ready, &mut capacity, &mem, mergeable)? {
                delivered += 1;
                continue;
            }
            if self.rx_limiter.is_blocked() {
                starved = true;
                break;
            }
            match frame::receive_into(
                ready.make_contiguous(),
                &mut scratch,
                &mem,
                tap.as_raw_fd(),
                mergeable,
            ) {
                Ok(Received::Empty) => break,
                Ok(Received::Frame { len, used }) => {
                    for len in used {
                        let chain = ready.pop_front().expect("used only ready chains");
                        capacity -= chain.capacity;
                        vring.add_used(chain.head, len)?;
                    }
                    self.stats().inc(NetCounter::RxPacketsCount);
                    self.stats()
                        .add(NetCounter::RxBytesCount, payload_bytes(len));
                    delivered += 1;
                    self.charge(&self.rx_limiter, len, NetCounter::RxRateLimiterThrottled);
                }
                Err(err) => {
                    // Give the first chain back empty, keep the rest.
                    guest_log!(&DROPPED, log::Level::Debug, "RX frame dropped: {err}");
                    if matches!(err, FrameError::Truncated(_)) {
                        fill = self.fill_for_any_frame(fill);
                    }
                    let chain = ready.pop_front().expect("not empty");
                    capacity -= chain.capacity;
                    vring.add_used(chain.head, 0)?;
                    self.stats().inc(match err {
                        FrameError::Io(_) => NetCounter::TapReadFails,
                        _ => NetCounter::RxFails,
                    });
                    delivered += 1;
                }
            }
        }
        if out_of_buffers {
            self.stats().inc(NetCounter::NoRxAvailBuffer);
        }
        watch.want(!starved);
        {
            let mut state = vring.get_mut();
            for _ in 0..ready.len() {
                state.get_queue_mut().go_to_previous_position();
            }
        }
        if delivered > 0 {
            self.signal(vring)?;
        }
        if budget_spent {
            if let Some(kick) = vring.get_ref().get_kick() {
                ring::kick_again(kick);
            }
        }
        Ok(())
    }
}

impl NetBackend {
    /// After a frame larger than the MTU (the TAP's MTU was raised past the
    /// device's): holds RX buffers for the largest frame from now on, and
    /// returns that size.
    fn fill_for_any_frame(&self, fill: usize) -> usize {
        let largest = MAX_FRAME_LEN + VNET_HDR_LEN;
        // Rate-limited: a guest that resets its driver brings the smaller
        // fill back, and the next long frame would log again.
        if fill < largest && self.rx_fill.swap(largest, Ordering::Relaxed) < largest {
            guest_log!(
                &SETUP,
                log::Level::Warn,
                "a frame from the TAP exceeded the MTU's {fill} bytes: RX buffers are now filled for {largest}"
            );
        }
        largest
    }
}

/// The epoll data value of pair `pair`'s TAP listener (after the queues and
/// the exit event).
fn tap_event(config: &NetConfig, pair: usize) -> u64 {
    (2 * config.queue_pairs + 1 + pair) as u64
}

/// A frame's bytes without its virtio-net header.
fn payload_bytes(len: usize) -> u64 {
    len.saturating_sub(VNET_HDR_LEN) as u64
}

impl Device for NetBackend {
    fn common(&self) -> &WorkerCommon {
        &self.common
    }

    fn num_queues(&self) -> usize {
        2 * self.config.queue_pairs
    }

    fn device_features(&self) -> u64 {
        let mut features = 1 << VIRTIO_NET_F_CSUM
            | 1 << VIRTIO_NET_F_GUEST_CSUM
            | 1 << VIRTIO_NET_F_GUEST_TSO4
            | 1 << VIRTIO_NET_F_GUEST_TSO6
            | 1 << VIRTIO_NET_F_HOST_TSO4
            | 1 << VIRTIO_NET_F_HOST_TSO6
            | 1 << VIRTIO_NET_F_MRG_RXBUF
            | 1 << VIRTIO_NET_F_STATUS;
        if self.config.mac.is_some() {
            features |= 1 << VIRTIO_NET_F_MAC;
        }
        if self.config.mtu.is_some() {
            features |= 1 << VIRTIO_NET_F_MTU;
        }
        if self.config.queue_pairs > 1 {
            features |= 1 << VIRTIO_NET_F_MQ;
        }
        features
    }

    fn acked_features(&self, features: u64) {
        let has = |bit: u32| features & (1 << bit) != 0;
        self.mergeable
            .store(has(VIRTIO_NET_F_MRG_RXBUF), Ordering::Relaxed);
        let gso = has(VIRTIO_NET_F_GUEST_CSUM)
            && (has(VIRTIO_NET_F_GUEST_TSO4) || has(VIRTIO_NET_F_GUEST_TSO6));
        let mtu = self.config.mtu.unwrap_or(DEFAULT_MTU);
        self.rx_fill
            .store(frame::largest_rx_frame(gso, mtu), Ordering::Relaxed);
        let mut offload = 0;
        if has(VIRTIO_NET_F_GUEST_CSUM) {
            offload |= TUN_F_CSUM;
            if has(VIRTIO_NET_F_GUEST_TSO4) {
                offload |= TUN_F_TSO4;
            }
            if has(VIRTIO_NET_F_GUEST_TSO6) {
                offload |= TUN_F_TSO6;
            }
        }
        for tap in &self.taps {
            if let Err(err) = tap.set_offload(offload) {
                guest_log!(&SETUP, log::Level::Error, "{err}");
            }
        }
    }

    fn config_space(&self) -> Vec<u8> {
        self.config_space().to_vec()
    }

    fn queues_per_thread(&self) -> Vec<u64> {
        (0..self.config.queue_pairs)
            .map(|p| 0b11u64 << (2 * p))
            .collect()
    }

    /// The limits in force of a direction (at start, and after each
    /// `PATCH /network-interfaces/{id}`, which the VMM merges).
    fn control(&self, message: ControlMessage) -> io::Result<()> {
        match message {
            ControlMessage::RateLimits {
                target: target @ (LimitTarget::Rx | LimitTarget::Tx),
                limits,
            } => {
                self.limiter(target).replace(&limits);
                log::info!("{target:?} rate limits: {limits:?}");
                Ok(())
            }
            message @ (ControlMessage::MmdsConfig(_) | ControlMessage::MmdsData(_)) => {
                self.mmds.control(message)
            }
            other => Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("an interface has an RX and a TX rate limiter: {other:?}"),
            )),
        }
    }

    fn stop_vring(&self, queue_index: u32) -> io::Result<()> {
        self.broken.clear(queue_index as usize);
        // A reset guest may come back with fewer pairs: detach again.
        let pair = queue_index as usize / 2;
        if pair > 0
            && self
                .attached
                .get(pair)
                .is_some_and(|a| a.swap(false, Ordering::AcqRel))
        {
            if let Some(tap) = self.taps.get(pair) {
                tap.set_queue_attached(false).map_err(io::Error::other)?;
            }
        }
        Ok(())
    }

    fn serve(&self, event: WorkerEvent<'_>) -> io::Result<()> {
        let thread_id = event.thread;
        if let Err(err) = self.serve_event(event.device_event, event.evset, event.vrings, thread_id)
        {
            // vhost-user-backend would end the worker and tell no one: the
            // pair would go silent while the process looks alive. Ending
            // the process closes the connection, which the VMM watches.
            log::error!("worker {thread_id}: {err}; exiting");
            std::process::exit(1);
        }
        Ok(())
    }
}

impl NetBackend {
    /// Serves one event of the worker of pair `pair`. A queue the guest
    /// broke is marked so; an error is left for the worker to fail on.
    fn serve_event(
        &self,
        device_event: u16,
        evset: EventSet,
        vrings: &[BackendVring],
        pair: usize,
    ) -> io::Result<()> {
        if !evset.contains(EventSet::IN) {
            return Err(io::Error::other(format!("unexpected event set {evset:?}")));
        }
        let (Some(tap), Some(watch)) = (self.taps.get(pair), self.tap_watch.get(pair)) else {
            return Err(io::Error::other(format!("no queue pair {pair}")));
        };
        if self
            .attached
            .get(pair)
            .is_some_and(|a| !a.swap(true, Ordering::AcqRel))
        {
            tap.set_queue_attached(true).map_err(io::Error::other)?;
            guest_log!(
                &SETUP,
                log::Level::Info,
                "queue pair {pair} is in use: its TAP queue is attached"
            );
        }
        // Each worker gets only its own pair's vrings, and their kicks as
        // events 0 (RX) and 1 (TX); the TAP's event is ours.
        let event = usize::from(device_event);
        let rx = vrings.first();
        let tx = vrings.get(1);
        let (queue, result) = match (event, rx, tx) {
            (1, _, Some(tx)) => {
                self.stats().inc(NetCounter::TxQueueEventCount);
                (
                    2 * pair + 1,
                    self.serve(2 * pair + 1, || self.process_tx(tx, tap)),
                )
            }
            (0, Some(rx), _) => {
                self.stats().inc(NetCounter::RxQueueEventCount);
                (
                    2 * pair,
                    self.serve(2 * pair, || self.process_rx(rx, tap, watch)),
                )
            }
            // A limiter's debt is paid: what it held back goes on.
            (e, _, Some(tx)) if e as u64 == self.limiter_event(LimitTarget::Tx) => {
                self.stats().inc(NetCounter::TxRateLimiterEventCount);
                self.tx_limiter.on_timer();
                if !tx.get_ref().get_queue().ready() {
                    return Ok(());
                }
                (
                    2 * pair + 1,
                    self.serve(2 * pair + 1, || self.process_tx(tx, tap)),
                )
            }
            (e, Some(rx), _) if e as u64 == self.limiter_event(LimitTarget::Rx) => {
                self.stats().inc(NetCounter::RxEventRateLimiterCount);
                self.rx_limiter.on_timer();
                if !rx.get_ref().get_queue().ready() {
                    return Ok(());
                }
                (
                    2 * pair,
                    self.serve(2 * pair, || self.process_rx(rx, tap, watch)),
                )
            }
            // Frames before the guest set up its RX queue wait in the TAP;
            // the guest's first RX kick picks them up.
            (e, Some(rx), _) if e as u64 == self.tap_event(pair) => {
                self.stats().inc(NetCounter::RxTapEventCount);
                if rx.get_ref().get_queue().ready() {
                    (
                        2 * pair,
                        self.serve(2 * pair, || self.process_rx(rx, tap, watch)),
                    )
                } else {
                    return Ok(());
                }
            }
            _ => return Err(io::Error::other(format!("unexpected event {device_event}"))),
        };
        if let Err(err) = result {
            self.break_queue(queue, &err);
        }
        // The guest's frames to MMDS were answered: the answers go now.
        if queue % 2 == 1 && self.mmds.has_output() {
            if let Some(rx) = rx.filter(|rx| rx.get_ref().get_queue().ready()) {
                if let Err(err) = self.serve(2 * pair, || self.process_rx(rx, tap, watch)) {
                    self.break_queue(2 * pair, &err);
                }
            }
        }
        watch.apply()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
    use vhost_user_backend::VhostUserBackend;
    use vhost_user_common::device::Served;
    use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;

    /// The backend as the vhost-user daemon sees it.
    fn backend(queue_pairs: usize, mac: Option<[u8; 6]>, mtu: Option<u16>) -> Served<NetBackend> {
        let config = NetConfig {
            mac,
            mtu,
            queue_pairs,
            queue_size: 256,
            seccomp: tessera_seccomp::Filters::disabled(),
            stats: Stats::private(),
        };
        let mem = GuestMemoryAtomic::new(BackendMemory::new());
        Served(Arc::new(NetBackend::new(Vec::new(), config, mem).unwrap()))
    }

    fn offers(backend: &Served<NetBackend>, feature: u32) -> bool {
        backend.features() & 1 << feature != 0
    }

    /// Both Tessera's frontend and QEMU's (through the relay of
    /// --defer-early-vring-enable) need VHOST_USER_F_PROTOCOL_FEATURES:
    /// QEMU fails vhost_net_start without it.
    #[test]
    fn protocol_features_and_virtio_1_are_always_offered() {
        for pairs in [1, 2] {
            let backend = backend(pairs, None, None);
            let protocol = VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();
            assert_eq!(backend.features() & protocol, protocol);
            assert!(offers(&backend, VIRTIO_F_VERSION_1));
            assert!(backend
                .protocol_features()
                .contains(VhostUserProtocolFeatures::MQ | VhostUserProtocolFeatures::CONFIG));
            assert_eq!(backend.num_queues(), 2 * pairs);
        }
    }

    #[test]
    fn mq_is_offered_only_with_several_pairs() {
        assert!(!offers(&backend(1, None, None), VIRTIO_NET_F_MQ));
        assert!(offers(&backend(2, None, None), VIRTIO_NET_F_MQ));
    }

    #[test]
    fn mac_and_mtu_are_offered_only_when_configured() {
        let plain = backend(1, None, None);
        assert!(!offers(&plain, VIRTIO_NET_F_MAC));
        assert!(!offers(&plain, VIRTIO_NET_F_MTU));
        let configured = backend(1, Some([6, 0, 10, 80, 0, 2]), Some(9000));
        assert!(offers(&configured, VIRTIO_NET_F_MAC));
        assert!(offers(&configured, VIRTIO_NET_F_MTU));
    }

    /// Frames cross both ways with their virtio-net header: offloads in
    /// both directions need both checksum bits.
    #[test]
    fn checksum_offload_is_offered_both_ways() {
        let backend = backend(1, None, None);
        assert!(offers(&backend, VIRTIO_NET_F_CSUM));
        assert!(offers(&backend, VIRTIO_NET_F_GUEST_CSUM));
    }

    const QUEUE_SIZE: u16 = 16;

    /// Runs the worker of pair 0 for one kick of `queue`, as
    /// vhost-user-backend does; `None` if it has not returned within five
    /// seconds.
    fn kick(
        backend: &Arc<NetBackend>,
        vrings: &Arc<Vec<BackendVring>>,
        queue: u16,
    ) -> Option<io::Result<()>> {
        let (sender, receiver) = std::sync::mpsc::channel();
        let (backend, vrings) = (backend.clone(), vrings.clone());
        std::thread::spawn(move || {
            let _ = sender.send(Served(backend).handle_event(queue, EventSet::IN, &vrings, 0));
        });
        receiver
            .recv_timeout(std::time::Duration::from_secs(5))
            .ok()
    }

    /// One pair on a stand-in TAP (/dev/null), event_idx on, its RX and TX
    /// vrings on rings laid out by virtio-queue's mock.
    fn device() -> (Arc<NetBackend>, Arc<Vec<BackendVring>>, BackendMemory) {
        device_on(std::fs::File::open("/dev/null").unwrap())
    }

    /// The same on one end of a datagram socket pair (non-blocking, as a
    /// TAP is) standing in for the TAP; the other end is the host's.
    fn device_on_socket() -> (
        Arc<NetBackend>,
        Arc<Vec<BackendVring>>,
        BackendMemory,
        std::os::unix::net::UnixDatagram,
    ) {
        let (tap, host) = std::os::unix::net::UnixDatagram::pair().unwrap();
        tap.set_nonblocking(true).unwrap();
        let (backend, vrings, mem) =
            device_on(std::fs::File::from(std::os::fd::OwnedFd::from(tap)));
        (backend, vrings, mem, host)
    }

    /// The same on `tap_file` as the TAP.
    fn device_on(
        tap_file: std::fs::File,
    ) -> (Arc<NetBackend>, Arc<Vec<BackendVring>>, BackendMemory) {
        use vhost_user_common::testing::ready_vring;
        use virtio_queue::mock::MockSplitQueue;
        let mem = BackendMemory::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap();
        let atomic = GuestMemoryAtomic::new(mem.clone());
        let config = NetConfig {
            mac: None,
            mtu: None,
            queue_pairs: 1,
            queue_size: usize::from(QUEUE_SIZE),
            seccomp: tessera_seccomp::Filters::disabled(),
            stats: Stats::private(),
        };
        let tap = Tap::stand_in(tap_file);
        let backend = Arc::new(NetBackend::new(vec![tap], config, atomic.clone()).unwrap());
        Served(backend.clone()).set_event_idx(true);
        let vrings: Vec<BackendVring> = [0x1_0000, 0x2_0000]
            .into_iter()
            .map(|base| {
                let mock = MockSplitQueue::create(&mem, GuestAddress(base), QUEUE_SIZE);
                ready_vring(&atomic, &mock, QUEUE_SIZE)
            })
            .collect();
        (backend, Arc::new(vrings), mem)
    }

    #[test]
    fn the_counters_say_what_the_guest_sent() {
        let (backend, vrings, mem, host) = device_on_socket();
        // A 72-byte frame (header and 60 bytes), then a 4-byte one.
        post_chains(&vrings[1], &mem, &[(0x8000, 72, 0), (0x8100, 4, 0)]);
        kick(&backend, &vrings, 1).unwrap().unwrap();
        let mut frame = [0u8; 128];
        assert_eq!(host.recv(&mut frame).unwrap(), 72);
        let stats = backend.stats();
        assert_eq!(stats.get(NetCounter::TxQueueEventCount), 1);
        assert_eq!(stats.get(NetCounter::TxPacketsCount), 1);
        assert_eq!(stats.get(NetCounter::TxBytesCount), 60);
        assert_eq!(stats.get(NetCounter::TxMalformedFrames), 1);
        assert_eq!(stats.get(NetCounter::TapWriteFails), 0);
    }

    #[test]
    fn a_used_ring_over_the_avail_index_cannot_hold_a_tx_worker_forever() {
        let (backend, vrings, mem) = device();
        let (desc, avail) = {
            let state = vrings[1].get_ref();
            (
                state.get_queue().desc_table(),
                state.get_queue().avail_ring(),
            )
        };
        // The used ring laid over the avail ring, one entry ahead: each
        // completion makes the next frame visible.
        vrings[1].set_queue_info(desc, avail, avail).unwrap();
        vrings[1].set_queue_next_used(1);
        // Descriptor 0: an empty frame, dropped and completed with length 0,
        // so the used entries keep naming head 0.
        let empty = virtio_queue::desc::split::Descriptor::new(0x8000, 0, 0, 0);
        mem.write_obj(
            virtio_queue::desc::RawDescriptor::from(empty),
            GuestAddress(desc),
        )
        .unwrap();
        mem.write_obj(1u16.to_le(), GuestAddress(avail + 2))
            .unwrap();
        let result =
            kick(&backend, &vrings, 1).expect("the TX worker must get back to its event loop");
        assert!(result.is_ok(), "{result:?}");
        assert!(!backend.is_broken(1));
        assert_eq!(
            backend.stats().get(NetCounter::TxMalformedFrames),
            MAX_TX_PER_EVENT as u64
        );
    }

    #[test]
    fn each_direction_takes_its_own_limits_and_a_device_limit_is_refused() {
        let backend = backend(2, None, None);
        let limits = |json: &str| serde_json::from_str(json).unwrap();
        let message = |target, json| ControlMessage::RateLimits {
            target,
            limits: limits(json),
        };
        let tight = r#"{"bandwidth": {"size": 100, "refill_time": 100000}}"#;
        backend.0.control(message(LimitTarget::Tx, tight)).unwrap();
        assert!(!backend.0.charge(
            &backend.0.tx_limiter,
            200,
            NetCounter::TxRateLimiterThrottled
        ));
        assert!(backend.0.tx_limiter.is_blocked());
        assert!(!backend.0.rx_limiter.is_blocked());
        assert!(backend.0.charge(
            &backend.0.rx_limiter,
            1 << 30,
            NetCounter::RxRateLimiterThrottled
        ));
        assert_eq!(backend.0.stats().get(NetCounter::TxRateLimiterThrottled), 1);
        let err = backend
            .0
            .control(message(LimitTarget::Device, tight))
            .unwrap_err();
        assert!(
            err.to_string().contains("an RX and a TX rate limiter"),
            "{err}"
        );
        // The limiters' timers come after every other event of a worker.
        let events = backend.0.limiter_fds().map(|(_, event)| event);
        assert!(events.iter().all(|&e| e > backend.0.tap_event(1)));
        assert_ne!(events[0], events[1]);
    }

    #[test]
    fn an_avail_index_too_far_ahead_breaks_the_queue_instead_of_spinning() {
        let (backend, vrings, mem) = device();
        let tx_avail = vrings[1].get_ref().get_queue().avail_ring();
        mem.write_obj((QUEUE_SIZE + 1).to_le(), GuestAddress(tx_avail + 2))
            .unwrap();

        let result = kick(&backend, &vrings, 1).expect("the TX worker spins on a broken ring");
        assert!(result.is_ok(), "the worker goes on serving the other queue");
        assert!(backend.is_broken(1) && !backend.is_broken(0));
        assert_eq!(backend.stats().get(NetCounter::EventFails), 1);
        // A broken queue is left alone, kick after kick.
        assert!(kick(&backend, &vrings, 1).expect("returns").is_ok());
        assert_eq!(backend.stats().get(NetCounter::EventFails), 1);
        // Until the frontend stops it to set it up again.
        backend.stop_vring(1).unwrap();
        assert!(!backend.is_broken(1));
    }

    const RX_BUFFERS: u64 = 0x4_0000;

    /// Posts one single-descriptor chain per (address, length, flags), in
    /// descriptors 0, 1, ... and the avail ring's first entries.
    fn post_chains(vring: &BackendVring, mem: &BackendMemory, buffers: &[(u64, u32, u16)]) {
        let (desc, avail) = {
            let state = vring.get_ref();
            (
                state.get_queue().desc_table(),
                state.get_queue().avail_ring(),
            )
        };
        for (index, &(buffer, len, flags)) in (0u16..).zip(buffers) {
            let d = virtio_queue::desc::split::Descriptor::new(buffer, len, flags, 0);
            mem.write_obj(
                virtio_queue::desc::RawDescriptor::from(d),
                GuestAddress(desc + u64::from(index) * 16),
            )
            .unwrap();
            mem.write_obj(
                index.to_le(),
                GuestAddress(avail + 4 + u64::from(index) * 2),
            )
            .unwrap();
        }
        mem.write_obj((buffers.len() as u16).to_le(), GuestAddress(avail + 2))
            .unwrap();
    }

    /// Posts `count` RX chains of one `len`-byte buffer each, 4 KiB apart
    /// from RX_BUFFERS on (above both rings).
    fn post_rx(vring: &BackendVring, mem: &BackendMemory, count: u16, len: u32) {
        let write = virtio_bindings::bindings::virtio_ring::VRING_DESC_F_WRITE as u16;
        let buffers: Vec<_> = (0..u64::from(count))
            .map(|i| (RX_BUFFERS + i * 0x1000, len, write))
            .collect();
        post_chains(vring, mem, &buffers);
    }

    /// The used ring's entries so far, as (head, length).
    fn used_entries(vring: &BackendVring, mem: &BackendMemory) -> Vec<(u32, u32)> {
        let used = vring.get_ref().get_queue().used_ring();
        let count: u16 = mem.read_obj(GuestAddress(used + 2)).unwrap();
        (0..u64::from(count))
            .map(|i| {
                let entry = GuestAddress(used + 4 + i * 8);
                let head: u32 = mem.read_obj(entry).unwrap();
                let len: u32 = mem.read_obj(GuestAddress(entry.0 + 4)).unwrap();
                (head, len)
            })
            .collect()
    }

    /// Without guest GSO, RX buffers are gathered for one MTU-sized frame;
    /// a larger frame (the TAP's MTU raised past the device's) is dropped
    /// whole, never passed on cut short, and the next one gets room.
    #[test]
    fn a_frame_past_the_mtu_is_dropped_whole_and_the_next_gets_room() {
        let (backend, vrings, mem, host) = device_on_socket();
        let features =
            1u64 << VIRTIO_F_VERSION_1 | 1 << VIRTIO_NET_F_MRG_RXBUF | 1 << VIRTIO_NET_F_GUEST_CSUM;
        Served(backend.clone()).acked_features(features);
        assert_eq!(
            backend.rx_fill.load(Ordering::Relaxed),
            1500 + 18 + VNET_HDR_LEN
        );
        post_rx(&vrings[0], &mem, 6, 1024);
        let jumbo: Vec<u8> = (0..3000u32).map(|i| (i % 251) as u8).collect();
        host.send(&jumbo).unwrap();
        host.send(&jumbo).unwrap();
        kick(&backend, &vrings, 0).unwrap().unwrap();
        // The first took the two chains an MTU frame needs, and is dropped.
        // The second spans three chains: 1024 + 1024 + 952 bytes.
        assert_eq!(
            used_entries(&vrings[0], &mem),
            vec![(0, 0), (1, 1024), (2, 1024), (3, 952)]
        );
        let mut delivered = vec![0u8; 3000];
        for (i, piece) in delivered.chunks_mut(1024).enumerate() {
            mem.read_slice(piece, GuestAddress(RX_BUFFERS + 0x1000 + i as u64 * 0x1000))
                .unwrap();
        }
        // The stand-in TAP's frame has its header bytes too, where the
        // backend wrote num_buffers.
        let mut expected = jumbo;
        expected[10..12].copy_from_slice(&3u16.to_le_bytes());
        assert!(delivered == expected, "the second frame arrived changed");
        assert_eq!(backend.stats().get(NetCounter::RxFails), 1);
        assert_eq!(backend.stats().get(NetCounter::RxPacketsCount), 1);
        assert_eq!(
            backend.rx_fill.load(Ordering::Relaxed),
            MAX_FRAME_LEN + VNET_HDR_LEN
        );
    }

    #[test]
    fn guest_gso_gathers_buffers_for_64_kib_frames() {
        let (backend, _, _) = device();
        let gso = 1u64 << VIRTIO_F_VERSION_1
            | 1 << VIRTIO_NET_F_MRG_RXBUF
            | 1 << VIRTIO_NET_F_GUEST_CSUM
            | 1 << VIRTIO_NET_F_GUEST_TSO4;
        Served(backend.clone()).acked_features(gso);
        assert_eq!(
            backend.rx_fill.load(Ordering::Relaxed),
            MAX_FRAME_LEN + VNET_HDR_LEN
        );
    }

    /// With no RX buffers, frames on the TAP stop waking the worker; the
    /// guest's RX kick (it was asked for one) delivers what waited, and the
    /// TAP is watched again.
    #[test]
    fn a_worker_without_rx_buffers_sleeps_through_frames_until_the_rx_kick() {
        use vmm_sys_util::epoll::{Epoll, EpollEvent};
        let (backend, vrings, mem, host) = device_on_socket();
        let epoll = Epoll::new().unwrap();
        backend.watch_tap(0, epoll.as_raw_fd()).unwrap();
        let tap_event = backend.tap_event(0) as u16;
        let mut events = [EpollEvent::default(); 4];
        let mut woken = || epoll.wait(0, &mut events).unwrap();

        host.send(&[1u8; 100]).unwrap();
        assert_eq!(woken(), 1);
        kick(&backend, &vrings, tap_event).unwrap().unwrap();
        assert_eq!(backend.stats().get(NetCounter::NoRxAvailBuffer), 1);
        host.send(&[2u8; 100]).unwrap();
        assert_eq!(woken(), 0, "a frame woke a worker that has no buffers");

        post_rx(&vrings[0], &mem, 4, 2048);
        kick(&backend, &vrings, 0).unwrap().unwrap();
        assert_eq!(used_entries(&vrings[0], &mem), vec![(0, 100), (1, 100)]);
        host.send(&[3u8; 100]).unwrap();
        assert_eq!(woken(), 1);
        kick(&backend, &vrings, tap_event).unwrap().unwrap();
        assert_eq!(backend.stats().get(NetCounter::RxPacketsCount), 3);
    }

    /// A flood into the TAP while the guest has buffers: one pass takes
    /// MAX_RX_PER_EVENT frames, tells the guest, and kicks the worker to
    /// come back after its other events.
    #[test]
    fn an_rx_pass_yields_after_its_budget_and_comes_back() {
        use std::os::fd::{FromRawFd, IntoRawFd};
        use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};
        let (backend, vrings, mem, host) = device_on_socket();
        let rx_kick = EventFd::new(EFD_NONBLOCK).unwrap();
        let fd = rx_kick.try_clone().unwrap().into_raw_fd();
        // SAFETY: `fd` is a new descriptor this test owns and hands over.
        let kick_file = unsafe { std::fs::File::from_raw_fd(fd) };
        vrings[0].set_kick(Some(kick_file));
        post_rx(&vrings[0], &mem, QUEUE_SIZE, 2048);
        let frames = MAX_RX_PER_EVENT + 4;
        for _ in 0..frames {
            host.send(&[7u8; 100]).unwrap();
        }
        let tap_event = backend.tap_event(0) as u16;
        kick(&backend, &vrings, tap_event).unwrap().unwrap();
        assert_eq!(used_entries(&vrings[0], &mem).len(), MAX_RX_PER_EVENT);
        assert_eq!(rx_kick.read().unwrap(), 1, "the worker did not kick itself");

        kick(&backend, &vrings, 0).unwrap().unwrap();
        assert_eq!(used_entries(&vrings[0], &mem).len(), frames);
        assert!(rx_kick.read().is_err(), "a pass within its budget kicked");
    }
}
