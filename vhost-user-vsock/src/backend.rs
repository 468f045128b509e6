//! The vhost-user vsock device: features, the config space (the guest's
//! CID), and one worker thread for the RX, TX and event queues and the
//! muxer's host sockets. TX hands each guest packet to the muxer; RX fills
//! the guest's buffers with what the muxer owes it while both have some.
//! The event queue carries only TRANSPORT_RESET, which the device sends
//! on snapshot restore; its buffers wait until then.

use std::io;
use std::sync::{Mutex, MutexGuard};

use backend_stats::VsockCounter;
use vhost_user_backend::VringT;
use vhost_user_common::device::{Device, WorkerCommon, WorkerEvent};
use vhost_user_common::guest_log;
use vhost_user_common::ratelimit::{self, RateLimit};
use vhost_user_common::ring;
use vhost_user_common::worker::{self, BrokenQueues};
use vhost_user_common::{BackendMemory, BackendVring};
use virtio_queue::{QueueOwnedT, QueueT};
use virtio_vsock::packet::{VsockPacket, PKT_HEADER_SIZE};
use vm_memory::{GuestAddressSpace, GuestMemoryAtomic, GuestMemoryLoadGuard};
use vmm_sys_util::epoll::EventSet;

use crate::muxer::Muxer;
use crate::packet::Header;

/// RX, TX and event.
pub const NUM_QUEUES: usize = 3;
const RX: usize = 0;
const TX: usize = 1;
const EVENT: usize = 2;
/// The worker's event for the muxer's epoll fd (after the queues' and
/// the exit event's).
pub const MUXER_EVENT: u16 = NUM_QUEUES as u16 + 1;
/// The largest payload of one packet, either way (Linux's own limit).
pub const MAX_PACKET_DATA: u32 = 64 * 1024;
/// Packets one event takes from, or gives to, a queue before the worker
/// looks at its other events and comes back.
pub const MAX_PACKETS_PER_EVENT: usize = 256;

/// Guest packets dropped, logged at debug level.
static DROPPED: RateLimit = RateLimit::new(ratelimit::BURST, ratelimit::INTERVAL);

/// Settings of the device.
#[derive(Debug, Clone)]
pub struct VsockConfig {
    pub queue_size: usize,
    /// The seccomp filters; the worker installs "worker" at its first event.
    pub seccomp: tessera_seccomp::Filters,
}

pub use vhost_user_common::worker::QueueError;

/// A virtio-vsock device served over vhost-user.
pub struct VsockBackend {
    muxer: Mutex<Muxer>,
    mem: GuestMemoryAtomic<BackendMemory>,
    common: WorkerCommon,
    /// Per queue: the guest broke it; not served until it is set up again.
    broken: BrokenQueues,
}

impl VsockBackend {
    pub fn new(
        muxer: Muxer,
        config: VsockConfig,
        mem: GuestMemoryAtomic<BackendMemory>,
    ) -> io::Result<Self> {
        let common = WorkerCommon::new(config.queue_size, 1, config.seccomp.clone())?;
        Ok(Self {
            muxer: Mutex::new(muxer),
            mem,
            common,
            broken: BrokenQueues::new(NUM_QUEUES),
        })
    }

    /// The muxer (its epoll fd for the worker, its counters).
    pub fn muxer(&self) -> MutexGuard<'_, Muxer> {
        self.muxer.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Wakes the worker thread so that it exits.
    pub fn stop_workers(&self) {
        self.common.stop_workers();
    }

    fn signal(&self, vring: &BackendVring) -> Result<(), QueueError> {
        if !self.common.event_idx() || vring.needs_notification()? {
            vring.signal_used_queue()?;
        }
        Ok(())
    }

    /// Whether the guest broke `queue`.
    pub fn is_broken(&self, queue: usize) -> bool {
        self.broken.is_broken(queue)
    }

    fn break_queue(&self, queue: usize, err: &QueueError, muxer: &Muxer) {
        muxer.stats().inc(VsockCounter::EventFails);
        self.broken.mark(queue, err);
    }

    /// Guest to host: every packet posted goes to the muxer, then back to
    /// the guest. Returns whether the budget ran out (more may wait).
    fn process_tx(&self, vring: &BackendVring, muxer: &mut Muxer) -> Result<bool, QueueError> {
        let to_muxer = |mut chain, mem: &GuestMemoryLoadGuard<BackendMemory>| {
            match VsockPacket::from_tx_virtq_chain(&**mem, &mut chain, MAX_PACKET_DATA) {
                Ok(packet) => {
                    muxer.stats().inc(VsockCounter::TxPacketsCount);
                    muxer.on_guest_packet(&Header::of(&packet), packet.data_slice());
                }
                Err(err) => {
                    muxer.stats().inc(VsockCounter::DroppedPackets);
                    guest_log!(&DROPPED, log::Level::Debug, "TX packet dropped: {err}");
                }
            }
            true
        };
        let memory = || self.mem.memory();
        let taken = worker::take_posted(vring, memory, MAX_PACKETS_PER_EVENT, to_muxer, |vring| {
            self.signal(vring)
        })?;
        Ok(taken == worker::Taken::BudgetSpent)
    }

    /// Host to guest: fills RX buffers with the packets the muxer owes,
    /// while both have some. Returns whether the budget ran out.
    fn process_rx(&self, vring: &BackendVring, muxer: &mut Muxer) -> Result<bool, QueueError> {
        let mut given = 0;
        let mut result = Ok(false);
        while muxer.has_rx_work() {
            if given == MAX_PACKETS_PER_EVENT {
                result = Ok(true);
                break;
            }
            // The latest memory table each time: the ring must read the
            // same through it as through enable_notification below.
            let mem = self.mem.memory();
            let next = ring::next_chain(vring.get_mut().get_queue_mut(), mem.clone())?;
            let Some(mut chain) = next else {
                // No buffers: wait for the guest's kick (unless buffers
                // came in between).
                if vring.enable_notification()? {
                    vring.disable_notification()?;
                    continue;
                }
                break;
            };
            let head = chain.head_index();
            let mut packet =
                match VsockPacket::from_rx_virtq_chain(&*mem, &mut chain, MAX_PACKET_DATA) {
                    Ok(packet) => packet,
                    Err(err) => {
                        guest_log!(&DROPPED, log::Level::Debug, "RX buffer refused: {err}");
                        vring.add_used(head, 0)?;
                        given += 1;
                        continue;
                    }
                };
            let mut header = Header::default();
            let Some(len) = muxer.fill_rx(&mut header, packet.data_slice()) else {
                vring.get_mut().get_queue_mut().go_to_previous_position();
                break;
            };
            header.write_to(&mut packet);
            muxer.stats().inc(VsockCounter::RxPacketsCount);
            vring.add_used(head, PKT_HEADER_SIZE as u32 + len)?;
            given += 1;
        }
        if !muxer.has_rx_work() {
            // Nothing to send: the guest's new buffers need not wake the
            // worker (it takes them from the ring when it has something);
            // notifications come back on when it runs out of buffers.
            vring.disable_notification()?;
        }
        if given > 0 {
            self.signal(vring)?;
        }
        result
    }

    /// Serves one worker event: a queue's kick or news from the host
    /// sockets, then whatever the guest is owed.
    fn serve_event(&self, device_event: u16, vrings: &[BackendVring]) -> io::Result<()> {
        let [rx, tx, _event] = vrings else {
            return Err(io::Error::other(format!("{} vrings, not 3", vrings.len())));
        };
        let mut muxer = self.muxer();
        match usize::from(device_event) {
            RX => muxer.stats().inc(VsockCounter::RxQueueEventCount),
            TX => {
                muxer.stats().inc(VsockCounter::TxQueueEventCount);
                if !self.is_broken(TX) {
                    match self.process_tx(tx, &mut muxer) {
                        Ok(true) => kick(tx),
                        Ok(false) => {}
                        Err(err) => self.break_queue(TX, &err, &muxer),
                    }
                }
            }
            EVENT => {}
            _ if device_event == MUXER_EVENT => muxer.on_host_events()?,
            _ => return Err(io::Error::other(format!("unexpected event {device_event}"))),
        }
        if !self.is_broken(RX) && rx.get_ref().get_queue().ready() {
            match self.process_rx(rx, &mut muxer) {
                Ok(true) => kick(rx),
                Ok(false) => {}
                Err(err) => self.break_queue(RX, &err, &muxer),
            }
        }
        Ok(())
    }
}

/// Has the worker come back to `vring` after its other events.
fn kick(vring: &BackendVring) {
    if let Some(kick) = vring.get_ref().get_kick() {
        ring::kick_again(kick);
    }
}

impl Device for VsockBackend {
    fn common(&self) -> &WorkerCommon {
        &self.common
    }

    fn num_queues(&self) -> usize {
        NUM_QUEUES
    }

    fn device_features(&self) -> u64 {
        0
    }

    fn config_space(&self) -> Vec<u8> {
        self.muxer().guest_cid().to_le_bytes().to_vec()
    }

    fn queues_per_thread(&self) -> Vec<u64> {
        vec![(1 << NUM_QUEUES) - 1]
    }

    /// A stopped queue is a reset device (or a new frontend): the guest's
    /// connections are gone with it.
    fn stop_vring(&self, queue_index: u32) -> io::Result<()> {
        self.broken.clear(queue_index as usize);
        if queue_index as usize == RX {
            self.muxer().reset();
        }
        Ok(())
    }

    fn serve(&self, event: WorkerEvent<'_>) -> io::Result<()> {
        let thread_id = event.thread;
        if !event.evset.contains(EventSet::IN) {
            log::error!(
                "worker {thread_id}: unexpected event set {:?}; exiting",
                event.evset
            );
            std::process::exit(1);
        }
        if let Err(err) = self.serve_event(event.device_event, event.vrings) {
            // vhost-user-backend would end the worker and tell no one.
            log::error!("worker {thread_id}: {err}; exiting");
            std::process::exit(1);
        }
        Ok(())
    }
}
